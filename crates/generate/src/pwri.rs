//! Writing a PowerInfer (`PWRI`) model from a dense GGUF model and trained predictors.
//!
//! Every tensor of the source is copied, except `blk.N.ffn_down.weight`, which is replaced by
//! `blk.N.ffn_down_t.weight`: its transpose (`n_ff` rows of `n_embd`, one row per neuron) in the
//! type [`DownTType`] picks (by default: float sources keep their type, quantized ones become
//! Q8_0, since quantizing a 4-bit matrix again along the other axis doubles its error). After it come the layer's predictor tensors
//! `blk.N.fc1.weight` (ggml shape `[n_embd, H]`; F16, or F32 when the predictor input exceeds
//! f16's range) and `blk.N.fc2.weight` (`[H, n_ff]`, F16).
//! Metadata: the source's keys plus `powerinfer.sparse_threshold` (f32: the lowest per-layer
//! threshold, for readers that know no per-layer values), `powerinfer.sparse_thresholds` (f32
//! array, one per layer), `powerinfer.ffn_activation` (`relu`, `silu` or `gelu`),
//! `powerinfer.sparsity_target` (f32), `powerinfer.activation_thresholds` (f32 array) and
//! `powerinfer.dense_prefix` (u32: how many leading positions of a sequence the sparse modes
//! compute densely; absent means none). Types
//! a `PWRI` file cannot name (BF16 and newer) are widened to F32.

use std::io::{BufWriter, Write};
use std::path::Path;

use powerinfer_gguf::{Array, GgmlType, GgufFile, Magic, Value, WriteError};
use powerinfer_predictor::train::TrainedLayer;

/// `powerinfer.sparse_threshold`.
pub const KEY_THRESHOLD: &str = "powerinfer.sparse_threshold";
/// `powerinfer.sparse_thresholds`.
pub const KEY_THRESHOLDS: &str = "powerinfer.sparse_thresholds";
/// `powerinfer.ffn_activation`.
pub const KEY_FFN_ACTIVATION: &str = "powerinfer.ffn_activation";
/// `powerinfer.sparsity_target`.
pub const KEY_SPARSITY_TARGET: &str = "powerinfer.sparsity_target";
/// `powerinfer.activation_thresholds`.
pub const KEY_ACTIVATION_THRESHOLDS: &str = "powerinfer.activation_thresholds";
/// `powerinfer.dense_prefix`.
pub const KEY_DENSE_PREFIX: &str = "powerinfer.dense_prefix";

/// The [`PwriOptions::dense_prefix`] `train-predictor` writes: the first 4 positions, the
/// "attention sink" tokens that StreamingLLM keeps (the BOS token first among them). On Gemma 3
/// 270M at 40% FFN sparsity (threshold mode, `austen-pp-100k.txt`, ctx 512) the perplexity
/// change from dense fell from +4.50% to +2.89% with position 0 dense and to +2.71% with the
/// first 4. Those positions are nearly always part of the prompt, so decoding speed does not
/// change.
pub const DEFAULT_DENSE_PREFIX: u32 = 4;

/// Errors of writing a `PWRI` file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PwriError {
    /// The source model's metadata lacks something.
    #[error("source model: {0}")]
    Metadata(#[from] powerinfer_gguf::MetadataError),
    /// The source model has no `general.architecture`.
    #[error("the source model has no general.architecture key")]
    NoArchitecture,
    /// A tensor is missing or has an unexpected shape.
    #[error("{0}")]
    Shape(String),
    /// A tensor type that cannot be converted.
    #[error("tensor {tensor:?}: {msg}")]
    Convert {
        /// The tensor.
        tensor: String,
        /// What failed.
        msg: String,
    },
    /// The writer refused something.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The output file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The output path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The type `ffn_down_t` is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DownTType {
    /// F32/F16/BF16 sources keep their float type (an exact transpose; BF16 becomes F16), Q8_0
    /// stays Q8_0, every other (4-6 bit) type becomes Q8_0 (F16 when `n_embd` is not a
    /// multiple of 32): quantizing a 4-bit matrix again along the other axis doubles its error
    /// (SmolLM2 Q4_1: perplexity +6.6% with Q4_1 `ffn_down_t`, see the predictor README).
    #[default]
    Auto,
    /// The source's type when `n_embd` is a whole number of its blocks ([`down_t_type`]).
    Same,
    /// This type when `n_embd` is a whole number of its blocks, else as [`DownTType::Same`].
    Fixed(GgmlType),
}

