//! The type rules of the low-bit mixes (Q2_K, Q3_K_S/M/L, IQ4_NL, IQ4_XS) on a synthetic
//! LLaMA-shaped file whose rows are multiples of 256 (so no tensor falls back unless a test
//! asks for it).

mod common;

use common::scratch;
use powerinfer_convert::quantize::{FileType, QuantizeOptions, plan_types};
use powerinfer_gguf::{GgmlType, GgufFile, GgufWriter, Magic, Value};

const N_LAYER: usize = 8;

/// An F16 llama file: 8 layers of 256-wide matrices, `n_head / n_head_kv` heads, and one extra
/// matrix `blk.0.odd.weight` whose rows hold 576 elements.
fn write_model(name: &str, n_head: u32, n_head_kv: u32) -> GgufFile {
    let mut w = GgufWriter::new(Magic::Gguf);
    w.add_kv("general.architecture", Value::String("llama".into()))
        .unwrap();
    w.add_kv("llama.block_count", Value::U32(N_LAYER as u32))
        .unwrap();
    w.add_kv("llama.attention.head_count", Value::U32(n_head))
        .unwrap();
    w.add_kv("llama.attention.head_count_kv", Value::U32(n_head_kv))
        .unwrap();
    let mut add = |name: String, shape: &[u64]| {
        let bytes = 2 * shape.iter().product::<u64>() as usize;
        w.add_tensor(name, GgmlType::F16, shape, vec![0u8; bytes])
            .unwrap();
    };
    add("token_embd.weight".into(), &[256, 64]);
    for l in 0..N_LAYER {
        add(format!("blk.{l}.attn_norm.weight"), &[256]);
        for m in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            add(format!("blk.{l}.{m}.weight"), &[256, 256]);
        }
    }
    add("blk.0.odd.weight".into(), &[576, 4]);
    add("output.weight".into(), &[256, 64]);
    let path = scratch(name).join("model.gguf");
    w.write_to_file(&path).unwrap();
    GgufFile::open(&path).unwrap()
}

/// The planned type of every tensor, by name.
fn plan(f: &GgufFile, ft: FileType, pure: bool) -> impl Fn(&str) -> GgmlType {
    let mut o = QuantizeOptions::new(ft);
    o.pure = pure;
    let (types, _) = plan_types(f, &o).unwrap();
    let names: Vec<String> = f.tensors().iter().map(|t| t.name.clone()).collect();
    move |name: &str| types[names.iter().position(|n| n == name).expect(name)]
}

#[test]
fn q2_k_and_q3_k_mixes_follow_the_reference() {
    use GgmlType as G;
    let f = write_model("mixes-k", 8, 8);
    // (ftype, attn_q, attn_v of layers 0 / 2, attn_output, ffn_gate, ffn_down of layers 0 / 2)
    let cases = [
        (
            FileType::Q2_K,
            G::Q2_K,
            G::Q3_K,
            G::Q3_K,
            G::Q3_K,
            G::Q3_K,
            G::Q3_K,
            G::Q3_K,
        ),
        (
            FileType::Q3_K_S,
            G::Q3_K,
            G::Q3_K,
            G::Q3_K,
            G::Q3_K,
            G::Q3_K,
            G::Q3_K,
            G::Q3_K,
        ),
        (
            FileType::Q3_K_M,
            G::Q3_K,
            G::Q5_K,
            G::Q4_K,
            G::Q4_K,
            G::Q3_K,
            G::Q5_K,
            G::Q4_K,
        ),
        (
            FileType::Q3_K_L,
            G::Q3_K,
            G::Q5_K,
            G::Q5_K,
            G::Q5_K,
            G::Q3_K,
            G::Q5_K,
            G::Q5_K,
        ),
    ];
    for (ft, q, v0, v2, o, gate, d0, d2) in cases {
        let ty = plan(&f, ft, false);
        assert_eq!(ty("blk.3.attn_q.weight"), q, "{ft}");
        assert_eq!(ty("blk.3.attn_k.weight"), q, "{ft}");
        assert_eq!(ty("blk.0.attn_v.weight"), v0, "{ft}");
        assert_eq!(ty("blk.2.attn_v.weight"), v2, "{ft}");
        assert_eq!(ty("blk.5.attn_output.weight"), o, "{ft}");
        assert_eq!(ty("blk.5.ffn_gate.weight"), gate, "{ft}");
        assert_eq!(ty("blk.5.ffn_up.weight"), gate, "{ft}");
        assert_eq!(ty("blk.0.ffn_down.weight"), d0, "{ft}");
        assert_eq!(ty("blk.2.ffn_down.weight"), d2, "{ft}");
        assert_eq!(ty("output.weight"), G::Q6_K, "{ft}");
        assert_eq!(ty("blk.0.attn_norm.weight"), G::F16, "{ft}");
        // Rows of 576 cannot be super-blocks: the reference's fallback.
        let odd = if ft == FileType::Q2_K {
            G::Q4_0
        } else {
            G::Q4_1
        };
        assert_eq!(ty("blk.0.odd.weight"), odd, "{ft}");
    }
}

