//! Predictor training: gradients against a scalar reference and finite differences, recovery
//! of a known low-rank predictor, failure on unpredictable labels, determinism, errors.

use ndarray::Array2;
use powerinfer_predictor::profile::{
    ActivityRule, LayerProfile, ModelIdentity, Profile, mask_bytes,
};
use powerinfer_predictor::train::{
    LayerData, TrainConfig, TrainError, loss_and_grad, reference_loss_and_grad, train_layer,
    train_profile,
};

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn sym(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn no_progress(_: powerinfer_predictor::train::TrainEvent) {}

#[test]
fn gradients_match_reference_and_finite_differences() {
    let (h, d, n_ff, b) = (3usize, 5usize, 7usize, 4usize);
    let mut rng = Rng(7);
    let fc1: Vec<f64> = (0..h * d).map(|_| f64::from(rng.sym())).collect();
    let fc2: Vec<f64> = (0..n_ff * h).map(|_| f64::from(rng.sym())).collect();
    let x: Vec<f64> = (0..b * d).map(|_| f64::from(rng.sym()) * 2.0).collect();
    let y: Vec<f64> = (0..b * n_ff).map(|_| (rng.next_u64() & 1) as f64).collect();
    let pw = 3.0;
    let (loss, g1, g2) = reference_loss_and_grad(&fc1, &fc2, h, d, n_ff, &x, &y, pw);

    // finite differences of the reference loss
    let eps = 1e-6;
    for i in 0..fc1.len() {
        let mut p = fc1.clone();
        p[i] += eps;
        let lp = reference_loss_and_grad(&p, &fc2, h, d, n_ff, &x, &y, pw).0;
        p[i] -= 2.0 * eps;
        let lm = reference_loss_and_grad(&p, &fc2, h, d, n_ff, &x, &y, pw).0;
        let fd = (lp - lm) / (2.0 * eps);
        assert!((fd - g1[i]).abs() < 1e-6, "fc1[{i}]: fd {fd} vs {}", g1[i]);
    }
    for i in 0..fc2.len() {
        let mut p = fc2.clone();
        p[i] += eps;
        let lp = reference_loss_and_grad(&fc1, &p, h, d, n_ff, &x, &y, pw).0;
        p[i] -= 2.0 * eps;
        let lm = reference_loss_and_grad(&fc1, &p, h, d, n_ff, &x, &y, pw).0;
        let fd = (lp - lm) / (2.0 * eps);
        assert!((fd - g2[i]).abs() < 1e-6, "fc2[{i}]: fd {fd} vs {}", g2[i]);
    }
    assert!(
        g1.iter().any(|&g| g.abs() > 1e-4),
        "degenerate case: no fc1 gradient"
    );

    // the ndarray implementation against the reference
    let a1 = Array2::from_shape_vec((h, d), fc1.iter().map(|&v| v as f32).collect()).unwrap();
    let a2 = Array2::from_shape_vec((n_ff, h), fc2.iter().map(|&v| v as f32).collect()).unwrap();
    let ax = Array2::from_shape_vec((b, d), x.iter().map(|&v| v as f32).collect()).unwrap();
    let ay = Array2::from_shape_vec((b, n_ff), y.iter().map(|&v| v as f32).collect()).unwrap();
    let (l32, h1, h2) = loss_and_grad(&a1, &a2, ax.view(), ay.view(), pw as f32);
    assert!((f64::from(l32) - loss).abs() < 1e-5 * loss.abs().max(1.0));
    for (a, b) in h1.iter().zip(&g1) {
        assert!((f64::from(*a) - b).abs() < 1e-5, "{a} vs {b}");
    }
    for (a, b) in h2.iter().zip(&g2) {
        assert!((f64::from(*a) - b).abs() < 1e-5, "{a} vs {b}");
    }
}

/// Samples whose labels are exactly `teacher2 · relu(teacher1 · x) > 0` with a rank-`r`
/// teacher (plus a few always-on and never-on neurons).
fn teacher_data(
    n: usize,
    d: usize,
    n_ff: usize,
    r: usize,
    seed: u64,
) -> (LayerData, Vec<f32>, Vec<f32>) {
    let mut rng = Rng(seed);
    let t1: Vec<f32> = (0..r * d).map(|_| rng.sym()).collect();
    let t2: Vec<f32> = (0..n_ff * r).map(|_| rng.sym()).collect();
    let mut x = Vec::with_capacity(n * d);
    let mut active = vec![0u8; n * mask_bytes(n_ff)];
    for s in 0..n {
        let row: Vec<f32> = (0..d).map(|i| rng.sym() * (1.0 + (i % 5) as f32)).collect();
        let a: Vec<f32> = t1
            .chunks_exact(d)
            .map(|w| w.iter().zip(&row).map(|(a, b)| a * b).sum::<f32>().max(0.0))
            .collect();
        for j in 0..n_ff {
            let p: f32 = t2[j * r..(j + 1) * r]
                .iter()
                .zip(&a)
                .map(|(w, v)| w * v)
                .sum();
            if p > 0.0 {
                active[s * mask_bytes(n_ff) + j / 8] |= 1 << (j % 8);
            }
        }
        x.extend_from_slice(&row);
    }
    (LayerData::new(d, n_ff, x, active).unwrap(), t1, t2)
}

#[test]
fn recovers_a_low_rank_predictor() {
    let (d, n_ff) = (40, 203);
    let (data, _, _) = teacher_data(4000, d, n_ff, 6, 11);
    let cfg = TrainConfig {
        hidden_sizes: vec![8, 16, 32],
        max_hidden: 32,
        epochs: 25,
        batch_size: 128,
        learning_rate: 5e-3,
        min_skip: 0.9,
        ..TrainConfig::default()
    };
    let t = train_layer(&data, &cfg, 0, &no_progress).unwrap();
    eprintln!("attempts: {:?}", t.attempts);
    assert!(t.reached_target, "attempts: {:?}", t.attempts);
    assert!(t.hidden <= 32);
    assert!(t.stats.recall >= 0.99, "{:?}", t.stats);
    assert!(t.stats.skip >= 0.9, "{:?}", t.stats);
    // the stored weights take the raw input (the scale is folded in): rows 4000.. of the same
    // generator are fresh samples of the same teacher
    let (fresh, _, _) = teacher_data(4600, d, n_ff, 6, 11);
    let (mut tp, mut pos, mut fp, mut neg) = (0, 0, 0, 0);
    for s in 4000..4600 {
        let p = t.scores(fresh.x_row(s));
        for (j, &pj) in p.iter().enumerate() {
            let pred = pj >= t.threshold;
            if fresh.label(s, j) {
                pos += 1;
                tp += usize::from(pred);
            } else {
                neg += 1;
                fp += usize::from(pred);
            }
        }
    }
    let recall = tp as f64 / pos as f64;
    let skip = 1.0 - fp as f64 / neg as f64;
    assert!(recall >= 0.98, "fresh recall {recall}");
    assert!(skip >= 0.85, "fresh skip {skip}");
}

#[test]
fn unpredictable_labels_do_not_reach_the_target() {
    let (d, n_ff, n) = (16, 64, 600);
    let mut rng = Rng(3);
    let x: Vec<f32> = (0..n * d).map(|_| rng.sym()).collect();
    let active: Vec<u8> = (0..n * mask_bytes(n_ff))
        .map(|_| rng.next_u64() as u8)
        .collect();
    let data = LayerData::new(d, n_ff, x, active).unwrap();
    let cfg = TrainConfig {
        hidden_sizes: vec![8, 16],
        max_hidden: 16,
        epochs: 5,
        ..TrainConfig::default()
    };
    let t = train_layer(&data, &cfg, 0, &no_progress).unwrap();
    assert!(!t.reached_target, "{:?}", t.stats);
    assert_eq!(t.attempts.len(), 2);
    assert!(t.stats.recall >= 0.99);
    assert!(t.stats.skip < 0.5, "{:?}", t.stats);
}

fn profile_from(datas: &[LayerData]) -> Profile {
    let (d, n_ff) = (datas[0].n_embd(), datas[0].n_ff());
    let layers = datas
        .iter()
        .map(|data| {
            let mut l = LayerProfile::new(n_ff, 0.0);
            for s in 0..data.n_samples() {
                l.x.extend(data.x_row(s).iter().map(|&v| half::bf16::from_f32(v)));
                let mut m = vec![0u8; mask_bytes(n_ff)];
                for j in 0..n_ff {
                    if data.label(s, j) {
                        m[j / 8] |= 1 << (j % 8);
                        l.counts[j] += 1;
                    }
                }
                l.active.extend(m);
            }
            l
        })
        .collect();
    Profile {
        identity: ModelIdentity {
            architecture: "test".into(),
            name: String::new(),
            n_layer: datas.len(),
            n_embd: d,
            n_ff,
            fingerprint: "0".into(),
        },
        n_tokens: datas[0].n_samples() as u64,
        sparsity_target: 0.5,
        rule: ActivityRule::Magnitude,
        ffn_activation: "silu".into(),
        layers,
    }
}

#[test]
fn deterministic_and_independent_of_threads() {
    let datas: Vec<LayerData> = (0..3)
        .map(|i| teacher_data(500, 12, 30, 3, 100 + i).0)
        .collect();
    let profile = profile_from(&datas);
    let cfg = TrainConfig {
        hidden_sizes: vec![4, 8],
        max_hidden: 8,
        epochs: 3,
        ..TrainConfig::default()
    };
    let a = train_profile(&profile, &cfg, 1, &no_progress).unwrap();
    let b = train_profile(&profile, &cfg, 2, &no_progress).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.len(), 3);
    let c = train_profile(
        &profile,
        &TrainConfig {
            seed: 99,
            ..cfg.clone()
        },
        2,
        &no_progress,
    )
    .unwrap();
    assert_ne!(a[0].fc1, c[0].fc1);
    for l in &a {
        assert_eq!(l.fc1.len(), l.hidden * 12);
        assert_eq!(l.fc2.len(), l.hidden * 30);
    }
}