/// What goes into the metadata besides the predictors.
#[derive(Debug, Clone, PartialEq)]
pub struct PwriOptions {
    /// The type of `ffn_down_t`.
    pub down_t: DownTType,
    /// `powerinfer.ffn_activation`.
    pub ffn_activation: String,
    /// `powerinfer.sparsity_target`.
    pub sparsity_target: f32,
    /// `powerinfer.activation_thresholds`, one per layer.
    pub activation_thresholds: Vec<f32>,
    /// `powerinfer.dense_prefix`: the sparse modes compute the FFNs of a sequence's first
    /// `dense_prefix` positions densely (every neuron, no activity threshold). Those tokens
    /// (BOS above all) carry the huge activations that later tokens attend to; skipping their
    /// neurons costs perplexity everywhere after, and computing them densely costs decoding
    /// nothing. [`DEFAULT_DENSE_PREFIX`] is what `train-predictor` writes.
    pub dense_prefix: u32,
    /// Also keep the model's own `ffn_down` when its type is Q4_0, Q4_1 or Q8_0: our engine
    /// then computes the sparse down product from it, regrouped by neuron
    /// (`powerinfer_cpu::grouped`), instead of from the requantized `ffn_down_t` (which stays
    /// for the reference PowerInfer). Costs the down matrix's bytes in the file.
    pub keep_down: bool,
    /// Store `fc1` in F32 instead of F16: needed when the predictor's input (the residual
    /// stream) can exceed f16's range (Gemma 3's does), since an F16 product converts its input
    /// to f16. The values are the same f16-rounded weights either way.
    pub fc1_f32: bool,
}

/// What [`write_pwri`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PwriSummary {
    /// Bytes written.
    pub bytes: u64,
    /// The type each `ffn_down_t` was stored in (one per layer).
    pub down_t_types: Vec<GgmlType>,
}

/// The type `ffn_down_t` rows of `n_embd` are stored in under `choice`.
pub fn choose_down_t_type(choice: DownTType, src: GgmlType, n_embd: usize) -> GgmlType {
    match choice {
        DownTType::Same => down_t_type(src, n_embd),
        DownTType::Fixed(t) => {
            if n_embd.is_multiple_of(t.block_size()) && t.id(Magic::Pwri).is_some() {
                t
            } else {
                down_t_type(src, n_embd)
            }
        }
        DownTType::Auto => match src {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0 => down_t_type(src, n_embd),
            GgmlType::BF16 => GgmlType::F16,
            _ if n_embd.is_multiple_of(32) => GgmlType::Q8_0,
            _ => GgmlType::F16,
        },
    }
}

/// The type `ffn_down_t` rows of `n_embd` are stored in under [`DownTType::Same`]: the source's
/// type when `n_embd` is a whole number of its blocks, else Q8_0 (F16 when `n_embd` is not a
/// multiple of 32).
pub fn down_t_type(src: GgmlType, n_embd: usize) -> GgmlType {
    let has_quantizer = |t: GgmlType| {
        powerinfer_quant::row_bytes(t, t.block_size())
            .map(|n| {
                let x = vec![0.0f32; t.block_size()];
                let mut out = vec![0u8; n];
                powerinfer_quant::quantize_row(t, &x, &mut out).is_ok()
            })
            .unwrap_or(false)
    };
    if src.id(Magic::Pwri).is_some()
        && n_embd.is_multiple_of(src.block_size())
        && has_quantizer(src)
        && powerinfer_quant::kernels(src).is_some()
    {
        src
    } else if n_embd.is_multiple_of(32) {
        GgmlType::Q8_0
    } else {
        GgmlType::F16
    }
}

fn conv_err(tensor: &str, e: impl std::fmt::Display) -> PwriError {
    PwriError::Convert {
        tensor: tensor.to_owned(),
        msg: e.to_string(),
    }
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

/// Dequantizes a whole `rows x cols` tensor.
fn dequantize(
    file: &GgufFile,
    name: &str,
    ty: GgmlType,
    cols: usize,
    rows: usize,
) -> Result<Vec<f32>, PwriError> {
    let data = file
        .tensor_bytes(name)
        .ok_or_else(|| PwriError::Shape(format!("tensor {name:?} is missing")))?;
    let rb =
        powerinfer_quant::row_bytes(ty, cols).ok_or_else(|| conv_err(name, "bad row length"))?;
    if data.len() != rb * rows {
        return Err(conv_err(name, "data size does not match its shape"));
    }
    let mut out = vec![0.0f32; rows * cols];
    for (src, dst) in data.chunks_exact(rb).zip(out.chunks_exact_mut(cols)) {
        powerinfer_quant::dequantize_row(ty, src, dst).map_err(|e| conv_err(name, e))?;
    }
    Ok(out)
}

fn quantize(name: &str, ty: GgmlType, v: &[f32], cols: usize) -> Result<Vec<u8>, PwriError> {
    let rb =
        powerinfer_quant::row_bytes(ty, cols).ok_or_else(|| conv_err(name, "bad row length"))?;
    let mut out = vec![0u8; rb * (v.len() / cols)];
    for (src, dst) in v.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
        powerinfer_quant::quantize_row(ty, src, dst).map_err(|e| conv_err(name, e))?;
    }
    Ok(out)
}

