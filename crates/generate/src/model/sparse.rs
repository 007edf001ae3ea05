//! Predictor-driven sparse FFN layers: PowerInfer (`PWRI`) files.
//!
//! A sparse layer holds the gate and up projections (one row per neuron), the transposed down
//! projection `ffn_down_t` (row `i` = neuron `i`'s output vector) and the layer's predictor
//! `p = fc2 · relu(fc1 · x)`. Per token the predictor runs on the FFN's input (the residual stream
//! before the FFN norm), neurons with `p >= threshold` are computed and every other neuron
//! contributes exactly zero.
//!
//! Decode uses the fused per-neuron operator of [`powerinfer_cpu::sparse`]; a prompt chunk
//! predicts every token's set, then runs the gate and up products over the union of the sets
//! (each union row dotted with the tokens it is active for, or dense products where most pairs
//! are active) and the batched axpy, so each
//! token's result is bit-identical to decoding it alone.
//!
//! Where the file also keeps the model's own `ffn_down` in Q4_0, Q4_1 or Q8_0 (our
//! `train-predictor` writes it), the down product reads those weights regrouped by neuron
//! ([`GroupedDown`]) instead of `ffn_down_t`: the dense model's down weights exactly, with no
//! second quantization along the other axis.

use std::sync::Arc;

use powerinfer_cpu::grouped::{GroupedDown, grouped_axpy};
use powerinfer_cpu::sparse::{
    self, FfnKind, SparseFfn as CpuSparseFfn, SparseScratch, sparse_axpy_batch, sparse_matmul_with,
};
use powerinfer_cpu::{ActBuffer, Matrix, ThreadPool};
use powerinfer_gguf::GgufFile;
use powerinfer_predictor::{Predictor, PredictorQuality, PredictorScratch, THRESHOLD_ENV, Weights};

use super::{Weight, mm};
use crate::error::ModelError;

/// Metadata key of the PowerInfer threshold (one value for every layer).
pub const THRESHOLD_KEY: &str = "powerinfer.sparse_threshold";
/// Metadata key of per-layer thresholds (f32 array, one per layer; ours, written by
/// `powerinfer train-predictor`). Takes precedence over [`THRESHOLD_KEY`].
pub const LAYER_THRESHOLDS_KEY: &str = "powerinfer.sparse_thresholds";
/// Metadata key naming the gated FFN's activation (`relu`, `silu` or `gelu`; ours). Absent in the
/// reference's files, whose `llama` models are ReLU.
pub const FFN_ACTIVATION_KEY: &str = "powerinfer.ffn_activation";
/// Metadata key of per-layer activity thresholds (`|h| > t` counts as active; ours, f32 array)
/// of non-ReLU models: sparse runs treat `|h| <= t` as exactly zero, and predictor quality is
/// measured against it.
pub const ACTIVATION_THRESHOLDS_KEY: &str = "powerinfer.activation_thresholds";

/// At or above this mean share (percent) of active neurons per token in a prompt chunk, gate and
/// up run as dense products over every row (the multi-token kernels beat per-pair dot products
/// there) and inactive entries are zeroed; below it, each union row is dotted only with the
/// tokens it is active for. (The union of a chunk's sets is most of the layer even at high
/// sparsity, so the union's size does not decide this; the work per token does.)
const PROMPT_DENSE_PERCENT: usize = 40;

/// How a model's sparse layers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SparseMode {
    /// Neurons chosen by the predictors (the default for PowerInfer files).
    #[default]
    Predicted,
    /// Every neuron computed with the same activation (`--disable-sparse`): the dense reference
    /// of a sparse file. (The reference PowerInfer's dense path uses SiLU for its ReLU `llama`
    /// files; this one keeps the file's activation.)
    Dense,
    /// No predictor: every neuron's gate and up are computed, and the down projection reads only
    /// the neurons whose `|h|` exceeds the layer's activity threshold
    /// (`powerinfer.activation_thresholds`; for ReLU files, the neurons with `h != 0`). The
    /// predictor-free way to skip neurons of a non-ReLU model: exact for its definition of
    /// active, saving only the down projection's reads.
    Threshold,
}

