//! Every kernel against the scalar reference on random data of awkward sizes, activation
//! quantizers (fast vs reference), quantize -> dequantize error bounds, and the checked API's
//! error handling.

use powerinfer_quant::scalar;
use powerinfer_quant::{
    GgmlType, QuantError, all_kernels, dequantize_row, kernels, quantize_row, row_bytes,
    scalar_kernels, vec_dot, vec_dot_type,
};

const WEIGHT_TYPES: [GgmlType; 15] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

/// splitmix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    /// Roughly Gaussian (sum of uniforms), times `scale`.
    fn g(&mut self, scale: f32) -> f32 {
        (self.f() + self.f() + self.f() + self.f()) * scale
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.g(scale)).collect()
    }
}

fn dequant(ty: GgmlType, b: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_row(ty, b, &mut out).unwrap();
    out
}

fn quant(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; row_bytes(ty, x.len()).unwrap()];
    quantize_row(ty, x, &mut out).unwrap();
    out
}

/// Random raw weight bytes with sane f16 scale fields (random bytes elsewhere).
fn raw_weights(ty: GgmlType, nb: usize, rng: &mut Rng) -> Vec<u8> {
    let mut b: Vec<u8> = (0..nb * ty.type_size()).map(|_| rng.next() as u8).collect();
    let h = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    for blk in b.chunks_exact_mut(ty.type_size()) {
        let (d, m) = (rng.f() * 0.05, rng.f() * 0.05);
        match ty {
            GgmlType::Q4_0
            | GgmlType::Q5_0
            | GgmlType::Q8_0
            | GgmlType::IQ4_NL
            | GgmlType::IQ4_XS => blk[0..2].copy_from_slice(&h(d)),
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
                blk[0..2].copy_from_slice(&h(d));
                blk[2..4].copy_from_slice(&h(m));
            }
            GgmlType::Q6_K => blk[208..210].copy_from_slice(&h(d)),
            GgmlType::Q2_K => {
                blk[80..82].copy_from_slice(&h(d));
                blk[82..84].copy_from_slice(&h(m));
            }
            GgmlType::Q3_K => blk[108..110].copy_from_slice(&h(d)),
            _ => unreachable!(),
        }
    }
    b
}

/// Block counts exercised by every comparison.
const BLOCKS: [usize; 5] = [1, 2, 3, 7, 33];

