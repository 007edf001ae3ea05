//! `opt` against Hugging Face transformers' `OPTForCausalLM`, and the PowerInfer (sparse) OPT
//! against its own dense run.
//!
//! `tests/data/opt-hf/` holds a tiny random OPT checkpoint (safetensors, Hugging Face names) and
//! the logits transformers computed for it (`make_fixture.py` there, README). The test converts
//! the checkpoint to a GGUF (dense: `ffn_down`) or a PowerInfer file (`ffn_down_t` and its bias,
//! random predictors) with our writer, as the reference's converter names OPT tensors.

mod arch_common;

use std::collections::HashMap;
use std::path::PathBuf;

use arch_common::*;
use powerinfer_cpu::ThreadPool;
use powerinfer_generate::model::SparseMode;
use powerinfer_generate::{Arch, Logits, ModelError};
use powerinfer_gguf::{GgmlType, Magic};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/opt-hf")
}

/// The f32 tensors of a safetensors file: name -> (shape, values).
fn read_safetensors(path: &std::path::Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut out = HashMap::new();
    for (name, t) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        assert_eq!(t["dtype"], "F32", "{name}");
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let off = t["data_offsets"].as_array().unwrap();
        let (s, e) = (
            off[0].as_u64().unwrap() as usize,
            off[1].as_u64().unwrap() as usize,
        );
        let values = data[s..e]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        out.insert(name.clone(), (shape, values));
    }
    out
}

struct HfReference {
    n_prompt: usize,
    ids: Vec<u32>,
    logits_f32: Vec<Vec<f32>>,
    logits_f64: Vec<Vec<f64>>,
}

fn hf_reference() -> HfReference {
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("reference.json")).unwrap(),
    )
    .unwrap();
    let rows = |v: &serde_json::Value| -> Vec<Vec<f64>> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            })
            .collect()
    };
    HfReference {
        n_prompt: j["n_prompt"].as_u64().unwrap() as usize,
        ids: j["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect(),
        logits_f32: rows(&j["logits_f32"])
            .into_iter()
            .map(|r| r.into_iter().map(|x| x as f32).collect())
            .collect(),
        logits_f64: rows(&j["logits_f64"]),
    }
}

/// How to write the checkpoint.
#[derive(Clone, Copy)]
struct Write {
    /// Type of the projection matrices (token and position tables stay F32).
    matrices: GgmlType,
    /// PowerInfer file with predictors of this hidden size and threshold.
    pwri: Option<(usize, f32)>,
}

const DENSE_F32: Write = Write {
    matrices: GgmlType::F32,
    pwri: None,
};
const PWRI_F32: Write = Write {
    matrices: GgmlType::F32,
    pwri: Some((16, 0.0)),
};

/// The fixture checkpoint as an `opt` GGUF / PowerInfer file.
fn opt_file(w: Write, drop: Option<&str>, shrink: Option<&str>) -> Vec<u8> {
    let t = read_safetensors(&fixture_dir().join("tiny-opt.safetensors"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("config.json")).unwrap())
            .unwrap();
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let (d, n_ff, n_layer) = (
        u("hidden_size") as usize,
        u("ffn_dim") as usize,
        u("num_hidden_layers"),
    );
    let magic = if w.pwri.is_some() {
        Magic::Pwri
    } else {
        Magic::Gguf
    };
    let mut b = Builder::new(magic, "opt");
    b.drop = drop.map(str::to_owned);
    b.shrink = shrink.map(str::to_owned);
    // As the reference's converter: the table's rows (2 more than the positions).
    b.kv("opt.context_length", u("max_position_embeddings") + 2);
    b.kv("opt.embedding_length", d as u32);
    b.kv("opt.block_count", n_layer);
    b.kv("opt.feed_forward_length", n_ff as u32);
    b.kv("opt.attention.head_count", u("num_attention_heads"));
    b.kv("opt.attention.layer_norm_epsilon", 1e-5f32);
    if let Some((_, thr)) = w.pwri {
        b.kv("powerinfer.sparse_threshold", thr);
    }
    let get = |n: &str| -> &Vec<f32> { &t[n].1 };
    b.matrix(
        "token_embd.weight",
        GgmlType::F32,
        get("model.decoder.embed_tokens.weight"),
        d,
    );
    b.matrix(
        "position_embd.weight",
        GgmlType::F32,
        get("model.decoder.embed_positions.weight"),
        d,
    );
    b.vector(
        "output_norm.weight",
        get("model.decoder.final_layer_norm.weight"),
    );
    b.vector(
        "output_norm.bias",
        get("model.decoder.final_layer_norm.bias"),
    );
    for i in 0..n_layer as usize {
        let hf = |n: &str| format!("model.decoder.layers.{i}.{n}");
        let p = |n: &str| format!("blk.{i}.{n}");
        for (ours, theirs) in [
            ("attn_norm", "self_attn_layer_norm"),
            ("ffn_norm", "final_layer_norm"),
        ] {
            b.vector(
                &p(&format!("{ours}.weight")),
                get(&hf(&format!("{theirs}.weight"))),
            );
            b.vector(
                &p(&format!("{ours}.bias")),
                get(&hf(&format!("{theirs}.bias"))),
            );
        }
        for (ours, theirs) in [
            ("attn_q", "self_attn.q_proj"),
            ("attn_k", "self_attn.k_proj"),
            ("attn_v", "self_attn.v_proj"),
            ("attn_output", "self_attn.out_proj"),
            ("ffn_up", "fc1"),
        ] {
            b.matrix(
                &p(&format!("{ours}.weight")),
                w.matrices,
                get(&hf(&format!("{theirs}.weight"))),
                d,
            );
            b.vector(
                &p(&format!("{ours}.bias")),
                get(&hf(&format!("{theirs}.bias"))),
            );
        }
        let down = get(&hf("fc2.weight"));
        match w.pwri {
            None => {
                b.matrix(&p("ffn_down.weight"), w.matrices, down, n_ff);
                b.vector(&p("ffn_down.bias"), get(&hf("fc2.bias")));
            }
            Some((hidden, _)) => {
                b.matrix(
                    &p("ffn_down_t.weight"),
                    w.matrices,
                    &transpose(down, d, n_ff),
                    d,
                );
                b.vector(&p("ffn_down_t.bias"), get(&hf("fc2.bias")));
                let mut r = Rng::new(77 + i as u64);
                let s1 = 1.7 / (d as f32).sqrt();
                b.matrix(&p("fc1.weight"), GgmlType::F16, &r.vec(hidden * d, s1), d);
                let s2 = 1.7 / (hidden as f32).sqrt();
                b.matrix(
                    &p("fc2.weight"),
                    GgmlType::F16,
                    &r.vec(n_ff * hidden, s2),
                    hidden,
                );
            }
        }
    }
    b.finish()
}

