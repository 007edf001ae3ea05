//! The PyTorch reader against the fixture's safetensors twins, and on damaged input.

mod common;

use std::io::Write;

use common::fixtures;
use powerinfer_convert::checkpoint::read_tensors;
use powerinfer_convert::pt::{PtError, PtFile};
use powerinfer_convert::{DType, Tensor};

fn sorted(mut v: Vec<Tensor>) -> Vec<Tensor> {
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

#[test]
fn pt_files_equal_their_safetensors_twins() {
    let fx = fixtures();
    for (pt_dir, st_dir) in [
        ("predictor_random", "predictor_random_safetensors"),
        ("predictor_oracle", "predictor_oracle_safetensors"),
    ] {
        for i in 0..3 {
            let pt = fx.join(pt_dir).join(format!("model_{i}.pt"));
            let st = fx.join(st_dir).join(format!("model_{i}.safetensors"));
            let a = read_tensors(&pt).unwrap();
            // The pickle's order is the state dict's: fc1 then fc2.
            let names: Vec<&str> = a.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["fc1.weight", "fc2.weight"]);
            let b = read_tensors(&st).unwrap();
            let (a, b) = (sorted(a), sorted(b));
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.name, y.name);
                assert_eq!(x.dtype, DType::F16);
                assert_eq!(x.dtype, y.dtype);
                assert_eq!(x.shape, y.shape);
                assert_eq!(
                    x.shape[1],
                    if x.name == "fc1.weight" {
                        64
                    } else {
                        x.shape[1]
                    }
                );
                assert!(x.data == y.data, "{pt_dir}/{i} {}: data differs", x.name);
            }
        }
    }
}

fn load_all(bytes: Vec<u8>) -> Result<Vec<Tensor>, PtError> {
    PtFile::from_bytes(bytes)?.read_all()
}

#[test]
fn every_truncation_is_an_error() {
    let full = std::fs::read(fixtures().join("predictor_random/model_0.pt")).unwrap();
    let good = load_all(full.clone()).unwrap();
    assert_eq!(good.len(), 2);
    let n = full.len();
    // Every cut near the ends (headers, pickle, central directory), a stride elsewhere.
    let points: Vec<usize> = (0..n)
        .filter(|&i| i < 1024 || i + 2048 > n || i % 97 == 0)
        .collect();
    assert!(points.len() > 3000);
    for &i in &points {
        let r = load_all(full[..i].to_vec());
        assert!(r.is_err(), "truncated to {i} of {n} bytes still loads");
    }
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Flipped bits never panic; a flip either is refused or leaves every tensor unchanged
/// (entries are CRC-checked, so a changed byte of the pickle or a storage is caught).
#[test]
fn bit_flips_are_errors_or_harmless() {
    let full = std::fs::read(fixtures().join("predictor_random/model_1.pt")).unwrap();
    let good = load_all(full.clone()).unwrap();
    let mut s = 7u64;
    let mut refused = 0;
    let flips = 1500;
    for k in 0..flips {
        let mut b = full.clone();
        // Half the flips in the first and last 1 KiB (headers, pickle, directory).
        let pos = match k % 2 {
            0 => (splitmix(&mut s) % full.len() as u64) as usize,
            _ => {
                let r = (splitmix(&mut s) % 2048) as usize;
                if r < 1024 {
                    r
                } else {
                    full.len() - 1 - (r - 1024)
                }
            }
        };
        b[pos] ^= 1 << (splitmix(&mut s) % 8);
        match load_all(b) {
            Ok(t) => assert!(t == good, "flip at {pos} changed the tensors silently"),
            Err(_) => refused += 1,
        }
    }
    assert!(
        refused > flips / 2,
        "only {refused} of {flips} flips refused"
    );
}

/// A zip holding `archive/data.pkl` (and `archive/data/0` with `n` zero bytes).
fn zip_with_pickle(pickle: &[u8], n: usize) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        z.start_file("archive/data.pkl", o).unwrap();
        z.write_all(pickle).unwrap();
        z.start_file("archive/byteorder", o).unwrap();
        z.write_all(b"little").unwrap();
        z.start_file("archive/data/0", o).unwrap();
        z.write_all(&vec![0u8; n]).unwrap();
        z.finish().unwrap();
    }
    buf.into_inner()
}

