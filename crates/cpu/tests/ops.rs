//! Operators against plain references (mostly `f64`) on seeded random inputs of awkward sizes.

use half::f16;
use powerinfer_cpu::ops::*;

/// SplitMix64: a small seeded generator for test inputs.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

fn assert_close(a: &[f32], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
        let err = (f64::from(x) - y).abs();
        assert!(
            err <= tol * (1.0 + y.abs()),
            "{what}[{i}]: {x} vs {y} (err {err})"
        );
    }
}

const SIZES: [usize; 8] = [1, 3, 7, 16, 31, 64, 257, 1000];

#[test]
fn rms_norm_matches_reference() {
    let mut r = Rng(1);
    for &n in &SIZES {
        let x = r.vec(n, 3.0);
        let w = r.vec(n, 2.0);
        let eps = 1e-6f32;
        let ms: f64 = x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>() / n as f64;
        let s = 1.0 / (ms + f64::from(eps)).sqrt();
        let want: Vec<f64> = x
            .iter()
            .zip(&w)
            .map(|(&a, &b)| f64::from(a) * s * f64::from(b))
            .collect();
        let mut out = vec![0.0; n];
        rms_norm(&x, &w, eps, &mut out).unwrap();
        assert_close(&out, &want, 1e-5, "rms_norm");
        let mut y = x.clone();
        rms_norm_inplace(&mut y, &w, eps).unwrap();
        assert_eq!(y, out);
    }
    let mut out = vec![0.0; 3];
    assert!(matches!(
        rms_norm(&[1.0; 3], &[1.0; 2], 1e-5, &mut out),
        Err(OpsError::Length { what: "weight", .. })
    ));
}

#[test]
fn rms_norm_rows_is_per_row() {
    let mut r = Rng(2);
    let (rows, n) = (5, 19);
    let x = r.vec(rows * n, 1.0);
    let w = r.vec(n, 1.0);
    let mut y = x.clone();
    rms_norm_rows_inplace(&mut y, &w, 1e-6).unwrap();
    for i in 0..rows {
        let mut o = vec![0.0; n];
        rms_norm(&x[i * n..(i + 1) * n], &w, 1e-6, &mut o).unwrap();
        assert_eq!(&y[i * n..(i + 1) * n], &o[..]);
    }
    assert!(rms_norm_rows_inplace(&mut [0.0; 10], &w, 1e-6).is_err());
}

#[test]
fn layer_norm_matches_reference() {
    let mut r = Rng(3);
    for &n in &SIZES[1..] {
        let x: Vec<f32> = r.vec(n, 2.0).iter().map(|v| v + 0.7).collect();
        let w = r.vec(n, 1.0);
        let b = r.vec(n, 1.0);
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n as f64;
        let want: Vec<f64> = (0..n)
            .map(|i| {
                (f64::from(x[i]) - mean) / (var + 1e-5).sqrt() * f64::from(w[i]) + f64::from(b[i])
            })
            .collect();
        let mut out = vec![0.0; n];
        layer_norm(&x, &w, Some(&b), 1e-5, &mut out).unwrap();
        assert_close(&out, &want, 1e-4, "layer_norm");
    }
}

#[test]
fn softmax_matches_reference() {
    let mut r = Rng(4);
    for &n in &SIZES {
        let x = r.vec(n, 20.0);
        let max = x
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, |a, b| a.max(f64::from(b)));
        let e: Vec<f64> = x.iter().map(|&v| (f64::from(v) - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        let want: Vec<f64> = e.iter().map(|v| v / sum).collect();
        let mut y = x.clone();
        softmax_inplace(&mut y);
        assert_close(&y, &want, 1e-5, "softmax");
    }
    let mut y = vec![f32::NEG_INFINITY; 4];
    softmax_inplace(&mut y);
    assert_eq!(y, vec![0.0; 4]);
}

fn gelu_tanh_f64(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * x * (1.0 + 0.044715 * x * x)).tanh())
}

