//! x86-64 kernels: AVX2 + FMA + F16C, and AVX-512 VNNI (256-bit `vpdpbusd`, mask moves) for
//! the Q4_0, Q4_1, Q5_0 and Q8_0 dots. Installed only after run-time feature detection.
//!
//! The Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q6_K, IQ4_NL and IQ4_XS dots reproduce
//! ggml-cpu's x86 `vec_dot` bit for bit: the same 8 integer lanes per block, one FMA per block
//! into 8 float lanes in block order, ggml's `hsum_float_8` at the end (Q4_1/Q5_1: the `m * s`
//! terms summed apart and added last; Q2_K: the mins' FMA before the scales' in each
//! super-block; IQ4_NL: even and odd blocks in two accumulators, an odd last block added in
//! scalar). Keep that order when changing them (`tests/ggml_oracle.rs` checks it against ggml,
//! `tests/kernels.rs` against scalar models of the order at many lengths). The Q4_K dot
//! reproduces what llama.cpp's x86 build really runs on Q4_K weights, its repacked gemv (one
//! float per super-block); see `dot_q4_k_avx2`.

use crate::GgmlType;
use crate::dispatch::TypeKernels;
use std::arch::x86_64::*;

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

fn set(t: &mut [TypeKernels], ty: GgmlType, name: &'static str, f: impl FnOnce(&mut TypeKernels)) {
    if let Some(k) = t.iter_mut().find(|k| k.ty == ty) {
        f(k);
        k.name = name;
    }
}

fn patch_avx2(t: &mut [TypeKernels]) {
    use GgmlType as T;
    let n = "avx2";
    set(t, T::F32, n, |k| k.vec_dot = dot_f32);
    set(t, T::F16, n, |k| {
        k.vec_dot = dot_f16;
        k.quantize_act = quant_f16;
    });
    set(t, T::BF16, n, |k| k.vec_dot = dot_bf16);
    set(t, T::Q4_0, n, |k| {
        k.vec_dot = dot_q4_0;
        k.vec_dot4 = Some(dot4_q4_0);
        k.quantize_act = quant_q8_0;
    });
    set(t, T::Q4_1, n, |k| {
        k.vec_dot = dot_q4_1;
        k.vec_dot4 = Some(dot4_q4_1);
        k.quantize_act = quant_q8_1;
    });
    set(t, T::Q5_0, n, |k| {
        k.vec_dot = dot_q5_0;
        k.quantize_act = quant_q8_0;
    });
    set(t, T::Q5_1, n, |k| {
        k.vec_dot = dot_q5_1;
        k.quantize_act = quant_q8_1;
    });
    set(t, T::Q8_0, n, |k| {
        k.vec_dot = dot_q8_0;
        k.vec_dot4 = Some(dot4_q8_0);
        k.quantize_act = quant_q8_0;
    });
    set(t, T::Q4_K, n, |k| {
        k.vec_dot = dot_q4_k;
        k.quantize_act = quant_q8_k;
    });
    set(t, T::Q5_K, n, |k| {
        k.vec_dot = dot_q5_k;
        k.quantize_act = quant_q8_k;
    });
    set(t, T::Q6_K, n, |k| {
        k.vec_dot = dot_q6_k;
        k.quantize_act = quant_q8_k;
    });
    set(t, T::Q2_K, n, |k| {
        k.vec_dot = dot_q2_k;
        k.quantize_act = quant_q8_k;
    });
    set(t, T::Q3_K, n, |k| {
        k.vec_dot = dot_q3_k;
        k.quantize_act = quant_q8_k;
    });
    set(t, T::IQ4_NL, n, |k| {
        k.vec_dot = dot_iq4_nl;
        k.quantize_act = quant_q8_0;
    });
    set(t, T::IQ4_XS, n, |k| {
        k.vec_dot = dot_iq4_xs;
        k.quantize_act = quant_q8_k;
    });
}

fn patch_vnni(t: &mut [TypeKernels]) {
    let n = "avx512vnni";
    set(t, GgmlType::Q4_0, n, |k| {
        k.vec_dot = dot_q4_0_vnni;
        k.vec_dot4 = Some(dot4_q4_0_vnni);
    });
    set(t, GgmlType::Q8_0, n, |k| {
        k.vec_dot = dot_q8_0_vnni;
        k.vec_dot4 = Some(dot4_q8_0_vnni);
    });
    set(t, GgmlType::Q4_1, n, |k| {
        k.vec_dot = dot_q4_1_vnni;
        k.vec_dot4 = Some(dot4_q4_1_vnni);
    });
    set(t, GgmlType::Q5_0, n, |k| k.vec_dot = dot_q5_0_vnni);
}

/// Patches `table` with the best kernels of this CPU, `forced` capping the level.
pub(crate) fn install(table: &mut [TypeKernels], forced: Option<&str>) -> &'static str {
    if !has_avx2() {
        return "scalar";
    }
    patch_avx2(table);
    if forced != Some("avx2") && has_vnni() {
        patch_vnni(table);
        return "avx512vnni";
    }
    "avx2"
}

/// Every x86 kernel set usable here, built on top of `base` (the scalar table).
pub(crate) fn variants(base: &[TypeKernels], out: &mut Vec<Vec<TypeKernels>>) {
    if has_avx2() {
        let mut t = base.to_vec();
        patch_avx2(&mut t);
        out.push(t.clone());
        if has_vnni() {
            patch_vnni(&mut t);
            out.push(t);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// helpers

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_ps(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// The sum of 8 i32 lanes (exact, wrapping like the vector adds).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_epi32(v: __m256i) -> i32 {
    hsum_epi32_128(_mm_add_epi32(
        _mm256_castsi256_si128(v),
        _mm256_extracti128_si256(v, 1),
    ))
}

/// The sum of 4 i32 lanes (exact, wrapping like the vector adds).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn hsum_epi32_128(v: __m128i) -> i32 {
    let s = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// Loads 32 bytes. Caller guarantees `b.len() >= off + 32`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn load32(b: &[u8], off: usize) -> __m256i {
    let s = &b[off..off + 32];
    // SAFETY: `s` is exactly 32 readable bytes; unaligned load.
    unsafe { _mm256_loadu_si256(s.as_ptr().cast()) }
}

/// 16 packed nibble bytes -> 32 bytes: low nibbles (elements 0..16), then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn nibbles32(b: &[u8], off: usize) -> __m256i {
    let s = &b[off..off + 16];
    // SAFETY: `s` is exactly 16 readable bytes; unaligned load.
    let t = unsafe { _mm_loadu_si128(s.as_ptr().cast()) };
    // One broadcast load and one variable shift (high half by 4) instead of shift + insert.
    let v = _mm256_srlv_epi32(
        _mm256_broadcastsi128_si256(t),
        _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4),
    );
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

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

/// Signed bytes x signed bytes, pairwise summed into 8 i32 as floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_i8_f32(x: __m256i, y: __m256i) -> __m256 {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    mul_u8_f32(ax, sy)
}

/// Unsigned bytes x signed bytes -> 8 i32 sums as floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_u8_f32(ax: __m256i, sy: __m256i) -> __m256 {
    let dot = _mm256_maddubs_epi16(ax, sy);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)))
}

/// The two f16 at `b[off..off + 4]` as f32 lanes 0 and 1 (`d` and `m`/`s` of a block).
///
/// A full 32-bit `vmovd` load: converting a lone u16 let LLVM merge the load into whatever
/// register held the loop accumulator (`vpinsrw`), a false dependency that serialised the
/// loop on the FMA latency (5x slower).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn h2x2(b: &[u8], off: usize) -> __m128 {
    let v = u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]]);
    _mm_cvtph_ps(_mm_cvtsi32_si128(v as i32))
}

