//! How well predictors match the true activations.

use std::fmt::Write as _;

/// Errors of [`PredictorQuality::record`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QualityError {
    /// The layer index is not below the layer count.
    #[error("layer {layer} out of range ({n_layers} layers)")]
    LayerOutOfRange {
        /// Layer given.
        layer: usize,
        /// Layers tracked.
        n_layers: usize,
    },
    /// A predicted id is out of range, duplicated or out of order.
    #[error(
        "layer {layer}: predicted id {id} at position {pos} is out of range or not strictly increasing (n_ff {n_ff})"
    )]
    BadPrediction {
        /// Layer.
        layer: usize,
        /// Position in the predicted set.
        pos: usize,
        /// The id.
        id: u32,
        /// Number of neurons.
        n_ff: usize,
    },
}

/// Confusion counts of one layer, summed over tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerCounts {
    /// Predicted active and truly active.
    pub true_pos: u64,
    /// Predicted active, truly inactive (wasted work).
    pub false_pos: u64,
    /// Predicted inactive, truly active (dropped neurons: the quality loss).
    pub false_neg: u64,
    /// Predicted inactive and truly inactive.
    pub true_neg: u64,
    /// Tokens recorded.
    pub tokens: u64,
}

impl LayerCounts {
    /// `tp / (tp + fn)`: the share of truly active neurons that were predicted (1 when none were
    /// active).
    pub fn recall(&self) -> f64 {
        ratio(self.true_pos, self.true_pos + self.false_neg)
    }

    /// `tp / (tp + fp)`: the share of predicted neurons that were truly active (1 when none were
    /// predicted).
    pub fn precision(&self) -> f64 {
        ratio(self.true_pos, self.true_pos + self.false_pos)
    }

    /// Share of all (token, neuron) pairs predicted active.
    pub fn predicted_fraction(&self) -> f64 {
        ratio(self.true_pos + self.false_pos, self.total())
    }

    /// Share of all (token, neuron) pairs truly active.
    pub fn true_fraction(&self) -> f64 {
        ratio(self.true_pos + self.false_neg, self.total())
    }

    fn total(&self) -> u64 {
        self.true_pos + self.false_pos + self.false_neg + self.true_neg
    }

    fn add(&mut self, o: &LayerCounts) {
        self.true_pos += o.true_pos;
        self.false_pos += o.false_pos;
        self.false_neg += o.false_neg;
        self.true_neg += o.true_neg;
        self.tokens += o.tokens;
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 1.0 } else { a as f64 / b as f64 }
}

/// Per-layer predictor quality against true activations, accumulated over tokens.
///
/// A neuron is truly active when its ReLU pre-activation (the gate product for gated FFNs) is
/// above zero.
///
/// ```
/// use powerinfer_predictor::PredictorQuality;
/// let mut q = PredictorQuality::new(1);
/// // Neurons 0 and 2 predicted; 0 and 1 truly active.
/// q.record(0, &[0, 2], &[0.5, 0.1, -0.3, -1.0]).unwrap();
/// let c = q.layer(0).unwrap();
/// assert_eq!((c.true_pos, c.false_pos, c.false_neg, c.true_neg), (1, 1, 1, 1));
/// assert_eq!(c.recall(), 0.5);
/// println!("{}", q.table());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PredictorQuality {
    layers: Vec<LayerCounts>,
}

