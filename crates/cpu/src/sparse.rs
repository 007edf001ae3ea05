//! Activation-sparse FFN operators: compute only the neurons a predictor marked active.
//!
//! PowerInfer's FFN in sparse mode touches only the rows of the gate/up projections and of the
//! transposed down projection (`ffn_down_t`, one row per neuron) that belong to active neurons.
//! This module holds those operators for every weight type `powerinfer-quant` has kernels for:
//!
//! - [`sparse_matvec`]: row-gather matrix-vector product. `y[i] = dot(w[i], x)` for active `i`,
//!   exactly `0.0` for every other row. The activations are quantized once, as in the dense
//!   [`matvec`](crate::matvec), and each active output is the same `vec_dot` call the dense
//!   product makes, so active outputs equal the dense ones bit for bit.
//! - [`sparse_axpy`]: `out = sum_{i active} act[i] * down_t[i, :]`, dequantizing each active row
//!   and accumulating it. The output columns are split across threads (never the neurons), and
//!   every column sums its terms in ascending neuron order, so the result is bit-for-bit the same
//!   with any number of threads, run after run (the reference PowerInfer merges per-thread
//!   partial sums without synchronisation; this does not).
//! - [`sparse_ffn`]: the fused per-neuron FFN (gate, activation, up only where the activation is
//!   non-zero, then the axpy) in two passes: per-neuron coefficients in parallel over neurons,
//!   then the axpy in parallel over output columns (deterministic, like [`sparse_axpy`]).
//! - [`sparse_matmul`] and [`sparse_axpy_batch`]: the prompt (batched) path. The union of the
//!   tokens' active sets is gathered once; every union row is read once per tile of tokens and
//!   meets only the tokens for which it is active. A neuron active for token A but not for token
//!   B is exactly zero for B. Every output equals the single-token operator's, bit for bit.
//!
//! [`reference`] holds plain scalar versions of each operator (f64 accumulation on dequantized
//! weights), used by the tests.
//!
//! Speed notes (`benches/sparse.rs`, LLaMA-7B FFN shapes, Q4_0, 2 threads, on a shared 2-core
//! VM, so take them as rough):
//! - Active rows are scattered, so the hardware prefetcher cannot follow them; the row-gather
//!   product and the axpy prefetch a few rows ahead into L2 (this halved their time at 10%
//!   active, and the L2 hint instead of L1 nearly halved it again).
//! - Scattered rows stream below sequential bandwidth on the test machine: gathering 50% of the
//!   rows takes about 80% of the dense time (30%: about 50%). From 65% active on,
//!   [`sparse_matvec`] streams every row in order and keeps the active outputs (same values,
//!   dense speed).
//! - The axpy is compute-bound (f32 dequantize-and-add per weight against the integer dot
//!   product of the matvec): it decodes Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/F16 itself with loops the
//!   compiler vectorizes (an AVX2 build chosen at run time), exactly reproducing the reference
//!   dequantization, and adds four rows per pass over the output. Other types use the kernel
//!   set's `dequantize`.
//! - Fused vs unfused FFN: with a perfect predictor (every active neuron has a positive gate)
//!   the per-neuron pass and the unfused sequence were within run-to-run noise of each other at
//!   10-30% active; with an imperfect predictor (30% active, precision 0.5) the per-neuron pass
//!   was faster in each of five runs (8-26%), because it skips the up rows of neurons whose
//!   activation is zero. From 65% active on, the streamed gate/up products win, so
//!   [`sparse_ffn`] uses the per-neuron pass below 65% and the two streamed row-gather
//!   products above (same values either way). Use [`sparse_ffn`] on the decode path.

use std::cell::Cell;

use powerinfer_gguf::GgmlType;
use powerinfer_quant::TypeKernels;

use crate::grouped::{GroupedDown, grouped_axpy};
use crate::pool::{SharedSlice, ThreadPool};
use crate::{ActBuffer, CpuError, Matrix};

/// Weight bytes of active rows per chunk handed to a thread in the row-gather products.
const GATHER_CHUNK_BYTES: usize = 16 * 1024;

/// Large jobs are cut into about this many chunks per thread: long runs of rows per thread
/// (small chunks alternating between threads made two threads slower than one on big matrices,
/// and cut every prefetch run short at each chunk's end).
const CHUNKS_PER_THREAD: usize = 8;

/// Items per chunk for a job of `n_items` items of `item_bytes` each.
fn chunk_items(n_items: usize, item_bytes: usize, n_threads: usize) -> usize {
    (GATHER_CHUNK_BYTES / item_bytes.max(1))
        .max(n_items / (n_threads.max(1) * CHUNKS_PER_THREAD))
        .max(1)
}

/// Below this many bytes of active weight rows, an operator runs on the calling thread alone.
const INLINE_BYTES: usize = 32 * 1024;

/// At or above this share of active rows (in percent), [`sparse_matvec`] reads every row in
/// order instead of gathering the active ones. Measured at LLaMA-7B shapes, Q4_0, 2 threads,
/// rows from DRAM, with the L2 prefetch hint: gathering 30/40/50% of the rows took 0.51/0.67/
/// 0.80 of the time of the sweep (0.9 at 30% with the earlier L1 hint, hence the earlier 40).
const DENSE_SWEEP_PERCENT: usize = 65;

/// Output floats per column segment of the batched axpy (a segment of every token in a token
/// tile stays in L2 while the union rows stream past).
const AXPY_BATCH_TILE_FLOATS: usize = 32 * 1024;

/// Errors of the sparse operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SparseError {
    /// A shape, type or buffer problem shared with the dense operators.
    #[error("{op}: {source}")]
    Cpu {
        /// The operator that was called.
        op: &'static str,
        /// The underlying error.
        source: CpuError,
    },
    /// An active neuron id is not a row of the matrix.
    #[error(
        "{op}: active neuron id {id} (position {pos} of the active set) is out of range: the matrix has {rows} rows"
    )]
    NeuronOutOfRange {
        /// The operator that was called.
        op: &'static str,
        /// Index in the active set.
        pos: usize,
        /// The id found there.
        id: u32,
        /// Rows of the matrix.
        rows: usize,
    },
    /// The active neuron ids are not strictly increasing.
    #[error(
        "{op}: active neuron ids must be strictly increasing, found {prev} then {id} at position {pos}"
    )]
    NotSorted {
        /// The operator that was called.
        op: &'static str,
        /// Index in the active set of the offending id.
        pos: usize,
        /// The id before it.
        prev: u32,
        /// The offending id.
        id: u32,
    },
    /// A length does not match what the other operands require.
    #[error("{op}: {what} should be {expected}, got {actual}")]
    ShapeMismatch {
        /// The operator that was called.
        op: &'static str,
        /// Which quantity is wrong, and (in parentheses) what it must equal.
        what: &'static str,
        /// The required value.
        expected: usize,
        /// The value passed.
        actual: usize,
    },
}

/// The element-wise activation of a sparse FFN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `max(x, 0)`.
    Relu,
    /// `x / (1 + exp(-x))` with ggml's vectorised exp ([`crate::ops::silu_poly`], what
    /// llama.cpp's dense SwiGLU computes).
    Silu,
    /// GELU as llama.cpp computes it ([`crate::ops::gelu`]).
    Gelu,
}

impl Activation {
    /// Applies the activation to one value.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Silu => crate::ops::silu_poly(x),
            Activation::Gelu => crate::ops::gelu(x),
        }
    }
}

/// How a neuron's coefficient `h_i` (the down projection's input) is made from its gate and up
/// pre-activations `g_i = gate_i . x` and `u_i = up_i . x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FfnKind {
    /// `h = act(g) * u` (LLaMA-style gated FFN; ReluLLaMA, ProSparse with [`Activation::Relu`]).
    /// `u` is computed only where `act(g) != 0`.
    Gated(Activation),
    /// `h = relu(g) * relu(u)` (Bamboo / TurboSparse "dReLU"). `u` is computed only where
    /// `g > 0`.
    DRelu,
    /// `h = act(u)`, no gate (Falcon, OPT without biases).
    Plain(Activation),
}

/// The weights of one sparse FFN layer.
#[derive(Debug, Clone, Copy)]
pub struct SparseFfn<'a> {
    /// Gate projection, `n_ff` rows of `n_embd`; required by [`FfnKind::Gated`] and
    /// [`FfnKind::DRelu`], ignored by [`FfnKind::Plain`].
    pub gate: Option<Matrix<'a>>,
    /// Up projection, `n_ff` rows of `n_embd`.
    pub up: Matrix<'a>,
    /// Transposed down projection (`ffn_down_t`), `n_ff` rows of `n_embd`: row `i` is neuron
    /// `i`'s output vector.
    pub down_t: Matrix<'a>,
    /// How gate and up combine.
    pub kind: FfnKind,
    /// Round the coefficients `h` with [`round_coefficients`] before the axpy (as a dense down
    /// product with 8-bit activations, and the reference PowerInfer, see them).
    pub round_coefficients: bool,
    /// Coefficients with `|h| <= zero_below` count as exactly zero and their down rows are not
    /// read: the runtime activity threshold of non-ReLU sparse models (a neuron is active when
    /// the magnitude of its gated activation exceeds the layer's threshold). `0.0` changes
    /// nothing (exact zeros are always skipped).
    pub zero_below: f32,
    /// The original down projection regrouped by neuron ([`GroupedDown`]): when given, the
    /// output is computed from it (the model's own down weights, no second quantization; the
    /// coefficients always rounded to 8 bits as the dense product rounds them) and `down_t`
    /// only fixes the shapes.
    pub down_grouped: Option<&'a GroupedDown>,
}

impl SparseFfn<'_> {
    /// The type the down projection is computed in (what [`round_coefficients`] rounds to).
    pub fn down_type(&self) -> GgmlType {
        self.down_grouped.map_or(self.down_t.ty, |g| g.ty())
    }
}

/// `h`, or exactly zero when `|h| <= zero_below` (see [`SparseFfn::zero_below`]).
#[inline]
pub fn apply_zero_below(h: f32, zero_below: f32) -> f32 {
    if h.abs() <= zero_below { 0.0 } else { h }
}

