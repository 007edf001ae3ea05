//! ggml block quantization formats: (de)quantization and dot products.
//!
//! Bit-compatible with llama.cpp / ggml for F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1,
//! Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ4_NL and IQ4_XS:
//!
//! - [`dequantize_row`] / [`quantize_row`]: checked, scalar reference conversions
//!   (`quantize_row` is bit-identical to ggml's quantizer as `llama-quantize` runs it without
//!   an importance matrix: `quantize_row_*_ref` for every type but IQ4_NL, whose model-file
//!   quantizer `quantize_iq4_nl` searches the scale where `quantize_row_iq4_nl_ref` does not;
//!   the latter is [`scalar::quantize_iq4_nl_ref`]).
//! - [`vec_dot_type`] / [`vec_dot`]: the activation type ggml pairs with a weight type, and a
//!   checked dot product of a weight row with quantized activations.
//! - [`kernels`] / [`scalar_kernels`]: per-type hot-path function pointers ([`TypeKernels`]),
//!   selected once at run time by CPU feature detection (AVX-512 VNNI, AVX2+FMA+F16C, NEON,
//!   scalar). Set `POWERINFER_SIMD=scalar` to force the scalar reference kernels (read once,
//!   at the first call of [`kernels`]).
//!
//! ```
//! use powerinfer_quant::{GgmlType, kernels, quantize_row, row_bytes};
//!
//! let n = 4096;
//! let weights_f32 = vec![0.01f32; n];
//! let x = vec![1.0f32; n];
//! let mut w = vec![0u8; row_bytes(GgmlType::Q4_0, n).unwrap()];
//! quantize_row(GgmlType::Q4_0, &weights_f32, &mut w)?; // once, at load/convert time
//!
//! let k = kernels(GgmlType::Q4_0).unwrap(); // once
//! let mut act = vec![0u8; row_bytes(k.act_ty, n).unwrap()];
//! (k.quantize_act)(&x, &mut act); // once per matmul
//! let y = (k.vec_dot)(n, &w, &act); // per row
//! assert!((y - 40.96).abs() < 0.1);
//! # Ok::<(), powerinfer_quant::QuantError>(())
//! ```
//!
//! Numerics of the fast activation quantizers: on x86 the SIMD Q8_0 / Q8_1 quantizers reproduce
//! ggml's x86 `quantize_row_q8_0` / `quantize_row_q8_1` (which llama.cpp runs on such CPUs):
//! `id = 127 / amax` and round-half-to-even. The scalar reference (`*_ref`) uses
//! `id = 1 / (amax / 127)` and round-half-away-from-zero, so the two can differ by one unit
//! in rare elements (same `d`). Q8_K has no SIMD quantizer in ggml x86; ours is bit-exact with
//! the reference.

pub mod blocks;
mod dispatch;
pub mod gemm;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use blocks::{
    BlockIQ4NL, BlockIQ4XS, BlockQ2K, BlockQ3K, BlockQ4_0, BlockQ4_1, BlockQ4K, BlockQ5_0,
    BlockQ5_1, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1, BlockQ8K, KVALUES_IQ4NL, QK, QK_K,
};
pub use dispatch::{Dot4Fn, TypeKernels, all_kernels, kernels, scalar_kernels, simd_level};
pub use half;
pub use half::{bf16, f16};
pub use powerinfer_gguf::GgmlType;

/// Errors of the checked API.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    /// The operation is not implemented for this type (integer types, the IQ types other than
    /// IQ4_NL / IQ4_XS, and the remaining GGUF formats such as TQ1_0, TQ2_0, MXFP4; or a dot
    /// product for an activation-only type).
    #[error("type {0} is not supported by this operation")]
    Unsupported(GgmlType),
    /// A slice has the wrong length.
    #[error("{what}: expected {expected} {unit}, got {got}")]
    Length {
        /// Which argument.
        what: &'static str,
        /// Required length.
        expected: usize,
        /// Actual length.
        got: usize,
        /// "bytes" or "elements".
        unit: &'static str,
    },
    /// An element count is not a whole number of blocks.
    #[error("{n} elements is not a multiple of the {ty} block size {block}")]
    NotBlockMultiple {
        /// The type.
        ty: GgmlType,
        /// Element count given.
        n: usize,
        /// Block size of the type.
        block: usize,
    },
}

/// Bytes of a row of `n` elements of `ty`, or `None` if `n` is not a whole number of blocks
/// (or the size overflows).
pub fn row_bytes(ty: GgmlType, n: usize) -> Option<usize> {
    let bs = ty.block_size();
    if !n.is_multiple_of(bs) {
        return None;
    }
    (n / bs).checked_mul(ty.type_size())
}

