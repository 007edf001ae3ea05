//! Run-time kernel selection.

use crate::{GgmlType, scalar};
use std::sync::OnceLock;

/// The hot-path kernels of one weight type.
///
/// Function pointers are chosen once (see [`kernels`]); calling them does no feature checks.
/// Lengths are not validated: `w` must hold `n / block_size(ty)` blocks of `ty` and `act`
/// as many elements of `act_ty`. Short slices make a kernel panic (slice indexing), never UB.
#[derive(Debug, Clone, Copy)]
pub struct TypeKernels {
    /// The weight type.
    pub ty: GgmlType,
    /// The activation type of the dot product (`vec_dot_type(ty)`).
    pub act_ty: GgmlType,
    /// Dot product of one weight row of `n` elements with `n` activations of `act_ty`.
    pub vec_dot: fn(n: usize, w: &[u8], act: &[u8]) -> f32,
    /// f32 activations -> `act_ty` blocks (`src.len()` elements; whole blocks only).
    pub quantize_act: fn(src: &[f32], dst: &mut [u8]),
    /// `ty` row -> f32 (as many whole blocks as both slices hold).
    pub dequantize: fn(src: &[u8], dst: &mut [f32]),
    /// Four rows at once, where the type has such a kernel here: `vec_dot4(n, [w0, w1, w2,
    /// w3], act)[i]` equals `vec_dot(n, wi, act)` bit for bit. It shares the activation loads
    /// and the per-block work that depends only on them across the rows and keeps four
    /// independent accumulator chains, so it computes more rows per cycle than four calls.
    pub vec_dot4: Option<Dot4Fn>,
    /// Which implementation: "scalar", "avx2", "avx512vnni", "neon".
    pub name: &'static str,
}

/// The signature of [`TypeKernels::vec_dot4`].
pub type Dot4Fn = fn(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4];

macro_rules! k {
    ($ty:ident, $act:ident, $dot:path, $qa:path, $dq:path) => {
        TypeKernels {
            ty: GgmlType::$ty,
            act_ty: GgmlType::$act,
            vec_dot: $dot,
            quantize_act: $qa,
            dequantize: $dq,
            vec_dot4: None,
            name: "scalar",
        }
    };
}

static SCALAR: [TypeKernels; 15] = [
    k!(
        F32,
        F32,
        scalar::vec_dot_f32,
        scalar::quantize_f32,
        scalar::dequantize_f32
    ),
    k!(
        F16,
        F16,
        scalar::vec_dot_f16,
        scalar::quantize_f16,
        scalar::dequantize_f16
    ),
    k!(
        BF16,
        BF16,
        scalar::vec_dot_bf16,
        scalar::quantize_bf16,
        scalar::dequantize_bf16
    ),
    k!(
        Q4_0,
        Q8_0,
        scalar::vec_dot_q4_0_q8_0,
        scalar::quantize_q8_0,
        scalar::dequantize_q4_0
    ),
    k!(
        Q4_1,
        Q8_1,
        scalar::vec_dot_q4_1_q8_1,
        scalar::quantize_q8_1,
        scalar::dequantize_q4_1
    ),
    k!(
        Q5_0,
        Q8_0,
        scalar::vec_dot_q5_0_q8_0,
        scalar::quantize_q8_0,
        scalar::dequantize_q5_0
    ),
    k!(
        Q5_1,
        Q8_1,
        scalar::vec_dot_q5_1_q8_1,
        scalar::quantize_q8_1,
        scalar::dequantize_q5_1
    ),
    k!(
        Q8_0,
        Q8_0,
        scalar::vec_dot_q8_0_q8_0,
        scalar::quantize_q8_0,
        scalar::dequantize_q8_0
    ),
    k!(
        Q2_K,
        Q8_K,
        scalar::vec_dot_q2_k_q8_k,
        scalar::quantize_q8_k,
        scalar::dequantize_q2_k
    ),
    k!(
        Q3_K,
        Q8_K,
        scalar::vec_dot_q3_k_q8_k,
        scalar::quantize_q8_k,
        scalar::dequantize_q3_k
    ),
    k!(
        Q4_K,
        Q8_K,
        scalar::vec_dot_q4_k_q8_k,
        scalar::quantize_q8_k,
        scalar::dequantize_q4_k
    ),
    k!(
        Q5_K,
        Q8_K,
        scalar::vec_dot_q5_k_q8_k,
        scalar::quantize_q8_k,
        scalar::dequantize_q5_k
    ),
    k!(
        Q6_K,
        Q8_K,
        scalar::vec_dot_q6_k_q8_k,
        scalar::quantize_q8_k,
        scalar::dequantize_q6_k
    ),
    k!(
        IQ4_NL,
        Q8_0,
        scalar::vec_dot_iq4_nl_q8_0,
        scalar::quantize_q8_0,
        scalar::dequantize_iq4_nl
    ),
    k!(
        IQ4_XS,
        Q8_K,
        scalar::vec_dot_iq4_xs_q8_k,
        scalar::quantize_q8_k,
        scalar::dequantize_iq4_xs
    ),
];

struct Best {
    level: &'static str,
    table: [TypeKernels; 15],
}

static BEST: OnceLock<Best> = OnceLock::new();

fn best() -> &'static Best {
    BEST.get_or_init(|| {
        let mut table = SCALAR;
        let forced = std::env::var("POWERINFER_SIMD").ok();
        let forced = forced
            .as_deref()
            .map(str::trim)
            .map(str::to_ascii_lowercase);
        let mut level = "scalar";
        if forced.as_deref() != Some("scalar") {
            #[cfg(target_arch = "x86_64")]
            {
                level = crate::x86::install(&mut table, forced.as_deref());
            }
            #[cfg(target_arch = "aarch64")]
            {
                level = crate::neon::install(&mut table);
            }
        }
        Best { level, table }
    })
}

/// The best kernels for weight type `ty` on this CPU, or `None` if `ty` has no dot product
/// here. Chosen once, at the first call, by run-time feature detection.
///
/// The environment variable `POWERINFER_SIMD` caps the choice: `scalar` forces the reference
/// kernels, `avx2` stops x86 at AVX2 (no AVX-512). It is read once, at the first call.
pub fn kernels(ty: GgmlType) -> Option<&'static TypeKernels> {
    best().table.iter().find(|k| k.ty == ty)
}

/// The plain scalar reference kernels for `ty` (bit-compatible with ggml's generic C code).
pub fn scalar_kernels(ty: GgmlType) -> Option<&'static TypeKernels> {
    SCALAR.iter().find(|k| k.ty == ty)
}

/// The highest instruction set the dispatcher selected ("scalar", "avx2", "avx512vnni",
/// "neon").
pub fn simd_level() -> &'static str {
    best().level
}

/// Every implementation of `ty`'s kernels usable on this CPU, the scalar reference first
/// (for tests and benchmarks; ignores `POWERINFER_SIMD`).
pub fn all_kernels(ty: GgmlType) -> Vec<TypeKernels> {
    #[allow(unused_mut)]
    let mut tables: Vec<Vec<TypeKernels>> = vec![SCALAR.to_vec()];
    #[cfg(target_arch = "x86_64")]
    crate::x86::variants(&SCALAR, &mut tables);
    #[cfg(target_arch = "aarch64")]
    crate::neon::variants(&SCALAR, &mut tables);
    let mut out: Vec<TypeKernels> = Vec::new();
    for t in tables {
        if let Some(k) = t.into_iter().find(|k| k.ty == ty)
            && out.iter().all(|o| o.name != k.name)
        {
            out.push(k);
        }
    }
    out
}
