//! Activation profiles: per-layer, per-neuron activation counts.
//!
//! The format our profiler writes is a safetensors file with one tensor `blk.{i}.ffn_counts`
//! per layer (dtype I64, U64 or F32, shape `[n_ff]`); other tensors in the file are ignored.
//! Layers are ordered by their number (the reference sorts its `activation_{i}.pt` names as
//! text, which puts layer 10 before layer 2).

use std::path::Path;

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
    /// A directory was given: the reference's `activation_{i}.pt` files are not read by this
    /// build.
    #[error(
        "{path} is a directory: reading the reference's activation/activation_{{i}}.pt files is not supported yet; convert them to a safetensors profile with blk.{{i}}.ffn_counts tensors"
    )]
    PtUnsupported {
        /// The path.
        path: String,
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

/// Reads a profile: a safetensors file (see the module docs). A directory (the reference's
/// `.pt` files) gives [`ProfileError::PtUnsupported`].
pub fn read_profile(path: impl AsRef<Path>) -> Result<Vec<Vec<u64>>, ProfileError> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    if path.is_dir() {
        return Err(ProfileError::PtUnsupported { path: shown });
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
                    if v.is_finite() && v >= 0.0 && v.fract() == 0.0 {
                        // Whole, non-negative and below 2^128: the cast is exact up to u64.
                        if v < 18_446_744_073_709_551_616.0 {
                            return Ok(v as u64);
                        }
                    }
                    Err(bad_count(i, v.to_string()))
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad_tensor()),
        };
        layers.push(counts);
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
    fn layer_names() {
        assert_eq!(counts_layer("blk.12.ffn_counts"), Some(12));
        assert_eq!(counts_layer("blk..ffn_counts"), None);
        assert_eq!(counts_layer("blk.+1.ffn_counts"), None);
        assert_eq!(counts_layer("blk.1.ffn_count"), None);
    }
}
