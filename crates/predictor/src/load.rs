//! Loading predictors from a PowerInfer GGUF file.

use powerinfer_cpu::Matrix;
use powerinfer_gguf::{GgmlType, GgufFile, MetadataError};

use crate::predictor::{Predictor, PredictorError, Weights};

/// The metadata key holding the file's threshold.
const THRESHOLD_KEY: &str = "powerinfer.sparse_threshold";

/// Errors of loading predictors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A predictor tensor is absent.
    #[error("predictor tensor {tensor:?} is missing from the model file")]
    Missing {
        /// The tensor name.
        tensor: String,
    },
    /// A predictor tensor has the wrong shape.
    #[error("predictor tensor {tensor:?} has ggml shape {found:?}, expected {expected}")]
    BadShape {
        /// The tensor name.
        tensor: String,
        /// What it should be, e.g. `[n_embd=4096, H]`.
        expected: String,
        /// The shape in the file (ggml `ne` order).
        found: Vec<u64>,
    },
    /// A predictor tensor's type has no CPU kernels.
    #[error("predictor tensor {tensor:?} has type {ty}, which has no CPU kernels")]
    UnsupportedType {
        /// The tensor name.
        tensor: String,
        /// Its type.
        ty: GgmlType,
    },
    /// The two tensors of a layer do not fit together or are malformed.
    #[error("layer {layer} predictor: {source}")]
    Predictor {
        /// The layer.
        layer: usize,
        /// The underlying error.
        source: PredictorError,
    },
    /// A metadata key needed to size the predictors is missing or malformed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// `general.architecture` is missing.
    #[error("the model file has no general.architecture key")]
    NoArchitecture,
}

/// The ggml shape `[cols, rows]` of a 2-D tensor (trailing dimensions of 1 allowed).
fn dims2(shape: &[u64]) -> Option<(u64, u64)> {
    if shape.len() < 2 || shape[2..].iter().any(|&d| d != 1) {
        return None;
    }
    Some((shape[0], shape[1]))
}

fn tensor<'a>(
    file: &'a GgufFile,
    name: &str,
    cols: Option<usize>,
    rows: Option<usize>,
    expected: impl Fn() -> String,
) -> Result<Weights<'a>, LoadError> {
    let t = file.tensor(name).ok_or_else(|| LoadError::Missing {
        tensor: name.to_owned(),
    })?;
    let bad = || LoadError::BadShape {
        tensor: name.to_owned(),
        expected: expected(),
        found: t.shape.clone(),
    };
    let (c, r) = dims2(&t.shape).ok_or_else(bad)?;
    let (c, r) = (
        usize::try_from(c).map_err(|_| bad())?,
        usize::try_from(r).map_err(|_| bad())?,
    );
    if c == 0 || r == 0 || cols.is_some_and(|x| x != c) || rows.is_some_and(|x| x != r) {
        return Err(bad());
    }
    if powerinfer_quant::kernels(t.ty).is_none() {
        return Err(LoadError::UnsupportedType {
            tensor: name.to_owned(),
            ty: t.ty,
        });
    }
    let m = Matrix::new(t.ty, r, c, file.tensor_data(t)).map_err(|_| bad())?;
    Ok(Weights::borrowed(m))
}

/// Loads layer `layer`'s predictor (`blk.{layer}.fc1.weight`, ggml shape `[n_embd, H]`, and
/// `blk.{layer}.fc2.weight`, ggml `[H, n_ff]`), borrowing the file's bytes.
pub fn load_layer(
    file: &GgufFile,
    layer: usize,
    n_embd: usize,
    n_ff: usize,
) -> Result<Predictor<'_>, LoadError> {
    let fc1_name = format!("blk.{layer}.fc1.weight");
    let fc2_name = format!("blk.{layer}.fc2.weight");
    let fc1 = tensor(file, &fc1_name, Some(n_embd), None, || {
        format!("[n_embd={n_embd}, H]")
    })?;
    let h = fc1.rows;
    let fc2 = tensor(file, &fc2_name, Some(h), Some(n_ff), || {
        format!("[H={h} (rows of {fc1_name}), n_ff={n_ff}]")
    })?;
    Predictor::new(fc1, fc2).map_err(|source| LoadError::Predictor { layer, source })
}

/// Loads the predictors of layers `0..n_layers`.
pub fn load_predictors(
    file: &GgufFile,
    n_layers: usize,
    n_embd: usize,
    n_ff: usize,
) -> Result<Vec<Predictor<'_>>, LoadError> {
    (0..n_layers)
        .map(|l| load_layer(file, l, n_embd, n_ff))
        .collect()
}

/// Loads every layer's predictor, sizing them from the file's `{arch}.block_count`,
/// `{arch}.embedding_length` and `{arch}.feed_forward_length`.
pub fn load_predictors_auto(file: &GgufFile) -> Result<Vec<Predictor<'_>>, LoadError> {
    if file.architecture().is_none() {
        return Err(LoadError::NoArchitecture);
    }
    let n_layers = file.get_arch_u32("block_count")? as usize;
    let n_embd = file.get_arch_u32("embedding_length")? as usize;
    let n_ff = file.get_arch_u32("feed_forward_length")? as usize;
    load_predictors(file, n_layers, n_embd, n_ff)
}

/// The file's `powerinfer.sparse_threshold`, if present (an error if it holds something other
/// than a float).
pub fn file_threshold(file: &GgufFile) -> Result<Option<f32>, LoadError> {
    match file.get_f32(THRESHOLD_KEY) {
        Ok(v) => Ok(Some(v)),
        Err(MetadataError::Missing { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}
