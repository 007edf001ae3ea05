//! Profiling the tiny dense llama fixture, training predictors on the profile and writing a
//! PWRI file that loads and runs.

use std::path::PathBuf;

use powerinfer_cpu::ThreadPool;
use powerinfer_generate::model::SparseMode;
use powerinfer_generate::profile::{
    ProfileConfig, ProfileRunError, ProfileStage, ffn_activation_name, profile_model,
};
use powerinfer_generate::pwri::{PwriOptions, write_pwri};
use powerinfer_generate::tokenizer::Tokenizer;
use powerinfer_generate::{Logits, Model};
use powerinfer_gguf::{GgmlType, GgufFile, Magic};
use powerinfer_predictor::profile::{ActivityRule, ModelIdentity, Profile, ProfileError};
use powerinfer_predictor::train::{TrainConfig, train_profile};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/powerinfer-tiny")
        .join(name)
}

fn austen() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/austen/austen-persuasion.txt")
}

fn setup() -> Option<(Model, Vec<u32>)> {
    let m = fixture("tiny-relu-llama.dense.f16.gguf");
    if !m.exists() || !austen().exists() {
        eprintln!("fixture or text not found; skipping");
        return None;
    }
    let model = Model::load(&m).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let text = std::fs::read_to_string(austen()).unwrap();
    let tokens = tok.encode(&text[..6000], true, false);
    Some((model, tokens))
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("powerinfer-generate-{}-{name}", std::process::id()))
}

