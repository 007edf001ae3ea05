//! Element-wise and per-row operators of a transformer forward pass: RMS / layer norm, softmax,
//! activations (SiLU, GELU as ggml evaluates it, ReLU) and gated FFN helpers, rotary position
//! embeddings (normal and NEOX pairing) and attention of queries over an F16 KV cache.
//!
//! Numerics follow ggml's CPU backend where that matters for reproducing llama.cpp:
//! - norms sum in `f64` and scale with `1/sqrtf(mean + eps)`;
//! - GELU is the tanh approximation looked up through a table indexed by the input rounded to
//!   f16 (ggml's `GGML_GELU_FP16` path);
//! - RoPE angles are `pos * base^(-2i/d)` computed by one `powf` and an iterated `f32` multiply;
//! - attention follows ggml's flash-attention kernel: the query is rounded to f16, K/V are f16,
//!   scores are accumulated with an online softmax and the weighted V sum is kept in f16 (rounded
//!   after every update), then divided by the softmax sum.
//!
//! Every function validates its slice lengths and returns [`OpsError`] on a mismatch.

use half::f16;
use std::sync::OnceLock;

/// A shape or parameter problem in an operator call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OpsError {
    /// A slice has the wrong length.
    #[error("{op}: `{what}` has length {found}, expected {expected}")]
    Length {
        /// The operator.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// The length the operator needs.
        expected: usize,
        /// The length it got.
        found: usize,
    },
    /// A parameter is out of range.
    #[error("{op}: invalid parameter: {msg}")]
    Param {
        /// The operator.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
}

fn check_len(
    op: &'static str,
    what: &'static str,
    expected: usize,
    found: usize,
) -> Result<(), OpsError> {
    if expected == found {
        Ok(())
    } else {
        Err(OpsError::Length {
            op,
            what,
            expected,
            found,
        })
    }
}

fn param(op: &'static str, msg: impl Into<String>) -> OpsError {
    OpsError::Param {
        op,
        msg: msg.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// Norms
// ---------------------------------------------------------------------------------------------

/// The RMS-norm scale `1/sqrt(mean(x^2) + eps)`, the mean summed in `f64` like ggml.
pub fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
    let mean = (sum / x.len().max(1) as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// `out = x / rms(x) * weight` (ggml `rms_norm` followed by `mul`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<(), OpsError> {
    check_len("rms_norm", "weight", x.len(), weight.len())?;
    check_len("rms_norm", "out", x.len(), out.len())?;
    let scale = rms_scale(x, eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = (v * scale) * w;
    }
    Ok(())
}

/// [`rms_norm`] in place.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) -> Result<(), OpsError> {
    check_len("rms_norm", "weight", x.len(), weight.len())?;
    let scale = rms_scale(x, eps);
    for (v, &w) in x.iter_mut().zip(weight) {
        *v = (*v * scale) * w;
    }
    Ok(())
}

/// [`rms_norm_inplace`] applied to each consecutive `row_len` slice of `x` (e.g. per-head
/// QK-norm): `x.len()` must be a multiple of `row_len == weight.len()`.
pub fn rms_norm_rows_inplace(x: &mut [f32], weight: &[f32], eps: f32) -> Result<(), OpsError> {
    let n = weight.len();
    if n == 0 || !x.len().is_multiple_of(n) {
        return Err(param(
            "rms_norm_rows",
            format!("length {} is not a multiple of the row length {n}", x.len()),
        ));
    }
    for row in x.chunks_exact_mut(n) {
        rms_norm_inplace(row, weight, eps)?;
    }
    Ok(())
}

/// Layer norm: `out = (x - mean) / sqrt(var + eps) * weight + bias` (ggml `norm`, `mul`, `add`;
/// mean and variance summed in `f64`).
pub fn layer_norm(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
) -> Result<(), OpsError> {
    let n = x.len();
    check_len("layer_norm", "weight", n, weight.len())?;
    check_len("layer_norm", "out", n, out.len())?;
    if let Some(b) = bias {
        check_len("layer_norm", "bias", n, b.len())?;
    }
    let sum: f64 = x.iter().map(|&v| f64::from(v)).sum();
    let mean = (sum / n.max(1) as f64) as f32;
    let mut sum2 = 0.0f64;
    for (o, &v) in out.iter_mut().zip(x) {
        let d = v - mean;
        *o = d;
        sum2 += f64::from(d * d);
    }
    let variance = (sum2 / n.max(1) as f64) as f32;
    let scale = 1.0 / (variance + eps).sqrt();
    for (i, o) in out.iter_mut().enumerate() {
        let mut y = (*o * scale) * weight[i];
        if let Some(b) = bias {
            y += b[i];
        }
        *o = y;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Softmax and activations
// ---------------------------------------------------------------------------------------------

/// Softmax in place: `exp(x - max) / sum`, the sum in `f64` like ggml. An empty slice is a no-op;
/// a slice of all `-inf` becomes all zeros.
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        let e = (*v - max).exp();
        *v = e;
        sum += f64::from(e);
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// SiLU: `x / (1 + exp(-x))`.
#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// SiLU in place, split like ggml's `ggml_vec_silu_f32` (AVX-512 build): each full block of
/// [`SILU_BLOCK`] elements uses [`silu_poly`], the remaining tail elements use [`silu`].
pub fn silu_inplace(x: &mut [f32]) {
    let body = x.len() / SILU_BLOCK * SILU_BLOCK;
    let (head, tail) = x.split_at_mut(body);
    silu_body_inplace(head);
    tail.iter_mut().for_each(|v| *v = silu(*v));
}

/// Block width of ggml's vectorised SiLU/SwiGLU body in an AVX-512 build (16 lanes); the elements
/// past the last full block take the scalar libm path ([`silu`]).
pub const SILU_BLOCK: usize = 16;

const EXP_SHIFT: f32 = 12_582_912.0; // 0x1.8p23
const EXP_LOG2E: u32 = 0x3fb8_aa3b; // 0x1.715476p+0
const EXP_LN2_HI: u32 = 0x3f31_7200; // 0x1.62e4p-1
const EXP_LN2_LO: u32 = 0x35bf_be8e; // 0x1.7f7d1cp-20
const EXP_C0: u32 = 0x3f7f_fff6; // 0x1.ffffecp-1
const EXP_C1: u32 = 0x3eff_fedb; // 0x1.fffdb6p-2
const EXP_C2: u32 = 0x3e2a_af33; // 0x1.555e66p-3
const EXP_C3: u32 = 0x3d2b_9f17; // 0x1.573e2ep-5
const EXP_C4: u32 = 0x3c07_2010; // 0x1.0e4020p-7

/// ggml's vectorised `expf` (the AVX-512 `ggml_v_expf`, adapted from Arm's optimized routines),
/// evaluated for one lane with the same operation sequence and roundings: fused multiply-adds
/// where ggml fuses, `j * 2^n` rounded once (like `vscalefps`). Error up to about 2.5 ulp;
/// results overflow to `inf` above ~88.72 and flush to `0` below ~-103.97.
#[inline]
pub fn expf_poly(x: f32) -> f32 {
    let z = x.mul_add(f32::from_bits(EXP_LOG2E), EXP_SHIFT);
    let n = z - EXP_SHIFT;
    let b = (-n).mul_add(
        f32::from_bits(EXP_LN2_LO),
        (-n).mul_add(f32::from_bits(EXP_LN2_HI), x),
    );
    let u = b * b;
    let j = f32::from_bits(EXP_C4)
        .mul_add(b, f32::from_bits(EXP_C3))
        .mul_add(u, f32::from_bits(EXP_C2).mul_add(b, f32::from_bits(EXP_C1)))
        .mul_add(u, f32::from_bits(EXP_C0).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    if n.is_nan() {
        return f32::NAN;
    }
    // `j * 2^n` with a single rounding: exact in f64 for |n| <= 192, then rounded to f32.
    (f64::from(j) * 2f64.powi(n as i32)) as f32
}

/// SiLU with ggml's vectorised expf: `x / (1 + expf_poly(0 - x))`, the per-lane arithmetic of
/// `ggml_v_silu` in an AVX-512 build.
#[inline]
pub fn silu_poly(x: f32) -> f32 {
    x / (1.0 + expf_poly(0.0 - x))
}

/// `x[i] = silu_poly(x[i])` for every element, vectorised where the CPU allows (the same bits
/// as [`silu_poly`] one value at a time).
pub fn silu_poly_inplace(x: &mut [f32]) {
    let body = x.len() / SILU_BLOCK * SILU_BLOCK;
    let (head, tail) = x.split_at_mut(body);
    silu_body_inplace(head);
    tail.iter_mut().for_each(|v| *v = silu_poly(*v));
}

fn silu_body_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f_dq() {
        // SAFETY: AVX-512F/DQ were detected at runtime; the slice length is a multiple of 16.
        unsafe { avx512::silu_inplace(x) };
        return;
    }
    x.iter_mut().for_each(|v| *v = silu_poly(*v));
}

fn swiglu_body(gate: &[f32], up: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f_dq() {
        // SAFETY: AVX-512F/DQ were detected at runtime; all three slices have the same length,
        // a multiple of 16.
        unsafe { avx512::swiglu(gate, up, out) };
        return;
    }
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu_poly(g) * u;
    }
}

fn swiglu_body_inplace(gate: &mut [f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512f_dq() {
        // SAFETY: AVX-512F/DQ were detected at runtime; both slices have the same length, a
        // multiple of 16.
        unsafe { avx512::swiglu_inplace(gate, up) };
        return;
    }
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu_poly(*g) * u;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512f_dq() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
    })
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn splat(bits: u32) -> __m512 {
        _mm512_set1_ps(f32::from_bits(bits))
    }

    /// 16-lane `ggml_v_expf` (AVX-512 branch).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(crate) fn expf(x: __m512) -> __m512 {
        let r = _mm512_set1_ps(EXP_SHIFT);
        let z = _mm512_fmadd_ps(x, splat(EXP_LOG2E), r);
        let n = _mm512_sub_ps(z, r);
        let b = _mm512_fnmadd_ps(
            n,
            splat(EXP_LN2_LO),
            _mm512_fnmadd_ps(n, splat(EXP_LN2_HI), x),
        );
        let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(splat(EXP_C4), b, splat(EXP_C3)),
                u,
                _mm512_fmadd_ps(splat(EXP_C2), b, splat(EXP_C1)),
            ),
            u,
            _mm512_fmadd_ps(splat(EXP_C0), b, _mm512_set1_ps(1.0)),
        );
        let res = _mm512_scalef_ps(j, n);
        if d == 0 {
            return res;
        }
        let zero = _mm512_setzero_ps();
        let alt = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero),
            _mm512_set1_ps(f32::INFINITY),
            zero,
        );
        _mm512_mask_blend_ps(d, res, alt)
    }

    /// 16-lane `ggml_v_silu`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn silu(x: __m512) -> __m512 {
        let neg_x = _mm512_sub_ps(_mm512_setzero_ps(), x);
        _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), expf(neg_x)))
    }

    /// # Safety
    /// Requires AVX-512F/DQ; `x.len()` must be a multiple of 16.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) unsafe fn silu_inplace(x: &mut [f32]) {
        for c in x.chunks_exact_mut(16) {
            // SAFETY: `c` holds exactly 16 f32s.
            unsafe { _mm512_storeu_ps(c.as_mut_ptr(), silu(_mm512_loadu_ps(c.as_ptr()))) };
        }
    }

    /// # Safety
    /// Requires AVX-512F/DQ; equal lengths, a multiple of 16.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) unsafe fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
        for ((o, g), u) in out
            .chunks_exact_mut(16)
            .zip(gate.chunks_exact(16))
            .zip(up.chunks_exact(16))
        {
            // SAFETY: each chunk holds exactly 16 f32s.
            unsafe {
                let v = _mm512_mul_ps(
                    silu(_mm512_loadu_ps(g.as_ptr())),
                    _mm512_loadu_ps(u.as_ptr()),
                );
                _mm512_storeu_ps(o.as_mut_ptr(), v);
            }
        }
    }

    /// # Safety
    /// Requires AVX-512F/DQ; equal lengths, a multiple of 16.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) unsafe fn swiglu_inplace(gate: &mut [f32], up: &[f32]) {
        for (g, u) in gate.chunks_exact_mut(16).zip(up.chunks_exact(16)) {
            // SAFETY: each chunk holds exactly 16 f32s.
            unsafe {
                let v = _mm512_mul_ps(
                    silu(_mm512_loadu_ps(g.as_ptr())),
                    _mm512_loadu_ps(u.as_ptr()),
                );
                _mm512_storeu_ps(g.as_mut_ptr(), v);
            }
        }
    }
}

