//! Multi-token kernels (`gemm`) against the single-row `vec_dot` they stand in for: every
//! output must be bit for bit the same, on awkward sizes and token counts.

use powerinfer_quant::gemm::{
    GemmTokens, ROWS_TOKENS, act_scales, gemm_for, gemm_rows_for, gemm_variants, scale_stride,
};
use powerinfer_quant::{GgmlType, all_kernels, quantize_row, row_bytes};

struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1), now and then scaled up to make outliers.
    fn f(&mut self) -> f32 {
        let u = (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        if self.next().is_multiple_of(61) {
            u * 40.0
        } else {
            u
        }
    }
}

const TYPES: [GgmlType; 9] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::Q5_K,
];

/// (block bytes, bytes of scales before the quants) of the 32-element formats.
fn quant_bytes(ty: GgmlType) -> Option<(usize, usize)> {
    match ty {
        GgmlType::Q4_0 => Some((18, 2)),
        GgmlType::Q4_1 => Some((20, 4)),
        GgmlType::Q5_0 => Some((22, 2)),
        GgmlType::Q8_0 => Some((34, 2)),
        GgmlType::IQ4_NL => Some((18, 2)),
        _ => None,
    }
}

#[test]
fn gemm_matches_vec_dot_bit_for_bit() {
    let mut rng = SplitMix(0x5EED_2026);
    let mut checked = 0usize;
    for ty in TYPES {
        for k in all_kernels(ty) {
            assert_eq!(gemm_for(&k).is_some(), !gemm_variants(&k).is_empty());
            for (gname, gemm) in gemm_variants(&k) {
                for blocks in [1usize, 2, 3, 7, 9, 16, 17] {
                    let n = blocks * ty.block_size();
                    let rb = row_bytes(ty, n).unwrap();
                    let arb = row_bytes(k.act_ty, n).unwrap();
                    for n_tok in [1usize, 2, 3, 4, 5, 7, 8, 9, 13] {
                        // Several weight rows, activations with a stride larger than a row.
                        let stride = arb + 5;
                        let mut acts = vec![0u8; n_tok * stride];
                        for a in acts.chunks_exact_mut(stride) {
                            let x: Vec<f32> = (0..n).map(|_| rng.f()).collect();
                            (k.quantize_act)(&x, &mut a[..arb]);
                        }
                        for _ in 0..3 {
                            let wf: Vec<f32> = (0..n).map(|_| rng.f()).collect();
                            let mut w = vec![0u8; rb];
                            quantize_row(ty, &wf, &mut w).unwrap();
                            // Every bit pattern of the quants (the scales stay those quantized).
                            if let Some((bsz, skip)) = quant_bytes(ty) {
                                for b in w.chunks_exact_mut(bsz) {
                                    for v in &mut b[skip..] {
                                        *v = rng.next() as u8;
                                    }
                                }
                            }
                            let mut scales = vec![f32::NAN; 3];
                            act_scales(&k, n, &acts, stride, n_tok, &mut scales);
                            let mut out = vec![f32::NAN; n_tok];
                            gemm(n, &w, &acts, stride, &scales, &mut out);
                            for (t, o) in out.iter().enumerate() {
                                let a = &acts[t * stride..t * stride + arb];
                                let want = (k.vec_dot)(n, &w, a);
                                assert_eq!(
                                    o.to_bits(),
                                    want.to_bits(),
                                    "{ty:?} {} ({gname}) n={n} tokens={n_tok} t={t}: {o} vs {want}",
                                    k.name
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c")
    {
        // Every type above has an AVX2 multi-token kernel.
        assert!(checked >= TYPES.len() * 4 * 9 * 3);
    }
    let _ = checked;
}

#[test]
fn multi_row_kernels_match_vec_dot_bit_for_bit() {
    let mut rng = SplitMix(0x7077_2026);
    let mut checked = 0usize;
    for ty in TYPES {
        for k in all_kernels(ty) {
            let Some(rows_fn) = gemm_rows_for(&k) else {
                continue;
            };
            // 257 blocks: past the kernels' stack table, the row-by-row fallback.
            for blocks in [1usize, 2, 7, 8, 9, 17, 48, 257] {
                let n = blocks * ty.block_size();
                let rb = row_bytes(ty, n).unwrap();
                let arb = row_bytes(k.act_ty, n).unwrap();
                let stride = arb + 3;
                let mut acts = vec![0u8; ROWS_TOKENS * stride];
                for a in acts.chunks_exact_mut(stride) {
                    let x: Vec<f32> = (0..n).map(|_| rng.f()).collect();
                    (k.quantize_act)(&x, &mut a[..arb]);
                }
                let mut scales = Vec::new();
                act_scales(&k, n, &acts, stride, ROWS_TOKENS, &mut scales);
                for (n_rows, n_tokens) in [(1usize, 8usize), (2, 1), (3, 2), (6, 5), (7, 8), (7, 3)]
                {
                    // Rows padded apart (the kernels take a row size, not the packed one).
                    let row_bytes_padded = rb + 7;
                    let mut w = vec![0u8; n_rows * row_bytes_padded];
                    for row in w.chunks_exact_mut(row_bytes_padded) {
                        let wf: Vec<f32> = (0..n).map(|_| rng.f()).collect();
                        quantize_row(ty, &wf, &mut row[..rb]).unwrap();
                        if let Some((bsz, skip)) = quant_bytes(ty) {
                            for b in row[..rb].chunks_exact_mut(bsz) {
                                for v in &mut b[skip..] {
                                    *v = rng.next() as u8;
                                }
                            }
                        }
                    }
                    // Token-major with a stride past the rows (the gap must stay untouched).
                    let os = n_rows + 2;
                    let mut out = vec![f32::NAN; ROWS_TOKENS * os];
                    // The first `n_tokens` tokens' activations and scales only.
                    let tokens = GemmTokens {
                        n_tokens,
                        acts: &acts[..(n_tokens - 1) * stride + arb],
                        stride,
                        scales: &scales[..n_tokens * scale_stride(n)],
                    };
                    rows_fn(n, &w, row_bytes_padded, n_rows, tokens, &mut out, os);
                    for t in 0..ROWS_TOKENS {
                        // Past the rows, and every row of absent tokens, untouched.
                        let from = if t < n_tokens { n_rows } else { 0 };
                        assert!(out[t * os + from..(t + 1) * os].iter().all(|v| v.is_nan()));
                    }
                    for (r, row) in w.chunks_exact(row_bytes_padded).enumerate() {
                        for t in 0..n_tokens {
                            let want = (k.vec_dot)(n, &row[..rb], &acts[t * stride..]);
                            let got = out[t * os + r];
                            assert_eq!(
                                got.to_bits(),
                                want.to_bits(),
                                "{ty:?} {} n={n} rows={n_rows} r={r} t={t}: {got} vs {want}",
                                k.name
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512vl") {
        // The Q4_1 kernel runs on this CPU (for its "avx2" and "avx512vnni" kernel sets).
        assert!(checked >= 8 * 27 * ROWS_TOKENS, "{checked}");
    }
    let _ = checked;
}

#[test]
fn no_gemm_for_scalar_or_unsupported() {
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::F32,
        GgmlType::Q5_K,
    ] {
        let k = powerinfer_quant::scalar_kernels(ty).unwrap();
        assert!(gemm_for(k).is_none(), "{ty:?}");
    }
}

#[test]
fn grouped_kernels_agree_and_stay_close_to_vec_dot() {
    let mut rng = SplitMix(0x6120_2026);
    let mut checked = 0usize;
    for k in all_kernels(GgmlType::Q4_K) {
        let Some((gemm, dot)) = powerinfer_quant::gemm::grouped_for(&k) else {
            continue;
        };
        for blocks in [1usize, 2, 3, 8] {
            let n = blocks * 256;
            let rb = row_bytes(GgmlType::Q4_K, n).unwrap();
            let arb = row_bytes(k.act_ty, n).unwrap();
            for n_tok in [1usize, 3, 4, 8, 9, 16] {
                let mut acts = vec![0u8; n_tok * arb];
                for a in acts.chunks_exact_mut(arb) {
                    let x: Vec<f32> = (0..n).map(|_| rng.f()).collect();
                    (k.quantize_act)(&x, a);
                }
                let wf: Vec<f32> = (0..n).map(|_| rng.f()).collect();
                let mut w = vec![0u8; rb];
                quantize_row(GgmlType::Q4_K, &wf, &mut w).unwrap();
                let mut aux = Vec::new();
                act_scales(&k, n, &acts, arb, n_tok, &mut aux);
                let mut out = vec![f32::NAN; n_tok];
                gemm(n, &w, &acts, arb, &aux, &mut out);
                for (t, o) in out.iter().enumerate() {
                    let a = &acts[t * arb..(t + 1) * arb];
                    let want = dot(n, &w, a);
                    assert_eq!(o.to_bits(), want.to_bits(), "n={n} tokens={n_tok} t={t}");
                    // the same product in another summation order
                    let plain = (k.vec_dot)(n, &w, a);
                    assert!(
                        (want - plain).abs() <= 1e-4 * (1.0 + plain.abs()),
                        "{want} vs {plain}"
                    );
                    checked += 1;
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        assert!(checked > 100, "{checked}");
    }
    let _ = checked;
}

#[test]
fn four_row_few_token_kernels_match_vec_dot_bit_for_bit() {
    use powerinfer_quant::gemm::{DOT4_TOKENS, dot4_tokens_for};
    let mut rng = SplitMix(0x7077_2027);
    let mut checked = 0usize;
    for ty in TYPES {
        for k in all_kernels(ty) {
            let Some(dot4) = dot4_tokens_for(&k) else {
                continue;
            };
            for blocks in [1usize, 2, 7, 17, 48, 257] {
                let n = blocks * ty.block_size();
                let rb = row_bytes(ty, n).unwrap();
                let arb = row_bytes(k.act_ty, n).unwrap();
                let stride = arb + 5;
                let mut acts = vec![0u8; DOT4_TOKENS * stride];
                for a in acts.chunks_exact_mut(stride) {
                    let x: Vec<f32> = (0..n).map(|_| rng.f()).collect();
                    (k.quantize_act)(&x, &mut a[..arb]);
                }
                let rows: Vec<Vec<u8>> = (0..4)
                    .map(|_| {
                        let wf: Vec<f32> = (0..n).map(|_| rng.f()).collect();
                        let mut row = vec![0u8; rb];
                        quantize_row(ty, &wf, &mut row).unwrap();
                        row
                    })
                    .collect();
                let mut scales = Vec::new();
                act_scales(&k, n, &acts, stride, DOT4_TOKENS, &mut scales);
                for n_tokens in 1..=DOT4_TOKENS {
                    let tokens = GemmTokens {
                        n_tokens,
                        acts: &acts[..(n_tokens - 1) * stride + arb],
                        stride,
                        scales: &scales[..n_tokens * scale_stride(n)],
                    };
                    let w = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
                    let got = dot4(n, w, tokens);
                    for (t, got_t) in got.iter().enumerate().take(n_tokens) {
                        for (r, row) in rows.iter().enumerate() {
                            let want = (k.vec_dot)(n, row, &acts[t * stride..]);
                            assert_eq!(
                                got_t[r].to_bits(),
                                want.to_bits(),
                                "{ty:?} {} n={n} tokens={n_tokens} t={t} r={r}",
                                k.name
                            );
                            checked += 1;
                        }
                    }
                }
            }
        }
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512vl") {
        // Q4_0's, Q4_1's, Q5_0's and Q8_0's kernels run on this CPU (for their "avx2" and
        // "avx512vnni" sets).
        assert!(checked >= 4 * 2 * 6 * 10 * 4, "{checked}");
    }
    let _ = checked;
}
