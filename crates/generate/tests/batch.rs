//! Continuous batching on SmolLM2: every sequence of a batch equals the same generation run
//! alone (token ids and text, bit-identical logits make them equal exactly), whatever joins or
//! leaves the batch around it; cancellation, the bounded queue and request checks.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use powerinfer_cpu::ThreadPool;
use powerinfer_generate::batch::{
    BatchConfig, BatchEvent, BatchRequest, Scheduler, SubmitError, Submitter,
};
use powerinfer_generate::generation::{FinishReason, GenerateOptions, Generator};
use powerinfer_generate::model::Logits;
use powerinfer_generate::sampling::SamplerConfig;
use powerinfer_generate::tokenizer::Tokenizer;
use powerinfer_generate::{Model, ModelError, ModelState};

fn smollm() -> Option<(Model, Tokenizer)> {
    let dir = std::env::var_os("POWERINFER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!(
            "skipping: {} absent (scripts/fetch-models.sh)",
            path.display()
        );
        return None;
    }
    let model = Model::load(&path).expect("model loads");
    let tok = Tokenizer::from_gguf(model.file()).expect("tokenizer");
    Some((model, tok))
}

const N_CTX: usize = 256;

#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    ids: Vec<u32>,
    text: String,
    reason: FinishReason,
}

fn alone(
    model: &Model,
    tok: &Tokenizer,
    pool: &ThreadPool,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Outcome {
    let mut g = Generator::new(model, tok, pool, N_CTX, 512).expect("generator");
    let mut stream = g.generate(prompt, opts).expect("generate");
    let mut ids = Vec::new();
    let mut text = String::new();
    for t in stream.by_ref() {
        let t = t.expect("token");
        ids.push(t.id);
        text.push_str(&t.text);
    }
    text.push_str(&stream.flush());
    Outcome {
        ids,
        text,
        reason: stream.finish_reason().expect("finished"),
    }
}

/// Collects a sequence's events; `None` when it ended with an error.
fn collect(rx: mpsc::Receiver<BatchEvent>) -> Option<Outcome> {
    let mut ids = Vec::new();
    let mut text = String::new();
    let mut started = false;
    for ev in rx {
        match ev {
            BatchEvent::Started { prompt_tokens } => {
                assert!(prompt_tokens > 0);
                started = true;
            }
            BatchEvent::Token(t) => {
                assert!(started, "token before Started");
                ids.push(t.id);
                text.push_str(&t.text);
            }
            BatchEvent::Done(f) => {
                assert_eq!(f.stats.generated_tokens, ids.len());
                text.push_str(&f.tail);
                return Some(Outcome {
                    ids,
                    text,
                    reason: f.reason,
                });
            }
            BatchEvent::Error(e) => {
                eprintln!("sequence failed: {e}");
                return None;
            }
        }
    }
    panic!("the event stream ended without Done or Error");
}

fn opts(max_tokens: usize, sampler: SamplerConfig, stop: &[&str]) -> GenerateOptions {
    GenerateOptions {
        max_tokens,
        sampler,
        stop: stop.iter().map(|s| s.to_string()).collect(),
        stop_at_eog: true,
    }
}

fn config(n_parallel: usize, max_queue: usize) -> BatchConfig {
    BatchConfig {
        n_parallel,
        n_ctx: N_CTX,
        n_batch: 512,
        max_queue,
        cache_prompt: true,
    }
}

/// Runs `f` with a scheduler running on another thread; the scheduler stops when `f` returns
/// (its submitter dropped) and its work is done.
fn with_scheduler<R>(
    model: &Model,
    tok: &Tokenizer,
    pool: &ThreadPool,
    cfg: BatchConfig,
    f: impl FnOnce(Submitter) -> R,
) -> R {
    let (sched, sub) = Scheduler::new(model, tok, pool, cfg).expect("scheduler");
    std::thread::scope(|s| {
        s.spawn(move || sched.run());
        f(sub)
    })
}

#[test]
fn batched_sequences_equal_single_runs() {
    let Some((model, tok)) = smollm() else { return };
    let pool = ThreadPool::new(2);
    let sampled = SamplerConfig {
        seed: 42,
        ..Default::default()
    };
    // Different prompt lengths, limits and stops: sequences leave at different steps, and with
    // three slots for six requests the later ones join a running batch.
    let cases: Vec<(String, GenerateOptions)> = vec![
        (
            "The capital of France is".into(),
            opts(14, SamplerConfig::greedy(), &[]),
        ),
        ("1, 2, 3, 4,".into(), opts(5, SamplerConfig::greedy(), &[])),
        (
            "Write a short poem about the sea.".into(),
            opts(20, sampled, &[]),
        ),
        (
            "Once upon a time".into(),
            opts(9, SamplerConfig::greedy(), &[" the"]),
        ),
        (
            "def fibonacci(n):".into(),
            opts(16, SamplerConfig::greedy(), &[]),
        ),
        ("Hello".into(), opts(0, SamplerConfig::greedy(), &[])),
    ];
    let prompts: Vec<Vec<u32>> = cases
        .iter()
        .map(|(p, _)| tok.encode(p, true, true))
        .collect();
    let expected: Vec<Outcome> = cases
        .iter()
        .zip(&prompts)
        .map(|((_, o), p)| alone(&model, &tok, &pool, p, o))
        .collect();
    assert_eq!(
        expected[3].reason,
        FinishReason::StopString,
        "{:?}",
        expected[3]
    );
    assert_eq!(expected[5].ids.len(), 0);
    let got = with_scheduler(&model, &tok, &pool, config(3, 16), |sub| {
        let rxs: Vec<_> = cases
            .iter()
            .zip(&prompts)
            .map(|((_, o), p)| {
                sub.submit_channel(BatchRequest::new(p.clone(), o.clone()))
                    .expect("submit")
            })
            .collect();
        let out: Vec<Outcome> = rxs.into_iter().map(|rx| collect(rx).expect("ok")).collect();
        let m = sub.metrics();
        assert_eq!(m.completed, cases.len() as u64);
        assert_eq!(m.queued, 0);
        assert_eq!(m.active, 0);
        assert!(m.steps > 0);
        out
    });
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "case {i} ({:?})", cases[i].0);
    }
}

