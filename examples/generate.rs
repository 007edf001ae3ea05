//! The smallest embedding of powerinfer: load a model, stream a greedy continuation.
//!
//! ```sh
//! scripts/fetch-models.sh smollm2
//! cargo run --release --example generate -- models/SmolLM2-135M-Instruct.Q4_1.gguf "The capital of France is"
//! ```

use std::io::Write;

use powerinfer::{GenerateOptions, Llm, LoadOptions, SamplerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args
        .next()
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let prompt = args
        .next()
        .unwrap_or_else(|| "The capital of France is".into());

    let llm = Llm::load(&model, &LoadOptions::default())?;
    let opts = GenerateOptions {
        max_tokens: 48,
        sampler: SamplerConfig::greedy(),
        ..Default::default()
    };
    let mut session = llm.session()?;
    let mut stream = session.generate_text(&prompt, &opts)?;
    print!("{prompt}");
    for token in stream.by_ref() {
        print!("{}", token?.text);
        std::io::stdout().flush()?;
    }
    println!("{}", stream.flush());
    let stats = stream.stats();
    eprintln!(
        "{} tokens at {:.1} tok/s ({:?})",
        stats.generated_tokens,
        stats.tokens_per_s(),
        stream.finish_reason()
    );
    Ok(())
}
