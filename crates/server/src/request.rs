//! Reading OpenAI request bodies field by field, so every wrong field gets its own 400 naming
//! it (`param`) instead of a generic parse error.

use powerinfer::generate::sampling::SamplerConfig;
use powerinfer::{ChatMessage, GenerateOptions};
use serde_json::{Map, Value};

use crate::error::ApiError;

/// The settings shared by `/v1/completions` and `/v1/chat/completions`.
#[derive(Debug, Clone)]
pub struct Common {
    /// Limits, sampler and stops.
    pub options: GenerateOptions,
    /// Server-sent events instead of one JSON answer.
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk with the token counts.
    pub include_usage: bool,
}

/// What `/v1/completions` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Text, tokenized the way `powerinfer run` does it.
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// The JSON object of a request body.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::bad_request(
            "invalid_json",
            format!(
                "the request body must be a JSON object, not {}",
                type_name(&other)
            ),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(param: &str, expected: &str, v: &Value) -> ApiError {
    ApiError::invalid(
        param,
        "invalid_type",
        format!("'{param}' must be {expected}, not {}", type_name(v)),
    )
}

/// A field that is absent or `null`.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn number(obj: &Map<String, Value>, name: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    let Some(v) = field(obj, name) else {
        return Ok(None);
    };
    let x = v.as_f64().ok_or_else(|| wrong_type(name, "a number", v))?;
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            name,
            "invalid_value",
            format!("'{name}' must be between {lo} and {hi}, got {x}"),
        ));
    }
    Ok(Some(x as f32))
}

fn integer(
    obj: &Map<String, Value>,
    name: &str,
    lo: i64,
    hi: i64,
) -> Result<Option<i64>, ApiError> {
    let Some(v) = field(obj, name) else {
        return Ok(None);
    };
    let x = match v {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                .map(|f| f as i64)
        }),
        _ => None,
    };
    let Some(x) = x else {
        return Err(match v {
            Value::Number(n) if n.as_u64().is_some() => ApiError::invalid(
                name,
                "invalid_value",
                format!("'{name}' must be between {lo} and {hi}, got {n}"),
            ),
            _ => wrong_type(name, "an integer", v),
        });
    };
    if !(lo..=hi).contains(&x) {
        return Err(ApiError::invalid(
            name,
            "invalid_value",
            format!("'{name}' must be between {lo} and {hi}, got {x}"),
        ));
    }
    Ok(Some(x))
}

fn boolean(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(name, "a boolean", v)),
    }
}

/// Stop strings allowed per request.
pub const MAX_STOPS: usize = 16;

