//! Predictor evaluation against its scalar reference and against the fixture's oracle
//! predictors; loading and its errors.

use std::path::PathBuf;

use powerinfer_cpu::{Matrix, ThreadPool};
use powerinfer_gguf::{GgmlType, GgufFile, GgufWriter, Magic, Value};
use powerinfer_predictor::{
    LoadError, Predictor, PredictorError, PredictorScratch, Weights, file_threshold, load_layer,
    load_predictors, load_predictors_auto, reference_scores,
};

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn sym(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.sym()).collect()
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/powerinfer-tiny")
        .join(name)
}

fn open_fixture(name: &str) -> Option<GgufFile> {
    let p = fixture(name);
    if !p.exists() {
        eprintln!("fixture {p:?} not found; skipping");
        return None;
    }
    Some(GgufFile::open(&p).unwrap())
}

fn dequant(ty: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
    let mut v = vec![0.0; n];
    powerinfer_quant::dequantize_row(ty, data, &mut v).unwrap();
    v
}

fn weights_f32(w: &Weights) -> Vec<f32> {
    dequant(w.ty, &w.data, w.rows * w.cols)
}

/// Predict against the scalar reference on random weights of every computable type (fc1 and fc2
/// in different types too), at awkward sizes.
#[test]
fn predict_matches_reference_for_every_type() {
    let mut rng = Rng(11);
    let pool = ThreadPool::new(2);
    let types: Vec<GgmlType> = GgmlType::ALL
        .iter()
        .copied()
        .filter(|&t| powerinfer_quant::kernels(t).is_some())
        .collect();
    for (k, &ty) in types.iter().enumerate() {
        let ty2 = types[(k + 3) % types.len()];
        let bs = ty.block_size().max(ty2.block_size());
        let (n_embd, h, n_ff) = if bs == 256 {
            (512, 256, 301)
        } else {
            (96, 64, 509)
        };
        let fc1 = Weights::from_f32(ty, h, n_embd, &rng.vec(h * n_embd)).unwrap();
        let fc2 = Weights::from_f32(ty2, n_ff, h, &rng.vec(n_ff * h)).unwrap();
        let fc2_f = weights_f32(&fc2);
        let p = Predictor::new(fc1, fc2).unwrap();
        assert_eq!((p.n_embd(), p.hidden(), p.n_ff()), (n_embd, h, n_ff));
        let mut scratch = PredictorScratch::new();
        let mut active = vec![12345];
        for trial in 0..4 {
            let x = rng.vec(n_embd);
            let threshold = [0.0, 0.5, -0.5, 2.0][trial];
            p.predict(&pool, &x, threshold, &mut scratch, &mut active)
                .unwrap();
            let got = scratch.scores().to_vec();
            let want = reference_scores(&p, &x).unwrap();
            // The reference's hidden layer, to bound each score's error.
            let scale = want.iter().map(|v| v.abs()).sum::<f32>() / n_ff as f32;
            let mut undecided = 0;
            for i in 0..n_ff {
                let mag: f32 = fc2_f[i * h..(i + 1) * h]
                    .iter()
                    .map(|v| v.abs())
                    .sum::<f32>();
                let tol = 0.03 * scale + 0.002 * mag;
                assert!(
                    (got[i] - want[i]).abs() <= tol,
                    "{ty}/{ty2} neuron {i}: score {} vs reference {} (tol {tol})",
                    got[i],
                    want[i]
                );
                let is_active = active.binary_search(&(i as u32)).is_ok();
                assert_eq!(is_active, got[i] >= threshold, "{ty}/{ty2} neuron {i}");
                if (want[i] - threshold).abs() > tol {
                    assert_eq!(is_active, want[i] >= threshold, "{ty}/{ty2} neuron {i}");
                } else {
                    undecided += 1;
                }
            }
            assert!(
                undecided * 10 < n_ff,
                "{ty}/{ty2}: {undecided} undecided of {n_ff}"
            );
            assert!(active.windows(2).all(|w| w[0] < w[1]));
        }
    }
}

