//! x86-64 multi-token kernels (AVX2, and AVX-512 VNNI / VL). Each mirrors the single-row dot
//! of its type (in `x86.rs`) operation for operation per token, with the weight decoding
//! hoisted out of the token loop; the VNNI builds use `vpdpbusd` where the integers are the
//! same, and 8 tokens per call (32 vector registers).

use crate::GgmlType;
use crate::gemm::{DotFn, GemmFn, GemmRowsFn, GemmTokens, ROWS_TOKENS};
use crate::x86::{h2x2, hsum_epi32, hsum_epi32_128, hsum_ps, load32, nibbles32, q5_k_gemm_avx2};
use std::arch::x86_64::*;

/// Tokens per kernel call: 4 accumulators plus the decoded block fit the 16 ymm registers.
const NT: usize = 4;

/// Tokens per call of the AVX-512 VNNI kernels (32 vector registers).
const NT_VNNI: usize = 8;

fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

fn has_vnni() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

/// The AVX2 kernel for these kernels, if any.
fn avx2_for(ty: GgmlType, act_ty: GgmlType, name: &str) -> Option<GemmFn> {
    use GgmlType as T;
    if !has_avx2() {
        return None;
    }
    let f: GemmFn = match (ty, act_ty, name) {
        (T::Q4_0, T::Q8_0, "avx2" | "avx512vnni") => gemm_q4_0,
        (T::Q8_0, T::Q8_0, "avx2" | "avx512vnni") => gemm_q8_0,
        (T::Q5_0, T::Q8_0, "avx2" | "avx512vnni") => gemm_q5_0,
        (T::Q4_1, T::Q8_1, "avx2" | "avx512vnni") => gemm_q4_1,
        (T::Q4_K, T::Q8_K, "avx2") => gemm_q4_k,
        (T::Q6_K, T::Q8_K, "avx2") => gemm_q6_k,
        (T::IQ4_NL, T::Q8_0, "avx2") => gemm_iq4_nl,
        (T::IQ4_XS, T::Q8_K, "avx2") => gemm_iq4_xs,
        (T::Q5_K, T::Q8_K, "avx2") => gemm_q5_k,
        _ => return None,
    };
    Some(f)
}

/// The AVX-512 VNNI kernel for these kernels, if any (same integers, so same results).
fn vnni_for(ty: GgmlType, act_ty: GgmlType, name: &str) -> Option<GemmFn> {
    use GgmlType as T;
    if !has_vnni() {
        return None;
    }
    let f: GemmFn = match (ty, act_ty, name) {
        (T::Q4_0, T::Q8_0, "avx2" | "avx512vnni") => gemm_q4_0_vnni,
        (T::Q8_0, T::Q8_0, "avx2" | "avx512vnni") => gemm_q8_0_vnni,
        (T::Q5_0, T::Q8_0, "avx2" | "avx512vnni") => gemm_q5_0_vnni,
        (T::Q4_1, T::Q8_1, "avx2" | "avx512vnni") => gemm_q4_1_vnni,
        (T::Q4_K, T::Q8_K, "avx2") => gemm_q4_k_vnni,
        (T::Q6_K, T::Q8_K, "avx2") => gemm_q6_k_vnni,
        (T::IQ4_NL, T::Q8_0, "avx2") => gemm_iq4_nl_vnni,
        (T::IQ4_XS, T::Q8_K, "avx2") => gemm_iq4_xs_vnni,
        _ => return None,
    };
    Some(f)
}

/// The best kernel: VNNI where the dispatcher runs at that level (`POWERINFER_SIMD=avx2` caps
/// this too), else AVX2.
pub(super) fn gemm_for(ty: GgmlType, act_ty: GgmlType, name: &str) -> Option<GemmFn> {
    if crate::simd_level() == "avx512vnni"
        && let Some(f) = vnni_for(ty, act_ty, name)
    {
        return Some(f);
    }
    avx2_for(ty, act_ty, name)
}

/// The multi-row kernel for these kernels, if this CPU runs them at the AVX-512 VNNI level.
pub(super) fn rows_for(ty: GgmlType, act_ty: GgmlType, name: &str) -> Option<GemmRowsFn> {
    use GgmlType as T;
    if crate::simd_level() != "avx512vnni" || !has_vnni() {
        return None;
    }
    match (ty, act_ty, name) {
        (T::Q4_1, T::Q8_1, "avx2" | "avx512vnni") => Some(gemm_rows_q4_1_vnni),
        (T::Q4_0, T::Q8_0, "avx2" | "avx512vnni") => Some(gemm_rows_q4_0_vnni),
        (T::Q8_0, T::Q8_0, "avx2" | "avx512vnni") => Some(gemm_rows_q8_0_vnni),
        (T::Q5_0, T::Q8_0, "avx2" | "avx512vnni") => Some(gemm_rows_q5_0_vnni),
        _ => None,
    }
}

/// Every usable kernel, named.
pub(super) fn variants(ty: GgmlType, act_ty: GgmlType, name: &str) -> Vec<(&'static str, GemmFn)> {
    let mut v = Vec::new();
    if let Some(f) = avx2_for(ty, act_ty, name) {
        v.push(("avx2", f));
    }
    if let Some(f) = vnni_for(ty, act_ty, name) {
        v.push(("avx512vnni", f));
    }
    v
}

/// Runs `$kern::<$nt>` over groups of `$nt` tokens, then the rest in groups of 4, 2 and 1 (a
/// batch of 7 sequences decodes each weight block 3 times, not 7).
macro_rules! driver {
    ($name:ident, $kern:ident) => {
        driver!($name, $kern, NT);
    };
    ($name:ident, $kern:ident, $nt:expr) => {
        fn $name(n: usize, w: &[u8], acts: &[u8], stride: usize, scales: &[f32], out: &mut [f32]) {
            let ss = crate::gemm::scale_stride(n);
            let sc = |t: usize| scales.get(t * ss..).unwrap_or(&[]);
            let mut t = 0;
            while t + $nt <= out.len() {
                // SAFETY: handed out by `gemm_for` / `variants` only after the kernel's target
                // features were detected at run time.
                let r = unsafe { $kern::<{ $nt }>(n, w, &acts[t * stride..], stride, sc(t)) };
                out[t..t + $nt].copy_from_slice(&r);
                t += $nt;
            }
            if $nt > 4 && t + 4 <= out.len() {
                // SAFETY: as above.
                let r = unsafe { $kern::<4>(n, w, &acts[t * stride..], stride, sc(t)) };
                out[t..t + 4].copy_from_slice(&r);
                t += 4;
            }
            if $nt > 2 && t + 2 <= out.len() {
                // SAFETY: as above.
                let r = unsafe { $kern::<2>(n, w, &acts[t * stride..], stride, sc(t)) };
                out[t..t + 2].copy_from_slice(&r);
                t += 2;
            }
            while t < out.len() {
                // SAFETY: as above.
                let r = unsafe { $kern::<1>(n, w, &acts[t * stride..], stride, sc(t)) };
                out[t] = r[0];
                t += 1;
            }
        }
    };
}

driver!(gemm_q4_0, q4_0_avx2);
driver!(gemm_q8_0, q8_0_avx2);
driver!(gemm_q5_0, q5_0_avx2);
driver!(gemm_q4_1, q4_1_avx2);
driver!(gemm_q4_k, q4_k_avx2);
driver!(gemm_q6_k, q6_k_avx2);
driver!(gemm_iq4_nl, iq4_nl_avx2);
driver!(gemm_iq4_nl_vnni, iq4_nl_vnni, NT_VNNI);
driver!(gemm_iq4_xs, iq4_xs_avx2);
driver!(gemm_q5_k, q5_k_gemm_avx2);
driver!(gemm_iq4_xs_vnni, iq4_xs_vnni, NT_VNNI);
driver!(gemm_q4_0_vnni, q4_0_vnni, NT_VNNI);
driver!(gemm_q8_0_vnni, q8_0_vnni, NT_VNNI);
driver!(gemm_q5_0_vnni, q5_0_vnni, NT_VNNI);
driver!(gemm_q4_1_vnni, q4_1_vnni, NT_VNNI);
driver!(gemm_q4_k_vnni, q4_k_vnni, NT_VNNI);
driver!(gemm_q6_k_vnni, q6_k_vnni, NT_VNNI);

