//! Training per-layer predictors `p = fc2 · relu(fc1 · x)` from an activation [`Profile`].
//!
//! Per layer: the profile's sampled pairs (FFN input `x`, activity bits `y`) are split into a
//! training set and a held-out set (`holdout`, 10% by default, chosen by a seeded shuffle). A
//! network of hidden width `H` is trained with a weighted logistic loss,
//! `pos_weight · y · softplus(-p) + (1 - y) · softplus(p)` averaged over tokens and neurons
//! (positives weighted up so recall is favoured), by Adam over shuffled mini-batches with a
//! cosine learning-rate decay. Inputs are scaled per dimension by the inverse RMS of the training
//! inputs while training; the scale is folded into `fc1` afterwards, so the result takes the raw
//! FFN input like the reference's predictors (no biases, no sigmoid).
//!
//! On the held-out set the threshold is the largest value at which the recall still reaches the
//! target (`p >= threshold` predicts active); recall, precision, the predicted fraction and the
//! skipped fraction of truly inactive neurons are measured there. `H` runs up a ladder (32, 64,
//! 128, 256, 512 by default, capped by `max_hidden`); the first width that reaches the target
//! recall while skipping at least `min_skip` of the inactive neurons is kept; the climb also stops
//! when doubling the width skips less than `min_gain` more (the narrower width is kept). Everything is deterministic for a seed: layers are trained in parallel
//! (rayon), each on its own single-threaded matrix products.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

use crate::profile::{LayerProfile, Profile, mask_bytes};

/// Errors of training.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// Too few sampled tokens to train and hold some out.
    #[error("layer {layer}: {n} sampled tokens, at least {min} are needed to train and evaluate")]
    TooFewSamples {
        /// The layer.
        layer: usize,
        /// Samples found.
        n: usize,
        /// Samples needed.
        min: usize,
    },
    /// Sizes that do not fit together.
    #[error("invalid training data: {0}")]
    BadData(String),
    /// A configuration value out of range.
    #[error("invalid training configuration: {0}")]
    BadConfig(String),
    /// The thread pool could not be built.
    #[error("thread pool: {0}")]
    ThreadPool(String),
}

/// Training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Held-out recall to reach (default 0.99).
    pub target_recall: f32,
    /// Hidden widths to try, ascending (default 32, 64, 128, 256, 512).
    pub hidden_sizes: Vec<usize>,
    /// Widest hidden layer allowed (default 512); caps `hidden_sizes`.
    pub max_hidden: usize,
    /// Passes over the training set per width (default 20).
    pub epochs: usize,
    /// Tokens per mini-batch (default 128).
    pub batch_size: usize,
    /// Adam's peak learning rate (default 1e-2), decayed to a tenth by a cosine.
    pub learning_rate: f32,
    /// Fraction of the samples held out for the threshold and the statistics (default 0.1).
    pub holdout: f32,
    /// Weight of positive (active) labels; `None`: `2 · max(1, inactive / active)` of the
    /// layer's training labels.
    pub pos_weight: Option<f32>,
    /// A width is good enough when, at the target recall, it skips at least this fraction of
    /// the truly inactive neurons (default 0.5).
    pub min_skip: f32,
    /// Stop climbing the ladder when a width skips less than this much more (absolute) of the
    /// inactive neurons than the previous one (default 0.01); the previous one is kept.
    pub min_gain: f32,
    /// Seed of initialisation and shuffling.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            target_recall: 0.99,
            hidden_sizes: vec![32, 64, 128, 256, 512],
            max_hidden: 512,
            epochs: 20,
            batch_size: 128,
            learning_rate: 1e-2,
            holdout: 0.1,
            pos_weight: None,
            min_skip: 0.5,
            min_gain: 0.01,
            seed: 0x5eed,
        }
    }
}

