//! Synthetic PowerInfer models for speed and scale tests.
//!
//! [`Synth`] writes a PowerInfer file (magic `PWRI`, architecture `llama`, the reference's tensor
//! set: `ffn_down_t`, `fc1`, `fc2`) or its plain-GGUF dense twin (`ffn_down`, no predictors) with
//! seeded random weights of sane scale and a generated SentencePiece vocabulary. **These files
//! are for speed and scale only: the weights are random and the text they produce is
//! meaningless.**
//!
//! - Streaming: tensor by tensor, chunk of rows by chunk of rows (at most [`CHUNK_BYTES`] of
//!   output at a time), generated and quantized in parallel with rayon. A 70B file needs no more
//!   memory than a few chunks.
//! - Deterministic: every matrix element is a pure function of (seed, tensor, row, column), so
//!   the bytes do not depend on the thread count, and the down projection holds the same values
//!   in both layouts before quantization (quantization groups differ: `ffn_down_t` quantizes
//!   along `n_embd`, `ffn_down` along `n_ff`).
//! - Scales: `N(0, 1) / sqrt(n_in)` elements, norms 1, except `token_embd` (unit standard
//!   deviation) and `attn_q` (8x): random attention would otherwise average over past positions
//!   and make every token's residual stream, and so every token's active set, alike.
//! - Predictors: `fc1` rows come in pairs `±w_k`, so `relu(fc1 x)` holds `|w_k · x|` split by
//!   sign; `fc2` row `i` is `b_i (1, ..., 1) + σ (n_i - mean(n_i))` with random `n_i`. At
//!   threshold 0 neuron `i` then fires with probability `Φ(b_i S / (σ ‖h_c‖))` for any input
//!   scale, and `b_i` is chosen from the inverse normal CDF of a target probability `q_i`. The
//!   `q_i` follow a capped power law ([`skew::probability_profile`]) with mean `1 - sparsity`
//!   in which the `hot_share` hottest neurons carry `hot_mass` of all activations; hot neurons
//!   are scattered over the ids by a seeded permutation per layer.
//!
//! ```no_run
//! use powerinfer_synth::{Layout, ModelShape, Synth, SynthConfig};
//! use powerinfer_gguf::GgmlType;
//!
//! let cfg = SynthConfig::new(ModelShape::preset("llama-7b")?, GgmlType::Q4_0, 1);
//! let synth = Synth::new(cfg)?;
//! synth.write_file(Layout::PowerInfer, "llama-7b.q4_0.powerinfer.gguf", &|_bytes| {})?;
//! synth.write_file(Layout::Dense, "llama-7b.q4_0.dense.gguf", &|_bytes| {})?;
//! # Ok::<(), powerinfer_synth::SynthError>(())
//! ```

pub mod measure;
mod random;
pub mod skew;
pub mod vocab;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use powerinfer_gguf::{Array, GgmlType, GgufWriter, Magic, Value, WriteError};
use powerinfer_quant::quantize_row;
use rayon::prelude::*;

pub use measure::{ActivityReport, LayerActivity, measure_activity, measure_inputs};
pub use vocab::{Vocab, build_vocab};

use random::{mix64, normal_at};

/// Output bytes generated per parallel step (rows are never split).
pub const CHUNK_BYTES: usize = 8 << 20;

/// Metadata key: the file is synthetic (bool true).
pub const SYNTHETIC_KEY: &str = "powerinfer.synthetic";
/// Metadata key: the sparsity the predictors were built for (f32).
pub const SYNTHETIC_SPARSITY_KEY: &str = "powerinfer.synthetic.sparsity";
/// The threshold key of PowerInfer files.
pub const THRESHOLD_KEY: &str = "powerinfer.sparse_threshold";
/// The `general.description` written into both layouts.
pub const DESCRIPTION: &str = "Synthetic model: seeded random weights for speed and scale tests only; the text it generates is meaningless.";

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// A shape name that is not a preset.
    #[error("unknown shape {0:?} (expected llama-7b, llama-13b, llama-70b or custom)")]
    UnknownShape(String),
    /// Sparsity must lie strictly between 0 and 1.
    #[error("sparsity {0} is outside (0, 1)")]
    BadSparsity(f64),
    /// Hot share must lie strictly between 0 and 1.
    #[error("hot share {0} is outside (0, 1)")]
    BadHotShare(f64),
    /// Hot mass must lie strictly between 0 and 1.
    #[error("hot mass {0} is outside (0, 1)")]
    BadHotMass(f64),
    /// The requested skew cannot be built.
    #[error("cannot skew the neuron activity: {reason}")]
    InfeasibleSkew {
        /// Why.
        reason: String,
    },
    /// A type name that is not a ggml type.
    #[error(
        "unknown tensor type {0:?} (expected one of f32, f16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k)"
    )]
    UnknownType(String),
    /// A type that cannot be used here.
    #[error("type {ty} cannot be used for {what}: {reason}")]
    UnsupportedType {
        /// The type.
        ty: GgmlType,
        /// What it was meant for.
        what: &'static str,
        /// Why not.
        reason: String,
    },
    /// Hyper-parameters that do not make a model.
    #[error("bad model shape: {0}")]
    BadShape(String),
    /// Creating, writing or renaming the output failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The GGUF writer refused something or the output failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The rayon pool could not be started.
    #[error("cannot start the thread pool: {0}")]
    ThreadPool(String),
    /// Reading predictors back for [`measure_activity`] failed.
    #[error("measuring the predictors: {0}")]
    Measure(String),
}

