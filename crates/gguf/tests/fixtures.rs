//! The reference PowerInfer fixtures, checked against the independent dump in
//! `gguf_dump.json` (made with the reference's Python gguf reader), and written back byte for
//! byte.

use std::path::{Path, PathBuf};

use powerinfer_gguf::{GgufFile, GgufWriter, Magic, Value};
use serde_json::Value as Json;

fn fixture_dir() -> PathBuf {
    std::env::var_os("POWERINFER_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/work/shared/fixtures/powerinfer-tiny"))
}

fn load_dump(dir: &Path) -> Option<Vec<Json>> {
    let text = std::fs::read_to_string(dir.join("gguf_dump.json")).ok()?;
    match serde_json::from_str(&text).expect("gguf_dump.json parses") {
        Json::Array(a) => Some(a),
        _ => panic!("gguf_dump.json is not a list"),
    }
}

/// The dump's type label for one of our values ("UINT32", "ARRAY/STRING", ...).
fn dump_type(v: &Value) -> String {
    let scalar = |v: &Value| match v {
        Value::U8(_) => "UINT8",
        Value::I8(_) => "INT8",
        Value::U16(_) => "UINT16",
        Value::I16(_) => "INT16",
        Value::U32(_) => "UINT32",
        Value::I32(_) => "INT32",
        Value::F32(_) => "FLOAT32",
        Value::Bool(_) => "BOOL",
        Value::String(_) => "STRING",
        Value::Array(_) => "ARRAY",
        Value::U64(_) => "UINT64",
        Value::I64(_) => "INT64",
        Value::F64(_) => "FLOAT64",
    };
    match v {
        Value::Array(a) => format!("ARRAY/{}", a.get(0).as_ref().map(scalar).unwrap_or("?")),
        v => scalar(v).to_owned(),
    }
}

fn check_value(key: &str, ours: &Value, entry: &Json) {
    let expected = &entry["value"];
    match ours {
        Value::String(s) => assert_eq!(Some(s.as_str()), expected.as_str(), "{key}"),
        Value::F32(x) => {
            assert_eq!(Some(f64::from(*x)), expected.as_f64(), "{key}")
        }
        Value::F64(x) => assert_eq!(Some(*x), expected.as_f64(), "{key}"),
        Value::Bool(b) => assert_eq!(Some(*b), expected.as_bool(), "{key}"),
        Value::Array(items) => {
            let summary = entry["summary"].as_str().expect("summary");
            let n: usize = summary
                .strip_prefix('[')
                .and_then(|s| s.split(' ').next())
                .and_then(|n| n.parse().ok())
                .expect("array summary starts with [N items]");
            assert_eq!(items.len(), n, "{key}: array length");
            // The first few elements, as Python printed them.
            let first = summary.split("first: [").nth(1).expect("first items");
            let first = first.trim_end_matches(']');
            for (ours, theirs) in items.iter().zip(first.split(", ")) {
                match ours {
                    Value::String(s) => assert_eq!(format!("'{s}'"), theirs, "{key}"),
                    Value::F32(x) => {
                        assert_eq!(f64::from(x), theirs.parse::<f64>().unwrap(), "{key}")
                    }
                    v => assert_eq!(v.as_i64().unwrap().to_string(), theirs, "{key}"),
                }
            }
        }
        v => assert_eq!(v.as_i64(), expected.as_i64(), "{key}"),
    }
}