#[test]
fn activations_match_reference() {
    let mut r = Rng(5);
    let x = r.vec(1001, 12.0);
    let silu_want: Vec<f64> = x
        .iter()
        .map(|&v| f64::from(v) / (1.0 + (-f64::from(v)).exp()))
        .collect();
    let mut y = x.clone();
    silu_inplace(&mut y);
    assert_close(&y, &silu_want, 1e-6, "silu");

    let mut y = x.clone();
    relu_inplace(&mut y);
    for (a, b) in y.iter().zip(&x) {
        assert_eq!(*a, b.max(0.0));
    }

    // GELU through the f16 table: exactly f16(gelu(f16(x))) in (-10, 10), 0 below, x above.
    let mut y = x.clone();
    gelu_inplace(&mut y);
    for (&g, &v) in y.iter().zip(&x) {
        let want = if v <= -10.0 {
            0.0
        } else if v >= 10.0 {
            v
        } else {
            let xh = f16::from_f32(v).to_f32();
            f16::from_f64(gelu_tanh_f64(f64::from(xh))).to_f32()
        };
        // the table entry is rounded from an f32 evaluation: allow one f16 ulp
        let ulp = f16::from_f32(want).to_f32().abs() * 2f32.powi(-10) + 1e-7;
        assert!((g - want).abs() <= ulp, "gelu({v}) = {g}, want {want}");
        assert!((gelu(v) - g).abs() == 0.0);
    }
    assert!((gelu_tanh(1.0) as f64 - gelu_tanh_f64(1.0)).abs() < 1e-6);
    // the table is coarser than the formula but close
    assert!((gelu(0.3) - gelu_tanh(0.3)).abs() < 1e-3);
}

#[test]
fn gated_helpers() {
    let mut r = Rng(6);
    for &n in &SIZES {
        let g = r.vec(n, 6.0);
        let u = r.vec(n, 2.0);
        let mut o = vec![0.0; n];
        swiglu(&g, &u, &mut o).unwrap();
        let mut gi = g.clone();
        swiglu_inplace(&mut gi, &u).unwrap();
        assert_eq!(gi, o);
        // ggml's split: full 16-blocks through the polynomial expf, the tail through libm.
        let body = n / SILU_BLOCK * SILU_BLOCK;
        for i in 0..n {
            let s = if i < body {
                silu_poly(g[i])
            } else {
                silu(g[i])
            };
            assert_eq!(o[i].to_bits(), (s * u[i]).to_bits(), "swiglu n={n} i={i}");
        }
        geglu(&g, &u, &mut o).unwrap();
        let mut gi = g.clone();
        geglu_inplace(&mut gi, &u).unwrap();
        assert_eq!(gi, o);
        for i in 0..n {
            assert_eq!(o[i], gelu(g[i]) * u[i]);
        }
    }
    assert!(swiglu(&[1.0; 3], &[1.0; 4], &mut [0.0; 3]).is_err());
    assert!(geglu_inplace(&mut [1.0; 3], &[1.0; 4]).is_err());
}

fn rope_ref(
    x: &[f32],
    head_dim: usize,
    n_dims: usize,
    pos: usize,
    base: f64,
    neox: bool,
) -> Vec<f64> {
    let mut out: Vec<f64> = x.iter().map(|&v| f64::from(v)).collect();
    let half = n_dims / 2;
    for h in 0..x.len() / head_dim {
        let o = h * head_dim;
        for i in 0..half {
            let theta = pos as f64 * base.powf(-2.0 * i as f64 / n_dims as f64);
            let (a, b) = if neox {
                (o + i, o + i + half)
            } else {
                (o + 2 * i, o + 2 * i + 1)
            };
            let (x0, x1) = (f64::from(x[a]), f64::from(x[b]));
            out[a] = x0 * theta.cos() - x1 * theta.sin();
            out[b] = x0 * theta.sin() + x1 * theta.cos();
        }
    }
    out
}

#[test]
fn rope_matches_reference() {
    let mut r = Rng(7);
    for &(head_dim, n_dims, n_head) in &[
        (16usize, 16usize, 3usize),
        (64, 64, 2),
        (24, 10, 5),
        (256, 256, 1),
    ] {
        for &pos in &[0usize, 1, 17, 511] {
            for &neox in &[false, true] {
                let x = r.vec(head_dim * n_head, 1.0);
                let mut cache = vec![0.0; n_dims];
                rope_cache(pos as f32, 10000.0, 1.0, &mut cache).unwrap();
                let mut y = x.clone();
                let kind = if neox {
                    RopeKind::Neox
                } else {
                    RopeKind::Normal
                };
                rope_apply(&mut y, head_dim, &cache, kind).unwrap();
                let want = rope_ref(&x, head_dim, n_dims, pos, 10000.0, neox);
                // f32 angles at position 511 carry ~1e-4 absolute error, as in ggml
                assert_close(&y, &want, 2e-4, "rope");
            }
        }
    }
    assert!(rope_cache(1.0, 1e4, 1.0, &mut [0.0; 3]).is_err());
    assert!(rope_apply(&mut [0.0; 10], 4, &[0.0; 4], RopeKind::Neox).is_err());
}

