//! The regrouped down projection against the original matrix and an f64 reference, and its
//! threaded kernel against its scalar reference across thread counts.

use powerinfer_cpu::grouped::{GroupedDown, grouped_axpy, grouped_axpy_scalar};
use powerinfer_cpu::sparse::SparseError;
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

const TYPES: [GgmlType; 3] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0];

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
                let mut scalar = vec![f32::NAN; n_embd];
                grouped_axpy_scalar(&g, &ids, &coef, &mut scalar).unwrap();
                // f64 reference over the dequantized original.
                for j in 0..n_embd {
                    let r: f64 = ids
                        .iter()
                        .zip(&coef)
                        .map(|(&i, &c)| f64::from(c) * f64::from(w[j][i as usize]))
                        .sum();
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
                for pool in &pools {
                    let mut out = vec![f32::NAN; n_embd];
                    grouped_axpy(pool, &g, &ids, &coef, &mut out).unwrap();
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
    let data = random_down(&mut rng, GgmlType::Q4_K, 32, 256);
    let q4k = Matrix::new(GgmlType::Q4_K, 32, 256, &data).unwrap();
    assert!(matches!(
        GroupedDown::from_down(&q4k),
        Err(SparseError::Cpu { .. })
    ));
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
