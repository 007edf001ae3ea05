//! Dense quantized matrix-vector and matrix-matrix products.
//!
//! The weights are a ggml matrix ([`Matrix`]): `rows` rows of `cols` elements each, every row a
//! whole number of blocks of the weight type. As in llama.cpp, the activations are quantized once
//! per product to the weight type's "vec_dot type" (Q8_0 or Q8_1 for the 32-element formats,
//! Q8_K for the K-quants, the float type itself for F32/F16/BF16) and every output element is one
//! call of the type's `vec_dot` kernel from `powerinfer-quant`. That is what makes outputs agree
//! with llama.cpp, and it makes them independent of the number of threads and of the tiling: each
//! output element is computed by exactly one call, the same call whichever thread makes it. The
//! batched [`matmul`] therefore gives bit-for-bit the same numbers as [`matvec`] per token.
//!
//! The quantized activations live in an [`ActBuffer`], which can be reused so that the decode
//! path does not allocate: [`matvec`] and [`matmul`] use one kept per calling thread, the `_with`
//! variants take one from the caller, and the `_quantized` variants take activations already
//! quantized (for instance once for the Q, K and V projections of the same input).

use std::cell::Cell;

use powerinfer_gguf::GgmlType;
use powerinfer_quant::TypeKernels;

use crate::CpuError;
use crate::pool::{SharedSlice, ThreadPool};

/// Weight bytes per matvec chunk handed to a thread: small enough to balance two threads on a
/// 576 x 576 matrix, large enough that the shared counter is touched rarely.
const MATVEC_CHUNK_BYTES: usize = 16 * 1024;

/// Below this many weight bytes a matvec runs on the calling thread alone: waking another
/// thread costs more than it saves.
const MATVEC_INLINE_BYTES: usize = 32 * 1024;

/// Chunks per thread a large matvec is cut into (see [`matvec_quantized`]).
const MATVEC_CHUNKS_PER_THREAD: usize = 8;

/// Bytes of quantized activations per matmul tile (several tokens whose activations stay in L2
/// while the tile's weight rows stream past them).
const MATMUL_TILE_ACT_BYTES: usize = 128 * 1024;

/// Weight bytes per matmul tile (its rows stay in L1/L2 while they meet the tile's tokens).
const MATMUL_TILE_WEIGHT_BYTES: usize = 16 * 1024;

/// Tokens per multi-token kernel call in `matmul` (the kernels take 4 at a time with AVX2,
/// 8 with AVX-512 VNNI).
const GEMM_TOKENS: usize = 8;

/// Rows per call of a multi-row kernel (`powerinfer_quant::gemm::GemmRowsFn`), at least a
/// tile's rows in practice (each call prepares its tokens' data once). Each call's results go
/// to the output as one run per token: one scalar store per result stalled on the output's
/// cache misses, about 10% of a batched SmolLM2 decode.
const ROWS_CHUNK: usize = 64;

/// A ggml weight matrix borrowed from memory (usually a memory-mapped model file).
///
/// Layout: `rows` consecutive rows, each `cols` elements of `ty` (ggml `ne[0] = cols`,
/// `ne[1] = rows`), so `data.len() == rows * row_bytes(ty, cols)`.
#[derive(Debug, Clone, Copy)]
pub struct Matrix<'a> {
    /// Element type of the weights.
    pub ty: GgmlType,
    /// Number of rows (output features).
    pub rows: usize,
    /// Elements per row (input features); a multiple of `ty.block_size()`.
    pub cols: usize,
    /// The raw bytes, rows one after another.
    pub data: &'a [u8],
}

/// Bytes of `cols` elements of `ty`, with the errors a caller can act on.
fn checked_row_bytes(ty: GgmlType, cols: usize) -> Result<usize, CpuError> {
    if !cols.is_multiple_of(ty.block_size()) {
        return Err(CpuError::NotBlockAligned { ty, cols });
    }
    (cols / ty.block_size())
        .checked_mul(ty.type_size())
        .ok_or(CpuError::Overflow)
}

impl<'a> Matrix<'a> {
    /// Wraps `data` as a `rows x cols` matrix of `ty`, checking that `cols` is a whole number of
    /// blocks and that `data` has exactly the right length.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Result<Self, CpuError> {
        let rb = checked_row_bytes(ty, cols)?;
        let expected = rb.checked_mul(rows).ok_or(CpuError::Overflow)?;
        if data.len() != expected {
            return Err(CpuError::DataSize {
                expected,
                actual: data.len(),
            });
        }
        Ok(Matrix {
            ty,
            rows,
            cols,
            data,
        })
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        (self.cols / self.ty.block_size()) * self.ty.type_size()
    }

    /// The bytes of row `r`, or `None` if out of range (or the matrix is inconsistent).
    pub fn row(&self, r: usize) -> Option<&'a [u8]> {
        let rb = self.row_bytes();
        let start = r.checked_mul(rb)?;
        self.data.get(start..start.checked_add(rb)?)
    }

    /// Re-checks the invariants `new` establishes (the fields are public, so a caller may have
    /// built the struct directly).
    fn validate(&self) -> Result<usize, CpuError> {
        Matrix::new(self.ty, self.rows, self.cols, self.data).map(|m| m.row_bytes())
    }
}