#[test]
fn f16_conversions_round_to_nearest() {
    let mut r = Rng(8);
    for &n in &SIZES {
        let x = r.vec(n, 100.0);
        let mut h = vec![f16::ZERO; n];
        f32_to_f16(&x, &mut h).unwrap();
        let mut back = vec![0.0; n];
        f16_to_f32(&h, &mut back).unwrap();
        for i in 0..n {
            assert_eq!(h[i], f16::from_f32(x[i]));
            assert_eq!(back[i], h[i].to_f32());
        }
        let y = r.vec(n, 1.0);
        let d = dot_f32(&x, &y).unwrap();
        let want: f64 = x
            .iter()
            .zip(&y)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        assert!(
            (f64::from(d) - want).abs() < 1e-3 * (1.0 + want.abs()),
            "{d} vs {want}"
        );
    }
}

/// Plain two-pass softmax attention in f64 over the f16-rounded q, k, v.
fn attention_ref(p: &AttnParams, q: &[f32], pos: usize, k: &[f16], v: &[f16]) -> Vec<f64> {
    attention_ref_q(p, q, pos, k, v, true)
}

/// [`attention_ref`], rounding q to f16 or not.
fn attention_ref_q(
    p: &AttnParams,
    q: &[f32],
    pos: usize,
    k: &[f16],
    v: &[f16],
    round_q: bool,
) -> Vec<f64> {
    let group = p.n_head / p.n_head_kv;
    let mut out = vec![0.0f64; p.out_dim()];
    let lo = p.window.map_or(0, |w| (pos + 1).saturating_sub(w));
    for h in 0..p.n_head {
        let g = h / group;
        let qh: Vec<f64> = q[h * p.head_dim_k..(h + 1) * p.head_dim_k]
            .iter()
            .map(|&x| {
                if round_q {
                    f64::from(f16::from_f32(x).to_f32())
                } else {
                    f64::from(x)
                }
            })
            .collect();
        let scores: Vec<f64> = (lo..=pos)
            .map(|j| {
                let kr = &k[j * p.k_dim() + g * p.head_dim_k..][..p.head_dim_k];
                qh.iter()
                    .zip(kr)
                    .map(|(a, b)| a * f64::from(b.to_f32()))
                    .sum::<f64>()
                    * f64::from(p.scale)
            })
            .collect();
        let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        for (jj, j) in (lo..=pos).enumerate() {
            let vr = &v[j * p.v_dim() + g * p.head_dim_v..][..p.head_dim_v];
            for d in 0..p.head_dim_v {
                out[h * p.head_dim_v + d] += e[jj] / sum * f64::from(vr[d].to_f32());
            }
        }
    }
    out
}