/// The gated FFN's non-zero coefficients: for every neuron `i`, `h = act[i] * up[i]` (exactly 0
/// where `act[i] == 0`), then [`apply_zero_below`]; `ids` and `vals` (cleared first) receive
/// the neurons whose `h` is not zero, in ascending order, and their `h`.
///
/// Branch-free (AVX-512 compresses where the CPU has them): which neurons survive follows
/// no pattern a branch predictor can learn, and a branch per neuron cost more than the down
/// product it spares.
pub fn gated_nonzero(
    act: &[f32],
    up: &[f32],
    zero_below: f32,
    ids: &mut Vec<u32>,
    vals: &mut Vec<f32>,
) {
    let n = act.len().min(up.len());
    ids.clear();
    ids.resize(n, 0);
    vals.clear();
    vals.resize(n, 0.0);
    // The neurons kept so far, and the first one not looked at.
    let (mut kept, mut start) = (0, 0);
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        start = n / 16 * 16;
        // SAFETY: AVX-512 F was just detected; `up`, `ids` and `vals` hold at least `start`.
        kept = unsafe {
            compact_x86::gated_nonzero(&act[..start], &up[..start], zero_below, ids, vals)
        };
    }
    for i in start..n {
        let h = if act[i] == 0.0 { 0.0 } else { act[i] * up[i] };
        let h = apply_zero_below(h, zero_below);
        ids[kept] = i as u32;
        vals[kept] = h;
        kept += usize::from(h != 0.0);
    }
    ids.truncate(kept);
    vals.truncate(kept);
}

#[cfg(target_arch = "x86_64")]
mod compact_x86 {
    use std::arch::x86_64::*;

    /// The whole blocks of 16 of [`super::gated_nonzero`]; returns how many neurons it kept.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F; `ids` and `vals` hold at least `act.len()` elements and
    /// `up` as many as `act`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gated_nonzero(
        act: &[f32],
        up: &[f32],
        zero_below: f32,
        ids: &mut [u32],
        vals: &mut [f32],
    ) -> usize {
        assert!(up.len() >= act.len() && ids.len() >= act.len() && vals.len() >= act.len());
        let zb = _mm512_set1_ps(zero_below);
        let lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut kept = 0usize;
        for b in 0..act.len() / 16 {
            let i = b * 16;
            // SAFETY: `i + 16 <= act.len() <= up.len()`; unaligned loads.
            let (a, u) = unsafe {
                (
                    _mm512_loadu_ps(act.as_ptr().add(i)),
                    _mm512_loadu_ps(up.as_ptr().add(i)),
                )
            };
            // h = a * u where a != 0 (NaN included, as `a == 0.0` is false for it), else +0.
            let live = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(a, _mm512_setzero_ps());
            let h = _mm512_maskz_mul_ps(live, a, u);
            // Kept: not |h| <= zero_below (NaN kept) and h != 0.
            let big = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(_mm512_abs_ps(h), zb);
            let nonzero = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(h, _mm512_setzero_ps());
            let keep = big & nonzero;
            let idx = _mm512_add_epi32(_mm512_set1_epi32(i as i32), lanes);
            // Compressed in registers and stored whole (a compress straight to memory is
            // microcoded and slow on Zen 4); the lanes past the kept ones are overwritten by
            // the next block or cut off by the caller.
            // SAFETY: 16 elements are stored at `kept <= i` (each block keeps at most its 16),
            // so they end within the first `i + 16 <= act.len()` elements of `ids` and `vals`.
            unsafe {
                _mm512_storeu_si512(
                    ids.as_mut_ptr().add(kept).cast(),
                    _mm512_maskz_compress_epi32(keep, idx),
                );
                _mm512_storeu_ps(
                    vals.as_mut_ptr().add(kept),
                    _mm512_maskz_compress_ps(keep, h),
                );
            }
            kept += keep.count_ones() as usize;
        }
        kept
    }
}

/// Reusable buffers of the sparse operators (so that the decode path does not allocate once they
/// have grown to the largest shape).
#[derive(Debug, Default)]
pub struct SparseScratch {
    /// Activations quantized for the first (gate / only) matrix.
    act: ActBuffer,
    /// Activations quantized for the up matrix when its type differs from the gate's.
    act2: ActBuffer,
    /// Per-active-neuron values (compact, in active-set order).
    vals: Vec<f32>,
    /// Gate outputs of the dense-ish FFN path (`n_ff`).
    gate_out: Vec<f32>,
    /// Up outputs of the dense-ish FFN path (`n_ff`).
    up_out: Vec<f32>,
    /// A full `n_ff` coefficient vector for [`round_coefficients`].
    full: Vec<f32>,
    /// Quantized coefficients for [`round_coefficients`].
    round: Vec<u8>,
    /// Active neurons whose gate activation is non-zero (the dense-ish FFN path).
    nonzero: Vec<u32>,
}

impl SparseScratch {
    /// Empty buffers.
    pub fn new() -> Self {
        Self::default()
    }
}

thread_local! {
    /// The scratch the plain (non-`_with`) operators reuse on each calling thread.
    static SCRATCH: Cell<SparseScratch> = Cell::new(SparseScratch::new());
}

/// Runs `f` with this thread's scratch (taken out for the duration: a nested use gets a fresh
/// one instead of panicking).
fn with_scratch<R>(f: impl FnOnce(&mut SparseScratch) -> R) -> R {
    let mut s = SCRATCH.with(Cell::take);
    let r = f(&mut s);
    SCRATCH.with(|c| c.set(s));
    r
}

fn check_len(
    op: &'static str,
    what: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), SparseError> {
    if expected != actual {
        return Err(SparseError::ShapeMismatch {
            op,
            what,
            expected,
            actual,
        });
    }
    Ok(())
}

/// Checks the matrix invariants and returns its row bytes and kernels.
fn check_matrix(
    op: &'static str,
    w: &Matrix,
) -> Result<(usize, &'static TypeKernels), SparseError> {
    let m = Matrix::new(w.ty, w.rows, w.cols, w.data)
        .map_err(|source| SparseError::Cpu { op, source })?;
    let k = powerinfer_quant::kernels(w.ty).ok_or(SparseError::Cpu {
        op,
        source: CpuError::UnsupportedType(w.ty),
    })?;
    Ok((m.row_bytes(), k))
}

/// Checks that `active` is strictly increasing and every id is below `rows`.
pub fn check_active(op: &'static str, active: &[u32], rows: usize) -> Result<(), SparseError> {
    let mut prev: Option<u32> = None;
    for (pos, &id) in active.iter().enumerate() {
        if let Some(p) = prev
            && id <= p
        {
            return Err(SparseError::NotSorted {
                op,
                pos,
                prev: p,
                id,
            });
        }
        if id as usize >= rows {
            return Err(SparseError::NeuronOutOfRange { op, pos, id, rows });
        }
        prev = Some(id);
    }
    Ok(())
}

fn quantize(
    op: &'static str,
    buf: &mut ActBuffer,
    ty: GgmlType,
    x: &[f32],
    cols: usize,
    n_tokens: usize,
) -> Result<(), SparseError> {
    buf.quantize(ty, x, cols, n_tokens)
        .map_err(|source| SparseError::Cpu { op, source })
}

/// Asks the CPU to start loading `bytes` (a weight row about to be read) into the L2 cache. Rows
/// of active neurons are scattered, so the hardware prefetcher cannot see the next one coming.
/// Into L2, not L1: a whole row's worth of L1 prefetches (36 lines of a 4096-wide Q4_0 row)
/// held the L1 miss buffers that the loads themselves need; a 10% gather at LLaMA-7B shapes
/// went from 11 to 21 GB/s with the L2 hint.
#[inline(always)]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch is only a hint; it never faults and the pointer is in bounds.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Rounds FFN coefficients (the down projection's input `h`, one token's full `n_ff` vector,
/// inactive neurons 0) to what a product with `down_ty` weights sees: quantized to the
/// activation type paired with `down_ty` and back (8-bit blocks of 32 or 256 consecutive
/// neurons, or f16). llama.cpp's dense down product and the reference PowerInfer's axpy (which
/// quantizes `h` to Q8_0 for Q4_0 and to f16 for F16) both compute with these values. Whole
/// blocks only: a tail shorter than a block keeps its exact values. `buf` is scratch.
pub fn round_coefficients(
    down_ty: GgmlType,
    h: &mut [f32],
    buf: &mut Vec<u8>,
) -> Result<(), SparseError> {
    const OP: &str = "round_coefficients";
    let k = powerinfer_quant::kernels(down_ty).ok_or(SparseError::Cpu {
        op: OP,
        source: CpuError::UnsupportedType(down_ty),
    })?;
    if k.act_ty == GgmlType::F32 {
        return Ok(());
    }
    let bs = k.act_ty.block_size();
    let whole = h.len() / bs * bs;
    if whole == 0 {
        return Ok(());
    }
    buf.resize(whole / bs * k.act_ty.type_size(), 0);
    (k.quantize_act)(&h[..whole], buf);
    powerinfer_quant::dequantize_row(k.act_ty, buf, &mut h[..whole]).map_err(|_| SparseError::Cpu {
        op: OP,
        source: CpuError::UnsupportedType(k.act_ty),
    })
}

