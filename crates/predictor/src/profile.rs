//! Activation profiles: per-neuron activity counts and sampled predictor training pairs, stored
//! as a safetensors file.
//!
//! Per layer `i` the file holds
//!
//! | tensor | dtype | shape | meaning |
//! |---|---|---|---|
//! | `blk.{i}.ffn_counts` | I64 | `[n_ff]` | tokens in which the neuron was active |
//! | `blk.{i}.threshold` | F32 | `[1]` | the activity threshold `t`: active iff `\|h\| > t` (0 with the `nonzero` rule) |
//! | `blk.{i}.x` | BF16 | `[S, n_embd]` | sampled predictor inputs (the FFN input, before its norm; bfloat16 because residual streams such as Gemma 3's exceed f16's range; F16 is read too) |
//! | `blk.{i}.active` | U8 | `[S, ceil(n_ff/8)]` | the sampled tokens' activity, neuron `j` in byte `j/8`, bit `j%8` (least significant first) |
//!
//! and string metadata: `format` (`powerinfer-profile`), `version` (`1`), the model identity
//! (`architecture`, `model_name`, `n_layer`, `n_embd`, `n_ff`, `fingerprint`), `n_tokens` (tokens
//! counted), `sparsity_target`, `activity_rule` (`nonzero` or `magnitude`) and
//! `ffn_activation` (`relu`, `silu`, `gelu`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::bf16;
use powerinfer_gguf::{GgufFile, MetadataError};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// The `format` metadata value of a profile.
pub const PROFILE_FORMAT: &str = "powerinfer-profile";
/// The `version` metadata value this crate writes and reads.
pub const PROFILE_VERSION: &str = "1";

/// Errors of reading, writing or matching a profile.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The safetensors container is malformed.
    #[error("not a valid safetensors profile: {0}")]
    Safetensors(String),
    /// A metadata key is missing.
    #[error("profile metadata key {0:?} is missing (not a powerinfer profile?)")]
    MissingKey(&'static str),
    /// A metadata value cannot be parsed.
    #[error("profile metadata key {key:?} has the invalid value {value:?}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value found.
        value: String,
    },
    /// A tensor is missing, of the wrong dtype or shape.
    #[error("profile tensor {name:?}: {reason}")]
    BadTensor {
        /// The tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The profile was made from another model.
    #[error(
        "the profile was made from another model: {field} is {profile:?} in the profile but {model:?} in the model"
    )]
    ModelMismatch {
        /// The identity field that differs.
        field: &'static str,
        /// The profile's value.
        profile: String,
        /// The model's value.
        model: String,
    },
    /// The model file lacks a key needed for its identity.
    #[error("model metadata: {0}")]
    Metadata(#[from] MetadataError),
    /// The model file has no `general.architecture`.
    #[error("the model file has no general.architecture key")]
    NoArchitecture,
    /// Inconsistent in-memory profile (sizes that do not fit together).
    #[error("invalid profile: {0}")]
    Invalid(String),
}

/// When a neuron counts as active for a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivityRule {
    /// `h != 0` (ReLU FFNs: exactly the neurons a sparse engine may skip losslessly).
    NonZero,
    /// `|h| > t_layer`, with the per-layer threshold calibrated to the target sparsity
    /// (SwiGLU / GeGLU FFNs).
    Magnitude,
}

impl ActivityRule {
    /// The metadata spelling (`nonzero`, `magnitude`).
    pub fn name(self) -> &'static str {
        match self {
            ActivityRule::NonZero => "nonzero",
            ActivityRule::Magnitude => "magnitude",
        }
    }

    /// Parses [`name`](Self::name)'s spelling.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "nonzero" => Some(ActivityRule::NonZero),
            "magnitude" => Some(ActivityRule::Magnitude),
            _ => None,
        }
    }

    /// Whether the value `h` counts as active under threshold `t`.
    #[inline]
    pub fn is_active(self, h: f32, t: f32) -> bool {
        match self {
            ActivityRule::NonZero => h != 0.0,
            ActivityRule::Magnitude => h.abs() > t,
        }
    }
}