/// Runs `requests` through a scheduler one after another (each submitted when the previous one
/// ended, as a chat client sends its turns); their outcomes and the final metrics.
fn one_at_a_time(
    model: &Model,
    tok: &Tokenizer,
    pool: &ThreadPool,
    cfg: BatchConfig,
    requests: &[Vec<u32>],
    opts: &GenerateOptions,
) -> (Vec<Outcome>, powerinfer_generate::batch::BatchMetrics) {
    with_scheduler(model, tok, pool, cfg, |sub| {
        let got = requests
            .iter()
            .map(|p| {
                let rx = sub
                    .submit_channel(BatchRequest::new(p.clone(), opts.clone()))
                    .expect("submit");
                collect(rx).expect("ok")
            })
            .collect();
        (got, sub.metrics())
    })
}

/// The prompt cache: a conversation whose every request resends the earlier turns computes only
/// the new tokens, each request goes to the slot holding its prefix, and the answers are the
/// ones computed from scratch (this model's weight types sum the same way in any batch).
#[test]
fn prompt_cache_reuses_a_slots_prefix_and_changes_no_answer() {
    let Some((model, tok)) = smollm() else { return };
    let pool = ThreadPool::new(2);
    let greedy = opts(6, SamplerConfig::greedy(), &[]);
    // Turn 1, an unrelated prompt (it takes the other slot), then turns 2 and 3, each the
    // previous prompt and answer plus a new question; last, turn 3's prompt again exactly.
    let mut transcript = tok.encode("Q: Name a colour.\nA:", true, true);
    let mut requests: Vec<Vec<u32>> = Vec::new();
    let mut expected = Vec::new();
    let unrelated = tok.encode("Paris is the capital of", true, true);
    for turn in 0..3 {
        if turn > 0 {
            transcript.extend(tok.encode("\nQ: And another?\nA:", false, true));
        }
        let out = alone(&model, &tok, &pool, &transcript, &greedy);
        requests.push(transcript.clone());
        expected.push(out.clone());
        if turn == 0 {
            requests.push(unrelated.clone());
            expected.push(alone(&model, &tok, &pool, &unrelated, &greedy));
        }
        transcript.extend(&out.ids);
    }
    requests.push(requests[3].clone());
    expected.push(expected[3].clone());
    for cache_prompt in [true, false] {
        let cfg = BatchConfig {
            cache_prompt,
            ..config(2, 8)
        };
        let (got, m) = one_at_a_time(&model, &tok, &pool, cfg, &requests, &greedy);
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "request {i}, cache_prompt {cache_prompt}");
        }
        let total: usize = requests.iter().map(Vec::len).sum();
        assert_eq!(
            m.prompt_tokens + m.cached_prompt_tokens,
            total as u64,
            "cache_prompt {cache_prompt}"
        );
        if cache_prompt {
            // Turn 2 reuses turn 1's prompt and all but the last of its answer tokens (the
            // last was sampled, never fed); turn 3 likewise turn 2's; the repeat all but its
            // last token. The unrelated prompt shares only BOS with turn 1's slot, so it takes
            // the empty one and reuses nothing.
            let want = (requests[0].len() + expected[0].ids.len() - 1)
                + (requests[2].len() + expected[2].ids.len() - 1)
                + (requests[3].len() - 1);
            assert_eq!(m.cached_prompt_tokens, want as u64);
        } else {
            assert_eq!(m.cached_prompt_tokens, 0);
        }
    }
}