#[test]
fn profile_train_write_load() {
    let Some((model, tokens)) = setup() else {
        return;
    };
    assert!(tokens.len() >= 400, "{} tokens", tokens.len());
    let pool = ThreadPool::new(2);
    assert_eq!(ffn_activation_name(&model).unwrap(), "silu");
    let cfg = ProfileConfig {
        n_ctx: 64,
        n_batch: 32,
        sparsity: 0.6,
        samples: 100_000,
        max_tokens: Some(400),
        calib_tokens: 64,
        seed: 1,
    };
    let mut reports = Vec::new();
    let mut cb = |s: ProfileStage, d: usize, t: usize| reports.push((s, d, t));
    let p = profile_model(&model, &pool, &tokens, &cfg, Some(&mut cb)).unwrap();
    // 400 tokens: 6 windows of 64 and one of 16; the first calibrates
    assert_eq!(reports.first(), Some(&(ProfileStage::Calibrate, 1, 1)));
    assert_eq!(reports.last(), Some(&(ProfileStage::Count, 6, 6)));
    assert_eq!(p.n_tokens, 400 - 64);
    assert_eq!(p.rule, ActivityRule::Magnitude);
    assert_eq!(p.ffn_activation, "silu");
    assert_eq!(p.identity, ModelIdentity::from_gguf(model.file()).unwrap());
    let (d, n_ff) = (64, 1024);
    for (i, l) in p.layers.iter().enumerate() {
        assert!(l.threshold > 0.0, "layer {i}");
        // every token sampled: the masks add up to the counts
        assert_eq!(l.n_samples(d), 336);
        for j in 0..n_ff {
            let bits = (0..336).filter(|&s| l.is_active(n_ff, s, j)).count() as i64;
            assert_eq!(bits, l.counts[j], "layer {i} neuron {j}");
        }
        // thresholds calibrated on the first window hold roughly on the others
        let active: i64 = l.counts.iter().sum();
        let frac = active as f64 / (336.0 * n_ff as f64);
        assert!(
            (frac - 0.4).abs() < 0.1,
            "layer {i}: active fraction {frac}"
        );
    }
    // the residual stream differs between layers
    assert_ne!(p.layers[0].x, p.layers[1].x);

    // a small reservoir keeps the same tokens in every layer
    let small = profile_model(
        &model,
        &pool,
        &tokens,
        &ProfileConfig {
            samples: 40,
            ..cfg.clone()
        },
        None,
    )
    .unwrap();
    let l0 = &small.layers[0];
    assert_eq!(l0.n_samples(d), 40);
    for s in 0..40 {
        let row = &l0.x[s * d..(s + 1) * d];
        let k = (0..336)
            .find(|&k| &p.layers[0].x[k * d..(k + 1) * d] == row)
            .expect("a sampled row is one of the tokens");
        for (a, b) in small.layers.iter().zip(&p.layers) {
            assert_eq!(a.x[s * d..(s + 1) * d], b.x[k * d..(k + 1) * d]);
            assert_eq!(
                a.active[s * 128..(s + 1) * 128],
                b.active[k * 128..(k + 1) * 128]
            );
        }
    }

    // save, reload, train, write a PWRI file
    let prof_path = tmp("tiny.profile.safetensors");
    p.save(&prof_path).unwrap();
    let p = Profile::load(&prof_path).unwrap();
    std::fs::remove_file(&prof_path).unwrap();
    let tcfg = TrainConfig {
        hidden_sizes: vec![16, 32],
        max_hidden: 32,
        epochs: 8,
        batch_size: 64,
        ..TrainConfig::default()
    };
    let trained = train_profile(&p, &tcfg, 2, &|_| {}).unwrap();
    assert_eq!(trained.len(), 3);
    for t in &trained {
        assert!(
            t.stats.recall >= 0.99 && t.stats.n_eval == 34,
            "{:?}",
            t.stats
        );
    }
    let out = tmp("tiny.pwri.gguf");
    let opts = PwriOptions {
        keep_down: true,
        fc1_f32: false,
        down_t: Default::default(),
        ffn_activation: p.ffn_activation.clone(),
        sparsity_target: p.sparsity_target,
        activation_thresholds: p.layers.iter().map(|l| l.threshold).collect(),
        dense_prefix: 0,
    };
    let summary = write_pwri(model.file(), &trained, &opts, &out, None).unwrap();
    assert_eq!(summary.down_t_types, vec![GgmlType::F16; 3]);
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.magic(), Magic::Pwri);
    assert_eq!(f.get_str("powerinfer.ffn_activation").unwrap(), "silu");
    let th = f.get_f32_array("powerinfer.sparse_thresholds").unwrap();
    assert_eq!(th.len(), 3);
    assert_eq!(th[1], trained[1].threshold);
    assert_eq!(
        f.get_f32_array("powerinfer.activation_thresholds")
            .unwrap()
            .as_ref(),
        opts.activation_thresholds.as_slice()
    );
    assert!((f.get_f32("powerinfer.sparsity_target").unwrap() - 0.6).abs() < 1e-6);
    let src = model.file();
    for (i, tr) in trained.iter().enumerate() {
        assert!(f.tensor(&format!("blk.{i}.ffn_down.weight")).is_none());
        let dt = f.tensor(&format!("blk.{i}.ffn_down_t.weight")).unwrap();
        assert_eq!(dt.shape, vec![64, 1024]);
        let h = tr.hidden as u64;
        assert_eq!(
            f.tensor(&format!("blk.{i}.fc1.weight")).unwrap().shape,
            vec![64, h]
        );
        assert_eq!(
            f.tensor(&format!("blk.{i}.fc2.weight")).unwrap().shape,
            vec![h, 1024]
        );
        // F16 -> F16: the transpose is exact
        let down = src
            .tensor_bytes(&format!("blk.{i}.ffn_down.weight"))
            .unwrap();
        let down_t = f.tensor_data(dt);
        for (r, c) in [(0usize, 0usize), (5, 1000), (63, 1023), (17, 333)] {
            let a = &down[(r * 1024 + c) * 2..(r * 1024 + c) * 2 + 2];
            let b = &down_t[(c * 64 + r) * 2..(c * 64 + r) * 2 + 2];
            assert_eq!(a, b, "row {r} col {c}");
        }
    }
    for t in src.tensors() {
        if !t.name.contains("ffn_down") {
            let o = f.tensor(&t.name).unwrap();
            assert_eq!((o.ty, &o.shape), (t.ty, &t.shape));
            assert_eq!(f.tensor_data(o), src.tensor_data(t), "{}", t.name);
        }
    }
    // the profile's identity still matches the PWRI file (gate/up/embeddings are unchanged)
    p.identity
        .check(&ModelIdentity::from_gguf(&f).unwrap())
        .unwrap();

    // the PWRI file loads as a sparse model; run densely it reproduces the dense model
    let mut sparse = Model::load(&out).unwrap();
    assert!(sparse.is_sparse());
    let prompt = &tokens[..24];
    let mut st = model.new_state(64, 32).unwrap();
    let dense_logits = model
        .forward(&pool, &mut st, prompt, Logits::Last)
        .unwrap()
        .to_vec();
    sparse.set_sparse_mode(SparseMode::Dense);
    let mut st2 = sparse.new_state(64, 32).unwrap();
    let l2 = sparse
        .forward(&pool, &mut st2, prompt, Logits::Last)
        .unwrap()
        .to_vec();
    let max_diff = dense_logits
        .iter()
        .zip(&l2)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    // the sparse path rounds differently (f32 axpy over ffn_down_t against the dense path's
    // f16-rounded activations): close, same argmax
    let scale = dense_logits.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    eprintln!("dense vs sparse-file dense: max logit difference {max_diff}, max |logit| {scale}");
    assert!(
        max_diff < 5e-3 * scale,
        "dense vs sparse-file dense logits differ by {max_diff}"
    );
    let argmax = |v: &[f32]| {
        (0..v.len())
            .max_by(|&a, &b| v[a].total_cmp(&v[b]))
            .expect("logits")
    };
    assert_eq!(argmax(&dense_logits), argmax(&l2));
    sparse.set_sparse_mode(SparseMode::Predicted);
    let mut st3 = sparse.new_state(64, 32).unwrap();
    let l3 = sparse
        .forward(&pool, &mut st3, prompt, Logits::Last)
        .unwrap();
    assert!(l3.iter().all(|v| v.is_finite()));
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn errors() {
    let Some((model, tokens)) = setup() else {
        return;
    };
    let pool = ThreadPool::new(1);
    // one window: nothing left to count after calibration
    let cfg = ProfileConfig {
        n_ctx: 64,
        max_tokens: Some(50),
        ..ProfileConfig::default()
    };
    assert!(matches!(
        profile_model(&model, &pool, &tokens, &cfg, None),
        Err(ProfileRunError::Config(_))
    ));
    let cfg = ProfileConfig {
        sparsity: 1.0,
        ..ProfileConfig::default()
    };
    assert!(matches!(
        profile_model(&model, &pool, &tokens, &cfg, None),
        Err(ProfileRunError::Config(_))
    ));
    // a profile of this model does not fit another model
    let other =
        GgufFile::open(fixture("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf")).unwrap();
    let mine = ModelIdentity::from_gguf(model.file()).unwrap();
    assert!(matches!(
        mine.check(&ModelIdentity::from_gguf(&other).unwrap()),
        Err(ProfileError::ModelMismatch { .. })
    ));
}