/// The sparse FFN of one layer.
#[derive(Debug, Clone)]
pub struct SparseFfn {
    /// `ffn_gate` (absent for ungated kinds).
    pub gate: Option<Weight>,
    /// `ffn_up`.
    pub up: Weight,
    /// `ffn_down_t`: `n_ff` rows of `n_embd`.
    pub down_t: Weight,
    /// How gate and up combine.
    pub kind: FfnKind,
    /// Predictor first layer `fc1`: `H` rows of `n_embd`.
    pub fc1: Weight,
    /// Predictor second layer `fc2`: `n_ff` rows of `H`.
    pub fc2: Weight,
    /// `p >= threshold` marks a neuron active.
    pub threshold: f32,
    /// Non-ReLU models: a neuron is active when `|h| > t`; sparse modes treat the others as
    /// exactly zero, and predictor quality is measured against it.
    pub activity_threshold: Option<f32>,
    /// The model's own down projection (`ffn_down`, when the file keeps it in a type
    /// [`GroupedDown`] supports) regrouped by neuron: used instead of `ffn_down_t`, so sparse
    /// runs read the same down weights as the dense model, never a requantized transpose.
    pub down_grouped: Option<Arc<GroupedDown>>,
    /// Bias of the up projection, added before the activation (`ffn_up.bias`, OPT).
    pub up_bias: Option<Vec<f32>>,
    /// Bias of the down projection, added to the output (`ffn_down_t.bias`, OPT).
    pub down_bias: Option<Vec<f32>>,
}

/// Reads the FFN activation of a sparse file, `default` when the key is absent.
pub(crate) fn ffn_activation(
    file: &GgufFile,
    default: sparse::Activation,
) -> Result<sparse::Activation, ModelError> {
    if file.get(FFN_ACTIVATION_KEY).is_none() {
        return Ok(default);
    }
    match file.get_str(FFN_ACTIVATION_KEY)? {
        "relu" => Ok(sparse::Activation::Relu),
        "silu" => Ok(sparse::Activation::Silu),
        "gelu" => Ok(sparse::Activation::Gelu),
        other => Err(ModelError::InvalidConfig(format!(
            "{FFN_ACTIVATION_KEY} = {other:?} (expected relu, silu or gelu)"
        ))),
    }
}

/// Per-layer predictor thresholds: `LLAMA_SPARSE_PRED_THRESHOLD` if set (the reference's
/// override), else the file's per-layer array, else its single value, else 0.
pub(crate) fn layer_thresholds(file: &GgufFile, n_layer: usize) -> Result<Vec<f32>, ModelError> {
    let env = std::env::var_os(THRESHOLD_ENV);
    let single = match file.get(THRESHOLD_KEY) {
        None => None,
        Some(_) => Some(file.get_f32(THRESHOLD_KEY)?),
    };
    let t = powerinfer_predictor::resolve_threshold(single, None, env.as_deref())
        .map_err(|e| ModelError::InvalidConfig(e.to_string()))?;
    if t.source == powerinfer_predictor::ThresholdSource::Env {
        return Ok(vec![t.value; n_layer]);
    }
    if file.get(LAYER_THRESHOLDS_KEY).is_some() {
        let v = file.get_f32_array(LAYER_THRESHOLDS_KEY)?;
        if v.len() != n_layer {
            return Err(ModelError::InvalidConfig(format!(
                "{LAYER_THRESHOLDS_KEY} has {} values for {n_layer} layers",
                v.len()
            )));
        }
        if let Some(bad) = v.iter().find(|x| x.is_nan()) {
            return Err(ModelError::InvalidConfig(format!(
                "{LAYER_THRESHOLDS_KEY} holds {bad}"
            )));
        }
        return Ok(v.into_owned());
    }
    Ok(vec![t.value; n_layer])
}

/// The file's dense prefix (`powerinfer.dense_prefix`, see
/// `crate::pwri::PwriOptions::dense_prefix`; 0 when it names none).
pub(crate) fn dense_prefix(file: &GgufFile) -> Result<usize, ModelError> {
    let key = crate::pwri::KEY_DENSE_PREFIX;
    if file.get(key).is_none() {
        return Ok(0);
    }
    Ok(file.get_u32(key)? as usize)
}

