//! Chat templates: SmolLM2's ChatML template from its GGUF rendered to the exact expected string,
//! the Gemma fallback, Python-isms, and typed errors.

use std::path::PathBuf;

use powerinfer_generate::chat::{ChatError, ChatMessage, ChatTemplate};
use powerinfer_generate::tokenizer::Tokenizer;
use powerinfer_gguf::GgufFile;

fn model_path(name: &str) -> Option<PathBuf> {
    let dir = std::env::var("POWERINFER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let p = dir.join(name);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("note: {} not found, skipping", p.display());
        None
    }
}

fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
    pairs
        .iter()
        .map(|(r, c)| ChatMessage::new(*r, *c))
        .collect()
}

const SMOL_SYSTEM: &str = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";

#[test]
fn smollm2_chatml_from_gguf() {
    let Some(path) = model_path("SmolLM2-135M-Instruct.Q4_1.gguf") else {
        return;
    };
    let file = GgufFile::open(&path).expect("open");
    let t = ChatTemplate::from_gguf(&file).expect("template");
    // Without a system message the template adds its default one.
    let out = t
        .apply(&msgs(&[("user", "What is 2+2?")]), true)
        .expect("render");
    assert_eq!(
        out,
        format!("{SMOL_SYSTEM}<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    );
    // With one, it is used; a multi-turn conversation without the generation prompt.
    let out = t
        .apply(
            &msgs(&[
                ("system", "Be brief."),
                ("user", "Hi"),
                ("assistant", "Hello!"),
                ("user", "Bye"),
            ]),
            false,
        )
        .expect("render");
    assert_eq!(
        out,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    );
    // The rendered prompt tokenizes with the chat markers as single control tokens.
    let tok = Tokenizer::from_gguf(&file).expect("tokenizer");
    let ids = tok.encode(&out, true, true);
    assert_eq!(ids[0], 1, "<|im_start|>");
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 4);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 4);
    assert_eq!(tok.decode(&ids, true), out);
}

#[test]
fn gemma3_has_no_template_and_falls_back_to_turns() {
    let Some(path) = model_path("gemma-3-270m-q4_k_m.gguf") else {
        return;
    };
    let file = GgufFile::open(&path).expect("open");
    assert!(matches!(
        ChatTemplate::from_gguf(&file),
        Err(ChatError::NoTemplate)
    ));
    let t = ChatTemplate::from_gguf_or_builtin(&file).expect("fallback");
    assert!(t.renders_bos());
    let out = t
        .apply(
            &msgs(&[
                ("system", "Be brief."),
                ("user", " Hi "),
                ("assistant", "Hello!"),
            ]),
            true,
        )
        .expect("render");
    assert_eq!(
        out,
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n\
         <start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>model\n"
    );
    let tok = Tokenizer::from_gguf(&file).expect("tokenizer");
    // The template writes <bos> itself: encode without add_special to avoid a second one.
    let ids = tok.encode(&out, false, true);
    assert_eq!(ids[..2], [2, 105]);
}

#[test]
fn builtin_gemma_rejects_non_alternating_roles() {
    let t = ChatTemplate::builtin("gemma")
        .expect("gemma")
        .with_special_tokens("<bos>", "<eos>");
    let err = t
        .apply(&msgs(&[("user", "a"), ("user", "b")]), false)
        .expect_err("must fail");
    assert!(matches!(err, ChatError::Render(_)));
    assert!(err.to_string().contains("alternate"), "{err}");
    assert!(matches!(
        ChatTemplate::builtin("nope"),
        Err(ChatError::UnknownBuiltin(_))
    ));
}

#[test]
fn python_methods_and_filters() {
    let src = "{% for m in messages %}[{{ m.role.upper() }}|{{ m.content.strip() }}|\
               {{ m.content.lstrip('x ') }}|{{ m.content.startswith(' x') }}|\
               {{ m.content.replace('x', 'y').split() | join(',') }}]{% endfor %}\
               {{ messages[0] | tojson }}{{ eos_token }}";
    let t = ChatTemplate::from_str(src)
        .expect("compiles")
        .with_special_tokens("<s>", "</s>");
    let out = t
        .apply(&msgs(&[("user", " x a b ")]), false)
        .expect("render");
    assert_eq!(
        out,
        "[USER|x a b|a b |True|y,a,b]{\"role\":\"user\",\"content\":\" x a b \"}</s>"
    );
    let t = ChatTemplate::from_str("{{ {'a': 1}.items() | list }} {{ {'a': 1}.get('b', 2) }}")
        .expect("compiles");
    assert_eq!(t.apply(&[], false).expect("render"), "[[\"a\", 1]] 2");
}

#[test]
fn bad_templates_are_typed_errors() {
    assert!(matches!(
        ChatTemplate::from_str("{% for m in messages %}"),
        Err(ChatError::Syntax(_))
    ));
    let t = ChatTemplate::from_str("{{ raise_exception('nope') }}").expect("compiles");
    assert!(matches!(t.apply(&[], false), Err(ChatError::Render(_))));
    let t = ChatTemplate::from_str("{{ messages[0].content.frobnicate() }}").expect("compiles");
    assert!(matches!(
        t.apply(&msgs(&[("user", "x")]), false),
        Err(ChatError::Render(_))
    ));
}
