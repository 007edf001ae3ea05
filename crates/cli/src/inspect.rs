//! `powerinfer inspect FILE`: what a GGUF, PWRI or `.gpuidx` file holds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use powerinfer_gguf::{GgufFile, Value};
use serde_json::{Map, Value as Json, json};

/// Arguments of `powerinfer inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The model or placement file to inspect.
    pub file: PathBuf,
    /// List every tensor (name, type, shape, offset, bytes).
    #[arg(long)]
    pub tensors: bool,
    /// Print all metadata keys (long arrays abbreviated).
    #[arg(long)]
    pub metadata: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Hyper-parameter keys shown for a model, as `(label, key suffix after "{arch}.")`.
const HPARAMS: &[(&str, &str)] = &[
    ("layers", "block_count"),
    ("embedding", "embedding_length"),
    ("feed-forward", "feed_forward_length"),
    ("heads", "attention.head_count"),
    ("kv heads", "attention.head_count_kv"),
    ("head dim (k)", "attention.key_length"),
    ("context", "context_length"),
    ("rope base", "rope.freq_base"),
    ("rope dims", "rope.dimension_count"),
    ("norm eps", "attention.layer_norm_rms_epsilon"),
    ("sliding window", "attention.sliding_window"),
];

/// Runs the subcommand.
pub fn run(args: &InspectArgs) -> Result<(), String> {
    let file = GgufFile::open(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let report = build_report(&file, args);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print_text(&report, args);
    }
    Ok(())
}

fn scalar_json(v: &Value) -> Json {
    match v {
        Value::U8(x) => json!(x),
        Value::I8(x) => json!(x),
        Value::U16(x) => json!(x),
        Value::I16(x) => json!(x),
        Value::U32(x) => json!(x),
        Value::I32(x) => json!(x),
        Value::U64(x) => json!(x),
        Value::I64(x) => json!(x),
        Value::F32(x) => json!(x),
        Value::F64(x) => json!(x),
        Value::Bool(x) => json!(x),
        Value::String(s) => json!(s),
        Value::Array(items) => {
            const SHOWN: usize = 8;
            let first: Vec<Json> = items.iter().take(SHOWN).map(|v| scalar_json(&v)).collect();
            if items.len() <= SHOWN {
                Json::Array(first)
            } else {
                json!({
                    "array_len": items.len(),
                    "first": first,
                })
            }
        }
    }
}

fn build_report(file: &GgufFile, args: &InspectArgs) -> Json {
    let arch = file.architecture().unwrap_or("(none)").to_string();
    let mut out = Map::new();
    out.insert("file".into(), json!(args.file.display().to_string()));
    out.insert("format".into(), json!(file.magic().name()));
    out.insert("version".into(), json!(file.version()));
    out.insert("file_size".into(), json!(file.file_size()));
    out.insert("architecture".into(), json!(arch));
    if let Ok(name) = file.get_str("general.name") {
        out.insert("name".into(), json!(name));
    }

    if arch == "generic.gpu_index" {
        out.insert("kind".into(), json!("gpu placement index (.gpuidx)"));
        if let Some(v) = file.get("split.vram_capacity") {
            out.insert("vram_capacity".into(), scalar_json(v));
        }
        let mut layers = Vec::new();
        for t in file.tensors() {
            if let Some(layer) = t
                .name
                .strip_prefix("blk.")
                .and_then(|r| r.strip_suffix(".gpu_bucket"))
            {
                layers.push(json!({"layer": layer, "gpu_neurons": t.n_elements()}));
            }
        }
        out.insert("layers".into(), Json::Array(layers));
    } else {
        let mut hp = Map::new();
        for (label, suffix) in HPARAMS {
            if let Some(v) = file.get(&format!("{arch}.{suffix}")) {
                hp.insert((*label).to_string(), scalar_json(v));
            }
        }
        out.insert("hyperparameters".into(), Json::Object(hp));
        let mut tok = Map::new();
        if let Ok(model) = file.get_str("tokenizer.ggml.model") {
            tok.insert("model".into(), json!(model));
        }
        if let Some(Value::Array(tokens)) = file.get("tokenizer.ggml.tokens") {
            tok.insert("vocab_size".into(), json!(tokens.len()));
        }
        if let Ok(pre) = file.get_str("tokenizer.ggml.pre") {
            tok.insert("pre".into(), json!(pre));
        }
        tok.insert(
            "chat_template".into(),
            json!(file.get("tokenizer.chat_template").is_some()),
        );
        out.insert("tokenizer".into(), Json::Object(tok));
        if file.magic() == powerinfer_gguf::Magic::Pwri {
            let threshold = file
                .get("powerinfer.sparse_threshold")
                .and_then(Value::as_f32)
                .unwrap_or(0.0);
            let predictors = file
                .tensors()
                .iter()
                .filter(|t| t.name.ends_with(".fc1.weight"))
                .count();
            let mut sparse = Map::new();
            sparse.insert("sparse_threshold".into(), json!(threshold));
            sparse.insert("predictor_layers".into(), json!(predictors));
            if file.get("powerinfer.synthetic").is_some() {
                sparse.insert(
                    "synthetic".into(),
                    json!("random weights for speed and scale tests only; the text is meaningless"),
                );
            }
            out.insert("sparse".into(), Json::Object(sparse));
        } else if let Some(d) = file
            .get("general.description")
            .and_then(Value::as_str)
            .filter(|d| d.starts_with("Synthetic model"))
        {
            // The dense twin of a synthetic PowerInfer file (`powerinfer synth --dense`) has no
            // powerinfer.* keys (llama.cpp must load it); its description says what it is.
            out.insert("synthetic".into(), json!(d));
        }
    }

    let mut hist: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut total_bytes = 0u64;
    for t in file.tensors() {
        let e = hist.entry(t.ty.name()).or_default();
        e.0 += 1;
        e.1 += t.size;
        total_bytes += t.size;
    }
    out.insert("tensor_count".into(), json!(file.tensors().len()));
    out.insert("tensor_bytes".into(), json!(total_bytes));
    out.insert(
        "tensor_types".into(),
        Json::Object(
            hist.iter()
                .map(|(k, (n, b))| ((*k).to_string(), json!({"count": n, "bytes": b})))
                .collect(),
        ),
    );
    if args.tensors {
        out.insert(
            "tensors".into(),
            Json::Array(
                file.tensors()
                    .iter()
                    .map(|t| {
                        json!({"name": t.name, "type": t.ty.name(), "shape": t.shape,
                               "offset": t.offset, "bytes": t.size})
                    })
                    .collect(),
            ),
        );
    }
    if args.metadata {
        out.insert(
            "metadata".into(),
            Json::Object(
                file.metadata()
                    .iter()
                    .map(|(k, v)| (k.clone(), scalar_json(v)))
                    .collect(),
            ),
        );
    }
    Json::Object(out)
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.2} {}", UNITS[u])
    }
}