/// Optional per-layer activity thresholds for quality measurement.
pub(crate) fn activity_thresholds(
    file: &GgufFile,
    n_layer: usize,
) -> Result<Option<Vec<f32>>, ModelError> {
    if file.get(ACTIVATION_THRESHOLDS_KEY).is_none() {
        return Ok(None);
    }
    let v = file.get_f32_array(ACTIVATION_THRESHOLDS_KEY)?;
    if v.len() != n_layer {
        return Err(ModelError::InvalidConfig(format!(
            "{ACTIVATION_THRESHOLDS_KEY} has {} values for {n_layer} layers",
            v.len()
        )));
    }
    Ok(Some(v.into_owned()))
}

/// Buffers of the sparse layers, reused across calls.
#[derive(Debug, Default)]
pub(crate) struct SparseBuffers {
    sparse: SparseScratch,
    acts: ActBuffer,
    pred: PredictorScratch,
    /// One active set per token of the micro-batch.
    active: Vec<Vec<u32>>,
    /// Gate pre-activations / activity scores for quality measurement.
    truth: Vec<f32>,
    all: Vec<u32>,
    round: Vec<u8>,
    /// One token's coefficients over its active set (the grouped down product).
    coef: Vec<f32>,
    /// Time the last call spent in the predictor.
    pub(crate) predictor_time: std::time::Duration,
}

/// The inputs of one sparse FFN call.
pub(crate) struct SparseCall<'a> {
    pub pool: &'a ThreadPool,
    pub bytes: &'a [u8],
    pub layer: usize,
    pub n: usize,
    pub n_embd: usize,
    /// Predictor input rows (n x n_embd).
    pub pred_in: &'a [f32],
    /// Normalised FFN input rows (n x n_embd).
    pub xn: &'a [f32],
    pub mode: SparseMode,
    /// Overrides every layer's threshold.
    pub threshold: Option<f32>,
    /// Whether the caller needs `h` in `gate_out` (an observer).
    pub want_hidden: bool,
    /// `dense_rows[t]`: token `t` sits in the model's dense prefix and is computed densely
    /// (every neuron, no activity threshold). Shorter than `n` (usually empty): the tokens past
    /// its end are not.
    pub dense_rows: &'a [bool],
}

impl SparseFfn {
    fn matrices<'b>(&'b self, bytes: &'b [u8]) -> Result<CpuSparseFfn<'b>, ModelError> {
        Ok(CpuSparseFfn {
            gate: match &self.gate {
                Some(g) => Some(g.matrix(bytes)?),
                None => None,
            },
            up: self.up.matrix(bytes)?,
            down_t: self.down_t.matrix(bytes)?,
            kind: self.kind,
            round_coefficients: true,
            zero_below: 0.0,
            down_grouped: self.down_grouped.as_deref(),
        })
    }

    /// `|h|` at or below this is zero in sparse modes (the activity threshold; 0 for ReLU files
    /// and in [`SparseMode::Dense`]).
    fn zero_below(&self, mode: SparseMode) -> f32 {
        match mode {
            SparseMode::Dense => 0.0,
            SparseMode::Predicted | SparseMode::Threshold => {
                self.activity_threshold.unwrap_or(0.0).max(0.0)
            }
        }
    }

