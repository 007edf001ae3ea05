//! Dense matvec/matmul against plain references, across thread counts, and error paths.

mod matmul_common;

use matmul_common::{Rng, random_weights};
use powerinfer_cpu::{
    ActBuffer, CpuError, Matrix, ThreadPool, matmul, matmul_quantized, matvec, matvec_quantized,
    matvec_rows, matvec_with,
};
use powerinfer_gguf::GgmlType;
use powerinfer_quant::{TypeKernels, kernels, scalar_kernels};

/// Every weight type the quant crate computes with.
const TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Awkward row counts.
const ROWS: &[usize] = &[1, 7, 65, 257];

/// Column counts: whole blocks, odd multiples, and odd lengths for the float types.
fn cols_for(ty: GgmlType) -> Vec<usize> {
    match ty.block_size() {
        1 => vec![1, 33, 130, 515],
        32 => vec![32, 96, 544],
        256 => vec![256, 768],
        other => panic!("unexpected block size {other}"),
    }
}

fn kernels_of(ty: GgmlType) -> &'static TypeKernels {
    kernels(ty).unwrap_or_else(|| panic!("quant has no kernels for {ty}"))
}

fn scalar_of(ty: GgmlType) -> &'static TypeKernels {
    scalar_kernels(ty).unwrap_or_else(|| panic!("quant has no scalar kernels for {ty}"))
}

/// The dequantized weights, row by row, from the scalar reference kernels.
fn dequantize(w: &Matrix) -> Vec<Vec<f32>> {
    let k = scalar_of(w.ty);
    (0..w.rows)
        .map(|r| {
            let mut row = vec![0f32; w.cols];
            (k.dequantize)(w.row(r).unwrap(), &mut row);
            row
        })
        .collect()
}

/// An upper bound on the error activation quantization to `act_ty` may add to `dot(w, x)`,
/// plus slack for f32 accumulation.
fn tolerance(act_ty: GgmlType, w: &[f32], x: &[f32]) -> f64 {
    let per_elem: Vec<f64> = match act_ty {
        GgmlType::Q8_0 | GgmlType::Q8_1 | GgmlType::Q8_K => {
            // |x - x_hat| <= d / 2 with d = amax / 127 (or / 128); allow d.
            let bs = act_ty.block_size();
            x.chunks(bs)
                .flat_map(|b| {
                    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                    std::iter::repeat_n(amax / 127.0, b.len())
                })
                .collect()
        }
        GgmlType::F16 => x.iter().map(|v| v.abs() as f64 * 2f64.powi(-10)).collect(),
        GgmlType::BF16 => x.iter().map(|v| v.abs() as f64 * 2f64.powi(-7)).collect(),
        GgmlType::F32 => vec![0.0; x.len()],
        other => panic!("unexpected activation type {other}"),
    };
    let quant: f64 = w
        .iter()
        .zip(&per_elem)
        .map(|(w, e)| w.abs() as f64 * e)
        .sum();
    let mag: f64 = w.iter().zip(x).map(|(w, x)| (w * x).abs() as f64).sum();
    quant + 1e-4 * mag + 1e-6
}

#[test]
fn matvec_matches_f64_reference_for_every_type() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng::new(0x5eed_0001);
    for &ty in TYPES {
        let act_ty = kernels_of(ty).act_ty;
        for cols in cols_for(ty) {
            for &rows in ROWS {
                let data = random_weights(ty, rows * cols, &mut rng);
                let w = Matrix::new(ty, rows, cols, &data).unwrap();
                let x = rng.activations(cols);
                let mut y = vec![f32::NAN; rows];
                matvec(&pool, &w, &x, &mut y).unwrap();
                for (r, wr) in dequantize(&w).iter().enumerate() {
                    let exact: f64 = wr.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum();
                    let tol = tolerance(act_ty, wr, &x);
                    let err = (y[r] as f64 - exact).abs();
                    assert!(
                        err <= tol,
                        "{ty} {rows}x{cols} row {r}: got {} want {exact} (err {err:e} > tol {tol:e})",
                        y[r]
                    );
                }
            }
        }
    }
}

