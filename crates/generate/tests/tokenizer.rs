//! Tokenizers against independent references:
//!
//! - SentencePiece's own ids for the PowerInfer tiny fixture vocabulary
//!   (shared/fixtures/powerinfer-tiny/golden/tokenizer_powerinfer.json);
//! - llama.cpp's prompt ids and generated ids for the golden prompts of SmolLM2 (byte-level BPE)
//!   and Gemma 3 (SentencePiece) (tests/data/llamacpp-token-ids.json);
//! - llama.cpp's ids for tricky strings (unicode, emoji, CJK, digits, whitespace runs, special
//!   tokens, a 3 KB paragraph) on both models (tests/data/tokenizer-llamacpp-extra.json);
//! - round trips and an encoding speed check on 100 KB of Austen.
//!
//! Real models are looked up in `$POWERINFER_MODELS_DIR` or `<repo>/models`; tests that need one
//! print a note and pass when it is absent. The shared data directory is `$SHARED_DIR`,
//! `<repo>/../shared` or `/work/shared`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use powerinfer_generate::tokenizer::{
    StreamDecoder, TokenType, Tokenizer, TokenizerKind, data_from_gguf,
};
use powerinfer_gguf::GgufFile;
use serde_json::Value as Json;

const SMOL: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const GEMMA: &str = "gemma-3-270m-q4_k_m.gguf";

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn repo_dir() -> PathBuf {
    crate_dir().join("../..")
}

fn shared_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("SHARED_DIR") {
        return Some(PathBuf::from(d));
    }
    [repo_dir().join("../shared"), PathBuf::from("/work/shared")]
        .into_iter()
        .find(|p| p.is_dir())
}

fn model_path(name: &str) -> Option<PathBuf> {
    let dir = std::env::var("POWERINFER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_dir().join("models"));
    let p = dir.join(name);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("note: {} not found, skipping", p.display());
        None
    }
}

