//! PowerInfer GPU placement files (`<model>.generated.gpuidx`).
//!
//! A `PWRI` file with `general.architecture = "generic.gpu_index"`, the keys
//! `generic.gpu_index.block_count` (u32) and `split.vram_capacity` (u64), and per layer `N` the
//! tensors `blk.N.gpu_idx` (I32 `[n_ff]`, 1 = the neuron lives on the GPU) and
//! `blk.N.gpu_bucket` (I32 `[k]`, the GPU neurons' ids in ascending order), in exactly that
//! order.

use std::path::Path;

use crate::error::{GgufError, MetadataError, WriteError};
use crate::reader::GgufFile;
use crate::types::{GgmlType, Magic};
use crate::value::Value;
use crate::writer::GgufWriter;

/// `general.architecture` of a placement file.
pub const GPU_INDEX_ARCH: &str = "generic.gpu_index";
/// Key holding the number of layers.
pub const BLOCK_COUNT_KEY: &str = "generic.gpu_index.block_count";
/// Key holding the VRAM budget (bytes) the placement was made for.
pub const VRAM_CAPACITY_KEY: &str = "split.vram_capacity";

/// Something wrong with a placement file or a [`GpuIndex`].
#[derive(Debug, thiserror::Error)]
pub enum GpuIndexError {
    /// The file does not parse as GGUF.
    #[error("gpu index file: {0}")]
    Gguf(#[from] GgufError),
    /// A required key is missing or mistyped.
    #[error("gpu index file: {0}")]
    Metadata(#[from] MetadataError),
    /// Writing failed.
    #[error("gpu index file: {0}")]
    Write(#[from] WriteError),
    /// `general.architecture` is not `generic.gpu_index`.
    #[error("gpu index file: architecture is {found:?}, expected \"generic.gpu_index\"")]
    WrongArchitecture {
        /// What the file says (`None`: absent or not a string).
        found: Option<String>,
    },
    /// The tensor list is not `blk.0.gpu_idx, blk.0.gpu_bucket, blk.1.gpu_idx, ...`.
    #[error("gpu index file: tensor {index} is {found:?}, expected {expected:?}")]
    TensorOrder {
        /// Position in the tensor list.
        index: usize,
        /// The name due there (`None`: there should be no more tensors).
        expected: Option<String>,
        /// The name found (`None`: the list ended early).
        found: Option<String>,
    },
    /// A tensor that is not a one-dimensional I32 tensor.
    #[error(
        "gpu index file: tensor {tensor:?} is {ty} with shape {shape:?}, expected one-dimensional I32"
    )]
    BadTensor {
        /// Tensor name.
        tensor: String,
        /// Its type.
        ty: GgmlType,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// A `gpu_idx` entry other than 0 or 1.
    #[error("layer {layer}: gpu_idx[{neuron}] is {value}, expected 0 or 1")]
    BadIdxValue {
        /// Layer.
        layer: usize,
        /// Neuron.
        neuron: usize,
        /// The value.
        value: i32,
    },
    /// A `gpu_bucket` entry that is out of range, not ascending, or names a neuron whose
    /// `gpu_idx` is 0.
    #[error("layer {layer}: gpu_bucket[{position}] = {value} {reason}")]
    BadBucket {
        /// Layer.
        layer: usize,
        /// Position in the bucket.
        position: usize,
        /// The neuron id there.
        value: i32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The bucket does not list every neuron marked in `gpu_idx`.
    #[error("layer {layer}: gpu_idx marks {n_idx} neurons but gpu_bucket lists {n_bucket}")]
    BucketCount {
        /// Layer.
        layer: usize,
        /// Ones in `gpu_idx`.
        n_idx: usize,
        /// Entries in `gpu_bucket`.
        n_bucket: usize,
    },
    /// More neurons than an I32 id can name.
    #[error("layer {layer}: {n_ff} neurons do not fit i32 ids")]
    TooManyNeurons {
        /// Layer.
        layer: usize,
        /// Its neuron count.
        n_ff: usize,
    },
}

/// One layer's placement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerGpuIndex {
    /// `[n_ff]`: 1 where the neuron lives on the GPU, else 0.
    pub gpu_idx: Vec<i32>,
    /// The GPU neurons' ids, ascending: compact GPU row `j` holds neuron `gpu_bucket[j]`.
    pub gpu_bucket: Vec<i32>,
}

impl LayerGpuIndex {
    /// Builds a layer from its `gpu_idx` (0/1 per neuron); the bucket is derived.
    pub fn from_gpu_idx(gpu_idx: Vec<i32>) -> Self {
        let gpu_bucket = gpu_idx
            .iter()
            .enumerate()
            .filter(|&(_, &v)| v != 0)
            .map(|(i, _)| i as i32)
            .collect();
        LayerGpuIndex {
            gpu_idx,
            gpu_bucket,
        }
    }

    /// Number of neurons (`n_ff`).
    pub fn n_ff(&self) -> usize {
        self.gpu_idx.len()
    }

    /// Number of neurons on the GPU.
    pub fn n_gpu(&self) -> usize {
        self.gpu_bucket.len()
    }

    /// Checks that `gpu_idx` is 0/1 and `gpu_bucket` lists exactly its ones, ascending.
    pub fn validate(&self, layer: usize) -> Result<(), GpuIndexError> {
        if i32::try_from(self.gpu_idx.len()).is_err() {
            return Err(GpuIndexError::TooManyNeurons {
                layer,
                n_ff: self.gpu_idx.len(),
            });
        }
        let mut ones = 0;
        for (neuron, &value) in self.gpu_idx.iter().enumerate() {
            match value {
                0 => {}
                1 => ones += 1,
                _ => {
                    return Err(GpuIndexError::BadIdxValue {
                        layer,
                        neuron,
                        value,
                    });
                }
            }
        }
        let mut prev: Option<i32> = None;
        for (position, &value) in self.gpu_bucket.iter().enumerate() {
            let bad = |reason| GpuIndexError::BadBucket {
                layer,
                position,
                value,
                reason,
            };
            let Some(&flag) = usize::try_from(value)
                .ok()
                .and_then(|i| self.gpu_idx.get(i))
            else {
                return Err(bad("is not a neuron id (outside 0..n_ff)"));
            };
            if prev.is_some_and(|p| value <= p) {
                return Err(bad("is not above the previous entry"));
            }
            if flag != 1 {
                return Err(bad("names a neuron whose gpu_idx is 0"));
            }
            prev = Some(value);
        }
        if ones != self.gpu_bucket.len() {
            return Err(GpuIndexError::BucketCount {
                layer,
                n_idx: ones,
                n_bucket: self.gpu_bucket.len(),
            });
        }
        Ok(())
    }
}

/// A whole placement file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuIndex {
    /// The VRAM budget in bytes the placement was made for (`split.vram_capacity`).
    pub vram_capacity: u64,
    /// One entry per layer.
    pub layers: Vec<LayerGpuIndex>,
}

impl GpuIndex {
    /// Reads and validates a placement file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, GpuIndexError> {
        Self::from_gguf(&GgufFile::open(path)?)
    }

