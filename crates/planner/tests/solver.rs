//! The solvers against brute force, and the optimal one against the reference's.

use powerinfer_planner::solve::{
    REFERENCE_GROUP, Selection, SolveError, covered, solve_optimal, solve_reference,
};

/// splitmix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every subset of every neuron: the exact optimum of tiny cases.
fn brute_subsets(counts: &[Vec<u64>], costs: &[u64], budget: u64) -> u128 {
    let items: Vec<(u64, u64)> = counts
        .iter()
        .zip(costs)
        .flat_map(|(c, &w)| c.iter().map(move |&a| (a, w)))
        .collect();
    assert!(items.len() <= 20);
    let mut best = 0u128;
    for mask in 0u32..(1 << items.len()) {
        let (mut v, mut b) = (0u128, 0u64);
        for (i, &(a, w)) in items.iter().enumerate() {
            if mask & (1 << i) != 0 {
                v += u128::from(a);
                b += w;
            }
        }
        if b <= budget {
            best = best.max(v);
        }
    }
    best
}

/// Every per-layer count `k_l` (each layer's `k` most activated neurons are its best `k`):
/// the exact optimum of cases with many neurons in few layers.
fn brute_per_layer(counts: &[Vec<u64>], costs: &[u64], budget: u64) -> u128 {
    let prefix: Vec<Vec<u128>> = counts
        .iter()
        .map(|c| {
            let mut s = c.clone();
            s.sort_unstable_by(|a, b| b.cmp(a));
            let mut p = vec![0u128];
            for a in s {
                p.push(p.last().unwrap() + u128::from(a));
            }
            p
        })
        .collect();
    fn rec(l: usize, left: u64, prefix: &[Vec<u128>], costs: &[u64]) -> u128 {
        if l == prefix.len() {
            return 0;
        }
        let mut best = 0;
        for k in 0..prefix[l].len() {
            let b = k as u64 * costs[l];
            if b > left {
                break;
            }
            best = best.max(prefix[l][k] + rec(l + 1, left - b, prefix, costs));
        }
        best
    }
    rec(0, budget, &prefix, costs)
}

/// The invariants every selection must satisfy.
fn check_selection(s: &Selection, counts: &[Vec<u64>], costs: &[u64], budget: u64) {
    assert_eq!(s.layers.len(), counts.len());
    let mut bytes = 0u64;
    for (l, ids) in s.layers.iter().enumerate() {
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "layer {l} not ascending"
        );
        assert!(ids.iter().all(|&i| (i as usize) < counts[l].len()));
        bytes += ids.len() as u64 * costs[l];
    }
    assert_eq!(bytes, s.bytes);
    assert!(s.bytes <= budget, "{} bytes over budget {budget}", s.bytes);
    assert_eq!(covered(counts, &s.layers), s.covered);
}

fn random_case(
    rng: &mut Rng,
    max_layers: u64,
    max_ff: u64,
    cost_choices: &[u64],
    max_count: u64,
) -> (Vec<Vec<u64>>, Vec<u64>) {
    let n_layers = 1 + rng.below(max_layers) as usize;
    let counts: Vec<Vec<u64>> = (0..n_layers)
        .map(|_| {
            let n = rng.below(max_ff + 1) as usize;
            (0..n).map(|_| rng.below(max_count + 1)).collect()
        })
        .collect();
    let costs = (0..n_layers)
        .map(|_| cost_choices[rng.below(cost_choices.len() as u64) as usize])
        .collect();
    (counts, costs)
}

#[test]
fn optimal_equals_subset_brute_force_on_tiny_cases() {
    let mut rng = Rng(1);
    for case in 0..1500 {
        let choices: Vec<u64> = (0..1 + rng.below(4)).map(|_| rng.below(12)).collect();
        let (counts, costs) = random_case(&mut rng, 4, 5, &choices, 20);
        let n: usize = counts.iter().map(Vec::len).sum();
        if n > 16 {
            continue;
        }
        let total_bytes: u64 = counts
            .iter()
            .zip(&costs)
            .map(|(c, &w)| c.len() as u64 * w)
            .sum();
        let budget = rng.below(total_bytes + 3);
        let s = solve_optimal(&counts, &costs, budget).unwrap();
        check_selection(&s, &counts, &costs, budget);
        let best = brute_subsets(&counts, &costs, budget);
        assert_eq!(
            s.covered, best,
            "case {case}: counts {counts:?} costs {costs:?} budget {budget}"
        );
        let r = solve_reference(&counts, &costs, budget, 1 + rng.below(3) as usize).unwrap();
        check_selection(&r, &counts, &costs, budget);
        assert!(r.covered <= s.covered);
    }
}

