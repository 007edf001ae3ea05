//! `powerinfer bench`: prompt-processing and decode speed, like llama-bench.

use std::time::Instant;

use clap::Args;
use powerinfer::generate::model::Logits;
use serde_json::json;

use crate::common::{ModelArgs, load};

/// Arguments of `powerinfer bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt tokens processed in one go (0 skips the test).
    #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
    n_prompt: usize,
    /// Tokens decoded one at a time (0 skips the test).
    #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
    n_gen: usize,
    /// Tokens already in the context before each test (like llama-bench's `-d`): a prompt of
    /// this many tokens is processed once, untimed, and each test starts from it, so decode
    /// speed at a long context can be measured.
    #[arg(short = 'd', long = "depth", default_value_t = 0)]
    depth: usize,
    /// Repetitions; the median is reported.
    #[arg(short = 'r', long = "repetitions", default_value_t = 3)]
    reps: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// A second model (same options; a dense GGUF ignores the sparse ones), measured
    /// alternately with the first, repetition by repetition, on the same threads: the ratio of
    /// the two is then robust to a noisy machine, which slows both alike.
    #[arg(long, value_name = "FILE")]
    baseline: Option<std::path::PathBuf>,
    /// Batched decoding instead (like llama-batched-bench; compare with `llamacpp-bench
    /// batched`): for each count in the list, that many sequences each take a random prompt of
    /// `-p` tokens, then decode `-n` tokens together, one batched forward pass per step. Reports
    /// the aggregate decode rate and its ratio to one sequence.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', conflicts_with_all = ["baseline", "depth"])]
    parallel: Vec<usize>,
}

/// One model under measurement: its state, its token stream and what it measured.
struct Subject<'a> {
    llm: &'a powerinfer::Llm,
    state: powerinfer::generate::model::ModelState,
    tokens: RandomTokens,
    /// Context positions each test starts from.
    depth: usize,
    pp: Vec<f64>,
    tg: Vec<f64>,
    timings: [f64; 3],
}

impl<'a> Subject<'a> {
    fn new(
        llm: &'a powerinfer::Llm,
        n_prompt: usize,
        n_gen: usize,
        depth: usize,
    ) -> Result<Self, String> {
        let n_ctx = (depth + n_prompt.max(n_gen)).max(1);
        // Micro-batches: the test prompt in one, the depth prefix in chunks of at most 512.
        let n_ubatch = n_prompt.max(depth.min(512)).max(1);
        let state = llm
            .model()
            .new_state(n_ctx, n_ubatch)
            .map_err(|e| e.to_string())?;
        Ok(Subject {
            llm,
            state,
            tokens: RandomTokens::new(llm),
            depth,
            pp: Vec::new(),
            tg: Vec::new(),
            timings: [0.0; 3],
        })
    }

    /// Fills the context with the depth prefix (untimed).
    fn fill_depth(&mut self, pool: &powerinfer::cpu::ThreadPool) -> Result<(), String> {
        self.state.clear();
        if self.depth == 0 {
            return Ok(());
        }
        let tokens: Vec<u32> = (0..self.depth).map(|_| self.next_token()).collect();
        self.llm
            .model()
            .forward(pool, &mut self.state, &tokens, Logits::Last)
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn next_token(&mut self) -> u32 {
        self.tokens.next()
    }

    /// One repetition: a prompt of `n_prompt` tokens, then `n_gen` tokens decoded one by one,
    /// on `pool`.
    fn repetition(
        &mut self,
        pool: &powerinfer::cpu::ThreadPool,
        n_prompt: usize,
        n_gen: usize,
    ) -> Result<(), String> {
        if n_prompt > 0 {
            let tokens: Vec<u32> = (0..n_prompt).map(|_| self.next_token()).collect();
            self.state.rewind(self.depth);
            let t = Instant::now();
            self.llm
                .model()
                .forward(pool, &mut self.state, &tokens, Logits::Last)
                .map_err(|e| e.to_string())?;
            self.pp.push(n_prompt as f64 / t.elapsed().as_secs_f64());
        }
        if n_gen > 0 {
            self.state.rewind(self.depth);
            self.state.reset_timings();
            let t = Instant::now();
            for _ in 0..n_gen {
                let tok = self.next_token();
                self.llm
                    .model()
                    .forward(pool, &mut self.state, &[tok], Logits::Last)
                    .map_err(|e| e.to_string())?;
            }
            self.tg.push(n_gen as f64 / t.elapsed().as_secs_f64());
            let o = self.state.timings();
            self.timings[0] += o.attention.as_secs_f64();
            self.timings[1] += o.predictor.as_secs_f64();
            self.timings[2] += o.ffn.as_secs_f64();
        }
        Ok(())
    }

    /// Shares of the decode time in the layers: attention, predictors, FFN.
    fn shares(&self) -> [f64; 3] {
        let layers: f64 = self.timings.iter().sum();
        self.timings
            .map(|x| if layers > 0.0 { x / layers } else { 0.0 })
    }
}

/// Deterministic pseudo-random token ids (a splitmix64 stream, the same for every subject).
struct RandomTokens {
    seed: u64,
    n_vocab: u64,
}

impl RandomTokens {
    fn new(llm: &powerinfer::Llm) -> Self {
        RandomTokens {
            seed: 0x9E37_79B9_7F4A_7C15,
            n_vocab: llm.model().config().n_vocab as u64,
        }
    }

