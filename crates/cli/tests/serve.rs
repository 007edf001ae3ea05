//! `powerinfer serve` over real HTTP on a free loopback port with SmolLM2: completions and chat,
//! whole and streamed, equal to the single-sequence runs; a suite of malformed requests answered
//! 4xx with OpenAI's error object while the server keeps serving; 503 on a full queue; a client
//! that disconnects frees its slot; SIGTERM stops the server cleanly. The load test (8 clients,
//! 200 requests, `--parallel 8` against `--parallel 1`) is `#[ignore]`d: run it by hand with
//! `cargo test -p powerinfer-cli --test serve -- --ignored --nocapture`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn smollm() -> Option<PathBuf> {
    let dir = std::env::var_os("POWERINFER_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models"));
    let p = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} absent (scripts/fetch-models.sh)", p.display());
        None
    }
}

/// A `powerinfer serve` child process; SIGTERM and a check of its clean exit on drop.
struct Server {
    child: Child,
    base: String,
    log: mpsc::Receiver<String>,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_powerinfer"))
            .args([
                "serve",
                "-m",
                model.to_str().unwrap(),
                "--port",
                "0",
                "-t",
                "2",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn powerinfer serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                child.kill().ok();
                child.wait().ok();
                panic!("server did not start in time");
            };
            if let Some(rest) = line.strip_prefix("listening on ") {
                let base = rest.split_whitespace().next().unwrap().to_owned();
                return Server {
                    child,
                    base,
                    log: rx,
                };
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                self.child.kill().ok();
                panic!("server did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
        while let Ok(l) = self.log.try_recv() {
            eprintln!("server: {l}");
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build()
}

/// POSTs a raw body; returns the status and the body text.
fn post_raw(agent: &ureq::Agent, url: &str, body: &str) -> (u16, String) {
    let r = agent
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(body);
    match r {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("POST {url}: {e}"),
    }
}

fn post(agent: &ureq::Agent, url: &str, body: &Value) -> (u16, Value) {
    let (status, text) = post_raw(agent, url, &body.to_string());
    let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, v)
}

fn get(agent: &ureq::Agent, url: &str) -> (u16, String) {
    match agent.get(url).call() {
        Ok(resp) => (resp.status(), resp.into_string().unwrap()),
        Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
        Err(e) => panic!("GET {url}: {e}"),
    }
}

/// The data payloads of a server-sent event stream, up to and including `[DONE]`.
fn sse(agent: &ureq::Agent, url: &str, body: &Value) -> Vec<String> {
    let resp = agent
        .post(url)
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .expect("stream request");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.content_type().starts_with("text/event-stream"),
        "{}",
        resp.content_type()
    );
    let mut out = Vec::new();
    for line in BufReader::new(resp.into_reader()).lines() {
        let line = line.unwrap();
        if let Some(d) = line.strip_prefix("data: ") {
            out.push(d.to_owned());
            if d == "[DONE]" {
                break;
            }
        } else {
            assert!(line.is_empty(), "unexpected SSE line {line:?}");
        }
    }
    assert_eq!(out.last().map(String::as_str), Some("[DONE]"));
    out
}

/// `powerinfer run --temp 0 --json`'s text.
fn run_text(model: &Path, prompt: &str, n: usize) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_powerinfer"))
        .args(["run", "-m", model.to_str().unwrap(), "-p", prompt])
        .args(["-n", &n.to_string(), "--temp", "0", "-t", "2", "--json"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_owned()
}

/// The answer of the facade's `Chat` (the single-sequence chat path), greedy.
fn chat_text(model: &Path, user: &str, n: usize) -> String {
    let llm = powerinfer::Llm::load(
        model,
        &powerinfer::LoadOptions {
            n_threads: 2,
            n_ctx: 512,
            ..Default::default()
        },
    )
    .unwrap();
    let opts = powerinfer::GenerateOptions {
        max_tokens: n,
        sampler: powerinfer::SamplerConfig::greedy(),
        ..Default::default()
    };
    llm.chat().unwrap().send(user, &opts, |_| {}).unwrap()
}

fn check_envelope(v: &Value, object: &str) {
    assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
    assert_eq!(v["object"], object, "{v}");
    assert!(v["created"].as_u64().is_some(), "{v}");
    assert!(v["model"].as_str().is_some(), "{v}");
    assert_eq!(v["choices"][0]["index"], 0, "{v}");
}

#[test]
fn completions_and_chat_equal_single_runs_streamed_or_not() {
    let Some(model) = smollm() else { return };
    let prompt = "The capital of France is";
    let n = 12;
    let expected = run_text(&model, prompt, n);
    let user = "What is the tallest mountain in the world?";
    let expected_chat = chat_text(&model, user, n);
    let server = Server::start(&model, &["-c", "512", "--parallel", "2"]);
    let a = agent();

    // completion, whole
    let (status, v) = post(
        &a,
        &server.url("/v1/completions"),
        &json!({"model": "x", "prompt": prompt, "max_tokens": n, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    check_envelope(&v, "text_completion");
    assert_eq!(v["choices"][0]["text"], expected.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], n);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(v["usage"]["total_tokens"], 5 + n);

    // completion, streamed
    let chunks = sse(
        &a,
        &server.url("/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": true}),
    );
    let mut text = String::new();
    let mut finish = None;
    for c in &chunks[..chunks.len() - 1] {
        let v: Value = serde_json::from_str(c).unwrap();
        check_envelope(&v, "text_completion");
        text.push_str(v["choices"][0]["text"].as_str().unwrap());
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    assert_eq!(text, expected);
    assert_eq!(finish.as_deref(), Some("length"));

    // chat, whole
    let msgs = json!([{"role": "user", "content": user}]);
    let (status, v) = post(
        &a,
        &server.url("/v1/chat/completions"),
        &json!({"messages": msgs, "max_tokens": n, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    check_envelope(&v, "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        expected_chat.as_str()
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 5);

    // chat, streamed, with usage
    let chunks = sse(
        &a,
        &server.url("/v1/chat/completions"),
        &json!({"messages": msgs, "max_tokens": n, "temperature": 0, "stream": true,
                "stream_options": {"include_usage": true}}),
    );
    let mut text = String::new();
    let mut usage = None;
    let first: Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    for c in &chunks[..chunks.len() - 1] {
        let v: Value = serde_json::from_str(c).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(ch) = v["choices"].get(0) {
            text.push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        }
        if !v["usage"].is_null() {
            usage = Some(v["usage"].clone());
        }
    }
    assert_eq!(text, expected_chat);
    assert_eq!(usage.unwrap()["completion_tokens"], n);

    // stop strings end the text before them
    let (_, v) = post(
        &a,
        &server.url("/v1/completions"),
        &json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "stop": ["."]}),
    );
    let cut = &expected[..expected.find('.').expect("a period in the expected text")];
    assert_eq!(v["choices"][0]["text"], cut, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // the other endpoints
    let (s, body) = get(&a, &server.url("/v1/models"));
    assert_eq!(s, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "model");
    let (s, body) = get(&a, &server.url("/health"));
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );
    let (s, body) = get(&a, &server.url("/metrics"));
    assert_eq!(s, 200);
    let metric = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("powerinfer_{name} ")))
            .unwrap_or_else(|| panic!("no {name} in {body}"))
            .parse()
            .unwrap()
    };
    assert_eq!(metric("requests_total"), 5.0);
    assert_eq!(metric("requests_completed_total"), 5.0);
    assert!(metric("generated_tokens_total") >= 4.0 * n as f64);
    assert_eq!(metric("queue_length"), 0.0);
    assert!(metric("tokens_per_second") > 0.0);
    // Each prompt was sent more than once (streamed and not): the repeats come from the prompt
    // cache, all but their last token, and the answers above are still the single runs'.
    assert!(metric("prompt_tokens_cached_total") > 0.0);

    assert!(server.stop().success(), "unclean exit on SIGTERM");
}

#[test]
fn malformed_requests_get_openai_errors_and_the_server_keeps_serving() {
    let Some(model) = smollm() else { return };
    let server = Server::start(&model, &["-c", "256", "--parallel", "1"]);
    let a = agent();
    let comp = server.url("/v1/completions");
    let chat = server.url("/v1/chat/completions");
    let long_prompt = "word ".repeat(400);
    // (url, body, status, param)
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (&comp, "{".into(), 400, None),
        (&comp, "".into(), 400, None),
        (&comp, "[1, 2]".into(), 400, None),
        (&comp, "\"prompt\"".into(), 400, None),
        (&comp, json!({}).to_string(), 400, Some("prompt")),
        (&comp, json!({"prompt": 5}).to_string(), 400, Some("prompt")),
        (
            &comp,
            json!({"prompt": []}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            &comp,
            json!({"prompt": ["a", "b"]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            &comp,
            json!({"prompt": [1, 999999999]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            &comp,
            json!({"prompt": [1, -3]}).to_string(),
            400,
            Some("prompt"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "max_tokens": "ten"}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "max_tokens": -1}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "max_tokens": 0}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "max_tokens": 1_000_000_000_000u64}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "max_tokens": 3.5}).to_string(),
            400,
            Some("max_tokens"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "temperature": 5}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "temperature": -0.5}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "temperature": "hot"}).to_string(),
            400,
            Some("temperature"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "top_p": 1.5}).to_string(),
            400,
            Some("top_p"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "presence_penalty": 3}).to_string(),
            400,
            Some("presence_penalty"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "stop": 5}).to_string(),
            400,
            Some("stop"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "stop": [1, 2]}).to_string(),
            400,
            Some("stop"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "stream": "yes"}).to_string(),
            400,
            Some("stream"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "stream_options": "x"}).to_string(),
            400,
            Some("stream_options"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "n": 2}).to_string(),
            400,
            Some("n"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "logprobs": 5}).to_string(),
            400,
            Some("logprobs"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "seed": "x"}).to_string(),
            400,
            Some("seed"),
        ),
        (
            &comp,
            json!({"prompt": "hi", "model": 5}).to_string(),
            400,
            Some("model"),
        ),
        (
            &comp,
            json!({"prompt": long_prompt}).to_string(),
            400,
            Some("prompt"),
        ),
        (&chat, json!({}).to_string(), 400, Some("messages")),
        (
            &chat,
            json!({"messages": []}).to_string(),
            400,
            Some("messages"),
        ),
        (
            &chat,
            json!({"messages": "hi"}).to_string(),
            400,
            Some("messages"),
        ),
        (
            &chat,
            json!({"messages": [5]}).to_string(),
            400,
            Some("messages[0]"),
        ),
        (
            &chat,
            json!({"messages": [{"content": "hi"}]}).to_string(),
            400,
            Some("messages[0].role"),
        ),
        (
            &chat,
            json!({"messages": [{"role": "wizard", "content": "hi"}]}).to_string(),
            400,
            Some("messages[0].role"),
        ),
        (
            &chat,
            json!({"messages": [{"role": "user", "content": 5}]}).to_string(),
            400,
            Some("messages[0].content"),
        ),
        (
            &chat,
            json!({"messages": [{"role": "user", "content": long_prompt}]}).to_string(),
            400,
            Some("messages"),
        ),
    ];
    assert!(cases.len() >= 20);
    for (url, body, status, param) in &cases {
        let (got, text) = post_raw(&a, url, body);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let shown = &body[..body.len().min(80)];
        assert_eq!(got, *status, "{shown}: {v}");
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert_eq!(err["type"], "invalid_request_error", "{v}");
        assert!(
            err.get("param").is_some() && err.get("code").is_some(),
            "{v}"
        );
        if let Some(p) = param {
            assert_eq!(err["param"], *p, "{shown}: {v}");
        }
    }
    // Routing and transport errors.
    let (s, text) = get(&a, &server.url("/v1/nothing"));
    assert_eq!(s, 404, "{text}");
    assert!(text.contains("\"error\""));
    let (s, text) = get(&a, &server.url("/v1/completions"));
    assert_eq!(s, 405, "{text}");
    assert!(text.contains("\"error\""));
    // An oversized body: the server answers 413 as soon as it has read past the limit and
    // closes the connection, so the client, still uploading, may see its write fail (a broken
    // pipe or a reset) before it reads the answer. Either is a refusal; the checks below then
    // show that the server keeps serving.
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(5 << 20));
    match a
        .post(&comp)
        .set("Content-Type", "application/json")
        .send_string(&big)
    {
        Err(ureq::Error::Status(413, resp)) => {
            assert!(resp.into_string().unwrap().contains("\"error\""));
        }
        Err(ureq::Error::Transport(t)) => {
            let msg = t.to_string();
            assert!(
                msg.contains("Broken pipe") || msg.contains("reset"),
                "oversized body: unexpected transport error {msg}"
            );
        }
        Ok(resp) => panic!("oversized body accepted: {}", resp.status()),
        Err(e) => panic!("oversized body: {e}"),
    }
    // Not HTTP at all.
    let addr = server.base.trim_start_matches("http://");
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(b"GARBAGE\x00\x01\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    sock.read_to_end(&mut reply).ok();
    assert!(
        reply.is_empty() || String::from_utf8_lossy(&reply).starts_with("HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&reply)
    );

    // Still serving.
    let (s, _) = get(&a, &server.url("/health"));
    assert_eq!(s, 200);
    let (s, v) = post(
        &a,
        &comp,
        &json!({"prompt": "Hello", "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let (_, metrics) = get(&a, &server.url("/metrics"));
    assert!(
        metrics.contains("powerinfer_requests_total 1\n"),
        "{metrics}"
    );
    assert!(server.stop().success());
}

#[test]
fn full_queue_answers_503_and_a_disconnect_frees_the_slot() {
    let Some(model) = smollm() else { return };
    let server = Server::start(&model, &["-c", "512", "--parallel", "1", "--queue", "1"]);
    let a = agent();
    let comp = server.url("/v1/completions");
    let metric = |name: &str| -> f64 {
        let (_, body) = get(&a, &server.url("/metrics"));
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("powerinfer_{name} ")))
            .unwrap()
            .parse()
            .unwrap()
    };
    // A long streamed request holds the only slot.
    let long = a
        .post(&comp)
        .send_string(
            &json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true,
                    "temperature": 0, "stream": true})
            .to_string(),
        )
        .unwrap();
    let mut lines = BufReader::new(long.into_reader()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("data: "), "{first}");
    // A second waits in the queue...
    let url = comp.clone();
    let waiting = std::thread::spawn(move || {
        post(
            &agent(),
            &url,
            &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric("queue_length") < 1.0 {
        assert!(Instant::now() < deadline, "the second request never queued");
        std::thread::sleep(Duration::from_millis(20));
    }
    // ... and a third finds the queue full.
    let t = Instant::now();
    let (s, v) = post(&a, &comp, &json!({"prompt": "Hi", "max_tokens": 4}));
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "queue_full");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "503 was not immediate"
    );
    assert_eq!(metric("requests_rejected_total"), 1.0);
    // The first client hangs up: its slot goes to the waiting request.
    drop(lines);
    let (s, v) = waiting.join().unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 4);
    assert_eq!(metric("requests_cancelled_total"), 1.0);
    assert!(metric("generated_tokens_total") < 400.0);
    // A client of a whole (not streamed) answer that hangs up frees its slot too.
    let addr = server.base.trim_start_matches("http://").to_owned();
    let body =
        json!({"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": true}).to_string();
    let mut sock = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        sock,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric("active_sequences") < 1.0 {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(sock);
    while metric("requests_cancelled_total") < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the hang-up did not cancel the sequence"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(metric("active_sequences"), 0.0);
    assert!(server.stop().success());
}

/// 8 concurrent clients send 200 requests of 32 tokens; every greedy answer must equal the
/// single-sequence one. Prints aggregate tokens/s for `--parallel 8` and `--parallel 1`.
#[test]
// Ignored in CI: it is a throughput measurement (400 requests, 1-7 minutes depending on the
// build), not a correctness check the other tests lack. Run by hand on a quiet machine, in
// release: `cargo test --release -p powerinfer-cli --test serve load -- --ignored --nocapture`;
// its figures are in docs/PERFORMANCE.md ("Serving").
#[ignore = "load test: about a minute or two on 2 cores; run by hand with --ignored --nocapture"]
fn load_8_clients_200_requests() {
    let Some(model) = smollm() else { return };
    let subjects = [
        "the ocean",
        "a small town",
        "mathematics",
        "the moon",
        "coffee",
        "a robot",
        "winter",
        "music",
        "a library",
        "the history of Rome",
        "bicycles",
        "volcanoes",
        "friendship",
        "the internet",
        "a forest",
        "chess",
        "bread",
        "rain",
        "trains",
        "honey bees",
    ];
    let prompts: Vec<String> = subjects
        .iter()
        .map(|s| format!("Here is a short paragraph about {s}:"))
        .collect();
    let n_tokens = 32;
    // The single-sequence answers, in process.
    let llm = powerinfer::Llm::load(
        &model,
        &powerinfer::LoadOptions {
            n_threads: 2,
            n_ctx: 512,
            ..Default::default()
        },
    )
    .unwrap();
    let opts = powerinfer::GenerateOptions {
        max_tokens: n_tokens,
        sampler: powerinfer::SamplerConfig::greedy(),
        ..Default::default()
    };
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| {
            let mut s = llm.session().unwrap();
            let mut st = s.generate_text(p, &opts).unwrap();
            let mut text = String::new();
            for t in st.by_ref() {
                text.push_str(&t.unwrap().text);
            }
            text + &st.flush()
        })
        .collect();
    drop(llm);
    let n_requests = 200;
    let mut rates = Vec::new();
    for parallel in [8, 1] {
        let server = Server::start(
            &model,
            &[
                "-c",
                "512",
                "--parallel",
                &parallel.to_string(),
                "--queue",
                "256",
            ],
        );
        let url = server.url("/v1/completions");
        let next = std::sync::atomic::AtomicUsize::new(0);
        let start = Instant::now();
        let tokens: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        let a = agent();
                        let mut tokens = 0;
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            if i >= n_requests {
                                return tokens;
                            }
                            let k = i % prompts.len();
                            let (st, v) = post(
                                &a,
                                &url,
                                &json!({"prompt": prompts[k], "max_tokens": n_tokens, "temperature": 0}),
                            );
                            assert_eq!(st, 200, "{v}");
                            assert_eq!(v["choices"][0]["text"], expected[k].as_str(), "request {i}");
                            tokens += v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        let secs = start.elapsed().as_secs_f64();
        let rate = tokens as f64 / secs;
        eprintln!(
            "--parallel {parallel}: {n_requests} requests, {tokens} tokens in {secs:.1} s = {rate:.1} tokens/s"
        );
        rates.push(rate);
        assert!(server.stop().success());
    }
    eprintln!(
        "speed-up --parallel 8 over --parallel 1: {:.2}x",
        rates[0] / rates[1]
    );
}

