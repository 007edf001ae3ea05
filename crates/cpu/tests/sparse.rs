//! Sparse operators against their scalar references, the dense products, and themselves across
//! thread counts, for every weight type with CPU kernels.

use powerinfer_cpu::sparse::{
    Activation, FfnKind, SparseError, SparseFfn, apply_zero_below, gated_nonzero, reference,
    round_coefficients, sparse_axpy, sparse_axpy_batch, sparse_ffn, sparse_matmul, sparse_matvec,
};
use powerinfer_cpu::{Matrix, ThreadPool, matvec};
use powerinfer_gguf::GgmlType;

/// splitmix64: a tiny seeded PRNG.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        self.unit() * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.sym()).collect()
    }
    /// A random strictly increasing subset of `0..n`, each id kept with probability `p`.
    fn subset(&mut self, n: usize, p: f32) -> Vec<u32> {
        (0..n as u32).filter(|_| self.unit() < p).collect()
    }
}

/// Every weight type the CPU operators support.
fn weight_types() -> Vec<GgmlType> {
    let v: Vec<GgmlType> = GgmlType::ALL
        .iter()
        .copied()
        .filter(|&t| powerinfer_quant::kernels(t).is_some())
        .collect();
    assert!(
        v.len() >= 11,
        "expected at least 11 computable types, got {v:?}"
    );
    v
}

/// An awkward column count for `ty`: a few whole blocks, not a power of two where possible.
fn awkward_cols(ty: GgmlType, blocks: usize) -> usize {
    match ty.block_size() {
        1 => 61 * blocks,
        bs => bs * blocks,
    }
}

/// Quantizes random values into a `rows x cols` matrix of `ty`.
fn random_matrix(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = powerinfer_quant::row_bytes(ty, cols).unwrap();
    let mut data = vec![0u8; rows * rb];
    for r in 0..rows {
        let v = rng.vec(cols);
        powerinfer_quant::quantize_row(ty, &v, &mut data[r * rb..(r + 1) * rb]).unwrap();
    }
    data
}

fn dequant_row(w: &Matrix, i: usize) -> Vec<f32> {
    let rb = w.row_bytes();
    let mut v = vec![0.0; w.cols];
    powerinfer_quant::dequantize_row(w.ty, &w.data[i * rb..(i + 1) * rb], &mut v).unwrap();
    v
}

fn active_sets(rng: &mut Rng, rows: usize) -> Vec<Vec<u32>> {
    vec![
        Vec::new(),
        vec![0],
        vec![rows as u32 - 1],
        (0..rows as u32).collect(),
        rng.subset(rows, 0.1),
        rng.subset(rows, 0.5),
        // Above the share at which the products sweep every row instead of gathering.
        rng.subset(rows, 0.8),
    ]
}

/// Tolerance for a dot product whose activations were quantized to 8 bits (or f16/bf16).
fn dot_tol(w: &[f32], x: &[f32]) -> f32 {
    let mag: f32 = w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
    0.012 * mag + 1e-5
}

fn check_matvec_case(pool: &ThreadPool, rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) {
    let data = random_matrix(rng, ty, rows, cols);
    let w = Matrix::new(ty, rows, cols, &data).unwrap();
    let x = rng.vec(cols);
    let mut dense = vec![0.0; rows];
    matvec(pool, &w, &x, &mut dense).unwrap();
    for active in active_sets(rng, rows) {
        let mut y = vec![f32::NAN; rows];
        sparse_matvec(pool, &w, &x, &active, &mut y).unwrap();
        let mut want = vec![0.0; rows];
        reference::sparse_matvec(&w, &x, &active, &mut want).unwrap();
        let mut is_active = vec![false; rows];
        active.iter().for_each(|&i| is_active[i as usize] = true);
        for i in 0..rows {
            if is_active[i] {
                assert_eq!(
                    y[i].to_bits(),
                    dense[i].to_bits(),
                    "{ty} {rows}x{cols} row {i}: sparse differs from dense"
                );
                let tol = dot_tol(&dequant_row(&w, i), &x);
                assert!(
                    (y[i] - want[i]).abs() <= tol,
                    "{ty} {rows}x{cols} row {i}: {} vs reference {} (tol {tol})",
                    y[i],
                    want[i]
                );
            } else {
                assert_eq!(y[i].to_bits(), 0, "{ty} row {i} inactive but {}", y[i]);
            }
        }
    }
}

