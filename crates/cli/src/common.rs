//! Flags and helpers shared by the subcommands that load a model.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use powerinfer::{GenerateOptions, Llm, LoadOptions, SamplerConfig, SparseMode};

/// Model-loading flags (llama.cpp's names).
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Model file (GGUF).
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// Threads to compute with (default: one per CPU).
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    pub threads: usize,
    /// Context size in tokens (default: the model's, capped at 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx_size: usize,
    /// Prompt tokens per forward pass.
    #[arg(short = 'b', long = "batch-size", default_value_t = 512)]
    pub batch_size: usize,
    /// Sparse (PowerInfer) models: compute every neuron (the dense result of the same weights).
    #[arg(long = "disable-sparse", conflicts_with = "sparse_mode")]
    pub disable_sparse: bool,
    /// Sparse models: `predicted` (the predictors choose the neurons; default), `threshold` (no
    /// predictor: every gate and up computed, the down projection skips neurons whose |h| is
    /// under the file's activity threshold) or `dense` (every neuron, as --disable-sparse).
    #[arg(long = "sparse-mode", value_parser = parse_sparse_mode)]
    pub sparse_mode: Option<SparseMode>,
    /// Sparse models: a neuron runs when its predictor score is at least this (default: the
    /// file's, or LLAMA_SPARSE_PRED_THRESHOLD).
    #[arg(long = "sparse-threshold", allow_negative_numbers = true)]
    pub sparse_threshold: Option<f32>,
}

/// Sampling flags (llama.cpp's names and defaults).
#[derive(Debug, Args)]
pub struct SamplingArgs {
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    /// Temperature; 0 is greedy.
    #[arg(long = "temp", default_value_t = 0.8)]
    pub temp: f32,
    /// Top-k (0 = off).
    #[arg(long = "top-k", default_value_t = 40)]
    pub top_k: usize,
    /// Top-p (1.0 = off).
    #[arg(long = "top-p", default_value_t = 0.95)]
    pub top_p: f32,
    /// Min-p (0 = off).
    #[arg(long = "min-p", default_value_t = 0.05)]
    pub min_p: f32,
    /// Repetition penalty (1.0 = off).
    #[arg(long = "repeat-penalty", default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Tokens the penalties look back over.
    #[arg(long = "repeat-last-n", default_value_t = 64)]
    pub repeat_last_n: usize,
    /// Frequency penalty.
    #[arg(long = "frequency-penalty", default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Presence penalty.
    #[arg(long = "presence-penalty", default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Random seed.
    #[arg(short = 's', long = "seed", default_value_t = 0xFFFF_FFFF)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens.
    #[arg(long = "ignore-eos")]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    /// The generation options these flags describe.
    pub fn options(&self) -> GenerateOptions {
        GenerateOptions {
            max_tokens: self.n_predict,
            sampler: SamplerConfig {
                temperature: self.temp,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                repeat_last_n: self.repeat_last_n,
                frequency_penalty: self.frequency_penalty,
                presence_penalty: self.presence_penalty,
                seed: self.seed,
            },
            stop: self.stop.clone(),
            stop_at_eog: !self.ignore_eos,
        }
    }
}

impl ModelArgs {
    /// The sparse mode the flags ask for.
    pub fn sparse_mode(&self) -> SparseMode {
        match (self.disable_sparse, self.sparse_mode) {
            (true, _) => SparseMode::Dense,
            (false, Some(m)) => m,
            (false, None) => SparseMode::Predicted,
        }
    }
}

fn parse_sparse_mode(s: &str) -> Result<SparseMode, String> {
    match s {
        "predicted" => Ok(SparseMode::Predicted),
        "threshold" => Ok(SparseMode::Threshold),
        "dense" => Ok(SparseMode::Dense),
        other => Err(format!(
            "unknown sparse mode {other:?} (expected predicted, threshold or dense)"
        )),
    }
}

/// Loads the model with a progress bar on stderr.
pub fn load(args: &ModelArgs) -> Result<Llm, String> {
    let start = Instant::now();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {msg}")
            .expect("static template"),
    );
    bar.set_message(args.model.display().to_string());
    let opts = LoadOptions {
        n_threads: args.threads,
        n_ctx: args.ctx_size,
        n_batch: args.batch_size,
        sparse_mode: args.sparse_mode(),
        sparse_threshold: args.sparse_threshold,
    };
    let llm = Llm::load_with_progress(&args.model, &opts, |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })
    .map_err(|e| format!("{}: {e}", args.model.display()))?;
    bar.finish_and_clear();
    let c = llm.model().config();
    eprintln!(
        "loaded {} ({}, {} layers, n_embd {}, vocab {}) in {:.2} s; context {}, {} threads",
        args.model.display(),
        c.arch.name(),
        c.n_layer,
        c.n_embd,
        c.n_vocab,
        start.elapsed().as_secs_f64(),
        llm.n_ctx(),
        llm.pool().n_threads()
    );
    let model = llm.model();
    if model.is_sparse() {
        let thr: Vec<f32> = model.sparse_thresholds().into_iter().flatten().collect();
        let (lo, hi) = thr
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &t| {
                (a.min(t), b.max(t))
            });
        let thr = if lo == hi {
            format!("{lo}")
        } else {
            format!("{lo}..{hi}")
        };
        if args.sparse_mode() == SparseMode::Dense {
            eprintln!("sparse model, run densely (--disable-sparse): every neuron computed");
        } else if args.sparse_mode() == SparseMode::Threshold {
            eprintln!(
                "sparse model, no predictor (--sparse-mode threshold): down rows skipped under the activity thresholds"
            );
        } else {
            eprintln!(
                "sparse model: {} of {} layers with predictors, threshold {thr}",
                model.sparse_thresholds().iter().flatten().count(),
                model.config().n_layer
            );
        }
    } else if args.disable_sparse || args.sparse_mode.is_some() || args.sparse_threshold.is_some() {
        eprintln!(
            "note: a dense model; --disable-sparse, --sparse-mode and --sparse-threshold have no effect"
        );
    }
    if model
        .file()
        .get_bool("powerinfer.synthetic")
        .unwrap_or(false)
    {
        eprintln!(
            "note: a synthetic model (seeded random weights, for speed and scale only): its text is meaningless"
        );
    }
    Ok(llm)
}