#[test]
fn errors() {
    assert!(matches!(
        LayerData::new(4, 9, vec![0.0; 8], vec![0; 3]),
        Err(TrainError::BadData(_))
    ));
    assert!(matches!(
        LayerData::new(2, 8, vec![f32::NAN, 0.0], vec![0; 1]),
        Err(TrainError::BadData(_))
    ));
    let small = LayerData::new(2, 8, vec![0.5; 2 * 5], vec![1; 5]).unwrap();
    assert!(matches!(
        train_layer(&small, &TrainConfig::default(), 4, &no_progress),
        Err(TrainError::TooFewSamples { layer: 4, n: 5, .. })
    ));
    let (data, _, _) = teacher_data(50, 4, 8, 2, 1);
    for cfg in [
        TrainConfig {
            target_recall: 1.5,
            ..TrainConfig::default()
        },
        TrainConfig {
            holdout: 0.0,
            ..TrainConfig::default()
        },
        TrainConfig {
            epochs: 0,
            ..TrainConfig::default()
        },
        TrainConfig {
            max_hidden: 0,
            ..TrainConfig::default()
        },
    ] {
        assert!(matches!(
            train_layer(&data, &cfg, 0, &no_progress),
            Err(TrainError::BadConfig(_))
        ));
    }
}
