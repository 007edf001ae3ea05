//! End-to-end tests of `powerinfer plan` on the Q4_0 fixture with generated profiles.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use powerinfer_gguf::GpuIndex;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(
        "../../../shared/fixtures/powerinfer-tiny/tiny-relu-llama.random-pred.q4_0.powerinfer.gguf",
    )
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("powerinfer-cli-plan-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn plan(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_powerinfer"))
        .arg("plan")
        .args(args)
        .output()
        .expect("spawn powerinfer")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = plan(args);
    assert!(
        out.status.success(),
        "plan {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("--json prints JSON")
}

fn err_text(args: &[&str]) -> String {
    let out = plan(args);
    assert!(!out.status.success(), "plan {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A skewed F32 profile written with the safetensors crate: `layers` x `n_ff` counts.
fn write_profile(path: &Path, layers: usize, n_ff: usize) {
    let data: Vec<Vec<u8>> = (0..layers)
        .map(|l| {
            (0..n_ff)
                .flat_map(|i| {
                    let rank = (i * 389 + l * 97) % n_ff;
                    ((100_000 / (1 + rank)) as f32).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .enumerate()
        .map(|(l, d)| {
            (
                format!("blk.{l}.ffn_counts"),
                TensorView::new(Dtype::F32, vec![n_ff], d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// 0.0005 GiB: the fixed part at 256 tokens plus room for about half the neurons.
const BUDGET: &str = "0.0005";

#[test]
fn plans_from_a_profile_and_writes_the_gpuidx() {
    let model = fixture();
    let profile = tmp("profile.safetensors");
    write_profile(&profile, 3, 1024);
    let mut covered = Vec::new();
    for method in ["optimal", "reference"] {
        let out = tmp(&format!("{method}.gpuidx"));
        let j = ok_json(&[
            "-m",
            model.to_str().unwrap(),
            "--vram-budget",
            BUDGET,
            "--profile",
            profile.to_str().unwrap(),
            "-c",
            "256",
            "--method",
            method,
            "-o",
            out.to_str().unwrap(),
            "--json",
        ]);
        let s = &j["summary"];
        assert_eq!(s["method"], method);
        assert_eq!(s["n_ctx"], 256);
        let budget = s["budget"].as_u64().unwrap();
        assert_eq!(budget, (0.0005f64 * (1u64 << 30) as f64).round() as u64);
        assert!(s["placed"].as_u64().unwrap() <= budget);
        assert_eq!(s["fixed_complete"], true);
        let gpu = s["gpu_neurons"].as_u64().unwrap();
        assert!(gpu > 0 && gpu < 3 * 1024, "{gpu} neurons");
        let idx = GpuIndex::open(&out).unwrap();
        assert_eq!(idx.vram_capacity, budget);
        assert_eq!(idx.layers.len(), 3);
        assert_eq!(
            idx.layers.iter().map(|l| l.n_gpu() as u64).sum::<u64>(),
            gpu
        );
        covered.push(s["covered"].as_u64().unwrap());
    }
    assert!(
        covered[0] >= covered[1],
        "optimal {covered:?} below reference"
    );

    // Text output names the categories and the file written.
    let out = tmp("text.gpuidx");
    let o = plan(&[
        "-m",
        model.to_str().unwrap(),
        "--vram-budget",
        BUDGET,
        "--profile",
        profile.to_str().unwrap(),
        "-c",
        "256",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for word in [
        "attention",
        "predictor",
        "kv_cache",
        "ffn",
        "coverage",
        "wrote",
    ] {
        assert!(text.contains(word), "no {word:?} in:\n{text}");
    }
}

#[test]
fn uniform_and_default_output_path() {
    // Copy the model so the default output lands in a scratch directory.
    let model = tmp("model.powerinfer.gguf");
    std::fs::copy(fixture(), &model).unwrap();
    let j = ok_json(&[
        "-m",
        model.to_str().unwrap(),
        "--vram-budget",
        BUDGET,
        "--uniform",
        "-c",
        "256",
        "--json",
    ]);
    let expected = tmp("model.powerinfer.gguf.generated.gpuidx");
    assert_eq!(j["output"], expected.to_str().unwrap());
    assert_eq!(j["uniform"], true);
    let idx = GpuIndex::open(&expected).unwrap();
    let s = &j["summary"];
    // Uniform counts: covered = the number of GPU neurons.
    assert_eq!(s["covered"], s["gpu_neurons"]);
    let ffn_budget = s["ffn_budget"].as_u64().unwrap();
    // 108 bytes per Q4_0 neuron (gate + up + down_t rows of 64).
    assert_eq!(s["gpu_neurons"].as_u64().unwrap(), ffn_budget / 108);
    assert_eq!(
        idx.layers.iter().map(|l| l.n_gpu() as u64).sum::<u64>(),
        ffn_budget / 108
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let model = fixture();
    let m = model.to_str().unwrap();
    let out = tmp("bad.gpuidx");
    let o = out.to_str().unwrap();

    let e = err_text(&["-m", m, "--vram-budget", "1", "-o", o]);
    assert!(e.contains("--uniform"), "{e}");

    // A profile of another model: 4 layers, and one with 512 neurons.
    let other = tmp("other.safetensors");
    write_profile(&other, 4, 1024);
    let p = other.to_str().unwrap();
    let e = err_text(&["-m", m, "--vram-budget", "1", "--profile", p, "-o", o]);
    assert!(e.contains("another model") && e.contains("4 layers"), "{e}");
    write_profile(&other, 3, 512);
    let e = err_text(&["-m", m, "--vram-budget", "1", "--profile", p, "-o", o]);
    assert!(e.contains("n_ff = 1024"), "{e}");

    let e = err_text(&["-m", m, "--vram-budget", "0.00001", "--uniform", "-o", o]);
    assert!(e.contains("budget too small"), "{e}");
    // --partial places what fits instead.
    let j = ok_json(&[
        "-m",
        m,
        "--vram-budget",
        "0.00001",
        "--uniform",
        "--partial",
        "-o",
        o,
        "--json",
    ]);
    assert_eq!(j["summary"]["fixed_complete"], false);
    assert_eq!(j["summary"]["gpu_neurons"], 0);

    for budget in ["-1", "nan", "0", "inf"] {
        let e = err_text(&["-m", m, "--vram-budget", budget, "--uniform", "-o", o]);
        assert!(e.contains("vram-budget"), "{budget}: {e}");
    }
    let e = err_text(&[
        "-m",
        m,
        "--vram-budget",
        "1",
        "--uniform",
        "--reserve-mib",
        "2048",
        "-o",
        o,
    ]);
    assert!(e.contains("reserve"), "{e}");
    let e = err_text(&["-m", m, "--vram-budget", "1", "--uniform", "--profile", p]);
    assert!(e.contains("cannot be used with"), "{e}");
    let e = err_text(&[
        "-m",
        m,
        "--vram-budget",
        "1",
        "--profile",
        "/nonexistent/profile.safetensors",
    ]);
    assert!(e.contains("/nonexistent/profile.safetensors"), "{e}");
    let e = err_text(&[
        "-m",
        "/nonexistent/model.gguf",
        "--vram-budget",
        "1",
        "--uniform",
    ]);
    assert!(e.contains("/nonexistent/model.gguf"), "{e}");
}
