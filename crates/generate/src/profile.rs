//! Activation profiling: run a model densely over calibration text and record, per layer, how
//! often each FFN neuron is active and a bounded sample of (FFN input, activity) pairs to train
//! predictors on (a [`Profile`], see [`powerinfer_predictor::profile`]).
//!
//! The text is cut into windows of `n_ctx` tokens (the last, shorter one kept), each evaluated
//! from an empty KV cache with BOS in its first position, as perplexity does. What "active" means
//! depends on the FFN:
//!
//! - ReLU (`relu(g) * u`): `h != 0` ([`ActivityRule::NonZero`]); every window is counted.
//! - SwiGLU / GeGLU: `|h| > t_layer` ([`ActivityRule::Magnitude`]), `t_layer` the per-layer
//!   quantile of `|h|` that leaves the target sparsity inactive, calibrated on the first windows
//!   (about `calib_tokens` tokens, at least one window, at most all but one); the remaining
//!   windows are counted and sampled.
//!
//! Samples: a reservoir of `samples` tokens (seeded), the same tokens in every layer.

use powerinfer_cpu::ThreadPool;
use powerinfer_cpu::sparse::{Activation as CpuActivation, FfnKind};
use powerinfer_predictor::profile::{
    ActivityRule, LayerProfile, ModelIdentity, Profile, ProfileError, mask_bytes,
};

use crate::error::ModelError;
use crate::model::{Activation, Ffn, FfnObserver, Logits, Model, SparseMode};

pub use powerinfer_predictor::profile;

/// Profiling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileConfig {
    /// Window length in tokens (default 512).
    pub n_ctx: usize,
    /// Tokens per forward micro-batch (default 512).
    pub n_batch: usize,
    /// Target fraction of inactive neurons for SwiGLU / GeGLU models (default 0.5).
    pub sparsity: f32,
    /// Sampled tokens per layer (default 8192).
    pub samples: usize,
    /// Use at most this many tokens of the text.
    pub max_tokens: Option<usize>,
    /// Tokens to calibrate the thresholds on (default 2048; rounded up to whole windows).
    pub calib_tokens: usize,
    /// Seed of the sampling.
    pub seed: u64,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            n_ctx: 512,
            n_batch: 512,
            sparsity: 0.5,
            samples: 8192,
            max_tokens: None,
            calib_tokens: 2048,
            seed: 0x9e37,
        }
    }
}

/// Which pass a progress report belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileStage {
    /// Calibrating the activity thresholds.
    Calibrate,
    /// Counting and sampling.
    Count,
}

/// Progress after each window: `(stage, windows done in the stage, windows in the stage)`.
pub type ProfileProgress<'a> = &'a mut dyn FnMut(ProfileStage, usize, usize);

/// Errors of profiling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileRunError {
    /// The forward pass failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The model's identity could not be read.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// Settings or text that cannot be profiled.
    #[error("{0}")]
    Config(String),
}

/// Bits of a uniform draw.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Most `|h|` values kept per layer for calibration.
const CALIB_VALUES: usize = 1 << 20;

enum Mode {
    /// Keep each value with probability `1 / keep_one_in`.
    Calibrate {
        keep_one_in: u64,
        values: Vec<Vec<f32>>,
        rng: Vec<Rng>,
    },
    Count {
        layers: Vec<LayerProfile>,
        /// Per layer: tokens seen, and the reservoir's generator (same seed in every layer).
        seen: Vec<u64>,
        rng: Vec<Rng>,
    },
}

struct Collector {
    n_embd: usize,
    n_ff: usize,
    rule: ActivityRule,
    thresholds: Vec<f32>,
    samples: usize,
    mode: Mode,
    error: Option<String>,
}