/// `f16 d_x * f16 d_y` for up to 8 consecutive block pairs (`w`, `a` hold the blocks, of
/// `wsz` and `asz` bytes, scale first), converted 8 at a time with one `vcvtph2ps`.
///
/// Converting one scale per block with a scalar `vcvtph2ps` let LLVM merge the 16-bit load into
/// the loop accumulator's register (`vpinsrw`), a false dependency that serialised the loop.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dd8(w: &[u8], wsz: usize, a: &[u8], asz: usize) -> [f32; 8] {
    let mut hx = [0u16; 8];
    let mut hy = [0u16; 8];
    for (i, (x, y)) in w
        .chunks_exact(wsz)
        .zip(a.chunks_exact(asz))
        .take(8)
        .enumerate()
    {
        hx[i] = u16::from_le_bytes([x[0], x[1]]);
        hy[i] = u16::from_le_bytes([y[0], y[1]]);
    }
    let mut out = [0f32; 8];
    // SAFETY: `hx`/`hy` are 16 readable bytes each, `out` 32 writable bytes; unaligned ops.
    unsafe {
        let vx = _mm256_cvtph_ps(_mm_loadu_si128(hx.as_ptr().cast()));
        let vy = _mm256_cvtph_ps(_mm_loadu_si128(hy.as_ptr().cast()));
        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_mul_ps(vx, vy));
    }
    out
}

/// [`dd8`] for four rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dd8x4(w: [&[u8]; 4], wsz: usize, a: &[u8], asz: usize) -> [[f32; 8]; 4] {
    [
        dd8(w[0], wsz, a, asz),
        dd8(w[1], wsz, a, asz),
        dd8(w[2], wsz, a, asz),
        dd8(w[3], wsz, a, asz),
    ]
}

/// [`dd8x4`] for a group of 8 Q4_0 blocks (18 bytes each) with AVX-512 BW: the activation
/// scales converted once for the four rows, and each row's 8 scales picked out of its group's
/// first 128 bytes by one word permute instead of 8 scalar loads and stores (whose reload
/// missed store-to-load forwarding). The same products bit for bit. Groups of fewer than 8
/// blocks go to [`dd8`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
fn dd8x4_q4_0_bw(w: [&[u8]; 4], wsz: usize, a: &[u8], asz: usize) -> [[f32; 8]; 4] {
    debug_assert_eq!(wsz, 18);
    if w.iter().any(|r| r.len() < 8 * 18) || a.len() < 8 * asz {
        return dd8x4(w, wsz, a, asz);
    }
    let h = |off: usize| i16::from_le_bytes([a[off], a[off + 1]]);
    let dy = _mm256_cvtph_ps(_mm_setr_epi16(
        h(0),
        h(asz),
        h(2 * asz),
        h(3 * asz),
        h(4 * asz),
        h(5 * asz),
        h(6 * asz),
        h(7 * asz),
    ));
    // Word `9k` of the 128 bytes is block `k`'s f16 scale (byte 18k).
    let idx = _mm512_setr_epi32(
        9 << 16,
        (27 << 16) | 18,
        (45 << 16) | 36,
        (63 << 16) | 54,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    );
    let mut out = [[0f32; 8]; 4];
    for (o, r) in out.iter_mut().zip(w) {
        // SAFETY: `r` holds at least 144 readable bytes (checked above), `o` 32 writable
        // bytes; unaligned loads and store.
        unsafe {
            let lo = _mm512_loadu_si512(r.as_ptr().cast());
            let hi = _mm512_loadu_si512(r.as_ptr().add(64).cast());
            let hx = _mm512_castsi512_si128(_mm512_permutex2var_epi16(lo, idx, hi));
            _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(_mm256_cvtph_ps(hx), dy));
        }
    }
    out
}

/// Loops over the block pairs of a 32-element format in groups of 8 with their `dx * dy`.
macro_rules! blocks8 {
    ($n:expr, $w:expr, $wsz:expr, $act:expr, $asz:expr, |$x:ident, $y:ident, $d:ident| $body:block) => {{
        let nb = $n / 32;
        let (w, a) = (&$w[..nb * $wsz], &$act[..nb * $asz]);
        for (wc, ac) in w.chunks(8 * $wsz).zip(a.chunks(8 * $asz)) {
            let dd = dd8(wc, $wsz, ac, $asz);
            for (($x, $y), dv) in wc.chunks_exact($wsz).zip(ac.chunks_exact($asz)).zip(dd) {
                let $d = _mm256_set1_ps(dv);
                $body
            }
        }
    }};
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn f2h(v: f32) -> [u8; 2] {
    let h = _mm_cvtsi128_si32(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(v)));
    (h as u16).to_le_bytes()
}