#[test]
fn attention_matches_reference() {
    let mut r = Rng(9);
    let cases = [
        // n_head, n_head_kv, dk, dv, window, n_ctx
        (4usize, 4usize, 16usize, 16usize, None, 9usize),
        (9, 3, 64, 64, None, 37),
        (4, 1, 256, 256, Some(5), 23),
        (6, 2, 12, 20, Some(1), 7),
        (3, 1, 7, 5, None, 70),
    ];
    for &(n_head, n_head_kv, dk, dv, window, n_ctx) in &cases {
        let p = AttnParams {
            n_head,
            n_head_kv,
            head_dim_k: dk,
            head_dim_v: dv,
            scale: 1.0 / (dk as f32).sqrt(),
            window,
            precision: AttnPrecision::F16Accumulate,
        };
        let kf = r.vec(n_ctx * p.k_dim(), 2.0);
        let vf = r.vec(n_ctx * p.v_dim(), 1.0);
        let k: Vec<f16> = kf.iter().map(|&x| f16::from_f32(x)).collect();
        let v: Vec<f16> = vf.iter().map(|&x| f16::from_f32(x)).collect();
        let mut sc = AttnScratch::new(&p);
        let qs = r.vec(n_ctx * p.q_dim(), 2.0);
        let mut batch_out = vec![0.0; n_ctx * p.out_dim()];
        attention_batch(&p, &qs, n_ctx, 0, &k, &v, &mut batch_out, &mut sc).unwrap();
        for pos in 0..n_ctx {
            let q = &qs[pos * p.q_dim()..(pos + 1) * p.q_dim()];
            let mut out = vec![0.0; p.out_dim()];
            attention(&p, q, pos, &k, &v, &mut out, &mut sc).unwrap();
            let want = attention_ref(&p, q, pos, &k, &v);
            // the weighted V sum is kept in f16 like ggml: about 1e-3 relative
            assert_close(&out, &want, 4e-3, "attention");
            // the f32 variant (ggml's tiled kernel) is close to the f64 reference with an unrounded q
            let pf = AttnParams {
                precision: AttnPrecision::F32,
                ..p
            };
            let mut out32 = vec![0.0; p.out_dim()];
            attention(&pf, q, pos, &k, &v, &mut out32, &mut sc).unwrap();
            let want32 = attention_ref_q(&p, q, pos, &k, &v, false);
            assert_close(&out32, &want32, 1e-4, "attention f32");
            assert_eq!(
                &batch_out[pos * p.out_dim()..(pos + 1) * p.out_dim()],
                &out[..]
            );
        }
        // keys after `pos` are ignored (causal)
        let mut k2 = k.clone();
        for x in &mut k2[p.k_dim()..] {
            *x = f16::from_f32(100.0);
        }
        let mut a = vec![0.0; p.out_dim()];
        let mut b = vec![0.0; p.out_dim()];
        attention(&p, &qs[..p.q_dim()], 0, &k, &v, &mut a, &mut sc).unwrap();
        attention(&p, &qs[..p.q_dim()], 0, &k2, &v, &mut b, &mut sc).unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn attention_rejects_bad_shapes() {
    let p = AttnParams {
        n_head: 4,
        n_head_kv: 3,
        head_dim_k: 8,
        head_dim_v: 8,
        scale: 1.0,
        window: None,
        precision: AttnPrecision::F16Accumulate,
    };
    let mut sc = AttnScratch::default();
    let mut out = vec![0.0; 32];
    let err = attention(
        &p,
        &[0.0; 32],
        0,
        &[f16::ZERO; 24],
        &[f16::ZERO; 24],
        &mut out,
        &mut sc,
    );
    assert!(matches!(err, Err(OpsError::Param { .. })));
    let p = AttnParams { n_head_kv: 2, ..p };
    // cache too short for position 3
    let err = attention(
        &p,
        &[0.0; 32],
        3,
        &[f16::ZERO; 48],
        &[f16::ZERO; 64],
        &mut out,
        &mut sc,
    );
    assert!(matches!(
        err,
        Err(OpsError::Length {
            what: "k cache",
            ..
        })
    ));
    let err = attention(
        &p,
        &[0.0; 31],
        0,
        &[f16::ZERO; 16],
        &[f16::ZERO; 16],
        &mut out,
        &mut sc,
    );
    assert!(matches!(err, Err(OpsError::Length { what: "q", .. })));
}

#[test]
fn attention_head_ranges_match_whole_row() {
    let mut r = Rng(10);
    let p = AttnParams {
        n_head: 9,
        n_head_kv: 3,
        head_dim_k: 24,
        head_dim_v: 24,
        scale: 0.2,
        window: Some(6),
        precision: AttnPrecision::F16Accumulate,
    };
    let n_ctx = 13;
    let k: Vec<f16> = r
        .vec(n_ctx * p.k_dim(), 1.0)
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let v: Vec<f16> = r
        .vec(n_ctx * p.v_dim(), 1.0)
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let q = r.vec(p.q_dim(), 1.0);
    let mut sc = AttnScratch::new(&p);
    let mut whole = vec![0.0; p.out_dim()];
    attention(&p, &q, 12, &k, &v, &mut whole, &mut sc).unwrap();
    for (a, b) in [(0usize, 1usize), (1, 5), (4, 9), (8, 9), (2, 2)] {
        let mut part = vec![0.0; (b - a) * p.head_dim_v];
        attention_heads(&p, &q, 12, &k, &v, a..b, &mut part, &mut sc).unwrap();
        assert_eq!(&part[..], &whole[a * p.head_dim_v..b * p.head_dim_v]);
    }
    let mut part = vec![0.0; 24];
    assert!(attention_heads(&p, &q, 12, &k, &v, 9..10, &mut part, &mut sc).is_err());
}

/// Inputs covering ggml's expf regimes: ordinary values, the overflow/underflow edges, the
/// subnormal range, |n| > 192 and special values.
fn expf_inputs(r: &mut Rng) -> Vec<f32> {
    let mut x = r.vec(3000, 20.0);
    x.extend(r.vec(500, 110.0));
    x.extend(r.vec(500, 300.0));
    for v in [
        0.0, -0.0, 1.0, -1.0, 88.3, 88.4, 88.72, 89.0, -87.3, -100.0, -103.9, -104.0, -133.0,
        -140.0, 133.0, 200.0, -200.0, 1e30, -1e30,
    ] {
        x.push(v);
    }
    x.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN]);
    x
}

