//! `powerinfer profile` and `powerinfer train-predictor` on the tiny fixture model, and their
//! errors.

use std::path::PathBuf;
use std::process::Command;

use powerinfer_gguf::{GgufFile, Magic};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/powerinfer-tiny")
        .join(name)
}

fn text() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/austen/austen-persuasion.txt")
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("powerinfer-cli-{}-{name}", std::process::id()))
}

fn powerinfer(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_powerinfer"))
        .args(args)
        .output()
        .expect("run powerinfer");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn profile_then_train() {
    let model = fixture("tiny-relu-llama.dense.f16.gguf");
    if !model.exists() || !text().exists() {
        eprintln!("fixture or text not found; skipping");
        return;
    }
    let prof = tmp("p.safetensors");
    let out = tmp("p.pwri.gguf");
    let (ok, stdout, stderr) = powerinfer(&[
        "profile",
        "-m",
        model.to_str().unwrap(),
        "-f",
        text().to_str().unwrap(),
        "-o",
        prof.to_str().unwrap(),
        "-c",
        "64",
        "--max-tokens",
        "320",
        "--calib-tokens",
        "64",
        "-t",
        "1",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("256 tokens counted"), "{stdout}");
    assert!(prof.exists());

    let (ok, stdout, stderr) = powerinfer(&[
        "train-predictor",
        "-m",
        model.to_str().unwrap(),
        "--profile",
        prof.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--max-hidden",
        "16",
        "--epochs",
        "2",
        "-t",
        "1",
    ]);
    assert!(ok, "{stdout}\n{stderr}");
    assert!(stdout.contains("recall"), "{stdout}");
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.magic(), Magic::Pwri);
    // The byte budget: F16 predictors of hidden size 16, 3 layers, n_embd 64.
    let n_ff = f.tensor("blk.0.ffn_up.weight").unwrap().shape[1] as f64;
    let want = 3.0 * 2.0 * 16.0 * (64.0 + n_ff) / 1e3;
    let line = stdout
        .lines()
        .find(|l| l.starts_with("per token: the predictors read "))
        .unwrap_or_else(|| panic!("no byte budget in {stdout}"));
    let rest = &line["per token: the predictors read ".len()..];
    assert!(rest.split(' ').nth(1) == Some("kB"), "{line}");
    let kb: f64 = rest.split(' ').next().unwrap().parse().unwrap();
    assert!((kb - want).abs() < 0.06, "{line}: want {want:.1} kB");
    for i in 0..3 {
        assert!(f.tensor(&format!("blk.{i}.ffn_down_t.weight")).is_some());
        assert_eq!(
            f.tensor(&format!("blk.{i}.fc1.weight")).unwrap().shape,
            vec![64, 16]
        );
        assert!(f.tensor(&format!("blk.{i}.ffn_down.weight")).is_none());
    }
    assert_eq!(
        f.get_f32_array("powerinfer.sparse_thresholds")
            .unwrap()
            .len(),
        3
    );

    // the profile does not belong to another model
    let other = fixture("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf");
    let out2 = tmp("other.pwri.gguf");
    let (ok, _, stderr) = powerinfer(&[
        "train-predictor",
        "-m",
        other.to_str().unwrap(),
        "--profile",
        prof.to_str().unwrap(),
        "-o",
        out2.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("another model"), "{stderr}");
    assert!(!out2.exists());
    std::fs::remove_file(&prof).unwrap();
    std::fs::remove_file(&out).unwrap();
}

#[test]
fn missing_files() {
    let (ok, _, stderr) = powerinfer(&[
        "profile",
        "-m",
        "/nonexistent/model.gguf",
        "-f",
        "/nonexistent/text.txt",
    ]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/model.gguf"), "{stderr}");
    let model = fixture("tiny-relu-llama.dense.f16.gguf");
    if !model.exists() {
        return;
    }
    let (ok, _, stderr) = powerinfer(&[
        "profile",
        "-m",
        model.to_str().unwrap(),
        "-f",
        "/nonexistent/text.txt",
    ]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/text.txt"), "{stderr}");
    let (ok, _, stderr) = powerinfer(&[
        "train-predictor",
        "-m",
        model.to_str().unwrap(),
        "--profile",
        "/nonexistent/p.safetensors",
        "-o",
        tmp("never.gguf").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/p.safetensors"), "{stderr}");
}
