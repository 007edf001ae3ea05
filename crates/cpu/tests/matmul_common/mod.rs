//! Shared helpers for the matmul tests and benchmarks: a seeded PRNG and valid random weights.
#![allow(dead_code)]

use powerinfer_gguf::GgmlType;

/// SplitMix64: small, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    /// A generator with the given seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.f32()
    }

    /// Fills `dst` with random bytes.
    pub fn fill_bytes(&mut self, dst: &mut [u8]) {
        for chunk in dst.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// `n` floats uniform in [-1, 1), with an occasional larger outlier as real activations have.
    pub fn activations(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| {
                let v = self.range(-1.0, 1.0);
                if self.next_u64().is_multiple_of(61) {
                    v * 8.0
                } else {
                    v
                }
            })
            .collect()
    }
}

fn put_f16(dst: &mut [u8], at: usize, v: f32) {
    dst[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

/// Byte offsets of the f16 fields of one block of `ty` (the scales and minimums, which must be
/// finite), per the ggml block layouts.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => &[],
    }
}

/// Random, valid (finite) data for `n_elements` elements of `ty`, whose dequantized values are
/// of order 0.1. Panics for types without a generator here.
pub fn random_weights(ty: GgmlType, n_elements: usize, rng: &mut Rng) -> Vec<u8> {
    let n_blocks = n_elements / ty.block_size();
    assert_eq!(n_blocks * ty.block_size(), n_elements);
    let mut out = vec![0u8; n_blocks * ty.type_size()];
    match ty {
        GgmlType::F32 => {
            for c in out.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.range(-0.5, 0.5).to_le_bytes());
            }
        }
        GgmlType::F16 => {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&half::f16::from_f32(rng.range(-0.5, 0.5)).to_le_bytes());
            }
        }
        GgmlType::BF16 => {
            for c in out.chunks_exact_mut(2) {
                c.copy_from_slice(&half::bf16::from_f32(rng.range(-0.5, 0.5)).to_le_bytes());
            }
        }
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K => {
            rng.fill_bytes(&mut out);
            let fields = f16_fields(ty);
            // Scale ranges: the integer parts reach about 8 (4-bit), 16 (5-bit), 32 (6-bit with
            // 8-bit sub-scales up to 127, so much smaller d) or 127 (8-bit).
            let d_max = match ty {
                GgmlType::Q8_0 => 0.004,
                GgmlType::Q4_K | GgmlType::Q5_K => 0.002,
                GgmlType::Q6_K => 0.0003,
                _ => 0.03,
            };
            for block in out.chunks_exact_mut(ty.type_size()) {
                for (i, &at) in fields.iter().enumerate() {
                    // The first field is the scale d (sign allowed for the symmetric types),
                    // the second the minimum (Q4_1/Q5_1: m) or min scale (K: dmin).
                    let v = if i == 0 {
                        rng.range(-d_max, d_max)
                    } else {
                        rng.range(-d_max * 4.0, d_max * 4.0)
                    };
                    put_f16(block, at, v);
                }
            }
        }
        other => panic!("no random generator for {other}"),
    }
    out
}
