//! Chat templates: the Jinja template in `tokenizer.chat_template`, rendered with minijinja.
//!
//! Templates see `messages` (a list of `{role, content}`), `add_generation_prompt`,
//! `bos_token` and `eos_token`, as with Hugging Face transformers, which also fixes the
//! whitespace options (`trim_blocks` and `lstrip_blocks` on). Python-isms common in model
//! templates are provided: `raise_exception(msg)`, the `tojson` filter, and the string / dict
//! methods `strip`, `lstrip`, `rstrip`, `startswith`, `endswith`, `upper`, `lower`, `title`,
//! `capitalize`, `replace`, `split`, `items`, `keys`, `values`, `get`.
//!
//! A model without a template (Gemma 3 270M is a base model) gets [`ChatError::NoTemplate`] from
//! [`ChatTemplate::from_gguf`]; [`ChatTemplate::from_gguf_or_builtin`] falls back to a built-in
//! format chosen by the vocabulary (Gemma turns when it has `<start_of_turn>`, ChatML when it has
//! `<|im_start|>`).
//!
//! ```
//! use powerinfer_generate::chat::{ChatMessage, ChatTemplate};
//! let t = ChatTemplate::builtin("chatml").unwrap();
//! let text = t.apply(&[ChatMessage::new("user", "Hi")], true).unwrap();
//! assert_eq!(text, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
//! ```

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State};
use powerinfer_gguf::{GgufFile, Value as GgufValue};
use serde::Serialize;
use thiserror::Error as ThisError;

/// The metadata key holding the template.
pub const CHAT_TEMPLATE_KEY: &str = "tokenizer.chat_template";

/// Gemma's turn format (system text folded into the first user turn, as Gemma 3's own
/// template does), for Gemma files that carry no template.
pub const GEMMA_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}
    {{- message['content'] | trim }}
    {{- '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"#;

/// Plain ChatML (`<|im_start|>role\ncontent<|im_end|>\n`).
pub const CHATML_TEMPLATE: &str = r#"{%- for message in messages -%}
    {{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<|im_start|>assistant\n' }}
{%- endif -%}
"#;

/// Chat template errors.
#[derive(Debug, ThisError)]
pub enum ChatError {
    /// The file has no `tokenizer.chat_template`.
    #[error("the model has no chat template (`tokenizer.chat_template` is missing)")]
    NoTemplate,
    /// The key exists but is not a string.
    #[error("`tokenizer.chat_template` is not a string")]
    NotAString,
    /// No built-in template of that name.
    #[error("unknown built-in chat template `{0}` (known: gemma, chatml)")]
    UnknownBuiltin(String),
    /// The template does not parse.
    #[error("chat template does not compile: {0}")]
    Syntax(#[source] Error),
    /// Rendering failed (including the template's own `raise_exception`).
    #[error("chat template failed to render: {0}")]
    Render(#[source] Error),
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    /// "system", "user" or "assistant" (templates may know others).
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

#[derive(Serialize)]
struct Context<'a> {
    messages: &'a [ChatMessage],
    add_generation_prompt: bool,
    bos_token: &'a str,
    eos_token: &'a str,
}

/// A compiled chat template.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// Compiles a Jinja template (BOS/EOS strings empty until [`with_special_tokens`](Self::with_special_tokens)).
    #[allow(clippy::should_implement_trait)]
    pub fn from_str(template: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.set_unknown_method_callback(python_methods);
        env.add_template_owned("chat", template.to_owned())
            .map_err(ChatError::Syntax)?;
        Ok(ChatTemplate {
            env,
            source: template.to_owned(),
            bos_token: String::new(),
            eos_token: String::new(),
        })
    }

    /// A built-in template: `"gemma"` ([`GEMMA_TEMPLATE`]) or `"chatml"` ([`CHATML_TEMPLATE`]).
    pub fn builtin(name: &str) -> Result<Self, ChatError> {
        match name {
            "gemma" => Self::from_str(GEMMA_TEMPLATE),
            "chatml" => Self::from_str(CHATML_TEMPLATE),
            other => Err(ChatError::UnknownBuiltin(other.to_owned())),
        }
    }

    /// The file's template, with `bos_token` / `eos_token` taken from its vocabulary.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ChatError> {
        let source = match file.get(CHAT_TEMPLATE_KEY) {
            None => return Err(ChatError::NoTemplate),
            Some(GgufValue::String(s)) => s.as_str(),
            Some(_) => return Err(ChatError::NotAString),
        };
        let (bos, eos) = special_texts(file);
        Ok(Self::from_str(source)?.with_special_tokens(bos, eos))
    }

    /// [`from_gguf`](Self::from_gguf), or when the file has no template, the built-in format its
    /// vocabulary suggests (Gemma turns for `<start_of_turn>`, ChatML for `<|im_start|>`).
    pub fn from_gguf_or_builtin(file: &GgufFile) -> Result<Self, ChatError> {
        match Self::from_gguf(file) {
            Err(ChatError::NoTemplate) => {
                let has = |tok: &str| match file.get("tokenizer.ggml.tokens") {
                    Some(GgufValue::Array(a)) => {
                        a.as_strings().is_some_and(|s| s.iter().any(|s| s == tok))
                    }
                    _ => false,
                };
                let name = if has("<start_of_turn>") {
                    "gemma"
                } else if has("<|im_start|>") {
                    "chatml"
                } else {
                    return Err(ChatError::NoTemplate);
                };
                let (bos, eos) = special_texts(file);
                Ok(Self::builtin(name)?.with_special_tokens(bos, eos))
            }
            other => other,
        }
    }

    /// Sets the strings rendered for `bos_token` and `eos_token`.
    pub fn with_special_tokens(mut self, bos: impl Into<String>, eos: impl Into<String>) -> Self {
        self.bos_token = bos.into();
        self.eos_token = eos.into();
        self
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template writes `bos_token` itself (then encode the result without adding
    /// another BOS).
    pub fn renders_bos(&self) -> bool {
        !self.bos_token.is_empty() && self.source.contains("bos_token")
    }

    /// Renders a conversation; `add_generation_prompt` appends the opening of the assistant's
    /// turn.
    pub fn apply(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self.env.get_template("chat").map_err(ChatError::Render)?;
        tmpl.render(Context {
            messages,
            add_generation_prompt,
            bos_token: &self.bos_token,
            eos_token: &self.eos_token,
        })
        .map_err(ChatError::Render)
    }
}

/// The BOS / EOS token texts of a GGUF vocabulary (empty when unknown).
fn special_texts(file: &GgufFile) -> (String, String) {
    let Some(GgufValue::Array(tokens)) = file.get("tokenizer.ggml.tokens") else {
        return (String::new(), String::new());
    };
    let text = |key: &str| -> String {
        let id = match file.get(key) {
            Some(GgufValue::U32(v)) => *v as usize,
            Some(GgufValue::I32(v)) if *v >= 0 => *v as usize,
            Some(GgufValue::U64(v)) => *v as usize,
            _ => return String::new(),
        };
        tokens.str_at(id).unwrap_or_default().to_owned()
    };
    (
        text("tokenizer.ggml.bos_token_id"),
        text("tokenizer.ggml.eos_token_id"),
    )
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

fn tojson(value: Value) -> Result<Value, Error> {
    serde_json::to_string(&value)
        .map(Value::from_safe_string)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))
}

fn arg_str<'a>(args: &'a [Value], i: usize, method: &str) -> Result<Option<&'a str>, Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidOperation,
                format!("{method}() expects a string argument"),
            )
        }),
    }
}