/// ReLU in place.
pub fn relu_inplace(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.max(0.0));
}

const GELU_COEF_A: f32 = 0.044715;
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// The tanh-approximation GELU evaluated directly in `f32`:
/// `0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))`.
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    // `1 + a x x` fused, as GCC contracts ggml's `1.0f + GELU_COEF_A*x*x` in an FMA build.
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (GELU_COEF_A * x).mul_add(x, 1.0)).tanh())
}

fn gelu_table() -> &'static [u16] {
    static TABLE: OnceLock<Vec<u16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| {
                let x = f16::from_bits(bits).to_f32();
                f16::from_f32(gelu_tanh(x)).to_bits()
            })
            .collect()
    })
}

/// GELU as llama.cpp's CPU backend computes it: `0` for `x <= -10`, `x` for `x >= 10`, otherwise
/// a lookup of `f16(gelu_tanh(f16(x)))` (a 65536-entry table built on first use).
#[inline]
pub fn gelu(x: f32) -> f32 {
    gelu_with(gelu_table(), x)
}

#[inline]
fn gelu_with(table: &[u16], x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        f16::from_bits(table[usize::from(f16::from_f32(x).to_bits())]).to_f32()
    }
}

/// [`gelu`] in place.
pub fn gelu_inplace(x: &mut [f32]) {
    let t = gelu_table();
    x.iter_mut().for_each(|v| *v = gelu_with(t, *v));
}

/// SwiGLU: `out = silu(gate) * up`, bit-identical to ggml's `ggml_vec_swiglu_f32` in an AVX-512
/// build: full blocks of [`SILU_BLOCK`] use [`silu_poly`], the tail uses libm [`silu`].
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), OpsError> {
    check_len("swiglu", "up", gate.len(), up.len())?;
    check_len("swiglu", "out", gate.len(), out.len())?;
    let body = gate.len() / SILU_BLOCK * SILU_BLOCK;
    swiglu_body(&gate[..body], &up[..body], &mut out[..body]);
    for ((o, &g), &u) in out[body..].iter_mut().zip(&gate[body..]).zip(&up[body..]) {
        *o = silu(g) * u;
    }
    Ok(())
}

/// SwiGLU in place: `gate = silu(gate) * up`, with the same body/tail split as [`swiglu`].
pub fn swiglu_inplace(gate: &mut [f32], up: &[f32]) -> Result<(), OpsError> {
    check_len("swiglu", "up", gate.len(), up.len())?;
    let body = gate.len() / SILU_BLOCK * SILU_BLOCK;
    let (head, tail) = gate.split_at_mut(body);
    swiglu_body_inplace(head, &up[..body]);
    for (g, &u) in tail.iter_mut().zip(&up[body..]) {
        *g = silu(*g) * u;
    }
    Ok(())
}

/// GeGLU with llama.cpp's table GELU: `out = gelu(gate) * up`.
pub fn geglu(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<(), OpsError> {
    check_len("geglu", "up", gate.len(), up.len())?;
    check_len("geglu", "out", gate.len(), out.len())?;
    let t = gelu_table();
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = geglu_one(t, g, u);
    }
    Ok(())
}

/// GeGLU in place: `gate = gelu(gate) * up`.
pub fn geglu_inplace(gate: &mut [f32], up: &[f32]) -> Result<(), OpsError> {
    check_len("geglu", "up", gate.len(), up.len())?;
    let t = gelu_table();
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        done = gate.len() / 8 * 8;
        // SAFETY: AVX2/FMA/F16C detected at run time; `done` elements of both slices exist.
        unsafe { x86::geglu8(&mut gate[..done], &up[..done], t) };
    }
    for (g, &u) in gate[done..].iter_mut().zip(&up[done..]) {
        *g = geglu_one(t, *g, u);
    }
    Ok(())
}

/// One GeGLU output as `ggml_vec_geglu_f32` computes it: exactly `+0` below -10 (not
/// `0 * u`, which would keep `u`'s sign), `x * u` from 10 on, the table otherwise.
#[inline]
fn geglu_one(table: &[u16], x: f32, u: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else {
        gelu_with(table, x) * u
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------

/// Which dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeKind {
    /// Adjacent pairs `(2i, 2i+1)` (llama.cpp `LLAMA_ROPE_TYPE_NORM`, LLaMA GGUFs).
    Normal,
    /// Split halves `(i, i + n_dims/2)` (`LLAMA_ROPE_TYPE_NEOX`: Gemma, Qwen, GPT-NeoX).
    Neox,
}

/// Fill `cache` with `(cos, sin)` pairs of the `n_dims/2` rotation angles of position `pos`:
/// `theta_i = pos * freq_scale * base^(-2i/n_dims)`, the powers built by one `powf` and an
/// iterated `f32` multiply like ggml. `cache.len()` must be `n_dims` (even).
pub fn rope_cache(pos: f32, base: f32, freq_scale: f32, cache: &mut [f32]) -> Result<(), OpsError> {
    let n_dims = cache.len();
    if n_dims == 0 || !n_dims.is_multiple_of(2) {
        return Err(param(
            "rope_cache",
            format!("n_dims {n_dims} must be even and > 0"),
        ));
    }
    let theta_scale = base.powf(-2.0 / n_dims as f32);
    let mut theta = pos;
    for pair in cache.chunks_exact_mut(2) {
        let t = freq_scale * theta;
        pair[0] = t.cos();
        pair[1] = t.sin();
        theta *= theta_scale;
    }
    Ok(())
}

/// Rotate every head of `x` (`x.len()` a multiple of `head_dim`) by the angles in `cache` (from
/// [`rope_cache`]; its length is the number of rotated dimensions `n_dims <= head_dim`; the rest of
/// each head passes through). Each pair is rotated as ggml computes it in an FMA build:
/// `(fma(x0, cos, -(x1 sin)), fma(x0, sin, x1 cos))`.
pub fn rope_apply(
    x: &mut [f32],
    head_dim: usize,
    cache: &[f32],
    kind: RopeKind,
) -> Result<(), OpsError> {
    let n_dims = cache.len();
    if head_dim == 0 || !x.len().is_multiple_of(head_dim) {
        return Err(param(
            "rope",
            format!(
                "length {} is not a multiple of head_dim {head_dim}",
                x.len()
            ),
        ));
    }
    if n_dims > head_dim || !n_dims.is_multiple_of(2) {
        return Err(param(
            "rope",
            format!("n_dims {n_dims} must be even and <= head_dim {head_dim}"),
        ));
    }
    let half = n_dims / 2;
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (c, s) = (cache[2 * i], cache[2 * i + 1]);
            let (a, b) = match kind {
                RopeKind::Normal => (2 * i, 2 * i + 1),
                RopeKind::Neox => (i, i + half),
            };
            let x0 = head[a];
            let x1 = head[b];
            // ggml's `rotate_pairs` as GCC contracts it in an FMA build:
            // `fma(x0, c, -(x1 s))` and `fma(x0, s, x1 c)`.
            head[a] = x0.mul_add(c, -(x1 * s));
            head[b] = x0.mul_add(s, x1 * c);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// f16 helpers (runtime-dispatched F16C/AVX2/FMA with scalar fallbacks)
// ---------------------------------------------------------------------------------------------

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma_f16c() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    })
}

