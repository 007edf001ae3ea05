//! Hostile input: truncation, bit flips and hand-made malformed headers. Nothing may panic;
//! each malformed header must give its specific error variant.

use powerinfer_gguf::{GgufError, GgufFile, MAX_ARRAY_DEPTH};

const Q4_FIXTURE: &str =
    "/work/shared/fixtures/powerinfer-tiny/tiny-relu-llama.random-pred.q4_0.powerinfer.gguf";

/// splitmix64: a tiny seeded PRNG.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Parses, and if that works, touches everything a caller could touch.
fn parse_and_use(bytes: Vec<u8>) -> Result<(), GgufError> {
    let f = GgufFile::from_bytes(bytes)?;
    for (k, v) in f.metadata() {
        let _ = (
            f.get_u32(k),
            f.get_f32(k),
            f.get_str(k),
            f.get_str_array(k),
            v.to_string(),
        );
    }
    for t in f.tensors() {
        assert_eq!(f.tensor_data(t).len() as u64, t.size);
    }
    let _ = powerinfer_gguf::GpuIndex::from_gguf(&f);
    Ok(())
}

fn one_line(e: &GgufError) {
    let s = e.to_string();
    assert!(
        !s.contains('\n') && !s.is_empty(),
        "error message not one line: {s:?}"
    );
}

fn fixture() -> Option<Vec<u8>> {
    match std::fs::read(Q4_FIXTURE) {
        Ok(b) => Some(b),
        Err(_) => {
            eprintln!("note: {Q4_FIXTURE} absent; skipped");
            None
        }
    }
}

#[test]
fn truncation_everywhere_is_an_error() {
    let Some(full) = fixture() else { return };
    let f = GgufFile::from_bytes(full.clone()).unwrap();
    let needed = f.tensors().iter().map(|t| t.offset + t.size).max().unwrap() as usize;
    let header_end = f.data_offset() as usize;
    drop(f);
    let mut lens: Vec<usize> = (0..=header_end + 64).collect();
    lens.extend((header_end..full.len()).step_by(997));
    lens.push(needed - 1);
    lens.push(needed);
    for len in lens {
        let r = parse_and_use(full[..len].to_vec());
        if len < needed {
            let e = r.expect_err("a truncated file must not parse");
            one_line(&e);
            if len < header_end.saturating_sub(32) {
                assert!(
                    matches!(
                        e,
                        GgufError::Truncated { .. }
                            | GgufError::LengthTooLarge { .. }
                            | GgufError::BadMagic { .. }
                    ),
                    "len {len}: {e}"
                );
            }
        } else {
            r.unwrap();
        }
    }
}

#[test]
fn bit_flips_never_panic() {
    let Some(full) = fixture() else { return };
    let f = GgufFile::from_bytes(full.clone()).unwrap();
    let header_end = f.data_offset() as usize;
    // Where the tensor directory starts: the header end minus padding and every entry's size.
    let infos: usize = f
        .tensors()
        .iter()
        .map(|t| 8 + t.name.len() + 4 + 8 * t.shape.len() + 4 + 8)
        .sum();
    let infos_start = header_end - 32 - infos;
    drop(f);
    let mut rng = Rng(0x5eed);
    // Every byte of the fixed header and first key/value pairs and of the tensor directory;
    // a sample of the token strings in between and of the tensor data.
    let mut positions: Vec<usize> = (0..1024).chain(infos_start..header_end).collect();
    positions.extend((0..600).map(|_| 1024 + rng.next() as usize % (infos_start - 1024)));
    positions.extend((0..400).map(|_| rng.next() as usize % full.len()));
    let (mut ok, mut err) = (0, 0);
    let mut buf = full.clone();
    for pos in positions {
        let bit = 1u8 << (rng.next() % 8);
        buf[pos] ^= bit;
        match parse_and_use(buf.clone()) {
            Ok(()) => ok += 1,
            Err(e) => {
                one_line(&e);
                err += 1;
            }
        }
        buf[pos] ^= bit;
    }
    eprintln!("bit flips: {ok} still parse, {err} rejected");
    assert!(err > 0 && ok > 0);
}