/// [`round_coefficients`] on the compact values `scratch.vals` of the neurons in `active`.
fn round_compact(
    down_ty: GgmlType,
    n_ff: usize,
    active: &[u32],
    scratch: &mut SparseScratch,
) -> Result<(), SparseError> {
    let full = &mut scratch.full;
    full.clear();
    full.resize(n_ff, 0.0);
    for (&i, &v) in active.iter().zip(&scratch.vals) {
        full[i as usize] = v;
    }
    round_coefficients(down_ty, full, &mut scratch.round)?;
    for (&i, v) in active.iter().zip(scratch.vals.iter_mut()) {
        *v = full[i as usize];
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Row-gather matvec
// ------------------------------------------------------------------------------------------

/// `y[i] = dot(w[i], x)` for every `i` in `active`, `y[i] = 0.0` for every other row.
///
/// `x.len() == w.cols`, `y.len() == w.rows`; `active` holds strictly increasing row ids below
/// `w.rows`. `x` is quantized once to the weight type's vec_dot type; the active rows are split
/// across the pool's threads (from 65% active on, every row is streamed in order and only the
/// active outputs kept). Each active output is bit-identical to what [`crate::matvec`] gives.
///
/// ```
/// use powerinfer_cpu::sparse::sparse_matvec;
/// use powerinfer_cpu::{Matrix, ThreadPool};
/// use powerinfer_gguf::GgmlType;
///
/// let w: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
///     .iter()
///     .flat_map(|v| v.to_le_bytes())
///     .collect();
/// let w = Matrix::new(GgmlType::F32, 3, 2, &w)?;
/// let mut y = [f32::NAN; 3];
/// sparse_matvec(&ThreadPool::new(1), &w, &[1.0, 1.0], &[0, 2], &mut y)?;
/// assert_eq!(y, [3.0, 0.0, 11.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn sparse_matvec(
    pool: &ThreadPool,
    w: &Matrix,
    x: &[f32],
    active: &[u32],
    y: &mut [f32],
) -> Result<(), SparseError> {
    with_scratch(|s| sparse_matvec_with(pool, w, x, active, y, s))
}

/// [`sparse_matvec`] with caller-owned scratch buffers.
pub fn sparse_matvec_with(
    pool: &ThreadPool,
    w: &Matrix,
    x: &[f32],
    active: &[u32],
    y: &mut [f32],
    scratch: &mut SparseScratch,
) -> Result<(), SparseError> {
    const OP: &str = "sparse_matvec";
    let (rb, k) = check_matrix(OP, w)?;
    check_len(OP, "input length (matrix cols)", w.cols, x.len())?;
    check_len(OP, "output length (matrix rows)", w.rows, y.len())?;
    check_active(OP, active, w.rows)?;
    y.fill(0.0);
    if active.is_empty() {
        return Ok(());
    }
    quantize(OP, &mut scratch.act, w.ty, x, w.cols, 1)?;
    let act = scratch.act.token(0).unwrap_or(&[]);
    let cols = w.cols;
    let row = |i: u32| {
        let i = i as usize;
        &w.data[i * rb..(i + 1) * rb]
    };
    let dot = |i: u32| -> f32 { (k.vec_dot)(cols, row(i), act) };
    if active.len() * 100 >= w.rows * DENSE_SWEEP_PERCENT && rb > 0 {
        let chunk = chunk_items(w.rows, rb, pool.n_threads());
        let out = SharedSlice::new(y);
        // Dense-ish set: stream every row (sequential reads run at full memory bandwidth, which
        // scattered rows do not) and keep the active outputs.
        pool.for_each_chunk(w.rows, chunk, |range| {
            let mut p = active.partition_point(|&i| (i as usize) < range.start);
            let first = range.start;
            // SAFETY: `for_each_chunk` hands each chunk (a disjoint row range) to exactly one
            // thread.
            let part = unsafe { out.slice_mut(range) };
            // Every row of the chunk as `matvec` computes it, then the inactive ones zeroed.
            crate::matmul::dot_rows(k, w, rb, act, first, part);
            for (r, v) in part.iter_mut().enumerate() {
                if active.get(p).is_some_and(|&i| i as usize == first + r) {
                    p += 1;
                } else {
                    *v = 0.0;
                }
            }
        });
        return Ok(());
    }
    // The products of up to four active rows (the four-row kernel where the type has one:
    // the same values; a short group repeats its last row, which costs no memory traffic).
    let dots = |ids: &[u32]| -> [f32; 4] {
        match k.vec_dot4 {
            Some(d4) if ids.len() >= 2 => d4(
                cols,
                {
                    let r = |j: usize| row(ids[j.min(ids.len() - 1)]);
                    [r(0), r(1), r(2), r(3)]
                },
                act,
            ),
            _ => {
                let mut o = [0.0; 4];
                for (o, &i) in o.iter_mut().zip(ids) {
                    *o = dot(i);
                }
                o
            }
        }
    };
    if pool.n_threads() == 1 || active.len() * rb <= INLINE_BYTES || rb == 0 {
        for ids in active.chunks(4) {
            for (&i, v) in ids.iter().zip(dots(ids)) {
                y[i as usize] = v;
            }
        }
        return Ok(());
    }
    let chunk = chunk_items(active.len(), rb, pool.n_threads()).next_multiple_of(4);
    let out = SharedSlice::new(y);
    pool.for_each_chunk(active.len(), chunk, |range| {
        let end = range.end;
        for &i in active[range.clone()].iter().take(4) {
            prefetch(row(i));
        }
        let mut p = range.start;
        while p < end {
            let q = (p + 4).min(end);
            for &next in active.get(p + 4..(q + 4).min(end)).unwrap_or(&[]) {
                prefetch(row(next));
            }
            let ids = &active[p..q];
            for (&i, v) in ids.iter().zip(dots(ids)) {
                // SAFETY: active ids are strictly increasing (checked), so each output index
                // belongs to exactly one position of `active`, and `for_each_chunk` hands each
                // position to exactly one thread.
                unsafe { out.write(i as usize, v) };
            }
            p = q;
        }
    });
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Axpy over the transposed down projection
// ------------------------------------------------------------------------------------------

/// `out += a * b` element-wise.
#[inline]
fn axpy1(out: &mut [f32], a: f32, b: &[f32]) {
    for (o, &v) in out.iter_mut().zip(b) {
        *o += a * v;
    }
}

/// `out = (((out + a0*b0) + a1*b1) + a2*b2) + a3*b3` element-wise: the same rounding as four
/// [`axpy1`] calls in order, with one pass over `out` instead of four.
#[inline]
fn axpy4(out: &mut [f32], a: [f32; 4], b: [&[f32]; 4]) {
    let n = out.len();
    let (b0, b1, b2, b3) = (&b[0][..n], &b[1][..n], &b[2][..n], &b[3][..n]);
    for j in 0..n {
        let mut o = out[j];
        o += a[0] * b0[j];
        o += a[1] * b1[j];
        o += a[2] * b2[j];
        o += a[3] * b3[j];
        out[j] = o;
    }
}

// Fast row decoding for the 32-element block formats. The kernels' `dequantize` is a plain
// scalar loop; the axpy is bound by it, so the formats most used for FFN weights get decoders
// here that the compiler vectorizes (compiled a second time with AVX2 and picked at run time).
// They produce exactly the values of ggml's `dequantize_row_*` (and of
// `powerinfer_quant::dequantize_row`), so every path that uses them agrees bit for bit.

/// A 32-element block format with an exact decoder.
trait Block32 {
    /// Bytes per block.
    const TS: usize;
    /// The format, for formats with a hand-written AVX2 accumulator (`None`: compiler-vectorized).
    const SIMD: Option<GgmlType> = None;
    /// Decodes one block (`b.len() >= TS`).
    fn decode(b: &[u8], w: &mut [f32; 32]);
}

#[inline(always)]
fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[off], b[off + 1]])).to_f32()
}