#[test]
fn fixtures_match_reference_dump() {
    let dir = fixture_dir();
    let Some(dump) = load_dump(&dir) else {
        eprintln!("note: {} has no gguf_dump.json; skipped", dir.display());
        return;
    };
    let mut checked = 0;
    for entry in &dump {
        let name = Path::new(entry["file"].as_str().unwrap())
            .file_name()
            .unwrap();
        let path = dir.join(name);
        if !path.exists() {
            eprintln!(
                "note: {} not present (dump lists it); skipped",
                path.display()
            );
            continue;
        }
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let magic = match f.magic() {
            Magic::Gguf => "GGUF",
            Magic::Pwri => "PWRI",
        };
        assert_eq!(magic, entry["magic"].as_str().unwrap());
        assert_eq!(f.file_size(), entry["size"].as_u64().unwrap());

        let kvs: Vec<&Json> = entry["kv"].as_array().unwrap().iter().collect();
        let mut real = Vec::new();
        for kv in &kvs {
            let key = kv["key"].as_str().unwrap();
            match key {
                "GGUF.version" => assert_eq!(u64::from(f.version()), kv["value"].as_u64().unwrap()),
                "GGUF.tensor_count" => {
                    assert_eq!(f.tensors().len() as u64, kv["value"].as_u64().unwrap())
                }
                "GGUF.kv_count" => {
                    assert_eq!(f.metadata().len() as u64, kv["value"].as_u64().unwrap())
                }
                _ => real.push(*kv),
            }
        }
        assert_eq!(real.len(), f.metadata().len());
        for ((key, value), kv) in f.metadata().iter().zip(&real) {
            assert_eq!(key, kv["key"].as_str().unwrap(), "keys in file order");
            assert_eq!(dump_type(value), kv["type"].as_str().unwrap(), "{key}");
            check_value(key, value, kv);
        }

        let tensors = entry["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), f.tensors().len());
        for (t, d) in f.tensors().iter().zip(tensors) {
            assert_eq!(t.name, d["name"].as_str().unwrap(), "tensors in file order");
            assert_eq!(t.ty.name(), d["ggml_type"].as_str().unwrap(), "{}", t.name);
            let ne: Vec<u64> = d["ne"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap())
                .collect();
            assert_eq!(t.shape, ne, "{}", t.name);
            assert_eq!(t.size, d["n_bytes"].as_u64().unwrap(), "{}", t.name);
            assert_eq!(t.offset, d["data_offset"].as_u64().unwrap(), "{}", t.name);
            assert_eq!(f.tensor_data(t).len() as u64, t.size);
        }
        assert_eq!(f.architecture(), Some("llama"));
        assert_eq!(f.get_arch_u32("block_count"), Ok(3));
        assert_eq!(f.get_arch_u32("embedding_length"), Ok(64));
        assert_eq!(
            f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
            1024
        );
        checked += 1;
    }
    assert!(
        checked >= 4,
        "expected the four fixture files, checked {checked}"
    );
}

/// Copies a file through the writer: same magic, version, metadata, tensor declarations, and
/// the tensors' bytes streamed in file order.
fn write_back(f: &GgufFile) -> Vec<u8> {
    let mut w = GgufWriter::new(f.magic());
    w.set_version(f.version()).unwrap();
    for (k, v) in f.metadata() {
        w.add_kv(k.clone(), v.clone()).unwrap();
    }
    for t in f.tensors() {
        w.add_tensor_info(t.name.clone(), t.ty, &t.shape).unwrap();
    }
    let mut s = w.begin(Vec::new()).unwrap();
    for t in f.tensors() {
        s.write_tensor_data(&t.name, f.tensor_data(t)).unwrap();
    }
    s.finish().unwrap()
}

#[test]
fn fixtures_write_back_byte_for_byte() {
    let dir = fixture_dir();
    let mut n = 0;
    for name in [
        "tiny-relu-llama.random-pred.q4_0.powerinfer.gguf",
        "tiny-relu-llama.random-pred.f16.powerinfer.gguf",
        "tiny-relu-llama.oracle-pred.f16.powerinfer.gguf",
        "tiny-relu-llama.dense.f16.gguf",
    ] {
        let path = dir.join(name);
        let Ok(original) = std::fs::read(&path) else {
            eprintln!("note: {} absent; skipped", path.display());
            continue;
        };
        let f = GgufFile::from_bytes(original.clone()).unwrap();
        let copy = write_back(&f);
        assert_eq!(copy.len(), original.len(), "{name}: size");
        if let Some(i) = copy.iter().zip(&original).position(|(a, b)| a != b) {
            panic!("{name}: first differing byte at {i}");
        }
        n += 1;
    }
    eprintln!("{n} fixture files written back byte for byte");
    if dir.exists() {
        assert_eq!(n, 4, "all four fixtures are present in {}", dir.display());
    }
}
