//! The down projection regrouped neuron by neuron **without requantizing it**.
//!
//! Sparse FFNs read the down projection one neuron at a time: neuron `i`'s output vector is
//! column `i` of `ffn_down` (`n_embd` rows of `n_ff`). GGUF stores it row-major in blocks of 32
//! neurons, so one neuron's column is spread over every row's blocks; PowerInfer's answer is
//! `ffn_down_t`, the transpose, quantized again along the other axis. For 4-bit models that
//! second quantization costs real quality (SmolLM2 Q4_1: perplexity +6.6%), and a Q8_0
//! transpose reads 1.7 times the bytes of the Q4_1 original, which eats the savings of
//! skipping neurons at moderate sparsity.
//!
//! [`GroupedDown`] keeps the original bytes and only moves them: the neurons of one original
//! block (a *group* of 32) share, for each output `j`, the block's scale `d[j]` (and minimum
//! `m[j]` for Q4_1), so the layout is, per group, the `n_embd` scales and then each neuron's
//! `n_embd` packed 4-bit values. The coefficients `h` are quantized per group to the 8-bit type
//! the dense product pairs with the weights (Q8_0 for Q4_0, Q8_1 for Q4_1), `h_i = dh * qh_i`,
//! exactly as that product sees them, and the product over the active neurons is
//!
//! `out[j] = sum over groups g of ( (d_g[j] * dh_g) * S_g[j] + m_g[j] * s_g )`,
//! `S_g[j] = sum over active i in g of qh_i * q_i[j]` (integers), `s_g = dh_g * sum of those
//! qh_i` (Q8_1's f16 `s`, as the dense product uses it)
//!
//! (Q4_0's values are `q - 8`: `S - 8 * Q`), the dense block dot product restricted to the
//! active neurons. The integer sums are exact in any order, so the SIMD kernels give the same
//! bits as the scalar [`grouped_axpy_scalar`]: AVX2 takes the active neurons of a group two by
//! two through `maddubs`; AVX-512 takes them four by four through `vpdpbusd` (a `vpermb` puts
//! the four neurons' values of each output side by side) and keeps the sums of 128 outputs in
//! registers over all of a group's neurons before the float step. A group is skipped when
//! none of its neurons is active; the scales of a touched group cost 20% of the Q4_1 matrix's
//! bytes (11% for Q4_0) when every group is touched.
//!
//! The neurons are cut into four fixed parts by group; each part's sum is computed by one thread
//! reading whole neuron rows in ascending order, and the parts are added in a fixed order, so
//! the result does not depend on the number of threads.

use powerinfer_gguf::GgmlType;

use crate::CpuError;
use crate::matmul::Matrix;
use crate::pool::{SharedSlice, ThreadPool};
use crate::sparse::SparseError;

/// Neurons per group (the original block size along `n_ff`).
pub const GROUP: usize = 32;

/// The down projection of one layer, neuron-major within groups of 32 (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupedDown {
    ty: GgmlType,
    n_embd: usize,
    n_ff: usize,
    /// Per group: `n_embd` f16 scales `d`, then (Q4_1) `n_embd` f16 minimums `m`.
    scales: Vec<u16>,
    /// Per neuron: its `n_embd` values, 32 outputs per block of `value_block_bytes`.
    values: Vec<u8>,
}

