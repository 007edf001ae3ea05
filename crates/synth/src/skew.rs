//! Per-neuron firing probabilities: a capped power law whose mean is the activation rate
//! `1 - sparsity` and whose top `hot_share` of neurons carries `hot_mass` of the firing.

use crate::SynthError;
use crate::random::SplitMix64;

/// The largest firing probability a neuron is given (the inverse normal CDF of 1 is infinite).
pub const MAX_PROBABILITY: f64 = 0.9999;

/// The inverse of the standard normal CDF (Acklam's rational approximation, relative error
/// below 1.2e-9 over (0, 1)). `p` outside (0, 1) gives ±infinity or NaN.
pub fn inverse_normal_cdf(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    const P_LOW: f64 = 0.02425;
    if !(0.0..=1.0).contains(&p) {
        return f64::NAN;
    }
    if p == 0.0 {
        return f64::NEG_INFINITY;
    }
    if p == 1.0 {
        return f64::INFINITY;
    }
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < P_LOW {
        tail((-2.0 * p.ln()).sqrt())
    } else if p <= 1.0 - P_LOW {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    } else {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    }
}

/// Number of neurons in the hot set: `round(hot_share * n)`.
pub fn hot_count(n: usize, hot_share: f64) -> usize {
    (hot_share * n as f64).round() as usize
}

