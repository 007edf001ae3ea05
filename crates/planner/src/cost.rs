//! The byte cost model: what each part of a model takes in VRAM.
//!
//! Every number is the exact size of the tensor data as stored in the model file (the
//! `TensorInfo::size` of the reader, i.e. rows x the row bytes of its ggml type), plus the
//! F16 KV cache at a chosen context size. Not counted: the CUDA context and driver reservations
//! (hundreds of MiB that never show up in the budget), compute scratch buffers and activations
//! (take them out of the budget with a reserve), the token embedding table (it stays on the CPU,
//! as in llama.cpp; only its copy as the output head is counted when the output is tied to it),
//! and allocator padding.

use powerinfer_gguf::{GgufFile, MetadataError, TensorInfo};
use serde::Serialize;

/// Something that prevents building a cost model from a file.
#[derive(Debug, thiserror::Error)]
pub enum CostError {
    /// A required hyper-parameter is missing or mistyped.
    #[error("model metadata: {0}")]
    Metadata(#[from] MetadataError),
    /// The file has no `general.architecture`.
    #[error("model file has no general.architecture")]
    NoArchitecture,
    /// A hyper-parameter has an unusable value.
    #[error("model metadata: {key} = {value} {reason}")]
    BadHyperParameter {
        /// The key.
        key: String,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A layer lacks an FFN tensor the cost model needs.
    #[error("layer {layer}: tensor {tensor:?} is missing")]
    MissingTensor {
        /// Layer.
        layer: usize,
        /// The tensor name looked for.
        tensor: String,
    },
    /// An FFN tensor whose shape does not fit the others of its layer.
    #[error("tensor {tensor:?} has shape {shape:?}, expected {expected}")]
    BadShape {
        /// Tensor name.
        tensor: String,
        /// Its shape (ggml order).
        shape: Vec<u64>,
        /// What was expected.
        expected: String,
    },
    /// A tensor names a layer at or beyond `block_count`.
    #[error("tensor {tensor:?} names a layer beyond block_count = {n_layer}")]
    LayerOutOfRange {
        /// Tensor name.
        tensor: String,
        /// The file's layer count.
        n_layer: usize,
    },
    /// A byte count overflowed u64.
    #[error("byte count overflows u64 ({what})")]
    Overflow {
        /// What was being computed.
        what: &'static str,
    },
}

/// What a fixed (non-FFN-neuron) item is, in the reference's placement priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Attention weights and biases (`blk.N.attn_*` other than norms).
    Attention,
    /// Activation predictors (`blk.N.fc1`, `blk.N.fc2`).
    Predictor,
    /// Per-layer norm weights (every `blk.N.*norm*` tensor).
    Norm,
    /// Output head (`output.weight`, or the tied token embedding) and `output_norm`.
    Output,
    /// Any other tensor the runtime may need on the GPU (e.g. `rope_freqs`, FFN biases).
    Other,
    /// The F16 K and V cache.
    KvCache,
    /// FFN neurons (gate row + up row + down_t row each); gets what is left.
    Ffn,
}

impl Category {
    /// Fixed categories in the order they are placed (the reference's priority order, with
    /// unclassified tensors just before the KV cache).
    pub const FIXED_ORDER: [Category; 6] = [
        Category::Attention,
        Category::Predictor,
        Category::Norm,
        Category::Output,
        Category::Other,
        Category::KvCache,
    ];