/// Activations quantized for one weight type: `n_tokens` rows of `cols` elements each in the
/// weight type's vec_dot type, together with the kernel set that quantized them (and that the
/// products will use).
///
/// Reusing one buffer across calls avoids allocation once it has grown to the largest size
/// needed.
#[derive(Default)]
pub struct ActBuffer {
    kernels: Option<&'static TypeKernels>,
    cols: usize,
    n_tokens: usize,
    row_bytes: usize,
    data: Vec<u8>,
    /// What the multi-token kernels read besides `data` (`powerinfer_quant::gemm::act_scales`).
    gemm_scales: Vec<f32>,
    /// Every token in the single-token order (see [`ActBuffer::set_decode_order`]).
    decode_order: bool,
    /// How many leading tokens follow the grouped order (see
    /// [`ActBuffer::set_grouped_tokens`]).
    grouped_tokens: Option<usize>,
}

impl std::fmt::Debug for ActBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActBuffer")
            .field("weight_type", &self.weight_type())
            .field("act_type", &self.act_type())
            .field("kernels", &self.kernels.map(|k| k.name))
            .field("cols", &self.cols)
            .field("n_tokens", &self.n_tokens)
            .finish_non_exhaustive()
    }
}

impl ActBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantizes `x` (`n_tokens` rows of `cols` floats, row-major) for products with weights of
    /// type `weight_ty`, using the best kernels for this CPU ([`powerinfer_quant::kernels`]).
    pub fn quantize(
        &mut self,
        weight_ty: GgmlType,
        x: &[f32],
        cols: usize,
        n_tokens: usize,
    ) -> Result<(), CpuError> {
        let k = powerinfer_quant::kernels(weight_ty).ok_or(CpuError::UnsupportedType(weight_ty))?;
        self.quantize_with(k, x, cols, n_tokens)
    }

    /// Like [`quantize`](Self::quantize) with an explicit kernel set (for instance
    /// [`powerinfer_quant::scalar_kernels`], to run the whole product on the scalar reference).
    pub fn quantize_with(
        &mut self,
        kernels: &'static TypeKernels,
        x: &[f32],
        cols: usize,
        n_tokens: usize,
    ) -> Result<(), CpuError> {
        // The weight rows must be whole blocks too, but that is checked against the matrix.
        let rb = checked_row_bytes(kernels.act_ty, cols)?;
        let n_in = cols.checked_mul(n_tokens).ok_or(CpuError::Overflow)?;
        if x.len() != n_in {
            return Err(CpuError::ShapeMismatch {
                what: "activation input length (n_tokens * cols)",
                expected: n_in,
                actual: x.len(),
            });
        }
        let total = rb.checked_mul(n_tokens).ok_or(CpuError::Overflow)?;
        self.data.clear();
        self.data.resize(total, 0);
        if rb > 0 {
            for (src, dst) in x.chunks_exact(cols).zip(self.data.chunks_exact_mut(rb)) {
                (kernels.quantize_act)(src, dst);
            }
        }
        // Only the multi-token kernels read them, and `matmul_quantized` runs those for two
        // tokens or more: nothing to do on the decode path.
        if n_tokens > 1 {
            powerinfer_quant::gemm::act_scales(
                kernels,
                cols,
                &self.data,
                rb,
                n_tokens,
                &mut self.gemm_scales,
            );
        } else {
            self.gemm_scales.clear();
        }
        self.kernels = Some(kernels);
        self.cols = cols;
        self.n_tokens = n_tokens;
        self.row_bytes = rb;
        Ok(())
    }

    /// With `on`, [`matmul_quantized`] gives every token of this buffer exactly what
    /// [`matvec_quantized`] gives it alone, also for the types whose whole groups of 4 tokens
    /// llama.cpp sums in another order (`powerinfer_quant::gemm::grouped_for`): for rows that
    /// are independent sequences decoding together, each of which should get the logits it
    /// would get alone. Off (the default): a batch of prompt tokens follows llama.cpp's order.
    /// Kept across [`quantize`](Self::quantize) calls.
    pub fn set_decode_order(&mut self, on: bool) {
        self.decode_order = on;
    }

    /// For the types llama.cpp sums in another order for whole groups of 4 prompt tokens
    /// (`powerinfer_quant::gemm::grouped_for`): `Some(k)` makes [`matmul_quantized`] use that
    /// order for exactly the first `k` tokens (the rest as decoding does), whatever the token
    /// count; `None` (the default) for the first `n - n % 4` of `n`, as llama.cpp does for a
    /// batch. A part of a prompt computed apart then gets the bits it has inside the whole
    /// batch. [`set_decode_order`](Self::set_decode_order) takes precedence. Kept across
    /// [`quantize`](Self::quantize) calls.
    pub fn set_grouped_tokens(&mut self, k: Option<usize>) {
        self.grouped_tokens = k;
    }

    /// Whether [`matmul_quantized`] would put some of `n_tokens` tokens of this buffer in the
    /// grouped order because of [`set_grouped_tokens`](Self::set_grouped_tokens) (so a
    /// one-token product must not take the single-token path).
    pub fn forces_grouped(&self, n_tokens: usize) -> bool {
        !self.decode_order && self.grouped_tokens.is_some_and(|k| k.min(n_tokens) > 0)
    }

    /// The weight type these activations were prepared for, if any.
    pub fn weight_type(&self) -> Option<GgmlType> {
        self.kernels.map(|k| k.ty)
    }

    /// The type the activations are stored in (the weight type's vec_dot type), if any.
    pub fn act_type(&self) -> Option<GgmlType> {
        self.kernels.map(|k| k.act_ty)
    }

    /// Elements per token.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Number of tokens held.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    /// The quantized bytes of token `t`, or `None` if out of range.
    pub fn token(&self, t: usize) -> Option<&[u8]> {
        if t >= self.n_tokens {
            return None;
        }
        self.data.get(t * self.row_bytes..(t + 1) * self.row_bytes)
    }

    /// Checks that these activations fit `w` and returns the kernels to use.
    fn kernels_for(&self, w: &Matrix) -> Result<&'static TypeKernels, CpuError> {
        let k = self.kernels.ok_or(CpuError::EmptyActivations)?;
        if k.ty != w.ty {
            return Err(CpuError::WeightTypeMismatch {
                expected: w.ty,
                actual: k.ty,
            });
        }
        if self.cols != w.cols {
            return Err(CpuError::ShapeMismatch {
                what: "activation columns (matrix cols)",
                expected: w.cols,
                actual: self.cols,
            });
        }
        Ok(k)
    }
}