#[test]
fn batch_cli_writes_results_in_input_order_equal_to_run() {
    let Some(model) = smollm() else { return };
    let prompts = [
        "The capital of France is",
        "1, 2, 3,",
        "My favourite food is",
        "Hello",
    ];
    let dir = std::env::temp_dir().join(format!("powerinfer-batch-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("prompts.jsonl");
    let output = dir.join("out.jsonl");
    let mut lines = String::new();
    for (i, p) in prompts.iter().enumerate() {
        // The second prompt overrides -n; a blank line is skipped.
        let v = if i == 1 {
            json!({"prompt": p, "n_predict": 4})
        } else {
            json!({"prompt": p})
        };
        lines.push_str(&format!("{v}\n\n"));
    }
    std::fs::write(&input, lines).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_powerinfer"))
        .args([
            "batch",
            "-m",
            model.to_str().unwrap(),
            "-f",
            input.to_str().unwrap(),
        ])
        .args([
            "-o",
            output.to_str().unwrap(),
            "--parallel",
            "3",
            "-n",
            "8",
            "--temp",
            "0",
        ])
        .args(["-t", "2", "-c", "256"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("tokens/s"), "{stderr}");
    let results: Vec<Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(results.len(), prompts.len());
    for (i, (r, p)) in results.iter().zip(prompts).enumerate() {
        let n = if i == 1 { 4 } else { 8 };
        assert_eq!(r["index"], i);
        assert_eq!(r["prompt"], p);
        assert_eq!(r["text"], run_text(&model, p, n).as_str(), "prompt {i}");
    }
    // A bad line is an error naming the line.
    std::fs::write(&input, "{\"prompt\": \"ok\"}\n{\"prompt\": 5}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_powerinfer"))
        .args([
            "batch",
            "-m",
            model.to_str().unwrap(),
            "-f",
            input.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("prompts.jsonl:2"));
    std::fs::remove_dir_all(&dir).ok();
}
