//! llama.cpp-style perplexity over pre-tokenized text (comma- or whitespace-separated token ids),
//! until the tokenizer is wired in.
//!
//! ```text
//! cargo run --release -p powerinfer-generate --example perplexity_ids -- MODEL.gguf IDS.txt [n_ctx=512] [max_chunks] [threads=2]
//! ```

use powerinfer_cpu::ThreadPool;
use powerinfer_generate::{Model, perplexity};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err(
            "usage: perplexity_ids MODEL.gguf IDS.txt [n_ctx] [max_chunks] [threads]".into(),
        );
    }
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n_ctx, max_chunks, threads) = (arg(3, 512), arg(4, usize::MAX), arg(5, 2));
    let model = Model::load(&args[1])?;
    let text = std::fs::read_to_string(&args[2])?;
    let mut tokens = Vec::new();
    for t in text
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
    {
        tokens.push(t.parse::<u32>()?);
    }
    tokens.truncate(n_ctx.saturating_mul(max_chunks).min(tokens.len()));
    let pool = ThreadPool::new(threads);
    let t0 = std::time::Instant::now();
    let mut progress = |done: usize, total: usize, ppl: f64| eprintln!("[{done}/{total}] {ppl:.4}");
    // add BOS at each window only where the model's file asks for it (as llama.cpp does)
    let add_bos = model
        .file()
        .get_bool("tokenizer.ggml.add_bos_token")
        .unwrap_or(true);
    let bos = if add_bos { model.bos_token() } else { None };
    let r = perplexity(
        &model,
        &pool,
        &tokens,
        n_ctx,
        n_ctx,
        bos,
        Some(&mut progress),
    )?;
    println!(
        "Final estimate: PPL = {:.4} +/- {:.5}  ({} chunks, {} tokens scored, {:.1?})",
        r.ppl,
        r.ppl_stderr,
        r.n_chunks,
        r.n_scored,
        t0.elapsed()
    );
    Ok(())
}
