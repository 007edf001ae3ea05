//! `powerinfer run`: generate a continuation of a prompt.

use std::io::Write;

use clap::Args;
use serde_json::json;

use crate::common::{ModelArgs, SamplingArgs, load};

/// Arguments of `powerinfer run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt.
    #[arg(short = 'p', long = "prompt", conflicts_with = "file")]
    prompt: Option<String>,
    /// Read the prompt from a file.
    #[arg(short = 'f', long = "file")]
    file: Option<std::path::PathBuf>,
    /// Print `{"prompt_tokens": [...], "tokens": [...], "text": "..."}` instead of the text.
    #[arg(long)]
    json: bool,
}

/// Runs the subcommand.
pub fn run(args: &RunArgs) -> Result<(), String> {
    let prompt = match (&args.prompt, &args.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?
        }
        (None, None) => return Err("no prompt: pass -p PROMPT or -f FILE".into()),
    };
    let llm = load(&args.model)?;
    let prompt_tokens = llm.tokenize(&prompt);
    let opts = args.sampling.options();
    let mut session = llm.session().map_err(|e| e.to_string())?;
    let mut stream = session
        .generate(&prompt_tokens, &opts)
        .map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    if !args.json {
        write!(out, "{prompt}").map_err(|e| e.to_string())?;
        out.flush().ok();
    }
    let mut tokens = Vec::new();
    let mut text = String::new();
    for t in stream.by_ref() {
        let t = t.map_err(|e| e.to_string())?;
        tokens.push(t.id);
        text.push_str(&t.text);
        if !args.json {
            write!(out, "{}", t.text).map_err(|e| e.to_string())?;
            out.flush().ok();
        }
    }
    let rest = stream.flush();
    text.push_str(&rest);
    let stats = stream.stats();
    let finish = stream.finish_reason();
    if args.json {
        let v = json!({"prompt_tokens": prompt_tokens, "tokens": tokens, "text": text});
        writeln!(out, "{v}").map_err(|e| e.to_string())?;
    } else {
        writeln!(out, "{rest}").map_err(|e| e.to_string())?;
    }
    eprintln!(
        "prompt: {} tokens, {:.1} tok/s; generated: {} tokens, {:.1} tok/s; finished: {:?}",
        stats.prompt_tokens,
        stats.prompt_tokens_per_s(),
        stats.generated_tokens,
        stats.tokens_per_s(),
        finish
    );
    Ok(())
}