thread_local! {
    /// The activation buffer `matvec` and `matmul` reuse on each calling thread.
    static SCRATCH: Cell<ActBuffer> = Cell::new(ActBuffer::new());
}

/// Runs `f` with this thread's scratch buffer. The buffer is taken out for the duration, so a
/// nested use (from inside a pool job on this thread) just gets a fresh one instead of panicking.
fn with_scratch<R>(f: impl FnOnce(&mut ActBuffer) -> R) -> R {
    let mut buf = SCRATCH.with(Cell::take);
    let r = f(&mut buf);
    SCRATCH.with(|s| s.set(buf));
    r
}

fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<(), CpuError> {
    if expected != actual {
        return Err(CpuError::ShapeMismatch {
            what,
            expected,
            actual,
        });
    }
    Ok(())
}

/// `y[r] = dot(w[r], x)` for every row `r`: the decode-time product.
///
/// `x.len()` must be `w.cols` and `y.len()` must be `w.rows`. `x` is quantized once to the
/// weight type's vec_dot type (in a buffer kept per calling thread, so this does not allocate
/// after the first call with the largest shape), and rows are split across the pool's threads.
///
/// ```
/// use powerinfer_cpu::{Matrix, ThreadPool, matvec};
/// use powerinfer_gguf::GgmlType;
///
/// // A 2 x 3 F32 matrix.
/// let w: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
///     .iter()
///     .flat_map(|v| v.to_le_bytes())
///     .collect();
/// let w = Matrix::new(GgmlType::F32, 2, 3, &w)?;
/// let mut y = [0.0f32; 2];
/// matvec(&ThreadPool::new(1), &w, &[1.0, 1.0, 1.0], &mut y)?;
/// assert_eq!(y, [6.0, 15.0]);
/// # Ok::<(), powerinfer_cpu::CpuError>(())
/// ```
pub fn matvec(pool: &ThreadPool, w: &Matrix, x: &[f32], y: &mut [f32]) -> Result<(), CpuError> {
    with_scratch(|scratch| matvec_with(pool, w, x, y, scratch))
}

/// [`matvec`] with a caller-owned activation buffer.
pub fn matvec_with(
    pool: &ThreadPool,
    w: &Matrix,
    x: &[f32],
    y: &mut [f32],
    scratch: &mut ActBuffer,
) -> Result<(), CpuError> {
    w.validate()?;
    check_len("matvec input length (matrix cols)", w.cols, x.len())?;
    check_len("matvec output length (matrix rows)", w.rows, y.len())?;
    scratch.quantize(w.ty, x, w.cols, 1)?;
    matvec_quantized(pool, w, scratch, y)
}