/// Convert f16 values to f32 (`dst.len() == src.len()`).
pub fn f16_to_f32(src: &[f16], dst: &mut [f32]) -> Result<(), OpsError> {
    check_len("f16_to_f32", "dst", src.len(), dst.len())?;
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked above); lengths are equal.
        unsafe { x86::f16_to_f32(src, dst) };
        return Ok(());
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
    Ok(())
}

/// Round f32 values to the nearest f16 (ties to even) and store them (`dst.len() == src.len()`).
pub fn f32_to_f16(src: &[f32], dst: &mut [f16]) -> Result<(), OpsError> {
    check_len("f32_to_f16", "dst", src.len(), dst.len())?;
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: the CPU supports AVX2, FMA and F16C (checked above); lengths are equal.
        unsafe { x86::f32_to_f16(src, dst) };
        return Ok(());
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f16::from_f32(*s);
    }
    Ok(())
}

/// f32 dot product.
pub fn dot_f32(a: &[f32], b: &[f32]) -> Result<f32, OpsError> {
    check_len("dot_f32", "b", a.len(), b.len())?;
    Ok(dot_f32_unchecked(a, b))
}

#[inline]
fn dot_f32_unchecked(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: CPU features checked; the kernel reads min(a.len(), b.len()) elements.
        return unsafe { x86::dot(a, b) };
    }
    dot_scalar(a, b)
}

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n8 = a.len().min(b.len()) / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += ca[k] * cb[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in a[n8..].iter().zip(&b[n8..]) {
        s += x * y;
    }
    s
}

/// Dot product of f16-representable values (stored as f32) in the summation order of ggml's
/// `ggml_vec_dot_f16` in an AVX-512 build: four 16-lane accumulators over blocks of 64, reduced
/// pairwise (`s0+s2`, `s1+s3`, then together), the 16 lanes summed like GCC's
/// `_mm512_reduce_add_ps` (halves 8, 4, then `(l0+l2)+(l1+l3)`), the leftovers added in `f64`.
/// Products of f16 values are exact in f32, so a plain multiply-add equals ggml's FMA.
pub fn dot_f16_values_ggml(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let np = n / 64 * 64;
    let mut acc = [[0.0f32; 16]; 4];
    for (ca, cb) in a[..np].chunks_exact(64).zip(b[..np].chunks_exact(64)) {
        for (j, accj) in acc.iter_mut().enumerate() {
            for (l, v) in accj.iter_mut().enumerate() {
                *v += ca[j * 16 + l] * cb[j * 16 + l];
            }
        }
    }
    let mut x = [0.0f32; 16];
    for (l, v) in x.iter_mut().enumerate() {
        *v = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
    }
    let mut t8 = [0.0f32; 8];
    for (l, v) in t8.iter_mut().enumerate() {
        *v = x[l + 8] + x[l];
    }
    let mut t4 = [0.0f32; 4];
    for (l, v) in t4.iter_mut().enumerate() {
        *v = t8[l + 4] + t8[l];
    }
    let r = (t4[0] + t4[2]) + (t4[1] + t4[3]);
    let mut sum = f64::from(r);
    for (x, y) in a[np..n].iter().zip(&b[np..n]) {
        sum += f64::from(x * y);
    }
    sum as f32
}

/// Four dot products of consecutive `k.len()`-long rows of `q` with `k`, each summed in exactly
/// the order of [`dot_f32_unchecked`] (so each result is bit-identical to it).
#[inline]
fn dot_f32_x4(q: &[f32], k: &[f32]) -> [f32; 4] {
    let n = k.len();
    debug_assert!(q.len() >= 4 * n);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() && q.len() >= 4 * n {
        // SAFETY: CPU features checked; q holds 4 rows of n values.
        return unsafe { x86::dot4(q, k) };
    }
    [0, 1, 2, 3].map(|r| dot_f32_unchecked(&q[r * n..(r + 1) * n], k))
}

/// `acc[i] = acc[i] * ms + v[i] * vs`, with the multiply by `ms` skipped when `ms == 1.0`
/// (an exact identity) and every product and sum rounded separately (no fused multiply-add).
#[inline]
fn scale_axpy_f32(acc: &mut [f32], ms: f32, v: &[f32], vs: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: CPU features checked; the kernel processes min(acc.len(), v.len()) elements.
        unsafe { x86::scale_axpy(acc, ms, v, vs) };
        return;
    }
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = *a * ms + x * vs;
    }
}

/// `acc = f16(acc * scale)` element-wise: the accumulator holds f16-representable values.
#[inline]
fn scale_round_f16(acc: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: CPU features checked.
        unsafe { x86::scale_round(acc, scale) };
        return;
    }
    for a in acc.iter_mut() {
        *a = f16::from_f32(*a * scale).to_f32();
    }
}

