//! Plain scalar reference kernels, following ggml's `*_ref` quantizers, `dequantize_row_*`
//! and the generic `ggml_vec_dot_*` functions operation for operation (no fused multiply-add,
//! same evaluation order), so results are bit-identical to ggml's reference C code.
//!
//! All functions work on raw little-endian byte slices and process as many whole blocks as
//! both slices hold; length validation is the caller's job (see the checked API in the crate
//! root).

// Index loops mirror ggml's C code line for line, which keeps the transcription reviewable.
#![allow(clippy::needless_range_loop)]

use crate::blocks::{QK, QK_K};
use half::f16;

// ---------------------------------------------------------------------------------------------
// small helpers

/// f16 bits -> f32, exact (normals, subnormals, infinities, NaN), branch-light and without
/// run-time feature checks: the exponent is rebiased by one multiplication by 2^112.
#[inline(always)]
pub fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    if em >= 0x7c00 {
        return f32::from_bits(sign | 0x7f80_0000 | ((em & 0x3ff) << 13));
    }
    let v = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000);
    f32::from_bits(v.to_bits() | sign)
}

#[inline(always)]
pub(crate) fn rd_f16(b: &[u8], off: usize) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes([b[off], b[off + 1]]))
}

#[inline(always)]
pub(crate) fn wr_f16(b: &mut [u8], off: usize, v: f32) {
    b[off..off + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// f32 -> bf16 bits exactly as ggml's `ggml_compute_fp32_to_bf16` (round to nearest even,
/// NaN forced quiet).
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let u = x.to_bits();
    if (u & 0x7fff_ffff) > 0x7f80_0000 {
        return ((u >> 16) | 64) as u16;
    }
    (u.wrapping_add(0x7fff + ((u >> 16) & 1)) >> 16) as u16
}

/// bf16 bits -> f32.
#[inline(always)]
pub fn bf16_bits_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// ggml's `nearest_int`: round to nearest, ties to even, via the 1.5 * 2^23 trick. Exact for
/// |x| <= 4194303; outside that range it returns garbage (as ggml does) but never panics.
#[inline(always)]
pub fn nearest_int(fval: f32) -> i32 {
    let val = fval + 12_582_912.0f32;
    let i = val.to_bits() as i32;
    (i & 0x007f_ffff) - 0x0040_0000
}

/// C `roundf` (round half away from zero) followed by the C float->int8 conversion, for
/// |x| < 128 (all callers). Written with truncating conversions because `f32::round` is a libm
/// call on baseline x86-64 (no SSE4.1), which made the scalar quantizers 5x slower.
#[inline(always)]
fn roundf_i8(x: f32) -> i8 {
    let t = x as i32; // truncation toward zero (cvttss2si)
    let f = x - t as f32; // exact for |x| < 2^23
    (t + (f >= 0.5) as i32 - (f <= -0.5) as i32) as i8
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K / Q5_K.
#[inline(always)]
pub(crate) fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// plain float types

/// F32 bytes -> f32.
pub fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (c, d) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

/// f32 -> F32 bytes.
pub fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (s, c) in src.iter().zip(dst.chunks_exact_mut(4)) {
        c.copy_from_slice(&s.to_le_bytes());
    }
}

/// F16 bytes -> f32.
pub fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (c, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *d = f16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

/// f32 -> F16 bytes (round to nearest even).
pub fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    for (s, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
        c.copy_from_slice(&f16::from_f32(*s).to_bits().to_le_bytes());
    }
}

/// BF16 bytes -> f32.
pub fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (c, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *d = bf16_bits_to_f32(u16::from_le_bytes([c[0], c[1]]));
    }
}

/// f32 -> BF16 bytes (ggml rounding).
pub fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (s, c) in src.iter().zip(dst.chunks_exact_mut(2)) {
        c.copy_from_slice(&f32_to_bf16_bits(*s).to_le_bytes());
    }
}

/// F32 dot, accumulated in f64 like ggml's scalar `ggml_vec_dot_f32`.
pub fn vec_dot_f32(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut s = 0f64;
    for (a, b) in w.chunks_exact(4).zip(act.chunks_exact(4)).take(n) {
        let a = f32::from_le_bytes([a[0], a[1], a[2], a[3]]);
        let b = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        s += (a * b) as f64;
    }
    s as f32
}

/// F16 x F16 dot, accumulated in f64 like ggml's scalar `ggml_vec_dot_f16`.
pub fn vec_dot_f16(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut s = 0f64;
    for (a, b) in w.chunks_exact(2).zip(act.chunks_exact(2)).take(n) {
        let a = f16_bits_to_f32(u16::from_le_bytes([a[0], a[1]]));
        let b = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
        s += (a * b) as f64;
    }
    s as f32
}

/// BF16 x BF16 dot, accumulated in f64 like ggml's scalar `ggml_vec_dot_bf16`.
pub fn vec_dot_bf16(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut s = 0f64;
    for (a, b) in w.chunks_exact(2).zip(act.chunks_exact(2)).take(n) {
        let a = bf16_bits_to_f32(u16::from_le_bytes([a[0], a[1]]));
        let b = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
        s += (a * b) as f64;
    }
    s as f32
}

// ---------------------------------------------------------------------------------------------
// 32-element formats: dequantize

/// Q4_0 -> f32.
pub fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(QK)) {
        let d = rd_f16(b, 0);
        for j in 0..16 {
            let q = b[2 + j];
            y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
            y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1 -> f32.
pub fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(QK)) {
        let d = rd_f16(b, 0);
        let m = rd_f16(b, 2);
        for j in 0..16 {
            let q = b[4 + j];
            y[j] = (q & 0xF) as f32 * d + m;
            y[j + 16] = (q >> 4) as f32 * d + m;
        }
    }
}