impl GroupedDown {
    /// The types this layout supports: the 4-bit formats of 32-element blocks (one scale, and a
    /// minimum for Q4_1), whose transposes cost the most to requantize.
    pub fn supports(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1)
    }

    /// Regroups `down` (`n_embd` rows of `n_ff`, row-major as in GGUF). `n_embd` (the rows)
    /// must be a multiple of 32 as well, and the type one [`supports`](Self::supports) accepts.
    pub fn from_down(down: &Matrix) -> Result<GroupedDown, SparseError> {
        const OP: &str = "GroupedDown::from_down";
        let ty = down.ty;
        if !Self::supports(ty) {
            return Err(SparseError::Cpu {
                op: OP,
                source: CpuError::UnsupportedType(ty),
            });
        }
        let (n_embd, n_ff) = (down.rows, down.cols);
        if !n_ff.is_multiple_of(GROUP) || !n_embd.is_multiple_of(GROUP) {
            return Err(SparseError::ShapeMismatch {
                op: OP,
                what: "rows and columns (multiples of 32)",
                expected: n_embd.next_multiple_of(GROUP),
                actual: n_embd,
            });
        }
        let ts = ty.type_size();
        let rb = n_ff / GROUP * ts;
        if down.data.len() != rb * n_embd {
            return Err(SparseError::ShapeMismatch {
                op: OP,
                what: "matrix bytes (rows x row bytes)",
                expected: rb * n_embd,
                actual: down.data.len(),
            });
        }
        let n_groups = n_ff / GROUP;
        let k = scale_count(ty);
        let vb = value_row_bytes(n_embd);
        let mut scales = vec![0u16; n_groups * k * n_embd];
        let mut values = vec![0u8; n_ff * vb];
        for j in 0..n_embd {
            for g in 0..n_groups {
                let b = &down.data[j * rb + g * ts..j * rb + (g + 1) * ts];
                let sc = &mut scales[g * k * n_embd..(g + 1) * k * n_embd];
                sc[j] = u16::from_le_bytes([b[0], b[1]]);
                if k == 2 {
                    sc[n_embd + j] = u16::from_le_bytes([b[2], b[3]]);
                }
                let q = &b[2 * k..];
                for t in 0..GROUP {
                    let neuron = g * GROUP + t;
                    let row = &mut values[neuron * vb..(neuron + 1) * vb];
                    // Original block: byte t holds neuron t (low nibble) and t + 16 (high).
                    let v = if t < 16 { q[t] & 0x0F } else { q[t - 16] >> 4 };
                    // Values of outputs 32c + u (u < 16) in the low nibble of byte u of block c,
                    // 32c + 16 + u in its high nibble.
                    let (c, u) = (j / 32, j % 32);
                    let byte = &mut row[c * 16 + u % 16];
                    if u < 16 {
                        *byte |= v;
                    } else {
                        *byte |= v << 4;
                    }
                }
            }
        }
        Ok(GroupedDown {
            ty,
            n_embd,
            n_ff,
            scales,
            values,
        })
    }

    /// The original weight type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }

    /// Outputs per neuron (`n_embd`).
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Neurons (`n_ff`).
    pub fn n_ff(&self) -> usize {
        self.n_ff
    }

    /// Bytes held (the same as the original matrix).
    pub fn bytes(&self) -> usize {
        self.scales.len() * 2 + self.values.len()
    }

    /// Weight `[j, i]` of the original matrix (output `j`, neuron `i`), dequantized.
    pub fn weight(&self, j: usize, i: usize) -> f32 {
        let (g, k) = (i / GROUP, scale_count(self.ty));
        let sc = &self.scales[g * k * self.n_embd..];
        let d = f16_to_f32(sc[j]);
        let q = self.value(i, j);
        if k == 2 {
            d * q + f16_to_f32(sc[self.n_embd + j])
        } else {
            d * q
        }
    }

    /// The 4-bit value (0..=15) of neuron `i` at output `j`.
    fn nibble(&self, i: usize, j: usize) -> u8 {
        let vb = value_row_bytes(self.n_embd);
        let byte = self.values[i * vb + j / 32 * 16 + j % 16];
        if j % 32 < 16 { byte & 0x0F } else { byte >> 4 }
    }

    /// The quantized value of neuron `i` at output `j` as an exact float (Q4_0: nibble - 8).
    fn value(&self, i: usize, j: usize) -> f32 {
        let nib = f32::from(self.nibble(i, j));
        if self.ty == GgmlType::Q4_0 {
            nib - 8.0
        } else {
            nib
        }
    }
}

fn scale_count(ty: GgmlType) -> usize {
    if ty == GgmlType::Q4_1 { 2 } else { 1 }
}

/// Value bytes of one neuron (packed nibbles).
fn value_row_bytes(n_embd: usize) -> usize {
    n_embd / 2
}

fn f16_to_f32(h: u16) -> f32 {
    half::f16::from_bits(h).to_f32()
}

/// Checks the operands of the grouped products.
fn check(
    op: &'static str,
    down: &GroupedDown,
    ids: &[u32],
    coef: &[f32],
    out: &[f32],
) -> Result<(), SparseError> {
    if coef.len() != ids.len() {
        return Err(SparseError::ShapeMismatch {
            op,
            what: "coefficients (one per active neuron)",
            expected: ids.len(),
            actual: coef.len(),
        });
    }
    if out.len() != down.n_embd {
        return Err(SparseError::ShapeMismatch {
            op,
            what: "output length (n_embd)",
            expected: down.n_embd,
            actual: out.len(),
        });
    }
    crate::sparse::check_active(op, ids, down.n_ff)
}