#[test]
fn iq4_mixes_follow_llamacpp() {
    use GgmlType as G;
    for (n_head, n_head_kv) in [(8, 2), (8, 8)] {
        let f = write_model(&format!("mixes-iq4-{n_head_kv}"), n_head, n_head_kv);
        for (ft, base) in [(FileType::IQ4_XS, G::IQ4_XS), (FileType::IQ4_NL, G::IQ4_NL)] {
            let ty = plan(&f, ft, false);
            assert_eq!(ty("blk.4.attn_q.weight"), base, "{ft}");
            // 4 query heads per KV head: attn_v gets more bits.
            let v = if n_head / n_head_kv >= 4 {
                G::Q5_K
            } else {
                base
            };
            assert_eq!(
                ty("blk.4.attn_v.weight"),
                v,
                "{ft} gqa {n_head}/{n_head_kv}"
            );
            // The first eighth of ffn_down (1 of 8 layers) in Q5_K.
            assert_eq!(ty("blk.0.ffn_down.weight"), G::Q5_K, "{ft}");
            assert_eq!(ty("blk.1.ffn_down.weight"), base, "{ft}");
            assert_eq!(ty("output.weight"), G::Q6_K, "{ft}");
            assert_eq!(ty("blk.0.odd.weight"), G::IQ4_NL, "{ft}");
        }
    }
}

#[test]
fn pure_low_bit_files_fall_back_only_where_rows_do_not_fit() {
    use GgmlType as G;
    let f = write_model("mixes-pure", 8, 2);
    for (ft, base, odd) in [
        (FileType::Q2_K, G::Q2_K, G::Q4_0),
        (FileType::Q3_K_M, G::Q3_K, G::Q4_1),
        (FileType::IQ4_XS, G::IQ4_XS, G::IQ4_NL),
        (FileType::IQ4_NL, G::IQ4_NL, G::IQ4_NL),
    ] {
        let ty = plan(&f, ft, true);
        for name in [
            "token_embd.weight",
            "blk.0.attn_v.weight",
            "blk.0.ffn_down.weight",
            "output.weight",
        ] {
            assert_eq!(ty(name), base, "{ft} {name}");
        }
        assert_eq!(ty("blk.0.odd.weight"), odd, "{ft}");
    }
}

#[test]
fn low_bit_names_and_numbers_parse() {
    for (s, ft) in [
        ("q2_k", FileType::Q2_K),
        ("Q3_K", FileType::Q3_K_M),
        ("Q3_K_S", FileType::Q3_K_S),
        ("13", FileType::Q3_K_L),
        ("iq4_xs", FileType::IQ4_XS),
        ("25", FileType::IQ4_NL),
    ] {
        assert_eq!(FileType::parse(s), Some(ft), "{s}");
    }
    assert_eq!(FileType::parse("IQ2_XXS"), None);
}
