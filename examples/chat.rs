//! A streaming chat: each line of standard input is a user message; the answer streams to
//! standard output as it is generated, through the model's chat template.
//!
//! ```sh
//! scripts/fetch-models.sh smollm2
//! cargo run --release --example chat -- models/SmolLM2-135M-Instruct.Q4_1.gguf
//! ```

use std::io::{BufRead, Write};

use powerinfer::{GenerateOptions, Llm, LoadOptions, SamplerConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let llm = Llm::load(&model, &LoadOptions::default())?;
    let mut chat = llm.chat()?;
    let opts = GenerateOptions {
        max_tokens: 256,
        sampler: SamplerConfig {
            temperature: 0.7,
            ..Default::default()
        },
        ..Default::default()
    };
    eprintln!("chatting with {model}; one message per line, Ctrl-D to end");
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        chat.send(&line, &opts, |piece| {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        })?;
        println!();
    }
    Ok(())
}