/// The sequential reference of the threaded code: one `vec_dot` per output, in order (for the
/// types llama.cpp sums in another order for whole groups of 4 tokens, its first
/// `n_tokens - n_tokens % 4` tokens take the grouped-order dot, as `matmul` does).
fn sequential(k: &'static TypeKernels, w: &Matrix, x: &[f32], n_tokens: usize) -> Vec<f32> {
    let mut acts = ActBuffer::new();
    acts.quantize_with(k, x, w.cols, n_tokens).unwrap();
    let grouped = powerinfer_quant::gemm::grouped_for(k);
    let split = n_tokens - n_tokens % 4;
    let mut y = Vec::with_capacity(n_tokens * w.rows);
    for t in 0..n_tokens {
        let dot = match grouped {
            Some((_, g)) if t < split => g,
            _ => k.vec_dot,
        };
        for r in 0..w.rows {
            y.push(dot(w.cols, w.row(r).unwrap(), acts.token(t).unwrap()));
        }
    }
    y
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

#[test]
fn threaded_and_batched_results_are_bit_identical() {
    let pools: Vec<ThreadPool> = [1, 2, 5].into_iter().map(ThreadPool::new).collect();
    let mut rng = Rng::new(0x5eed_0002);
    for &ty in TYPES {
        // Large enough (well over the inline threshold) that several threads take part.
        let cols = 512;
        let rows = 301;
        let n_tokens = 11;
        let data = random_weights(ty, rows * cols, &mut rng);
        let w = Matrix::new(ty, rows, cols, &data).unwrap();
        let x = rng.activations(cols * n_tokens);

        for k in [kernels_of(ty), scalar_of(ty)] {
            let want = sequential(k, &w, &x, n_tokens);
            let mut acts = ActBuffer::new();
            acts.quantize_with(k, &x, cols, n_tokens).unwrap();
            for pool in &pools {
                let mut y = vec![f32::NAN; rows * n_tokens];
                matmul_quantized(pool, &w, &acts, &mut y).unwrap();
                assert_eq!(
                    bits(&y),
                    bits(&want),
                    "{ty} {} matmul, {} threads",
                    k.name,
                    pool.n_threads()
                );
            }
            let mut one = ActBuffer::new();
            for t in 0..n_tokens {
                one.quantize_with(k, &x[t * cols..(t + 1) * cols], cols, 1)
                    .unwrap();
                for pool in &pools {
                    let mut y = vec![f32::NAN; rows];
                    matvec_quantized(pool, &w, &one, &mut y).unwrap();
                    // a single token: the ordinary `vec_dot` order
                    let single = sequential(k, &w, &x[t * cols..(t + 1) * cols], 1);
                    assert_eq!(
                        bits(&y),
                        bits(&single),
                        "{ty} {} matvec token {t}, {} threads",
                        k.name,
                        pool.n_threads()
                    );
                }
            }
        }

        // The convenience entry points use the dispatched kernels and agree with the above.
        let want = sequential(kernels_of(ty), &w, &x, n_tokens);
        for pool in &pools {
            let mut y = vec![f32::NAN; rows * n_tokens];
            matmul(pool, &w, &x, n_tokens, &mut y).unwrap();
            assert_eq!(
                bits(&y),
                bits(&want),
                "{ty} matmul(), {} threads",
                pool.n_threads()
            );
            let mut y1 = vec![f32::NAN; rows];
            matvec(pool, &w, &x[..cols], &mut y1).unwrap();
            assert_eq!(
                bits(&y1),
                bits(&sequential(kernels_of(ty), &w, &x[..cols], 1)),
                "{ty} matvec(), {} threads",
                pool.n_threads()
            );
        }
    }
}

#[test]
fn matmul_of_awkward_shapes_matches_matvec() {
    let pool = ThreadPool::new(3);
    let mut rng = Rng::new(0x5eed_0003);
    for &ty in &[GgmlType::Q4_0, GgmlType::Q6_K, GgmlType::F16] {
        let cols = ty.block_size().max(32) * 3;
        for &rows in ROWS {
            for n_tokens in [1, 2, 3, 37] {
                let data = random_weights(ty, rows * cols, &mut rng);
                let w = Matrix::new(ty, rows, cols, &data).unwrap();
                let x = rng.activations(cols * n_tokens);
                let mut y = vec![f32::NAN; rows * n_tokens];
                matmul(&pool, &w, &x, n_tokens, &mut y).unwrap();
                for t in 0..n_tokens {
                    let mut yt = vec![f32::NAN; rows];
                    matvec(&pool, &w, &x[t * cols..(t + 1) * cols], &mut yt).unwrap();
                    assert_eq!(
                        bits(&y[t * rows..(t + 1) * rows]),
                        bits(&yt),
                        "{ty} {rows}x{cols} t{t}/{n_tokens}"
                    );
                }
            }
        }
    }
}

#[test]
fn matvec_rows_computes_a_row_range() {
    let mut rng = Rng::new(0x5eed_0004);
    let (rows, cols) = (40, 256);
    let data = random_weights(GgmlType::Q4_K, rows * cols, &mut rng);
    let w = Matrix::new(GgmlType::Q4_K, rows, cols, &data).unwrap();
    let x = rng.activations(cols);
    let mut full = vec![0f32; rows];
    let mut scratch = ActBuffer::new();
    matvec_with(&ThreadPool::new(1), &w, &x, &mut full, &mut scratch).unwrap();
    let mut part = vec![0f32; 9];
    matvec_rows(&w, &scratch, 0, 13, &mut part).unwrap();
    assert_eq!(bits(&part), bits(&full[13..22]));
    assert!(matches!(
        matvec_rows(&w, &scratch, 0, 35, &mut part),
        Err(CpuError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        matvec_rows(&w, &scratch, 1, 0, &mut part),
        Err(CpuError::ShapeMismatch { .. })
    ));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let pool = ThreadPool::new(2);
    let data = vec![0u8; 4 * 18];
    // Q4_0, 2 rows of 64.
    assert!(Matrix::new(GgmlType::Q4_0, 2, 64, &data).is_ok());
    assert_eq!(
        Matrix::new(GgmlType::Q4_0, 3, 64, &data).unwrap_err(),
        CpuError::DataSize {
            expected: 108,
            actual: 72
        }
    );
    assert_eq!(
        Matrix::new(GgmlType::Q4_0, 2, 40, &data).unwrap_err(),
        CpuError::NotBlockAligned {
            ty: GgmlType::Q4_0,
            cols: 40
        }
    );
    assert_eq!(
        Matrix::new(GgmlType::Q4_0, usize::MAX, 64, &data).unwrap_err(),
        CpuError::Overflow
    );

    let w = Matrix::new(GgmlType::Q4_0, 2, 64, &data).unwrap();
    let mut y = [0f32; 2];
    assert!(matches!(
        matvec(&pool, &w, &[0.0; 63], &mut y),
        Err(CpuError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        matvec(&pool, &w, &[0.0; 64], &mut y[..1]),
        Err(CpuError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        matmul(&pool, &w, &[0.0; 64 * 3], 2, &mut [0.0; 4]),
        Err(CpuError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        matmul(&pool, &w, &[0.0; 64 * 2], 2, &mut [0.0; 5]),
        Err(CpuError::ShapeMismatch { .. })
    ));

    // A struct built by hand with inconsistent fields is caught too.
    let bad = Matrix {
        ty: GgmlType::Q4_0,
        rows: 5,
        cols: 64,
        data: &data,
    };
    assert!(matches!(
        matvec(&pool, &bad, &[0.0; 64], &mut [0.0; 5]),
        Err(CpuError::DataSize { .. })
    ));

    // A type with no kernels.
    let iq = vec![0u8; GgmlType::IQ2_XXS.type_size()];
    let w_iq = Matrix::new(GgmlType::IQ2_XXS, 1, 256, &iq).unwrap();
    assert_eq!(
        matvec(&pool, &w_iq, &[0.0; 256], &mut [0.0; 1]).unwrap_err(),
        CpuError::UnsupportedType(GgmlType::IQ2_XXS)
    );

    // Activations prepared for another weight type, or for another width, or not at all.
    let mut acts = ActBuffer::new();
    assert_eq!(
        matvec_quantized(&pool, &w, &acts, &mut y).unwrap_err(),
        CpuError::EmptyActivations
    );
    acts.quantize(GgmlType::Q8_0, &[0.5; 64], 64, 1).unwrap();
    assert_eq!(
        matvec_quantized(&pool, &w, &acts, &mut y).unwrap_err(),
        CpuError::WeightTypeMismatch {
            expected: GgmlType::Q4_0,
            actual: GgmlType::Q8_0
        }
    );
    acts.quantize(GgmlType::Q4_0, &[0.5; 32], 32, 1).unwrap();
    assert!(matches!(
        matvec_quantized(&pool, &w, &acts, &mut y),
        Err(CpuError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        acts.quantize(GgmlType::Q4_0, &[0.5; 64], 32, 1),
        Err(CpuError::ShapeMismatch { .. })
    ));
    assert!(matches!(
        acts.quantize(GgmlType::Q4_0, &[0.5; 48], 48, 1),
        Err(CpuError::NotBlockAligned { .. })
    ));
    // Two tokens are not a matvec.
    acts.quantize(GgmlType::Q4_0, &[0.5; 128], 64, 2).unwrap();
    assert!(matches!(
        matvec_quantized(&pool, &w, &acts, &mut y),
        Err(CpuError::ShapeMismatch { .. })
    ));
    let mut y2 = [0f32; 4];
    matmul_quantized(&pool, &w, &acts, &mut y2).unwrap();
    assert_eq!(y2, [0.0; 4]);
}

#[test]
fn empty_shapes_are_fine() {
    let pool = ThreadPool::new(2);
    let w = Matrix::new(GgmlType::Q8_0, 0, 64, &[]).unwrap();
    matvec(&pool, &w, &[1.0; 64], &mut []).unwrap();
    let data = random_weights(GgmlType::Q8_0, 3 * 64, &mut Rng::new(5));
    let w = Matrix::new(GgmlType::Q8_0, 3, 64, &data).unwrap();
    matmul(&pool, &w, &[], 0, &mut []).unwrap();
}