/// Firing probabilities of `n` neurons, sorted from hottest to coldest:
/// `q_i = min(MAX_PROBABILITY, a * u_i^-beta)` at `u_i = (i + 0.5) / n`, with `a` and `beta`
/// solved so that the mean is `mean` and the first `round(hot_share * n)` neurons hold
/// `hot_mass` of the sum.
///
/// Errors: `hot_mass` below the uniform profile's share (`hot_count / n`) or above what the cap
/// allows (`min(1, hot_count * MAX_PROBABILITY / (n * mean))`), or an empty hot set.
pub fn probability_profile(
    n: usize,
    mean: f64,
    hot_share: f64,
    hot_mass: f64,
) -> Result<Vec<f64>, SynthError> {
    let k = hot_count(n, hot_share);
    if n == 0 || k == 0 || k >= n {
        return Err(SynthError::InfeasibleSkew {
            reason: format!(
                "hot share {hot_share} of {n} neurons gives {k} hot neurons; need between 1 and {}",
                n.saturating_sub(1)
            ),
        });
    }
    if !(mean > 0.0 && mean < MAX_PROBABILITY) {
        return Err(SynthError::InfeasibleSkew {
            reason: format!("mean firing probability {mean} is outside (0, {MAX_PROBABILITY})"),
        });
    }
    let uniform_share = k as f64 / n as f64;
    let max_share = (k as f64 * MAX_PROBABILITY / (n as f64 * mean)).min(1.0);
    let ln_u: Vec<f64> = (0..n).map(|i| ((i as f64 + 0.5) / n as f64).ln()).collect();
    let profile = |beta: f64, ln_a: f64| {
        ln_u.iter()
            .map(move |&l| (ln_a - beta * l).exp().min(MAX_PROBABILITY))
    };
    // For a given beta, the scale `a` (as ln a) that gives the requested mean.
    let solve_a = |beta: f64| {
        // q_i <= a (2n)^beta, so below this every q_i is under e^-40 * mean; above ln a = 0
        // every q_i is capped.
        let (mut lo, mut hi) = (-beta * (2.0 * n as f64).ln() - 40.0, 0.0f64);
        for _ in 0..64 {
            let mid = 0.5 * (lo + hi);
            let m = profile(beta, mid).sum::<f64>() / n as f64;
            if m < mean {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        0.5 * (lo + hi)
    };
    let share = |beta: f64| {
        let ln_a = solve_a(beta);
        let q: Vec<f64> = profile(beta, ln_a).collect();
        let total: f64 = q.iter().sum();
        (q[..k].iter().sum::<f64>() / total, ln_a)
    };
    const BETA_MAX: f64 = 40.0;
    let (top, _) = share(BETA_MAX);
    let tol = 1e-9;
    if hot_mass < uniform_share - tol || hot_mass > top + tol {
        return Err(SynthError::InfeasibleSkew {
            reason: format!(
                "hot mass {hot_mass} for the top {k} of {n} neurons at activation rate {mean:.4} \
                 is outside the achievable range [{uniform_share:.4}, {:.4}] (theoretical maximum {max_share:.4})",
                top.min(max_share)
            ),
        });
    }
    let (mut lo, mut hi) = (0.0f64, BETA_MAX);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if share(mid).0 < hot_mass {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let beta = 0.5 * (lo + hi);
    let ln_a = solve_a(beta);
    Ok(profile(beta, ln_a).collect())
}

/// A seeded permutation of `0..n` (Fisher-Yates): hot neurons are scattered over the ids, as in
/// trained models.
pub(crate) fn permutation(n: usize, seed: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Standard normal CDF by Simpson integration of the density from 0 (plain reference).
    fn normal_cdf_reference(z: f64) -> f64 {
        let steps = 20_000;
        let h = z / steps as f64;
        let pdf = |x: f64| (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let mut s = pdf(0.0) + pdf(z);
        for i in 1..steps {
            let w = if i % 2 == 1 { 4.0 } else { 2.0 };
            s += w * pdf(i as f64 * h);
        }
        0.5 + s * h / 3.0
    }

    #[test]
    fn inverse_normal_matches_integrated_cdf() {
        for &p in &[
            1e-6, 1e-4, 0.01, 0.02425, 0.025, 0.1, 0.3, 0.5, 0.7, 0.9, 0.975, 0.9999,
        ] {
            let z = inverse_normal_cdf(p);
            let back = normal_cdf_reference(z);
            assert!(
                (back - p).abs() < 1e-8 + 1e-6 * p,
                "p {p}: z {z}, cdf(z) {back}"
            );
        }
        assert_eq!(inverse_normal_cdf(0.5), 0.0);
        assert!(inverse_normal_cdf(0.0).is_infinite());
        assert!(inverse_normal_cdf(1.5).is_nan());
    }

    #[test]
    fn profile_has_requested_mean_and_hot_mass() {
        for &(n, mean, share, mass) in &[
            (11008usize, 0.1, 0.2, 0.8),
            (256, 0.1, 0.2, 0.8),
            (1000, 0.3, 0.1, 0.3),
            (777, 0.05, 0.2, 0.95),
            (500, 0.5, 0.2, 0.2),
        ] {
            let q = probability_profile(n, mean, share, mass).unwrap();
            assert_eq!(q.len(), n);
            let total: f64 = q.iter().sum();
            assert!(
                (total / n as f64 - mean).abs() < 1e-6,
                "mean {}",
                total / n as f64
            );
            let k = hot_count(n, share);
            let got = q[..k].iter().sum::<f64>() / total;
            assert!((got - mass).abs() < 1e-4, "mass {got} vs {mass}");
            assert!(q.windows(2).all(|w| w[0] >= w[1]), "sorted hottest first");
            assert!(q.iter().all(|&x| x > 0.0 && x <= MAX_PROBABILITY));
        }
    }

    #[test]
    fn infeasible_skews_are_errors() {
        // 20% of neurons cannot hold 80% of the firing when half of all neurons fire.
        assert!(probability_profile(1000, 0.5, 0.2, 0.8).is_err());
        // Less than the uniform share.
        assert!(probability_profile(1000, 0.1, 0.2, 0.1).is_err());
        // Empty hot set.
        assert!(probability_profile(10, 0.1, 0.01, 0.8).is_err());
    }

    #[test]
    fn permutation_is_a_permutation() {
        let p = permutation(1000, 3);
        let mut s = p.clone();
        s.sort_unstable();
        assert!(s.iter().enumerate().all(|(i, &v)| i as u32 == v));
        assert_ne!(p, permutation(1000, 4));
        assert_eq!(p, permutation(1000, 3));
    }
}