#[test]
fn hostile_pickles_are_refused() {
    // cos\nsystem\n + ('echo pwned',) + REDUCE.
    let p = b"\x80\x02cos\nsystem\nX\x0a\x00\x00\x00echo pwnedq\x00\x85R.";
    match PtFile::from_bytes(zip_with_pickle(p, 0)) {
        Err(PtError::RefusedGlobal { module, name, .. }) => {
            assert_eq!(module, "os");
            assert_eq!(name, "system");
        }
        other => panic!("{other:?}"),
    }
    // builtins.eval through STACK_GLOBAL.
    let p = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93.";
    assert!(matches!(
        PtFile::from_bytes(zip_with_pickle(p, 0)),
        Err(PtError::RefusedGlobal { .. })
    ));
    // A storage key that tries to leave the archive directory.
    let p = b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x06\x00\x00\x00../../X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRu.";
    let e = PtFile::from_bytes(zip_with_pickle(p, 16)).unwrap_err();
    assert!(e.to_string().contains("not a plain name"), "{e}");
}

#[test]
fn storage_shorter_than_declared_is_an_error() {
    // A valid pickle of a 4-element F32 tensor in storage "0"; the entry holds 8 bytes.
    let p = b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRu.";
    let ok = PtFile::from_bytes(zip_with_pickle(p, 16)).unwrap();
    let t = ok.read_all().unwrap();
    assert_eq!(t[0].shape, vec![4]);
    assert_eq!(t[0].to_f32().unwrap(), vec![0.0; 4]);
    let short = PtFile::from_bytes(zip_with_pickle(p, 8)).unwrap();
    let e = short.read_all().unwrap_err();
    assert!(matches!(e, PtError::Storage { .. }), "{e}");
    // No storage entry at all.
    let mut bytes = zip_with_pickle(p, 16);
    let at = bytes
        .windows(14)
        .rposition(|w| w == b"archive/data/0")
        .unwrap();
    bytes[at + 13] = b'9'; // the central directory now names archive/data/9
    assert!(
        PtFile::from_bytes(bytes)
            .and_then(|f| f.read_all())
            .is_err()
    );
    // Not a zip at all.
    assert!(matches!(
        PtFile::from_bytes(b"hello".to_vec()),
        Err(PtError::Zip(_))
    ));
}

// ----------------------------------------------------------------------------------------
// Files holding one bare tensor (`torch.save(tensor)`, the reference's activation_{i}.pt).

use powerinfer_convert::pt::{PtRoot, read_tensor, unpickle_tensor};

/// Python's protocol-2 encoding of a non-negative int (pickle's `save_long`).
fn py_int(p: &mut Vec<u8>, v: u64) {
    if v < 1 << 8 {
        p.extend([b'K', v as u8]);
    } else if v < 1 << 16 {
        p.push(b'M');
        p.extend((v as u16).to_le_bytes());
    } else if v < 1 << 31 {
        p.push(b'J');
        p.extend((v as u32).to_le_bytes());
    } else {
        // LONG1: little-endian two's complement, as few bytes as keep the sign.
        let mut b = v.to_le_bytes().to_vec();
        while b.len() > 1 && b[b.len() - 1] == 0 && b[b.len() - 2] & 0x80 == 0 {
            b.pop();
        }
        if b[b.len() - 1] & 0x80 != 0 {
            b.push(0);
        }
        p.extend([0x8a, b.len() as u8]);
        p.extend(b);
    }
}

/// BINPUT with the next memo index (Python memoizes strings, tuples, globals and reduce
/// results in the order they are written).
fn put(p: &mut Vec<u8>, memo: &mut u8) {
    p.extend([b'q', *memo]);
    *memo += 1;
}

fn py_str(p: &mut Vec<u8>, s: &str, memo: &mut u8) {
    p.push(b'X');
    p.extend((s.len() as u32).to_le_bytes());
    p.extend(s.as_bytes());
    put(p, memo);
}

fn py_int_tuple(p: &mut Vec<u8>, v: &[u64], memo: &mut u8) {
    match v.len() {
        0 => p.push(b')'),
        n @ 1..=3 => {
            for &x in v {
                py_int(p, x);
            }
            p.push(0x84 + n as u8);
            put(p, memo);
        }
        _ => {
            p.push(b'(');
            for &x in v {
                py_int(p, x);
            }
            p.push(b't');
            put(p, memo);
        }
    }
}