/// The coefficients of one group quantized as the dense product sees them: `h_i = dh * qh[t]`
/// for neuron `32 g + t`.
struct GroupCoef {
    dh: f32,
    qh: [i8; GROUP],
    /// `sum(qh)` over the group.
    q_sum: i32,
    /// `dh * sum(qh)` as the dense product uses it: Q8_1's stored `s` (an f16).
    hs: f32,
}

/// Quantizes the coefficients of group `g` (positions `a..b` of `ids`/`coef`; every other
/// neuron of the group is zero) to the 8-bit activation type of `down`'s weights.
fn group_coef(down: &GroupedDown, g: usize, ids: &[u32], coef: &[f32]) -> GroupCoef {
    let mut h = [0.0f32; GROUP];
    for (&i, &c) in ids.iter().zip(coef) {
        h[i as usize - g * GROUP] = c;
    }
    let k = powerinfer_quant::kernels(down.ty).unwrap_or_else(|| unreachable!("checked type"));
    // Q8_0: f16 d, 32 i8; Q8_1: f16 d, f16 s, 32 i8.
    let mut block = [0u8; 36];
    let qs_at = if k.act_ty == GgmlType::Q8_1 { 4 } else { 2 };
    (k.quantize_act)(&h, &mut block[..qs_at + GROUP]);
    let mut qh = [0i8; GROUP];
    for (q, &b) in qh.iter_mut().zip(&block[qs_at..qs_at + GROUP]) {
        *q = b as i8;
    }
    GroupCoef {
        dh: f16_to_f32(u16::from_le_bytes([block[0], block[1]])),
        q_sum: qh.iter().map(|&q| i32::from(q)).sum(),
        hs: f16_to_f32(u16::from_le_bytes([block[2], block[3]])),
        qh,
    }
}

/// `out = sum_k coef[k] * down[:, ids[k]]` (overwrites `out`) on the calling thread, in plain
/// scalar code: the reference of [`grouped_axpy`] (same bits). `ids` strictly increasing; the
/// coefficients are rounded per group to the weights' 8-bit activation type first.
pub fn grouped_axpy_scalar(
    down: &GroupedDown,
    ids: &[u32],
    coef: &[f32],
    out: &mut [f32],
) -> Result<(), SparseError> {
    check("grouped_axpy_scalar", down, ids, coef, out)?;
    let n = down.n_embd;
    let mut partial = vec![0.0f32; PARTS * n];
    for (k, part) in partial.chunks_exact_mut(n).enumerate() {
        let r = part_range(down, ids, k);
        part_scalar(down, &ids[r.clone()], &coef[r], part);
    }
    sum_parts(&partial, out);
    Ok(())
}

/// The neurons are cut into this many parts by group (a fixed cut, whatever the thread
/// count): each part's sum is computed by one thread reading whole neuron rows in order, and
/// the parts are added in a fixed order.
const PARTS: usize = 4;

/// The positions in `ids` (ascending) of part `k`: the neurons of groups
/// `[k * G / PARTS, (k + 1) * G / PARTS)`.
fn part_range(down: &GroupedDown, ids: &[u32], k: usize) -> std::ops::Range<usize> {
    let n_groups = down.n_ff / GROUP;
    let first = |k: usize| (k * n_groups / PARTS * GROUP) as u32;
    let lo = ids.partition_point(|&i| i < first(k));
    let hi = ids.partition_point(|&i| i < first(k + 1));
    lo..hi
}

/// `out = ((p0 + p1) + p2) + p3` element-wise over the parts' sums.
fn sum_parts(partial: &[f32], out: &mut [f32]) {
    let n = out.len();
    out.copy_from_slice(&partial[..n]);
    for part in partial.chunks_exact(n).skip(1) {
        for (o, &v) in out.iter_mut().zip(part) {
            *o += v;
        }
    }
}