/// Largest |ours - transformers (float64)| allowed on F32 weights: ours keeps keys and values
/// in f16 and rounds the attention's queries / V sums to f16 as llama.cpp does (transformers'
/// own float32 logits are within 4e-6 of its float64 ones); measured: 0.0045 (logits reach 16).
const HF_TOL_F32: f32 = 0.01;
/// The same with F16 matrices (activations rounded to f16 before every product); measured: 0.0068.
const HF_TOL_F16: f32 = 0.02;

fn check_against_hf(got: &[Vec<f32>], r: &HfReference, tol: f32, what: &str) {
    let mut worst = 0.0f32;
    for (i, (a, b)) in got.iter().zip(&r.logits_f64).enumerate() {
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - y).abs() as f32)
            .fold(0.0, f32::max);
        worst = worst.max(d);
        assert!(d <= tol, "{what} row {i}: |ours - transformers| {d}");
        // The arg-max wherever transformers' lead exceeds twice the difference.
        let f = &r.logits_f32[i];
        let top = argmax(f);
        let second = f
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != top)
            .map(|(_, &v)| v)
            .fold(f32::NEG_INFINITY, f32::max);
        if f[top] - second > 2.0 * d {
            assert_eq!(argmax(a), top, "{what} row {i}");
        }
        if i + 1 >= r.n_prompt && i + 1 < r.ids.len() {
            assert_eq!(
                argmax(a) as u32,
                r.ids[i + 1],
                "{what}: greedy token after row {i}"
            );
        }
    }
    println!("{what}: max |ours - transformers| {worst}");
}

#[test]
fn dense_opt_matches_transformers() {
    let r = hf_reference();
    for (w, tol) in [
        (DENSE_F32, HF_TOL_F32),
        (
            Write {
                matrices: GgmlType::F16,
                pwri: None,
            },
            HF_TOL_F16,
        ),
    ] {
        let m = load(opt_file(w, None, None));
        assert_eq!(m.config().arch, Arch::Opt);
        assert_eq!(m.config().n_ctx_train, 40);
        assert!(!m.is_sparse());
        for threads in [1, 2] {
            let got = prompt_then_decode(&m, threads, &r.ids, r.n_prompt);
            check_against_hf(
                &got,
                &r,
                tol,
                &format!("dense {:?}, {threads} threads", w.matrices),
            );
        }
        // The whole sequence as one prompt (every row from the batched path).
        let got = prompt_then_decode(&m, 2, &r.ids, r.ids.len());
        check_against_hf(&got, &r, tol, &format!("dense {:?}, one batch", w.matrices));
    }
}

#[test]
fn sparse_opt_every_neuron_matches_transformers_and_disable_sparse() {
    let r = hf_reference();
    let mut m = load(opt_file(PWRI_F32, None, None));
    assert!(m.is_sparse());
    let mut runs = Vec::new();
    for threads in [1, 2] {
        let dense = run_sparse(&mut m, threads, &r.ids, r.n_prompt, SparseMode::Dense, None);
        let all = run_sparse(
            &mut m,
            threads,
            &r.ids,
            r.n_prompt,
            SparseMode::Predicted,
            Some(-1e30),
        );
        assert!(bit_equal(&dense, &all), "{threads} threads");
        let rows: Vec<Vec<f32>> = dense
            .chunks_exact(m.config().n_vocab)
            .map(|c| c.to_vec())
            .collect();
        check_against_hf(
            &rows,
            &r,
            HF_TOL_F32,
            &format!("PowerInfer, every neuron, {threads} threads"),
        );
        runs.push(dense);
    }
    assert!(bit_equal(&runs[0], &runs[1]), "1 vs 2 threads");
}

