//! Tiled attention for prompt chunks: many queries of one sequence against its KV cache, a
//! block of keys at a time (flash attention).
//!
//! The per-query kernels of [`crate::ops`] convert every key and value row from f16 once per
//! query, reduce each score's dot product horizontally and run the softmax key by key. Over a
//! long prompt that dominates: at 2,048 tokens SmolLM2 spent about two thirds of the prompt's
//! time in attention. Here the query rows of one KV group (the group's heads times a run of
//! consecutive tokens) sit in the 16 lanes of a vector, so that
//!
//! - a block of 16 keys is converted once for all of them,
//! - each score is a chain of FMAs over the head dimension (a key element broadcast against 16
//!   query rows), with no horizontal reduction,
//! - the running maximum, the exponentials (ggml's vectorised `expf`, [`crate::ops::expf_poly`]
//!   lane by lane) and the sums are vector operations over the 16 rows, once per key block,
//! - the weighted value sum is an FMA of the 16 rows' weights with a broadcast value element.
//!
//! The arithmetic is f32 throughout, like [`crate::ops::AttnPrecision::F32`] (the numerics of
//! ggml's tiled kernel for micro-batches of 64 queries or more), but summed in another order:
//! results agree with the per-query kernel to float rounding, not bit for bit. Tested against a
//! plain f64 reference on awkward shapes (`tests/ops.rs`).

use std::ops::Range;

use half::f16;

use crate::ops::{AttnParams, AttnPrecision, OpsError};

/// Query rows per lane group (one 512-bit vector of f32).
const LANES: usize = 16;
/// Keys per block.
const BLOCK: usize = 16;

/// Whether [`attention_tiled`] runs for `p` on this CPU: f32 precision, head sizes that are
/// multiples of 16, and AVX-512 (F and DQ).
pub fn tiled_available(p: &AttnParams) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        p.precision == AttnPrecision::F32
            && p.head_dim_k.is_multiple_of(16)
            && p.head_dim_v.is_multiple_of(16)
            && crate::ops::has_avx512f_dq()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = p;
        false
    }
}

/// Buffers of [`attention_tiled`] (one per thread), grown to the largest tile seen.
#[derive(Debug, Default, Clone)]
pub struct TiledScratch {
    /// Query rows transposed and scaled: per lane group, `head_dim_k` vectors of 16 rows.
    qt: Vec<f32>,
    /// One block of keys as f32, key-major (`BLOCK x head_dim_k`).
    k: Vec<f32>,
    /// One block of values as f32, key-major (`BLOCK x head_dim_v`).
    v: Vec<f32>,
    /// Per lane group: the unnormalised value sums, `head_dim_v` vectors of 16 rows.
    acc: Vec<f32>,
}

