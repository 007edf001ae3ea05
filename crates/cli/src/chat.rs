//! `powerinfer chat`: an interactive conversation through the model's chat template.

use std::io::{BufRead, Write};

use clap::Args;

use crate::common::{ModelArgs, SamplingArgs, load};

/// Arguments of `powerinfer chat`.
#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// A system message.
    #[arg(long = "system")]
    system: Option<String>,
}

/// Runs the subcommand: reads user messages from stdin, one per line, until end of input.
pub fn run(args: &ChatArgs) -> Result<(), String> {
    let llm = load(&args.model)?;
    let mut chat = llm.chat().map_err(|e| e.to_string())?;
    if let Some(s) = &args.system {
        chat.system(s);
    }
    let opts = args.sampling.options();
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        std::io::stderr().flush().ok();
        line.clear();
        if stdin
            .lock()
            .read_line(&mut line)
            .map_err(|e| e.to_string())?
            == 0
        {
            break;
        }
        let msg = line.trim();
        if msg.is_empty() {
            continue;
        }
        let mut out = std::io::stdout().lock();
        chat.send(msg, &opts, |piece| {
            let _ = write!(out, "{piece}");
            let _ = out.flush();
        })
        .map_err(|e| e.to_string())?;
        writeln!(out).ok();
    }
    Ok(())
}
