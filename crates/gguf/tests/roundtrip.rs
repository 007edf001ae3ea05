//! Writer / reader round trips on random metadata and tensors, streaming, writer errors, and
//! `.gpuidx` files.

use std::borrow::Cow;

use powerinfer_gguf::{
    Array, GgmlType, GgufFile, GgufWriter, GpuIndex, GpuIndexError, LayerGpuIndex, Magic,
    MetadataError, Value, ValueType, WriteError,
};

/// splitmix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn string(&mut self) -> String {
        let pool = [
            "",
            "a",
            "llama",
            "▁the",
            "<0x0A>",
            "日本語",
            "\n\t\"'\\",
            "🦀x",
        ];
        (0..self.below(4))
            .map(|_| pool[self.below(pool.len() as u64) as usize])
            .collect()
    }
}

fn scalar(rng: &mut Rng, ty: u64) -> Value {
    let x = rng.next();
    match ty {
        0 => Value::U8(x as u8),
        1 => Value::I8(x as i8),
        2 => Value::U16(x as u16),
        3 => Value::I16(x as i16),
        4 => Value::U32(x as u32),
        5 => Value::I32(x as i32),
        // Finite floats, so `==` is meaningful (NaN payloads are tested separately).
        6 => Value::F32((x as i32) as f32 / 7.0),
        7 => Value::Bool(x & 1 == 1),
        8 => Value::String(rng.string()),
        9 => Value::U64(x),
        10 => Value::I64(x as i64),
        _ => Value::F64((x as i64) as f64 / 3.0),
    }
}

/// A random value: a scalar, or a homogeneous array (possibly of arrays) up to `depth` levels.
fn value(rng: &mut Rng, depth: usize) -> Value {
    if depth == 0 || rng.below(3) != 0 {
        let ty = rng.below(12);
        return scalar(rng, ty);
    }
    let n = rng.below(6);
    if rng.below(3) == 0 {
        // Arrays of arrays: inner arrays may each have their own element type.
        arr((0..n).map(|_| value_array(rng, depth - 1)).collect())
    } else {
        let ty = rng.below(12);
        let items: Vec<Value> = (0..n).map(|_| scalar(rng, ty)).collect();
        // Empty arrays keep their element type too.
        let elem = scalar(rng, ty).value_type();
        Value::Array(Array::from_values(elem, items).unwrap())
    }
}

/// A homogeneous array value (element type of the first item, `u8` when empty).
fn arr(items: Vec<Value>) -> Value {
    Value::Array(Array::from_values_inferred(items).unwrap())
}

fn value_array(rng: &mut Rng, depth: usize) -> Value {
    match value(rng, depth.max(1)) {
        v @ Value::Array(_) => v,
        v => arr(vec![v]),
    }
}

const TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::I8,
    GgmlType::I32,
    GgmlType::IQ4_NL,
    GgmlType::MXFP4,
];

struct Model {
    magic: Magic,
    version: u32,
    kvs: Vec<(String, Value)>,
    tensors: Vec<(String, GgmlType, Vec<u64>, Vec<u8>)>,
}

fn random_model(rng: &mut Rng) -> Model {
    let magic = if rng.below(2) == 0 {
        Magic::Gguf
    } else {
        Magic::Pwri
    };
    let version = 2 + rng.below(2) as u32;
    let mut kvs: Vec<(String, Value)> = (0..rng.below(10))
        .map(|i| (format!("k{i}.{}", rng.string()), value(rng, 3)))
        .collect();
    if rng.below(3) == 0 {
        kvs.push(("general.alignment".into(), Value::U32(1 << rng.below(8))));
    }
    let tensors = (0..rng.below(6))
        .filter_map(|i| {
            let ty = TYPES[rng.below(TYPES.len() as u64) as usize];
            ty.id(magic)?;
            // A quantized tensor needs at least its row dimension.
            let n_dims = (rng.below(5) as usize).max(usize::from(ty.is_quantized()));
            let mut shape: Vec<u64> = (0..n_dims).map(|_| 1 + rng.below(5)).collect();
            if let Some(r) = shape.first_mut() {
                *r *= ty.block_size() as u64;
            }
            if rng.below(10) == 0 && !shape.is_empty() {
                shape[rng.below(n_dims as u64) as usize] = 0;
            }
            let n: u64 = shape.iter().product();
            let size = ty.bytes_for(n).unwrap() as usize;
            let data = (0..size).map(|_| rng.next() as u8).collect();
            Some((format!("t{i}"), ty, shape, data))
        })
        .collect();
    Model {
        magic,
        version,
        kvs,
        tensors,
    }
}

