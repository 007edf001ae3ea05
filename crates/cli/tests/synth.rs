//! `powerinfer synth` end to end with a tiny custom shape: both files written, readable,
//! marked synthetic by `inspect`, deterministic; clear errors for bad input.

use std::path::PathBuf;
use std::process::{Command, Output};

fn powerinfer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_powerinfer"))
        .args(args)
        .output()
        .expect("spawn powerinfer")
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "powerinfer-cli-synth-{}-{name}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A tiny custom shape, without --type / --sparsity (the error cases add their own).
const SHAPE: &[&str] = &[
    "synth",
    "--shape",
    "custom",
    "--n-embd",
    "64",
    "--n-ff",
    "256",
    "--n-layer",
    "2",
    "--n-head",
    "4",
    "--n-head-kv",
    "2",
    "--n-vocab",
    "300",
    "--seed",
    "3",
];

/// `SHAPE` plus type and sparsity.
const TINY: &[&str] = &[
    "synth",
    "--shape",
    "custom",
    "--n-embd",
    "64",
    "--n-ff",
    "256",
    "--n-layer",
    "2",
    "--n-head",
    "4",
    "--n-head-kv",
    "2",
    "--n-vocab",
    "300",
    "--seed",
    "3",
    "--type",
    "q4_0",
    "--sparsity",
    "0.9",
];

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn synth_writes_both_files_deterministically() {
    let dir = tmp_dir("ok");
    let pi = dir.join("tiny.powerinfer.gguf");
    let dense = dir.join("tiny.dense.gguf");
    let mut args = TINY.to_vec();
    args.extend([
        "-o",
        pi.to_str().unwrap(),
        "--dense",
        dense.to_str().unwrap(),
        "-t",
        "2",
        "--measure",
        "200",
    ]);
    let out = powerinfer(&args);
    assert!(out.status.success(), "synth failed: {}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("active fraction mean 0.09")
            || stdout.contains("active fraction mean 0.10"),
        "{stdout}"
    );
    let first = std::fs::read(&pi).unwrap();
    assert_eq!(&first[..4], b"PWRI");
    assert_eq!(&std::fs::read(&dense).unwrap()[..4], b"GGUF");

    // Same seed with one thread: the same bytes.
    let pi2 = dir.join("again.powerinfer.gguf");
    let mut args = TINY.to_vec();
    args.extend(["-o", pi2.to_str().unwrap(), "-t", "1"]);
    let out = powerinfer(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(first, std::fs::read(&pi2).unwrap());

    // inspect says it is synthetic and sees the predictors.
    let out = powerinfer(&["inspect", "--json", pi.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["format"], "PWRI");
    assert_eq!(j["sparse"]["predictor_layers"], 2);
    assert!(j["sparse"]["synthetic"].is_string(), "{j}");
    let out = powerinfer(&["inspect", pi.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("SYNTHETIC"));
    // The dense twin too (from its description: it carries no powerinfer.* keys).
    let out = powerinfer(&["inspect", dense.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("SYNTHETIC"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn synth_rejects_bad_input_clearly() {
    let dir = tmp_dir("bad");
    let o = dir.join("x.gguf");
    let o = o.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["synth", "--shape", "llama-9b", "-o", o], "unknown shape"),
        (
            &["synth", "--shape", "custom", "--n-embd", "64", "-o", o],
            "--shape custom needs",
        ),
        (&["--sparsity", "1.5"], "sparsity 1.5 is outside (0, 1)"),
        (&["--sparsity", "0"], "sparsity 0 is outside (0, 1)"),
        (&["--type", "q3_x"], "unknown tensor type"),
        (&["--type", "bf16"], "cannot be used for weights"),
        (&["--hot-share", "0.2", "--hot-mass", "0.1"], "cannot skew"),
    ];
    for (extra, want) in cases {
        let args: Vec<&str> = if extra[0] == "synth" {
            extra.to_vec()
        } else {
            let mut a = SHAPE.to_vec();
            a.extend(["-o", o]);
            a.extend(extra.iter());
            a
        };
        let out = powerinfer(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let mut args = TINY.to_vec();
    args.extend(["-o", "/nonexistent-dir/y.gguf"]);
    let out = powerinfer(&args);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("/nonexistent-dir/y.gguf"), "{err}");
    assert!(
        !std::path::Path::new(o).exists(),
        "nothing written on errors"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
