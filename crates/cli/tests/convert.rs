//! `powerinfer convert` and `powerinfer quantize` on the tiny reference fixture.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/powerinfer-tiny"
    ))
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-convert-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn powerinfer(args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_powerinfer"));
    for a in args {
        c.arg(a);
    }
    c.output().unwrap()
}

fn same_bytes(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert_eq!(
        x.len(),
        y.len(),
        "{} vs {}: sizes differ",
        a.display(),
        b.display()
    );
    assert!(x == y, "{} differs from {}", a.display(), b.display());
}

#[test]
fn convert_and_quantize_reproduce_the_reference_files() {
    let fx = fixtures();
    let dir = scratch("pipeline");
    let f16 = dir.join("tiny.f16.powerinfer.gguf");
    let o = powerinfer(&[
        &"convert",
        &fx.join("hf_model"),
        &fx.join("predictor_random"),
        &"-o",
        &f16,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("PWRI") && stdout.contains("sparse threshold 0.1"),
        "{stdout}"
    );
    same_bytes(
        &f16,
        &fx.join("tiny-relu-llama.random-pred.f16.powerinfer.gguf"),
    );

    let q = dir.join("tiny.q4_0.powerinfer.gguf");
    let o = powerinfer(&[&"quantize", &f16, &q, &"Q4_0", &"--threads", &"2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same_bytes(
        &q,
        &fx.join("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf"),
    );

    // Dense (no predictor directory) and the safetensors predictors with the threshold.
    let dense = dir.join("dense.gguf");
    let o = powerinfer(&[
        &"convert",
        &fx.join("hf_model"),
        &"-o",
        &dense,
        &"--outtype",
        &"f16",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same_bytes(&dense, &fx.join("tiny-relu-llama.dense.f16.gguf"));
    let st = dir.join("st.gguf");
    let o = powerinfer(&[
        &"convert",
        &fx.join("hf_model"),
        &fx.join("predictor_random_safetensors"),
        &"-o",
        &st,
        &"--sparse-threshold",
        &"0.1",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    same_bytes(
        &st,
        &fx.join("tiny-relu-llama.random-pred.f16.powerinfer.gguf"),
    );

    // K-quants fall back on this model's 64-element rows; the file stays PWRI.
    for ty in ["Q4_K", "Q5_K", "Q6_K", "Q8_0"] {
        let out = dir.join(format!("tiny.{ty}.gguf"));
        let o = powerinfer(&[&"quantize", &f16, &out, &ty]);
        assert!(
            o.status.success(),
            "{ty}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let b = std::fs::read(&out).unwrap();
        assert_eq!(&b[..4], b"PWRI");
        let o = powerinfer(&[&"inspect", &out, &"--json"]);
        assert!(o.status.success());
    }
}

#[test]
fn bad_input_fails_with_a_message() {
    let fx = fixtures();
    let dir = scratch("bad");
    // Unsupported architecture.
    let hf = dir.join("hf");
    std::fs::create_dir_all(&hf).unwrap();
    for e in std::fs::read_dir(fx.join("hf_model")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), hf.join(e.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(hf.join("config.json"))
        .unwrap()
        .replace("LlamaForCausalLM", "FalconForCausalLM");
    std::fs::write(hf.join("config.json"), cfg).unwrap();
    let out = dir.join("x.gguf");
    let o = powerinfer(&[&"convert", &hf, &"-o", &out]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("unsupported architecture \"FalconForCausalLM\""),
        "{err}"
    );
    assert!(!out.exists());
    // Missing predictor layer.
    let pred = dir.join("pred");
    std::fs::create_dir_all(&pred).unwrap();
    std::fs::copy(
        fx.join("predictor_random/model_0.pt"),
        pred.join("model_0.pt"),
    )
    .unwrap();
    let o = powerinfer(&[&"convert", &fx.join("hf_model"), &pred, &"-o", &out]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("predictor for layer 1 missing"), "{err}");
    // Unknown quantization type, unknown output type.
    let f16 = fx.join("tiny-relu-llama.dense.f16.gguf");
    let o = powerinfer(&[&"quantize", &f16, &out, &"Q3_XYZ"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown quantization type"));
    let o = powerinfer(&[
        &"convert",
        &fx.join("hf_model"),
        &"-o",
        &out,
        &"--outtype",
        &"q8_0",
    ]);
    assert!(!o.status.success());
    // A quantized input without --allow-requantize.
    let q4 = fx.join("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf");
    let o = powerinfer(&[&"quantize", &q4, &out, &"Q8_0"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--allow-requantize"));
}