#[test]
fn sparse_matvec_matches_reference_and_dense_for_every_type() {
    let mut rng = Rng(1);
    let pool1 = ThreadPool::new(1);
    let pool3 = ThreadPool::new(3);
    for ty in weight_types() {
        // Small and awkward (runs inline) and large enough for the threaded path.
        check_matvec_case(&pool1, &mut rng, ty, 37, awkward_cols(ty, 3));
        let blocks = if ty.block_size() == 256 { 4 } else { 20 };
        check_matvec_case(&pool3, &mut rng, ty, 203, awkward_cols(ty, blocks));
    }
}

fn check_axpy_case(pool: &ThreadPool, rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) {
    let data = random_matrix(rng, ty, rows, cols);
    let w = Matrix::new(ty, rows, cols, &data).unwrap();
    // Some exact zeros among the coefficients (they are skipped) and NaN where inactive (never read).
    let mut act: Vec<f32> = (0..rows)
        .map(|_| if rng.unit() < 0.2 { 0.0 } else { rng.sym() })
        .collect();
    for active in active_sets(rng, rows) {
        let mut a = act.clone();
        let mut is_active = vec![false; rows];
        active.iter().for_each(|&i| is_active[i as usize] = true);
        for (i, v) in a.iter_mut().enumerate() {
            if !is_active[i] {
                *v = f32::NAN;
            }
        }
        let mut out = vec![f32::NAN; cols];
        sparse_axpy(pool, &w, &a, &active, &mut out).unwrap();
        let mut want = vec![0.0; cols];
        reference::sparse_axpy(&w, &act, &active, &mut want).unwrap();
        let mut mag = vec![0.0f32; cols];
        for &i in &active {
            let row = dequant_row(&w, i as usize);
            for (m, r) in mag.iter_mut().zip(&row) {
                *m += (act[i as usize] * r).abs();
            }
        }
        for j in 0..cols {
            let tol = 1e-5 * mag[j] + 1e-6;
            assert!(
                (out[j] - want[j]).abs() <= tol,
                "{ty} {rows}x{cols} col {j}: {} vs reference {} (tol {tol}, {} active)",
                out[j],
                want[j],
                active.len()
            );
        }
    }
    act.clear();
}

#[test]
fn sparse_axpy_matches_reference_for_every_type() {
    let mut rng = Rng(2);
    let pool1 = ThreadPool::new(1);
    let pool3 = ThreadPool::new(3);
    for ty in weight_types() {
        check_axpy_case(&pool1, &mut rng, ty, 41, awkward_cols(ty, 3));
        let blocks = if ty.block_size() == 256 { 5 } else { 23 };
        check_axpy_case(&pool3, &mut rng, ty, 157, awkward_cols(ty, blocks));
    }
}