#[test]
fn cancelled_sequence_frees_its_slot_and_leaves_others_alone() {
    let Some((model, tok)) = smollm() else { return };
    let pool = ThreadPool::new(2);
    let keep = tok.encode("The quick brown fox", true, true);
    let gone = tok.encode("Rust is a programming language that", true, true);
    let o = opts(12, SamplerConfig::greedy(), &[]);
    let expected = alone(&model, &tok, &pool, &keep, &o);
    with_scheduler(&model, &tok, &pool, config(2, 4), |sub| {
        let rx_keep = sub
            .submit_channel(BatchRequest::new(keep.clone(), o.clone()))
            .unwrap();
        let rx_gone = sub
            .submit_channel(BatchRequest::new(
                gone.clone(),
                opts(100, SamplerConfig::greedy(), &[]),
            ))
            .unwrap();
        // Read two tokens of the second, then hang up.
        let mut seen = 0;
        for ev in rx_gone.iter() {
            if matches!(ev, BatchEvent::Token(_)) {
                seen += 1;
                if seen == 2 {
                    break;
                }
            }
        }
        drop(rx_gone);
        assert_eq!(collect(rx_keep).unwrap(), expected);
        // The freed slot serves the next request.
        let third = sub
            .submit_channel(BatchRequest::new(keep.clone(), o.clone()))
            .unwrap();
        assert_eq!(collect(third).unwrap(), expected);
        let m = sub.metrics();
        assert_eq!(m.cancelled, 1, "{m:?}");
        assert_eq!(m.completed, 2, "{m:?}");
        assert!(m.generated_tokens < 100 + 24, "{m:?}");
    });
}

#[test]
fn full_queue_refuses_and_bad_requests_are_rejected() {
    let Some((model, tok)) = smollm() else { return };
    let pool = ThreadPool::new(2);
    let (sched, sub) = Scheduler::new(&model, &tok, &pool, config(1, 2)).unwrap();
    let p = tok.encode("Hi", true, true);
    let o = opts(2, SamplerConfig::greedy(), &[]);
    // The scheduler is not running yet: two requests wait, the third is refused.
    let a = sub
        .submit_channel(BatchRequest::new(p.clone(), o.clone()))
        .unwrap();
    let b = sub
        .submit_channel(BatchRequest::new(p.clone(), o.clone()))
        .unwrap();
    let c = sub.submit_channel(BatchRequest::new(p.clone(), o.clone()));
    assert!(matches!(c, Err(SubmitError::QueueFull(2))), "{c:?}");
    assert_eq!(sub.metrics().rejected, 1);
    assert_eq!(sub.metrics().queued, 2);

    let bad = |prompt: Vec<u32>, o: GenerateOptions| {
        let r = sub.submit_channel(BatchRequest::new(prompt, o));
        assert!(matches!(r, Err(SubmitError::Invalid(_))), "{r:?}");
    };
    bad(Vec::new(), o.clone());
    bad(vec![1; N_CTX + 1], o.clone());
    bad(vec![u32::MAX], o.clone());
    let mut nan = o.clone();
    nan.sampler.temperature = f32::NAN;
    bad(p.clone(), nan);
    let mut top_p = o.clone();
    top_p.sampler.top_p = 1.5;
    bad(p.clone(), top_p);
    assert_eq!(sub.metrics().queued, 2);

    drop(sub);
    std::thread::scope(|s| {
        s.spawn(move || sched.run());
        assert_eq!(collect(a).unwrap().ids.len(), 2);
        assert_eq!(collect(b).unwrap().ids.len(), 2);
    });
}