/// What a profile was made from, so that a profile of another model is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelIdentity {
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name` (empty when absent).
    pub name: String,
    /// Layers.
    pub n_layer: usize,
    /// Embedding width (predictor input size).
    pub n_embd: usize,
    /// FFN width (neurons per layer).
    pub n_ff: usize,
    /// 16 hex digits: FNV-1a over the architecture, sizes, the names, types and shapes of
    /// `token_embd.weight` and every `blk.N.ffn_gate/ffn_up.weight`, and the first bytes of
    /// their data (tensors that a PWRI conversion keeps unchanged).
    pub fingerprint: String,
}

struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
}

impl ModelIdentity {
    /// The identity of a model file (GGUF or PWRI): sizes from `{arch}.block_count`,
    /// `{arch}.embedding_length` and `{arch}.feed_forward_length`.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ProfileError> {
        let architecture = file
            .architecture()
            .ok_or(ProfileError::NoArchitecture)?
            .to_owned();
        let name = file.get_str("general.name").unwrap_or("").to_owned();
        let n_layer = file.get_arch_u64("block_count")? as usize;
        let n_embd = file.get_arch_u64("embedding_length")? as usize;
        let n_ff = file.get_arch_u64("feed_forward_length")? as usize;
        let mut h = Fnv::new();
        h.bytes(architecture.as_bytes());
        h.u64(n_layer as u64);
        h.u64(n_embd as u64);
        h.u64(n_ff as u64);
        let mut names = vec!["token_embd.weight".to_owned()];
        for i in 0..n_layer {
            names.push(format!("blk.{i}.ffn_gate.weight"));
            names.push(format!("blk.{i}.ffn_up.weight"));
        }
        for n in &names {
            if let Some(t) = file.tensor(n) {
                h.bytes(n.as_bytes());
                h.u64(u64::from(t.ty.gguf_id()));
                for &d in &t.shape {
                    h.u64(d);
                }
                let data = file.tensor_data(t);
                let take = if n == "token_embd.weight" {
                    65536
                } else {
                    4096
                };
                h.bytes(&data[..data.len().min(take)]);
            }
        }
        Ok(Self {
            architecture,
            name,
            n_layer,
            n_embd,
            n_ff,
            fingerprint: format!("{:016x}", h.0),
        })
    }

    /// `Ok` if `model` (the model at hand) is the model this identity (a profile's) describes,
    /// else [`ProfileError::ModelMismatch`] naming the first field that differs.
    pub fn check(&self, model: &ModelIdentity) -> Result<(), ProfileError> {
        let fields: [(&'static str, String, String); 5] = [
            (
                "architecture",
                self.architecture.clone(),
                model.architecture.clone(),
            ),
            (
                "n_layer",
                self.n_layer.to_string(),
                model.n_layer.to_string(),
            ),
            ("n_embd", self.n_embd.to_string(), model.n_embd.to_string()),
            ("n_ff", self.n_ff.to_string(), model.n_ff.to_string()),
            (
                "fingerprint",
                self.fingerprint.clone(),
                model.fingerprint.clone(),
            ),
        ];
        for (field, profile, model) in fields {
            if profile != model {
                return Err(ProfileError::ModelMismatch {
                    field,
                    profile,
                    model,
                });
            }
        }
        Ok(())
    }
}

/// Bytes of one token's activity bit mask: `ceil(n_ff / 8)`.
pub fn mask_bytes(n_ff: usize) -> usize {
    n_ff.div_ceil(8)
}

/// One layer of a [`Profile`].
#[derive(Debug, Clone, PartialEq)]
pub struct LayerProfile {
    /// Per neuron: tokens in which it was active (`n_ff`).
    pub counts: Vec<i64>,
    /// The activity threshold (0 for [`ActivityRule::NonZero`]).
    pub threshold: f32,
    /// Sampled predictor inputs, `n_samples x n_embd` row-major (bfloat16: the residual stream
    /// can exceed f16's range).
    pub x: Vec<bf16>,
    /// Sampled activity masks, `n_samples x mask_bytes(n_ff)` (see [`mask_bytes`]).
    pub active: Vec<u8>,
}

impl LayerProfile {
    /// An empty layer with `n_ff` zero counts.
    pub fn new(n_ff: usize, threshold: f32) -> Self {
        Self {
            counts: vec![0; n_ff],
            threshold,
            x: Vec::new(),
            active: Vec::new(),
        }
    }

    /// Sampled tokens (rows of `x` and `active`), given the model's `n_embd`.
    pub fn n_samples(&self, n_embd: usize) -> usize {
        self.x.len().checked_div(n_embd).unwrap_or(0)
    }

    /// Whether neuron `j` was active in sample `s`.
    pub fn is_active(&self, n_ff: usize, s: usize, j: usize) -> bool {
        self.active[s * mask_bytes(n_ff) + j / 8] >> (j % 8) & 1 == 1
    }
}

/// A model's activation profile (see the module docs for the file layout).
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The model it was made from.
    pub identity: ModelIdentity,
    /// Tokens counted into `counts` (calibration tokens excluded).
    pub n_tokens: u64,
    /// Target sparsity of the activity thresholds (fraction of inactive neurons).
    pub sparsity_target: f32,
    /// What "active" means.
    pub rule: ActivityRule,
    /// The FFN's gate activation: `relu`, `silu` or `gelu`.
    pub ffn_activation: String,
    /// One entry per layer.
    pub layers: Vec<LayerProfile>,
}

fn meta<'a>(m: &'a HashMap<String, String>, key: &'static str) -> Result<&'a str, ProfileError> {
    m.get(key)
        .map(String::as_str)
        .ok_or(ProfileError::MissingKey(key))
}

fn meta_parse<T: std::str::FromStr>(
    m: &HashMap<String, String>,
    key: &'static str,
) -> Result<T, ProfileError> {
    let v = meta(m, key)?;
    v.parse().map_err(|_| ProfileError::BadValue {
        key,
        value: v.to_owned(),
    })
}

fn st_err(e: safetensors::SafeTensorError) -> ProfileError {
    ProfileError::Safetensors(e.to_string())
}

fn get_tensor<'a>(
    st: &SafeTensors<'a>,
    name: &str,
    dtype: Dtype,
    cols: Option<usize>,
) -> Result<TensorView<'a>, ProfileError> {
    let t = st.tensor(name).map_err(|_| ProfileError::BadTensor {
        name: name.to_owned(),
        reason: "missing".into(),
    })?;
    if t.dtype() != dtype {
        return Err(ProfileError::BadTensor {
            name: name.to_owned(),
            reason: format!("dtype {:?}, expected {dtype:?}", t.dtype()),
        });
    }
    if let Some(c) = cols {
        let ok = t.shape().len() == 2 && t.shape()[1] == c;
        if !ok {
            return Err(ProfileError::BadTensor {
                name: name.to_owned(),
                reason: format!("shape {:?}, expected [S, {c}]", t.shape()),
            });
        }
    }
    Ok(t)
}

impl Profile {
    /// Checks that every layer's sizes agree with the identity.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let id = &self.identity;
        if self.layers.len() != id.n_layer {
            return Err(ProfileError::Invalid(format!(
                "{} layers, identity says {}",
                self.layers.len(),
                id.n_layer
            )));
        }
        for (i, l) in self.layers.iter().enumerate() {
            if l.counts.len() != id.n_ff {
                return Err(ProfileError::Invalid(format!(
                    "layer {i}: {} counts for n_ff {}",
                    l.counts.len(),
                    id.n_ff
                )));
            }
            if id.n_embd == 0 || !l.x.len().is_multiple_of(id.n_embd) {
                return Err(ProfileError::Invalid(format!(
                    "layer {i}: {} input values are not rows of n_embd {}",
                    l.x.len(),
                    id.n_embd
                )));
            }
            let s = l.x.len() / id.n_embd;
            if l.active.len() != s * mask_bytes(id.n_ff) {
                return Err(ProfileError::Invalid(format!(
                    "layer {i}: {} mask bytes for {s} samples of {} neurons",
                    l.active.len(),
                    id.n_ff
                )));
            }
        }
        Ok(())
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, ProfileError> {
        self.validate()?;
        let id = &self.identity;
        let mut info = HashMap::new();
        for (k, v) in [
            ("format", PROFILE_FORMAT.to_owned()),
            ("version", PROFILE_VERSION.to_owned()),
            ("architecture", id.architecture.clone()),
            ("model_name", id.name.clone()),
            ("n_layer", id.n_layer.to_string()),
            ("n_embd", id.n_embd.to_string()),
            ("n_ff", id.n_ff.to_string()),
            ("fingerprint", id.fingerprint.clone()),
            ("n_tokens", self.n_tokens.to_string()),
            ("sparsity_target", self.sparsity_target.to_string()),
            ("activity_rule", self.rule.name().to_owned()),
            ("ffn_activation", self.ffn_activation.clone()),
        ] {
            info.insert(k.to_owned(), v);
        }
        // owned byte buffers first, views over them second
        let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let s = l.n_samples(id.n_embd);
            bufs.push((
                format!("blk.{i}.ffn_counts"),
                Dtype::I64,
                vec![id.n_ff],
                l.counts.iter().flat_map(|c| c.to_le_bytes()).collect(),
            ));
            bufs.push((
                format!("blk.{i}.threshold"),
                Dtype::F32,
                vec![1],
                l.threshold.to_le_bytes().to_vec(),
            ));
            bufs.push((
                format!("blk.{i}.x"),
                Dtype::BF16,
                vec![s, id.n_embd],
                l.x.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
            ));
            bufs.push((
                format!("blk.{i}.active"),
                Dtype::U8,
                vec![s, mask_bytes(id.n_ff)],
                l.active.clone(),
            ));
        }
        let mut views = Vec::with_capacity(bufs.len());
        for (name, dt, shape, data) in &bufs {
            views.push((
                name.clone(),
                TensorView::new(*dt, shape.clone(), data).map_err(st_err)?,
            ));
        }
        safetensors::tensor::serialize(views, Some(info)).map_err(st_err)
    }

    /// Writes the profile to `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), ProfileError> {
        let bytes = self.to_bytes()?;
        let path = path.as_ref();
        std::fs::write(path, bytes).map_err(|source| ProfileError::Io {
            path: path.to_owned(),
            source,
        })
    }

    /// Reads a profile from `path`, samples included.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ProfileError> {
        Self::load_impl(path.as_ref(), true)
    }

    /// Reads only the counts and thresholds (empty samples): what a placement planner needs.
    pub fn load_counts(path: impl AsRef<Path>) -> Result<Self, ProfileError> {
        Self::load_impl(path.as_ref(), false)
    }

    fn load_impl(path: &Path, samples: bool) -> Result<Self, ProfileError> {
        let bytes = std::fs::read(path).map_err(|source| ProfileError::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes_impl(&bytes, samples)
    }

    /// Parses a profile from its bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProfileError> {
        Self::from_bytes_impl(bytes, true)
    }

    fn from_bytes_impl(bytes: &[u8], samples: bool) -> Result<Self, ProfileError> {
        let (_, md) = SafeTensors::read_metadata(bytes).map_err(st_err)?;
        let m = md
            .metadata()
            .clone()
            .ok_or(ProfileError::MissingKey("format"))?;
        let format = meta(&m, "format")?;
        if format != PROFILE_FORMAT {
            return Err(ProfileError::BadValue {
                key: "format",
                value: format.to_owned(),
            });
        }
        let version = meta(&m, "version")?;
        if version != PROFILE_VERSION {
            return Err(ProfileError::BadValue {
                key: "version",
                value: version.to_owned(),
            });
        }
        let identity = ModelIdentity {
            architecture: meta(&m, "architecture")?.to_owned(),
            name: meta(&m, "model_name")?.to_owned(),
            n_layer: meta_parse(&m, "n_layer")?,
            n_embd: meta_parse(&m, "n_embd")?,
            n_ff: meta_parse(&m, "n_ff")?,
            fingerprint: meta(&m, "fingerprint")?.to_owned(),
        };
        if identity.n_embd == 0 || identity.n_ff == 0 {
            return Err(ProfileError::BadValue {
                key: "n_embd",
                value: format!("n_embd {} n_ff {}", identity.n_embd, identity.n_ff),
            });
        }
        let rule_s = meta(&m, "activity_rule")?;
        let rule = ActivityRule::from_name(rule_s).ok_or_else(|| ProfileError::BadValue {
            key: "activity_rule",
            value: rule_s.to_owned(),
        })?;
        let sparsity_target: f32 = meta_parse(&m, "sparsity_target")?;
        let n_tokens: u64 = meta_parse(&m, "n_tokens")?;
        let ffn_activation = meta(&m, "ffn_activation")?.to_owned();
        let st = SafeTensors::deserialize(bytes).map_err(st_err)?;
        let (n_embd, n_ff) = (identity.n_embd, identity.n_ff);
        let mut layers = Vec::with_capacity(identity.n_layer.min(1 << 16));
        for i in 0..identity.n_layer {
            let name = format!("blk.{i}.ffn_counts");
            let c = get_tensor(&st, &name, Dtype::I64, None)?;
            if c.shape() != [n_ff] {
                return Err(ProfileError::BadTensor {
                    name,
                    reason: format!("shape {:?}, expected [{n_ff}]", c.shape()),
                });
            }
            let counts = c
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            let name = format!("blk.{i}.threshold");
            let t = get_tensor(&st, &name, Dtype::F32, None)?;
            if t.shape() != [1] {
                return Err(ProfileError::BadTensor {
                    name,
                    reason: format!("shape {:?}, expected [1]", t.shape()),
                });
            }
            let threshold = f32::from_le_bytes(t.data()[..4].try_into().expect("4 bytes"));
            let (mut x, mut active) = (Vec::new(), Vec::new());
            let xn = format!("blk.{i}.x");
            let an = format!("blk.{i}.active");
            // BF16 (written since the residual streams of some models overflow f16), or F16
            // (profiles written before).
            let x_f16 = st.tensor(&xn).is_ok_and(|t| t.dtype() == Dtype::F16);
            let xt = get_tensor(
                &st,
                &xn,
                if x_f16 { Dtype::F16 } else { Dtype::BF16 },
                Some(n_embd),
            )?;
            let at = get_tensor(&st, &an, Dtype::U8, Some(mask_bytes(n_ff)))?;
            if xt.shape()[0] != at.shape()[0] {
                return Err(ProfileError::BadTensor {
                    name: an,
                    reason: format!("{} rows but {xn} has {}", at.shape()[0], xt.shape()[0]),
                });
            }
            if samples {
                x = xt
                    .data()
                    .chunks_exact(2)
                    .map(|b| {
                        let bits = u16::from_le_bytes([b[0], b[1]]);
                        if x_f16 {
                            bf16::from_f32(half::f16::from_bits(bits).to_f32())
                        } else {
                            bf16::from_bits(bits)
                        }
                    })
                    .collect();
                active = at.data().to_vec();
            }
            layers.push(LayerProfile {
                counts,
                threshold,
                x,
                active,
            });
        }
        Ok(Self {
            identity,
            n_tokens,
            sparsity_target,
            rule,
            ffn_activation,
            layers,
        })
    }
}
