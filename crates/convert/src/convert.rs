//! Hugging Face LLaMA checkpoint (+ PowerInfer predictors) to GGUF / PWRI, following the
//! reference converter (PowerInfer's `convert.py`):
//!
//! - metadata in its order: `general.architecture`, `general.name` (the model directory's
//!   name; "LLaMA v2" when the context is 4096), context/embedding/block/FFN lengths, RoPE
//!   dimensions, head counts, RMS epsilon, RoPE base (and scaling when configured),
//!   `general.file_type`, `powerinfer.sparse_threshold` (when the predictor `config.json`
//!   or the caller sets it), then the SentencePiece vocabulary (`tokenizer.ggml.model`
//!   "llama", tokens, scores, token types) and the special token ids;
//! - tensors in checkpoint order renamed to GGUF names, Q and K rows permuted back from the
//!   Hugging Face rotary layout, 2-D tensors in the output type and 1-D tensors in F32;
//! - with predictors: magic `PWRI`, `ffn_down` stored transposed as `ffn_down_t`, and
//!   `blk.N.fc1.weight` / `blk.N.fc2.weight` appended layer by layer; without: a plain GGUF.

use std::path::{Path, PathBuf};

use powerinfer_gguf::{Array, GgmlType, GgufWriter, Magic, StringArray, Value};
use serde_json::Value as Json;

use crate::checkpoint::{LazyTensor, open_tensors};
use crate::spm;
use crate::tensor;
use crate::{Error, Progress, write_atomically};

/// Element type of the converted 2-D tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutType {
    /// Everything F32 (`general.file_type` 0).
    F32,
    /// 2-D tensors F16, 1-D tensors F32 (`general.file_type` 1).
    #[default]
    F16,
}

impl OutType {
    /// Parses "f16" / "f32" (case-insensitive).
    pub fn parse(s: &str) -> Option<OutType> {
        match s.to_ascii_lowercase().as_str() {
            "f16" => Some(OutType::F16),
            "f32" => Some(OutType::F32),
            _ => None,
        }
    }
}

/// Options of [`convert_hf`].
#[derive(Debug, Clone, Default)]
pub struct ConvertOptions {
    /// Output type of the 2-D tensors.
    pub outtype: OutType,
    /// `powerinfer.sparse_threshold` to write, overriding the predictor directory's
    /// `config.json` (only with predictors).
    pub sparse_threshold: Option<f32>,
}

/// What [`convert_hf`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// `PWRI` with predictors, `GGUF` without.
    pub magic: Magic,
    /// Tensors written.
    pub n_tensors: usize,
    /// Layers with a predictor (0 or the block count).
    pub n_predictor_layers: usize,
    /// The sparse threshold written, if any.
    pub sparse_threshold: Option<f32>,
    /// Size of the output file in bytes.
    pub file_size: u64,
}

/// Hyper-parameters read from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct HfParams {
    /// `vocab_size`.
    pub n_vocab: usize,
    /// `hidden_size`.
    pub n_embd: usize,
    /// `num_hidden_layers`.
    pub n_layer: usize,
    /// `max_sequence_length` or `max_position_embeddings`.
    pub n_ctx: usize,
    /// `intermediate_size`.
    pub n_ff: usize,
    /// `num_attention_heads`.
    pub n_head: usize,
    /// `num_key_value_heads` (default `n_head`).
    pub n_head_kv: usize,
    /// `rms_norm_eps`.
    pub norm_eps: f64,
    /// `rope_theta`, if given.
    pub rope_theta: Option<f64>,
    /// `rope_scaling`: (type, factor, original context for yarn, finetuned for yarn).
    pub rope_scaling: Option<(String, f64, Option<u64>, Option<bool>)>,
    /// `hidden_act` (default "silu").
    pub hidden_act: String,
}

fn read_json(path: &Path, what: &'static str) -> Result<Json, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::MissingFile {
                what,
                path: path.to_path_buf(),
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: format!("invalid JSON: {e}"),
    })
}