fn load(path: &Path) -> Tokenizer {
    let t0 = Instant::now();
    let file = GgufFile::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t1 = Instant::now();
    let tok = Tokenizer::from_gguf(&file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    eprintln!(
        "{}: GGUF open {:.1} ms, tokenizer build {:.1} ms ({} tokens)",
        path.display(),
        (t1 - t0).as_secs_f64() * 1e3,
        t1.elapsed().as_secs_f64() * 1e3,
        tok.vocab_size()
    );
    tok
}

/// The tokenizer of a real model, loaded once per test binary.
fn model(name: &'static str) -> Option<&'static Tokenizer> {
    static SMOL_TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    static GEMMA_TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let cell = if name == SMOL { &SMOL_TOK } else { &GEMMA_TOK };
    cell.get_or_init(|| model_path(name).map(|p| load(&p)))
        .as_ref()
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn pieces(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter()
        .map(|&i| tok.token_text(i).unwrap_or("?").to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The PowerInfer tiny fixture against SentencePiece

fn fixture_dir() -> Option<PathBuf> {
    let d = shared_dir()?.join("fixtures/powerinfer-tiny");
    if d.is_dir() {
        Some(d)
    } else {
        eprintln!("note: {} not found, skipping", d.display());
        None
    }
}

/// Our encoding equals SentencePiece's (`ids_sentencepiece_add_bos`) on all nine strings.
#[test]
fn fixture_matches_sentencepiece() {
    let Some(dir) = fixture_dir() else { return };
    let tok = load(&dir.join("tiny-relu-llama.dense.f16.gguf"));
    assert_eq!(tok.kind(), TokenizerKind::Spm);
    assert_eq!(tok.vocab_size(), 1024);
    let golden = read_json(&dir.join("golden/tokenizer_powerinfer.json"));
    let cases = golden.as_array().expect("cases");
    assert_eq!(cases.len(), 9);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids_sentencepiece_add_bos"]);
        let got = tok.encode(text, true, false);
        assert_eq!(
            got,
            want,
            "{text:?}: {:?} vs {:?}",
            pieces(&tok, &got),
            pieces(&tok, &want)
        );
        let want_pieces: Vec<String> = case["pieces_special_false"]
            .as_array()
            .expect("pieces")
            .iter()
            .map(|p| p.as_str().expect("piece").to_owned())
            .collect();
        assert_eq!(pieces(&tok, &got), want_pieces, "{text:?}");
        assert_eq!(tok.decode(&got, false), text, "round trip {text:?}");
    }
}

/// The reference PowerInfer's `ids_special_true` differ from SentencePiece only by the missing
/// leading `▁`: its old llama.cpp fork did not prepend the space when parsing special tokens.
/// Reproduced exactly by turning `add_space_prefix` off and parsing special tokens.
#[test]
fn fixture_reference_quirk_is_the_missing_space_prefix() {
    let Some(dir) = fixture_dir() else { return };
    let file = GgufFile::open(dir.join("tiny-relu-llama.dense.f16.gguf")).expect("open");
    let mut data = data_from_gguf(&file).expect("data");
    data.add_space_prefix = Some(false);
    let no_prefix = Tokenizer::from_parts(data).expect("tokenizer");
    let golden = read_json(&dir.join("golden/tokenizer_powerinfer.json"));
    for case in golden.as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let want = ids(&case["ids_special_true"]);
        assert_eq!(no_prefix.encode(text, true, true), want, "{text:?}");
    }
    // And with the prefix (modern llama.cpp), "<s>special</s>" parses both control tokens.
    let tok = load(&dir.join("tiny-relu-llama.dense.f16.gguf"));
    let got = tok.encode("<s>special</s>", true, true);
    assert_eq!(got[..2], [1, 1]);
    assert_eq!(*got.last().expect("ids"), 2);
    assert!(pieces(&tok, &got[2..3])[0].starts_with("▁s"));
}

// ---------------------------------------------------------------------------------------------
// llama.cpp references on the real models

fn check_llamacpp_file(path: &Path, prompt_key: &str, ids_key: &str) -> usize {
    let data = read_json(path);
    let mut checked = 0;
    for case in data["cases"].as_array().expect("cases") {
        let name = case["model"].as_str().expect("model");
        let name: &'static str = if name == SMOL {
            SMOL
        } else if name == GEMMA {
            GEMMA
        } else {
            panic!("unknown model {name}")
        };
        let Some(tok) = model(name) else { continue };
        let text = case[prompt_key].as_str().expect("text");
        let want = ids(&case[ids_key]);
        let got = tok.encode(text, true, true);
        assert_eq!(
            got,
            want,
            "{name} {text:?}\n ours:     {:?}\n llama.cpp: {:?}",
            pieces(tok, &got),
            pieces(tok, &want)
        );
        checked += 1;
    }
    checked
}

/// Prompt ids equal llama.cpp's; generated ids decode to llama.cpp's text, whole and streamed;
/// the stop token (when any) is end-of-generation.
#[test]
fn llamacpp_golden_prompts_and_continuations() {
    let path = crate_dir().join("tests/data/llamacpp-token-ids.json");
    if !path.is_file() {
        eprintln!("note: {} not found, skipping", path.display());
        return;
    }
    let checked = check_llamacpp_file(&path, "prompt", "prompt_ids");
    let data = read_json(&path);
    for case in data["cases"].as_array().expect("cases") {
        let name = if case["model"] == SMOL { SMOL } else { GEMMA };
        let Some(tok) = model(name) else { continue };
        let generated = ids(&case["generated_ids"]);
        let text = case["text"].as_str().expect("text");
        let joined: Vec<u8> = generated
            .iter()
            .flat_map(|&i| tok.token_to_piece(i, true).to_vec())
            .collect();
        assert_eq!(String::from_utf8_lossy(&joined), text, "{name}");
        let mut dec = StreamDecoder::new(true);
        let mut streamed = String::new();
        for &i in &generated {
            streamed.push_str(&dec.push(tok, i));
        }
        streamed.push_str(&dec.flush());
        assert_eq!(streamed, text, "{name} streamed");
        for &i in &generated {
            assert!(
                !tok.is_eog(i),
                "{name}: generated id {i} is not end-of-generation"
            );
        }
        if let Some(e) = case["eog_id"].as_u64() {
            assert!(tok.is_eog(e as u32), "{name}: eog_id {e}");
        }
    }
    eprintln!("checked {checked} prompts against llama.cpp");
}

/// Tricky strings (unicode, emoji, CJK, numbers, whitespace runs, special tokens, 3 KB of prose)
/// tokenize exactly as llama.cpp does, on both models.
#[test]
fn llamacpp_tricky_strings() {
    let path = crate_dir().join("tests/data/tokenizer-llamacpp-extra.json");
    let checked = check_llamacpp_file(&path, "text", "ids");
    eprintln!("checked {checked} strings against llama.cpp");
}

const TRICKY: &[&str] = &[
    "",
    "Hello, world!",
    " leading space",
    "trailing space ",
    "   ",
    "\n",
    "\n\n\nthree newlines then text\n",
    "tabs\tand\t\ttabs",
    "digits 0123456789 and 3.14159 and 1,000,000",
    "unicode: 田中 café naïve Ωmega ß ﬁ",
    "emoji 🙂👍🏽🎉 and a ZWJ family 👨‍👩‍👧",
    "CJK 日本語のテキスト 中文字符 한국어",
    "whitespace   runs  \t \n  mixed",
    "it's we've they'll I'd DON'T",
    "combining e\u{301} and Devanagari नमस्ते",
    "\u{feff}BOM and \u{200b}zero width",
    "<|im_start|> and <start_of_turn> as plain text",
];

fn round_trip(tok: &Tokenizer, what: &str) {
    for s in TRICKY {
        let ids = tok.encode(s, true, false);
        assert_eq!(tok.decode(&ids, false), *s, "{what} {s:?}");
        // Streaming gives the same text, whatever the split of characters across tokens.
        let mut dec = StreamDecoder::new(false);
        let mut out = String::new();
        let mut skip = tok.add_space_prefix() && tok.kind() == TokenizerKind::Spm;
        for &i in &ids {
            let chunk = dec.push(tok, i);
            if skip && !chunk.is_empty() {
                skip = false;
                out.push_str(chunk.strip_prefix(' ').unwrap_or(&chunk));
            } else {
                out.push_str(&chunk);
            }
        }
        out.push_str(&dec.flush());
        assert_eq!(out, *s, "{what} streamed {s:?}");
    }
}

#[test]
fn round_trips_smollm2() {
    if let Some(tok) = model(SMOL) {
        round_trip(tok, "smollm2");
    }
}

#[test]
fn round_trips_gemma3() {
    if let Some(tok) = model(GEMMA) {
        round_trip(tok, "gemma3");
    }
}

#[test]
fn round_trips_fixture() {
    let Some(dir) = fixture_dir() else { return };
    round_trip(
        &load(&dir.join("tiny-relu-llama.dense.f16.gguf")),
        "fixture",
    );
}

/// Special-token metadata as llama.cpp reads it.
#[test]
fn special_tokens_and_eog() {
    if let Some(tok) = model(SMOL) {
        assert_eq!(
            tok.kind(),
            TokenizerKind::Bpe(powerinfer_generate::tokenizer::PreTokenizer::DigitsThenGpt2)
        );
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.n_merges(), 48900);
        assert!(!tok.add_bos());
        assert_eq!((tok.bos(), tok.eos()), (Some(1), Some(2)));
        // <|endoftext|>, <|im_end|> and <reponame> (a FIM repo marker for llama.cpp).
        assert_eq!(tok.eog_ids(), [0, 2, 4]);
        assert_eq!(tok.token_type(1), Some(TokenType::Control));
        assert_eq!(
            tok.encode("<|im_start|>user", false, true),
            [1, tok.token_id("user").expect("user")]
        );
        assert_ne!(tok.encode("<|im_start|>", false, false), [1]);
        assert_eq!(tok.token_to_piece(2, false), b"");
        assert_eq!(tok.token_to_piece(2, true), b"<|im_end|>");
    }
    if let Some(tok) = model(GEMMA) {
        assert_eq!(tok.kind(), TokenizerKind::Spm);
        assert_eq!(tok.vocab_size(), 262144);
        assert!(tok.add_bos());
        assert!(!tok.add_space_prefix());
        assert_eq!(
            (tok.bos(), tok.eos(), tok.eot()),
            (Some(2), Some(1), Some(106))
        );
        assert!(tok.is_eog(1) && tok.is_eog(106) && !tok.is_eog(2));
        assert_eq!(tok.token_type(107), Some(TokenType::UserDefined));
        // "\n\n" is a user-defined token: matched whole even without parse_special.
        assert_eq!(tok.encode("a\n\nb", false, false)[1], 108);
        assert_eq!(tok.encode("<start_of_turn>", true, true), [2, 105]);
    }
}

/// 100 KB of prose encodes in well under two seconds (no quadratic blow-up in the SentencePiece
/// merge over one long fragment, nor in special-token splitting) and round-trips.
#[test]
fn encoding_speed_100k() {
    let Some(shared) = shared_dir() else { return };
    let path = shared.join("data/austen/austen-pp-100k.txt");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("note: {} not found, skipping", path.display());
        return;
    };
    let text = &text[..text.floor_char_boundary(100_000)];
    for name in [SMOL, GEMMA] {
        let Some(tok) = model(name) else { continue };
        let t0 = Instant::now();
        let ids = tok.encode(text, true, false);
        let dt = t0.elapsed();
        eprintln!(
            "{name}: {} bytes -> {} tokens in {:.1} ms ({:.2} MB/s)",
            text.len(),
            ids.len(),
            dt.as_secs_f64() * 1e3,
            text.len() as f64 / dt.as_secs_f64() / 1e6
        );
        assert!(
            dt.as_secs_f64() < 2.0,
            "{name}: encoding 100 KB took {dt:?}"
        );
        assert!(
            ids.len() > 15_000 && ids.len() < 40_000,
            "{name}: {} tokens",
            ids.len()
        );
        assert_eq!(tok.decode(&ids, false), text, "{name}: 100 KB round trip");
    }
}

