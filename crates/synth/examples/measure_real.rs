//! Runs a synthetic PowerInfer file in the sparse engine over random token ids and measures its
//! predictors on the FFN inputs the model actually produces (the residual streams), per layer:
//! `cargo run --release -p powerinfer-synth --example measure_real -- FILE [N_TOKENS] [THREADS]`.

use std::time::Instant;

use powerinfer_generate::model::{FfnObserver, Logits, Model};
use powerinfer_gguf::GgufFile;
use powerinfer_synth::measure_inputs;

struct Collect(Vec<Vec<f32>>);

impl FfnObserver for Collect {
    fn observe(&mut self, layer: usize, _n_tokens: usize, input: &[f32], _hidden: &[f32]) {
        self.0[layer].extend_from_slice(input);
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: measure_real FILE [N_TOKENS] [THREADS]");
        std::process::exit(2);
    };
    let n: usize = args.get(1).map_or(Ok(32), |s| s.parse())?;
    let threads: usize = args.get(2).map_or(Ok(0), |s| s.parse())?;
    let start = Instant::now();
    let model = Model::load(path)?;
    let c = model.config().clone();
    let pool = powerinfer_cpu::ThreadPool::new(threads);
    let mut state = model.new_state(n.max(1), n.max(1))?;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let tokens: Vec<u32> = std::iter::once(1)
        .chain((1..n).map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % c.n_vocab as u64) as u32
        }))
        .collect();
    let mut obs = Collect(vec![Vec::new(); c.n_layer]);
    let logits = model.forward_observed(&pool, &mut state, &tokens, Logits::All, &mut obs)?;
    let finite = logits.iter().all(|x| x.is_finite());
    println!(
        "{path}: {n} tokens through {} layers in {:.1} s, logits finite: {finite}",
        c.n_layer,
        start.elapsed().as_secs_f64()
    );
    let file = GgufFile::open(path)?;
    let target = file.get_f32("powerinfer.synthetic.sparsity").ok();
    let hot_share = file
        .get_f32("powerinfer.synthetic.hot_share")
        .map_or(0.2, f64::from);
    let (mut sum, mut hot) = (0.0, 0.0);
    for (layer, inputs) in obs.0.iter().enumerate() {
        let a = measure_inputs(&file, layer, inputs, hot_share, threads)?;
        println!(
            "layer {layer:>3}: active {:.4} (per token {:.4}..{:.4}), hot {:.0}% carry {:.1}%",
            a.mean_fraction,
            a.min_fraction,
            a.max_fraction,
            hot_share * 100.0,
            a.hot_mass * 100.0
        );
        sum += a.mean_fraction;
        hot += a.hot_mass;
    }
    let nl = c.n_layer as f64;
    println!(
        "mean active fraction {:.4} (target {}), mean hot mass {:.1}%",
        sum / nl,
        target.map_or("?".to_string(), |s| format!("{:.4}", 1.0 - s)),
        hot / nl * 100.0
    );
    Ok(())
}
