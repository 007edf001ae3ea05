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
