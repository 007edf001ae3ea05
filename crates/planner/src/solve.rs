//! Choosing the GPU neurons: which FFN neurons to place under a byte budget so that the most
//! activations happen on the GPU.
//!
//! The problem: layer `l` has `n_l` neurons with activation counts `a_{l,i}`, each costing
//! `w_l` bytes (its gate + up + down_t rows). Choose a set `S` with `sum(w_l) <= budget`
//! maximising `sum(a_{l,i})` over `S`. Within a layer all neurons cost the same, so the best
//! `k` neurons of a layer are its `k` most activated ones; the layers with the same cost form
//! one "cost class" whose best `k` neurons are likewise its `k` most activated ones.
//!
//! * [`solve_optimal`] solves this exactly. With one cost class (every layer of the same
//!   types, the usual case) the answer is the `floor(budget / w)` most activated neurons. With
//!   several classes it starts from the greedy solution by count per byte and searches a window
//!   around it that provably holds an optimum (see [`solve_optimal`]).
//! * [`solve_reference`] is the reference PowerInfer's method: sort each layer's neurons by
//!   count, cut them into groups of 256, take the groups with the largest total count (by
//!   count, not per byte, as its ILP over groups under a neuron cap does) while they fit.

use serde::Serialize;

/// Group size of the reference's solver.
pub const REFERENCE_GROUP: usize = 256;

/// Upper limit on the candidate solutions [`solve_optimal`] examines with three or more
/// distinct neuron costs (never reached with one or two; see [`SolveError::TooComplex`]).
pub const MAX_SEARCH: u128 = 1 << 30;

/// Which solver to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// [`solve_optimal`]: the most activations the budget can cover.
    Optimal,
    /// [`solve_reference`]: the reference's 256-neuron groups.
    Reference,
}

impl Method {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Optimal => "optimal",
            Method::Reference => "reference",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Bad solver input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SolveError {
    /// `counts` and `neuron_bytes` disagree on the number of layers.
    #[error("{counts} layers of activation counts but {costs} layers of neuron costs")]
    LayerMismatch {
        /// Layers in `counts`.
        counts: usize,
        /// Layers in `neuron_bytes`.
        costs: usize,
    },
    /// A layer has more neurons than a u32 id can name.
    #[error("layer {layer}: {n_ff} neurons do not fit u32 ids")]
    TooManyNeurons {
        /// Layer.
        layer: usize,
        /// Its neuron count.
        n_ff: usize,
    },
    /// Group size 0 for the reference solver.
    #[error("group size must be at least 1")]
    ZeroGroup,
    /// So many distinct neuron costs, so far apart, that the exact search would examine more
    /// than [`MAX_SEARCH`] candidates.
    #[error(
        "{classes} distinct neuron costs would need {candidates} candidate solutions (limit {limit}); use the reference method"
    )]
    TooComplex {
        /// Distinct neuron costs.
        classes: usize,
        /// Candidates the search would examine.
        candidates: u128,
        /// [`MAX_SEARCH`].
        limit: u128,
    },
}

/// The chosen GPU neurons.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selection {
    /// Per layer, the GPU neurons' ids in ascending order.
    pub layers: Vec<Vec<u32>>,
    /// Bytes they take.
    pub bytes: u64,
    /// Sum of their activation counts.
    pub covered: u128,
}

/// Runs the chosen method (the reference with groups of [`REFERENCE_GROUP`]).
pub fn solve(
    method: Method,
    counts: &[Vec<u64>],
    neuron_bytes: &[u64],
    budget: u64,
) -> Result<Selection, SolveError> {
    match method {
        Method::Optimal => solve_optimal(counts, neuron_bytes, budget),
        Method::Reference => solve_reference(counts, neuron_bytes, budget, REFERENCE_GROUP),
    }
}

/// Sum of the counts of the selected neurons (ids out of range are ignored).
pub fn covered(counts: &[Vec<u64>], layers: &[Vec<u32>]) -> u128 {
    counts
        .iter()
        .zip(layers)
        .map(|(c, ids)| {
            ids.iter()
                .filter_map(|&i| c.get(i as usize))
                .map(|&a| u128::from(a))
                .sum::<u128>()
        })
        .sum()
}