/// Reads the sampling, limit and streaming fields. `n_ctx` bounds `max_tokens`;
/// `default_max_tokens` applies when it is absent.
pub fn common(
    obj: &Map<String, Value>,
    n_ctx: usize,
    default_max_tokens: usize,
) -> Result<Common, ApiError> {
    if let Some(v) = field(obj, "model")
        && !v.is_string()
    {
        return Err(wrong_type("model", "a string", v));
    }
    // `max_completion_tokens` is the newer name of the chat field.
    let max_tokens = match integer(obj, "max_tokens", 1, n_ctx as i64)? {
        Some(m) => Some(m),
        None => integer(obj, "max_completion_tokens", 1, n_ctx as i64)?,
    };
    let mut sampler = SamplerConfig::default();
    if let Some(t) = number(obj, "temperature", 0.0, 2.0)? {
        sampler.temperature = t;
    }
    if let Some(p) = number(obj, "top_p", 0.0, 1.0)? {
        sampler.top_p = p;
    }
    if let Some(p) = number(obj, "min_p", 0.0, 1.0)? {
        sampler.min_p = p;
    }
    if let Some(k) = integer(obj, "top_k", 0, 1 << 20)? {
        sampler.top_k = k as usize;
    }
    if let Some(p) = number(obj, "presence_penalty", -2.0, 2.0)? {
        sampler.presence_penalty = p;
    }
    if let Some(p) = number(obj, "frequency_penalty", -2.0, 2.0)? {
        sampler.frequency_penalty = p;
    }
    if let Some(p) = number(obj, "repeat_penalty", 0.0, 10.0)? {
        if p == 0.0 {
            return Err(ApiError::invalid(
                "repeat_penalty",
                "invalid_value",
                "'repeat_penalty' must be positive",
            ));
        }
        sampler.repeat_penalty = p;
    }
    if let Some(s) = integer(obj, "seed", i64::MIN, i64::MAX)? {
        // Negative seeds (llama.cpp's -1 for "any") keep the default.
        if s >= 0 {
            sampler.seed = s as u64;
        }
    }
    if let Some(n) = integer(obj, "n", 1, i64::MAX)?
        && n != 1
    {
        return Err(ApiError::invalid(
            "n",
            "unsupported_value",
            "only n = 1 is supported",
        ));
    }
    if let Some(n) = integer(obj, "best_of", 1, i64::MAX)?
        && n != 1
    {
        return Err(ApiError::invalid(
            "best_of",
            "unsupported_value",
            "only best_of = 1 is supported",
        ));
    }
    if boolean(obj, "echo")? == Some(true) {
        return Err(ApiError::invalid(
            "echo",
            "unsupported_value",
            "echo is not supported",
        ));
    }
    match field(obj, "logprobs") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Number(n)) if n.as_u64() == Some(0) => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "logprobs",
                "unsupported_value",
                "logprobs are not supported",
            ));
        }
    }
    let stop = match field(obj, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            if a.len() > MAX_STOPS {
                return Err(ApiError::invalid(
                    "stop",
                    "invalid_value",
                    format!("at most {MAX_STOPS} stop strings, got {}", a.len()),
                ));
            }
            a.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| wrong_type("stop", "a string or an array of strings", v))
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };
    let stream = boolean(obj, "stream")?.unwrap_or(false);
    let include_usage = match field(obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => boolean(o, "include_usage")
            .map_err(|mut e| {
                e.param = Some("stream_options.include_usage".into());
                e
            })?
            .unwrap_or(false),
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };
    let ignore_eos = boolean(obj, "ignore_eos")?.unwrap_or(false);
    Ok(Common {
        options: GenerateOptions {
            max_tokens: max_tokens.map_or(default_max_tokens, |m| m as usize),
            sampler,
            stop,
            stop_at_eog: !ignore_eos,
        },
        stream,
        include_usage,
    })
}

/// The `prompt` of `/v1/completions`: a string, an array holding one string, or an array of
/// token ids.
pub fn prompt(obj: &Map<String, Value>, n_vocab: usize) -> Result<Prompt, ApiError> {
    let expected = "a string, an array of one string or an array of token ids";
    let v = field(obj, "prompt").ok_or_else(|| {
        ApiError::invalid(
            "prompt",
            "missing_required_parameter",
            "'prompt' is required",
        )
    })?;
    match v {
        Value::String(s) => Ok(Prompt::Text(s.clone())),
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_owned()))
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(|x| x.is_string()) => {
            Err(ApiError::invalid(
                "prompt",
                "unsupported_value",
                "several prompts in one request are not supported",
            ))
        }
        Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => {
            let ids = a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&t| t < n_vocab as u64)
                        .map(|t| t as u32)
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "prompt",
                                "invalid_value",
                                format!("token {x} is not in the vocabulary of {n_vocab} tokens"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?;
            Ok(Prompt::Tokens(ids))
        }
        Value::Array(a) if a.is_empty() => Err(ApiError::invalid(
            "prompt",
            "invalid_value",
            "'prompt' must not be empty",
        )),
        v => Err(wrong_type("prompt", expected, v)),
    }
}