/// Hyper-parameters of a llama-shaped model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShape {
    /// Hidden size.
    pub n_embd: usize,
    /// FFN inner size (neurons per layer).
    pub n_ff: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Training context length written to the file.
    pub n_ctx: usize,
}

impl ModelShape {
    /// LLaMA-2 7B: 4096 / 11008 / 32 layers / 32 heads / vocab 32000.
    pub const LLAMA_7B: ModelShape = ModelShape {
        n_embd: 4096,
        n_ff: 11008,
        n_layer: 32,
        n_head: 32,
        n_head_kv: 32,
        n_vocab: 32000,
        n_ctx: 4096,
    };
    /// LLaMA-2 13B: 5120 / 13824 / 40 layers / 40 heads / vocab 32000.
    pub const LLAMA_13B: ModelShape = ModelShape {
        n_embd: 5120,
        n_ff: 13824,
        n_layer: 40,
        n_head: 40,
        n_head_kv: 40,
        n_vocab: 32000,
        n_ctx: 4096,
    };
    /// LLaMA-2 70B: 8192 / 28672 / 80 layers / 64 heads, 8 KV heads / vocab 32000.
    pub const LLAMA_70B: ModelShape = ModelShape {
        n_embd: 8192,
        n_ff: 28672,
        n_layer: 80,
        n_head: 64,
        n_head_kv: 8,
        n_vocab: 32000,
        n_ctx: 4096,
    };

    /// The presets by name.
    pub const PRESETS: &'static [(&'static str, ModelShape)] = &[
        ("llama-7b", Self::LLAMA_7B),
        ("llama-13b", Self::LLAMA_13B),
        ("llama-70b", Self::LLAMA_70B),
    ];

    /// A preset by name (`llama-7b`, `llama-13b`, `llama-70b`, case-insensitive).
    pub fn preset(name: &str) -> Result<ModelShape, SynthError> {
        Self::PRESETS
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|&(_, s)| s)
            .ok_or_else(|| SynthError::UnknownShape(name.to_owned()))
    }

    /// Dimension of one attention head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head.max(1)
    }

    /// Checks that the numbers make a llama model.
    pub fn validate(&self) -> Result<(), SynthError> {
        let s = self;
        let bad = |m: String| Err(SynthError::BadShape(m));
        for (name, v) in [
            ("n_embd", s.n_embd),
            ("n_ff", s.n_ff),
            ("n_layer", s.n_layer),
            ("n_head", s.n_head),
            ("n_head_kv", s.n_head_kv),
            ("n_ctx", s.n_ctx),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
            if v > u32::MAX as usize {
                return bad(format!("{name} {v} is too large"));
            }
        }
        if !s.n_embd.is_multiple_of(s.n_head) {
            return bad(format!(
                "n_embd {} is not a multiple of n_head {}",
                s.n_embd, s.n_head
            ));
        }
        if !s.n_head.is_multiple_of(s.n_head_kv) {
            return bad(format!(
                "n_head {} is not a multiple of n_head_kv {}",
                s.n_head, s.n_head_kv
            ));
        }
        if !s.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head dimension {} is odd (RoPE rotates pairs)",
                s.head_dim()
            ));
        }
        if s.n_vocab < vocab::MIN_VOCAB {
            return bad(format!(
                "n_vocab {} is below the minimum {}",
                s.n_vocab,
                vocab::MIN_VOCAB
            ));
        }
        if s.n_vocab > u32::MAX as usize {
            return bad(format!("n_vocab {} is too large", s.n_vocab));
        }
        Ok(())
    }
}