/// `acc = f16(fma(v, s, acc))` element-wise (ggml's `vec_mad_f16`).
#[inline]
fn mad_round_f16(acc: &mut [f32], v: &[f32], s: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        // SAFETY: CPU features checked; the kernel processes min(acc.len(), v.len()) elements.
        unsafe { x86::mad_round(acc, v, s) };
        return;
    }
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = f16::from_f32(x.mul_add(s, *a)).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// [`super::geglu_one`] 8 values at a time (the f16 conversion by `vcvtps2ph`, which rounds
    /// like `f16::from_f32`; the same bits).
    ///
    /// # Safety
    /// Requires AVX2+FMA+F16C; `gate.len() == up.len()`, a multiple of 8.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn geglu8(gate: &mut [f32], up: &[f32], table: &[u16]) {
        let lo = _mm256_set1_ps(-10.0);
        let hi = _mm256_set1_ps(10.0);
        for (g, u) in gate.chunks_exact_mut(8).zip(up.chunks_exact(8)) {
            // SAFETY: each chunk holds exactly 8 f32s; unaligned loads and stores.
            unsafe {
                let x = _mm256_loadu_ps(g.as_ptr());
                let uv = _mm256_loadu_ps(u.as_ptr());
                let mut idx = [0u16; 8];
                _mm_storeu_si128(
                    idx.as_mut_ptr().cast(),
                    _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x),
                );
                let mut t = [0u16; 8];
                for (o, &i) in t.iter_mut().zip(&idx) {
                    *o = table[usize::from(i)];
                }
                let gx = _mm256_cvtph_ps(_mm_loadu_si128(t.as_ptr().cast()));
                // x >= 10: x itself; x <= -10: exactly +0 (not multiplied by u)
                let big = _mm256_cmp_ps::<_CMP_GE_OQ>(x, hi);
                let gx = _mm256_blendv_ps(gx, x, big);
                let y = _mm256_mul_ps(gx, uv);
                let small = _mm256_cmp_ps::<_CMP_LE_OQ>(x, lo);
                _mm256_storeu_ps(g.as_mut_ptr(), _mm256_andnot_ps(small, y));
            }
        }
    }

    /// # Safety
    /// Requires AVX2+FMA+F16C; `dst.len() == src.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n bounds both slices; unaligned loads/stores are used.
            unsafe {
                let h = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = src[j].to_f32();
        }
    }

    /// # Safety
    /// Requires AVX2+FMA+F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f32_to_f16(src: &[f32], dst: &mut [f16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n bounds both slices.
            unsafe {
                let x = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                _mm_storeu_si128(dst.as_mut_ptr().add(i) as *mut __m128i, h);
            }
            i += 8;
        }
        for j in i..n {
            dst[j] = f16::from_f32(src[j]);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn round8(x: __m256) -> __m256 {
        _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x))
    }

    /// # Safety
    /// Requires AVX2+FMA+F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: every load below reads 8 floats at an index bounded by n <= both lengths.
        unsafe {
            while i + 16 <= n {
                acc0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            while i + 8 <= n {
                acc0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
                i += 8;
            }
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let hi = _mm256_extractf128_ps::<1>(acc);
        let lo = _mm256_castps256_ps128(acc);
        let s4 = _mm_add_ps(hi, lo);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
        let mut s = _mm_cvtss_f32(s1);
        for j in i..n {
            s += a[j] * b[j];
        }
        s
    }

    /// Horizontal sum of 8 lanes in the order used by [`dot`].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn hsum(acc: __m256) -> f32 {
        let hi = _mm256_extractf128_ps::<1>(acc);
        let lo = _mm256_castps256_ps128(acc);
        let s4 = _mm_add_ps(hi, lo);
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2));
        _mm_cvtss_f32(s1)
    }

    /// Four [`dot`]s of the rows `q[r * n..(r + 1) * n]` (`n = k.len()`) with `k`, interleaved
    /// for instruction-level parallelism; each row's operations are exactly those of [`dot`].
    ///
    /// # Safety
    /// Requires AVX2+FMA+F16C and `q.len() >= 4 * k.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot4(q: &[f32], k: &[f32]) -> [f32; 4] {
        let n = k.len();
        assert!(q.len() >= 4 * n);
        let mut a0 = [_mm256_setzero_ps(); 4];
        let mut a1 = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        // SAFETY: every load reads 8 floats at k index < n, or q index < 4 * n <= q.len().
        unsafe {
            let qp = q.as_ptr();
            let kp = k.as_ptr();
            while i + 16 <= n {
                let k0 = _mm256_loadu_ps(kp.add(i));
                let k1 = _mm256_loadu_ps(kp.add(i + 8));
                for r in 0..4 {
                    let b = qp.add(r * n + i);
                    a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(b), k0, a0[r]);
                    a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(b.add(8)), k1, a1[r]);
                }
                i += 16;
            }
            while i + 8 <= n {
                let k0 = _mm256_loadu_ps(kp.add(i));
                for (r, a) in a0.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(r * n + i)), k0, *a);
                }
                i += 8;
            }
        }
        let mut out = [0.0f32; 4];
        for r in 0..4 {
            let mut s = hsum(_mm256_add_ps(a0[r], a1[r]));
            for j in i..n {
                s += q[r * n + j] * k[j];
            }
            out[r] = s;
        }
        out
    }

    /// `acc = acc * ms + v * vs` (multiply by `ms` skipped when it is 1), unfused.
    ///
    /// # Safety
    /// Requires AVX2+FMA+F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scale_axpy(acc: &mut [f32], ms: f32, v: &[f32], vs: f32) {
        let n = acc.len().min(v.len());
        let (vm, vv) = (_mm256_set1_ps(ms), _mm256_set1_ps(vs));
        let scale = ms != 1.0;
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n bounds both slices.
            unsafe {
                let p = acc.as_mut_ptr().add(i);
                let mut a = _mm256_loadu_ps(p);
                if scale {
                    a = _mm256_mul_ps(a, vm);
                }
                let x = _mm256_mul_ps(_mm256_loadu_ps(v.as_ptr().add(i)), vv);
                _mm256_storeu_ps(p, _mm256_add_ps(a, x));
            }
            i += 8;
        }
        for j in i..n {
            let a = if scale { acc[j] * ms } else { acc[j] };
            acc[j] = a + v[j] * vs;
        }
    }

    /// `acc[d] = acc[d] * w[2j] + f32(v[j * stride + d]) * w[2j + 1]` for every key `j` in
    /// turn (`j < w.len() / 2`), unfused, with 64 (then 8, then 1) accumulators held in
    /// registers across all keys.
    ///
    /// # Safety
    /// Requires AVX2+FMA+F16C and `v.len() >= (w.len() / 2 - 1) * stride + acc.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn accumulate_v(acc: &mut [f32], w: &[f32], v: &[f16], stride: usize) {
        // SAFETY: the caller's guarantees are `v_sums`'.
        let d = unsafe { v_sums::<false>(acc, w, v, stride) };
        for (dd, a) in acc.iter_mut().enumerate().skip(d) {
            for j in 0..w.len() / 2 {
                *a = *a * w[2 * j] + v[j * stride + dd].to_f32() * w[2 * j + 1];
            }
        }
    }

    /// The f16-accumulating V sum of ggml's one-row kernel over keys `j < w.len() / 2`: for
    /// each key, where its `ms = w[2 j]` is not 1 (the maximum moved) `acc = f16(acc * ms)`,
    /// then `acc = f16(v_j * vs + acc)` (one FMA) with `vs = w[2 j + 1]`: the operations of
    /// [`scale_round`] and [`mad_round`] key after key (a scale by exactly 1 leaves an f16
    /// value unchanged), with 64 (then 8) sums held in registers across all keys. `acc.len()`
    /// must be a multiple of 8.
    ///
    /// # Safety
    /// Requires AVX2+FMA+F16C and `v.len() >= (w.len() / 2 - 1) * stride + acc.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn accumulate_v_round(acc: &mut [f32], w: &[f32], v: &[f16], stride: usize) {
        assert!(acc.len().is_multiple_of(8));
        // SAFETY: the caller's guarantees are `v_sums`'.
        unsafe { v_sums::<true>(acc, w, v, stride) };
    }

    /// The V sums of [`accumulate_v`] (`F16 = false`) or [`accumulate_v_round`] (`F16 = true`)
    /// over the outputs in whole groups of 8, 64 (then 8) of them in registers across all keys;
    /// returns how many outputs it covered (the rest, fewer than 8, is the caller's).
    ///
    /// # Safety
    /// Requires AVX2+FMA+F16C and `v.len() >= (w.len() / 2 - 1) * stride + acc.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn v_sums<const F16: bool>(
        acc: &mut [f32],
        w: &[f32],
        v: &[f16],
        stride: usize,
    ) -> usize {
        let n = acc.len();
        let nk = w.len() / 2;
        if nk == 0 {
            return n;
        }
        assert!(v.len() >= (nk - 1) * stride + n);
        let vp = v.as_ptr() as *const u16;
        // One key's step on 8 outputs.
        let step = |x: __m256, xv: __m256, j: usize| -> __m256 {
            let (ms, vs) = (w[2 * j], _mm256_set1_ps(w[2 * j + 1]));
            if F16 {
                let x = if ms != 1.0 {
                    round8(_mm256_mul_ps(x, _mm256_set1_ps(ms)))
                } else {
                    x
                };
                round8(_mm256_fmadd_ps(xv, vs, x))
            } else {
                _mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(ms)), _mm256_mul_ps(xv, vs))
            }
        };
        let mut d = 0;
        // SAFETY: every read is at row j < nk, column < n: inside `v` by the assert above;
        // acc reads/writes are below n.
        unsafe {
            while d + 64 <= n {
                let mut a = [_mm256_setzero_ps(); 8];
                for (r, x) in a.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(acc.as_ptr().add(d + 8 * r));
                }
                for j in 0..nk {
                    let row = vp.add(j * stride + d);
                    for (r, x) in a.iter_mut().enumerate() {
                        let h = _mm_loadu_si128(row.add(8 * r) as *const __m128i);
                        *x = step(*x, _mm256_cvtph_ps(h), j);
                    }
                }
                for (r, x) in a.iter().enumerate() {
                    _mm256_storeu_ps(acc.as_mut_ptr().add(d + 8 * r), *x);
                }
                d += 64;
            }
            while d + 8 <= n {
                let mut x = _mm256_loadu_ps(acc.as_ptr().add(d));
                for j in 0..nk {
                    let h = _mm_loadu_si128(vp.add(j * stride + d) as *const __m128i);
                    x = step(x, _mm256_cvtph_ps(h), j);
                }
                _mm256_storeu_ps(acc.as_mut_ptr().add(d), x);
                d += 8;
            }
        }
        d
    }

    /// [`super::dot_f16_values_ggml`] of `q` (f16-representable values) with the f16 key row
    /// `k` converted on the fly, for `k.len()` a multiple of 64: the same four 16-lane
    /// accumulators (as eight 8-lane halves), the same pairwise reduction, so the same bits.
    /// (A product of two f16 values is exact in f32, so the FMA equals ggml's multiply-add.)
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dot_f16_row_ggml(q: &[f32], k: &[f16]) -> f32 {
        let n = k.len();
        assert!(n.is_multiple_of(64) && q.len() >= n);
        // acc[2 a + h]: lanes 8 h .. 8 h + 8 of ggml's accumulator a.
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..n).step_by(64) {
            for (i, a) in acc.iter_mut().enumerate() {
                // SAFETY: c + 8 i + 8 <= n <= q.len() (asserted); unaligned loads.
                unsafe {
                    let kv = _mm256_cvtph_ps(_mm_loadu_si128(k.as_ptr().add(c + 8 * i).cast()));
                    let qv = _mm256_loadu_ps(q.as_ptr().add(c + 8 * i));
                    *a = _mm256_fmadd_ps(qv, kv, *a);
                }
            }
        }
        // x[l] = (acc0[l] + acc2[l]) + (acc1[l] + acc3[l]), low and high halves
        let x_lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
        let x_hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
        // t8[l] = x[l + 8] + x[l]; t4[l] = t8[l + 4] + t8[l]
        let t8 = _mm256_add_ps(x_hi, x_lo);
        let t4 = _mm_add_ps(_mm256_extractf128_ps::<1>(t8), _mm256_castps256_ps128(t8));
        // (t4[0] + t4[2]) + (t4[1] + t4[3])
        let t2 = _mm_add_ps(t4, _mm_movehl_ps(t4, t4));
        _mm_cvtss_f32(_mm_add_ss(t2, _mm_shuffle_ps::<1>(t2, t2)))
    }

    /// [`super::legacy_scores`]' kernel: every key row converted inside the ggml-order dot.
    ///
    /// # Safety
    /// Requires AVX2+FMA+F16C; `k.dk` a multiple of 64.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scores_f16_ggml(
        q: &[f32],
        k: super::KeyRows,
        keys: std::ops::Range<usize>,
        scale: f32,
        scores: &mut [f32],
    ) {
        for j in keys {
            scores[j] = dot_f16_row_ggml(q, k.row(j)) * scale;
        }
    }

    /// The F16-accumulate attention of one KV group (heads `h0..h0 + n_h`, keys `lo..=pos`)
    /// into `sc.acc`, `sc.m`, `sc.s`: the generic loop of `attention_unchecked` operation for
    /// operation, with each key row converted inside the dot and no call per row.
    ///
    /// # Safety
    /// Requires AVX2+FMA+F16C; `head_dim_k` a multiple of 64, `head_dim_v` of 8.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn f16_acc_group(
        p: &super::AttnParams,
        pos: usize,
        lo: usize,
        g: usize,
        h0: usize,
        n_h: usize,
        k: &[f16],
        v: &[f16],
        sc: &mut super::AttnScratch,
    ) {
        let (dk, dv) = (p.head_dim_k, p.head_dim_v);
        let vd = p.v_dim();
        let keys = super::KeyRows {
            k,
            kd: p.k_dim(),
            first: g * dk,
            dk,
        };
        // Two passes with the operations of ggml's key-by-key loop, in its order for each head:
        // the scores and softmax factors of every key first (`ms` where the maximum moves,
        // `vs` otherwise), then each head's f16-rounded V sum over all keys with the sums in
        // registers (a sum read and written back per key was most of a long context's decode
        // time).
        let nk = pos + 1 - lo;
        if sc.w.len() < 2 * nk * n_h {
            sc.w.resize(2 * nk * n_h, 0.0);
        }
        for j in lo..=pos {
            let kr = keys.row(j);
            for hh in 0..n_h {
                let h = h0 + hh;
                let s = dot_f16_row_ggml(&sc.q[h * dk..(h + 1) * dk], kr) * p.scale;
                let m_old = sc.m[hh];
                let (ms, vs) = if s > m_old {
                    sc.m[hh] = s;
                    ((m_old - s).exp(), 1.0f32)
                } else {
                    (1.0f32, (s - m_old).exp())
                };
                let i = (hh * nk + (j - lo)) * 2;
                sc.w[i] = ms;
                sc.w[i + 1] = vs;
                sc.s[hh] = sc.s[hh].mul_add(ms, vs);
            }
        }
        for hh in 0..n_h {
            let acc = &mut sc.acc[hh * dv..(hh + 1) * dv];
            let w = &sc.w[hh * nk * 2..(hh + 1) * nk * 2];
            // SAFETY: AVX2+FMA+F16C are enabled here; `v` holds rows of `vd` values for keys
            // `lo..=pos` (the caller checked the cache), read at `g * dv + d < vd`.
            unsafe { accumulate_v_round(acc, w, &v[lo * vd + g * dv..], vd) };
        }
    }

    /// # Safety
    /// Requires AVX2+FMA+F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn scale_round(acc: &mut [f32], s: f32) {
        let n = acc.len();
        let vs = _mm256_set1_ps(s);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe {
                let p = acc.as_mut_ptr().add(i);
                _mm256_storeu_ps(p, round8(_mm256_mul_ps(_mm256_loadu_ps(p), vs)));
            }
            i += 8;
        }
        for a in &mut acc[i..] {
            *a = f16::from_f32(*a * s).to_f32();
        }
    }

    /// # Safety
    /// Requires AVX2+FMA+F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn mad_round(acc: &mut [f32], v: &[f32], s: f32) {
        let n = acc.len().min(v.len());
        let vs = _mm256_set1_ps(s);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n bounds both slices.
            unsafe {
                let p = acc.as_mut_ptr().add(i);
                let x = _mm256_loadu_ps(v.as_ptr().add(i));
                _mm256_storeu_ps(p, round8(_mm256_fmadd_ps(x, vs, _mm256_loadu_ps(p))));
            }
            i += 8;
        }
        for j in i..n {
            acc[j] = f16::from_f32(v[j].mul_add(s, acc[j])).to_f32();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention
// ---------------------------------------------------------------------------------------------

/// Shape and masking of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (`n_head` must be a multiple: GQA/MQA share a KV head across a group).
    pub n_head_kv: usize,
    /// Dimension of each query/key head.
    pub head_dim_k: usize,
    /// Dimension of each value head.
    pub head_dim_v: usize,
    /// Factor applied to each `q . k` before the softmax.
    pub scale: f32,
    /// Sliding window: a query at position `p` sees keys at `p - window < k <= p`; `None` sees
    /// every key up to `p` (causal).
    pub window: Option<usize>,
    /// Rounding of the intermediate values.
    pub precision: AttnPrecision,
}