/// [`matvec`] on activations already quantized for `w`'s type (one token).
///
/// The products use the kernel set that quantized `acts`.
pub fn matvec_quantized(
    pool: &ThreadPool,
    w: &Matrix,
    acts: &ActBuffer,
    y: &mut [f32],
) -> Result<(), CpuError> {
    let rb = w.validate()?;
    let k = acts.kernels_for(w)?;
    check_len("matvec token count", 1, acts.n_tokens)?;
    check_len("matvec output length (matrix rows)", w.rows, y.len())?;
    let act = acts.token(0).ok_or(CpuError::EmptyActivations)?;
    let total = w.data.len();
    if pool.n_threads() == 1 || total <= MATVEC_INLINE_BYTES || rb == 0 {
        dot_rows(k, w, rb, act, 0, y);
        return Ok(());
    }
    // Big matrices go in a few long contiguous runs per thread: each core then streams its
    // own part of the matrix (hardware prefetchers follow long runs; small interleaved chunks
    // measured 2 threads slower than 1 on a 25 MB matrix). Small ones keep small chunks, so
    // the threads balance.
    let chunk_bytes = MATVEC_CHUNK_BYTES.max(total / (pool.n_threads() * MATVEC_CHUNKS_PER_THREAD));
    let chunk_rows = (chunk_bytes / rb).max(1);
    let out = SharedSlice::new(y);
    pool.for_each_chunk(w.rows, chunk_rows, |range| {
        let first = range.start;
        // SAFETY: `for_each_chunk` hands out disjoint ranges, each to one thread.
        let part = unsafe { out.slice_mut(range) };
        dot_rows(k, w, rb, act, first, part);
    });
    Ok(())
}

/// Several [`matvec_quantized`] products as one pool job: `jobs[i] = (w, acts, y)` gives
/// `y = w * acts` (one token each), exactly as separate calls would, bit for bit.
///
/// For the decode step's independent products of one input (Q, K and V; gate and up): one
/// hand-off to the pool's threads instead of one per matrix, and the threads balance across
/// all the matrices' rows. Every job is checked as [`matvec_quantized`] checks it before any
/// work starts.
pub fn matvec_quantized_many(
    pool: &ThreadPool,
    jobs: &mut [(&Matrix, &ActBuffer, &mut [f32])],
) -> Result<(), CpuError> {
    // (kernels, row bytes, rows per chunk, activations) per job, all checked up front.
    let mut plan = Vec::with_capacity(jobs.len());
    let total = jobs
        .iter()
        .fold(0usize, |t, (w, _, _)| t.saturating_add(w.data.len()));
    // As in `matvec_quantized`: long contiguous runs for big products.
    let chunk_bytes = MATVEC_CHUNK_BYTES.max(total / (pool.n_threads() * MATVEC_CHUNKS_PER_THREAD));
    let mut n_chunks = 0usize;
    for (w, acts, y) in jobs.iter() {
        let rb = w.validate()?;
        let k = acts.kernels_for(w)?;
        check_len("matvec token count", 1, acts.n_tokens)?;
        check_len("matvec output length (matrix rows)", w.rows, y.len())?;
        let act = acts.token(0).ok_or(CpuError::EmptyActivations)?;
        let chunk_rows = (chunk_bytes / rb.max(1)).max(1);
        n_chunks += w.rows.div_ceil(chunk_rows);
        plan.push((k, rb, chunk_rows, act));
    }
    if pool.n_threads() == 1 || total <= MATVEC_INLINE_BYTES {
        for ((w, _, y), &(k, rb, _, act)) in jobs.iter_mut().zip(&plan) {
            dot_rows(k, w, rb, act, 0, y);
        }
        return Ok(());
    }
    let outs: Vec<(&Matrix, SharedSlice<f32>)> = jobs
        .iter_mut()
        .map(|(w, _, y)| (*w, SharedSlice::new(y)))
        .collect();
    pool.for_each_chunk(n_chunks, 1, |range| {
        for mut c in range {
            for ((w, out), &(k, rb, chunk_rows, act)) in outs.iter().zip(&plan) {
                let n = w.rows.div_ceil(chunk_rows);
                if c < n {
                    let rows = c * chunk_rows..((c + 1) * chunk_rows).min(w.rows);
                    let first = rows.start;
                    // SAFETY: chunk `c` of this job is handed to exactly one thread, and the
                    // chunks of one job cover disjoint row ranges of its output.
                    let part = unsafe { out.slice_mut(rows) };
                    dot_rows(k, w, rb, act, first, part);
                    break;
                }
                c -= n;
            }
        }
    });
    Ok(())
}