#[test]
fn optimal_equals_per_layer_brute_force_with_many_neurons() {
    let mut rng = Rng(2);
    // Coprime and near-equal costs make the search windows wide.
    let cost_sets: [&[u64]; 4] = [&[7, 11, 13], &[1000, 1001], &[6912, 7968], &[3, 5, 3, 5, 8]];
    for case in 0..120 {
        let choices = cost_sets[case % cost_sets.len()];
        let (counts, costs) = random_case(&mut rng, 3, 60, choices, 1000);
        let total_bytes: u64 = counts
            .iter()
            .zip(&costs)
            .map(|(c, &w)| c.len() as u64 * w)
            .sum();
        let budget = rng.below(total_bytes + 1);
        let s = solve_optimal(&counts, &costs, budget).unwrap();
        check_selection(&s, &counts, &costs, budget);
        assert_eq!(
            s.covered,
            brute_per_layer(&counts, &costs, budget),
            "case {case}: costs {costs:?} budget {budget}"
        );
    }
}

#[test]
fn two_wide_classes_against_full_enumeration() {
    // Two layers of 3000 neurons at 1000 and 1001 bytes: the window around the greedy
    // solution is about 2000 neurons wide; compare with every k of the first layer.
    let mut rng = Rng(3);
    for _ in 0..4 {
        let counts: Vec<Vec<u64>> = (0..2)
            .map(|_| (0..3000).map(|_| rng.below(1 << 20)).collect())
            .collect();
        let costs = [1000u64, 1001];
        let budget = rng.below(6_003_000);
        let s = solve_optimal(&counts, &costs, budget).unwrap();
        check_selection(&s, &counts, &costs, budget);
        assert_eq!(s.covered, brute_per_layer(&counts, &costs, budget));
    }
}

#[test]
fn one_cost_class_is_the_top_neurons() {
    let mut rng = Rng(4);
    for _ in 0..50 {
        let (counts, _) = random_case(&mut rng, 6, 300, &[1], 50);
        let costs = vec![96u64; counts.len()];
        let budget = rng.below(96 * 2000);
        let s = solve_optimal(&counts, &costs, budget).unwrap();
        check_selection(&s, &counts, &costs, budget);
        let mut all: Vec<u64> = counts.iter().flatten().copied().collect();
        all.sort_unstable_by(|a, b| b.cmp(a));
        let k = ((budget / 96) as usize).min(all.len());
        assert_eq!(s.layers.iter().map(Vec::len).sum::<usize>(), k);
        assert_eq!(s.covered, all[..k].iter().map(|&a| u128::from(a)).sum());
    }
}

#[test]
fn budget_is_never_exceeded_and_optimal_beats_reference() {
    let mut rng = Rng(5);
    for _ in 0..200 {
        let choices: Vec<u64> = (0..1 + rng.below(3)).map(|_| 1 + rng.below(5000)).collect();
        let (counts, costs) = random_case(&mut rng, 8, 700, &choices, 1 << 40);
        let total_bytes: u64 = counts
            .iter()
            .zip(&costs)
            .map(|(c, &w)| c.len() as u64 * w)
            .sum();
        let budget = rng.below(total_bytes + 10_000);
        let o = match solve_optimal(&counts, &costs, budget) {
            Ok(o) => o,
            Err(SolveError::TooComplex { .. }) => continue,
            Err(e) => panic!("{e}"),
        };
        let r = solve_reference(&counts, &costs, budget, REFERENCE_GROUP).unwrap();
        check_selection(&o, &counts, &costs, budget);
        check_selection(&r, &counts, &costs, budget);
        assert!(o.covered >= r.covered);
    }
}

/// Power-law counts like a ReLU model's: a few hot neurons, a long cold tail, hotter and
/// colder layers.
fn skewed(rng: &mut Rng, n_layers: usize, n_ff: usize) -> Vec<Vec<u64>> {
    (0..n_layers)
        .map(|l| {
            let scale = 1_000_000.0 / (1.0 + l as f64 * 0.3);
            let mut ranks: Vec<usize> = (0..n_ff).collect();
            // Shuffle so hot neurons are spread over the ids.
            for i in (1..n_ff).rev() {
                ranks.swap(i, rng.below(i as u64 + 1) as usize);
            }
            ranks
                .iter()
                .map(|&r| (scale / (1.0 + r as f64).powf(1.1)) as u64)
                .collect()
        })
        .collect()
}