fn writer(m: &Model, with_data: bool) -> GgufWriter {
    let mut w = GgufWriter::new(m.magic);
    w.set_version(m.version).unwrap();
    for (k, v) in &m.kvs {
        w.add_kv(k.clone(), v.clone()).unwrap();
    }
    for (name, ty, shape, data) in &m.tensors {
        if with_data {
            w.add_tensor(name.clone(), *ty, shape, data.clone())
                .unwrap();
        } else {
            w.add_tensor_info(name.clone(), *ty, shape).unwrap();
        }
    }
    w
}

fn check(m: &Model, f: &GgufFile) {
    assert_eq!(f.magic(), m.magic);
    assert_eq!(f.version(), m.version);
    assert_eq!(f.metadata().len(), m.kvs.len());
    for ((k, v), (k2, v2)) in f.metadata().iter().zip(&m.kvs) {
        assert_eq!(k, k2);
        // An empty array's element type is not kept in a `Value`; everything else is exact.
        assert_eq!(v, v2, "{k}");
        assert_eq!(f.get(k), Some(v2));
    }
    assert_eq!(f.tensors().len(), m.tensors.len());
    for (t, (name, ty, shape, data)) in f.tensors().iter().zip(&m.tensors) {
        assert_eq!((&t.name, t.ty, &t.shape), (name, *ty, shape));
        assert_eq!(t.size, data.len() as u64);
        assert_eq!(t.offset % f.alignment(), 0);
        assert_eq!(f.tensor_data(t), &data[..]);
        assert_eq!(f.tensor_bytes(name), Some(&data[..]));
    }
}

#[test]
fn random_models_round_trip() {
    let mut rng = Rng(7);
    for _ in 0..300 {
        let m = random_model(&mut rng);
        let w = writer(&m, true);
        let expected_size = w.file_size();
        let bytes = w.write_to_vec().unwrap();
        assert_eq!(bytes.len() as u64, expected_size);
        let f = GgufFile::from_bytes(bytes.clone()).unwrap();
        check(&m, &f);

        // Streaming gives the same bytes.
        let mut s = writer(&m, false).begin(Vec::new()).unwrap();
        for (name, _, _, data) in &m.tensors {
            assert_eq!(s.next_tensor(), Some(name.as_str()));
            if rng.below(2) == 0 {
                s.write_tensor_data(name, data).unwrap();
            } else {
                s.write_tensor_from_reader(name, &mut &data[..]).unwrap();
            }
        }
        assert_eq!(s.finish().unwrap(), bytes);

        // Reading and writing again is a fixed point.
        let again: Vec<u8> = {
            let mut w = GgufWriter::new(f.magic());
            w.set_version(f.version()).unwrap();
            for (k, v) in f.metadata() {
                w.add_kv(k.clone(), v.clone()).unwrap();
            }
            for t in f.tensors() {
                w.add_tensor(t.name.clone(), t.ty, &t.shape, f.tensor_data(t))
                    .unwrap();
            }
            w.write_to_vec().unwrap()
        };
        assert_eq!(again, bytes);
    }
}