/// The runs of `ids` (ascending) that fall in one group: `(group, start, end)` positions.
fn group_runs(ids: &[u32]) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
    let mut p = 0;
    std::iter::from_fn(move || {
        if p >= ids.len() {
            return None;
        }
        let g = ids[p] as usize / GROUP;
        let start = p;
        while p < ids.len() && ids[p] as usize / GROUP == g {
            p += 1;
        }
        Some((g, start, p))
    })
}

/// The neurons of group `g` among `ids` whose quantized coefficient is not zero, with it,
/// padded to a multiple of `multiple` (at most 4) by repeating the first one with a zero
/// coefficient (a row already read: no extra memory traffic). On the stack: the kernels run
/// once per group and token.
fn nonzero_rows(c: &GroupCoef, g: usize, ids: &[u32], multiple: usize) -> NonzeroRows {
    let mut r = NonzeroRows {
        rows: [(0, 0); GROUP + 3],
        len: 0,
    };
    for &i in ids {
        let q = c.qh[i as usize - g * GROUP];
        if q != 0 {
            r.rows[r.len] = (i as usize, q);
            r.len += 1;
        }
    }
    while r.len > 0 && !r.len.is_multiple_of(multiple) {
        r.rows[r.len] = (r.rows[0].0, 0);
        r.len += 1;
    }
    r
}

/// Asks for the value rows of `ids` (one group's active neurons) and the group's scales to be
/// brought into L2 while the previous group is computed: the rows are scattered, so the
/// hardware prefetcher cannot follow them, and without this the kernels wait on memory (the
/// AVX-512 one ran at half the dense product's speed on SmolLM2's down projection).
fn prefetch_group(down: &GroupedDown, g: usize, ids: &[u32], coef: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if coef.iter().any(|&c| c != 0.0) {
        let vb = value_row_bytes(down.n_embd);
        let k = scale_count(down.ty);
        let n = down.n_embd;
        // The cache lines of `len` bytes at `at`.
        let touch = |at: usize, len: usize| {
            for p in (at & !63..at + len).step_by(64) {
                // SAFETY: a prefetch is only a hint: it never faults, and every address is
                // within (or on the cache line of) a slice we hold.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                        p as *const i8,
                    )
                };
            }
        };
        // (Neurons with a zero coefficient are never read.)
        for (&i, _) in ids.iter().zip(coef).filter(|(_, c)| **c != 0.0) {
            let row = &down.values[i as usize * vb..(i as usize + 1) * vb];
            touch(row.as_ptr() as usize, row.len());
        }
        let sc = &down.scales[g * k * n..(g + 1) * k * n];
        touch(sc.as_ptr() as usize, std::mem::size_of_val(sc));
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (down, g, ids, coef);
}

/// How many groups ahead [`prefetch_group`] asks for.
const PREFETCH_GROUPS: usize = 4;

/// What [`nonzero_rows`] returns: `(neuron, coefficient)` pairs.
struct NonzeroRows {
    rows: [(usize, i8); GROUP + 3],
    len: usize,
}

impl NonzeroRows {
    fn as_slice(&self) -> &[(usize, i8)] {
        &self.rows[..self.len]
    }
}

/// Adds the group's `(d * dh) * S + m * (dh * Q)` to `out` (all `n_embd` outputs).
fn finish_group_scalar(down: &GroupedDown, g: usize, c: &GroupCoef, s: &[i32], out: &mut [f32]) {
    let (n, k) = (down.n_embd, scale_count(down.ty));
    let sc = &down.scales[g * k * n..(g + 1) * k * n];
    let hq = c.hs;
    for (j, (y, &sj)) in out.iter_mut().zip(s).enumerate() {
        let t = if k == 2 {
            (f16_to_f32(sc[j]) * c.dh) * sj as f32 + f16_to_f32(sc[n + j]) * hq
        } else {
            (f16_to_f32(sc[j]) * c.dh) * (sj - 8 * c.q_sum) as f32
        };
        *y += t;
    }
}

/// One part: every group of `ids` into `out` (which it adds to).
fn part_scalar(down: &GroupedDown, ids: &[u32], coef: &[f32], out: &mut [f32]) {
    let mut s = vec![0i32; down.n_embd];
    for (g, a, b) in group_runs(ids) {
        let c = group_coef(down, g, &ids[a..b], &coef[a..b]);
        if c.qh.iter().all(|&q| q == 0) {
            continue;
        }
        s.fill(0);
        for &i in &ids[a..b] {
            let q = i32::from(c.qh[i as usize - g * GROUP]);
            if q == 0 {
                continue;
            }
            for (j, sj) in s.iter_mut().enumerate() {
                *sj += q * i32::from(down.nibble(i as usize, j));
            }
        }
        finish_group_scalar(down, g, &c, &s, out);
    }
}

