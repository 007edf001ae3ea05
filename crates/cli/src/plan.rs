//! `powerinfer plan`: hot/cold neuron placement under a VRAM budget, written as a `.gpuidx`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use powerinfer_convert::DType;
use powerinfer_gguf::GgufFile;
use powerinfer_planner::{
    ActivationTensor, ActivationValues, Category, CostModel, Method, PlanOptions, Summary, profile,
};
use serde_json::json;

/// Which solver chooses the GPU neurons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// The most activations covered under the exact byte cost.
    Optimal,
    /// The reference PowerInfer's: 256-neuron groups, most activated groups first.
    Reference,
}

/// Arguments of `powerinfer plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Model file (GGUF or PowerInfer PWRI).
    #[arg(short = 'm', long = "model")]
    pub model: PathBuf,
    /// VRAM budget in GiB (may be fractional); written as split.vram_capacity.
    #[arg(long = "vram-budget")]
    pub vram_budget: f64,
    /// Activation counts: a safetensors profile (blk.{i}.ffn_counts tensors, as `powerinfer
    /// profile` writes), or the reference PowerInfer's activation directory
    /// (activation_{i}.pt per layer, one 1-D tensor of n_ff counts each).
    #[arg(long, conflicts_with = "uniform")]
    pub profile: Option<PathBuf>,
    /// Without a profile: treat every neuron as equally active (places the most neurons).
    #[arg(long)]
    pub uniform: bool,
    /// Context size the KV cache is counted for (default: the model's, capped at 4096).
    #[arg(short = 'c', long = "ctx-size", default_value_t = 0)]
    pub ctx_size: u64,
    /// Output file (default: <model>.generated.gpuidx next to the model).
    #[arg(short = 'o', long = "output")]
    pub output: Option<PathBuf>,
    /// FFN solver.
    #[arg(long, value_enum, default_value_t = MethodArg::Optimal)]
    pub method: MethodArg,
    /// MiB of the budget kept free for scratch buffers.
    #[arg(long = "reserve-mib", default_value_t = 0.0)]
    pub reserve_mib: f64,
    /// If the fixed part (attention, predictors, norms, output, KV cache) does not fit, place
    /// what fits in priority order instead of failing.
    #[arg(long)]
    pub partial: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

fn bytes_of(value: f64, unit: f64, flag: &str) -> Result<u64, String> {
    let b = value * unit;
    if !b.is_finite() || b < 0.0 || b >= u64::MAX as f64 {
        return Err(format!("{flag} {value} is not a usable size"));
    }
    Ok(b.round() as u64)
}

