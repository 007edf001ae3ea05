//! `powerinfer batch`: many prompts from a JSONL file, generated together with continuous
//! batching.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use powerinfer::GenerateOptions;
use powerinfer::generate::batch::{BatchConfig, BatchEvent, BatchRequest, Scheduler};
use serde_json::{Value, json};

use crate::common::{ModelArgs, SamplingArgs, load};

/// Arguments of `powerinfer batch`.
#[derive(Debug, Args)]
pub struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Prompts, one JSON object per line: {"prompt": "...", and optionally "n_predict",
    /// "temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed", "stop"}.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Write the results here (JSONL, in input order) instead of stdout.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Sequences decoded together.
    #[arg(long = "parallel", visible_alias = "np", default_value_t = 4)]
    parallel: usize,
    /// Compute every prompt in full instead of reusing what a free slot's KV cache holds of
    /// it (a common instruction). The reuse keeps a full computation's bits, except with the
    /// sparse FFNs of PWRI files (a micro-batch computes its tokens' union of active neurons):
    /// there an answer could depend in its last bits on the prompts before it.
    #[arg(long = "no-cache-prompt")]
    no_cache_prompt: bool,
}

/// One input line's prompt and settings.
struct Item {
    prompt: String,
    opts: GenerateOptions,
}

fn parse_line(line: &str, base: &GenerateOptions) -> Result<Item, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let prompt = match obj.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("\"prompt\" must be a string".into()),
        None => return Err("no \"prompt\"".into()),
    };
    let mut opts = base.clone();
    let num = |k: &str| -> Result<Option<f64>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("\"{k}\" must be a number")),
        }
    };
    let uint = |k: &str| -> Result<Option<u64>, String> {
        match obj.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("\"{k}\" must be a non-negative integer")),
        }
    };
    if let Some(n) = uint("n_predict")?.or(uint("max_tokens")?) {
        opts.max_tokens = n as usize;
    }
    if let Some(t) = num("temperature")? {
        opts.sampler.temperature = t as f32;
    }
    if let Some(k) = uint("top_k")? {
        opts.sampler.top_k = k as usize;
    }
    if let Some(p) = num("top_p")? {
        opts.sampler.top_p = p as f32;
    }
    if let Some(p) = num("min_p")? {
        opts.sampler.min_p = p as f32;
    }
    if let Some(p) = num("repeat_penalty")? {
        opts.sampler.repeat_penalty = p as f32;
    }
    if let Some(s) = uint("seed")? {
        opts.sampler.seed = s;
    }
    match obj.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => opts.stop = vec![s.clone()],
        Some(Value::Array(a)) => {
            opts.stop = a
                .iter()
                .map(|s| s.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or("\"stop\" must be a string or an array of strings")?;
        }
        Some(_) => return Err("\"stop\" must be a string or an array of strings".into()),
    }
    opts.sampler.validate().map_err(|e| e.to_string())?;
    Ok(Item { prompt, opts })
}

/// What one prompt produced.
#[derive(Default)]
struct Outcome {
    tokens: usize,
    text: String,
    finish: Option<&'static str>,
    error: Option<String>,
}

/// Runs the subcommand.
pub fn run(args: &BatchArgs) -> Result<(), String> {
    if args.parallel == 0 {
        return Err("--parallel must be at least 1".into());
    }
    let input =
        std::fs::File::open(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let base = args.sampling.options();
    let mut items = Vec::new();
    for (i, line) in std::io::BufReader::new(input).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", args.file.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let item = parse_line(&line, &base)
            .map_err(|e| format!("{}:{}: {e}", args.file.display(), i + 1))?;
        items.push(item);
    }
    if items.is_empty() {
        return Err(format!("{}: no prompts", args.file.display()));
    }
    let mut out: Box<dyn Write> = match &args.output {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let llm = load(&args.model)?;
    let cfg = BatchConfig {
        n_parallel: args.parallel,
        n_ctx: llm.n_ctx(),
        n_batch: args.model.batch_size.max(1),
        max_queue: items.len(),
        cache_prompt: !args.no_cache_prompt,
    };
    let (scheduler, submitter) =
        Scheduler::new(llm.model(), llm.tokenizer(), llm.pool(), cfg).map_err(|e| e.to_string())?;
    let bar = ProgressBar::new(items.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} prompts, {msg} [{elapsed}<{eta}]")
            .expect("static template"),
    );
    let start = Instant::now();
    let mut results: Vec<Option<Outcome>> = (0..items.len()).map(|_| None).collect();
    let mut partial: Vec<Outcome> = (0..items.len()).map(|_| Outcome::default()).collect();
    let mut total_tokens = 0usize;
    let mut next_out = 0usize;
    let mut n_failed = 0usize;
    let written: Result<(), String> = std::thread::scope(|s| {
        s.spawn(move || scheduler.run());
        let (tx, rx) = mpsc::channel::<(usize, BatchEvent)>();
        for (i, item) in items.iter().enumerate() {
            let tokens = llm.tokenize(&item.prompt);
            let tx = tx.clone();
            let sink = move |ev: BatchEvent| tx.send((i, ev)).is_ok();
            if let Err(e) =
                submitter.submit(BatchRequest::new(tokens, item.opts.clone()), Box::new(sink))
            {
                results[i] = Some(Outcome {
                    error: Some(e.to_string()),
                    ..Default::default()
                });
                bar.inc(1);
            }
        }
        drop(tx);
        drop(submitter);
        let mut write_ready = |results: &mut Vec<Option<Outcome>>, next: &mut usize| {
            while *next < results.len() {
                let Some(r) = &results[*next] else { break };
                let v = match &r.error {
                    Some(e) => json!({"index": *next, "prompt": items[*next].prompt, "error": e}),
                    None => json!({
                        "index": *next,
                        "prompt": items[*next].prompt,
                        "text": r.text,
                        "tokens": r.tokens,
                        "finish_reason": r.finish,
                    }),
                };
                writeln!(out, "{v}").map_err(|e| e.to_string())?;
                *next += 1;
            }
            Ok::<(), String>(())
        };
        write_ready(&mut results, &mut next_out)?;
        for (i, ev) in rx {
            match ev {
                BatchEvent::Started { .. } => {}
                BatchEvent::Token(t) => {
                    partial[i].tokens += 1;
                    partial[i].text.push_str(&t.text);
                    total_tokens += 1;
                    let secs = start.elapsed().as_secs_f64().max(1e-9);
                    bar.set_message(format!("{:.1} tok/s", total_tokens as f64 / secs));
                }
                BatchEvent::Done(f) => {
                    let mut o = std::mem::take(&mut partial[i]);
                    o.text.push_str(&f.tail);
                    o.finish = Some(f.reason.as_str());
                    results[i] = Some(o);
                    bar.inc(1);
                }
                BatchEvent::Error(e) => {
                    results[i] = Some(Outcome {
                        error: Some(e.to_string()),
                        ..Default::default()
                    });
                    bar.inc(1);
                }
            }
            write_ready(&mut results, &mut next_out)?;
        }
        out.flush().map_err(|e| e.to_string())
    });
    bar.finish_and_clear();
    written?;
    for r in results.iter().flatten() {
        if r.error.is_some() {
            n_failed += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "{} prompts ({} failed), {} tokens generated in {:.2} s: {:.1} tokens/s with {} parallel sequences",
        items.len(),
        n_failed,
        total_tokens,
        secs,
        total_tokens as f64 / secs.max(1e-9),
        args.parallel
    );
    if n_failed > 0 {
        return Err(format!("{n_failed} of {} prompts failed", items.len()));
    }
    Ok(())
}
