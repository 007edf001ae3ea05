//! The reference PowerInfer's `activation/activation_{i}.pt` directories end to end:
//! `powerinfer plan --profile DIR` and `powerinfer profile --from-activations DIR`, on files
//! written here the way `torch.save(tensor)` writes them (its pickle, and a zip laid out as
//! PyTorch's stream writer lays it out: stored entries, data aligned to 64 bytes), and the
//! errors for bad directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use powerinfer_predictor::profile::Profile;
use safetensors::Dtype;
use safetensors::tensor::TensorView;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(
        "../../../shared/fixtures/powerinfer-tiny/tiny-relu-llama.random-pred.q4_0.powerinfer.gguf",
    )
}

fn models() -> PathBuf {
    std::env::var_os("POWERINFER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"))
}

fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-activations-{name}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn powerinfer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_powerinfer"))
        .args(args)
        .output()
        .expect("spawn powerinfer")
}

fn ok(args: &[&str]) -> String {
    let out = powerinfer(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn err(args: &[&str]) -> String {
    let out = powerinfer(args);
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ----------------------------------------------------------------------------------------
// torch.save(tensor), written by hand.

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A zip of stored entries, each entry's data aligned to 64 bytes with an `FB` extra field
/// (as PyTorch's `PyTorchStreamWriter` writes them).
fn zip(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let size = data.len() as u32;
        let unpadded = out.len() + 30 + name.len() + 4;
        let pad = (64 - unpadded % 64) % 64;
        let mut fixed = Vec::new();
        fixed.extend(20u16.to_le_bytes()); // version needed
        fixed.extend(0u16.to_le_bytes()); // flags
        fixed.extend(0u16.to_le_bytes()); // stored
        fixed.extend(0u32.to_le_bytes()); // time, date
        fixed.extend(crc.to_le_bytes());
        fixed.extend(size.to_le_bytes());
        fixed.extend(size.to_le_bytes());
        fixed.extend((name.len() as u16).to_le_bytes());
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend(&fixed);
        out.extend(((4 + pad) as u16).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend(b"FB");
        out.extend((pad as u16).to_le_bytes());
        out.extend(vec![b'Z'; pad]);
        assert_eq!(out.len() % 64, 0);
        out.extend(data);
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(20u16.to_le_bytes()); // version made by
        central.extend(&fixed);
        central.extend(0u16.to_le_bytes()); // extra
        central.extend(0u16.to_le_bytes()); // comment
        central.extend(0u16.to_le_bytes()); // disk
        central.extend(0u16.to_le_bytes()); // internal attributes
        central.extend(0u32.to_le_bytes()); // external attributes
        central.extend(offset.to_le_bytes());
        central.extend(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend(0u32.to_le_bytes()); // disks
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

/// Python's protocol-2 int opcode for a non-negative int below 2^31.
fn py_int(p: &mut Vec<u8>, v: usize) {
    if v < 1 << 8 {
        p.extend([b'K', v as u8]);
    } else if v < 1 << 16 {
        p.push(b'M');
        p.extend((v as u16).to_le_bytes());
    } else {
        p.push(b'J');
        p.extend((v as u32).to_le_bytes());
    }
}

fn py_str(p: &mut Vec<u8>, s: &str, memo: &mut u8) {
    p.push(b'X');
    p.extend((s.len() as u32).to_le_bytes());
    p.extend(s.as_bytes());
    p.extend([b'q', *memo]);
    *memo += 1;
}

/// The pickle of `torch.save(t)` for a tensor of `shape` (row-major) over a whole storage.
fn pickle(storage: &str, shape: &[usize]) -> Vec<u8> {
    let numel: usize = shape.iter().product();
    let mut p = vec![0x80, 2];
    let m = &mut 0u8;
    let put = |p: &mut Vec<u8>, m: &mut u8| {
        p.extend([b'q', *m]);
        *m += 1;
    };
    p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n");
    put(&mut p, m);
    p.extend(b"((");
    py_str(&mut p, "storage", m);
    p.extend(format!("ctorch\n{storage}\n").as_bytes());
    put(&mut p, m);
    py_str(&mut p, "0", m);
    py_str(&mut p, "cpu", m);
    py_int(&mut p, numel);
    p.push(b't');
    put(&mut p, m);
    p.push(b'Q');
    py_int(&mut p, 0);
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    for t in [shape, &strides] {
        p.push(b'(');
        for &x in t {
            py_int(&mut p, x);
        }
        p.push(b't');
        put(&mut p, m);
    }
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

/// A `.pt` file as torch.save writes it: `{stem}/data.pkl`, `byteorder`, `data/0`, `version`.
fn pt_file(stem: &str, pickle: Vec<u8>, storage: Vec<u8>) -> Vec<u8> {
    zip(&[
        (format!("{stem}/data.pkl"), pickle),
        (format!("{stem}/byteorder"), b"little".to_vec()),
        (format!("{stem}/data/0"), storage),
        (format!("{stem}/version"), b"3\n".to_vec()),
    ])
}

/// How a layer's counts are stored.
#[derive(Clone, Copy)]
enum Kind {
    F32,
    F16,
    I64,
    I32,
}

fn f16_bits(v: u64) -> u16 {
    // Whole numbers below 2048 are exact in f16: sign 0, biased exponent, 10-bit mantissa.
    assert!(v < 2048);
    if v == 0 {
        return 0;
    }
    let e = 63 - v.leading_zeros();
    let mant = (((v << 10) >> e) & 0x3ff) as u16;
    ((e as u16 + 15) << 10) | mant
}

/// Writes `activation_{layer}.pt` holding `counts` (1-D) stored as `kind`.
fn write_layer(dir: &Path, layer: usize, counts: &[u64], kind: Kind) {
    let (storage, data): (&str, Vec<u8>) = match kind {
        Kind::F32 => (
            "FloatStorage",
            counts
                .iter()
                .flat_map(|&c| (c as f32).to_le_bytes())
                .collect(),
        ),
        Kind::F16 => (
            "HalfStorage",
            counts
                .iter()
                .flat_map(|&c| f16_bits(c).to_le_bytes())
                .collect(),
        ),
        Kind::I64 => (
            "LongStorage",
            counts
                .iter()
                .flat_map(|&c| (c as i64).to_le_bytes())
                .collect(),
        ),
        Kind::I32 => (
            "IntStorage",
            counts
                .iter()
                .flat_map(|&c| (c as i32).to_le_bytes())
                .collect(),
        ),
    };
    let stem = format!("activation_{layer}");
    let bytes = pt_file(&stem, pickle(storage, &[counts.len()]), data);
    std::fs::write(dir.join(format!("{stem}.pt")), bytes).unwrap();
}

/// Skewed counts of layer `l` (below 2048 for up to 32 layers: exact in every storage type),
/// different per layer.
fn counts(l: usize, n_ff: usize) -> Vec<u64> {
    (0..n_ff)
        .map(|i| {
            let rank = (i * 389 + l * 97) % n_ff;
            (1900 / (1 + rank) + l * 3 + i % 5) as u64
        })
        .collect()
}

fn write_dir(dir: &Path, layers: usize, n_ff: usize) -> Vec<Vec<u64>> {
    let kinds = [Kind::F32, Kind::I64, Kind::F16, Kind::I32];
    (0..layers)
        .map(|l| {
            let c = counts(l, n_ff);
            write_layer(dir, l, &c, kinds[l % kinds.len()]);
            c
        })
        .collect()
}

fn write_safetensors(path: &Path, counts: &[Vec<u64>]) {
    let data: Vec<Vec<u8>> = counts
        .iter()
        .map(|c| c.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .zip(counts)
        .enumerate()
        .map(|(l, (d, c))| {
            (
                format!("blk.{l}.ffn_counts"),
                TensorView::new(Dtype::U64, vec![c.len()], d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn plan_json(model: &Path, profile: &Path, budget: &str, out: &Path) -> serde_json::Value {
    let stdout = ok(&[
        "plan",
        "-m",
        s(model),
        "--vram-budget",
        budget,
        "--profile",
        s(profile),
        "-c",
        "256",
        "-o",
        s(out),
        "--json",
    ]);
    serde_json::from_str(&stdout).expect("--json prints JSON")
}

fn check_totals(summary: &serde_json::Value, counts: &[Vec<u64>]) {
    let layers = summary["layers"].as_array().unwrap();
    assert_eq!(layers.len(), counts.len());
    for (l, c) in counts.iter().enumerate() {
        let want: u64 = c.iter().sum();
        assert_eq!(layers[l]["total"].as_u64(), Some(want), "layer {l}");
    }
    let all: u64 = counts.iter().flatten().sum();
    assert_eq!(summary["total"].as_u64(), Some(all));
}

// ----------------------------------------------------------------------------------------

/// `plan --profile DIR` places exactly what the same counts as a safetensors profile place,
/// and `profile --from-activations` writes a counts-only profile that plans the same again.
#[test]
fn activation_directory_plans_like_the_same_safetensors_profile() {
    let dir = scratch("same");
    let model = fixture();
    let act = dir.join("activation");
    std::fs::create_dir_all(&act).unwrap();
    let counts = write_dir(&act, 3, 1024);
    let st = dir.join("same.safetensors");
    write_safetensors(&st, &counts);

    let (a, b, c) = (
        dir.join("a.gpuidx"),
        dir.join("b.gpuidx"),
        dir.join("c.gpuidx"),
    );
    let ja = plan_json(&model, &act, "0.0005", &a);
    let jb = plan_json(&model, &st, "0.0005", &b);
    check_totals(&ja["summary"], &counts);
    assert_eq!(ja["summary"], jb["summary"]);
    assert!(ja["summary"]["gpu_neurons"].as_u64().unwrap() > 0);
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());

    let prof = dir.join("converted.safetensors");
    let stdout = ok(&[
        "profile",
        "--from-activations",
        s(&act),
        "-m",
        s(&model),
        "-o",
        s(&prof),
    ]);
    assert!(stdout.contains("no predictor training pairs"), "{stdout}");
    let p = Profile::load(&prof).unwrap();
    assert_eq!(p.identity.n_layer, 3);
    assert_eq!(p.identity.n_ff, 1024);
    assert_eq!(p.ffn_activation, "relu");
    for (l, layer) in p.layers.iter().enumerate() {
        let want: Vec<i64> = counts[l].iter().map(|&x| x as i64).collect();
        assert_eq!(layer.counts, want, "layer {l}");
        assert_eq!(layer.n_samples(p.identity.n_embd), 0);
    }
    let jc = plan_json(&model, &prof, "0.0005", &c);
    assert_eq!(ja["summary"], jc["summary"]);

    // Counts only: training predictors on it (from the dense twin) says there is nothing to
    // train on.
    let dense = model.with_file_name("tiny-relu-llama.dense.f16.gguf");
    let prof = dir.join("dense.safetensors");
    ok(&[
        "profile",
        "--from-activations",
        s(&act),
        "-m",
        s(&dense),
        "-o",
        s(&prof),
    ]);
    let e = err(&[
        "train-predictor",
        "-m",
        s(&dense),
        "--profile",
        s(&prof),
        "-o",
        s(&dir.join("never.gguf")),
    ]);
    assert!(e.contains("0 sampled tokens"), "{e}");
}

#[test]
fn profile_help_says_counts_only() {
    let out = ok(&["profile", "--help"]);
    assert!(out.contains("--from-activations"), "{out}");
    assert!(out.contains("no predictor training pairs"), "{out}");
    let out = ok(&["plan", "--help"]);
    assert!(out.contains("activation_{i}.pt"), "{out}");
}

/// Each way a directory can be wrong gives an error naming the file and the problem, through
/// `plan` and through `profile --from-activations`.
#[test]
fn bad_activation_directories_are_clear_errors() {
    let root = scratch("bad");
    let model = fixture();
    let m = s(&model);
    let out = root.join("x.gpuidx");
    let plan_err = |dir: &Path| {
        err(&[
            "plan",
            "-m",
            m,
            "--vram-budget",
            "1",
            "--profile",
            s(dir),
            "-o",
            s(&out),
        ])
    };
    let convert_err = |dir: &Path| {
        err(&[
            "profile",
            "--from-activations",
            s(dir),
            "-m",
            m,
            "-o",
            s(&root.join("never.safetensors")),
        ])
    };
    let fresh = |name: &str| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        write_dir(&d, 3, 1024);
        d
    };

    // A gap.
    let d = fresh("gap");
    std::fs::remove_file(d.join("activation_1.pt")).unwrap();
    for e in [plan_err(&d), convert_err(&d)] {
        assert!(e.contains("activation_1.pt is missing"), "{e}");
    }
    // Another model: a fourth layer; a layer of 1000 neurons.
    let d = fresh("layers");
    write_layer(&d, 3, &counts(3, 1024), Kind::F32);
    for e in [plan_err(&d), convert_err(&d)] {
        assert!(e.contains("3 layers") && e.contains("another model"), "{e}");
    }
    let d = fresh("length");
    write_layer(&d, 2, &counts(2, 1000), Kind::I64);
    for e in [plan_err(&d), convert_err(&d)] {
        assert!(
            e.contains("activation_2.pt") && e.contains("1000 counts") && e.contains("n_ff = 1024"),
            "{e}"
        );
    }
    // A negative count (int64) and a NaN (float32).
    let d = fresh("negative");
    let stem = "activation_1";
    let mut data: Vec<u8> = counts(1, 1024)
        .iter()
        .flat_map(|&c| (c as i64).to_le_bytes())
        .collect();
    data[5 * 8..6 * 8].copy_from_slice(&(-3i64).to_le_bytes());
    std::fs::write(
        d.join("activation_1.pt"),
        pt_file(stem, pickle("LongStorage", &[1024]), data),
    )
    .unwrap();
    for e in [plan_err(&d), convert_err(&d)] {
        assert!(
            e.contains("activation_1.pt") && e.contains("[5] = -3 is not a count"),
            "{e}"
        );
    }
    let d = fresh("nan");
    let mut data: Vec<u8> = (0..1024).flat_map(|_| 1f32.to_le_bytes()).collect();
    data[1023 * 4..].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(
        d.join("activation_0.pt"),
        pt_file("activation_0", pickle("FloatStorage", &[1024]), data),
    )
    .unwrap();
    let e = plan_err(&d);
    assert!(e.contains("[1023] = NaN is not a count"), "{e}");
    // A count that is whole but above i64::MAX: plans, but does not fit a profile's counts.
    let d = fresh("huge");
    let mut big = Vec::new();
    for i in 0..1024 {
        big.extend(if i == 7 { 1e19f32 } else { 1.0 }.to_le_bytes());
    }
    std::fs::write(
        d.join("activation_2.pt"),
        pt_file("activation_2", pickle("FloatStorage", &[1024]), big),
    )
    .unwrap();
    ok(&[
        "plan",
        "-m",
        m,
        "--vram-budget",
        "1",
        "--profile",
        s(&d),
        "-o",
        s(&out),
    ]);
    let e = convert_err(&d);
    assert!(
        e.contains("activation_2.pt") && e.contains("does not fit"),
        "{e}"
    );
    // A stray file.
    let d = fresh("stray");
    std::fs::write(d.join("notes.txt"), "hello").unwrap();
    for e in [plan_err(&d), convert_err(&d)] {
        assert!(e.contains("stray entry \"notes.txt\""), "{e}");
    }
    // A two-dimensional tensor.
    let d = fresh("shape");
    std::fs::write(
        d.join("activation_0.pt"),
        pt_file(
            "activation_0",
            pickle("FloatStorage", &[2, 512]),
            vec![0; 4096],
        ),
    )
    .unwrap();
    let e = plan_err(&d);
    assert!(
        e.contains("activation_0.pt") && e.contains("[2, 512]"),
        "{e}"
    );
    // A state dict (a predictor's model_{i}.pt) in place of a layer.
    let d = fresh("statedict");
    let predictor = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/powerinfer-tiny/predictor_random/model_0.pt");
    std::fs::copy(predictor, d.join("activation_0.pt")).unwrap();
    let e = plan_err(&d);
    assert!(
        e.contains("activation_0.pt") && e.contains("not a single tensor"),
        "{e}"
    );
    // A truncated file, and a storage shorter than the pickle declares.
    let d = fresh("truncated");
    let full = std::fs::read(d.join("activation_2.pt")).unwrap();
    std::fs::write(d.join("activation_2.pt"), &full[..full.len() - 40]).unwrap();
    let e = plan_err(&d);
    assert!(e.contains("activation_2.pt") && e.contains("zip"), "{e}");
    let d = fresh("short");
    std::fs::write(
        d.join("activation_1.pt"),
        pt_file(
            "activation_1",
            pickle("FloatStorage", &[1024]),
            vec![0; 4000],
        ),
    )
    .unwrap();
    let e = plan_err(&d);
    assert!(
        e.contains("activation_1.pt") && e.contains("storage"),
        "{e}"
    );
    // Nothing in the directory.
    let d = root.join("empty");
    std::fs::create_dir_all(&d).unwrap();
    let e = plan_err(&d);
    assert!(e.contains("no activation_{i}.pt files"), "{e}");
    // A budget below what attention needs, with a good directory.
    let d = fresh("good");
    let e = err(&[
        "plan",
        "-m",
        m,
        "--vram-budget",
        "0.000001",
        "--profile",
        s(&d),
        "-o",
        s(&out),
    ]);
    assert!(e.contains("budget too small"), "{e}");
    // Text and activations at once.
    let e = err(&[
        "profile",
        "--from-activations",
        s(&d),
        "-m",
        m,
        "-f",
        "x.txt",
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
    let e = err(&["profile", "-m", m]);
    assert!(e.contains("--file") || e.contains("required"), "{e}");
}

/// SmolLM2-135M (30 layers x 1536 neurons): layers are read in numeric order (the reference
/// sorts names as text: activation_10.pt before activation_2.pt), and the profile records the
/// model's SwiGLU activation.
#[test]
fn thirty_layers_in_numeric_order_on_smollm2() {
    let model = models().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.exists() {
        eprintln!("skipping: SmolLM2 not fetched (scripts/fetch-models.sh)");
        return;
    }
    let dir = scratch("smollm2");
    let act = dir.join("activation");
    std::fs::create_dir_all(&act).unwrap();
    let counts = write_dir(&act, 30, 1536);
    let j = plan_json(&model, &act, "0.07", &dir.join("s.gpuidx"));
    check_totals(&j["summary"], &counts);
    let prof = dir.join("s.safetensors");
    ok(&[
        "profile",
        "--from-activations",
        s(&act),
        "-m",
        s(&model),
        "-o",
        s(&prof),
    ]);
    let p = Profile::load(&prof).unwrap();
    assert_eq!(p.ffn_activation, "silu");
    assert_eq!(p.layers.len(), 30);
    assert_eq!(p.layers[10].counts[0], counts[10][0] as i64);
    assert!(
        p.layers.iter().zip(&counts).all(|(a, b)| a
            .counts
            .iter()
            .zip(b)
            .all(|(&x, &y)| x as u64 == y))
    );
}