/// Which of ggml's CPU flash-attention kernels to reproduce numerically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnPrecision {
    /// ggml's one-row kernel (used for decode and for micro-batches of fewer than 64 queries):
    /// the query rounded to f16 and the weighted V sum kept in f16.
    #[default]
    F16Accumulate,
    /// ggml's tiled kernel (micro-batches of 64 queries or more): query, scores and the V sum
    /// in f32.
    F32,
    /// llama.cpp before flash attention (late 2023, what the reference PowerInfer runs): scores
    /// `K · f16(q)`, softmax through ggml's f16 exp table over a key range padded to 32, the
    /// probabilities rounded to f16 and multiplied with V like a matrix product. Each dot
    /// product in [`dot_f16_values_ggml`]'s order.
    Legacy,
}

impl AttnParams {
    pub(crate) fn check(&self, op: &'static str) -> Result<(), OpsError> {
        if self.n_head == 0 || self.n_head_kv == 0 || self.head_dim_k == 0 || self.head_dim_v == 0 {
            return Err(param(op, "head counts and head dims must be > 0"));
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            return Err(param(
                op,
                format!(
                    "n_head {} is not a multiple of n_head_kv {}",
                    self.n_head, self.n_head_kv
                ),
            ));
        }
        if self.window == Some(0) {
            return Err(param(op, "sliding window of 0"));
        }
        Ok(())
    }

    /// Elements of one query row (`n_head * head_dim_k`).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim_k
    }
    /// Elements of one cached key row (`n_head_kv * head_dim_k`).
    pub fn k_dim(&self) -> usize {
        self.n_head_kv * self.head_dim_k
    }
    /// Elements of one cached value row (`n_head_kv * head_dim_v`).
    pub fn v_dim(&self) -> usize {
        self.n_head_kv * self.head_dim_v
    }
    /// Elements of one output row (`n_head * head_dim_v`).
    pub fn out_dim(&self) -> usize {
        self.n_head * self.head_dim_v
    }
}

/// Reusable buffers for [`attention`] / [`attention_batch`] (one per thread).
#[derive(Debug, Default, Clone)]
pub struct AttnScratch {
    q: Vec<f32>,
    q16: Vec<f16>,
    k: Vec<f32>,
    v: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    s: Vec<f32>,
    /// f32 path: per head and key, the softmax rescale `ms` and weight `vs`.
    w: Vec<f32>,
    /// Legacy path: the V sums' 64 accumulators per output, one value row as f32, and the
    /// outputs' f64 sums.
    vacc: Vec<f32>,
    vrow: Vec<f32>,
    vsum: Vec<f64>,
}

impl AttnScratch {
    /// Buffers sized for `p`.
    pub fn new(p: &AttnParams) -> Self {
        let group = p.n_head / p.n_head_kv.max(1);
        Self {
            q: vec![0.0; p.q_dim()],
            q16: vec![f16::ZERO; p.q_dim()],
            k: vec![0.0; p.head_dim_k],
            v: vec![0.0; p.head_dim_v],
            acc: vec![0.0; group * p.head_dim_v],
            m: vec![0.0; group],
            s: vec![0.0; group],
            w: Vec::new(),
            vacc: Vec::new(),
            vrow: Vec::new(),
            vsum: Vec::new(),
        }
    }

    fn ensure(&mut self, p: &AttnParams) {
        let group = p.n_head / p.n_head_kv;
        if self.q.len() != p.q_dim()
            || self.k.len() != p.head_dim_k
            || self.v.len() != p.head_dim_v
            || self.acc.len() != group * p.head_dim_v
        {
            *self = Self::new(p);
        }
    }
}

/// Attention of one query row at position `pos` over an F16 KV cache.
///
/// `k` holds key rows of `p.k_dim()` values for positions `0..n`, `v` value rows of `p.v_dim()`
/// for the same positions (`n > pos`; rows after `pos` are ignored: causal). `q` has `p.q_dim()`
/// values, `out` receives `p.out_dim()`. Query head `h` uses KV head `h / (n_head / n_head_kv)`.
pub fn attention(
    p: &AttnParams,
    q: &[f32],
    pos: usize,
    k: &[f16],
    v: &[f16],
    out: &mut [f32],
    scratch: &mut AttnScratch,
) -> Result<(), OpsError> {
    attention_heads(p, q, pos, k, v, 0..p.n_head, out, scratch)
}

/// [`attention`] for the query heads in `heads` only (to split one row's heads across
/// threads): `q` is still the whole query row (`p.q_dim()`), `out` receives
/// `heads.len() * p.head_dim_v` values, head `heads.start` first. Each head's result is identical
/// to what [`attention`] computes for it.
#[allow(clippy::too_many_arguments)]
pub fn attention_heads(
    p: &AttnParams,
    q: &[f32],
    pos: usize,
    k: &[f16],
    v: &[f16],
    heads: std::ops::Range<usize>,
    out: &mut [f32],
    scratch: &mut AttnScratch,
) -> Result<(), OpsError> {
    const OP: &str = "attention";
    p.check(OP)?;
    check_len(OP, "q", p.q_dim(), q.len())?;
    if heads.start > heads.end || heads.end > p.n_head {
        return Err(param(
            OP,
            format!("head range {heads:?} outside 0..{}", p.n_head),
        ));
    }
    check_len(OP, "out", heads.len() * p.head_dim_v, out.len())?;
    check_cache(OP, p, pos, k, v)?;
    scratch.ensure(p);
    attention_unchecked(p, q, pos, k, v, heads, out, scratch);
    Ok(())
}