/// Every operator gives bit-identical results with 1, 2, 3 and 16 threads, and run after run.
#[test]
fn results_do_not_depend_on_thread_count() {
    let mut rng = Rng(3);
    let pools: Vec<ThreadPool> = [1, 2, 3, 16].into_iter().map(ThreadPool::new).collect();
    for ty in [
        GgmlType::Q4_0,
        GgmlType::F16,
        GgmlType::Q4_K,
        GgmlType::Q5_1,
        GgmlType::F32,
    ] {
        let (n_ff, n_embd) = (
            301,
            awkward_cols(ty, if ty.block_size() == 256 { 3 } else { 24 }),
        );
        let gate_d = random_matrix(&mut rng, ty, n_ff, n_embd);
        let up_d = random_matrix(&mut rng, ty, n_ff, n_embd);
        let down_d = random_matrix(&mut rng, ty, n_ff, n_embd);
        let gate = Matrix::new(ty, n_ff, n_embd, &gate_d).unwrap();
        let up = Matrix::new(ty, n_ff, n_embd, &up_d).unwrap();
        let down_t = Matrix::new(ty, n_ff, n_embd, &down_d).unwrap();
        let ffn = SparseFfn {
            gate: Some(gate),
            up,
            down_t,
            kind: FfnKind::Gated(Activation::Relu),
            round_coefficients: false,
            zero_below: 0.0,
            down_grouped: None,
        };
        let n_tok = 5;
        let x = rng.vec(n_embd * n_tok);
        let act = rng.vec(n_ff * n_tok);
        // Dense-ish sets (every row streamed) and sparse ones (rows gathered, four at a time).
        for share in [0.6, 0.25] {
            let sets: Vec<Vec<u32>> = (0..n_tok).map(|_| rng.subset(n_ff, share)).collect();
            let run = |pool: &ThreadPool| {
                let mut y = vec![0.0; n_ff];
                sparse_matvec(pool, &gate, &x[..n_embd], &sets[0], &mut y).unwrap();
                let mut o = vec![0.0; n_embd];
                sparse_axpy(pool, &down_t, &act[..n_ff], &sets[0], &mut o).unwrap();
                let mut f = vec![0.0; n_embd];
                sparse_ffn(pool, &ffn, &x[..n_embd], &sets[0], &mut f).unwrap();
                let mut ym = vec![0.0; n_ff * n_tok];
                sparse_matmul(pool, &gate, &x, n_tok, &sets, &mut ym).unwrap();
                let mut ob = vec![0.0; n_embd * n_tok];
                sparse_axpy_batch(pool, &down_t, &act, n_tok, &sets, &mut ob).unwrap();
                [y, o, f, ym, ob].map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>())
            };
            let first = run(&pools[0]);
            for pool in &pools {
                for _ in 0..3 {
                    assert_eq!(
                        run(pool),
                        first,
                        "{ty} at {share}: {} threads differ",
                        pool.n_threads()
                    );
                }
            }
        }
    }
}