/// Which file to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// The PowerInfer file: magic `PWRI`, `ffn_down_t`, `fc1`/`fc2`, `powerinfer.*` keys.
    PowerInfer,
    /// The dense twin: magic `GGUF`, `ffn_down`, no predictors, no `powerinfer.*` keys.
    Dense,
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Hyper-parameters.
    pub shape: ModelShape,
    /// `general.name`.
    pub name: String,
    /// Type of every matrix except `output.weight` (and of `fc1`/`fc2`).
    pub weight_type: GgmlType,
    /// Type of `output.weight`; `None` follows the reference quantizer (see
    /// [`default_output_type`]).
    pub output_type: Option<GgmlType>,
    /// Predictor hidden size H; `None` picks [`default_predictor_hidden`].
    pub predictor_hidden: Option<usize>,
    /// Fraction of neurons the predictors skip per token, in (0, 1).
    pub sparsity: f64,
    /// Share of neurons counted as hot, in (0, 1).
    pub hot_share: f64,
    /// Share of all activations the hot neurons carry, in (0, 1).
    pub hot_mass: f64,
    /// Seed of every random choice.
    pub seed: u64,
}

impl SynthConfig {
    /// A configuration with sparsity 0.9, hot share 0.2, hot mass 0.8 and default H and output
    /// type, named `synthetic-llama-{n_embd}x{n_layer}`.
    pub fn new(shape: ModelShape, weight_type: GgmlType, seed: u64) -> Self {
        SynthConfig {
            name: format!("synthetic-llama-{}x{}", shape.n_embd, shape.n_layer),
            shape,
            weight_type,
            output_type: None,
            predictor_hidden: None,
            sparsity: 0.9,
            hot_share: 0.2,
            hot_mass: 0.8,
            seed,
        }
    }
}

/// Matrix types this crate writes: the ones `powerinfer-quant` both quantizes and multiplies
/// and a `PWRI` file can store.
pub const WEIGHT_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Parses a weight type name (`q4_0`, `Q6_K`, `f16`, ...) and checks it is in [`WEIGHT_TYPES`].
pub fn parse_weight_type(name: &str) -> Result<GgmlType, SynthError> {
    let ty = GgmlType::from_name(name).ok_or_else(|| SynthError::UnknownType(name.to_owned()))?;
    check_weight_type(ty, "weights")?;
    Ok(ty)
}

fn check_weight_type(ty: GgmlType, what: &'static str) -> Result<(), SynthError> {
    if WEIGHT_TYPES.contains(&ty) {
        Ok(())
    } else {
        Err(SynthError::UnsupportedType {
            ty,
            what,
            reason: "not one of f32, f16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k (a PWRI file cannot store BF16 or IQ types; Q8_1/Q8_K are activation types)".into(),
        })
    }
}

/// `output.weight`'s type as the reference quantizer picks it: the weight type itself when it
/// is F32, F16, Q8_0 or Q6_K, else Q6_K when `n_embd` is a multiple of 256, else Q8_0.
pub fn default_output_type(weight_type: GgmlType, n_embd: usize) -> GgmlType {
    match weight_type {
        GgmlType::F32 | GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q6_K => weight_type,
        _ if n_embd.is_multiple_of(256) => GgmlType::Q6_K,
        _ => GgmlType::Q8_0,
    }
}

/// The default predictor hidden size: `n_embd / 16` rounded up to a multiple of 32 and of the
/// type's block size, at least 64 (256 for 7B, 320 for 13B, 512 for 70B with Q4_0). The
/// reference ships about 1024 for 7B; at 256 a 7B predictor costs about 5% of a layer's
/// multiply-adds at 90% sparsity.
pub fn default_predictor_hidden(n_embd: usize, ty: GgmlType) -> usize {
    let step = 32usize.max(ty.block_size());
    (n_embd / 16).max(64).next_multiple_of(step)
}

/// `general.file_type` (llama.cpp's `llama_ftype`) of a uniform weight type.
fn file_type(ty: GgmlType) -> u32 {
    match ty {
        GgmlType::F32 => 0,
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q4_K => 14, // Q4_K_S
        GgmlType::Q5_K => 16, // Q5_K_S
        GgmlType::Q6_K => 18,
        _ => 0,
    }
}

/// The random matrices, for [`Synth::element`]. Element `(row, col)` is in PyTorch order: `row`
/// indexes the output, `col` the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MatrixKind {
    /// `token_embd` (`n_vocab x n_embd`).
    TokenEmbd,
    /// `output` (`n_vocab x n_embd`).
    Output,
    /// `attn_q` (`n_head * head_dim x n_embd`).
    AttnQ,
    /// `attn_k` (`n_head_kv * head_dim x n_embd`).
    AttnK,
    /// `attn_v` (`n_head_kv * head_dim x n_embd`).
    AttnV,
    /// `attn_output` (`n_embd x n_head * head_dim`).
    AttnOutput,
    /// `ffn_gate` (`n_ff x n_embd`).
    FfnGate,
    /// `ffn_up` (`n_ff x n_embd`).
    FfnUp,
    /// The down projection (`n_embd x n_ff`): `ffn_down` stores it as is, `ffn_down_t`
    /// transposed.
    FfnDown,
    /// Predictor `fc1` (`H x n_embd`): rows `2k` and `2k + 1` are `w_k` and `-w_k`.
    Fc1,
}

