//! One layer's predictor and its evaluation.

use std::borrow::Cow;

use powerinfer_cpu::{ActBuffer, CpuError, Matrix, ThreadPool, matmul_with, matvec_with};
use powerinfer_gguf::GgmlType;

/// Errors of building or evaluating a [`Predictor`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PredictorError {
    /// A weight matrix is malformed or has no CPU kernels, or an input has the wrong length.
    #[error("predictor {what}: {source}")]
    Cpu {
        /// Which part ("fc1", "fc2", "fc1 · x", "fc2 · h").
        what: &'static str,
        /// The underlying error.
        source: CpuError,
    },
    /// `fc1` and `fc2` do not fit together (`fc2.cols` must equal `fc1.rows`, the hidden size).
    #[error("predictor hidden sizes disagree: fc1 has {fc1_rows} rows, fc2 has {fc2_cols} columns")]
    HiddenMismatch {
        /// Rows of fc1 (H).
        fc1_rows: usize,
        /// Columns of fc2 (should be H).
        fc2_cols: usize,
    },
    /// The input vector has the wrong length.
    #[error("predictor input has {actual} elements, fc1 expects n_embd = {expected}")]
    InputLength {
        /// `n_embd`.
        expected: usize,
        /// Length given.
        actual: usize,
    },
}

/// A weight matrix of a predictor, borrowed (from a memory-mapped model file) or owned (trained
/// or converted in memory). Same layout as [`Matrix`]: `rows` rows of `cols` elements of `ty`.
#[derive(Debug, Clone)]
pub struct Weights<'a> {
    /// Element type.
    pub ty: GgmlType,
    /// Rows (output features).
    pub rows: usize,
    /// Elements per row (input features).
    pub cols: usize,
    /// The raw bytes, rows one after another.
    pub data: Cow<'a, [u8]>,
}

impl<'a> Weights<'a> {
    /// Borrows a checked matrix.
    pub fn borrowed(m: Matrix<'a>) -> Self {
        Weights {
            ty: m.ty,
            rows: m.rows,
            cols: m.cols,
            data: Cow::Borrowed(m.data),
        }
    }

    /// Takes ownership of `data`, checking its length against type and shape.
    pub fn owned(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Weights<'static>, CpuError> {
        Matrix::new(ty, rows, cols, &data)?;
        Ok(Weights {
            ty,
            rows,
            cols,
            data: Cow::Owned(data),
        })
    }

    /// Quantizes row-major f32 values (`rows x cols`) into an owned matrix of `ty`.
    pub fn from_f32(
        ty: GgmlType,
        rows: usize,
        cols: usize,
        values: &[f32],
    ) -> Result<Weights<'static>, CpuError> {
        let n = rows.checked_mul(cols).ok_or(CpuError::Overflow)?;
        if values.len() != n {
            return Err(CpuError::ShapeMismatch {
                what: "predictor weight values (rows * cols)",
                expected: n,
                actual: values.len(),
            });
        }
        let rb =
            powerinfer_quant::row_bytes(ty, cols).ok_or(CpuError::NotBlockAligned { ty, cols })?;
        let mut data = vec![0u8; rb.checked_mul(rows).ok_or(CpuError::Overflow)?];
        if rb > 0 {
            for (src, dst) in values.chunks_exact(cols).zip(data.chunks_exact_mut(rb)) {
                powerinfer_quant::quantize_row(ty, src, dst)
                    .map_err(|_| CpuError::UnsupportedType(ty))?;
            }
        }
        Weights::owned(ty, rows, cols, data)
    }

    /// A [`Matrix`] view (checked).
    pub fn matrix(&self) -> Result<Matrix<'_>, CpuError> {
        Matrix::new(self.ty, self.rows, self.cols, &self.data)
    }
}

/// One layer's neuron predictor: `p = fc2 · relu(fc1 · x)`.
///
/// `fc1` is `H x n_embd` (ggml shape `[n_embd, H]`), `fc2` is `n_ff x H` (ggml `[H, n_ff]`).
#[derive(Debug, Clone)]
pub struct Predictor<'a> {
    fc1: Weights<'a>,
    fc2: Weights<'a>,
}

/// Reusable buffers for [`Predictor::predict`].
#[derive(Debug, Default)]
pub struct PredictorScratch {
    act: ActBuffer,
    hidden: Vec<f32>,
    scores: Vec<f32>,
}

impl PredictorScratch {
    /// Empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The scores `p` of the last [`Predictor::predict`] / [`Predictor::scores`] call.
    pub fn scores(&self) -> &[f32] {
        &self.scores
    }
}

impl<'a> Predictor<'a> {
    /// Pairs `fc1` and `fc2`, checking both matrices and that `fc2.cols == fc1.rows`.
    pub fn new(fc1: Weights<'a>, fc2: Weights<'a>) -> Result<Self, PredictorError> {
        fc1.matrix().map_err(|source| PredictorError::Cpu {
            what: "fc1",
            source,
        })?;
        fc2.matrix().map_err(|source| PredictorError::Cpu {
            what: "fc2",
            source,
        })?;
        for (what, w) in [("fc1", &fc1), ("fc2", &fc2)] {
            if powerinfer_quant::kernels(w.ty).is_none() {
                return Err(PredictorError::Cpu {
                    what,
                    source: CpuError::UnsupportedType(w.ty),
                });
            }
        }
        if fc2.cols != fc1.rows {
            return Err(PredictorError::HiddenMismatch {
                fc1_rows: fc1.rows,
                fc2_cols: fc2.cols,
            });
        }
        Ok(Predictor { fc1, fc2 })
    }

