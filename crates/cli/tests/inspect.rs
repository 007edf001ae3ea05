//! End-to-end tests of `powerinfer inspect` on the fixture files, real models and damaged copies.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/powerinfer-tiny")
}

fn models() -> PathBuf {
    std::env::var_os("POWERINFER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

fn inspect(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_powerinfer"))
        .arg("inspect")
        .args(args)
        .output()
        .expect("spawn powerinfer")
}

fn inspect_json(path: &Path) -> serde_json::Value {
    let out = inspect(&["--json", "--tensors", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "inspect {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("inspect --json prints JSON")
}

#[test]
fn fixture_files_match_their_dump() {
    let dump: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gguf_dump.json")).expect("gguf_dump.json"),
    )
    .unwrap();
    for name in [
        "tiny-relu-llama.dense.f16.gguf",
        "tiny-relu-llama.oracle-pred.f16.powerinfer.gguf",
        "tiny-relu-llama.random-pred.f16.powerinfer.gguf",
        "tiny-relu-llama.random-pred.q4_0.powerinfer.gguf",
    ] {
        let r = inspect_json(&fixtures().join(name));
        let expect_format = if name.contains("powerinfer") {
            "PWRI"
        } else {
            "GGUF"
        };
        assert_eq!(r["format"], expect_format, "{name}");
        assert_eq!(r["architecture"], "llama", "{name}");
        assert_eq!(r["hyperparameters"]["layers"], 3, "{name}");
        assert_eq!(r["hyperparameters"]["embedding"], 64, "{name}");
        assert_eq!(r["tokenizer"]["vocab_size"], 1024, "{name}");
        assert_eq!(r["tokenizer"]["model"], "llama", "{name}");
        // The tensor list agrees with the independent dump (names and offsets).
        let text = serde_json::to_string(&dump).unwrap();
        for t in r["tensors"].as_array().unwrap() {
            let tname = t["name"].as_str().unwrap();
            assert!(text.contains(tname), "{name}: {tname} not in dump");
        }
        if expect_format == "PWRI" {
            assert_eq!(r["sparse"]["predictor_layers"], 3, "{name}");
        }
    }
}

#[test]
fn text_output_names_the_essentials() {
    let out = inspect(&[fixtures()
        .join("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf")
        .to_str()
        .unwrap()]);
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    for needle in ["PWRI v3", "llama", "Q4_0", "Q8_0", "threshold 0.1"] {
        assert!(s.contains(needle), "missing {needle:?} in:\n{s}");
    }
}

#[test]
fn real_models() {
    for (file, arch, layers, vocab) in [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "llama", 30, 49152),
        ("gemma-3-270m-q4_k_m.gguf", "gemma3", 18, 262144),
    ] {
        let path = models().join(file);
        if !path.exists() {
            eprintln!("skipping {file}: not fetched (scripts/fetch-models.sh)");
            continue;
        }
        let r = inspect_json(&path);
        assert_eq!(r["format"], "GGUF");
        assert_eq!(r["architecture"], arch);
        assert_eq!(r["hyperparameters"]["layers"], layers);
        assert_eq!(r["tokenizer"]["vocab_size"], vocab);
    }
}

#[test]
fn damaged_files_get_one_clear_error_line() {
    let src =
        std::fs::read(fixtures().join("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf")).unwrap();
    let dir = std::env::temp_dir().join(format!("powerinfer-inspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), Vec::new()),
        (
            "magic".into(),
            b"NOPE".iter().chain(&src[4..]).copied().collect(),
        ),
    ];
    for cut in [3usize, 10, 23, 100, 1000, 23000, src.len() - 1] {
        cases.push((format!("cut{cut}"), src[..cut].to_vec()));
    }
    // Absurd tensor count (the u64 at offset 8).
    let mut absurd = src.clone();
    absurd[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes());
    cases.push(("absurd-count".into(), absurd));
    for (name, bytes) in cases {
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, bytes).unwrap();
        let out = inspect(&[path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: damaged file accepted");
        assert!(!err.contains("panicked"), "{name}: panic: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: {err}");
        assert!(err.starts_with("error: "), "{name}: {err}");
    }
    let out = inspect(&[dir.join("does-not-exist.gguf").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does-not-exist.gguf"));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bit_flipped_files_never_panic() {
    let src =
        std::fs::read(fixtures().join("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf")).unwrap();
    let dir = std::env::temp_dir().join(format!("powerinfer-flip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("flipped.gguf");
    // The header (metadata and tensor directory) is the first ~24 KB: flip a bit every 97 bytes
    // there, and a few in the data.
    let positions = (0..24_000usize)
        .step_by(97)
        .chain((24_000..src.len()).step_by(50_021));
    let mut refused = 0;
    for (i, pos) in positions.enumerate() {
        let mut bytes = src.clone();
        bytes[pos] ^= 1 << (i % 8);
        std::fs::write(&path, &bytes).unwrap();
        let out = inspect(&["--json", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "flip at {pos}: {err}");
        if !out.status.success() {
            refused += 1;
            assert!(err.starts_with("error: "), "flip at {pos}: {err}");
        }
    }
    // Many flips land in values (names, numbers) that stay valid; a good share must not.
    assert!(refused > 20, "only {refused} damaged copies refused");
    std::fs::remove_dir_all(&dir).ok();
}