impl TrainConfig {
    fn check(&self) -> Result<Vec<usize>, TrainError> {
        let bad = |m: String| Err(TrainError::BadConfig(m));
        if !(self.target_recall > 0.0 && self.target_recall <= 1.0) {
            return bad(format!(
                "target recall {} is not in (0, 1]",
                self.target_recall
            ));
        }
        if !(self.holdout > 0.0 && self.holdout < 1.0) {
            return bad(format!("holdout {} is not in (0, 1)", self.holdout));
        }
        if self.epochs == 0 || self.batch_size == 0 {
            return bad("epochs and batch size must be positive".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(format!("learning rate {}", self.learning_rate));
        }
        if let Some(w) = self.pos_weight
            && !(w > 0.0 && w.is_finite())
        {
            return bad(format!("positive weight {w}"));
        }
        if !(self.min_gain.is_finite() && self.min_skip.is_finite()) {
            return bad(format!(
                "min gain {} / min skip {}",
                self.min_gain, self.min_skip
            ));
        }
        if self.max_hidden == 0 {
            return bad("max hidden width 0".into());
        }
        let mut ladder: Vec<usize> = self
            .hidden_sizes
            .iter()
            .copied()
            .filter(|&h| h > 0 && h <= self.max_hidden)
            .collect();
        ladder.sort_unstable();
        ladder.dedup();
        if ladder.is_empty() {
            ladder.push(self.max_hidden);
        }
        Ok(ladder)
    }
}

/// One layer's training pairs: inputs `n_samples x n_embd` (f32) and activity bit masks
/// `n_samples x ceil(n_ff / 8)` (neuron `j`: byte `j / 8`, bit `j % 8`).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerData {
    n_embd: usize,
    n_ff: usize,
    x: Vec<f32>,
    active: Vec<u8>,
}

impl LayerData {
    /// Checks the sizes.
    pub fn new(
        n_embd: usize,
        n_ff: usize,
        x: Vec<f32>,
        active: Vec<u8>,
    ) -> Result<Self, TrainError> {
        if n_embd == 0 || n_ff == 0 {
            return Err(TrainError::BadData(format!("n_embd {n_embd}, n_ff {n_ff}")));
        }
        if !x.len().is_multiple_of(n_embd) || active.len() != x.len() / n_embd * mask_bytes(n_ff) {
            return Err(TrainError::BadData(format!(
                "{} inputs and {} mask bytes do not make rows of n_embd {n_embd} / n_ff {n_ff}",
                x.len(),
                active.len()
            )));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(TrainError::BadData("non-finite input value".into()));
        }
        Ok(Self {
            n_embd,
            n_ff,
            x,
            active,
        })
    }

    /// A profile layer's samples, converted to f32.
    pub fn from_layer(
        layer: &LayerProfile,
        n_embd: usize,
        n_ff: usize,
    ) -> Result<Self, TrainError> {
        Self::new(
            n_embd,
            n_ff,
            layer.x.iter().map(|v| v.to_f32()).collect(),
            layer.active.clone(),
        )
    }

    /// Sampled tokens.
    pub fn n_samples(&self) -> usize {
        self.x.len() / self.n_embd
    }

    /// Input width.
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Neurons.
    pub fn n_ff(&self) -> usize {
        self.n_ff
    }

    /// Input row `s`.
    pub fn x_row(&self, s: usize) -> &[f32] {
        &self.x[s * self.n_embd..(s + 1) * self.n_embd]
    }

    /// Whether neuron `j` is active in sample `s`.
    pub fn label(&self, s: usize, j: usize) -> bool {
        self.active[s * mask_bytes(self.n_ff) + j / 8] >> (j % 8) & 1 == 1
    }
}

/// The recalls at which [`EvalStats::predicted_at_recall`] is measured.
pub const RECALL_POINTS: [f64; 3] = [0.9, 0.95, 0.99];

