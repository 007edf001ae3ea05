//! The real models under `models/` (skipped with a note when absent).

use std::path::PathBuf;

use powerinfer_gguf::{GgmlType, GgufFile, Magic};

fn model(name: &str) -> Option<GgufFile> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models");
    let path = root.join(name);
    if !path.exists() {
        eprintln!(
            "note: {} absent (scripts/fetch-models.sh fetches it); skipped",
            path.display()
        );
        return None;
    }
    let t = std::time::Instant::now();
    let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    eprintln!("opened {name} in {:?}", t.elapsed());
    Some(f)
}

/// Every tensor's data lies inside the file, the tensors tile the data section in order, and
/// the data section ends at the file's end (standard layout).
fn check_layout(f: &GgufFile) {
    let mut end = f.data_offset();
    let mut by_offset: Vec<_> = f.tensors().iter().collect();
    by_offset.sort_by_key(|t| t.offset);
    for t in by_offset {
        assert!(t.offset >= end, "{}", t.name);
        assert_eq!(t.offset % f.alignment(), 0);
        end = t.offset + t.size;
    }
    assert!(end <= f.file_size());
}

#[test]
fn smollm2_135m_q4_1() {
    let Some(f) = model("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    assert_eq!(f.magic(), Magic::Gguf);
    assert_eq!(f.architecture(), Some("llama"));
    assert_eq!(f.get_arch_u32("block_count"), Ok(30));
    assert_eq!(f.get_arch_u32("embedding_length"), Ok(576));
    assert_eq!(f.get_arch_u32("feed_forward_length"), Ok(1536));
    assert_eq!(f.get_arch_u32("attention.head_count"), Ok(9));
    assert_eq!(f.get_arch_u32("attention.head_count_kv"), Ok(3));
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        49152
    );
    // 30 layers x 9 tensors + token_embd + output_norm (the output is tied to the embedding).
    assert_eq!(f.tensors().len(), 30 * 9 + 2);
    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.ty, GgmlType::Q8_0);
    assert_eq!(emb.shape, vec![576, 49152]);
    assert_eq!(emb.row_len(), 576);
    assert_eq!(emb.n_rows(), 49152);
    assert_eq!(f.tensor("blk.0.ffn_up.weight").unwrap().ty, GgmlType::Q4_1);
    assert!(f.tensor("output.weight").is_none());
    check_layout(&f);
}

#[test]
fn gemma3_270m_q4_k_m() {
    let Some(f) = model("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    assert_eq!(f.architecture(), Some("gemma3"));
    assert_eq!(f.get_arch_u32("block_count"), Ok(18));
    assert_eq!(f.get_arch_u32("embedding_length"), Ok(640));
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap().len(),
        262144
    );
    let types: std::collections::BTreeSet<GgmlType> = f.tensors().iter().map(|t| t.ty).collect();
    for ty in [
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        assert!(
            types.contains(&ty),
            "gemma3 file has {ty} tensors: {types:?}"
        );
    }
    assert_eq!(
        f.tensor("token_embd.weight").unwrap().shape,
        vec![640, 262144]
    );
    check_layout(&f);
}