#[test]
fn fused_ffn_equals_unfused_and_reference() {
    let mut rng = Rng(4);
    let pool = ThreadPool::new(3);
    let kinds = [
        FfnKind::Gated(Activation::Relu),
        FfnKind::Gated(Activation::Silu),
        FfnKind::Gated(Activation::Gelu),
        FfnKind::DRelu,
        FfnKind::Plain(Activation::Relu),
    ];
    for ty in weight_types() {
        // Mixed types as in Q4_K_M files: up in another type than gate and down_t.
        let up_ty = if ty == GgmlType::Q4_K {
            GgmlType::Q6_K
        } else {
            ty
        };
        // Enough neurons that a 15% set is split across the threads (over 32 KiB of rows).
        let n_ff = 1201;
        let n_embd = awkward_cols(ty, if ty.block_size() == 256 { 2 } else { 9 });
        let gd = random_matrix(&mut rng, ty, n_ff, n_embd);
        let ud = random_matrix(&mut rng, up_ty, n_ff, n_embd);
        let dd = random_matrix(&mut rng, ty, n_ff, n_embd);
        let gate = Matrix::new(ty, n_ff, n_embd, &gd).unwrap();
        let up = Matrix::new(up_ty, n_ff, n_embd, &ud).unwrap();
        let down_t = Matrix::new(ty, n_ff, n_embd, &dd).unwrap();
        let x = rng.vec(n_embd);
        for kind in kinds {
            let ffn = SparseFfn {
                gate: Some(gate),
                up,
                down_t,
                kind,
                round_coefficients: false,
                zero_below: 0.0,
                down_grouped: None,
            };
            for active in [
                rng.subset(n_ff, 0.8),
                rng.subset(n_ff, 0.4),
                rng.subset(n_ff, 0.3),
                rng.subset(n_ff, 0.15),
                rng.subset(n_ff, 0.01),
                (0..n_ff as u32).collect(),
            ] {
                let mut out = vec![f32::NAN; n_embd];
                sparse_ffn(&pool, &ffn, &x, &active, &mut out).unwrap();

                // Unfused: gate and up row-gather products, activation, axpy.
                let mut g = vec![0.0; n_ff];
                let mut u = vec![0.0; n_ff];
                sparse_matvec(&pool, &gate, &x, &active, &mut g).unwrap();
                sparse_matvec(&pool, &up, &x, &active, &mut u).unwrap();
                let h: Vec<f32> = g
                    .iter()
                    .zip(&u)
                    .map(|(&g, &u)| match kind {
                        FfnKind::Gated(f) => {
                            let a = f.apply(g);
                            if a == 0.0 { 0.0 } else { a * u }
                        }
                        FfnKind::DRelu => {
                            if g > 0.0 {
                                g * u.max(0.0)
                            } else {
                                0.0
                            }
                        }
                        FfnKind::Plain(f) => f.apply(u),
                    })
                    .collect();
                let mut want = vec![0.0; n_embd];
                sparse_axpy(&pool, &down_t, &h, &active, &mut want).unwrap();
                assert_eq!(
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{ty}/{up_ty} {kind:?}: fused differs from unfused"
                );

                // With rounded coefficients: the same as rounding h (inactive entries 0) by
                // hand, then the axpy.
                let rounded = SparseFfn {
                    round_coefficients: true,
                    zero_below: 0.0,
                    down_grouped: None,
                    ..ffn
                };
                let mut out_r = vec![f32::NAN; n_embd];
                sparse_ffn(&pool, &rounded, &x, &active, &mut out_r).unwrap();
                let mut hr = vec![0.0; n_ff];
                for &i in &active {
                    hr[i as usize] = h[i as usize];
                }
                round_coefficients(ty, &mut hr, &mut Vec::new()).unwrap();
                let mut want_r = vec![0.0; n_embd];
                sparse_axpy(&pool, &down_t, &hr, &active, &mut want_r).unwrap();
                assert_eq!(
                    out_r.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want_r.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{ty}/{up_ty} {kind:?}: fused with rounding differs"
                );

                // With a runtime activity threshold: coefficients with |h| at or below it count
                // as zero (here the median |h| of the active set, so about half are dropped).
                let mut mags: Vec<f32> = active.iter().map(|&i| h[i as usize].abs()).collect();
                mags.sort_by(f32::total_cmp);
                let zb = mags[mags.len() / 2];
                let thresholded = SparseFfn {
                    zero_below: zb,
                    ..ffn
                };
                let mut out_z = vec![f32::NAN; n_embd];
                sparse_ffn(&pool, &thresholded, &x, &active, &mut out_z).unwrap();
                let hz: Vec<f32> = h
                    .iter()
                    .map(|&v| if v.abs() <= zb { 0.0 } else { v })
                    .collect();
                assert!(hz.iter().any(|&v| v != 0.0) || zb == 0.0);
                let mut want_z = vec![0.0; n_embd];
                sparse_axpy(&pool, &down_t, &hz, &active, &mut want_z).unwrap();
                assert_eq!(
                    out_z.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want_z.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{ty}/{up_ty} {kind:?}: fused with zero_below {zb} differs"
                );

                // Scalar reference: coefficients then axpy in f64.
                let href =
                    reference::ffn_coefficients(Some(&gate), &up, kind, &x, &active).unwrap();
                let mut r = vec![0.0; n_embd];
                reference::sparse_axpy(&down_t, &href, &active, &mut r).unwrap();
                // The products quantize `x` to 8 bits (per the weight type's activation
                // format) and the reference does not: with up to ~960 of 1201 neurons summed,
                // up to about 9% of the mean magnitude (Q4_K, DRelu, whose two rounded
                // products multiply). The bit-exact comparisons above are the sharp checks.
                let scale: f32 = r.iter().map(|v| v.abs()).sum::<f32>() / n_embd as f32;
                for j in 0..n_embd {
                    assert!(
                        (out[j] - r[j]).abs() <= 0.12 * scale + 1e-4,
                        "{ty} {kind:?} col {j}: {} vs reference {} (mean |ref| {scale})",
                        out[j],
                        r[j]
                    );
                }
            }
        }
    }
}

