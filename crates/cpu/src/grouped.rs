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
//! `n_embd` quantized values. The product over a set of active neurons with coefficients `h_i` is
//!
//! `out[j] = sum over groups g of ( d_g[j] * S_g[j] + m_g[j] * H_g )`,
//! `S_g[j] = sum over active i in g of h_i * q_i[j]`, `H_g = sum over active i in g of h_i`,
//!
//! which is exactly the dense down product restricted to those neurons (no new rounding of the
//! weights). A group is skipped when none of its neurons is active; the scales of a touched
//! group cost `2 / (value bytes of 32 neurons)` extra, e.g. 20% of the Q4_1 matrix when every
//! group is touched.
//!
//! The neurons are cut into four fixed parts by group; each part's sum is computed by one thread
//! reading whole neuron rows in ascending order, and the parts are added in a fixed order, so
//! the result does not depend on the number of threads; the AVX2 kernel gives the same bits as
//! [`grouped_axpy_scalar`].

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
    /// The types this layout supports (32-element blocks with one scale, and a minimum for
    /// Q4_1).
    pub fn supports(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0)
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
        let vb = value_row_bytes(ty, n_embd);
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
                    match ty {
                        GgmlType::Q8_0 => row[j] = q[t],
                        _ => {
                            // Original block: byte t holds neuron t (low) and t + 16 (high).
                            let v = if t < 16 { q[t] & 0x0F } else { q[t - 16] >> 4 };
                            // Values of outputs 32c + u (u < 16) in the low nibble of byte u
                            // of block c, 32c + 16 + u in its high nibble.
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

    /// The quantized value of neuron `i` at output `j`, as an exact float (Q4_0: nibble - 8,
    /// Q4_1: nibble, Q8_0: the signed byte).
    fn value(&self, i: usize, j: usize) -> f32 {
        let vb = value_row_bytes(self.ty, self.n_embd);
        let row = &self.values[i * vb..(i + 1) * vb];
        match self.ty {
            GgmlType::Q8_0 => f32::from(row[j] as i8),
            ty => {
                let (c, u) = (j / 32, j % 32);
                let byte = row[c * 16 + u % 16];
                let nib = if u < 16 { byte & 0x0F } else { byte >> 4 };
                if ty == GgmlType::Q4_0 {
                    f32::from(nib) - 8.0
                } else {
                    f32::from(nib)
                }
            }
        }
    }
}

fn scale_count(ty: GgmlType) -> usize {
    if ty == GgmlType::Q4_1 { 2 } else { 1 }
}

/// Value bytes of one neuron.
fn value_row_bytes(ty: GgmlType, n_embd: usize) -> usize {
    if ty == GgmlType::Q8_0 {
        n_embd
    } else {
        n_embd / 2
    }
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

/// `out = sum_k coef[k] * down[:, ids[k]]` (overwrites `out`) on the calling thread, in plain
/// scalar code: the reference of [`grouped_axpy`] (same bits). `ids` strictly increasing; zero
/// coefficients are skipped.
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
        segment_scalar(down, &ids[r.clone()], &coef[r], 0, part);
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

/// Outputs `[j0, j0 + out.len())`, added to `out`.
fn segment_scalar(down: &GroupedDown, ids: &[u32], coef: &[f32], j0: usize, out: &mut [f32]) {
    let (n_embd, k) = (down.n_embd, scale_count(down.ty));
    let mut s = vec![0.0f32; out.len()];
    for (g, a, b) in group_runs(ids) {
        s.fill(0.0);
        let mut h_sum = 0.0f32;
        let mut any = false;
        for p in a..b {
            let h = coef[p];
            if h == 0.0 {
                continue;
            }
            any = true;
            h_sum += h;
            let i = ids[p] as usize;
            for (o, sv) in s.iter_mut().enumerate() {
                *sv += h * down.value(i, j0 + o);
            }
        }
        if !any {
            continue;
        }
        let sc = &down.scales[g * k * n_embd..(g + 1) * k * n_embd];
        for (o, (y, &sv)) in out.iter_mut().zip(&s).enumerate() {
            let d = f16_to_f32(sc[j0 + o]);
            let t = if k == 2 {
                d * sv + f16_to_f32(sc[n_embd + j0 + o]) * h_sum
            } else {
                d * sv
            };
            *y += t;
        }
    }
}

/// `out = sum_k coef[k] * down[:, ids[k]]` (overwrites `out`): the down projection of the
/// active neurons `ids` (strictly increasing) with coefficients `coef` (zeros skipped), the
/// four parts of the neurons split across the pool's threads. The same bits as [`grouped_axpy_scalar`] for any
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
    let vb = value_row_bytes(down.ty, down.n_embd);
    // Small products stay on this thread (waking the pool costs more than they do).
    if pool.n_threads() == 1 || ids.len() * vb < 64 * 1024 {
        for (k, part) in partial.chunks_exact_mut(n).enumerate() {
            let r = part_range(down, ids, k);
            segment(down, &ids[r.clone()], &coef[r], 0, part);
        }
    } else {
        let shared = SharedSlice::new(&mut partial);
        pool.run(|ti, nt| {
            for k in (ti..PARTS).step_by(nt) {
                let r = part_range(down, ids, k);
                // SAFETY: part `k` is handed to exactly one thread (`k % nt == ti`), and the
                // parts are disjoint ranges of `partial`.
                let part = unsafe { shared.slice_mut(k * n..(k + 1) * n) };
                segment(down, &ids[r.clone()], &coef[r], 0, part);
            }
        });
    }
    sum_parts(&partial, out);
    Ok(())
}

/// [`segment_scalar`] with the AVX2 kernel where the CPU has it.
fn segment(down: &GroupedDown, ids: &[u32], coef: &[f32], j0: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: AVX2 and F16C were just detected.
        unsafe { avx2::segment(down, ids, coef, j0, out) };
        return;
    }
    segment_scalar(down, ids, coef, j0, out)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{GroupedDown, group_runs, scale_count, value_row_bytes};
    use powerinfer_gguf::GgmlType;

    /// 32 values of one neuron's block as four groups of 8 exact floats.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn decode(ty: GgmlType, b: &[u8]) -> [__m256; 4] {
        let cvt = |v: __m128i| {
            [
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v))),
            ]
        };
        match ty {
            GgmlType::Q8_0 => {
                assert!(b.len() >= 32);
                // SAFETY: `b` has at least 32 readable bytes; unaligned loads.
                let (q0, q1) = unsafe {
                    (
                        _mm_loadu_si128(b.as_ptr().cast()),
                        _mm_loadu_si128(b[16..].as_ptr().cast()),
                    )
                };
                let [e0, e1] = cvt(q0);
                let [e2, e3] = cvt(q1);
                [e0, e1, e2, e3]
            }
            _ => {
                assert!(b.len() >= 16);
                // SAFETY: `b` has at least 16 readable bytes; unaligned load.
                let q = unsafe { _mm_loadu_si128(b.as_ptr().cast()) };
                let m4 = _mm_set1_epi8(0x0F);
                let mut lo = _mm_and_si128(q, m4);
                let mut hi = _mm_and_si128(_mm_srli_epi16::<4>(q), m4);
                if ty == GgmlType::Q4_0 {
                    let eight = _mm_set1_epi8(8);
                    lo = _mm_sub_epi8(lo, eight);
                    hi = _mm_sub_epi8(hi, eight);
                }
                let [e0, e1] = cvt(lo);
                let [e2, e3] = cvt(hi);
                [e0, e1, e2, e3]
            }
        }
    }

    /// Eight f16 at `s[0..8]` as floats.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn f16x8(s: &[u16]) -> __m256 {
        assert!(s.len() >= 8);
        // SAFETY: 8 readable u16 (16 bytes); unaligned load.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(s.as_ptr().cast()) })
    }

    /// [`super::segment_scalar`] vectorised: each active neuron's row segment is read in order
    /// (the next group's rows are prefetched meanwhile) and added into the group's sums `S`,
    /// then the scales are applied; the same operations in the same order per output, so the
    /// same bits.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn segment(
        down: &GroupedDown,
        ids: &[u32],
        coef: &[f32],
        j0: usize,
        out: &mut [f32],
    ) {
        let (ty, n_embd, k) = (down.ty, down.n_embd, scale_count(down.ty));
        let vb = value_row_bytes(ty, n_embd);
        // Bytes of one 32-output block of a neuron's values.
        let bb = if ty == GgmlType::Q8_0 { 32 } else { 16 };
        let (b0, nblk) = (j0 / 32, out.len() / 32);
        let seg = |i: usize| &down.values[i * vb + b0 * bb..i * vb + (b0 + nblk) * bb];
        let runs: Vec<(usize, usize, usize)> = group_runs(ids).collect();
        let mut s = vec![0.0f32; nblk * 32];
        for (r, &(g, a, b)) in runs.iter().enumerate() {
            if let Some(&(_, na, nb)) = runs.get(r + 1) {
                for p in na..nb {
                    if coef[p] != 0.0 {
                        for line in seg(ids[p] as usize).chunks(64) {
                            _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast());
                        }
                    }
                }
            }
            let mut h_sum = 0.0f32;
            let mut any = false;
            for p in a..b {
                let h = coef[p];
                if h == 0.0 {
                    continue;
                }
                if !any {
                    s.fill(0.0);
                    any = true;
                }
                h_sum += h;
                let row = seg(ids[p] as usize);
                let hv = _mm256_set1_ps(h);
                for (c, sc) in s.chunks_exact_mut(32).enumerate() {
                    let e = decode(ty, &row[c * bb..(c + 1) * bb]);
                    for q in 0..4 {
                        let acc = &mut sc[q * 8..q * 8 + 8];
                        // SAFETY: `acc` is 8 floats; unaligned load and store.
                        unsafe {
                            let v = _mm256_add_ps(
                                _mm256_loadu_ps(acc.as_ptr()),
                                _mm256_mul_ps(hv, e[q]),
                            );
                            _mm256_storeu_ps(acc.as_mut_ptr(), v);
                        }
                    }
                }
            }
            if !any {
                continue;
            }
            let scales = &down.scales[g * k * n_embd..(g + 1) * k * n_embd];
            let hv = _mm256_set1_ps(h_sum);
            for (c, (oc, sc)) in out.chunks_exact_mut(32).zip(s.chunks_exact(32)).enumerate() {
                let blk = b0 + c;
                for q in 0..4 {
                    let j = blk * 32 + q * 8;
                    let sv = &sc[q * 8..q * 8 + 8];
                    // SAFETY: `sv` is 8 floats; unaligned load.
                    let mut t =
                        _mm256_mul_ps(f16x8(&scales[j..]), unsafe { _mm256_loadu_ps(sv.as_ptr()) });
                    if k == 2 {
                        t = _mm256_add_ps(t, _mm256_mul_ps(f16x8(&scales[n_embd + j..]), hv));
                    }
                    let o = &mut oc[q * 8..q * 8 + 8];
                    // SAFETY: `o` is 8 floats; unaligned load and store.
                    unsafe {
                        let y = _mm256_add_ps(_mm256_loadu_ps(o.as_ptr()), t);
                        _mm256_storeu_ps(o.as_mut_ptr(), y);
                    }
                }
            }
        }
    }
}
