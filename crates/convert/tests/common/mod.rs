//! Shared helpers of the converter tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use powerinfer_gguf::GgufFile;

/// The reference fixtures (the repository sits next to `shared/`).
pub fn fixtures() -> PathBuf {
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/powerinfer-tiny"
    ));
    assert!(p.is_dir(), "fixtures missing at {}", p.display());
    p
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("convert-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every difference between two GGUF/PWRI files: magic, keys (name, type, value, order),
/// tensors (name, order, type, shape, bytes). Empty when they hold the same things.
pub fn differences(ours: &Path, reference: &Path) -> Vec<String> {
    let a = GgufFile::open(ours).unwrap();
    let b = GgufFile::open(reference).unwrap();
    let mut d = Vec::new();
    if a.magic() != b.magic() {
        d.push(format!("magic {:?} vs {:?}", a.magic(), b.magic()));
    }
    let ka: Vec<&str> = a.metadata().iter().map(|(k, _)| k.as_str()).collect();
    let kb: Vec<&str> = b.metadata().iter().map(|(k, _)| k.as_str()).collect();
    if ka != kb {
        d.push(format!("keys {ka:?}\n  vs {kb:?}"));
    }
    for (k, v) in b.metadata() {
        match a.get(k) {
            None => d.push(format!("key {k} missing")),
            Some(x) if x != v => d.push(format!("key {k}: {x:?} vs {v:?}")),
            _ => {}
        }
    }
    let ta: Vec<&str> = a.tensors().iter().map(|t| t.name.as_str()).collect();
    let tb: Vec<&str> = b.tensors().iter().map(|t| t.name.as_str()).collect();
    if ta != tb {
        d.push(format!("tensor order {ta:?}\n  vs {tb:?}"));
    }
    for t in b.tensors() {
        let Some(x) = a.tensor(&t.name) else {
            d.push(format!("tensor {} missing", t.name));
            continue;
        };
        if x.ty != t.ty || x.shape != t.shape {
            d.push(format!(
                "tensor {}: {} {:?} vs {} {:?}",
                t.name, x.ty, x.shape, t.ty, t.shape
            ));
        } else if a.tensor_data(x) != b.tensor_data(t) {
            let n = a
                .tensor_data(x)
                .iter()
                .zip(b.tensor_data(t))
                .filter(|(p, q)| p != q)
                .count();
            d.push(format!("tensor {}: {n} bytes differ", t.name));
        }
    }
    d
}

/// Asserts the files hold the same keys and tensors, and are byte-identical.
pub fn assert_same_file(ours: &Path, reference: &Path) {
    let d = differences(ours, reference);
    assert!(d.is_empty(), "differences:\n{}", d.join("\n"));
    let x = std::fs::read(ours).unwrap();
    let y = std::fs::read(reference).unwrap();
    assert_eq!(x.len(), y.len(), "file sizes differ");
    assert!(x == y, "same content but not byte-identical");
}

/// Copies a directory's regular files.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
