//! Bit-exact comparisons against independent reference values produced by the `gguf` Python
//! package (see `tests/data/make_fixture.py`): dequantization of real model rows and
//! quantization of seeded random rows.

use powerinfer_quant::{GgmlType, dequantize_row, quantize_row};
use serde_json::Value;

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn fixture() -> Value {
    let text = include_str!("data/reference.json");
    serde_json::from_str(text).unwrap()
}

#[test]
fn dequantize_real_rows_bit_exact() {
    let fx = fixture();
    let rows = fx["dequant"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for r in rows {
        let ty = GgmlType::from_name(r["type"].as_str().unwrap()).unwrap();
        let n = r["n"].as_u64().unwrap() as usize;
        let raw = unhex(r["raw_hex"].as_str().unwrap());
        let want = f32s(&unhex(r["f32_hex"].as_str().unwrap()));
        assert_eq!(want.len(), n);
        let mut got = vec![0f32; n];
        dequantize_row(ty, &raw, &mut got).unwrap();
        for i in 0..n {
            assert_eq!(
                got[i].to_bits(),
                want[i].to_bits(),
                "{} {} row {} element {i}: {} vs {}",
                r["tensor"],
                ty,
                r["row"],
                got[i],
                want[i]
            );
        }
        // The per-type fast dequantizer agrees too.
        if let Some(k) = powerinfer_quant::kernels(ty) {
            let mut fast = vec![0f32; n];
            (k.dequantize)(&raw, &mut fast);
            assert!(
                fast.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
            );
        }
        seen.insert(ty.name());
    }
    for t in ["Q4_1", "Q8_0", "Q5_0", "Q4_K", "Q6_K"] {
        assert!(seen.contains(t), "fixture lacks {t}");
    }
}

#[test]
fn quantize_matches_gguf_py_bit_exact() {
    let fx = fixture();
    let rows = fx["quant"].as_array().unwrap();
    assert!(rows.len() >= 30);
    for r in rows {
        let ty = GgmlType::from_name(r["type"].as_str().unwrap()).unwrap();
        let x = f32s(&unhex(r["input_hex"].as_str().unwrap()));
        let want = unhex(r["output_hex"].as_str().unwrap());
        let mut got = vec![0u8; want.len()];
        quantize_row(ty, &x, &mut got).unwrap();
        if got != want {
            let bs = ty.type_size();
            let blk = got
                .chunks(bs)
                .zip(want.chunks(bs))
                .position(|(a, b)| a != b)
                .unwrap();
            panic!(
                "{ty} case {}: block {blk} differs\n ours {:?}\n want {:?}",
                r["case"],
                &got[blk * bs..(blk + 1) * bs],
                &want[blk * bs..(blk + 1) * bs]
            );
        }
    }
}