/// Q5_0 -> f32.
pub fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(QK)) {
        let d = rd_f16(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for j in 0..16 {
            let q = b[6 + j];
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            y[j] = (((q & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
            y[j + 16] = (((q >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1 -> f32.
pub fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(24).zip(dst.chunks_exact_mut(QK)) {
        let d = rd_f16(b, 0);
        let m = rd_f16(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        for j in 0..16 {
            let q = b[8 + j];
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            y[j] = ((q & 0xF) as u32 | h0) as f32 * d + m;
            y[j + 16] = ((q >> 4) as u32 | h1) as f32 * d + m;
        }
    }
}

/// Q8_0 -> f32.
pub fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(QK)) {
        let d = rd_f16(b, 0);
        for j in 0..QK {
            y[j] = (b[2 + j] as i8) as f32 * d;
        }
    }
}

/// Q8_1 -> f32 (ignores the stored sum).
pub fn dequantize_q8_1(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(36).zip(dst.chunks_exact_mut(QK)) {
        let d = rd_f16(b, 0);
        for j in 0..QK {
            y[j] = (b[4 + j] as i8) as f32 * d;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 32-element formats: reference quantizers (ggml quantize_row_*_ref)

/// Value with the largest magnitude (first one on ties), and that magnitude.
#[inline(always)]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// f32 -> Q4_0 (`quantize_row_q4_0_ref`).
pub fn quantize_q4_0(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(18)) {
        let (max, _) = signed_absmax(x);
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        wr_f16(b, 0, d);
        for j in 0..16 {
            let x0 = x[j] * id;
            let x1 = x[16 + j] * id;
            let q0 = ((x0 + 8.5) as i8).min(15) as u8;
            let q1 = ((x1 + 8.5) as i8).min(15) as u8;
            b[2 + j] = q0 | (q1 << 4);
        }
    }
}

/// f32 -> Q4_1 (`quantize_row_q4_1_ref`).
pub fn quantize_q4_1(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(20)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        wr_f16(b, 0, d);
        wr_f16(b, 2, min);
        for j in 0..16 {
            let x0 = (x[j] - min) * id;
            let x1 = (x[16 + j] - min) * id;
            let q0 = ((x0 + 0.5) as i8).min(15) as u8;
            let q1 = ((x1 + 0.5) as i8).min(15) as u8;
            b[4 + j] = q0 | (q1 << 4);
        }
    }
}

/// f32 -> Q5_0 (`quantize_row_q5_0_ref`).
pub fn quantize_q5_0(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(22)) {
        let (max, _) = signed_absmax(x);
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        wr_f16(b, 0, d);
        let mut qh = 0u32;
        for j in 0..16 {
            let x0 = x[j] * id;
            let x1 = x[16 + j] * id;
            let q0 = ((x0 + 16.5) as i8).min(31) as u8;
            let q1 = ((x1 + 16.5) as i8).min(31) as u8;
            b[6 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
        }
        b[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

/// f32 -> Q5_1 (`quantize_row_q5_1_ref`).
pub fn quantize_q5_1(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(24)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        wr_f16(b, 0, d);
        wr_f16(b, 2, min);
        let mut qh = 0u32;
        for j in 0..16 {
            let x0 = (x[j] - min) * id;
            let x1 = (x[16 + j] - min) * id;
            let q0 = (x0 + 0.5) as u8;
            let q1 = (x1 + 0.5) as u8;
            b[8 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4);
            qh |= (((q0 & 0x10) >> 4) as u32) << j;
            qh |= (((q1 & 0x10) >> 4) as u32) << (j + 16);
        }
        b[4..8].copy_from_slice(&qh.to_le_bytes());
    }
}

/// f32 -> Q8_0 (`quantize_row_q8_0_ref`: `d = amax/127`, `q = roundf(x/d)`).
pub fn quantize_q8_0(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(34)) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        wr_f16(b, 0, d);
        for j in 0..QK {
            b[2 + j] = roundf_i8(x[j] * id) as u8;
        }
    }
}

/// f32 -> Q8_1 (`quantize_row_q8_1_ref`: as Q8_0 plus `s = d * sum(q)`).
pub fn quantize_q8_1(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(36)) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        wr_f16(b, 0, d);
        let mut sum = 0i32;
        for j in 0..16 {
            let q0 = roundf_i8(x[j] * id);
            let q1 = roundf_i8(x[16 + j] * id);
            b[4 + j] = q0 as u8;
            b[4 + 16 + j] = q1 as u8;
            sum += q0 as i32 + q1 as i32;
        }
        wr_f16(b, 2, sum as f32 * d);
    }
}

/// f32 -> Q8_0 (`q81 = false`) or Q8_1 (`q81 = true`) exactly as ggml's x86 AVX2
/// `quantize_row_q8_0` / `quantize_row_q8_1` compute it (what llama.cpp runs on x86):
/// `id = 127 / amax` and round half to even. A scalar model of the fast path, for tests.
pub fn quantize_q8_ggml_x86(src: &[f32], dst: &mut [u8], q81: bool) {
    let bsz = if q81 { 36 } else { 34 };
    let qoff = if q81 { 4 } else { 2 };
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(bsz)) {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        wr_f16(b, 0, d);
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for j in 0..QK {
            let q = (x[j] * id).round_ties_even() as i32;
            sum += q;
            b[qoff + j] = q.clamp(-128, 127) as i8 as u8;
        }
        if q81 {
            wr_f16(b, 2, d * sum as f32);
        }
    }
}

/// f32 -> Q8_K (`quantize_row_q8_K_ref`: `iscale = -127/max` with the signed max, ties to
/// even, per-16 sums).
pub fn quantize_q8_k(src: &[f32], dst: &mut [u8]) {
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(292)) {
        let (max, amax) = signed_absmax(x);
        if amax == 0.0 {
            b.fill(0);
            continue;
        }
        let iscale = -127.0 / max;
        for j in 0..QK_K {
            b[4 + j] = nearest_int(iscale * x[j]).min(127) as i8 as u8;
        }
        for j in 0..16 {
            let s: i32 = (0..16).map(|i| b[4 + 16 * j + i] as i8 as i32).sum();
            b[260 + 2 * j..262 + 2 * j].copy_from_slice(&(s as i16).to_le_bytes());
        }
        b[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
    }
}

// ---------------------------------------------------------------------------------------------
// 32-element formats: dots (ggml generic vec_dot)

/// Q4_0 x Q8_0.
pub fn vec_dot_q4_0_q8_0(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(18).zip(act.chunks_exact(34)).take(n / QK) {
        let mut s0 = 0i32;
        let mut s1 = 0i32;
        for j in 0..16 {
            let v0 = (x[2 + j] & 0xF) as i32 - 8;
            let v1 = (x[2 + j] >> 4) as i32 - 8;
            s0 += v0 * (y[2 + j] as i8 as i32);
            s1 += v1 * (y[2 + 16 + j] as i8 as i32);
        }
        sumf += (s0 + s1) as f32 * rd_f16(x, 0) * rd_f16(y, 0);
    }
    sumf
}

/// Q4_1 x Q8_1.
pub fn vec_dot_q4_1_q8_1(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(20).zip(act.chunks_exact(36)).take(n / QK) {
        let mut s0 = 0i32;
        let mut s1 = 0i32;
        for j in 0..16 {
            s0 += (x[4 + j] & 0xF) as i32 * (y[4 + j] as i8 as i32);
            s1 += (x[4 + j] >> 4) as i32 * (y[4 + 16 + j] as i8 as i32);
        }
        sumf += (rd_f16(x, 0) * rd_f16(y, 0)) * (s0 + s1) as f32 + rd_f16(x, 2) * rd_f16(y, 2);
    }
    sumf
}

/// Q5_0 x Q8_0.
pub fn vec_dot_q5_0_q8_0(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(22).zip(act.chunks_exact(34)).take(n / QK) {
        let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
        let mut s0 = 0i32;
        let mut s1 = 0i32;
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as i32;
            let h1 = ((qh >> (j + 12)) & 0x10) as i32;
            let v0 = ((x[6 + j] & 0xF) as i32 | h0) - 16;
            let v1 = ((x[6 + j] >> 4) as i32 | h1) - 16;
            s0 += v0 * (y[2 + j] as i8 as i32);
            s1 += v1 * (y[2 + 16 + j] as i8 as i32);
        }
        sumf += (rd_f16(x, 0) * rd_f16(y, 0)) * (s0 + s1) as f32;
    }
    sumf
}

/// Q5_1 x Q8_1.
pub fn vec_dot_q5_1_q8_1(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(24).zip(act.chunks_exact(36)).take(n / QK) {
        let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
        let mut s0 = 0i32;
        let mut s1 = 0i32;
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as i32;
            let h1 = ((qh >> (j + 12)) & 0x10) as i32;
            s0 += ((x[8 + j] & 0xF) as i32 | h0) * (y[4 + j] as i8 as i32);
            s1 += ((x[8 + j] >> 4) as i32 | h1) * (y[4 + 16 + j] as i8 as i32);
        }
        sumf += (rd_f16(x, 0) * rd_f16(y, 0)) * (s0 + s1) as f32 + rd_f16(x, 2) * rd_f16(y, 2);
    }
    sumf
}

/// Q8_0 x Q8_0.
pub fn vec_dot_q8_0_q8_0(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(34).zip(act.chunks_exact(34)).take(n / QK) {
        let mut s = 0i32;
        for j in 0..QK {
            s += (x[2 + j] as i8 as i32) * (y[2 + j] as i8 as i32);
        }
        sumf += s as f32 * (rd_f16(x, 0) * rd_f16(y, 0));
    }
    sumf
}

// ---------------------------------------------------------------------------------------------
// K-quants: dequantize

/// Q4_K -> f32.
pub fn dequantize_q4_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(QK_K)) {
        let d = rd_f16(b, 0);
        let min = rd_f16(b, 2);
        let sc = &b[4..16];
        let qs = &b[16..144];
        for c in 0..4 {
            let (s1, m1) = get_scale_min_k4(2 * c, sc);
            let (s2, m2) = get_scale_min_k4(2 * c + 1, sc);
            let (d1, m1) = (d * s1 as f32, min * m1 as f32);
            let (d2, m2) = (d * s2 as f32, min * m2 as f32);
            let q = &qs[32 * c..32 * c + 32];
            let y = &mut y[64 * c..64 * c + 64];
            for l in 0..32 {
                y[l] = d1 * (q[l] & 0xF) as f32 - m1;
                y[32 + l] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

/// Q5_K -> f32.
pub fn dequantize_q5_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(176).zip(dst.chunks_exact_mut(QK_K)) {
        let d = rd_f16(b, 0);
        let min = rd_f16(b, 2);
        let sc = &b[4..16];
        let qh = &b[16..48];
        let qs = &b[48..176];
        for c in 0..4 {
            let (s1, m1) = get_scale_min_k4(2 * c, sc);
            let (s2, m2) = get_scale_min_k4(2 * c + 1, sc);
            let (d1, m1) = (d * s1 as f32, min * m1 as f32);
            let (d2, m2) = (d * s2 as f32, min * m2 as f32);
            let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
            let q = &qs[32 * c..32 * c + 32];
            let y = &mut y[64 * c..64 * c + 64];
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                y[l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
                y[32 + l] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
            }
        }
    }
}

/// The 256 signed 6-bit values (`q - 32`) of a Q6_K block, in element order.
#[inline(always)]
fn q6k_values(b: &[u8], out: &mut [i8; QK_K]) {
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let o = &mut out[128 * h..128 * h + 128];
        for l in 0..32 {
            o[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            o[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            o[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            o[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
}

/// Q6_K -> f32.
pub fn dequantize_q6_k(src: &[u8], dst: &mut [f32]) {
    let mut q = [0i8; QK_K];
    for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(QK_K)) {
        let d = rd_f16(b, 208);
        q6k_values(b, &mut q);
        for i in 0..QK_K {
            y[i] = d * (b[192 + i / 16] as i8) as f32 * q[i] as f32;
        }
    }
}

/// Q8_K -> f32.
pub fn dequantize_q8_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(292).zip(dst.chunks_exact_mut(QK_K)) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for i in 0..QK_K {
            y[i] = d * (b[4 + i] as i8) as f32;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// K-quants: dots (ggml generic vec_dot_q*_K_q8_K, 8 float lanes)

#[inline(always)]
fn rd_bsum(y: &[u8], j: usize) -> i32 {
    i16::from_le_bytes([y[260 + 2 * j], y[261 + 2 * j]]) as i32
}

/// Shared tail of the Q4_K / Q5_K dots: `aux8` holds the 256 unsigned values.
#[inline(always)]
fn kdot_scaled_min(
    aux8: &[u8; QK_K],
    sc: &[u8],
    y: &[u8],
    sums: &mut [f32; 8],
    dx: f32,
    dminx: f32,
) -> f32 {
    let mut aux32 = [0i32; 8];
    for j in 0..8 {
        let (scale, _) = get_scale_min_k4(j, sc);
        for k in 0..4 {
            for l in 0..8 {
                let i = 32 * j + 8 * k + l;
                let p = (y[4 + i] as i8 as i32) * aux8[i] as i32;
                aux32[l] += scale as i32 * p;
            }
        }
    }
    let mut sumi = 0i32;
    for j in 0..16 {
        sumi += rd_bsum(y, j) * get_scale_min_k4(j / 2, sc).1 as i32;
    }
    let yd = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
    let d = dx * yd;
    for l in 0..8 {
        sums[l] += d * aux32[l] as f32;
    }
    let dmin = dminx * yd;
    dmin * sumi as f32
}

/// Q4_K x Q8_K.
pub fn vec_dot_q4_k_q8_k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    let mut aux8 = [0u8; QK_K];
    for (x, y) in w
        .chunks_exact(144)
        .zip(act.chunks_exact(292))
        .take(n / QK_K)
    {
        let qs = &x[16..144];
        for c in 0..4 {
            for l in 0..32 {
                aux8[64 * c + l] = qs[32 * c + l] & 0xF;
                aux8[64 * c + 32 + l] = qs[32 * c + l] >> 4;
            }
        }
        sumf -= kdot_scaled_min(&aux8, &x[4..16], y, &mut sums, rd_f16(x, 0), rd_f16(x, 2));
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

/// Q5_K x Q8_K.
pub fn vec_dot_q5_k_q8_k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut sumf = 0f32;
    let mut aux8 = [0u8; QK_K];
    for (x, y) in w
        .chunks_exact(176)
        .zip(act.chunks_exact(292))
        .take(n / QK_K)
    {
        let qh = &x[16..48];
        let qs = &x[48..176];
        for c in 0..4 {
            let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for l in 0..32 {
                aux8[64 * c + l] = (qs[32 * c + l] & 0xF) + if qh[l] & m1 != 0 { 16 } else { 0 };
                aux8[64 * c + 32 + l] =
                    (qs[32 * c + l] >> 4) + if qh[l] & m2 != 0 { 16 } else { 0 };
            }
        }
        sumf -= kdot_scaled_min(&aux8, &x[4..16], y, &mut sums, rd_f16(x, 0), rd_f16(x, 2));
    }
    for s in sums {
        sumf += s;
    }
    sumf
}

/// Q6_K x Q8_K.
pub fn vec_dot_q6_k_q8_k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut a = [0i8; QK_K];
    for (x, y) in w
        .chunks_exact(210)
        .zip(act.chunks_exact(292))
        .take(n / QK_K)
    {
        q6k_values(x, &mut a);
        let mut aux32 = [0i32; 8];
        for j in 0..16 {
            let scale = x[192 + j] as i8 as i32;
            for k in 0..2 {
                for l in 0..8 {
                    let i = 16 * j + 8 * k + l;
                    aux32[l] += scale * ((y[4 + i] as i8 as i32) * a[i] as i32);
                }
            }
        }
        let d = rd_f16(x, 208) * f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    let mut sumf = 0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}

// ---------------------------------------------------------------------------------------------
// K-quants: reference quantizers

const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml's `make_qkx2_quants` (weighted min/scale search): squared errors for q4_K / q5_K,
/// absolute errors (`use_mad`) for q2_K. Returns `(scale, -min)`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l_out: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let err = |diff: f32| if use_mad { diff.abs() } else { diff * diff };
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l_out[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l_out[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut mad = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                mad += weights[i] * err(diff);
            }
            if mad < best_error {
                l_out[..n].copy_from_slice(&laux[..n]);
                best_error = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (as q6_K uses).
/// Writes `L[i] = l + nmax` and returns the scale.
fn make_qx_quants_rmse1(nmax: i32, x: &[f32], l_out: &mut [u8]) -> f32 {
    let n = x.len();
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = (l + nmax) as u8;
        let w = x[i] * x[i];
        let lf = l as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1f32 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for i in 0..n {
            let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
            let w = x[i] * x[i];
            let lf = l as f32;
            sumlx += w * x[i] * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
                l_out[i] = (nmax + l) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Shared q4_K / q5_K quantizer body: returns per-element levels in `l`.
fn quantize_kx(x: &[f32], b_head: &mut [u8], l: &mut [u8; QK_K], nmax: i32, rmin: f32, nstep: i32) {
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let mut weights = [0f32; 32];
    let mut laux = [0u8; 32];
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut b_head[4..16];
    sc.fill(0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    wr_f16(b_head, 0, max_scale / 63.0);
    wr_f16(b_head, 2, max_min / 63.0);
    let dd = rd_f16(b_head, 0);
    let dm = rd_f16(b_head, 2);
    for j in 0..8 {
        let (s, m) = get_scale_min_k4(j, &b_head[4..16]);
        let d = dd * s as f32;
        if d == 0.0 {
            continue;
        }
        let dmj = dm * m as f32;
        for ii in 0..32 {
            let q = nearest_int((x[32 * j + ii] + dmj) / d);
            l[32 * j + ii] = q.clamp(0, nmax) as u8;
        }
    }
}

/// f32 -> Q4_K (`quantize_row_q4_K_ref`).
pub fn quantize_q4_k(src: &[f32], dst: &mut [u8]) {
    let mut l = [0u8; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(144)) {
        quantize_kx(x, &mut b[..16], &mut l, 15, -1.0, 20);
        let q = &mut b[16..144];
        for c in 0..4 {
            for i in 0..32 {
                q[32 * c + i] = l[64 * c + i] | (l[64 * c + 32 + i] << 4);
            }
        }
    }
}

/// f32 -> Q5_K (`quantize_row_q5_K_ref`).
pub fn quantize_q5_k(src: &[f32], dst: &mut [u8]) {
    let mut l = [0u8; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(176)) {
        quantize_kx(x, &mut b[..16], &mut l, 31, -0.5, 15);
        let (qh, ql) = b[16..176].split_at_mut(32);
        qh.fill(0);
        for c in 0..4 {
            let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
            for j in 0..32 {
                let mut l1 = l[64 * c + j];
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                let mut l2 = l[64 * c + 32 + j];
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                ql[32 * c + j] = l1 | (l2 << 4);
            }
        }
    }
}

/// f32 -> Q6_K (`quantize_row_q6_K_ref`).
pub fn quantize_q6_k(src: &[f32], dst: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut scales = [0f32; 16];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(210)) {
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for ib in 0..16 {
            let s = make_qx_quants_rmse1(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..]);
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            b.fill(0);
            continue;
        }
        let iscale = -128.0 / max_scale;
        wr_f16(b, 208, 1.0 / iscale);
        for ib in 0..16 {
            b[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
        }
        let dd = rd_f16(b, 208);
        for j in 0..16 {
            let d = dd * (b[192 + j] as i8) as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(x[16 * j + ii] / d).clamp(-32, 31);
                l[16 * j + ii] = (q + 32) as u8;
            }
        }
        for h in 0..2 {
            let lj = &l[128 * h..128 * h + 128];
            for i in 0..32 {
                let q1 = lj[i] & 0xF;
                let q2 = lj[i + 32] & 0xF;
                let q3 = lj[i + 64] & 0xF;
                let q4 = lj[i + 96] & 0xF;
                b[64 * h + i] = q1 | (q3 << 4);
                b[64 * h + i + 32] = q2 | (q4 << 4);
                b[128 + 32 * h + i] = (lj[i] >> 4)
                    | ((lj[i + 32] >> 4) << 2)
                    | ((lj[i + 64] >> 4) << 4)
                    | ((lj[i + 96] >> 4) << 6);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q2_K and Q3_K

/// The 16 signed Q3_K scales (`stored - 32`) from the 12 packed bytes, as ggml unpacks them
/// (low nibbles from bytes 0..8, high 2 bits from bytes 8..12).
#[inline(always)]
pub(crate) fn q3k_scales(sc: &[u8]) -> [i8; 16] {
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let r = |i: usize| u32::from_le_bytes([sc[i], sc[i + 1], sc[i + 2], sc[i + 3]]);
    let (a0, a1, tmp) = (r(0), r(4), r(8));
    let words = [
        (a0 & KMASK2) | ((tmp & KMASK1) << 4),
        (a1 & KMASK2) | (((tmp >> 2) & KMASK1) << 4),
        ((a0 >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4),
        ((a1 >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4),
    ];
    let mut out = [0i8; 16];
    for (o, w) in out.chunks_exact_mut(4).zip(words) {
        for (k, b) in w.to_le_bytes().into_iter().enumerate() {
            o[k] = b as i8 - 32;
        }
    }
    out
}

/// Q2_K -> f32 (`dequantize_row_q2_K`).
pub fn dequantize_q2_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(84).zip(dst.chunks_exact_mut(QK_K)) {
        let d = rd_f16(b, 80);
        let min = rd_f16(b, 82);
        let sc = &b[0..16];
        for h in 0..2 {
            let q = &b[16 + 32 * h..48 + 32 * h];
            for k in 0..4 {
                let shift = 2 * k;
                for half in 0..2 {
                    let s = sc[8 * h + 2 * k + half];
                    let dl = d * (s & 0xF) as f32;
                    let ml = min * (s >> 4) as f32;
                    let o = 128 * h + 32 * k + 16 * half;
                    for l in 0..16 {
                        let v = (q[16 * half + l] >> shift) & 3;
                        y[o + l] = dl * v as f32 - ml;
                    }
                }
            }
        }
    }
}

/// Packs 256 2-bit levels into 64 bytes (Q2_K / Q3_K `qs` layout).
#[inline(always)]
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for j in (0..QK_K).step_by(128) {
        for i in 0..32 {
            qs[j / 4 + i] =
                l[j + i] | (l[j + i + 32] << 2) | (l[j + i + 64] << 4) | (l[j + i + 96] << 6);
        }
    }
}

/// f32 -> Q2_K (`quantize_row_q2_K_ref`, which `llama-quantize` runs without an importance
/// matrix).
pub fn quantize_q2_k(src: &[f32], dst: &mut [u8]) {
    const Q4SCALE: f32 = 15.0;
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut weights = [0f32; 16];
    let mut mins = [0f32; 16];
    let mut scales = [0f32; 16];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(84)) {
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..16 {
            let xs = &x[16 * j..16 * j + 16];
            for (w, v) in weights.iter_mut().zip(xs) {
                *w = v.abs();
            }
            let (s, m) = make_qkx2_quants(
                3,
                xs,
                &weights,
                &mut l[16 * j..16 * j + 16],
                &mut laux,
                -0.5,
                0.1,
                15,
                true,
            );
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let (sc, rest) = b.split_at_mut(16);
        if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for j in 0..16 {
                sc[j] = nearest_int(iscale * scales[j]) as u8;
            }
            wr_f16(rest, 64, max_scale / Q4SCALE);
        } else {
            sc.fill(0);
            wr_f16(rest, 64, 0.0);
        }
        if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for j in 0..16 {
                sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
            }
            wr_f16(rest, 66, max_min / Q4SCALE);
        } else {
            wr_f16(rest, 66, 0.0);
        }
        let dd = rd_f16(rest, 64);
        let dm = rd_f16(rest, 66);
        for j in 0..16 {
            let d = dd * (sc[j] & 0xF) as f32;
            if d == 0.0 {
                continue;
            }
            let m = dm * (sc[j] >> 4) as f32;
            for ii in 0..16 {
                let q = nearest_int((x[16 * j + ii] + m) / d);
                l[16 * j + ii] = q.clamp(0, 3) as u8;
            }
        }
        pack_2bit(&l, &mut rest[..64]);
    }
}

/// ggml's `make_q3_quants` with `do_rmse = true` (as q3_K uses): levels `l + nmax` into
/// `l_out`, returns the scale.
fn make_q3_quants_rmse(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
    let n = x.len();
    let (max, amax) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        l_out[..n].fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let l = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l_out[i] = l as i8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * l as f32;
        suml2 += w * l as f32 * l as f32;
    }
    for _ in 0..5 {
        let mut changed = false;
        for i in 0..n {
            let w = x[i] * x[i];
            let li = l_out[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l_out[i] as i32 {
                    let nl = new_l as f32;
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l_out[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for v in &mut l_out[..n] {
        *v += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// Q3_K -> f32 (`dequantize_row_q3_K`).
pub fn dequantize_q3_k(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(110).zip(dst.chunks_exact_mut(QK_K)) {
        let d_all = rd_f16(b, 108);
        let sc = q3k_scales(&b[96..108]);
        let hm = &b[0..32];
        for h in 0..2 {
            let q = &b[32 + 32 * h..64 + 32 * h];
            for k in 0..4 {
                let shift = 2 * k;
                let m = 1u8 << (4 * h + k);
                for half in 0..2 {
                    let dl = d_all * sc[8 * h + 2 * k + half] as f32;
                    let o = 128 * h + 32 * k + 16 * half;
                    for l in 0..16 {
                        let i = 16 * half + l;
                        let v = ((q[i] >> shift) & 3) as i8 - if hm[i] & m != 0 { 0 } else { 4 };
                        y[o + l] = dl * v as f32;
                    }
                }
            }
        }
    }
}

/// f32 -> Q3_K (`quantize_row_q3_K_ref`, which `llama-quantize` runs without an importance
/// matrix).
pub fn quantize_q3_k(src: &[f32], dst: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(110)) {
        let (mut max_scale, mut amax) = (0f32, 0f32);
        for j in 0..16 {
            scales[j] = make_q3_quants_rmse(4, &x[16 * j..16 * j + 16], &mut l[16 * j..]);
            let s = scales[j].abs();
            if s > amax {
                amax = s;
                max_scale = scales[j];
            }
        }
        let sc = &mut b[96..108];
        sc.fill(0);
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for j in 0..16 {
                // ggml stores nearest_int into an int8_t before clamping.
                let v = (nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32;
                let v = v as u8;
                if j < 8 {
                    sc[j] = v & 0xF;
                } else {
                    sc[j - 8] |= (v & 0xF) << 4;
                }
                sc[j % 4 + 8] |= (v >> 4) << (2 * (j / 4));
            }
            wr_f16(b, 108, 1.0 / iscale);
        } else {
            wr_f16(b, 108, 0.0);
        }
        let dd = rd_f16(b, 108);
        let sc = &b[96..108];
        for j in 0..16 {
            let lo = if j < 8 { sc[j] & 0xF } else { sc[j - 8] >> 4 };
            let s = (lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32;
            let d = dd * s as f32;
            if d == 0.0 {
                continue;
            }
            for ii in 0..16 {
                let q = nearest_int(x[16 * j + ii] / d).clamp(-4, 3);
                l[16 * j + ii] = (q + 4) as i8;
            }
        }
        let (hmask, rest) = b.split_at_mut(32);
        hmask.fill(0);
        let mut lu = [0u8; QK_K];
        for j in 0..QK_K {
            let mut v = l[j] as u8;
            if l[j] > 3 {
                hmask[j % 32] |= 1 << (j / 32);
                v = (l[j] - 4) as u8;
            }
            lu[j] = v;
        }
        pack_2bit(&lu, &mut rest[..64]);
    }
}

// ---------------------------------------------------------------------------------------------
// Q2_K / Q3_K dots (ggml generic)

/// Q2_K x Q8_K (`ggml_vec_dot_q2_K_q8_K_generic`).
pub fn vec_dot_q2_k_q8_k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(84).zip(act.chunks_exact(292)).take(n / QK_K) {
        let sc = &x[0..16];
        let mut summs = 0i32;
        for j in 0..16 {
            summs += rd_bsum(y, j) * (sc[j] >> 4) as i32;
        }
        let yd = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
        let dall = yd * rd_f16(x, 80);
        let dmin = yd * rd_f16(x, 82);
        let mut isum = 0i32;
        for h in 0..2 {
            let q2 = &x[16 + 32 * h..48 + 32 * h];
            for k in 0..4 {
                let shift = 2 * k;
                let q8 = &y[4 + 128 * h + 32 * k..];
                for half in 0..2 {
                    let d = (sc[8 * h + 2 * k + half] & 0xF) as i32;
                    let mut isuml = 0i32;
                    for l in 16 * half..16 * half + 16 {
                        isuml += (q8[l] as i8 as i32) * ((q2[l] >> shift) & 3) as i32;
                    }
                    isum += d * isuml;
                }
            }
        }
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// Q3_K x Q8_K (`ggml_vec_dot_q3_K_q8_K_generic`: 8 integer and 8 float lanes).
pub fn vec_dot_q3_k_q8_k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    let mut a = [0i8; QK_K];
    for (x, y) in w
        .chunks_exact(110)
        .zip(act.chunks_exact(292))
        .take(n / QK_K)
    {
        let hm = &x[0..32];
        for h in 0..2 {
            let q3 = &x[32 + 32 * h..64 + 32 * h];
            for k in 0..4 {
                let m = 1u8 << (4 * h + k);
                let o = &mut a[128 * h + 32 * k..128 * h + 32 * k + 32];
                for l in 0..32 {
                    o[l] = ((q3[l] >> (2 * k)) & 3) as i8 - if hm[l] & m != 0 { 0 } else { 4 };
                }
            }
        }
        let scales = q3k_scales(&x[96..108]);
        let mut aux32 = [0i32; 8];
        for j in 0..16 {
            let s = scales[j] as i32;
            for k in 0..2 {
                for l in 0..8 {
                    let i = 16 * j + 8 * k + l;
                    let p = ((y[4 + i] as i8 as i32) * a[i] as i32) as i16;
                    aux32[l] += s * p as i32;
                }
            }
        }
        let d = rd_f16(x, 108) * f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
        for l in 0..8 {
            sums[l] += d * aux32[l] as f32;
        }
    }
    let mut sumf = 0f32;
    for s in sums {
        sumf += s;
    }
    sumf
}

// ---------------------------------------------------------------------------------------------
// IQ4_NL and IQ4_XS

use crate::blocks::KVALUES_IQ4NL;

/// Dequantized IQ4 value of a nibble.
#[inline(always)]
fn kv(q: u8) -> f32 {
    KVALUES_IQ4NL[(q & 0xF) as usize] as f32
}

/// IQ4_NL -> f32 (`dequantize_row_iq4_nl`).
pub fn dequantize_iq4_nl(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(QK)) {
        let d = rd_f16(b, 0);
        for j in 0..16 {
            y[j] = d * kv(b[2 + j]);
            y[j + 16] = d * kv(b[2 + j] >> 4);
        }
    }
}

/// Signed 6-bit scale (`stored - 32`) of IQ4_XS sub-block `ib` (0..8).
#[inline(always)]
fn iq4xs_scale(b: &[u8], ib: usize) -> i32 {
    let sh = u16::from_le_bytes([b[2], b[3]]);
    let lo = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
    let hi = ((sh >> (2 * ib)) & 3) as u8;
    (lo | (hi << 4)) as i32 - 32
}

/// IQ4_XS -> f32 (`dequantize_row_iq4_xs`).
pub fn dequantize_iq4_xs(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.chunks_exact(136).zip(dst.chunks_exact_mut(QK_K)) {
        let d = rd_f16(b, 0);
        for ib in 0..8 {
            let dl = d * iq4xs_scale(b, ib) as f32;
            let q = &b[8 + 16 * ib..8 + 16 * ib + 16];
            let y = &mut y[32 * ib..32 * ib + 32];
            for j in 0..16 {
                y[j] = dl * kv(q[j]);
                y[j + 16] = dl * kv(q[j] >> 4);
            }
        }
    }
}

/// ggml's `best_index_int8` on [`KVALUES_IQ4NL`]: the index of the nearest grid value (the
/// upper one on ties).
#[inline(always)]
fn best_index_iq4nl(x: f32) -> u8 {
    let v = &KVALUES_IQ4NL;
    if x <= v[0] as f32 {
        return 0;
    }
    if x >= v[15] as f32 {
        return 15;
    }
    let (mut ml, mut mu) = (0usize, 15usize);
    while mu - ml > 1 {
        let mav = (ml + mu) / 2;
        if x < v[mav] as f32 {
            mu = mav;
        } else {
            ml = mav;
        }
    }
    if x - (v[mu - 1] as f32) < v[mu] as f32 - x {
        (mu - 1) as u8
    } else {
        mu as u8
    }
}

/// ggml's `quantize_row_iq4_nl_impl` without importance weights, for one block of 32 (IQ4_NL,
/// `b` = 18 bytes) or one super-block of 256 (IQ4_XS, `b` = 136 bytes). `l` carries the levels
/// between calls as ggml's caller-owned buffer does (IQ4_NL with `ntry <= 0` leaves an
/// all-zero block's levels as they were).
fn quantize_iq4_impl(x: &[f32], b: &mut [u8], l: &mut [u8; QK_K], ntry: i32) {
    let values = &KVALUES_IQ4NL;
    let v0 = values[0] as f32;
    let nblk = x.len() / 32;
    let mut scales = [0f32; 8];
    let mut weight = [0f32; 32];
    let (mut max_scale, mut amax_scale) = (0f32, 0f32);
    for ib in 0..nblk {
        let xb = &x[32 * ib..32 * ib + 32];
        for (w, v) in weight.iter_mut().zip(xb) {
            *w = v * v;
        }
        let (max, amax) = signed_absmax(xb);
        if amax < GROUP_MAX_EPS {
            scales[ib] = 0.0;
            continue;
        }
        let lb = &mut l[32 * ib..32 * ib + 32];
        let mut d = if ntry > 0 { -max / v0 } else { max / v0 };
        let mut id = 1.0 / d;
        let (mut sumqx, mut sumq2) = (0f32, 0f32);
        for j in 0..32 {
            let li = best_index_iq4nl(id * xb[j]);
            lb[j] = li;
            let q = values[li as usize] as f32;
            let w = weight[j];
            sumqx += w * q * xb[j];
            sumq2 += w * q * q;
        }
        d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
        let mut best = d * sumqx;
        for itry in -ntry..=ntry {
            id = (itry + values[0] as i32) as f32 / max;
            sumqx = 0.0;
            sumq2 = 0.0;
            for j in 0..32 {
                let q = values[best_index_iq4nl(id * xb[j]) as usize] as f32;
                let w = weight[j];
                sumqx += w * q * xb[j];
                sumq2 += w * q * q;
            }
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                d = sumqx / sumq2;
                best = d * sumqx;
            }
        }
        scales[ib] = d;
        if d.abs() > amax_scale {
            amax_scale = d.abs();
            max_scale = d;
        }
    }
    let qoff = if nblk > 1 {
        // IQ4_XS: 6-bit sub-block scales relative to d = -max_scale / 32 (unrounded here).
        let d = -max_scale / 32.0;
        wr_f16(b, 0, d);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sh = 0u16;
        for ib in 0..nblk {
            let ls = nearest_int(id * scales[ib]).clamp(-32, 31);
            let dl = d * ls as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            for j in 0..32 {
                l[32 * ib + j] = best_index_iq4nl(idl * x[32 * ib + j]);
            }
            let ls = (ls + 32) as u8;
            if ib % 2 == 0 {
                b[4 + ib / 2] = ls & 0xF;
            } else {
                b[4 + ib / 2] |= (ls & 0xF) << 4;
            }
            sh |= ((ls >> 4) as u16) << (2 * (ib % 8));
        }
        b[2..4].copy_from_slice(&sh.to_le_bytes());
        8
    } else {
        wr_f16(b, 0, scales[0]);
        if ntry > 0 {
            let id = if scales[0] != 0.0 {
                1.0 / scales[0]
            } else {
                0.0
            };
            for j in 0..32 {
                l[j] = best_index_iq4nl(id * x[j]);
            }
        }
        2
    };
    for i in 0..nblk {
        for j in 0..16 {
            b[qoff + 16 * i + j] = l[32 * i + j] | (l[32 * i + 16 + j] << 4);
        }
    }
}

/// f32 -> IQ4_NL as `llama-quantize` writes it without an importance matrix (ggml's
/// `quantize_iq4_nl` with no weights: the scale searched over 15 candidates, then every
/// element re-picked for the chosen scale). See [`quantize_iq4_nl_ref`] for ggml's simpler
/// `quantize_row_iq4_nl_ref`.
pub fn quantize_iq4_nl(src: &[f32], dst: &mut [u8]) {
    let mut l = [0u8; QK_K];
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(18)) {
        quantize_iq4_impl(x, b, &mut l, 7);
    }
}

/// f32 -> IQ4_NL exactly as ggml's `quantize_row_iq4_nl_ref` (no scale search: levels from
/// `d = max / -127`, then the least-squares scale for them). Its result differs from
/// [`quantize_iq4_nl`] (what model files hold). For an all-zero block ggml leaves the nibbles
/// unspecified (an uninitialised buffer); here they repeat the previous block's (zeros for
/// the first), and `d = 0` makes them dequantize to zero either way.
pub fn quantize_iq4_nl_ref(src: &[f32], dst: &mut [u8]) {
    let mut l = [0u8; QK_K];
    for (x, b) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(18)) {
        quantize_iq4_impl(x, b, &mut l, -1);
    }
}

/// f32 -> IQ4_XS (`quantize_row_iq4_xs_ref` = `quantize_iq4_xs` without an importance
/// matrix, as `llama-quantize` runs it).
pub fn quantize_iq4_xs(src: &[f32], dst: &mut [u8]) {
    let mut l = [0u8; QK_K];
    for (x, b) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(136)) {
        quantize_iq4_impl(x, b, &mut l, 7);
    }
}

/// IQ4_NL x Q8_0 (`ggml_vec_dot_iq4_nl_q8_0_generic`).
pub fn vec_dot_iq4_nl_q8_0(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(18).zip(act.chunks_exact(34)).take(n / QK) {
        let d = rd_f16(y, 0) * rd_f16(x, 0);
        sumf += d * iq4_block_isum(&x[2..18], &y[2..34]) as f32;
    }
    sumf
}

/// `sum_j q8[j] * kvalues[nibble j]` over one 32-element IQ4 block (16 nibble bytes).
#[inline(always)]
fn iq4_block_isum(qs: &[u8], q8: &[u8]) -> i32 {
    let (mut s1, mut s2) = (0i32, 0i32);
    for j in 0..16 {
        s1 += (q8[j] as i8 as i32) * KVALUES_IQ4NL[(qs[j] & 0xF) as usize] as i32;
        s2 += (q8[j + 16] as i8 as i32) * KVALUES_IQ4NL[(qs[j] >> 4) as usize] as i32;
    }
    s1 + s2
}

/// IQ4_XS x Q8_K (`ggml_vec_dot_iq4_xs_q8_K_generic`).
pub fn vec_dot_iq4_xs_q8_k(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w
        .chunks_exact(136)
        .zip(act.chunks_exact(292))
        .take(n / QK_K)
    {
        let d4d8 = rd_f16(x, 0) * f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
        for ib in 0..8 {
            let dl = d4d8 * iq4xs_scale(x, ib) as f32;
            let s = iq4_block_isum(&x[8 + 16 * ib..24 + 16 * ib], &y[4 + 32 * ib..36 + 32 * ib]);
            sumf += dl * s as f32;
        }
    }
    sumf
}
