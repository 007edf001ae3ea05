//! `powerinfer serve`: an OpenAI-compatible HTTP server with continuous batching.

use std::sync::Arc;

use clap::Args;
use powerinfer::generate::batch::BatchConfig;
use powerinfer_server::ServerConfig;

use crate::common::{ModelArgs, load};

/// Arguments of `powerinfer serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address chosen is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Sequences decoded together (each with its own KV cache of -c tokens).
    #[arg(long = "parallel", visible_alias = "np", default_value_t = 4)]
    parallel: usize,
    /// Requests that may wait for a free sequence slot; more are answered 503.
    #[arg(long = "queue", default_value_t = 64)]
    queue: usize,
    /// The model id the API reports (default: the file name).
    #[arg(long = "alias")]
    alias: Option<String>,
    /// Compute every prompt in full instead of reusing what a free slot's KV cache holds of it
    /// (a conversation's earlier turns, a common instruction). The reuse keeps a full
    /// computation's bits, except with the sparse FFNs of PWRI files (a micro-batch computes
    /// its tokens' union of active neurons): there an answer could differ in the last bits of
    /// its logits from a fresh run.
    #[arg(long = "no-cache-prompt")]
    no_cache_prompt: bool,
}

/// Runs the subcommand until SIGINT or SIGTERM.
pub fn run(args: &ServeArgs) -> Result<(), String> {
    if args.parallel == 0 {
        return Err("--parallel must be at least 1".into());
    }
    let llm = Arc::new(load(&args.model)?);
    let name = args.alias.clone().unwrap_or_else(|| {
        args.model
            .model
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let cfg = ServerConfig {
        host: args.host.clone(),
        port: args.port,
        model_name: name,
        batch: BatchConfig {
            n_parallel: args.parallel,
            n_ctx: llm.n_ctx(),
            n_batch: args.model.batch_size.max(1),
            max_queue: args.queue,
            cache_prompt: !args.no_cache_prompt,
        },
    };
    powerinfer_server::run(llm, &cfg, |addr| {
        eprintln!(
            "listening on http://{addr} ({} slots of {} tokens, queue {})",
            cfg.batch.n_parallel, cfg.batch.n_ctx, cfg.batch.max_queue
        );
    })
    .map_err(|e| e.to_string())?;
    eprintln!("server stopped");
    Ok(())
}
