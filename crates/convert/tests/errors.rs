//! Bad input to the converter: clear, typed errors and no output file.

mod common;

use std::path::{Path, PathBuf};

use common::{copy_dir, fixtures, scratch};
use powerinfer_convert::Error;
use powerinfer_convert::convert::{ConvertOptions, convert_hf};
use safetensors::tensor::TensorView;

/// A copy of the fixture's HF directory with `config.json` edited by `edit`.
fn hf_copy(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let hf = dir.join("hf_model");
    copy_dir(&fixtures().join("hf_model"), &hf);
    let path = hf.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    hf
}

fn run(dir: &Path, hf: &Path, pred: Option<&Path>) -> Error {
    let out = dir.join("out.gguf");
    let e = convert_hf(hf, pred, &out, &ConvertOptions::default(), &mut |_| {}).unwrap_err();
    assert!(!out.exists(), "an output file was left behind");
    assert!(!dir.join("out.gguf.partial").exists());
    e
}

/// A tensor to write: name, dtype, shape.
type Spec = (&'static str, safetensors::Dtype, Vec<usize>);

/// Writes a predictor safetensors file with zeros of the given shapes.
fn write_predictor(path: &Path, tensors: &[Spec]) {
    let datas: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dt, s)| vec![0u8; s.iter().product::<usize>() * dt.bitsize() / 8])
        .collect();
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .zip(&datas)
        .map(|((n, dt, s), d)| (n.to_string(), TensorView::new(*dt, s.clone(), d).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn good_layers(dir: &Path, layers: &[usize]) {
    std::fs::create_dir_all(dir).unwrap();
    for &i in layers {
        std::fs::copy(
            fixtures().join(format!("predictor_random/model_{i}.pt")),
            dir.join(format!("model_{i}.pt")),
        )
        .unwrap();
    }
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = scratch("err-arch");
    let hf = hf_copy(&dir, |c| {
        c["architectures"] = serde_json::json!(["GPT2LMHeadModel"])
    });
    let e = run(&dir, &hf, None);
    assert!(
        matches!(&e, Error::UnsupportedArchitecture(a) if a == "GPT2LMHeadModel"),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("unsupported architecture \"GPT2LMHeadModel\""),
        "{e}"
    );
    let hf = hf_copy(&dir, |c| {
        c["architectures"] = serde_json::json!(["MixtralForCausalLM"])
    });
    assert!(
        run(&dir, &hf, None)
            .to_string()
            .contains("MixtralForCausalLM")
    );
}

#[test]
fn unsupported_activation_and_silu_with_predictors() {
    let dir = scratch("err-act");
    let hf = hf_copy(&dir, |c| c["hidden_act"] = serde_json::json!("gelu"));
    let e = run(&dir, &hf, None);
    assert!(
        matches!(&e, Error::UnsupportedActivation(a) if a == "gelu"),
        "{e}"
    );
    let hf = hf_copy(&dir, |c| c["hidden_act"] = serde_json::json!("silu"));
    let e = run(&dir, &hf, Some(&fixtures().join("predictor_random")));
    assert!(matches!(e, Error::Predictor(_)), "{e}");
    assert!(e.to_string().contains("ReLU"), "{e}");
    // SiLU without predictors is a plain GGUF.
    let out = dir.join("silu.gguf");
    convert_hf(&hf, None, &out, &ConvertOptions::default(), &mut |_| {}).unwrap();
}

#[test]
fn missing_predictor_layer() {
    let dir = scratch("err-missing");
    let pred = dir.join("pred");
    good_layers(&pred, &[0, 2]);
    let e = run(&dir, &fixtures().join("hf_model"), Some(&pred));
    assert!(matches!(e, Error::MissingPredictor { layer: 1, .. }), "{e}");
    assert!(e.to_string().contains("model_1.pt"), "{e}");
    // A missing directory.
    let e = run(&dir, &fixtures().join("hf_model"), Some(&dir.join("nope")));
    assert!(matches!(e, Error::MissingFile { .. }), "{e}");
}

#[test]
fn extra_predictor_layer() {
    let dir = scratch("err-extra");
    let pred = dir.join("pred");
    good_layers(&pred, &[0, 1, 2]);
    std::fs::copy(pred.join("model_0.pt"), pred.join("model_3.pt")).unwrap();
    let e = run(&dir, &fixtures().join("hf_model"), Some(&pred));
    assert!(
        e.to_string()
            .contains("layer 3, but the model has 3 layers"),
        "{e}"
    );
}

#[test]
fn mismatched_predictor_shapes() {
    use safetensors::Dtype::F16;
    let dir = scratch("err-shapes");
    let hf = fixtures().join("hf_model");
    let cases: Vec<(Vec<Spec>, &str)> = vec![
        // fc1 for another model width.
        (
            vec![
                ("fc1.weight", F16, vec![32, 48]),
                ("fc2.weight", F16, vec![1024, 32]),
            ],
            "blk.1.fc1.weight: shape [32, 48], expected [32, 64]",
        ),
        // fc2's hidden size differs from fc1's.
        (
            vec![
                ("fc1.weight", F16, vec![32, 64]),
                ("fc2.weight", F16, vec![1024, 16]),
            ],
            "blk.1.fc2.weight: shape [1024, 16], expected [1024, 32]",
        ),
        // fc2 for another FFN size.
        (
            vec![
                ("fc1.weight", F16, vec![32, 64]),
                ("fc2.weight", F16, vec![512, 32]),
            ],
            "blk.1.fc2.weight: shape [512, 32], expected [1024, 32]",
        ),
        // fc1 not a matrix.
        (
            vec![
                ("fc1.weight", F16, vec![64]),
                ("fc2.weight", F16, vec![1024, 32]),
            ],
            "blk.1.fc1.weight: shape [64]",
        ),
        // Unexpected and missing tensors, an unsupported dtype.
        (
            vec![
                ("fc1.weight", F16, vec![32, 64]),
                ("fc1.bias", F16, vec![32]),
            ],
            "unexpected tensor \"fc1.bias\"",
        ),
        (
            vec![("fc1.weight", F16, vec![32, 64])],
            "missing tensor fc2.weight",
        ),
        (
            vec![
                ("fc1.weight", safetensors::Dtype::I32, vec![32, 64]),
                ("fc2.weight", F16, vec![1024, 32]),
            ],
            "unsupported dtype I32",
        ),
    ];
    for (i, (tensors, want)) in cases.into_iter().enumerate() {
        let pred = dir.join(format!("pred{i}"));
        good_layers(&pred, &[0, 2]);
        write_predictor(&pred.join("model_1.safetensors"), &tensors);
        let e = run(&dir, &hf, Some(&pred));
        assert!(e.to_string().contains(want), "case {i}: {e}");
    }
}

#[test]
fn damaged_inputs() {
    let dir = scratch("err-damaged");
    // A truncated predictor pickle.
    let pred = dir.join("pred");
    good_layers(&pred, &[0, 1, 2]);
    let p1 = pred.join("model_1.pt");
    let b = std::fs::read(&p1).unwrap();
    std::fs::write(&p1, &b[..b.len() / 2]).unwrap();
    let e = run(&dir, &fixtures().join("hf_model"), Some(&pred));
    assert!(matches!(e, Error::Pt { .. }), "{e}");
    assert!(e.to_string().contains("model_1.pt"), "{e}");
    // Vocabulary size disagreeing with the tokenizer.
    let hf = hf_copy(&dir, |c| c["vocab_size"] = serde_json::json!(1000));
    let e = run(&dir, &hf, None);
    assert!(
        matches!(
            e,
            Error::VocabMismatch {
                model: 1000,
                tokenizer: 1024
            }
        ),
        "{e}"
    );
    // No tokenizer.
    let hf = hf_copy(&dir, |_| {});
    std::fs::remove_file(hf.join("tokenizer.model")).unwrap();
    let e = run(&dir, &hf, None);
    assert!(matches!(e, Error::MissingFile { .. }), "{e}");
    // A damaged tokenizer.
    let hf = hf_copy(&dir, |_| {});
    let t = std::fs::read(hf.join("tokenizer.model")).unwrap();
    std::fs::write(hf.join("tokenizer.model"), &t[..t.len() - 3]).unwrap();
    let e = run(&dir, &hf, None);
    assert!(matches!(e, Error::Tokenizer { .. }), "{e}");
    // No config.json, a malformed one, a missing field.
    let hf = hf_copy(&dir, |_| {});
    std::fs::write(hf.join("config.json"), "{ not json").unwrap();
    assert!(matches!(run(&dir, &hf, None), Error::Config { .. }));
    let hf = hf_copy(&dir, |c| {
        c.as_object_mut().unwrap().remove("intermediate_size");
    });
    let e = run(&dir, &hf, None);
    assert!(e.to_string().contains("intermediate_size"), "{e}");
    // A model whose weights do not match its config.
    let hf = hf_copy(&dir, |c| c["intermediate_size"] = serde_json::json!(512));
    let e = run(&dir, &hf, None);
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
    // No weights at all.
    let hf = hf_copy(&dir, |_| {});
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    let e = run(&dir, &hf, None);
    assert!(matches!(e, Error::MissingFile { .. }), "{e}");
    // A legacy (non-zip) PyTorch file as the model.
    let hf = hf_copy(&dir, |_| {});
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    std::fs::write(
        hf.join("pytorch_model.bin"),
        b"\x80\x02\x8a\x0alZ\xfc\x9cF\xf9 j\xa8P\x19.",
    )
    .unwrap();
    let e = run(&dir, &hf, None);
    assert!(e.to_string().contains("legacy (non-zip) PyTorch"), "{e}");
    // A truncated safetensors file.
    let hf = hf_copy(&dir, |_| {});
    let m = std::fs::read(hf.join("model.safetensors")).unwrap();
    std::fs::write(hf.join("model.safetensors"), &m[..m.len() - 1]).unwrap();
    let e = run(&dir, &hf, None);
    assert!(matches!(e, Error::Safetensors { .. }), "{e}");
}
