//! Measures what a file's predictors do: the fraction of neurons they activate per token and how
//! concentrated the activations are, on random inputs.

use powerinfer_cpu::ThreadPool;
use powerinfer_gguf::GgufFile;
use powerinfer_predictor::{Predictor, PredictorScratch, file_threshold, load_layer};

use crate::SynthError;
use crate::random::normal_at;

/// What one layer's predictor did over the measured tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerActivity {
    /// Mean over tokens of the fraction of neurons predicted active.
    pub mean_fraction: f64,
    /// Smallest per-token fraction.
    pub min_fraction: f64,
    /// Largest per-token fraction.
    pub max_fraction: f64,
    /// Share of all activations that fell on the `hot_share` most often active neurons.
    pub hot_mass: f64,
}

/// The measurement of a whole file.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityReport {
    /// Tokens (random inputs) evaluated per layer.
    pub n_tokens: usize,
    /// The share of neurons counted as hot for [`LayerActivity::hot_mass`].
    pub hot_share: f64,
    /// The threshold used (the file's `powerinfer.sparse_threshold`, else 0).
    pub threshold: f32,
    /// Per layer, in order.
    pub layers: Vec<LayerActivity>,
}

impl ActivityReport {
    /// Mean active fraction over all layers.
    pub fn mean_fraction(&self) -> f64 {
        self.layers.iter().map(|l| l.mean_fraction).sum::<f64>() / self.layers.len().max(1) as f64
    }

    /// Mean hot mass over all layers.
    pub fn mean_hot_mass(&self) -> f64 {
        self.layers.iter().map(|l| l.hot_mass).sum::<f64>() / self.layers.len().max(1) as f64
    }

    /// Smallest per-token fraction of any layer.
    pub fn min_fraction(&self) -> f64 {
        self.layers
            .iter()
            .map(|l| l.min_fraction)
            .fold(f64::INFINITY, f64::min)
    }

    /// Largest per-token fraction of any layer.
    pub fn max_fraction(&self) -> f64 {
        self.layers
            .iter()
            .map(|l| l.max_fraction)
            .fold(0.0, f64::max)
    }
}

/// Runs the predictors of `layers` (all when `None`) of a PowerInfer file on `n_tokens` random
/// inputs each (independent standard normal entries; the construction is scale invariant) with
/// `powerinfer_predictor`'s production matvecs and the file's threshold, and reports the active
/// fraction per token and the share of activations carried by the `hot_share` most active
/// neurons (ranked by their observed counts, so a few tokens overstate it slightly). `threads`
/// sizes the compute pool (0: one per CPU).
pub fn measure_activity(
    file: &GgufFile,
    layers: Option<&[usize]>,
    n_tokens: usize,
    hot_share: f64,
    seed: u64,
    threads: usize,
) -> Result<ActivityReport, SynthError> {
    let pool = &ThreadPool::new(threads);
    let meta = |e: powerinfer_gguf::MetadataError| SynthError::Measure(e.to_string());
    let n_layer = file.get_arch_u32("block_count").map_err(meta)? as usize;
    let n_embd = file.get_arch_u32("embedding_length").map_err(meta)? as usize;
    let n_ff = file.get_arch_u32("feed_forward_length").map_err(meta)? as usize;
    let threshold = file_threshold(file)
        .map_err(|e| SynthError::Measure(e.to_string()))?
        .unwrap_or(0.0);
    let all: Vec<usize> = (0..n_layer).collect();
    let layers = layers.unwrap_or(&all);
    if n_tokens == 0 {
        return Err(SynthError::Measure("no tokens to measure".into()));
    }
    if n_tokens.checked_mul(n_embd).is_none_or(|n| n > 1 << 28) {
        return Err(SynthError::Measure(format!(
            "{n_tokens} tokens of {n_embd} values are too many to hold"
        )));
    }
    let mut x = vec![0f32; n_embd * n_tokens];
    let mut out = Vec::with_capacity(layers.len());
    for &layer in layers {
        if layer >= n_layer {
            return Err(SynthError::Measure(format!(
                "layer {layer} is out of range (the file has {n_layer})"
            )));
        }
        for t in 0..n_tokens {
            let key = seed ^ ((layer as u64) << 32 | t as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
            for (c, v) in x[t * n_embd..(t + 1) * n_embd].iter_mut().enumerate() {
                *v = normal_at(key, c as u64);
            }
        }
        let pred = load_layer(file, layer, n_embd, n_ff)
            .map_err(|e| SynthError::Measure(e.to_string()))?;
        out.push(measure_layer(&pred, threshold, &x, hot_share, pool)?);
    }
    Ok(ActivityReport {
        n_tokens,
        hot_share,
        threshold,
        layers: out,
    })
}

/// Runs layer `layer`'s predictor of a PowerInfer file on given FFN inputs (`inputs`: tokens x
/// `n_embd`, row-major; e.g. the residual streams a model produces, see
/// `powerinfer_generate::model::FfnObserver`) at the file's threshold.
pub fn measure_inputs(
    file: &GgufFile,
    layer: usize,
    inputs: &[f32],
    hot_share: f64,
    threads: usize,
) -> Result<LayerActivity, SynthError> {
    let meta = |e: powerinfer_gguf::MetadataError| SynthError::Measure(e.to_string());
    let n_embd = file.get_arch_u32("embedding_length").map_err(meta)? as usize;
    let n_ff = file.get_arch_u32("feed_forward_length").map_err(meta)? as usize;
    let threshold = file_threshold(file)
        .map_err(|e| SynthError::Measure(e.to_string()))?
        .unwrap_or(0.0);
    let pred =
        load_layer(file, layer, n_embd, n_ff).map_err(|e| SynthError::Measure(e.to_string()))?;
    measure_layer(
        &pred,
        threshold,
        inputs,
        hot_share,
        &ThreadPool::new(threads),
    )
}

fn measure_layer(
    pred: &Predictor<'_>,
    threshold: f32,
    inputs: &[f32],
    hot_share: f64,
    pool: &ThreadPool,
) -> Result<LayerActivity, SynthError> {
    let (n_embd, n_ff) = (pred.n_embd(), pred.n_ff());
    if inputs.is_empty() || !inputs.len().is_multiple_of(n_embd) {
        return Err(SynthError::Measure(format!(
            "{} input values are not a positive whole number of {n_embd}-element rows",
            inputs.len()
        )));
    }
    let n_tokens = inputs.len() / n_embd;
    let mut scratch = PredictorScratch::new();
    let mut active = Vec::new();
    let mut counts = vec![0u64; n_ff];
    let (mut sum, mut lo, mut hi) = (0f64, f64::INFINITY, 0f64);
    for x in inputs.chunks_exact(n_embd) {
        pred.predict(pool, x, threshold, &mut scratch, &mut active)
            .map_err(|e| SynthError::Measure(e.to_string()))?;
        let f = active.len() as f64 / n_ff as f64;
        sum += f;
        lo = lo.min(f);
        hi = hi.max(f);
        for &i in &active {
            counts[i as usize] += 1;
        }
    }
    counts.sort_unstable_by(|a, b| b.cmp(a));
    let total: u64 = counts.iter().sum();
    let k = crate::skew::hot_count(n_ff, hot_share).min(n_ff);
    let hot: u64 = counts[..k].iter().sum();
    Ok(LayerActivity {
        mean_fraction: sum / n_tokens as f64,
        min_fraction: lo,
        max_fraction: hi,
        hot_mass: if total == 0 {
            0.0
        } else {
            hot as f64 / total as f64
        },
    })
}
