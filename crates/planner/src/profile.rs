//! Activation profiles: per-layer, per-neuron activation counts.
//!
//! Two sources:
//!
//! * the format our profiler writes ([`read_profile`]): a safetensors file with one tensor
//!   `blk.{i}.ffn_counts` per layer (dtype I64, U64 or F32, shape `[n_ff]`); other tensors in
//!   the file are ignored;
//! * the reference PowerInfer's `activation/` directory ([`read_activation_dir`]): one
//!   `activation_{i}.pt` per layer, each a `torch.save` of one 1-D tensor of `n_ff` counts.
//!   This crate lists, orders and checks the files; reading a `.pt` is left to the caller
//!   (`powerinfer_convert::pt::read_tensor`), so the planner carries no pickle reader.
//!
//! Layers are ordered by their number (the reference sorts its `activation_{i}.pt` names as
//! text, which puts layer 10 before layer 2).

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

/// A profile that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid safetensors.
    #[error("{path}: not a safetensors file: {message}")]
    Safetensors {
        /// The path.
        path: String,
        /// What the parser said.
        message: String,
    },
    /// [`read_profile`] was given a directory: a reference activation directory is read by
    /// [`read_activation_dir`].
    #[error(
        "{path} is a directory, not a safetensors profile (a reference activation/ directory of activation_{{i}}.pt files is read by read_activation_dir)"
    )]
    IsDirectory {
        /// The path.
        path: String,
    },
    /// An activation directory holds no `activation_{i}.pt` file.
    #[error("{dir}: no activation_{{i}}.pt files (not a reference activation directory)")]
    NoActivationFiles {
        /// The directory.
        dir: String,
    },
    /// An entry of an activation directory that is not a layer file.
    #[error(
        "{dir}: stray entry {name:?} ({why}); an activation directory holds only activation_0.pt, activation_1.pt, ... (one per layer)"
    )]
    StrayFile {
        /// The directory.
        dir: String,
        /// The entry's name.
        name: String,
        /// Why it is not a layer file.
        why: String,
    },
    /// A layer between 0 and the highest one has no activation file.
    #[error("{dir}: activation_{layer}.pt is missing (the directory has layers up to {max_layer})")]
    MissingActivationLayer {
        /// The directory.
        dir: String,
        /// The missing layer.
        layer: usize,
        /// The highest layer present.
        max_layer: usize,
    },
    /// An activation directory with another number of layers than the model.
    #[error(
        "{dir}: activation files for {found} layers (activation_0.pt .. activation_{last}.pt), but the model has {expected} layers: the activations were made for another model",
        last = found.saturating_sub(1)
    )]
    ActivationLayerCount {
        /// The directory.
        dir: String,
        /// Layers in the model.
        expected: usize,
        /// Layer files in the directory.
        found: usize,
    },
    /// A layer file could not be read (the `.pt` reader's message).
    #[error("{path}: {message}")]
    ActivationRead {
        /// The file.
        path: String,
        /// What the reader said.
        message: String,
    },
    /// A layer file holds a tensor that is not one-dimensional.
    #[error("{path}: a tensor of shape {shape:?}, expected one dimension of n_ff counts")]
    ActivationShape {
        /// The file.
        path: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A layer file's length differs from the model's `n_ff`.
    #[error(
        "{path}: {found} counts, but layer {layer} of the model has n_ff = {expected}: the activations were made for another model"
    )]
    ActivationLength {
        /// The file.
        path: String,
        /// Layer.
        layer: usize,
        /// The model's `n_ff`.
        expected: usize,
        /// Counts in the file.
        found: usize,
    },
    /// No `blk.{i}.ffn_counts` tensor at all.
    #[error("{path}: no blk.{{i}}.ffn_counts tensors")]
    Empty {
        /// The path.
        path: String,
    },
    /// A layer between 0 and the highest one has no counts.
    #[error("{path}: blk.{layer}.ffn_counts is missing (the file has layers up to {max_layer})")]
    MissingLayer {
        /// The path.
        path: String,
        /// The missing layer.
        layer: usize,
        /// The highest layer present.
        max_layer: usize,
    },
    /// A counts tensor of an unsupported dtype or shape.
    #[error(
        "{path}: {tensor} is {dtype} with shape {shape:?}, expected a one-dimensional I64, U64 or F32 tensor"
    )]
    BadTensor {
        /// The path.
        path: String,
        /// Tensor name.
        tensor: String,
        /// Its dtype.
        dtype: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A count that is negative, not finite or not a whole number.
    #[error("{path}: {tensor}[{index}] = {value} is not a count (a non-negative whole number)")]
    BadCount {
        /// The path.
        path: String,
        /// Tensor name.
        tensor: String,
        /// Position.
        index: usize,
        /// The value, as text.
        value: String,
    },
    /// The profile was made for another model.
    #[error("profile has {found} layers, the model has {expected}")]
    LayerCount {
        /// Layers in the model.
        expected: usize,
        /// Layers in the profile.
        found: usize,
    },
    /// A layer's neuron count differs from the model's.
    #[error("profile layer {layer} has {found} neurons, the model's layer has n_ff = {expected}")]
    NeuronCount {
        /// Layer.
        layer: usize,
        /// The model's `n_ff`.
        expected: usize,
        /// The profile's.
        found: usize,
    },
}