/// The activation type ggml pairs with weight type `ty` for dot products; `None` for types
/// without a dot product here (activation-only Q8_1 / Q8_K, integer types, and the IQ and
/// other formats that are not computable here).
pub fn vec_dot_type(ty: GgmlType) -> Option<GgmlType> {
    use GgmlType as T;
    Some(match ty {
        T::F32 => T::F32,
        T::F16 => T::F16,
        T::BF16 => T::BF16,
        T::Q4_0 | T::Q5_0 | T::Q8_0 | T::IQ4_NL => T::Q8_0,
        T::Q4_1 | T::Q5_1 => T::Q8_1,
        T::Q2_K | T::Q3_K | T::Q4_K | T::Q5_K | T::Q6_K | T::IQ4_XS => T::Q8_K,
        _ => return None,
    })
}

type DequantFn = fn(&[u8], &mut [f32]);
type QuantFn = fn(&[f32], &mut [u8]);

fn ref_dequant(ty: GgmlType) -> Option<DequantFn> {
    use GgmlType as T;
    Some(match ty {
        T::F32 => scalar::dequantize_f32,
        T::F16 => scalar::dequantize_f16,
        T::BF16 => scalar::dequantize_bf16,
        T::Q4_0 => scalar::dequantize_q4_0,
        T::Q4_1 => scalar::dequantize_q4_1,
        T::Q5_0 => scalar::dequantize_q5_0,
        T::Q5_1 => scalar::dequantize_q5_1,
        T::Q8_0 => scalar::dequantize_q8_0,
        T::Q8_1 => scalar::dequantize_q8_1,
        T::Q2_K => scalar::dequantize_q2_k,
        T::Q3_K => scalar::dequantize_q3_k,
        T::Q4_K => scalar::dequantize_q4_k,
        T::Q5_K => scalar::dequantize_q5_k,
        T::Q6_K => scalar::dequantize_q6_k,
        T::Q8_K => scalar::dequantize_q8_k,
        T::IQ4_NL => scalar::dequantize_iq4_nl,
        T::IQ4_XS => scalar::dequantize_iq4_xs,
        _ => return None,
    })
}

fn ref_quant(ty: GgmlType) -> Option<QuantFn> {
    use GgmlType as T;
    Some(match ty {
        T::F32 => scalar::quantize_f32,
        T::F16 => scalar::quantize_f16,
        T::BF16 => scalar::quantize_bf16,
        T::Q4_0 => scalar::quantize_q4_0,
        T::Q4_1 => scalar::quantize_q4_1,
        T::Q5_0 => scalar::quantize_q5_0,
        T::Q5_1 => scalar::quantize_q5_1,
        T::Q8_0 => scalar::quantize_q8_0,
        T::Q8_1 => scalar::quantize_q8_1,
        T::Q2_K => scalar::quantize_q2_k,
        T::Q3_K => scalar::quantize_q3_k,
        T::Q4_K => scalar::quantize_q4_k,
        T::Q5_K => scalar::quantize_q5_k,
        T::Q6_K => scalar::quantize_q6_k,
        T::Q8_K => scalar::quantize_q8_k,
        T::IQ4_NL => scalar::quantize_iq4_nl,
        T::IQ4_XS => scalar::quantize_iq4_xs,
        _ => return None,
    })
}

fn check_row(ty: GgmlType, n: usize, bytes: usize, what: &'static str) -> Result<(), QuantError> {
    let expected = row_bytes(ty, n).ok_or(QuantError::NotBlockMultiple {
        ty,
        n,
        block: ty.block_size(),
    })?;
    if bytes != expected {
        return Err(QuantError::Length {
            what,
            expected,
            got: bytes,
            unit: "bytes",
        });
    }
    Ok(())
}

/// Dequantizes one row: `dst.len()` elements from `src` (exactly `row_bytes(ty, dst.len())`
/// bytes). Scalar reference, bit-identical to ggml's `dequantize_row_*`.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let f = ref_dequant(ty).ok_or(QuantError::Unsupported(ty))?;
    check_row(ty, dst.len(), src.len(), "source")?;
    f(src, dst);
    Ok(())
}

/// Quantizes one row of `src.len()` elements into `dst` (exactly `row_bytes(ty, src.len())`
/// bytes). Bit-identical to what ggml's `ggml_quantize_chunk` writes without an importance
/// matrix (as `llama-quantize` runs it), which is `quantize_row_*_ref` for every type but
/// IQ4_NL (see [`scalar::quantize_iq4_nl`] and [`scalar::quantize_iq4_nl_ref`]).
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    let f = ref_quant(ty).ok_or(QuantError::Unsupported(ty))?;
    check_row(ty, src.len(), dst.len(), "destination")?;
    f(src, dst);
    Ok(())
}

/// Dot product of one weight row (`n` elements of `ty`) with activations already quantized to
/// [`vec_dot_type`]`(ty)`, using the best kernel of this CPU (see [`kernels`]).
pub fn vec_dot(ty: GgmlType, n: usize, w: &[u8], act: &[u8]) -> Result<f32, QuantError> {
    let k = kernels(ty).ok_or(QuantError::Unsupported(ty))?;
    check_row(ty, n, w.len(), "weights")?;
    check_row(k.act_ty, n, act.len(), "activations")?;
    Ok((k.vec_dot)(n, w, act))
}
