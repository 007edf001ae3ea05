//! aarch64 NEON kernels (dot products of Q4_0, Q8_0, F16 and F32). NEON is mandatory on
//! aarch64, so these are always installed there.

use crate::GgmlType;
use crate::dispatch::TypeKernels;
use crate::scalar::rd_f16;
use std::arch::aarch64::*;

type DotFn = fn(usize, &[u8], &[u8]) -> f32;

fn patch(t: &mut [TypeKernels]) {
    for k in t.iter_mut() {
        let f: Option<DotFn> = match k.ty {
            GgmlType::Q4_0 => Some(dot_q4_0),
            GgmlType::Q8_0 => Some(dot_q8_0),
            GgmlType::F16 => Some(dot_f16),
            GgmlType::F32 => Some(dot_f32),
            _ => None,
        };
        if let Some(f) = f {
            k.vec_dot = f;
            k.name = "neon";
        }
    }
}

/// Patches `table` with the NEON kernels.
pub(crate) fn install(table: &mut [TypeKernels]) -> &'static str {
    patch(table);
    "neon"
}

/// The NEON table, for `all_kernels`.
pub(crate) fn variants(base: &[TypeKernels], out: &mut Vec<Vec<TypeKernels>>) {
    let mut t = base.to_vec();
    patch(&mut t);
    out.push(t);
}

#[inline(always)]
fn ld16(b: &[u8], off: usize) -> uint8x16_t {
    let s = &b[off..off + 16];
    // SAFETY: `s` is exactly 16 readable bytes; NEON is always present on aarch64.
    unsafe { vld1q_u8(s.as_ptr()) }
}

/// Dot of 16 signed bytes, widened: returns 4 i32 partial sums.
#[inline(always)]
fn dot16(a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: NEON is always present on aarch64.
    unsafe {
        let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        let hi = vmull_high_s8(a, b);
        vaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi))
    }
}

fn dot_q4_0(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(18).zip(act.chunks_exact(34)).take(n / 32) {
        let q = ld16(x, 2);
        // SAFETY: NEON is always present on aarch64; lane ops only.
        let s = unsafe {
            let m4 = vdupq_n_u8(0x0F);
            let lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(q, m4)), vdupq_n_s8(8));
            let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(q, 4)), vdupq_n_s8(8));
            let y0 = vreinterpretq_s8_u8(ld16(y, 2));
            let y1 = vreinterpretq_s8_u8(ld16(y, 18));
            vaddvq_s32(vaddq_s32(dot16(lo, y0), dot16(hi, y1)))
        };
        sumf += s as f32 * rd_f16(x, 0) * rd_f16(y, 0);
    }
    sumf
}

fn dot_q8_0(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in w.chunks_exact(34).zip(act.chunks_exact(34)).take(n / 32) {
        // SAFETY: NEON is always present on aarch64; lane ops only.
        let s = unsafe {
            let x0 = vreinterpretq_s8_u8(ld16(x, 2));
            let x1 = vreinterpretq_s8_u8(ld16(x, 18));
            let y0 = vreinterpretq_s8_u8(ld16(y, 2));
            let y1 = vreinterpretq_s8_u8(ld16(y, 18));
            vaddvq_s32(vaddq_s32(dot16(x0, y0), dot16(x1, y1)))
        };
        sumf += s as f32 * (rd_f16(x, 0) * rd_f16(y, 0));
    }
    sumf
}

fn dot_f32(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let (w, a) = (&w[..4 * n], &act[..4 * n]);
    let np = n & !15;
    let mut sum;
    // SAFETY: NEON is always present on aarch64; every load reads 16 bytes inside `w`/`a`.
    unsafe {
        let mut s = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i < np {
            for (k, sk) in s.iter_mut().enumerate() {
                let o = 4 * (i + 4 * k);
                let x = vreinterpretq_f32_u8(ld16(w, o));
                let y = vreinterpretq_f32_u8(ld16(a, o));
                *sk = vfmaq_f32(*sk, x, y);
            }
            i += 16;
        }
        sum = vaddvq_f32(vaddq_f32(vaddq_f32(s[0], s[2]), vaddq_f32(s[1], s[3]))) as f64;
    }
    for j in np..n {
        let o = 4 * j;
        let x = f32::from_le_bytes([w[o], w[o + 1], w[o + 2], w[o + 3]]);
        let y = f32::from_le_bytes([a[o], a[o + 1], a[o + 2], a[o + 3]]);
        sum += (x * y) as f64;
    }
    sum as f32
}

fn dot_f16(n: usize, w: &[u8], act: &[u8]) -> f32 {
    let (w, a) = (&w[..2 * n], &act[..2 * n]);
    let np = n & !15;
    let mut sum;
    // SAFETY: NEON is always present on aarch64; every load reads 16 bytes inside `w`/`a`.
    unsafe {
        let mut s = [vdupq_n_f32(0.0); 4];
        let mut i = 0;
        while i < np {
            for k in 0..2 {
                let o = 2 * (i + 8 * k);
                let x = vreinterpretq_u16_u8(ld16(w, o));
                let y = vreinterpretq_u16_u8(ld16(a, o));
                let (xl, xh) = (h8(vget_low_u16(x)), h8(vget_high_u16(x)));
                let (yl, yh) = (h8(vget_low_u16(y)), h8(vget_high_u16(y)));
                s[2 * k] = vfmaq_f32(s[2 * k], xl, yl);
                s[2 * k + 1] = vfmaq_f32(s[2 * k + 1], xh, yh);
            }
            i += 16;
        }
        sum = vaddvq_f32(vaddq_f32(vaddq_f32(s[0], s[2]), vaddq_f32(s[1], s[3]))) as f64;
    }
    for j in np..n {
        let x = crate::scalar::f16_bits_to_f32(u16::from_le_bytes([w[2 * j], w[2 * j + 1]]));
        let y = crate::scalar::f16_bits_to_f32(u16::from_le_bytes([a[2 * j], a[2 * j + 1]]));
        sum += (x * y) as f64;
    }
    sum as f32
}

/// Four f16 (as raw bits) -> four f32, exact, without the `fp16` target feature: rebias the
/// exponent for normals, handle subnormals, zeros, infinities and NaN by lanes.
#[inline(always)]
fn h8(h: uint16x4_t) -> float32x4_t {
    // SAFETY: NEON is always present on aarch64; lane ops only.
    unsafe {
        let h = vmovl_u16(h);
        let sign = vshlq_n_u32(vandq_u32(h, vdupq_n_u32(0x8000)), 16);
        let em = vandq_u32(h, vdupq_n_u32(0x7fff));
        // Normal and subnormal: shift into place and scale by 2^112 (exact in f32).
        let shifted = vreinterpretq_f32_u32(vshlq_n_u32(em, 13));
        let scaled = vmulq_f32(shifted, vdupq_n_f32(f32::from_bits(0x7780_0000)));
        // Inf/NaN: exponent all ones.
        let is_inf_nan = vcgeq_u32(em, vdupq_n_u32(0x7c00));
        let infnan = vorrq_u32(vshlq_n_u32(em, 13), vdupq_n_u32(0x7f80_0000));
        let mag = vbslq_u32(is_inf_nan, infnan, vreinterpretq_u32_f32(scaled));
        vreinterpretq_f32_u32(vorrq_u32(mag, sign))
    }
}
