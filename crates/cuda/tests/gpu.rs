//! Kernels against CPU references on random inputs of awkward sizes.
//!
//! Every test builds its inputs and CPU reference first (so that part runs everywhere), then
//! needs a GPU: without one it prints why and passes, unless `POWERINFER_REQUIRE_GPU=1`, which
//! turns a missing GPU into a failure. Outputs are poisoned (NaN) before each launch.
#![cfg(feature = "cuda")]

mod common;

use common::{Rng, gpu_or_skip, matvec_ref, random_matrix, rel_err};
use powerinfer_cuda::{Activation, AttnShape, CudaError, GPU_TYPES, Gpu, RopeKind};
use powerinfer_quant::{GgmlType, f16};

const TOL: f64 = 1e-5;

fn cols_for(ty: GgmlType, blocks: usize) -> usize {
    match ty {
        // Lengths that are not a multiple of 32 exercise the tail path.
        GgmlType::F32 | GgmlType::F16 => 32 * blocks + 13,
        _ => ty.block_size() * blocks,
    }
}

#[test]
fn no_gpu_is_a_typed_error_not_a_panic() {
    match Gpu::new(0) {
        Ok(g) => eprintln!("GPU present: {} {}", g.name(), g.arch()),
        Err(e) => {
            eprintln!("Gpu::new(0) -> {e}");
            assert!(matches!(
                e,
                CudaError::NoDriver
                    | CudaError::NoNvrtc
                    | CudaError::NoDevice { .. }
                    | CudaError::Driver { .. }
            ));
        }
    }
    // An ordinal past the last device is a NoDevice error wherever a driver exists.
    match Gpu::new(4096) {
        Ok(_) => panic!("device 4096 cannot exist"),
        Err(e) => assert!(!matches!(e, CudaError::Compile { .. }), "{e}"),
    }
}

#[test]
fn dense_matvec_all_types() {
    let mut rng = Rng(0x5eed_0001);
    let mut cases = Vec::new();
    for &ty in GPU_TYPES {
        for (rows, blocks) in [(1usize, 1usize), (37, 3), (133, 7)] {
            let cols = cols_for(ty, blocks);
            let (bytes, deq) = random_matrix(&mut rng, ty, rows, cols);
            let x = rng.vec(cols, 1.0);
            let want = matvec_ref(&deq, cols, &x);
            cases.push((ty, rows, cols, bytes, x, want));
        }
    }
    let Some(gpu) = gpu_or_skip("dense_matvec_all_types") else {
        return;
    };
    for (ty, rows, cols, bytes, x, want) in &cases {
        let w = gpu.upload_matrix(*ty, *rows, *cols, bytes).unwrap();
        let xd = gpu.upload(x).unwrap();
        let mut y = gpu.upload(&vec![f32::NAN; *rows]).unwrap();
        gpu.matvec(&w, &xd, &mut y).unwrap();
        let got = gpu.download(&y).unwrap();
        let e = rel_err(&got, want);
        assert!(e < TOL, "{ty:?} {rows}x{cols}: rel err {e}");
        // ReLU epilogue.
        gpu.matvec_relu(&w, &xd, &mut y).unwrap();
        let got = gpu.download(&y).unwrap();
        let want_relu: Vec<f32> = want.iter().map(|v| v.max(0.0)).collect();
        assert!(got.iter().all(|v| *v >= 0.0));
        assert!(rel_err(&got, &want_relu) < TOL, "{ty:?} relu");
    }
}