/// The oracle predictors of the fixture predict exactly `gate · ffn_norm(x) > 0`: an independent
/// check of fc1/fc2 orientation, of relu and of the threshold comparison.
#[test]
fn oracle_predictor_predicts_the_gate_sign() {
    let Some(file) = open_fixture("tiny-relu-llama.oracle-pred.f16.powerinfer.gguf") else {
        return;
    };
    assert_eq!(file.magic(), Magic::Pwri);
    assert_eq!(file_threshold(&file).unwrap(), None);
    let eps = file
        .get_arch_f32("attention.layer_norm_rms_epsilon")
        .unwrap();
    let preds = load_predictors_auto(&file).unwrap();
    assert_eq!(preds.len(), 3);
    let pool = ThreadPool::new(2);
    let mut rng = Rng(12);
    let mut scratch = PredictorScratch::new();
    let mut active = Vec::new();
    let (mut checked, mut skipped) = (0usize, 0usize);
    for (layer, p) in preds.iter().enumerate() {
        let n_embd = p.n_embd();
        assert_eq!((n_embd, p.hidden(), p.n_ff()), (64, 128, 1024));
        let gate_t = file
            .tensor(&format!("blk.{layer}.ffn_gate.weight"))
            .unwrap();
        let gate = dequant(gate_t.ty, file.tensor_data(gate_t), 1024 * n_embd);
        let norm_t = file
            .tensor(&format!("blk.{layer}.ffn_norm.weight"))
            .unwrap();
        let norm = dequant(norm_t.ty, file.tensor_data(norm_t), n_embd);
        for _ in 0..20 {
            let amp = 0.1 + 3.0 * rng.sym().abs();
            let x: Vec<f32> = rng.vec(n_embd).iter().map(|v| v * amp).collect();
            p.predict(&pool, &x, 0.0, &mut scratch, &mut active)
                .unwrap();
            let ms = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n_embd as f64;
            let s = 1.0 / (ms + f64::from(eps)).sqrt();
            let xn: Vec<f64> = x
                .iter()
                .zip(&norm)
                .map(|(&v, &w)| f64::from(v) * s * f64::from(w))
                .collect();
            for i in 0..1024 {
                let row = &gate[i * n_embd..(i + 1) * n_embd];
                let g: f64 = row.iter().zip(&xn).map(|(&a, &b)| f64::from(a) * b).sum();
                let mag: f64 = row
                    .iter()
                    .zip(&xn)
                    .map(|(&a, &b)| (f64::from(a) * b).abs())
                    .sum();
                let predicted = active.binary_search(&(i as u32)).is_ok();
                if g.abs() <= 0.002 * mag {
                    skipped += 1;
                    continue;
                }
                checked += 1;
                assert_eq!(
                    predicted,
                    g > 0.0,
                    "layer {layer} neuron {i}: gate pre-activation {g}, predicted {predicted}"
                );
            }
        }
    }
    assert!(skipped * 40 < checked, "{skipped} near-zero of {checked}");
}

#[test]
fn loads_the_reference_files() {
    for (name, ty, thr) in [
        (
            "tiny-relu-llama.random-pred.f16.powerinfer.gguf",
            GgmlType::F16,
            Some(0.1f32),
        ),
        (
            "tiny-relu-llama.random-pred.q4_0.powerinfer.gguf",
            GgmlType::Q4_0,
            Some(0.1),
        ),
    ] {
        let Some(file) = open_fixture(name) else {
            return;
        };
        assert_eq!(file_threshold(&file).unwrap(), thr);
        let preds = load_predictors(&file, 3, 64, 1024).unwrap();
        let hs: Vec<usize> = preds.iter().map(|p| p.hidden()).collect();
        assert_eq!(hs, [32, 64, 32]);
        assert!(preds.iter().all(|p| p.fc1().ty == ty && p.fc2().ty == ty));
        // Evaluates and agrees with the reference away from the threshold.
        let pool = ThreadPool::new(1);
        let x: Vec<f32> = Rng(13).vec(64);
        let mut scratch = PredictorScratch::new();
        let mut active = Vec::new();
        preds[1]
            .predict(&pool, &x, 0.1, &mut scratch, &mut active)
            .unwrap();
        let want = reference_scores(&preds[1], &x).unwrap();
        let scale = want.iter().map(|v| v.abs()).sum::<f32>() / want.len() as f32;
        let n_clear = want
            .iter()
            .enumerate()
            .filter(|&(_, &v)| (v - 0.1).abs() > 0.05 * scale)
            .map(|(i, &v)| {
                assert_eq!(
                    active.binary_search(&(i as u32)).is_ok(),
                    v >= 0.1,
                    "{name} neuron {i}"
                );
            })
            .count();
        assert!(n_clear > 900, "{name}: {n_clear}");
        // The dense file has no predictors.
        if let Some(dense) = open_fixture("tiny-relu-llama.dense.f16.gguf") {
            assert_eq!(
                load_layer(&dense, 0, 64, 1024).unwrap_err(),
                LoadError::Missing {
                    tensor: "blk.0.fc1.weight".into()
                }
            );
        }
    }
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 * 0.01).to_le_bytes())
        .collect()
}

fn file_with(tensors: &[(&str, GgmlType, Vec<u64>)]) -> GgufFile {
    let mut w = GgufWriter::new(Magic::Pwri);
    w.add_kv("general.architecture", Value::from("llama"))
        .unwrap();
    w.add_kv("powerinfer.sparse_threshold", Value::F32(0.25))
        .unwrap();
    for (name, ty, shape) in tensors {
        let n: u64 = shape.iter().product();
        let bytes = ty.bytes_for(n).unwrap() as usize;
        let data = if *ty == GgmlType::F32 {
            f32_bytes(n as usize)
        } else {
            vec![0u8; bytes]
        };
        w.add_tensor(*name, *ty, shape, data).unwrap();
    }
    GgufFile::from_bytes(w.write_to_vec().unwrap()).unwrap()
}