macro_rules! safe_wrapper {
    ($name:ident, $inner:ident) => {
        fn $name(n: usize, w: &[u8], act: &[u8]) -> f32 {
            // SAFETY: installed only after `has_avx2()` (or stronger) succeeded at run time.
            unsafe { $inner(n, w, act) }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// float dots

safe_wrapper!(dot_f32, dot_f32_avx2);
safe_wrapper!(dot_f16, dot_f16_avx2);
safe_wrapper!(dot_bf16, dot_bf16_avx2);

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f32_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let (w, a) = (&w[..4 * n], &act[..4 * n]);
    let mut s = [_mm256_setzero_ps(); 4];
    let np = n & !31;
    let mut i = 0;
    while i < np {
        for (k, sk) in s.iter_mut().enumerate() {
            let o = 4 * (i + 8 * k);
            let x = _mm256_castsi256_ps(load32(w, o));
            let y = _mm256_castsi256_ps(load32(a, o));
            *sk = _mm256_fmadd_ps(x, y, *sk);
        }
        i += 32;
    }
    let t = _mm256_add_ps(_mm256_add_ps(s[0], s[2]), _mm256_add_ps(s[1], s[3]));
    let mut sum = hsum_ps(t) as f64;
    for j in np..n {
        let o = 4 * j;
        let x = f32::from_le_bytes([w[o], w[o + 1], w[o + 2], w[o + 3]]);
        let y = f32::from_le_bytes([a[o], a[o + 1], a[o + 2], a[o + 3]]);
        sum += (x * y) as f64;
    }
    sum as f32
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_f16x8(b: &[u8], off: usize) -> __m256 {
    let s = &b[off..off + 16];
    // SAFETY: `s` is exactly 16 readable bytes; unaligned load.
    _mm256_cvtph_ps(unsafe { _mm_loadu_si128(s.as_ptr().cast()) })
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_bf16x8(b: &[u8], off: usize) -> __m256 {
    let s = &b[off..off + 16];
    // SAFETY: `s` is exactly 16 readable bytes; unaligned load.
    let h = unsafe { _mm_loadu_si128(s.as_ptr().cast()) };
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
}

macro_rules! half_dot {
    ($fname:ident, $load:ident, $conv:expr) => {
        #[target_feature(enable = "avx2,fma,f16c")]
        fn $fname(n: usize, w: &[u8], act: &[u8]) -> f32 {
            let (w, a) = (&w[..2 * n], &act[..2 * n]);
            let mut s = [_mm256_setzero_ps(); 4];
            let np = n & !31;
            let mut i = 0;
            while i < np {
                for (k, sk) in s.iter_mut().enumerate() {
                    let o = 2 * (i + 8 * k);
                    *sk = _mm256_fmadd_ps($load(w, o), $load(a, o), *sk);
                }
                i += 32;
            }
            let t = _mm256_add_ps(_mm256_add_ps(s[0], s[2]), _mm256_add_ps(s[1], s[3]));
            let mut sum = hsum_ps(t) as f64;
            let conv: fn(u16) -> f32 = $conv;
            for j in np..n {
                let x = conv(u16::from_le_bytes([w[2 * j], w[2 * j + 1]]));
                let y = conv(u16::from_le_bytes([a[2 * j], a[2 * j + 1]]));
                sum += (x * y) as f64;
            }
            sum as f32
        }
    };
}

half_dot!(dot_f16_avx2, load_f16x8, crate::scalar::f16_bits_to_f32);
half_dot!(dot_bf16_avx2, load_bf16x8, crate::scalar::bf16_bits_to_f32);

fn quant_f16(src: &[f32], dst: &mut [u8]) {
    // SAFETY: installed only after `has_avx2()` (includes F16C) succeeded at run time.
    unsafe { quant_f16_avx2(src, dst) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn quant_f16_avx2(src: &[f32], dst: &mut [u8]) {
    let n = src.len().min(dst.len() / 2);
    let np = n & !7;
    let mut i = 0;
    while i < np {
        let s = &src[i..i + 8];
        let d = &mut dst[2 * i..2 * i + 16];
        // SAFETY: `s` holds 8 f32 and `d` 16 bytes; unaligned load and store.
        unsafe {
            let v = _mm256_loadu_ps(s.as_ptr());
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
            _mm_storeu_si128(d.as_mut_ptr().cast(), h);
        }
        i += 8;
    }
    crate::scalar::quantize_f16(&src[np..n], &mut dst[2 * np..2 * n]);
}

/// The loop of a four-row dot over 32-element blocks of `$wsz` bytes (f16 scale first) and
/// Q8_0 activations, in the float order of the one-row kernels: per group of 8 blocks each
/// row's `dx * dy` (as `blocks8!` computes them), per block `$shared` once from the activation
/// block `$y`, then for each row `$row` (with `$x` pointing at that row's block and `$s` the
/// shared value) gives the 8 float lanes that one FMA adds to that row's accumulator. Four
/// accumulator chains instead of one: a one-row kernel waits on its FMA's latency every block.
macro_rules! dot4_blocks {
    ($n:expr, $w:expr, $act:expr, $wsz:expr, |$y:ident| $shared:expr, |$x:ident, $s:ident| $row:expr) => {
        dot4_blocks!($n, $w, $act, $wsz, dd8x4, |$y| $shared, |$x, $s| $row)
    };
    ($n:expr, $w:expr, $act:expr, $wsz:expr, $dd:ident, |$y:ident| $shared:expr, |$x:ident, $s:ident| $row:expr) => {{
        let nb = $n / 32;
        let act = &$act[..nb * 34];
        let w = [
            &$w[0][..nb * $wsz],
            &$w[1][..nb * $wsz],
            &$w[2][..nb * $wsz],
            &$w[3][..nb * $wsz],
        ];
        let mut acc = [_mm256_setzero_ps(); 4];
        for (g, ac) in act.chunks(8 * 34).enumerate() {
            let at = g * 8 * $wsz..g * 8 * $wsz + ac.len() / 34 * $wsz;
            let wc = [
                &w[0][at.clone()],
                &w[1][at.clone()],
                &w[2][at.clone()],
                &w[3][at],
            ];
            let mut dd = $dd(wc, $wsz, ac, 34);
            // Keep the products in memory: each is then broadcast by a load (see `q8_family`).
            std::hint::black_box(&mut dd);
            let wp = [
                wc[0].as_ptr(),
                wc[1].as_ptr(),
                wc[2].as_ptr(),
                wc[3].as_ptr(),
            ];
            for (i, $y) in ac.chunks_exact(34).enumerate() {
                let $s = $shared;
                for r in 0..4 {
                    // Block `i` of this group: `wc[r]` holds as many blocks as `ac`, so the
                    // `$wsz` bytes at `$x` are inside it.
                    let $x = wp[r].wrapping_add($wsz * i);
                    let q: __m256 = $row;
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dd[r][i]), q, acc[r]);
                }
            }
        }
        [
            hsum_ps(acc[0]),
            hsum_ps(acc[1]),
            hsum_ps(acc[2]),
            hsum_ps(acc[3]),
        ]
    }};
}

/// The 32 nibbles of a Q4_0 / Q4_1 block's 16 bytes at `q` as bytes (as [`nibbles32`]).
///
/// # Safety
/// `q` must point at 16 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn nibbles32_at(q: *const u8) -> __m256i {
    // SAFETY: the caller's contract; unaligned load.
    let t = unsafe { _mm_loadu_si128(q.cast()) };
    let v = _mm256_srlv_epi32(
        _mm256_broadcastsi128_si256(t),
        _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4),
    );
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

// ---------------------------------------------------------------------------------------------
// 32-element block dots

safe_wrapper!(dot_q4_0, dot_q4_0_avx2);
safe_wrapper!(dot_q4_1, dot_q4_1_avx2);
safe_wrapper!(dot_q5_0, dot_q5_0_avx2);
safe_wrapper!(dot_q5_1, dot_q5_1_avx2);
safe_wrapper!(dot_q8_0, dot_q8_0_avx2);

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_0_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    blocks8!(n, w, 18, act, 34, |x, y, d| {
        let qx = _mm256_sub_epi8(nibbles32(x, 2), _mm256_set1_epi8(8));
        let q = mul_i8_f32(qx, load32(y, 2));
        acc = _mm256_fmadd_ps(d, q, acc);
    });
    hsum_ps(acc)
}

fn dot4_q4_0(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    // SAFETY: installed only after `has_avx2()` succeeded at run time.
    unsafe { dot4_q4_0_avx2(n, w, act) }
}

/// [`dot_q4_0_avx2`] on four rows (see `dot4_blocks!`): the same values bit for bit.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q4_0_avx2(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    dot4_blocks!(n, w, act, 18, |y| load32(y, 2), |x, qy| {
        // SAFETY: `x` points at a whole 18-byte block (see `dot4_blocks!`).
        let qx = unsafe { nibbles32_at(x.add(2)) };
        mul_i8_f32(_mm256_sub_epi8(qx, _mm256_set1_epi8(8)), qy)
    })
}

/// The loop of a four-row Q4_1 x Q8_1 dot: per block the activation's scales and integers
/// loaded once, then for each row the one-row kernels' operations in their order (`$prod` turns
/// the row's nibbles `$qx` and the activation bytes `$qy` into 8 float lanes), so each result
/// is the one-row kernel's bit for bit. Four accumulator chains instead of one.
macro_rules! dot4_q4_1 {
    ($n:expr, $w:expr, $act:expr, |$qx:ident, $qy:ident| $prod:expr) => {{
        let nb = $n / 32;
        let w = [
            &$w[0][..nb * 20],
            &$w[1][..nb * 20],
            &$w[2][..nb * 20],
            &$w[3][..nb * 20],
        ];
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summs = [_mm_setzero_ps(); 4];
        for (i, y) in $act.chunks_exact(36).take(nb).enumerate() {
            let hy = h2x2(y, 0);
            let $qy = load32(y, 4);
            for r in 0..4 {
                let x = &w[r][i * 20..(i + 1) * 20];
                // [dx * dy, mx * sy]
                let p = _mm_mul_ps(h2x2(x, 0), hy);
                summs[r] = _mm_add_ps(summs[r], p);
                let d = _mm256_broadcastss_ps(p);
                let $qx = nibbles32(x, 4);
                let q: __m256 = $prod;
                acc[r] = _mm256_fmadd_ps(d, q, acc[r]);
            }
        }
        [0, 1, 2, 3].map(|r| hsum_ps(acc[r]) + _mm_cvtss_f32(_mm_movehdup_ps(summs[r])))
    }};
}