/// Python string and dict methods that model templates call.
fn python_methods(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    if let Some(s) = value.as_str() {
        let chars = arg_str(args, 0, method)?;
        let trim_set = |c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
        return Ok(match method {
            "strip" => Value::from(s.trim_matches(trim_set)),
            "lstrip" => Value::from(s.trim_start_matches(trim_set)),
            "rstrip" => Value::from(s.trim_end_matches(trim_set)),
            "startswith" => Value::from(chars.is_some_and(|p| s.starts_with(p))),
            "endswith" => Value::from(chars.is_some_and(|p| s.ends_with(p))),
            "upper" => Value::from(s.to_uppercase()),
            "lower" => Value::from(s.to_lowercase()),
            "title" => Value::from(title_case(s)),
            "capitalize" => {
                let mut cs = s.chars();
                Value::from(match cs.next() {
                    Some(f) => f.to_uppercase().collect::<String>() + &cs.as_str().to_lowercase(),
                    None => String::new(),
                })
            }
            "replace" => {
                let from = chars.unwrap_or("");
                let to = arg_str(args, 1, method)?.unwrap_or("");
                Value::from(s.replace(from, to))
            }
            "split" => {
                let parts: Vec<Value> = match chars {
                    Some(sep) if !sep.is_empty() => s.split(sep).map(Value::from).collect(),
                    _ => s.split_whitespace().map(Value::from).collect(),
                };
                Value::from(parts)
            }
            _ => return Err(unknown(method)),
        });
    }
    if value.kind() == ValueKind::Map {
        return match method {
            "items" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    let v = value.get_item(&k)?;
                    out.push(Value::from(vec![k, v]));
                }
                Ok(Value::from(out))
            }
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    out.push(value.get_item(&k)?);
                }
                Ok(Value::from(out))
            }
            "get" => {
                let key = args.first().cloned().unwrap_or_default();
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or_default()
                } else {
                    v
                })
            }
            _ => Err(unknown(method)),
        };
    }
    Err(unknown(method))
}

fn unknown(method: &str) -> Error {
    Error::new(
        ErrorKind::UnknownMethod,
        format!("method {method}() is not supported"),
    )
}

fn title_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_alpha = false;
    for c in s.chars() {
        if prev_alpha {
            out.extend(c.to_lowercase());
        } else {
            out.extend(c.to_uppercase());
        }
        prev_alpha = c.is_alphabetic();
    }
    out
}
