//! Multi-token dot products for prompt processing ("gemm" tiles).
//!
//! A [`GemmFn`] computes the dot products of one weight row with several tokens' quantized
//! activations, decoding each weight block once and using it for all of them (the single-row
//! `vec_dot` kernels re-decode every block for every token). Each result is **bit for bit**
//! what the [`TypeKernels::vec_dot`] kernel it was obtained for ([`gemm_for`]) gives for that
//! token: the integer block sums are the same integers and the float accumulation of every
//! token follows the single-row kernel operation for operation, so batched prompt processing
//! and token-by-token decoding agree exactly.
//!
//! ```
//! use powerinfer_quant::gemm::{act_scales, gemm_for};
//! use powerinfer_quant::{GgmlType, kernels, quantize_row, row_bytes};
//!
//! let n = 256;
//! let k = kernels(GgmlType::Q8_0).unwrap();
//! let mut w = vec![0u8; row_bytes(GgmlType::Q8_0, n).unwrap()];
//! quantize_row(GgmlType::Q8_0, &vec![0.5f32; n], &mut w)?;
//! let arb = row_bytes(k.act_ty, n).unwrap();
//! let mut acts = vec![0u8; 3 * arb];
//! for (t, a) in acts.chunks_exact_mut(arb).enumerate() {
//!     (k.quantize_act)(&vec![t as f32; n], a);
//! }
//! if let Some(gemm) = gemm_for(k) {
//!     let mut scales = Vec::new();
//!     act_scales(k, n, &acts, arb, 3, &mut scales);
//!     let mut out = [0.0f32; 3];
//!     gemm(n, &w, &acts, arb, &scales, &mut out);
//!     for (t, a) in acts.chunks_exact(arb).enumerate() {
//!         assert_eq!(out[t].to_bits(), (k.vec_dot)(n, &w, a).to_bits());
//!     }
//! }
//! # Ok::<(), powerinfer_quant::QuantError>(())
//! ```

use crate::TypeKernels;

#[cfg(target_arch = "x86_64")]
#[path = "gemm_x86.rs"]
mod x86;

/// `out[j] = vec_dot(n, w, &acts[j * act_stride..])` for every `j in 0..out.len()`.
///
/// `n` is the row length in elements (a multiple of the weight type's block size), `w` one
/// weight row (at least its `row_bytes`), `acts` the tokens' activations in the weight type's
/// vec_dot type, token `j` starting at byte `j * act_stride`. Like `vec_dot`, a hot-path
/// function pointer without per-call checks: buffers too short make it panic (never read out
/// of bounds).
///
/// `scales` holds what [`act_scales`] computes for these activations (the kernels of the formats
/// with Q8_0 activations read the activations' block scales from it, converted once per product
/// instead of once per weight row); other kernels ignore it.
pub type GemmFn =
    fn(n: usize, w: &[u8], acts: &[u8], act_stride: usize, scales: &[f32], out: &mut [f32]);

/// The most tokens per call of a [`GemmRowsFn`].
pub const ROWS_TOKENS: usize = 8;

/// The tokens a [`GemmRowsFn`] multiplies: `n_tokens` (1 to [`ROWS_TOKENS`]) tokens'
/// activations in the weight type's `vec_dot` type, token `j` at byte `j * stride` of `acts`,
/// and what [`act_scales`] computed for them.
#[derive(Clone, Copy, Debug)]
pub struct GemmTokens<'a> {
    /// How many tokens (1 to [`ROWS_TOKENS`]).
    pub n_tokens: usize,
    /// The quantized activations.
    pub acts: &'a [u8],
    /// Bytes from one token's activations to the next's.
    pub stride: usize,
    /// [`act_scales`]' output for these tokens.
    pub scales: &'a [f32],
}

/// `out[j * out_stride + r] = vec_dot(n, row r, token j)` for the `n_rows` rows of `w` (row
/// `r` at byte `r * row_bytes`) and the `n_tokens` tokens of `tokens`: a [`GemmFn`] that
/// takes several weight rows per call, so each token's activation block is loaded once for
/// several rows and the per-token data shared by every row is prepared once per call. The
/// results come out token-major, as a matrix product's output is laid out. Bit for bit
/// `vec_dot`. Panics if `n_tokens` is 0 or above [`ROWS_TOKENS`], `n_rows > out_stride`, or
/// `out` is shorter than `(n_tokens - 1) * out_stride + n_rows`.
pub type GemmRowsFn = fn(
    n: usize,
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    tokens: GemmTokens<'_>,
    out: &mut [f32],
    out_stride: usize,
);

/// The most tokens a [`Dot4TokensFn`] takes.
pub const DOT4_TOKENS: usize = 4;