fn dot4_q4_1(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    // SAFETY: installed only after `has_avx2()` succeeded at run time.
    unsafe { dot4_q4_1_avx2(n, w, act) }
}

/// [`dot_q4_1_avx2`] on four rows (see `dot4_q4_1!`): the same values bit for bit.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q4_1_avx2(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    dot4_q4_1!(n, w, act, |qx, qy| mul_u8_f32(qx, qy))
}

fn dot4_q8_0(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    // SAFETY: installed only after `has_avx2()` succeeded at run time.
    unsafe { dot4_q8_0_avx2(n, w, act) }
}

/// [`dot_q8_0_avx2`] on four rows (see `dot4_blocks!`): the same values bit for bit.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot4_q8_0_avx2(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    dot4_blocks!(n, w, act, 34, |y| load32(y, 2), |x, qy| {
        // SAFETY: `x` points at a whole 34-byte block (see `dot4_blocks!`).
        let qx = unsafe { _mm256_loadu_si256(x.add(2).cast()) };
        mul_i8_f32(qx, qy)
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_1_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = _mm_setzero_ps();
    for (x, y) in w.chunks_exact(20).zip(act.chunks_exact(36)).take(n / 32) {
        // [dx * dy, mx * sy]
        let p = _mm_mul_ps(h2x2(x, 0), h2x2(y, 0));
        summs = _mm_add_ps(summs, p);
        let d = _mm256_broadcastss_ps(p);
        let q = mul_u8_f32(nibbles32(x, 4), load32(y, 4));
        acc = _mm256_fmadd_ps(d, q, acc);
    }
    hsum_ps(acc) + _mm_cvtss_f32(_mm_movehdup_ps(summs))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5_0_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    blocks8!(n, w, 22, act, 34, |x, y, d| {
        let hi = _mm256_andnot_si256(bits32(x, 2), _mm256_set1_epi8(0xF0u8 as i8));
        let qx = _mm256_or_si256(nibbles32(x, 6), hi);
        let q = mul_i8_f32(qx, load32(y, 2));
        acc = _mm256_fmadd_ps(d, q, acc);
    });
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5_1_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = _mm_setzero_ps();
    for (x, y) in w.chunks_exact(24).zip(act.chunks_exact(36)).take(n / 32) {
        // [dx * dy, mx * sy]
        let p = _mm_mul_ps(h2x2(x, 0), h2x2(y, 0));
        summs = _mm_add_ps(summs, p);
        let d = _mm256_broadcastss_ps(p);
        let hi = _mm256_and_si256(bits32(x, 4), _mm256_set1_epi8(0x10));
        let qx = _mm256_or_si256(nibbles32(x, 8), hi);
        let q = mul_u8_f32(qx, load32(y, 4));
        acc = _mm256_fmadd_ps(d, q, acc);
    }
    hsum_ps(acc) + _mm_cvtss_f32(_mm_movehdup_ps(summs))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q8_0_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    blocks8!(n, w, 34, act, 34, |x, y, d| {
        let q = mul_i8_f32(load32(x, 2), load32(y, 2));
        acc = _mm256_fmadd_ps(d, q, acc);
    });
    hsum_ps(acc)
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI (256-bit) dots

fn dot_q4_0_vnni(n: usize, w: &[u8], act: &[u8]) -> f32 {
    // SAFETY: installed only after `has_vnni()` succeeded at run time.
    unsafe { dot_q4_0_vnni_impl(n, w, act) }
}

fn dot_q8_0_vnni(n: usize, w: &[u8], act: &[u8]) -> f32 {
    // SAFETY: installed only after `has_vnni()` succeeded at run time.
    unsafe { dot_q8_0_vnni_impl(n, w, act) }
}

fn dot_q4_1_vnni(n: usize, w: &[u8], act: &[u8]) -> f32 {
    // SAFETY: installed only after `has_vnni()` succeeded at run time.
    unsafe { dot_q4_1_vnni_impl(n, w, act) }
}

fn dot_q5_0_vnni(n: usize, w: &[u8], act: &[u8]) -> f32 {
    // SAFETY: installed only after `has_vnni()` succeeded at run time.
    unsafe { dot_q5_0_vnni_impl(n, w, act) }
}

/// [`dot_q4_1_avx2`] with `vpdpbusd` for the u8 x i8 products: the same 8 integer lanes (sums
/// of 4 consecutive products, no saturation possible), so the same result bit for bit.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot_q4_1_vnni_impl(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = _mm_setzero_ps();
    for (x, y) in w.chunks_exact(20).zip(act.chunks_exact(36)).take(n / 32) {
        // [dx * dy, mx * sy]
        let p = _mm_mul_ps(h2x2(x, 0), h2x2(y, 0));
        summs = _mm_add_ps(summs, p);
        let d = _mm256_broadcastss_ps(p);
        let q = _mm256_dpbusd_epi32(_mm256_setzero_si256(), nibbles32(x, 4), load32(y, 4));
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), acc);
    }
    hsum_ps(acc) + _mm_cvtss_f32(_mm_movehdup_ps(summs))
}

fn dot4_q4_1_vnni(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    // SAFETY: installed only after `has_vnni()` succeeded at run time.
    unsafe { dot4_q4_1_vnni_impl(n, w, act) }
}

/// [`dot_q4_1_vnni_impl`] on four rows: the activation block's scales and integers loaded once
/// for the four rows, then each row's operations exactly as the one-row kernel does them (the
/// same values bit for bit). Four accumulator chains instead of one: the one-row kernel waits
/// on its FMA's latency every block.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot4_q4_1_vnni_impl(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    dot4_q4_1!(n, w, act, |qx, qy| _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(
        _mm256_setzero_si256(),
        qx,
        qy
    )))
}

fn dot4_q8_0_vnni(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    // SAFETY: installed only after `has_vnni()` succeeded at run time.
    unsafe { dot4_q8_0_vnni_impl(n, w, act) }
}

/// [`dot_q8_0_vnni_impl`] on four rows (see `dot4_blocks!`): the same values bit for bit.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot4_q8_0_vnni_impl(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    dot4_blocks!(n, w, act, 34, |y| load32(y, 2), |x, qy| {
        // SAFETY: `x` points at a whole 34-byte block (see `dot4_blocks!`).
        let qx = unsafe { _mm256_loadu_si256(x.add(2).cast()) };
        let ax = _mm256_sign_epi8(qx, qx);
        let sy = _mm256_sign_epi8(qy, qx);
        _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy))
    })
}