impl MatrixKind {
    fn code(self) -> u64 {
        match self {
            MatrixKind::TokenEmbd => 1,
            MatrixKind::Output => 2,
            MatrixKind::AttnQ => 3,
            MatrixKind::AttnK => 4,
            MatrixKind::AttnV => 5,
            MatrixKind::AttnOutput => 6,
            MatrixKind::FfnGate => 7,
            MatrixKind::FfnUp => 8,
            MatrixKind::FfnDown => 9,
            MatrixKind::Fc1 => 10,
        }
    }
}

/// `attn_q`'s scale relative to `1 / sqrt(n_embd)`: attention scores with a standard deviation of
/// about this, so that each token attends to a few past positions rather than a near-uniform
/// average (which would make the residual streams of all tokens alike, and with them the
/// predictors' choices).
const ATTN_Q_GAIN: f32 = 8.0;

/// Stream code of `fc2`'s noise.
const FC2_CODE: u64 = 11;

fn stream_key(seed: u64, code: u64, layer: usize) -> u64 {
    mix64(mix64(seed.wrapping_add(random::GAMMA)) ^ (code << 48) ^ layer as u64)
}

/// How the rows of one tensor are made (ggml row `r` of `cols` elements).
enum RowSource {
    /// `scale * N(r, c)`; `transposed` reads the logical matrix's column `r` instead.
    Normal {
        key: u64,
        scale: f32,
        transposed: bool,
    },
    /// `±scale * N(r / 2, c)` (sign by parity).
    Fc1 { key: u64, scale: f32 },
    /// `bias[r] + sigma * (N(r, c) - mean_c N(r, c))`.
    Fc2 {
        key: u64,
        sigma: f32,
        bias: Vec<f32>,
    },
    /// All ones (norm weights).
    Ones,
}

impl RowSource {
    fn fill(&self, r: usize, out: &mut [f32]) {
        match self {
            RowSource::Normal {
                key,
                scale,
                transposed,
            } => random::fill_normal(*key, *scale, r, *transposed, out),
            RowSource::Fc1 { key, scale } => {
                let base = ((r / 2) as u64) << 32;
                let s = if r.is_multiple_of(2) { *scale } else { -*scale };
                for (c, o) in out.iter_mut().enumerate() {
                    *o = s * normal_at(*key, base | c as u64);
                }
            }
            RowSource::Fc2 { key, sigma, bias } => {
                let base = (r as u64) << 32;
                let mut sum = 0f64;
                for (c, o) in out.iter_mut().enumerate() {
                    *o = normal_at(*key, base | c as u64);
                    sum += *o as f64;
                }
                let mean = (sum / out.len() as f64) as f32;
                let b = bias[r];
                for o in out.iter_mut() {
                    *o = b + sigma * (*o - mean);
                }
            }
            RowSource::Ones => out.fill(1.0),
        }
    }
}

/// One tensor of a synthetic file.
struct TensorPlan {
    name: String,
    ty: GgmlType,
    /// ggml order: `[cols]` or `[cols, rows]`.
    shape: Vec<u64>,
    source: RowSource,
}

impl TensorPlan {
    fn cols(&self) -> usize {
        self.shape[0] as usize
    }

    fn rows(&self) -> usize {
        self.shape.get(1).copied().unwrap_or(1) as usize
    }
}

/// A tensor's name, type and ggml shape, as [`Synth::tensor_list`] reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorDesc {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// ggml shape (`shape[0]` is the row length).
    pub shape: Vec<u64>,
}

/// A validated synthetic model, ready to write in either layout.
#[derive(Debug, Clone)]
pub struct Synth {
    cfg: SynthConfig,
    output_type: GgmlType,
    hidden: usize,
    /// Firing probabilities, hottest first (the same profile for every layer, permuted).
    profile: Vec<f64>,
    vocab: Vocab,
}