#[test]
fn batched_path_equals_per_token_path() {
    let mut rng = Rng(5);
    let pool = ThreadPool::new(3);
    for ty in weight_types() {
        let rows = 211;
        let cols = awkward_cols(ty, if ty.block_size() == 256 { 3 } else { 13 });
        let wd = random_matrix(&mut rng, ty, rows, cols);
        let w = Matrix::new(ty, rows, cols, &wd).unwrap();
        let n_tok = 7;
        let x = rng.vec(cols * n_tok);
        let act = rng.vec(rows * n_tok);
        let mut sets: Vec<Vec<u32>> = (0..n_tok).map(|_| rng.subset(rows, 0.3)).collect();
        // Token 5 has nothing active; tokens 0 and 1 have disjoint sets.
        sets[5].clear();
        sets[0] = (0..rows as u32).filter(|i| i.is_multiple_of(2)).collect();
        sets[1] = (0..rows as u32).filter(|i| !i.is_multiple_of(2)).collect();
        let mut y = vec![f32::NAN; rows * n_tok];
        sparse_matmul(&pool, &w, &x, n_tok, &sets, &mut y).unwrap();
        let mut o = vec![f32::NAN; cols * n_tok];
        sparse_axpy_batch(&pool, &w, &act, n_tok, &sets, &mut o).unwrap();
        for t in 0..n_tok {
            let mut yt = vec![0.0; rows];
            sparse_matvec(&pool, &w, &x[t * cols..(t + 1) * cols], &sets[t], &mut yt).unwrap();
            let got = &y[t * rows..(t + 1) * rows];
            for i in 0..rows {
                assert_eq!(got[i].to_bits(), yt[i].to_bits(), "{ty} token {t} row {i}");
                if !sets[t].contains(&(i as u32)) {
                    assert_eq!(
                        got[i].to_bits(),
                        0,
                        "{ty} token {t} row {i} must be exactly 0"
                    );
                }
            }
            let mut ot = vec![0.0; cols];
            sparse_axpy(&pool, &w, &act[t * rows..(t + 1) * rows], &sets[t], &mut ot).unwrap();
            let got = &o[t * cols..(t + 1) * cols];
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                ot.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{ty} token {t}: batched axpy differs from single-token axpy"
            );
        }
        assert!(o[5 * cols..6 * cols].iter().all(|v| v.to_bits() == 0));
    }
}

