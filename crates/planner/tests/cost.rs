//! The cost model against hand-computed bytes of the reference fixtures and synthetic files.

use powerinfer_gguf::{GgmlType, GgufFile, GgufWriter, Magic, Value};
use powerinfer_planner::{Category, CostError, CostModel};

fn fixture(name: &str) -> GgufFile {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/fixtures/powerinfer-tiny/"
    );
    GgufFile::open(format!("{path}{name}")).expect("fixture opens")
}

/// KV bytes per layer per position: 4 KV heads x (16 + 16) dims x 2 bytes.
const KV_PER_POS_LAYER: u64 = 4 * 32 * 2;

#[test]
fn f16_fixture_matches_hand_computed_bytes() {
    let f = fixture("tiny-relu-llama.random-pred.f16.powerinfer.gguf");
    let c = CostModel::from_gguf(&f, 2048).unwrap();
    assert_eq!(c.architecture, "llama");
    assert_eq!(c.n_layer, 3);
    // Attention: q, k, v, o of [64, 64] F16 = 8192 bytes each, 3 layers.
    assert_eq!(c.category_bytes(Category::Attention), 3 * 4 * 64 * 64 * 2);
    // Predictors: fc1 [64, H] + fc2 [H, 1024] F16 with H = 32, 64, 32.
    let pred = |h: u64| (64 * h + h * 1024) * 2;
    assert_eq!(
        c.category_bytes(Category::Predictor),
        pred(32) + pred(64) + pred(32)
    );
    // Norms: attn_norm + ffn_norm, 64 F32 each.
    assert_eq!(c.category_bytes(Category::Norm), 3 * 2 * 64 * 4);
    // Output: output.weight [64, 1024] F16 + output_norm 64 F32.
    assert_eq!(c.category_bytes(Category::Output), 64 * 1024 * 2 + 64 * 4);
    assert_eq!(c.category_bytes(Category::Other), 0);
    assert_eq!(
        c.category_bytes(Category::KvCache),
        3 * 2048 * KV_PER_POS_LAYER
    );
    // A neuron: gate row + up row + down_t row, 64 F16 each.
    for l in &c.ffn {
        assert_eq!(l.n_ff, 1024);
        assert_eq!((l.gate_row, l.up_row, l.down_row), (128, 128, 128));
        assert_eq!(l.neuron_bytes, 384);
        assert!(l.down_exact);
    }
    assert_eq!(c.ffn_bytes(), Some(3 * 1024 * 384));
    assert_eq!(
        c.cpu_only,
        vec![("token_embd.weight".to_owned(), 64 * 1024 * 2)]
    );
    // Everything but the token embedding is accounted for exactly once.
    let file_total: u64 = f.tensors().iter().map(|t| t.size).sum();
    assert_eq!(
        c.fixed_bytes().unwrap() - c.category_bytes(Category::KvCache) + c.ffn_bytes().unwrap(),
        file_total - 64 * 1024 * 2
    );
}

#[test]
fn q4_0_fixture_matches_hand_computed_bytes() {
    let f = fixture("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf");
    let c = CostModel::from_gguf(&f, 512).unwrap();
    // Q4_0: 18 bytes per 32 elements; a row of 64 is 36 bytes.
    assert_eq!(c.category_bytes(Category::Attention), 3 * 4 * 64 * 36);
    let pred = |h: u64| (h * 36) + 1024 * (h / 32 * 18);
    assert_eq!(
        c.category_bytes(Category::Predictor),
        pred(32) + pred(64) + pred(32)
    );
    assert_eq!(c.category_bytes(Category::Norm), 1536);
    // output.weight is Q8_0: 34 bytes per 32 elements.
    assert_eq!(c.category_bytes(Category::Output), 1024 * 2 * 34 + 256);
    assert_eq!(
        c.category_bytes(Category::KvCache),
        3 * 512 * KV_PER_POS_LAYER
    );
    for l in &c.ffn {
        assert_eq!(l.neuron_bytes, 3 * 36);
    }
}

#[test]
fn fixed_items_follow_the_priority_order() {
    let f = fixture("tiny-relu-llama.random-pred.q4_0.powerinfer.gguf");
    let c = CostModel::from_gguf(&f, 16).unwrap();
    let rank = |cat: Category| Category::FIXED_ORDER.iter().position(|&x| x == cat);
    let keys: Vec<_> = c
        .fixed
        .iter()
        .map(|i| (rank(i.category), i.layer.unwrap_or(usize::MAX)))
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "fixed items not in priority order");
    assert_eq!(c.fixed[0].name, "blk.0.attn_k.weight");
    assert_eq!(c.fixed.last().unwrap().name, "kv_cache.2");
    let out: Vec<&str> = c
        .fixed
        .iter()
        .filter(|i| i.category == Category::Output)
        .map(|i| i.name.as_str())
        .collect();
    assert_eq!(out, ["output.weight", "output_norm.weight"]);
}