fn compact(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn print_text(r: &Json, args: &InspectArgs) {
    let get = |k: &str| r.get(k).cloned().unwrap_or(Json::Null);
    println!("file          {}", compact(&get("file")));
    println!(
        "format        {} v{}",
        compact(&get("format")),
        compact(&get("version"))
    );
    let size = get("file_size").as_u64().unwrap_or(0);
    println!("size          {} ({size} bytes)", human_bytes(size));
    println!("architecture  {}", compact(&get("architecture")));
    if let Some(name) = r.get("name") {
        println!("name          {}", compact(name));
    }
    if let Some(kind) = r.get("kind") {
        println!("kind          {}", compact(kind));
        if let Some(cap) = r.get("vram_capacity") {
            let cap = cap.as_u64().unwrap_or(0);
            println!("vram budget   {} ({cap} bytes)", human_bytes(cap));
        }
        if let Some(Json::Array(layers)) = r.get("layers") {
            for l in layers {
                println!(
                    "  layer {:>3}: {} GPU neurons",
                    compact(&l["layer"]),
                    compact(&l["gpu_neurons"])
                );
            }
        }
    }
    if let Some(Json::Object(hp)) = r.get("hyperparameters") {
        for (k, v) in hp {
            println!("  {k:<16}{}", compact(v));
        }
    }
    if let Some(Json::Object(tok)) = r.get("tokenizer") {
        let parts: Vec<String> = tok
            .iter()
            .map(|(k, v)| format!("{k}={}", compact(v)))
            .collect();
        println!("tokenizer     {}", parts.join(" "));
    }
    if let Some(Json::Object(sp)) = r.get("sparse") {
        println!(
            "sparse        PowerInfer file: threshold {}, predictors for {} layers",
            compact(&sp["sparse_threshold"]),
            compact(&sp["predictor_layers"])
        );
        if let Some(s) = sp.get("synthetic") {
            println!("SYNTHETIC     {}", compact(s));
        }
    }
    if let Some(s) = r.get("synthetic") {
        println!("SYNTHETIC     {}", compact(s));
    }
    println!(
        "tensors       {} ({})",
        compact(&get("tensor_count")),
        human_bytes(get("tensor_bytes").as_u64().unwrap_or(0))
    );
    if let Some(Json::Object(h)) = r.get("tensor_types") {
        for (ty, v) in h {
            println!(
                "  {ty:<8}{:>6} tensors  {:>12}",
                compact(&v["count"]),
                human_bytes(v["bytes"].as_u64().unwrap_or(0))
            );
        }
    }
    if let (true, Some(Json::Object(m))) = (args.metadata, r.get("metadata")) {
        println!("metadata");
        for (k, v) in m {
            println!("  {k} = {}", compact(v));
        }
    }
    if let Some(Json::Array(ts)) = r.get("tensors") {
        println!(
            "{:<40} {:<8} {:<24} {:>12} {:>12}",
            "name", "type", "shape", "offset", "bytes"
        );
        for t in ts {
            println!(
                "{:<40} {:<8} {:<24} {:>12} {:>12}",
                compact(&t["name"]),
                compact(&t["type"]),
                compact(&t["shape"]),
                compact(&t["offset"]),
                compact(&t["bytes"])
            );
        }
    }
}