#[test]
fn predictor_matches_reference() {
    let mut rng = Rng(0x5eed_0002);
    let (n_embd, hidden, n_ff) = (96, 40, 150);
    let (b1, d1) = random_matrix(&mut rng, GgmlType::Q4_0, hidden, n_embd);
    let (b2, d2) = random_matrix(&mut rng, GgmlType::F16, n_ff, hidden);
    let x = rng.vec(n_embd, 1.0);
    let h: Vec<f32> = matvec_ref(&d1, n_embd, &x)
        .into_iter()
        .map(|v| v.max(0.0))
        .collect();
    let want = matvec_ref(&d2, hidden, &h);
    let Some(gpu) = gpu_or_skip("predictor_matches_reference") else {
        return;
    };
    let fc1 = gpu
        .upload_matrix(GgmlType::Q4_0, hidden, n_embd, &b1)
        .unwrap();
    let fc2 = gpu.upload_matrix(GgmlType::F16, n_ff, hidden, &b2).unwrap();
    let xd = gpu.upload(&x).unwrap();
    let mut hd = gpu.upload(&vec![f32::NAN; hidden]).unwrap();
    let mut sd = gpu.upload(&vec![f32::NAN; n_ff]).unwrap();
    gpu.predictor(&fc1, &fc2, &xd, &mut hd, &mut sd).unwrap();
    assert!(rel_err(&gpu.download(&hd).unwrap(), &h) < TOL);
    assert!(rel_err(&gpu.download(&sd).unwrap(), &want) < TOL);
    // Shape mismatch is an error, not a launch.
    assert!(matches!(
        gpu.predictor(&fc2, &fc1, &xd, &mut hd, &mut sd),
        Err(CudaError::Shape { .. })
    ));
}

/// Scores for `n_ff` neurons around `threshold`, with one exactly at it (active) and one NaN
/// (inactive).
fn scores(rng: &mut Rng, n_ff: usize, threshold: f32) -> Vec<f32> {
    let mut s = rng.vec(n_ff, 1.0);
    s[1] = threshold;
    s[2] = f32::NAN;
    s
}

fn active(s: f32, threshold: f32) -> bool {
    s >= threshold
}

/// A sorted random subset of `0..n_ff` of size `k`, always holding neurons 1 and 2.
fn bucket(rng: &mut Rng, n_ff: usize, k: usize) -> Vec<u32> {
    let mut ids: Vec<u32> = vec![1, 2];
    while ids.len() < k {
        let i = rng.below(n_ff) as u32;
        if !ids.contains(&i) {
            ids.push(i);
        }
    }
    ids.sort_unstable();
    ids
}