#[test]
fn expf_poly_is_accurate() {
    let mut r = Rng(11);
    for v in expf_inputs(&mut r) {
        let got = expf_poly(v);
        let want = f64::from(v).exp();
        if v.is_nan() {
            assert!(got.is_nan());
        } else if v > 88.73 {
            assert_eq!(got, f32::INFINITY, "expf_poly({v})");
        } else if v < -103.97 {
            assert_eq!(got, 0.0, "expf_poly({v})");
        } else if want >= f64::from(f32::MIN_POSITIVE) {
            // normal results: within 3 ulp of the true value (ggml's routine is ~2.5 ulp at worst)
            let ulp = 2f64.powi((want.log2().floor() as i32) - 23);
            assert!(
                (f64::from(got) - want).abs() <= 3.0 * ulp,
                "expf_poly({v}) = {got}, want {want}"
            );
        } else {
            // subnormal results: absolute error within a couple of subnormal steps
            let step = 2f64.powi(-149);
            assert!(
                (f64::from(got) - want).abs() <= 2.0 * step + want * 4e-7,
                "expf_poly({v}) = {got}, want {want}"
            );
        }
    }
}

#[test]
fn silu_vector_body_matches_scalar_reference_bitwise() {
    // Whatever path runs the body (AVX-512 or scalar), it must equal the per-lane reference.
    let mut r = Rng(12);
    let x = expf_inputs(&mut r);
    for n in [16usize, 17, 31, 48, 1000, x.len()] {
        let xs = &x[x.len() - n..];
        let mut y = xs.to_vec();
        silu_inplace(&mut y);
        let body = n / SILU_BLOCK * SILU_BLOCK;
        for (i, (&got, &v)) in y.iter().zip(xs).enumerate() {
            let want = if i < body { silu_poly(v) } else { silu(v) };
            assert_eq!(got.to_bits(), want.to_bits(), "silu({v}) n={n} i={i}");
        }
        let u = r.vec(n, 3.0);
        let mut o = vec![0.0; n];
        swiglu(xs, &u, &mut o).unwrap();
        for i in 0..n {
            let s = if i < body {
                silu_poly(xs[i])
            } else {
                silu(xs[i])
            };
            assert_eq!(o[i].to_bits(), (s * u[i]).to_bits(), "swiglu n={n} i={i}");
        }
    }
    // the polynomial SiLU stays close to the exact one
    for v in r.vec(2000, 30.0) {
        let want = f64::from(v) / (1.0 + (-f64::from(v)).exp());
        assert!((f64::from(silu_poly(v)) - want).abs() <= 1e-6 * (1.0 + want.abs()));
    }
}

#[test]
fn dot_f16_values_follows_ggml_avx512_order() {
    // Products 2^24, 1, 1, -2^24 in lane 0 of the four 16-lane accumulators: ggml's reduction
    // computes (2^24 + 1) + (1 - 2^24) = 1 in f32, a left-to-right sum gives 0, the exact sum is 2.
    let mut a = vec![0.0f32; 64];
    let mut b = vec![0.0f32; 64];
    for (j, (x, y)) in [(4096.0, 4096.0), (1.0, 1.0), (1.0, 1.0), (-4096.0, 4096.0)]
        .into_iter()
        .enumerate()
    {
        a[j * 16] = x;
        b[j * 16] = y;
    }
    assert_eq!(dot_f16_values_ggml(&a, &b), 1.0);
    // close to the exact value on random f16 inputs of awkward lengths (leftovers included)
    let mut r = Rng(13);
    for n in [1usize, 5, 63, 64, 65, 100, 256, 300] {
        let q = |v: Vec<f32>| -> Vec<f32> {
            v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect()
        };
        let (a, b) = (q(r.vec(n, 8.0)), q(r.vec(n, 3.0)));
        let exact: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        let mag: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from((x * y).abs()))
            .sum();
        let got = f64::from(dot_f16_values_ggml(&a, &b));
        assert!(
            (got - exact).abs() <= 1e-6 * (1.0 + mag),
            "n={n}: {got} vs {exact}"
        );
    }
}

