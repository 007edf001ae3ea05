//! Every kernel family compiles with NVRTC for sm_80 and sm_90 (no GPU needed).
//!
//! NVRTC is looked for in `POWERINFER_NVRTC_LIB`, on the library path, and in the virtualenv of
//! `nvrtc-check.sh` (`target/nvrtc`). Without it the test prints why and passes, unless
//! `POWERINFER_REQUIRE_NVRTC=1`, which makes a missing NVRTC a failure.
#![cfg(feature = "cuda")]

mod common;

use powerinfer_cuda::nvrtc::{
    compile_family, compile_family_cached, ensure_nvrtc, load_nvrtc_from,
};
use powerinfer_cuda::{CudaError, FAMILIES, KernelFamily};
use std::path::PathBuf;

/// Where `nvrtc-check.sh` unpacks the NVRTC wheel.
fn venv_lib_dirs() -> Vec<PathBuf> {
    let root = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../target/nvrtc/nvidia"
    ));
    ["cu13/lib", "cuda_nvrtc/lib"]
        .iter()
        .map(|sub| root.join(sub))
        .filter(|d| d.join("libnvrtc.so.13").is_file())
        .collect()
}

/// Make NVRTC available; `Err(reason)` when it cannot be found.
fn find_nvrtc() -> Result<(), String> {
    match ensure_nvrtc() {
        Ok(()) => return Ok(()),
        Err(CudaError::NoNvrtc) => {}
        Err(e) => return Err(e.to_string()),
    }
    for d in venv_lib_dirs() {
        load_nvrtc_from(&d).map_err(|e| e.to_string())?;
        if ensure_nvrtc().is_ok() {
            eprintln!("NVRTC from {}", d.display());
            return Ok(());
        }
    }
    Err(format!(
        "no libnvrtc.so.13 on the library path, in POWERINFER_NVRTC_LIB or in {}/../../target/nvrtc \
         (run crates/cuda/nvrtc-check.sh)",
        env!("CARGO_MANIFEST_DIR")
    ))
}

fn nvrtc_or_skip(test: &str) -> bool {
    match find_nvrtc() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                !common::required("POWERINFER_REQUIRE_NVRTC"),
                "{test}: POWERINFER_REQUIRE_NVRTC=1 but {why}"
            );
            eprintln!("{test}: skipped: {why}");
            false
        }
    }
}

/// With `POWERINFER_PTXAS` naming a `ptxas` (e.g. from the `nvidia-cuda-nvcc` wheel), assemble
/// the PTX too: catches register and resource errors NVRTC does not.
fn ptxas_check(fam: &str, arch: &str, ptx: &str) {
    let Some(ptxas) = std::env::var_os("POWERINFER_PTXAS").filter(|p| !p.is_empty()) else {
        return;
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("powerinfer-cuda-ptx");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{fam}.{arch}.ptx"));
    std::fs::write(&file, ptx).unwrap();
    let out = std::process::Command::new(&ptxas)
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&file)
        .arg("-o")
        .arg(dir.join(format!("{fam}.{arch}.cubin")))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", ptxas.to_string_lossy()));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ptxas rejected {fam} for {arch}:\n{log}"
    );
    for line in log
        .lines()
        .filter(|l| l.contains("spill stores") && !l.contains(" 0 bytes spill stores"))
    {
        eprintln!("  ptxas {arch} {fam}: SPILLS: {}", line.trim());
    }
    for line in log.lines().filter(|l| l.contains("registers")) {
        eprintln!(
            "  ptxas {arch} {fam}: {}",
            line.trim_start_matches("ptxas info    : ")
        );
    }
}

#[test]
fn every_family_compiles_for_sm80_and_sm90() {
    if !nvrtc_or_skip("every_family_compiles_for_sm80_and_sm90") {
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        for f in FAMILIES {
            let ptx = compile_family(f, arch).unwrap_or_else(|e| panic!("{e}"));
            let text = ptx.to_src();
            assert!(
                text.contains(&format!(".target {arch}")),
                "{}: PTX not for {arch}",
                f.name
            );
            // Every kernel the Rust side will look up is an entry point of the PTX.
            for k in f.kernels() {
                assert!(
                    text.contains(&format!(".entry {k}(")),
                    "{} for {arch}: no entry point {k}",
                    f.name
                );
            }
            eprintln!("{arch} {}: {} bytes of PTX", f.name, text.len());
            ptxas_check(f.name, arch, &text);
            for _ in 0..2 {
                assert_eq!(compile_family_cached(f, arch).unwrap().to_src(), text);
            }
        }
    }
}

#[test]
fn a_compile_error_is_reported_with_the_log() {
    if !nvrtc_or_skip("a_compile_error_is_reported_with_the_log") {
        return;
    }
    let bad = KernelFamily {
        name: "broken",
        body: "extern \"C\" __global__ void broken(float* x) { x[0] = undefined_thing; }",
        needs_quant: false,
    };
    match compile_family(&bad, "sm_90") {
        Err(CudaError::Compile {
            family, arch, log, ..
        }) => {
            assert_eq!(family, "broken");
            assert_eq!(arch, "sm_90");
            assert!(log.contains("undefined_thing"), "log: {log}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}