    /// The layer's predictor over the file's bytes.
    fn predictor<'b>(&self, bytes: &'b [u8]) -> Result<Predictor<'b>, ModelError> {
        let w = |m: &Weight| m.matrix(bytes).map(Weights::borrowed);
        Predictor::new(w(&self.fc1)?, w(&self.fc2)?)
            .map_err(|e| ModelError::InvalidConfig(format!("{}: {e}", self.fc1.name)))
    }

    /// Runs the layer over `c.n` tokens: `out` (n x n_embd) receives the FFN output; `gate_out`
    /// and `up_out` (n x n_ff each) are scratch, and `gate_out` holds `h` afterwards when
    /// `c.want_hidden` (or a quality measurement) asked for it.
    pub(crate) fn forward(
        &self,
        c: &SparseCall,
        b: &mut SparseBuffers,
        quality: Option<&mut PredictorQuality>,
        gate_out: &mut [f32],
        up_out: &mut [f32],
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let n = c.n;
        let n_ff = self.up.rows;
        let mut m = self.matrices(c.bytes)?;
        let measuring = quality.is_some();
        // While measuring, every neuron is computed as in the dense run (the prediction is only
        // compared with the truth).
        let zero_below = if measuring {
            0.0
        } else {
            self.zero_below(c.mode)
        };
        m.zero_below = zero_below;
        // The active sets.
        b.active.resize_with(n, Vec::new);
        b.active.truncate(n);
        if c.mode == SparseMode::Predicted || measuring {
            let t0 = std::time::Instant::now();
            let scores = self
                .predictor(c.bytes)?
                .scores_batch(c.pool, c.pred_in, n, &mut b.pred)
                .map_err(|e| ModelError::InvalidConfig(format!("{}: {e}", self.fc1.name)))?;
            let thr = c.threshold.unwrap_or(self.threshold);
            for (t, set) in b.active.iter_mut().enumerate() {
                set.clear();
                let s = &scores[t * n_ff..(t + 1) * n_ff];
                set.extend(
                    s.iter()
                        .enumerate()
                        .filter(|&(_, &p)| p >= thr)
                        .map(|(i, _)| i as u32),
                );
            }
            b.predictor_time += t0.elapsed();
            for (set, _) in b.active.iter_mut().zip(c.dense_rows).filter(|(_, d)| **d) {
                set.clear();
                set.extend(0..n_ff as u32);
            }
        }
        let compute_all = measuring || c.mode != SparseMode::Predicted;
        if compute_all {
            // Every neuron computed (gate and up; the down projection may still skip those
            // under the activity threshold); a prediction is only compared with the truth.
            b.all.clear();
            b.all.extend(0..n_ff as u32);
        }

        if n == 1
            && !measuring
            && c.mode != SparseMode::Dense
            && !c.want_hidden
            && self.up_bias.is_none()
        {
            let set = if compute_all { &b.all } else { &b.active[0] };
            if c.dense_rows.first() == Some(&true) {
                m.zero_below = 0.0;
            }
            sparse::sparse_ffn_with(c.pool, &m, c.xn, set, out, &mut b.sparse)?;
            super::add_bias(&mut out[..c.n_embd], self.down_bias.as_deref());
            return Ok(());
        }

        // Unfused: gate and up over the union (or every row), h, batched axpy.
        let sets: Vec<&[u32]> = if compute_all {
            vec![&b.all[..]; n]
        } else {
            b.active.iter().map(|v| &v[..]).collect()
        };
        let pairs: usize = sets.iter().map(|s| s.len()).sum();
        let dense_products = pairs * 100 >= n * n_ff * PROMPT_DENSE_PERCENT;
        let gate_out = &mut gate_out[..n * n_ff];
        let up_out = &mut up_out[..n * n_ff];
        let product = |w: &Matrix,
                       y: &mut [f32],
                       acts: &mut ActBuffer,
                       scratch: &mut SparseScratch|
         -> Result<(), ModelError> {
            if dense_products {
                acts.quantize(w.ty, c.xn, c.n_embd, n)?;
                mm(c.pool, w, acts, n, y)?;
            } else {
                sparse_matmul_with(c.pool, w, c.xn, n, &sets, y, scratch)?;
            }
            Ok(())
        };
        if let Some(g) = &m.gate {
            product(g, gate_out, &mut b.acts, &mut b.sparse)?;
        }
        product(&m.up, up_out, &mut b.acts, &mut b.sparse)?;
        if let Some(bias) = &self.up_bias {
            // Entries outside a token's set hold stale values here; they are zeroed below.
            super::add_bias(up_out, Some(bias));
        }

        if let Some(q) = quality {
            // Truth: ReLU-gated kinds are active where the gate is positive; others where
            // |h| exceeds the activity threshold (0 when the file gives none).
            b.truth.resize(n_ff, 0.0);
            for t in 0..n {
                let row = t * n_ff..(t + 1) * n_ff;
                for (i, tv) in b.truth.iter_mut().enumerate() {
                    let (g, u) = (gate_out[row.start + i], up_out[row.start + i]);
                    let h = coefficient(self.kind, g, u);
                    *tv = match self.kind {
                        FfnKind::Gated(sparse::Activation::Relu) | FfnKind::DRelu => h.abs(),
                        _ => h.abs() - self.activity_threshold.unwrap_or(0.0),
                    };
                }
                q.record(c.layer, &b.active[t], &b.truth)
                    .map_err(|e| ModelError::InvalidConfig(e.to_string()))?;
            }
        }

        // h in gate_out, exactly zero outside each token's set.
        for (t, set) in sets.iter().enumerate() {
            let row = t * n_ff..(t + 1) * n_ff;
            let (g, u) = (&mut gate_out[row.clone()], &up_out[row]);
            let mut next = 0usize;
            for &i in set.iter() {
                let i = i as usize;
                g[next..i].iter_mut().for_each(|v| *v = 0.0);
                let zb = if c.dense_rows.get(t) == Some(&true) {
                    0.0
                } else {
                    zero_below
                };
                g[i] = sparse::apply_zero_below(coefficient(self.kind, g[i], u[i]), zb);
                next = i + 1;
            }
            g[next..].iter_mut().for_each(|v| *v = 0.0);
            if m.down_grouped.is_none() {
                // (The grouped product rounds them itself.)
                sparse::round_coefficients(m.down_type(), g, &mut b.round)?;
            }
        }
        match &self.down_grouped {
            Some(g) => {
                // Token by token, as decoding computes it.
                for (t, set) in sets.iter().enumerate() {
                    let h = &gate_out[t * n_ff..(t + 1) * n_ff];
                    b.coef.clear();
                    b.coef.extend(set.iter().map(|&i| h[i as usize]));
                    grouped_axpy(
                        c.pool,
                        g,
                        set,
                        &b.coef,
                        &mut out[t * c.n_embd..(t + 1) * c.n_embd],
                    )?;
                }
            }
            None => sparse_axpy_batch(c.pool, &m.down_t, gate_out, n, &sets, out)?,
        }
        super::add_bias(&mut out[..n * c.n_embd], self.down_bias.as_deref());
        Ok(())
    }
}