/// [`dot_q5_0_avx2`] with the fifth bits expanded by a mask move and the products by
/// `vpdpbusd` (after ggml's sign trick): the same integer lanes and the same float order, so
/// the same result bit for bit. (512-bit registers, two blocks at a time, measured no faster on
/// Zen 4, which splits them into two 256-bit halves.)
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot_q5_0_vnni_impl(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let f0 = _mm256_set1_epi8(0xF0u8 as i8);
    blocks8!(n, w, 22, act, 34, |x, y, d| {
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        // Elements whose fifth bit is clear are nibble - 16: set their high nibble.
        let hi = _mm256_maskz_mov_epi8(!qh, f0);
        let qx = _mm256_or_si256(nibbles32(x, 6), hi);
        let ax = _mm256_sign_epi8(qx, qx);
        let sy = _mm256_sign_epi8(load32(y, 2), qx);
        let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
    });
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot_q4_0_vnni_impl(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let eight = _mm256_set1_epi8(8);
    blocks8!(n, w, 18, act, 34, |x, y, d| {
        let qy = load32(y, 2);
        // sum((q - 8) * y) = sum(q * y) - sum(8 * y), both as u8 x i8 products.
        let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), nibbles32(x, 2), qy);
        let m = _mm256_dpbusd_epi32(_mm256_setzero_si256(), eight, qy);
        let q = _mm256_cvtepi32_ps(_mm256_sub_epi32(p, m));
        acc = _mm256_fmadd_ps(d, q, acc);
    });
    hsum_ps(acc)
}

fn dot4_q4_0_vnni(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    // SAFETY: installed only after `has_vnni()` succeeded at run time.
    unsafe { dot4_q4_0_vnni_impl(n, w, act) }
}

/// [`dot_q4_0_vnni_impl`] on four rows: per block the activation load and the `8 * y` term
/// once for all rows, then each row's integers, float conversion and FMA exactly as the
/// one-row kernel does them (the same values bit for bit).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot4_q4_0_vnni_impl(n: usize, w: [&[u8]; 4], act: &[u8]) -> [f32; 4] {
    let eight = _mm256_set1_epi8(8);
    dot4_blocks!(
        n,
        w,
        act,
        18,
        dd8x4_q4_0_bw,
        |y| {
            let qy = load32(y, 2);
            (qy, _mm256_dpbusd_epi32(_mm256_setzero_si256(), eight, qy))
        },
        |x, s| {
            // SAFETY: `x` points at a whole 18-byte block (see `dot4_blocks!`).
            let qx = unsafe { nibbles32_at(x.add(2)) };
            let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), qx, s.0);
            _mm256_cvtepi32_ps(_mm256_sub_epi32(p, s.1))
        }
    )
}

#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn dot_q8_0_vnni_impl(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    blocks8!(n, w, 34, act, 34, |x, y, d| {
        let qx = load32(x, 2);
        let ax = _mm256_sign_epi8(qx, qx);
        let sy = _mm256_sign_epi8(load32(y, 2), qx);
        let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(p), acc);
    });
    hsum_ps(acc)
}

// ---------------------------------------------------------------------------------------------
// K-quant dots

safe_wrapper!(dot_q4_k, dot_q4_k_avx2);
safe_wrapper!(dot_q5_k, dot_q5_k_avx2);
safe_wrapper!(dot_q6_k, dot_q6_k_avx2);

#[inline]
fn rd_f32(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Q4_K / Q5_K: the 8 six-bit scales (low 128 bits) and 8 mins (high 128 bits) as i16,
/// unpacked with 32-bit masks (the same bytes `get_scale_min_k4` yields).
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

/// Q4_K x Q8_K in the float order of llama.cpp's x86 build, which repacks Q4_K matrices into
/// 8-row groups (`ggml_gemv_q4_K_8x8_q8_K` / `ggml_gemm_q4_K_8x8_q8_K`, used whenever the
/// CPU has AVX2 and the row count is a multiple of 8): per super-block the exact integers
/// `sum_j sc_j (q_j . y_j)` and `sum_j m_j bsum_j`, each turned into one float and accumulated
/// with one FMA (`acc += I * (dx dy)`, `accm += M * (dmin dy)`), then `acc - accm`.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_k_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = 0f32;
    let mut accm = 0f32;
    let m4 = _mm256_set1_epi8(0x0F);
    for (x, y) in w.chunks_exact(144).zip(act.chunks_exact(292)).take(n / 256) {
        let yd = rd_f32(y, 0);
        let dm = h2x2(x, 0);
        let d = _mm_cvtss_f32(dm) * yd;
        let dmin = _mm_cvtss_f32(_mm_movehdup_ps(dm)) * yd;
        let sm = k4_scales_mins(&x[4..16]);
        let mins = hsum_epi32_128(k4_mins_dot(sm, y));
        accm = (mins as f32).mul_add(dmin, accm);
        let sc = _mm256_permute2x128_si256(sm, sm, 0x00);
        let mut sumi = _mm256_setzero_si256();
        macro_rules! chunk {
            ($c:expr) => {{
                let q4 = load32(x, 16 + 32 * $c);
                let lo = _mm256_and_si256(q4, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
                let pl = _mm256_maddubs_epi16(lo, load32(y, 4 + 64 * $c));
                let ph = _mm256_maddubs_epi16(hi, load32(y, 4 + 64 * $c + 32));
                let pl = _mm256_madd_epi16(bcast16!(sc, 2 * $c), pl);
                let ph = _mm256_madd_epi16(bcast16!(sc, 2 * $c + 1), ph);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }};
        }
        chunk!(0);
        chunk!(1);
        chunk!(2);
        chunk!(3);
        acc = (hsum_epi32(sumi) as f32).mul_add(d, acc);
    }
    acc - accm
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5_k_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0f32;
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    for (x, y) in w.chunks_exact(176).zip(act.chunks_exact(292)).take(n / 256) {
        let yd = rd_f32(y, 0);
        let dm = h2x2(x, 0);
        let d = _mm_cvtss_f32(dm) * yd;
        let dmin = _mm_cvtss_f32(_mm_movehdup_ps(dm)) * yd;
        let sm = k4_scales_mins(&x[4..16]);
        // ggml sums this block's min terms as one integer and adds `-dmin * sum` to a scalar
        // (contracted to one FMA by its build).
        summs = (-dmin).mul_add(hsum_epi32_128(k4_mins_dot(sm, y)) as f32, summs);
        let sc = _mm256_permute2x128_si256(sm, sm, 0x00);
        let mut hb = load32(x, 16);
        let mut sumi = _mm256_setzero_si256();
        macro_rules! chunk {
            ($c:expr) => {{
                let q4 = load32(x, 48 + 32 * $c);
                let h0 = _mm256_slli_epi16(_mm256_and_si256(hb, one), 4);
                let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), one), 4);
                hb = _mm256_srli_epi16(hb, 2);
                let lo = _mm256_or_si256(_mm256_and_si256(q4, m4), h0);
                let hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), h1);
                let pl = _mm256_maddubs_epi16(lo, load32(y, 4 + 64 * $c));
                let ph = _mm256_maddubs_epi16(hi, load32(y, 4 + 64 * $c + 32));
                let pl = _mm256_madd_epi16(bcast16!(sc, 2 * $c), pl);
                let ph = _mm256_madd_epi16(bcast16!(sc, 2 * $c + 1), ph);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }};
        }
        chunk!(0);
        chunk!(1);
        chunk!(2);
        chunk!(3);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc) + summs
}