fn check(counts: &[Vec<u64>], neuron_bytes: &[u64]) -> Result<(), SolveError> {
    if counts.len() != neuron_bytes.len() {
        return Err(SolveError::LayerMismatch {
            counts: counts.len(),
            costs: neuron_bytes.len(),
        });
    }
    for (layer, c) in counts.iter().enumerate() {
        if u32::try_from(c.len()).is_err() {
            return Err(SolveError::TooManyNeurons {
                layer,
                n_ff: c.len(),
            });
        }
    }
    Ok(())
}

/// A layer's neuron ids, most activated first (ties: lower id first).
fn sorted_ids(counts: &[u64]) -> Vec<u32> {
    let mut ids: Vec<u32> = (0..counts.len() as u32).collect();
    ids.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
    ids
}

/// One cost class: every neuron of the layers that share a neuron cost, most activated first.
struct Class {
    cost: u64,
    /// `(layer, neuron)` in descending count order (ties: layer, then neuron, ascending).
    items: Vec<(u32, u32)>,
    /// `prefix[k]` = sum of the first `k` items' counts.
    prefix: Vec<u128>,
    /// Count of each item, in the same order.
    counts: Vec<u64>,
}

impl Class {
    fn len(&self) -> usize {
        self.items.len()
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Exact optimum: the selection with the largest covered count whose bytes fit `budget`.
///
/// Method. Neurons of equal cost are interchangeable apart from their counts, so a solution
/// is a count `k_c` per cost class `c` (cost `w_c`), and class `c` contributes the sum `Q_c(k_c)`
/// of its `k_c` largest counts. Let `g` be the greedy solution that takes neurons in descending
/// order of count per byte and stops at the first one that does not fit (the "critical" one,
/// of ratio `L`). Then an optimum `x` exists with `|x_c - g_c| <= R_c =
/// ceil((m * W + 1) * w_max / w_c)`, where `m` is the number of classes, `d` the gcd of the
/// costs and `W = w_max / d`:
///
/// 1. Take the optimum nearest to `g` (in the L1 distance of the `k` vectors).
/// 2. Exchange: if `x_a >= g_a + w_b/d_ab` and `x_b <= g_b - w_a/d_ab` (`d_ab = gcd(w_a, w_b)`),
///    dropping `w_b/d_ab` neurons of `a` beyond `g_a` (ratio `<= L`, value `<= L w_a w_b / d_ab`)
///    for `w_a/d_ab` neurons of `b` inside `g_b` (ratio `>= L`, value `>= L w_a w_b / d_ab`) keeps
///    the cost and the value at least and moves closer to `g`: impossible. As `w/d_ab <= W`,
///    either every excess `x_c - g_c` is below `W` or every deficit is.
/// 3. If a class has a deficit, the unused budget of `x` is below `w_max` (else add a neuron of
///    that class back, as 2.). `g` leaves less than the critical cost `<= w_max` unused.
/// 4. Bytes balance: the bytes of the excesses and of the deficits differ by less than
///    `w_max`, and the bounded side totals below `m * W * w_max`, which bounds the other side.
///
/// The search enumerates every `k_c` in these windows for all classes but one, and gives the
/// last class (the one with the widest window) the most neurons that fit. With one class that
/// is just the `floor(budget / w)` most activated neurons; with two it examines at most a few
/// thousand candidates for real quantization types. Neurons of cost 0 are always taken.
pub fn solve_optimal(
    counts: &[Vec<u64>],
    neuron_bytes: &[u64],
    budget: u64,
) -> Result<Selection, SolveError> {
    check(counts, neuron_bytes)?;
    let mut layers: Vec<Vec<u32>> = vec![Vec::new(); counts.len()];
    let mut total_covered = 0u128;

    // Cost classes (ascending cost); free neurons are taken outright.
    let mut costs: Vec<u64> = neuron_bytes
        .iter()
        .zip(counts)
        .filter(|&(&w, c)| w > 0 && !c.is_empty())
        .map(|(&w, _)| w)
        .collect();
    costs.sort_unstable();
    costs.dedup();
    let mut classes: Vec<Class> = Vec::with_capacity(costs.len());
    for &cost in &costs {
        let mut items: Vec<(u32, u32)> = Vec::new();
        for (layer, c) in counts.iter().enumerate() {
            if neuron_bytes[layer] == cost {
                items.extend((0..c.len() as u32).map(|i| (layer as u32, i)));
            }
        }
        let count_of = |&(l, i): &(u32, u32)| counts[l as usize][i as usize];
        items.sort_by(|a, b| count_of(b).cmp(&count_of(a)).then(a.cmp(b)));
        let item_counts: Vec<u64> = items.iter().map(count_of).collect();
        let mut prefix = Vec::with_capacity(items.len() + 1);
        prefix.push(0u128);
        let mut s = 0u128;
        for &a in &item_counts {
            s += u128::from(a);
            prefix.push(s);
        }
        classes.push(Class {
            cost,
            items,
            prefix,
            counts: item_counts,
        });
    }
    for (layer, c) in counts.iter().enumerate() {
        if neuron_bytes[layer] == 0 {
            layers[layer] = (0..c.len() as u32).collect();
            total_covered += c.iter().map(|&a| u128::from(a)).sum::<u128>();
        }
    }

    let ks = if classes.is_empty() {
        Vec::new()
    } else {
        best_counts(&classes, budget)?
    };

    let mut bytes = 0u64;
    for (class, &k) in classes.iter().zip(&ks) {
        for &(l, i) in &class.items[..k] {
            layers[l as usize].push(i);
        }
        // Fits: k * cost <= budget was checked by the search.
        bytes += k as u64 * class.cost;
        total_covered += class.prefix[k];
    }
    for l in &mut layers {
        l.sort_unstable();
    }
    Ok(Selection {
        layers,
        bytes,
        covered: total_covered,
    })
}

/// The optimal neuron count of each class (see [`solve_optimal`]).
fn best_counts(classes: &[Class], budget: u64) -> Result<Vec<usize>, SolveError> {
    let m = classes.len();
    // Greedy by count per byte, stopping at the first neuron that does not fit.
    let mut g = vec![0usize; m];
    let mut left = budget;
    let mut critical = false;
    loop {
        let mut pick: Option<usize> = None;
        for c in 0..m {
            if g[c] == classes[c].len() {
                continue;
            }
            pick = match pick {
                None => Some(c),
                Some(p) => {
                    // counts[c] / w_c > counts[p] / w_p, cross-multiplied.
                    let lhs = u128::from(classes[c].counts[g[c]]) * u128::from(classes[p].cost);
                    let rhs = u128::from(classes[p].counts[g[p]]) * u128::from(classes[c].cost);
                    if lhs > rhs { Some(c) } else { Some(p) }
                }
            };
        }
        let Some(c) = pick else { break };
        if classes[c].cost > left {
            critical = true;
            break;
        }
        left -= classes[c].cost;
        g[c] += 1;
    }
    if !critical {
        // Everything fits.
        return Ok(g);
    }

    let d = classes.iter().fold(0u64, |a, c| gcd(a, c.cost));
    let w_max = classes.iter().map(|c| c.cost).max().unwrap_or(1);
    let big_w = u128::from(w_max / d);
    let span = (m as u128)
        .saturating_mul(big_w)
        .saturating_add(1)
        .saturating_mul(u128::from(w_max));
    let windows: Vec<(usize, usize)> = classes
        .iter()
        .zip(&g)
        .map(|(c, &gc)| {
            let r = span.div_ceil(u128::from(c.cost));
            let r = usize::try_from(r).unwrap_or(usize::MAX);
            (gc.saturating_sub(r), gc.saturating_add(r).min(c.len()))
        })
        .collect();
    // The class with the widest window gets the most neurons that fit; the others enumerate.
    let last = (0..m)
        .max_by_key(|&c| (windows[c].1 - windows[c].0, std::cmp::Reverse(c)))
        .unwrap_or(0);
    let candidates = (0..m).filter(|&c| c != last).fold(1u128, |a, c| {
        a.saturating_mul((windows[c].1 - windows[c].0 + 1) as u128)
    });
    if candidates > MAX_SEARCH {
        return Err(SolveError::TooComplex {
            classes: m,
            candidates,
            limit: MAX_SEARCH,
        });
    }
    let order: Vec<usize> = (0..m).filter(|&c| c != last).collect();
    let mut search = Search {
        classes,
        windows: &windows,
        order: &order,
        last,
        ks: vec![0; m],
        best_value: 0,
        best: None,
    };
    search.run(0, budget, 0);
    // The empty selection is always feasible, so the search found something.
    Ok(search.best.unwrap_or_else(|| vec![0; m]))
}

struct Search<'a> {
    classes: &'a [Class],
    windows: &'a [(usize, usize)],
    order: &'a [usize],
    last: usize,
    ks: Vec<usize>,
    best_value: u128,
    best: Option<Vec<usize>>,
}

impl Search<'_> {
    fn run(&mut self, depth: usize, left: u64, value: u128) {
        if depth == self.order.len() {
            let c = &self.classes[self.last];
            let k = usize::try_from(left / c.cost)
                .unwrap_or(usize::MAX)
                .min(c.len());
            let v = value + c.prefix[k];
            if self.best.is_none() || v > self.best_value {
                self.ks[self.last] = k;
                self.best_value = v;
                self.best = Some(self.ks.clone());
            }
            return;
        }
        let ci = self.order[depth];
        let c = &self.classes[ci];
        let (lo, hi) = self.windows[ci];
        for k in lo..=hi {
            let Some(cost) = (k as u64).checked_mul(c.cost).filter(|&b| b <= left) else {
                break;
            };
            self.ks[ci] = k;
            self.run(depth + 1, left - cost, value + c.prefix[k]);
        }
    }
}