#[test]
fn dense_file_with_plain_ffn_down_counts_a_column() {
    let f = fixture("tiny-relu-llama.dense.f16.gguf");
    let c = CostModel::from_gguf(&f, 128).unwrap();
    assert_eq!(c.category_bytes(Category::Predictor), 0);
    for l in &c.ffn {
        // ffn_down [1024, 64] F16: one column of 64 F16 = 128 bytes.
        assert_eq!((l.down_row, l.down_exact, l.neuron_bytes), (128, true, 384));
    }
}

/// A one-layer llama file with the given FFN types; `tied`: no output.weight.
fn synthetic(
    layers: &[(GgmlType, GgmlType, GgmlType)],
    n_embd: u64,
    n_ff: u64,
    tied: bool,
) -> GgufFile {
    let mut w = GgufWriter::new(Magic::Gguf);
    w.add_kv("general.architecture", Value::from("llama"))
        .unwrap();
    w.add_kv("llama.block_count", Value::U32(layers.len() as u32))
        .unwrap();
    w.add_kv("llama.embedding_length", Value::U32(n_embd as u32))
        .unwrap();
    w.add_kv("llama.attention.head_count", Value::U32(4))
        .unwrap();
    w.add_kv("llama.attention.head_count_kv", Value::U32(2))
        .unwrap();
    let mut add = |name: String, ty: GgmlType, shape: &[u64]| {
        let n: u64 = shape.iter().product();
        let bytes = vec![0u8; ty.bytes_for(n).unwrap() as usize];
        w.add_tensor(name, ty, shape, bytes).unwrap();
    };
    add("token_embd.weight".into(), GgmlType::Q8_0, &[n_embd, 64]);
    if !tied {
        add("output.weight".into(), GgmlType::Q8_0, &[n_embd, 64]);
    }
    add("output_norm.weight".into(), GgmlType::F32, &[n_embd]);
    add("rope_freqs.weight".into(), GgmlType::F32, &[32]);
    for (i, &(g, u, d)) in layers.iter().enumerate() {
        add(
            format!("blk.{i}.attn_q.weight"),
            GgmlType::Q8_0,
            &[n_embd, n_embd],
        );
        add(format!("blk.{i}.attn_q_norm.weight"), GgmlType::F32, &[64]);
        add(format!("blk.{i}.ffn_gate.weight"), g, &[n_embd, n_ff]);
        add(format!("blk.{i}.ffn_up.weight"), u, &[n_embd, n_ff]);
        add(format!("blk.{i}.ffn_down.weight"), d, &[n_ff, n_embd]);
    }
    GgufFile::from_bytes(w.write_to_vec().unwrap()).unwrap()
}

#[test]
fn mixed_types_tied_output_and_gqa() {
    use GgmlType::*;
    let f = synthetic(&[(Q4_K, Q4_K, Q6_K), (Q4_K, Q4_K, Q4_K)], 256, 512, true);
    let c = CostModel::from_gguf(&f, 100).unwrap();
    // Q4_K: 144 bytes per 256; Q6_K: 210 per 256. Down column of 256 elements.
    assert_eq!(c.ffn[0].neuron_bytes, 144 + 144 + 210);
    assert_eq!(c.ffn[1].neuron_bytes, 3 * 144);
    // KV: 2 heads x (64 + 64) x 2 bytes per position per layer.
    assert_eq!(c.category_bytes(Category::KvCache), 2 * 100 * 2 * 128 * 2);
    // Tied output: the GPU holds a copy of token_embd (Q8_0, 34 per 32).
    assert_eq!(
        c.category_bytes(Category::Output),
        64 * 256 / 32 * 34 + 256 * 4
    );
    assert_eq!(c.category_bytes(Category::Norm), 2 * 64 * 4);
    assert_eq!(c.category_bytes(Category::Other), 32 * 4);
    assert_eq!(
        c.category_bytes(Category::Attention),
        2 * 256 * (256 / 32 * 34)
    );
}

#[test]
fn down_column_not_whole_blocks_is_rounded_share() {
    use GgmlType::*;
    // n_embd 288 is not a multiple of 256: a Q4_K column cannot be stored as a row.
    let f = synthetic(&[(Q8_0, Q8_0, Q4_K)], 288, 512, false);
    let c = CostModel::from_gguf(&f, 1).unwrap();
    let l = c.ffn[0];
    assert!(!l.down_exact);
    // ffn_down [512, 288] Q4_K: 288 rows of 2 x 144 bytes, shared by 512 neurons.
    assert_eq!(l.down_row, (288u64 * 288).div_ceil(512));
    assert_eq!(l.gate_row, 288 / 32 * 34);
}

fn base(head_count: u32) -> GgufWriter {
    let mut w = GgufWriter::new(Magic::Gguf);
    w.add_kv("general.architecture", Value::from("llama"))
        .unwrap();
    w.add_kv("llama.block_count", Value::U32(1)).unwrap();
    w.add_kv("llama.embedding_length", Value::U32(64)).unwrap();
    w.add_kv("llama.attention.head_count", Value::U32(head_count))
        .unwrap();
    w
}