#[test]
fn bad_inputs_are_typed_errors() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng(6);
    let data = random_matrix(&mut rng, GgmlType::Q4_0, 10, 64);
    let w = Matrix::new(GgmlType::Q4_0, 10, 64, &data).unwrap();
    let x = vec![0.5; 64];
    let mut y = vec![0.0; 10];
    assert!(matches!(
        sparse_matvec(&pool, &w, &x, &[3, 2], &mut y),
        Err(SparseError::NotSorted {
            pos: 1,
            prev: 3,
            id: 2,
            ..
        })
    ));
    assert!(matches!(
        sparse_matvec(&pool, &w, &x, &[2, 2], &mut y),
        Err(SparseError::NotSorted { .. })
    ));
    assert!(matches!(
        sparse_matvec(&pool, &w, &x, &[1, 10], &mut y),
        Err(SparseError::NeuronOutOfRange {
            pos: 1,
            id: 10,
            rows: 10,
            ..
        })
    ));
    assert!(matches!(
        sparse_matvec(&pool, &w, &x[..32], &[1], &mut y),
        Err(SparseError::ShapeMismatch {
            expected: 64,
            actual: 32,
            ..
        })
    ));
    let mut out = vec![0.0; 64];
    assert!(matches!(
        sparse_axpy(&pool, &w, &[1.0; 9], &[1], &mut out),
        Err(SparseError::ShapeMismatch {
            expected: 10,
            actual: 9,
            ..
        })
    ));
    assert!(matches!(
        sparse_axpy(&pool, &w, &[1.0; 10], &[1], &mut out[..63]),
        Err(SparseError::ShapeMismatch { .. })
    ));
    // A matrix whose fields were filled in by hand with a short buffer.
    let bad = Matrix {
        ty: GgmlType::Q4_0,
        rows: 10,
        cols: 64,
        data: &data[..data.len() - 1],
    };
    assert!(matches!(
        sparse_axpy(&pool, &bad, &[1.0; 10], &[1], &mut out),
        Err(SparseError::Cpu { .. })
    ));
    // A readable but not computable type.
    let iq = vec![0u8; 66 * 2];
    let iq = Matrix::new(GgmlType::IQ2_XXS, 2, 256, &iq).unwrap();
    let err = sparse_matvec(&pool, &iq, &[0.0; 256], &[0], &mut [0.0; 2]).unwrap_err();
    assert!(err.to_string().contains("IQ2_XXS"), "{err}");
    // A gated FFN without its gate.
    let ffn = SparseFfn {
        gate: None,
        up: w,
        down_t: w,
        kind: FfnKind::DRelu,
        round_coefficients: false,
        zero_below: 0.0,
        down_grouped: None,
    };
    assert!(matches!(
        sparse_ffn(&pool, &ffn, &x, &[1], &mut out),
        Err(SparseError::ShapeMismatch { .. })
    ));
    // Batched: one active set per token.
    let mut yb = vec![0.0; 20];
    assert!(matches!(
        sparse_matmul(&pool, &w, &[0.0; 128], 2, &[vec![1u32]], &mut yb),
        Err(SparseError::ShapeMismatch {
            expected: 2,
            actual: 1,
            ..
        })
    ));
    assert!(matches!(
        sparse_axpy_batch(
            &pool,
            &w,
            &[0.0; 20],
            2,
            &[vec![1u32], vec![4, 3]],
            &mut [0.0; 128]
        ),
        Err(SparseError::NotSorted { .. })
    ));
}

/// The axpy decodes weights itself for its fastest paths; on arbitrary bytes (any scale,
/// infinities, NaNs, subnormals, every f16 bit pattern) it must produce exactly the reference
/// dequantization.
#[test]
fn axpy_decoding_is_exact_on_arbitrary_bytes() {
    let mut rng = Rng(7);
    let pool = ThreadPool::new(1);
    for ty in weight_types() {
        let cols = awkward_cols(ty, 8).max(if ty == GgmlType::F16 { 65536 } else { 0 });
        let rb = powerinfer_quant::row_bytes(ty, cols).unwrap();
        let mut data: Vec<u8> = (0..2 * rb).map(|_| rng.next_u64() as u8).collect();
        if ty == GgmlType::F16 {
            for (i, c) in data[..rb].chunks_exact_mut(2).enumerate() {
                c.copy_from_slice(&(i as u16).to_le_bytes());
            }
        }
        let w = Matrix::new(ty, 2, cols, &data).unwrap();
        let want = dequant_row(&w, 0);
        let mut out = vec![0.0; cols];
        sparse_axpy(&pool, &w, &[1.0, 0.0], &[0, 1], &mut out).unwrap();
        for j in 0..cols {
            let expect = 0.0f32 + want[j];
            assert!(
                out[j].to_bits() == expect.to_bits() || (out[j].is_nan() && expect.is_nan()),
                "{ty} element {j}: {} vs {}",
                out[j],
                expect
            );
        }
    }
}

