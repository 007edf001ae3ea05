//! The generation loop on the tiny fixture model: prefix reuse, limits, stop strings, errors.

use std::path::Path;

use powerinfer_cpu::ThreadPool;
use powerinfer_generate::Model;
use powerinfer_generate::generation::{FinishReason, GenerateError, GenerateOptions, Generator};
use powerinfer_generate::sampling::SamplerConfig;
use powerinfer_generate::tokenizer::Tokenizer;

fn fixture() -> Option<(Model, Tokenizer)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/powerinfer-tiny/tiny-relu-llama.dense.f16.gguf");
    if !path.exists() {
        eprintln!("skipping: fixture {} absent", path.display());
        return None;
    }
    let model = Model::load(&path).expect("fixture loads");
    let tok = Tokenizer::from_gguf(model.file()).expect("fixture tokenizer");
    Some((model, tok))
}

fn greedy(max_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler: SamplerConfig::greedy(),
        stop_at_eog: false,
        ..Default::default()
    }
}

fn run(
    g: &mut Generator<'_>,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> (Vec<u32>, String, FinishReason) {
    let mut stream = g.generate(prompt, opts).expect("generate");
    let mut ids = Vec::new();
    let mut text = String::new();
    for t in stream.by_ref() {
        let t = t.expect("token");
        ids.push(t.id);
        text.push_str(&t.text);
    }
    text.push_str(&stream.flush());
    let reason = stream.finish_reason().expect("finished");
    (ids, text, reason)
}

#[test]
fn cached_prefix_gives_the_same_tokens_as_a_fresh_cache() {
    let Some((model, tok)) = fixture() else {
        return;
    };
    let pool = ThreadPool::new(2);
    let prompt = tok.encode("Once upon a time there was", true, false);
    let mut fresh = Generator::new(&model, &tok, &pool, 128, 16).unwrap();
    let (want, _, reason) = run(&mut fresh, &prompt, &greedy(12));
    assert_eq!(reason, FinishReason::Length);
    assert_eq!(want.len(), 12);

    // A generator that already holds a prefix of the prompt (and unrelated tokens after it).
    let mut warm = Generator::new(&model, &tok, &pool, 128, 16).unwrap();
    let mut other = prompt[..3].to_vec();
    other.extend_from_slice(&[700, 701, 702]);
    run(&mut warm, &other, &greedy(5));
    assert!(warm.history().starts_with(&prompt[..3]));
    let (got, _, _) = run(&mut warm, &prompt, &greedy(12));
    assert_eq!(got, want);
    // The cache now holds the prompt and all generated tokens but the last.
    assert_eq!(warm.history().len(), prompt.len() + 11);
}

#[test]
fn stop_strings_cut_the_text_and_end_generation() {
    let Some((model, tok)) = fixture() else {
        return;
    };
    let pool = ThreadPool::new(1);
    let prompt = tok.encode("Once upon a time", true, false);
    let mut g = Generator::new(&model, &tok, &pool, 128, 16).unwrap();
    let (_, text, _) = run(&mut g, &prompt, &greedy(24));
    // A stop string from the middle of the greedy text (on a char boundary).
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    assert!(chars.len() >= 8, "text too short: {text:?}");
    let start = chars[chars.len() / 2].0;
    let end = chars.get(chars.len() / 2 + 3).map_or(text.len(), |c| c.0);
    let stop = text[start..end].to_string();
    let cut = &text[..text.find(&stop).unwrap()];
    let opts = GenerateOptions {
        stop: vec![stop.clone()],
        ..greedy(24)
    };
    let (_, got, reason) = run(&mut g, &prompt, &opts);
    assert_eq!(reason, FinishReason::StopString, "stop {stop:?}");
    assert_eq!(got, cut, "stop {stop:?}");
}

#[test]
fn bad_prompts_are_refused() {
    let Some((model, tok)) = fixture() else {
        return;
    };
    let pool = ThreadPool::new(1);
    let mut g = Generator::new(&model, &tok, &pool, 8, 8).unwrap();
    assert!(matches!(
        g.generate(&[], &greedy(1)),
        Err(GenerateError::EmptyPrompt)
    ));
    let long = vec![1u32; 9];
    assert!(matches!(
        g.generate(&long, &greedy(1)),
        Err(GenerateError::PromptTooLong {
            n_prompt: 9,
            n_ctx: 8
        })
    ));
    // A prompt that fits, generating past the context: ends with ContextFull, no error.
    let (ids, _, reason) = run(&mut g, &[1, 2, 3, 4, 5, 6], &greedy(10));
    assert_eq!(reason, FinishReason::ContextFull);
    assert_eq!(ids.len(), 3);
    // An out-of-vocabulary token is a model error, and the generator stays usable.
    assert!(matches!(
        g.generate(&[1, 5000], &greedy(1)),
        Err(GenerateError::Model(_))
    ));
    let (ids, _, _) = run(&mut g, &[1, 2], &greedy(2));
    assert_eq!(ids.len(), 2);
}
