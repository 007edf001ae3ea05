//! Sampler chain against a plain full-sort reference, sampled frequencies against the expected
//! distribution (chi-square), greedy ties, penalty arithmetic, and stop strings.

use std::time::Instant;

use powerinfer_generate::sampling::{Sampler, SamplerConfig, StopCondition, TokenProb};

/// splitmix64 for test inputs.
struct Prng(u64);
impl Prng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn logits(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| (self.unit() * 2.0 - 1.0) * scale).collect()
    }
}

fn cfg(temperature: f32, top_k: usize, top_p: f32, min_p: f32) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_k,
        top_p,
        min_p,
        ..Default::default()
    }
}

/// The chain written the slow, obvious way: full sort, then each filter in llama.cpp's order.
fn reference(logits: &[f32], c: &SamplerConfig, history: &[u32]) -> Vec<TokenProb> {
    let mut l = logits.to_vec();
    if c.repeat_last_n > 0 {
        let window = &history[history.len().saturating_sub(c.repeat_last_n)..];
        let mut seen: Vec<u32> = window.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            let count = window.iter().filter(|&&x| x == t).count() as f32;
            let v = &mut l[t as usize];
            *v = if *v <= 0.0 {
                *v * c.repeat_penalty
            } else {
                *v / c.repeat_penalty
            };
            *v -= count * c.frequency_penalty + c.presence_penalty;
        }
    }
    let mut cands: Vec<(u32, f32)> = l.iter().enumerate().map(|(i, &x)| (i as u32, x)).collect();
    cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if c.temperature <= 0.0 {
        return vec![TokenProb {
            id: cands[0].0,
            p: 1.0,
        }];
    }
    if c.top_k > 0 {
        cands.truncate(c.top_k);
    }
    if c.top_p < 1.0 {
        let max = cands[0].1;
        let total: f64 = cands.iter().map(|x| f64::from((x.1 - max).exp())).sum();
        let mut acc = 0.0;
        let mut keep = cands.len();
        for (i, x) in cands.iter().enumerate() {
            acc += f64::from((x.1 - max).exp()) / total;
            if acc >= f64::from(c.top_p) {
                keep = i + 1;
                break;
            }
        }
        cands.truncate(keep);
    }
    if c.min_p > 0.0 {
        let max = cands[0].1;
        let kept: Vec<_> = cands
            .iter()
            .copied()
            .filter(|x| (x.1 - max).exp() >= c.min_p)
            .collect();
        if !kept.is_empty() {
            cands = kept;
        } else {
            cands.truncate(1);
        }
    }
    let max = cands[0].1;
    let w: Vec<f64> = cands
        .iter()
        .map(|x| (f64::from(x.1 - max) / f64::from(c.temperature)).exp())
        .collect();
    let s: f64 = w.iter().sum();
    cands
        .iter()
        .zip(w)
        .map(|(x, w)| TokenProb {
            id: x.0,
            p: (w / s) as f32,
        })
        .collect()
}

fn assert_same(got: &[TokenProb], want: &[TokenProb], what: &str) {
    // The two may disagree on a candidate sitting exactly at a top-p/min-p boundary after
    // rounding; with random logits that does not happen, so demand equality of the sets.
    let ids = |v: &[TokenProb]| v.iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(got), ids(want), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.p - w.p).abs() < 1e-5,
            "{what}: id {} p {} vs {}",
            g.id,
            g.p,
            w.p
        );
    }
}

#[test]
fn chain_matches_reference_on_random_logits() {
    let mut rng = Prng(42);
    let settings = [
        cfg(0.8, 40, 0.95, 0.05),
        cfg(1.0, 0, 1.0, 0.0),
        cfg(1.0, 0, 0.9, 0.0),
        cfg(0.5, 0, 1.0, 0.1),
        cfg(1.3, 7, 1.0, 0.0),
        cfg(0.7, 0, 0.5, 0.02),
        cfg(0.0, 40, 0.95, 0.05),
        SamplerConfig {
            repeat_penalty: 1.3,
            frequency_penalty: 0.2,
            presence_penalty: 0.5,
            repeat_last_n: 5,
            ..cfg(0.9, 20, 0.9, 0.05)
        },
    ];
    for (si, c) in settings.iter().enumerate() {
        for &n in &[1usize, 2, 3, 17, 100, 1000, 4099] {
            let logits = rng.logits(n, 6.0);
            let history: Vec<u32> = (0..9).map(|_| (rng.next() % n as u64) as u32).collect();
            let mut s = Sampler::new(*c).expect("sampler");
            for &t in &history {
                s.accept(t);
            }
            let got = s.distribution(&logits).expect("dist");
            let want = reference(&logits, c, &history);
            assert_same(&got, &want, &format!("setting {si}, n {n}"));
        }
    }
}

