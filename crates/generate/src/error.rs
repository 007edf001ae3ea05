//! The error type of model loading and the forward pass.

use powerinfer_cpu::CpuError;
use powerinfer_cpu::ops::OpsError;
use powerinfer_gguf::GgmlType;
use powerinfer_gguf::{GgufError, MetadataError};

/// Everything that can go wrong loading a model or running it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The file could not be opened or parsed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// A metadata key is missing or has the wrong type.
    #[error("model metadata: {0}")]
    Metadata(#[from] MetadataError),
    /// The file has no `general.architecture`.
    #[error("the file has no general.architecture key")]
    NoArchitecture,
    /// The architecture is not implemented.
    #[error(
        "unknown architecture {0:?} (supported: llama, gemma3; sparse PowerInfer files: llama, bamboo)"
    )]
    UnknownArchitecture(String),
    /// A tensor the architecture needs is absent.
    #[error("missing tensor {0:?}")]
    MissingTensor(String),
    /// A tensor has an unexpected shape (ggml `ne` order: the row length first).
    #[error("tensor {name:?} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        /// The tensor.
        name: String,
        /// The shape the hyper-parameters imply.
        expected: Vec<u64>,
        /// The shape in the file.
        found: Vec<u64>,
    },
    /// A tensor's element type cannot be used where it is.
    #[error("tensor {name:?} has type {ty}, which is not supported here ({why})")]
    UnsupportedTensorType {
        /// The tensor.
        name: String,
        /// Its type.
        ty: GgmlType,
        /// Why (which use needs what).
        why: &'static str,
    },
    /// A hyper-parameter is inconsistent or out of range.
    #[error("invalid model hyper-parameter: {0}")]
    InvalidConfig(String),
    /// The tokens do not fit in the context.
    #[error("{n_tokens} tokens at position {pos} do not fit in the context of {n_ctx} tokens")]
    ContextOverflow {
        /// Position of the first new token.
        pos: usize,
        /// Tokens passed.
        n_tokens: usize,
        /// Context size.
        n_ctx: usize,
    },
    /// The KV cache for the requested context does not fit in the available memory.
    #[error(
        "a context of {n_ctx} tokens needs {needed} bytes of KV cache, but only {available} bytes of memory are available"
    )]
    ContextTooLarge {
        /// Requested context size.
        n_ctx: usize,
        /// Bytes the KV cache would take.
        needed: u64,
        /// `MemAvailable` from `/proc/meminfo`.
        available: u64,
    },
    /// A token id is not in the vocabulary.
    #[error("token id {token} is outside the vocabulary of {n_vocab} tokens")]
    TokenOutOfRange {
        /// The id.
        token: u32,
        /// Vocabulary size.
        n_vocab: usize,
    },
    /// An empty token list where at least one token is needed.
    #[error("no tokens to process")]
    EmptyInput,
    /// A CPU matrix product failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A CPU operator failed.
    #[error(transparent)]
    Ops(#[from] OpsError),
    /// A sparse FFN operator failed.
    #[error(transparent)]
    Sparse(#[from] powerinfer_cpu::sparse::SparseError),
    /// Dequantizing a tensor row failed.
    #[error("dequantizing tensor {name:?}: {msg}")]
    Dequantize {
        /// The tensor.
        name: String,
        /// The quant crate's message.
        msg: String,
    },
}