struct BQ4_0;
impl Block32 for BQ4_0 {
    const TS: usize = 18;
    const SIMD: Option<GgmlType> = Some(GgmlType::Q4_0);
    #[inline(always)]
    fn decode(b: &[u8], w: &mut [f32; 32]) {
        let d = f16_at(b, 0);
        let q: &[u8; 16] = b[2..18].try_into().unwrap_or(&[0; 16]);
        let (lo, hi) = w.split_at_mut(16);
        for j in 0..16 {
            lo[j] = ((q[j] & 0xF) as i32 - 8) as f32 * d;
        }
        for j in 0..16 {
            hi[j] = ((q[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

struct BQ4_1;
impl Block32 for BQ4_1 {
    const TS: usize = 20;
    #[inline(always)]
    fn decode(b: &[u8], w: &mut [f32; 32]) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let q: &[u8; 16] = b[4..20].try_into().unwrap_or(&[0; 16]);
        let (lo, hi) = w.split_at_mut(16);
        for j in 0..16 {
            lo[j] = (q[j] & 0xF) as f32 * d + m;
        }
        for j in 0..16 {
            hi[j] = (q[j] >> 4) as f32 * d + m;
        }
    }
}

struct BQ5_0;
impl Block32 for BQ5_0 {
    const TS: usize = 22;
    #[inline(always)]
    fn decode(b: &[u8], w: &mut [f32; 32]) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let q: &[u8; 16] = b[6..22].try_into().unwrap_or(&[0; 16]);
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            w[j] = (((q[j] & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
            w[j + 16] = (((q[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

struct BQ5_1;
impl Block32 for BQ5_1 {
    const TS: usize = 24;
    #[inline(always)]
    fn decode(b: &[u8], w: &mut [f32; 32]) {
        let (d, m) = (f16_at(b, 0), f16_at(b, 2));
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let q: &[u8; 16] = b[8..24].try_into().unwrap_or(&[0; 16]);
        for j in 0..16 {
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            w[j] = ((q[j] & 0xF) as u32 | h0) as f32 * d + m;
            w[j + 16] = ((q[j] >> 4) as u32 | h1) as f32 * d + m;
        }
    }
}

struct BQ8_0;
impl Block32 for BQ8_0 {
    const TS: usize = 34;
    const SIMD: Option<GgmlType> = Some(GgmlType::Q8_0);
    #[inline(always)]
    fn decode(b: &[u8], w: &mut [f32; 32]) {
        let d = f16_at(b, 0);
        let q: &[u8; 32] = b[2..34].try_into().unwrap_or(&[0; 32]);
        for j in 0..32 {
            w[j] = (q[j] as i8) as f32 * d;
        }
    }
}

/// `out[j] = (((out[j] + a[0]*w0[j]) + a[1]*w1[j]) + ...)` over whole blocks: the rounding of
/// `R` sequential axpys, one pass over `out`. `rows[r]` holds `out.len() / 32` blocks.
#[inline(always)]
fn acc_rows<B: Block32, const R: usize>(out: &mut [f32], a: &[f32; R], rows: &[&[u8]; R]) {
    let mut w = [[0.0f32; 32]; R];
    for (blk, o) in out.chunks_exact_mut(32).enumerate() {
        for r in 0..R {
            B::decode(&rows[r][blk * B::TS..(blk + 1) * B::TS], &mut w[r]);
        }
        let o: &mut [f32; 32] = o.try_into().unwrap_or_else(|_| unreachable!());
        for j in 0..32 {
            let mut v = o[j];
            for r in 0..R {
                v += a[r] * w[r][j];
            }
            o[j] = v;
        }
    }
}

/// Decodes whole blocks of `src` into `dst` (`dst.len() / 32` blocks).
#[inline(always)]
fn decode_rows<B: Block32>(src: &[u8], dst: &mut [f32]) {
    let mut w = [0.0f32; 32];
    for (blk, o) in dst.chunks_exact_mut(32).enumerate() {
        B::decode(&src[blk * B::TS..(blk + 1) * B::TS], &mut w);
        o.copy_from_slice(&w);
    }
}

/// F16 -> f32, exact, written so that it vectorizes: the f16 magnitude bits shifted into an
/// f32 and scaled by 2^112 (exact for normal and subnormal halves), infinities and NaNs fixed up.
#[inline(always)]
fn decode_f16_impl(src: &[u8], dst: &mut [f32]) {
    for (c, d) in src.chunks_exact(2).zip(dst.iter_mut()) {
        let h = u32::from(u16::from_le_bytes([c[0], c[1]]));
        let sign = (h & 0x8000) << 16;
        let mag = h & 0x7fff;
        let scaled = f32::from_bits(mag << 13) * f32::from_bits(0x7780_0000);
        let bits = if mag >= 0x7c00 {
            (mag << 13) | 0x7f80_0000
        } else {
            scaled.to_bits()
        };
        *d = f32::from_bits(bits | sign);
    }
}

/// A Q4_0 block's 16 quant bytes as its 32 signed values `q - 8`: elements 0..16 (low
/// nibbles), then 16..32 (high nibbles). SSE2 only, so any x86-64 kernel can inline it.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "sse2")]
fn q4_0_values(q: std::arch::x86_64::__m128i) -> [std::arch::x86_64::__m128i; 2] {
    use std::arch::x86_64::*;
    let (m4, eight) = (_mm_set1_epi8(0x0F), _mm_set1_epi8(8));
    [
        _mm_sub_epi8(_mm_and_si128(q, m4), eight),
        _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16::<4>(q), m4), eight),
    ]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Block32, acc_rows, decode_f16_impl, decode_rows};

    /// `o[k] += a * (e[k] * d)` for the 4 groups of 8 lanes of one block, with the rounding of
    /// [`acc_rows`]: the product `e * d` is exact, then one rounded multiply and one rounded add
    /// (no FMA).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn acc_block(o: &mut [__m256; 4], e: [__m256; 4], d: f32, a: f32) {
        let (dv, av) = (_mm256_set1_ps(d), _mm256_set1_ps(a));
        for k in 0..4 {
            let w = _mm256_mul_ps(e[k], dv);
            o[k] = _mm256_add_ps(o[k], _mm256_mul_ps(av, w));
        }
    }

    /// 16 signed bytes -> two groups of 8 f32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn i8x16_to_f32(v: __m128i) -> [__m256; 2] {
        [
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128::<8>(v))),
        ]
    }

    /// The f16 at `b[0..2]`.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    fn f16_scalar(b: &[u8]) -> f32 {
        let h = u16::from_le_bytes([b[0], b[1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(h))))
    }

    /// The loop shared by the hand-written accumulators: each 32-float output block is held in
    /// four registers while `$decode` turns block `$b` (`$ts` bytes, f16 scale first) of every
    /// row into four groups of 8 lanes, which [`acc_block`] adds in row order.
    macro_rules! acc_loop {
        ($name:literal, $out:ident, $a:ident, $rows:ident, $ts:expr, |$b:ident| $decode:block) => {{
            let nb = $out.len() / 32;
            for r in $rows {
                assert!(
                    r.len() >= nb * $ts,
                    concat!($name, ": row shorter than the output")
                );
            }
            for (blk, oc) in $out.chunks_exact_mut(32).enumerate() {
                // SAFETY: `oc` is 32 floats; unaligned loads.
                let mut o = unsafe {
                    [
                        _mm256_loadu_ps(oc.as_ptr()),
                        _mm256_loadu_ps(oc.as_ptr().add(8)),
                        _mm256_loadu_ps(oc.as_ptr().add(16)),
                        _mm256_loadu_ps(oc.as_ptr().add(24)),
                    ]
                };
                for r in 0..R {
                    let $b = &$rows[r][blk * $ts..(blk + 1) * $ts];
                    let e: [__m256; 4] = $decode;
                    acc_block(&mut o, e, f16_scalar($b), $a[r]);
                }
                // SAFETY: as for the loads.
                unsafe {
                    _mm256_storeu_ps(oc.as_mut_ptr(), o[0]);
                    _mm256_storeu_ps(oc.as_mut_ptr().add(8), o[1]);
                    _mm256_storeu_ps(oc.as_mut_ptr().add(16), o[2]);
                    _mm256_storeu_ps(oc.as_mut_ptr().add(24), o[3]);
                }
            }
        }};
    }

    /// [`acc_rows`] for Q4_0 with registers holding each output block across the rows: the
    /// same values bit for bit.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn acc_q4_0<const R: usize>(
        out: &mut [f32],
        a: &[f32; R],
        rows: &[&[u8]; R],
    ) {
        acc_loop!("acc_q4_0", out, a, rows, 18, |b| {
            // SAFETY: `b[2..18]` is 16 readable bytes; unaligned load.
            let q = unsafe { _mm_loadu_si128(b[2..].as_ptr().cast()) };
            let [lo, hi] = super::q4_0_values(q);
            let [e0, e1] = i8x16_to_f32(lo);
            let [e2, e3] = i8x16_to_f32(hi);
            [e0, e1, e2, e3]
        })
    }

    /// [`acc_rows`] for Q8_0, as [`acc_q4_0`].
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn acc_q8_0<const R: usize>(
        out: &mut [f32],
        a: &[f32; R],
        rows: &[&[u8]; R],
    ) {
        acc_loop!("acc_q8_0", out, a, rows, 34, |b| {
            // SAFETY: `b[2..34]` is 32 readable bytes; unaligned loads.
            let (q0, q1) = unsafe {
                (
                    _mm_loadu_si128(b[2..].as_ptr().cast()),
                    _mm_loadu_si128(b[18..].as_ptr().cast()),
                )
            };
            let [e0, e1] = i8x16_to_f32(q0);
            let [e2, e3] = i8x16_to_f32(q1);
            [e0, e1, e2, e3]
        })
    }

    /// [`decode_f16_impl`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn decode_f16(src: &[u8], dst: &mut [f32]) {
        decode_f16_impl(src, dst)
    }

    /// [`acc_rows`] compiled for AVX2 (no FMA: the rounding stays that of separate mul and add).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn acc<B: Block32, const R: usize>(
        out: &mut [f32],
        a: &[f32; R],
        rows: &[&[u8]; R],
    ) {
        acc_rows::<B, R>(out, a, rows)
    }

    /// [`decode_rows`] compiled for AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn decode<B: Block32>(src: &[u8], dst: &mut [f32]) {
        decode_rows::<B>(src, dst)
    }
}

/// The Q4_0 and Q8_0 accumulators at AVX-512 width: each 32-float output block in two 16-lane
/// registers, each weight block widened by two `vpmovsxbd` instead of four conversions and two
/// shifts. The rounding of [`acc_rows`] (exact `e * d`, rounded multiply by the coefficient,
/// rounded add; no FMA), so the values equal the AVX2 and scalar ones bit for bit.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// Shared loop: `$decode` turns block `$b` of a row into its 32 signed integers (two
    /// 16-lane registers); the f16 scale is the block's first two bytes.
    macro_rules! acc512_loop {
        ($name:literal, $out:ident, $a:ident, $rows:ident, $ts:expr, |$b:ident| $decode:block) => {{
            let nb = $out.len() / 32;
            for r in $rows {
                assert!(
                    r.len() >= nb * $ts,
                    concat!($name, ": row shorter than the output")
                );
            }
            let av: [__m512; R] = std::array::from_fn(|r| _mm512_set1_ps($a[r]));
            for (blk, oc) in $out.chunks_exact_mut(32).enumerate() {
                // SAFETY: `oc` is 32 floats; unaligned loads.
                let (mut o0, mut o1) = unsafe {
                    (
                        _mm512_loadu_ps(oc.as_ptr()),
                        _mm512_loadu_ps(oc.as_ptr().add(16)),
                    )
                };
                for r in 0..R {
                    // SAFETY: block `blk` of every row is inside it (asserted above).
                    let $b = unsafe { $rows[r].as_ptr().add(blk * $ts) };
                    let [e0, e1]: [__m512i; 2] = $decode;
                    // SAFETY: as above: the scale is the block's first two bytes.
                    let h = unsafe { $b.cast::<u16>().read_unaligned() };
                    let d = _mm512_set1_ps(_mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                        i32::from(h),
                    ))));
                    let w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(e0), d);
                    let w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(e1), d);
                    o0 = _mm512_add_ps(o0, _mm512_mul_ps(av[r], w0));
                    o1 = _mm512_add_ps(o1, _mm512_mul_ps(av[r], w1));
                }
                // SAFETY: as for the loads.
                unsafe {
                    _mm512_storeu_ps(oc.as_mut_ptr(), o0);
                    _mm512_storeu_ps(oc.as_mut_ptr().add(16), o1);
                }
            }
        }};
    }

    /// [`super::acc_rows`] for Q4_0.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and BW, and F16C.
    #[target_feature(enable = "avx2,f16c,avx512f,avx512bw")]
    pub(super) unsafe fn acc_q4_0<const R: usize>(
        out: &mut [f32],
        a: &[f32; R],
        rows: &[&[u8]; R],
    ) {
        acc512_loop!("acc_q4_0", out, a, rows, 18, |b| {
            // SAFETY: bytes 2..18 of the block are readable; unaligned load.
            let q = unsafe { _mm_loadu_si128(b.add(2).cast()) };
            let [lo, hi] = super::q4_0_values(q);
            [_mm512_cvtepi8_epi32(lo), _mm512_cvtepi8_epi32(hi)]
        })
    }

    /// [`super::acc_rows`] for Q8_0.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F and BW, and F16C.
    #[target_feature(enable = "avx2,f16c,avx512f,avx512bw")]
    pub(super) unsafe fn acc_q8_0<const R: usize>(
        out: &mut [f32],
        a: &[f32; R],
        rows: &[&[u8]; R],
    ) {
        acc512_loop!("acc_q8_0", out, a, rows, 34, |b| {
            // SAFETY: bytes 2..34 of the block are readable; unaligned loads.
            let (q0, q1) = unsafe {
                (
                    _mm_loadu_si128(b.add(2).cast()),
                    _mm_loadu_si128(b.add(18).cast()),
                )
            };
            [_mm512_cvtepi8_epi32(q0), _mm512_cvtepi8_epi32(q1)]
        })
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx512() -> bool {
    has_avx2()
        && std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
}

#[inline]
fn acc<B: Block32, const R: usize>(out: &mut [f32], a: &[f32; R], rows: &[&[u8]; R]) {
    #[cfg(target_arch = "x86_64")]
    if matches!(B::SIMD, Some(GgmlType::Q4_0 | GgmlType::Q8_0)) && has_avx512() {
        // SAFETY: AVX-512 F/BW and F16C support were just detected; each `rows[r]` holds the
        // blocks of `out.len() / 32` outputs (the callers' contract, asserted inside).
        unsafe {
            match B::SIMD {
                Some(GgmlType::Q4_0) => avx512::acc_q4_0::<R>(out, a, rows),
                _ => avx512::acc_q8_0::<R>(out, a, rows),
            }
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and F16C support were just detected; each `rows[r]` holds the blocks
        // of `out.len() / 32` outputs (the callers' contract, checked by the asserts inside).
        unsafe {
            match B::SIMD {
                Some(GgmlType::Q4_0) => avx2::acc_q4_0::<R>(out, a, rows),
                Some(GgmlType::Q8_0) => avx2::acc_q8_0::<R>(out, a, rows),
                _ => avx2::acc::<B, R>(out, a, rows),
            }
        }
        return;
    }
    acc_rows::<B, R>(out, a, rows)
}

/// Accumulates the non-zero-coefficient rows of `ids` into `out` with a fast decoder: four rows
/// per pass over `out`, then the remainder one by one (the same rounding as one row at a time).
fn axpy_segment_fast<B: Block32>(
    down_t: &Matrix,
    ids: &[u32],
    coef: &[f32],
    b0: usize,
    b1: usize,
    out: &mut [f32],
) {
    let rb = down_t.row_bytes();
    let row = |i: u32| {
        let i = i as usize;
        &down_t.data[i * rb + b0..i * rb + b1]
    };
    let mut pend_a = [0.0f32; 4];
    let mut pend_r: [&[u8]; 4] = [&[]; 4];
    let mut n = 0;
    for (p, (&i, &a)) in ids.iter().zip(coef).enumerate() {
        // Rows whose coefficient is zero are skipped, so never fetched (after a ReLU gate
        // that is often half of the ids).
        if let (Some(&ahead), Some(&c)) = (ids.get(p + 16), coef.get(p + 16))
            && c != 0.0
        {
            prefetch(row(ahead));
        }
        if a == 0.0 {
            continue;
        }
        pend_a[n] = a;
        pend_r[n] = row(i);
        n += 1;
        if n == 4 {
            acc::<B, 4>(out, &pend_a, &pend_r);
            n = 0;
        }
    }
    for p in 0..n {
        acc::<B, 1>(out, &[pend_a[p]], &[pend_r[p]]);
    }
}

/// Decodes whole blocks of one row segment with the fast decoders where there is one, else with
/// the kernel set's `dequantize`.
fn decode_segment(k: &TypeKernels, src: &[u8], dst: &mut [f32]) {
    fn go<B: Block32>(src: &[u8], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: AVX2 support was just detected.
            unsafe { avx2::decode::<B>(src, dst) };
            return;
        }
        decode_rows::<B>(src, dst)
    }
    match k.ty {
        GgmlType::Q4_0 => go::<BQ4_0>(src, dst),
        GgmlType::Q4_1 => go::<BQ4_1>(src, dst),
        GgmlType::Q5_0 => go::<BQ5_0>(src, dst),
        GgmlType::Q5_1 => go::<BQ5_1>(src, dst),
        GgmlType::Q8_0 => go::<BQ8_0>(src, dst),
        GgmlType::F16 => {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: AVX2 support was just detected.
                unsafe { avx2::decode_f16(src, dst) };
                return;
            }
            decode_f16_impl(src, dst)
        }
        _ => (k.dequantize)(src, dst),
    }
}