#[test]
fn float_bits_are_preserved() {
    let mut w = GgufWriter::new(Magic::Gguf);
    let nan32 = f32::from_bits(0x7fc0_1234);
    let nan64 = f64::from_bits(0xfff8_0000_0000_beef);
    w.add_kv("a", Value::F32(nan32)).unwrap();
    w.add_kv("b", arr(vec![Value::F64(nan64), Value::F64(-0.0)]))
        .unwrap();
    let f = GgufFile::from_bytes(w.write_to_vec().unwrap()).unwrap();
    assert_eq!(f.get_f32("a").unwrap().to_bits(), 0x7fc0_1234);
    match f.get_array("b").unwrap().as_f64_slice().unwrap() {
        [x, z] => {
            assert_eq!(x.to_bits(), nan64.to_bits());
            assert_eq!(z.to_bits(), (-0.0f64).to_bits());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn streaming_to_a_file_and_mmap() {
    let dir = std::env::temp_dir().join(format!("powerinfer-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stream.gguf");
    let mut w = GgufWriter::new(Magic::Pwri);
    w.add_kv("general.architecture", Value::from("llama"))
        .unwrap();
    w.add_kv("llama.block_count", Value::U32(2)).unwrap();
    w.add_tensor_info("a", GgmlType::Q4_0, &[64, 3]).unwrap();
    w.add_tensor("b", GgmlType::F32, &[5], vec![1u8; 20])
        .unwrap();
    w.add_tensor_info("c", GgmlType::I32, &[7]).unwrap();
    let file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut s = w.begin(file).unwrap();
    // Out of order and wrong sizes are rejected without writing.
    assert!(matches!(
        s.write_tensor_data("c", &[0; 28]),
        Err(WriteError::OutOfOrder { expected: Some(e), .. }) if e == "a"
    ));
    assert!(matches!(
        s.write_tensor_data("a", &[0; 10]),
        Err(WriteError::SizeMismatch {
            expected: 108,
            got: 10,
            ..
        })
    ));
    s.write_tensor_data("a", &[3; 108]).unwrap();
    // "b" had its data attached: the stream writes it by itself before "c".
    assert!(matches!(
        s.write_tensor_from_reader("c", &mut &[9u8; 27][..]),
        Err(WriteError::SizeMismatch { got: 27, .. })
    ));
    drop(s);
    // Start over and finish properly.
    let mut w = GgufWriter::new(Magic::Pwri);
    w.add_kv("general.architecture", Value::from("llama"))
        .unwrap();
    w.add_kv("llama.block_count", Value::U32(2)).unwrap();
    w.add_tensor_info("a", GgmlType::Q4_0, &[64, 3]).unwrap();
    w.add_tensor("b", GgmlType::F32, &[5], vec![1u8; 20])
        .unwrap();
    w.add_tensor_info("c", GgmlType::I32, &[7]).unwrap();
    let mut s = w
        .begin(std::io::BufWriter::new(
            std::fs::File::create(&path).unwrap(),
        ))
        .unwrap();
    s.write_tensor_data("a", &[3; 108]).unwrap();
    assert_eq!(s.next_tensor(), Some("b"));
    s.write_tensor_from_reader("c", &mut &[9u8; 28][..])
        .unwrap();
    assert!(matches!(
        s.write_tensor_data("d", &[]),
        Err(WriteError::OutOfOrder { expected: None, .. })
    ));
    s.finish().unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.magic(), Magic::Pwri);
    assert_eq!(f.get_arch_u32("block_count"), Ok(2));
    assert_eq!(f.tensor_bytes("a"), Some(&[3u8; 108][..]));
    assert_eq!(f.tensor_bytes("b"), Some(&[1u8; 20][..]));
    assert_eq!(f.tensor_bytes("c"), Some(&[9u8; 28][..]));
    assert_eq!(f.file_size() % 32, 0);
    // A missing tensor is reported by `finish`.
    let mut w = GgufWriter::new(Magic::Gguf);
    w.add_tensor_info("x", GgmlType::F32, &[1]).unwrap();
    assert!(matches!(
        w.begin(Vec::new()).unwrap().finish(),
        Err(WriteError::MissingData { tensor }) if tensor == "x"
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn writer_rejects_bad_input() {
    let mut w = GgufWriter::new(Magic::Pwri);
    assert!(matches!(
        w.set_version(1),
        Err(WriteError::UnsupportedVersion(1))
    ));
    w.add_kv("k", Value::U8(1)).unwrap();
    assert!(matches!(
        w.add_kv("k", Value::U8(2)),
        Err(WriteError::DuplicateKey { .. })
    ));
    assert!(matches!(
        w.add_array("m", ValueType::U8, vec![Value::U8(1), Value::I8(1)]),
        Err(WriteError::MixedArray {
            first: "u8",
            other: "i8",
            ..
        })
    ));
    let mut deep = Value::U8(0);
    for _ in 0..=powerinfer_gguf::MAX_ARRAY_DEPTH {
        deep = arr(vec![deep]);
    }
    assert!(matches!(
        w.add_kv("d", deep),
        Err(WriteError::ArrayTooDeep { .. })
    ));
    assert!(matches!(
        w.add_kv("general.alignment", Value::U32(24)),
        Err(WriteError::BadAlignment { .. })
    ));
    assert!(matches!(
        w.add_tensor_info("q", GgmlType::IQ2_XS, &[256]),
        Err(WriteError::UnsupportedType { .. })
    ));
    assert!(matches!(
        w.add_tensor_info("q", GgmlType::Q4_0, &[33]),
        Err(WriteError::BadShape { .. })
    ));
    assert!(matches!(
        w.add_tensor_info("q", GgmlType::F32, &[1, 1, 1, 1, 1]),
        Err(WriteError::BadShape { .. })
    ));
    assert!(matches!(
        w.add_tensor_info("q", GgmlType::F32, &[1 << 62, 4]),
        Err(WriteError::BadShape { .. })
    ));
    assert!(matches!(
        w.add_tensor("q", GgmlType::F32, &[4], vec![0; 15]),
        Err(WriteError::SizeMismatch {
            expected: 16,
            got: 15,
            ..
        })
    ));
    w.add_tensor_info("q", GgmlType::F32, &[4]).unwrap();
    assert!(matches!(
        w.add_tensor_info("q", GgmlType::F32, &[4]),
        Err(WriteError::DuplicateTensor { .. })
    ));
    assert!(matches!(
        w.write_to_vec(),
        Err(WriteError::MissingData { .. })
    ));
    // Empty arrays: u8 by default, or the type asked for.
    let mut w = GgufWriter::new(Magic::Gguf);
    w.add_kv("e", arr(vec![])).unwrap();
    w.add_array("s", ValueType::String, vec![]).unwrap();
    assert!(matches!(
        w.add_array("x", ValueType::U32, vec![Value::I32(1)]),
        Err(WriteError::MixedArray { .. })
    ));
    let bytes = w.write_to_vec().unwrap();
    let f = GgufFile::from_bytes(bytes.clone()).unwrap();
    assert_eq!(f.get_array("s").unwrap(), &Array::empty(ValueType::String));
    assert_eq!(f.get_array("e").unwrap(), &Array::U8(vec![]));
    assert!(f.get_strings("e").unwrap().is_empty());
    // The element type id follows the key, its type id (9) and precedes the count.
    let at = bytes.windows(1).position(|w| w == b"s").unwrap() + 1 + 4;
    assert_eq!(&bytes[at..at + 4], &8u32.to_le_bytes());
}

#[test]
fn metadata_getters() {
    let mut w = GgufWriter::new(Magic::Gguf);
    w.add_kv("general.architecture", Value::from("gemma3"))
        .unwrap();
    w.add_kv("gemma3.block_count", Value::U64(18)).unwrap();
    w.add_kv("gemma3.big", Value::U64(1 << 40)).unwrap();
    w.add_kv("gemma3.neg", Value::I32(-1)).unwrap();
    w.add_kv("gemma3.eps", Value::F64(1e-6)).unwrap();
    w.add_kv("gemma3.flag", Value::Bool(true)).unwrap();
    w.add_kv("gemma3.name", Value::from("x")).unwrap();
    w.add_kv("ints", Value::Array(vec![1u8, 200].into()))
        .unwrap();
    w.add_kv("big_ints", Value::Array(vec![1u64 << 33].into()))
        .unwrap();
    w.add_kv("i32s", Value::Array(vec![-5i32, 7].into()))
        .unwrap();
    w.add_kv("f32s", Value::Array(vec![0.5f32, -2.0].into()))
        .unwrap();
    w.add_kv("f64s", Value::Array(vec![0.25f64].into()))
        .unwrap();
    w.add_kv("strs", Value::Array(vec!["a", "", "ü"].into()))
        .unwrap();
    let f = GgufFile::from_bytes(w.write_to_vec().unwrap()).unwrap();
    assert_eq!(f.arch_key("block_count"), "gemma3.block_count");
    assert_eq!(f.get_arch_u32("block_count"), Ok(18));
    assert_eq!(f.get_arch_u64("big"), Ok(1 << 40));
    assert!(matches!(
        f.get_arch_u32("big"),
        Err(MetadataError::OutOfRange { .. })
    ));
    assert!(matches!(
        f.get_u32("gemma3.neg"),
        Err(MetadataError::OutOfRange { .. })
    ));
    assert_eq!(f.get_i32("gemma3.neg"), Ok(-1));
    assert_eq!(f.get_i64("gemma3.block_count"), Ok(18));
    assert_eq!(f.get_arch_f32("eps"), Ok(1e-6f64 as f32));
    assert_eq!(f.get_arch_bool("flag"), Ok(true));
    assert_eq!(f.get_arch_str("name"), Ok("x"));
    assert_eq!(
        f.get_arch_u32("name"),
        Err(MetadataError::WrongType {
            key: "gemma3.name".into(),
            expected: "u32",
            found: "string"
        })
    );
    assert_eq!(
        f.get_u32("nope"),
        Err(MetadataError::Missing { key: "nope".into() })
    );
    assert_eq!(f.get_i32_array("ints").unwrap().as_ref(), &[1, 200]);
    // Matching element types are borrowed, others converted.
    assert!(matches!(
        f.get_i32_array("i32s"),
        Ok(Cow::Borrowed(&[-5, 7]))
    ));
    assert!(matches!(
        f.get_f32_array("f32s"),
        Ok(Cow::Borrowed(&[0.5, -2.0]))
    ));
    assert!(matches!(f.get_f32_array("f64s"), Ok(Cow::Owned(ref v)) if v == &[0.25]));
    assert_eq!(f.get_str_array("strs").unwrap(), ["a", "", "ü"]);
    let strs = f.get_strings("strs").unwrap();
    assert_eq!(strs.iter().collect::<Vec<_>>(), ["a", "", "ü"]);
    assert_eq!((&strs[2], strs.get(3), strs.len()), ("ü", None, 3));
    assert_eq!(strs.as_packed_str(), "aü");
    assert_eq!(f.get_array("strs").unwrap().str_at(0), Some("a"));
    assert!(matches!(
        f.get_i32_array("big_ints"),
        Err(MetadataError::OutOfRange { .. })
    ));
    assert!(matches!(
        f.get_str_array("ints"),
        Err(MetadataError::WrongType { found: "u8", .. })
    ));
    assert!(matches!(
        f.get_f32_array("gemma3.eps"),
        Err(MetadataError::WrongType { .. })
    ));
    assert!(matches!(
        f.get_bool("gemma3.eps"),
        Err(MetadataError::WrongType { .. })
    ));
    let no_arch =
        GgufFile::from_bytes(GgufWriter::new(Magic::Gguf).write_to_vec().unwrap()).unwrap();
    assert_eq!(
        no_arch.get_arch_u32("block_count"),
        Err(MetadataError::Missing {
            key: "general.architecture".into()
        })
    );
    for e in [
        f.get_arch_u32("big").unwrap_err(),
        f.get_u32("nope").unwrap_err(),
    ] {
        assert!(!e.to_string().contains('\n'));
    }
}

fn random_index(rng: &mut Rng) -> GpuIndex {
    let n_ff = 1 + rng.below(300) as usize;
    let layers = (0..1 + rng.below(5))
        .map(|_| {
            let p = rng.below(101);
            LayerGpuIndex::from_gpu_idx((0..n_ff).map(|_| i32::from(rng.below(100) < p)).collect())
        })
        .collect();
    GpuIndex {
        vram_capacity: rng.next(),
        layers,
    }
}

#[test]
fn gpuidx_round_trip() {
    let mut rng = Rng(99);
    for _ in 0..50 {
        let g = random_index(&mut rng);
        let bytes = g.to_bytes().unwrap();
        let f = GgufFile::from_bytes(bytes.clone()).unwrap();
        assert_eq!(f.magic(), Magic::Pwri);
        assert_eq!(f.architecture(), Some("generic.gpu_index"));
        assert_eq!(
            f.get_u32("generic.gpu_index.block_count"),
            Ok(g.layers.len() as u32)
        );
        assert!(matches!(f.get("split.vram_capacity"), Some(Value::U64(_))));
        assert!(f.tensors().iter().all(|t| t.ty == GgmlType::I32));
        assert_eq!(f.tensors()[1].name, "blk.0.gpu_bucket");
        // I32 is stored with the PWRI id 18.
        assert_eq!(GgmlType::I32.id(Magic::Pwri), Some(18));
        assert_eq!(GpuIndex::from_bytes(bytes).unwrap(), g);
    }
    let dir = std::env::temp_dir().join(format!("powerinfer-gpuidx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let g = random_index(&mut rng);
    g.write(dir.join("m.gpuidx")).unwrap();
    assert_eq!(GpuIndex::open(dir.join("m.gpuidx")).unwrap(), g);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpuidx_validation() {
    let layer = |idx: Vec<i32>, bucket: Vec<i32>| LayerGpuIndex {
        gpu_idx: idx,
        gpu_bucket: bucket,
    };
    let bad = |l: LayerGpuIndex| {
        GpuIndex {
            vram_capacity: 1,
            layers: vec![l],
        }
        .to_bytes()
        .unwrap_err()
    };
    assert!(matches!(
        bad(layer(vec![0, 2], vec![1])),
        GpuIndexError::BadIdxValue {
            neuron: 1,
            value: 2,
            ..
        }
    ));
    assert!(matches!(
        bad(layer(vec![1, 1], vec![1, 0])),
        GpuIndexError::BadBucket { position: 1, .. }
    ));
    assert!(matches!(
        bad(layer(vec![1, 0], vec![1])),
        GpuIndexError::BadBucket { .. }
    ));
    assert!(matches!(
        bad(layer(vec![1, 0], vec![2])),
        GpuIndexError::BadBucket { .. }
    ));
    assert!(matches!(
        bad(layer(vec![1, 1], vec![0])),
        GpuIndexError::BucketCount {
            n_idx: 2,
            n_bucket: 1,
            ..
        }
    ));

    // Files that are not valid placements.
    let base = || {
        let mut w = GgufWriter::new(Magic::Pwri);
        w.add_kv("general.architecture", Value::from("generic.gpu_index"))
            .unwrap();
        w.add_kv("generic.gpu_index.block_count", Value::U32(1))
            .unwrap();
        w.add_kv("split.vram_capacity", Value::U64(5)).unwrap();
        w
    };
    let i32s = |v: &[i32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut w = base();
    w.add_tensor("blk.0.gpu_bucket", GgmlType::I32, &[1], i32s(&[0]))
        .unwrap();
    w.add_tensor("blk.0.gpu_idx", GgmlType::I32, &[1], i32s(&[1]))
        .unwrap();
    assert!(matches!(
        GpuIndex::from_bytes(w.write_to_vec().unwrap()),
        Err(GpuIndexError::TensorOrder { index: 0, .. })
    ));
    let mut w = base();
    w.add_tensor("blk.0.gpu_idx", GgmlType::F32, &[1], i32s(&[1]))
        .unwrap();
    w.add_tensor("blk.0.gpu_bucket", GgmlType::I32, &[1], i32s(&[0]))
        .unwrap();
    assert!(matches!(
        GpuIndex::from_bytes(w.write_to_vec().unwrap()),
        Err(GpuIndexError::BadTensor { .. })
    ));
    let mut w = base();
    w.add_tensor("blk.0.gpu_idx", GgmlType::I32, &[1], i32s(&[1]))
        .unwrap();
    w.add_tensor("blk.0.gpu_bucket", GgmlType::I32, &[1], i32s(&[0]))
        .unwrap();
    w.add_tensor("blk.1.gpu_idx", GgmlType::I32, &[1], i32s(&[1]))
        .unwrap();
    assert!(matches!(
        GpuIndex::from_bytes(w.write_to_vec().unwrap()),
        Err(GpuIndexError::TensorOrder {
            index: 2,
            expected: None,
            ..
        })
    ));
    let mut w = base();
    w.add_tensor("blk.0.gpu_idx", GgmlType::I32, &[1], i32s(&[1]))
        .unwrap();
    assert!(matches!(
        GpuIndex::from_bytes(w.write_to_vec().unwrap()),
        Err(GpuIndexError::TensorOrder {
            index: 1,
            found: None,
            ..
        })
    ));
    let mut w = GgufWriter::new(Magic::Pwri);
    w.add_kv("general.architecture", Value::from("llama"))
        .unwrap();
    assert!(matches!(
        GpuIndex::from_bytes(w.write_to_vec().unwrap()),
        Err(GpuIndexError::WrongArchitecture { .. })
    ));
    let mut w = GgufWriter::new(Magic::Pwri);
    w.add_kv("general.architecture", Value::from("generic.gpu_index"))
        .unwrap();
    assert!(matches!(
        GpuIndex::from_bytes(w.write_to_vec().unwrap()),
        Err(GpuIndexError::Metadata(MetadataError::Missing { .. }))
    ));
    // A huge block count with no tensors fails on the first missing tensor, without allocating.
    let mut w = GgufWriter::new(Magic::Pwri);
    w.add_kv("general.architecture", Value::from("generic.gpu_index"))
        .unwrap();
    w.add_kv("generic.gpu_index.block_count", Value::U32(u32::MAX))
        .unwrap();
    w.add_kv("split.vram_capacity", Value::U64(5)).unwrap();
    assert!(matches!(
        GpuIndex::from_bytes(w.write_to_vec().unwrap()),
        Err(GpuIndexError::TensorOrder { index: 0, .. })
    ));
}