/// Held-out quality of one trained predictor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalStats {
    /// The chosen threshold (`p >= threshold` predicts active).
    pub threshold: f32,
    /// Truly active (token, neuron) pairs predicted active / truly active.
    pub recall: f64,
    /// Truly active pairs among those predicted active.
    pub precision: f64,
    /// Fraction of pairs predicted active (the compute a sparse FFN still does).
    pub predicted_fraction: f64,
    /// Fraction of pairs truly active.
    pub active_fraction: f64,
    /// Fraction of truly inactive pairs predicted inactive (the work saved of what could be).
    pub skip: f64,
    /// The predicted fraction at the thresholds that give held-out recall
    /// [`RECALL_POINTS`] (0.9, 0.95, 0.99): the cost of each recall.
    pub predicted_at_recall: [f64; 3],
    /// The mean training loss over the last epoch.
    pub train_loss: f32,
    /// Held-out tokens.
    pub n_eval: usize,
}

/// One width tried for a layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attempt {
    /// Hidden width.
    pub hidden: usize,
    /// Its held-out quality.
    pub stats: EvalStats,
}

/// A trained layer predictor.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainedLayer {
    /// Hidden width `H`.
    pub hidden: usize,
    /// Input width.
    pub n_embd: usize,
    /// Neurons.
    pub n_ff: usize,
    /// `fc1`, `H x n_embd` row-major (applies to the raw FFN input).
    pub fc1: Vec<f32>,
    /// `fc2`, `n_ff x H` row-major.
    pub fc2: Vec<f32>,
    /// The held-out threshold (`stats.threshold`).
    pub threshold: f32,
    /// Held-out quality of the kept width.
    pub stats: EvalStats,
    /// Every width tried, in order.
    pub attempts: Vec<Attempt>,
    /// Whether the kept width met the target recall and `min_skip`.
    pub reached_target: bool,
}

impl TrainedLayer {
    /// `p = fc2 · relu(fc1 · x)` for one input (plain loops).
    pub fn scores(&self, x: &[f32]) -> Vec<f32> {
        let a: Vec<f32> = self
            .fc1
            .chunks_exact(self.n_embd)
            .map(|r| r.iter().zip(x).map(|(w, v)| w * v).sum::<f32>().max(0.0))
            .collect();
        self.fc2
            .chunks_exact(self.hidden)
            .map(|r| r.iter().zip(&a).map(|(w, v)| w * v).sum())
            .collect()
    }
}

/// What training reports while it runs (from worker threads).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrainEvent {
    /// An epoch finished.
    Epoch {
        /// Layer.
        layer: usize,
        /// Hidden width being trained.
        hidden: usize,
        /// Epochs done.
        epoch: usize,
        /// Epochs per width.
        epochs: usize,
        /// Mean training loss of the epoch (measured on every fourth batch).
        loss: f32,
    },
    /// A width was trained and evaluated.
    Attempt {
        /// Layer.
        layer: usize,
        /// Hidden width.
        hidden: usize,
        /// Held-out quality.
        stats: EvalStats,
    },
    /// A layer is done.
    LayerDone {
        /// Layer.
        layer: usize,
        /// The kept width.
        hidden: usize,
        /// Its held-out quality.
        stats: EvalStats,
    },
}

/// The training loss and its gradients for one batch: `fc1` `[H, d]`, `fc2` `[n_ff, H]`, `x`
/// `[B, d]`, `y` `[B, n_ff]` (0 or 1). Loss: mean over the `B · n_ff` pairs of
/// `pos_weight · y · softplus(-p) + (1 - y) · softplus(p)`. Returns `(loss, d fc1, d fc2)`.
pub fn loss_and_grad(
    fc1: &Array2<f32>,
    fc2: &Array2<f32>,
    x: ArrayView2<'_, f32>,
    y: ArrayView2<'_, f32>,
    pos_weight: f32,
) -> (f32, Array2<f32>, Array2<f32>) {
    let (h, b, n_ff) = (fc1.nrows(), x.nrows(), fc2.nrows());
    let mut s = Scratch::new(b, h, n_ff, fc1.ncols());
    let loss = s.step(fc1, fc2, x, y, pos_weight, true);
    (loss, s.g1, s.g2)
}