/// `[f(0), .., f(N - 1)]` as a plain loop (closures would not inherit the target features, and
/// `std::array::from_fn` did not inline into the kernels).
macro_rules! arr {
    ($n:expr, $init:expr, |$j:ident| $e:expr) => {{
        let mut a = [$init; $n];
        for $j in 0..$n {
            a[$j] = $e;
        }
        a
    }};
}

// ---------------------------------------------------------------------------------------------
// helpers (the same operations as the single-row kernels use)

/// 32 bits -> 32 bytes, 0xFF where the bit is set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bits32(b: &[u8], off: usize) -> __m256i {
    let x = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Unsigned bytes x signed bytes -> 8 i32 sums as floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_u8_f32(ax: __m256i, sy: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(ax, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
}

/// The token in each lane of [`transpose_mins`]' vectors.
const PERM: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// Eight tokens' 4 pair sums (`m[j]`, lane `c` = pair `c`) -> 4 vectors, vector `c` holding pair
/// `c` of every token, lane `l` for token `PERM[l]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose_mins(m: &[__m128i; 8]) -> [__m256i; 4] {
    let a01 = _mm256_set_m128i(m[1], m[0]);
    let a23 = _mm256_set_m128i(m[3], m[2]);
    let a45 = _mm256_set_m128i(m[5], m[4]);
    let a67 = _mm256_set_m128i(m[7], m[6]);
    let u0 = _mm256_unpacklo_epi32(a01, a23);
    let u1 = _mm256_unpackhi_epi32(a01, a23);
    let u2 = _mm256_unpacklo_epi32(a45, a67);
    let u3 = _mm256_unpackhi_epi32(a45, a67);
    [
        _mm256_unpacklo_epi64(u0, u2),
        _mm256_unpackhi_epi64(u0, u2),
        _mm256_unpacklo_epi64(u1, u3),
        _mm256_unpackhi_epi64(u1, u3),
    ]
}

/// `[sum(v[0]), .., sum(v[7])]`: each vector's 8 i32 lanes summed into one lane (exact,
/// wrapping like the vector adds).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn hsum8x8(v: &[__m256i; 8]) -> __m256i {
    let s01 = _mm256_hadd_epi32(v[0], v[1]);
    let s23 = _mm256_hadd_epi32(v[2], v[3]);
    let s45 = _mm256_hadd_epi32(v[4], v[5]);
    let s67 = _mm256_hadd_epi32(v[6], v[7]);
    let s0123 = _mm256_hadd_epi32(s01, s23);
    let s4567 = _mm256_hadd_epi32(s45, s67);
    _mm256_add_epi32(
        _mm256_permute2x128_si256(s0123, s4567, 0x20),
        _mm256_permute2x128_si256(s0123, s4567, 0x31),
    )
}

#[inline]
fn rd_f32(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

// ---------------------------------------------------------------------------------------------
// 32-element formats with Q8_0 activations: sum_b (dx * dy) * sum(qx * qy), 8-lane accumulator

/// A kernel for a format of 32-element blocks with an f16 scale first and signed values
/// (`$decode` turns block `$x` into 32 i8), against `N` tokens of Q8_0 activations:
/// `acc += (dx * dy) * sum(qx * qy)` per block, as the single-row kernels compute it.
macro_rules! q8_family {
    ($name:ident, $feat:literal, $mul:ident, $wsz:expr, |$x:ident| $decode:block) => {
        #[target_feature(enable = $feat)]
        fn $name<const N: usize>(
            n: usize,
            w: &[u8],
            acts: &[u8],
            stride: usize,
            scales: &[f32],
        ) -> [f32; N] {
            let mut acc = [_mm256_setzero_ps(); N];
            let nb = n / 32;
            let ss = crate::gemm::scale_stride(n);
            let ys: [&[u8]; N] = arr!(N, &[][..], |j| &acts[j * stride..j * stride + 34 * nb]);
            // Token j's activation scales as f32 (`act_scales`), 8 per group, zero-padded.
            let dys: [&[f32]; N] = arr!(N, &[][..], |j| &scales[j * ss..(j + 1) * ss]);
            // Raw pointers for the inner loop (bounds checks and slice reloads there cost as
            // much as the products): `ys[j]` holds the `34 * nb` bytes of `nb` blocks.
            let yp: [*const u8; N] = arr!(N, std::ptr::null(), |j| ys[j].as_ptr());
            let w = &w[..nb * $wsz];
            for (g, wc) in w.chunks($wsz * 8).enumerate() {
                // `dx * dy` of up to 8 blocks per token: the weight scales converted once for
                // all tokens, the activations' once per product (`act_scales`). Gathering both
                // per token and weight row took as long as the products.
                let dx = dx8(wc, $wsz);
                let mut dd: [[f32; 8]; N] = arr!(N, [0f32; 8], |j| mul8(dx, &dys[j][8 * g..]));
                // Keep the products in memory: each is then broadcast by a load instead of
                // being extracted from a register (two shuffles per block and token).
                std::hint::black_box(&mut dd);
                for (i, $x) in wc.chunks_exact($wsz).enumerate() {
                    let qx: __m256i = $decode;
                    let ax = _mm256_sign_epi8(qx, qx);
                    let yo = 34 * (8 * g + i);
                    for j in 0..N {
                        let d = _mm256_set1_ps(dd[j][i]);
                        // SAFETY: block `8g + i < nb`, so bytes `yo + 2 .. yo + 34` lie inside
                        // the `34 * nb` bytes `yp[j]` points to; unaligned load.
                        let qy = unsafe { _mm256_loadu_si256(yp[j].add(yo + 2).cast()) };
                        let sy = _mm256_sign_epi8(qy, qx);
                        acc[j] = _mm256_fmadd_ps(d, $mul(ax, sy), acc[j]);
                    }
                }
            }
            arr!(N, 0f32, |j| hsum_ps(acc[j]))
        }
    };
}

/// IQ4_NL against `N` tokens of Q8_0 activations, each token as `dot_iq4_nl_avx2` (ggml's
/// AVX2 order) computes it: blocks in pairs, the first of a pair into one 8-lane accumulator
/// and the second into another (one FMA of `dx * dy` each), `hsum(acc1 + acc2)`, then an odd
/// last block as a scalar multiply and add. Each pair's values are looked up once for all
/// tokens. (`$mul`: the integer products' kernel, `maddubs` or `vpdpbusd`: IQ4_NL's values
/// are at most 127 in magnitude, so they give the same integers.)
macro_rules! iq4_nl_family {
    ($name:ident, $feat:literal, $mul:ident) => {
        #[target_feature(enable = $feat)]
        fn $name<const N: usize>(
            n: usize,
            w: &[u8],
            acts: &[u8],
            stride: usize,
            scales: &[f32],
        ) -> [f32; N] {
            let nb = n / 32;
            let np = nb & !1;
            let ss = crate::gemm::scale_stride(n);
            let ys: [&[u8]; N] = arr!(N, &[][..], |j| &acts[j * stride..j * stride + 34 * nb]);
            let dys: [&[f32]; N] = arr!(N, &[][..], |j| &scales[j * ss..(j + 1) * ss]);
            let yp: [*const u8; N] = arr!(N, std::ptr::null(), |j| ys[j].as_ptr());
            let w = &w[..nb * 18];
            let table = crate::x86::iq4_table();
            let mut acc1 = [_mm256_setzero_ps(); N];
            let mut acc2 = [_mm256_setzero_ps(); N];
            for (g, wc) in w[..np * 18].chunks(18 * 8).enumerate() {
                let dx = dx8(wc, 18);
                let mut dd: [[f32; 8]; N] = arr!(N, [0f32; 8], |j| mul8(dx, &dys[j][8 * g..]));
                std::hint::black_box(&mut dd);
                for (p, x2) in wc.chunks_exact(36).enumerate() {
                    let q1 = crate::x86::iq4_values32(table, x2, 2);
                    let q2 = crate::x86::iq4_values32(table, x2, 20);
                    let (a1, a2) = (_mm256_sign_epi8(q1, q1), _mm256_sign_epi8(q2, q2));
                    let yo = 34 * (8 * g + 2 * p) + 2;
                    for j in 0..N {
                        // SAFETY: blocks `8g + 2p` and `8g + 2p + 1` are below `np <= nb`, so their 32
                        // quants at `yo` and `yo + 34` lie inside the `34 * nb` bytes `yp[j]` points to.
                        let (y1, y2) = unsafe {
                            (
                                _mm256_loadu_si256(yp[j].add(yo).cast()),
                                _mm256_loadu_si256(yp[j].add(yo + 34).cast()),
                            )
                        };
                        let p1 = $mul(a1, _mm256_sign_epi8(y1, q1));
                        let p2 = $mul(a2, _mm256_sign_epi8(y2, q2));
                        acc1[j] = _mm256_fmadd_ps(_mm256_set1_ps(dd[j][2 * p]), p1, acc1[j]);
                        acc2[j] = _mm256_fmadd_ps(_mm256_set1_ps(dd[j][2 * p + 1]), p2, acc2[j]);
                    }
                }
            }
            arr!(N, 0f32, |j| {
                let mut s = hsum_ps(_mm256_add_ps(acc1[j], acc2[j]));
                if np < nb {
                    let (x, y) = (&w[np * 18..], &ys[j][np * 34..]);
                    let d = crate::scalar::rd_f16(y, 0) * crate::scalar::rd_f16(x, 0);
                    s += d * crate::x86::iq4_nl_isum(x, y) as f32;
                }
                s
            })
        }
    };
}

iq4_nl_family!(iq4_nl_avx2, "avx2,fma,f16c", mul_u8_f32);
iq4_nl_family!(
    iq4_nl_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    mul_u8_f32_vnni
);

/// IQ4_XS against `N` tokens of Q8_K activations, each token as `dot_iq4_xs_avx2` (ggml's
/// AVX2 order) computes it: per super-block the sub-blocks' products scaled and summed as
/// integers into 8 lanes (exact in any order), one FMA of `dx * dy` into an 8-lane
/// accumulator, the horizontal sum at the end. Each sub-block's values and scale are looked up
/// once for all tokens.
macro_rules! iq4_xs_family {
    ($name:ident, $feat:literal) => {
        #[target_feature(enable = $feat)]
        fn $name<const N: usize>(
            n: usize,
            w: &[u8],
            acts: &[u8],
            stride: usize,
            _scales: &[f32],
        ) -> [f32; N] {
            let nb = n / 256;
            let ys: [&[u8]; N] = arr!(N, &[][..], |j| &acts[j * stride..j * stride + 292 * nb]);
            let table = crate::x86::iq4_table();
            let mut acc = [_mm256_setzero_ps(); N];
            for (b, x) in w[..136 * nb].chunks_exact(136).enumerate() {
                let dx = _mm_cvtss_f32(h2x2(x, 0));
                let sh = u16::from_le_bytes([x[2], x[3]]);
                let mut sumi = [_mm256_setzero_si256(); N];
                for ib in 0..8 {
                    let sl = (x[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
                    let ls = (sl as i16 | ((sh >> (2 * ib)) << 4 & 0x30) as i16) - 32;
                    let q4 = crate::x86::iq4_values32(table, x, 8 + 16 * ib);
                    let aq = _mm256_sign_epi8(q4, q4);
                    let lsv = _mm256_set1_epi16(ls);
                    for j in 0..N {
                        let y = load32(ys[j], 292 * b + 4 + 32 * ib);
                        let p16 = _mm256_maddubs_epi16(aq, _mm256_sign_epi8(y, q4));
                        sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(p16, lsv));
                    }
                }
                for j in 0..N {
                    let d = dx * rd_f32(ys[j], 292 * b);
                    let s = _mm256_cvtepi32_ps(sumi[j]);
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc[j]);
                }
            }
            arr!(N, 0f32, |j| hsum_ps(acc[j]))
        }
    };
}

iq4_xs_family!(iq4_xs_avx2, "avx2,fma,f16c");
iq4_xs_family!(
    iq4_xs_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);

/// The f16 scales (first two bytes) of up to 8 consecutive blocks of `wsz` bytes as f32
/// (zero for missing blocks).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dx8(w: &[u8], wsz: usize) -> __m256 {
    let mut hx = [0u16; 8];
    for (h, x) in hx.iter_mut().zip(w.chunks_exact(wsz)) {
        *h = u16::from_le_bytes([x[0], x[1]]);
    }
    // SAFETY: `hx` is 16 readable bytes; unaligned load.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(hx.as_ptr().cast()) })
}