impl PredictorQuality {
    /// Zero counts for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        PredictorQuality {
            layers: vec![LayerCounts::default(); n_layers],
        }
    }

    /// Records one token of one layer: `predicted` is the predicted active set (strictly
    /// increasing ids below `pre_activation.len()`), `pre_activation[i] > 0` says whether neuron
    /// `i` is truly active.
    pub fn record(
        &mut self,
        layer: usize,
        predicted: &[u32],
        pre_activation: &[f32],
    ) -> Result<(), QualityError> {
        let n_layers = self.layers.len();
        let c = self
            .layers
            .get_mut(layer)
            .ok_or(QualityError::LayerOutOfRange { layer, n_layers })?;
        let n_ff = pre_activation.len();
        let mut next = 0usize;
        let mut d = LayerCounts {
            tokens: 1,
            ..LayerCounts::default()
        };
        for (pos, &id) in predicted.iter().enumerate() {
            let i = id as usize;
            if i >= n_ff || i < next {
                return Err(QualityError::BadPrediction {
                    layer,
                    pos,
                    id,
                    n_ff,
                });
            }
            for &v in &pre_activation[next..i] {
                if v > 0.0 {
                    d.false_neg += 1;
                } else {
                    d.true_neg += 1;
                }
            }
            if pre_activation[i] > 0.0 {
                d.true_pos += 1;
            } else {
                d.false_pos += 1;
            }
            next = i + 1;
        }
        for &v in &pre_activation[next..] {
            if v > 0.0 {
                d.false_neg += 1;
            } else {
                d.true_neg += 1;
            }
        }
        c.add(&d);
        Ok(())
    }

    /// Counts of one layer.
    pub fn layer(&self, layer: usize) -> Option<&LayerCounts> {
        self.layers.get(layer)
    }

    /// Counts of every layer.
    pub fn layers(&self) -> &[LayerCounts] {
        &self.layers
    }

    /// Counts summed over layers.
    pub fn total(&self) -> LayerCounts {
        let mut t = LayerCounts::default();
        self.layers.iter().for_each(|c| t.add(c));
        t
    }

    /// A plain-text table: one line per layer and a total line, with recall, precision, the
    /// predicted and true active fractions and the raw counts.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:>5} {:>7} {:>9} {:>8} {:>8} {:>8} {:>12} {:>12} {:>12}",
            "layer", "recall", "precision", "pred%", "true%", "tokens", "TP", "FP", "FN"
        );
        let line = |s: &mut String, name: &str, c: &LayerCounts| {
            let _ = writeln!(
                s,
                "{:>5} {:>7.4} {:>9.4} {:>8.2} {:>8.2} {:>8} {:>12} {:>12} {:>12}",
                name,
                c.recall(),
                c.precision(),
                100.0 * c.predicted_fraction(),
                100.0 * c.true_fraction(),
                c.tokens,
                c.true_pos,
                c.false_pos,
                c.false_neg
            );
        };
        for (i, c) in self.layers.iter().enumerate() {
            line(&mut s, &i.to_string(), c);
        }
        line(&mut s, "all", &self.total());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splitmix64.
    fn rng(state: &mut u64) -> u64 {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn counts_match_a_brute_force_count() {
        let mut s = 7u64;
        let mut q = PredictorQuality::new(3);
        let mut want = [LayerCounts::default(); 3];
        for tok in 0..50 {
            let layer = tok % 3;
            let n = 1 + (rng(&mut s) % 97) as usize;
            let pre: Vec<f32> = (0..n).map(|_| (rng(&mut s) % 5) as f32 - 2.0).collect();
            let pred: Vec<u32> = (0..n as u32)
                .filter(|_| rng(&mut s).is_multiple_of(3))
                .collect();
            q.record(layer, &pred, &pre).unwrap();
            let w = &mut want[layer];
            w.tokens += 1;
            for (i, &v) in pre.iter().enumerate() {
                match (pred.contains(&(i as u32)), v > 0.0) {
                    (true, true) => w.true_pos += 1,
                    (true, false) => w.false_pos += 1,
                    (false, true) => w.false_neg += 1,
                    (false, false) => w.true_neg += 1,
                }
            }
        }
        assert_eq!(q.layers(), &want);
        let t = q.total();
        assert_eq!(t.tokens, 50);
        let c = &want[0];
        assert_eq!(
            c.recall(),
            c.true_pos as f64 / (c.true_pos + c.false_neg) as f64
        );
        assert_eq!(
            c.precision(),
            c.true_pos as f64 / (c.true_pos + c.false_pos) as f64
        );
        let table = q.table();
        assert_eq!(table.lines().count(), 5, "{table}");
        assert!(
            table
                .lines()
                .last()
                .unwrap()
                .trim_start()
                .starts_with("all")
        );
    }

    #[test]
    fn bad_input_is_an_error() {
        let mut q = PredictorQuality::new(2);
        assert!(matches!(
            q.record(2, &[], &[1.0]),
            Err(QualityError::LayerOutOfRange {
                layer: 2,
                n_layers: 2
            })
        ));
        assert!(matches!(
            q.record(0, &[1, 1], &[1.0, 1.0]),
            Err(QualityError::BadPrediction { pos: 1, .. })
        ));
        assert!(matches!(
            q.record(0, &[2], &[1.0, 1.0]),
            Err(QualityError::BadPrediction { id: 2, .. })
        ));
        // Nothing was counted by the failed calls.
        assert_eq!(q.total(), LayerCounts::default());
    }
}