/// The scalar `f64` reference of [`loss_and_grad`] on row-major slices: `fc1` `H x d`, `fc2`
/// `n_ff x H`, `x` `B x d`, `y` `B x n_ff`. Returns `(loss, d fc1, d fc2)`.
#[allow(clippy::too_many_arguments)]
pub fn reference_loss_and_grad(
    fc1: &[f64],
    fc2: &[f64],
    hidden: usize,
    n_embd: usize,
    n_ff: usize,
    x: &[f64],
    y: &[f64],
    pos_weight: f64,
) -> (f64, Vec<f64>, Vec<f64>) {
    let b = x.len() / n_embd;
    let norm = 1.0 / (b * n_ff) as f64;
    let mut loss = 0.0;
    let mut g1 = vec![0.0; hidden * n_embd];
    let mut g2 = vec![0.0; n_ff * hidden];
    let sp = |z: f64| {
        if z > 0.0 {
            z + (-z).exp().ln_1p()
        } else {
            z.exp().ln_1p()
        }
    };
    for r in 0..b {
        let xr = &x[r * n_embd..(r + 1) * n_embd];
        let z: Vec<f64> = (0..hidden)
            .map(|k| (0..n_embd).map(|i| fc1[k * n_embd + i] * xr[i]).sum())
            .collect();
        let a: Vec<f64> = z.iter().map(|&v| v.max(0.0)).collect();
        let mut da = vec![0.0; hidden];
        for j in 0..n_ff {
            let p: f64 = (0..hidden).map(|k| fc2[j * hidden + k] * a[k]).sum();
            let yy = y[r * n_ff + j];
            loss += norm * (pos_weight * yy * sp(-p) + (1.0 - yy) * sp(p));
            let sig = 1.0 / (1.0 + (-p).exp());
            let g = norm * (pos_weight * yy * (sig - 1.0) + (1.0 - yy) * sig);
            for k in 0..hidden {
                g2[j * hidden + k] += g * a[k];
                da[k] += g * fc2[j * hidden + k];
            }
        }
        for k in 0..hidden {
            if z[k] > 0.0 {
                for i in 0..n_embd {
                    g1[k * n_embd + i] += da[k] * xr[i];
                }
            }
        }
    }
    (loss, g1, g2)
}

/// Buffers of one training step.
struct Scratch {
    z: Array2<f32>,
    p: Array2<f32>,
    da: Array2<f32>,
    g1: Array2<f32>,
    g2: Array2<f32>,
}

impl Scratch {
    fn new(b: usize, h: usize, n_ff: usize, d: usize) -> Self {
        Self {
            z: Array2::zeros((b, h)),
            p: Array2::zeros((b, n_ff)),
            da: Array2::zeros((b, h)),
            g1: Array2::zeros((h, d)),
            g2: Array2::zeros((n_ff, h)),
        }
    }

