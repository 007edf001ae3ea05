//! Synthetic files: determinism, structure, predictor statistics, the dense twin, the tokenizer
//! and bad input. Tiny shapes keep every test fast.

use std::path::PathBuf;

use powerinfer_gguf::{GgmlType, GgufFile, Magic};
use powerinfer_quant::dequantize_row;
use powerinfer_synth::{
    Layout, ModelShape, Synth, SynthConfig, SynthError, measure_activity, parse_weight_type,
    with_threads,
};

fn tiny_shape() -> ModelShape {
    ModelShape {
        n_embd: 64,
        n_ff: 256,
        n_layer: 2,
        n_head: 4,
        n_head_kv: 2,
        n_vocab: 300,
        n_ctx: 256,
    }
}

fn tiny(seed: u64) -> Synth {
    Synth::new(SynthConfig::new(tiny_shape(), GgmlType::Q4_0, seed)).unwrap()
}

fn bytes(s: &Synth, layout: Layout) -> Vec<u8> {
    s.write(layout, Vec::new(), &|_| {}).unwrap()
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("powerinfer-synth-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn dequant(f: &GgufFile, name: &str) -> (Vec<f32>, usize, usize) {
    let t = f.tensor(name).unwrap_or_else(|| panic!("missing {name}"));
    let cols = t.shape[0] as usize;
    let rows = t.shape.get(1).copied().unwrap_or(1) as usize;
    let data = f.tensor_data(t);
    let rb = data.len() / rows;
    let mut out = vec![0f32; rows * cols];
    for r in 0..rows {
        dequantize_row(
            t.ty,
            &data[r * rb..(r + 1) * rb],
            &mut out[r * cols..(r + 1) * cols],
        )
        .unwrap();
    }
    (out, rows, cols)
}

#[test]
fn deterministic_across_runs_and_thread_counts() {
    let s = tiny(7);
    let one = with_threads(1, || bytes(&s, Layout::PowerInfer)).unwrap();
    let three = with_threads(3, || bytes(&s, Layout::PowerInfer)).unwrap();
    assert_eq!(one, three, "thread count changed the bytes");
    assert_eq!(
        one,
        bytes(&tiny(7), Layout::PowerInfer),
        "same seed, same bytes"
    );
    assert_ne!(one, bytes(&tiny(8), Layout::PowerInfer), "the seed matters");
    let d1 = with_threads(1, || bytes(&s, Layout::Dense)).unwrap();
    let d3 = with_threads(3, || bytes(&s, Layout::Dense)).unwrap();
    assert_eq!(d1, d3);
    assert_eq!(one.len() as u64, s.file_size(Layout::PowerInfer).unwrap());
    assert_eq!(d1.len() as u64, s.file_size(Layout::Dense).unwrap());
}

#[test]
fn chunking_does_not_change_bytes() {
    // A vocabulary large enough that token_embd / output span several 8 MiB chunks in F32.
    let mut shape = tiny_shape();
    shape.n_vocab = 40_000;
    shape.n_layer = 1;
    let cfg = SynthConfig::new(shape, GgmlType::F32, 3);
    let s = Synth::new(cfg).unwrap();
    let b1 = with_threads(1, || bytes(&s, Layout::Dense)).unwrap();
    let b2 = with_threads(2, || bytes(&s, Layout::Dense)).unwrap();
    assert_eq!(b1, b2);
    // Element (r, c) of the embedding is the pure function `element`.
    let f = GgufFile::from_bytes(b1).unwrap();
    let (e, rows, cols) = dequant(&f, "token_embd.weight");
    for &r in &[0usize, 1, 29_000, rows - 1] {
        for &c in &[0usize, 5, cols - 1] {
            assert_eq!(
                e[r * cols + c],
                s.element(powerinfer_synth::MatrixKind::TokenEmbd, 0, r, c)
            );
        }
    }
}

#[test]
fn powerinfer_file_has_the_reference_layout() {
    let s = tiny(1);
    let f = GgufFile::from_bytes(bytes(&s, Layout::PowerInfer)).unwrap();
    assert_eq!(f.magic(), Magic::Pwri);
    assert_eq!(f.version(), 3);
    assert_eq!(f.architecture(), Some("llama"));
    assert!(f.get_bool("powerinfer.synthetic").unwrap());
    assert!((f.get_f32("powerinfer.synthetic.sparsity").unwrap() - 0.9).abs() < 1e-6);
    assert_eq!(f.get_f32("powerinfer.sparse_threshold").unwrap(), 0.0);
    assert_eq!(f.get_arch_u32("embedding_length").unwrap(), 64);
    assert_eq!(f.get_arch_u32("feed_forward_length").unwrap(), 256);
    assert_eq!(f.get_arch_u32("block_count").unwrap(), 2);
    assert_eq!(f.get_arch_u32("attention.head_count").unwrap(), 4);
    assert_eq!(f.get_arch_u32("attention.head_count_kv").unwrap(), 2);
    assert_eq!(f.get_arch_u32("rope.dimension_count").unwrap(), 16);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "llama");
    assert_eq!(f.get_strings("tokenizer.ggml.tokens").unwrap().len(), 300);
    let h = s.predictor_hidden() as u64;
    assert_eq!(h, 64);
    let q4 = GgmlType::Q4_0;
    // n_embd 64 is not a multiple of 256: output is Q8_0, as the reference quantizer does.
    let mut want: Vec<(String, GgmlType, Vec<u64>)> = vec![
        ("output.weight".into(), GgmlType::Q8_0, vec![64, 300]),
        ("token_embd.weight".into(), q4, vec![64, 300]),
    ];
    for l in 0..2 {
        let p = |t: &str| format!("blk.{l}.{t}.weight");
        want.push((p("attn_norm"), GgmlType::F32, vec![64]));
        want.push((p("ffn_down_t"), q4, vec![64, 256]));
        want.push((p("ffn_gate"), q4, vec![64, 256]));
        want.push((p("ffn_up"), q4, vec![64, 256]));
        want.push((p("ffn_norm"), GgmlType::F32, vec![64]));
        want.push((p("attn_k"), q4, vec![64, 32]));
        want.push((p("attn_output"), q4, vec![64, 64]));
        want.push((p("attn_q"), q4, vec![64, 64]));
        want.push((p("attn_v"), q4, vec![64, 32]));
    }
    want.push(("output_norm.weight".into(), GgmlType::F32, vec![64]));
    for l in 0..2 {
        want.push((format!("blk.{l}.fc1.weight"), q4, vec![64, h]));
        want.push((format!("blk.{l}.fc2.weight"), q4, vec![h, 256]));
    }
    let got: Vec<(String, GgmlType, Vec<u64>)> = f
        .tensors()
        .iter()
        .map(|t| (t.name.clone(), t.ty, t.shape.clone()))
        .collect();
    assert_eq!(got, want);
    let listed: Vec<(String, GgmlType, Vec<u64>)> = s
        .tensor_list(Layout::PowerInfer)
        .into_iter()
        .map(|t| (t.name, t.ty, t.shape))
        .collect();
    assert_eq!(listed, want);
    // Norms are ones; weights have the intended scale (std 1/sqrt(n_in)).
    let (n, _, _) = dequant(&f, "blk.1.ffn_norm.weight");
    assert!(n.iter().all(|&x| x == 1.0));
    let (g, _, _) = dequant(&f, "blk.0.ffn_gate.weight");
    let var = g.iter().map(|&x| (x * x) as f64).sum::<f64>() / g.len() as f64;
    assert!((var * 64.0 - 1.0).abs() < 0.1, "gate variance {var}");
    // fc1 rows come in exact ± pairs (Q4_0 quantizes -w to exactly -q(w)).
    let (fc1, rows, cols) = dequant(&f, "blk.0.fc1.weight");
    for k in 0..rows / 2 {
        for c in 0..cols {
            assert_eq!(fc1[2 * k * cols + c], -fc1[(2 * k + 1) * cols + c]);
        }
    }
}