#[test]
fn skewed_distribution_optimal_never_below_reference() {
    let mut rng = Rng(6);
    let counts = skewed(&mut rng, 8, 1000);
    // Two cost classes as in Q4_K_M (Q6_K down rows in some layers).
    let costs: Vec<u64> = (0..8)
        .map(|l| if l % 3 == 0 { 7968 } else { 6912 })
        .collect();
    let total_bytes: u64 = costs.iter().map(|w| w * 1000).sum();
    let total: u128 = counts.iter().flatten().map(|&a| u128::from(a)).sum();
    for frac in [0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.99, 1.0] {
        let budget = (total_bytes as f64 * frac) as u64;
        let o = solve_optimal(&counts, &costs, budget).unwrap();
        let r = solve_reference(&counts, &costs, budget, REFERENCE_GROUP).unwrap();
        check_selection(&o, &counts, &costs, budget);
        check_selection(&r, &counts, &costs, budget);
        assert!(o.covered >= r.covered, "budget fraction {frac}");
        eprintln!(
            "budget {:>5.1}%: optimal {:.4} reference {:.4}",
            frac * 100.0,
            o.covered as f64 / total as f64,
            r.covered as f64 / total as f64
        );
    }
    // With an uneven profile the optimum is strictly better at a small budget: the
    // reference's groups of 256 put whole groups where single neurons would do.
    let budget = total_bytes / 20;
    let o = solve_optimal(&counts, &costs, budget).unwrap();
    let r = solve_reference(&counts, &costs, budget, REFERENCE_GROUP).unwrap();
    assert!(o.covered > r.covered);
}

#[test]
fn two_classes_at_gemma_scale_against_enumeration() {
    // Gemma 3 270M Q4_K_M: 18 layers of 2048 neurons at 1405 (Q6_K down) or 1240 bytes.
    let mut rng = Rng(7);
    let counts = skewed(&mut rng, 18, 2048);
    let costs: Vec<u64> = (0..18)
        .map(|l| if l % 3 == 0 { 1405 } else { 1240 })
        .collect();
    // Exact optimum by enumerating the neuron count of the 1405-byte class.
    let class = |w: u64| -> Vec<u128> {
        let mut v: Vec<u64> = (0..18)
            .filter(|&l| costs[l] == w)
            .flat_map(|l| counts[l].iter().copied())
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        let mut p = vec![0u128];
        for a in v {
            p.push(p.last().unwrap() + u128::from(a));
        }
        p
    };
    let (a, b) = (class(1405), class(1240));
    for budget in [0u64, 1404, 1_000_000, 7_777_777, 20_000_000, 40_000_000] {
        let mut best = 0u128;
        for (ka, &va) in a.iter().enumerate() {
            let Some(left) = budget.checked_sub(ka as u64 * 1405) else {
                break;
            };
            let kb = ((left / 1240) as usize).min(b.len() - 1);
            best = best.max(va + b[kb]);
        }
        let s = solve_optimal(&counts, &costs, budget).unwrap();
        check_selection(&s, &counts, &costs, budget);
        assert_eq!(s.covered, best, "budget {budget}");
    }
}

#[test]
fn edge_cases() {
    // No layers, empty layers, zero budget, zero-cost neurons, all-zero counts.
    assert_eq!(solve_optimal(&[], &[], 100).unwrap().covered, 0);
    let s = solve_optimal(&[vec![], vec![3, 4]], &[5, 5], 0).unwrap();
    assert_eq!(s.layers, vec![Vec::<u32>::new(), vec![]]);
    let s = solve_optimal(&[vec![1, 2], vec![3]], &[0, 4], 3).unwrap();
    assert_eq!(s.layers, vec![vec![0, 1], vec![]]);
    assert_eq!((s.covered, s.bytes), (3, 0));
    let s = solve_optimal(&[vec![0; 10]], &[1], 4).unwrap();
    check_selection(&s, &[vec![0; 10]], &[1], 4);
    assert!(matches!(
        solve_optimal(&[vec![1]], &[1, 2], 4),
        Err(SolveError::LayerMismatch {
            counts: 1,
            costs: 2
        })
    ));
    assert!(matches!(
        solve_reference(&[vec![1]], &[1], 4, 0),
        Err(SolveError::ZeroGroup)
    ));
    // Huge counts and costs do not overflow.
    let s = solve_optimal(
        &[vec![u64::MAX; 3], vec![u64::MAX; 2]],
        &[u64::MAX, 3],
        u64::MAX,
    )
    .unwrap();
    assert_eq!(s.covered, 2 * u128::from(u64::MAX));
    let r = solve_reference(&[vec![u64::MAX; 3]], &[u64::MAX], u64::MAX, 2).unwrap();
    assert_eq!(r.covered, 0);
}