/// A little-endian byte builder for hand-made headers.
#[derive(Clone, Default)]
struct B(Vec<u8>);
impl B {
    fn header(magic: &[u8; 4], version: u32, n_tensors: u64, n_kv: u64) -> B {
        B::default()
            .raw(magic)
            .u32(version)
            .u64(n_tensors)
            .u64(n_kv)
    }
    fn raw(mut self, b: &[u8]) -> B {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(self, x: u8) -> B {
        self.raw(&[x])
    }
    fn u32(self, x: u32) -> B {
        self.raw(&x.to_le_bytes())
    }
    fn u64(self, x: u64) -> B {
        self.raw(&x.to_le_bytes())
    }
    fn str(self, s: &str) -> B {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    /// A u32 key/value pair.
    fn kv_u32(self, k: &str, v: u32) -> B {
        self.str(k).u32(4).u32(v)
    }
    fn tensor(self, name: &str, shape: &[u64], ty: u32, offset: u64) -> B {
        let mut b = self.str(name).u32(shape.len() as u32);
        for &d in shape {
            b = b.u64(d);
        }
        b.u32(ty).u64(offset)
    }
    /// Pads to 32 and appends `n` data bytes.
    fn data(mut self, n: usize) -> B {
        let pad = self.0.len().next_multiple_of(32);
        self.0.resize(pad + n, 0xab);
        self
    }
    fn parse(self) -> Result<GgufFile, GgufError> {
        GgufFile::from_bytes(self.0)
    }
}

fn err(b: B) -> GgufError {
    let e = b.parse().expect_err("must be rejected");
    one_line(&e);
    e
}

#[test]
fn minimal_files_parse() {
    let f = B::header(b"GGUF", 3, 0, 0).parse().unwrap();
    assert_eq!(
        (f.version(), f.tensors().len(), f.metadata().len()),
        (3, 0, 0)
    );
    let f = B::header(b"PWRI", 2, 1, 1)
        .kv_u32("k", 7)
        .tensor("t", &[8], 18, 0)
        .data(32)
        .parse()
        .unwrap();
    assert_eq!(f.tensor("t").unwrap().ty, powerinfer_gguf::GgmlType::I32);
    assert_eq!(f.get_u32("k"), Ok(7));
    // A zero-element tensor (e.g. an empty gpu_bucket) is legal and may share its offset.
    let f = B::header(b"GGUF", 3, 2, 0)
        .tensor("empty", &[0], 0, 0)
        .tensor("x", &[4], 0, 0)
        .data(16)
        .parse()
        .unwrap();
    assert_eq!(f.tensor_bytes("empty"), Some(&[][..]));
}

#[test]
fn header_errors() {
    assert!(matches!(
        err(B::default().raw(b"GG")),
        GgufError::Truncated {
            what: "magic",
            offset: 0
        }
    ));
    assert!(
        matches!(err(B::header(b"GGML", 3, 0, 0)), GgufError::BadMagic { found } if &found == b"GGML")
    );
    assert!(matches!(
        err(B::header(b"GGUF", 1, 0, 0)),
        GgufError::UnsupportedVersion { version: 1 }
    ));
    assert!(matches!(
        err(B::header(b"GGUF", 3 << 24, 0, 0)),
        GgufError::UnsupportedVersion { .. }
    ));
    assert!(matches!(
        err(B::default().raw(b"GGUF").u32(3).u32(0)),
        GgufError::Truncated {
            what: "tensor count",
            offset: 8
        }
    ));
    assert!(matches!(
        err(B::header(b"GGUF", 3, 1 << 60, 0)),
        GgufError::LengthTooLarge { what: "tensor count", len, offset: 8 } if len == 1 << 60
    ));
    assert!(matches!(
        err(B::header(b"GGUF", 3, 0, u64::MAX)),
        GgufError::LengthTooLarge { offset: 16, .. }
    ));
}

#[test]
fn metadata_errors() {
    let h = || B::header(b"GGUF", 3, 0, 1);
    // Key length absurd, then past EOF.
    assert!(matches!(
        err(h().u64(1 << 60).raw(&[0; 8])),
        GgufError::LengthTooLarge {
            what: "metadata key",
            offset: 24,
            ..
        }
    ));
    assert!(matches!(
        err(h().u64(100).raw(b"abc").u32(0).raw(&[0; 6])),
        GgufError::LengthTooLarge {
            what: "metadata key",
            ..
        }
    ));
    assert!(matches!(
        err(h().str("k").u32(4).raw(&[1, 2])),
        GgufError::Truncated {
            what: "u32 value",
            ..
        }
    ));
    assert!(matches!(
        err(h().u64(2).raw(&[0xff, 0xfe]).u32(0).u8(0)),
        GgufError::InvalidUtf8 {
            what: "metadata key",
            offset: 32
        }
    ));
    assert!(matches!(
        err(h().str("k").u32(8).u64(2).raw(&[0xc3, 0x28])),
        GgufError::InvalidUtf8 {
            what: "string value",
            ..
        }
    ));
    assert!(matches!(
        err(h().str("k").u32(13).u32(0)),
        GgufError::UnknownValueType {
            id: 13,
            offset: 33,
            ..
        }
    ));
    // Array of an unknown element type.
    assert!(matches!(
        err(h().str("k").u32(9).u32(99).u64(0)),
        GgufError::UnknownValueType {
            id: 99,
            offset: 37,
            ..
        }
    ));
    // Absurd array length (2^60 u32 elements).
    assert!(matches!(
        err(h().str("k").u32(9).u32(4).u64(1 << 60)),
        GgufError::LengthTooLarge { what: "array length", len, .. } if len == 1 << 60
    ));
    // 2^60 strings of at least 8 bytes each: the multiplication itself must not overflow.
    assert!(matches!(
        err(h().str("k").u32(9).u32(8).u64(u64::MAX / 4)),
        GgufError::LengthTooLarge {
            what: "array length",
            ..
        }
    ));
    assert!(matches!(
        err(h().str("k").u32(7).u8(2)),
        GgufError::InvalidBool { value: 2, .. }
    ));
    // Nested arrays: MAX_ARRAY_DEPTH levels are fine, one more is not.
    let nested = |depth: usize| {
        let mut b = h().str("k").u32(9);
        for _ in 0..depth - 1 {
            b = b.u32(9).u64(1);
        }
        b.u32(4).u64(1).u32(5)
    };
    let f = nested(MAX_ARRAY_DEPTH).parse().unwrap();
    assert_eq!(f.metadata().len(), 1);
    assert!(matches!(
        err(nested(MAX_ARRAY_DEPTH + 1)),
        GgufError::ArrayTooDeep { .. }
    ));
    // Duplicate key.
    let dup = B::header(b"GGUF", 3, 0, 2).kv_u32("a", 1).kv_u32("a", 2);
    assert!(matches!(err(dup), GgufError::DuplicateKey { key, offset: 41 } if key == "a"));
    // Alignment: not a power of two, zero, wrong type, too large.
    for b in [
        h().kv_u32("general.alignment", 48),
        h().kv_u32("general.alignment", 0),
        h().str("general.alignment").u32(8).str("32"),
        h().str("general.alignment").u32(10).u64(1 << 40),
        // Found by the fuzzer: 2^30 made a rewrite pad the header with a gigabyte of zeros.
        h().str("general.alignment").u32(5).u32(1 << 30),
    ] {
        assert!(matches!(err(b), GgufError::BadAlignment { offset: 24, .. }));
    }
    // A non-default alignment is honoured.
    let f = B::header(b"GGUF", 3, 1, 1)
        .kv_u32("general.alignment", 64)
        .tensor("t", &[4], 0, 0);
    let mut bytes = f.0;
    bytes.resize(bytes.len().next_multiple_of(64) + 16, 0);
    let f = GgufFile::from_bytes(bytes).unwrap();
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.tensor("t").unwrap().offset % 64, 0);
}

#[test]
fn tensor_errors() {
    let h = |n| B::header(b"GGUF", 3, n, 0);
    assert!(matches!(
        err(h(1).tensor("t", &[1, 1, 1, 1, 1], 0, 0)),
        GgufError::TooManyDims {
            n_dims: 5,
            offset: 33,
            ..
        }
    ));
    assert!(matches!(
        err(h(1).tensor("t", &[4, 1 << 63], 0, 0).data(16)),
        GgufError::BadDim { index: 1, value, .. } if value == 1 << 63
    ));
    assert!(matches!(
        err(h(1).tensor("t", &[1 << 62, 4], 0, 0).data(16)),
        GgufError::TensorTooLarge { offset: 33, .. }
    ));
    // Element count fits but bytes do not (2^62 f32 = 2^64 bytes).
    assert!(matches!(
        err(h(1).tensor("t", &[1 << 62], 0, 0).data(16)),
        GgufError::TensorTooLarge { .. }
    ));
    assert!(matches!(
        err(h(1).tensor("t", &[4], 4, 0).data(16)),
        GgufError::UnknownType { id: 4, .. }
    ));
    // 26 is I32 in GGUF but unknown in PWRI; 18 is I32 in PWRI.
    assert!(matches!(
        err(B::header(b"PWRI", 3, 1, 0)
            .tensor("t", &[4], 26, 0)
            .data(16)),
        GgufError::UnknownType { id: 26, .. }
    ));
    assert!(matches!(
        err(h(1).tensor("t", &[33, 2], 2, 0).data(64)),
        GgufError::BadRowLength {
            row_len: 33,
            block: 32,
            ..
        }
    ));
    assert!(matches!(
        err(h(2).tensor("t", &[4], 0, 0).tensor("t", &[4], 0, 32).data(64)),
        GgufError::DuplicateTensor { name, offset: 57 } if name == "t"
    ));
    assert!(matches!(
        err(h(1).tensor("t", &[4], 0, 16).data(64)),
        GgufError::MisalignedTensor {
            data_offset: 16,
            alignment: 32,
            ..
        }
    ));
    assert!(matches!(
        err(h(1).tensor("t", &[16], 0, 0).data(63)),
        GgufError::TensorOutOfBounds { file_size, .. } if file_size == 64 + 63
    ));
    assert!(matches!(
        err(h(1).tensor("t", &[4], 0, u64::MAX - 31).data(16)),
        GgufError::TensorOutOfBounds { end: u64::MAX, .. }
    ));
    assert!(matches!(
        err(h(2).tensor("a", &[16], 0, 0).tensor("b", &[4], 0, 32).data(128)),
        GgufError::OverlappingTensors { first, second, .. } if first == "a" && second == "b"
    ));
    // Overlap hidden behind a zero-size tensor and a short one.
    assert!(matches!(
        err(h(3)
            .tensor("a", &[64], 0, 0)
            .tensor("z", &[0], 0, 64)
            .tensor("c", &[4], 0, 128)
            .data(512)),
        GgufError::OverlappingTensors { .. }
    ));
    assert!(matches!(
        err(h(1).str("t").u32(1).u64(4).u32(0)),
        GgufError::Truncated {
            what: "tensor data offset",
            ..
        }
    ));
    assert!(matches!(
        err(h(1).u64(3).raw(&[b'a', 0xff, b'b']).u32(0).u32(0).u64(0)),
        GgufError::InvalidUtf8 {
            what: "tensor name",
            ..
        }
    ));
}

#[test]
fn random_garbage_never_panics() {
    let mut rng = Rng(42);
    for i in 0..3000 {
        let len = (rng.next() % 200) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Give most inputs a valid prefix so the parser gets past the magic and version.
        if i % 4 != 0 && len >= 24 {
            b[..4].copy_from_slice(if i % 2 == 0 { b"GGUF" } else { b"PWRI" });
            b[4..8].copy_from_slice(&3u32.to_le_bytes());
            b[8..16].copy_from_slice(&(rng.next() % 3).to_le_bytes());
            b[16..24].copy_from_slice(&(rng.next() % 3).to_le_bytes());
        }
        if let Err(e) = parse_and_use(b) {
            one_line(&e);
        }
    }
}

#[test]
fn zero_dim_does_not_hide_huge_dims() {
    // Found by the fuzzer: a zero-element tensor whose other dimension is so large that its
    // row size overflows. The product of the non-zero dimensions must be storable.
    let h = || B::header(b"GGUF", 3, 1, 0);
    assert!(matches!(
        err(h().tensor("t", &[0, 1 << 62], 0, 0).data(0)),
        GgufError::TensorTooLarge { .. }
    ));
    assert!(matches!(
        err(h().tensor("t", &[1 << 62, 0], 0, 0).data(0)),
        GgufError::TensorTooLarge { .. }
    ));
    let f = h()
        .tensor("t", &[1 << 40, 0], 0, 0)
        .data(0)
        .parse()
        .unwrap();
    let t = f.tensor("t").unwrap();
    assert_eq!((t.n_elements(), t.size, t.n_rows()), (0, 0, 0));
    assert_eq!(t.row_bytes(), 4 << 40);
}

#[test]
fn array_element_budget() {
    use powerinfer_gguf::MAX_ARRAY_ELEMENTS;
    // Two u8 arrays whose lengths fit the file but together exceed the element budget.
    let n = MAX_ARRAY_ELEMENTS / 2 + 1;
    let b = B::header(b"GGUF", 3, 0, 2)
        .str("a")
        .u32(9)
        .u32(0)
        .u64(n)
        .raw(&vec![0; n as usize])
        .str("b")
        .u32(9)
        .u32(0)
        .u64(n)
        .raw(&vec![0; n as usize]);
    assert!(matches!(err(b), GgufError::TooManyArrayElements { key, .. } if key == "b"));
}