#[test]
fn dense_twin_matches_the_powerinfer_file() {
    let s = tiny(5);
    let pi = GgufFile::from_bytes(bytes(&s, Layout::PowerInfer)).unwrap();
    let dense = GgufFile::from_bytes(bytes(&s, Layout::Dense)).unwrap();
    assert_eq!(dense.magic(), Magic::Gguf);
    assert!(dense.get("powerinfer.synthetic").is_none());
    assert!(dense.get("powerinfer.sparse_threshold").is_none());
    assert!(dense.tensors().iter().all(|t| !t.name.contains("fc1")
        && !t.name.contains("fc2")
        && !t.name.contains("ffn_down_t")));
    assert_eq!(dense.tensors().len() + 2 * 2, pi.tensors().len());
    for t in dense.tensors() {
        if t.name.contains("ffn_down") {
            continue;
        }
        assert_eq!(
            dense.tensor_data(t),
            pi.tensor_bytes(&t.name).unwrap(),
            "{} differs between the layouts",
            t.name
        );
    }
    for l in 0..2 {
        let (down, rows, cols) = dequant(&dense, &format!("blk.{l}.ffn_down.weight"));
        assert_eq!((rows, cols), (64, 256));
        let (down_t, rows_t, cols_t) = dequant(&pi, &format!("blk.{l}.ffn_down_t.weight"));
        assert_eq!((rows_t, cols_t), (256, 64));
        // Same values before quantization; Q4_0 error is at most half a step (max|block| / 8
        // per element, so under 1/16 of the larger of the two blocks' maxima).
        let amax = down.iter().fold(0f32, |m, &x| m.max(x.abs()));
        let mut worst = 0f32;
        for o in 0..64 {
            for i in 0..256 {
                let exact = s.element(powerinfer_synth::MatrixKind::FfnDown, l, o, i);
                let a = down[o * 256 + i];
                let b = down_t[i * 64 + o];
                assert!((a - exact).abs() <= amax / 8.0 + 1e-6, "dense ({o},{i})");
                assert!(
                    (b - exact).abs() <= amax / 8.0 + 1e-6,
                    "transposed ({o},{i})"
                );
                worst = worst.max((a - b).abs());
            }
        }
        assert!(
            worst > 0.0,
            "quantization groups differ, so some values must differ"
        );
        assert!(worst <= amax / 4.0, "worst {worst} amax {amax}");
    }
}