/// `dx * dy[..8]` lane by lane: the f32 products the single-row kernels compute.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul8(dx: __m256, dy: &[f32]) -> [f32; 8] {
    let dy = &dy[..8];
    let mut out = [0f32; 8];
    // SAFETY: `dy` is exactly 8 readable floats, `out` 8 writable ones; unaligned ops.
    unsafe {
        _mm256_storeu_ps(
            out.as_mut_ptr(),
            _mm256_mul_ps(dx, _mm256_loadu_ps(dy.as_ptr())),
        )
    };
    out
}

/// Unsigned bytes x signed bytes -> 8 i32 sums as floats, with `vpdpbusd`: the same integers
/// as [`mul_u8_f32`] whenever `maddubs` does not saturate (never with weights of at most 7
/// bits, nor with Q8 weights and activations that avoid -128 pairs, as ggml's quantizers do).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn mul_u8_f32_vnni(ax: __m256i, sy: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy))
}

macro_rules! q4_0_decode {
    ($x:ident) => {
        _mm256_sub_epi8(nibbles32($x, 2), _mm256_set1_epi8(8))
    };
}
macro_rules! q5_0_decode {
    ($x:ident) => {{
        let hi = _mm256_andnot_si256(bits32($x, 2), _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles32($x, 6), hi)
    }};
}

q8_family!(q4_0_avx2, "avx2,fma,f16c", mul_u8_f32, 18, |x| {
    q4_0_decode!(x)
});
q8_family!(q8_0_avx2, "avx2,fma,f16c", mul_u8_f32, 34, |x| {
    load32(x, 2)
});
q8_family!(q5_0_avx2, "avx2,fma,f16c", mul_u8_f32, 22, |x| {
    q5_0_decode!(x)
});
q8_family!(
    q4_0_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    mul_u8_f32_vnni,
    18,
    |x| { q4_0_decode!(x) }
);
q8_family!(
    q8_0_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    mul_u8_f32_vnni,
    34,
    |x| { load32(x, 2) }
);
q8_family!(
    q5_0_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    mul_u8_f32_vnni,
    22,
    |x| {
        // Elements whose fifth bit is clear are nibble - 16: set their high nibble.
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        let hi = _mm256_maskz_mov_epi8(!qh, _mm256_set1_epi8(0xF0u8 as i8));
        _mm256_or_si256(nibbles32(x, 6), hi)
    }
);

/// `dd[j] = dx * dy` for the 8 blocks from `b0` on and every token `j` (its activation scales
/// at `scales[j * ss + b0..]`, as [`crate::gemm::act_scales`] lays them out): the `dx * dy`
/// products the one-row kernels form, for the multi-row kernels' tables.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_products<const N: usize>(
    dx: __m256,
    scales: &[f32],
    ss: usize,
    b0: usize,
    dd: &mut [[f32; 8]; N],
) {
    for (j, d) in dd.iter_mut().enumerate() {
        let dy = &scales[j * ss + b0..j * ss + b0 + 8];
        // SAFETY: `dy` is 8 readable floats, `d` 8 writable ones; unaligned load and store.
        unsafe {
            let p = _mm256_mul_ps(dx, _mm256_loadu_ps(dy.as_ptr()));
            _mm256_storeu_ps(d.as_mut_ptr(), p);
        }
    }
}