/// Runs the subcommand.
pub fn run(args: &PlanArgs) -> Result<(), String> {
    let budget = bytes_of(args.vram_budget, GIB, "--vram-budget")?;
    if budget == 0 {
        return Err("--vram-budget must be above 0".to_owned());
    }
    let reserve = bytes_of(args.reserve_mib, MIB, "--reserve-mib")?;
    if args.profile.is_none() && !args.uniform {
        return Err(
            "no activation counts: give --profile PROFILE (a safetensors file with blk.{i}.ffn_counts, or the reference's activation/ directory of activation_{i}.pt files), or --uniform to treat every neuron as equally active"
                .to_owned(),
        );
    }
    let model =
        GgufFile::open(&args.model).map_err(|e| format!("{}: {e}", args.model.display()))?;
    let n_ctx = if args.ctx_size > 0 {
        args.ctx_size
    } else {
        model
            .get_arch_u64("context_length")
            .map(|c| c.clamp(1, 4096))
            .unwrap_or(4096)
    };
    let cost = CostModel::from_gguf(&model, n_ctx)
        .map_err(|e| format!("{}: {e}", args.model.display()))?;
    let counts = match &args.profile {
        Some(p) if p.is_dir() => read_activations(p, &cost.n_ff())?,
        Some(p) => {
            let counts = profile::read_profile(p).map_err(|e| e.to_string())?;
            profile::check_profile(&counts, &cost.n_ff()).map_err(|e| {
                format!(
                    "{}: {e}: the profile was made for another model",
                    p.display()
                )
            })?;
            counts
        }
        None => profile::uniform_counts(&cost.n_ff()),
    };
    let method = match args.method {
        MethodArg::Optimal => Method::Optimal,
        MethodArg::Reference => Method::Reference,
    };
    let opts = PlanOptions {
        budget,
        reserve,
        method,
        partial: args.partial,
    };

    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}").map_err(|e| e.to_string())?,
    );
    spinner.set_message(format!("planning ({method})"));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let result = powerinfer_planner::plan(&cost, &counts, &opts);
    spinner.finish_and_clear();
    let plan = result.map_err(|e| e.to_string())?;

    let output = args
        .output
        .clone()
        .unwrap_or_else(|| powerinfer_planner::default_gpuidx_path(&args.model));
    plan.gpu_index
        .write(&output)
        .map_err(|e| format!("{}: {e}", output.display()))?;

    if args.json {
        let report = json!({
            "model": args.model.display().to_string(),
            "architecture": cost.architecture,
            "output": output.display().to_string(),
            "uniform": args.profile.is_none(),
            "summary": plan.summary,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_text(args, &cost, &plan.summary, &output);
    }
    Ok(())
}

/// Reads one `activation_{i}.pt` (a `torch.save` of one tensor) for the planner's
/// activation-directory loader: its shape and its elements as integers or floats.
pub(crate) fn load_activation_pt(path: &Path) -> Result<ActivationTensor, String> {
    let t = powerinfer_convert::pt::read_tensor(path).map_err(|e| e.to_string())?;
    let d = &t.data;
    let int = |size: usize, f: fn(&[u8]) -> i64| {
        ActivationValues::Int(d.chunks_exact(size).map(f).collect())
    };
    let values = match t.dtype {
        DType::F32 | DType::F16 | DType::BF16 => ActivationValues::Float(
            t.to_f32()
                .ok_or_else(|| format!("{} elements of {} bytes", t.dtype, d.len()))?
                .into_iter()
                .map(f64::from)
                .collect(),
        ),
        DType::F64 => ActivationValues::Float(
            d.chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        ),
        DType::I64 => int(8, |c| i64::from_le_bytes(c.try_into().expect("8 bytes"))),
        DType::I32 => int(4, |c| {
            i64::from(i32::from_le_bytes(c.try_into().expect("4 bytes")))
        }),
        DType::I16 => int(2, |c| {
            i64::from(i16::from_le_bytes(c.try_into().expect("2 bytes")))
        }),
        DType::I8 => int(1, |c| i64::from(c[0] as i8)),
        DType::U8 | DType::Bool => int(1, |c| i64::from(c[0])),
    };
    Ok(ActivationTensor {
        shape: t.shape,
        values,
    })
}

/// Reads a reference activation directory for a model with these per-layer `n_ff`.
pub(crate) fn read_activations(dir: &Path, n_ff: &[usize]) -> Result<Vec<Vec<u64>>, String> {
    profile::read_activation_dir(dir, Some(n_ff), &mut |_, f| load_activation_pt(f))
        .map_err(|e| e.to_string())
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB
}

fn print_text(args: &PlanArgs, cost: &CostModel, s: &Summary, output: &std::path::Path) {
    println!(
        "model    {} ({}, {} layers, KV cache at {} tokens)",
        args.model.display(),
        cost.architecture,
        cost.n_layer,
        s.n_ctx
    );
    println!(
        "budget   {:.3} GiB ({:.2} MiB, {} bytes), reserve {:.1} MiB, method {}",
        s.budget as f64 / GIB,
        mib(s.budget),
        s.budget,
        mib(s.reserve),
        s.method
    );
    println!(
        "{:<10} {:>12} {:>12}",
        "category", "needed MiB", "placed MiB"
    );
    for c in &s.categories {
        println!(
            "{:<10} {:>12.2} {:>12.2}",
            c.category.name(),
            mib(c.needed),
            mib(c.placed)
        );
    }
    println!(
        "{:<10} {:>12.2} {:>12} (token embedding, stays on the CPU)",
        "cpu only",
        mib(s.cpu_only),
        "-"
    );
    println!(
        "placed   {:.2} MiB, unused {:.2} MiB{}",
        mib(s.placed),
        mib(s.unused),
        if s.fixed_complete {
            String::new()
        } else {
            let missing: Vec<&str> = s
                .categories
                .iter()
                .filter(|c| c.category != Category::Ffn && c.placed < c.needed)
                .map(|c| c.category.name())
                .collect();
            format!(" (partial: not all of {} placed)", missing.join(", "))
        }
    );
    let what = if args.profile.is_none() {
        "neurons (uniform counts)"
    } else {
        "activations"
    };
    println!(
        "coverage {:.2}% of {what} ({} / {}); {} of {} neurons on the GPU",
        100.0 * s.coverage,
        s.covered,
        s.total,
        s.gpu_neurons,
        s.neurons
    );
    println!("layer   gpu/n_ff   bytes/neuron  covered");
    for l in &s.layers {
        let pct = if l.total == 0 {
            0.0
        } else {
            100.0 * l.covered as f64 / l.total as f64
        };
        println!(
            "{:>5} {:>6}/{:<6} {:>10}  {:>6.2}%",
            l.layer, l.n_gpu, l.n_ff, l.neuron_bytes, pct
        );
    }
    println!("not counted: {}", s.not_counted.join("; "));
    println!("wrote    {}", output.display());
}