#[test]
fn sparse_matvec_respects_the_predictor() {
    let mut rng = Rng(0x5eed_0003);
    let threshold = 0.1;
    let n_ff = 300;
    let mut cases = Vec::new();
    for &ty in GPU_TYPES {
        let cols = cols_for(ty, 3);
        let k = 77;
        let ids = bucket(&mut rng, n_ff, k);
        let (bytes, deq) = random_matrix(&mut rng, ty, k, cols);
        let x = rng.vec(cols, 1.0);
        let s = scores(&mut rng, n_ff, threshold);
        let dense = matvec_ref(&deq, cols, &x);
        let want: Vec<f32> = ids
            .iter()
            .zip(&dense)
            .map(|(&n, &v)| {
                if active(s[n as usize], threshold) {
                    v
                } else {
                    0.0
                }
            })
            .collect();
        cases.push((ty, cols, ids, bytes, x, s, want));
    }
    let Some(gpu) = gpu_or_skip("sparse_matvec_respects_the_predictor") else {
        return;
    };
    for (ty, cols, ids, bytes, x, s, want) in &cases {
        let k = ids.len();
        let w = gpu.upload_matrix(*ty, k, *cols, bytes).unwrap();
        let b = gpu.upload_bucket(ids, n_ff).unwrap();
        let xd = gpu.upload(x).unwrap();
        let sd = gpu.upload(s).unwrap();
        let mut y = gpu.upload(&vec![f32::NAN; k]).unwrap();
        gpu.sparse_matvec(&w, &xd, &sd, Some(&b), threshold, &mut y)
            .unwrap();
        let got = gpu.download(&y).unwrap();
        for (j, (&g, &n)) in got.iter().zip(ids.iter()).enumerate() {
            if !active(s[n as usize], threshold) {
                assert_eq!(
                    g.to_bits(),
                    0f32.to_bits(),
                    "{ty:?}: inactive row {j} not exactly 0"
                );
            }
        }
        assert!(
            rel_err(&got, want) < TOL,
            "{ty:?}: rel err {}",
            rel_err(&got, want)
        );
        // Without a bucket the compact row j is neuron j.
        let s_id: Vec<f32> = ids.iter().map(|&n| s[n as usize]).collect();
        let sd_id = gpu.upload(&s_id).unwrap();
        let mut y2 = gpu.upload(&vec![f32::NAN; k]).unwrap();
        gpu.sparse_matvec(&w, &xd, &sd_id, None, threshold, &mut y2)
            .unwrap();
        let got2 = gpu.download(&y2).unwrap();
        assert_eq!(
            got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            got2.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        // Wrong score length is a typed error.
        assert!(matches!(
            gpu.sparse_matvec(&w, &xd, &sd_id, Some(&b), threshold, &mut y2),
            Err(CudaError::Shape { .. })
        ));
    }
}

#[test]
fn sparse_axpy_is_correct_and_deterministic() {
    let mut rng = Rng(0x5eed_0004);
    let threshold = -0.2;
    let n_ff = 500;
    let mut cases = Vec::new();
    for &ty in GPU_TYPES {
        let n_embd = cols_for(ty, 3);
        // 150 compact rows: three chunks of the first phase, the last one partial.
        let k = 150;
        let ids = bucket(&mut rng, n_ff, k);
        let (bytes, deq) = random_matrix(&mut rng, ty, k, n_embd);
        let h = rng.vec(k, 2.0);
        let s = scores(&mut rng, n_ff, threshold);
        let base = rng.vec(n_embd, 1.0);
        let mut want = vec![0f64; n_embd];
        for (j, &n) in ids.iter().enumerate() {
            if active(s[n as usize], threshold) {
                for c in 0..n_embd {
                    want[c] += f64::from(h[j]) * f64::from(deq[j * n_embd + c]);
                }
            }
        }
        let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
        let want_acc: Vec<f32> = want.iter().zip(&base).map(|(a, b)| a + b).collect();
        cases.push((ty, n_embd, ids, bytes, h, s, base, want, want_acc));
    }
    let Some(gpu) = gpu_or_skip("sparse_axpy_is_correct_and_deterministic") else {
        return;
    };
    for (ty, n_embd, ids, bytes, h, s, base, want, want_acc) in &cases {
        let k = ids.len();
        let w = gpu.upload_matrix(*ty, k, *n_embd, bytes).unwrap();
        let b = gpu.upload_bucket(ids, n_ff).unwrap();
        let hd = gpu.upload(h).unwrap();
        let sd = gpu.upload(s).unwrap();
        let mut out = gpu.upload(&vec![f32::NAN; *n_embd]).unwrap();
        gpu.sparse_axpy(&w, &hd, &sd, Some(&b), threshold, &mut out, false)
            .unwrap();
        let first = gpu.download(&out).unwrap();
        assert!(
            rel_err(&first, want) < TOL,
            "{ty:?}: rel err {}",
            rel_err(&first, want)
        );
        gpu.write(&mut out, &vec![f32::NAN; *n_embd]).unwrap();
        gpu.sparse_axpy(&w, &hd, &sd, Some(&b), threshold, &mut out, false)
            .unwrap();
        let second = gpu.download(&out).unwrap();
        assert_eq!(
            first.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            second.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{ty:?}: two runs differ"
        );
        gpu.write(&mut out, base).unwrap();
        gpu.sparse_axpy(&w, &hd, &sd, Some(&b), threshold, &mut out, true)
            .unwrap();
        let acc = gpu.download(&out).unwrap();
        assert!(rel_err(&acc, want_acc) < TOL, "{ty:?}: accumulate");
        // A threshold above every score: exactly zero.
        gpu.sparse_axpy(&w, &hd, &sd, Some(&b), 2.0, &mut out, false)
            .unwrap();
        assert!(gpu.download(&out).unwrap().iter().all(|v| v.to_bits() == 0));
    }
}

#[test]
fn rms_norm_matches_cpu() {
    let mut rng = Rng(0x5eed_0005);
    let n = 1003;
    let x = rng.vec(n, 3.0);
    let w = rng.vec(n, 1.0);
    let mut want = vec![0f32; n];
    powerinfer_cpu::ops::rms_norm(&x, &w, 1e-6, &mut want).unwrap();
    // Per-head rows (QK norm): 7 heads of 72.
    let heads = rng.vec(7 * 72, 2.0);
    let hw = rng.vec(72, 1.0);
    let mut want_heads = heads.clone();
    powerinfer_cpu::ops::rms_norm_rows_inplace(&mut want_heads, &hw, 1e-5).unwrap();
    let Some(gpu) = gpu_or_skip("rms_norm_matches_cpu") else {
        return;
    };
    let (xd, wd) = (gpu.upload(&x).unwrap(), gpu.upload(&w).unwrap());
    let mut out = gpu.upload(&vec![f32::NAN; n]).unwrap();
    gpu.rms_norm(&xd, &wd, 1e-6, &mut out).unwrap();
    assert!(rel_err(&gpu.download(&out).unwrap(), &want) < TOL);
    let (hd, hwd) = (gpu.upload(&heads).unwrap(), gpu.upload(&hw).unwrap());
    let mut out = gpu.upload(&vec![f32::NAN; heads.len()]).unwrap();
    gpu.rms_norm(&hd, &hwd, 1e-5, &mut out).unwrap();
    assert!(rel_err(&gpu.download(&out).unwrap(), &want_heads) < TOL);
}

#[test]
fn rope_matches_cpu_both_kinds() {
    use powerinfer_cpu::ops::{RopeKind as CpuKind, rope_apply, rope_cache};
    let mut rng = Rng(0x5eed_0006);
    let (n_heads, head_dim) = (5, 64);
    let mut cases = Vec::new();
    for (kind, ckind) in [
        (RopeKind::Normal, CpuKind::Normal),
        (RopeKind::Neox, CpuKind::Neox),
    ] {
        for (n_dims, pos) in [(64usize, 17usize), (32, 3), (64, 0)] {
            let x = rng.vec(n_heads * head_dim, 1.0);
            let mut cache = vec![0f32; n_dims];
            rope_cache(pos as f32, 10000.0, 1.0, &mut cache).unwrap();
            let mut want = x.clone();
            rope_apply(&mut want, head_dim, &cache, ckind).unwrap();
            cases.push((kind, n_dims, pos, x, want));
        }
    }
    let Some(gpu) = gpu_or_skip("rope_matches_cpu_both_kinds") else {
        return;
    };
    for (kind, n_dims, pos, x, want) in &cases {
        let mut xd = gpu.upload(x).unwrap();
        gpu.rope(&mut xd, head_dim, *n_dims, *pos, 10000.0, 1.0, *kind)
            .unwrap();
        let got = gpu.download(&xd).unwrap();
        let e = rel_err(&got, want);
        assert!(e < 1e-5, "{kind:?} n_dims {n_dims} pos {pos}: rel err {e}");
    }
}

#[test]
fn glu_variants_match_cpu() {
    use powerinfer_cpu::ops::{gelu_tanh, silu};
    let mut rng = Rng(0x5eed_0007);
    let n = 777;
    let gate = rng.vec(n, 6.0);
    let up = rng.vec(n, 2.0);
    let act = |a: Activation, g: f32| match a {
        Activation::Silu => silu(g),
        Activation::Gelu => gelu_tanh(g),
        Activation::Relu => g.max(0.0),
    };
    let mut cases = Vec::new();
    for a in [Activation::Silu, Activation::Gelu, Activation::Relu] {
        for (with_up, relu_up) in [(true, false), (true, true), (false, false)] {
            let want: Vec<f32> = (0..n)
                .map(|i| {
                    let u = if !with_up {
                        1.0
                    } else if relu_up {
                        up[i].max(0.0)
                    } else {
                        up[i]
                    };
                    act(a, gate[i]) * u
                })
                .collect();
            cases.push((a, with_up, relu_up, want));
        }
    }
    let Some(gpu) = gpu_or_skip("glu_variants_match_cpu") else {
        return;
    };
    let (gd, ud) = (gpu.upload(&gate).unwrap(), gpu.upload(&up).unwrap());
    for (a, with_up, relu_up, want) in &cases {
        let mut out = gpu.upload(&vec![f32::NAN; n]).unwrap();
        gpu.glu(*a, &gd, with_up.then_some(&ud), *relu_up, &mut out)
            .unwrap();
        let got = gpu.download(&out).unwrap();
        assert!(
            rel_err(&got, want) < TOL,
            "{a:?} up {with_up} relu_up {relu_up}"
        );
    }
}

/// f64 reference of decode attention over f16 K/V rows.
fn attention_ref(p: &AttnShape, q: &[f32], k: &[f16], v: &[f16], pos: usize) -> Vec<f32> {
    let (kd, vd) = (p.n_head_kv * p.head_dim_k, p.n_head_kv * p.head_dim_v);
    let first = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let group = p.n_head / p.n_head_kv;
    let mut out = vec![0f32; p.n_head * p.head_dim_v];
    for h in 0..p.n_head {
        let kvh = h / group;
        let s: Vec<f64> = (first..=pos)
            .map(|t| {
                (0..p.head_dim_k)
                    .map(|d| {
                        f64::from(q[h * p.head_dim_k + d])
                            * f64::from(k[t * kd + kvh * p.head_dim_k + d].to_f32())
                    })
                    .sum::<f64>()
                    * f64::from(p.scale)
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        for d in 0..p.head_dim_v {
            let acc: f64 = (first..=pos)
                .zip(&e)
                .map(|(t, w)| w * f64::from(v[t * vd + kvh * p.head_dim_v + d].to_f32()))
                .sum();
            out[h * p.head_dim_v + d] = (acc / sum) as f32;
        }
    }
    out
}

#[test]
fn attention_gqa_matches_reference() {
    let mut rng = Rng(0x5eed_0008);
    let n_ctx = 70;
    let mut cases = Vec::new();
    for (n_head, n_head_kv, hd_k, hd_v, window, pos) in [
        (8usize, 2usize, 64usize, 64usize, None, 37usize),
        (6, 6, 48, 40, None, 0),
        (4, 1, 80, 80, Some(10), 65),
        (9, 3, 128, 128, None, 69),
    ] {
        let p = AttnShape {
            n_head,
            n_head_kv,
            head_dim_k: hd_k,
            head_dim_v: hd_v,
            scale: 1.0 / (hd_k as f32).sqrt(),
            window,
        };
        let k: Vec<f16> = rng
            .vec(n_ctx * n_head_kv * hd_k, 2.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let v: Vec<f16> = rng
            .vec(n_ctx * n_head_kv * hd_v, 1.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let q = rng.vec(n_head * hd_k, 1.0);
        let want = attention_ref(&p, &q, &k, &v, pos);
        cases.push((p, q, k, v, pos, want));
    }
    let Some(gpu) = gpu_or_skip("attention_gqa_matches_reference") else {
        return;
    };
    for (p, q, k, v, pos, want) in &cases {
        let mut cache = gpu
            .kv_cache(
                n_ctx,
                p.n_head_kv * p.head_dim_k,
                p.n_head_kv * p.head_dim_v,
            )
            .unwrap();
        gpu.kv_upload(&mut cache, 0, k, v).unwrap();
        let qd = gpu.upload(q).unwrap();
        let mut out = gpu
            .upload(&vec![f32::NAN; p.n_head * p.head_dim_v])
            .unwrap();
        gpu.attention(p, &qd, &cache, *pos, &mut out).unwrap();
        let got = gpu.download(&out).unwrap();
        let e = rel_err(&got, want);
        assert!(e < TOL, "{p:?} pos {pos}: rel err {e}");
    }
}

#[test]
fn kv_store_rounds_like_the_host() {
    let mut rng = Rng(0x5eed_0009);
    let p = AttnShape {
        n_head: 4,
        n_head_kv: 2,
        head_dim_k: 32,
        head_dim_v: 32,
        scale: 0.2,
        window: None,
    };
    let (kd, vd, n) = (64, 64, 5);
    let k = rng.vec(n * kd, 3.0);
    let v = rng.vec(n * vd, 3.0);
    let q = rng.vec(4 * 32, 1.0);
    let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
    let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
    let Some(gpu) = gpu_or_skip("kv_store_rounds_like_the_host") else {
        return;
    };
    let mut a = gpu.kv_cache(8, kd, vd).unwrap();
    gpu.kv_upload(&mut a, 0, &k16, &v16).unwrap();
    let mut b = gpu.kv_cache(8, kd, vd).unwrap();
    for t in 0..n {
        let kr = gpu.upload(&k[t * kd..(t + 1) * kd]).unwrap();
        let vr = gpu.upload(&v[t * vd..(t + 1) * vd]).unwrap();
        gpu.kv_store(&mut b, t, &kr, &vr).unwrap();
    }
    let qd = gpu.upload(&q).unwrap();
    let mut oa = gpu.zeros(4 * 32).unwrap();
    let mut ob = gpu.zeros(4 * 32).unwrap();
    gpu.attention(&p, &qd, &a, n - 1, &mut oa).unwrap();
    gpu.attention(&p, &qd, &b, n - 1, &mut ob).unwrap();
    let (oa, ob) = (gpu.download(&oa).unwrap(), gpu.download(&ob).unwrap());
    assert_eq!(
        oa.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        ob.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert!(matches!(
        gpu.kv_store(&mut b, 8, &gpu.zeros(kd).unwrap(), &gpu.zeros(vd).unwrap()),
        Err(CudaError::Shape { .. })
    ));
}

#[test]
fn bad_input_and_budget_are_typed_errors() {
    let Some(gpu) = gpu_or_skip("bad_input_and_budget_are_typed_errors") else {
        return;
    };
    assert!(matches!(
        gpu.upload_matrix(GgmlType::Q5_K, 1, 256, &[0u8; 176]),
        Err(CudaError::UnsupportedType { .. })
    ));
    assert!(matches!(
        gpu.upload_matrix(GgmlType::Q4_0, 2, 48, &[0u8; 100]),
        Err(CudaError::Shape { .. })
    ));
    assert!(matches!(
        gpu.upload_matrix(GgmlType::Q4_0, 2, 64, &[0u8; 71]),
        Err(CudaError::Shape { .. })
    ));
    assert!(matches!(
        gpu.upload_bucket(&[0, 5], 5),
        Err(CudaError::Shape { .. })
    ));
    assert!(matches!(gpu.zeros(0), Err(CudaError::Shape { .. })));
    assert!(matches!(gpu.upload(&[]), Err(CudaError::Shape { .. })));
    drop(gpu);
    let small = Gpu::with_budget(0, Some(4096)).unwrap();
    let a = small.zeros(512).unwrap(); // 2048 bytes
    assert_eq!(small.vram().used(), 2048);
    assert!(matches!(small.zeros(600), Err(CudaError::Budget { .. })));
    drop(a);
    assert_eq!(small.vram().used(), 0);
    assert!(small.zeros(1024).is_ok());
}
