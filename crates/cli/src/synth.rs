//! `powerinfer synth`: writes synthetic PowerInfer models (random weights, tuned predictors) for
//! speed and scale tests, optionally with a dense GGUF twin for llama.cpp.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use powerinfer_gguf::GgufFile;
use powerinfer_synth::{
    Layout, ModelShape, Synth, SynthConfig, measure_activity, parse_weight_type, skew, with_threads,
};

/// Arguments of `powerinfer synth`.
#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Model shape: llama-7b, llama-13b, llama-70b, or custom (then give --n-embd, --n-ff,
    /// --n-layer and --n-head; the --n-* flags also override a preset's values).
    #[arg(long, default_value = "llama-7b")]
    pub shape: String,
    /// Hidden size.
    #[arg(long)]
    pub n_embd: Option<usize>,
    /// FFN neurons per layer.
    #[arg(long)]
    pub n_ff: Option<usize>,
    /// Layers.
    #[arg(long)]
    pub n_layer: Option<usize>,
    /// Attention heads.
    #[arg(long)]
    pub n_head: Option<usize>,
    /// Key/value heads (default: --n-head).
    #[arg(long)]
    pub n_head_kv: Option<usize>,
    /// Vocabulary size (default 32000).
    #[arg(long)]
    pub n_vocab: Option<usize>,
    /// Weight type: f32, f16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k.
    #[arg(long = "type", default_value = "q4_0")]
    pub ty: String,
    /// Type of output.weight (default: as the reference quantizer, Q6_K or Q8_0).
    #[arg(long)]
    pub output_type: Option<String>,
    /// Fraction of FFN neurons the predictors skip per token.
    #[arg(long, default_value_t = 0.9)]
    pub sparsity: f64,
    /// Share of neurons that are hot.
    #[arg(long, default_value_t = 0.2)]
    pub hot_share: f64,
    /// Share of all activations the hot neurons carry (default 0.8, lowered to what the
    /// sparsity allows when not given).
    #[arg(long)]
    pub hot_mass: Option<f64>,
    /// Predictor hidden size H (default n_embd / 16, at least 64).
    #[arg(long)]
    pub predictor_hidden: Option<usize>,
    /// Seed of all random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output PowerInfer file (magic PWRI).
    #[arg(short = 'o', long = "output")]
    pub output: PathBuf,
    /// Also write the same weights as a plain GGUF (ffn_down, no predictors) to this file.
    #[arg(long)]
    pub dense: Option<PathBuf>,
    /// Threads (default: one per CPU); the files do not depend on it.
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    pub threads: usize,
    /// After writing, run the predictors on this many random inputs per layer and report the
    /// active fraction (0: skip).
    #[arg(long, default_value_t = 0)]
    pub measure: usize,
}

fn config(args: &SynthArgs) -> Result<SynthConfig, String> {
    let mut shape = if args.shape.eq_ignore_ascii_case("custom") {
        let need =
            |v: Option<usize>, flag: &str| v.ok_or_else(|| format!("--shape custom needs {flag}"));
        ModelShape {
            n_embd: need(args.n_embd, "--n-embd")?,
            n_ff: need(args.n_ff, "--n-ff")?,
            n_layer: need(args.n_layer, "--n-layer")?,
            n_head: need(args.n_head, "--n-head")?,
            n_head_kv: args.n_head_kv.or(args.n_head).unwrap_or(1),
            n_vocab: 32000,
            n_ctx: 4096,
        }
    } else {
        ModelShape::preset(&args.shape).map_err(|e| e.to_string())?
    };
    if let Some(v) = args.n_embd {
        shape.n_embd = v;
    }
    if let Some(v) = args.n_ff {
        shape.n_ff = v;
    }
    if let Some(v) = args.n_layer {
        shape.n_layer = v;
    }
    if let Some(v) = args.n_head {
        shape.n_head = v;
        if args.n_head_kv.is_none() && shape.n_head_kv > v {
            shape.n_head_kv = v;
        }
    }
    if let Some(v) = args.n_head_kv {
        shape.n_head_kv = v;
    }
    if let Some(v) = args.n_vocab {
        shape.n_vocab = v;
    }
    let ty = parse_weight_type(&args.ty).map_err(|e| e.to_string())?;
    let mut cfg = SynthConfig::new(shape, ty, args.seed);
    cfg.name = format!(
        "synthetic-{}-{}",
        args.shape.to_ascii_lowercase(),
        ty.name().to_ascii_lowercase()
    );
    if let Some(o) = &args.output_type {
        cfg.output_type = Some(parse_weight_type(o).map_err(|e| format!("--output-type: {e}"))?);
    }
    cfg.predictor_hidden = args.predictor_hidden;
    cfg.sparsity = args.sparsity;
    cfg.hot_share = args.hot_share;
    cfg.hot_mass = match args.hot_mass {
        Some(m) => m,
        None => {
            // The hot set can hold at most hot_share / (1 - sparsity) of the activity.
            let rate = 1.0 - args.sparsity;
            let cap = args.hot_share * skew::MAX_PROBABILITY / rate;
            if cap < 0.8 / 0.98 && rate > 0.0 {
                let m = (0.98 * cap).max(args.hot_share);
                eprintln!(
                    "note: at sparsity {} the hot {:.0}% of neurons can carry at most {:.1}% of the activity; using --hot-mass {m:.3}",
                    args.sparsity,
                    args.hot_share * 100.0,
                    cap.min(1.0) * 100.0
                );
                m
            } else {
                0.8
            }
        }
    };
    Ok(cfg)
}