/// `out = sum_k coef[k] * down[:, ids[k]]` (overwrites `out`): the down projection of the
/// active neurons `ids` (strictly increasing) with coefficients `coef`, rounded per group to
/// the weights' 8-bit activation type as the dense product rounds them; the four parts of the
/// neurons split across the pool's threads. The same bits as [`grouped_axpy_scalar`] for any
/// thread count.
pub fn grouped_axpy(
    pool: &ThreadPool,
    down: &GroupedDown,
    ids: &[u32],
    coef: &[f32],
    out: &mut [f32],
) -> Result<(), SparseError> {
    check("grouped_axpy", down, ids, coef, out)?;
    let n = down.n_embd;
    let mut partial = vec![0.0f32; PARTS * n];
    let vb = value_row_bytes(down.n_embd);
    // Small products stay on this thread (waking the pool costs more than they do).
    if pool.n_threads() == 1 || ids.len() * vb < 64 * 1024 {
        for (k, part) in partial.chunks_exact_mut(n).enumerate() {
            let r = part_range(down, ids, k);
            part_fast(down, &ids[r.clone()], &coef[r], part);
        }
    } else {
        let shared = SharedSlice::new(&mut partial);
        pool.run(|ti, nt| {
            for k in (ti..PARTS).step_by(nt) {
                let r = part_range(down, ids, k);
                // SAFETY: part `k` is handed to exactly one thread (`k % nt == ti`), and the
                // parts are disjoint ranges of `partial`.
                let part = unsafe { shared.slice_mut(k * n..(k + 1) * n) };
                part_fast(down, &ids[r.clone()], &coef[r], part);
            }
        });
    }
    sum_parts(&partial, out);
    Ok(())
}

