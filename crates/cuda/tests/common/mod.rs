//! Shared test helpers: a seeded PRNG, the skip-or-fail rule for GPU tests, references.
#![allow(dead_code)]

use powerinfer_quant::{GgmlType, dequantize_row, quantize_row, row_bytes};

/// splitmix64.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Whether the environment variable is set to `1`.
pub fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// A GPU, or `None` after printing why the test skips; with `POWERINFER_REQUIRE_GPU=1` a missing
/// GPU fails the test instead.
#[cfg(feature = "cuda")]
pub fn gpu_or_skip(test: &str) -> Option<powerinfer_cuda::Gpu> {
    match powerinfer_cuda::Gpu::new(0) {
        Ok(g) => {
            eprintln!("{test}: running on {} ({})", g.name(), g.arch());
            Some(g)
        }
        Err(e) => {
            assert!(
                !required("POWERINFER_REQUIRE_GPU"),
                "{test}: POWERINFER_REQUIRE_GPU=1 but no usable GPU: {e}"
            );
            eprintln!("{test}: skipped, no usable GPU: {e}");
            None
        }
    }
}

/// A random `rows x cols` matrix quantized to `ty` (powerinfer-quant's reference quantizers),
/// with its dequantized values: the reference weights.
pub fn random_matrix(rng: &mut Rng, ty: GgmlType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let rb = row_bytes(ty, cols).expect("cols fit the block size");
    let mut bytes = vec![0u8; rows * rb];
    let mut deq = vec![0f32; rows * cols];
    for r in 0..rows {
        // Rows of different magnitudes, a few outliers.
        let scale = 0.1 + (r % 7) as f32 * 0.3;
        let mut src = rng.vec(cols, scale);
        if cols > 3 {
            let i = rng.below(cols);
            src[i] *= 6.0;
        }
        quantize_row(ty, &src, &mut bytes[r * rb..(r + 1) * rb]).unwrap();
        dequantize_row(
            ty,
            &bytes[r * rb..(r + 1) * rb],
            &mut deq[r * cols..(r + 1) * cols],
        )
        .unwrap();
    }
    (bytes, deq)
}

/// `W x` in f64 over dequantized weights.
pub fn matvec_ref(w: &[f32], cols: usize, x: &[f32]) -> Vec<f32> {
    w.chunks_exact(cols)
        .map(|row| {
            row.iter()
                .zip(x)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum::<f64>() as f32
        })
        .collect()
}

/// `‖a − b‖ / ‖b‖` (or `‖a − b‖` when `b` is zero).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let mut num = 0f64;
    let mut den = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}
