//! `powerinfer perplexity`: llama.cpp's perplexity over a text file.

use std::path::PathBuf;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use powerinfer::generate::perplexity::perplexity_with_state;

use crate::common::{ModelArgs, load};

/// Arguments of `powerinfer perplexity`.
#[derive(Debug, Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
    /// Sparse models: also measure each layer's predictor against the neurons that really fire
    /// (recall, precision) and print the table. Every neuron is then computed, so the perplexity
    /// printed is the dense one.
    #[arg(long = "predictor-quality")]
    predictor_quality: bool,
}

/// Runs the subcommand. Windows of `-c` tokens (512 by default), BOS at the start of each, the
/// second half of each window scored, as llama.cpp does.
pub fn run(args: &PerplexityArgs) -> Result<(), String> {
    let text =
        std::fs::read_to_string(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let mut margs = ModelArgs {
        ..args.model.clone()
    };
    if margs.ctx_size == 0 {
        margs.ctx_size = 512;
    }
    let n_ctx = margs.ctx_size;
    let llm = load(&margs)?;
    let tokens = llm.tokenizer().encode(&text, true, false);
    let bos = if llm.tokenizer().add_bos() {
        llm.tokenizer().bos()
    } else {
        None
    };
    let n_chunks = tokens.len() / n_ctx;
    eprintln!(
        "{} tokens, {n_chunks} windows of {n_ctx}, scoring the second half of each",
        tokens.len()
    );
    let bar = ProgressBar::new(n_chunks as u64).with_style(
        ProgressStyle::with_template("perplexity {bar:40} {pos}/{len} windows, PPL {msg} ({eta})")
            .expect("static template"),
    );
    let mut progress = |done: usize, _total: usize, ppl: f64| {
        bar.set_position(done as u64);
        bar.set_message(format!("{ppl:.4}"));
    };
    let model = llm.model();
    if args.predictor_quality && !model.is_sparse() {
        return Err(format!(
            "{}: --predictor-quality needs a sparse (PowerInfer) model with predictors",
            margs.model.display()
        ));
    }
    let mut state = model
        .new_state(n_ctx, margs.batch_size.max(1))
        .map_err(|e| e.to_string())?;
    if args.predictor_quality {
        state.measure_predictors(model.config().n_layer);
    }
    let r = perplexity_with_state(
        model,
        llm.pool(),
        &mut state,
        &tokens,
        n_ctx,
        margs.batch_size,
        bos,
        Some(&mut progress),
    )
    .map_err(|e| e.to_string())?;
    bar.finish_and_clear();
    if let Some(q) = state.predictor_quality() {
        println!("predictor quality (predicted vs truly active neurons, per layer):");
        print!("{}", q.table());
    }
    println!("scored {} tokens in {} windows", r.n_scored, r.n_chunks);
    println!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_stderr);
    Ok(())
}