    /// Lower-case name (as in the JSON summary).
    pub fn name(self) -> &'static str {
        match self {
            Category::Attention => "attention",
            Category::Predictor => "predictor",
            Category::Norm => "norm",
            Category::Output => "output",
            Category::Other => "other",
            Category::KvCache => "kv_cache",
            Category::Ffn => "ffn",
        }
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One fixed item: a tensor, or one layer's KV cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FixedItem {
    /// Tensor name, or `kv_cache.N` for layer `N`'s K and V cache.
    pub name: String,
    /// Its category.
    pub category: Category,
    /// Its layer, if it belongs to one.
    pub layer: Option<usize>,
    /// Exact bytes.
    pub bytes: u64,
}

/// One layer's FFN: per-neuron byte costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FfnLayerCost {
    /// Neurons in the layer (`n_ff`).
    pub n_ff: usize,
    /// Bytes of one `ffn_gate` row (0 for a model without a gate).
    pub gate_row: u64,
    /// Bytes of one `ffn_up` row.
    pub up_row: u64,
    /// Bytes of one `ffn_down_t` row (for a file with a plain `ffn_down`, the bytes of one
    /// column stored as a row of the same type; see [`FfnLayerCost::down_exact`]).
    pub down_row: u64,
    /// False when the file has a non-transposed `ffn_down` whose column is not a whole number
    /// of blocks of its type: `down_row` is then its size divided by `n_ff`, rounded up.
    pub down_exact: bool,
    /// A neuron's cost: `gate_row + up_row + down_row`.
    pub neuron_bytes: u64,
}

/// The cost model of one model file at one context size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CostModel {
    /// `general.architecture`.
    pub architecture: String,
    /// Layers (`{arch}.block_count`).
    pub n_layer: usize,
    /// Context size the KV cache is counted for.
    pub n_ctx: u64,
    /// Fixed items in placement order: attention (layer 0 up), predictors, norms, output,
    /// other, KV cache (layer 0 up).
    pub fixed: Vec<FixedItem>,
    /// Per-layer FFN neuron costs.
    pub ffn: Vec<FfnLayerCost>,
    /// Tensors that stay on the CPU and are not placed (the token embedding table), with
    /// their bytes.
    pub cpu_only: Vec<(String, u64)>,
}

/// KV-cache shape read from the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KvShape {
    /// KV heads.
    pub n_head_kv: u64,
    /// Key length per head.
    pub head_dim_k: u64,
    /// Value length per head.
    pub head_dim_v: u64,
}

impl KvShape {
    /// Reads `head_count_kv` (default `head_count`), `key_length` and `value_length` (default
    /// `embedding_length / head_count`).
    pub fn from_gguf(f: &GgufFile) -> Result<Self, CostError> {
        let n_head = u64::from(f.get_arch_u32("attention.head_count")?);
        if n_head == 0 {
            return Err(bad(f, "attention.head_count", 0, "must be above 0"));
        }
        let n_embd = u64::from(f.get_arch_u32("embedding_length")?);
        let n_head_kv = optional_u32(f, "attention.head_count_kv")?.unwrap_or(n_head);
        let default_dim = n_embd / n_head;
        let head_dim_k = optional_u32(f, "attention.key_length")?.unwrap_or(default_dim);
        let head_dim_v = optional_u32(f, "attention.value_length")?.unwrap_or(default_dim);
        Ok(KvShape {
            n_head_kv,
            head_dim_k,
            head_dim_v,
        })
    }

    /// Bytes of one layer's F16 K and V cache for `n_ctx` positions:
    /// `n_ctx * n_head_kv * (head_dim_k + head_dim_v) * 2`.
    pub fn layer_bytes(&self, n_ctx: u64) -> Option<u64> {
        n_ctx
            .checked_mul(self.n_head_kv)?
            .checked_mul(self.head_dim_k.checked_add(self.head_dim_v)?)?
            .checked_mul(2)
    }
}

fn optional_u32(f: &GgufFile, suffix: &str) -> Result<Option<u64>, CostError> {
    let key = f.arch_key(suffix);
    if f.get(&key).is_none() {
        return Ok(None);
    }
    Ok(Some(u64::from(f.get_u32(&key)?)))
}

fn bad(f: &GgufFile, suffix: &str, value: u64, reason: &'static str) -> CostError {
    CostError::BadHyperParameter {
        key: f.arch_key(suffix),
        value,
        reason,
    }
}

/// Splits `blk.N.rest` into `(N, rest)`.
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((n.parse().ok()?, rest))
}