/// [`dot_q5_k_avx2`] for `N` tokens of Q8_K activations (token `j` at byte `j * stride` of
/// `acts`): each super-block's 5-bit values and scales decoded once for all tokens, each
/// token's integer sums, FMA and minimum terms those of the one-row kernel, so the same bits.
/// For `gemm`'s multi-token driver (`_scales` unused: Q8_K carries f32 scales).
///
/// # Safety
/// Requires AVX2+FMA+F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q5_k_gemm_avx2<const N: usize>(
    n: usize,
    w: &[u8],
    acts: &[u8],
    stride: usize,
    _scales: &[f32],
) -> [f32; N] {
    let nb = n / 256;
    let ys: [&[u8]; N] = std::array::from_fn(|j| &acts[j * stride..j * stride + 292 * nb]);
    let mut acc = [_mm256_setzero_ps(); N];
    let mut summs = [0f32; N];
    let m4 = _mm256_set1_epi8(0x0F);
    let one = _mm256_set1_epi8(1);
    for (b, x) in w[..176 * nb].chunks_exact(176).enumerate() {
        let dm = h2x2(x, 0);
        let (xd, xmin) = (_mm_cvtss_f32(dm), _mm_cvtss_f32(_mm_movehdup_ps(dm)));
        let sm = k4_scales_mins(&x[4..16]);
        let sc = _mm256_permute2x128_si256(sm, sm, 0x00);
        // The 8 value vectors (low and high halves of 4 chunks) and their scales.
        let mut q = [_mm256_setzero_si256(); 8];
        let mut s = [_mm256_setzero_si256(); 8];
        let mut hb = load32(x, 16);
        for c in 0..4 {
            let q4 = load32(x, 48 + 32 * c);
            let h0 = _mm256_slli_epi16(_mm256_and_si256(hb, one), 4);
            let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), one), 4);
            hb = _mm256_srli_epi16(hb, 2);
            q[2 * c] = _mm256_or_si256(_mm256_and_si256(q4, m4), h0);
            q[2 * c + 1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), h1);
        }
        s[0] = bcast16!(sc, 0);
        s[1] = bcast16!(sc, 1);
        s[2] = bcast16!(sc, 2);
        s[3] = bcast16!(sc, 3);
        s[4] = bcast16!(sc, 4);
        s[5] = bcast16!(sc, 5);
        s[6] = bcast16!(sc, 6);
        s[7] = bcast16!(sc, 7);
        for j in 0..N {
            let y = &ys[j][292 * b..292 * (b + 1)];
            let yd = rd_f32(y, 0);
            let (d, dmin) = (xd * yd, xmin * yd);
            summs[j] = (-dmin).mul_add(hsum_epi32_128(k4_mins_dot(sm, y)) as f32, summs[j]);
            let mut sumi = _mm256_setzero_si256();
            for c in 0..4 {
                let pl = _mm256_maddubs_epi16(q[2 * c], load32(y, 4 + 64 * c));
                let ph = _mm256_maddubs_epi16(q[2 * c + 1], load32(y, 4 + 64 * c + 32));
                let pl = _mm256_madd_epi16(s[2 * c], pl);
                let ph = _mm256_madd_epi16(s[2 * c + 1], ph);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
            }
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc[j]);
        }
    }
    std::array::from_fn(|j| hsum_ps(acc[j]) + summs[j])
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q6_k_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(3);
    for (x, y) in w.chunks_exact(210).zip(act.chunks_exact(292)).take(n / 256) {
        // d is the block's last two bytes: load 206..210, take lane 1.
        let d = _mm_cvtss_f32(_mm_movehdup_ps(h2x2(x, 206))) * rd_f32(y, 0);
        let sc = &x[192..208];
        // SAFETY: `sc` is exactly 16 readable bytes; unaligned load.
        let sc16 = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(sc.as_ptr().cast()) });
        let mut sumi = _mm256_setzero_si256();
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
            // Scales 8h..8h+8 in both halves; pair k takes 2k (low half) and 2k+1 (high).
            let s8 = if h == 0 {
                _mm256_permute2x128_si256(sc16, sc16, 0x00)
            } else {
                _mm256_permute2x128_si256(sc16, sc16, 0x11)
            };
            for (k, vk) in v.iter().enumerate() {
                let p = _mm256_maddubs_epi16(*vk, load32(y, 4 + 128 * h + 32 * k));
                let lo = (((4 * k + 1) << 8) | (4 * k)) as i16;
                let hi = (((4 * k + 3) << 8) | (4 * k + 2)) as i16;
                let mask = _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo));
                let scv = _mm256_shuffle_epi8(s8, mask);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scv));
            }
        }
        // Remove the +32 offset: 32 * sum_j scale_j * bsum_j.
        let bs = &y[260..292];
        let bsum = load32(bs, 0);
        let off = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bsum), 5);
        sumi = _mm256_sub_epi32(sumi, off);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

// ---------------------------------------------------------------------------------------------
// Q2_K, Q3_K, IQ4_NL and IQ4_XS dots: ggml-cpu's `__AVX2__` `ggml_vec_dot_*` operation for
// operation in float (the same 8 integer lanes, the same FMAs in the same order, ggml's
// `hsum_float_8`), so the same results bit for bit.

safe_wrapper!(dot_q2_k, dot_q2_k_avx2);
safe_wrapper!(dot_q3_k, dot_q3_k_avx2);
safe_wrapper!(dot_iq4_nl, dot_iq4_nl_avx2);
safe_wrapper!(dot_iq4_xs, dot_iq4_xs_avx2);

/// Loads 16 bytes. Panics unless `b.len() >= off + 16`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load16(b: &[u8], off: usize) -> __m128i {
    let s = &b[off..off + 16];
    // SAFETY: `s` is exactly 16 readable bytes; unaligned load.
    unsafe { _mm_loadu_si128(s.as_ptr().cast()) }
}

/// Mask for `_mm256_shuffle_epi8` that broadcasts 16-bit lane `2k` of each 128-bit half to the
/// low half and lane `2k + 1` to the high half (ggml's `get_scale_shuffle_q3k(k)`): the
/// scales of the two 16-element sub-blocks of a 32-byte chunk.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scale_pair_shuffle(k: usize) -> __m256i {
    let lo = (((4 * k + 1) << 8) | (4 * k)) as i16;
    let hi = (((4 * k + 3) << 8) | (4 * k + 2)) as i16;
    _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo))
}

/// Q2_K x Q8_K: ggml's AVX2 `ggml_vec_dot_q2_K_q8_K`. Per super-block one FMA of
/// `-dmin * dy` with the 8 lanes of `mins . bsums`, then one of `d * dy` with the 8 integer
/// lanes of the scaled products; `hsum_float_8` at the end.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q2_k_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0xF);
    let shuf = [0, 1, 2, 3].map(|k| scale_pair_shuffle(k));
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.chunks_exact(84).zip(act.chunks_exact(292)).take(n / 256) {
        let yd = rd_f32(y, 0);
        let dm = h2x2(x, 80);
        let d = yd * _mm_cvtss_f32(dm);
        let dmin = -yd * _mm_cvtss_f32(_mm_movehdup_ps(dm));
        let ms = load16(x, 0);
        let mins = _mm256_cvtepi8_epi16(_mm_and_si128(_mm_srli_epi16(ms, 4), m4));
        let prod = _mm256_madd_epi16(mins, load32(y, 260));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(prod), acc);
        let all = _mm256_cvtepi8_epi16(_mm_and_si128(ms, m4));
        let scales = [
            _mm256_permute2x128_si256(all, all, 0x00),
            _mm256_permute2x128_si256(all, all, 0x11),
        ];
        let mut sumi = _mm256_setzero_si256();
        for (j, sc) in scales.iter().enumerate() {
            let q2 = load32(x, 16 + 32 * j);
            let q = [
                _mm256_and_si256(q2, m3),
                _mm256_and_si256(_mm256_srli_epi16(q2, 2), m3),
                _mm256_and_si256(_mm256_srli_epi16(q2, 4), m3),
                _mm256_and_si256(_mm256_srli_epi16(q2, 6), m3),
            ];
            let mut p = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                let p16 = _mm256_maddubs_epi16(q[k], load32(y, 4 + 128 * j + 32 * k));
                p[k] = _mm256_madd_epi16(_mm256_shuffle_epi8(*sc, shuf[k]), p16);
            }
            let s = _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3]));
            sumi = _mm256_add_epi32(sumi, s);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

