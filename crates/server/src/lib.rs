//! An OpenAI-compatible HTTP server over powerinfer's continuous-batching scheduler
//! ([`powerinfer::generate::batch`]).
//!
//! One model thread runs the [`Scheduler`]; the HTTP handlers (axum on a small tokio runtime)
//! tokenize, queue requests through a [`Submitter`] and turn the token events into OpenAI
//! answers:
//!
//! - `POST /v1/completions` and `POST /v1/chat/completions`, whole (`"stream": false`) or as
//!   server-sent events (`data: {...}` chunks, then `data: [DONE]`);
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//!
//! A full queue answers 503 at once; bad requests get a 4xx with OpenAI's error object; a
//! client that goes away cancels its sequence. [`run`] serves until SIGINT or SIGTERM, then
//! finishes the requests in flight and returns.
//!
//! ```no_run
//! use std::sync::Arc;
//! use powerinfer::{Llm, LoadOptions};
//! use powerinfer_server::{ServerConfig, run};
//!
//! let llm = Arc::new(Llm::load("model.gguf", &LoadOptions::default()).unwrap());
//! let cfg = ServerConfig::new("127.0.0.1", 8080, "model");
//! run(llm, &cfg, |addr| eprintln!("listening on http://{addr}")).unwrap();
//! ```

mod error;
mod request;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::stream;
use powerinfer::generate::batch::{
    BatchConfig, BatchConfigError, BatchEvent, BatchRequest, Scheduler, SubmitError, Submitter,
};
use powerinfer::{ChatTemplate, Llm};
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub use error::ApiError;
pub use request::MAX_STOPS;

/// Largest request body accepted (bytes).
pub const MAX_BODY_BYTES: usize = 4 << 20;

/// Default `max_tokens` of `/v1/completions` (OpenAI's).
pub const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;

/// How to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Address to bind.
    pub host: String,
    /// Port to bind (0 for any free one; `run`'s `ready` callback gets the one chosen).
    pub port: u16,
    /// The model id `/v1/models` lists and answers carry.
    pub model_name: String,
    /// Slots, per-slot context, prompt batch size and queue length.
    pub batch: BatchConfig,
}