/// [`part_scalar`] with the fastest kernel the CPU has (AVX-512 VNNI, then AVX2; the
/// AVX-512 one only where `powerinfer_quant` chose that level, so `POWERINFER_SIMD=avx2`
/// caps this kernel too).
fn part_fast(down: &GroupedDown, ids: &[u32], coef: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() && powerinfer_quant::simd_level() == "avx512vnni" {
        // SAFETY: AVX-512 F, BW, VBMI and VNNI were just detected.
        unsafe { avx512::part(down, ids, coef, out) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and F16C were just detected.
        unsafe { avx2::part(down, ids, coef, out) };
        return;
    }
    part_scalar(down, ids, coef, out)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
}

#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vbmi")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{
        GroupedDown, PREFETCH_GROUPS, group_coef, group_runs, nonzero_rows, prefetch_group,
        scale_count, value_row_bytes,
    };

    /// Eight f16 at `s[0..8]` as floats.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn f16x8(s: &[u16]) -> __m256 {
        assert!(s.len() >= 8);
        // SAFETY: 8 readable u16 (16 bytes); unaligned load.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(s.as_ptr().cast()) })
    }

    /// `s[0..32] += qa * a[j] + qb * b[j]` for the 32 outputs of one 16-byte block of two
    /// neurons' packed values (`maddubs` of the interleaved unsigned nibbles with the signed
    /// coefficient pair; at most 2 * 15 * 128 in magnitude, no saturation).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn pair_block(a: &[u8], b: &[u8], pair: __m256i, s: &mut [i32]) {
        assert!(a.len() >= 16 && b.len() >= 16 && s.len() >= 32);
        let m4 = _mm_set1_epi8(0x0F);
        // SAFETY: 16 readable bytes each; unaligned loads.
        let (qa, qb) = unsafe {
            (
                _mm_loadu_si128(a.as_ptr().cast()),
                _mm_loadu_si128(b.as_ptr().cast()),
            )
        };
        let (a_lo, a_hi) = (
            _mm_and_si128(qa, m4),
            _mm_and_si128(_mm_srli_epi16::<4>(qa), m4),
        );
        let (b_lo, b_hi) = (
            _mm_and_si128(qb, m4),
            _mm_and_si128(_mm_srli_epi16::<4>(qb), m4),
        );
        // Outputs 0..16 and 16..32, each as 16 (a, b) byte pairs.
        let lo = _mm256_set_m128i(_mm_unpackhi_epi8(a_lo, b_lo), _mm_unpacklo_epi8(a_lo, b_lo));
        let hi = _mm256_set_m128i(_mm_unpackhi_epi8(a_hi, b_hi), _mm_unpacklo_epi8(a_hi, b_hi));
        for (h, v) in [lo, hi].into_iter().enumerate() {
            let p = _mm256_maddubs_epi16(v, pair);
            let halves = [
                _mm256_cvtepi16_epi32(_mm256_castsi256_si128(p)),
                _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(p)),
            ];
            for (q, w) in halves.into_iter().enumerate() {
                let acc = &mut s[h * 16 + q * 8..h * 16 + q * 8 + 8];
                // SAFETY: `acc` is 8 i32; unaligned load and store.
                unsafe {
                    let x = _mm256_loadu_si256(acc.as_ptr().cast());
                    _mm256_storeu_si256(acc.as_mut_ptr().cast(), _mm256_add_epi32(x, w));
                }
            }
        }
    }

    /// [`super::part_scalar`] vectorised: the active neurons of a group two by two, each pair's
    /// rows read in order; the same integers, then the same float operations per output.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn part(down: &GroupedDown, ids: &[u32], coef: &[f32], out: &mut [f32]) {
        let (n, k) = (down.n_embd, scale_count(down.ty));
        let vb = value_row_bytes(n);
        let row = |i: usize| &down.values[i * vb..(i + 1) * vb];
        let mut s = vec![0i32; n];
        for (g, a, b) in group_runs(ids).take(PREFETCH_GROUPS) {
            prefetch_group(down, g, &ids[a..b], &coef[a..b]);
        }
        let mut ahead = group_runs(ids).skip(PREFETCH_GROUPS);
        for (g, a, b) in group_runs(ids) {
            if let Some((ng, na, nb)) = ahead.next() {
                prefetch_group(down, ng, &ids[na..nb], &coef[na..nb]);
            }
            let c = group_coef(down, g, &ids[a..b], &coef[a..b]);
            let nz = nonzero_rows(&c, g, &ids[a..b], 2);
            let rows = nz.as_slice();
            if rows.is_empty() {
                continue;
            }
            s.fill(0);
            for p in rows.chunks_exact(2) {
                let ((ia, qa), (ib, qb)) = (p[0], p[1]);
                let pair = _mm256_set1_epi16(i16::from_le_bytes([qa as u8, qb as u8]));
                let (ra, rb) = (row(ia), row(ib));
                for blk in 0..n / 32 {
                    pair_block(&ra[blk * 16..], &rb[blk * 16..], pair, &mut s[blk * 32..]);
                }
            }
            // (d * dh) * S (Q4_0: S - 8 Q) + m * (dh * Q), as the scalar code.
            let sc = &down.scales[g * k * n..(g + 1) * k * n];
            let dh = _mm256_set1_ps(c.dh);
            let hq = _mm256_set1_ps(c.hs);
            let off = _mm256_set1_epi32(8 * c.q_sum);
            for j in (0..n).step_by(8) {
                // SAFETY: `s[j..j + 8]` and `out[j..j + 8]` are in bounds (n is a multiple of
                // 32); unaligned loads and stores.
                unsafe {
                    let mut sj = _mm256_loadu_si256(s[j..j + 8].as_ptr().cast());
                    if k == 1 {
                        sj = _mm256_sub_epi32(sj, off);
                    }
                    let mut t =
                        _mm256_mul_ps(_mm256_mul_ps(f16x8(&sc[j..]), dh), _mm256_cvtepi32_ps(sj));
                    if k == 2 {
                        t = _mm256_add_ps(t, _mm256_mul_ps(f16x8(&sc[n + j..]), hq));
                    }
                    let o = out[j..j + 8].as_mut_ptr();
                    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), t));
                }
            }
        }
    }
}

