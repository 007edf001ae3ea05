//! `powerinfer bench`: prompt-processing and decode speed, like llama-bench.

use std::time::Instant;

use clap::Args;
use powerinfer::generate::model::Logits;
use serde_json::json;

use crate::common::{ModelArgs, load};

/// Arguments of `powerinfer bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens processed in one go (0 skips the test).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens decoded one at a time (0 skips the test).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Repetitions; the median is reported.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    reps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the subcommand.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    if args.reps == 0 {
        return Err("--repetitions must be at least 1".into());
    }
    let llm = load(&args.model)?;
    let model = llm.model();
    let n_vocab = model.config().n_vocab as u64;
    let n_ctx = (args.n_prompt + args.n_gen).max(1);
    let mut state = model
        .new_state(n_ctx, args.n_prompt.max(1))
        .map_err(|e| e.to_string())?;
    // Deterministic pseudo-random token ids (a splitmix64 stream).
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_token = move || {
        seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % n_vocab) as u32
    };
    let pool = llm.pool();
    // Warm-up: one short pass touches every weight once.
    model
        .forward(pool, &mut state, &[next_token()], Logits::Last)
        .map_err(|e| e.to_string())?;
    let (mut pp, mut tg) = (Vec::new(), Vec::new());
    // Decode time by part of the layers, over all repetitions.
    let (mut t_attn, mut t_pred, mut t_ffn) = (0.0f64, 0.0f64, 0.0f64);
    for _ in 0..args.reps {
        if args.n_prompt > 0 {
            let tokens: Vec<u32> = (0..args.n_prompt).map(|_| next_token()).collect();
            state.clear();
            let t = Instant::now();
            model
                .forward(pool, &mut state, &tokens, Logits::Last)
                .map_err(|e| e.to_string())?;
            pp.push(args.n_prompt as f64 / t.elapsed().as_secs_f64());
        }
        if args.n_gen > 0 {
            state.clear();
            state.reset_timings();
            let t = Instant::now();
            for _ in 0..args.n_gen {
                let tok = next_token();
                model
                    .forward(pool, &mut state, &[tok], Logits::Last)
                    .map_err(|e| e.to_string())?;
            }
            tg.push(args.n_gen as f64 / t.elapsed().as_secs_f64());
            let o = state.timings();
            t_attn += o.attention.as_secs_f64();
            t_pred += o.predictor.as_secs_f64();
            t_ffn += o.ffn.as_secs_f64();
        }
    }
    let layers = t_attn + t_pred + t_ffn;
    let share = |x: f64| if layers > 0.0 { x / layers } else { 0.0 };
    let name = args.model.model.display().to_string();
    let threads = pool.n_threads();
    if args.json {
        let v = json!({
            "model": name, "threads": threads, "repetitions": args.reps,
            "n_prompt": args.n_prompt, "n_gen": args.n_gen,
            "pp_tok_s": (!pp.is_empty()).then(|| median(pp.clone())),
            "tg_tok_s": (!tg.is_empty()).then(|| median(tg.clone())),
            "pp_samples": pp, "tg_samples": tg,
            "tg_layer_time_share": {
                "attention": share(t_attn), "predictor": share(t_pred), "ffn": share(t_ffn),
            },
        });
        println!("{v}");
    } else {
        println!(
            "| model | threads | test | tok/s (median of {}) |",
            args.reps
        );
        println!("|---|---|---|---|");
        if !pp.is_empty() {
            println!(
                "| {name} | {threads} | pp{} | {:.2} |",
                args.n_prompt,
                median(pp)
            );
        }
        if !tg.is_empty() {
            println!(
                "| {name} | {threads} | tg{} | {:.2} |",
                args.n_gen,
                median(tg)
            );
            println!(
                "\ndecode time in the layers: attention {:.1}%, predictors {:.1}%, FFN {:.1}%",
                100.0 * share(t_attn),
                100.0 * share(t_pred),
                100.0 * share(t_ffn)
            );
        }
    }
    Ok(())
}