/// Parses `blk.{i}.ffn_counts` into `i`.
fn counts_layer(name: &str) -> Option<usize> {
    let n = name.strip_prefix("blk.")?.strip_suffix(".ffn_counts")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Reads a profile: a safetensors file (see the module docs). A directory gives
/// [`ProfileError::IsDirectory`] (read a reference activation directory with
/// [`read_activation_dir`]).
pub fn read_profile(path: impl AsRef<Path>) -> Result<Vec<Vec<u64>>, ProfileError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    if path.is_dir() {
        return Err(ProfileError::IsDirectory { path: shown });
    }
    let bytes = std::fs::read(path).map_err(|source| ProfileError::Io {
        path: shown.clone(),
        source,
    })?;
    parse_profile(&bytes, &shown)
}

/// Parses a safetensors profile held in memory; `path` only names it in errors.
pub fn parse_profile(bytes: &[u8], path: &str) -> Result<Vec<Vec<u64>>, ProfileError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| ProfileError::Safetensors {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let mut found: Vec<(usize, String)> = st
        .names()
        .into_iter()
        .filter_map(|n| counts_layer(n).map(|l| (l, n.to_owned())))
        .collect();
    found.sort();
    let Some(&(max_layer, _)) = found.last() else {
        return Err(ProfileError::Empty {
            path: path.to_owned(),
        });
    };
    let mut layers = Vec::with_capacity(found.len());
    for (expect, (layer, name)) in found.iter().enumerate() {
        if *layer != expect {
            // Sorted and distinct, so the first gap is at `expect`.
            return Err(ProfileError::MissingLayer {
                path: path.to_owned(),
                layer: expect,
                max_layer,
            });
        }
        let view = st.tensor(name).map_err(|e| ProfileError::Safetensors {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let bad_tensor = || ProfileError::BadTensor {
            path: path.to_owned(),
            tensor: name.clone(),
            dtype: format!("{:?}", view.dtype()),
            shape: view.shape().to_vec(),
        };
        if view.shape().len() != 1 {
            return Err(bad_tensor());
        }
        let data = view.data();
        let bad_count = |index: usize, value: String| ProfileError::BadCount {
            path: path.to_owned(),
            tensor: name.clone(),
            index,
            value,
        };
        let counts: Vec<u64> = match view.dtype() {
            Dtype::U64 => data
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I64 => data
                .chunks_exact(8)
                .enumerate()
                .map(|(i, c)| {
                    let v = i64::from_le_bytes(c.try_into().expect("8 bytes"));
                    u64::try_from(v).map_err(|_| bad_count(i, v.to_string()))
                })
                .collect::<Result<_, _>>()?,
            Dtype::F32 => data
                .chunks_exact(4)
                .enumerate()
                .map(|(i, c)| {
                    let v = f32::from_le_bytes(c.try_into().expect("4 bytes"));
                    float_count(f64::from(v)).ok_or_else(|| bad_count(i, v.to_string()))
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad_tensor()),
        };
        layers.push(counts);
    }
    Ok(layers)
}

/// A floating-point count as a whole number: `None` unless finite, non-negative, whole and
/// below 2^64 (the cast is then exact).
fn float_count(v: f64) -> Option<u64> {
    (v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 18_446_744_073_709_551_616.0)
        .then_some(v as u64)
}

/// The numbers of one layer's activation tensor, as a `.pt` reader decodes them.
#[derive(Debug, Clone, PartialEq)]
pub enum ActivationValues {
    /// Integer storages (int64, int32, int16, int8, uint8, bool).
    Int(Vec<i64>),
    /// Floating-point storages (float64, float32, float16, bfloat16), widened exactly.
    Float(Vec<f64>),
}

impl ActivationValues {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            ActivationValues::Int(v) => v.len(),
            ActivationValues::Float(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One layer's activation tensor: what the loader given to [`read_activation_dir`] returns.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivationTensor {
    /// The tensor's shape (must be `[n_ff]`).
    pub shape: Vec<usize>,
    /// Its elements, row-major.
    pub values: ActivationValues,
}

/// The file name of layer `layer` in a reference activation directory: `activation_{layer}.pt`.
pub fn activation_file_name(layer: usize) -> String {
    format!("activation_{layer}.pt")
}

/// Parses `activation_{i}.pt` (decimal `i` without leading zeros) into `i`.
fn activation_layer(name: &str) -> Option<usize> {
    let n = name.strip_prefix("activation_")?.strip_suffix(".pt")?;
    let canonical =
        !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && (n == "0" || !n.starts_with('0'));
    if canonical { n.parse().ok() } else { None }
}

/// Lists a reference activation directory: the paths of `activation_0.pt` ..
/// `activation_{n-1}.pt`, in layer order (numeric, not the reference's text order).
///
/// Entries whose name starts with `.` are skipped (`.DS_Store`, `.cache`); any other entry
/// that is not a regular file named `activation_{i}.pt` is [`ProfileError::StrayFile`]
/// (`activation_01.pt`, `activation_1.pt.bak`, `README.md`, a subdirectory). A gap in the
/// numbering is [`ProfileError::MissingActivationLayer`], none at all
/// [`ProfileError::NoActivationFiles`].
pub fn activation_files(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>, ProfileError> {
    let dir = dir.as_ref();
    let shown = dir.display().to_string();
    let io = |source| ProfileError::Io {
        path: shown.clone(),
        source,
    };
    let mut layers: Vec<(usize, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let raw = entry.file_name();
        let stray = |why: &str| ProfileError::StrayFile {
            dir: shown.clone(),
            name: raw.to_string_lossy().into_owned(),
            why: why.to_owned(),
        };
        let Some(name) = raw.to_str() else {
            return Err(stray("not a UTF-8 name"));
        };
        if name.starts_with('.') {
            continue;
        }
        let Some(layer) = activation_layer(name) else {
            return Err(stray("not named activation_{i}.pt"));
        };
        // Follows symbolic links: a linked file is fine.
        let path = entry.path();
        if !path.is_file() {
            return Err(stray("not a regular file"));
        }
        layers.push((layer, path));
    }
    layers.sort();
    let Some(&(max_layer, _)) = layers.last() else {
        return Err(ProfileError::NoActivationFiles { dir: shown });
    };
    for (expect, &(layer, _)) in layers.iter().enumerate() {
        if layer != expect {
            // Sorted and distinct (canonical names), so the first gap is at `expect`.
            return Err(ProfileError::MissingActivationLayer {
                dir: shown,
                layer: expect,
                max_layer,
            });
        }
    }
    Ok(layers.into_iter().map(|(_, p)| p).collect())
}

/// Checks one layer's activation values and returns them as counts: every value must be a
/// non-negative whole number (floats: finite too), else [`ProfileError::BadCount`] naming
/// the file (`path`) and the first bad position.
pub fn activation_counts(path: &str, values: &ActivationValues) -> Result<Vec<u64>, ProfileError> {
    let bad = |index: usize, value: String| ProfileError::BadCount {
        path: path.to_owned(),
        tensor: "activation".to_owned(),
        index,
        value,
    };
    match values {
        ActivationValues::Int(v) => v
            .iter()
            .enumerate()
            .map(|(i, &x)| u64::try_from(x).map_err(|_| bad(i, x.to_string())))
            .collect(),
        ActivationValues::Float(v) => v
            .iter()
            .enumerate()
            .map(|(i, &x)| float_count(x).ok_or_else(|| bad(i, x.to_string())))
            .collect(),
    }
}

/// Reads the reference PowerInfer's activation directory (`activation_{i}.pt` per layer, see
/// [`activation_files`]) into per-layer counts, in layer order.
///
/// `load(layer, path)` reads one file (e.g. with `powerinfer_convert::pt::read_tensor`) and
/// returns its shape and values, or a message that becomes [`ProfileError::ActivationRead`].
/// Each tensor must be one-dimensional ([`ProfileError::ActivationShape`]) and hold counts
/// ([`activation_counts`]). With `n_ff` (the model's per-layer FFN widths) the number of
/// layer files must equal the model's layers ([`ProfileError::ActivationLayerCount`],
/// checked before any file is read) and each file's length its layer's `n_ff`
/// ([`ProfileError::ActivationLength`]).
pub fn read_activation_dir(
    dir: impl AsRef<Path>,
    n_ff: Option<&[usize]>,
    load: &mut dyn FnMut(usize, &Path) -> Result<ActivationTensor, String>,
) -> Result<Vec<Vec<u64>>, ProfileError> {
    let dir = dir.as_ref();
    let files = activation_files(dir)?;
    if let Some(n_ff) = n_ff
        && n_ff.len() != files.len()
    {
        return Err(ProfileError::ActivationLayerCount {
            dir: dir.display().to_string(),
            expected: n_ff.len(),
            found: files.len(),
        });
    }
    let mut layers = Vec::with_capacity(files.len());
    for (layer, path) in files.iter().enumerate() {
        let shown = path.display().to_string();
        let t = load(layer, path).map_err(|message| ProfileError::ActivationRead {
            path: shown.clone(),
            message,
        })?;
        let product = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if t.shape.len() != 1 || product != Some(t.values.len()) {
            return Err(ProfileError::ActivationShape {
                path: shown,
                shape: t.shape,
            });
        }
        if let Some(&expected) = n_ff.and_then(|n| n.get(layer))
            && expected != t.values.len()
        {
            return Err(ProfileError::ActivationLength {
                path: shown,
                layer,
                expected,
                found: t.values.len(),
            });
        }
        layers.push(activation_counts(&shown, &t.values)?);
    }
    Ok(layers)
}

/// Writes a profile as safetensors with U64 `blk.{i}.ffn_counts` tensors.
pub fn write_profile(path: impl AsRef<Path>, counts: &[Vec<u64>]) -> Result<(), ProfileError> {
    let path = path.as_ref();
    let bytes = profile_bytes(counts);
    std::fs::write(path, bytes).map_err(|source| ProfileError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// A profile as a safetensors image with U64 `blk.{i}.ffn_counts` tensors.
pub fn profile_bytes(counts: &[Vec<u64>]) -> Vec<u8> {
    let data: Vec<Vec<u8>> = counts
        .iter()
        .map(|c| c.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .zip(counts)
        .enumerate()
        .map(|(i, (d, c))| {
            let view = safetensors::tensor::TensorView::new(Dtype::U64, vec![c.len()], d)
                .expect("U64 data of exactly len * 8 bytes");
            (format!("blk.{i}.ffn_counts"), view)
        })
        .collect();
    safetensors::serialize(views, None).expect("serializing in-memory U64 tensors")
}

/// Checks that a profile matches a model's layers: the same number of layers and the same
/// `n_ff` in each.
pub fn check_profile(counts: &[Vec<u64>], n_ff: &[usize]) -> Result<(), ProfileError> {
    if counts.len() != n_ff.len() {
        return Err(ProfileError::LayerCount {
            expected: n_ff.len(),
            found: counts.len(),
        });
    }
    for (layer, (c, &n)) in counts.iter().zip(n_ff).enumerate() {
        if c.len() != n {
            return Err(ProfileError::NeuronCount {
                layer,
                expected: n,
                found: c.len(),
            });
        }
    }
    Ok(())
}

/// Counts of 1 for every neuron (`--uniform`): the plan then maximises the number of GPU
/// neurons.
pub fn uniform_counts(n_ff: &[usize]) -> Vec<Vec<u64>> {
    n_ff.iter().map(|&n| vec![1; n]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_names() {
        assert_eq!(activation_layer("activation_0.pt"), Some(0));
        assert_eq!(activation_layer("activation_31.pt"), Some(31));
        assert_eq!(activation_layer("activation_01.pt"), None);
        assert_eq!(activation_layer("activation_.pt"), None);
        assert_eq!(activation_layer("activation_-1.pt"), None);
        assert_eq!(activation_layer("activation_1.pt.bak"), None);
        assert_eq!(activation_layer("activation_1.safetensors"), None);
        assert_eq!(activation_layer("model_1.pt"), None);
        assert_eq!(
            activation_layer("activation_99999999999999999999999.pt"),
            None
        );
        assert_eq!(activation_file_name(12), "activation_12.pt");
    }

    #[test]
    fn float_counts() {
        assert_eq!(float_count(0.0), Some(0));
        assert_eq!(float_count(-0.0), Some(0));
        assert_eq!(float_count(16_777_217.0), Some(16_777_217));
        assert_eq!(float_count(1.5), None);
        assert_eq!(float_count(-1.0), None);
        assert_eq!(float_count(f64::NAN), None);
        assert_eq!(float_count(f64::INFINITY), None);
        assert_eq!(float_count(18_446_744_073_709_551_616.0), None);
    }

    #[test]
    fn layer_names() {
        assert_eq!(counts_layer("blk.12.ffn_counts"), Some(12));
        assert_eq!(counts_layer("blk..ffn_counts"), None);
        assert_eq!(counts_layer("blk.+1.ffn_counts"), None);
        assert_eq!(counts_layer("blk.1.ffn_count"), None);
    }
}
