//! The `powerinfer` command-line program.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod batch;
mod bench;
mod chat;
mod common;
mod convert;
mod inspect;
mod perplexity;
mod plan;
mod profile;
mod quantize;
mod run;
mod serve;
mod synth;
mod train;

/// Activation-sparse LLM inference.
#[derive(Debug, Parser)]
#[command(name = "powerinfer", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a continuation of a prompt.
    Run(run::RunArgs),
    /// Chat interactively through the model's chat template.
    Chat(chat::ChatArgs),
    /// Measure prompt-processing and decode speed (like llama-bench).
    Bench(bench::BenchArgs),
    /// Perplexity over a text file (llama.cpp's method).
    Perplexity(perplexity::PerplexityArgs),
    /// Show what a GGUF, PowerInfer (PWRI) or .gpuidx file holds.
    Inspect(inspect::InspectArgs),
    /// Generate from many prompts (a JSONL file) with continuous batching.
    Batch(batch::BatchArgs),
    /// Serve an OpenAI-compatible HTTP API (chat and text completions, streaming).
    Serve(serve::ServeArgs),
    /// Write a synthetic PowerInfer model (random weights; for speed and scale tests only).
    Synth(synth::SynthArgs),
    /// Place hot FFN neurons on the GPU under a VRAM budget (writes a .gpuidx).
    Plan(plan::PlanArgs),
    /// Record which FFN neurons a model activates on calibration text (a profile).
    Profile(profile::ProfileArgs),
    /// Train neuron predictors on a profile and write a PowerInfer (PWRI) model.
    TrainPredictor(train::TrainArgs),
    /// Convert a Hugging Face LLaMA checkpoint (+ predictors) to a PWRI or GGUF file.
    Convert(convert::ConvertArgs),
    /// Quantize a GGUF or PWRI file (Q4_0, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, ...).
    Quantize(quantize::QuantizeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Batch(args) => batch::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Profile(args) => profile::run(args),
        Command::TrainPredictor(args) => train::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Quantize(args) => quantize::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks of every subcommand's flags (a flag declared wrongly
    /// otherwise panics only when its subcommand runs).
    #[test]
    fn command_line_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