/// Attention of tokens `tokens` of a prompt chunk for the query heads of KV group `g`.
///
/// Token `t` (an index into the chunk) sits at position `pos0 + t` and its query row is
/// `q[t * q_dim..]` (`p.q_dim()` values); keys and values are the cache rows `k`, `v` (F16,
/// `p.k_dim()` / `p.v_dim()` per position, at least up to the last token's position). The
/// causal mask and `p.window` apply per token. `out` receives, for each token of `tokens` in
/// order, the group's heads one after another (`tokens.len() * group * head_dim_v` values).
#[allow(clippy::too_many_arguments)]
pub fn attention_tiled(
    p: &AttnParams,
    q: &[f32],
    pos0: usize,
    tokens: Range<usize>,
    g: usize,
    k: &[f16],
    v: &[f16],
    out: &mut [f32],
    scratch: &mut TiledScratch,
) -> Result<(), OpsError> {
    const OP: &str = "attention_tiled";
    if !tiled_available(p) {
        return Err(OpsError::Param {
            op: OP,
            msg: "needs f32 precision, head sizes that are multiples of 16 and AVX-512".into(),
        });
    }
    p.check(OP)?;
    let group = p.n_head / p.n_head_kv;
    if g >= p.n_head_kv {
        return Err(OpsError::Param {
            op: OP,
            msg: format!("KV group {g} outside 0..{}", p.n_head_kv),
        });
    }
    let need = |what: &'static str, expected: usize, found: usize| {
        if found < expected {
            Err(OpsError::Length {
                op: OP,
                what,
                expected,
                found,
            })
        } else {
            Ok(())
        }
    };
    need("q", tokens.end * p.q_dim(), q.len())?;
    need("k", (pos0 + tokens.end) * p.k_dim(), k.len())?;
    need("v", (pos0 + tokens.end) * p.v_dim(), v.len())?;
    let n_out = tokens.len() * group * p.head_dim_v;
    if out.len() != n_out {
        return Err(OpsError::Length {
            op: OP,
            what: "out",
            expected: n_out,
            found: out.len(),
        });
    }
    if tokens.is_empty() {
        return Ok(());
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `tiled_available` checked AVX-512 F and DQ; the slice lengths were checked above.
    unsafe {
        x86::tiled(p, q, pos0, tokens, g, k, v, out, scratch)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (q, k, v, scratch);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use half::f16;

    use super::{BLOCK, LANES, TiledScratch};
    use crate::ops::AttnParams;

    /// The rows of one lane group: `(token index, head)` of each lane (`None`: an unused lane).
    fn lane_rows(
        tokens: &Range<usize>,
        group: usize,
        h0: usize,
        first: usize,
    ) -> [Option<(usize, usize)>; LANES] {
        let mut rows = [None; LANES];
        for (l, r) in rows.iter_mut().enumerate() {
            let i = first + l;
            let t = tokens.start + i / group;
            if t < tokens.end {
                *r = Some((t, h0 + i % group));
            }
        }
        rows
    }

    /// The raw scores `q . k` of the 16 rows of `qt` (`dk` vectors of 16, scaled) against
    /// each of the 16 keys of `kb` (key-major, `dk` each): eight query dimensions at a time stay
    /// in registers while every key meets them, one FMA with a broadcast key element each. All
    /// 16 keys, whatever the block's count (rows past it hold earlier keys, finite; the caller
    /// masks their scores): a fixed loop the compiler unrolls, the 16 sums in registers and
    /// independent of each other.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    fn block_dots(qt: &[f32], kb: &[f32], dk: usize) -> [__m512; BLOCK] {
        let mut dots = [_mm512_setzero_ps(); BLOCK];
        for dc in (0..dk).step_by(8) {
            let mut qv = [_mm512_setzero_ps(); 8];
            for (u, x) in qv.iter_mut().enumerate() {
                let row = &qt[(dc + u) * LANES..(dc + u + 1) * LANES];
                // SAFETY: `row` holds 16 f32; unaligned load.
                *x = unsafe { _mm512_loadu_ps(row.as_ptr()) };
            }
            for (u, &x) in qv.iter().enumerate() {
                for (jj, acc) in dots.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(x, _mm512_set1_ps(kb[jj * dk + dc + u]), *acc);
                }
            }
        }
        dots
    }

    /// [`super::attention_tiled`] after its checks.
    ///
    /// # Safety
    /// AVX-512 F and DQ; the slices as [`super::attention_tiled`] checked them.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512dq")]
    pub(super) unsafe fn tiled(
        p: &AttnParams,
        q: &[f32],
        pos0: usize,
        tokens: Range<usize>,
        g: usize,
        k: &[f16],
        v: &[f16],
        out: &mut [f32],
        sc: &mut TiledScratch,
    ) {
        let (dk, dv) = (p.head_dim_k, p.head_dim_v);
        let (qd, kd, vd) = (p.q_dim(), p.k_dim(), p.v_dim());
        let group = p.n_head / p.n_head_kv;
        let h0 = g * group;
        let n_rows = tokens.len() * group;
        let n_groups = n_rows.div_ceil(LANES);
        sc.qt.clear();
        sc.qt.resize(n_groups * dk * LANES, 0.0);
        sc.acc.clear();
        sc.acc.resize(n_groups * dv * LANES, 0.0);
        sc.k.resize(BLOCK * dk, 0.0);
        sc.v.resize(BLOCK * dv, 0.0);
        // Queries, transposed and pre-multiplied by the scale.
        for lg in 0..n_groups {
            for (l, row) in lane_rows(&tokens, group, h0, lg * LANES).iter().enumerate() {
                if let Some((t, h)) = *row {
                    let qr = &q[t * qd + h * dk..t * qd + (h + 1) * dk];
                    for (d, &x) in qr.iter().enumerate() {
                        sc.qt[(lg * dk + d) * LANES + l] = x * p.scale;
                    }
                }
            }
        }
        // Per lane group: positions and first visible key of each lane, running maximum and
        // sum.
        let mut pos = vec![[i32::MIN; LANES]; n_groups];
        let mut lo = vec![[i32::MAX; LANES]; n_groups];
        for lg in 0..n_groups {
            for (l, row) in lane_rows(&tokens, group, h0, lg * LANES).iter().enumerate() {
                if let Some((t, _)) = *row {
                    let at = pos0 + t;
                    pos[lg][l] = at as i32;
                    lo[lg][l] = p.window.map_or(0, |w| (at + 1).saturating_sub(w)) as i32;
                }
            }
        }
        let mut m = vec![_mm512_set1_ps(f32::NEG_INFINITY); n_groups];
        let mut s = vec![_mm512_setzero_ps(); n_groups];
        let last = pos0 + tokens.end - 1;
        let first = p
            .window
            .map_or(0, |w| (pos0 + tokens.start + 1).saturating_sub(w));
        let mut j0 = first;
        while j0 <= last {
            let nb = (last + 1 - j0).min(BLOCK);
            // The block's keys and values as f32, key-major.
            for jj in 0..nb {
                let j = j0 + jj;
                let kr = &k[j * kd + g * dk..j * kd + (g + 1) * dk];
                let vr = &v[j * vd + g * dv..j * vd + (g + 1) * dv];
                // SAFETY: the ranges hold `dk` / `dv` f16 (multiples of 16), and `sc.k` /
                // `sc.v` hold `BLOCK` rows of them; unaligned loads and stores.
                unsafe {
                    for c in (0..dk).step_by(16) {
                        let x = _mm512_cvtph_ps(_mm256_loadu_si256(kr.as_ptr().add(c).cast()));
                        _mm512_storeu_ps(sc.k.as_mut_ptr().add(jj * dk + c), x);
                    }
                    for c in (0..dv).step_by(16) {
                        let x = _mm512_cvtph_ps(_mm256_loadu_si256(vr.as_ptr().add(c).cast()));
                        _mm512_storeu_ps(sc.v.as_mut_ptr().add(jj * dv + c), x);
                    }
                }
            }
            for lg in 0..n_groups {
                // SAFETY: 16 i32 each; unaligned loads.
                let (pv, lov) = unsafe {
                    (
                        _mm512_loadu_si512(pos[lg].as_ptr().cast()),
                        _mm512_loadu_si512(lo[lg].as_ptr().cast()),
                    )
                };
                // Lanes that see any key of this block: skip the group otherwise.
                let j_first = _mm512_set1_epi32(j0 as i32);
                let j_last = _mm512_set1_epi32((j0 + nb - 1) as i32);
                let any =
                    _mm512_cmpge_epi32_mask(pv, j_first) & _mm512_cmple_epi32_mask(lov, j_last);
                if any == 0 {
                    continue;
                }
                let qt = &sc.qt[lg * dk * LANES..(lg + 1) * dk * LANES];
                // Scores of the 16 rows against each key of the block, masked to -inf where
                // the key is not visible. Eight query dimensions at a time stay in registers
                // while every key of the block meets them (one FMA with a broadcast key
                // element each).
                let dots = block_dots(qt, &sc.k[..BLOCK * dk], dk);
                let mut scores = [_mm512_set1_ps(f32::NEG_INFINITY); BLOCK];
                let mut block_max = _mm512_set1_ps(f32::NEG_INFINITY);
                for (jj, (score, &x)) in scores.iter_mut().zip(&dots).enumerate().take(nb) {
                    let j = _mm512_set1_epi32((j0 + jj) as i32);
                    let visible = _mm512_cmpge_epi32_mask(pv, j) & _mm512_cmple_epi32_mask(lov, j);
                    *score = _mm512_mask_blend_ps(visible, _mm512_set1_ps(f32::NEG_INFINITY), x);
                    block_max = _mm512_max_ps(block_max, *score);
                }
                // Online softmax: new maximum, rescale of what was summed so far, this block's
                // weights. Lanes with no visible key yet keep a maximum of -inf and weight 0.
                let m_new = _mm512_max_ps(m[lg], block_max);
                let live =
                    _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(m_new, _mm512_set1_ps(f32::NEG_INFINITY));
                let alpha = _mm512_mask_blend_ps(
                    live,
                    _mm512_set1_ps(1.0),
                    crate::ops::avx512::expf(_mm512_sub_ps(m[lg], m_new)),
                );
                let rescale = _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(alpha, _mm512_set1_ps(1.0)) != 0;
                let mut weights = [_mm512_setzero_ps(); BLOCK];
                let mut sum = _mm512_setzero_ps();
                for (w, &score) in weights.iter_mut().zip(&scores).take(nb) {
                    let visible =
                        _mm512_cmp_ps_mask::<_CMP_NEQ_OQ>(score, _mm512_set1_ps(f32::NEG_INFINITY))
                            & live;
                    if visible == 0 {
                        continue;
                    }
                    *w = _mm512_maskz_mov_ps(
                        visible,
                        crate::ops::avx512::expf(_mm512_sub_ps(score, m_new)),
                    );
                    sum = _mm512_add_ps(sum, *w);
                }
                s[lg] = _mm512_fmadd_ps(s[lg], alpha, sum);
                m[lg] = m_new;
                // Value sums: acc = acc * alpha + sum over keys of weight * value.
                let acc = &mut sc.acc[lg * dv * LANES..(lg + 1) * dv * LANES];
                for c in (0..dv).step_by(8) {
                    let mut r = [_mm512_setzero_ps(); 8];
                    // SAFETY: `acc` holds `dv` vectors of 16 and `c + 8 <= dv`; unaligned.
                    unsafe {
                        for (u, x) in r.iter_mut().enumerate() {
                            *x = _mm512_loadu_ps(acc.as_ptr().add((c + u) * LANES));
                            if rescale {
                                *x = _mm512_mul_ps(*x, alpha);
                            }
                        }
                    }
                    for (jj, &w) in weights.iter().enumerate().take(nb) {
                        let vr = &sc.v[jj * dv + c..jj * dv + c + 8];
                        for (u, x) in r.iter_mut().enumerate() {
                            *x = _mm512_fmadd_ps(w, _mm512_set1_ps(vr[u]), *x);
                        }
                    }
                    // SAFETY: as for the loads above.
                    unsafe {
                        for (u, x) in r.iter().enumerate() {
                            _mm512_storeu_ps(acc.as_mut_ptr().add((c + u) * LANES), *x);
                        }
                    }
                }
            }
            j0 += nb;
        }
        // Normalise and write each lane's row back in token-major order.
        let mut col = [0.0f32; LANES];
        let mut inv = [0.0f32; LANES];
        for (lg, &sum) in s.iter().enumerate() {
            let sums = {
                let mut x = [0.0f32; LANES];
                // SAFETY: 16 f32; unaligned store.
                unsafe { _mm512_storeu_ps(x.as_mut_ptr(), sum) };
                x
            };
            for (i, &x) in inv.iter_mut().zip(&sums) {
                *i = if x == 0.0 { 0.0 } else { 1.0 / x };
            }
            let rows = lane_rows(&tokens, group, h0, lg * LANES);
            for d in 0..dv {
                col.copy_from_slice(&sc.acc[(lg * dv + d) * LANES..(lg * dv + d + 1) * LANES]);
                for (l, row) in rows.iter().enumerate() {
                    if let Some((t, h)) = *row {
                        let o = ((t - tokens.start) * group + (h - h0)) * dv + d;
                        out[o] = col[l] * inv[l];
                    }
                }
            }
        }
    }
}