#[test]
fn predictors_hit_the_sparsity_and_the_hot_mass() {
    for &(sparsity, hot_share, hot_mass) in &[(0.9, 0.2, 0.8), (0.8, 0.2, 0.6), (0.95, 0.1, 0.7)] {
        let mut cfg = SynthConfig::new(tiny_shape(), GgmlType::Q4_0, 11);
        cfg.shape.n_ff = 512;
        cfg.sparsity = sparsity;
        cfg.hot_share = hot_share;
        cfg.hot_mass = hot_mass;
        let s = Synth::new(cfg).unwrap();
        let f = GgufFile::from_bytes(bytes(&s, Layout::PowerInfer)).unwrap();
        let r = measure_activity(&f, None, 600, hot_share, 99, 1).unwrap();
        let want = 1.0 - sparsity;
        for (l, a) in r.layers.iter().enumerate() {
            assert!(
                (a.mean_fraction - want).abs() < 0.015,
                "sparsity {sparsity} layer {l}: active {:.4} want {want:.4}",
                a.mean_fraction
            );
            assert!(
                a.min_fraction > want * 0.3 && a.max_fraction < want * 2.0 + 0.05,
                "per-token spread {a:?}"
            );
            assert!(
                (a.hot_mass - hot_mass).abs() < 0.05,
                "sparsity {sparsity} layer {l}: hot mass {:.3} want {hot_mass}",
                a.hot_mass
            );
        }
        // The targets themselves are exact.
        let q = s.neuron_probabilities(0);
        let mean = q.iter().sum::<f64>() / q.len() as f64;
        assert!((mean - want).abs() < 1e-6);
        assert_ne!(q, s.neuron_probabilities(1), "hot neurons differ per layer");
    }
}