impl ServerConfig {
    /// A configuration with the default batch settings.
    pub fn new(host: impl Into<String>, port: u16, model_name: impl Into<String>) -> Self {
        ServerConfig {
            host: host.into(),
            port,
            model_name: model_name.into(),
            batch: BatchConfig::default(),
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// Binding the address or serving failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The batch settings are invalid or the slots do not fit in memory.
    #[error(transparent)]
    Batch(#[from] BatchConfigError),
}

struct Shared {
    llm: Arc<Llm>,
    template: Option<ChatTemplate>,
    submitter: Submitter,
    model_name: String,
    created: u64,
    started: Instant,
    next_id: AtomicU64,
    http_client_errors: AtomicU64,
    http_requests: AtomicU64,
}

type AppState = Arc<Shared>;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Serves `llm` until SIGINT or SIGTERM. `ready` is called with the bound address once the
/// server accepts connections. Requests in flight at the signal are finished first.
pub fn run(
    llm: Arc<Llm>,
    cfg: &ServerConfig,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServerError> {
    let io = |what: String| move |source| ServerError::Io { what, source };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(io("starting the runtime".into()))?;
    let addr = format!("{}:{}", cfg.host, cfg.port);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(&addr))
        .map_err(io(format!("binding {addr}")))?;
    let local = listener
        .local_addr()
        .map_err(io("reading the bound address".into()))?;
    let (scheduler, submitter) =
        Scheduler::new(llm.model(), llm.tokenizer(), llm.pool(), cfg.batch)?;
    let template = match llm.chat_template() {
        Some(t) => Some(t.clone()),
        None => ChatTemplate::from_gguf_or_builtin(llm.model().file()).ok(),
    };
    let state = Arc::new(Shared {
        llm: llm.clone(),
        template,
        submitter,
        model_name: cfg.model_name.clone(),
        created: now_secs(),
        started: Instant::now(),
        next_id: AtomicU64::new(1),
        http_client_errors: AtomicU64::new(0),
        http_requests: AtomicU64::new(0),
    });
    std::thread::scope(|s| {
        s.spawn(move || scheduler.run());
        let app = router(state);
        ready(local);
        let served = rt.block_on(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
        });
        // Dropping the runtime drops every task and with them the last submitters: the
        // scheduler then finishes what it holds and returns, ending the scope.
        drop(rt);
        served.map_err(io("serving".into()))
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn not_found(State(st): State<AppState>, uri: axum::http::Uri) -> ApiError {
    st.http_client_errors.fetch_add(1, Ordering::Relaxed);
    ApiError::status(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        format!("no route {}", uri.path()),
    )
}

async fn method_not_allowed(
    State(st): State<AppState>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    st.http_client_errors.fetch_add(1, Ordering::Relaxed);
    ApiError::status(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn health(State(st): State<AppState>) -> Response {
    let m = st.submitter.metrics();
    axum::Json(json!({
        "status": "ok",
        "slots": st.submitter.config().n_parallel,
        "active": m.active,
        "queued": m.queued,
    }))
    .into_response()
}

async fn models(State(st): State<AppState>) -> Response {
    let c = st.llm.model().config();
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": st.model_name,
            "object": "model",
            "created": st.created,
            "owned_by": "powerinfer",
            "meta": {
                "arch": c.arch.name(),
                "n_vocab": c.n_vocab,
                "n_ctx_train": c.n_ctx_train,
                "n_ctx_slot": st.submitter.config().n_ctx,
                "n_parallel": st.submitter.config().n_parallel,
            },
        }],
    }))
    .into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    let m = st.submitter.metrics();
    let cfg = st.submitter.config();
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: String| {
        out.push_str(&format!(
            "# HELP powerinfer_{name} {help}\n# TYPE powerinfer_{name} {kind}\npowerinfer_{name} {value}\n"
        ));
    };
    put(
        "http_requests_total",
        "counter",
        "HTTP requests to the generation endpoints.",
        st.http_requests.load(Ordering::Relaxed).to_string(),
    );
    put(
        "http_client_errors_total",
        "counter",
        "Requests answered with a 4xx status.",
        st.http_client_errors.load(Ordering::Relaxed).to_string(),
    );
    put(
        "requests_total",
        "counter",
        "Generation requests accepted into the queue.",
        m.submitted.to_string(),
    );
    put(
        "requests_rejected_total",
        "counter",
        "Generation requests refused with 503 because the queue was full.",
        m.rejected.to_string(),
    );
    put(
        "requests_completed_total",
        "counter",
        "Sequences that ended normally.",
        m.completed.to_string(),
    );
    put(
        "requests_failed_total",
        "counter",
        "Sequences that ended with an error.",
        m.failed.to_string(),
    );
    put(
        "requests_cancelled_total",
        "counter",
        "Sequences whose client went away before the end.",
        m.cancelled.to_string(),
    );
    put(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens computed (not counting those taken from a slot's prompt cache).",
        m.prompt_tokens.to_string(),
    );
    put(
        "prompt_tokens_cached_total",
        "counter",
        "Prompt tokens taken from a slot's prompt cache instead of being computed.",
        m.cached_prompt_tokens.to_string(),
    );
    put(
        "generated_tokens_total",
        "counter",
        "Tokens generated.",
        m.generated_tokens.to_string(),
    );
    put(
        "queue_length",
        "gauge",
        "Requests waiting for a slot.",
        m.queued.to_string(),
    );
    put(
        "queue_capacity",
        "gauge",
        "Requests that may wait for a slot.",
        cfg.max_queue.to_string(),
    );
    put(
        "active_sequences",
        "gauge",
        "Sequences being generated.",
        m.active.to_string(),
    );
    put(
        "slots",
        "gauge",
        "Parallel sequences.",
        cfg.n_parallel.to_string(),
    );
    put(
        "decode_steps_total",
        "counter",
        "Batched decode steps.",
        m.steps.to_string(),
    );
    put(
        "decode_seconds_total",
        "counter",
        "Time spent in decode steps.",
        format!("{:.6}", m.decode_time.as_secs_f64()),
    );
    put(
        "prefill_seconds_total",
        "counter",
        "Time spent processing prompts.",
        format!("{:.6}", m.prefill_time.as_secs_f64()),
    );
    put(
        "tokens_per_second",
        "gauge",
        "Generated tokens per second of decode time (all sequences together).",
        format!("{:.3}", m.decode_tokens_per_s()),
    );
    put(
        "uptime_seconds",
        "gauge",
        "Seconds since the server started.",
        format!("{:.3}", st.started.elapsed().as_secs_f64()),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// Which endpoint an answer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

struct Prepared {
    tokens: Vec<u32>,
    common: request::Common,
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        ApiError::status(
            status,
            "invalid_request_error",
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                "request_too_large"
            } else {
                "invalid_body"
            },
            e.body_text(),
        )
    })
}

fn prepare(st: &Shared, kind: Kind, body: &[u8]) -> Result<Prepared, ApiError> {
    let obj = request::parse_object(body)?;
    let n_ctx = st.submitter.config().n_ctx;
    let tok = st.llm.tokenizer();
    let (tokens, default_max) = match kind {
        Kind::Completion => {
            let tokens = match request::prompt(&obj, st.llm.model().config().n_vocab)? {
                request::Prompt::Text(s) => st.llm.tokenize(&s),
                request::Prompt::Tokens(t) => t,
            };
            (tokens, COMPLETION_DEFAULT_MAX_TOKENS)
        }
        Kind::Chat => {
            let messages = request::messages(&obj)?;
            let template = st.template.as_ref().ok_or_else(|| {
                ApiError::bad_request(
                    "no_chat_template",
                    "the model has no chat template; use /v1/completions",
                )
            })?;
            let text = template
                .apply(&messages, true)
                .map_err(|e| ApiError::invalid("messages", "invalid_value", format!("{e}")))?;
            (tok.encode(&text, !template.renders_bos(), true), n_ctx)
        }
    };
    let common = request::common(&obj, n_ctx, default_max)?;
    if tokens.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "invalid_value",
            "the prompt has no tokens",
        ));
    }
    if tokens.len() >= n_ctx {
        return Err(ApiError::invalid(
            if kind == Kind::Chat {
                "messages"
            } else {
                "prompt"
            },
            "context_length_exceeded",
            format!(
                "the prompt has {} tokens but the context holds {n_ctx} (and must leave room for one generated token)",
                tokens.len()
            ),
        ));
    }
    Ok(Prepared { tokens, common })
}