/// [`q8_family!`]'s kernel on `R` rows at once (AVX-512 VNNI, `N` tokens): each token's
/// activation block is loaded once for the `R` rows. Per token the same operations in the same
/// order as the one-row kernel, so the same bits. Writes `out[j * os + r]`.
macro_rules! q8_rows {
    ($name:ident, $wsz:expr, |$x:ident| $decode:block) => {
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        fn $name<const R: usize, const N: usize>(
            n: usize,
            w: [&[u8]; R],
            t: GemmTokens<'_>,
            out: &mut [f32],
            os: usize,
        ) {
            const { assert!(N >= 1 && N <= ROWS_TOKENS) };
            let (acts, stride, scales) = (t.acts, t.stride, t.scales);
            let nb = n / 32;
            let ss = crate::gemm::scale_stride(n);
            assert!(scales.len() >= N * ss);
            assert!(acts.len() >= (N - 1) * stride + 34 * nb);
            let w: [&[u8]; R] = arr!(R, &[][..], |r| &w[r][..$wsz * nb]);
            // Raw pointers in the inner loop: `yp[j]` holds `34 * nb` bytes (asserted above).
            let yp: [*const u8; N] = arr!(N, std::ptr::null(), |j| acts[j * stride..].as_ptr());
            let mut acc = [[_mm256_setzero_ps(); N]; R];
            let mut dd = [[[0f32; 8]; N]; R];
            for g in 0..nb.div_ceil(8) {
                let b0 = 8 * g;
                let cnt = (nb - b0).min(8);
                for r in 0..R {
                    let dx = dx8(&w[r][$wsz * b0..], $wsz);
                    scale_products(dx, scales, ss, b0, &mut dd[r]);
                }
                for i in 0..cnt {
                    let b = b0 + i;
                    let qx: [__m256i; R] = arr!(R, _mm256_setzero_si256(), |r| {
                        let $x = &w[r][$wsz * b..$wsz * (b + 1)];
                        $decode
                    });
                    let ax: [__m256i; R] = arr!(R, _mm256_setzero_si256(), |r| _mm256_sign_epi8(
                        qx[r], qx[r]
                    ));
                    let yo = 34 * b + 2;
                    for j in 0..N {
                        // SAFETY: block `b < nb`: the 32 bytes at `yo` lie inside the `34 * nb`
                        // bytes `yp[j]` points to; unaligned load.
                        let qy = unsafe { _mm256_loadu_si256(yp[j].add(yo).cast()) };
                        for r in 0..R {
                            let sy = _mm256_sign_epi8(qy, qx[r]);
                            let d = _mm256_set1_ps(dd[r][j][i]);
                            acc[r][j] = _mm256_fmadd_ps(d, mul_u8_f32_vnni(ax[r], sy), acc[r][j]);
                        }
                    }
                }
            }
            let out = &mut out[..(N - 1) * os + R];
            for r in 0..R {
                for j in 0..N {
                    out[j * os + r] = hsum_ps(acc[r][j]);
                }
            }
        }
    };
}

q8_rows!(q4_0_rows_vnni, 18, |x| { q4_0_decode!(x) });
q8_rows!(q8_0_rows_vnni, 34, |x| { load32(x, 2) });
q8_rows!(q5_0_rows_vnni, 22, |x| {
    let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
    let hi = _mm256_maskz_mov_epi8(!qh, _mm256_set1_epi8(0xF0u8 as i8));
    _mm256_or_si256(nibbles32(x, 6), hi)
});

/// The loop of the multi-row drivers: `pair` on rows `(r, r + 1)` for `r = 0, 2, ..`, each
/// pair's successor prefetched, then `single` on a last odd row; each gets the output from its
/// first row's column on (`out[j * out_stride + r..]`). Panics if `out` cannot hold `n_rows`
/// columns of `n_tokens` tokens at that stride.
#[allow(clippy::too_many_arguments)]
fn row_pairs(
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    n_tokens: usize,
    out: &mut [f32],
    out_stride: usize,
    mut pair: impl FnMut([&[u8]; 2], &mut [f32]),
    mut single: impl FnMut([&[u8]; 1], &mut [f32]),
) {
    assert!(n_rows <= out_stride && out.len() >= (n_tokens - 1) * out_stride + n_rows);
    let row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
    let mut r = 0;
    while r + 2 <= n_rows {
        if let Some(next) = w.get((r + PF_ROWS) * row_bytes..(r + PF_ROWS + 2) * row_bytes) {
            prefetch_lines(next);
        }
        pair([row(r), row(r + 1)], &mut out[r..]);
        r += 2;
    }
    if r < n_rows {
        single([row(r)], &mut out[r..]);
    }
}

/// `$body` with the const `$nt` equal to `$n` (1 to [`ROWS_TOKENS`]; panics otherwise): the
/// multi-row kernels are compiled once per token count.
macro_rules! with_tokens {
    ($n:expr, $nt:ident => $body:expr) => {
        match $n {
            1 => {
                const $nt: usize = 1;
                $body
            }
            2 => {
                const $nt: usize = 2;
                $body
            }
            3 => {
                const $nt: usize = 3;
                $body
            }
            4 => {
                const $nt: usize = 4;
                $body
            }
            5 => {
                const $nt: usize = 5;
                $body
            }
            6 => {
                const $nt: usize = 6;
                $body
            }
            7 => {
                const $nt: usize = 7;
                $body
            }
            8 => {
                const $nt: usize = 8;
                $body
            }
            n => panic!("a multi-row kernel takes 1 to {ROWS_TOKENS} tokens, not {n}"),
        }
    };
}

/// A [`crate::gemm::GemmRowsFn`] running `$kern` through [`row_pairs`].
macro_rules! rows_driver {
    ($name:ident, $kern:ident) => {
        fn $name(
            n: usize,
            w: &[u8],
            row_bytes: usize,
            n_rows: usize,
            t: GemmTokens<'_>,
            out: &mut [f32],
            out_stride: usize,
        ) {
            with_tokens!(t.n_tokens, NT => row_pairs(
                w,
                row_bytes,
                n_rows,
                NT,
                out,
                out_stride,
                |rows, o| {
                    // SAFETY: installed only after `has_vnni()` succeeded at run time.
                    unsafe { $kern::<2, NT>(n, rows, t, o, out_stride) }
                },
                |rows, o| {
                    // SAFETY: as above.
                    unsafe { $kern::<1, NT>(n, rows, t, o, out_stride) }
                },
            ));
        }
    };
}

rows_driver!(gemm_rows_q4_0_vnni, q4_0_rows_vnni);
rows_driver!(gemm_rows_q8_0_vnni, q8_0_rows_vnni);
rows_driver!(gemm_rows_q5_0_vnni, q5_0_rows_vnni);

/// Q4_1 (unsigned nibbles, `dx * dy` and `mx * sy` per block) against Q8_1 activations, as the
/// single-row kernel computes it: `acc += (dx * dy) * sum(qx * qy)` per block into 8 lanes, and
/// the `mx * sy` terms summed apart in block order. Per group of 8 blocks, the weight scales
/// and minimums are converted once for all tokens, and the products `dx * dy` and `mx * sy` of
/// the 8 blocks formed by one vector multiply per token from the scales `act_scales` converted;
/// the `mx * sy` products are transposed so that one vector add per block carries every
/// token's sum (lane `j`: token `j`).
macro_rules! q4_1_kernel {
    ($name:ident, $feat:literal, $mul:ident) => {
        #[target_feature(enable = $feat)]
        fn $name<const N: usize>(
            n: usize,
            w: &[u8],
            acts: &[u8],
            stride: usize,
            scales: &[f32],
        ) -> [f32; N] {
            const { assert!(N <= 8) };
            let mut acc = [_mm256_setzero_ps(); N];
            let mut summs = _mm256_setzero_ps();
            let nb = n / 32;
            let ss = crate::gemm::scale_stride(n);
            let ys: [&[u8]; N] = arr!(N, &[][..], |j| &acts[j * stride..j * stride + 36 * nb]);
            // Token j's `d` (first half) and `s` (second half) as f32 (`act_scales`).
            let dys: [&[f32]; N] = arr!(N, &[][..], |j| &scales[j * ss..(j + 1) * ss]);
            // Raw pointers in the inner loop (as in `q8_family`): `yp[j]` holds `36 * nb` bytes.
            let yp: [*const u8; N] = arr!(N, std::ptr::null(), |j| ys[j].as_ptr());
            let w = &w[..nb * 20];
            for (g, wc) in w.chunks(20 * 8).enumerate() {
                let (dx, mx) = q4_1_dm8(wc);
                let mut dd: [[f32; 8]; N] = arr!(N, [0f32; 8], |j| mul8(dx, &dys[j][8 * g..]));
                // In memory: broadcast by a load (see `q8_family`).
                std::hint::black_box(&mut dd);
                let mut mrow = [_mm256_setzero_ps(); 8];
                for j in 0..N {
                    let sy = &dys[j][ss / 2 + 8 * g..ss / 2 + 8 * g + 8];
                    // SAFETY: `sy` is 8 readable floats; unaligned load.
                    mrow[j] = _mm256_mul_ps(mx, unsafe { _mm256_loadu_ps(sy.as_ptr()) });
                }
                // mmt[i] lane j: token j's `mx * sy` of block 8 g + i.
                let mmt = transpose8x8(&mrow);
                for (i, x) in wc.chunks_exact(20).enumerate() {
                    let qx = nibbles32(x, 4);
                    let yo = 36 * (8 * g + i) + 4;
                    for j in 0..N {
                        let d = _mm256_set1_ps(dd[j][i]);
                        // SAFETY: block `8g + i < nb`: the 32 bytes at `yo` lie inside the
                        // `36 * nb` bytes `yp[j]` points to; unaligned load.
                        let qy = unsafe { _mm256_loadu_si256(yp[j].add(yo).cast()) };
                        acc[j] = _mm256_fmadd_ps(d, $mul(qx, qy), acc[j]);
                    }
                    summs = _mm256_add_ps(summs, mmt[i]);
                }
            }
            let mut s = [0f32; 8];
            // SAFETY: `s` is 8 writable floats; unaligned store.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), summs) };
            arr!(N, 0f32, |j| hsum_ps(acc[j]) + s[j])
        }
    };
}

