//! Every kernel against the scalar reference on random data of awkward sizes, activation
//! quantizers (fast vs reference), quantize -> dequantize error bounds, and the checked API's
//! error handling.

use powerinfer_quant::scalar;
use powerinfer_quant::{
    GgmlType, QuantError, all_kernels, dequantize_row, kernels, quantize_row, row_bytes,
    scalar_kernels, vec_dot, vec_dot_type,
};

const WEIGHT_TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
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
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => blk[0..2].copy_from_slice(&h(d)),
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
                blk[0..2].copy_from_slice(&h(d));
                blk[2..4].copy_from_slice(&h(m));
            }
            GgmlType::Q6_K => blk[208..210].copy_from_slice(&h(d)),
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
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
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
        (T::Q4_K, Some(T::Q8_K)),
        (T::Q5_K, Some(T::Q8_K)),
        (T::Q6_K, Some(T::Q8_K)),
        (T::Q8_1, None),
        (T::Q8_K, None),
        (T::Q2_K, None),
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
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q8_K,
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