/// Accumulates `out += sum_k coef[k] * down_t[ids[k], c0..c0+out.len()]` in ascending `k`,
/// skipping zero coefficients. `c0` and `out.len()` are whole blocks (or `out` reaches the end of
/// the row). `buf` holds at least `4 * out.len()` floats (used by types without a fast decoder).
fn axpy_segment(
    k: &TypeKernels,
    down_t: &Matrix,
    ids: &[u32],
    coef: &[f32],
    c0: usize,
    out: &mut [f32],
    buf: &mut [f32],
) {
    let n = out.len();
    let rb = down_t.row_bytes();
    let bs = down_t.ty.block_size();
    let ts = down_t.ty.type_size();
    let b0 = c0 / bs * ts;
    let b1 = b0 + n.div_ceil(bs) * ts;
    match down_t.ty {
        GgmlType::Q4_0 => return axpy_segment_fast::<BQ4_0>(down_t, ids, coef, b0, b1, out),
        GgmlType::Q4_1 => return axpy_segment_fast::<BQ4_1>(down_t, ids, coef, b0, b1, out),
        GgmlType::Q5_0 => return axpy_segment_fast::<BQ5_0>(down_t, ids, coef, b0, b1, out),
        GgmlType::Q5_1 => return axpy_segment_fast::<BQ5_1>(down_t, ids, coef, b0, b1, out),
        GgmlType::Q8_0 => return axpy_segment_fast::<BQ8_0>(down_t, ids, coef, b0, b1, out),
        _ => {}
    }
    let (bufs, _) = buf.split_at_mut(4 * n);
    let mut pending = 0usize;
    let mut pend_coef = [0.0f32; 4];
    for (&i, &a) in ids.iter().zip(coef) {
        if a == 0.0 {
            continue;
        }
        let i = i as usize;
        let row = &down_t.data[i * rb..(i + 1) * rb];
        decode_segment(k, &row[b0..b1], &mut bufs[pending * n..(pending + 1) * n]);
        pend_coef[pending] = a;
        pending += 1;
        if pending == 4 {
            let (p0, rest) = bufs.split_at(n);
            let (p1, rest) = rest.split_at(n);
            let (p2, p3) = rest.split_at(n);
            axpy4(out, pend_coef, [p0, p1, p2, p3]);
            pending = 0;
        }
    }
    for p in 0..pending {
        axpy1(out, pend_coef[p], &bufs[p * n..(p + 1) * n]);
    }
}

/// Column segments `[c0, c1)` of a row of `cols` elements of `ty` for `n_seg` workers: whole
/// blocks each, as even as possible.
fn segment(ty: GgmlType, cols: usize, seg: usize, n_seg: usize) -> (usize, usize) {
    let bs = ty.block_size();
    let n_blocks = cols / bs;
    let per = n_blocks / n_seg;
    let extra = n_blocks % n_seg;
    let start = seg * per + seg.min(extra);
    let len = per + usize::from(seg < extra);
    (start * bs, (start + len) * bs)
}

/// The shared axpy: `out = sum_k coef[k] * down_t[ids[k], :]` (overwrites `out`), columns split
/// across threads.
fn axpy_compact(
    pool: &ThreadPool,
    k: &TypeKernels,
    down_t: &Matrix,
    rb: usize,
    ids: &[u32],
    coef: &[f32],
    out: &mut [f32],
) {
    out.fill(0.0);
    let cols = down_t.cols;
    if ids.is_empty() || cols == 0 {
        return;
    }
    let n_blocks = cols / down_t.ty.block_size();
    let parallel = pool.n_threads() > 1 && ids.len() * rb > INLINE_BYTES && n_blocks > 1;
    if !parallel {
        let mut buf = vec![0.0f32; 4 * cols];
        axpy_segment(k, down_t, ids, coef, 0, out, &mut buf);
        return;
    }
    let shared = SharedSlice::new(out);
    pool.run(|ti, nt| {
        let n_seg = nt.min(n_blocks);
        if ti >= n_seg {
            return;
        }
        let (c0, c1) = segment(down_t.ty, cols, ti, n_seg);
        // SAFETY: the segments of distinct thread indices are disjoint column ranges, and
        // `run` calls each thread index once.
        let part = unsafe { shared.slice_mut(c0..c1) };
        let mut buf = vec![0.0f32; 4 * (c1 - c0)];
        axpy_segment(k, down_t, ids, coef, c0, part, &mut buf);
    });
}

/// `out = sum over i in active of act[i] * down_t[i, :]` (overwrites `out`).
///
/// `down_t` is the transposed down projection (`n_ff` rows of `n_embd`: row `i` is neuron `i`'s
/// output vector), `act.len() == down_t.rows`, `out.len() == down_t.cols`. Entries of `act`
/// outside `active` are never read; active neurons whose `act` is exactly zero are skipped.
/// Each active row is dequantized with the type's kernel and accumulated in f32. The output
/// columns are split across threads and each column sums in ascending neuron order, so the
/// result does not depend on the number of threads.
pub fn sparse_axpy(
    pool: &ThreadPool,
    down_t: &Matrix,
    act: &[f32],
    active: &[u32],
    out: &mut [f32],
) -> Result<(), SparseError> {
    with_scratch(|s| sparse_axpy_with(pool, down_t, act, active, out, s))
}