/// The f16 scales `d` and minimums `m` (bytes 0..4) of up to 8 consecutive Q4_1 blocks as f32
/// vectors (zero for missing blocks), inserted into registers one by one (building them in a
/// stack array costs a failed store-to-load forwarding per group; an AVX2 gather is slower
/// still, and two masked AVX-512 loads with a word permutation measured the same).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn q4_1_dm8(w: &[u8]) -> (__m256, __m256) {
    let count = (w.len() / 20).min(8);
    let mut dm = _mm256_setzero_si256();
    macro_rules! lane {
        ($($i:literal)*) => {$(
            if $i < count {
                let x = &w[20 * $i..20 * $i + 4];
                let v = i32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                dm = _mm256_insert_epi32::<$i>(dm, v);
            }
        )*};
    }
    lane!(0 1 2 3 4 5 6 7);
    let d = _mm256_and_si256(dm, _mm256_set1_epi32(0xFFFF));
    let m = _mm256_srli_epi32::<16>(dm);
    // Per 128-bit lane [d0..d3, m0..m3 | d4..d7, m4..m7], then [d0..d7 | m0..m7].
    let p = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi32(d, m));
    (
        _mm256_cvtph_ps(_mm256_castsi256_si128(p)),
        _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(p)),
    )
}

/// The transpose of 8 vectors of 8 floats: lane `j` of output `i` is lane `i` of input `j`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn transpose8x8(r: &[__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

// ---------------------------------------------------------------------------------------------
// Several weight rows against 8 tokens

/// Blocks per row the multi-row kernels take (their per-call table of the tokens' Q8_1 sums
/// lives on the stack); longer rows go row by row through the one-row drivers.
const ROWS_MAX_BLOCKS: usize = 256;
const _: () = assert!(ROWS_MAX_BLOCKS.is_multiple_of(8));

/// [`q4_1_vnni`] on `R` rows at once: each token's activation block is loaded once for the `R`
/// rows, and the `mx * sy` terms are summed from `syt` (the tokens' block sums transposed once
/// per call: `syt[b]` lane `j` = token `j`'s `s` of block `b`) with the row's `mx` moved into
/// every lane by a register permute (a scalar reload of a freshly stored vector missed
/// store-to-load forwarding once per block). Per token the same operations in the same order
/// as [`q4_1_vnni`], so the same bits.
// Index loops over the register arrays, as in the other kernels (they unroll into registers).
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_1_rows_vnni<const R: usize, const N: usize>(
    n: usize,
    w: [&[u8]; R],
    t: GemmTokens<'_>,
    syt: &[[f32; 8]],
    out: &mut [f32],
    os: usize,
) {
    const { assert!(N >= 1 && N <= ROWS_TOKENS) };
    let (acts, stride, scales) = (t.acts, t.stride, t.scales);
    let nb = n / 32;
    let ss = crate::gemm::scale_stride(n);
    assert!(syt.len() >= nb && scales.len() >= N * ss);
    assert!(acts.len() >= (N - 1) * stride + 36 * nb);
    let w: [&[u8]; R] = arr!(R, &[][..], |r| &w[r][..20 * nb]);
    // Raw pointers in the inner loop (as in `q8_family`): `yp[j]` holds `36 * nb` bytes.
    let yp: [*const u8; N] = arr!(N, std::ptr::null(), |j| acts[j * stride..].as_ptr());
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let mut summs = [_mm256_setzero_ps(); R];
    let mut dd = [[[0f32; 8]; N]; R];
    for g in 0..nb.div_ceil(8) {
        let b0 = 8 * g;
        let cnt = (nb - b0).min(8);
        for r in 0..R {
            let (dx, mx) = q4_1_dm8(&w[r][20 * b0..]);
            for i in 0..cnt {
                let m = _mm256_permutevar8x32_ps(mx, _mm256_set1_epi32(i as i32));
                // SAFETY: `syt[b0 + i]` is 8 readable floats; unaligned load.
                let sy = unsafe { _mm256_loadu_ps(syt[b0 + i].as_ptr()) };
                summs[r] = _mm256_add_ps(summs[r], _mm256_mul_ps(m, sy));
            }
            scale_products(dx, scales, ss, b0, &mut dd[r]);
        }
        for i in 0..cnt {
            let b = b0 + i;
            let qx: [__m256i; R] = arr!(R, _mm256_setzero_si256(), |r| nibbles32(
                &w[r][20 * b..20 * b + 20],
                4
            ));
            let yo = 36 * b + 4;
            for j in 0..N {
                // SAFETY: block `b < nb`: the 32 bytes at `yo` lie inside the `36 * nb` bytes
                // `yp[j]` points to (asserted above); unaligned load.
                let qy = unsafe { _mm256_loadu_si256(yp[j].add(yo).cast()) };
                for r in 0..R {
                    let d = _mm256_set1_ps(dd[r][j][i]);
                    acc[r][j] = _mm256_fmadd_ps(d, mul_u8_f32_vnni(qx[r], qy), acc[r][j]);
                }
            }
        }
    }
    let out = &mut out[..(N - 1) * os + R];
    for r in 0..R {
        for j in 0..N {
            let s = _mm256_permutevar8x32_ps(summs[r], _mm256_set1_epi32(j as i32));
            out[j * os + r] = hsum_ps(acc[r][j]) + _mm256_cvtss_f32(s);
        }
    }
}

/// Writes the transpose of the 8 x 8 floats at `src + j * stride` (token `j`, 8 blocks) to
/// `dst[0..8]` (block-major).
///
/// # Safety
/// The CPU has AVX2; the 64 floats read and the 8 rows written are in bounds.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transpose_sums(src: *const f32, stride: usize, dst: *mut [f32; 8]) {
    // SAFETY: the caller's bounds.
    let rows: [__m256; 8] = arr!(8, _mm256_setzero_ps(), |j| unsafe {
        _mm256_loadu_ps(src.add(j * stride))
    });
    for (i, v) in transpose8x8(&rows).into_iter().enumerate() {
        // SAFETY: the caller's bounds.
        unsafe { _mm256_storeu_ps(dst.add(i).cast(), v) };
    }
}

/// How many rows ahead the multi-row drivers prefetch (the next pair): the kernels are fast
/// enough for the hardware prefetcher to fall behind on rows coming from L3 or DRAM. On 35 MB
/// of Q4_1 rows against 8 tokens (one thread): 0.69 -> 0.58 ns per row, token and block; 4 or
/// 8 rows ahead, or a second request further on, measured slower, and in a batched SmolLM2
/// decode, L2 requests beat L1 ones (whose misses stalled on full miss queues).
const PF_ROWS: usize = 2;

/// Asks for every cache line of `b` to be brought into L2.
#[inline]
fn prefetch_lines(b: &[u8]) {
    for line in b.chunks(64) {
        // SAFETY: a prefetch is a hint; the address lies inside `b`.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(line.as_ptr().cast()) };
    }
}

