//! Greedy generation against llama.cpp's: `tests/data/llamacpp-token-ids.json` holds llama.cpp's
//! prompt ids and greedy ids (32 new tokens, 2 threads, flash attention auto) for the five
//! golden prompts of SmolLM2 and Gemma 3.
//!
//! The check is teacher-forced: one batched forward of `prompt + generated[..len-1]` gives our
//! logits after every prefix of llama.cpp's continuation (our batched and token-by-token forwards
//! are bit-identical below 64 tokens, see `model_real.rs`), so our greedy continuation equals
//! llama.cpp's up to the first position whose arg-max differs.
//!
//! What is asserted, and why not "the whole continuation": these small quantized models are
//! chaotic at the level of rounding. llama.cpp itself with flash attention off (same weights,
//! only the attention rounding changed) gives logits whose difference from its flash-attention
//! run has a standard deviation of 0.1-0.3 (ours: 0.1-0.2), and its greedy continuations then
//! equal the golden ones whole on only 1/5 SmolLM2 and 3/5 Gemma 3 prompts (first 16 tokens on
//! 2/5 and 3/5). Only bit-exact emulation of every kernel would reproduce all of them. So this
//! test requires the same first token on every prompt, arg-max agreement at >= 93% of the 160
//! teacher-forced positions per model (llama.cpp with flash attention off: 150/160 and 156/160),
//! and that wherever we disagree llama.cpp's token is within 0.5 logits of our top one (a
//! near-tie, not a wrong model); it prints the greedy-prefix lengths.

use std::path::PathBuf;

use powerinfer_cpu::ThreadPool;
use powerinfer_generate::{Logits, Model};

struct Case {
    prompt: String,
    prompt_ids: Vec<u32>,
    generated: Vec<u32>,
    eog: Option<u32>,
}

fn cases(model_file: &str) -> Vec<Case> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/llamacpp-token-ids.json");
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    j["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["model"] == model_file)
        .map(|c| Case {
            prompt: c["prompt"].as_str().unwrap().to_owned(),
            prompt_ids: ids(&c["prompt_ids"]),
            generated: ids(&c["generated_ids"]),
            eog: c["eog_id"].as_u64().map(|x| x as u32),
        })
        .collect()
}

/// Arg-max, first index on ties (like llama.cpp's greedy sampler), and its lead over the runner-up.
fn argmax_gap(x: &[f32]) -> (u32, f32) {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    let second = x
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != best)
        .map(|(_, &v)| v)
        .fold(f32::NEG_INFINITY, f32::max);
    (best as u32, x[best] - second)
}

fn check_model(model_file: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(model_file);
    if !path.exists() {
        eprintln!(
            "skipping: {} not found (scripts/fetch-models.sh fetches it)",
            path.display()
        );
        return;
    }
    let model = Model::load(&path).unwrap();
    let cases = cases(model_file);
    assert_eq!(cases.len(), 5, "{model_file}: expected 5 cases");
    let nv = model.config().n_vocab;
    let pool = ThreadPool::new(2);
    let (mut agree, mut total, mut whole, mut first16) = (0, 0, 0, 0);
    for c in &cases {
        // the tokens whose predecessors' logits we need: every generated token, then EOG if any
        let mut targets = c.generated.clone();
        targets.extend(c.eog);
        let mut input = c.prompt_ids.clone();
        input.extend(&c.generated[..targets.len() - 1]);
        let mut st = model.new_state(input.len(), 64).unwrap();
        let logits = model.forward(&pool, &mut st, &input, Logits::All).unwrap();
        let np = c.prompt_ids.len();
        let mut prefix = None;
        for (k, &want) in targets.iter().enumerate() {
            let row = &logits[(np - 1 + k) * nv..(np + k) * nv];
            let (got, lead) = argmax_gap(row);
            total += 1;
            if got == want {
                agree += 1;
                continue;
            }
            prefix.get_or_insert(k);
            let behind = row[got as usize] - row[want as usize];
            eprintln!(
                "{model_file} {:?} step {k}: ours {got} (lead {lead:.3}), llama.cpp's {want} is {behind:.3} below",
                c.prompt
            );
            assert!(
                k > 0,
                "{model_file} {:?}: first generated token differs",
                c.prompt
            );
            assert!(
                behind < 0.5,
                "{model_file} {:?} step {k}: llama.cpp's token is {behind} logits below ours",
                c.prompt
            );
        }
        let prefix = prefix.unwrap_or(targets.len());
        eprintln!(
            "{model_file} {:?}: greedy continuation equals llama.cpp's for {prefix}/{} tokens",
            c.prompt,
            targets.len()
        );
        whole += usize::from(prefix == targets.len());
        first16 += usize::from(prefix >= 16.min(targets.len()));
    }
    eprintln!(
        "{model_file}: teacher-forced arg-max agrees with llama.cpp at {agree}/{total} positions; whole continuation on {whole}/5, first 16 tokens on {first16}/5"
    );
    assert!(
        agree * 100 >= total * 93,
        "{model_file}: arg-max agrees at only {agree}/{total} positions"
    );
}

#[test]
fn smollm2_greedy_matches_llamacpp() {
    check_model("SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn gemma3_greedy_matches_llamacpp() {
    check_model("gemma-3-270m-q4_k_m.gguf");
}