impl FfnObserver for Collector {
    fn observe(&mut self, layer: usize, n_tokens: usize, input: &[f32], hidden: &[f32]) {
        let (d, n_ff) = (self.n_embd, self.n_ff);
        if self.error.is_some() {
            return;
        }
        if input.len() != n_tokens * d
            || hidden.len() != n_tokens * n_ff
            || layer >= self.thresholds.len()
        {
            self.error = Some(format!(
                "layer {layer}: observed {} inputs and {} activations for {n_tokens} tokens (n_embd {d}, n_ff {n_ff})",
                input.len(),
                hidden.len()
            ));
            return;
        }
        match &mut self.mode {
            Mode::Calibrate {
                keep_one_in,
                values,
                rng,
            } => {
                let (v, r) = (&mut values[layer], &mut rng[layer]);
                for &h in hidden {
                    if (*keep_one_in == 1 || r.next_u64() % *keep_one_in == 0)
                        && v.len() < 4 * CALIB_VALUES
                    {
                        v.push(h.abs());
                    }
                }
            }
            Mode::Count { layers, seen, rng } => {
                let t = self.thresholds[layer];
                let rule = self.rule;
                let lp = &mut layers[layer];
                let mb = mask_bytes(n_ff);
                let mut mask = vec![0u8; mb];
                for k in 0..n_tokens {
                    let hrow = &hidden[k * n_ff..(k + 1) * n_ff];
                    mask.fill(0);
                    for (j, &h) in hrow.iter().enumerate() {
                        if rule.is_active(h, t) {
                            lp.counts[j] += 1;
                            mask[j / 8] |= 1 << (j % 8);
                        }
                    }
                    // reservoir sampling (algorithm R)
                    let i = seen[layer];
                    seen[layer] += 1;
                    let slot = if (i as usize) < self.samples {
                        Some(i as usize)
                    } else {
                        let j = rng[layer].next_u64() % (i + 1);
                        ((j as usize) < self.samples).then_some(j as usize)
                    };
                    if let Some(s) = slot {
                        let xrow = &input[k * d..(k + 1) * d];
                        if s * d == lp.x.len() {
                            lp.x.extend(xrow.iter().map(|&v| half::bf16::from_f32(v)));
                            lp.active.extend_from_slice(&mask);
                        } else {
                            for (dst, &v) in lp.x[s * d..(s + 1) * d].iter_mut().zip(xrow) {
                                *dst = half::bf16::from_f32(v);
                            }
                            lp.active[s * mb..(s + 1) * mb].copy_from_slice(&mask);
                        }
                    }
                }
            }
        }
    }
}

/// The gate activation of the model's FFNs as the profile names it (`relu`, `silu`, `gelu`).
pub fn ffn_activation_name(model: &Model) -> Result<&'static str, ProfileRunError> {
    let name = |a: Activation| match a {
        Activation::Relu => "relu",
        Activation::Silu => "silu",
        Activation::Gelu => "gelu",
    };
    let cpu = |a: CpuActivation| match a {
        CpuActivation::Relu => "relu",
        CpuActivation::Silu => "silu",
        CpuActivation::Gelu => "gelu",
    };
    let mut found: Option<&'static str> = None;
    for (i, l) in model.layers().iter().enumerate() {
        let this = match &l.ffn {
            Ffn::Dense(f) => name(f.act),
            Ffn::Sparse(f) => match f.kind {
                FfnKind::Gated(a) | FfnKind::Plain(a) => cpu(a),
                FfnKind::DRelu => "relu",
            },
        };
        match found {
            None => found = Some(this),
            Some(f) if f != this => {
                return Err(ProfileRunError::Config(format!(
                    "layer {i} uses {this} but earlier layers use {f}: mixed FFN activations are not supported"
                )));
            }
            _ => {}
        }
    }
    found.ok_or_else(|| ProfileRunError::Config("the model has no layers".into()))
}

/// The windows of `tokens`: `n_ctx` tokens each, the last one possibly shorter (at least 2).
fn windows(tokens: &[u32], n_ctx: usize) -> Vec<&[u32]> {
    tokens.chunks(n_ctx).filter(|w| w.len() >= 2).collect()
}

