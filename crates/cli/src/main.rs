//! The `powerinfer` command-line program.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod chat;
mod common;
mod inspect;
mod perplexity;
mod run;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Run(args) => run::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Perplexity(args) => perplexity::run(args),
        Command::Inspect(args) => inspect::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
