//! `powerinfer profile`: record which FFN neurons a model activates on calibration text (per
//! neuron counts and sampled predictor training pairs), into a safetensors profile; or, with
//! `--from-activations DIR`, convert the reference PowerInfer's `activation_{i}.pt` counts
//! into that format (counts only).

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use powerinfer::ThreadPool;
use powerinfer::generate::Model;
use powerinfer::generate::model::SparseMode;
use powerinfer::generate::profile::{
    ProfileConfig, ProfileStage, ffn_activation_name, profile_model,
};
use powerinfer::generate::tokenizer::Tokenizer;
use powerinfer_planner::CostModel;
use powerinfer_predictor::profile::{ActivityRule, LayerProfile, ModelIdentity, Profile};

/// Arguments of `powerinfer profile`.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Model file (GGUF; a PWRI file is run with every neuron computed).
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// Calibration text (repeatable: the files' tokens are concatenated).
    #[arg(
        short = 'f',
        long = "file",
        required_unless_present = "from_activations"
    )]
    files: Vec<PathBuf>,
    /// Instead of profiling on text: convert the reference PowerInfer's activation directory
    /// (activation_{i}.pt per layer, one 1-D tensor of n_ff counts each) into a profile of
    /// MODEL, checking that its layers and n_ff match. The result holds the counts only: no
    /// predictor training pairs (train-predictor needs a profile made from text), no token
    /// count, thresholds 0. Enough for `powerinfer plan --profile`.
    #[arg(
        long = "from-activations",
        value_name = "DIR",
        conflicts_with_all = [
            "files", "ctx_size", "batch_size", "sparsity", "samples", "max_tokens",
            "calib_tokens", "seed", "threads",
        ]
    )]
    from_activations: Option<PathBuf>,
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
    if let Some(dir) = &args.from_activations {
        return from_activations(args, dir);
    }
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

/// `--from-activations DIR`: the reference's per-layer counts as a counts-only profile.
fn from_activations(args: &ProfileArgs, dir: &Path) -> Result<(), String> {
    let t0 = Instant::now();
    let shown = args.model.display();
    let model = Model::load(&args.model).map_err(|e| format!("{shown}: {e}"))?;
    let identity = ModelIdentity::from_gguf(model.file()).map_err(|e| format!("{shown}: {e}"))?;
    let act = ffn_activation_name(&model).map_err(|e| format!("{shown}: {e}"))?;
    let n_ff = CostModel::from_gguf(model.file(), 1)
        .map_err(|e| format!("{shown}: {e}"))?
        .n_ff();
    if let Some(&n) = n_ff.iter().find(|&&n| n != identity.n_ff) {
        return Err(format!(
            "{shown}: a layer has n_ff {n} but feed_forward_length is {}: layers of different widths do not fit a profile",
            identity.n_ff
        ));
    }
    let bar = ProgressBar::new(n_ff.len() as u64).with_style(
        ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} layers ({elapsed})")
            .expect("static template"),
    );
    bar.set_message("read");
    let counts = powerinfer_planner::profile::read_activation_dir(dir, Some(&n_ff), &mut |l, f| {
        let t = crate::plan::load_activation_pt(f);
        bar.set_position(l as u64 + 1);
        t
    })
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let mut layers = Vec::with_capacity(counts.len());
    for (l, c) in counts.iter().enumerate() {
        let counts = c
            .iter()
            .map(|&x| i64::try_from(x))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| {
                format!(
                    "{}: a count above {} does not fit the profile's I64 counts",
                    dir.join(powerinfer_planner::profile::activation_file_name(l))
                        .display(),
                    i64::MAX
                )
            })?;
        layers.push(LayerProfile {
            counts,
            threshold: 0.0,
            x: Vec::new(),
            active: Vec::new(),
        });
    }
    let profile = Profile {
        identity,
        // Unknown: the reference does not record how many tokens it counted.
        n_tokens: 0,
        sparsity_target: 0.0,
        rule: if act == "relu" {
            ActivityRule::NonZero
        } else {
            ActivityRule::Magnitude
        },
        ffn_activation: act.to_owned(),
        layers,
    };
    let out = args
        .output
        .clone()
        .unwrap_or_else(|| default_output(&args.model));
    profile
        .save(&out)
        .map_err(|e| format!("{}: {e}", out.display()))?;
    println!("layer  never-active  max count  total");
    for (i, c) in counts.iter().enumerate() {
        let never = c.iter().filter(|&&x| x == 0).count();
        let max = c.iter().max().copied().unwrap_or(0);
        let total: u128 = c.iter().map(|&x| u128::from(x)).sum();
        println!("{i:>5}  {never:>12}  {max:>9}  {total}");
    }
    println!(
        "wrote {} ({} layers x {} neurons from {}; counts only, no predictor training pairs; {:.1}s)",
        out.display(),
        counts.len(),
        profile.identity.n_ff,
        dir.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