/// `y[i] = dot(w[first_row + i], acts[token])` for `i in 0..y.len()`, on the calling thread.
///
/// A building block for other schedulers (and for comparing them): [`matvec_quantized`] is this
/// over chunks of rows on the pool's threads.
pub fn matvec_rows(
    w: &Matrix,
    acts: &ActBuffer,
    token: usize,
    first_row: usize,
    y: &mut [f32],
) -> Result<(), CpuError> {
    let rb = w.validate()?;
    let k = acts.kernels_for(w)?;
    let act = acts.token(token).ok_or(CpuError::ShapeMismatch {
        what: "token index (n_tokens)",
        expected: acts.n_tokens,
        actual: token,
    })?;
    match first_row.checked_add(y.len()) {
        Some(end) if end <= w.rows => {}
        _ => {
            return Err(CpuError::ShapeMismatch {
                what: "row range end (matrix rows)",
                expected: w.rows,
                actual: first_row.saturating_add(y.len()),
            });
        }
    }
    dot_rows(k, w, rb, act, first_row, y);
    Ok(())
}

/// The inner loop: `y[i] = dot(w[first + i], act)`, four rows at a time through `vec_dot4`
/// where the type has it (the same values as `vec_dot`), the rest one by one. Callers have
/// checked every size.
#[inline]
pub(crate) fn dot_rows(
    k: &TypeKernels,
    w: &Matrix,
    rb: usize,
    act: &[u8],
    first: usize,
    y: &mut [f32],
) {
    let rows = &w.data[first * rb..(first + y.len()) * rb];
    if rb == 0 {
        y.fill(0.0);
        return;
    }
    let mut done = 0;
    if let Some(dot4) = k.vec_dot4
        && y.len() >= 8
    {
        // Four rows at a time, one from each quarter of the range: four long sequential
        // streams (four adjacent rows at a time measured 2-3x slower from memory: the
        // prefetchers lose short interleaved runs).
        let q = y.len() / 4;
        let row = |i: usize| &rows[i * rb..(i + 1) * rb];
        for i in 0..q {
            let o = dot4(
                w.cols,
                [row(i), row(q + i), row(2 * q + i), row(3 * q + i)],
                act,
            );
            for (j, v) in o.into_iter().enumerate() {
                y[j * q + i] = v;
            }
        }
        done = 4 * q;
    }
    for (yi, row) in y[done..].iter_mut().zip(rows[done * rb..].chunks_exact(rb)) {
        *yi = (k.vec_dot)(w.cols, row, act);
    }
}

/// `y[t][r] = dot(w[r], x[t])` for `n_tokens` tokens: the prompt-processing product.
///
/// `x` holds `n_tokens` rows of `w.cols` floats (row-major) and `y` receives `n_tokens` rows of
/// `w.rows` floats. Every element equals what [`matvec`] gives for that token, bit for bit.
/// All tokens are quantized once, then the work is split into tiles of several rows times
/// several tokens, so each weight row is read from memory once per tile of tokens. Where
/// `powerinfer_quant::gemm` has a multi-token kernel for the type (x86 AVX2 / AVX-512 VNNI),
/// each weight block is decoded once per group of tokens; its results are the `vec_dot` ones.
pub fn matmul(
    pool: &ThreadPool,
    w: &Matrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
) -> Result<(), CpuError> {
    with_scratch(|scratch| matmul_with(pool, w, x, n_tokens, y, scratch))
}

/// [`matmul`] with a caller-owned activation buffer.
pub fn matmul_with(
    pool: &ThreadPool,
    w: &Matrix,
    x: &[f32],
    n_tokens: usize,
    y: &mut [f32],
    scratch: &mut ActBuffer,
) -> Result<(), CpuError> {
    w.validate()?;
    let n_in = w.cols.checked_mul(n_tokens).ok_or(CpuError::Overflow)?;
    check_len("matmul input length (n_tokens * cols)", n_in, x.len())?;
    let n_out = w.rows.checked_mul(n_tokens).ok_or(CpuError::Overflow)?;
    check_len("matmul output length (n_tokens * rows)", n_out, y.len())?;
    scratch.quantize(w.ty, x, w.cols, n_tokens)?;
    matmul_quantized(pool, w, scratch, y)
}