/// The single-token four-row Q4_1 dot (`x86::dot4_q4_1_vnni_impl`) for `T` tokens at once:
/// per block each row's scales and nibbles are decoded once for the `T` tokens, then every
/// (row, token) pair takes exactly the one-row kernel's operations (`[dx * dy, mx * sy]` in one
/// multiply, the `mx * sy` lane summed apart, `(dx * dy) * sum(qx * qy)` into 8 lanes), so the
/// same bits. For few tokens it does less per row, token and block than [`q4_1_rows_vnni`],
/// whose per-row work (scales of 8 blocks, the transposed `mx * sy` terms) needs 8 tokens to
/// pay off. `out[t * os + r]`.
// Index loops over the register arrays, as in the other kernels (they unroll into registers).
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_1_dot4_tokens_vnni<const T: usize>(
    n: usize,
    w: [&[u8]; 4],
    t: GemmTokens<'_>,
    out: &mut [f32],
    os: usize,
) {
    let nb = n / 32;
    let w: [&[u8]; 4] = arr!(4, &[][..], |r| &w[r][..20 * nb]);
    let a: [&[u8]; T] = arr!(T, &[][..], |j| &t.acts
        [j * t.stride..j * t.stride + 36 * nb]);
    let mut acc = [[_mm256_setzero_ps(); 4]; T];
    let mut summs = [[_mm_setzero_ps(); 4]; T];
    for i in 0..nb {
        let hy: [__m128; T] = arr!(T, _mm_setzero_ps(), |j| h2x2(&a[j][36 * i..], 0));
        let qy: [__m256i; T] = arr!(T, _mm256_setzero_si256(), |j| load32(&a[j][36 * i..], 4));
        for r in 0..4 {
            let x = &w[r][20 * i..20 * i + 20];
            let hx = h2x2(x, 0);
            let qx = nibbles32(x, 4);
            for j in 0..T {
                // [dx * dy, mx * sy]
                let p = _mm_mul_ps(hx, hy[j]);
                summs[j][r] = _mm_add_ps(summs[j][r], p);
                let d = _mm256_broadcastss_ps(p);
                acc[j][r] = _mm256_fmadd_ps(d, mul_u8_f32_vnni(qx, qy[j]), acc[j][r]);
            }
        }
    }
    let out = &mut out[..(T - 1) * os + 4];
    for j in 0..T {
        for r in 0..4 {
            out[j * os + r] = hsum_ps(acc[j][r]) + _mm_cvtss_f32(_mm_movehdup_ps(summs[j][r]));
        }
    }
}

/// Four results per token, token after token, as [`crate::gemm::Dot4TokensFn`] returns them.
fn by_token(out: &[f32; 4 * crate::gemm::DOT4_TOKENS]) -> [[f32; 4]; crate::gemm::DOT4_TOKENS] {
    let mut r = [[0f32; 4]; crate::gemm::DOT4_TOKENS];
    for (dst, src) in r.iter_mut().zip(out.chunks_exact(4)) {
        dst.copy_from_slice(src);
    }
    r
}

/// A [`crate::gemm::Dot4TokensFn`]: [`q4_1_dot4_tokens_vnni`] for 1 to
/// [`crate::gemm::DOT4_TOKENS`] tokens.
fn dot4_tokens_q4_1_vnni(
    n: usize,
    w: [&[u8]; 4],
    t: GemmTokens<'_>,
) -> [[f32; 4]; crate::gemm::DOT4_TOKENS] {
    let mut out = [0f32; 4 * crate::gemm::DOT4_TOKENS];
    // SAFETY: installed only after `has_vnni()` succeeded at run time.
    unsafe {
        match t.n_tokens {
            1 => q4_1_dot4_tokens_vnni::<1>(n, w, t, &mut out, 4),
            2 => q4_1_dot4_tokens_vnni::<2>(n, w, t, &mut out, 4),
            3 => q4_1_dot4_tokens_vnni::<3>(n, w, t, &mut out, 4),
            4 => q4_1_dot4_tokens_vnni::<4>(n, w, t, &mut out, 4),
            k => panic!(
                "dot4_tokens: 1 to {} tokens, not {k}",
                crate::gemm::DOT4_TOKENS
            ),
        }
    }
    by_token(&out)
}

/// A four-row kernel for a few tokens ([`crate::gemm::dot4_tokens_for`]), if any.
pub(super) fn dot4_tokens_for(
    ty: GgmlType,
    act_ty: GgmlType,
    name: &str,
) -> Option<crate::gemm::Dot4TokensFn> {
    use GgmlType as T;
    if crate::simd_level() != "avx512vnni" || !has_vnni() {
        return None;
    }
    match (ty, act_ty, name) {
        (T::Q4_1, T::Q8_1, "avx2" | "avx512vnni") => Some(dot4_tokens_q4_1_vnni),
        (T::Q8_0, T::Q8_0, "avx2" | "avx512vnni") => Some(dot4_tokens_q8_0_vnni),
        (T::Q4_0, T::Q8_0, "avx2" | "avx512vnni") => Some(dot4_tokens_q4_0_vnni),
        (T::Q5_0, T::Q8_0, "avx2" | "avx512vnni") => Some(dot4_tokens_q5_0_vnni),
        _ => None,
    }
}

/// A [`crate::gemm::Dot4TokensFn`] running a [`q8_rows!`] kernel on four rows (their per-row
/// work is one scale conversion per 8 blocks, cheap for few tokens too).
macro_rules! q8_dot4_tokens {
    ($name:ident, $kern:ident) => {
        fn $name(
            n: usize,
            w: [&[u8]; 4],
            t: GemmTokens<'_>,
        ) -> [[f32; 4]; crate::gemm::DOT4_TOKENS] {
            let mut out = [0f32; 4 * crate::gemm::DOT4_TOKENS];
            // SAFETY: installed only after `has_vnni()` succeeded at run time.
            unsafe {
                match t.n_tokens {
                    1 => $kern::<4, 1>(n, w, t, &mut out, 4),
                    2 => $kern::<4, 2>(n, w, t, &mut out, 4),
                    3 => $kern::<4, 3>(n, w, t, &mut out, 4),
                    4 => $kern::<4, 4>(n, w, t, &mut out, 4),
                    k => panic!(
                        "dot4_tokens: 1 to {} tokens, not {k}",
                        crate::gemm::DOT4_TOKENS
                    ),
                }
            }
            by_token(&out)
        }
    };
}

q8_dot4_tokens!(dot4_tokens_q8_0_vnni, q8_0_rows_vnni);
q8_dot4_tokens!(dot4_tokens_q4_0_vnni, q4_0_rows_vnni);
q8_dot4_tokens!(dot4_tokens_q5_0_vnni, q5_0_rows_vnni);

/// Tokens up to which [`gemm_rows_q4_1_vnni`] takes [`q4_1_dot4_tokens_vnni`] (four rows at a
/// time) rather than [`q4_1_rows_vnni`].
const Q4_1_DOT4_MAX_TOKENS: usize = 3;

/// A [`crate::gemm::GemmRowsFn`]: [`q4_1_rows_vnni`] on pairs of rows (and a last single
/// row), each pair's successor prefetched; for up to [`Q4_1_DOT4_MAX_TOKENS`] tokens,
/// [`q4_1_dot4_tokens_vnni`] on four rows at a time first.
fn gemm_rows_q4_1_vnni(
    n: usize,
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    t: GemmTokens<'_>,
    out: &mut [f32],
    out_stride: usize,
) {
    let nt = t.n_tokens;
    assert!((1..=ROWS_TOKENS).contains(&nt));
    assert!(n_rows <= out_stride && out.len() >= (nt - 1) * out_stride + n_rows);
    let row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
    if nt <= Q4_1_DOT4_MAX_TOKENS {
        let mut r = 0;
        while r + 4 <= n_rows {
            if let Some(next) = w.get((r + 4) * row_bytes..(r + 8) * row_bytes) {
                prefetch_lines(next);
            }
            let rows = [row(r), row(r + 1), row(r + 2), row(r + 3)];
            let o = &mut out[r..];
            // SAFETY: installed only after `has_vnni()` succeeded at run time.
            unsafe {
                match nt {
                    1 => q4_1_dot4_tokens_vnni::<1>(n, rows, t, o, out_stride),
                    2 => q4_1_dot4_tokens_vnni::<2>(n, rows, t, o, out_stride),
                    _ => q4_1_dot4_tokens_vnni::<3>(n, rows, t, o, out_stride),
                }
            }
            r += 4;
        }
        if r < n_rows {
            // The last rows (fewer than four).
            let rest = &w[r * row_bytes..];
            q4_1_rows_pairs(n, rest, row_bytes, n_rows - r, t, &mut out[r..], out_stride);
        }
        return;
    }
    q4_1_rows_pairs(n, w, row_bytes, n_rows, t, out, out_stride);
}