/// `out[j][r] = vec_dot(n, w[r], token j)` for four weight rows (anywhere in memory) and the
/// `n_tokens` (1 to [`DOT4_TOKENS`]) tokens of `tokens` (with [`act_scales`]' output, as for
/// a [`GemmRowsFn`]): each row's blocks decoded once for all the tokens, for decoding a few
/// sequences together. Bit for bit `vec_dot`. Entries past `n_tokens` are unspecified. Panics
/// if `n_tokens` is out of range or a buffer is too short.
pub type Dot4TokensFn =
    fn(n: usize, w: [&[u8]; 4], tokens: GemmTokens<'_>) -> [[f32; 4]; DOT4_TOKENS];

/// A [`Dot4TokensFn`] for `k`, if this build and CPU have one (x86-64 with AVX-512 VNNI: Q4_0,
/// Q4_1, Q5_0, Q8_0).
pub fn dot4_tokens_for(k: &TypeKernels) -> Option<Dot4TokensFn> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::dot4_tokens_for(k.ty, k.act_ty, k.name)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        None
    }
}

/// A single-row dot product (the signature of [`TypeKernels::vec_dot`]).
pub type DotFn = fn(n: usize, w: &[u8], act: &[u8]) -> f32;

/// Floats per token in [`act_scales`]' output for rows of `n` elements: two halves (block
/// scales `d`, then Q8_1's block sums `s`) of one float per 32-element block, each rounded up to
/// a multiple of 8.
pub fn scale_stride(n: usize) -> usize {
    2 * (n / 32).div_ceil(8) * 8
}

/// The per-token data a [`GemmFn`] for `k` reads besides the activations, into `out`
/// (replacing its contents), [`scale_stride`]`(n)` floats per token, zero-padded: for Q8_0
/// activations every block's f16 scale as f32 in the first half; for Q8_1 also every block's
/// f16 sum `s` in the second half; nothing for other activation types. `acts` holds
/// `n_tokens` tokens of `n` elements, token `j` at byte `j * act_stride`.
///
/// Panics if `acts` is too short.
pub fn act_scales(
    k: &TypeKernels,
    n: usize,
    acts: &[u8],
    act_stride: usize,
    n_tokens: usize,
    out: &mut Vec<f32>,
) {
    out.clear();
    let bsz = match k.act_ty {
        crate::GgmlType::Q8_0 => 34,
        crate::GgmlType::Q8_1 => 36,
        _ => return,
    };
    let (nb, ss) = (n / 32, scale_stride(n));
    out.resize(n_tokens * ss, 0.0);
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    for (t, dst) in out.chunks_exact_mut(ss).enumerate() {
        let a = &acts[t * act_stride..t * act_stride + bsz * nb];
        let (d, s) = dst.split_at_mut(ss / 2);
        for (i, blk) in a.chunks_exact(bsz).enumerate() {
            d[i] = f16(blk);
            if bsz == 36 {
                s[i] = f16(&blk[2..]);
            }
        }
    }
}

/// A multi-token kernel whose every output equals `k.vec_dot`'s bit for bit, if this build and
/// CPU have one for `k` (x86-64 AVX2 kernels of Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K, IQ4_NL and
/// IQ4_XS; the AVX-512 VNNI Q4_0 / Q8_0 dots compute the same integers, so they are covered
/// too).
pub fn gemm_for(k: &TypeKernels) -> Option<GemmFn> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::gemm_for(k.ty, k.act_ty, k.name)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        None
    }
}

/// A multi-row kernel ([`GemmRowsFn`]) for `k`, if this build and CPU have one (x86-64 with
/// AVX-512 VNNI: Q4_0, Q4_1, Q5_0, Q8_0). Its results are [`gemm_for`]'s, bit for bit.
pub fn gemm_rows_for(k: &TypeKernels) -> Option<GemmRowsFn> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::rows_for(k.ty, k.act_ty, k.name)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        None
    }
}

/// For types that llama.cpp's x86 build computes in a different float order for whole groups
/// of 4 prompt tokens than for single tokens (Q4_K, whose matrices it repacks into 8-row
/// groups: `ggml_gemm_q4_K_8x8_q8_K` accumulates one float per 64 elements where
/// `ggml_gemv_q4_K_8x8_q8_K`, which `k.vec_dot` follows, accumulates one per 256): a
/// multi-token kernel and a single-row dot in the grouped order. A batch of `n` tokens that
/// should match llama.cpp bit for bit uses these for its first `n - n % 4` tokens and the
/// ordinary kernels for the rest (and for decoding).
pub fn grouped_for(k: &TypeKernels) -> Option<(GemmFn, DotFn)> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::grouped_for(k.ty, k.act_ty, k.name)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        None
    }
}

/// Every multi-token kernel usable on this CPU for `k`, with its instruction set ("avx2",
/// "avx512vnni"), each bit for bit equal to `k.vec_dot` (for tests and benchmarks;
/// [`gemm_for`] picks the best).
pub fn gemm_variants(k: &TypeKernels) -> Vec<(&'static str, GemmFn)> {
    #[cfg(target_arch = "x86_64")]
    {
        x86::variants(k.ty, k.act_ty, k.name)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = k;
        Vec::new()
    }
}