async fn completions(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(st, Kind::Completion, body).await
}

async fn chat_completions(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(st, Kind::Chat, body).await
}

async fn generate(st: AppState, kind: Kind, body: Result<Bytes, BytesRejection>) -> Response {
    st.http_requests.fetch_add(1, Ordering::Relaxed);
    match generate_inner(&st, kind, body).await {
        Ok(r) => r,
        Err(e) => {
            if e.status.is_client_error() {
                st.http_client_errors.fetch_add(1, Ordering::Relaxed);
            }
            e.into_response()
        }
    }
}

async fn generate_inner(
    st: &AppState,
    kind: Kind,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = read_body(body)?;
    let Prepared { tokens, common } = prepare(st, kind, &body)?;
    let n_prompt = tokens.len();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let sink = move |ev: BatchEvent| tx.send(ev).is_ok();
    st.submitter
        .submit(
            BatchRequest::new(tokens, common.options.clone()),
            Box::new(sink),
        )
        .map_err(|e| match e {
            SubmitError::QueueFull(n) => ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_overloaded",
                "queue_full",
                format!("the server is busy ({n} requests waiting); retry later"),
            ),
            SubmitError::Invalid(e) => ApiError::bad_request("invalid_value", e.to_string()),
            other => ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "shutting_down",
                other.to_string(),
            ),
        })?;
    // Wait until the prompt is processed: a failure there is still an error status.
    match rx.recv().await {
        Some(BatchEvent::Started { .. }) => {}
        Some(BatchEvent::Error(e)) => return Err(ApiError::internal(e.to_string())),
        Some(_) | None => return Err(ApiError::internal("the scheduler stopped")),
    }
    let id = format!(
        "{}-{:x}{:06x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        st.created,
        st.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let meta = Meta {
        id,
        kind,
        created: now_secs(),
        model: st.model_name.clone(),
        n_prompt,
    };
    if common.stream {
        Ok(stream_response(meta, rx, common.include_usage))
    } else {
        let mut text = String::new();
        let mut n_gen = 0usize;
        loop {
            match rx.recv().await {
                Some(BatchEvent::Token(t)) => {
                    n_gen += 1;
                    text.push_str(&t.text);
                }
                Some(BatchEvent::Done(f)) => {
                    text.push_str(&f.tail);
                    let finish = f.reason.as_str();
                    return Ok(axum::Json(meta.whole(&text, finish, n_gen)).into_response());
                }
                Some(BatchEvent::Error(e)) => return Err(ApiError::internal(e.to_string())),
                Some(BatchEvent::Started { .. }) => {}
                None => return Err(ApiError::internal("the scheduler stopped")),
            }
        }
    }
}

