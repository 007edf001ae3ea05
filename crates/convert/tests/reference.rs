//! Acceptance tests: conversion and quantization of the tiny fixture reproduce the reference
//! PowerInfer tools' output files.

mod common;

use std::path::Path;

use common::{assert_same_file, differences, fixtures, scratch};
use powerinfer_convert::convert::{ConvertOptions, OutType, convert_hf};
use powerinfer_convert::quantize::{FileType, QuantizeOptions, plan_types, quantize_file};
use powerinfer_gguf::{GgmlType, GgufFile, Magic, Value};

fn convert(pred: Option<&str>, out: &Path, opts: &ConvertOptions) {
    let fx = fixtures();
    let pred = pred.map(|p| fx.join(p));
    let mut calls = 0;
    let r = convert_hf(&fx.join("hf_model"), pred.as_deref(), out, opts, &mut |p| {
        calls += 1;
        assert_eq!(p.done, calls);
    })
    .unwrap();
    assert_eq!(calls, r.n_tensors);
    assert_eq!(std::fs::metadata(out).unwrap().len(), r.file_size);
}

#[test]
fn random_predictors_from_pt_match_reference() {
    let out = scratch("random-pt").join("m.gguf");
    convert(Some("predictor_random"), &out, &ConvertOptions::default());
    assert_same_file(
        &out,
        &fixtures().join("tiny-relu-llama.random-pred.f16.powerinfer.gguf"),
    );
}

#[test]
fn random_predictors_from_safetensors_match_reference() {
    let dir = scratch("random-st");
    let reference = fixtures().join("tiny-relu-llama.random-pred.f16.powerinfer.gguf");
    // The safetensors directory has no config.json, hence no threshold key...
    let out = dir.join("m.gguf");
    convert(
        Some("predictor_random_safetensors"),
        &out,
        &ConvertOptions::default(),
    );
    let d = differences(&out, &reference);
    assert!(!d.is_empty());
    assert!(
        d.iter()
            .all(|x| x.starts_with("keys ") || x.contains("powerinfer.sparse_threshold")),
        "{d:?}"
    );
    assert!(
        GgufFile::open(&out)
            .unwrap()
            .get("powerinfer.sparse_threshold")
            .is_none()
    );
    // ...and with the threshold given, the file is the reference's.
    let out = dir.join("m2.gguf");
    let opts = ConvertOptions {
        sparse_threshold: Some(0.1),
        ..Default::default()
    };
    convert(Some("predictor_random_safetensors"), &out, &opts);
    assert_same_file(&out, &reference);
}

#[test]
fn oracle_predictors_match_reference() {
    let dir = scratch("oracle");
    let reference = fixtures().join("tiny-relu-llama.oracle-pred.f16.powerinfer.gguf");
    let out = dir.join("pt.gguf");
    convert(Some("predictor_oracle"), &out, &ConvertOptions::default());
    assert_same_file(&out, &reference);
    let out = dir.join("st.gguf");
    convert(
        Some("predictor_oracle_safetensors"),
        &out,
        &ConvertOptions::default(),
    );
    assert_same_file(&out, &reference);
}

#[test]
fn dense_matches_reference() {
    let out = scratch("dense").join("m.gguf");
    convert(None, &out, &ConvertOptions::default());
    assert_same_file(&out, &fixtures().join("tiny-relu-llama.dense.f16.gguf"));
}