/// Runs in CI (which fetches the models): 384 tokens of SmolLM2, a few seconds.
#[test]
fn smollm2_profile() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() || !austen().exists() {
        eprintln!("model or text not found; skipping");
        return;
    }
    let model = Model::load(&path).unwrap();
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let text = std::fs::read_to_string(austen()).unwrap();
    let tokens = tok.encode(&text[..4000], true, false);
    let pool = ThreadPool::new(0);
    let cfg = ProfileConfig {
        n_ctx: 128,
        max_tokens: Some(384),
        calib_tokens: 128,
        samples: 64,
        ..ProfileConfig::default()
    };
    let p = profile_model(&model, &pool, &tokens, &cfg, None).unwrap();
    assert_eq!(p.ffn_activation, "silu");
    assert_eq!(p.n_tokens, 256);
    assert_eq!(p.layers.len(), 30);
    for (i, l) in p.layers.iter().enumerate() {
        assert_eq!(l.n_samples(576), 64);
        let frac = l.counts.iter().sum::<i64>() as f64 / (256.0 * 1536.0);
        assert!(
            (frac - 0.5).abs() < 0.1,
            "layer {i}: active fraction {frac}"
        );
    }
    let gemma =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf");
    if gemma.exists() {
        let g = GgufFile::open(&gemma).unwrap();
        assert!(matches!(
            p.identity.check(&ModelIdentity::from_gguf(&g).unwrap()),
            Err(ProfileError::ModelMismatch {
                field: "architecture",
                ..
            })
        ));
    }

    // A PWRI file that keeps the Q4_1 ffn_down: sparse layers compute the down product from
    // those exact weights, regrouped by neuron.
    let tcfg = TrainConfig {
        hidden_sizes: vec![16],
        max_hidden: 16,
        epochs: 2,
        batch_size: 32,
        ..TrainConfig::default()
    };
    let trained = train_profile(&p, &tcfg, 2, &|_| {}).unwrap();
    let out = tmp("smollm2.pwri.gguf");
    let opts = PwriOptions {
        keep_down: true,
        fc1_f32: false,
        down_t: Default::default(),
        ffn_activation: p.ffn_activation.clone(),
        sparsity_target: p.sparsity_target,
        activation_thresholds: p.layers.iter().map(|l| l.threshold).collect(),
        dense_prefix: 3,
    };
    write_pwri(model.file(), &trained, &opts, &out, None).unwrap();
    let f = GgufFile::open(&out).unwrap();
    for i in [0usize, 29] {
        let name = format!("blk.{i}.ffn_down.weight");
        assert_eq!(
            f.tensor_bytes(&name),
            model.file().tensor_bytes(&name),
            "{name}"
        );
    }
    let mut sparse = Model::load(&out).unwrap();
    drop(f);
    std::fs::remove_file(&out).unwrap();
    let prompt = &tokens[..20];
    let run = |m: &Model, one_by_one: bool| -> Vec<f32> {
        let mut st = m.new_state(64, 32).unwrap();
        if one_by_one {
            let mut last = Vec::new();
            for t in prompt {
                last = m
                    .forward(&pool, &mut st, std::slice::from_ref(t), Logits::Last)
                    .unwrap()
                    .to_vec();
            }
            last
        } else {
            m.forward(&pool, &mut st, prompt, Logits::Last)
                .unwrap()
                .to_vec()
        }
    };
    let dense = run(&model, false);
    let scale = dense.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // Our own PWRI files keep the dense model's attention numerics (the reference's files get
    // the reference's).
    sparse.set_sparse_mode(SparseMode::Dense);
    let every = run(&sparse, false);
    let diff = dense
        .iter()
        .zip(&every)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    eprintln!(
        "dense model vs its PWRI file run densely: max logit difference {diff} (max |logit| {scale})"
    );
    // The same weights and 8-bit coefficients; the kernel equals the dense product to 1e-5
    // (crates/cpu/tests/grouped.rs), and 30 layers of a model whose first token carries huge
    // activations amplify that (seen: 0.15-0.5 at a max |logit| of 27; the requantized Q8_0
    // `ffn_down_t` it replaces: 0.95-1.9).
    assert!(diff < 0.03 * scale, "max logit difference {diff}");
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b]));
    assert_eq!(argmax(&dense), argmax(&every));
    for mode in [SparseMode::Threshold, SparseMode::Predicted] {
        sparse.set_sparse_mode(mode);
        let batch = run(&sparse, false);
        let single = run(&sparse, true);
        assert!(
            batch
                .iter()
                .zip(&single)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{mode:?}: prompt batch and token-by-token decode differ"
        );
        let d = dense
            .iter()
            .zip(&batch)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        eprintln!("{mode:?}: max logit difference from dense {d}");
        // Neurons are skipped (so the logits move); the predictors here are two epochs on 64
        // samples, so only the predictor-free mode is held to the dense result.
        assert!(d > 0.0, "{mode:?}: nothing skipped");
        if mode == SparseMode::Threshold {
            assert!(d < 0.2 * scale, "{mode:?}: {d}");
        }
    }

    // The dense prefix: in both sparse modes the first 3 positions are computed with every
    // neuron (their logits equal the dense mode's bit for bit) and later ones are not; with no
    // prefix, position 0 is sparse too.
    assert_eq!(sparse.dense_prefix(), 3);
    let all_logits = |m: &Model| -> Vec<f32> {
        let mut st = m.new_state(64, 32).unwrap();
        m.forward(&pool, &mut st, &prompt[..6], Logits::All)
            .unwrap()
            .to_vec()
    };
    let nv = dense.len();
    sparse.set_sparse_mode(SparseMode::Dense);
    let reference = all_logits(&sparse);
    let same_row = |a: &[f32], t: usize| {
        a[t * nv..(t + 1) * nv]
            .iter()
            .zip(&reference[t * nv..(t + 1) * nv])
            .all(|(x, y)| x.to_bits() == y.to_bits())
    };
    for mode in [SparseMode::Threshold, SparseMode::Predicted] {
        sparse.set_sparse_mode(mode);
        let got = all_logits(&sparse);
        for t in 0..3 {
            assert!(
                same_row(&got, t),
                "{mode:?}: position {t} is in the dense prefix"
            );
        }
        assert!(
            !same_row(&got, 5),
            "{mode:?}: position 5 is past the prefix"
        );
        sparse.set_dense_prefix(0);
        let none = all_logits(&sparse);
        assert!(
            !same_row(&none, 0),
            "{mode:?}: no prefix, position 0 sparse"
        );
        sparse.set_dense_prefix(3);
    }
}