/// [`sparse_axpy`] with caller-owned scratch buffers.
pub fn sparse_axpy_with(
    pool: &ThreadPool,
    down_t: &Matrix,
    act: &[f32],
    active: &[u32],
    out: &mut [f32],
    scratch: &mut SparseScratch,
) -> Result<(), SparseError> {
    const OP: &str = "sparse_axpy";
    let (rb, k) = check_matrix(OP, down_t)?;
    check_len(
        OP,
        "activation length (down_t rows, n_ff)",
        down_t.rows,
        act.len(),
    )?;
    check_len(
        OP,
        "output length (down_t cols, n_embd)",
        down_t.cols,
        out.len(),
    )?;
    check_active(OP, active, down_t.rows)?;
    scratch.vals.clear();
    scratch.vals.extend(active.iter().map(|&i| act[i as usize]));
    axpy_compact(pool, k, down_t, rb, active, &scratch.vals, out);
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Fused FFN
// ------------------------------------------------------------------------------------------

/// The sparse FFN of one token: `out = sum over i in active of h_i * down_t[i, :]` with `h_i`
/// from [`FfnKind`] (overwrites `out`).
///
/// Per active neuron: `g = dot(gate_i, x)`, `a = act(g)`, and only if `a != 0`
/// `u = dot(up_i, x)`, `h = a * u`; then the axpy of [`sparse_axpy`] over the non-zero `h`.
/// The first pass is split across threads by neuron (each `h_i` is independent), the second by
/// output column, so the result does not depend on the number of threads. Every `h_i` equals
/// what [`sparse_matvec`] on gate and up gives for that neuron, so the result is bit-identical to
/// the unfused sequence (gate and up `sparse_matvec`, activation, [`sparse_axpy`]); the fused
/// form saves the up rows of neurons whose activation is zero and one pass over the outputs.
/// From 65% active on it runs the unfused sequence instead, whose gate and up products then
/// stream every row in order (faster there; the result is the same).
pub fn sparse_ffn(
    pool: &ThreadPool,
    ffn: &SparseFfn,
    x: &[f32],
    active: &[u32],
    out: &mut [f32],
) -> Result<(), SparseError> {
    with_scratch(|s| sparse_ffn_with(pool, ffn, x, active, out, s))
}

/// [`sparse_ffn`] with caller-owned scratch buffers.
pub fn sparse_ffn_with(
    pool: &ThreadPool,
    ffn: &SparseFfn,
    x: &[f32],
    active: &[u32],
    out: &mut [f32],
    scratch: &mut SparseScratch,
) -> Result<(), SparseError> {
    const OP: &str = "sparse_ffn";
    let (up_rb, up_k) = check_matrix(OP, &ffn.up)?;
    let (down_rb, down_k) = check_matrix(OP, &ffn.down_t)?;
    let n_embd = ffn.up.cols;
    let n_ff = ffn.up.rows;
    check_len(OP, "down_t rows (up rows, n_ff)", n_ff, ffn.down_t.rows)?;
    check_len(OP, "down_t cols (up cols, n_embd)", n_embd, ffn.down_t.cols)?;
    if let Some(g) = ffn.down_grouped {
        check_len(OP, "grouped down neurons (up rows, n_ff)", n_ff, g.n_ff())?;
        check_len(
            OP,
            "grouped down outputs (up cols, n_embd)",
            n_embd,
            g.n_embd(),
        )?;
    }
    let gate = match ffn.kind {
        FfnKind::Plain(_) => None,
        FfnKind::Gated(_) | FfnKind::DRelu => {
            let g = ffn.gate.as_ref().ok_or(SparseError::ShapeMismatch {
                op: OP,
                what: "gate matrices (1 for a gated FFN kind)",
                expected: 1,
                actual: 0,
            })?;
            let (rb, k) = check_matrix(OP, g)?;
            check_len(OP, "gate rows (up rows, n_ff)", n_ff, g.rows)?;
            check_len(OP, "gate cols (up cols, n_embd)", n_embd, g.cols)?;
            Some((g, rb, k))
        }
    };
    check_len(OP, "input length (n_embd)", n_embd, x.len())?;
    check_len(OP, "output length (n_embd)", n_embd, out.len())?;
    check_active(OP, active, n_ff)?;

    if active.len() * 100 >= n_ff * DENSE_SWEEP_PERCENT {
        // Dense-ish set: the row-gather products stream every row in order (see
        // `sparse_matvec`), which beats the per-neuron pass. Same values, neuron by neuron.
        let mut g_out = std::mem::take(&mut scratch.gate_out);
        let mut u_out = std::mem::take(&mut scratch.up_out);
        g_out.resize(n_ff, 0.0);
        u_out.resize(n_ff, 0.0);
        let r = (|| {
            // Up only where the gate leaves something to multiply (the set may then be sparse
            // enough to gather rather than stream).
            let mut nz = std::mem::take(&mut scratch.nonzero);
            nz.clear();
            if let (Some((g, _, _)), true, FfnKind::Gated(_)) =
                (gate, active.len() == n_ff, ffn.kind)
            {
                // Every neuron: gate and up as one dense job (the same dot kernels and values
                // as row by row); up rows of zero gates are not worth skipping here.
                quantize(OP, &mut scratch.act, g.ty, x, n_embd, 1)?;
                let two = ffn.up.ty != g.ty;
                if two {
                    quantize(OP, &mut scratch.act2, ffn.up.ty, x, n_embd, 1)?;
                }
                let up_acts = if two { &scratch.act2 } else { &scratch.act };
                crate::matmul::matvec_quantized_many(
                    pool,
                    &mut [
                        (g, &scratch.act, &mut g_out[..n_ff]),
                        (&ffn.up, up_acts, &mut u_out[..n_ff]),
                    ],
                )
                .map_err(|source| SparseError::Cpu { op: OP, source })?;
                nz.extend_from_slice(active);
            } else if let Some((g, _, _)) = gate {
                sparse_matvec_with(pool, g, x, active, &mut g_out, scratch)?;
                nz.extend(active.iter().copied().filter(|&i| {
                    let g = g_out[i as usize];
                    match ffn.kind {
                        FfnKind::Gated(f) => f.apply(g) != 0.0,
                        _ => g > 0.0,
                    }
                }));
            } else {
                nz.extend_from_slice(active);
            }
            let full =
                active.len() == n_ff && matches!(ffn.kind, FfnKind::Gated(_)) && gate.is_some();
            let up_result = if full {
                Ok(())
            } else {
                sparse_matvec_with(pool, &ffn.up, x, &nz, &mut u_out, scratch)
            };
            scratch.nonzero = nz;
            up_result?;
            if active.len() == n_ff && ffn.kind == FfnKind::Gated(Activation::Silu) {
                // Every neuron: the activation vectorised over the whole gate output (the
                // same values as one at a time).
                crate::ops::silu_poly_inplace(&mut g_out[..n_ff]);
                if ffn.down_grouped.is_some() {
                    // Only the neurons left non-zero go to the grouped product (it skips the
                    // others anyway; this spares it walking and prefetching them).
                    let mut ids = std::mem::take(&mut scratch.nonzero);
                    gated_nonzero(
                        &g_out[..n_ff],
                        &u_out[..n_ff],
                        ffn.zero_below,
                        &mut ids,
                        &mut scratch.full,
                    );
                    let r = down_product(pool, ffn, down_k, down_rb, &ids, &scratch.full, out);
                    scratch.nonzero = ids;
                    return r;
                }
                scratch.vals.clear();
                scratch
                    .vals
                    .extend(g_out[..n_ff].iter().zip(&u_out[..n_ff]).map(|(&a, &u)| {
                        let h = if a == 0.0 { 0.0 } else { a * u };
                        apply_zero_below(h, ffn.zero_below)
                    }));
                if ffn.round_coefficients {
                    round_compact(ffn.down_type(), n_ff, active, scratch)?;
                }
                return down_product(pool, ffn, down_k, down_rb, active, &scratch.vals, out);
            }
            scratch.vals.clear();
            scratch.vals.extend(active.iter().map(|&i| {
                let (g, u) = (g_out[i as usize], u_out[i as usize]);
                let h = match ffn.kind {
                    FfnKind::Plain(f) => f.apply(u),
                    FfnKind::Gated(f) => {
                        let a = f.apply(g);
                        if a == 0.0 { 0.0 } else { a * u }
                    }
                    FfnKind::DRelu => {
                        let a = g.max(0.0);
                        if a == 0.0 { 0.0 } else { a * u.max(0.0) }
                    }
                };
                apply_zero_below(h, ffn.zero_below)
            }));
            if ffn.round_coefficients && ffn.down_grouped.is_none() {
                round_compact(ffn.down_type(), n_ff, active, scratch)?;
            }
            down_product(pool, ffn, down_k, down_rb, active, &scratch.vals, out)
        })();
        scratch.gate_out = g_out;
        scratch.up_out = u_out;
        return r;
    }
    quantize(OP, &mut scratch.act, ffn.up.ty, x, n_embd, 1)?;
    let gate_in_act2 = matches!(gate, Some((g, _, _)) if g.ty != ffn.up.ty);
    if let Some((g, _, _)) = gate
        && gate_in_act2
    {
        quantize(OP, &mut scratch.act2, g.ty, x, n_embd, 1)?;
    }
    let up_act = scratch.act.token(0).unwrap_or(&[]);
    let gate_act = if gate_in_act2 {
        scratch.act2.token(0).unwrap_or(&[])
    } else {
        up_act
    };

    let up = &ffn.up;
    let kind = ffn.kind;
    let zero_below = ffn.zero_below;
    let up_row = |i: usize| &up.data[i * up_rb..(i + 1) * up_rb];
    let up_dot = |i: usize| (up_k.vec_dot)(n_embd, up_row(i), up_act);
    fn gate_row<'a>(g: &Matrix<'a>, rb: usize, i: usize) -> &'a [u8] {
        &g.data[i * rb..(i + 1) * rb]
    }
    // `h` of one neuron from its gate pre-activation (when the kind has a gate) and its up
    // product, computed only when the gate leaves something to multiply.
    let h_from = |g: f32, u: &mut dyn FnMut() -> f32| -> f32 {
        match kind {
            FfnKind::Plain(f) => f.apply(u()),
            FfnKind::Gated(f) => {
                let a = f.apply(g);
                if a == 0.0 { 0.0 } else { a * u() }
            }
            FfnKind::DRelu => {
                let a = g.max(0.0);
                if a == 0.0 { 0.0 } else { a * u().max(0.0) }
            }
        }
    };
    // Gated kinds with a gate matrix read gate rows first; a plain FFN reads only up rows (even
    // if it was given a gate matrix).
    let gate_used = match (kind, gate) {
        (FfnKind::Plain(_), _) => None,
        (_, g) => g,
    };
    let live = |g: f32| match kind {
        FfnKind::Plain(_) => true,
        FfnKind::Gated(f) => f.apply(g) != 0.0,
        FfnKind::DRelu => g > 0.0,
    };
    // The gate products in order (their rows requested `AHEAD` neurons early); the up rows of
    // the neurons the gate leaves active are requested as soon as their gate is known and
    // multiplied `LAG` such neurons later, by then in cache. The up rows of neurons the gate
    // switches off are never read. Four neurons at a time where the types have four-row
    // kernels (the same values as one at a time); short groups repeat their last neuron (no
    // extra memory traffic: the same rows).
    const AHEAD: usize = 8;
    const LAG: usize = 8;
    const RING: usize = 32;
    // The ring holds at most `4 + LAG - 1` waiting neurons plus the 4 just pushed.
    const _: () = assert!(
        LAG + 8 <= RING,
        "the ring of pending up products would wrap"
    );
    let fill = |ids: &[u32], out: &mut [f32]| {
        debug_assert_eq!(ids.len(), out.len());
        let n = ids.len();
        // Positions in `ids` waiting for their up product; `out` holds their gate value.
        let mut ring = [0u32; RING];
        let (mut head, mut tail) = (0usize, 0usize);
        let ups = |out: &mut [f32], ring: &[u32; RING], head: &mut usize, count: usize| {
            let at = |m: usize| ring[(*head + m.min(count - 1)) % RING] as usize;
            let mut u4 = [0.0f32; 4];
            match (up_k.vec_dot4, count >= 2) {
                (Some(up4), true) => {
                    let row = |m: usize| up_row(ids[at(m)] as usize);
                    u4 = up4(n_embd, [row(0), row(1), row(2), row(3)], up_act);
                }
                _ => {
                    for (m, u) in u4.iter_mut().enumerate().take(count) {
                        *u = up_dot(ids[at(m)] as usize);
                    }
                }
            }
            for (m, &u) in u4.iter().enumerate().take(count) {
                let j = at(m);
                out[j] = apply_zero_below(h_from(out[j], &mut || u), zero_below);
            }
            *head += count;
        };
        if let Some((gm, rb, _)) = gate_used {
            for &i in ids.iter().take(AHEAD) {
                prefetch(gate_row(gm, rb, i as usize));
            }
        }
        let mut p = 0;
        while p < n {
            let q = (p + 4).min(n);
            let mut g = [0.0f32; 4];
            if let Some((gm, rb, gk)) = gate_used {
                for &i in ids.get(p + AHEAD..(q + AHEAD).min(n)).unwrap_or(&[]) {
                    prefetch(gate_row(gm, rb, i as usize));
                }
                match (gk.vec_dot4, q - p >= 2) {
                    (Some(d4), true) => {
                        let pick = |j: usize| gate_row(gm, rb, ids[(p + j).min(q - 1)] as usize);
                        g = d4(n_embd, [pick(0), pick(1), pick(2), pick(3)], gate_act);
                    }
                    _ => {
                        for (j, gv) in g.iter_mut().enumerate().take(q - p) {
                            *gv = (gk.vec_dot)(
                                n_embd,
                                gate_row(gm, rb, ids[p + j] as usize),
                                gate_act,
                            );
                        }
                    }
                }
            }
            for j in p..q {
                let gv = g[j - p];
                if live(gv) {
                    prefetch(up_row(ids[j] as usize));
                    out[j] = gv;
                    ring[tail % RING] = j as u32;
                    tail += 1;
                } else {
                    // Its value does not read `u`.
                    out[j] = apply_zero_below(h_from(gv, &mut || 0.0), zero_below);
                }
            }
            while tail - head >= 4 + LAG {
                ups(out, &ring, &mut head, 4);
            }
            p = q;
        }
        while tail > head {
            let count = (tail - head).min(4);
            ups(out, &ring, &mut head, count);
        }
    };

    scratch.vals.clear();
    scratch.vals.resize(active.len(), 0.0);
    let row_bytes = up_rb + gate.map_or(0, |(_, rb, _)| rb);
    if pool.n_threads() == 1 || active.len() * row_bytes <= INLINE_BYTES || row_bytes == 0 {
        fill(active, &mut scratch.vals);
    } else {
        let chunk = chunk_items(active.len(), row_bytes, pool.n_threads());
        let vals = SharedSlice::new(&mut scratch.vals);
        pool.for_each_chunk(active.len(), chunk, |range| {
            // SAFETY: `for_each_chunk` hands each position to exactly one thread.
            let out = unsafe { vals.slice_mut(range.clone()) };
            fill(&active[range], out);
        });
    }
    if ffn.round_coefficients && ffn.down_grouped.is_none() {
        round_compact(ffn.down_type(), n_ff, active, scratch)?;
    }
    down_product(pool, ffn, down_k, down_rb, active, &scratch.vals, out)
}