#[test]
fn zero_sizes_are_config_errors() {
    let Some((model, tok)) = smollm() else { return };
    let pool = ThreadPool::new(1);
    for cfg in [
        BatchConfig {
            n_parallel: 0,
            ..config(1, 1)
        },
        BatchConfig {
            n_ctx: 0,
            ..config(1, 1)
        },
        BatchConfig {
            n_batch: 0,
            ..config(1, 1)
        },
    ] {
        assert!(Scheduler::new(&model, &tok, &pool, cfg).is_err(), "{cfg:?}");
    }
}

/// `Model::forward_batch` gives every row exactly (bit for bit) the logits `Model::forward`
/// gives that sequence alone, for rows at different positions, in batches of 1 to 3 rows.
#[test]
fn forward_batch_logits_equal_single_forward_bit_for_bit() {
    let Some((model, tok)) = smollm() else { return };
    let pool = ThreadPool::new(2);
    let prompts = [
        "Hello there",
        "The quick brown fox jumps over the lazy",
        "1 2 3",
    ];
    let mut batched: Vec<ModelState> = Vec::new();
    let mut alone: Vec<ModelState> = Vec::new();
    let mut next: Vec<u32> = Vec::new();
    for p in prompts {
        let ids = tok.encode(p, true, true);
        let mut a = model.new_state(64, 512).unwrap();
        let mut b = model.new_state(64, 512).unwrap();
        model.forward(&pool, &mut a, &ids, Logits::Last).unwrap();
        let l = model.forward(&pool, &mut b, &ids, Logits::Last).unwrap();
        next.push(argmax(l));
        batched.push(a);
        alone.push(b);
    }
    let mut batch = model.new_batch_state();
    let n_vocab = model.config().n_vocab;
    // Steps over all three rows, then over rows {0, 2}, then row 1 alone.
    for rows in [vec![0, 1, 2], vec![0, 1, 2], vec![0, 2], vec![1]] {
        let tokens: Vec<u32> = rows.iter().map(|&r| next[r]).collect();
        let mut states: Vec<&mut ModelState> = batched
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| rows.contains(i))
            .map(|(_, s)| s)
            .collect();
        let got = model
            .forward_batch(&pool, &mut batch, &mut states, &tokens)
            .unwrap()
            .to_vec();
        assert_eq!(got.len(), rows.len() * n_vocab);
        for (i, &r) in rows.iter().enumerate() {
            let want = model
                .forward(&pool, &mut alone[r], &[next[r]], Logits::Last)
                .unwrap();
            let g = &got[i * n_vocab..(i + 1) * n_vocab];
            assert!(
                g.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {r} differs"
            );
            assert_eq!(batched[r].pos(), alone[r].pos());
            next[r] = argmax(g);
        }
    }
    // Bad input: mismatched lengths, no rows, a token outside the vocabulary, a full context.
    let mut states: Vec<&mut ModelState> = batched.iter_mut().collect();
    assert!(
        model
            .forward_batch(&pool, &mut batch, &mut states, &[1])
            .is_err()
    );
    assert!(matches!(
        model.forward_batch(&pool, &mut batch, &mut [], &[]),
        Err(ModelError::EmptyInput)
    ));
    assert!(matches!(
        model.forward_batch(&pool, &mut batch, &mut states, &[1, 1, n_vocab as u32]),
        Err(ModelError::TokenOutOfRange { .. })
    ));
    let mut full = model.new_state(1, 1).unwrap();
    model.forward(&pool, &mut full, &[1], Logits::None).unwrap();
    assert!(matches!(
        model.forward_batch(&pool, &mut batch, &mut [&mut full], &[1]),
        Err(ModelError::ContextOverflow { .. })
    ));
}