/// `h` of one neuron from its gate and up pre-activations, as the fused operator computes it.
#[inline]
fn coefficient(kind: FfnKind, g: f32, u: f32) -> f32 {
    match kind {
        FfnKind::Plain(f) => f.apply(u),
        FfnKind::Gated(f) => {
            let a = f.apply(g);
            if a == 0.0 { 0.0 } else { a * u }
        }
        FfnKind::DRelu => {
            let a = g.max(0.0);
            if a == 0.0 { 0.0 } else { a * u.max(0.0) }
        }
    }
}

/// The gated FFN of layer `i`: dense (`ffn_gate`, `ffn_up`, `ffn_down`) in a GGUF file; sparse
/// (`ffn_gate`, `ffn_up`, `ffn_down_t`, predictor `fc1`/`fc2`) in a PowerInfer file, whose FFN
/// kind is `sparse_default` unless the file names its activation ([`FFN_ACTIVATION_KEY`]).
pub(crate) fn load_gated_ffn(
    l: &super::Loader,
    i: usize,
    c: &super::ModelConfig,
    dense_act: super::Activation,
    sparse_default: FfnKind,
    thresholds: &[f32],
    activity: Option<&[f32]>,
) -> Result<super::Ffn, ModelError> {
    let p = |s: &str| format!("blk.{i}.{s}");
    if l.file.magic() != powerinfer_gguf::Magic::Pwri {
        return Ok(super::Ffn::Dense(super::DenseFfn {
            gate: l.matrix(&p("ffn_gate.weight"), c.n_embd, c.n_ff)?,
            up: l.matrix(&p("ffn_up.weight"), c.n_embd, c.n_ff)?,
            down: l.matrix(&p("ffn_down.weight"), c.n_ff, c.n_embd)?,
            act: dense_act,
        }));
    }
    let kind = match sparse_default {
        FfnKind::Gated(a) => FfnKind::Gated(ffn_activation(l.file, a)?),
        k => k,
    };
    let (fc1, fc2) = predictor_weights(l, i, c)?;
    Ok(super::Ffn::Sparse(SparseFfn {
        gate: Some(l.matrix(&p("ffn_gate.weight"), c.n_embd, c.n_ff)?),
        up: l.matrix(&p("ffn_up.weight"), c.n_embd, c.n_ff)?,
        down_t: l.matrix(&p("ffn_down_t.weight"), c.n_embd, c.n_ff)?,
        kind,
        fc1,
        fc2,
        threshold: thresholds[i],
        activity_threshold: activity.map(|a| a[i]),
        up_bias: None,
        down_bias: None,
        down_grouped: grouped_down(l, &p("ffn_down.weight"), c)?,
    }))
}