/// Profiles `model` on `tokens` (see the module docs). Sparse (PWRI) models must be switched
/// to [`SparseMode::Dense`] first, so every neuron is computed.
pub fn profile_model(
    model: &Model,
    pool: &ThreadPool,
    tokens: &[u32],
    cfg: &ProfileConfig,
    mut progress: Option<ProfileProgress<'_>>,
) -> Result<Profile, ProfileRunError> {
    if model.is_sparse() && model.sparse_mode() != SparseMode::Dense {
        return Err(ProfileRunError::Config(
            "a sparse model must run with every neuron computed (SparseMode::Dense) to be profiled"
                .into(),
        ));
    }
    if cfg.n_ctx < 2 {
        return Err(ProfileRunError::Config(format!(
            "context {} is below 2 tokens",
            cfg.n_ctx
        )));
    }
    if !(0.0..1.0).contains(&cfg.sparsity) {
        return Err(ProfileRunError::Config(format!(
            "target sparsity {} is not in [0, 1)",
            cfg.sparsity
        )));
    }
    let identity = ModelIdentity::from_gguf(model.file())?;
    let c = model.config();
    let (n_embd, n_ff, n_layer) = (c.n_embd, c.n_ff, c.n_layer);
    if identity.n_embd != n_embd || identity.n_ff != n_ff || identity.n_layer != n_layer {
        return Err(ProfileRunError::Config(format!(
            "model file sizes ({} layers, n_embd {}, n_ff {}) differ from the loaded model's ({n_layer}, {n_embd}, {n_ff})",
            identity.n_layer, identity.n_embd, identity.n_ff
        )));
    }
    let act = ffn_activation_name(model)?;
    let rule = if act == "relu" {
        ActivityRule::NonZero
    } else {
        ActivityRule::Magnitude
    };
    let tokens = &tokens[..tokens.len().min(cfg.max_tokens.unwrap_or(usize::MAX))];
    let wins = windows(tokens, cfg.n_ctx);
    let n_calib = match rule {
        ActivityRule::NonZero => 0,
        ActivityRule::Magnitude => {
            if wins.len() < 2 {
                return Err(ProfileRunError::Config(format!(
                    "{} tokens make {} window(s) of {}: at least two are needed (the first calibrate the thresholds, the rest are counted)",
                    tokens.len(),
                    wins.len(),
                    cfg.n_ctx
                )));
            }
            cfg.calib_tokens
                .div_ceil(cfg.n_ctx)
                .clamp(1, wins.len() - 1)
        }
    };
    if wins.is_empty() {
        return Err(ProfileRunError::Config(format!(
            "{} tokens are too few to profile",
            tokens.len()
        )));
    }
    let mut state = model.new_state(cfg.n_ctx, cfg.n_batch.max(1))?;
    let bos = model.bos_token();
    let mut buf = Vec::with_capacity(cfg.n_ctx);
    let mut run = |w: &[u32],
                   col: &mut Collector,
                   state: &mut crate::model::ModelState|
     -> Result<(), ProfileRunError> {
        buf.clear();
        buf.extend_from_slice(w);
        if let Some(b) = bos {
            buf[0] = b;
        }
        state.clear();
        model.forward_observed(pool, state, &buf, Logits::None, col)?;
        if let Some(e) = col.error.take() {
            return Err(ProfileRunError::Config(e));
        }
        Ok(())
    };

    let mut thresholds = vec![0.0f32; n_layer];
    if n_calib > 0 {
        let calib_len: usize = wins[..n_calib].iter().map(|w| w.len()).sum();
        let keep_one_in = (calib_len * n_ff).div_ceil(CALIB_VALUES).max(1) as u64;
        let mut col = Collector {
            n_embd,
            n_ff,
            rule,
            thresholds: thresholds.clone(),
            samples: cfg.samples,
            mode: Mode::Calibrate {
                keep_one_in,
                values: vec![Vec::new(); n_layer],
                rng: (0..n_layer)
                    .map(|i| Rng(cfg.seed ^ ((i as u64 + 1) << 32)))
                    .collect(),
            },
            error: None,
        };
        for (i, w) in wins[..n_calib].iter().enumerate() {
            run(w, &mut col, &mut state)?;
            if let Some(p) = progress.as_mut() {
                p(ProfileStage::Calibrate, i + 1, n_calib);
            }
        }
        let Mode::Calibrate { values, .. } = &mut col.mode else {
            unreachable!("calibration collector")
        };
        for (t, v) in thresholds.iter_mut().zip(values.iter_mut()) {
            if v.is_empty() {
                continue;
            }
            let k = ((f64::from(cfg.sparsity) * v.len() as f64).floor() as usize).min(v.len() - 1);
            let (_, q, _) = v.select_nth_unstable_by(k, f32::total_cmp);
            *t = *q;
        }
    }

    let counted = &wins[n_calib..];
    let mut col = Collector {
        n_embd,
        n_ff,
        rule,
        thresholds: thresholds.clone(),
        samples: cfg.samples,
        mode: Mode::Count {
            layers: thresholds
                .iter()
                .map(|&t| LayerProfile::new(n_ff, t))
                .collect(),
            seen: vec![0; n_layer],
            rng: (0..n_layer).map(|_| Rng(cfg.seed)).collect(),
        },
        error: None,
    };
    for (i, w) in counted.iter().enumerate() {
        run(w, &mut col, &mut state)?;
        if let Some(p) = progress.as_mut() {
            p(ProfileStage::Count, i + 1, counted.len());
        }
    }
    let n_tokens: u64 = counted.iter().map(|w| w.len() as u64).sum();
    let Mode::Count { layers, .. } = col.mode else {
        unreachable!("counting collector")
    };
    let sparsity_target = match rule {
        ActivityRule::Magnitude => cfg.sparsity,
        ActivityRule::NonZero => {
            // measured: the fraction of (token, neuron) pairs that were zero
            let active: i64 = layers.iter().flat_map(|l| l.counts.iter()).sum();
            let total = n_tokens as f64 * (n_ff * n_layer) as f64;
            if total > 0.0 {
                (1.0 - active as f64 / total) as f32
            } else {
                0.0
            }
        }
    };
    Ok(Profile {
        identity,
        n_tokens,
        sparsity_target,
        rule,
        ffn_activation: act.to_owned(),
        layers,
    })
}