    fn next(&mut self) -> u32 {
        self.seed = self.seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % self.n_vocab) as u32
    }
}

/// Median of the per-repetition ratios `a[i] / b[i]` (`None` without samples).
fn ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    (!a.is_empty()).then(|| median(a.iter().zip(b).map(|(x, y)| x / y).collect()))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Runs the subcommand.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    if args.reps == 0 {
        return Err("--repetitions must be at least 1".into());
    }
    if !args.parallel.is_empty() {
        return run_parallel(args);
    }
    let main_llm = load(&args.model)?;
    let base_llm = match &args.baseline {
        Some(path) => {
            let mut a = ModelArgs::clone(&args.model);
            a.model = path.clone();
            Some(load(&a)?)
        }
        None => None,
    };
    let mut main = Subject::new(&main_llm, args.n_prompt, args.n_gen, args.depth)?;
    let mut base = match &base_llm {
        Some(llm) => Some(Subject::new(llm, args.n_prompt, args.n_gen, args.depth)?),
        None => None,
    };
    // Every subject runs on the first model's threads (the other pool stays parked).
    let pool = main_llm.pool();
    // Warm-up: one short pass touches every weight once.
    for s in std::iter::once(&mut main).chain(base.as_mut()) {
        let tok = s.next_token();
        s.llm
            .model()
            .forward(pool, &mut s.state, &[tok], Logits::Last)
            .map_err(|e| e.to_string())?;
        s.fill_depth(pool)?;
    }
    for rep in 0..args.reps {
        // Alternate which goes first, so that neither always follows the other.
        if rep % 2 == 1
            && let Some(b) = base.as_mut()
        {
            b.repetition(pool, args.n_prompt, args.n_gen)?;
            main.repetition(pool, args.n_prompt, args.n_gen)?;
        } else {
            main.repetition(pool, args.n_prompt, args.n_gen)?;
            if let Some(b) = base.as_mut() {
                b.repetition(pool, args.n_prompt, args.n_gen)?;
            }
        }
    }
    let name = args.model.model.display().to_string();
    let threads = pool.n_threads();
    let med = |v: &[f64]| (!v.is_empty()).then(|| median(v.to_vec()));
    if args.json {
        let sh = main.shares();
        let mut v = json!({
            "model": name, "threads": threads, "repetitions": args.reps,
            "n_prompt": args.n_prompt, "n_gen": args.n_gen, "depth": args.depth,
            "pp_tok_s": med(&main.pp), "tg_tok_s": med(&main.tg),
            "pp_samples": main.pp, "tg_samples": main.tg,
            "tg_layer_time_share": {
                "attention": sh[0], "predictor": sh[1], "ffn": sh[2],
            },
        });
        if let (Some(b), Some(path)) = (&base, &args.baseline) {
            v["baseline"] = json!({
                "model": path.display().to_string(),
                "pp_tok_s": med(&b.pp), "tg_tok_s": med(&b.tg),
                "pp_samples": b.pp, "tg_samples": b.tg,
            });
            v["pp_ratio"] = json!(ratio(&main.pp, &b.pp));
            v["tg_ratio"] = json!(ratio(&main.tg, &b.tg));
        }
        println!("{v}");
        return Ok(());
    }
    println!(
        "| model | threads | test | tok/s (median of {}) |",
        args.reps
    );
    println!("|---|---|---|---|");
    let mut rows = vec![(name, &main)];
    if let (Some(b), Some(path)) = (&base, &args.baseline) {
        rows.push((path.display().to_string(), b));
    }
    let at = if args.depth > 0 {
        format!(" @ d{}", args.depth)
    } else {
        String::new()
    };
    for (name, s) in &rows {
        if let Some(pp) = med(&s.pp) {
            println!("| {name} | {threads} | pp{}{at} | {pp:.2} |", args.n_prompt);
        }
        if let Some(tg) = med(&s.tg) {
            println!("| {name} | {threads} | tg{}{at} | {tg:.2} |", args.n_gen);
        }
    }
    if let Some(b) = &base {
        println!("\nmedian ratio per repetition (model / baseline):");
        if let Some(r) = ratio(&main.pp, &b.pp) {
            println!("  pp{}: {r:.3}x", args.n_prompt);
        }
        if let Some(r) = ratio(&main.tg, &b.tg) {
            println!("  tg{}: {r:.3}x", args.n_gen);
        }
    }
    if !main.tg.is_empty() {
        println!();
        for (name, s) in &rows {
            let sh = s.shares();
            let per_token = |x: f64| 1e3 * x / (args.reps * args.n_gen) as f64;
            println!(
                "decode time in the layers of {name}: attention {:.1}% ({:.3} ms/token), \
                 predictors {:.1}% ({:.3}), FFN {:.1}% ({:.3})",
                100.0 * sh[0],
                per_token(s.timings[0]),
                100.0 * sh[1],
                per_token(s.timings[1]),
                100.0 * sh[2],
                per_token(s.timings[2]),
            );
        }
    }
    Ok(())
}