/// `out = sum_k vals[k] * (neuron active[k]'s down vector)`, from the grouped original weights
/// when the FFN has them, else from `down_t`.
fn down_product(
    pool: &ThreadPool,
    ffn: &SparseFfn,
    down_k: &TypeKernels,
    down_rb: usize,
    active: &[u32],
    vals: &[f32],
    out: &mut [f32],
) -> Result<(), SparseError> {
    match ffn.down_grouped {
        Some(g) => grouped_axpy(pool, g, active, vals, out),
        None => {
            axpy_compact(pool, down_k, &ffn.down_t, down_rb, active, vals, out);
            Ok(())
        }
    }
}

// ------------------------------------------------------------------------------------------
// Batched (prompt) path
// ------------------------------------------------------------------------------------------

/// The active sets of a chunk of tokens: their union (ascending) and a per-token bitset.
struct TokenSets {
    union: Vec<u32>,
    words: usize,
    bits: Vec<u64>,
}

impl TokenSets {
    fn new<A: AsRef<[u32]>>(
        op: &'static str,
        active: &[A],
        rows: usize,
    ) -> Result<Self, SparseError> {
        let words = rows.div_ceil(64);
        let mut bits = vec![0u64; words * active.len()];
        let mut any = vec![0u64; words];
        for (t, a) in active.iter().enumerate() {
            let a = a.as_ref();
            check_active(op, a, rows)?;
            let tb = &mut bits[t * words..(t + 1) * words];
            for &i in a {
                let (w, b) = (i as usize / 64, i % 64);
                tb[w] |= 1 << b;
                any[w] |= 1 << b;
            }
        }
        let mut union = Vec::new();
        for (w, &word) in any.iter().enumerate() {
            let mut m = word;
            while m != 0 {
                let b = m.trailing_zeros();
                union.push((w * 64) as u32 + b);
                m &= m - 1;
            }
        }
        Ok(TokenSets { union, words, bits })
    }

    #[inline]
    fn is_active(&self, t: usize, i: u32) -> bool {
        let i = i as usize;
        self.bits[t * self.words + i / 64] >> (i % 64) & 1 == 1
    }
}

/// Row-gather matrix product for a chunk of tokens: `y[t][i] = dot(w[i], x[t])` for every `i` in
/// `active[t]`, exactly `0.0` otherwise.
///
/// `x` holds `n_tokens` rows of `w.cols` floats, `y` receives `n_tokens` rows of `w.rows` floats
/// (row-major), `active.len() == n_tokens`, each set strictly increasing. The union of the
/// active sets is gathered once and each union row is read once per tile of tokens; a row is
/// dotted only with the tokens it is active for. Every output equals [`sparse_matvec`]'s for that
/// token, bit for bit.
pub fn sparse_matmul<A: AsRef<[u32]> + Sync>(
    pool: &ThreadPool,
    w: &Matrix,
    x: &[f32],
    n_tokens: usize,
    active: &[A],
    y: &mut [f32],
) -> Result<(), SparseError> {
    with_scratch(|s| sparse_matmul_with(pool, w, x, n_tokens, active, y, s))
}

/// [`sparse_matmul`] with caller-owned scratch buffers.
pub fn sparse_matmul_with<A: AsRef<[u32]> + Sync>(
    pool: &ThreadPool,
    w: &Matrix,
    x: &[f32],
    n_tokens: usize,
    active: &[A],
    y: &mut [f32],
    scratch: &mut SparseScratch,
) -> Result<(), SparseError> {
    const OP: &str = "sparse_matmul";
    let (rb, k) = check_matrix(OP, w)?;
    let n_in = w.cols.checked_mul(n_tokens).ok_or(SparseError::Cpu {
        op: OP,
        source: CpuError::Overflow,
    })?;
    let n_out = w.rows.checked_mul(n_tokens).ok_or(SparseError::Cpu {
        op: OP,
        source: CpuError::Overflow,
    })?;
    check_len(OP, "input length (n_tokens * cols)", n_in, x.len())?;
    check_len(OP, "output length (n_tokens * rows)", n_out, y.len())?;
    check_len(OP, "active sets (n_tokens)", n_tokens, active.len())?;
    let sets = TokenSets::new(OP, active, w.rows)?;
    y.fill(0.0);
    if sets.union.is_empty() || n_tokens == 0 {
        return Ok(());
    }
    quantize(OP, &mut scratch.act, w.ty, x, w.cols, n_tokens)?;
    let acts = &scratch.act;
    let rows = w.rows;
    let cols = w.cols;
    let union = &sets.union;
    // Tiles of union rows x all tokens: a row is loaded once and meets every token in turn
    // (the quantized activations of a prompt chunk are small enough to stay in L2).
    let tile_rows = (GATHER_CHUNK_BYTES / rb.max(1)).max(1);
    let out = SharedSlice::new(y);
    let work = |range: std::ops::Range<usize>| {
        for &i in &union[range] {
            let iu = i as usize;
            let row = &w.data[iu * rb..(iu + 1) * rb];
            for t in 0..n_tokens {
                if sets.is_active(t, i) {
                    let act = acts.token(t).unwrap_or(&[]);
                    let v = (k.vec_dot)(cols, row, act);
                    // SAFETY: element (t, i) is written only by the task that owns union
                    // position of `i`, and `for_each_chunk` hands each position to one thread.
                    unsafe { out.write(t * rows + iu, v) };
                }
            }
        }
    };
    if pool.n_threads() == 1 || union.len() * rb <= INLINE_BYTES {
        work(0..union.len());
    } else {
        pool.for_each_chunk(union.len(), tile_rows, work);
    }
    Ok(())
}