/// The ungated sparse FFN of layer `i` of a PowerInfer file (`falcon`, `opt`): `ffn_up`,
/// `ffn_down_t`, predictor `fc1`/`fc2`, and with `biases` `ffn_up.bias` and `ffn_down_t.bias`.
/// The activation is ReLU unless the file names another ([`FFN_ACTIVATION_KEY`]).
pub(crate) fn load_ungated_sparse_ffn(
    l: &super::Loader,
    i: usize,
    c: &super::ModelConfig,
    biases: bool,
    thresholds: &[f32],
    activity: Option<&[f32]>,
) -> Result<SparseFfn, ModelError> {
    let p = |s: &str| format!("blk.{i}.{s}");
    let (fc1, fc2) = predictor_weights(l, i, c)?;
    Ok(SparseFfn {
        gate: None,
        up: l.matrix(&p("ffn_up.weight"), c.n_embd, c.n_ff)?,
        down_t: l.matrix(&p("ffn_down_t.weight"), c.n_embd, c.n_ff)?,
        kind: FfnKind::Plain(ffn_activation(l.file, sparse::Activation::Relu)?),
        fc1,
        fc2,
        threshold: thresholds[i],
        activity_threshold: activity.map(|a| a[i]),
        up_bias: biases
            .then(|| l.vector(&p("ffn_up.bias"), c.n_ff))
            .transpose()?,
        down_bias: biases
            .then(|| l.vector(&p("ffn_down_t.bias"), c.n_embd))
            .transpose()?,
        down_grouped: grouped_down(l, &p("ffn_down.weight"), c)?,
    })
}

/// Layer `i`'s predictor `fc1` (`H x n_embd`, `H` read from the file) and `fc2` (`n_ff x H`).
fn predictor_weights(
    l: &super::Loader,
    i: usize,
    c: &super::ModelConfig,
) -> Result<(Weight, Weight), ModelError> {
    let p = |s: &str| format!("blk.{i}.{s}");
    let fc1_name = p("fc1.weight");
    let h = match l.file.tensor(&fc1_name) {
        Some(t) => match t.shape.as_slice() {
            [cols, rows] if *cols == c.n_embd as u64 && *rows > 0 => *rows as usize,
            other => {
                return Err(ModelError::TensorShape {
                    name: fc1_name,
                    expected: vec![c.n_embd as u64, 0],
                    found: other.to_vec(),
                });
            }
        },
        None => return Err(ModelError::MissingTensor(fc1_name)),
    };
    Ok((
        l.matrix(&fc1_name, c.n_embd, h)?,
        l.matrix(&p("fc2.weight"), h, c.n_ff)?,
    ))
}

/// `ffn_down` regrouped by neuron, if the file has it in a type [`GroupedDown`] supports.
fn grouped_down(
    l: &super::Loader,
    name: &str,
    c: &super::ModelConfig,
) -> Result<Option<Arc<GroupedDown>>, ModelError> {
    let Some(t) = l.file.tensor(name) else {
        return Ok(None);
    };
    if !GroupedDown::supports(t.ty) || !c.n_embd.is_multiple_of(32) {
        return Ok(None);
    }
    let w = l.matrix(name, c.n_ff, c.n_embd)?;
    let m = w.matrix(l.file.as_bytes())?;
    let g = GroupedDown::from_down(&m)
        .map_err(|e| ModelError::InvalidConfig(format!("{name}: {e}")))?;
    Ok(Some(Arc::new(g)))
}
