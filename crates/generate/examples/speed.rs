//! Prompt-processing and decode speed of the dense forward pass, like `llama-bench`'s pp/tg.
//!
//! ```text
//! cargo run --release -p powerinfer-generate --example speed -- MODEL.gguf [threads=2] [n_prompt=512] [n_gen=128] [reps=3]
//! ```
//! pp: one forward of `n_prompt` tokens from an empty cache (last logits only).
//! tg: `n_gen` single-token forwards from an empty cache.
//! Prints the best and mean tokens/s over `reps` repetitions.

use std::time::Instant;

use powerinfer_cpu::ThreadPool;
use powerinfer_generate::{Logits, Model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let path = args
        .get(1)
        .ok_or("usage: speed MODEL.gguf [threads] [n_prompt] [n_gen] [reps]")?;
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (threads, n_prompt, n_gen, reps) = (arg(2, 2), arg(3, 512), arg(4, 128), arg(5, 3));
    let t0 = Instant::now();
    let model = Model::load(path)?;
    println!(
        "loaded {} ({:?}) in {:.2?}",
        path,
        model.config().arch,
        t0.elapsed()
    );
    let pool = ThreadPool::new(threads);
    let n_vocab = model.config().n_vocab as u32;
    let prompt: Vec<u32> = (0..n_prompt as u32)
        .map(|i| (i * 7919 + 13) % n_vocab)
        .collect();
    let mut state = model.new_state(n_prompt.max(n_gen) + 1, 512)?;
    // warm-up: page the weights in
    model.forward(&pool, &mut state, &prompt[..n_prompt.min(16)], Logits::Last)?;

    let mut pp = Vec::new();
    for _ in 0..reps {
        state.clear();
        let t = Instant::now();
        model.forward(&pool, &mut state, &prompt, Logits::Last)?;
        pp.push(n_prompt as f64 / t.elapsed().as_secs_f64());
    }
    let mut tg = Vec::new();
    for _ in 0..reps {
        state.clear();
        let mut tok = 1u32;
        let t = Instant::now();
        for _ in 0..n_gen {
            let l = model.forward(&pool, &mut state, &[tok], Logits::Last)?;
            tok = l
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                )
                .0 as u32;
        }
        tg.push(n_gen as f64 / t.elapsed().as_secs_f64());
    }
    let stat = |v: &[f64]| {
        (
            v.iter().cloned().fold(0.0, f64::max),
            v.iter().sum::<f64>() / v.len() as f64,
        )
    };
    let (ppb, ppm) = stat(&pp);
    let (tgb, tgm) = stat(&tg);
    println!(
        "threads {threads}: pp{n_prompt} {ppb:.1} tok/s (mean {ppm:.1}), tg{n_gen} {tgb:.1} tok/s (mean {tgm:.1})"
    );
    Ok(())
}
