//! `powerinfer train-predictor`: train per-layer predictors on a profile and write a PowerInfer
//! (PWRI) model with them.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use powerinfer::cpu::grouped::GroupedDown;
use powerinfer::generate::pwri::{DownTType, PwriOptions, write_pwri};
use powerinfer::gguf::GgmlType;
use powerinfer::gguf::GgufFile;
use powerinfer_predictor::profile::{ModelIdentity, Profile};
use powerinfer_predictor::train::{TrainConfig, TrainEvent, TrainedLayer, train_profile};

/// Arguments of `powerinfer train-predictor`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The dense model the profile was made from (GGUF).
    #[arg(short = 'm', long = "model")]
    model: PathBuf,
    /// The profile (`powerinfer profile`).
    #[arg(long = "profile")]
    profile: PathBuf,
    /// Output PWRI model.
    #[arg(short = 'o', long = "output")]
    output: PathBuf,
    /// Held-out recall each layer's threshold is set to reach.
    #[arg(long = "recall", default_value_t = 0.99)]
    recall: f32,
    /// Widest predictor hidden layer (the ladder is 32, 64, 128, 256, 512).
    #[arg(long = "max-hidden", default_value_t = 512)]
    max_hidden: usize,
    /// A width is enough once it skips this fraction of the truly inactive neurons.
    #[arg(long = "min-skip", default_value_t = 0.5)]
    min_skip: f32,
    /// Stop widening once doubling the width skips less than this much more (absolute).
    #[arg(long = "min-gain", default_value_t = 0.01)]
    min_gain: f32,
    /// Training passes per width.
    #[arg(long = "epochs", default_value_t = 20)]
    epochs: usize,
    /// Tokens per mini-batch.
    #[arg(long = "batch", default_value_t = 128)]
    batch: usize,
    /// Adam learning rate.
    #[arg(long = "lr", default_value_t = 1e-2)]
    lr: f32,
    /// Type of the transposed down projection: `auto` (float sources keep their type, quantized
    /// ones become Q8_0), `same` (the source's type where the row length allows), or a type
    /// name (`q8_0`, `f16`, `q4_0`, ...).
    #[arg(long = "down-t-type", default_value = "auto")]
    down_t_type: String,
    /// How many leading positions of every sequence the sparse modes compute densely (the
    /// attention-sink tokens, BOS first; 0: none). Stored in the file.
    #[arg(long = "dense-prefix", default_value_t = powerinfer::generate::pwri::DEFAULT_DENSE_PREFIX)]
    dense_prefix: u32,
    /// Seed.
    #[arg(short = 's', long = "seed", default_value_t = 0x5eed)]
    seed: u64,
    /// Threads (layers train in parallel; default: one per CPU).
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    threads: usize,
}