#[test]
fn dense_twin_runs_in_our_model() {
    let dir = tmp_dir("dense");
    let path = dir.join("tiny.dense.gguf");
    let s = tiny(2);
    let size = s.write_file(Layout::Dense, &path, &|_| {}).unwrap();
    assert_eq!(size, std::fs::metadata(&path).unwrap().len());
    assert!(!dir.join("tiny.dense.gguf.partial").exists());
    let model = powerinfer_generate::model::Model::load(&path).unwrap();
    assert_eq!(model.config().n_vocab, 300);
    assert_eq!(model.config().n_head_kv, 2);
    let pool = powerinfer_cpu::ThreadPool::new(2);
    let mut state = model.new_state(64, 16).unwrap();
    let logits = model
        .forward(
            &pool,
            &mut state,
            &[1, 300 - 1, 17, 259, 42],
            powerinfer_generate::model::Logits::All,
        )
        .unwrap();
    assert_eq!(logits.len(), 5 * 300);
    assert!(logits.iter().all(|x| x.is_finite()));
    let spread = logits.iter().fold(0f32, |m, &x| m.max(x.abs()));
    assert!(spread > 0.1 && spread < 100.0, "logit scale {spread}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tokenizer_loads_and_round_trips() {
    use powerinfer_generate::tokenizer::Tokenizer;
    for n_vocab in [300usize, 32000] {
        let mut shape = tiny_shape();
        shape.n_vocab = n_vocab;
        shape.n_layer = 1;
        let s = Synth::new(SynthConfig::new(shape, GgmlType::Q8_0, 0)).unwrap();
        let f = GgufFile::from_bytes(bytes(&s, Layout::Dense)).unwrap();
        let tok = Tokenizer::from_gguf(&f).unwrap();
        assert_eq!(tok.vocab_size(), n_vocab);
        assert_eq!(tok.bos(), Some(1));
        assert_eq!(tok.eos(), Some(2));
        for text in [
            "Once upon a time, there was a little fox.",
            "Hello World 1234 !?",
            "tabs\tand\nnewlines",
            "ünïcödé — 日本語 🙂",
            "  leading and trailing spaces  ",
            "",
        ] {
            let ids = tok.encode(text, true, false);
            assert_eq!(ids.first(), Some(&1));
            assert!(ids.iter().all(|&i| (i as usize) < n_vocab));
            assert_eq!(tok.decode(&ids[1..], false), text, "round trip of {text:?}");
        }
        // Pieces are used when the vocabulary has them: fewer tokens than bytes.
        let ids = tok.encode("the cat sat on the mat", false, false);
        if n_vocab == 32000 {
            assert!(ids.len() < 12, "{ids:?}");
        }
    }
}

#[test]
fn bad_input_gives_clear_errors() {
    assert!(matches!(
        ModelShape::preset("llama-8b"),
        Err(SynthError::UnknownShape(s)) if s == "llama-8b"
    ));
    for bad in [0.0, 1.0, -0.5, 1.5, f64::NAN] {
        let mut cfg = SynthConfig::new(tiny_shape(), GgmlType::Q4_0, 0);
        cfg.sparsity = bad;
        assert!(
            matches!(Synth::new(cfg), Err(SynthError::BadSparsity(_))),
            "{bad}"
        );
    }
    let mut cfg = SynthConfig::new(tiny_shape(), GgmlType::Q4_0, 0);
    cfg.hot_share = 1.0;
    assert!(matches!(Synth::new(cfg), Err(SynthError::BadHotShare(_))));
    let mut cfg = SynthConfig::new(tiny_shape(), GgmlType::Q4_0, 0);
    cfg.sparsity = 0.5;
    let e = Synth::new(cfg).unwrap_err();
    assert!(matches!(e, SynthError::InfeasibleSkew { .. }), "{e}");
    assert!(matches!(
        parse_weight_type("q3_x"),
        Err(SynthError::UnknownType(_))
    ));
    assert!(matches!(
        parse_weight_type("bf16"),
        Err(SynthError::UnsupportedType { .. })
    ));
    assert!(matches!(
        parse_weight_type("q8_k"),
        Err(SynthError::UnsupportedType { .. })
    ));
    assert_eq!(parse_weight_type("Q6_K").unwrap(), GgmlType::Q6_K);
    // Q4_K needs rows that are multiples of 256.
    let e = Synth::new(SynthConfig::new(tiny_shape(), GgmlType::Q4_K, 0)).unwrap_err();
    assert!(e.to_string().contains("block size 256"), "{e}");
    let mut shape = tiny_shape();
    shape.n_head = 5;
    let e = Synth::new(SynthConfig::new(shape, GgmlType::Q4_0, 0)).unwrap_err();
    assert!(matches!(e, SynthError::BadShape(_)), "{e}");
    let mut shape = tiny_shape();
    shape.n_vocab = 100;
    assert!(matches!(
        Synth::new(SynthConfig::new(shape, GgmlType::Q4_0, 0)),
        Err(SynthError::BadShape(_))
    ));
    let mut cfg = SynthConfig::new(tiny_shape(), GgmlType::Q4_0, 0);
    cfg.predictor_hidden = Some(33);
    assert!(Synth::new(cfg).is_err());
    // An unwritable output names the path.
    let e = tiny(0)
        .write_file(
            Layout::PowerInfer,
            "/nonexistent-dir/x.powerinfer.gguf",
            &|_| {},
        )
        .unwrap_err();
    assert!(matches!(e, SynthError::Io { .. }));
    assert!(
        e.to_string().contains("/nonexistent-dir/x.powerinfer.gguf"),
        "{e}"
    );
}

#[test]
fn presets_validate_and_size_as_expected() {
    let s7 = Synth::new(SynthConfig::new(ModelShape::LLAMA_7B, GgmlType::Q4_0, 1)).unwrap();
    assert_eq!(s7.predictor_hidden(), 256);
    assert_eq!(s7.output_type(), GgmlType::Q6_K);
    let size = s7.file_size(Layout::PowerInfer).unwrap();
    // 6.74e9 Q4_0 weights at 4.5 bits plus a Q6_K head: about 3.9 GB.
    assert!((3.7e9..4.1e9).contains(&(size as f64)), "{size}");
    let dense = s7.file_size(Layout::Dense).unwrap();
    assert!(dense < size, "no predictors in the twin");
    let s70 = Synth::new(SynthConfig::new(ModelShape::LLAMA_70B, GgmlType::Q4_0, 1)).unwrap();
    assert_eq!(s70.predictor_hidden(), 512);
    let t = s70.tensor_list(Layout::PowerInfer);
    let k = t.iter().find(|t| t.name == "blk.0.attn_k.weight").unwrap();
    assert_eq!(k.shape, vec![8192, 1024]);
}

struct CollectInputs {
    per_layer: Vec<Vec<f32>>,
}

impl powerinfer_generate::model::FfnObserver for CollectInputs {
    fn observe(&mut self, layer: usize, _n_tokens: usize, input: &[f32], _hidden: &[f32]) {
        self.per_layer[layer].extend_from_slice(input);
    }
}

/// The PowerInfer file runs in our sparse engine, and on the residual streams it actually
/// produces (not random vectors) the predictors still activate about `1 - sparsity`.
#[test]
fn powerinfer_file_runs_sparse_and_real_ffn_inputs_hit_the_sparsity() {
    use powerinfer_generate::model::{Logits, Model};
    let dir = tmp_dir("sparse");
    let path = dir.join("tiny.powerinfer.gguf");
    let mut cfg = SynthConfig::new(tiny_shape(), GgmlType::Q4_0, 21);
    cfg.shape.n_ff = 512;
    let s = Synth::new(cfg).unwrap();
    s.write_file(Layout::PowerInfer, &path, &|_| {}).unwrap();
    let model = Model::load(&path).unwrap();
    assert!(model.is_sparse());
    let pool = powerinfer_cpu::ThreadPool::new(2);
    let n = 240;
    let mut state = model.new_state(n, 64).unwrap();
    let mut rng = 0x1234_5678_9abc_def0u64;
    let tokens: Vec<u32> = std::iter::once(1)
        .chain((1..n).map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % 300) as u32
        }))
        .collect();
    let mut obs = CollectInputs {
        per_layer: vec![Vec::new(); 2],
    };
    let logits = model
        .forward_observed(&pool, &mut state, &tokens, Logits::All, &mut obs)
        .unwrap();
    assert!(logits.iter().all(|x| x.is_finite()));
    let f = GgufFile::open(&path).unwrap();
    for (layer, inputs) in obs.per_layer.iter().enumerate() {
        assert_eq!(inputs.len(), n * 64);
        let a = powerinfer_synth::measure_inputs(&f, layer, inputs, 0.2, 1).unwrap();
        assert!(
            (a.mean_fraction - 0.1).abs() < 0.02,
            "layer {layer}: active {a:?} on the model's own FFN inputs"
        );
        // Real streams are correlated across tokens, which sharpens the skew a little.
        assert!(
            (a.hot_mass - 0.8).abs() < 0.07,
            "layer {layer}: hot mass {a:?} on the model's own FFN inputs"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
