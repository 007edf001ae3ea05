//! Resident memory of a loaded model: weights are memory-mapped, not copied, so the peak RSS of
//! `powerinfer run` stays within the file size plus the KV cache plus 64 MiB.
//!
//! The peak is the child's `ru_maxrss` from `getrusage(RUSAGE_CHILDREN)`. This file holds a
//! single test so that no other child of this test process can raise that maximum.

use std::path::{Path, PathBuf};
use std::process::Command;

use powerinfer_gguf::GgufFile;

/// The allowance on top of file size and KV cache.
const OVERHEAD: u64 = 64 << 20;

fn models() -> PathBuf {
    std::env::var_os("POWERINFER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

/// Bytes of an f16 KV cache of `n_ctx` positions for this model.
fn kv_bytes(f: &GgufFile, n_ctx: u64) -> u64 {
    let n_layer = f.get_arch_u64("block_count").unwrap();
    let n_head = f.get_arch_u64("attention.head_count").unwrap();
    let n_head_kv = f.get_arch_u64("attention.head_count_kv").unwrap_or(n_head);
    let n_embd = f.get_arch_u64("embedding_length").unwrap();
    let head_k = f
        .get_arch_u64("attention.key_length")
        .unwrap_or(n_embd / n_head);
    let head_v = f
        .get_arch_u64("attention.value_length")
        .unwrap_or(n_embd / n_head);
    n_layer * n_ctx * (n_head_kv * head_k + n_head_kv * head_v) * 2
}

/// Peak RSS in bytes over all children waited for so far.
fn children_max_rss() -> u64 {
    // SAFETY: `getrusage` only writes the struct it is given, which is zeroed and ours.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid `who` and a valid pointer to a `rusage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    assert_eq!(rc, 0, "getrusage failed");
    // Linux reports kilobytes.
    ru.ru_maxrss as u64 * 1024
}

#[test]
fn gemma_run_stays_within_file_plus_kv_plus_64mb() {
    let path = models().join("gemma-3-270m-q4_k_m.gguf");
    if !path.exists() {
        eprintln!("skipped: {} not found", path.display());
        return;
    }
    let n_ctx = 512;
    let file = GgufFile::open(&path).unwrap();
    let budget = file.file_size() + kv_bytes(&file, n_ctx) + OVERHEAD;
    drop(file);
    let out = Command::new(env!("CARGO_BIN_EXE_powerinfer"))
        .args(["run", "-m"])
        .arg(&path)
        .args(["-p", "Hello", "-n", "1", "--temp", "0", "-c"])
        .arg(n_ctx.to_string())
        .output()
        .expect("spawn powerinfer");
    assert!(
        out.status.success(),
        "powerinfer run failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rss = children_max_rss();
    eprintln!(
        "peak RSS {} KiB, budget {} KiB (file + KV + 64 MiB)",
        rss >> 10,
        budget >> 10
    );
    assert!(
        rss <= budget,
        "peak RSS {} KiB exceeds file + KV cache + 64 MiB = {} KiB",
        rss >> 10,
        budget >> 10
    );
}