/// `bench --parallel`: aggregate decode speed of several sequences decoded together.
fn run_parallel(args: &BenchArgs) -> Result<(), String> {
    if args.n_prompt == 0 || args.n_gen == 0 || args.parallel.contains(&0) {
        return Err("with --parallel, -p, -n and every count must be at least 1".into());
    }
    let llm = load(&args.model)?;
    let model = llm.model();
    let pool = llm.pool();
    let mut tokens = RandomTokens::new(&llm);
    let mut batch = model.new_batch_state();
    let mut rows = Vec::new();
    for &npl in &args.parallel {
        let mut states = (0..npl)
            .map(|_| model.new_state(args.n_prompt + args.n_gen + 1, args.n_prompt))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let mut tg = Vec::new();
        // The first round is a warm-up of one step.
        for rep in 0..=args.reps {
            for st in states.iter_mut() {
                st.clear();
                let prompt: Vec<u32> = (0..args.n_prompt).map(|_| tokens.next()).collect();
                model
                    .forward(pool, st, &prompt, Logits::Last)
                    .map_err(|e| e.to_string())?;
            }
            let steps = if rep == 0 { 1 } else { args.n_gen };
            let t = Instant::now();
            for _ in 0..steps {
                let step: Vec<u32> = (0..npl).map(|_| tokens.next()).collect();
                let mut refs: Vec<_> = states.iter_mut().collect();
                model
                    .forward_batch(pool, &mut batch, &mut refs, &step)
                    .map_err(|e| e.to_string())?;
            }
            if rep > 0 {
                tg.push((npl * steps) as f64 / t.elapsed().as_secs_f64());
            }
        }
        rows.push((npl, median(tg.clone()), tg));
    }
    let base = rows.iter().find(|r| r.0 == 1).map(|r| r.1);
    let name = args.model.model.display().to_string();
    if args.json {
        let out: Vec<_> = rows
            .iter()
            .map(|(npl, tg, samples)| {
                json!({
                    "npl": npl, "tg_tok_s": tg, "tg_samples": samples,
                    "tg_vs_npl1": base.map(|b| tg / b),
                })
            })
            .collect();
        let v = json!({
            "model": name, "threads": pool.n_threads(), "repetitions": args.reps,
            "n_prompt": args.n_prompt, "n_gen": args.n_gen, "rows": out,
        });
        println!("{v}");
        return Ok(());
    }
    println!(
        "| model | threads | sequences | decode tok/s, all sequences (median of {}) | vs 1 |",
        args.reps
    );
    println!("|---|---|---|---|---|");
    for (npl, tg, _) in &rows {
        let vs = base.map_or("".into(), |b| format!("{:.2}x", tg / b));
        println!("| {name} | {} | {npl} | {tg:.2} | {vs} |", pool.n_threads());
    }
    Ok(())
}