/// The pickle `torch.save(t)` writes for a plain tensor `t` viewing storage `key` (a
/// `torch.{storage}` of `numel` elements) at `offset` with `size` and `stride`:
/// `_rebuild_tensor_v2(persistent storage, offset, size, stride, False, OrderedDict())`.
fn torch_save_pickle(
    storage: &str,
    key: &str,
    numel: u64,
    offset: u64,
    size: &[u64],
    stride: &[u64],
) -> Vec<u8> {
    let mut p = vec![0x80, 2];
    let m = &mut 0u8;
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n");
    put(&mut p, m);
    p.extend(b"((");
    py_str(&mut p, "storage", m);
    p.extend(format!("ctorch\n{storage}\n").as_bytes());
    put(&mut p, m);
    py_str(&mut p, key, m);
    py_str(&mut p, "cpu", m);
    py_int(&mut p, numel);
    p.push(b't');
    put(&mut p, m);
    p.push(b'Q');
    py_int(&mut p, offset);
    py_int_tuple(&mut p, size, m);
    py_int_tuple(&mut p, stride, m);
    p.push(0x89);
    p.extend(b"ccollections\nOrderedDict\n");
    put(&mut p, m);
    p.extend(b")R");
    put(&mut p, m);
    p.push(b't');
    put(&mut p, m);
    p.push(b'R');
    put(&mut p, m);
    p.push(b'.');
    p
}

/// A zip laid out as `torch.save` writes one (`{stem}/data.pkl`, `byteorder`, `data/{key}`,
/// `version`, `.data/serialization_id`; stored, not compressed).
fn torch_zip(stem: &str, pickle: &[u8], key: &str, storage: &[u8]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut buf);
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        for (name, data) in [
            (format!("{stem}/data.pkl"), pickle),
            (format!("{stem}/byteorder"), b"little".as_slice()),
            (format!("{stem}/data/{key}"), storage),
            (format!("{stem}/version"), b"3\n".as_slice()),
            (
                format!("{stem}/.data/serialization_id"),
                b"1234567890123456789012345678901234567890".as_slice(),
            ),
        ] {
            z.start_file(name, o).unwrap();
            z.write_all(data).unwrap();
        }
        z.finish().unwrap();
    }
    buf.into_inner()
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The builder above writes what Python's pickler writes: these bytes came from pickling, at
/// protocol 2 with torch.save's `persistent_id`, stand-ins whose globals carry torch's
/// names (`torch._utils._rebuild_tensor_v2`, `torch.FloatStorage`, ...), so the opcodes and
/// memo indices are the ones torch.save emits.
#[test]
fn builder_matches_python_pickler_bytes() {
    let cases: [(&str, &str, u64, u64, u64, u64, &str); 3] = [
        (
            "FloatStorage",
            "0",
            5,
            0,
            5,
            1,
            "800263746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f76320a71002828580700000073746f72616765710163746f7263680a466c6f617453746f726167650a71025801000000307103580300000063707571044b05747105514b004b058571064b018571078963636f6c6c656374696f6e730a4f726465726564446963740a71082952710974710a52710b2e",
        ),
        (
            "LongStorage",
            "0",
            70000,
            3,
            300,
            2,
            "800263746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f76320a71002828580700000073746f72616765710163746f7263680a4c6f6e6753746f726167650a71025801000000307103580300000063707571044a70110100747105514b034d2c018571064b028571078963636f6c6c656374696f6e730a4f726465726564446963740a71082952710974710a52710b2e",
        ),
        (
            "HalfStorage",
            "7",
            1000,
            500,
            500,
            1,
            "800263746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f76320a71002828580700000073746f72616765710163746f7263680a48616c6653746f726167650a71025801000000377103580300000063707571044de803747105514df4014df4018571064b018571078963636f6c6c656374696f6e730a4f726465726564446963740a71082952710974710a52710b2e",
        ),
    ];
    for (storage, key, numel, offset, size, stride, py) in cases {
        let ours = torch_save_pickle(storage, key, numel, offset, &[size], &[stride]);
        assert_eq!(ours, hex(py), "{storage}");
        let info = unpickle_tensor(&hex(py)).unwrap();
        assert_eq!(info.name, "");
        assert_eq!(info.storage_key, key);
        assert_eq!(info.storage_numel, numel as usize);
        assert_eq!(info.storage_offset, offset as usize);
        assert_eq!(info.shape, vec![size as usize]);
        assert_eq!(info.strides, vec![stride as usize]);
    }
}

