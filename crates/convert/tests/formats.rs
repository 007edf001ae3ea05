//! The fixture's checkpoint re-packed as a PyTorch `pytorch_model.bin` (written by a pickle
//! builder here, with strided views and memo references) and as sharded safetensors: the
//! conversion must still give the reference file byte for byte.

mod common;

use std::io::Write;
use std::path::Path;

use common::{assert_same_file, copy_dir, fixtures, scratch};
use powerinfer_convert::checkpoint::read_tensors;
use powerinfer_convert::convert::{ConvertOptions, convert_hf};
use powerinfer_convert::{DType, Tensor};
use safetensors::tensor::TensorView;

fn binint(p: &mut Vec<u8>, v: usize) {
    p.push(b'J');
    p.extend_from_slice(&(v as i32).to_le_bytes());
}

fn unicode(p: &mut Vec<u8>, s: &str) {
    p.push(b'X');
    p.extend_from_slice(&(s.len() as u32).to_le_bytes());
    p.extend_from_slice(s.as_bytes());
}

/// A `torch.save`-style zip of F16 tensors. Matrices whose name contains `down_proj` are
/// stored transposed in their storage and described by a column-major view (strides
/// `[1, rows]`); the others are contiguous, with a storage offset of 3 elements.
fn write_pt(path: &Path, tensors: &[Tensor]) {
    let mut p = vec![0x80, 2];
    p.extend_from_slice(b"ccollections\nOrderedDict\nq\x00)R(");
    let mut storages: Vec<Vec<u8>> = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        assert_eq!(t.dtype, DType::F16);
        unicode(&mut p, &t.name);
        if i == 0 {
            p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\nq\x01");
        } else {
            p.extend_from_slice(b"h\x01"); // BINGET the memoized function
        }
        let transposed = t.name.contains("down_proj") && t.shape.len() == 2;
        let (offset, strides, storage) = if transposed {
            let (r, c) = (t.shape[0], t.shape[1]);
            let mut s = vec![0u8; t.data.len()];
            for i in 0..r {
                for j in 0..c {
                    let src = (i * c + j) * 2;
                    let dst = (j * r + i) * 2;
                    s[dst..dst + 2].copy_from_slice(&t.data[src..src + 2]);
                }
            }
            (0, vec![1, r], s)
        } else {
            let mut strides = vec![1usize; t.shape.len()];
            for d in (0..t.shape.len().saturating_sub(1)).rev() {
                strides[d] = strides[d + 1] * t.shape[d + 1];
            }
            let mut s = vec![0xAB; 6]; // 3 elements before the tensor
            s.extend_from_slice(&t.data);
            (3, strides, s)
        };
        p.extend_from_slice(b"((");
        unicode(&mut p, "storage");
        p.extend_from_slice(b"ctorch\nHalfStorage\n");
        unicode(&mut p, &i.to_string());
        unicode(&mut p, "cpu");
        binint(&mut p, storage.len() / 2);
        p.extend_from_slice(b"tQ");
        binint(&mut p, offset);
        p.push(b'(');
        for &d in &t.shape {
            binint(&mut p, d);
        }
        p.extend_from_slice(b"t(");
        for &d in &strides {
            binint(&mut p, d);
        }
        p.extend_from_slice(b"t\x89h\x00)RtR");
        storages.push(storage);
    }
    p.extend_from_slice(b"u.");
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let o =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("pytorch_model/data.pkl", o).unwrap();
    z.write_all(&p).unwrap();
    z.start_file("pytorch_model/byteorder", o).unwrap();
    z.write_all(b"little").unwrap();
    for (i, s) in storages.iter().enumerate() {
        z.start_file(format!("pytorch_model/data/{i}"), o).unwrap();
        z.write_all(s).unwrap();
    }
    z.start_file("pytorch_model/version", o).unwrap();
    z.write_all(b"3\n").unwrap();
    z.finish().unwrap();
}

fn write_st(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                TensorView::new(safetensors::Dtype::F16, t.shape.clone(), &t.data).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn hf_without_weights(dir: &Path) -> std::path::PathBuf {
    let hf = dir.join("hf_model");
    copy_dir(&fixtures().join("hf_model"), &hf);
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    hf
}

#[test]
fn pytorch_bin_with_strided_views_matches_reference() {
    let dir = scratch("fmt-bin");
    let tensors = read_tensors(&fixtures().join("hf_model/model.safetensors")).unwrap();
    let hf = hf_without_weights(&dir);
    write_pt(&hf.join("pytorch_model.bin"), &tensors);
    // The reader undoes the strides and offsets.
    let back = read_tensors(&hf.join("pytorch_model.bin")).unwrap();
    assert_eq!(back, tensors);
    let out = dir.join("m.gguf");
    convert_hf(
        &hf,
        Some(&fixtures().join("predictor_random")),
        &out,
        &ConvertOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_same_file(
        &out,
        &fixtures().join("tiny-relu-llama.random-pred.f16.powerinfer.gguf"),
    );
}

#[test]
fn sharded_safetensors_match_reference() {
    let dir = scratch("fmt-shards");
    let tensors = read_tensors(&fixtures().join("hf_model/model.safetensors")).unwrap();
    let hf = hf_without_weights(&dir);
    let (a, b) = tensors.split_at(13);
    write_st(&hf.join("model-00001-of-00002.safetensors"), a);
    write_st(&hf.join("model-00002-of-00002.safetensors"), b);
    let out = dir.join("m.gguf");
    convert_hf(&hf, None, &out, &ConvertOptions::default(), &mut |_| {}).unwrap();
    assert_same_file(&out, &fixtures().join("tiny-relu-llama.dense.f16.gguf"));
    // A tensor present in two shards is refused.
    write_st(&hf.join("model-00002-of-00002.safetensors"), &tensors[12..]);
    let e = convert_hf(&hf, None, &out, &ConvertOptions::default(), &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("appears more than once"), "{e}");
}