/// Ignored because it writes a 300 MB PWRI copy of Gemma 3 to the temp directory, too much disk
/// and time for every CI run; run it by hand (`cargo test -p powerinfer-generate --test profile
/// -- --ignored`) after changing `pwri` or the Gemma 3 loader. The tiny-model tests above cover
/// the same code paths in CI.
#[test]
#[ignore = "real model: writes a 300 MB file"]
fn gemma3_pwri_requantizes_and_loads() {
    use powerinfer_predictor::train::{EvalStats, TrainedLayer};
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf");
    if !path.exists() {
        eprintln!("model not found; skipping");
        return;
    }
    let model = Model::load(&path).unwrap();
    let c = model.config().clone();
    let h = 8;
    let stats = EvalStats {
        threshold: 0.0,
        recall: 1.0,
        precision: 1.0,
        predicted_fraction: 1.0,
        active_fraction: 1.0,
        skip: 0.0,
        predicted_at_recall: [1.0; 3],
        train_loss: 0.0,
        n_eval: 0,
    };
    // predictors that mark every neuron active: fc1 = 0 gives p = 0 >= threshold 0
    let layers: Vec<TrainedLayer> = (0..c.n_layer)
        .map(|_| TrainedLayer {
            hidden: h,
            n_embd: c.n_embd,
            n_ff: c.n_ff,
            fc1: vec![0.0; h * c.n_embd],
            fc2: vec![0.0; c.n_ff * h],
            threshold: 0.0,
            stats,
            attempts: Vec::new(),
            reached_target: true,
        })
        .collect();
    let out = tmp("gemma.pwri.gguf");
    let opts = PwriOptions {
        keep_down: true,
        // Gemma 3's residual stream exceeds f16's range (train-predictor chooses F32 for it).
        fc1_f32: true,
        down_t: Default::default(),
        ffn_activation: "gelu".into(),
        sparsity_target: 0.5,
        // 0: every predicted neuron counts (the run below compares every neuron with dense).
        activation_thresholds: vec![0.0; c.n_layer],
        dense_prefix: 0,
    };
    let summary = write_pwri(model.file(), &layers, &opts, &out, None).unwrap();
    eprintln!("ffn_down_t types: {:?}", summary.down_t_types);
    let sparse = Model::load(&out).unwrap();
    assert!(sparse.is_sparse());
    let tok = Tokenizer::from_gguf(model.file()).unwrap();
    let prompt = tok.encode(
        "It is a truth universally acknowledged, that a single man",
        true,
        false,
    );
    let pool = ThreadPool::new(0);
    let mut st = model.new_state(64, 64).unwrap();
    let a = model
        .forward(&pool, &mut st, &prompt, Logits::Last)
        .unwrap()
        .to_vec();
    let mut st2 = sparse.new_state(64, 64).unwrap();
    let b = sparse
        .forward(&pool, &mut st2, &prompt, Logits::Last)
        .unwrap()
        .to_vec();
    let argmax = |v: &[f32]| (0..v.len()).max_by(|&x, &y| v[x].total_cmp(&v[y])).unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    eprintln!("max logit difference dense vs every-neuron sparse: {diff}");
    assert_eq!(argmax(&a), argmax(&b));
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn down_t_types() {
    use powerinfer_generate::pwri::{DownTType, choose_down_t_type};
    let c = |d, t, n| choose_down_t_type(d, t, n);
    assert_eq!(c(DownTType::Auto, GgmlType::Q4_1, 576), GgmlType::Q8_0);
    assert_eq!(c(DownTType::Auto, GgmlType::F16, 64), GgmlType::F16);
    assert_eq!(c(DownTType::Auto, GgmlType::F32, 10), GgmlType::F32);
    assert_eq!(c(DownTType::Auto, GgmlType::Q8_0, 64), GgmlType::Q8_0);
    assert_eq!(c(DownTType::Auto, GgmlType::Q4_0, 100), GgmlType::F16);
    assert_eq!(c(DownTType::Same, GgmlType::Q4_1, 576), GgmlType::Q4_1);
    // 640 is not a whole number of 256-element K-quant blocks
    assert_eq!(c(DownTType::Same, GgmlType::Q4_K, 640), GgmlType::Q8_0);
    assert_eq!(c(DownTType::Same, GgmlType::Q4_K, 1024), GgmlType::Q4_K);
    assert_eq!(
        c(DownTType::Fixed(GgmlType::Q4_0), GgmlType::F16, 64),
        GgmlType::Q4_0
    );
    assert_eq!(
        c(DownTType::Fixed(GgmlType::Q4_0), GgmlType::F16, 48),
        GgmlType::F16
    );
}