/// [`gemm_rows_q4_1_vnni`] with [`q4_1_rows_vnni`] on pairs of rows only.
fn q4_1_rows_pairs(
    n: usize,
    w: &[u8],
    row_bytes: usize,
    n_rows: usize,
    t: GemmTokens<'_>,
    out: &mut [f32],
    out_stride: usize,
) {
    let (scales, nt) = (t.scales, t.n_tokens);
    let nb = n / 32;
    let row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
    if nb > ROWS_MAX_BLOCKS {
        let mut o = [0f32; ROWS_TOKENS];
        for r in 0..n_rows {
            gemm_q4_1_vnni(n, row(r), t.acts, t.stride, scales, &mut o[..nt]);
            for (j, v) in o[..nt].iter().enumerate() {
                out[j * out_stride + r] = *v;
            }
        }
        return;
    }
    // The tokens' block sums, block-major: `syt[b][j]` = token `j`'s `s` of block `b` (zero
    // for the lanes of absent tokens).
    let ss = crate::gemm::scale_stride(n);
    let mut syt_buf = std::mem::MaybeUninit::<[[f32; 8]; ROWS_MAX_BLOCKS]>::uninit();
    let base = syt_buf.as_mut_ptr().cast::<[f32; 8]>();
    assert!(scales.len() >= nt * ss);
    if nt == ROWS_TOKENS {
        for g in 0..nb.div_ceil(8) {
            // SAFETY: `has_vnni()` succeeded before this kernel was handed out; the 8 groups
            // of 8 floats lie inside `scales` (checked above; each token's sums are
            // zero-padded to a multiple of 8), and blocks `8g..8g + 8` lie inside the buffer
            // (`ROWS_MAX_BLOCKS` is a multiple of 8 and `nb <= ROWS_MAX_BLOCKS`).
            unsafe { transpose_sums(scales.as_ptr().add(ss / 2 + 8 * g), ss, base.add(8 * g)) };
        }
    } else {
        for b in 0..nb {
            let mut v = [0f32; 8];
            for (j, x) in v[..nt].iter_mut().enumerate() {
                *x = scales[j * ss + ss / 2 + b];
            }
            // SAFETY: `b < nb <= ROWS_MAX_BLOCKS`.
            unsafe { base.add(b).write(v) };
        }
    }
    // SAFETY: the first `nb` entries were all written above.
    let syt = unsafe { std::slice::from_raw_parts(base.cast_const(), nb) };
    with_tokens!(nt, NT => row_pairs(
        w,
        row_bytes,
        n_rows,
        NT,
        out,
        out_stride,
        |rows, o| {
            // SAFETY: installed only after `has_vnni()` succeeded at run time.
            unsafe { q4_1_rows_vnni::<2, NT>(n, rows, t, syt, o, out_stride) }
        },
        |rows, o| {
            // SAFETY: as above.
            unsafe { q4_1_rows_vnni::<1, NT>(n, rows, t, syt, o, out_stride) }
        },
    ));
}

q4_1_kernel!(q4_1_avx2, "avx2,fma,f16c", mul_u8_f32);
q4_1_kernel!(
    q4_1_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni",
    mul_u8_f32_vnni
);

// ---------------------------------------------------------------------------------------------
// K-quants with Q8_K activations

/// Q4_K: the 8 six-bit scales (low 128 bits) and 8 mins (high 128 bits) as i16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k4_scales_mins(sc: &[u8]) -> __m256i {
    let r = |i: usize| u32::from_le_bytes([sc[i], sc[i + 1], sc[i + 2], sc[i + 3]]);
    let (u0, u1, u2) = (r(0), r(4), r(8));
    let scales_lo = u0 & 0x3f3f_3f3f;
    let scales_hi = (u2 & 0x0f0f_0f0f) | (((u0 >> 6) & 0x0303_0303) << 4);
    let mins_lo = u1 & 0x3f3f_3f3f;
    let mins_hi = ((u2 >> 4) & 0x0f0f_0f0f) | (((u1 >> 6) & 0x0303_0303) << 4);
    let v = _mm_set_epi32(
        mins_hi as i32,
        mins_lo as i32,
        scales_hi as i32,
        scales_lo as i32,
    );
    _mm256_cvtepu8_epi16(v)
}

/// 16 x i16 lanes all equal to 16-bit lane `j` of each 128-bit half of `v`.
macro_rules! bcast16 {
    ($v:expr, $j:expr) => {
        _mm256_shuffle_epi8(
            $v,
            _mm256_set1_epi16((((2 * $j + 1) << 8) | (2 * $j)) as i16),
        )
    };
}

/// `sum_j mins[j] * (bsum[2j] + bsum[2j+1])` as 4 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k4_mins_dot(sm: __m256i, y: &[u8]) -> __m128i {
    let bsums = load32(y, 260);
    let pairs = _mm_hadd_epi16(
        _mm256_castsi256_si128(bsums),
        _mm256_extracti128_si256(bsums, 1),
    );
    _mm_madd_epi16(_mm256_extracti128_si256(sm, 1), pairs)
}