fn check_cache(
    op: &'static str,
    p: &AttnParams,
    pos: usize,
    k: &[f16],
    v: &[f16],
) -> Result<(), OpsError> {
    let need = pos + 1;
    if k.len() < need * p.k_dim() || !k.len().is_multiple_of(p.k_dim()) {
        return Err(OpsError::Length {
            op,
            what: "k cache",
            expected: need * p.k_dim(),
            found: k.len(),
        });
    }
    if v.len() < need * p.v_dim() || !v.len().is_multiple_of(p.v_dim()) {
        return Err(OpsError::Length {
            op,
            what: "v cache",
            expected: need * p.v_dim(),
            found: v.len(),
        });
    }
    Ok(())
}

/// Attention of `n_tokens` consecutive query rows at positions `pos0..pos0 + n_tokens` (the
/// prompt-processing case): `q` is `n_tokens x p.q_dim()`, `out` is `n_tokens x p.out_dim()`, the
/// cache must hold rows up to `pos0 + n_tokens - 1`. Each row is computed exactly as
/// [`attention`] would.
#[allow(clippy::too_many_arguments)]
pub fn attention_batch(
    p: &AttnParams,
    q: &[f32],
    n_tokens: usize,
    pos0: usize,
    k: &[f16],
    v: &[f16],
    out: &mut [f32],
    scratch: &mut AttnScratch,
) -> Result<(), OpsError> {
    const OP: &str = "attention_batch";
    p.check(OP)?;
    check_len(OP, "q", n_tokens * p.q_dim(), q.len())?;
    check_len(OP, "out", n_tokens * p.out_dim(), out.len())?;
    if n_tokens == 0 {
        return Ok(());
    }
    check_cache(OP, p, pos0 + n_tokens - 1, k, v)?;
    scratch.ensure(p);
    for t in 0..n_tokens {
        attention_unchecked(
            p,
            &q[t * p.q_dim()..(t + 1) * p.q_dim()],
            pos0 + t,
            k,
            v,
            0..p.n_head,
            &mut out[t * p.out_dim()..(t + 1) * p.out_dim()],
            scratch,
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn attention_unchecked(
    p: &AttnParams,
    q: &[f32],
    pos: usize,
    k: &[f16],
    v: &[f16],
    heads: std::ops::Range<usize>,
    out: &mut [f32],
    sc: &mut AttnScratch,
) {
    let (dk, dv) = (p.head_dim_k, p.head_dim_v);
    let group = p.n_head / p.n_head_kv;
    if heads.is_empty() {
        return;
    }
    let qr = heads.start * dk..heads.end * dk;
    if p.precision == AttnPrecision::Legacy {
        legacy_attention(p, q, pos, k, v, heads, out, sc);
        return;
    }
    let f16_acc = p.precision == AttnPrecision::F16Accumulate;
    if f16_acc {
        // Q rounded to f16, as ggml's one-row kernel converts it to K's dot type.
        let _ = f32_to_f16(&q[qr.clone()], &mut sc.q16[qr.clone()]);
        let _ = f16_to_f32(&sc.q16[qr.clone()], &mut sc.q[qr]);
    } else {
        sc.q[qr.clone()].copy_from_slice(&q[qr]);
    }
    let lo = match p.window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    };
    let g_first = heads.start / group;
    let g_last = (heads.end - 1) / group;
    for g in g_first..=g_last {
        // query heads of this KV group that are in range
        let h0 = heads.start.max(g * group);
        let h1 = heads.end.min((g + 1) * group);
        let n_h = h1 - h0;
        sc.acc[..n_h * dv].iter_mut().for_each(|a| *a = 0.0);
        sc.m[..n_h].iter_mut().for_each(|m| *m = f32::NEG_INFINITY);
        sc.s[..n_h].iter_mut().for_each(|s| *s = 0.0);
        if !group_simd(p, pos, lo, g, h0, n_h, k, v, sc) {
            group_generic(p, pos, lo, g, h0, n_h, k, v, sc);
        }
        for hh in 0..n_h {
            let o = (h0 + hh - heads.start) * dv;
            let inv = if sc.s[hh] == 0.0 { 0.0 } else { 1.0 / sc.s[hh] };
            for (o, &a) in out[o..o + dv]
                .iter_mut()
                .zip(&sc.acc[hh * dv..(hh + 1) * dv])
            {
                *o = a * inv;
            }
        }
    }
}

/// [`group_generic`] by a SIMD kernel where this CPU and the head sizes have one; `false`
/// (nothing done) otherwise.
#[allow(clippy::too_many_arguments)]
fn group_simd(
    p: &AttnParams,
    pos: usize,
    lo: usize,
    g: usize,
    h0: usize,
    n_h: usize,
    k: &[f16],
    v: &[f16],
    sc: &mut AttnScratch,
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() {
        match p.precision {
            AttnPrecision::F32 => {
                f32_group_avx(p, pos, lo, g, h0, n_h, k, v, sc);
                return true;
            }
            AttnPrecision::F16Accumulate
                if p.head_dim_k.is_multiple_of(64) && p.head_dim_v.is_multiple_of(8) =>
            {
                // SAFETY: the CPU features were checked, and the head sizes.
                unsafe { x86::f16_acc_group(p, pos, lo, g, h0, n_h, k, v, sc) };
                return true;
            }
            _ => {}
        }
    }
    let _ = (p, pos, lo, g, h0, n_h, k, v, sc);
    false
}

/// One KV group's attention (heads `h0..h0 + n_h`, keys `lo..=pos`) into `sc.acc`, `sc.m` and
/// `sc.s`, key by key in ggml's order: the plain code the SIMD group kernels reproduce.
#[allow(clippy::too_many_arguments)]
fn group_generic(
    p: &AttnParams,
    pos: usize,
    lo: usize,
    g: usize,
    h0: usize,
    n_h: usize,
    k: &[f16],
    v: &[f16],
    sc: &mut AttnScratch,
) {
    let (dk, dv) = (p.head_dim_k, p.head_dim_v);
    let (kd, vd) = (p.k_dim(), p.v_dim());
    let f16_acc = p.precision == AttnPrecision::F16Accumulate;
    for j in lo..=pos {
        let _ = f16_to_f32(&k[j * kd + g * dk..j * kd + (g + 1) * dk], &mut sc.k);
        let _ = f16_to_f32(&v[j * vd + g * dv..j * vd + (g + 1) * dv], &mut sc.v);
        let mut dots4 = [0.0f32; 4];
        for hh in 0..n_h {
            let h = h0 + hh;
            let (qh, kh) = (&sc.q[h * dk..(h + 1) * dk], &sc.k[..]);
            let s = if f16_acc {
                dot_f16_values_ggml(qh, kh)
            } else if hh % 4 == 0 && hh + 4 <= n_h {
                // four heads against the same key at once (same per-head order as the
                // one-head dot), kept for the next three heads
                let qs = &sc.q[h * dk..(h + 4) * dk];
                dots4 = dot_f32_x4(qs, kh);
                dots4[0]
            } else if hh / 4 * 4 + 4 <= n_h {
                dots4[hh % 4]
            } else {
                dot_f32_unchecked(qh, kh)
            } * p.scale;
            let m_old = sc.m[hh];
            let mut ms = 1.0f32;
            let mut vs = 1.0f32;
            let acc = &mut sc.acc[hh * dv..(hh + 1) * dv];
            if s > m_old {
                sc.m[hh] = s;
                ms = (m_old - s).exp();
                if f16_acc {
                    scale_round_f16(acc, ms);
                }
            } else {
                vs = (s - m_old).exp();
            }
            if f16_acc {
                mad_round_f16(acc, &sc.v, vs);
            } else {
                // `acc = acc * ms + v * vs`, each product rounded on its own (no FMA)
                scale_axpy_f32(acc, ms, &sc.v, vs);
            }
            // ggml's `S = S*ms + vs`, which GCC contracts into one FMA in the one-row kernel
            sc.s[hh] = if f16_acc {
                sc.s[hh].mul_add(ms, vs)
            } else {
                sc.s[hh] * ms + vs
            };
        }
    }
}

/// Where one KV head's key rows lie in the cache: row `j` is `k[j * kd + first..][..dk]`.
#[derive(Clone, Copy)]
struct KeyRows<'a> {
    k: &'a [f16],
    kd: usize,
    first: usize,
    dk: usize,
}

impl<'a> KeyRows<'a> {
    fn row(&self, j: usize) -> &'a [f16] {
        &self.k[j * self.kd + self.first..j * self.kd + self.first + self.dk]
    }
}

/// `scores[j] = dot_f16_values_ggml(q, key j) * scale` for `j` in `keys` (`q` f16-representable
/// values): the AVX2 kernel that converts each key row inside the dot where the CPU and the
/// head size allow it (the same bits), else row by row through `tmp`.
fn legacy_scores(
    q: &[f32],
    k: KeyRows,
    keys: std::ops::Range<usize>,
    scale: f32,
    scores: &mut [f32],
    tmp: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma_f16c() && k.dk.is_multiple_of(64) {
        // SAFETY: the CPU features and the head size were checked.
        unsafe { x86::scores_f16_ggml(q, k, keys, scale, scores) };
        return;
    }
    for j in keys {
        let _ = f16_to_f32(k.row(j), &mut tmp[..k.dk]);
        scores[j] = dot_f16_values_ggml(q, &tmp[..k.dk]) * scale;
    }
}