impl Synth {
    /// Validates `cfg` and solves the activity profile.
    pub fn new(cfg: SynthConfig) -> Result<Self, SynthError> {
        let s = cfg.shape;
        s.validate()?;
        if !(cfg.sparsity > 0.0 && cfg.sparsity < 1.0) {
            return Err(SynthError::BadSparsity(cfg.sparsity));
        }
        if !(cfg.hot_share > 0.0 && cfg.hot_share < 1.0) {
            return Err(SynthError::BadHotShare(cfg.hot_share));
        }
        if !(cfg.hot_mass > 0.0 && cfg.hot_mass < 1.0) {
            return Err(SynthError::BadHotMass(cfg.hot_mass));
        }
        let wt = cfg.weight_type;
        check_weight_type(wt, "weights")?;
        let output_type = cfg
            .output_type
            .unwrap_or_else(|| default_output_type(wt, s.n_embd));
        check_weight_type(output_type, "output.weight")?;
        let hidden = cfg
            .predictor_hidden
            .unwrap_or_else(|| default_predictor_hidden(s.n_embd, wt));
        if hidden == 0 || !hidden.is_multiple_of(2) {
            return Err(SynthError::BadShape(format!(
                "predictor hidden size {hidden} must be even and positive (fc1 rows come in ± pairs)"
            )));
        }
        if hidden > u32::MAX as usize {
            return Err(SynthError::BadShape(format!(
                "predictor hidden size {hidden} is too large"
            )));
        }
        let block_check = |ty: GgmlType, what: &'static str, n: usize, label: &str| {
            if n.is_multiple_of(ty.block_size()) {
                Ok(())
            } else {
                Err(SynthError::UnsupportedType {
                    ty,
                    what,
                    reason: format!(
                        "rows of {label} = {n} are not a multiple of its block size {}",
                        ty.block_size()
                    ),
                })
            }
        };
        block_check(wt, "weights", s.n_embd, "n_embd")?;
        block_check(wt, "ffn_down", s.n_ff, "n_ff")?;
        block_check(wt, "fc2", hidden, "the predictor hidden size")?;
        block_check(output_type, "output.weight", s.n_embd, "n_embd")?;
        let mean = 1.0 - cfg.sparsity;
        let profile = skew::probability_profile(s.n_ff, mean, cfg.hot_share, cfg.hot_mass)?;
        let vocab = build_vocab(s.n_vocab)?;
        Ok(Synth {
            cfg,
            output_type,
            hidden,
            profile,
            vocab,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SynthConfig {
        &self.cfg
    }

    /// The type of `output.weight`.
    pub fn output_type(&self) -> GgmlType {
        self.output_type
    }

    /// The predictor hidden size H.
    pub fn predictor_hidden(&self) -> usize {
        self.hidden
    }

    /// The vocabulary written to the file.
    pub fn vocab(&self) -> &Vocab {
        &self.vocab
    }

    /// The target firing probability of each neuron of `layer`, by neuron id.
    pub fn neuron_probabilities(&self, layer: usize) -> Vec<f64> {
        let perm = skew::permutation(self.profile.len(), stream_key(self.cfg.seed, 0xFFFF, layer));
        let mut q = vec![0f64; self.profile.len()];
        for (rank, &id) in perm.iter().enumerate() {
            q[id as usize] = self.profile[rank];
        }
        q
    }

    /// Element `(row, col)` (PyTorch order: output, input) of a random matrix before
    /// quantization: `N(0, 1) / sqrt(n_in)` (Irwin-Hall approximation; `TokenEmbd` `N(0, 1)`,
    /// `AttnQ` 8x), a pure function of (seed, kind, layer, row, col). `layer` is ignored for
    /// `TokenEmbd` and `Output`.
    pub fn element(&self, kind: MatrixKind, layer: usize, row: usize, col: usize) -> f32 {
        let layer = match kind {
            MatrixKind::TokenEmbd | MatrixKind::Output => 0,
            _ => layer,
        };
        let key = stream_key(self.cfg.seed, kind.code(), layer);
        let scale = self.scale(kind);
        match kind {
            MatrixKind::Fc1 => {
                let s = if row.is_multiple_of(2) { scale } else { -scale };
                s * normal_at(key, (((row / 2) as u64) << 32) | col as u64)
            }
            _ => scale * normal_at(key, ((row as u64) << 32) | col as u64),
        }
    }

    /// Standard deviation of a matrix's elements: `1 / sqrt(n_in)`, except the token embedding
    /// (1: its rows are added to the residual stream, not multiplied; with a smaller scale the
    /// token-specific part of the stream drowns in the attention outputs, which random queries
    /// and keys make near-uniform running averages over the past positions).
    fn scale(&self, kind: MatrixKind) -> f32 {
        match kind {
            MatrixKind::TokenEmbd => 1.0,
            MatrixKind::AttnQ => ATTN_Q_GAIN / (self.n_in(kind) as f32).sqrt(),
            _ => 1.0 / (self.n_in(kind) as f32).sqrt(),
        }
    }

    fn n_in(&self, kind: MatrixKind) -> usize {
        let s = &self.cfg.shape;
        match kind {
            MatrixKind::AttnOutput => s.n_head * s.head_dim(),
            MatrixKind::FfnDown => s.n_ff,
            _ => s.n_embd,
        }
    }

    fn matrix(
        &self,
        name: String,
        ty: GgmlType,
        kind: MatrixKind,
        layer: usize,
        rows: usize,
        transposed: bool,
    ) -> TensorPlan {
        let layer = match kind {
            MatrixKind::TokenEmbd | MatrixKind::Output => 0,
            _ => layer,
        };
        let key = stream_key(self.cfg.seed, kind.code(), layer);
        let scale = self.scale(kind);
        let cols = if transposed {
            // ffn_down_t: ggml rows are neurons, each of n_embd outputs.
            self.cfg.shape.n_embd
        } else {
            self.n_in(kind)
        };
        let source = match kind {
            MatrixKind::Fc1 => RowSource::Fc1 { key, scale },
            _ => RowSource::Normal {
                key,
                scale,
                transposed,
            },
        };
        TensorPlan {
            name,
            ty,
            shape: vec![cols as u64, rows as u64],
            source,
        }
    }

    fn fc2(&self, layer: usize) -> TensorPlan {
        let h = self.hidden;
        let sigma = 1.0 / (h as f64).sqrt();
        // p_i = b_i S + sigma n_i . h_c, with S = sum(h), h_c = h - mean(h). For h built from
        // ± pairs of N(0, s^2) projections, ||h_c|| / S -> sqrt((pi - 1) / H), and n_i . h_c is
        // N(0, ||h_c||^2) across neurons: P(p_i >= 0) = Phi(b_i S / (sigma ||h_c||)).
        let ratio = ((std::f64::consts::PI - 1.0) / h as f64).sqrt();
        let bias: Vec<f32> = self
            .neuron_probabilities(layer)
            .iter()
            .map(|&q| (sigma * skew::inverse_normal_cdf(q) * ratio) as f32)
            .collect();
        TensorPlan {
            name: format!("blk.{layer}.fc2.weight"),
            ty: self.cfg.weight_type,
            shape: vec![h as u64, self.cfg.shape.n_ff as u64],
            source: RowSource::Fc2 {
                key: stream_key(self.cfg.seed, FC2_CODE, layer),
                sigma: sigma as f32,
                bias,
            },
        }
    }

    fn norm(name: String, n: usize) -> TensorPlan {
        TensorPlan {
            name,
            ty: GgmlType::F32,
            shape: vec![n as u64],
            source: RowSource::Ones,
        }
    }

    /// The tensors of a layout, in file order (the reference converter's order). The `fc2`
    /// biases are computed here, so this costs `n_layer * n_ff` probability evaluations.
    fn plan(&self, layout: Layout, with_sources: bool) -> Vec<TensorPlan> {
        let s = &self.cfg.shape;
        let wt = self.cfg.weight_type;
        let (q_dim, kv_dim) = (s.n_head * s.head_dim(), s.n_head_kv * s.head_dim());
        let mut v = vec![
            self.matrix(
                "output.weight".into(),
                self.output_type,
                MatrixKind::Output,
                0,
                s.n_vocab,
                false,
            ),
            self.matrix(
                "token_embd.weight".into(),
                wt,
                MatrixKind::TokenEmbd,
                0,
                s.n_vocab,
                false,
            ),
        ];
        for l in 0..s.n_layer {
            let p = |t: &str| format!("blk.{l}.{t}.weight");
            v.push(Self::norm(p("attn_norm"), s.n_embd));
            match layout {
                Layout::PowerInfer => {
                    v.push(self.matrix(p("ffn_down_t"), wt, MatrixKind::FfnDown, l, s.n_ff, true))
                }
                Layout::Dense => {
                    v.push(self.matrix(p("ffn_down"), wt, MatrixKind::FfnDown, l, s.n_embd, false))
                }
            }
            v.push(self.matrix(p("ffn_gate"), wt, MatrixKind::FfnGate, l, s.n_ff, false));
            v.push(self.matrix(p("ffn_up"), wt, MatrixKind::FfnUp, l, s.n_ff, false));
            v.push(Self::norm(p("ffn_norm"), s.n_embd));
            v.push(self.matrix(p("attn_k"), wt, MatrixKind::AttnK, l, kv_dim, false));
            v.push(self.matrix(
                p("attn_output"),
                wt,
                MatrixKind::AttnOutput,
                l,
                s.n_embd,
                false,
            ));
            v.push(self.matrix(p("attn_q"), wt, MatrixKind::AttnQ, l, q_dim, false));
            v.push(self.matrix(p("attn_v"), wt, MatrixKind::AttnV, l, kv_dim, false));
        }
        v.push(Self::norm("output_norm.weight".into(), s.n_embd));
        if layout == Layout::PowerInfer {
            for l in 0..s.n_layer {
                v.push(self.matrix(
                    format!("blk.{l}.fc1.weight"),
                    wt,
                    MatrixKind::Fc1,
                    l,
                    self.hidden,
                    false,
                ));
                if with_sources {
                    v.push(self.fc2(l));
                } else {
                    v.push(TensorPlan {
                        name: format!("blk.{l}.fc2.weight"),
                        ty: wt,
                        shape: vec![self.hidden as u64, s.n_ff as u64],
                        source: RowSource::Ones,
                    });
                }
            }
        }
        v
    }

    /// Names, types and shapes of a layout's tensors, in file order.
    pub fn tensor_list(&self, layout: Layout) -> Vec<TensorDesc> {
        self.plan(layout, false)
            .into_iter()
            .map(|t| TensorDesc {
                name: t.name,
                ty: t.ty,
                shape: t.shape,
            })
            .collect()
    }

    fn header(&self, layout: Layout, tensors: &[TensorPlan]) -> Result<GgufWriter, SynthError> {
        let c = &self.cfg;
        let s = &c.shape;
        let magic = match layout {
            Layout::PowerInfer => Magic::Pwri,
            Layout::Dense => Magic::Gguf,
        };
        let mut w = GgufWriter::new(magic);
        w.add_kv("general.architecture", Value::from("llama"))?;
        w.add_kv("general.name", Value::from(c.name.as_str()))?;
        w.add_kv("general.description", Value::from(DESCRIPTION))?;
        let u = |v: usize| Value::U32(v as u32);
        w.add_kv("llama.context_length", u(s.n_ctx))?;
        w.add_kv("llama.embedding_length", u(s.n_embd))?;
        w.add_kv("llama.block_count", u(s.n_layer))?;
        w.add_kv("llama.feed_forward_length", u(s.n_ff))?;
        w.add_kv("llama.rope.dimension_count", u(s.head_dim()))?;
        w.add_kv("llama.attention.head_count", u(s.n_head))?;
        w.add_kv("llama.attention.head_count_kv", u(s.n_head_kv))?;
        w.add_kv("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))?;
        w.add_kv("llama.rope.freq_base", Value::F32(10000.0))?;
        w.add_kv("general.file_type", Value::U32(file_type(c.weight_type)))?;
        if layout == Layout::PowerInfer {
            w.add_kv(THRESHOLD_KEY, Value::F32(0.0))?;
            w.add_kv(SYNTHETIC_KEY, Value::Bool(true))?;
            w.add_kv(SYNTHETIC_SPARSITY_KEY, Value::F32(c.sparsity as f32))?;
            w.add_kv(
                "powerinfer.synthetic.hot_share",
                Value::F32(c.hot_share as f32),
            )?;
            w.add_kv(
                "powerinfer.synthetic.hot_mass",
                Value::F32(c.hot_mass as f32),
            )?;
            w.add_kv("powerinfer.synthetic.seed", Value::U64(c.seed))?;
        }
        w.add_kv("tokenizer.ggml.model", Value::from("llama"))?;
        w.add_kv(
            "tokenizer.ggml.tokens",
            Value::Array(Array::from(self.vocab.tokens.clone())),
        )?;
        w.add_kv(
            "tokenizer.ggml.scores",
            Value::Array(Array::from(self.vocab.scores.clone())),
        )?;
        w.add_kv(
            "tokenizer.ggml.token_type",
            Value::Array(Array::from(self.vocab.token_types.clone())),
        )?;
        w.add_kv("tokenizer.ggml.bos_token_id", Value::U32(Vocab::BOS))?;
        w.add_kv("tokenizer.ggml.eos_token_id", Value::U32(Vocab::EOS))?;
        w.add_kv("tokenizer.ggml.unknown_token_id", Value::U32(Vocab::UNK))?;
        if c.weight_type.is_quantized() || self.output_type.is_quantized() {
            w.add_kv("general.quantization_version", Value::U32(2))?;
        }
        for t in tensors {
            w.add_tensor_info(t.name.as_str(), t.ty, &t.shape)?;
        }
        Ok(w)
    }

    /// Size in bytes of the file a layout produces.
    pub fn file_size(&self, layout: Layout) -> Result<u64, SynthError> {
        let plan = self.plan(layout, false);
        Ok(self.header(layout, &plan)?.file_size())
    }

    /// Writes a layout to `out`, streaming; `progress` gets the bytes written so far after each
    /// write. Runs on the current rayon pool; the bytes do not depend on its size.
    pub fn write<W: Write>(
        &self,
        layout: Layout,
        out: W,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<W, SynthError> {
        let plan = self.plan(layout, true);
        let header = self.header(layout, &plan)?;
        let counting = Counting {
            inner: out,
            written: 0,
            progress,
        };
        let mut stream = header.begin(counting)?;
        for t in &plan {
            if matches!(t.source, RowSource::Ones) {
                let ones: Vec<u8> = std::iter::repeat_n(1f32.to_le_bytes(), t.cols() * t.rows())
                    .flatten()
                    .collect();
                stream.write_tensor_data(&t.name, &ones)?;
            } else {
                let mut reader = RowReader::new(t)?;
                let written = stream.write_tensor_from_reader(&t.name, &mut reader);
                if let Some(e) = reader.error.take() {
                    return Err(e);
                }
                written?;
            }
        }
        let counting = stream.finish()?;
        Ok(counting.inner)
    }

    /// Writes a layout to `path` (through `path.partial`, renamed when complete) and returns its
    /// size in bytes.
    pub fn write_file(
        &self,
        layout: Layout,
        path: impl AsRef<Path>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<u64, SynthError> {
        let path = path.as_ref();
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".partial");
        let tmp = PathBuf::from(tmp);
        let io_err = |p: &Path, source| SynthError::Io {
            path: p.to_path_buf(),
            source,
        };
        let file = std::fs::File::create(&tmp).map_err(|e| io_err(path, e))?;
        // The write system calls (the kernel's page-cache copy) run on their own thread, so
        // they overlap with generating the next chunk instead of stalling the rayon pool.
        let result = std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(2);
            let writer = scope.spawn(move || -> io::Result<std::fs::File> {
                let mut file = file;
                for buf in rx {
                    file.write_all(&buf)?;
                }
                Ok(file)
            });
            let out = ChannelWriter {
                tx,
                buf: Vec::with_capacity(WRITE_BUF),
            };
            let written = self.write(layout, out, progress);
            // Dropping the sender ends the writer thread's loop.
            let sent = written.and_then(|mut out| {
                out.send().map_err(|e| io_err(&tmp, e))?;
                Ok(())
            });
            let joined = writer
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the writer thread panicked")));
            // The writer thread's own error (disk full, ...) explains a failed send best.
            let file = joined.map_err(|e| io_err(&tmp, e))?;
            sent?;
            let size = file.metadata().map_err(|e| io_err(&tmp, e))?.len();
            drop(file);
            std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
            Ok(size)
        });
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

/// Runs `f` on a rayon pool of `threads` threads (0: one per CPU), e.g. around
/// [`Synth::write_file`]; the output does not depend on the count.
pub fn with_threads<R: Send>(
    threads: usize,
    f: impl FnOnce() -> R + Send,
) -> Result<R, SynthError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| SynthError::ThreadPool(e.to_string()))?;
    Ok(pool.install(f))
}

/// Bytes a [`ChannelWriter`] collects before handing them to the writer thread.
const WRITE_BUF: usize = 4 << 20;

/// Collects output into buffers and sends full ones to a writer thread.
struct ChannelWriter {
    tx: std::sync::mpsc::SyncSender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(WRITE_BUF));
        self.tx
            .send(full)
            .map_err(|_| io::Error::other("the writer thread stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= WRITE_BUF {
            self.send()?;
        }
        Ok(data.len())
    }

    /// Sends what is buffered (the file itself is flushed when the writer thread ends).
    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// Counts bytes on their way to the output and reports them.
struct Counting<'p, W> {
    inner: W,
    written: u64,
    progress: &'p (dyn Fn(u64) + Sync),
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.written += n as u64;
        (self.progress)(self.written);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Serves a tensor's bytes, generating and quantizing [`CHUNK_BYTES`] of rows at a time in
/// parallel.
struct RowReader<'a> {
    t: &'a TensorPlan,
    row_bytes: usize,
    rows_per_chunk: usize,
    next_row: usize,
    buf: Vec<u8>,
    pos: usize,
    error: Option<SynthError>,
}

impl<'a> RowReader<'a> {
    fn new(t: &'a TensorPlan) -> Result<Self, SynthError> {
        let row_bytes =
            powerinfer_quant::row_bytes(t.ty, t.cols()).ok_or(SynthError::UnsupportedType {
                ty: t.ty,
                what: "a tensor row",
                reason: format!("{} elements are not whole blocks", t.cols()),
            })?;
        Ok(RowReader {
            t,
            row_bytes,
            rows_per_chunk: (CHUNK_BYTES / row_bytes.max(1)).max(1),
            next_row: 0,
            buf: Vec::new(),
            pos: 0,
            error: None,
        })
    }

    fn fill(&mut self) -> Result<(), SynthError> {
        let n = self.rows_per_chunk.min(self.t.rows() - self.next_row);
        self.buf.clear();
        self.buf.resize(n * self.row_bytes, 0);
        let first = self.next_row;
        let cols = self.t.cols();
        let (ty, src) = (self.t.ty, &self.t.source);
        let min_rows = (65_536 / cols.max(1)).max(1);
        self.buf
            .par_chunks_mut(self.row_bytes)
            .enumerate()
            .with_min_len(min_rows)
            .try_for_each_init(
                || vec![0f32; cols],
                |scratch, (j, dst)| {
                    src.fill(first + j, scratch);
                    quantize_row(ty, scratch, dst)
                },
            )
            .map_err(|e| SynthError::UnsupportedType {
                ty,
                what: "quantization",
                reason: e.to_string(),
            })?;
        self.next_row += n;
        self.pos = 0;
        Ok(())
    }
}

impl Read for RowReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.next_row >= self.t.rows() {
                return Ok(0);
            }
            if let Err(e) = self.fill() {
                let msg = e.to_string();
                self.error = Some(e);
                return Err(io::Error::other(msg));
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