/// The reference's method: each layer's neurons sorted by count (ties: lower id first) and cut
/// into groups of `group` (the last one may be smaller); groups taken in descending order of
/// total count while they fit the remaining bytes. A layer's groups are taken in order; once
/// one of them does not fit, that layer takes no more. The reference's per-layer minimum
/// (its `threshold` constraint, a layer either gets none or at least that many neurons) is not
/// applied, and its cost is exact bytes instead of a neuron cap.
pub fn solve_reference(
    counts: &[Vec<u64>],
    neuron_bytes: &[u64],
    budget: u64,
    group: usize,
) -> Result<Selection, SolveError> {
    check(counts, neuron_bytes)?;
    if group == 0 {
        return Err(SolveError::ZeroGroup);
    }
    let sorted: Vec<Vec<u32>> = counts.iter().map(|c| sorted_ids(c)).collect();
    // (value, layer, group index, size)
    let mut groups: Vec<(u128, usize, usize, usize)> = Vec::new();
    for (layer, ids) in sorted.iter().enumerate() {
        for (gi, chunk) in ids.chunks(group).enumerate() {
            let value = chunk
                .iter()
                .map(|&i| u128::from(counts[layer][i as usize]))
                .sum();
            groups.push((value, layer, gi, chunk.len()));
        }
    }
    groups.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut taken = vec![0usize; counts.len()];
    let mut closed = vec![false; counts.len()];
    let mut left = budget;
    for &(_, layer, _, size) in &groups {
        if closed[layer] {
            continue;
        }
        match (size as u64).checked_mul(neuron_bytes[layer]) {
            Some(cost) if cost <= left => {
                left -= cost;
                taken[layer] += size;
            }
            _ => closed[layer] = true,
        }
    }
    let mut layers = Vec::with_capacity(counts.len());
    let mut cov = 0u128;
    for (layer, ids) in sorted.iter().enumerate() {
        let mut chosen = ids[..taken[layer]].to_vec();
        cov += chosen
            .iter()
            .map(|&i| u128::from(counts[layer][i as usize]))
            .sum::<u128>();
        chosen.sort_unstable();
        layers.push(chosen);
    }
    Ok(Selection {
        layers,
        bytes: budget - left,
        covered: cov,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_class_takes_the_top_neurons() {
        let counts = vec![vec![5, 1, 9], vec![7, 0, 3]];
        let s = solve_optimal(&counts, &[10, 10], 35).unwrap();
        assert_eq!(s.layers, vec![vec![0, 2], vec![0]]);
        assert_eq!(s.covered, 21);
        assert_eq!(s.bytes, 30);
    }

    #[test]
    fn two_classes_beat_greedy_by_ratio() {
        // Greedy by ratio takes the 6-byte neuron (ratio 1.67) and then cannot fit the
        // 5-byte ones; two 5-byte neurons (8 + 8) are better.
        let counts = vec![vec![10], vec![8, 8]];
        let s = solve_optimal(&counts, &[6, 5], 10).unwrap();
        assert_eq!(s.covered, 16);
        assert_eq!(s.layers, vec![vec![], vec![0, 1]]);
    }

    #[test]
    fn reference_takes_whole_groups() {
        let counts = vec![vec![4, 3, 2, 1], vec![10, 0, 0, 0]];
        let s = solve_reference(&counts, &[1, 1], 4, 2).unwrap();
        // Groups: L0 {0,1}=7, L0 {2,3}=3, L1 {0,1}=10, L1 {2,3}=0.
        assert_eq!(s.layers, vec![vec![0, 1], vec![0, 1]]);
        assert_eq!(s.covered, 17);
        assert_eq!(s.bytes, 4);
    }
}