/// [`AttnPrecision::Legacy`]: one query row, heads `heads`, keys `lo..=pos`.
#[allow(clippy::too_many_arguments)]
fn legacy_attention(
    p: &AttnParams,
    q: &[f32],
    pos: usize,
    k: &[f16],
    v: &[f16],
    heads: std::ops::Range<usize>,
    out: &mut [f32],
    sc: &mut AttnScratch,
) {
    let (dk, dv) = (p.head_dim_k, p.head_dim_v);
    let group = p.n_head / p.n_head_kv;
    let (kd, vd) = (p.k_dim(), p.v_dim());
    let lo = match p.window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    };
    // llama.cpp attended a cache view padded to a multiple of 32 cells; the masked cells weigh
    // exactly 0 but decide which part of ggml's dot product sums which element.
    let n_kv = (pos + 1).div_ceil(32) * 32;
    if sc.w.len() < n_kv {
        sc.w.resize(n_kv, 0.0);
    }
    let probs = &mut sc.w[..n_kv];
    for h in heads.clone() {
        let g = h / group;
        let qh = &mut sc.q[..dk];
        for (d, &x) in qh.iter_mut().zip(&q[h * dk..(h + 1) * dk]) {
            *d = f16::from_f32(x).to_f32();
        }
        probs[..n_kv].fill(f32::NEG_INFINITY);
        let krows = KeyRows {
            k,
            kd,
            first: g * dk,
            dk,
        };
        legacy_scores(&sc.q[..dk], krows, lo..pos + 1, p.scale, probs, &mut sc.k);
        let max = probs[lo..=pos]
            .iter()
            .fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        let mut sum = 0.0f64;
        for pj in probs.iter_mut() {
            if *pj == f32::NEG_INFINITY {
                *pj = 0.0;
            } else {
                // ggml's table: exp of the f16-rounded argument, stored as f16
                let x = f16::from_f32(*pj - max).to_f32();
                let e = f16::from_f32(x.exp()).to_f32();
                sum += f64::from(e);
                *pj = e;
            }
        }
        let inv = (1.0 / sum) as f32;
        for pj in probs.iter_mut() {
            *pj = f16::from_f32(*pj * inv).to_f32();
        }
        let o = &mut out[(h - heads.start) * dv..(h - heads.start + 1) * dv];
        legacy_v_sums(
            &v[g * dv..],
            vd,
            dv,
            pos,
            probs,
            o,
            &mut sc.vacc,
            &mut sc.vrow,
            &mut sc.vsum,
        );
    }
}

/// `out[d] = dot_f16_values_ggml(col_d, probs)` for every `d < dv`, where `col_d[j]` is
/// `v[j * vd + d]` (as f32) for `j <= pos` and 0 after: the same sums in the same order, but
/// each value row converted once and the sums vectorised across `d` instead of run one `d` at
/// a time over a gathered column (which converted every value with a scalar call).
#[allow(clippy::too_many_arguments)]
fn legacy_v_sums(
    v: &[f16],
    vd: usize,
    dv: usize,
    pos: usize,
    probs: &[f32],
    out: &mut [f32],
    acc: &mut Vec<f32>,
    row: &mut Vec<f32>,
    sums: &mut Vec<f64>,
) {
    let n = probs.len();
    let np = n / 64 * 64;
    // acc[(16 * jb + l) * dv + d]: ggml's accumulator `jb` (of 4), lane `l` (of 16), for `d`.
    acc.clear();
    acc.resize(64 * dv, 0.0);
    row.resize(dv, 0.0);
    let load = |j: usize, row: &mut Vec<f32>| {
        if j <= pos {
            let _ = f16_to_f32(&v[j * vd..j * vd + dv], row);
        } else {
            row.fill(0.0);
        }
    };
    for c in 0..np / 64 {
        for k in 0..64 {
            let j = 64 * c + k;
            load(j, row);
            let pj = probs[j];
            for (a, &x) in acc[k * dv..(k + 1) * dv].iter_mut().zip(row.iter()) {
                *a += x * pj;
            }
        }
    }
    // The reduction of `dot_f16_values_ggml`, lane by lane for every `d` at once: `x[l]` into
    // `acc[l]`, then halves 8, 4, then `(l0 + l2) + (l1 + l3)` into `out`.
    let (head, _) = acc.split_at_mut(64 * dv);
    for l in 0..16 {
        for d in 0..dv {
            let a = |jb: usize| head[(16 * jb + l) * dv + d];
            head[l * dv + d] = (a(0) + a(2)) + (a(1) + a(3));
        }
    }
    for l in 0..8 {
        for d in 0..dv {
            head[l * dv + d] += head[(l + 8) * dv + d];
        }
    }
    for l in 0..4 {
        for d in 0..dv {
            head[l * dv + d] += head[(l + 4) * dv + d];
        }
    }
    sums.clear();
    sums.extend((0..dv).map(|d| {
        let t = |l: usize| head[l * dv + d];
        f64::from((t(0) + t(2)) + (t(1) + t(3)))
    }));
    for (j, &pj) in probs.iter().enumerate().skip(np) {
        load(j, row);
        for (s, &x) in sums.iter_mut().zip(row.iter()) {
            *s += f64::from(x * pj);
        }
    }
    for (o, &s) in out.iter_mut().zip(sums.iter()) {
        *o = s as f32;
    }
}