#[test]
fn geglu_inplace_equals_the_scalar_geglu() {
    // awkward lengths (vector body + scalar tail), values around the +-10 cut-offs and the
    // f16 rounding boundaries
    let mut s = 0x9e37_79b9u64;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    for n in [1usize, 7, 8, 9, 31, 2048, 2051] {
        let mut g: Vec<f32> = (0..n).map(|_| next() * 12.0).collect();
        for (i, v) in [
            -10.0f32, 10.0, -10.000001, 9.999999, 0.0, -0.0, 65520.0, -1e-8,
        ]
        .iter()
        .enumerate()
        {
            if i < n {
                g[i] = *v;
            }
        }
        let u: Vec<f32> = (0..n).map(|_| next() * 3.0).collect();
        let mut want = vec![0f32; n];
        powerinfer_cpu::ops::geglu(&g, &u, &mut want).unwrap();
        let mut got = g.clone();
        powerinfer_cpu::ops::geglu_inplace(&mut got, &u).unwrap();
        for i in 0..n {
            assert_eq!(
                got[i].to_bits(),
                want[i].to_bits(),
                "n={n} i={i} x={}",
                g[i]
            );
        }
    }
}

/// The tiled prompt kernel against the f64 reference (queries unrounded, as the f32 path
/// sees them), where this CPU has it: grouped and plain heads, windows, chunks that start
/// after earlier positions, token ranges that are not multiples of the 16 lanes.
#[test]
fn tiled_attention_matches_reference() {
    use powerinfer_cpu::flash::{TiledScratch, attention_tiled, tiled_available};
    let mut r = Rng(31);
    let cases = [
        // n_head, n_head_kv, dk, dv, window, pos0, n_tokens, token range
        (
            9usize,
            3usize,
            64usize,
            64usize,
            None,
            0usize,
            70usize,
            0usize..70usize,
        ),
        (9, 3, 64, 64, None, 13, 40, 5..37),
        (4, 1, 32, 48, Some(5), 3, 29, 0..29),
        (2, 2, 16, 16, Some(1), 0, 17, 1..17),
        (8, 2, 128, 64, Some(40), 20, 50, 16..50),
        (4, 1, 256, 256, Some(9), 2, 33, 0..33),
    ];
    let mut ran = false;
    for &(n_head, n_head_kv, dk, dv, window, pos0, n, ref range) in &cases {
        let p = AttnParams {
            n_head,
            n_head_kv,
            head_dim_k: dk,
            head_dim_v: dv,
            scale: 1.0 / (dk as f32).sqrt(),
            window,
            precision: AttnPrecision::F32,
        };
        if !tiled_available(&p) {
            continue;
        }
        ran = true;
        let n_ctx = pos0 + n;
        let k: Vec<f16> = r
            .vec(n_ctx * p.k_dim(), 3.0)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let v: Vec<f16> = r
            .vec(n_ctx * p.v_dim(), 1.0)
            .iter()
            .map(|&x| f16::from_f32(x))
            .collect();
        let q = r.vec(n * p.q_dim(), 2.0);
        let group = n_head / n_head_kv;
        let mut sc = TiledScratch::default();
        for g in 0..n_head_kv {
            let mut out = vec![f32::NAN; range.len() * group * dv];
            attention_tiled(&p, &q, pos0, range.clone(), g, &k, &v, &mut out, &mut sc).unwrap();
            for t in range.clone() {
                let qt = &q[t * p.q_dim()..(t + 1) * p.q_dim()];
                let want = attention_ref_q(&p, qt, pos0 + t, &k, &v, false);
                let at = (t - range.start) * group * dv;
                assert_close(
                    &out[at..at + group * dv],
                    &want[g * group * dv..(g + 1) * group * dv],
                    1e-4,
                    "tiled attention",
                );
            }
        }
        // Bad input: a KV group out of range, and an output of the wrong length.
        let mut out = vec![0.0; range.len() * group * dv];
        assert!(
            attention_tiled(
                &p,
                &q,
                pos0,
                range.clone(),
                n_head_kv,
                &k,
                &v,
                &mut out,
                &mut sc
            )
            .is_err()
        );
        assert!(
            attention_tiled(
                &p,
                &q,
                pos0,
                range.clone(),
                0,
                &k,
                &v,
                &mut out[1..],
                &mut sc
            )
            .is_err()
        );
    }
    if !ran {
        eprintln!("tiled attention: not available on this CPU");
    }
}