/// Element `i` of the test tensors, as bytes of `dtype` (whole numbers, some negative).
fn element(dtype: DType, i: usize) -> Vec<u8> {
    let v = (i as i64 * 7919) % 2003 - 100;
    match dtype {
        DType::F32 => (v as f32).to_le_bytes().to_vec(),
        DType::F64 => (v as f64).to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f32(v as f32).to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f32(v as f32).to_le_bytes().to_vec(),
        DType::I64 => v.to_le_bytes().to_vec(),
        DType::I32 => (v as i32).to_le_bytes().to_vec(),
        DType::I16 => (v as i16).to_le_bytes().to_vec(),
        DType::U8 => [(v & 0xff) as u8].to_vec(),
        other => panic!("{other}"),
    }
}

#[test]
fn bare_tensors_of_every_storage_type() {
    let dir = common::scratch("pt-bare");
    for (storage, dtype) in [
        ("FloatStorage", DType::F32),
        ("HalfStorage", DType::F16),
        ("LongStorage", DType::I64),
        ("IntStorage", DType::I32),
        ("DoubleStorage", DType::F64),
        ("BFloat16Storage", DType::BF16),
        ("ShortStorage", DType::I16),
        ("ByteStorage", DType::U8),
    ] {
        // Awkward lengths: empty, one, just past a byte of opcodes (K/M/J ints).
        for n in [0usize, 1, 3, 257, 1000, 70_001] {
            let data: Vec<u8> = (0..n).flat_map(|i| element(dtype, i)).collect();
            let p = torch_save_pickle(storage, "0", n as u64, 0, &[n as u64], &[1]);
            let file = torch_zip("activation_3", &p, "0", &data);
            let f = PtFile::tensor_from_bytes(file.clone()).unwrap();
            assert_eq!(f.root(), PtRoot::Tensor);
            assert_eq!(f.tensors().len(), 1);
            let t = f.load(&f.tensors()[0]).unwrap();
            assert_eq!(
                (t.name.as_str(), t.dtype, &t.shape),
                ("", dtype, &vec![n]),
                "{storage} {n}"
            );
            assert!(t.data == data, "{storage} {n}: elements differ");
            if n == 1000 {
                let path = dir.join(format!("{storage}.pt"));
                std::fs::write(&path, &file).unwrap();
                assert_eq!(read_tensor(&path).unwrap(), t);
            }
        }
    }
}

