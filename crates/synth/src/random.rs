//! Counter-based randomness: every weight is a pure function of (seed, tensor, row, column), so
//! generation order, chunking and thread count never change a byte.

/// splitmix64's increment (the golden ratio in 64 bits).
pub(crate) const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// splitmix64's output function: a bijective 64-bit mixer.
#[inline(always)]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Standard deviation of the sum of four independent uniform 16-bit integers:
/// `sqrt(4 * (65536^2 - 1) / 12)`.
const IRWIN_HALL_STD: f32 = 37_837.227;
/// Mean of that sum: `4 * 65535 / 2`.
const IRWIN_HALL_MEAN: f32 = 131_070.0;

/// An approximately standard normal number from 64 random bits: the sum of their four 16-bit
/// lanes (Irwin-Hall with n = 4), centred and scaled to unit variance. Bounded by about ±3.46.
#[inline(always)]
pub(crate) fn normal_from_bits(h: u64) -> f32 {
    let s = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + (h >> 48);
    (s as f32 - IRWIN_HALL_MEAN) * (1.0 / IRWIN_HALL_STD)
}

/// The `idx`-th approximately normal number of the stream `key` (splitmix64 at counter `idx`).
#[inline(always)]
pub(crate) fn normal_at(key: u64, idx: u64) -> f32 {
    normal_from_bits(mix64(
        key.wrapping_add(idx.wrapping_add(1).wrapping_mul(GAMMA)),
    ))
}

/// Fills `out[c] = scale * normal_at(key, idx(c))` with `idx(c) = (r << 32) | c`, or
/// `(c << 32) | r` when `transposed` (column `r` of the logical matrix).
#[inline(always)]
fn fill_normal_generic(key: u64, scale: f32, r: usize, transposed: bool, out: &mut [f32]) {
    let r = r as u64;
    if transposed {
        for (c, o) in out.iter_mut().enumerate() {
            *o = scale * normal_at(key, ((c as u64) << 32) | r);
        }
    } else {
        let base = r << 32;
        for (c, o) in out.iter_mut().enumerate() {
            *o = scale * normal_at(key, base | c as u64);
        }
    }
}

/// The same loop compiled for AVX-512 (64-bit lane multiplies let it vectorize). Integer
/// operations and the two float multiplies per element are the same, so the output is
/// bit-identical to [`fill_normal_generic`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
fn fill_normal_avx512(key: u64, scale: f32, r: usize, transposed: bool, out: &mut [f32]) {
    fill_normal_generic(key, scale, r, transposed, out)
}

/// Fills one row of a Gaussian matrix (see [`fill_normal_generic`]), vectorized where the CPU
/// has AVX-512DQ.
pub(crate) fn fill_normal(key: u64, scale: f32, r: usize, transposed: bool, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        // SAFETY: the CPU supports every feature `fill_normal_avx512` is compiled for (checked
        // just above); the function itself is safe code.
        unsafe { fill_normal_avx512(key, scale, r, transposed, out) };
        return;
    }
    fill_normal_generic(key, scale, r, transposed, out)
}

/// A small sequential PRNG (splitmix64) for the few non-weight choices (neuron permutations).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`), by 128-bit multiply (bias below 2^-64 * n).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_has_unit_moments() {
        let n = 200_000u64;
        let (mut s1, mut s2, mut s4) = (0f64, 0f64, 0f64);
        for i in 0..n {
            let z = normal_at(12345, i) as f64;
            s1 += z;
            s2 += z * z;
            s4 += z * z * z * z;
        }
        let mean = s1 / n as f64;
        let var = s2 / n as f64 - mean * mean;
        let kurt = s4 / n as f64 / (var * var);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        // Irwin-Hall(4) has kurtosis 3 - 6/20 = 2.7 (a normal: 3).
        assert!((kurt - 2.7).abs() < 0.05, "kurtosis {kurt}");
    }

    #[test]
    fn streams_differ_and_repeat() {
        assert_eq!(normal_at(1, 7), normal_at(1, 7));
        assert_ne!(normal_at(1, 7), normal_at(2, 7));
        assert_ne!(normal_at(1, 7), normal_at(1, 8));
    }

    #[test]
    fn vector_fill_equals_scalar_fill() {
        for &(r, transposed, n) in &[(0usize, false, 1usize), (7, false, 4097), (123, true, 333)] {
            let mut a = vec![0f32; n];
            let mut b = vec![0f32; n];
            fill_normal(99, 0.25, r, transposed, &mut a);
            for (c, x) in b.iter_mut().enumerate() {
                let idx = if transposed {
                    ((c as u64) << 32) | r as u64
                } else {
                    ((r as u64) << 32) | c as u64
                };
                *x = 0.25 * normal_at(99, idx);
            }
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = SplitMix64::new(9);
        let mut seen = [0u32; 7];
        for _ in 0..7000 {
            seen[r.below(7) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }
}
