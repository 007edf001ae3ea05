//! `powerinfer convert HF_DIR [PREDICTOR_DIR] -o OUT`: a Hugging Face LLaMA checkpoint (and
//! PowerInfer predictors) to a PWRI file, or to a plain GGUF without predictors.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use powerinfer_convert::convert::{ConvertOptions, OutType, convert_hf};

/// Arguments of `powerinfer convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Hugging Face model directory (config.json, model.safetensors or pytorch_model*.bin,
    /// tokenizer.model).
    pub hf_dir: PathBuf,
    /// Predictor directory (model_{i}.pt or model_{i}.safetensors per layer, optional
    /// config.json with sparse_threshold); without it the output is a plain GGUF.
    pub predictor_dir: Option<PathBuf>,
    /// Output file.
    #[arg(short = 'o', long = "outfile")]
    pub out: PathBuf,
    /// Type of the 2-D tensors: f16 or f32 (1-D tensors are always f32).
    #[arg(long = "outtype", default_value = "f16", value_parser = parse_outtype)]
    pub outtype: OutType,
    /// Write this powerinfer.sparse_threshold instead of the predictor config.json's.
    #[arg(long = "sparse-threshold", allow_negative_numbers = true)]
    pub sparse_threshold: Option<f32>,
}

fn parse_outtype(s: &str) -> Result<OutType, String> {
    OutType::parse(s).ok_or_else(|| format!("unknown output type {s:?} (f16 or f32)"))
}

/// Runs the subcommand.
pub fn run(args: &ConvertArgs) -> Result<(), String> {
    if args.sparse_threshold.is_some() && args.predictor_dir.is_none() {
        return Err("--sparse-threshold needs a predictor directory".into());
    }
    let opts = ConvertOptions {
        outtype: args.outtype,
        sparse_threshold: args.sparse_threshold,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {msg} [{elapsed}<{eta}]")
            .expect("static template"),
    );
    let start = Instant::now();
    let report = convert_hf(
        &args.hf_dir,
        args.predictor_dir.as_deref(),
        &args.out,
        &opts,
        &mut |p| {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
            bar.set_message(p.tensor.to_owned());
        },
    )
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    let kind = match report.magic {
        powerinfer_gguf::Magic::Pwri => format!(
            "PowerInfer (PWRI) file with predictors for {} layers{}",
            report.n_predictor_layers,
            report
                .sparse_threshold
                .map(|t| format!(", sparse threshold {t}"))
                .unwrap_or_default()
        ),
        powerinfer_gguf::Magic::Gguf => "GGUF file (dense, no predictors)".to_owned(),
    };
    println!(
        "wrote {}: {kind}, {} tensors, {:.2} MiB in {:.1} s",
        args.out.display(),
        report.n_tensors,
        report.file_size as f64 / (1024.0 * 1024.0),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