/// The `messages` of `/v1/chat/completions`. Content is a string or an array of text parts.
pub fn messages(obj: &Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let v = field(obj, "messages").ok_or_else(|| {
        ApiError::invalid(
            "messages",
            "missing_required_parameter",
            "'messages' is required",
        )
    })?;
    let Value::Array(list) = v else {
        return Err(wrong_type("messages", "an array of messages", v));
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "invalid_value",
            "'messages' must hold at least one message",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let p = |f: &str| format!("messages[{i}]{f}");
            let Value::Object(m) = m else {
                return Err(wrong_type(&p(""), "an object", m));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) => r.clone(),
                None | Some(Value::Null) => {
                    return Err(ApiError::invalid(
                        &p(".role"),
                        "missing_required_parameter",
                        format!("'{}' is required", p(".role")),
                    ));
                }
                Some(v) => return Err(wrong_type(&p(".role"), "a string", v)),
            };
            if !matches!(
                role.as_str(),
                "system" | "user" | "assistant" | "developer" | "tool"
            ) {
                return Err(ApiError::invalid(
                    &p(".role"),
                    "invalid_value",
                    format!(
                        "unknown role {role:?} (system, developer, user, assistant or tool)"
                    ),
                ));
            }
            let role = if role == "developer" {
                "system".to_owned()
            } else {
                role
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(Value::Array(parts)) => {
                    let mut s = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        let pp = p(&format!(".content[{j}]"));
                        match (part.get("type"), part.get("text")) {
                            (Some(Value::String(t)), Some(Value::String(text))) if t == "text" => {
                                s.push_str(text)
                            }
                            _ => {
                                return Err(ApiError::invalid(
                                    &pp,
                                    "invalid_value",
                                    "only {\"type\": \"text\", \"text\": ...} content parts are supported",
                                ));
                            }
                        }
                    }
                    s
                }
                Some(v) => {
                    return Err(wrong_type(
                        &p(".content"),
                        "a string or an array of text parts",
                        v,
                    ));
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    fn param_of(r: Result<Common, ApiError>) -> Option<String> {
        r.err().and_then(|e| e.param)
    }

    #[test]
    fn defaults_and_overrides() {
        let c = common(&obj(json!({})), 512, 16).unwrap();
        assert_eq!(c.options.max_tokens, 16);
        assert_eq!(c.options.sampler, SamplerConfig::default());
        assert!(!c.stream && !c.include_usage && c.options.stop_at_eog);
        let c = common(
            &obj(
                json!({"max_tokens": 7.0, "temperature": 0, "top_k": 3, "seed": 9,
                        "stop": "x", "stream": true, "stream_options": {"include_usage": true},
                        "logprobs": false, "n": 1, "ignore_eos": true, "model": "m"}),
            ),
            512,
            16,
        )
        .unwrap();
        assert_eq!(c.options.max_tokens, 7);
        assert_eq!(c.options.sampler.temperature, 0.0);
        assert_eq!(c.options.sampler.top_k, 3);
        assert_eq!(c.options.sampler.seed, 9);
        assert_eq!(c.options.stop, vec!["x".to_string()]);
        assert!(c.stream && c.include_usage && !c.options.stop_at_eog);
        // A negative seed keeps the default; max_completion_tokens is max_tokens' other name.
        let c = common(
            &obj(json!({"seed": -1, "max_completion_tokens": 5})),
            512,
            16,
        )
        .unwrap();
        assert_eq!(c.options.sampler.seed, SamplerConfig::default().seed);
        assert_eq!(c.options.max_tokens, 5);
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (json!({"max_tokens": 513}), "max_tokens"),
            (json!({"max_tokens": u64::MAX}), "max_tokens"),
            (json!({"max_tokens": 2.5}), "max_tokens"),
            (json!({"max_tokens": true}), "max_tokens"),
            (json!({"top_k": -1}), "top_k"),
            (json!({"min_p": 2}), "min_p"),
            (json!({"frequency_penalty": -3}), "frequency_penalty"),
            (json!({"repeat_penalty": 0}), "repeat_penalty"),
            (json!({"stop": vec!["a"; MAX_STOPS + 1]}), "stop"),
            (
                json!({"stream_options": {"include_usage": 1}}),
                "stream_options.include_usage",
            ),
            (json!({"best_of": 3}), "best_of"),
            (json!({"echo": true}), "echo"),
            (json!({"logprobs": true}), "logprobs"),
        ];
        for (body, param) in cases {
            assert_eq!(
                param_of(common(&obj(body.clone()), 512, 16)).as_deref(),
                Some(param),
                "{body}"
            );
        }
    }

    #[test]
    fn prompts_and_messages() {
        let p = |v: Value| prompt(&obj(json!({ "prompt": v })), 100);
        assert_eq!(p(json!("hi")).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(p(json!(["hi"])).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(
            p(json!([1, 2, 99])).unwrap(),
            Prompt::Tokens(vec![1, 2, 99])
        );
        assert!(p(json!([100])).is_err());
        assert!(p(json!([1.5])).is_err());
        assert!(p(json!([1, "a"])).is_err());
        assert!(p(json!({})).is_err());
        let m = messages(&obj(json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null},
        ]})))
        .unwrap();
        assert_eq!(
            m,
            vec![
                ChatMessage::new("system", "be brief"),
                ChatMessage::new("user", "ab"),
                ChatMessage::new("assistant", ""),
            ]
        );
        let bad = messages(&obj(
            json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
        ));
        assert_eq!(
            bad.unwrap_err().param.as_deref(),
            Some("messages[0].content[0]")
        );
        assert!(parse_object(b"[]").is_err());
        assert!(parse_object(b"{\"a\": 1}").is_ok());
    }
}