/// `round_coefficients` equals quantizing to the weight type's activation type and back with
/// the reference (de)quantizers, leaves a partial block's tail exact, and f32 untouched.
#[test]
fn coefficient_rounding_matches_quantize_dequantize() {
    let mut rng = Rng(11);
    for (ty, act) in [
        (GgmlType::Q4_0, GgmlType::Q8_0),
        (GgmlType::Q8_0, GgmlType::Q8_0),
        (GgmlType::F16, GgmlType::F16),
        (GgmlType::Q4_K, GgmlType::Q8_K),
        (GgmlType::Q4_1, GgmlType::Q8_1),
    ] {
        let bs = act.block_size();
        let n = 3 * bs + 7;
        let h = rng.vec(n);
        let mut got = h.clone();
        round_coefficients(ty, &mut got, &mut Vec::new()).unwrap();
        let whole = n / bs * bs;
        let mut q = vec![0u8; whole / bs * act.type_size()];
        powerinfer_quant::quantize_row(act, &h[..whole], &mut q).unwrap();
        let mut want = vec![0.0; whole];
        powerinfer_quant::dequantize_row(act, &q, &mut want).unwrap();
        for i in 0..whole {
            assert!(
                (got[i] - want[i]).abs() <= 1e-6 * want[i].abs().max(1.0),
                "{ty}: {i}: {} vs {}",
                got[i],
                want[i]
            );
        }
        assert_eq!(&got[whole..], &h[whole..], "{ty}: tail changed");
        assert_ne!(&got[..whole], &h[..whole], "{ty}: nothing rounded");
    }
    let h = rng.vec(64);
    let mut got = h.clone();
    round_coefficients(GgmlType::F32, &mut got, &mut Vec::new()).unwrap();
    assert_eq!(got, h);
}

/// The axpy equals, bit for bit, the plain sequential f32 loop over the dequantized rows
/// (`out[j] = out[j] + h_i * w_i[j]`, neurons ascending), for the formats with hand-written
/// SIMD accumulators and the compiler-vectorized ones, with 1 and 3 threads.
#[test]
fn axpy_equals_sequential_f32_loop() {
    let mut rng = Rng(21);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q8_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::F16,
    ] {
        let (n_ff, n_embd) = (97, awkward_cols(ty, 13));
        let d = random_matrix(&mut rng, ty, n_ff, n_embd);
        let w = Matrix::new(ty, n_ff, n_embd, &d).unwrap();
        let h = rng.vec(n_ff);
        let active = rng.subset(n_ff, 0.5);
        let mut want = vec![0.0f32; n_embd];
        let mut row = vec![0.0f32; n_embd];
        for &i in &active {
            let i = i as usize;
            let rb = d.len() / n_ff;
            powerinfer_quant::dequantize_row(ty, &d[i * rb..(i + 1) * rb], &mut row).unwrap();
            for (o, &x) in want.iter_mut().zip(&row) {
                *o += h[i] * x;
            }
        }
        for threads in [1, 3] {
            let mut got = vec![f32::NAN; n_embd];
            sparse_axpy(&ThreadPool::new(threads), &w, &h, &active, &mut got).unwrap();
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{ty}, {threads} threads"
            );
        }
    }
}