#[test]
fn random_predictor_is_deterministic_and_skips_neurons() {
    let r = hf_reference();
    let mut m = load(opt_file(PWRI_F32, None, None));
    let a = run_sparse(&mut m, 1, &r.ids, r.n_prompt, SparseMode::Predicted, None);
    let b = run_sparse(&mut m, 2, &r.ids, r.n_prompt, SparseMode::Predicted, None);
    let c = run_sparse(&mut m, 1, &r.ids, r.n_prompt, SparseMode::Predicted, None);
    assert!(bit_equal(&a, &b) && bit_equal(&a, &c));
    let dense = run_sparse(&mut m, 1, &r.ids, r.n_prompt, SparseMode::Dense, None);
    assert!(max_abs_diff(&a, &dense) > 1e-3, "nothing skipped");
    let pool = ThreadPool::new(1);
    let mut st = m.new_state(32, 32).unwrap();
    st.measure_predictors(m.config().n_layer);
    m.forward(&pool, &mut st, &r.ids, Logits::None).unwrap();
    let t = st.predictor_quality().unwrap().total();
    let (pred, truth) = (t.predicted_fraction(), t.true_fraction());
    println!("predicted {pred:.3}, truly active {truth:.3}");
    assert!(pred > 0.1 && pred < 0.9, "predicted share {pred}");
    assert!(truth > 0.1 && truth < 0.9, "active share {truth}");
}

#[test]
fn batch_decode_equals_single_sequences() {
    let m = load(opt_file(DENSE_F32, None, None));
    let pool = ThreadPool::new(2);
    let nv = m.config().n_vocab;
    let prompts: [&[u32]; 3] = [&[2, 5, 9], &[2, 60, 61, 62, 63, 64], &[2]];
    let mut alone = Vec::new();
    let mut states = Vec::new();
    for p in prompts {
        let mut st = m.new_state(16, 8).unwrap();
        m.forward(&pool, &mut st, p, Logits::None).unwrap();
        let mut solo = m.new_state(16, 8).unwrap();
        m.forward(&pool, &mut solo, p, Logits::None).unwrap();
        alone.push(
            m.forward(&pool, &mut solo, &[33], Logits::Last)
                .unwrap()
                .to_vec(),
        );
        states.push(st);
    }
    let mut b = m.new_batch_state();
    let mut refs: Vec<&mut powerinfer_generate::ModelState> = states.iter_mut().collect();
    let out = m
        .forward_batch(&pool, &mut b, &mut refs, &[33, 33, 33])
        .unwrap();
    for (i, a) in alone.iter().enumerate() {
        assert!(bit_equal(&out[i * nv..(i + 1) * nv], a), "sequence {i}");
    }
}

#[test]
fn positions_past_the_learned_table_are_an_error() {
    let m = load(opt_file(DENSE_F32, None, None));
    let pool = ThreadPool::new(1);
    let mut st = m.new_state(64, 64).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| i % 70).collect();
    m.forward(&pool, &mut st, &ids, Logits::Last).unwrap();
    match m.forward(&pool, &mut st, &[3], Logits::Last) {
        Err(ModelError::ContextOverflow {
            pos: 40, n_ctx: 40, ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn damaged_files_are_clear_errors() {
    for (w, drop, shrink, name) in [
        (
            PWRI_F32,
            Some("blk.0.ffn_down_t.bias"),
            None,
            "blk.0.ffn_down_t.bias",
        ),
        (PWRI_F32, Some("blk.1.fc1.weight"), None, "blk.1.fc1.weight"),
        (
            PWRI_F32,
            None,
            Some("blk.1.ffn_up.bias"),
            "blk.1.ffn_up.bias",
        ),
        (
            PWRI_F32,
            None,
            Some("blk.0.ffn_down_t.weight"),
            "blk.0.ffn_down_t.weight",
        ),
        (
            PWRI_F32,
            Some("blk.0.ffn_up.weight"),
            None,
            "blk.0.ffn_up.weight",
        ),
        (
            DENSE_F32,
            Some("position_embd.weight"),
            None,
            "position_embd.weight",
        ),
        (
            DENSE_F32,
            Some("blk.1.attn_q.bias"),
            None,
            "blk.1.attn_q.bias",
        ),
        (
            DENSE_F32,
            Some("blk.0.ffn_norm.bias"),
            None,
            "blk.0.ffn_norm.bias",
        ),
        (
            DENSE_F32,
            None,
            Some("blk.0.attn_v.weight"),
            "blk.0.attn_v.weight",
        ),
        (
            DENSE_F32,
            Some("blk.1.ffn_down.bias"),
            None,
            "blk.1.ffn_down.bias",
        ),
    ] {
        let e = load_err(opt_file(w, drop, shrink));
        assert!(e.contains(name), "{name}: {e}");
    }
}