/// Batched [`sparse_axpy`]: `out[t] = sum over i in active[t] of act[t][i] * down_t[i, :]`
/// (overwrites `out`).
///
/// `act` holds `n_tokens` rows of `down_t.rows` floats, `out` receives `n_tokens` rows of
/// `down_t.cols` floats. Each union row segment is dequantized once per tile of tokens and added
/// to the tokens it is active for. Every output row equals [`sparse_axpy`]'s for that token, bit
/// for bit, with any number of threads.
pub fn sparse_axpy_batch<A: AsRef<[u32]> + Sync>(
    pool: &ThreadPool,
    down_t: &Matrix,
    act: &[f32],
    n_tokens: usize,
    active: &[A],
    out: &mut [f32],
) -> Result<(), SparseError> {
    const OP: &str = "sparse_axpy_batch";
    let (rb, k) = check_matrix(OP, down_t)?;
    let rows = down_t.rows;
    let cols = down_t.cols;
    let n_in = rows.checked_mul(n_tokens).ok_or(SparseError::Cpu {
        op: OP,
        source: CpuError::Overflow,
    })?;
    let n_out = cols.checked_mul(n_tokens).ok_or(SparseError::Cpu {
        op: OP,
        source: CpuError::Overflow,
    })?;
    check_len(OP, "activation length (n_tokens * n_ff)", n_in, act.len())?;
    check_len(OP, "output length (n_tokens * n_embd)", n_out, out.len())?;
    check_len(OP, "active sets (n_tokens)", n_tokens, active.len())?;
    let sets = TokenSets::new(OP, active, rows)?;
    out.fill(0.0);
    if sets.union.is_empty() || n_tokens == 0 || cols == 0 {
        return Ok(());
    }
    let n_blocks = cols / down_t.ty.block_size();
    // Column segments: at least one per thread, narrow enough that a segment of every token of
    // a token tile stays in L2.
    let n_threads = pool.n_threads();
    let n_seg = n_threads.max(1).min(n_blocks);
    let seg_cols = cols.div_ceil(n_seg);
    let tile_tokens = (AXPY_BATCH_TILE_FLOATS / seg_cols.max(1)).clamp(1, n_tokens);
    let n_token_tiles = n_tokens.div_ceil(tile_tokens);
    let n_units = n_seg * n_token_tiles;
    let union = &sets.union;
    let shared = SharedSlice::new(out);
    let unit = |u: usize| {
        let (s, tt) = (u / n_token_tiles, u % n_token_tiles);
        let (c0, c1) = segment(down_t.ty, cols, s, n_seg);
        let (t0, t1) = (tt * tile_tokens, ((tt + 1) * tile_tokens).min(n_tokens));
        let n = c1 - c0;
        if n == 0 {
            return;
        }
        let bs = down_t.ty.block_size();
        let ts = down_t.ty.type_size();
        let (b0, b1) = (c0 / bs * ts, c1 / bs * ts);
        let mut buf = vec![0.0f32; n];
        for &i in union {
            let iu = i as usize;
            let mut loaded = false;
            for t in t0..t1 {
                if !sets.is_active(t, i) {
                    continue;
                }
                let a = act[t * rows + iu];
                if a == 0.0 {
                    continue;
                }
                if !loaded {
                    let row = &down_t.data[iu * rb..(iu + 1) * rb];
                    decode_segment(k, &row[b0..b1], &mut buf);
                    loaded = true;
                }
                // SAFETY: columns c0..c1 of token t belong to exactly one work unit (segment s,
                // token tile tt), and each unit index is handed to one thread.
                let o = unsafe { shared.slice_mut(t * cols + c0..t * cols + c1) };
                axpy1(o, a, &buf);
            }
        }
    };
    if n_threads == 1 || union.len() * rb * n_tokens.min(4) <= INLINE_BYTES {
        (0..n_units).for_each(unit);
    } else {
        pool.for_each_chunk(n_units, 1, |r| r.for_each(unit));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------
// Scalar references
// ------------------------------------------------------------------------------------------

/// Plain scalar references of the sparse operators, for tests: weights dequantized with
/// `powerinfer_quant::dequantize_row`, activations unquantized, f64 accumulation. Shapes, types
/// and active sets are checked as in the fast operators; they are not meant for production use.
pub mod reference {
    use super::{FfnKind, SparseError, check_active, check_len};
    use crate::{CpuError, Matrix};

    /// Validates `w` and returns its row bytes.
    fn checked(op: &'static str, w: &Matrix) -> Result<usize, SparseError> {
        let m = Matrix::new(w.ty, w.rows, w.cols, w.data)
            .map_err(|source| SparseError::Cpu { op, source })?;
        Ok(m.row_bytes())
    }

    fn row_f32(op: &'static str, w: &Matrix, i: usize) -> Result<Vec<f32>, SparseError> {
        let rb = checked(op, w)?;
        let mut v = vec![0.0f32; w.cols];
        powerinfer_quant::dequantize_row(w.ty, &w.data[i * rb..(i + 1) * rb], &mut v).map_err(
            |_| SparseError::Cpu {
                op,
                source: CpuError::UnsupportedType(w.ty),
            },
        )?;
        Ok(v)
    }

    fn dot(op: &'static str, w: &Matrix, i: usize, x: &[f32]) -> Result<f64, SparseError> {
        Ok(row_f32(op, w, i)?
            .iter()
            .zip(x)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum())
    }

    /// Reference [`super::sparse_matvec`]: `y[i] = w[i] . x` for active `i`, else 0.
    pub fn sparse_matvec(
        w: &Matrix,
        x: &[f32],
        active: &[u32],
        y: &mut [f32],
    ) -> Result<(), SparseError> {
        const OP: &str = "reference::sparse_matvec";
        checked(OP, w)?;
        check_len(OP, "input length (matrix cols)", w.cols, x.len())?;
        check_len(OP, "output length (matrix rows)", w.rows, y.len())?;
        check_active(OP, active, w.rows)?;
        y.fill(0.0);
        for &i in active {
            y[i as usize] = dot(OP, w, i as usize, x)? as f32;
        }
        Ok(())
    }

    /// Reference [`super::sparse_axpy`]: `out = sum_{i active} act[i] * down_t[i, :]`.
    pub fn sparse_axpy(
        down_t: &Matrix,
        act: &[f32],
        active: &[u32],
        out: &mut [f32],
    ) -> Result<(), SparseError> {
        const OP: &str = "reference::sparse_axpy";
        checked(OP, down_t)?;
        check_len(
            OP,
            "activation length (down_t rows)",
            down_t.rows,
            act.len(),
        )?;
        check_len(OP, "output length (down_t cols)", down_t.cols, out.len())?;
        check_active(OP, active, down_t.rows)?;
        let mut acc = vec![0.0f64; down_t.cols];
        for &i in active {
            let a = f64::from(act[i as usize]);
            for (o, v) in acc.iter_mut().zip(row_f32(OP, down_t, i as usize)?) {
                *o += a * f64::from(v);
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            *o = a as f32;
        }
        Ok(())
    }

    /// Reference per-neuron coefficients of [`super::sparse_ffn`] (`h`, `n_ff` long, zero
    /// outside `active`).
    pub fn ffn_coefficients(
        gate: Option<&Matrix>,
        up: &Matrix,
        kind: FfnKind,
        x: &[f32],
        active: &[u32],
    ) -> Result<Vec<f32>, SparseError> {
        const OP: &str = "reference::ffn_coefficients";
        checked(OP, up)?;
        check_len(OP, "input length (up cols)", up.cols, x.len())?;
        let gate = match (kind, gate) {
            (FfnKind::Plain(_), _) => None,
            (_, Some(g)) => {
                checked(OP, g)?;
                check_len(OP, "gate rows (up rows)", up.rows, g.rows)?;
                check_len(OP, "gate cols (up cols)", up.cols, g.cols)?;
                Some(g)
            }
            (_, None) => {
                return Err(SparseError::ShapeMismatch {
                    op: OP,
                    what: "gate matrices (1 for a gated FFN kind)",
                    expected: 1,
                    actual: 0,
                });
            }
        };
        check_active(OP, active, up.rows)?;
        let mut h = vec![0.0f32; up.rows];
        for &i in active {
            let iu = i as usize;
            let u = dot(OP, up, iu, x)? as f32;
            h[iu] = match (kind, gate) {
                (FfnKind::Plain(f), _) => f.apply(u),
                (FfnKind::Gated(f), Some(g)) => f.apply(dot(OP, g, iu, x)? as f32) * u,
                (FfnKind::DRelu, Some(g)) => (dot(OP, g, iu, x)? as f32).max(0.0) * u.max(0.0),
                (_, None) => 0.0,
            };
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random bytes: every scale bit pattern (NaN, infinities, subnormals) and every quant.
    fn bytes(seed: &mut u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed >> 24) as u8
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every hand-written accumulator this CPU can run equals the scalar `acc_rows`, bit for
    /// bit, on arbitrary bytes, for one row and four rows at a time.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_accumulators_equal_the_scalar_loop() {
        fn check<B: Block32>(ty: GgmlType, seed: &mut u64) {
            type Acc4 = unsafe fn(&mut [f32], &[f32; 4], &[&[u8]; 4]);
            type Acc1 = unsafe fn(&mut [f32], &[f32; 1], &[&[u8]; 1]);
            let mut kernels: Vec<(&str, Acc1, Acc4)> = Vec::new();
            if has_avx2() {
                match ty {
                    GgmlType::Q4_0 => {
                        kernels.push(("avx2", avx2::acc_q4_0::<1>, avx2::acc_q4_0::<4>))
                    }
                    _ => kernels.push(("avx2", avx2::acc_q8_0::<1>, avx2::acc_q8_0::<4>)),
                }
            }
            if has_avx512() {
                match ty {
                    GgmlType::Q4_0 => {
                        kernels.push(("avx512", avx512::acc_q4_0::<1>, avx512::acc_q4_0::<4>))
                    }
                    _ => kernels.push(("avx512", avx512::acc_q8_0::<1>, avx512::acc_q8_0::<4>)),
                }
            }
            for nb in [1usize, 3, 8, 13] {
                let rows: Vec<Vec<u8>> = (0..4).map(|_| bytes(seed, nb * B::TS)).collect();
                let rows4: [&[u8]; 4] = std::array::from_fn(|r| &rows[r][..]);
                let a = [0.75f32, -1.5, 3.0e-3, 1.0e5];
                let start: Vec<f32> = (0..nb * 32).map(|j| j as f32 * 0.25 - 3.0).collect();
                let mut want4 = start.clone();
                acc_rows::<B, 4>(&mut want4, &a, &rows4);
                let mut want1 = start.clone();
                acc_rows::<B, 1>(&mut want1, &[a[1]], &[rows4[1]]);
                for (name, k1, k4) in &kernels {
                    let mut got = start.clone();
                    // SAFETY: the kernel's instruction sets were detected above; every row
                    // holds `nb` blocks.
                    unsafe { k4(&mut got, &a, &rows4) };
                    assert_eq!(bits(&got), bits(&want4), "{ty} {name} x4, {nb} blocks");
                    let mut got = start.clone();
                    // SAFETY: as above.
                    unsafe { k1(&mut got, &[a[1]], &[rows4[1]]) };
                    assert_eq!(bits(&got), bits(&want1), "{ty} {name} x1, {nb} blocks");
                }
            }
        }
        let mut seed = 0x5eed_u64;
        check::<BQ4_0>(GgmlType::Q4_0, &mut seed);
        check::<BQ8_0>(GgmlType::Q8_0, &mut seed);
    }
}