/// The FFN tensors of a layer that become per-neuron costs.
const FFN_NEURON_TENSORS: [&str; 4] = [
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down_t.weight",
    "ffn_down.weight",
];

impl CostModel {
    /// Builds the cost model of a GGUF or PWRI model file with the KV cache counted for
    /// `n_ctx` positions.
    pub fn from_gguf(f: &GgufFile, n_ctx: u64) -> Result<Self, CostError> {
        let architecture = f
            .architecture()
            .ok_or(CostError::NoArchitecture)?
            .to_owned();
        let n_layer = f.get_arch_u32("block_count")? as usize;
        let kv = KvShape::from_gguf(f)?;
        let kv_layer = kv.layer_bytes(n_ctx).ok_or(CostError::Overflow {
            what: "KV cache bytes",
        })?;

        let mut ffn = Vec::with_capacity(n_layer.min(f.tensors().len()));
        for layer in 0..n_layer {
            ffn.push(ffn_layer(f, layer)?);
        }

        let mut fixed = Vec::new();
        let mut cpu_only = Vec::new();
        let has_output = f.tensor("output.weight").is_some();
        for t in f.tensors() {
            let (category, layer) = match layer_of(&t.name) {
                Some((layer, rest)) => {
                    if layer >= n_layer {
                        return Err(CostError::LayerOutOfRange {
                            tensor: t.name.clone(),
                            n_layer,
                        });
                    }
                    if FFN_NEURON_TENSORS.contains(&rest) {
                        // Neuron costs; a plain ffn_down next to an ffn_down_t is a CPU copy.
                        if rest == "ffn_down.weight"
                            && f.tensor(&format!("blk.{layer}.ffn_down_t.weight"))
                                .is_some()
                        {
                            cpu_only.push((t.name.clone(), t.size));
                        }
                        continue;
                    }
                    let category = if rest.starts_with("fc1.") || rest.starts_with("fc2.") {
                        Category::Predictor
                    } else if rest.contains("norm") {
                        Category::Norm
                    } else if rest.starts_with("attn_") {
                        Category::Attention
                    } else {
                        Category::Other
                    };
                    (category, Some(layer))
                }
                None => match t.name.as_str() {
                    "token_embd.weight" => {
                        cpu_only.push((t.name.clone(), t.size));
                        if !has_output {
                            // Tied output head: the GPU holds a copy of the embedding table.
                            fixed.push(FixedItem {
                                name: "output.weight (tied to token_embd.weight)".to_owned(),
                                category: Category::Output,
                                layer: None,
                                bytes: t.size,
                            });
                        }
                        continue;
                    }
                    n if n.starts_with("output") => (Category::Output, None),
                    n if n.starts_with("token_embd") => {
                        cpu_only.push((t.name.clone(), t.size));
                        continue;
                    }
                    _ => (Category::Other, None),
                },
            };
            fixed.push(FixedItem {
                name: t.name.clone(),
                category,
                layer,
                bytes: t.size,
            });
        }
        for layer in 0..n_layer {
            fixed.push(FixedItem {
                name: format!("kv_cache.{layer}"),
                category: Category::KvCache,
                layer: Some(layer),
                bytes: kv_layer,
            });
        }
        // Priority order; within a category layer 0 up, then file order (the sort is stable).
        // Layer-less items of a category (output_norm, output) come after the layered ones.
        fixed.sort_by_key(|i| {
            let rank = Category::FIXED_ORDER
                .iter()
                .position(|&c| c == i.category)
                .unwrap_or(usize::MAX);
            (rank, i.layer.unwrap_or(usize::MAX))
        });
        let model = CostModel {
            architecture,
            n_layer,
            n_ctx,
            fixed,
            ffn,
            cpu_only,
        };
        model.fixed_bytes().ok_or(CostError::Overflow {
            what: "fixed bytes",
        })?;
        model
            .ffn_bytes()
            .ok_or(CostError::Overflow { what: "FFN bytes" })?;
        Ok(model)
    }

