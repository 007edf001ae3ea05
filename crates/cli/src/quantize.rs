//! `powerinfer quantize IN OUT TYPE`: quantize a GGUF or PWRI file with the reference's type
//! rules (the magic and the predictors are kept).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use powerinfer_convert::quantize::{FileType, QuantizeOptions, quantize_file};

/// Arguments of `powerinfer quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Input model (GGUF or PWRI, F32/F16).
    pub input: PathBuf,
    /// Output file.
    pub output: PathBuf,
    /// Target: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K (= Q3_K_M), Q3_K_S, Q3_K_M, Q3_K_L,
    /// Q4_K (= Q4_K_M), Q4_K_S, Q4_K_M, Q5_K (= Q5_K_M), Q5_K_S, Q5_K_M, Q6_K, IQ4_NL, IQ4_XS,
    /// or llama.cpp's file-type number.
    #[arg(value_parser = parse_type)]
    pub ty: FileType,
    /// Worker threads (default: one per CPU).
    #[arg(short = 't', long = "threads", default_value_t = 0)]
    pub threads: usize,
    /// Allow re-quantizing tensors that are already quantized.
    #[arg(long = "allow-requantize")]
    pub allow_requantize: bool,
    /// Leave output.weight unquantized.
    #[arg(long = "leave-output-tensor")]
    pub leave_output_tensor: bool,
    /// Quantize every 2-D weight to the base type (no K-quant mixes, no special cases; rows
    /// that are not a multiple of 256 get the super-block type's fallback).
    #[arg(long = "pure")]
    pub pure: bool,
    /// Round Q4_0/Q4_1/Q5_0/Q5_1 without a fused multiply-add (differs from the reference
    /// build in rare ties).
    #[arg(long = "unfused")]
    pub unfused: bool,
}

fn parse_type(s: &str) -> Result<FileType, String> {
    FileType::parse(s).ok_or_else(|| {
        let names: Vec<&str> = FileType::ALL.iter().map(|f| f.name()).collect();
        format!(
            "unknown quantization type {s:?} (one of {})",
            names.join(", ")
        )
    })
}

/// Runs the subcommand.
pub fn run(args: &QuantizeArgs) -> Result<(), String> {
    let mut opts = QuantizeOptions::new(args.ty);
    opts.threads = args.threads;
    opts.allow_requantize = args.allow_requantize;
    opts.leave_output_tensor = args.leave_output_tensor;
    opts.pure = args.pure;
    opts.fused = !args.unfused;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {msg} [{elapsed}<{eta}]")
            .expect("static template"),
    );
    let start = Instant::now();
    let r = quantize_file(&args.input, &args.output, &opts, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
        bar.set_message(p.tensor.to_owned());
    })
    .map_err(|e| format!("{}: {e}", args.input.display()))?;
    bar.finish_and_clear();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "wrote {} ({}): {} tensors, {} quantized{}, {:.2} MiB -> {:.2} MiB in {:.1} s",
        args.output.display(),
        args.ty,
        r.n_tensors,
        r.n_quantized,
        if r.n_fallback > 0 {
            format!(
                " ({} with fallback types: rows not a multiple of 256)",
                r.n_fallback
            )
        } else {
            String::new()
        },
        mib(r.bytes_in),
        mib(r.bytes_out),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