    /// Forward and backward of a batch of `x.nrows()` rows (at most the scratch's batch).
    fn step(
        &mut self,
        fc1: &Array2<f32>,
        fc2: &Array2<f32>,
        x: ArrayView2<'_, f32>,
        y: ArrayView2<'_, f32>,
        pos_weight: f32,
        with_loss: bool,
    ) -> f32 {
        let b = x.nrows();
        let n_ff = fc2.nrows();
        let mut z = self.z.slice_mut(ndarray::s![..b, ..]);
        general_mat_mul(1.0, &x, &fc1.t(), 0.0, &mut z);
        z.mapv_inplace(|v| v.max(0.0)); // z now holds a = relu(z); a > 0 iff z > 0
        let mut p = self.p.slice_mut(ndarray::s![..b, ..]);
        general_mat_mul(1.0, &z, &fc2.t(), 0.0, &mut p);
        let norm = 1.0 / (b * n_ff) as f32;
        let mut loss = 0.0f64;
        let pw = pos_weight;
        if with_loss {
            ndarray::Zip::from(&mut p).and(&y).for_each(|pv, &yv| {
                let v = *pv;
                // one exponential for both: e = exp(-|v|)
                let e = (-v.abs()).exp();
                let sp = v.max(0.0) + e.ln_1p(); // softplus(v); softplus(-v) = sp - v
                let s = if v >= 0.0 {
                    1.0 / (1.0 + e)
                } else {
                    e / (1.0 + e)
                };
                if yv > 0.5 {
                    loss += f64::from(pw * (sp - v));
                    *pv = norm * pw * (s - 1.0);
                } else {
                    loss += f64::from(sp);
                    *pv = norm * s;
                }
            });
        } else {
            ndarray::Zip::from(&mut p).and(&y).for_each(|pv, &yv| {
                let v = *pv;
                let e = (-v.abs()).exp();
                let s = if v >= 0.0 {
                    1.0 / (1.0 + e)
                } else {
                    e / (1.0 + e)
                };
                *pv = if yv > 0.5 {
                    norm * pw * (s - 1.0)
                } else {
                    norm * s
                };
            });
        }
        // p now holds dL/dp
        general_mat_mul(1.0, &p.t(), &z, 0.0, &mut self.g2);
        let mut da = self.da.slice_mut(ndarray::s![..b, ..]);
        general_mat_mul(1.0, &p, fc2, 0.0, &mut da);
        ndarray::Zip::from(&mut da).and(&z).for_each(|g, &a| {
            if a <= 0.0 {
                *g = 0.0;
            }
        });
        general_mat_mul(1.0, &da.t(), &x, 0.0, &mut self.g1);
        (loss * f64::from(norm)) as f32
    }
}

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`.
    fn sym(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn shuffle(&mut self, v: &mut [usize]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

struct Adam {
    m: Array2<f32>,
    v: Array2<f32>,
}

impl Adam {
    fn new(shape: (usize, usize)) -> Self {
        Self {
            m: Array2::zeros(shape),
            v: Array2::zeros(shape),
        }
    }
    fn update(&mut self, w: &mut Array2<f32>, g: &Array2<f32>, lr: f32, t: i32) {
        const B1: f32 = 0.9;
        const B2: f32 = 0.999;
        let c1 = 1.0 - B1.powi(t);
        let c2 = 1.0 - B2.powi(t);
        ndarray::Zip::from(w)
            .and(&mut self.m)
            .and(&mut self.v)
            .and(g)
            .for_each(|w, m, v, &g| {
                *m = B1 * *m + (1.0 - B1) * g;
                *v = B2 * *v + (1.0 - B2) * g * g;
                *w -= lr * (*m / c1) / ((*v / c2).sqrt() + 1e-8);
            });
    }
}

/// Gathers rows `idx` of `data` (scaled by `scale`) into `x` and their labels into `y`.
fn gather(
    data: &LayerData,
    idx: &[usize],
    scale: &[f32],
    x: &mut Array2<f32>,
    y: &mut Array2<f32>,
) {
    let (d, n_ff) = (data.n_embd, data.n_ff);
    let mb = mask_bytes(n_ff);
    for (r, &s) in idx.iter().enumerate() {
        let mut xr = x.row_mut(r);
        for ((dst, &v), &sc) in xr.iter_mut().zip(data.x_row(s)).zip(scale) {
            *dst = v * sc;
        }
        let mask = &data.active[s * mb..(s + 1) * mb];
        let mut yr = y.row_mut(r);
        for (j, dst) in yr.iter_mut().enumerate() {
            *dst = f32::from(mask[j / 8] >> (j % 8) & 1);
        }
        debug_assert_eq!(xr.len(), d);
    }
}

/// Trains one width; returns `(fc1 scaled-input, fc2, last epoch loss)`.
#[allow(clippy::too_many_arguments)]
fn train_width(
    data: &LayerData,
    train_idx: &[usize],
    scale: &[f32],
    hidden: usize,
    pos_weight: f32,
    cfg: &TrainConfig,
    seed: u64,
    layer: usize,
    progress: &(dyn Fn(TrainEvent) + Sync),
) -> (Array2<f32>, Array2<f32>, f32) {
    let (d, n_ff) = (data.n_embd, data.n_ff);
    let mut rng = Rng(seed);
    let s1 = (6.0 / d as f32).sqrt(); // He-uniform
    let s2 = (3.0 / hidden as f32).sqrt();
    let mut fc1 = Array2::from_shape_fn((hidden, d), |_| rng.sym() * s1);
    let mut fc2 = Array2::from_shape_fn((n_ff, hidden), |_| rng.sym() * s2);
    let (mut a1, mut a2) = (Adam::new((hidden, d)), Adam::new((n_ff, hidden)));
    let bs = cfg.batch_size.min(train_idx.len()).max(1);
    let mut scratch = Scratch::new(bs, hidden, n_ff, d);
    let mut xb = Array2::zeros((bs, d));
    let mut yb = Array2::zeros((bs, n_ff));
    let mut order = train_idx.to_vec();
    let steps_per_epoch = order.len().div_ceil(bs);
    let total = (steps_per_epoch * cfg.epochs).max(1);
    let mut t = 0i32;
    let mut last_loss = 0.0;
    for epoch in 0..cfg.epochs {
        rng.shuffle(&mut order);
        let (mut sum, mut n) = (0.0f64, 0usize);
        for chunk in order.chunks(bs) {
            let b = chunk.len();
            gather(data, chunk, scale, &mut xb, &mut yb);
            let xv = xb.slice(ndarray::s![..b, ..]);
            let yv = yb.slice(ndarray::s![..b, ..]);
            // the loss (for reports only) on every fourth batch
            let with_loss = t % 4 == 0;
            let loss = scratch.step(&fc1, &fc2, xv, yv, pos_weight, with_loss);
            if with_loss {
                sum += f64::from(loss) * b as f64;
                n += b;
            }
            let frac = t as f32 / total as f32;
            let lr = cfg.learning_rate * (0.1 + 0.45 * (1.0 + (std::f32::consts::PI * frac).cos()));
            t += 1;
            a1.update(&mut fc1, &scratch.g1, lr, t);
            a2.update(&mut fc2, &scratch.g2, lr, t);
        }
        last_loss = (sum / n.max(1) as f64) as f32;
        progress(TrainEvent::Epoch {
            layer,
            hidden,
            epoch: epoch + 1,
            epochs: cfg.epochs,
            loss: last_loss,
        });
    }
    (fc1, fc2, last_loss)
}

/// Held-out scores, the threshold reaching `target` recall, and the statistics at it.
fn evaluate(
    data: &LayerData,
    eval_idx: &[usize],
    scale: &[f32],
    fc1: &Array2<f32>,
    fc2: &Array2<f32>,
    target: f32,
) -> EvalStats {
    let (d, n_ff) = (data.n_embd, data.n_ff);
    let hidden = fc1.nrows();
    const CH: usize = 512;
    let mut xb = Array2::zeros((CH.min(eval_idx.len()).max(1), d));
    let mut yb = Array2::zeros((xb.nrows(), n_ff));
    let mut a = Array2::zeros((xb.nrows(), hidden));
    let mut p = Array2::zeros((xb.nrows(), n_ff));
    let mut pos = Vec::new();
    let mut neg = Vec::new();
    for chunk in eval_idx.chunks(xb.nrows()) {
        let b = chunk.len();
        gather(data, chunk, scale, &mut xb, &mut yb);
        let mut av = a.slice_mut(ndarray::s![..b, ..]);
        general_mat_mul(1.0, &xb.slice(ndarray::s![..b, ..]), &fc1.t(), 0.0, &mut av);
        av.mapv_inplace(|v| v.max(0.0));
        let mut pv = p.slice_mut(ndarray::s![..b, ..]);
        general_mat_mul(1.0, &av, &fc2.t(), 0.0, &mut pv);
        for (pr, yr) in pv.axis_iter(Axis(0)).zip(yb.axis_iter(Axis(0))) {
            for (&s, &y) in pr.iter().zip(yr.iter()) {
                if y > 0.5 { pos.push(s) } else { neg.push(s) }
            }
        }
    }
    let total = (pos.len() + neg.len()) as f64;
    let threshold = if pos.is_empty() {
        f32::INFINITY
    } else {
        pos.sort_unstable_by(f32::total_cmp);
        let k =
            (((1.0 - f64::from(target)) * pos.len() as f64).floor() as usize).min(pos.len() - 1);
        pos[k]
    };
    let mut predicted_at_recall = [1.0; 3];
    if !pos.is_empty() {
        for (out, r) in predicted_at_recall.iter_mut().zip(RECALL_POINTS) {
            let k = (((1.0 - r) * pos.len() as f64).floor() as usize).min(pos.len() - 1);
            let t = pos[k];
            let n = pos.len() - k + neg.iter().filter(|&&s| s >= t).count();
            *out = n as f64 / total.max(1.0);
        }
    }
    let tp = pos.iter().filter(|&&s| s >= threshold).count();
    let fp = neg.iter().filter(|&&s| s >= threshold).count();
    let ratio = |a: usize, b: usize| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    EvalStats {
        threshold,
        recall: ratio(tp, pos.len()),
        precision: ratio(tp, tp + fp),
        predicted_fraction: (tp + fp) as f64 / total.max(1.0),
        active_fraction: pos.len() as f64 / total.max(1.0),
        skip: if neg.is_empty() {
            1.0
        } else {
            1.0 - fp as f64 / neg.len() as f64
        },
        predicted_at_recall,
        train_loss: 0.0,
        n_eval: eval_idx.len(),
    }
}

fn mix(seed: u64, v: u64) -> u64 {
    Rng(seed ^ v.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next_u64()
}

/// Trains layer `layer`'s predictor on `data` (see the module docs). Single-threaded.
pub fn train_layer(
    data: &LayerData,
    cfg: &TrainConfig,
    layer: usize,
    progress: &(dyn Fn(TrainEvent) + Sync),
) -> Result<TrainedLayer, TrainError> {
    let ladder = cfg.check()?;
    let n = data.n_samples();
    const MIN: usize = 10;
    if n < MIN {
        return Err(TrainError::TooFewSamples { layer, n, min: MIN });
    }
    let (d, n_ff) = (data.n_embd, data.n_ff);
    let mut idx: Vec<usize> = (0..n).collect();
    Rng(mix(cfg.seed, layer as u64)).shuffle(&mut idx);
    let n_eval = ((n as f64 * f64::from(cfg.holdout)).round() as usize).clamp(1, n - 1);
    let (train_idx, eval_idx) = idx.split_at(n - n_eval);
    let mut eval_sorted = eval_idx.to_vec();
    eval_sorted.sort_unstable();

    // per-dimension input scale: inverse RMS over the training rows
    let mut ss = vec![0.0f64; d];
    for &s in train_idx {
        for (a, &v) in ss.iter_mut().zip(data.x_row(s)) {
            *a += f64::from(v) * f64::from(v);
        }
    }
    let scale: Vec<f32> = ss
        .iter()
        .map(|&s| {
            let rms = (s / train_idx.len() as f64).sqrt();
            if rms > 1e-20 { (1.0 / rms) as f32 } else { 1.0 }
        })
        .collect();

    let pos_weight = cfg.pos_weight.unwrap_or_else(|| {
        let mut pos = 0u64;
        let mb = mask_bytes(n_ff);
        for &s in train_idx {
            let m = &data.active[s * mb..(s + 1) * mb];
            pos += m.iter().map(|b| u64::from(b.count_ones())).sum::<u64>();
        }
        let total = (train_idx.len() * n_ff) as f64;
        let pos = pos as f64;
        if pos == 0.0 {
            2.0
        } else {
            (2.0 * ((total - pos) / pos).max(1.0)) as f32
        }
    });

    let mut attempts = Vec::new();
    type Kept = (usize, Array2<f32>, Array2<f32>, EvalStats, bool);
    let mut best: Option<Kept> = None;
    for &hidden in &ladder {
        let seed = mix(cfg.seed, ((layer as u64) << 20) ^ hidden as u64);
        let (fc1, fc2, loss) = train_width(
            data, train_idx, &scale, hidden, pos_weight, cfg, seed, layer, progress,
        );
        let mut stats = evaluate(data, &eval_sorted, &scale, &fc1, &fc2, cfg.target_recall);
        stats.train_loss = loss;
        progress(TrainEvent::Attempt {
            layer,
            hidden,
            stats,
        });
        attempts.push(Attempt { hidden, stats });
        let ok = stats.recall >= f64::from(cfg.target_recall) - 1e-9
            && stats.skip >= f64::from(cfg.min_skip);
        let gain = best.as_ref().map(|b| stats.skip - b.3.skip);
        if ok || gain.is_none_or(|g| g >= f64::from(cfg.min_gain)) {
            best = Some((hidden, fc1, fc2, stats, ok));
            if ok {
                break;
            }
        } else {
            // doubling the width bought less than `min_gain`: keep the narrower one
            break;
        }
    }
    let (hidden, fc1, fc2, stats, reached_target) = best.expect("the ladder is not empty");
    // fold the input scale into fc1, round both to f16 (how they are stored) and choose the
    // threshold again for exactly those weights on the raw inputs
    let mut fc1 = fc1;
    for mut row in fc1.axis_iter_mut(Axis(0)) {
        for (w, &s) in row.iter_mut().zip(&scale) {
            *w = half::f16::from_f32(*w * s).to_f32();
        }
    }
    let mut fc2 = fc2;
    fc2.mapv_inplace(|w| half::f16::from_f32(w).to_f32());
    let ones = vec![1.0f32; d];
    let mut stats = EvalStats {
        train_loss: stats.train_loss,
        ..evaluate(data, &eval_sorted, &ones, &fc1, &fc2, cfg.target_recall)
    };
    if let Some(a) = attempts.iter_mut().rev().find(|a| a.hidden == hidden) {
        a.stats = stats;
    }
    stats.n_eval = eval_sorted.len();
    progress(TrainEvent::LayerDone {
        layer,
        hidden,
        stats,
    });
    Ok(TrainedLayer {
        hidden,
        n_embd: d,
        n_ff,
        fc1: fc1.iter().copied().collect(),
        fc2: fc2.iter().copied().collect(),
        threshold: stats.threshold,
        stats,
        attempts,
        reached_target,
    })
}

/// Trains every layer of `profile`, layers in parallel on `threads` threads (0: rayon's
/// default). Results are in layer order and do not depend on `threads`.
pub fn train_profile(
    profile: &Profile,
    cfg: &TrainConfig,
    threads: usize,
    progress: &(dyn Fn(TrainEvent) + Sync),
) -> Result<Vec<TrainedLayer>, TrainError> {
    profile
        .validate()
        .map_err(|e| TrainError::BadData(e.to_string()))?;
    cfg.check()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| TrainError::ThreadPool(e.to_string()))?;
    let (d, n_ff) = (profile.identity.n_embd, profile.identity.n_ff);
    pool.install(|| {
        (0..profile.layers.len())
            .into_par_iter()
            .map(|i| {
                let data = LayerData::from_layer(&profile.layers[i], d, n_ff)?;
                train_layer(&data, cfg, i, progress)
            })
            .collect()
    })
}