    /// Bytes of all fixed items (`None` on overflow).
    pub fn fixed_bytes(&self) -> Option<u64> {
        self.fixed
            .iter()
            .try_fold(0u64, |a, i| a.checked_add(i.bytes))
    }

    /// Bytes of one fixed category.
    pub fn category_bytes(&self, category: Category) -> u64 {
        if category == Category::Ffn {
            return self.ffn_bytes().unwrap_or(u64::MAX);
        }
        self.fixed
            .iter()
            .filter(|i| i.category == category)
            .fold(0u64, |a, i| a.saturating_add(i.bytes))
    }

    /// Bytes of every FFN neuron of every layer (`None` on overflow).
    pub fn ffn_bytes(&self) -> Option<u64> {
        self.ffn.iter().try_fold(0u64, |a, l| {
            a.checked_add((l.n_ff as u64).checked_mul(l.neuron_bytes)?)
        })
    }

    /// Per-layer neuron costs (`neuron_bytes` of each layer).
    pub fn neuron_bytes(&self) -> Vec<u64> {
        self.ffn.iter().map(|l| l.neuron_bytes).collect()
    }

    /// Per-layer neuron counts (`n_ff` of each layer).
    pub fn n_ff(&self) -> Vec<usize> {
        self.ffn.iter().map(|l| l.n_ff).collect()
    }
}

fn shape_err(t: &TensorInfo, expected: String) -> CostError {
    CostError::BadShape {
        tensor: t.name.clone(),
        shape: t.shape.clone(),
        expected,
    }
}

/// A two-dimensional tensor's `(row_len, n_rows)`.
fn dims2(t: &TensorInfo) -> Result<(u64, u64), CostError> {
    match t.shape.as_slice() {
        &[cols, rows] => Ok((cols, rows)),
        _ => Err(shape_err(t, "two dimensions".to_owned())),
    }
}

fn ffn_layer(f: &GgufFile, layer: usize) -> Result<FfnLayerCost, CostError> {
    let get = |suffix: &str| f.tensor(&format!("blk.{layer}.{suffix}"));
    let missing = |suffix: &str| CostError::MissingTensor {
        layer,
        tensor: format!("blk.{layer}.{suffix}"),
    };
    let up = get("ffn_up.weight").ok_or_else(|| missing("ffn_up.weight"))?;
    let (n_embd, n_ff) = dims2(up)?;
    let row_of = |t: &TensorInfo| -> Result<u64, CostError> {
        let (cols, rows) = dims2(t)?;
        if cols != n_embd || rows != n_ff {
            return Err(shape_err(t, format!("[{n_embd}, {n_ff}] like ffn_up")));
        }
        Ok(t.row_bytes())
    };
    let up_row = up.row_bytes();
    let gate_row = match get("ffn_gate.weight") {
        Some(g) => row_of(g)?,
        None => 0,
    };
    let (down_row, down_exact) = if let Some(d) = get("ffn_down_t.weight") {
        (row_of(d)?, true)
    } else if let Some(d) = get("ffn_down.weight") {
        let (cols, rows) = dims2(d)?;
        if cols != n_ff || rows != n_embd {
            return Err(shape_err(
                d,
                format!("[{n_ff}, {n_embd}] (ffn_up transposed)"),
            ));
        }
        match d.ty.bytes_for(n_embd) {
            Some(b) => (b, true),
            None => (d.size.div_ceil(n_ff.max(1)), false),
        }
    } else {
        return Err(missing("ffn_down_t.weight (or ffn_down.weight)"));
    };
    let neuron_bytes = gate_row
        .checked_add(up_row)
        .and_then(|s| s.checked_add(down_row))
        .ok_or(CostError::Overflow {
            what: "neuron bytes",
        })?;
    let n_ff = usize::try_from(n_ff).map_err(|_| CostError::Overflow { what: "n_ff" })?;
    Ok(FfnLayerCost {
        n_ff,
        gate_row,
        up_row,
        down_row,
        down_exact,
        neuron_bytes,
    })
}