#[test]
fn load_errors_name_the_tensor() {
    use GgmlType::{F32, I32};
    let ok = file_with(&[
        ("blk.0.fc1.weight", F32, vec![8, 4]),
        ("blk.0.fc2.weight", F32, vec![4, 16]),
    ]);
    assert_eq!(file_threshold(&ok).unwrap(), Some(0.25));
    let p = load_layer(&ok, 0, 8, 16).unwrap();
    assert_eq!((p.n_embd(), p.hidden(), p.n_ff()), (8, 4, 16));
    let err = load_layer(&ok, 1, 8, 16).unwrap_err();
    assert_eq!(
        err,
        LoadError::Missing {
            tensor: "blk.1.fc1.weight".into()
        }
    );
    // Wrong n_embd, wrong n_ff.
    let e = load_layer(&ok, 0, 9, 16).unwrap_err();
    assert!(
        matches!(&e, LoadError::BadShape { tensor, .. } if tensor == "blk.0.fc1.weight"),
        "{e}"
    );
    let e = load_layer(&ok, 0, 8, 17).unwrap_err();
    assert!(
        matches!(&e, LoadError::BadShape { tensor, .. } if tensor == "blk.0.fc2.weight"),
        "{e}"
    );
    assert!(e.to_string().contains("blk.0.fc2.weight"), "{e}");

    let missing_fc2 = file_with(&[("blk.0.fc1.weight", F32, vec![8, 4])]);
    assert_eq!(
        load_layer(&missing_fc2, 0, 8, 16).unwrap_err(),
        LoadError::Missing {
            tensor: "blk.0.fc2.weight".into()
        }
    );
    // fc2's H disagrees with fc1's.
    let bad_h = file_with(&[
        ("blk.0.fc1.weight", F32, vec![8, 4]),
        ("blk.0.fc2.weight", F32, vec![5, 16]),
    ]);
    let e = load_layer(&bad_h, 0, 8, 16).unwrap_err();
    assert!(
        matches!(&e, LoadError::BadShape { tensor, found, .. } if tensor == "blk.0.fc2.weight" && found == &[5, 16]),
        "{e}"
    );
    // 3-D and 1-D tensors.
    let three_d = file_with(&[
        ("blk.0.fc1.weight", F32, vec![8, 4, 2]),
        ("blk.0.fc2.weight", F32, vec![4, 16]),
    ]);
    assert!(matches!(
        load_layer(&three_d, 0, 8, 16),
        Err(LoadError::BadShape { .. })
    ));
    let one_d = file_with(&[("blk.0.fc1.weight", F32, vec![8])]);
    assert!(matches!(
        load_layer(&one_d, 0, 8, 16),
        Err(LoadError::BadShape { .. })
    ));
    // A type without kernels.
    let ints = file_with(&[
        ("blk.0.fc1.weight", I32, vec![8, 4]),
        ("blk.0.fc2.weight", F32, vec![4, 16]),
    ]);
    assert_eq!(
        load_layer(&ints, 0, 8, 16).unwrap_err(),
        LoadError::UnsupportedType {
            tensor: "blk.0.fc1.weight".into(),
            ty: I32
        }
    );
    // Metadata needed by the automatic loader.
    assert!(matches!(
        load_predictors_auto(&ok),
        Err(LoadError::Metadata(_))
    ));
}

#[test]
fn predictor_input_errors() {
    let fc1 = Weights::from_f32(GgmlType::F32, 4, 8, &[0.5; 32]).unwrap();
    let fc2 = Weights::from_f32(GgmlType::F32, 16, 5, &[0.5; 80]).unwrap();
    assert!(matches!(
        Predictor::new(fc1.clone(), fc2),
        Err(PredictorError::HiddenMismatch {
            fc1_rows: 4,
            fc2_cols: 5
        })
    ));
    let fc2 = Weights::from_f32(GgmlType::F32, 16, 4, &[0.5; 64]).unwrap();
    let p = Predictor::new(fc1, fc2).unwrap();
    let mut s = PredictorScratch::new();
    let mut a = Vec::new();
    let pool = ThreadPool::new(1);
    assert!(matches!(
        p.predict(&pool, &[1.0; 7], 0.0, &mut s, &mut a),
        Err(PredictorError::InputLength {
            expected: 8,
            actual: 7
        })
    ));
    // All-positive weights and input: every neuron scores 0.5*0.5*8*4*... > 0.
    p.predict(&pool, &[1.0; 8], 0.0, &mut s, &mut a).unwrap();
    assert_eq!(a, (0..16).collect::<Vec<u32>>());
    // Negative input: relu zeroes the hidden layer, every score is 0, so threshold 0 keeps all
    // and a positive threshold keeps none.
    p.predict(&pool, &[-1.0; 8], 0.0, &mut s, &mut a).unwrap();
    assert_eq!(a.len(), 16);
    p.predict(&pool, &[-1.0; 8], 1e-6, &mut s, &mut a).unwrap();
    assert!(a.is_empty());
    // Borrowed weights work the same as owned.
    let bytes = f32_bytes(32);
    let m = Matrix::new(GgmlType::F32, 4, 8, &bytes).unwrap();
    assert_eq!(Weights::borrowed(m).matrix().unwrap().data, &bytes[..]);
    assert!(Weights::owned(GgmlType::Q4_0, 1, 32, vec![0; 17]).is_err());
}