/// The AVX-512 kernel: four active neurons at a time through `vpdpbusd`, output blocks in the
/// outer loop so that a chunk's integer sums stay in registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{
        GroupedDown, PREFETCH_GROUPS, group_coef, group_runs, nonzero_rows, prefetch_group,
        scale_count, value_row_bytes,
    };

    /// Output blocks (32 outputs each) whose sums one pass over a group's neurons keeps in
    /// registers: two accumulators of 16 lanes per block.
    const CHUNK: usize = 4;

    /// The byte permutation that turns four neurons' 16 bytes (neuron `r` in bytes `16 r..`)
    /// into 16 quads: byte `4 u + r` takes byte `16 r + u`, so lane `u` of `vpdpbusd` sums
    /// output `u` over the four neurons.
    fn quad_index() -> [u8; 64] {
        let mut idx = [0u8; 64];
        for (p, v) in idx.iter_mut().enumerate() {
            *v = (16 * (p % 4) + p / 4) as u8;
        }
        idx
    }

    /// Adds the four neurons' products over `NB` blocks starting at block `blk` to `acc`
    /// (`acc[2 t]`: outputs `0..16` of block `blk + t`, `acc[2 t + 1]`: `16..32`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
    fn quad_blocks<const NB: usize>(
        rows: [&[u8]; 4],
        blk: usize,
        coef: __m512i,
        idx: __m512i,
        acc: &mut [__m512i; 2 * CHUNK],
    ) {
        let m4 = _mm512_set1_epi8(0x0F);
        for t in 0..NB {
            let at = (blk + t) * 16;
            for r in &rows {
                assert!(r.len() >= at + 16);
            }
            // SAFETY: 16 readable bytes at `at` in each row (asserted); unaligned loads.
            let z = unsafe {
                let p = |r: &[u8]| _mm_loadu_si128(r.as_ptr().add(at).cast());
                let z = _mm512_castsi128_si512(p(rows[0]));
                let z = _mm512_inserti32x4::<1>(z, p(rows[1]));
                let z = _mm512_inserti32x4::<2>(z, p(rows[2]));
                _mm512_inserti32x4::<3>(z, p(rows[3]))
            };
            let lo = _mm512_permutexvar_epi8(idx, _mm512_and_si512(z, m4));
            let hi = _mm512_permutexvar_epi8(idx, _mm512_and_si512(_mm512_srli_epi16::<4>(z), m4));
            acc[2 * t] = _mm512_dpbusd_epi32(acc[2 * t], lo, coef);
            acc[2 * t + 1] = _mm512_dpbusd_epi32(acc[2 * t + 1], hi, coef);
        }
    }

    /// [`super::part_scalar`] with AVX-512 VNNI: the same integer sums (exact, in any order),
    /// then the same float operations per output.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW, VBMI and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,avx512vnni")]
    pub(super) unsafe fn part(down: &GroupedDown, ids: &[u32], coef: &[f32], out: &mut [f32]) {
        let (n, k) = (down.n_embd, scale_count(down.ty));
        let vb = value_row_bytes(n);
        let blocks = n / 32;
        let row = |i: usize| &down.values[i * vb..(i + 1) * vb];
        let idx_bytes = quad_index();
        // SAFETY: 64 readable bytes; unaligned load.
        let idx = unsafe { _mm512_loadu_si512(idx_bytes.as_ptr().cast()) };
        for (g, a, b) in group_runs(ids).take(PREFETCH_GROUPS) {
            prefetch_group(down, g, &ids[a..b], &coef[a..b]);
        }
        let mut ahead = group_runs(ids).skip(PREFETCH_GROUPS);
        for (g, a, b) in group_runs(ids) {
            if let Some((ng, na, nb)) = ahead.next() {
                prefetch_group(down, ng, &ids[na..nb], &coef[na..nb]);
            }
            let c = group_coef(down, g, &ids[a..b], &coef[a..b]);
            let nz = nonzero_rows(&c, g, &ids[a..b], 4);
            let rows = nz.as_slice();
            if rows.is_empty() {
                continue;
            }
            let sc = &down.scales[g * k * n..(g + 1) * k * n];
            let dh = _mm512_set1_ps(c.dh);
            let hq = _mm512_set1_ps(c.hs);
            let off = _mm512_set1_epi32(8 * c.q_sum);
            let mut blk = 0;
            while blk < blocks {
                let nb = (blocks - blk).min(CHUNK);
                let mut acc = [_mm512_setzero_si512(); 2 * CHUNK];
                for q in rows.chunks_exact(4) {
                    let w = _mm512_set1_epi32(i32::from_le_bytes([
                        q[0].1 as u8,
                        q[1].1 as u8,
                        q[2].1 as u8,
                        q[3].1 as u8,
                    ]));
                    let r = [row(q[0].0), row(q[1].0), row(q[2].0), row(q[3].0)];
                    match nb {
                        4 => quad_blocks::<4>(r, blk, w, idx, &mut acc),
                        3 => quad_blocks::<3>(r, blk, w, idx, &mut acc),
                        2 => quad_blocks::<2>(r, blk, w, idx, &mut acc),
                        _ => quad_blocks::<1>(r, blk, w, idx, &mut acc),
                    }
                }
                // (d * dh) * S (Q4_0: S - 8 Q) + m * (dh * Q), as the scalar code.
                for (h, &s) in acc.iter().enumerate().take(2 * nb) {
                    let j = blk * 32 + h * 16;
                    assert!(j + 16 <= n && (k == 1 || n + j + 16 <= sc.len()));
                    // SAFETY: `sc[j..j + 16]`, `sc[n + j..n + j + 16]` (Q4_1) and
                    // `out[j..j + 16]` are in bounds (asserted; `out` has `n`); unaligned
                    // loads and stores.
                    unsafe {
                        let f16x16 =
                            |p: &[u16]| _mm512_cvtph_ps(_mm256_loadu_si256(p.as_ptr().cast()));
                        let mut sj = s;
                        if k == 1 {
                            sj = _mm512_sub_epi32(sj, off);
                        }
                        let mut t = _mm512_mul_ps(
                            _mm512_mul_ps(f16x16(&sc[j..]), dh),
                            _mm512_cvtepi32_ps(sj),
                        );
                        if k == 2 {
                            t = _mm512_add_ps(t, _mm512_mul_ps(f16x16(&sc[n + j..]), hq));
                        }
                        let o = out[j..j + 16].as_mut_ptr();
                        _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), t));
                    }
                }
                blk += nb;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every SIMD kernel this CPU has against [`part_scalar`], bit for bit, whatever the
    /// dispatcher would choose (the public tests see only the chosen one).
    #[test]
    fn every_part_kernel_equals_the_scalar_one() {
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
            // Output counts 1..=19 blocks: every tail of the four-block chunks.
            for (n_embd, n_ff) in [(32, 64), (96, 96), (160, 224), (608, 320)] {
                let rb = powerinfer_quant::row_bytes(ty, n_ff).unwrap();
                let mut data = vec![0u8; n_embd * rb];
                for r in data.chunks_exact_mut(rb) {
                    let v: Vec<f32> = (0..n_ff)
                        .map(|_| (next() % 2001) as f32 / 1000.0 - 0.7)
                        .collect();
                    powerinfer_quant::quantize_row(ty, &v, r).unwrap();
                }
                let down =
                    GroupedDown::from_down(&Matrix::new(ty, n_embd, n_ff, &data).unwrap()).unwrap();
                for share in [1u64, 3, 10] {
                    let ids: Vec<u32> = (0..n_ff as u32).filter(|_| next() % 10 < share).collect();
                    let coef: Vec<f32> = ids
                        .iter()
                        .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                        .collect();
                    let mut want = vec![0.5f32; n_embd];
                    part_scalar(&down, &ids, &coef, &mut want);
                    #[allow(unused_mut)]
                    let mut kernels: Vec<(&str, Vec<f32>)> = Vec::new();
                    #[cfg(target_arch = "x86_64")]
                    {
                        if has_avx2() {
                            let mut got = vec![0.5f32; n_embd];
                            // SAFETY: AVX2 and F16C detected.
                            unsafe { avx2::part(&down, &ids, &coef, &mut got) };
                            kernels.push(("avx2", got));
                        }
                        if has_avx512() {
                            let mut got = vec![0.5f32; n_embd];
                            // SAFETY: AVX-512 F, BW, VBMI and VNNI detected.
                            unsafe { avx512::part(&down, &ids, &coef, &mut got) };
                            kernels.push(("avx512", got));
                        }
                    }
                    for (name, got) in kernels {
                        let same = got
                            .iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(
                            same,
                            "{ty} {n_embd}x{n_ff} share {share}/10: {name} differs"
                        );
                    }
                }
            }
        }
    }
}