fn argmax(l: &[f32]) -> u32 {
    l.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        )
        .0 as u32
}

/// Gemma 3 (Q4_K weights, which prompt batches sum in llama.cpp's grouped order): five rows
/// decoded together (a whole group of 4 and one more) still get, row for row, exactly the logits
/// each gets decoded alone.
#[test]
fn gemma3_forward_batch_of_five_equals_single_rows() {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/gemma-3-270m-q4_k_m.gguf");
    if !p.exists() {
        eprintln!("skipping: {} not found", p.display());
        return;
    }
    let model = Model::load(&p).unwrap();
    let pool = ThreadPool::new(2);
    let n_vocab = model.config().n_vocab;
    let mut batched: Vec<ModelState> = Vec::new();
    let mut alone: Vec<ModelState> = Vec::new();
    let mut next: Vec<u32> = Vec::new();
    for r in 0..5u32 {
        // prompts of different lengths: rows sit at different positions
        let ids: Vec<u32> = (0..3 + r)
            .map(|i| 2 + (i * 7919 + r * 104_729) % 200_000)
            .collect();
        let mut a = model.new_state(32, 512).unwrap();
        let mut b = model.new_state(32, 512).unwrap();
        model.forward(&pool, &mut a, &ids, Logits::Last).unwrap();
        let l = model.forward(&pool, &mut b, &ids, Logits::Last).unwrap();
        next.push(argmax(l));
        batched.push(a);
        alone.push(b);
    }
    let mut batch = model.new_batch_state();
    for _ in 0..2 {
        let mut states: Vec<&mut ModelState> = batched.iter_mut().collect();
        let got = model
            .forward_batch(&pool, &mut batch, &mut states, &next)
            .unwrap()
            .to_vec();
        for r in 0..5 {
            let want = model
                .forward(&pool, &mut alone[r], &[next[r]], Logits::Last)
                .unwrap();
            let g = &got[r * n_vocab..(r + 1) * n_vocab];
            assert!(
                g.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()),
                "row {r} differs"
            );
            next[r] = argmax(g);
        }
    }
}