/// Q3_K x Q8_K: ggml's AVX2 `ggml_vec_dot_q3_K_q8_K`. The 2-bit parts and the `- 4` of
/// elements without their high bit are multiplied apart (`maddubs` twice, subtracted in
/// 16 bits), scaled by the signed 6-bit scales into 8 integer lanes; one FMA of `d * dy` per
/// super-block; `hsum_float_8` at the end.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q3_k_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let m3 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    let zero = _mm256_setzero_si256();
    let shuf = [0, 1, 2, 3].map(|k| scale_pair_shuffle(k));
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.chunks_exact(110).zip(act.chunks_exact(292)).take(n / 256) {
        let d = rd_f32(y, 0) * _mm_cvtss_f32(_mm_movehdup_ps(h2x2(x, 106)));
        let sc8 = crate::scalar::q3k_scales(&x[96..108]);
        // SAFETY: `sc8` is 16 readable bytes; unaligned load.
        let all = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(sc8.as_ptr().cast()) });
        let scales = [
            _mm256_permute2x128_si256(all, all, 0x00),
            _mm256_permute2x128_si256(all, all, 0x11),
        ];
        let hbits = load32(x, 0);
        let mut sumi = _mm256_setzero_si256();
        for (j, sc) in scales.iter().enumerate() {
            let q3 = load32(x, 32 + 32 * j);
            let ql = [
                _mm256_and_si256(q3, m3),
                _mm256_and_si256(_mm256_srli_epi16(q3, 2), m3),
                _mm256_and_si256(_mm256_srli_epi16(q3, 4), m3),
                _mm256_and_si256(_mm256_srli_epi16(q3, 6), m3),
            ];
            let mut p = [_mm256_setzero_si256(); 4];
            for k in 0..4 {
                // 4 where the element's high bit (bit 4j + k of its hmask byte) is clear.
                let bit = _mm256_set1_epi8((1u8 << (4 * j + k)) as i8);
                let clear = _mm256_cmpeq_epi8(_mm256_and_si256(hbits, bit), zero);
                let qh = _mm256_and_si256(clear, four);
                let q8 = load32(y, 4 + 128 * j + 32 * k);
                let p16 = _mm256_sub_epi16(
                    _mm256_maddubs_epi16(ql[k], q8),
                    _mm256_maddubs_epi16(qh, q8),
                );
                p[k] = _mm256_madd_epi16(_mm256_shuffle_epi8(*sc, shuf[k]), p16);
            }
            let s = _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3]));
            sumi = _mm256_add_epi32(sumi, s);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

/// `kvalues_iq4nl` in both 128-bit halves (the table of [`iq4_values32`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn iq4_table() -> __m256i {
    let kv = &crate::blocks::KVALUES_IQ4NL;
    // SAFETY: `kv` is 16 readable bytes; unaligned load.
    _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(kv.as_ptr().cast()) })
}

/// The 32 values of an IQ4 sub-block (16 nibble bytes at `b[off..]`) looked up in `table`
/// ([`iq4_table`]): low nibbles (elements 0..16), then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) fn iq4_values32(table: __m256i, b: &[u8], off: usize) -> __m256i {
    _mm256_shuffle_epi8(table, nibbles32(b, off))
}

/// ggml's `mul_add_epi8`: signed bytes x signed bytes, adjacent pairs summed into 16 i16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn mul_add_i8(x: __m256i, y: __m256i) -> __m256i {
    _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// IQ4_NL x Q8_0: ggml's AVX2 `ggml_vec_dot_iq4_nl_q8_0`. Blocks in pairs, even blocks into
/// one 8-lane accumulator and odd ones into another (one FMA each), `hsum_float_8` of their
/// sum; an odd last block is added by ggml's scalar tail.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_iq4_nl_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let nb = n / 32;
    let np = nb & !1;
    let (w, a) = (&w[..nb * 18], &act[..nb * 34]);
    let table = iq4_table();
    let (mut acc1, mut acc2) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (wc, ac) in w[..np * 18].chunks(8 * 18).zip(a[..np * 34].chunks(8 * 34)) {
        let dd = dd8(wc, 18, ac, 34);
        for ((x2, y2), d2) in wc
            .chunks_exact(36)
            .zip(ac.chunks_exact(68))
            .zip(dd.chunks_exact(2))
        {
            let q1 = mul_i8_f32(iq4_values32(table, x2, 2), load32(y2, 2));
            let q2 = mul_i8_f32(iq4_values32(table, x2, 20), load32(y2, 36));
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d2[0]), q1, acc1);
            acc2 = _mm256_fmadd_ps(_mm256_set1_ps(d2[1]), q2, acc2);
        }
    }
    let mut sumf = hsum_ps(_mm256_add_ps(acc1, acc2));
    if np < nb {
        // ggml's scalar tail: a multiply and an add (its compiled code has no FMA here).
        let (x, y) = (&w[np * 18..], &a[np * 34..]);
        let d = crate::scalar::rd_f16(y, 0) * crate::scalar::rd_f16(x, 0);
        sumf += d * iq4_nl_isum(x, y) as f32;
    }
    sumf
}

/// The integer dot of one IQ4_NL block with one Q8_0 block.
#[inline]
pub(crate) fn iq4_nl_isum(x: &[u8], y: &[u8]) -> i32 {
    let kv = &crate::blocks::KVALUES_IQ4NL;
    let mut s = 0i32;
    for j in 0..16 {
        s += (y[2 + j] as i8 as i32) * kv[(x[2 + j] & 0xF) as usize] as i32;
        s += (y[18 + j] as i8 as i32) * kv[(x[2 + j] >> 4) as usize] as i32;
    }
    s
}

/// IQ4_XS x Q8_K: ggml's AVX2 `ggml_vec_dot_iq4_xs_q8_K`. Per super-block, even and odd
/// sub-blocks scaled into two sets of 8 integer lanes, summed, and one FMA of `dx * dy`;
/// `hsum_float_8` at the end.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_iq4_xs_avx2(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let table = iq4_table();
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.chunks_exact(136).zip(act.chunks_exact(292)).take(n / 256) {
        let d = _mm_cvtss_f32(h2x2(x, 0)) * rd_f32(y, 0);
        let mut sh = u16::from_le_bytes([x[2], x[3]]);
        let mut sumi = [_mm256_setzero_si256(); 2];
        for ib in (0..8).step_by(2) {
            let sl = x[4 + ib / 2];
            let ls = [
                ((sl & 0xF) as i16 | ((sh << 4) & 0x30) as i16) - 32,
                ((sl >> 4) as i16 | ((sh << 2) & 0x30) as i16) - 32,
            ];
            sh >>= 4;
            for h in 0..2 {
                let q4 = iq4_values32(table, x, 8 + 16 * (ib + h));
                let p16 = mul_add_i8(q4, load32(y, 4 + 32 * (ib + h)));
                let p = _mm256_madd_epi16(p16, _mm256_set1_epi16(ls[h]));
                sumi[h] = _mm256_add_epi32(p, sumi[h]);
            }
        }
        let s = _mm256_cvtepi32_ps(_mm256_add_epi32(sumi[0], sumi[1]));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), s, acc);
    }
    hsum_ps(acc)
}

// ---------------------------------------------------------------------------------------------
// activation quantizers

