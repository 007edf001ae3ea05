//! Sparse (PowerInfer) files through the CLI: the reference's own files, `--disable-sparse`,
//! `--sparse-threshold`, `--predictor-quality`, and clear errors.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/powerinfer-tiny")
        .join(name)
}

fn powerinfer(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_powerinfer"))
        .args(args)
        .output()
        .expect("spawn powerinfer")
}

fn run_json(model: &Path, extra: &[&str]) -> serde_json::Value {
    let m = model.to_str().unwrap();
    let mut args = vec![
        "run",
        "-m",
        m,
        "-p",
        "Once upon a time",
        "-n",
        "16",
        "--temp",
        "0",
        "--json",
        "-t",
        "2",
    ];
    args.extend_from_slice(extra);
    let out = powerinfer(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The reference's golden run `random_q4_0_t1` (threshold 0.1 from the file) starts from the
/// ids `[1, 908, ...]`: its tokenizer drops SentencePiece's leading-space piece, ours keeps it
/// (as SentencePiece and llama.cpp do), so compare from explicit ids in the library test and
/// here check that the CLI prints the prompt and generated ids, and that the sparse and the
/// dense-equivalent runs behave as the flags say.
#[test]
fn flags_switch_between_sparse_and_dense() {
    let m = fixture("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf");
    let sparse = run_json(&m, &[]);
    assert_eq!(sparse["prompt_tokens"][0], 1);
    assert_eq!(sparse["tokens"].as_array().unwrap().len(), 16);
    let dense = run_json(&m, &["--disable-sparse"]);
    let every = run_json(&m, &["--sparse-threshold", "-1e30"]);
    // Every neuron predicted active == every neuron computed.
    assert_eq!(dense["tokens"], every["tokens"]);
    // The random predictor skips neurons that fire: the sparse run differs from the dense one.
    assert_ne!(sparse["tokens"], dense["tokens"]);
}

#[test]
fn bad_threshold_and_misuse_are_clear_errors() {
    let m = fixture("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf");
    let m = m.to_str().unwrap();
    let out = powerinfer(&["run", "-m", m, "-p", "x", "--sparse-threshold", "abc"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--sparse-threshold"), "{err}");

    let out = powerinfer(&["run", "-m", m, "-p", "x", "--sparse-threshold", "nan"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a number"), "{err}");

    let dense = fixture("tiny-relu-llama.dense.f16.gguf");
    let text = fixture("../../data/austen/austen-pp-100k.txt");
    let out = powerinfer(&[
        "perplexity",
        "-m",
        dense.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "--predictor-quality",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a sparse"), "{err}");
}

/// The oracle predictor is perfect: the quality table reports recall and precision 1.
#[test]
fn predictor_quality_table() {
    let m = fixture("tiny-relu-llama.oracle-pred.f16.powerinfer.gguf");
    let dir = std::env::temp_dir().join(format!("pi-quality-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        "It is a truth universally acknowledged, that a single man in possession of a good \
         fortune, must be in want of a wife. However little known the feelings or views of such \
         a man may be on his first entering a neighbourhood, this truth is so well fixed in the \
         minds of the surrounding families.",
    )
    .unwrap();
    let out = powerinfer(&[
        "perplexity",
        "-m",
        m.to_str().unwrap(),
        "-f",
        text.to_str().unwrap(),
        "-c",
        "16",
        "--predictor-quality",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("all"))
        .unwrap_or_else(|| panic!("{stdout}"));
    let cols: Vec<&str> = all.split_whitespace().collect();
    let recall: f64 = cols[1].parse().unwrap();
    let precision: f64 = cols[2].parse().unwrap();
    assert!(recall > 0.999 && precision > 0.999, "{all}");
    std::fs::remove_dir_all(&dir).ok();
}