    /// Input size (`n_embd`).
    pub fn n_embd(&self) -> usize {
        self.fc1.cols
    }

    /// Hidden size `H`.
    pub fn hidden(&self) -> usize {
        self.fc1.rows
    }

    /// Output size (`n_ff`, one score per neuron).
    pub fn n_ff(&self) -> usize {
        self.fc2.rows
    }

    /// The first layer.
    pub fn fc1(&self) -> &Weights<'a> {
        &self.fc1
    }

    /// The second layer.
    pub fn fc2(&self) -> &Weights<'a> {
        &self.fc2
    }

    /// Computes the scores `p = fc2 · relu(fc1 · x)` into `scratch` and returns them.
    ///
    /// Both products are the dense [`powerinfer_cpu::matvec`] (activations quantized to the
    /// weight type's vec_dot type, as llama.cpp does).
    pub fn scores<'s>(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        scratch: &'s mut PredictorScratch,
    ) -> Result<&'s [f32], PredictorError> {
        self.scores_batch(pool, x, 1, scratch)
    }

    /// [`scores`](Self::scores) of `n_tokens` inputs at once (`x`: `n_tokens` rows of `n_embd`;
    /// the result: `n_tokens` rows of `n_ff`). Both products are [`powerinfer_cpu::matmul`]s,
    /// each row bit-identical to the single-token scores.
    pub fn scores_batch<'s>(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        n_tokens: usize,
        scratch: &'s mut PredictorScratch,
    ) -> Result<&'s [f32], PredictorError> {
        let expected = self.n_embd() * n_tokens;
        if x.len() != expected {
            return Err(PredictorError::InputLength {
                expected,
                actual: x.len(),
            });
        }
        let fc1 = self.fc1.matrix().map_err(|source| PredictorError::Cpu {
            what: "fc1",
            source,
        })?;
        let fc2 = self.fc2.matrix().map_err(|source| PredictorError::Cpu {
            what: "fc2",
            source,
        })?;
        scratch.hidden.resize(n_tokens * fc1.rows, 0.0);
        scratch.scores.resize(n_tokens * fc2.rows, 0.0);
        // One token: the matvec's long per-thread runs (the same bits as a one-row matmul).
        let product = |w: &Matrix, x: &[f32], y: &mut [f32], act: &mut ActBuffer| {
            if n_tokens == 1 {
                matvec_with(pool, w, x, y, act)
            } else {
                matmul_with(pool, w, x, n_tokens, y, act)
            }
        };
        product(&fc1, x, &mut scratch.hidden, &mut scratch.act).map_err(|source| {
            PredictorError::Cpu {
                what: "fc1 · x",
                source,
            }
        })?;
        scratch.hidden.iter_mut().for_each(|h| *h = h.max(0.0));
        product(&fc2, &scratch.hidden, &mut scratch.scores, &mut scratch.act).map_err(
            |source| PredictorError::Cpu {
                what: "fc2 · relu(fc1 · x)",
                source,
            },
        )?;
        Ok(&scratch.scores)
    }

    /// Predicts the active neurons for input `x` (the FFN input: for llama-like models the
    /// residual stream before the FFN norm): `active_out` is cleared and filled with every `i`
    /// with `p[i] >= threshold`, ascending. A NaN score is never active. The scores stay in
    /// `scratch` ([`PredictorScratch::scores`]).
    pub fn predict(
        &self,
        pool: &ThreadPool,
        x: &[f32],
        threshold: f32,
        scratch: &mut PredictorScratch,
        active_out: &mut Vec<u32>,
    ) -> Result<(), PredictorError> {
        let scores = self.scores(pool, x, scratch)?;
        active_out.clear();
        active_out.extend(
            scores
                .iter()
                .enumerate()
                .filter(|&(_, &p)| p >= threshold)
                .map(|(i, _)| i as u32),
        );
        Ok(())
    }
}

/// Scalar reference of [`Predictor::scores`]: weights dequantized with
/// `powerinfer_quant::dequantize_row`, activations unquantized, f64 accumulation.
pub fn reference_scores(p: &Predictor, x: &[f32]) -> Result<Vec<f32>, PredictorError> {
    if x.len() != p.n_embd() {
        return Err(PredictorError::InputLength {
            expected: p.n_embd(),
            actual: x.len(),
        });
    }
    fn product(w: &Weights, x: &[f32]) -> Vec<f64> {
        let rb = powerinfer_quant::row_bytes(w.ty, w.cols).unwrap_or(0);
        let mut row = vec![0.0f32; w.cols];
        (0..w.rows)
            .map(|r| {
                let ok =
                    powerinfer_quant::dequantize_row(w.ty, &w.data[r * rb..(r + 1) * rb], &mut row);
                if ok.is_err() {
                    return f64::NAN;
                }
                row.iter()
                    .zip(x)
                    .map(|(&a, &b)| f64::from(a) * f64::from(b))
                    .sum()
            })
            .collect()
    }
    let h: Vec<f32> = product(&p.fc1, x)
        .into_iter()
        .map(|v| v.max(0.0) as f32)
        .collect();
    Ok(product(&p.fc2, &h).into_iter().map(|v| v as f32).collect())
}

/// Scalar reference of [`Predictor::predict`]: `{ i : reference p[i] >= threshold }`.
pub fn reference_predict(
    p: &Predictor,
    x: &[f32],
    threshold: f32,
) -> Result<Vec<u32>, PredictorError> {
    Ok(reference_scores(p, x)?
        .iter()
        .enumerate()
        .filter(|&(_, &s)| s >= threshold)
        .map(|(i, _)| i as u32)
        .collect())
}