fn quant_q8_0(src: &[f32], dst: &mut [u8]) {
    // SAFETY: installed only after `has_avx2()` succeeded at run time.
    unsafe { quant_q8_x86::<false>(src, dst) }
}

fn quant_q8_1(src: &[f32], dst: &mut [u8]) {
    // SAFETY: installed only after `has_avx2()` succeeded at run time.
    unsafe { quant_q8_x86::<true>(src, dst) }
}

fn quant_q8_k(src: &[f32], dst: &mut [u8]) {
    // SAFETY: installed only after `has_avx2()` succeeded at run time.
    unsafe { quant_q8_k_avx2(src, dst) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load8f(x: &[f32], off: usize) -> __m256 {
    let s = &x[off..off + 8];
    // SAFETY: `s` holds 8 f32; unaligned load.
    unsafe { _mm256_loadu_ps(s.as_ptr()) }
}

/// Four vectors of 8 i32 (elements 0..32 in order) -> 32 i8 in order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pack32(i: [__m256i; 4]) -> __m256i {
    let a = _mm256_packs_epi32(i[0], i[1]);
    let b = _mm256_packs_epi32(i[2], i[3]);
    let c = _mm256_packs_epi16(a, b);
    _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn store32(b: &mut [u8], off: usize, v: __m256i) {
    let s = &mut b[off..off + 32];
    // SAFETY: `s` is exactly 32 writable bytes; unaligned store.
    unsafe { _mm256_storeu_si256(s.as_mut_ptr().cast(), v) }
}

/// ggml's x86 `quantize_row_q8_0` / `quantize_row_q8_1`: `id = 127/amax`, round half to even.
#[target_feature(enable = "avx2,fma,f16c")]
fn quant_q8_x86<const Q81: bool>(src: &[f32], dst: &mut [u8]) {
    let bsz = if Q81 { 36 } else { 34 };
    let qoff = if Q81 { 4 } else { 2 };
    let sign = _mm256_set1_ps(-0.0);
    for (x, b) in src.chunks_exact(32).zip(dst.chunks_exact_mut(bsz)) {
        let mut v = [load8f(x, 0), load8f(x, 8), load8f(x, 16), load8f(x, 24)];
        let mut m = _mm256_andnot_ps(sign, v[0]);
        for vk in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vk));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        let d = amax / 127.0;
        b[0..2].copy_from_slice(&f2h(d));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mul = _mm256_set1_ps(id);
        let mut q = [_mm256_setzero_si256(); 4];
        for k in 0..4 {
            v[k] = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(v[k], mul),
            );
            q[k] = _mm256_cvtps_epi32(v[k]);
        }
        if Q81 {
            let s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
            b[2..4].copy_from_slice(&f2h(d * hsum_epi32(s) as f32));
        }
        store32(b, qoff, pack32(q));
    }
}

/// `quantize_row_q8_K_ref`, vectorised, bit-exact.
#[target_feature(enable = "avx2,fma,f16c")]
fn quant_q8_k_avx2(src: &[f32], dst: &mut [u8]) {
    let sign = _mm256_set1_ps(-0.0);
    for (x, b) in src.chunks_exact(256).zip(dst.chunks_exact_mut(292)) {
        let mut m = _mm256_setzero_ps();
        for k in 0..32 {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, load8f(x, 8 * k)));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        let amax = _mm_cvtss_f32(m4);
        if amax == 0.0 || amax.is_nan() {
            // NaN input: leave it to the reference, which defines the behaviour.
            crate::scalar::quantize_q8_k(x, b);
            continue;
        }
        // The first element of largest magnitude, with its sign.
        let am = _mm256_set1_ps(amax);
        let mut max = amax;
        for k in 0..32 {
            let a = _mm256_andnot_ps(sign, load8f(x, 8 * k));
            let mask = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(a, am));
            if mask != 0 {
                max = x[8 * k + mask.trailing_zeros() as usize];
                break;
            }
        }
        let iscale = -127.0 / max;
        let mul = _mm256_set1_ps(iscale);
        let lim = _mm256_set1_epi32(127);
        for g in 0..8 {
            let mut q = [_mm256_setzero_si256(); 4];
            for (k, qk) in q.iter_mut().enumerate() {
                let v = _mm256_mul_ps(load8f(x, 32 * g + 8 * k), mul);
                let v = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                *qk = _mm256_min_epi32(_mm256_cvtps_epi32(v), lim);
            }
            let s0 = hsum_epi32(_mm256_add_epi32(q[0], q[1])) as i16;
            let s1 = hsum_epi32(_mm256_add_epi32(q[2], q[3])) as i16;
            b[260 + 4 * g..262 + 4 * g].copy_from_slice(&s0.to_le_bytes());
            b[262 + 4 * g..264 + 4 * g].copy_from_slice(&s1.to_le_bytes());
            store32(b, 4 + 32 * g, pack32(q));
        }
        b[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::scalar_kernels;

    /// xorshift64: a small seeded generator for test data.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn f(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    /// The AVX-512 VNNI kernels give exactly what the AVX2 ones give (both reproduce ggml's
    /// x86 order), and stay within float-reordering distance of the scalar reference, on raw
    /// random weight bytes and awkward block counts (odd, not multiples of 8).
    #[test]
    fn vnni_dots_equal_avx2_bit_for_bit() {
        if !has_vnni() {
            eprintln!("no AVX-512 VNNI here: skipped");
            return;
        }
        let mut rng = Rng(0x5EED_1234);
        let mut checked = 0;
        for ty in [
            GgmlType::Q4_0,
            GgmlType::Q4_1,
            GgmlType::Q5_0,
            GgmlType::Q8_0,
        ] {
            let sk = scalar_kernels(ty).unwrap();
            let mut t = [*sk];
            patch_avx2(&mut t);
            let a2 = t[0];
            patch_vnni(&mut t);
            let vn = t[0];
            assert_eq!((a2.name, vn.name), ("avx2", "avx512vnni"), "{ty}");
            for nb in [1usize, 2, 3, 7, 8, 9, 17, 20, 33] {
                let n = nb * 32;
                let mut w: Vec<u8> = (0..nb * ty.type_size()).map(|_| rng.next() as u8).collect();
                // Finite f16 scales (and mins) of moderate size.
                let ns = if ty == GgmlType::Q4_1 { 2 } else { 1 };
                for b in w.chunks_exact_mut(ty.type_size()) {
                    for k in 0..ns {
                        let h = half::f16::from_f32(rng.f() * 0.05).to_le_bytes();
                        b[2 * k..2 * k + 2].copy_from_slice(&h);
                    }
                }
                let x: Vec<f32> = (0..n).map(|_| rng.f() * 3.0).collect();
                let mut act = vec![0u8; nb * a2.act_ty.type_size()];
                (a2.quantize_act)(&x, &mut act);
                let want = (a2.vec_dot)(n, &w, &act);
                let got = (vn.vec_dot)(n, &w, &act);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{ty} nb={nb}: {got} vs {want}"
                );
                // Against the reference: only the float summation order differs.
                let (mut wd, mut ad) = (vec![0f32; n], vec![0f32; n]);
                (sk.dequantize)(&w, &mut wd);
                crate::dequantize_row(a2.act_ty, &act, &mut ad).unwrap();
                let mag: f32 = wd.iter().zip(&ad).map(|(p, q)| (p * q).abs()).sum();
                let s = (sk.vec_dot)(n, &w, &act);
                assert!(
                    (s - got).abs() <= 2e-6 * mag + 1e-30,
                    "{ty} nb={nb}: {got} vs {s}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 36);
    }
}
