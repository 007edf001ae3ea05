//! Writes a synthetic PowerInfer file and reports the time taken:
//! `cargo run --release -p powerinfer-synth --example write -- llama-7b OUT.gguf [N_LAYER]`.

use std::time::Instant;

use powerinfer_gguf::GgmlType;
use powerinfer_synth::{Layout, ModelShape, Synth, SynthConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(shape), Some(out)) = (args.first(), args.get(1)) else {
        eprintln!("usage: write SHAPE OUT.gguf [N_LAYER]");
        std::process::exit(2);
    };
    let mut shape = ModelShape::preset(shape)?;
    if let Some(n) = args.get(2) {
        shape.n_layer = n.parse()?;
    }
    let synth = Synth::new(SynthConfig::new(shape, GgmlType::Q4_0, 1))?;
    let start = Instant::now();
    let bytes = synth.write_file(Layout::PowerInfer, out, &|_| {})?;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{out}: {bytes} bytes in {secs:.2} s ({:.0} MB/s)",
        bytes as f64 / 1e6 / secs
    );
    Ok(())
}