/// The f32-precision attention of query heads `h0..h0 + n_h` (KV group `g`) over keys
/// `lo..=pos`, leaving the unnormalised V sums in `sc.acc` and the softmax sums in `sc.s`.
///
/// Same operations per output element as the key-by-key loop of [`group_generic`], in the
/// same order; only the loop nest differs (the running maximum in `sc.m` is not kept): scores and softmax factors are computed first,
/// then each 64-wide slice of a head's V sum is accumulated over all keys in registers.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn f32_group_avx(
    p: &AttnParams,
    pos: usize,
    lo: usize,
    g: usize,
    h0: usize,
    n_h: usize,
    k: &[f16],
    v: &[f16],
    sc: &mut AttnScratch,
) {
    let (dk, dv) = (p.head_dim_k, p.head_dim_v);
    let (kd, vd) = (p.k_dim(), p.v_dim());
    let nk = pos + 1 - lo;
    if sc.w.len() < 2 * nk * n_h {
        sc.w.resize(2 * nk * n_h, 0.0);
    }
    // scores, stored in the `vs` slots for now
    for j in lo..=pos {
        let _ = f16_to_f32(&k[j * kd + g * dk..j * kd + (g + 1) * dk], &mut sc.k);
        let mut dots4 = [0.0f32; 4];
        for hh in 0..n_h {
            let h = h0 + hh;
            let s = if hh % 4 == 0 && hh + 4 <= n_h {
                dots4 = dot_f32_x4(&sc.q[h * dk..(h + 4) * dk], &sc.k);
                dots4[0]
            } else if hh / 4 * 4 + 4 <= n_h {
                dots4[hh % 4]
            } else {
                dot_f32_unchecked(&sc.q[h * dk..(h + 1) * dk], &sc.k)
            } * p.scale;
            sc.w[(hh * nk + (j - lo)) * 2 + 1] = s;
        }
    }
    for hh in 0..n_h {
        let mut m = f32::NEG_INFINITY;
        let mut sum = 0.0f32;
        for jj in 0..nk {
            let i = (hh * nk + jj) * 2;
            let s = sc.w[i + 1];
            let mut ms = 1.0f32;
            let mut vs = 1.0f32;
            if s > m {
                ms = (m - s).exp();
                m = s;
            } else {
                vs = (s - m).exp();
            }
            sc.w[i] = ms;
            sc.w[i + 1] = vs;
            sum = sum * ms + vs;
        }
        sc.s[hh] = sum;
        let acc = &mut sc.acc[hh * dv..(hh + 1) * dv];
        let vrows = &v[lo * vd + g * dv..];
        // SAFETY: CPU features checked by the caller; `vrows` holds rows of `vd` values for keys
        // `lo..=pos` (the cache was length-checked), each read at `g * dv + d < vd`.
        unsafe { x86::accumulate_v(acc, &sc.w[hh * nk * 2..(hh + 1) * nk * 2], vrows, vd) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn f(&mut self) -> f32 {
            // splitmix64
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn vec(&mut self, n: usize) -> Vec<f32> {
            (0..n).map(|_| self.f()).collect()
        }
    }

    /// The SIMD group kernels (where this CPU has them) equal [`group_generic`] bit for bit:
    /// head sizes of one and several 64-wide chunks, grouped heads, windows. (The F32 kernel
    /// leaves no running maximum in `sc.m`; its sums are compared.)
    #[test]
    fn simd_attention_groups_equal_the_generic_loop() {
        let mut r = Rng(12);
        for precision in [AttnPrecision::F16Accumulate, AttnPrecision::F32] {
            for (n_head, n_head_kv, dk, dv, window) in [
                (9usize, 3usize, 64usize, 64usize, None),
                (4, 1, 256, 256, Some(7)),
                (6, 2, 128, 64, None),
                (5, 5, 64, 72, Some(1)),
            ] {
                let p = AttnParams {
                    n_head,
                    n_head_kv,
                    head_dim_k: dk,
                    head_dim_v: dv,
                    scale: 1.0 / (dk as f32).sqrt(),
                    window,
                    precision,
                };
                let n_ctx = 41;
                let to16 = |v: Vec<f32>| -> Vec<f16> {
                    v.iter().map(|&x| f16::from_f32(3.0 * x)).collect()
                };
                let k = to16(r.vec(n_ctx * p.k_dim()));
                let v = to16(r.vec(n_ctx * p.v_dim()));
                let group = n_head / n_head_kv;
                for pos in [0usize, 1, 17, 40] {
                    let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                    for g in 0..n_head_kv {
                        // f16-representable queries, as the caller leaves them
                        let q: Vec<f32> = r
                            .vec(p.q_dim())
                            .iter()
                            .map(|&x| f16::from_f32(2.0 * x).to_f32())
                            .collect();
                        let mut runs = Vec::new();
                        for simd in [false, true] {
                            let mut sc = AttnScratch::new(&p);
                            sc.q.copy_from_slice(&q);
                            sc.m.fill(f32::NEG_INFINITY);
                            let h0 = g * group;
                            if simd {
                                if !group_simd(&p, pos, lo, g, h0, group, &k, &v, &mut sc) {
                                    continue;
                                }
                            } else {
                                group_generic(&p, pos, lo, g, h0, group, &k, &v, &mut sc);
                            }
                            let bits =
                                |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                            let m = if precision == AttnPrecision::F32 {
                                Vec::new()
                            } else {
                                bits(&sc.m)
                            };
                            runs.push((bits(&sc.acc), m, bits(&sc.s)));
                        }
                        if runs.len() == 2 {
                            assert!(
                                runs[0] == runs[1],
                                "{precision:?} dk {dk} dv {dv} pos {pos} group {g}: SIMD differs"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The legacy path's key scores equal the row-by-row conversion and
    /// `dot_f16_values_ggml` bit for bit (whichever kernel `legacy_scores` picks here).
    #[test]
    fn legacy_scores_equal_row_by_row_ggml_dots() {
        let mut r = Rng(13);
        for (dk, n_kv_heads) in [(64usize, 1usize), (128, 3), (256, 2), (96, 2)] {
            let kd = dk * n_kv_heads;
            let n = 45;
            let k: Vec<f16> = r
                .vec(n * kd)
                .iter()
                .map(|&x| f16::from_f32(4.0 * x))
                .collect();
            let q: Vec<f32> = r
                .vec(dk)
                .iter()
                .map(|&x| f16::from_f32(3.0 * x).to_f32())
                .collect();
            for g in 0..n_kv_heads {
                let rows = KeyRows {
                    k: &k,
                    kd,
                    first: g * dk,
                    dk,
                };
                let mut got = vec![f32::NEG_INFINITY; n];
                let mut tmp = vec![0.0f32; dk];
                legacy_scores(&q, rows, 3..n, 0.125, &mut got, &mut tmp);
                for (j, got) in got.iter().enumerate() {
                    let want = if j < 3 {
                        f32::NEG_INFINITY
                    } else {
                        let kf: Vec<f32> = rows.row(j).iter().map(|h| h.to_f32()).collect();
                        dot_f16_values_ggml(&q, &kf) * 0.125
                    };
                    assert_eq!(got.to_bits(), want.to_bits(), "dk {dk} group {g} key {j}");
                }
            }
        }
    }

    /// The legacy path's V sums, vectorised across outputs, equal the column-by-column
    /// `dot_f16_values_ggml` they replace, bit for bit (positions before, at and after a
    /// 64-key boundary; value rows wider than one head; an awkward head size).
    #[test]
    fn legacy_v_sums_equal_columnwise_ggml_dots() {
        let mut r = Rng(11);
        let (mut acc, mut row, mut sums) = (Vec::new(), Vec::new(), Vec::new());
        for dv in [64usize, 80, 128] {
            let vd = 3 * dv;
            for pos in [0usize, 5, 31, 32, 63, 64, 95, 127, 128, 200] {
                let n_kv = (pos + 1).div_ceil(32) * 32;
                let v: Vec<f16> = r
                    .vec((pos + 1) * vd)
                    .into_iter()
                    .map(f16::from_f32)
                    .collect();
                // Softmax-like weights, f16-representable, 0 past `pos` (as the caller leaves them).
                let probs: Vec<f32> = (0..n_kv)
                    .map(|j| {
                        if j <= pos {
                            f16::from_f32(r.f().abs()).to_f32()
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let g = 1;
                let mut got = vec![f32::NAN; dv];
                legacy_v_sums(
                    &v[g * dv..],
                    vd,
                    dv,
                    pos,
                    &probs,
                    &mut got,
                    &mut acc,
                    &mut row,
                    &mut sums,
                );
                for (d, &o) in got.iter().enumerate() {
                    let col: Vec<f32> = (0..n_kv)
                        .map(|j| {
                            if j <= pos {
                                v[j * vd + g * dv + d].to_f32()
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    let want = dot_f16_values_ggml(&col, &probs);
                    assert_eq!(
                        o.to_bits(),
                        want.to_bits(),
                        "dv {dv} pos {pos} d {d}: {o} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn dot_x4_is_bitwise_four_single_dots() {
        let mut r = Rng(7);
        for n in [1, 7, 8, 15, 16, 17, 31, 64, 100, 256] {
            let q = r.vec(4 * n);
            let k = r.vec(n);
            let d = dot_f32_x4(&q, &k);
            for (row, &got) in d.iter().enumerate() {
                let want = dot_f32_unchecked(&q[row * n..(row + 1) * n], &k);
                assert_eq!(got.to_bits(), want.to_bits(), "n {n} row {row}");
            }
        }
    }

    #[test]
    fn scale_axpy_is_bitwise_unfused_reference() {
        let mut r = Rng(11);
        for n in [1, 5, 8, 13, 64, 259] {
            for (ms, vs) in [(1.0f32, 0.37f32), (0.61, 1.0), (0.0, 1.0), (0.25, 0.9)] {
                let mut acc = r.vec(n);
                let v = r.vec(n);
                let want: Vec<f32> = acc.iter().zip(&v).map(|(&a, &x)| a * ms + x * vs).collect();
                scale_axpy_f32(&mut acc, ms, &v, vs);
                for (i, (g, w)) in acc.iter().zip(&want).enumerate() {
                    assert_eq!(g.to_bits(), w.to_bits(), "n {n} ms {ms} vs {vs} at {i}");
                }
            }
        }
    }

    /// The f32-precision attention of one head, key by key, in the operation order the
    /// kernels must keep (ggml's tiled kernel): unfused `acc * ms + v * vs`.
    fn key_by_key_f32(
        p: &AttnParams,
        q: &[f32],
        pos: usize,
        k: &[f16],
        v: &[f16],
        h: usize,
    ) -> Vec<f32> {
        let (dk, dv) = (p.head_dim_k, p.head_dim_v);
        let g = h / (p.n_head / p.n_head_kv);
        let lo = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let qh = &q[h * dk..(h + 1) * dk];
        let (mut m, mut sum) = (f32::NEG_INFINITY, 0.0f32);
        let mut acc = vec![0.0f32; dv];
        for j in lo..=pos {
            let kr: Vec<f32> = k[j * p.k_dim() + g * dk..][..dk]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let s = dot_f32_unchecked(qh, &kr) * p.scale;
            let (mut ms, mut vs) = (1.0f32, 1.0f32);
            if s > m {
                ms = (m - s).exp();
                m = s;
                acc.iter_mut().for_each(|a| *a *= ms);
            } else {
                vs = (s - m).exp();
            }
            for (a, x) in acc.iter_mut().zip(&v[j * p.v_dim() + g * dv..][..dv]) {
                *a += x.to_f32() * vs;
            }
            sum = sum * ms + vs;
        }
        let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
        acc.iter().map(|a| a * inv).collect()
    }

    /// Heads computed a group at a time (the four-head dot path, with a partial group of 1-3)
    /// equal heads computed one by one, bit for bit, in the f32 precision.
    #[test]
    fn f32_attention_grouped_heads_equal_single_heads() {
        let mut r = Rng(3);
        for (n_head, n_head_kv, dk) in [(4, 1, 24), (6, 1, 16), (8, 2, 9), (5, 1, 33), (4, 1, 69)] {
            let p = AttnParams {
                n_head,
                n_head_kv,
                head_dim_k: dk,
                head_dim_v: dk * 2 + 3,
                scale: 0.3,
                window: Some(5),
                precision: AttnPrecision::F32,
            };
            let n_pos = 9;
            let to16 = |x: Vec<f32>| x.into_iter().map(f16::from_f32).collect::<Vec<_>>();
            let k = to16(r.vec(n_pos * p.k_dim()));
            let v = to16(r.vec(n_pos * p.v_dim()));
            let mut sc = AttnScratch::new(&p);
            for pos in [0, 3, 8] {
                let q: Vec<f32> = r.vec(p.q_dim()).iter().map(|x| x * 3.0).collect();
                let mut whole = vec![0.0; p.out_dim()];
                attention(&p, &q, pos, &k, &v, &mut whole, &mut sc).unwrap();
                for h in 0..n_head {
                    let mut one = vec![0.0; p.head_dim_v];
                    attention_heads(&p, &q, pos, &k, &v, h..h + 1, &mut one, &mut sc).unwrap();
                    let w = &whole[h * p.head_dim_v..(h + 1) * p.head_dim_v];
                    let r = key_by_key_f32(&p, &q, pos, &k, &v, h);
                    for ((a, b), c) in one.iter().zip(w).zip(&r) {
                        assert_eq!(a.to_bits(), b.to_bits(), "head {h} pos {pos}");
                        assert_eq!(a.to_bits(), c.to_bits(), "head {h} pos {pos} vs reference");
                    }
                }
            }
        }
    }
}