/// Runs the subcommand.
pub fn run(args: &SynthArgs) -> Result<(), String> {
    let start = Instant::now();
    let cfg = config(args)?;
    let synth = Synth::new(cfg).map_err(|e| e.to_string())?;
    let mut jobs = vec![(Layout::PowerInfer, args.output.clone())];
    if let Some(d) = &args.dense {
        if d == &args.output {
            return Err("--dense must name a different file than -o".into());
        }
        jobs.push((Layout::Dense, d.clone()));
    }
    let sizes: Vec<u64> = jobs
        .iter()
        .map(|(l, _)| synth.file_size(*l))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let total: u64 = sizes.iter().sum();
    let s = synth.config().shape;
    eprintln!(
        "synth: {} layers, n_embd {}, n_ff {}, heads {}/{}, vocab {}, {} (output {}), predictor H {}, sparsity {}, hot {:.0}% -> {:.0}%, seed {}",
        s.n_layer,
        s.n_embd,
        s.n_ff,
        s.n_head,
        s.n_head_kv,
        s.n_vocab,
        synth.config().weight_type,
        synth.output_type(),
        synth.predictor_hidden(),
        synth.config().sparsity,
        synth.config().hot_share * 100.0,
        synth.config().hot_mass * 100.0,
        synth.config().seed,
    );
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "writing {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .expect("static template"),
    );
    let mut done = 0u64;
    for ((layout, path), size) in jobs.iter().zip(&sizes) {
        let t0 = Instant::now();
        bar.set_message(path.display().to_string());
        let base = done;
        let written = with_threads(args.threads, || {
            synth.write_file(*layout, path, &|n| bar.set_position(base + n))
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        done += size;
        let secs = t0.elapsed().as_secs_f64();
        bar.suspend(|| {
            eprintln!(
                "wrote {} ({:.2} GB, {}) in {secs:.1} s ({:.0} MB/s)",
                path.display(),
                written as f64 / 1e9,
                match layout {
                    Layout::PowerInfer => "PowerInfer, magic PWRI",
                    Layout::Dense => "dense GGUF twin",
                },
                written as f64 / 1e6 / secs.max(1e-9)
            )
        });
    }
    bar.finish_and_clear();
    eprintln!(
        "done in {:.1} s; synthetic files: random weights, for speed and scale tests only",
        start.elapsed().as_secs_f64()
    );
    if args.measure > 0 {
        let file =
            GgufFile::open(&args.output).map_err(|e| format!("{}: {e}", args.output.display()))?;
        let r = measure_activity(
            &file,
            None,
            args.measure,
            synth.config().hot_share,
            synth.config().seed ^ 0x6d65_6173,
            args.threads,
        )
        .map_err(|e| e.to_string())?;
        println!(
            "predictors on {} random inputs per layer: active fraction mean {:.4} (target {:.4}), per token {:.4}..{:.4}; top {:.0}% of neurons carry {:.1}% of activations (target {:.1}%)",
            r.n_tokens,
            r.mean_fraction(),
            1.0 - synth.config().sparsity,
            r.min_fraction(),
            r.max_fraction(),
            r.hot_share * 100.0,
            r.mean_hot_mass() * 100.0,
            synth.config().hot_mass * 100.0
        );
    }
    Ok(())
}