/// [`matmul`] on activations already quantized for `w`'s type (all of `acts`'s tokens).
///
/// The products use the kernel set that quantized `acts`.
pub fn matmul_quantized(
    pool: &ThreadPool,
    w: &Matrix,
    acts: &ActBuffer,
    y: &mut [f32],
) -> Result<(), CpuError> {
    let rb = w.validate()?;
    let k = acts.kernels_for(w)?;
    let n_tokens = acts.n_tokens;
    let rows = w.rows;
    let n_out = rows.checked_mul(n_tokens).ok_or(CpuError::Overflow)?;
    check_len("matmul output length (n_tokens * rows)", n_out, y.len())?;
    if n_out == 0 {
        return Ok(());
    }
    if rb == 0 || acts.row_bytes == 0 {
        y.fill(0.0);
        return Ok(());
    }
    // Whole groups of the multi-token kernels per tile (a leftover token per tile would
    // decode every weight block once more for itself).
    let mut tile_tokens = (MATMUL_TILE_ACT_BYTES / acts.row_bytes).clamp(1, n_tokens);
    if tile_tokens > GEMM_TOKENS {
        tile_tokens -= tile_tokens % GEMM_TOKENS;
    }
    let tile_rows = (MATMUL_TILE_WEIGHT_BYTES / rb).clamp(1, rows);
    let n_token_tiles = n_tokens.div_ceil(tile_tokens);
    let n_row_tiles = rows.div_ceil(tile_rows);
    let n_tiles = n_token_tiles * n_row_tiles;
    let cols = w.cols;
    // One token: the single-row dots (the multi-token kernels would give the same bits).
    let gemm = if n_tokens > 1 {
        powerinfer_quant::gemm::gemm_for(k)
    } else {
        None
    };
    // Several rows per call where a group holds exactly the multi-row kernels' token count.
    let gemm_rows = if gemm.is_some() {
        powerinfer_quant::gemm::gemm_rows_for(k)
    } else {
        None
    };
    // llama.cpp computes some types (Q4_K) in another float order for whole groups of 4
    // tokens of a batch; its first `split` tokens follow that order here too.
    let grouped = if acts.decode_order {
        None
    } else {
        powerinfer_quant::gemm::grouped_for(k)
    };
    let split = match (grouped, acts.grouped_tokens) {
        (None, _) => 0,
        (Some(_), Some(k)) => k.min(n_tokens),
        (Some(_), None) => n_tokens - n_tokens % 4,
    };
    if grouped.is_none() && (2..=powerinfer_quant::gemm::DOT4_TOKENS).contains(&n_tokens) {
        let few = match (powerinfer_quant::gemm::dot4_tokens_for(k), gemm) {
            (Some(dot4), _) => Some(FewKernel::Dot4(dot4)),
            (None, Some(g)) => Some(FewKernel::Rows(g)),
            (None, None) => None,
        };
        if let Some(few) = few {
            few_tokens(pool, w, acts, rb, few, y);
            return Ok(());
        }
    }
    let out = SharedSlice::new(y);
    let tile = |t_idx: usize| {
        // Row-tile major: consecutive tiles share weight rows, which stay in cache.
        let (rt, tt) = (t_idx / n_token_tiles, t_idx % n_token_tiles);
        let r0 = rt * tile_rows;
        let r1 = (r0 + tile_rows).min(rows);
        let t0 = tt * tile_tokens;
        let t1 = (t0 + tile_tokens).min(n_tokens);
        let acts_tile = &acts.data[t0 * acts.row_bytes..t1 * acts.row_bytes];
        if let Some(gemm) = gemm {
            // Multi-token kernel: each weight block decoded once for a group of tokens, every
            // result bit for bit the `vec_dot` one.
            // Token groups outside, rows inside: the group's activations stay in L1 and each
            // token's outputs are written to consecutive addresses.
            let mut buf = [0f32; GEMM_TOKENS];
            // Up to `ROWS_CHUNK` rows of the multi-row kernel's results, token-major.
            let mut part = [0f32; ROWS_CHUNK * powerinfer_quant::gemm::ROWS_TOKENS];
            let mut g0 = t0;
            while g0 < t1 {
                // Groups never straddle `split`.
                let mut g1 = (g0 + GEMM_TOKENS).min(t1);
                if g0 < split {
                    g1 = g1.min(split);
                }
                let kernel = match grouped {
                    Some((g, _)) if g0 < split => g,
                    _ => gemm,
                };
                let a = &acts_tile[(g0 - t0) * acts.row_bytes..(g1 - t0) * acts.row_bytes];
                let ss = powerinfer_quant::gemm::scale_stride(cols);
                let scales = acts.gemm_scales.get(g0 * ss..).unwrap_or(&[]);
                const RT: usize = powerinfer_quant::gemm::ROWS_TOKENS;
                if let Some(rows_fn) = gemm_rows
                    && g1 - g0 <= RT
                    && g0 >= split
                {
                    let mut c0 = r0;
                    while c0 < r1 {
                        let c1 = (c0 + ROWS_CHUNK).min(r1);
                        let n = c1 - c0;
                        let wr = &w.data[c0 * rb..c1 * rb];
                        let tokens = powerinfer_quant::gemm::GemmTokens {
                            n_tokens: g1 - g0,
                            acts: a,
                            stride: acts.row_bytes,
                            scales,
                        };
                        rows_fn(cols, wr, rb, n, tokens, &mut part, ROWS_CHUNK);
                        for (t, vals) in (g0..g1).zip(part.chunks_exact(ROWS_CHUNK)) {
                            // SAFETY: elements (t, c0..c1) belong to exactly one tile, and each
                            // tile index is handed to exactly one thread by `for_each_chunk`.
                            let dst = unsafe { out.slice_mut(t * rows + c0..t * rows + c1) };
                            dst.copy_from_slice(&vals[..n]);
                        }
                        c0 = c1;
                    }
                    g0 = g1;
                    continue;
                }
                for r in r0..r1 {
                    let row = &w.data[r * rb..(r + 1) * rb];
                    let part = &mut buf[..g1 - g0];
                    kernel(cols, row, a, acts.row_bytes, scales, part);
                    for (t, &v) in (g0..g1).zip(part.iter()) {
                        // SAFETY: element (t, r) belongs to exactly one tile, and each tile
                        // index is handed to exactly one thread by `for_each_chunk`.
                        unsafe { out.write(t * rows + r, v) };
                    }
                }
                g0 = g1;
            }
            return;
        }
        for r in r0..r1 {
            let row = &w.data[r * rb..(r + 1) * rb];
            for (t, act) in (t0..t1).zip(acts_tile.chunks_exact(acts.row_bytes)) {
                let v = match grouped {
                    Some((_, dot)) if t < split => dot(cols, row, act),
                    _ => (k.vec_dot)(cols, row, act),
                };
                // SAFETY: element (t, r) belongs to exactly one tile, and each tile index is
                // handed to exactly one thread by `for_each_chunk`.
                unsafe { out.write(t * rows + r, v) };
            }
        }
    };
    pool.for_each_chunk(n_tiles, 1, |range| range.for_each(tile));
    Ok(())
}