impl HfParams {
    /// Reads and checks `config.json` of a Hugging Face directory: the architecture must be
    /// `LlamaForCausalLM` and `hidden_act` relu or silu.
    pub fn load(hf_dir: &Path) -> Result<HfParams, Error> {
        let path = hf_dir.join("config.json");
        let cfg = read_json(&path, "config.json")?;
        let bad = |msg: String| Error::Config {
            path: path.clone(),
            msg,
        };
        let arch = match cfg.get("architectures").and_then(Json::as_array) {
            Some(a) if !a.is_empty() => a[0].as_str().unwrap_or("?").to_owned(),
            _ => cfg
                .get("model_type")
                .and_then(Json::as_str)
                .unwrap_or("(none given)")
                .to_owned(),
        };
        if arch != "LlamaForCausalLM" {
            return Err(Error::UnsupportedArchitecture(arch));
        }
        let int = |key: &str| -> Result<usize, Error> {
            cfg.get(key)
                .and_then(Json::as_u64)
                .and_then(|v| usize::try_from(v).ok())
                .ok_or_else(|| bad(format!("missing or invalid integer {key:?}")))
        };
        let n_head = int("num_attention_heads")?;
        let n_head_kv = match cfg.get("num_key_value_heads") {
            None | Some(Json::Null) => n_head,
            Some(_) => int("num_key_value_heads")?,
        };
        let n_ctx = if cfg.get("max_sequence_length").is_some() {
            int("max_sequence_length")?
        } else if cfg.get("max_position_embeddings").is_some() {
            int("max_position_embeddings")?
        } else {
            return Err(bad(
                "no max_sequence_length or max_position_embeddings: cannot tell the context length"
                    .into(),
            ));
        };
        let norm_eps = cfg
            .get("rms_norm_eps")
            .and_then(Json::as_f64)
            .ok_or_else(|| bad("missing rms_norm_eps".into()))?;
        let rope_theta = cfg.get("rope_theta").and_then(Json::as_f64);
        let rope_scaling = match cfg.get("rope_scaling") {
            None | Some(Json::Null) => None,
            Some(rs) => match rs.get("type").and_then(Json::as_str) {
                None | Some("") => None,
                Some(ty @ ("linear" | "yarn")) => {
                    let factor = rs
                        .get("factor")
                        .and_then(Json::as_f64)
                        .ok_or_else(|| bad("rope_scaling without a factor".into()))?;
                    if ty == "yarn" {
                        let orig = rs
                            .get("original_max_position_embeddings")
                            .and_then(Json::as_u64)
                            .ok_or_else(|| {
                                bad("yarn rope_scaling without original_max_position_embeddings"
                                    .into())
                            })?;
                        let ft = rs
                            .get("finetuned")
                            .and_then(Json::as_bool)
                            .ok_or_else(|| bad("yarn rope_scaling without finetuned".into()))?;
                        Some((ty.to_owned(), factor, Some(orig), Some(ft)))
                    } else {
                        Some((ty.to_owned(), factor, None, None))
                    }
                }
                Some(other) => return Err(bad(format!("unknown rope scaling type {other:?}"))),
            },
        };
        let hidden_act = match cfg.get("hidden_act") {
            None | Some(Json::Null) => "silu".to_owned(),
            Some(v) => v
                .as_str()
                .ok_or_else(|| bad("hidden_act is not a string".into()))?
                .to_owned(),
        };
        if hidden_act != "relu" && hidden_act != "silu" {
            return Err(Error::UnsupportedActivation(hidden_act));
        }
        let p = HfParams {
            n_vocab: int("vocab_size")?,
            n_embd: int("hidden_size")?,
            n_layer: int("num_hidden_layers")?,
            n_ctx,
            n_ff: int("intermediate_size")?,
            n_head,
            n_head_kv,
            norm_eps,
            rope_theta,
            rope_scaling,
            hidden_act,
        };
        if p.n_head == 0
            || p.n_head_kv == 0
            || !p.n_embd.is_multiple_of(p.n_head)
            || !p.n_head.is_multiple_of(p.n_head_kv)
            || p.n_layer == 0
        {
            return Err(bad(format!(
                "inconsistent sizes: hidden_size {} with {} heads and {} KV heads, {} layers",
                p.n_embd, p.n_head, p.n_head_kv, p.n_layer
            )));
        }
        Ok(p)
    }

    fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

fn dir_entries(dir: &Path) -> Result<Vec<String>, Error> {
    let rd = std::fs::read_dir(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names = Vec::new();
    for e in rd.flatten() {
        if let Some(n) = e.file_name().to_str() {
            names.push(n.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// `prefix-00001-of-NNNNN.ext`: the shard list, in order, if `name` is the first shard.
fn shards(dir: &Path, names: &[String], prefix: &str, ext: &str) -> Option<Vec<PathBuf>> {
    let first = names.iter().find(|n| {
        n.starts_with(&format!("{prefix}-00001-of-"))
            && n.ends_with(ext)
            && n.len() == prefix.len() + "-00001-of-00000".len() + ext.len()
    })?;
    let total = &first[prefix.len() + "-00001-of-".len()..first.len() - ext.len()];
    let n: usize = total.parse().ok()?;
    Some(
        (1..=n)
            .map(|i| dir.join(format!("{prefix}-{i:05}-of-{total}{ext}")))
            .collect(),
    )
}

/// The model files of a Hugging Face directory, in the reference's order of preference:
/// sharded or single safetensors, then `consolidated.00.pth`, sharded or single
/// `pytorch_model*.bin`, or a lone `*.pt`.
pub fn find_model_files(hf_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let names = dir_entries(hf_dir)?;
    let has = |n: &str| names.iter().any(|x| x == n);
    let mut candidates: Vec<Vec<PathBuf>> = Vec::new();
    if let Some(s) = shards(hf_dir, &names, "model", ".safetensors") {
        candidates.push(s);
    }
    if has("model.safetensors") {
        candidates.push(vec![hf_dir.join("model.safetensors")]);
    }
    if candidates.is_empty() {
        if has("consolidated.00.pth") {
            candidates.push(vec![hf_dir.join("consolidated.00.pth")]);
        }
        if let Some(s) = shards(hf_dir, &names, "pytorch_model", ".bin") {
            candidates.push(s);
        }
        for n in names.iter().filter(|n| n.ends_with(".pt")) {
            candidates.push(vec![hf_dir.join(n)]);
        }
        if has("pytorch_model.bin") {
            candidates.push(vec![hf_dir.join("pytorch_model.bin")]);
        }
    }
    match candidates.len() {
        0 => Err(Error::MissingFile {
            what: "model weights (model.safetensors, pytorch_model.bin, ...)",
            path: hf_dir.to_path_buf(),
        }),
        1 => {
            let files = candidates.pop().unwrap_or_default();
            for f in &files {
                if !f.is_file() {
                    return Err(Error::MissingFile {
                        what: "model shard",
                        path: f.clone(),
                    });
                }
            }
            Ok(files)
        }
        _ => Err(Error::Config {
            path: hf_dir.to_path_buf(),
            msg: format!(
                "several model files, not sure which to use: {:?}",
                candidates.iter().map(|c| &c[0]).collect::<Vec<_>>()
            ),
        }),
    }
}

/// GGUF name of a Hugging Face LLaMA tensor; `Ok(None)` for tensors the reference skips
/// (`rotary_emb.inv_freq`).
fn gguf_name(hf: &str) -> Option<Option<String>> {
    let (base, suffix) = if let Some(b) = hf.strip_suffix(".weight") {
        (b, "weight")
    } else if let Some(b) = hf.strip_suffix(".bias") {
        (b, "bias")
    } else {
        (hf, "")
    };
    let top = match base {
        "model.embed_tokens" => Some("token_embd"),
        "lm_head" => Some("output"),
        "model.norm" => Some("output_norm"),
        _ => None,
    };
    let join = |n: String| {
        if suffix.is_empty() {
            n
        } else {
            format!("{n}.{suffix}")
        }
    };
    if let Some(t) = top {
        return Some(Some(join(t.to_owned())));
    }
    let rest = base.strip_prefix("model.layers.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if part == "self_attn.rotary_emb.inv_freq" {
        return Some(None);
    }
    let g = match part {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(Some(join(format!("blk.{layer}.{g}"))))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transform {
    None,
    /// Undo the HF rotary row order with this many heads.
    Permute(usize),
    Transpose,
}

struct Planned {
    name: String,
    src: LazyTensor,
    transform: Transform,
    /// Output shape, PyTorch order.
    shape: Vec<usize>,
    ty: GgmlType,
}

struct Vocab {
    tokens: StringArray,
    scores: Vec<f32>,
    types: Vec<i32>,
}

fn load_vocab(hf_dir: &Path, n_vocab: usize) -> Result<Vocab, Error> {
    let mut path = hf_dir.join("tokenizer.model");
    if !path.is_file() {
        let alt = hf_dir.parent().map(|p| p.join("tokenizer.model"));
        match alt {
            Some(a) if a.is_file() => path = a,
            _ => {
                return Err(Error::MissingFile {
                    what: "SentencePiece tokenizer",
                    path,
                });
            }
        }
    }
    let bytes = std::fs::read(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let pieces = spm::parse_model(&bytes).map_err(|source| Error::Tokenizer {
        path: path.clone(),
        source,
    })?;
    let base = pieces.len();
    // added_tokens.json: {piece: id}; ids from the base size on are appended.
    let mut added: Vec<(usize, String)> = Vec::new();
    let added_path = path.with_file_name("added_tokens.json");
    if added_path.is_file() {
        let j = read_json(&added_path, "added_tokens.json")?;
        let obj = j.as_object().ok_or_else(|| Error::Config {
            path: added_path.clone(),
            msg: "not an object".into(),
        })?;
        for (piece, id) in obj {
            let id = id.as_u64().ok_or_else(|| Error::Config {
                path: added_path.clone(),
                msg: format!("id of {piece:?} is not an integer"),
            })? as usize;
            if id >= base {
                added.push((id, piece.clone()));
            }
        }
        added.sort();
        for (i, (id, _)) in added.iter().enumerate() {
            if *id != base + i {
                return Err(Error::Config {
                    path: added_path.clone(),
                    msg: format!(
                        "added token ids must follow the base vocabulary of {base} without gaps"
                    ),
                });
            }
        }
    }
    if n_vocab != base + added.len() {
        if n_vocab == base {
            added.clear();
        } else {
            return Err(Error::VocabMismatch {
                model: n_vocab,
                tokenizer: base + added.len(),
            });
        }
    }
    let mut tokens = StringArray::default();
    let mut scores = Vec::with_capacity(n_vocab);
    let mut types = Vec::with_capacity(n_vocab);
    for p in &pieces {
        tokens.push(&p.piece);
        scores.push(p.score);
        types.push(p.kind.gguf_token_type());
    }
    for (_, piece) in &added {
        tokens.push(piece);
        scores.push(-1000.0);
        types.push(4); // USER_DEFINED
    }
    Ok(Vocab {
        tokens,
        scores,
        types,
    })
}

const SPECIAL_TYPES: [&str; 5] = ["bos", "eos", "unk", "sep", "pad"];

fn special_key(typ: &str) -> &'static str {
    match typ {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id",
        _ => "tokenizer.ggml.padding_token_id",
    }
}

/// Special token ids and add-flags as gguf-py's `SpecialVocab` finds them: first
/// `tokenizer.json` + `tokenizer_config.json`, then `<typ>_token_id` of `config.json`.
fn special_vocab(hf_dir: &Path, n_vocab: usize) -> Result<Vec<(String, Value)>, Error> {
    let mut ids: Vec<(&str, u32)> = Vec::new();
    let mut adds: Vec<(&str, bool)> = Vec::new();
    let set = |ids: &mut Vec<(&str, u32)>, typ: &'static str, tid: Option<u64>| {
        if let Some(t) = tid
            && (t as usize) < n_vocab
            && !ids.iter().any(|(k, _)| *k == typ)
        {
            ids.push((typ, t as u32));
        }
    };
    let tj = hf_dir.join("tokenizer.json");
    let tc = hf_dir.join("tokenizer_config.json");
    if tj.is_file() {
        let tok = read_json(&tj, "tokenizer.json")?;
        if let Some(added) = tok.get("added_tokens").and_then(Json::as_array)
            && tc.is_file()
        {
            let cfg = read_json(&tc, "tokenizer_config.json")?;
            for typ in SPECIAL_TYPES {
                if let Some(b) = cfg.get(format!("add_{typ}_token")).and_then(Json::as_bool) {
                    adds.push((typ, b));
                }
                let content = match cfg.get(format!("{typ}_token")) {
                    Some(Json::String(s)) => s.clone(),
                    Some(Json::Object(o)) => match o.get("content") {
                        Some(Json::String(s)) => s.clone(),
                        _ => continue,
                    },
                    _ => continue,
                };
                let id = added
                    .iter()
                    .find(|a| a.get("content").and_then(Json::as_str) == Some(content.as_str()))
                    .and_then(|a| a.get("id"))
                    .and_then(Json::as_u64);
                set(&mut ids, typ, id);
            }
        }
    }
    let cj = hf_dir.join("config.json");
    if cj.is_file() {
        let cfg = read_json(&cj, "config.json")?;
        for typ in SPECIAL_TYPES {
            let id = cfg.get(format!("{typ}_token_id")).and_then(Json::as_u64);
            set(&mut ids, typ, id);
        }
    }
    let mut out: Vec<(String, Value)> = ids
        .into_iter()
        .map(|(t, id)| (special_key(t).to_owned(), Value::U32(id)))
        .collect();
    for (typ, b) in adds {
        // gguf-py only has writers for the BOS and EOS flags.
        if typ == "bos" || typ == "eos" {
            out.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(b)));
        }
    }
    Ok(out)
}

fn check_shape(name: &str, got: &[usize], expected: &[usize], note: &str) -> Result<(), Error> {
    if got != expected {
        return Err(Error::ShapeMismatch {
            tensor: name.to_owned(),
            expected: expected.to_vec(),
            got: got.to_vec(),
            note: note.to_owned(),
        });
    }
    Ok(())
}

fn predictor_file(dir: &Path, layer: usize) -> Option<PathBuf> {
    ["pt", "safetensors"]
        .iter()
        .map(|ext| dir.join(format!("model_{layer}.{ext}")))
        .find(|p| p.is_file())
}

/// The predictor tensors of every layer, checked: `fc1.weight` `[H, n_embd]` and
/// `fc2.weight` `[n_ff, H]` in `model_{i}.pt` or `model_{i}.safetensors`.
fn load_predictors(dir: &Path, p: &HfParams) -> Result<Vec<(String, LazyTensor)>, Error> {
    if !dir.is_dir() {
        return Err(Error::MissingFile {
            what: "predictor directory",
            path: dir.to_path_buf(),
        });
    }
    let mut out = Vec::new();
    for layer in 0..p.n_layer {
        let path = predictor_file(dir, layer).ok_or_else(|| Error::MissingPredictor {
            layer,
            dir: dir.to_path_buf(),
        })?;
        let mut fc1 = None;
        let mut fc2 = None;
        for t in open_tensors(&path)? {
            match t.name.as_str() {
                "fc1.weight" => fc1 = Some(t),
                "fc2.weight" => fc2 = Some(t),
                _ => {
                    return Err(Error::UnexpectedTensor { name: t.name, path });
                }
            }
        }
        let name1 = format!("blk.{layer}.fc1.weight");
        let name2 = format!("blk.{layer}.fc2.weight");
        let fc1 =
            fc1.ok_or_else(|| Error::MissingTensor(format!("fc1.weight in {}", path.display())))?;
        let fc2 =
            fc2.ok_or_else(|| Error::MissingTensor(format!("fc2.weight in {}", path.display())))?;
        if fc1.shape.len() != 2 || fc1.shape[0] == 0 {
            return Err(Error::ShapeMismatch {
                tensor: name1,
                expected: vec![fc1.shape.first().copied().unwrap_or(0).max(1), p.n_embd],
                got: fc1.shape.clone(),
                note: " (fc1 must be [hidden, n_embd] with hidden > 0)".into(),
            });
        }
        let h = fc1.shape[0];
        check_shape(
            &name1,
            &fc1.shape,
            &[h, p.n_embd],
            " (fc1 must be [hidden, n_embd])",
        )?;
        check_shape(
            &name2,
            &fc2.shape,
            &[p.n_ff, h],
            " (fc2 must be [n_ff, hidden] with fc1's hidden size)",
        )?;
        out.push((name1, fc1));
        out.push((name2, fc2));
    }
    let extra = p.n_layer;
    if let Some(f) = predictor_file(dir, extra) {
        return Err(Error::Predictor(format!(
            "{} is a predictor for layer {extra}, but the model has {} layers",
            f.display(),
            p.n_layer
        )));
    }
    Ok(out)
}

fn sparse_threshold_of(dir: &Path) -> Result<Option<f32>, Error> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let j = read_json(&path, "predictor config.json")?;
    match j.get("sparse_threshold") {
        None | Some(Json::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| Error::Config {
                path,
                msg: "sparse_threshold is not a number".into(),
            }),
    }
}

/// Converts a Hugging Face LLaMA directory (with an optional PowerInfer predictor directory)
/// into `out`. Tensors are streamed one at a time; `progress` is called after each.
pub fn convert_hf(
    hf_dir: &Path,
    predictor_dir: Option<&Path>,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<ConvertReport, Error> {
    let params = HfParams::load(hf_dir)?;
    if predictor_dir.is_some() && params.hidden_act != "relu" {
        return Err(Error::Predictor(format!(
            "hidden_act is {:?}: PowerInfer's sparse FFN needs a ReLU model (convert without predictors for a plain GGUF)",
            params.hidden_act
        )));
    }
    let files = find_model_files(hf_dir)?;
    let mut model: Vec<LazyTensor> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for f in &files {
        for t in open_tensors(f)? {
            if !seen.insert(t.name.clone()) {
                return Err(Error::DuplicateTensor(t.name));
            }
            model.push(t);
        }
    }
    let vocab = load_vocab(hf_dir, params.n_vocab)?;
    let specials = special_vocab(hf_dir, vocab.scores.len())?;
    let sparse = predictor_dir.is_some();
    let predictors = match predictor_dir {
        Some(d) => load_predictors(d, &params)?,
        None => Vec::new(),
    };
    let threshold = match predictor_dir {
        Some(d) => match opts.sparse_threshold {
            Some(t) => Some(t),
            None => sparse_threshold_of(d)?,
        },
        None => None,
    };

    // Plan every tensor: name, transform, output shape and type.
    let p = &params;
    let hd = p.head_dim();
    let mut plan: Vec<Planned> = Vec::new();
    for t in model {
        let Some(mapped) = gguf_name(&t.name) else {
            return Err(Error::UnexpectedTensor {
                name: t.name.clone(),
                path: t.path.clone(),
            });
        };
        let Some(mut name) = mapped else { continue };
        if !t.dtype.is_convertible() {
            return Err(Error::UnsupportedDtype {
                tensor: t.name.clone(),
                dtype: t.dtype.to_string(),
            });
        }
        let short = name.rsplit_once('.').map_or(name.as_str(), |x| x.0);
        let kind = short.rsplit('.').next().unwrap_or(short).to_owned();
        if let Some(layer) = name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok())
            && layer >= p.n_layer
        {
            return Err(Error::UnexpectedTensor {
                name: t.name.clone(),
                path: t.path.clone(),
            });
        }
        let is_weight = name.ends_with(".weight");
        let expected: Option<Vec<usize>> = if !is_weight {
            None
        } else {
            match kind.as_str() {
                "token_embd" | "output" => Some(vec![p.n_vocab, p.n_embd]),
                "output_norm" | "attn_norm" | "ffn_norm" => Some(vec![p.n_embd]),
                "attn_q" | "attn_output" => Some(vec![p.n_embd, p.n_embd]),
                "attn_k" | "attn_v" => Some(vec![p.n_head_kv * hd, p.n_embd]),
                "ffn_gate" | "ffn_up" => Some(vec![p.n_ff, p.n_embd]),
                "ffn_down" => Some(vec![p.n_embd, p.n_ff]),
                _ => None,
            }
        };
        if let Some(e) = expected {
            check_shape(&t.name, &t.shape, &e, "")?;
        }
        let mut shape = t.shape.clone();
        let transform = match kind.as_str() {
            "attn_q" if is_weight => Transform::Permute(p.n_head),
            "attn_k" if is_weight => Transform::Permute(p.n_head_kv),
            "ffn_down" if sparse && is_weight => {
                name = name.replace("ffn_down", "ffn_down_t");
                shape.reverse();
                Transform::Transpose
            }
            _ => Transform::None,
        };
        if let Transform::Permute(h) = transform
            && (shape.len() != 2 || !shape[0].is_multiple_of(2 * h))
        {
            return Err(Error::ShapeMismatch {
                tensor: t.name.clone(),
                expected: vec![p.n_embd, p.n_embd],
                got: shape,
                note: format!(" (rows must be a multiple of 2 x {h} heads)"),
            });
        }
        let ty = if shape.len() > 1 && opts.outtype == OutType::F16 {
            GgmlType::F16
        } else {
            GgmlType::F32
        };
        plan.push(Planned {
            name,
            src: t,
            transform,
            shape,
            ty,
        });
    }
    // The reference writes whatever the checkpoint holds; a model missing a required
    // tensor would only fail at load time, so refuse it here.
    let mut required = vec![
        "token_embd.weight".to_owned(),
        "output_norm.weight".to_owned(),
    ];
    for l in 0..p.n_layer {
        let down = if sparse { "ffn_down_t" } else { "ffn_down" };
        for k in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            down,
        ] {
            required.push(format!("blk.{l}.{k}.weight"));
        }
    }
    for r in required {
        if !plan.iter().any(|e| e.name == r) {
            return Err(Error::MissingTensor(r));
        }
    }
    for (name, t) in predictors {
        if !t.dtype.is_convertible() {
            return Err(Error::UnsupportedDtype {
                tensor: format!("{} in {}", t.name, t.path.display()),
                dtype: t.dtype.to_string(),
            });
        }
        let ty = if opts.outtype == OutType::F16 {
            GgmlType::F16
        } else {
            GgmlType::F32
        };
        plan.push(Planned {
            name,
            shape: t.shape.clone(),
            src: t,
            transform: Transform::None,
            ty,
        });
    }

    // Metadata, in the reference's order.
    let magic = if sparse { Magic::Pwri } else { Magic::Gguf };
    let mut w = GgufWriter::new(magic);
    w.add_kv("general.architecture", Value::from("llama"))?;
    let name = if p.n_ctx == 4096 {
        "LLaMA v2".to_owned()
    } else {
        let dir = files[0]
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| hf_dir.to_path_buf());
        let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    w.add_kv("general.name", Value::from(name.as_str()))?;
    let u32v = |v: usize| -> Result<Value, Error> {
        u32::try_from(v).map(Value::U32).map_err(|_| Error::Config {
            path: hf_dir.join("config.json"),
            msg: format!("{v} does not fit the file's 32-bit field"),
        })
    };
    w.add_kv("llama.context_length", u32v(p.n_ctx)?)?;
    w.add_kv("llama.embedding_length", u32v(p.n_embd)?)?;
    w.add_kv("llama.block_count", u32v(p.n_layer)?)?;
    w.add_kv("llama.feed_forward_length", u32v(p.n_ff)?)?;
    w.add_kv("llama.rope.dimension_count", u32v(hd)?)?;
    w.add_kv("llama.attention.head_count", u32v(p.n_head)?)?;
    w.add_kv("llama.attention.head_count_kv", u32v(p.n_head_kv)?)?;
    w.add_kv(
        "llama.attention.layer_norm_rms_epsilon",
        Value::F32(p.norm_eps as f32),
    )?;
    if let Some(theta) = p.rope_theta {
        w.add_kv("llama.rope.freq_base", Value::F32(theta as f32))?;
    }
    if let Some((ty, factor, orig, ft)) = &p.rope_scaling {
        w.add_kv("llama.rope.scaling.type", Value::from(ty.as_str()))?;
        w.add_kv("llama.rope.scaling.factor", Value::F32(*factor as f32))?;
        if let Some(o) = orig {
            w.add_kv(
                "llama.rope.scaling.original_context_length",
                u32v(*o as usize)?,
            )?;
        }
        if let Some(f) = ft {
            w.add_kv("llama.rope.scaling.finetuned", Value::Bool(*f))?;
        }
    }
    let file_type = match opts.outtype {
        OutType::F32 => 0,
        OutType::F16 => 1,
    };
    w.add_kv("general.file_type", Value::U32(file_type))?;
    if let Some(t) = threshold {
        w.add_kv("powerinfer.sparse_threshold", Value::F32(t))?;
    }
    w.add_kv("tokenizer.ggml.model", Value::from("llama"))?;
    w.add_kv(
        "tokenizer.ggml.tokens",
        Value::Array(Array::String(vocab.tokens)),
    )?;
    w.add_kv(
        "tokenizer.ggml.scores",
        Value::Array(Array::F32(vocab.scores)),
    )?;
    w.add_kv(
        "tokenizer.ggml.token_type",
        Value::Array(Array::I32(vocab.types)),
    )?;
    for (k, v) in specials {
        w.add_kv(k, v)?;
    }
    for e in &plan {
        let ne: Vec<u64> = e.shape.iter().rev().map(|&d| d as u64).collect();
        w.add_tensor_info(e.name.clone(), e.ty, &ne)?;
    }
    let file_size = w.file_size();
    let total = plan.len();

    write_atomically(out, |sink| {
        let mut s = w.begin(sink)?;
        for (i, e) in plan.iter().enumerate() {
            let t = e.src.load()?;
            let es = t.dtype.size();
            let data = match e.transform {
                Transform::None => t.data,
                Transform::Permute(h) => {
                    let rows = t.shape[0];
                    let row_bytes = t.shape[1] * es;
                    tensor::permute_qk(&t.data, rows, row_bytes, h).ok_or_else(|| {
                        Error::ShapeMismatch {
                            tensor: t.name.clone(),
                            expected: e.shape.clone(),
                            got: t.shape.clone(),
                            note: " (cannot permute)".into(),
                        }
                    })?
                }
                Transform::Transpose => tensor::transpose(&t.data, t.shape[0], t.shape[1], es),
            };
            let bytes = match e.ty {
                GgmlType::F16 => tensor::bytes_to_f16_bytes(t.dtype, &data),
                _ => tensor::bytes_to_f32_bytes(t.dtype, &data),
            }
            .ok_or_else(|| Error::UnsupportedDtype {
                tensor: t.name.clone(),
                dtype: t.dtype.to_string(),
            })?;
            s.write_tensor_data(&e.name, &bytes)?;
            progress(Progress {
                done: i + 1,
                total,
                tensor: &e.name,
                bytes: bytes.len() as u64,
            });
        }
        s.finish()?;
        Ok(())
    })?;
    Ok(ConvertReport {
        magic,
        n_tensors: total,
        n_predictor_layers: if sparse { p.n_layer } else { 0 },
        sparse_threshold: threshold,
        file_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_model_files_like_the_reference() {
        let dir = std::env::temp_dir().join(format!("pi-convert-find-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let touch = |n: &str| std::fs::write(dir.join(n), b"").unwrap();
        assert!(matches!(
            find_model_files(&dir),
            Err(Error::MissingFile { .. })
        ));
        touch("pytorch_model.bin");
        assert_eq!(
            find_model_files(&dir).unwrap(),
            vec![dir.join("pytorch_model.bin")]
        );
        // Shards of safetensors win over PyTorch files.
        touch("model-00001-of-00002.safetensors");
        touch("model-00002-of-00002.safetensors");
        assert_eq!(
            find_model_files(&dir).unwrap(),
            vec![
                dir.join("model-00001-of-00002.safetensors"),
                dir.join("model-00002-of-00002.safetensors")
            ]
        );
        // Both a sharded and a single safetensors: ambiguous.
        touch("model.safetensors");
        assert!(matches!(find_model_files(&dir), Err(Error::Config { .. })));
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        // A missing shard.
        std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
        assert!(matches!(
            find_model_files(&dir),
            Err(Error::MissingFile { .. })
        ));
        std::fs::remove_file(dir.join("model-00001-of-00002.safetensors")).unwrap();
        touch("pytorch_model-00001-of-00003.bin");
        touch("pytorch_model-00002-of-00003.bin");
        touch("pytorch_model-00003-of-00003.bin");
        // Sharded and single pytorch_model: ambiguous, like the reference.
        assert!(find_model_files(&dir).is_err());
        std::fs::remove_file(dir.join("pytorch_model.bin")).unwrap();
        assert_eq!(find_model_files(&dir).unwrap().len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn names_map_like_the_reference() {
        let m = |s: &str| gguf_name(s);
        assert_eq!(
            m("model.embed_tokens.weight"),
            Some(Some("token_embd.weight".into()))
        );
        assert_eq!(m("lm_head.weight"), Some(Some("output.weight".into())));
        assert_eq!(
            m("model.norm.weight"),
            Some(Some("output_norm.weight".into()))
        );
        assert_eq!(
            m("model.layers.12.mlp.down_proj.weight"),
            Some(Some("blk.12.ffn_down.weight".into()))
        );
        assert_eq!(
            m("model.layers.0.self_attn.q_proj.bias"),
            Some(Some("blk.0.attn_q.bias".into()))
        );
        assert_eq!(
            m("model.layers.3.self_attn.rotary_emb.inv_freq"),
            Some(None)
        );
        assert_eq!(m("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(m("transformer.h.0.attn.weight"), None);
    }
}