/// Runs the subcommand.
pub fn run(args: &TrainArgs) -> Result<(), String> {
    let t0 = Instant::now();
    let down_t = match args.down_t_type.to_ascii_lowercase().as_str() {
        "auto" => DownTType::Auto,
        "same" => DownTType::Same,
        name => DownTType::Fixed(GgmlType::from_name(name).ok_or_else(|| {
            format!("--down-t-type {name:?}: not auto, same or a ggml type name")
        })?),
    };
    let file = GgufFile::open(&args.model).map_err(|e| format!("{}: {e}", args.model.display()))?;
    let identity =
        ModelIdentity::from_gguf(&file).map_err(|e| format!("{}: {e}", args.model.display()))?;
    let profile =
        Profile::load(&args.profile).map_err(|e| format!("{}: {e}", args.profile.display()))?;
    profile.identity.check(&identity).map_err(|e| {
        format!(
            "{} does not belong to {}: {e}",
            args.profile.display(),
            args.model.display()
        )
    })?;
    if file
        .tensors()
        .iter()
        .any(|t| t.name.ends_with(".fc1.weight"))
    {
        return Err(format!(
            "{} already has predictors: give the dense model",
            args.model.display()
        ));
    }
    let n_layer = profile.layers.len();
    let cfg = TrainConfig {
        target_recall: args.recall,
        max_hidden: args.max_hidden,
        epochs: args.epochs,
        batch_size: args.batch,
        learning_rate: args.lr,
        min_skip: args.min_skip,
        min_gain: args.min_gain,
        seed: args.seed,
        ..TrainConfig::default()
    };
    eprintln!(
        "{} layers, {} samples per layer, rule {} ({}), target recall {}",
        n_layer,
        profile
            .layers
            .first()
            .map_or(0, |l| l.n_samples(identity.n_embd)),
        profile.rule.name(),
        profile.ffn_activation,
        args.recall
    );
    let bar = ProgressBar::new(n_layer as u64).with_style(
        ProgressStyle::with_template(
            "train {bar:30} {pos}/{len} layers ({elapsed}, eta {eta}) {msg}",
        )
        .expect("static template"),
    );
    let losses = Mutex::new(vec![String::new(); n_layer]);
    let progress = |e: TrainEvent| match e {
        TrainEvent::Epoch {
            layer,
            hidden,
            epoch,
            epochs,
            loss,
        } => {
            let mut l = losses.lock().expect("no panics while holding the lock");
            l[layer] = format!("L{layer} H{hidden} {epoch}/{epochs} loss {loss:.4}");
            let msg: Vec<&str> = l
                .iter()
                .filter(|s| !s.is_empty())
                .map(String::as_str)
                .collect();
            bar.set_message(msg.join(" | "));
        }
        TrainEvent::LayerDone { layer, .. } => {
            losses.lock().expect("no panics while holding the lock")[layer].clear();
            bar.inc(1);
        }
        TrainEvent::Attempt { .. } => {}
    };
    let t1 = Instant::now();
    let trained =
        train_profile(&profile, &cfg, args.threads, &progress).map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let train_secs = t1.elapsed().as_secs_f64();

    println!(
        "layer  H    threshold  recall  precision  predicted%  active%  skip%  pred%@r.90/.95  tried (H:pred%)"
    );
    for (i, t) in trained.iter().enumerate() {
        let s = &t.stats;
        let tried: Vec<String> = t
            .attempts
            .iter()
            .map(|a| format!("{}:{:.1}%", a.hidden, 100.0 * a.stats.predicted_fraction))
            .collect();
        println!(
            "{i:>5}  {:<4} {:>9.4}  {:.4}  {:>9.4}  {:>10.2}  {:>7.2}  {:>5.1}  {:>6.1} {:>6.1}  {}{}",
            t.hidden,
            t.threshold,
            s.recall,
            s.precision,
            100.0 * s.predicted_fraction,
            100.0 * s.active_fraction,
            100.0 * s.skip,
            100.0 * s.predicted_at_recall[0],
            100.0 * s.predicted_at_recall[1],
            tried.join(" "),
            if t.reached_target {
                ""
            } else {
                "  (min-skip not reached)"
            }
        );
    }
    let n = trained.len().max(1) as f64;
    println!(
        "mean: recall {:.4}, precision {:.4}, predicted {:.2}%, active {:.2}%; training {:.1}s",
        trained.iter().map(|t| t.stats.recall).sum::<f64>() / n,
        trained.iter().map(|t| t.stats.precision).sum::<f64>() / n,
        100.0
            * trained
                .iter()
                .map(|t| t.stats.predicted_fraction)
                .sum::<f64>()
            / n,
        100.0 * trained.iter().map(|t| t.stats.active_fraction).sum::<f64>() / n,
        train_secs
    );

    // The predictor input is the residual stream, converted to f16 by an F16 fc1 product:
    // keep fc1 in F32 when the profiled inputs come within 4x of f16's largest value.
    let x_max = profile
        .layers
        .iter()
        .flat_map(|l| l.x.iter())
        .fold(0.0f32, |m, v| m.max(v.to_f32().abs()));
    let fc1_f32 = x_max > 65504.0 / 4.0;
    if fc1_f32 {
        eprintln!("predictor inputs reach {x_max:.0}: fc1 stored in F32 (beyond f16's range)");
    }
    // What decoding with these predictors reads per token, against what they let it skip.
    let budget = ByteBudget::estimate(&file, &trained, fc1_f32);
    println!(
        "per token: the predictors read {} to skip {} of the FFN's {} (predicted mode){}",
        human_bytes(budget.predictors),
        human_bytes(budget.predicted_skip),
        human_bytes(budget.ffn),
        match budget.threshold_skip {
            Some(t) => format!(
                "; the threshold mode skips {} with no predictor",
                human_bytes(t)
            ),
            None => String::new(),
        }
    );
    if budget.predictors >= budget.predicted_skip {
        eprintln!(
            "warning: the predictors read more than they skip, so the predicted mode (the default) \
             will decode slower than the dense model; run this file with --sparse-mode threshold, \
             or the dense model"
        );
    }

    let opts = PwriOptions {
        keep_down: true,
        fc1_f32,
        down_t,
        ffn_activation: profile.ffn_activation.clone(),
        sparsity_target: profile.sparsity_target,
        activation_thresholds: profile.layers.iter().map(|l| l.threshold).collect(),
        dense_prefix: args.dense_prefix,
    };
    let wbar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("write {bar:40} {pos}/{len} tensors")
            .expect("static template"),
    );
    let mut wprog = |done: usize, total: usize| {
        wbar.set_length(total as u64);
        wbar.set_position(done as u64);
    };
    let t2 = Instant::now();
    let summary = write_pwri(&file, &trained, &opts, &args.output, Some(&mut wprog))
        .map_err(|e| format!("{}: {e}", args.output.display()))?;
    wbar.finish_and_clear();
    println!(
        "wrote {} ({:.1} MB, ffn_down_t as {}) in {:.1}s; {:.1}s in all",
        args.output.display(),
        summary.bytes as f64 / 1e6,
        summary.down_t_types.first().map_or("-", |t| t.name()),
        t2.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Bytes read per decoded token by a file with `trained`'s predictors, from the model's tensor
/// sizes and the predictors' held-out statistics (F16 predictors as `write_pwri` stores them,
/// `fc1` in F32 where the inputs need it).
struct ByteBudget {
    /// Every layer's FFN weights (gate, up, down).
    ffn: f64,
    /// The predictors' weights.
    predictors: f64,
    /// FFN weights of the neurons the predictors leave out (their gate, up and down rows).
    predicted_skip: f64,
    /// Down-projection values of the neurons under the activity threshold (the threshold mode
    /// reads every gate and up row, and the down projection's scales), where the down
    /// projection is read regrouped by neuron (4-bit types; others go through a transposed
    /// copy whose reads depend on its type).
    threshold_skip: Option<f64>,
}

impl ByteBudget {
    fn estimate(file: &GgufFile, trained: &[TrainedLayer], fc1_f32: bool) -> ByteBudget {
        let fc1_bytes = if fc1_f32 { 4.0 } else { 2.0 };
        let mut b = ByteBudget {
            ffn: 0.0,
            predictors: 0.0,
            predicted_skip: 0.0,
            threshold_skip: Some(0.0),
        };
        for (i, t) in trained.iter().enumerate() {
            let size = |name: &str| {
                file.tensor(&format!("blk.{i}.{name}.weight"))
                    .map_or(0.0, |t| t.size as f64)
            };
            let (gate, up, down) = (size("ffn_gate"), size("ffn_up"), size("ffn_down"));
            let n_ff = file
                .tensor(&format!("blk.{i}.ffn_up.weight"))
                .and_then(|t| t.shape.get(1).copied())
                .unwrap_or(1) as f64;
            let n_embd = file
                .tensor(&format!("blk.{i}.ffn_up.weight"))
                .and_then(|t| t.shape.first().copied())
                .unwrap_or(0) as f64;
            b.ffn += gate + up + down;
            b.predictors += t.hidden as f64 * (fc1_bytes * n_embd + 2.0 * n_ff);
            b.predicted_skip += (1.0 - t.stats.predicted_fraction) * (gate + up + down);
            // A 4-bit block of 32 keeps 16 of its bytes in values, the rest in scales.
            let down_ty = file
                .tensor(&format!("blk.{i}.ffn_down.weight"))
                .map(|t| t.ty);
            b.threshold_skip = match (b.threshold_skip, down_ty) {
                (Some(sum), Some(ty)) if GroupedDown::supports(ty) => {
                    let values = 16.0 / ty.type_size() as f64;
                    Some(sum + (1.0 - t.stats.active_fraction) * down * values)
                }
                _ => None,
            };
        }
        b
    }
}

/// `bytes` in kB or MB, one decimal.
fn human_bytes(bytes: f64) -> String {
    if bytes >= 1e6 {
        format!("{:.1} MB", bytes / 1e6)
    } else {
        format!("{:.1} kB", bytes / 1e3)
    }
}
