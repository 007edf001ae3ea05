//! CPU operators for LLM inference.
//!
//! - [`matmul`](mod@matmul): dense quantized matrix-vector ([`matvec`]) and matrix-matrix ([`matmul()`])
//!   products over ggml weight matrices, with activations quantized once per product as in
//!   llama.cpp, split across threads with results independent of the thread count.
//! - [`pool`](mod@pool): the persistent [`ThreadPool`] those products run on (and [`SharedSlice`] for
//!   writing disjoint parts of one output from several threads).
//! - [`ops`]: norms, RoPE, softmax, activations and attention.
//! - [`sparse`]: activation-sparse FFN operators (row-gather matvec, axpy over active neurons).
//! - [`grouped`]: the down projection regrouped by neuron without requantization, and its
//!   product over active neurons.
//!
//! ```
//! use powerinfer_cpu::{Matrix, ThreadPool, matvec};
//! use powerinfer_gguf::GgmlType;
//!
//! let pool = ThreadPool::new(2);
//! let bytes: Vec<u8> = (0..4 * 64).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect();
//! let w = Matrix::new(GgmlType::F32, 4, 64, &bytes)?;
//! let x = vec![1.0f32; 64];
//! let mut y = vec![0.0f32; 4];
//! matvec(&pool, &w, &x, &mut y)?;
//! # Ok::<(), powerinfer_cpu::CpuError>(())
//! ```

pub mod flash;
pub mod grouped;
pub mod matmul;
pub mod ops;
pub mod pool;
pub mod sparse;

use powerinfer_gguf::GgmlType;

pub use matmul::{
    ActBuffer, Matrix, matmul, matmul_quantized, matmul_with, matvec, matvec_quantized,
    matvec_rows, matvec_with,
};
pub use pool::{SharedSlice, ThreadPool};

/// Errors of the CPU operators: every bad shape or type a caller can pass is reported here
/// rather than by a panic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CpuError {
    /// A length or count does not match what the other operands require.
    #[error("shape mismatch: {what} should be {expected}, got {actual}")]
    ShapeMismatch {
        /// Which quantity is wrong, and (in parentheses) what it must equal.
        what: &'static str,
        /// The required value.
        expected: usize,
        /// The value passed.
        actual: usize,
    },
    /// A row length is not a whole number of blocks of its type.
    #[error("{cols} elements are not a whole number of {ty} blocks ({} elements each)", ty.block_size())]
    NotBlockAligned {
        /// The type.
        ty: GgmlType,
        /// The row length in elements.
        cols: usize,
    },
    /// A matrix's byte buffer has the wrong length for its type and shape.
    #[error("matrix data is {actual} bytes, its type and shape need {expected}")]
    DataSize {
        /// Bytes required by type and shape.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// No compute kernels exist for this type.
    #[error("no CPU kernels for type {0}")]
    UnsupportedType(GgmlType),
    /// Activations were quantized for a different weight type than the matrix has.
    #[error("activations were quantized for {actual} weights, the matrix is {expected}")]
    WeightTypeMismatch {
        /// The matrix's type.
        expected: GgmlType,
        /// The type the activations were prepared for.
        actual: GgmlType,
    },
    /// An [`ActBuffer`] was used before anything was quantized into it.
    #[error("the activation buffer holds no quantized activations")]
    EmptyActivations,
    /// A size computation overflowed `usize`.
    #[error("size overflow")]
    Overflow,
}