    /// Parses and validates a placement file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, GpuIndexError> {
        Self::from_gguf(&GgufFile::from_bytes(bytes)?)
    }

    /// Extracts and validates the placement from a parsed file (either magic is accepted; the
    /// type ids follow the file's numbering).
    pub fn from_gguf(f: &GgufFile) -> Result<Self, GpuIndexError> {
        if f.architecture() != Some(GPU_INDEX_ARCH) {
            return Err(GpuIndexError::WrongArchitecture {
                found: f.architecture().map(str::to_owned),
            });
        }
        let n_layers = f.get_u32(BLOCK_COUNT_KEY)? as usize;
        let vram_capacity = f.get_u64(VRAM_CAPACITY_KEY)?;
        let tensors = f.tensors();
        // Each layer needs two tensors; a count beyond the tensor list is caught below before
        // any allocation sized by it.
        let mut layers = Vec::with_capacity(n_layers.min(tensors.len() / 2));
        let read = |index: usize, expected: String| -> Result<Vec<i32>, GpuIndexError> {
            let t = tensors.get(index);
            match t {
                Some(t) if t.name == expected => {
                    if t.ty != GgmlType::I32 || t.shape.len() != 1 {
                        return Err(GpuIndexError::BadTensor {
                            tensor: t.name.clone(),
                            ty: t.ty,
                            shape: t.shape.clone(),
                        });
                    }
                    Ok(f.tensor_data(t)
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect())
                }
                _ => Err(GpuIndexError::TensorOrder {
                    index,
                    expected: Some(expected),
                    found: t.map(|t| t.name.clone()),
                }),
            }
        };
        for layer in 0..n_layers {
            let gpu_idx = read(2 * layer, format!("blk.{layer}.gpu_idx"))?;
            let gpu_bucket = read(2 * layer + 1, format!("blk.{layer}.gpu_bucket"))?;
            let l = LayerGpuIndex {
                gpu_idx,
                gpu_bucket,
            };
            l.validate(layer)?;
            layers.push(l);
        }
        if let Some(extra) = tensors.get(n_layers.saturating_mul(2)) {
            return Err(GpuIndexError::TensorOrder {
                index: n_layers.saturating_mul(2),
                expected: None,
                found: Some(extra.name.clone()),
            });
        }
        Ok(GpuIndex {
            vram_capacity,
            layers,
        })
    }

    /// Validates every layer.
    pub fn validate(&self) -> Result<(), GpuIndexError> {
        self.layers
            .iter()
            .enumerate()
            .try_for_each(|(i, l)| l.validate(i))
    }

    fn writer(&self) -> Result<GgufWriter, GpuIndexError> {
        self.validate()?;
        let n_layers = u32::try_from(self.layers.len()).map_err(|_| WriteError::BadShape {
            tensor: "blk.N.gpu_idx".to_owned(),
            shape: vec![self.layers.len() as u64],
            reason: "more layers than a u32 block count",
        })?;
        let mut w = GgufWriter::new(Magic::Pwri);
        w.add_kv("general.architecture", Value::from(GPU_INDEX_ARCH))?;
        w.add_kv(BLOCK_COUNT_KEY, Value::U32(n_layers))?;
        w.add_kv(VRAM_CAPACITY_KEY, Value::U64(self.vram_capacity))?;
        for (i, l) in self.layers.iter().enumerate() {
            for (name, v) in [("gpu_idx", &l.gpu_idx), ("gpu_bucket", &l.gpu_bucket)] {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                w.add_tensor(
                    format!("blk.{i}.{name}"),
                    GgmlType::I32,
                    &[v.len() as u64],
                    bytes,
                )?;
            }
        }
        Ok(w)
    }

    /// Serialises to a `PWRI` file image (validated first).
    pub fn to_bytes(&self) -> Result<Vec<u8>, GpuIndexError> {
        Ok(self.writer()?.write_to_vec()?)
    }

    /// Writes a `PWRI` placement file (validated first).
    pub fn write(&self, path: impl AsRef<Path>) -> Result<(), GpuIndexError> {
        Ok(self.writer()?.write_to_file(path)?)
    }
}
