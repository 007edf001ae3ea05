//! `powerinfer profile`: record which FFN neurons a model activates on calibration text (per
//! neuron counts and sampled predictor training pairs), into a safetensors profile.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use powerinfer::ThreadPool;
use powerinfer::generate::Model;
use powerinfer::generate::model::SparseMode;
use powerinfer::generate::profile::{ProfileConfig, ProfileStage, profile_model};
use powerinfer::generate::tokenizer::Tokenizer;

/// Arguments of `powerinfer profile`.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Model file (GGUF; a PWRI file is run with every neuron computed).
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Calibration text (repeatable: the files' tokens are concatenated).
    #[arg(short = 'f', long = "file", required = true)]
    files: Vec<PathBuf>,
    /// Output profile (default: the model's path with `.profile.safetensors`).
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Window length in tokens (BOS at the start of each).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 512)]
    ctx_size: usize,
    /// Tokens per forward pass.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    batch_size: usize,
    /// Target fraction of inactive neurons (SwiGLU / GeGLU models; ReLU models use h != 0).
    #[arg(long = "sparsity", default_value_t = 0.5)]
    sparsity: f32,
    /// Sampled training tokens per layer.
    #[arg(long = "samples", default_value_t = 8192)]
    samples: usize,
    /// Use at most this many tokens of the text.
    #[arg(long = "max-tokens")]
    max_tokens: Option<usize>,
    /// Tokens the activity thresholds are calibrated on (whole windows, not counted).
    #[arg(long = "calib-tokens", default_value_t = 2048)]
    calib_tokens: usize,
    /// Seed of the sampling.
    #[arg(short = 's', long = "seed", default_value_t = 0x9e37)]
    seed: u64,
    /// Threads (default: one per CPU).
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    threads: usize,
}

/// The default profile path for a model: `x.gguf` -> `x.profile.safetensors`.
pub fn default_output(model: &Path) -> PathBuf {
    model.with_extension("profile.safetensors")
}

/// Runs the subcommand.
pub fn run(args: &ProfileArgs) -> Result<(), String> {
    let t0 = Instant::now();
    let mut model =
        Model::load(&args.model).map_err(|e| format!("{}: {e}", args.model.display()))?;
    if model.is_sparse() {
        model.set_sparse_mode(SparseMode::Dense);
    }
    let tok = Tokenizer::from_gguf(model.file()).map_err(|e| format!("tokenizer: {e}"))?;
    let mut tokens = Vec::new();
    for f in &args.files {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        tokens.extend(tok.encode(&text, true, false));
    }
    let pool = ThreadPool::new(args.threads);
    let c = model.config();
    eprintln!(
        "{}: {} layers, n_embd {}, n_ff {}; {} tokens of text{}",
        args.model.display(),
        c.n_layer,
        c.n_embd,
        c.n_ff,
        tokens.len(),
        args.max_tokens
            .filter(|&m| m < tokens.len())
            .map(|m| format!(", using {m}"))
            .unwrap_or_default()
    );
    let cfg = ProfileConfig {
        n_ctx: args.ctx_size,
        n_batch: args.batch_size,
        sparsity: args.sparsity,
        samples: args.samples,
        max_tokens: args.max_tokens,
        calib_tokens: args.calib_tokens,
        seed: args.seed,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template(
            "{msg:>10} {bar:40} {pos}/{len} windows ({elapsed}, eta {eta})",
        )
        .expect("static template"),
    );
    let mut stage = None;
    let mut progress = |s: ProfileStage, done: usize, total: usize| {
        if stage != Some(s) {
            stage = Some(s);
            bar.reset();
            bar.set_length(total as u64);
            bar.set_message(match s {
                ProfileStage::Calibrate => "calibrate",
                ProfileStage::Count => "count",
            });
        }
        bar.set_position(done as u64);
    };
    let t1 = Instant::now();
    let profile = profile_model(&model, &pool, &tokens, &cfg, Some(&mut progress))
        .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let secs = t1.elapsed().as_secs_f64();
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.model));
    profile
        .save(&out)
        .map_err(|e| format!("{}: {e}", out.display()))?;

    let n_ff = c.n_ff as f64;
    let n_tok = profile.n_tokens as f64;
    println!(
        "rule: {} ({} FFN), {} tokens counted, {:.1} tok/s",
        match profile.rule {
            powerinfer_predictor::profile::ActivityRule::NonZero => "h != 0".to_owned(),
            powerinfer_predictor::profile::ActivityRule::Magnitude =>
                format!("|h| > t, target sparsity {}", profile.sparsity_target),
        },
        profile.ffn_activation,
        profile.n_tokens,
        n_tok / secs.max(1e-9)
    );
    println!("layer  threshold  active%  never-active  samples");
    for (i, l) in profile.layers.iter().enumerate() {
        let active: i64 = l.counts.iter().sum();
        let never = l.counts.iter().filter(|&&c| c == 0).count();
        println!(
            "{i:>5}  {:>9.4}  {:>6.2}  {never:>12}  {:>7}",
            l.threshold,
            100.0 * active as f64 / (n_tok * n_ff).max(1.0),
            l.n_samples(c.n_embd)
        );
    }
    println!(
        "wrote {} ({:.1}s in all)",
        out.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