/// A layer saved as a view of a larger tensor keeps the whole storage: the offset and
/// strides pick its elements.
#[test]
fn bare_tensor_views_into_a_larger_storage() {
    let all: Vec<i64> = (0..4 * 1000).map(|i| i * 3 - 7).collect();
    let data: Vec<u8> = all.iter().flat_map(|v| v.to_le_bytes()).collect();
    // counts[2] of a [4, 1000] tensor.
    let p = torch_save_pickle("LongStorage", "0", 4000, 2000, &[1000], &[1]);
    let t = PtFile::tensor_from_bytes(torch_zip("a", &p, "0", &data))
        .unwrap()
        .read_all()
        .unwrap();
    let want: Vec<u8> = all[2000..3000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    assert!(t[0].data == want);
    // counts[:, 5] (stride 1000), and a 2-D [3, 4] view with strides (1, 3).
    let p = torch_save_pickle("LongStorage", "0", 4000, 5, &[4], &[1000]);
    let t = PtFile::tensor_from_bytes(torch_zip("a", &p, "0", &data))
        .unwrap()
        .read_all()
        .unwrap();
    let want: Vec<u8> = (0..4)
        .flat_map(|r| all[5 + 1000 * r].to_le_bytes())
        .collect();
    assert!(t[0].data == want);
    let p = torch_save_pickle("LongStorage", "0", 4000, 1, &[3, 4], &[1, 3]);
    let t = PtFile::tensor_from_bytes(torch_zip("a", &p, "0", &data))
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(t[0].shape, vec![3, 4]);
    let want: Vec<u8> = (0..3)
        .flat_map(|i| (0..4).map(move |j| 1 + i + 3 * j))
        .flat_map(|k| all[k].to_le_bytes())
        .collect();
    assert!(t[0].data == want);
    // A view past its storage is refused before any data is read.
    let p = torch_save_pickle("LongStorage", "0", 4000, 3500, &[1000], &[1]);
    let e = PtFile::tensor_from_bytes(torch_zip("a", &p, "0", &data)).unwrap_err();
    assert!(e.to_string().contains("reaches element 4499"), "{e}");
}

#[test]
fn a_root_that_is_not_one_tensor_is_refused() {
    // A state dict (what a predictor model_{i}.pt holds).
    let sd = b"\x80\x02ccollections\nOrderedDict\n)R(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRu.";
    let e = PtFile::tensor_from_bytes(zip_with_pickle(sd, 16)).unwrap_err();
    assert!(matches!(e, PtError::NotTensor(_)), "{e}");
    assert!(e.to_string().contains("state dict"), "{e}");
    // A list of tensors, an int, None.
    let p = torch_save_pickle("FloatStorage", "0", 4, 0, &[4], &[1]);
    let mut list = vec![0x80, 2, b']', b'('];
    list.extend(&p[2..p.len() - 1]);
    list.extend(b"e.");
    for (pickle, kind) in [
        (list, "list"),
        (b"\x80\x02K\x05.".to_vec(), "int"),
        (b"\x80\x02N.".to_vec(), "None"),
    ] {
        let e = PtFile::tensor_from_bytes(zip_with_pickle(&pickle, 16)).unwrap_err();
        assert!(matches!(e, PtError::NotTensor(_)), "{e}");
        assert!(e.to_string().contains(kind), "{e}");
    }
    // The other way round: a bare tensor where a state dict is expected.
    let e = PtFile::from_bytes(torch_zip("a", &p, "0", &[0; 16])).unwrap_err();
    assert!(matches!(e, PtError::NotStateDict(_)), "{e}");
    assert!(e.to_string().contains("bare tensor"), "{e}");
    // Hostile globals are refused here too.
    let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsq\x00\x85R.";
    assert!(matches!(
        PtFile::tensor_from_bytes(zip_with_pickle(p, 0)),
        Err(PtError::RefusedGlobal { .. })
    ));
}

#[test]
fn bare_tensor_storage_of_the_wrong_size_is_an_error() {
    let p = torch_save_pickle("IntStorage", "0", 10, 0, &[10], &[1]);
    assert!(
        PtFile::tensor_from_bytes(torch_zip("a", &p, "0", &[1; 40]))
            .unwrap()
            .read_all()
            .is_ok()
    );
    for len in [0, 36, 39, 41, 80] {
        let e = PtFile::tensor_from_bytes(torch_zip("a", &p, "0", &vec![1; len]))
            .unwrap()
            .read_all()
            .unwrap_err();
        assert!(matches!(e, PtError::Storage { .. }), "{len}: {e}");
    }
    // The storage entry named in the pickle is absent.
    let e = PtFile::tensor_from_bytes(torch_zip("a", &p, "1", &[1; 40]))
        .unwrap()
        .read_all()
        .unwrap_err();
    assert!(matches!(e, PtError::Storage { .. }), "{e}");
    // Missing file.
    let e = read_tensor("/nonexistent/activation_0.pt").unwrap_err();
    assert!(matches!(e, PtError::Io { .. }), "{e}");
}

#[test]
fn every_truncation_of_a_bare_tensor_file_is_an_error() {
    let data: Vec<u8> = (0..300).flat_map(|i| element(DType::F32, i)).collect();
    let p = torch_save_pickle("FloatStorage", "0", 300, 0, &[300], &[1]);
    let full = torch_zip("activation_0", &p, "0", &data);
    let read = |b: Vec<u8>| PtFile::tensor_from_bytes(b).and_then(|f| f.read_all());
    assert!(read(full.clone()).is_ok());
    for n in 0..full.len() {
        assert!(read(full[..n].to_vec()).is_err(), "cut at {n} still loads");
    }
}