#[test]
fn fused_ffn_with_grouped_down_equals_grouped_axpy() {
    use powerinfer_cpu::grouped::{GroupedDown, grouped_axpy};
    let mut rng = Rng(21);
    let pool = ThreadPool::new(2);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
        let (n_ff, n_embd) = (224, 96);
        let gd = random_matrix(&mut rng, ty, n_ff, n_embd);
        let ud = random_matrix(&mut rng, ty, n_ff, n_embd);
        let dd = random_matrix(&mut rng, ty, n_ff, n_embd);
        let down_orig = random_matrix(&mut rng, ty, n_embd, n_ff);
        let gate = Matrix::new(ty, n_ff, n_embd, &gd).unwrap();
        let up = Matrix::new(ty, n_ff, n_embd, &ud).unwrap();
        let down_t = Matrix::new(ty, n_ff, n_embd, &dd).unwrap();
        let grouped =
            GroupedDown::from_down(&Matrix::new(ty, n_embd, n_ff, &down_orig).unwrap()).unwrap();
        let x = rng.vec(n_embd);
        for (round, zero_below) in [(false, 0.0), (true, 0.0), (true, 0.05)] {
            let ffn = SparseFfn {
                gate: Some(gate),
                up,
                down_t,
                kind: FfnKind::Gated(Activation::Silu),
                round_coefficients: round,
                zero_below,
                down_grouped: Some(&grouped),
            };
            for active in [rng.subset(n_ff, 0.3), (0..n_ff as u32).collect()] {
                let mut out = vec![f32::NAN; n_embd];
                sparse_ffn(&pool, &ffn, &x, &active, &mut out).unwrap();
                let mut g = vec![0.0; n_ff];
                let mut u = vec![0.0; n_ff];
                sparse_matvec(&pool, &gate, &x, &active, &mut g).unwrap();
                sparse_matvec(&pool, &up, &x, &active, &mut u).unwrap();
                let mut h = vec![0.0f32; n_ff];
                for &i in &active {
                    let i = i as usize;
                    let a = Activation::Silu.apply(g[i]);
                    let v = if a == 0.0 { 0.0 } else { a * u[i] };
                    h[i] = if v.abs() <= zero_below { 0.0 } else { v };
                }
                // (The grouped product rounds the coefficients itself, whatever `round` says.)
                let coef: Vec<f32> = active.iter().map(|&i| h[i as usize]).collect();
                let mut want = vec![0.0; n_embd];
                grouped_axpy(&pool, &grouped, &active, &coef, &mut want).unwrap();
                assert_eq!(
                    out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{ty} round {round} zero_below {zero_below}, {} active",
                    active.len()
                );
            }
        }
    }
}

/// `gated_nonzero` (SIMD blocks and scalar tail) against a plain loop, bit for bit, on awkward
/// lengths with zeros of both signs, NaN, infinities and values around the threshold.
#[test]
fn gated_nonzero_matches_a_plain_loop() {
    let mut rng = Rng(0x5eed_2e80);
    let specials = [
        0.0f32,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        -f32::INFINITY,
        1e-30,
        0.3,
        -0.3,
    ];
    let (mut ids, mut vals) = (Vec::new(), Vec::new());
    for n in [0usize, 1, 15, 16, 17, 31, 33, 100, 1543] {
        for zero_below in [0.0f32, 0.3, 0.05] {
            let pick = |rng: &mut Rng| {
                let r = rng.unit();
                if r < 0.1 {
                    specials[(rng.next_u64() % specials.len() as u64) as usize]
                } else if r < 0.3 {
                    0.0
                } else {
                    rng.sym()
                }
            };
            let act: Vec<f32> = (0..n).map(|_| pick(&mut rng)).collect();
            let up: Vec<f32> = (0..n).map(|_| pick(&mut rng)).collect();
            let mut want = (Vec::new(), Vec::new());
            for (i, (&a, &u)) in act.iter().zip(&up).enumerate() {
                let h = apply_zero_below(if a == 0.0 { 0.0 } else { a * u }, zero_below);
                if h != 0.0 {
                    want.0.push(i as u32);
                    want.1.push(h.to_bits());
                }
            }
            gated_nonzero(&act, &up, zero_below, &mut ids, &mut vals);
            let got_bits: Vec<u32> = vals.iter().map(|v| v.to_bits()).collect();
            assert_eq!(ids, want.0, "n {n}, zero_below {zero_below}: ids");
            assert_eq!(got_bits, want.1, "n {n}, zero_below {zero_below}: values");
        }
    }
}