/// The kernel of [`few_tokens`].
#[derive(Clone, Copy)]
enum FewKernel {
    /// Four rows at a time, from the four quarters of a thread's run.
    Dot4(powerinfer_quant::gemm::Dot4TokensFn),
    /// One row at a time (the multi-token kernel).
    Rows(powerinfer_quant::gemm::GemmFn),
}

/// [`matmul_quantized`] for a few tokens (a small decoding batch): the memory pattern of
/// [`matvec_quantized`] (each thread a few long runs of rows; with a four-row kernel, four rows
/// at a time from the four quarters of a run: four sequential streams), each row's blocks
/// decoded once for all the tokens. Tiles of rows handed out one by one, as the many-token path
/// does, stream at about half the rate when the product is this cheap per byte. Callers
/// checked every size.
fn few_tokens(
    pool: &ThreadPool,
    w: &Matrix,
    acts: &ActBuffer,
    rb: usize,
    kernel: FewKernel,
    y: &mut [f32],
) {
    let (rows, cols, n_tokens) = (w.rows, w.cols, acts.n_tokens);
    let k = acts.kernels.expect("checked by kernels_for");
    let tokens = powerinfer_quant::gemm::GemmTokens {
        n_tokens,
        acts: &acts.data[..n_tokens * acts.row_bytes],
        stride: acts.row_bytes,
        scales: &acts.gemm_scales,
    };
    let total = w.data.len();
    let chunk_bytes = MATVEC_CHUNK_BYTES.max(total / (pool.n_threads() * MATVEC_CHUNKS_PER_THREAD));
    let chunk_rows = (chunk_bytes / rb).max(1);
    let out = SharedSlice::new(y);
    let row = |r: usize| &w.data[r * rb..(r + 1) * rb];
    pool.for_each_chunk(rows, chunk_rows, |range| {
        let (first, len) = (range.start, range.len());
        let dot4 = match kernel {
            FewKernel::Dot4(d) => d,
            FewKernel::Rows(gemm) => {
                let mut buf = [0f32; powerinfer_quant::gemm::DOT4_TOKENS];
                for ri in range {
                    let part = &mut buf[..n_tokens];
                    gemm(
                        cols,
                        row(ri),
                        tokens.acts,
                        tokens.stride,
                        tokens.scales,
                        part,
                    );
                    for (t, &v) in part.iter().enumerate() {
                        // SAFETY: element (t, ri) lies in this thread's row range, and
                        // `for_each_chunk` hands out disjoint ranges.
                        unsafe { out.write(t * rows + ri, v) };
                    }
                }
                return;
            }
        };
        let q = if len >= 8 { len / 4 } else { 0 };
        for i in 0..q {
            let r = [
                first + i,
                first + q + i,
                first + 2 * q + i,
                first + 3 * q + i,
            ];
            let o = dot4(cols, r.map(row), tokens);
            for (t, vals) in o.iter().enumerate().take(n_tokens) {
                for (&ri, &v) in r.iter().zip(vals) {
                    // SAFETY: element (t, ri) lies in this thread's row range, and
                    // `for_each_chunk` hands out disjoint ranges.
                    unsafe { out.write(t * rows + ri, v) };
                }
            }
        }
        for ri in first + 4 * q..range.end {
            for t in 0..n_tokens {
                let act = &acts.data[t * acts.row_bytes..(t + 1) * acts.row_bytes];
                // SAFETY: as above.
                unsafe { out.write(t * rows + ri, (k.vec_dot)(cols, row(ri), act)) };
            }
        }
    });
}