#[test]
fn every_simd_dot_matches_scalar() {
    let mut rng = Rng(0x5EED);
    let mut checked = 0;
    for ty in WEIGHT_TYPES {
        let sk = scalar_kernels(ty).unwrap();
        let variants = all_kernels(ty);
        assert_eq!(variants[0].name, "scalar");
        for &nb in &BLOCKS {
            let n = nb * ty.block_size();
            // Odd element counts for the float types too.
            let ns: Vec<usize> = if ty.is_quantized() {
                vec![n]
            } else {
                vec![n, n + 5, 3]
            };
            for n in ns {
                for raw in [false, true] {
                    if raw && !ty.is_quantized() {
                        continue;
                    }
                    let x = rng.vec(n, 0.5);
                    let w = if raw {
                        raw_weights(ty, n / ty.block_size(), &mut rng)
                    } else {
                        quant(ty, &x)
                    };
                    let a_f = rng.vec(n, 1.0);
                    let mut act = vec![0u8; row_bytes(sk.act_ty, n).unwrap()];
                    (sk.quantize_act)(&a_f, &mut act);
                    let want = (sk.vec_dot)(n, &w, &act);
                    // Scale of the result: sum of |w_i * a_i| from the dequantized operands.
                    let wd = dequant(ty, &w, n);
                    let ad = dequant(sk.act_ty, &act, n);
                    let mag: f64 = wd.iter().zip(&ad).map(|(p, q)| (p * q).abs() as f64).sum();
                    let exact: f64 = wd.iter().zip(&ad).map(|(p, q)| *p as f64 * *q as f64).sum();
                    // Q8_1 carries s = d * sum(q) rounded to f16: allow for it.
                    let s_err: f64 = if sk.act_ty == GgmlType::Q8_1 {
                        w.chunks(ty.type_size())
                            .zip(act.chunks(36))
                            .map(|(x, y)| {
                                let m = half::f16::from_le_bytes([x[2], x[3]]).to_f32();
                                let s = half::f16::from_le_bytes([y[2], y[3]]).to_f32();
                                (m * s).abs() as f64 * 1e-3
                            })
                            .sum()
                    } else {
                        0.0
                    };
                    // The scalar dot is the dequantized dot (validates the reference itself).
                    assert!(
                        (want as f64 - exact).abs() <= 1e-5 * mag + s_err + 1e-30,
                        "{ty} scalar dot {want} vs dequantized dot {exact} (n={n})"
                    );
                    for k in &variants[1..] {
                        let got = (k.vec_dot)(n, &w, &act);
                        let tol = 2e-6 * mag + 1e-30;
                        assert!(
                            ((got - want) as f64).abs() <= tol,
                            "{ty} {} n={n} raw={raw}: {got} vs scalar {want} (tol {tol})",
                            k.name
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    eprintln!("checked {checked} SIMD dot results");
}

/// Every four-row kernel gives each row exactly its one-row kernel's result, on raw random
/// weights and on quantized ones, at awkward block counts (partial groups of 8 blocks).
#[test]
fn four_row_dots_equal_one_row_dots_bit_for_bit() {
    let mut rng = Rng(0xD074);
    let mut checked = 0;
    for ty in WEIGHT_TYPES {
        for k in all_kernels(ty) {
            let Some(dot4) = k.vec_dot4 else { continue };
            for nb in [1usize, 2, 7, 8, 9, 17, 130] {
                let n = nb * ty.block_size();
                let rows: Vec<Vec<u8>> = (0..4)
                    .map(|r| {
                        if r % 2 == 0 {
                            raw_weights(ty, nb, &mut rng)
                        } else {
                            quant(ty, &rng.vec(n, 0.5))
                        }
                    })
                    .collect();
                let mut act = vec![0u8; row_bytes(k.act_ty, n).unwrap()];
                (k.quantize_act)(&rng.vec(n, 1.0), &mut act);
                let got = dot4(n, [&rows[0], &rows[1], &rows[2], &rows[3]], &act);
                for (r, row) in rows.iter().enumerate() {
                    let want = (k.vec_dot)(n, row, &act);
                    assert_eq!(
                        got[r].to_bits(),
                        want.to_bits(),
                        "{ty} {} nb={nb} row {r}: {} vs {want}",
                        k.name,
                        got[r]
                    );
                    checked += 1;
                }
            }
        }
    }
    if cfg!(target_arch = "x86_64") && std::arch::is_x86_feature_detected!("avx512vnni") {
        assert!(checked > 0, "no four-row kernel was checked on a VNNI CPU");
    }
    eprintln!("checked {checked} four-row dot results");
}

#[test]
fn quantize_act_fast_vs_reference() {
    let mut rng = Rng(42);
    for ty in WEIGHT_TYPES {
        let sk = scalar_kernels(ty).unwrap();
        for k in &all_kernels(ty)[1..] {
            for &nb in &BLOCKS {
                let n = nb * sk.act_ty.block_size();
                let mut x = rng.vec(n, 2.0);
                // Edge cases: a zero block, a constant block, exact half-way values.
                if n >= 96 {
                    x[0..32].fill(0.0);
                    x[32..64].fill(-0.3);
                    for (i, v) in x[64..96].iter_mut().enumerate() {
                        *v = (i as f32 - 16.0) * 0.5;
                    }
                }
                let mut want = vec![0u8; row_bytes(sk.act_ty, n).unwrap()];
                let mut got = want.clone();
                (sk.quantize_act)(&x, &mut want);
                (k.quantize_act)(&x, &mut got);
                match sk.act_ty {
                    GgmlType::Q8_0 | GgmlType::Q8_1 if cfg!(target_arch = "x86_64") => {
                        // Bit-exact with ggml's x86 quantize_row_q8_0/1 (scalar model), and
                        // within one unit of the reference (same d).
                        let mut model = want.clone();
                        scalar::quantize_q8_ggml_x86(&x, &mut model, sk.act_ty == GgmlType::Q8_1);
                        assert_eq!(got, model, "{ty} {}: not ggml-x86 exact", k.name);
                        let bs = sk.act_ty.type_size();
                        let qo = bs - 32;
                        for (g, w) in got.chunks(bs).zip(want.chunks(bs)) {
                            assert_eq!(g[0..2], w[0..2], "scale differs");
                            for j in 0..32 {
                                let d = (g[qo + j] as i8 as i32 - w[qo + j] as i8 as i32).abs();
                                assert!(d <= 1);
                            }
                        }
                    }
                    _ => assert_eq!(got, want, "{ty} {} quantize_act not bit-exact", k.name),
                }
            }
        }
    }
}

#[test]
fn q8_x86_model_differs_from_ref_only_on_ties() {
    // 0.5 steps: ref rounds half away from zero, ggml x86 rounds half to even.
    let mut x = vec![0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5;
    x[2] = -3.5;
    let mut r = vec![0u8; 34];
    let mut m = vec![0u8; 34];
    scalar::quantize_q8_0(&x, &mut r);
    scalar::quantize_q8_ggml_x86(&x, &mut m, false);
    assert_eq!((r[3] as i8, r[4] as i8), (3, -4));
    assert_eq!((m[3] as i8, m[4] as i8), (2, -4));
}

#[test]
fn q8_k_reference_semantics() {
    // The signed max maps to -127 ... the element of largest magnitude is negative here.
    let mut x = vec![0.1f32; 256];
    x[5] = -2.0;
    x[6] = 2.0; // same magnitude, later: the first one wins
    let b = quant(GgmlType::Q8_K, &x);
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    assert_eq!(d, 1.0 / (-127.0 / -2.0));
    // iscale = -127 / max: the signed max itself maps to -127, its mirror to +127.
    assert_eq!(b[4 + 5] as i8, -127);
    assert_eq!(b[4 + 6] as i8, 127);
    // 0.1 * 63.5 = 6.35 -> 6; bsums are per 16.
    assert_eq!(b[4] as i8, 6);
    let bs0 = i16::from_le_bytes([b[260], b[261]]) as i32;
    let want: i32 = (0..16).map(|i| b[4 + i] as i8 as i32).sum();
    assert_eq!(bs0, want);
    // All-zero block.
    let z = quant(GgmlType::Q8_K, &[0.0; 256]);
    assert!(z.iter().all(|&v| v == 0));
}

#[test]
fn round_trip_error_bounds() {
    // (type, max relative RMS error) for Gaussian-like data.
    let bounds = [
        (GgmlType::F16, 5e-4),
        (GgmlType::BF16, 4e-3),
        (GgmlType::Q8_0, 0.006),
        (GgmlType::Q8_1, 0.006),
        (GgmlType::Q8_K, 0.008),
        (GgmlType::Q6_K, 0.025),
        (GgmlType::Q5_0, 0.06),
        (GgmlType::Q5_1, 0.05),
        (GgmlType::Q5_K, 0.045),
        (GgmlType::Q4_0, 0.12),
        (GgmlType::Q4_1, 0.1),
        (GgmlType::Q4_K, 0.09),
        (GgmlType::IQ4_NL, 0.085),
        (GgmlType::IQ4_XS, 0.085),
        (GgmlType::Q3_K, 0.17),
        (GgmlType::Q2_K, 0.31),
    ];
    let mut rng = Rng(7);
    let n = 256 * 16;
    let x = rng.vec(n, 1.0);
    let rms_x = (x.iter().map(|v| (v * v) as f64).sum::<f64>() / n as f64).sqrt();
    for (ty, bound) in bounds {
        let y = dequant(ty, &quant(ty, &x), n);
        let rms = (x
            .iter()
            .zip(&y)
            .map(|(a, b)| ((a - b) * (a - b)) as f64)
            .sum::<f64>()
            / n as f64)
            .sqrt();
        let rel = rms / rms_x;
        eprintln!("{ty}: relative RMS error {rel:.5}");
        assert!(rel < bound, "{ty}: relative RMS error {rel} >= {bound}");
        assert!(rel > 0.0 || ty == GgmlType::F32);
    }
    // F32 is exact.
    assert_eq!(dequant(GgmlType::F32, &quant(GgmlType::F32, &x), n), x);
}

#[test]
fn per_element_error_bounds_simple_types() {
    let mut rng = Rng(99);
    let x = rng.vec(32 * 40, 3.0);
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ] {
        let b = quant(ty, &x);
        let y = dequant(ty, &b, x.len());
        for (blk, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
            let raw = &b[blk * ty.type_size()..];
            let d = half::f16::from_le_bytes([raw[0], raw[1]]).to_f32().abs();
            // Half a step (a whole step for Q4_0/Q5_0, whose positive end clamps one level
            // short when the max is negative), plus the f16 rounding of d and m.
            let step = if matches!(ty, GgmlType::Q4_0 | GgmlType::Q5_0) {
                1.0
            } else {
                0.5
            };
            let slack = d * step + d * 32.0 * 1e-3 + 1e-6;
            let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            for (a, b) in xs.iter().zip(ys) {
                assert!(
                    (a - b).abs() <= slack + amax * 2e-3,
                    "{ty}: {a} -> {b} (d={d})"
                );
            }
        }
    }
}

#[test]
fn all_zero_and_constant_rows() {
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ] {
        let z = vec![0f32; 512];
        assert!(
            dequant(ty, &quant(ty, &z), 512).iter().all(|&v| v == 0.0),
            "{ty}"
        );
        let c = vec![0.25f32; 512];
        let y = dequant(ty, &quant(ty, &c), 512);
        assert!(
            y.iter().all(|&v| (v - 0.25).abs() < 0.02),
            "{ty}: {:?}",
            &y[..4]
        );
    }
}

#[test]
fn vec_dot_type_table() {
    use GgmlType as T;
    let want = [
        (T::F32, Some(T::F32)),
        (T::F16, Some(T::F16)),
        (T::BF16, Some(T::BF16)),
        (T::Q4_0, Some(T::Q8_0)),
        (T::Q5_0, Some(T::Q8_0)),
        (T::Q8_0, Some(T::Q8_0)),
        (T::Q4_1, Some(T::Q8_1)),
        (T::Q5_1, Some(T::Q8_1)),
        (T::Q2_K, Some(T::Q8_K)),
        (T::Q3_K, Some(T::Q8_K)),
        (T::Q4_K, Some(T::Q8_K)),
        (T::Q5_K, Some(T::Q8_K)),
        (T::Q6_K, Some(T::Q8_K)),
        (T::IQ4_NL, Some(T::Q8_0)),
        (T::IQ4_XS, Some(T::Q8_K)),
        (T::Q8_1, None),
        (T::Q8_K, None),
        (T::IQ2_XXS, None),
        (T::IQ3_S, None),
        (T::I32, None),
    ];
    for (t, v) in want {
        assert_eq!(vec_dot_type(t), v, "{t}");
        assert_eq!(kernels(t).map(|k| k.act_ty), v);
        if let Some(k) = kernels(t) {
            assert_eq!(k.ty, t);
            assert_eq!(scalar_kernels(t).unwrap().name, "scalar");
        }
    }
    assert_eq!(row_bytes(T::Q4_K, 512), Some(288));
    assert_eq!(row_bytes(T::Q2_K, 512), Some(168));
    assert_eq!(row_bytes(T::Q3_K, 512), Some(220));
    assert_eq!(row_bytes(T::IQ4_NL, 64), Some(36));
    assert_eq!(row_bytes(T::IQ4_XS, 512), Some(272));
    assert_eq!(row_bytes(T::Q4_0, 33), None);
    assert_eq!(row_bytes(T::F16, 3), Some(6));
}

#[test]
fn checked_api_errors() {
    use GgmlType as T;
    let mut out = vec![0f32; 64];
    assert!(matches!(
        dequantize_row(T::Q4_0, &[0u8; 35], &mut out),
        Err(QuantError::Length {
            expected: 36,
            got: 35,
            ..
        })
    ));
    assert!(matches!(
        dequantize_row(T::IQ2_XXS, &[0u8; 66], &mut vec![0f32; 256]),
        Err(QuantError::Unsupported(T::IQ2_XXS))
    ));
    assert!(matches!(
        quantize_row(T::Q8_0, &[0f32; 33], &mut [0u8; 34]),
        Err(QuantError::NotBlockMultiple {
            n: 33,
            block: 32,
            ..
        })
    ));
    assert!(matches!(
        vec_dot(T::Q8_K, 256, &[0u8; 292], &[0u8; 292]),
        Err(QuantError::Unsupported(T::Q8_K))
    ));
    assert!(matches!(
        vec_dot(T::Q4_K, 256, &[0u8; 144], &[0u8; 34]),
        Err(QuantError::Length { expected: 292, .. })
    ));
    let e = vec_dot(T::Q4_0, 32, &[0u8; 10], &[0u8; 34]).unwrap_err();
    assert!(e.to_string().contains("expected 18"), "{e}");
    // A good call.
    let w = quant(T::Q8_0, &[1.0; 64]);
    let a = quant(T::Q8_0, &[2.0; 64]);
    let d = vec_dot(T::Q8_0, 64, &w, &a).unwrap();
    assert!((d - 128.0).abs() < 0.5, "{d}");
}

#[test]
fn short_slices_panic_not_ub() {
    // The unchecked kernels must fail safely (panic or ignore) on short inputs.
    for ty in WEIGHT_TYPES {
        for k in all_kernels(ty) {
            let n = 2 * ty.block_size().max(32);
            let w = vec![0u8; row_bytes(ty, n).unwrap() / 2];
            let a = vec![0u8; row_bytes(k.act_ty, n).unwrap()];
            let r = std::panic::catch_unwind(|| (k.vec_dot)(n, &w, &a));
            if let Ok(v) = r {
                assert!(v.is_finite());
            }
        }
    }
}

#[test]
fn dispatch_reports_a_level() {
    let level = powerinfer_quant::simd_level();
    assert!(["scalar", "avx2", "avx512vnni", "neon"].contains(&level));
    if std::env::var("POWERINFER_SIMD").as_deref() == Ok("scalar") {
        assert_eq!(level, "scalar");
        assert_eq!(kernels(GgmlType::Q4_0).unwrap().name, "scalar");
    }
    #[cfg(target_arch = "x86_64")]
    if std::env::var("POWERINFER_SIMD").is_err() && is_x86_feature_detected!("avx2") {
        assert_ne!(kernels(GgmlType::Q4_K).unwrap().name, "scalar");
    }
}

#[test]
fn f16_conversion_exhaustive() {
    for h in 0..=u16::MAX {
        let want = half::f16::from_bits(h).to_f32();
        let got = scalar::f16_bits_to_f32(h);
        if want.is_nan() {
            assert!(got.is_nan(), "{h:#06x}");
        } else {
            assert_eq!(got.to_bits(), want.to_bits(), "{h:#06x}");
        }
    }
    for h in 0..=u16::MAX {
        let x = scalar::bf16_bits_to_f32(h);
        if !x.is_nan() {
            assert_eq!(scalar::f32_to_bf16_bits(x), h);
        }
    }
}

#[test]
fn q8_0_reference_rounding_is_roundf() {
    // Values whose scaled magnitude lands exactly on .5, just below and just above.
    let mut x = vec![0f32; 32];
    x[0] = 127.0; // d = 1, id = 1
    let probes = [
        0.5f32,
        -0.5,
        1.5,
        -1.5,
        2.5,
        -2.5,
        0.49999997,
        -0.49999997,
        0.50000006,
        126.5,
        -126.5,
        3.4999998,
        7.0,
        -0.0,
    ];
    x[1..1 + probes.len()].copy_from_slice(&probes);
    let b = quant(GgmlType::Q8_0, &x);
    for (i, p) in probes.iter().enumerate() {
        assert_eq!(b[3 + i] as i8, p.round() as i8, "{p}");
    }
}

#[test]
fn garbage_input_never_panics() {
    // Random bytes everywhere (NaN/inf scales included) and random f32 bit patterns.
    let mut rng = Rng(0xBAD);
    let all = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ];
    for _ in 0..20 {
        for ty in all {
            let n = 512;
            let bytes: Vec<u8> = (0..row_bytes(ty, n).unwrap())
                .map(|_| rng.next() as u8)
                .collect();
            let mut out = vec![0f32; n];
            dequantize_row(ty, &bytes, &mut out).unwrap();
            let x: Vec<f32> = (0..n).map(|_| f32::from_bits(rng.next() as u32)).collect();
            let mut q = vec![0u8; row_bytes(ty, n).unwrap()];
            quantize_row(ty, &x, &mut q).unwrap();
            for k in all_kernels(ty) {
                let act: Vec<u8> = (0..row_bytes(k.act_ty, n).unwrap())
                    .map(|_| rng.next() as u8)
                    .collect();
                let _ = (k.vec_dot)(n, &bytes, &act);
                let mut a2 = vec![0u8; act.len()];
                (k.quantize_act)(&x, &mut a2);
                (k.dequantize)(&bytes, &mut out);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar models of ggml-cpu's AVX2 float order for Q2_K, Q3_K, IQ4_NL and IQ4_XS: 8 integer
// lanes (lane `l` holds the products of bytes `4l..4l + 4` of each 32-byte chunk), one FMA per
// lane and (super-)block, ggml's `hsum_float_8`. Independent of the SIMD code and of the
// scalar references' order, so a bit-exact match at any length checks the kernels' lanes.

fn hsum_float_8(a: [f32; 8]) -> f32 {
    let r: Vec<f32> = (0..4).map(|i| a[i + 4] + a[i]).collect();
    (r[0] + r[2]) + (r[1] + r[3])
}

fn f16_at(b: &[u8], off: usize) -> f32 {
    half::f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

const KV: [i32; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

// Lane loops index the 8 lanes as ggml's vectors do.
#[allow(clippy::needless_range_loop)]
fn model_q2_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in w.chunks_exact(84).zip(a.chunks_exact(292)).take(n / 256) {
        let yd = f32_at(y, 0);
        let d = yd * f16_at(x, 80);
        let dmin = -yd * f16_at(x, 82);
        let bsum = |j: usize| i16::from_le_bytes([y[260 + 2 * j], y[261 + 2 * j]]) as i32;
        for l in 0..8 {
            let m =
                (x[2 * l] >> 4) as i32 * bsum(2 * l) + (x[2 * l + 1] >> 4) as i32 * bsum(2 * l + 1);
            acc[l] = dmin.mul_add(m as f32, acc[l]);
        }
        for l in 0..8 {
            let mut s = 0i32;
            for j in 0..2 {
                for k in 0..4 {
                    let sc = (x[8 * j + 2 * k + l / 4] & 0xF) as i32;
                    let mut p = 0i32;
                    for b in 4 * l..4 * l + 4 {
                        let q = ((x[16 + 32 * j + b] >> (2 * k)) & 3) as i32;
                        p += q * y[4 + 128 * j + 32 * k + b] as i8 as i32;
                    }
                    s += sc * p;
                }
            }
            acc[l] = d.mul_add(s as f32, acc[l]);
        }
    }
    hsum_float_8(acc)
}

// Lane loops index the 8 lanes as ggml's vectors do.
#[allow(clippy::needless_range_loop)]
fn model_q3_k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in w.chunks_exact(110).zip(a.chunks_exact(292)).take(n / 256) {
        let d = f32_at(y, 0) * f16_at(x, 108);
        // Scale j: low nibble from byte j % 8 (high nibble for j >= 8), 2 bits from 8 + j % 4.
        let sc = |j: usize| {
            let lo = (x[96 + j % 8] >> (4 * (j / 8))) & 0xF;
            let hi = (x[96 + 8 + j % 4] >> (2 * (j / 4))) & 3;
            (lo | (hi << 4)) as i32 - 32
        };
        for l in 0..8 {
            let mut s = 0i32;
            for j in 0..2 {
                for k in 0..4 {
                    let mut p = 0i32;
                    for b in 4 * l..4 * l + 4 {
                        let lo = ((x[32 + 32 * j + b] >> (2 * k)) & 3) as i32;
                        let high = x[b] >> (4 * j + k) & 1 != 0;
                        let q = lo - if high { 0 } else { 4 };
                        p += q * y[4 + 128 * j + 32 * k + b] as i8 as i32;
                    }
                    s += sc(8 * j + 2 * k + l / 4) * p;
                }
            }
            acc[l] = d.mul_add(s as f32, acc[l]);
        }
    }
    hsum_float_8(acc)
}

/// Lane `l` of one IQ4 sub-block (16 nibble bytes at `q`) with 32 activation bytes at `y`.
fn iq4_lane(q: &[u8], y: &[u8], l: usize) -> i32 {
    (4 * l..4 * l + 4)
        .map(|b| {
            let nib = if b < 16 { q[b] & 0xF } else { q[b - 16] >> 4 };
            KV[nib as usize] * y[b] as i8 as i32
        })
        .sum()
}

fn model_iq4_nl(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / 32;
    let mut acc = [[0f32; 8]; 2];
    for ib in 0..nb & !1 {
        let (x, y) = (&w[18 * ib..18 * ib + 18], &a[34 * ib..34 * ib + 34]);
        let d = f16_at(y, 0) * f16_at(x, 0);
        for (l, a) in acc[ib % 2].iter_mut().enumerate() {
            *a = d.mul_add(iq4_lane(&x[2..], &y[2..], l) as f32, *a);
        }
    }
    let mut sumf = hsum_float_8(std::array::from_fn(|l| acc[0][l] + acc[1][l]));
    if nb % 2 == 1 {
        let (x, y) = (&w[18 * (nb - 1)..], &a[34 * (nb - 1)..]);
        let s: i32 = (0..8).map(|l| iq4_lane(&x[2..], &y[2..], l)).sum();
        sumf += f16_at(y, 0) * f16_at(x, 0) * s as f32;
    }
    sumf
}

// Lane loops index the 8 lanes as ggml's vectors do.
#[allow(clippy::needless_range_loop)]
fn model_iq4_xs(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in w.chunks_exact(136).zip(a.chunks_exact(292)).take(n / 256) {
        let d = f16_at(x, 0) * f32_at(y, 0);
        let sh = u16::from_le_bytes([x[2], x[3]]);
        for l in 0..8 {
            let mut s = 0i32;
            for ib in 0..8 {
                let ls = (((x[4 + ib / 2] >> (4 * (ib % 2))) & 0xF) as i32
                    | (((sh >> (2 * ib)) & 3) as i32) << 4)
                    - 32;
                s += ls * iq4_lane(&x[8 + 16 * ib..], &y[4 + 32 * ib..], l);
            }
            acc[l] = d.mul_add(s as f32, acc[l]);
        }
    }
    hsum_float_8(acc)
}

/// The SIMD dots of Q2_K, Q3_K, IQ4_NL and IQ4_XS equal the scalar models of ggml-cpu's AVX2
/// order above bit for bit, on raw random weights and on quantized ones, at block counts from
/// 1 to 33 (odd IQ4_NL counts run the scalar tail). The models are also checked against the
/// scalar references within float-reordering distance, so they are not vacuous.
#[test]
fn new_simd_dots_follow_ggml_avx2_order_bit_for_bit() {
    type Model = fn(usize, &[u8], &[u8]) -> f32;
    let models: [(GgmlType, Model); 4] = [
        (GgmlType::Q2_K, model_q2_k),
        (GgmlType::Q3_K, model_q3_k),
        (GgmlType::IQ4_NL, model_iq4_nl),
        (GgmlType::IQ4_XS, model_iq4_xs),
    ];
    let mut rng = Rng(0xA5A5);
    let mut checked = 0;
    for (ty, model) in models {
        let sk = scalar_kernels(ty).unwrap();
        for nb in [1usize, 2, 3, 5, 8, 9, 16, 33] {
            let n = nb * ty.block_size();
            for raw in [false, true] {
                let w = if raw {
                    raw_weights(ty, nb, &mut rng)
                } else {
                    quant(ty, &rng.vec(n, 0.5))
                };
                let mut act = vec![0u8; row_bytes(sk.act_ty, n).unwrap()];
                (sk.quantize_act)(&rng.vec(n, 1.0), &mut act);
                let want = model(n, &w, &act);
                let s = (sk.vec_dot)(n, &w, &act);
                let wd = dequant(ty, &w, n);
                let ad = dequant(sk.act_ty, &act, n);
                let mag: f32 = wd.iter().zip(&ad).map(|(p, q)| (p * q).abs()).sum();
                assert!(
                    (s - want).abs() <= 2e-6 * mag + 1e-30,
                    "{ty} nb={nb}: model {want} vs scalar {s}"
                );
                for k in &all_kernels(ty)[1..] {
                    let got = (k.vec_dot)(n, &w, &act);
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{ty} {} nb={nb} raw={raw}: {got} vs model {want}",
                        k.name
                    );
                    checked += 1;
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        assert!(checked >= 64, "{checked}");
    }
    eprintln!("checked {checked} results against the ggml AVX2 order models");
}

/// Known values: a hand-built block of each new type dequantizes to the values its layout
/// defines (catches a mis-read field that a round trip through our own quantizer would hide).
#[test]
fn new_types_hand_built_blocks() {
    let h = |v: f32| half::f16::from_f32(v).to_bits().to_le_bytes();
    // Q2_K: sub-block 1 (elements 16..32) scale 3, min 2; element 17 = level 2 (byte 17 bits
    // 0..2); element 32 + 5 = level 1 (byte 5, bits 2..4, scale of sub-block 2 = 0 -> -min).
    let mut b = [0u8; 84];
    b[1] = 3 | (2 << 4);
    b[2] = 5 | (1 << 4);
    b[16 + 17] = 2;
    b[16 + 5] = 1 << 2;
    b[80..82].copy_from_slice(&h(0.5));
    b[82..84].copy_from_slice(&h(0.25));
    let y = dequant(GgmlType::Q2_K, &b, 256);
    assert_eq!(y[17], 0.5 * 3.0 * 2.0 - 0.25 * 2.0);
    assert_eq!(y[16], -0.25 * 2.0);
    assert_eq!(y[32 + 5], 0.5 * 5.0 * 1.0 - 0.25);
    assert_eq!(y[0], 0.0);
    // Q3_K: scale 9 (stored 41) for sub-block 9 (low nibble in byte 1's high half, high bits
    // in byte 8 + 1 bits 4..6); element 16*9 + 3 = 147 = 128 + 19: byte 32 + 32 + 19, bits
    // 0..2 level 3, high bit set (hmask[19] bit 4) -> 3; element 148 without high bit -> -4.
    let mut b = [0u8; 110];
    let stored = 9 + 32;
    b[96 + 1] = (stored & 0xF) << 4;
    b[96 + 8 + 1] = (stored >> 4) << 4;
    b[64 + 19] = 3;
    b[19] = 1 << 4;
    b[108..110].copy_from_slice(&h(0.125));
    let y = dequant(GgmlType::Q3_K, &b, 256);
    assert_eq!(y[147], 0.125 * 9.0 * 3.0);
    assert_eq!(y[148], 0.125 * 9.0 * -4.0);
    // Every other sub-block's scale is 0 - 32.
    assert_eq!(y[0], 0.125 * -32.0 * -4.0);
    // IQ4_NL: nibble 0 -> -127, 15 -> 113.
    let mut b = [0u8; 18];
    b[0..2].copy_from_slice(&h(2.0));
    b[2] = 0xF0;
    b[3] = 0x08;
    let y = dequant(GgmlType::IQ4_NL, &b, 32);
    assert_eq!((y[0], y[16], y[1], y[17]), (-254.0, 226.0, 2.0, -254.0));
    // IQ4_XS: sub-block 5 scale = (low nibble of scales_l[2] high half) | (bits 10..12 of
    // scales_h) << 4, minus 32.
    let mut b = [0u8; 136];
    b[0..2].copy_from_slice(&h(1.0));
    let ls: u16 = 7 + 32;
    b[2..4].copy_from_slice(&((ls >> 4) << 10).to_le_bytes());
    b[4 + 2] = ((ls & 0xF) as u8) << 4;
    b[8 + 16 * 5] = 0x9;
    let y = dequant(GgmlType::IQ4_XS, &b, 256);
    assert_eq!(y[160], 7.0 * 13.0);
    assert_eq!(y[160 + 16], 7.0 * -127.0);
    assert_eq!(y[0], -32.0 * -127.0);
}