fn layer_of_down(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?
        .strip_suffix(".ffn_down.weight")?
        .parse()
        .ok()
}

/// Progress: `(tensors written, tensors in all)`.
pub type PwriProgress<'a> = &'a mut dyn FnMut(usize, usize);

/// Writes `out`: `src` with transposed down projections and the `predictors` (one per layer),
/// streaming tensor by tensor. A partial file is removed on error.
pub fn write_pwri(
    src: &GgufFile,
    predictors: &[TrainedLayer],
    opts: &PwriOptions,
    out: &Path,
    progress: Option<PwriProgress<'_>>,
) -> Result<PwriSummary, PwriError> {
    let r = write_impl(src, predictors, opts, out, progress);
    if r.is_err() {
        let _ = std::fs::remove_file(out);
    }
    r
}

enum Plan {
    Copy {
        name: String,
    },
    Widen {
        name: String,
        ty: GgmlType,
        cols: usize,
        rows: usize,
    },
    DownT {
        src_name: String,
        src_ty: GgmlType,
        layer: usize,
    },
    Fc1(usize),
    Fc2(usize),
}

fn write_impl(
    src: &GgufFile,
    predictors: &[TrainedLayer],
    opts: &PwriOptions,
    out: &Path,
    mut progress: Option<PwriProgress<'_>>,
) -> Result<PwriSummary, PwriError> {
    src.architecture().ok_or(PwriError::NoArchitecture)?;
    let n_layer = src.get_arch_u64("block_count")? as usize;
    let n_embd = src.get_arch_u64("embedding_length")? as usize;
    let n_ff = src.get_arch_u64("feed_forward_length")? as usize;
    if predictors.len() != n_layer {
        return Err(PwriError::Shape(format!(
            "{} predictors for {n_layer} layers",
            predictors.len()
        )));
    }
    for (i, p) in predictors.iter().enumerate() {
        if p.n_embd != n_embd
            || p.n_ff != n_ff
            || p.fc1.len() != p.hidden * n_embd
            || p.fc2.len() != n_ff * p.hidden
        {
            return Err(PwriError::Shape(format!(
                "layer {i} predictor: n_embd {}, n_ff {}, H {} do not fit the model (n_embd {n_embd}, n_ff {n_ff})",
                p.n_embd, p.n_ff, p.hidden
            )));
        }
    }
    if opts.activation_thresholds.len() != n_layer {
        return Err(PwriError::Shape(format!(
            "{} activation thresholds for {n_layer} layers",
            opts.activation_thresholds.len()
        )));
    }

    let mut w = powerinfer_gguf::GgufWriter::new(Magic::Pwri);
    let ours = [
        KEY_THRESHOLD,
        KEY_THRESHOLDS,
        KEY_FFN_ACTIVATION,
        KEY_SPARSITY_TARGET,
        KEY_ACTIVATION_THRESHOLDS,
    ];
    for (k, v) in src.metadata() {
        if !ours.contains(&k.as_str()) {
            w.add_kv(k.clone(), v.clone())?;
        }
    }
    let thresholds: Vec<f32> = predictors.iter().map(|p| p.threshold).collect();
    let lowest = thresholds
        .iter()
        .copied()
        .filter(|t| t.is_finite())
        .fold(f32::INFINITY, f32::min);
    w.add_kv(
        KEY_THRESHOLD,
        Value::F32(if lowest.is_finite() { lowest } else { 0.0 }),
    )?;
    w.add_kv(KEY_THRESHOLDS, Value::Array(Array::F32(thresholds)))?;
    w.add_kv(
        KEY_FFN_ACTIVATION,
        Value::String(opts.ffn_activation.clone()),
    )?;
    w.add_kv(KEY_SPARSITY_TARGET, Value::F32(opts.sparsity_target))?;
    w.add_kv(
        KEY_ACTIVATION_THRESHOLDS,
        Value::Array(Array::F32(opts.activation_thresholds.clone())),
    )?;
    w.add_kv(KEY_DENSE_PREFIX, Value::U32(opts.dense_prefix))?;

    let mut plan = Vec::new();
    let mut down_t_types = vec![None; n_layer];
    for t in src.tensors() {
        if let Some(layer) = layer_of_down(&t.name).filter(|&l| l < n_layer) {
            if t.shape.len() < 2
                || t.shape[0] != n_ff as u64
                || t.shape[1] != n_embd as u64
                || t.shape[2..].iter().any(|&d| d != 1)
            {
                return Err(PwriError::Shape(format!(
                    "{}: ggml shape {:?}, expected [n_ff={n_ff}, n_embd={n_embd}]",
                    t.name, t.shape
                )));
            }
            let ty = choose_down_t_type(opts.down_t, t.ty, n_embd);
            down_t_types[layer] = Some(ty);
            let h = predictors[layer].hidden as u64;
            w.add_tensor_info(
                format!("blk.{layer}.ffn_down_t.weight"),
                ty,
                &[n_embd as u64, n_ff as u64],
            )?;
            w.add_tensor_info(
                format!("blk.{layer}.fc1.weight"),
                if opts.fc1_f32 {
                    GgmlType::F32
                } else {
                    GgmlType::F16
                },
                &[n_embd as u64, h],
            )?;
            w.add_tensor_info(
                format!("blk.{layer}.fc2.weight"),
                GgmlType::F16,
                &[h, n_ff as u64],
            )?;
            plan.push(Plan::DownT {
                src_name: t.name.clone(),
                src_ty: t.ty,
                layer,
            });
            plan.push(Plan::Fc1(layer));
            plan.push(Plan::Fc2(layer));
            if opts.keep_down
                && matches!(t.ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
                && n_embd.is_multiple_of(32)
            {
                w.add_tensor_info(t.name.clone(), t.ty, &t.shape)?;
                plan.push(Plan::Copy {
                    name: t.name.clone(),
                });
            }
        } else if t.name.ends_with(".fc1.weight")
            || t.name.ends_with(".fc2.weight")
            || t.name.ends_with(".ffn_down_t.weight")
        {
            return Err(PwriError::Shape(format!(
                "the source already holds {:?}: give the dense model",
                t.name
            )));
        } else if t.ty.id(Magic::Pwri).is_some() {
            w.add_tensor_info(t.name.clone(), t.ty, &t.shape)?;
            plan.push(Plan::Copy {
                name: t.name.clone(),
            });
        } else {
            w.add_tensor_info(t.name.clone(), GgmlType::F32, &t.shape)?;
            plan.push(Plan::Widen {
                name: t.name.clone(),
                ty: t.ty,
                cols: t.row_len() as usize,
                rows: t.n_rows() as usize,
            });
        }
    }
    let down_t_types: Vec<GgmlType> = down_t_types
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.ok_or_else(|| PwriError::Shape(format!("blk.{i}.ffn_down.weight is missing")))
        })
        .collect::<Result<_, _>>()?;

    let io = |source| PwriError::Io {
        path: out.display().to_string(),
        source,
    };
    let file = std::fs::File::create(out).map_err(io)?;
    let mut s = w.begin(BufWriter::with_capacity(1 << 20, file))?;
    let total = plan.len();
    for (k, step) in plan.iter().enumerate() {
        match step {
            Plan::Copy { name } => {
                let data = src
                    .tensor_bytes(name)
                    .ok_or_else(|| PwriError::Shape(format!("tensor {name:?} is missing")))?;
                s.write_tensor_data(name, data)?;
            }
            Plan::Widen {
                name,
                ty,
                cols,
                rows,
            } => {
                let v = dequantize(src, name, *ty, *cols, *rows)?;
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                s.write_tensor_data(name, &bytes)?;
            }
            Plan::DownT {
                src_name,
                src_ty,
                layer,
            } => {
                // source: n_embd rows of n_ff; transpose: n_ff rows of n_embd
                let v = dequantize(src, src_name, *src_ty, n_ff, n_embd)?;
                let mut t = vec![0.0f32; n_ff * n_embd];
                const B: usize = 32;
                for r0 in (0..n_embd).step_by(B) {
                    for c0 in (0..n_ff).step_by(B) {
                        for r in r0..(r0 + B).min(n_embd) {
                            for c in c0..(c0 + B).min(n_ff) {
                                t[c * n_embd + r] = v[r * n_ff + c];
                            }
                        }
                    }
                }
                let name = format!("blk.{layer}.ffn_down_t.weight");
                let bytes = quantize(&name, down_t_types[*layer], &t, n_embd)?;
                s.write_tensor_data(&name, &bytes)?;
            }
            Plan::Fc1(layer) => {
                s.write_tensor_data(
                    &format!("blk.{layer}.fc1.weight"),
                    &if opts.fc1_f32 {
                        predictors[*layer]
                            .fc1
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect()
                    } else {
                        f16_bytes(&predictors[*layer].fc1)
                    },
                )?;
            }
            Plan::Fc2(layer) => {
                s.write_tensor_data(
                    &format!("blk.{layer}.fc2.weight"),
                    &f16_bytes(&predictors[*layer].fc2),
                )?;
            }
        }
        if let Some(p) = progress.as_mut() {
            p(k + 1, total);
        }
    }
    let mut bw = s.finish()?;
    bw.flush().map_err(io)?;
    let bytes = bw.get_ref().metadata().map_err(io)?.len();
    Ok(PwriSummary {
        bytes,
        down_t_types,
    })
}