#[cfg(test)]
mod matvec_many_tests {
    use super::*;

    /// xorshift64 for test data.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    }

    /// A random `rows x cols` matrix of `ty` (quantized from random floats).
    fn random(ty: GgmlType, rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
        let x: Vec<f32> = (0..rows * cols)
            .map(|_| (rng(seed) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        let rb = checked_row_bytes(ty, cols).unwrap();
        let mut out = vec![0u8; rows * rb];
        for (src, dst) in x.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
            powerinfer_quant::quantize_row(ty, src, dst).unwrap();
        }
        out
    }

    #[test]
    fn many_equals_separate_matvecs_bit_for_bit() {
        let mut seed = 0x1234_5678u64;
        let cols = 576;
        // Awkward row counts, mixed types (two activation buffers), big enough to use the pool.
        let specs = [
            (GgmlType::Q4_1, 577),
            (GgmlType::Q8_0, 193),
            (GgmlType::Q4_1, 61),
        ];
        let data: Vec<Vec<u8>> = specs
            .iter()
            .map(|&(ty, rows)| random(ty, rows, cols, &mut seed))
            .collect();
        let ws: Vec<Matrix> = specs
            .iter()
            .zip(&data)
            .map(|(&(ty, rows), d)| Matrix::new(ty, rows, cols, d).unwrap())
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|_| (rng(&mut seed) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect();
        let mut a41 = ActBuffer::new();
        a41.quantize(GgmlType::Q4_1, &x, cols, 1).unwrap();
        let mut a80 = ActBuffer::new();
        a80.quantize(GgmlType::Q8_0, &x, cols, 1).unwrap();
        let acts = [&a41, &a80, &a41];
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads);
            let mut want: Vec<Vec<f32>> = specs.iter().map(|&(_, r)| vec![0.0; r]).collect();
            for ((w, a), y) in ws.iter().zip(acts).zip(want.iter_mut()) {
                matvec_quantized(&pool, w, a, y).unwrap();
            }
            let mut got: Vec<Vec<f32>> = specs.iter().map(|&(_, r)| vec![f32::NAN; r]).collect();
            let [g0, g1, g2] = &mut got[..] else {
                unreachable!()
            };
            let mut jobs = [
                (&ws[0], acts[0], &mut g0[..]),
                (&ws[1], acts[1], &mut g1[..]),
                (&ws[2], acts[2], &mut g2[..]),
            ];
            matvec_quantized_many(&pool, &mut jobs).unwrap();
            for (g, w) in got.iter().zip(&want) {
                let gb: Vec<u32> = g.iter().map(|v| v.to_bits()).collect();
                let wb: Vec<u32> = w.iter().map(|v| v.to_bits()).collect();
                assert_eq!(gb, wb, "{threads} threads");
            }
        }
    }

    #[test]
    fn many_checks_every_job_first() {
        let mut seed = 7u64;
        let d = random(GgmlType::Q8_0, 4, 64, &mut seed);
        let w = Matrix::new(GgmlType::Q8_0, 4, 64, &d).unwrap();
        let mut a = ActBuffer::new();
        a.quantize(GgmlType::Q8_0, &[0.5; 64], 64, 1).unwrap();
        let mut wrong = ActBuffer::new();
        wrong.quantize(GgmlType::Q4_1, &[0.5; 64], 64, 1).unwrap();
        let (mut y0, mut y1) = (vec![f32::NAN; 4], vec![0.0; 3]);
        let pool = ThreadPool::new(2);
        // Wrong output length in the second job: error, and the first job untouched.
        let r = matvec_quantized_many(&pool, &mut [(&w, &a, &mut y0[..]), (&w, &a, &mut y1[..])]);
        assert!(matches!(r, Err(CpuError::ShapeMismatch { .. })), "{r:?}");
        assert!(y0.iter().all(|v| v.is_nan()));
        let mut y1 = [0.0; 4];
        let r = matvec_quantized_many(&pool, &mut [(&w, &wrong, &mut y1[..])]);
        assert!(
            matches!(r, Err(CpuError::WeightTypeMismatch { .. })),
            "{r:?}"
        );
    }
}