/// The F32 reference file is described in gguf_dump.json (not shipped): same keys except
/// the file type, every tensor F32 at the recorded offsets, values exactly the F16 ones.
#[test]
fn f32_output_matches_reference_layout() {
    let out = scratch("f32").join("m.gguf");
    let opts = ConvertOptions {
        outtype: OutType::F32,
        ..Default::default()
    };
    convert(Some("predictor_random"), &out, &opts);
    let dump: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("gguf_dump.json")).unwrap())
            .unwrap();
    let entry = dump
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["file"]
                .as_str()
                .unwrap()
                .ends_with("random-pred.f32.powerinfer.gguf")
        })
        .unwrap();
    let f = GgufFile::open(&out).unwrap();
    assert_eq!(f.magic(), Magic::Pwri);
    assert_eq!(f.file_size(), entry["size"].as_u64().unwrap());
    let keys: Vec<&str> = entry["kv"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .filter(|k| !k.starts_with("GGUF."))
        .collect();
    let ours: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(ours, keys);
    assert_eq!(f.get("general.file_type"), Some(&Value::U32(0)));
    let tensors = entry["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), f.tensors().len());
    let f16 =
        GgufFile::open(fixtures().join("tiny-relu-llama.random-pred.f16.powerinfer.gguf")).unwrap();
    for (t, r) in f.tensors().iter().zip(tensors) {
        assert_eq!(t.name, r["name"].as_str().unwrap());
        assert_eq!(t.ty, GgmlType::F32);
        assert_eq!(t.offset, r["data_offset"].as_u64().unwrap(), "{}", t.name);
        let h = f16.tensor(&t.name).unwrap();
        let want: Vec<f32> = if h.ty == GgmlType::F16 {
            f16.tensor_data(h)
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect()
        } else {
            f16.tensor_data(h)
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let got: Vec<f32> = f
            .tensor_data(t)
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert!(
            want.iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{}",
            t.name
        );
    }
}

#[test]
fn q4_0_matches_reference_quantizer() {
    let fx = fixtures();
    let dir = scratch("q4_0");
    let out = dir.join("q.gguf");
    let r = quantize_file(
        &fx.join("tiny-relu-llama.random-pred.f16.powerinfer.gguf"),
        &out,
        &QuantizeOptions::new(FileType::Q4_0),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(r.n_tensors, 36);
    assert_eq!(r.n_quantized, 36 - 7); // the 7 norms stay F32
    assert_same_file(
        &out,
        &fx.join("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf"),
    );
    // Single-threaded gives the same bytes.
    let out1 = dir.join("q1.gguf");
    let mut o = QuantizeOptions::new(FileType::Q4_0);
    o.threads = 1;
    quantize_file(
        &fx.join("tiny-relu-llama.random-pred.f16.powerinfer.gguf"),
        &out1,
        &o,
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&out1).unwrap());
}

#[test]
fn convert_then_quantize_matches_reference() {
    let dir = scratch("pipeline");
    let f16 = dir.join("f16.gguf");
    convert(Some("predictor_random"), &f16, &ConvertOptions::default());
    let q = dir.join("q.gguf");
    quantize_file(&f16, &q, &QuantizeOptions::new(FileType::Q4_0), &mut |_| {}).unwrap();
    assert_same_file(
        &q,
        &fixtures().join("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf"),
    );
}

/// The type rules on the tiny model (every row length is 64 or 32, never a multiple of 256):
/// K-quants fall back, predictors get Q5_0 unless the file is Q4_0, output.weight Q8_0.
#[test]
fn type_rules_on_tiny_model() {
    let f =
        GgufFile::open(fixtures().join("tiny-relu-llama.random-pred.f16.powerinfer.gguf")).unwrap();
    let dense = GgufFile::open(fixtures().join("tiny-relu-llama.dense.f16.gguf")).unwrap();
    use GgmlType as G;
    let cases = [
        (FileType::Q8_0, G::Q8_0, G::Q8_0, G::Q8_0),
        (FileType::Q4_1, G::Q4_1, G::Q4_1, G::Q4_1),
        (FileType::Q5_1, G::Q5_1, G::Q5_1, G::Q5_1),
        (FileType::Q4_K_S, G::Q5_0, G::Q5_0, G::Q5_1),
        (FileType::Q4_K_M, G::Q5_0, G::Q5_0, G::Q8_0),
        (FileType::Q5_K_M, G::Q5_1, G::Q5_1, G::Q8_0),
        (FileType::Q6_K, G::Q8_0, G::Q8_0, G::Q8_0),
    ];
    for (ft, gate, down_t, v2) in cases {
        let opts = QuantizeOptions::new(ft);
        let (types, fallback) = plan_types(&f, &opts).unwrap();
        let ty = |name: &str| types[f.tensors().iter().position(|t| t.name == name).unwrap()];
        assert_eq!(ty("output.weight"), G::Q8_0, "{ft}");
        assert_eq!(ty("blk.0.attn_norm.weight"), G::F32, "{ft}");
        assert_eq!(ty("blk.1.ffn_gate.weight"), gate, "{ft}");
        assert_eq!(ty("blk.1.ffn_down_t.weight"), down_t, "{ft}");
        assert_eq!(ty("blk.2.attn_v.weight"), v2, "{ft}");
        assert_eq!(
            ty("blk.0.attn_v.weight"),
            if ft == FileType::Q4_K_S {
                G::Q5_1
            } else {
                gate
            },
            "{ft}"
        );
        assert_eq!(ty("blk.2.fc1.weight"), G::Q5_0, "{ft}");
        assert_eq!(ty("blk.2.fc2.weight"), G::Q5_0, "{ft}");
        let k = matches!(ft.base_type(), G::Q4_K | G::Q5_K | G::Q6_K);
        assert_eq!(fallback > 0, k, "{ft}");
        // The dense file: ffn_down takes the K-mix (of 3 layers, layer 2 uses more bits).
        let (dt, _) = plan_types(&dense, &opts).unwrap();
        let dty = |name: &str| dt[dense.tensors().iter().position(|t| t.name == name).unwrap()];
        if ft == FileType::Q4_K_M {
            // Rows of 1024: real K-quants, no fallback.
            assert_eq!(dty("blk.0.ffn_down.weight"), G::Q4_K);
            assert_eq!(dty("blk.1.ffn_down.weight"), G::Q4_K);
            assert_eq!(dty("blk.2.ffn_down.weight"), G::Q6_K);
        }
    }
    // --pure: the base type everywhere it can go.
    let mut o = QuantizeOptions::new(FileType::Q8_0);
    o.pure = true;
    let (types, _) = plan_types(&f, &o).unwrap();
    assert!(
        f.tensors()
            .iter()
            .zip(&types)
            .all(|(t, &ty)| ty == if t.shape.len() == 2 { G::Q8_0 } else { G::F32 })
    );
    // Rows that are not a multiple of 256 cannot be K-quants even in a pure file: pure Q4_K
    // puts every matrix of the tiny model (rows of 64 or 32) in Q4_K's fallback, Q5_0.
    let mut o = QuantizeOptions::new(FileType::Q4_K_M);
    o.pure = true;
    let (types, fallback) = plan_types(&f, &o).unwrap();
    assert!(
        f.tensors()
            .iter()
            .zip(&types)
            .all(|(t, &ty)| ty == if t.shape.len() == 2 { G::Q5_0 } else { G::F32 })
    );
    assert_eq!(fallback, types.iter().filter(|&&t| t == G::Q5_0).count());
}

/// Every K-quant and legacy type quantizes the fixture to the planned types, and each
/// quantized tensor equals quantizing the F16 values row by row with powerinfer-quant.
#[test]
fn quantized_data_equals_row_quantizer() {
    let fx = fixtures();
    let src_path = fx.join("tiny-relu-llama.random-pred.f16.powerinfer.gguf");
    let src = GgufFile::open(&src_path).unwrap();
    let dir = scratch("types");
    let dense_path = fx.join("tiny-relu-llama.dense.f16.gguf");
    let dense = GgufFile::open(&dense_path).unwrap();
    let cases = [
        FileType::Q8_0,
        FileType::Q4_K_M,
        FileType::Q5_K_S,
        FileType::Q6_K,
        FileType::Q5_1,
    ];
    for (ft, (src_path, src)) in cases
        .into_iter()
        .flat_map(|ft| [(ft, (&src_path, &src)), (ft, (&dense_path, &dense))])
    {
        let out = dir.join(format!("{ft}.gguf"));
        quantize_file(src_path, &out, &QuantizeOptions::new(ft), &mut |_| {}).unwrap();
        let q = GgufFile::open(&out).unwrap();
        assert_eq!(q.magic(), src.magic());
        assert_eq!(q.get("general.file_type"), Some(&Value::U32(ft.id())));
        assert_eq!(q.get("general.quantization_version"), Some(&Value::U32(2)));
        let (types, _) = plan_types(src, &QuantizeOptions::new(ft)).unwrap();
        for ((t, s), &ty) in q.tensors().iter().zip(src.tensors()).zip(&types) {
            assert_eq!(t.ty, ty);
            if ty == s.ty {
                assert_eq!(q.tensor_data(t), src.tensor_data(s));
                continue;
            }
            let n = s.shape[0] as usize;
            let mut row = vec![0f32; n];
            let mut want = Vec::new();
            for r in src.tensor_data(s).chunks(n * 2) {
                powerinfer_quant::dequantize_row(s.ty, r, &mut row).unwrap();
                let mut b = vec![0u8; powerinfer_quant::row_bytes(ty, n).unwrap()];
                powerinfer_convert::quantize::quantize_row_fused(ty, &row, &mut b).unwrap();
                want.extend(b);
            }
            assert_eq!(q.tensor_data(t), &want[..], "{ft} {}", t.name);
        }
    }
}

#[test]
fn requantizing_needs_permission() {
    let fx = fixtures();
    let dir = scratch("requant");
    let q4 = fx.join("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf");
    let e = quantize_file(
        &q4,
        &dir.join("a.gguf"),
        &QuantizeOptions::new(FileType::Q8_0),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("requantizing"), "{e}");
    assert!(!dir.join("a.gguf").exists());
    let mut o = QuantizeOptions::new(FileType::Q8_0);
    o.allow_requantize = true;
    quantize_file(&q4, &dir.join("b.gguf"), &o, &mut |_| {}).unwrap();
    let f = GgufFile::open(dir.join("b.gguf")).unwrap();
    assert_eq!(f.tensor("blk.0.ffn_up.weight").unwrap().ty, GgmlType::Q8_0);
    // Same-type tensors (output.weight is already Q8_0) are copied, not requantized.
    let src = GgufFile::open(&q4).unwrap();
    assert_eq!(
        f.tensor_bytes("output.weight"),
        src.tensor_bytes("output.weight")
    );
}

/// Rewrites the fixture's F16 checkpoint with every tensor as `dtype` (F32: exact; BF16:
/// rounded), returning the new HF directory.
fn hf_with_dtype(dir: &Path, dtype: safetensors::Dtype) -> std::path::PathBuf {
    let hf = dir.join("hf_model");
    common::copy_dir(&fixtures().join("hf_model"), &hf);
    let tensors =
        powerinfer_convert::checkpoint::read_tensors(&hf.join("model.safetensors")).unwrap();
    let datas: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| {
            let f = t.to_f32().unwrap();
            match dtype {
                safetensors::Dtype::F32 => f.iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => f
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes())
                    .collect(),
            }
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&datas)
        .map(|(t, d)| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(dtype, t.shape.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(
        hf.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    hf
}

#[test]
fn f32_and_bf16_checkpoints() {
    let dir = scratch("dtypes");
    // F32 weights holding the same (F16-representable) values give the reference file.
    let hf = hf_with_dtype(&dir.join("f32"), safetensors::Dtype::F32);
    let out = dir.join("from-f32.gguf");
    let pred = fixtures().join("predictor_random");
    convert_hf(
        &hf,
        Some(&pred),
        &out,
        &ConvertOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_same_file(
        &out,
        &fixtures().join("tiny-relu-llama.random-pred.f16.powerinfer.gguf"),
    );
    // BF16 weights: F32 output holds exactly the BF16 values (ffn_down transposed).
    let hf = hf_with_dtype(&dir.join("bf16"), safetensors::Dtype::BF16);
    let out = dir.join("from-bf16.gguf");
    let opts = ConvertOptions {
        outtype: OutType::F32,
        ..Default::default()
    };
    convert_hf(&hf, Some(&pred), &out, &opts, &mut |_| {}).unwrap();
    let f = GgufFile::open(&out).unwrap();
    let src = powerinfer_convert::checkpoint::read_tensors(&hf.join("model.safetensors")).unwrap();
    let up = src
        .iter()
        .find(|t| t.name == "model.layers.1.mlp.up_proj.weight")
        .unwrap();
    let down = src
        .iter()
        .find(|t| t.name == "model.layers.1.mlp.down_proj.weight")
        .unwrap();
    let read = |name: &str| -> Vec<f32> {
        f.tensor_bytes(name)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    assert_eq!(read("blk.1.ffn_up.weight"), up.to_f32().unwrap());
    let (rows, cols) = (down.shape[0], down.shape[1]);
    let d = down.to_f32().unwrap();
    let t = read("blk.1.ffn_down_t.weight");
    for r in 0..rows {
        for c in 0..cols {
            assert_eq!(t[c * rows + r], d[r * cols + c]);
        }
    }
}

#[test]
fn special_tokens_from_tokenizer_json() {
    let dir = scratch("special");
    let hf = dir.join("hf_model");
    common::copy_dir(&fixtures().join("hf_model"), &hf);
    std::fs::write(
        hf.join("tokenizer.json"),
        r#"{"added_tokens": [{"id": 0, "content": "<unk>"}, {"id": 1, "content": "<s>"},
            {"id": 2, "content": "</s>"}]}"#,
    )
    .unwrap();
    let out = dir.join("m.gguf");
    convert_hf(&hf, None, &out, &ConvertOptions::default(), &mut |_| {}).unwrap();
    let f = GgufFile::open(&out).unwrap();
    let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        &keys[keys.len() - 5..],
        [
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
        ]
    );
    assert_eq!(
        f.get("tokenizer.ggml.unknown_token_id"),
        Some(&Value::U32(0))
    );
    assert_eq!(
        f.get("tokenizer.ggml.add_bos_token"),
        Some(&Value::Bool(true))
    );
    assert_eq!(
        f.get("tokenizer.ggml.add_eos_token"),
        Some(&Value::Bool(false))
    );
}