/// The premise of the exact prompt cache: a prompt computed in pieces gets the bits of the
/// full computation when each piece runs as that part of its micro-batch
/// (`forward_as_ubatch_of`: the micro-batch's attention numerics, and for Q4_K its products'
/// grouping), while a piece computed on its own does not (always so from 64 tokens on, where
/// attention switches to f32; for Q4_K also below). SmolLM2 (Q4_1, Q8_0) and Gemma 3 (Q4_K_M).
#[test]
fn prompt_in_pieces_equals_full_prompt_bit_for_bit() {
    let Some((smollm, smollm_tok)) = smollm() else {
        return;
    };
    let gemma_path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/gemma-3-270m-q4_k_m.gguf");
    let gemma = gemma_path.exists().then(|| {
        let m = Model::load(&gemma_path).expect("gemma loads");
        let t = Tokenizer::from_gguf(m.file()).expect("tokenizer");
        (m, t)
    });
    assert!(!smollm.groups_prompt_products());
    let pool = ThreadPool::new(2);
    let text = "It is a truth universally acknowledged, that a single man in possession of a good \
                fortune, must be in want of a wife. However little known the feelings or views \
                of such a man may be on his first entering a neighbourhood, this truth is so well \
                fixed in the minds of the surrounding families, that he is considered as the \
                rightful property of some one or other of their daughters.";
    for (model, tok) in
        std::iter::once((&smollm, &smollm_tok)).chain(gemma.as_ref().map(|(m, t)| (m, t)))
    {
        let grouping = model.groups_prompt_products();
        let ids = tok.encode(text, true, true);
        assert!(ids.len() >= 70, "{}", ids.len());
        let nv = model.config().n_vocab;
        let last_row =
            |l: &[f32]| -> Vec<u32> { l[l.len() - nv..].iter().map(|v| v.to_bits()).collect() };
        // Pieces each computed on its own.
        let split = |cuts: &[usize], end: usize| -> Vec<u32> {
            let mut st = model.new_state(512, 512).unwrap();
            let mut start = 0;
            let mut out = Vec::new();
            for &c in cuts.iter().chain([&end]) {
                out = last_row(
                    model
                        .forward(&pool, &mut st, &ids[start..c], Logits::Last)
                        .unwrap(),
                );
                start = c;
            }
            out
        };
        // Pieces each computed as part of the whole micro-batch.
        let parts = |cuts: &[usize], end: usize| -> Vec<u32> {
            let mut st = model.new_state(512, 512).unwrap();
            let mut start = 0;
            let mut out = Vec::new();
            for &c in cuts.iter().chain([&end]) {
                let l = model
                    .forward_as_ubatch_of(&pool, &mut st, &ids[start..c], Logits::Last, end, start)
                    .unwrap();
                out = last_row(l);
                start = c;
            }
            out
        };
        let name = format!("{:?}", model.config().arch);
        for (cuts, end) in [
            (&[30][..], 40usize),
            (&[39], 40),
            (&[10, 21, 39], 40),
            (&[64], 70),
            (&[66], 70),
            (&[5, 69], 70),
        ] {
            let full = split(&[], end);
            assert_eq!(parts(cuts, end), full, "{name}: parts {cuts:?} of {end}");
            if end >= 64 || grouping {
                assert_ne!(
                    split(cuts, end),
                    full,
                    "{name}: pieces {cuts:?} of {end} alone"
                );
            } else {
                assert_eq!(
                    split(cuts, end),
                    full,
                    "{name}: f16 numerics, cuts {cuts:?}"
                );
            }
        }
    }
    // More tokens than the state's micro-batch: an error, not a silent split.
    let ids = smollm_tok.encode(text, true, true);
    let mut st = smollm.new_state(512, 8).unwrap();
    assert!(
        smollm
            .forward_as_ubatch_of(&pool, &mut st, &ids[..9], Logits::Last, 9, 0)
            .is_err()
    );
}

/// With prompts of 64 tokens or more the prompt cache still gives the answers of full
/// computations: a long shared instruction is reused whatever followed it, and a
/// conversation's next turn reuses the earlier prompt but recomputes the generated tokens
/// (decoded in f16, computed in f32 inside the next turn's 64+-token micro-batch).
#[test]
fn prompt_cache_is_exact_for_long_prompts() {
    let Some((model, tok)) = smollm() else { return };
    let pool = ThreadPool::new(2);
    let greedy = opts(8, SamplerConfig::greedy(), &[]);
    let instruction = "You are a careful assistant for a village library. Answer every question \
                       in one short, friendly paragraph, mention a book from the library's \
                       collection when it helps, and never invent opening hours or prices. The \
                       library is open to everyone and lends books for three weeks.\n\n";
    let mut requests: Vec<Vec<u32>> = ["How do I get a library card?", "Do you lend audiobooks?"]
        .iter()
        .map(|q| tok.encode(&format!("{instruction}Question: {q}\nAnswer:"), true, true))
        .collect();
    assert!(requests[0].len() >= 64, "{}", requests[0].len());
    let first = alone(&model, &tok, &pool, &requests[0], &greedy);
    let mut turn2 = requests[0].clone();
    turn2.extend(&first.ids);
    turn2.extend(tok.encode("\nQuestion: And for children?\nAnswer:", false, true));
    requests.push(turn2);
    let expected: Vec<Outcome> = requests
        .iter()
        .map(|p| alone(&model, &tok, &pool, p, &greedy))
        .collect();
    let (got, m) = one_at_a_time(&model, &tok, &pool, config(1, 8), &requests, &greedy);
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        assert_eq!(g, e, "request {i}");
    }
    // Request 2 reuses the instruction (up to where the questions differ); request 3 (request
    // 1's conversation) only what request 2 left of request 1's prompt, not its answer.
    let shared = requests[0]
        .iter()
        .zip(&requests[1])
        .take_while(|(a, b)| a == b)
        .count();
    assert!(shared >= 50, "{shared}");
    assert_eq!(m.cached_prompt_tokens, 2 * shared as u64);
}