struct Meta {
    id: String,
    kind: Kind,
    created: u64,
    model: String,
    n_prompt: usize,
}

impl Meta {
    fn usage(&self, n_gen: usize) -> Value {
        json!({
            "prompt_tokens": self.n_prompt,
            "completion_tokens": n_gen,
            "total_tokens": self.n_prompt + n_gen,
        })
    }

    fn whole(&self, text: &str, finish: &str, n_gen: usize) -> Value {
        let (object, choice) = match self.kind {
            Kind::Completion => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
            ),
            Kind::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish,
                }),
            ),
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": self.usage(n_gen),
        })
    }

    /// A streamed chunk: `text` (or, for chat, the delta object) and the finish reason.
    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        let (object, choice) = match self.kind {
            Kind::Completion => (
                "text_completion",
                json!({"index": 0, "text": delta, "logprobs": null, "finish_reason": finish}),
            ),
            Kind::Chat => (
                "chat.completion.chunk",
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}),
            ),
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
        .to_string()
    }

    fn text_delta(&self, text: &str) -> Value {
        match self.kind {
            Kind::Completion => Value::String(text.to_owned()),
            Kind::Chat => json!({"content": text}),
        }
    }

    fn usage_chunk(&self, n_gen: usize) -> String {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": self.usage(n_gen),
        })
        .to_string()
    }
}

struct StreamState {
    meta: Meta,
    rx: mpsc::UnboundedReceiver<BatchEvent>,
    out: VecDeque<String>,
    n_gen: usize,
    include_usage: bool,
    ended: bool,
}

fn stream_response(
    meta: Meta,
    rx: mpsc::UnboundedReceiver<BatchEvent>,
    include_usage: bool,
) -> Response {
    let mut out = VecDeque::new();
    if meta.kind == Kind::Chat {
        out.push_back(meta.chunk(json!({"role": "assistant", "content": ""}), None));
    }
    let state = StreamState {
        meta,
        rx,
        out,
        n_gen: 0,
        include_usage,
        ended: false,
    };
    let events = stream::unfold(state, |mut s| async move {
        loop {
            if let Some(data) = s.out.pop_front() {
                return Some((Ok::<_, Infallible>(Event::default().data(data)), s));
            }
            if s.ended {
                return None;
            }
            match s.rx.recv().await {
                Some(BatchEvent::Token(t)) => {
                    s.n_gen += 1;
                    if !t.text.is_empty() {
                        let c = s.meta.chunk(s.meta.text_delta(&t.text), None);
                        s.out.push_back(c);
                    }
                }
                Some(BatchEvent::Done(f)) => {
                    if !f.tail.is_empty() {
                        let c = s.meta.chunk(s.meta.text_delta(&f.tail), None);
                        s.out.push_back(c);
                    }
                    let last = match s.meta.kind {
                        Kind::Completion => Value::String(String::new()),
                        Kind::Chat => json!({}),
                    };
                    let c = s.meta.chunk(last, Some(f.reason.as_str()));
                    s.out.push_back(c);
                    if s.include_usage {
                        let u = s.meta.usage_chunk(s.n_gen);
                        s.out.push_back(u);
                    }
                    s.out.push_back("[DONE]".into());
                    s.ended = true;
                }
                Some(BatchEvent::Error(e)) => {
                    let body = ApiError::internal(e.to_string()).body().to_string();
                    s.out.push_back(body);
                    s.out.push_back("[DONE]".into());
                    s.ended = true;
                }
                Some(BatchEvent::Started { .. }) => {}
                None => {
                    let body = ApiError::internal("the scheduler stopped")
                        .body()
                        .to_string();
                    s.out.push_back(body);
                    s.ended = true;
                }
            }
        }
    });
    Sse::new(events).into_response()
}