/// Random strings over an awkward alphabet (ASCII, Latin-1, CJK, emoji with modifiers,
/// combining marks, unusual whitespace, fragments of special tokens) round-trip on every
/// vocabulary and never panic.
#[test]
fn random_strings_round_trip() {
    const POOL: &[&str] = &[
        "a",
        "Z",
        "0",
        "7",
        " ",
        "  ",
        "\t",
        "\n",
        "\r\n",
        "'",
        "'s",
        ".",
        ",",
        "!",
        "<",
        ">",
        "|",
        "<|",
        "|>",
        "im_start",
        "<start_of_turn>",
        "é",
        "ß",
        "Ω",
        "ж",
        "田",
        "中",
        "の",
        "한",
        "🙂",
        "👍🏽",
        "\u{200d}",
        "\u{301}",
        "\u{a0}",
        "\u{3000}",
        "\u{2028}",
        "½",
        "٣",
        "Ⅻ",
        "ﬁ",
        "\u{feff}",
        "\u{10ffff}",
        "\u{7f}",
        "\u{1}",
    ];
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let strings: Vec<String> = (0..300)
        .map(|_| {
            let n = (next() % 24) as usize;
            (0..n)
                .map(|_| POOL[(next() % POOL.len() as u64) as usize])
                .collect()
        })
        .collect();
    let mut toks: Vec<(&str, &Tokenizer)> = Vec::new();
    let fixture = fixture_dir().map(|d| load(&d.join("tiny-relu-llama.dense.f16.gguf")));
    if let Some(t) = &fixture {
        toks.push(("fixture", t));
    }
    for name in [SMOL, GEMMA] {
        if let Some(t) = model(name) {
            toks.push((name, t));
        }
    }
    for (name, tok) in toks {
        for s in &strings {
            let ids = tok.encode(s, true, false);
            assert_eq!(&tok.decode(&ids, false), s, "{name} {s:?}");
            // Parsing special tokens must not panic either.
            let _ = tok.encode(s, true, true);
        }
    }
}
