//! The regrouped down projection against the original matrix and an f64 reference, and its
//! threaded kernel against its scalar reference across thread counts.

use powerinfer_cpu::grouped::{GroupedDown, grouped_axpy, grouped_axpy_scalar};
use powerinfer_cpu::sparse::{SparseError, round_coefficients};
use powerinfer_cpu::{Matrix, ThreadPool};
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
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn sym(&mut self) -> f32 {
        self.unit() * 2.0 - 1.0
    }
    fn subset(&mut self, n: usize, p: f32) -> Vec<u32> {
        (0..n as u32).filter(|_| self.unit() < p).collect()
    }
}

const TYPES: [GgmlType; 2] = [GgmlType::Q4_0, GgmlType::Q4_1];

/// A random `rows x cols` matrix of `ty` (with an offset so Q4_1's minimums matter).
fn random_down(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = powerinfer_quant::row_bytes(ty, cols).unwrap();
    let mut data = vec![0u8; rows * rb];
    for r in 0..rows {
        let v: Vec<f32> = (0..cols).map(|_| rng.sym() + 0.3).collect();
        powerinfer_quant::quantize_row(ty, &v, &mut data[r * rb..(r + 1) * rb]).unwrap();
    }
    data
}

fn dequant(w: &Matrix) -> Vec<Vec<f32>> {
    let rb = w.row_bytes();
    (0..w.rows)
        .map(|r| {
            let mut v = vec![0.0; w.cols];
            powerinfer_quant::dequantize_row(w.ty, &w.data[r * rb..(r + 1) * rb], &mut v).unwrap();
            v
        })
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn regrouping_keeps_every_weight() {
    let mut rng = Rng(11);
    for ty in TYPES {
        let (n_embd, n_ff) = (96, 160);
        let data = random_down(&mut rng, ty, n_embd, n_ff);
        let down = Matrix::new(ty, n_embd, n_ff, &data).unwrap();
        let g = GroupedDown::from_down(&down).unwrap();
        assert_eq!(
            g.bytes(),
            data.len(),
            "{ty}: the layout moves bytes, it adds none"
        );
        let want = dequant(&down);
        for (j, row) in want.iter().enumerate() {
            for (i, &w) in row.iter().enumerate() {
                assert_eq!(g.weight(j, i).to_bits(), w.to_bits(), "{ty} [{j}, {i}]");
            }
        }
    }
}

#[test]
fn axpy_matches_reference_and_threads() {
    let mut rng = Rng(12);
    let pools: Vec<ThreadPool> = [1, 2, 3, 16].into_iter().map(ThreadPool::new).collect();
    for ty in TYPES {
        for (n_embd, n_ff) in [(32, 32), (96, 160), (608, 1568)] {
            let data = random_down(&mut rng, ty, n_embd, n_ff);
            let down = Matrix::new(ty, n_embd, n_ff, &data).unwrap();
            let g = GroupedDown::from_down(&down).unwrap();
            let w = dequant(&down);
            for p in [0.0, 0.05, 0.5, 1.0] {
                let ids = rng.subset(n_ff, p);
                // Some exact zeros among the coefficients: skipped.
                let coef: Vec<f32> = ids
                    .iter()
                    .map(|_| if rng.unit() < 0.1 { 0.0 } else { rng.sym() })
                    .collect();
                let raw_coef = coef.clone();
                let mut scalar = vec![f32::NAN; n_embd];
                grouped_axpy_scalar(&g, &ids, &coef, &mut scalar).unwrap();
                // f64 reference over the dequantized original, with the coefficients rounded
                // to the weights' 8-bit activation type as the dense product sees them.
                let mut full = vec![0.0f32; n_ff];
                for (&i, &c) in ids.iter().zip(&coef) {
                    full[i as usize] = c;
                }
                round_coefficients(ty, &mut full, &mut Vec::new()).unwrap();
                let coef: Vec<f32> = ids.iter().map(|&i| full[i as usize]).collect();
                // Q4_1: the minimums multiply the coefficient sum of each group as the dense
                // product has it, Q8_1's f16 `s` (not the exact sum of the rounded values).
                let mut q81 = vec![0u8; n_ff / 32 * 36];
                if ty == GgmlType::Q4_1 {
                    let mut raw_full = vec![0.0f32; n_ff];
                    for (&i, &c) in ids.iter().zip(&raw_coef) {
                        raw_full[i as usize] = c;
                    }
                    powerinfer_quant::quantize_row(GgmlType::Q8_1, &raw_full, &mut q81).unwrap();
                }
                let rb = data.len() / n_embd;
                for j in 0..n_embd {
                    let mut r: f64 = ids
                        .iter()
                        .zip(&coef)
                        .map(|(&i, &c)| f64::from(c) * f64::from(w[j][i as usize]))
                        .sum();
                    if ty == GgmlType::Q4_1 {
                        for grp in 0..n_ff / 32 {
                            let b = &data[j * rb + grp * 20..];
                            let m = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
                            let sb = &q81[grp * 36..];
                            let s_f16 = half::f16::from_le_bytes([sb[2], sb[3]]).to_f32();
                            let exact: f64 = full[grp * 32..grp * 32 + 32]
                                .iter()
                                .map(|&v| f64::from(v))
                                .sum();
                            r += f64::from(m) * (f64::from(s_f16) - exact);
                        }
                    }
                    let scale: f64 = ids
                        .iter()
                        .zip(&coef)
                        .map(|(&i, &c)| (f64::from(c) * f64::from(w[j][i as usize])).abs())
                        .sum();
                    assert!(
                        (f64::from(scalar[j]) - r).abs() <= 1e-5 * scale + 1e-6,
                        "{ty} {n_embd}x{n_ff} p {p} out {j}: {} vs {r}",
                        scalar[j]
                    );
                }
                let raw = &raw_coef;
                for pool in &pools {
                    let mut out = vec![f32::NAN; n_embd];
                    grouped_axpy(pool, &g, &ids, raw, &mut out).unwrap();
                    assert_eq!(
                        bits(&out),
                        bits(&scalar),
                        "{ty} {n_embd}x{n_ff} p {p}: {} threads differ from the scalar kernel",
                        pool.n_threads()
                    );
                }
            }
        }
    }
}

#[test]
fn bad_operands_are_errors() {
    let mut rng = Rng(13);
    for ty in [GgmlType::Q4_K, GgmlType::Q8_0] {
        let data = random_down(&mut rng, ty, 32, 256);
        let m = Matrix::new(ty, 32, 256, &data).unwrap();
        assert!(matches!(
            GroupedDown::from_down(&m),
            Err(SparseError::Cpu { .. })
        ));
    }
    // Rows (n_embd) not a multiple of 32.
    let data = random_down(&mut rng, GgmlType::Q4_0, 40, 64);
    let m = Matrix::new(GgmlType::Q4_0, 40, 64, &data).unwrap();
    assert!(matches!(
        GroupedDown::from_down(&m),
        Err(SparseError::ShapeMismatch { .. })
    ));
    let data = random_down(&mut rng, GgmlType::Q4_0, 64, 64);
    let g = GroupedDown::from_down(&Matrix::new(GgmlType::Q4_0, 64, 64, &data).unwrap()).unwrap();
    let pool = ThreadPool::new(2);
    let mut out = vec![0.0; 64];
    // Unsorted, out of range, wrong coefficient count, wrong output length.
    assert!(grouped_axpy(&pool, &g, &[3, 2], &[1.0, 1.0], &mut out).is_err());
    assert!(grouped_axpy(&pool, &g, &[64], &[1.0], &mut out).is_err());
    assert!(grouped_axpy(&pool, &g, &[1, 2], &[1.0], &mut out).is_err());
    assert!(grouped_axpy(&pool, &g, &[1], &[1.0], &mut out[..32]).is_err());
}

/// With every neuron active, the grouped product is the dense down product (the same 8-bit
/// coefficients and integer block sums), up to the order of the float additions.
#[test]
fn every_neuron_equals_the_dense_product() {
    let mut rng = Rng(14);
    let pool = ThreadPool::new(2);
    for ty in TYPES {
        let (n_embd, n_ff) = (576, 1536);
        let data = random_down(&mut rng, ty, n_embd, n_ff);
        let down = Matrix::new(ty, n_embd, n_ff, &data).unwrap();
        let g = GroupedDown::from_down(&down).unwrap();
        let h: Vec<f32> = (0..n_ff).map(|_| rng.sym() * 3.0).collect();
        let ids: Vec<u32> = (0..n_ff as u32).collect();
        let mut grouped = vec![0.0; n_embd];
        grouped_axpy(&pool, &g, &ids, &h, &mut grouped).unwrap();
        let mut dense = vec![0.0; n_embd];
        powerinfer_cpu::matvec(&pool, &down, &h, &mut dense).unwrap();
        let scale = dense.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for j in 0..n_embd {
            assert!(
                (grouped[j] - dense[j]).abs() <= 1e-5 * scale,
                "{ty} out {j}: grouped {} dense {} (max |out| {scale})",
                grouped[j],
                dense[j]
            );
        }
    }
}