/// Draws many samples and compares frequencies with the distribution by chi-square.
fn chi_square(c: SamplerConfig, logits: &[f32], draws: usize) -> f64 {
    let mut s = Sampler::new(c).expect("sampler");
    let dist = s.distribution(logits).expect("dist");
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..draws {
        counts[s.sample(logits).expect("sample") as usize] += 1;
    }
    let mut chi = 0.0;
    let mut kept = vec![false; logits.len()];
    for t in &dist {
        kept[t.id as usize] = true;
        let e = f64::from(t.p) * draws as f64;
        let o = counts[t.id as usize] as f64;
        chi += (o - e) * (o - e) / e;
    }
    for (i, &k) in kept.iter().enumerate() {
        assert!(k || counts[i] == 0, "token {i} sampled but filtered out");
    }
    chi
}

#[test]
fn sampled_frequencies_follow_the_distribution() {
    let logits = [1.0f32, 0.5, 0.0, -0.5, -1.0, 2.0];
    // 5 degrees of freedom: the 99.9% point of chi-square is 20.5.
    let chi = chi_square(cfg(1.0, 0, 1.0, 0.0), &logits, 60_000);
    assert!(chi < 20.5, "plain softmax chi2 {chi}");
    // Temperature 0.5 sharpens; top-k 3 keeps ids 5, 0, 1 (2 dof: 13.8).
    let chi = chi_square(cfg(0.5, 3, 1.0, 0.0), &logits, 60_000);
    assert!(chi < 13.8, "top-k chi2 {chi}");
    // min-p 0.3 keeps tokens with p >= 0.3 p_max: ids 5 (1.0), 0 (e^-1 = 0.37).
    let mut s = Sampler::new(cfg(1.0, 0, 1.0, 0.3)).expect("sampler");
    let d = s.distribution(&logits).expect("dist");
    assert_eq!(d.iter().map(|t| t.id).collect::<Vec<_>>(), [5, 0]);
    // A wrong distribution must fail the same test: sample at temperature 1, compare at 0.5.
    let mut wrong = Sampler::new(cfg(1.0, 0, 1.0, 0.0)).expect("sampler");
    let sharp = Sampler::new(cfg(0.5, 0, 1.0, 0.0))
        .expect("sampler")
        .distribution(&logits)
        .expect("dist");
    let mut counts = [0usize; 6];
    for _ in 0..60_000 {
        counts[wrong.sample(&logits).expect("sample") as usize] += 1;
    }
    let chi: f64 = sharp
        .iter()
        .map(|t| {
            let e = f64::from(t.p) * 60_000.0;
            let o = counts[t.id as usize] as f64;
            (o - e) * (o - e) / e
        })
        .sum();
    assert!(chi > 100.0, "the test can tell distributions apart ({chi})");
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_p() {
    // Probabilities 0.5, 0.3, 0.15, 0.05 (as logits ln p).
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    for (p, keep) in [(0.4, 1), (0.75, 2), (0.9, 3), (0.99, 4)] {
        for k in [0, 40] {
            let mut s = Sampler::new(cfg(1.0, k, p, 0.0)).expect("sampler");
            let d = s.distribution(&logits).expect("dist");
            assert_eq!(d.len(), keep, "top_p {p} top_k {k}");
            let sum: f32 = d.iter().map(|t| t.p).sum();
            assert!((sum - 1.0).abs() < 1e-6);
        }
    }
}

#[test]
fn greedy_takes_lowest_id_on_ties_and_ignores_randomness() {
    let logits = [0.0f32, 3.0, 1.0, 3.0, -2.0];
    for seed in 0..5 {
        let mut s = Sampler::new(SamplerConfig {
            seed,
            ..SamplerConfig::greedy()
        })
        .expect("sampler");
        assert_eq!(s.sample(&logits), Ok(1));
    }
    // NaN logits are ignored rather than winning.
    let mut s = Sampler::new(SamplerConfig::greedy()).expect("sampler");
    assert_eq!(s.sample(&[f32::NAN, 0.5, 0.7]), Ok(2));
    // All -inf: the lowest id, no panic.
    let mut s = Sampler::new(SamplerConfig::default()).expect("sampler");
    assert_eq!(s.sample(&[f32::NEG_INFINITY; 4]), Ok(0));
}

#[test]
fn penalties_math() {
    let c = SamplerConfig {
        repeat_penalty: 2.0,
        frequency_penalty: 0.25,
        presence_penalty: 1.0,
        repeat_last_n: 3,
        ..cfg(1.0, 0, 1.0, 0.0)
    };
    let logits = [4.0f32, -1.0, 2.0, 0.0];
    let mut s = Sampler::new(c).expect("sampler");
    // Token 2 falls out of the 3-token window; token 0 counted twice, token 1 once.
    for t in [2, 0, 1, 0] {
        s.accept(t);
    }
    let d = s.distribution(&logits).expect("dist");
    let p = |id: u32| d.iter().find(|t| t.id == id).map(|t| t.p).expect("kept");
    // Expected logits: 0: 4/2 - 2*0.25 - 1 = 0.5; 1: -1*2 - 0.25 - 1 = -3.25; 2: 2; 3: 0.
    let want = [0.5f32, -3.25, 2.0, 0.0];
    let z: f32 = want.iter().map(|x| x.exp()).sum();
    for (i, w) in want.iter().enumerate() {
        assert!((p(i as u32) - w.exp() / z).abs() < 1e-6, "token {i}");
    }
    // Greedy now picks 2 instead of 0.
    let mut g = Sampler::new(SamplerConfig {
        temperature: 0.0,
        ..c
    })
    .expect("sampler");
    for t in [0, 0] {
        g.accept(t);
    }
    assert_eq!(g.sample(&logits), Ok(2));
    // reset() forgets the history.
    g.reset();
    assert_eq!(g.sample(&logits), Ok(0));
}

#[test]
fn seeds_reproduce() {
    let mut rng = Prng(7);
    let logits = rng.logits(500, 3.0);
    let run = |seed| {
        let mut s = Sampler::new(SamplerConfig {
            seed,
            ..Default::default()
        })
        .expect("sampler");
        (0..50)
            .map(|_| s.sample(&logits).expect("sample"))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn large_vocab_is_fast() {
    let mut rng = Prng(3);
    let logits = rng.logits(262_144, 10.0);
    for c in [SamplerConfig::default(), cfg(0.8, 0, 0.95, 0.05)] {
        let mut s = Sampler::new(c).expect("sampler");
        let t0 = Instant::now();
        for _ in 0..20 {
            let t = s.sample(&logits).expect("sample");
            s.accept(t);
        }
        let per = t0.elapsed().as_secs_f64() / 20.0;
        eprintln!(
            "top_k {}: {:.2} ms per sample over 262144 logits",
            c.top_k,
            per * 1e3
        );
        // top-k bounds the work; without it top-p over uniformly spread logits may keep tens of
        // thousands of candidates (real logits are far more peaked).
        let limit = if c.top_k > 0 { 0.02 } else { 0.2 };
        assert!(per < limit, "{per} s per sample");
        let want = reference(&logits, &c, &[]);
        let got = Sampler::new(c)
            .expect("sampler")
            .distribution(&logits)
            .expect("dist");
        assert_same(&got, &want, "262144");
    }
}

#[test]
fn stop_strings_hold_back_partial_matches() {
    let mut stop = StopCondition::new(["</s>", "\n\nUser"]);
    let mut shown = String::new();
    let mut stopped = false;
    for chunk in ["Hello", " <", "/", "b> and\n", "\nUs", "e", "r: more"] {
        let c = stop.push(chunk);
        shown.push_str(&c.emit);
        if c.stopped {
            assert_eq!(c.matched.as_deref(), Some("\n\nUser"));
            stopped = true;
            break;
        }
    }
    assert!(stopped);
    assert_eq!(shown, "Hello </b> and");
    assert!(stop.is_stopped());
    assert!(stop.push("x").stopped);

    // No stop: everything comes out, the held tail on flush.
    let mut stop = StopCondition::new(["STOP"]);
    let mut shown = String::new();
    for chunk in ["a S", "T", "O"] {
        shown.push_str(&stop.push(chunk).emit);
    }
    assert_eq!(shown, "a ");
    shown.push_str(&stop.flush());
    assert_eq!(shown, "a STO");

    // Multi-byte characters at the boundary stay whole; earliest match wins.
    let mut stop = StopCondition::new(["é!", "b"]);
    let c = stop.push("aaé");
    assert_eq!(c.emit, "aa");
    let c = stop.push("!b");
    assert!(c.stopped);
    assert_eq!(c.emit, "");
    assert_eq!(c.matched.as_deref(), Some("é!"));
}