/// The Q4_K kernel, compiled for each instruction set (`$feat`). `P = false`: one FMA per
/// super-block and token (llama.cpp's repacked gemv order, the `vec_dot` one); `P = true`: one
/// per pair of sub-blocks (64 elements), the order of llama.cpp's repacked gemm, which it uses
/// for whole groups of 4 prompt tokens ([`crate::gemm::grouped_for`]); with 8 tokens (AVX-512VL's
/// 32 vector registers) the grouped order runs one token per lane.
macro_rules! q4_k_kernel {
    ($name:ident, $pairs:ident, $imp:ident, $feat:literal) => {
        #[target_feature(enable = $feat)]
        fn $imp<const N: usize, const P: bool>(
            n: usize,
            w: &[u8],
            acts: &[u8],
            stride: usize,
        ) -> [f32; N] {
            let mut acc = [0f32; N];
            let mut accm = [0f32; N];
            // P with 8 tokens: token j's accumulator in lane j
            let mut acc8 = _mm256_setzero_ps();
            let mut accm8 = _mm256_setzero_ps();
            let m4 = _mm256_set1_epi8(0x0F);
            let ys: [&[u8]; N] = arr!(N, &[][..], |j| &acts[j * stride..]);
            for (b, x) in w.chunks_exact(144).take(n / 256).enumerate() {
                let yo = 292 * b;
                let y: [&[u8]; N] = arr!(N, &[][..], |j| &ys[j][yo..yo + 292]);
                let dm = h2x2(x, 0);
                let dx = _mm_cvtss_f32(dm);
                let mx = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                let d: [f32; N] = arr!(N, 0f32, |j| dx * rd_f32(y[j], 0));
                let sm = k4_scales_mins(&x[4..16]);
                if P && N == 8 {
                    // Eight tokens at once: lane l of `accm8` is token `PERM[l]`.
                    let m: [__m128i; 8] = arr!(8, _mm_setzero_si128(), |j| k4_mins_dot(sm, y[j]));
                    let dmin: [f32; 8] = arr!(8, 0f32, |l| mx * rd_f32(y[PERM[l]], 0));
                    // SAFETY: `dmin` holds 8 floats; unaligned load.
                    let dminv = unsafe { _mm256_loadu_ps(dmin.as_ptr()) };
                    for c in transpose_mins(&m) {
                        accm8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), dminv, accm8);
                    }
                }
                for j in 0..N {
                    if P && N == 8 {
                        break;
                    }
                    let dmin = mx * rd_f32(y[j], 0);
                    let mins = k4_mins_dot(sm, y[j]);
                    if P {
                        let mut lanes = [0i32; 4];
                        // SAFETY: `lanes` is 16 writable bytes; unaligned store.
                        unsafe { _mm_storeu_si128(lanes.as_mut_ptr().cast(), mins) };
                        for m in lanes {
                            accm[j] = (m as f32).mul_add(dmin, accm[j]);
                        }
                    } else {
                        accm[j] = (hsum_epi32_128(mins) as f32).mul_add(dmin, accm[j]);
                    }
                }
                let sc = _mm256_permute2x128_si256(sm, sm, 0x00);
                let mut sumi = [_mm256_setzero_si256(); N];
                let mut pairs = [_mm256_setzero_si256(); 8];
                macro_rules! chunk {
                    ($c:expr) => {{
                        let q4 = load32(x, 16 + 32 * $c);
                        let lo = _mm256_and_si256(q4, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
                        let sl = bcast16!(sc, 2 * $c);
                        let sh = bcast16!(sc, 2 * $c + 1);
                        for j in 0..N {
                            let pl = _mm256_maddubs_epi16(lo, load32(y[j], 4 + 64 * $c));
                            let ph = _mm256_maddubs_epi16(hi, load32(y[j], 4 + 64 * $c + 32));
                            let pl = _mm256_madd_epi16(sl, pl);
                            let ph = _mm256_madd_epi16(sh, ph);
                            let pair = _mm256_add_epi32(pl, ph);
                            if P && N != 8 {
                                acc[j] = (hsum_epi32(pair) as f32).mul_add(d[j], acc[j]);
                            } else if P {
                                pairs[j] = pair;
                            } else {
                                sumi[j] = _mm256_add_epi32(sumi[j], pair);
                            }
                        }
                        if P && N == 8 {
                            // Eight tokens' sums at once, one lane each: the same integers
                            // and the same per-token FMA as the scalar line above.
                            let sums = _mm256_cvtepi32_ps(hsum8x8(&pairs));
                            // SAFETY: `d` holds N == 8 floats; unaligned load.
                            let dv = unsafe { _mm256_loadu_ps(d.as_ptr()) };
                            acc8 = _mm256_fmadd_ps(sums, dv, acc8);
                        }
                    }};
                }
                chunk!(0);
                chunk!(1);
                chunk!(2);
                chunk!(3);
                if !P {
                    for j in 0..N {
                        acc[j] = (hsum_epi32(sumi[j]) as f32).mul_add(d[j], acc[j]);
                    }
                }
            }
            if P && N == 8 {
                // SAFETY: `acc` holds N == 8 floats; unaligned store.
                unsafe { _mm256_storeu_ps(acc.as_mut_ptr(), acc8) };
                let mut perm = [0f32; 8];
                // SAFETY: `perm` holds 8 floats; unaligned store.
                unsafe { _mm256_storeu_ps(perm.as_mut_ptr(), accm8) };
                for (l, &v) in perm.iter().enumerate() {
                    accm[PERM[l]] = v;
                }
            }
            arr!(N, 0f32, |j| acc[j] - accm[j])
        }

        #[target_feature(enable = $feat)]
        fn $name<const N: usize>(
            n: usize,
            w: &[u8],
            acts: &[u8],
            stride: usize,
            _scales: &[f32],
        ) -> [f32; N] {
            $imp::<N, false>(n, w, acts, stride)
        }

        #[target_feature(enable = $feat)]
        fn $pairs<const N: usize>(
            n: usize,
            w: &[u8],
            acts: &[u8],
            stride: usize,
            _scales: &[f32],
        ) -> [f32; N] {
            $imp::<N, true>(n, w, acts, stride)
        }
    };
}

q4_k_kernel!(q4_k_avx2, q4_k_pairs_avx2, q4_k_avx2_impl, "avx2,fma,f16c");
q4_k_kernel!(
    q4_k_vnni,
    q4_k_pairs_vnni,
    q4_k_vnni_impl,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);

driver!(gemm_q4_k_pairs, q4_k_pairs_avx2);
driver!(gemm_q4_k_pairs_vnni, q4_k_pairs_vnni, NT_VNNI);

/// Q4_K in llama.cpp's repacked-gemm order, one row: the single-token case of
/// `gemm_q4_k_pairs`.
fn dot_q4_k_pairs(n: usize, w: &[u8], act: &[u8]) -> f32 {
    // SAFETY: handed out by `grouped_for` only after AVX2/FMA/F16C were detected.
    unsafe { q4_k_avx2_impl::<1, true>(n, w, act, act.len())[0] }
}

/// The grouped-order kernels for these kernels, if llama.cpp's x86 build computes this type in
/// a different order for whole groups of 4 prompt tokens (Q4_K: its repacked gemm).
pub(super) fn grouped_for(ty: GgmlType, act_ty: GgmlType, name: &str) -> Option<(GemmFn, DotFn)> {
    if !matches!((ty, act_ty, name), (GgmlType::Q4_K, GgmlType::Q8_K, "avx2")) || !has_avx2() {
        return None;
    }
    let gemm: GemmFn = if crate::simd_level() == "avx512vnni" && has_vnni() {
        gemm_q4_k_pairs_vnni
    } else {
        gemm_q4_k_pairs
    };
    Some((gemm, dot_q4_k_pairs))
}

/// The Q6_K kernel, compiled for each instruction set (`$feat`): the same operations, but
/// AVX-512VL's 32 vector registers hold more tokens' accumulators.
macro_rules! q6_k_kernel {
    ($name:ident, $feat:literal) => {
        #[target_feature(enable = $feat)]
        fn $name<const N: usize>(
            n: usize,
            w: &[u8],
            acts: &[u8],
            stride: usize,
            _scales: &[f32],
        ) -> [f32; N] {
            let mut acc = [_mm256_setzero_ps(); N];
            let m4 = _mm256_set1_epi8(0x0F);
            let m2 = _mm256_set1_epi8(3);
            let ys: [&[u8]; N] = arr!(N, &[][..], |j| &acts[j * stride..]);
            for (b, x) in w.chunks_exact(210).take(n / 256).enumerate() {
                let yo = 292 * b;
                let y: [&[u8]; N] = arr!(N, &[][..], |j| &ys[j][yo..yo + 292]);
                // d is the block's last two bytes: load 206..210, take lane 1.
                let dx = _mm_cvtss_f32(_mm_movehdup_ps(h2x2(x, 206)));
                let sc = &x[192..208];
                // SAFETY: `sc` is exactly 16 readable bytes; unaligned load.
                let sc16 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(sc.as_ptr().cast()) });
                let mut sumi = [_mm256_setzero_si256(); N];
                for h in 0..2 {
                    let qa = load32(x, 64 * h);
                    let qb = load32(x, 64 * h + 32);
                    let qh = load32(x, 128 + 32 * h);
                    let hpart = |s: i32| -> __m256i {
                        let v = match s {
                            0 => qh,
                            2 => _mm256_srli_epi16(qh, 2),
                            4 => _mm256_srli_epi16(qh, 4),
                            _ => _mm256_srli_epi16(qh, 6),
                        };
                        _mm256_slli_epi16(_mm256_and_si256(v, m2), 4)
                    };
                    let v = [
                        _mm256_or_si256(_mm256_and_si256(qa, m4), hpart(0)),
                        _mm256_or_si256(_mm256_and_si256(qb, m4), hpart(2)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qa, 4), m4), hpart(4)),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qb, 4), m4), hpart(6)),
                    ];
                    let s8 = if h == 0 {
                        _mm256_permute2x128_si256(sc16, sc16, 0x00)
                    } else {
                        _mm256_permute2x128_si256(sc16, sc16, 0x11)
                    };
                    for (k, vk) in v.iter().enumerate() {
                        let lo = (((4 * k + 1) << 8) | (4 * k)) as i16;
                        let hi = (((4 * k + 3) << 8) | (4 * k + 2)) as i16;
                        let mask = _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo));
                        let scv = _mm256_shuffle_epi8(s8, mask);
                        for j in 0..N {
                            let p = _mm256_maddubs_epi16(*vk, load32(y[j], 4 + 128 * h + 32 * k));
                            sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(p, scv));
                        }
                    }
                }
                for j in 0..N {
                    // Remove the +32 offset: 32 * sum_j scale_j * bsum_j.
                    let bsum = load32(y[j], 260);
                    let off = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsum), 5);
                    let s = _mm256_sub_epi32(sumi[j], off);
                    let d = dx * rd_f32(y[j], 0);
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc[j]);
                }
            }
            arr!(N, 0f32, |j| hsum_ps(acc[j]))
        }
    };
}

q6_k_kernel!(q6_k_avx2, "avx2,fma,f16c");
q6_k_kernel!(
    q6_k_vnni,
    "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"
);