fn f32_tensor(w: &mut GgufWriter, name: &str, shape: &[u64]) {
    let n: u64 = shape.iter().product();
    w.add_tensor(name, GgmlType::F32, shape, vec![0u8; 4 * n as usize])
        .unwrap();
}

fn parse(w: GgufWriter) -> GgufFile {
    GgufFile::from_bytes(w.write_to_vec().unwrap()).unwrap()
}

#[test]
fn bad_models_give_typed_errors() {
    let f = parse(base(4));
    assert!(matches!(
        CostModel::from_gguf(&f, 1),
        Err(CostError::MissingTensor { layer: 0, .. })
    ));

    // gate with another n_ff than up.
    let mut w = base(4);
    f32_tensor(&mut w, "blk.0.ffn_up.weight", &[64, 8]);
    f32_tensor(&mut w, "blk.0.ffn_gate.weight", &[64, 9]);
    let e = CostModel::from_gguf(&parse(w), 1).unwrap_err();
    assert!(matches!(e, CostError::BadShape { .. }), "{e}");
    assert!(e.to_string().contains("blk.0.ffn_gate.weight"));

    // A tensor of a layer beyond block_count.
    let mut w = base(4);
    f32_tensor(&mut w, "blk.0.ffn_up.weight", &[64, 8]);
    f32_tensor(&mut w, "blk.0.ffn_down_t.weight", &[64, 8]);
    f32_tensor(&mut w, "blk.5.attn_q.weight", &[4]);
    assert!(matches!(
        CostModel::from_gguf(&parse(w), 1),
        Err(CostError::LayerOutOfRange { n_layer: 1, .. })
    ));

    // head_count 0.
    assert!(matches!(
        CostModel::from_gguf(&parse(base(0)), 1),
        Err(CostError::BadHyperParameter { .. })
    ));

    // No architecture.
    let f = parse(GgufWriter::new(Magic::Gguf));
    assert!(matches!(
        CostModel::from_gguf(&f, 1),
        Err(CostError::NoArchitecture)
    ));

    // Overflowing KV cache.
    let mut w = base(4);
    w.add_kv("llama.attention.head_count_kv", Value::U32(u32::MAX))
        .unwrap();
    f32_tensor(&mut w, "blk.0.ffn_up.weight", &[64, 8]);
    f32_tensor(&mut w, "blk.0.ffn_down_t.weight", &[64, 8]);
    assert!(matches!(
        CostModel::from_gguf(&parse(w), u64::MAX / 2),
        Err(CostError::Overflow { .. })
    ));
}

fn models_dir() -> std::path::PathBuf {
    std::env::var_os("POWERINFER_MODELS_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../models").into())
}

#[test]
fn gemma3_q4_k_m_has_two_neuron_costs() {
    let f = GgufFile::open(models_dir().join("gemma-3-270m-q4_k_m.gguf")).unwrap();
    let c = CostModel::from_gguf(&f, 1000).unwrap();
    assert_eq!(c.n_layer, 18);
    // gate and up: Q5_0 rows of 640 = 20 blocks x 22 bytes. down [2048, 640] is Q6_K or
    // Q4_K; a column of 640 is not whole 256-blocks, so it is charged size / 2048:
    // 640 rows x 8 blocks x 210 / 2048 = 525 (Q6_K), x 144 / 2048 = 360 (Q4_K).
    let mut costs = std::collections::BTreeSet::new();
    for (i, l) in c.ffn.iter().enumerate() {
        let down = f.tensor(&format!("blk.{i}.ffn_down.weight")).unwrap();
        let expect_down = match down.ty {
            GgmlType::Q6_K => 525,
            GgmlType::Q4_K => 360,
            t => panic!("layer {i}: unexpected down type {t}"),
        };
        assert_eq!((l.n_ff, l.gate_row, l.up_row), (2048, 440, 440));
        assert_eq!((l.down_row, l.down_exact), (expect_down, false));
        costs.insert(l.neuron_bytes);
    }
    assert_eq!(costs.into_iter().collect::<Vec<_>>(), [1240, 1405]);
    // 1 KV head of 256 + 256 dims, F16.
    assert_eq!(c.category_bytes(Category::KvCache), 18 * 1000 * 512 * 2);
    // Tied output: the GPU holds a copy of the embedding table.
    let embd = f.tensor("token_embd.weight").unwrap().size;
    assert_eq!(c.category_bytes(Category::Output), embd + 640 * 4);
    // Four norms per layer (attn, ffn, post-attention, post-ffw: 640 F32) plus q/k norms (256).
    assert_eq!(
        c.category_bytes(Category::Norm),
        18 * (4 * 640 * 4 + 2 * 256 * 4)
    );
}
