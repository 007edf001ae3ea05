//! `llamacpp-bench`: the llama.cpp reference side of powerinfer's side-by-side comparisons.
//!
//! llama.cpp's own C API (vendored and compiled by the `llama-cpp-sys-2` crate) driven the way
//! llama.cpp's tools drive it:
//!
//! * `bench`: like `llama-bench`: pp = one prompt of `-p` tokens decoded in `-b`-sized
//!   `llama_decode` calls, tg = `-n` sequential single-token decodes, each from an empty KV cache
//!   or (`-d N`) after N random tokens decoded untimed; one warm-up run of each, then `-r` timed
//!   repetitions; median (and all samples).
//! * `generate`: like `llama-simple`: greedy continuation of a prompt, with the token ids.
//! * `golden`: `generate` over the golden-continuation files in shared/data, checked against them,
//!   written out as one JSON file of token ids.
//! * `perplexity`: like `llama-perplexity`: windows of `-c` tokens, BOS at each window start,
//!   the second half of each window scored.
//! * `logits`: the logits of a token-id prompt (every row) and of its greedy continuation, for
//!   models without a usable tokenizer (the tiny test models of powerinfer-generate).
//! * `quantize`: like `llama-quantize`: a GGUF file into another `llama_ftype` (its number),
//!   optionally `--pure` (every tensor the base type) and `--allow-requantize`.
//! * `info`: the ggml build's CPU feature line.

use std::ffi::{CStr, CString, c_char, c_void};
use std::fmt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::time::Instant;

use llama_cpp_sys_2 as sys;
use serde_json::{Value, json};

/// Everything that can go wrong, each naming its problem.
#[derive(Debug)]
enum Error {
    /// Bad command line.
    Usage(String),
    /// A file could not be read or written.
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A JSON file did not have the expected shape.
    Json { path: PathBuf, what: String },
    /// llama.cpp refused to load the model.
    ModelLoad(PathBuf),
    /// llama.cpp could not create a context.
    Context,
    /// A string with an interior NUL byte was given where C needs a C string.
    Nul(String),
    /// Tokenization failed.
    Tokenize(String),
    /// `llama_decode` returned a non-zero status.
    Decode(i32),
    /// The input is too short for the requested operation.
    TooShort(String),
    /// llama.cpp has no logits for the requested output row.
    NoLogits(i32),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Usage(m) => write!(f, "usage error: {m}\n\n{USAGE}"),
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            Error::Json { path, what } => write!(f, "{}: {what}", path.display()),
            Error::ModelLoad(p) => write!(f, "llama.cpp failed to load model {}", p.display()),
            Error::Context => write!(f, "llama.cpp failed to create a context"),
            Error::Nul(s) => write!(f, "string contains a NUL byte: {s:?}"),
            Error::Tokenize(s) => write!(f, "tokenization failed: {s}"),
            Error::Decode(rc) => write!(f, "llama_decode failed with status {rc}"),
            Error::TooShort(s) => write!(f, "input too short: {s}"),
            Error::NoLogits(i) => write!(f, "llama.cpp returned no logits for output row {i}"),
        }
    }
}

impl std::error::Error for Error {}

type Result<T> = std::result::Result<T, Error>;

const USAGE: &str = "\
llamacpp-bench bench      -m FILE [-p 512] [-n 128] [-d 0] [-t 2] [-r 3] [-b 2048] [-ub 512] [-fa auto|on|off] [--json]
                           [--min-cpu-share 0.0] [--max-retries 5]
llamacpp-bench generate   -m FILE -p PROMPT [-n 32] [-t 2] [-fa auto|on|off] [--prompt-batch N]
llamacpp-bench golden     [-n 32] [-t 2] [-fa auto|on|off] [--prompt-batch N] -o OUT.json MODEL GOLDEN.json [MODEL GOLDEN.json ...]
llamacpp-bench perplexity -m FILE -f TEXT [-c 512] [-b 2048] [-t 2] [--chunks N] [-fa auto|on|off]
llamacpp-bench logits     -m FILE --ids 1,2,3 [-n 8] [-t 1] [-fa auto|on|off]
llamacpp-bench quantize   IN OUT FTYPE_NUMBER [--pure] [--allow-requantize] [-t 2]
llamacpp-bench batched    -m FILE [-p 16] [-n 32] [--npl 1,2,4,8] [-t 2] [-r 3] [-fa auto|on|off] [--json]
llamacpp-bench info
Common: -v prints llama.cpp's own log (default: warnings and errors only); --no-repack loads
the weights without llama.cpp's repacked CPU layouts (the plain vec_dot kernels everywhere).";

// ---------------------------------------------------------------------------------------------
// Logging

static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `--no-repack`: load weights without llama.cpp's repacked CPU layouts (`use_extra_bufts =
/// false`), so every matrix product runs the types' plain `vec_dot` kernels.
static NO_REPACK: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

unsafe extern "C" fn log_callback(level: sys::ggml_log_level, text: *const c_char, _: *mut c_void) {
    let verbose = VERBOSE.load(std::sync::atomic::Ordering::Relaxed);
    if text.is_null()
        || !(verbose || level == sys::GGML_LOG_LEVEL_WARN || level == sys::GGML_LOG_LEVEL_ERROR)
    {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for the duration of the call.
    let s = unsafe { CStr::from_ptr(text) };
    eprint!("{}", s.to_string_lossy());
}

// ---------------------------------------------------------------------------------------------
// Thin owning wrappers over the C objects

/// A loaded model; freed on drop.
struct Model {
    ptr: NonNull<sys::llama_model>,
}

impl Model {
    fn load(path: &Path) -> Result<Model> {
        if !path.is_file() {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such model file"),
            });
        }
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| Error::Nul(path.display().to_string()))?;
        // SAFETY: default params are plain data; CPU only (the build has no GPU backend).
        let mut params = unsafe { sys::llama_model_default_params() };
        params.n_gpu_layers = 0;
        if NO_REPACK.load(std::sync::atomic::Ordering::Relaxed) {
            params.use_extra_bufts = false;
        }
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        let ptr = unsafe { sys::llama_model_load_from_file(c.as_ptr(), params) };
        NonNull::new(ptr)
            .map(|ptr| Model { ptr })
            .ok_or_else(|| Error::ModelLoad(path.to_path_buf()))
    }

    fn vocab(&self) -> *const sys::llama_vocab {
        // SAFETY: the model pointer is live; the vocab lives as long as the model.
        unsafe { sys::llama_model_get_vocab(self.ptr.as_ptr()) }
    }

    fn n_vocab(&self) -> usize {
        // SAFETY: vocab pointer from a live model.
        unsafe { sys::llama_vocab_n_tokens(self.vocab()) }.max(0) as usize
    }

    fn add_bos(&self) -> bool {
        // SAFETY: vocab pointer from a live model.
        unsafe { sys::llama_vocab_get_add_bos(self.vocab()) }
    }

    fn bos(&self) -> sys::llama_token {
        // SAFETY: vocab pointer from a live model.
        unsafe { sys::llama_vocab_bos(self.vocab()) }
    }

    fn is_eog(&self, t: sys::llama_token) -> bool {
        // SAFETY: vocab pointer from a live model.
        unsafe { sys::llama_vocab_is_eog(self.vocab(), t) }
    }

    fn desc(&self) -> String {
        let mut buf = vec![0u8; 256];
        // SAFETY: buf is writable for buf.len() bytes; llama_model_desc NUL-terminates within it.
        let n = unsafe {
            sys::llama_model_desc(
                self.ptr.as_ptr(),
                buf.as_mut_ptr() as *mut c_char,
                buf.len(),
            )
        };
        buf.truncate(n.clamp(0, 255) as usize);
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn size_bytes(&self) -> u64 {
        // SAFETY: live model.
        unsafe { sys::llama_model_size(self.ptr.as_ptr()) }
    }

    fn n_params(&self) -> u64 {
        // SAFETY: live model.
        unsafe { sys::llama_model_n_params(self.ptr.as_ptr()) }
    }

    /// llama.cpp's tokenizer, as `llama-simple` calls it: special tokens added where the model
    /// says so (BOS), special-token text parsed.
    fn tokenize(&self, text: &str, add_special: bool) -> Result<Vec<sys::llama_token>> {
        let len =
            i32::try_from(text.len()).map_err(|_| Error::Tokenize("text over 2 GiB".into()))?;
        let mut cap = text.len() + 8;
        loop {
            let mut out = vec![0 as sys::llama_token; cap];
            // SAFETY: text is valid for len bytes (no NUL needed: length given); out holds cap tokens.
            let n = unsafe {
                sys::llama_tokenize(
                    self.vocab(),
                    text.as_ptr() as *const c_char,
                    len,
                    out.as_mut_ptr(),
                    cap as i32,
                    add_special,
                    true,
                )
            };
            if n >= 0 {
                out.truncate(n as usize);
                return Ok(out);
            }
            if n == i32::MIN {
                return Err(Error::Tokenize("token count overflows i32".into()));
            }
            cap = (-n) as usize;
        }
    }

    /// The bytes of one token as `llama-simple` prints them (special tokens rendered).
    fn piece(&self, t: sys::llama_token) -> Vec<u8> {
        let mut buf = vec![0u8; 64];
        loop {
            // SAFETY: buf is writable for buf.len() bytes.
            let n = unsafe {
                sys::llama_token_to_piece(
                    self.vocab(),
                    t,
                    buf.as_mut_ptr() as *mut c_char,
                    buf.len() as i32,
                    0,
                    true,
                )
            };
            if n >= 0 {
                buf.truncate(n as usize);
                return buf;
            }
            buf.resize((-n) as usize, 0);
        }
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_model_load_from_file and is freed once; all
        // contexts borrowing it have been dropped first (Ctx holds a &Model).
        unsafe { sys::llama_model_free(self.ptr.as_ptr()) }
    }
}

/// Debug aid (`LLAMACPP_DUMP` set, see the README): every contiguous F32 graph tensor whose
/// name is asked for, as one JSON line on stderr.
unsafe extern "C" fn dump_cb(t: *mut sys::ggml_tensor, ask: bool, _u: *mut c_void) -> bool {
    if ask {
        // SAFETY: debugging aid.
        let name = unsafe { CStr::from_ptr((*t).name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        return match std::env::var("LLAMACPP_DUMP").as_deref() {
            Ok("none") => false,
            Ok(prefix) if prefix != "1" => name.starts_with(prefix),
            _ => true,
        };
    }
    // SAFETY: debugging aid; the scheduler hands a live CPU tensor.
    unsafe {
        let t = &*t;
        let name = CStr::from_ptr(t.name.as_ptr())
            .to_string_lossy()
            .into_owned();
        let n = (t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]) as usize;
        let contiguous = t.nb[0] == 4
            && t.nb[1] == 4 * t.ne[0] as usize
            && t.nb[2] == t.nb[1] * t.ne[1] as usize;
        if t.type_ == sys::GGML_TYPE_F32 && contiguous && !t.data.is_null() {
            let d = std::slice::from_raw_parts(t.data as *const f32, n);
            let bits: Vec<u32> = d.iter().map(|v| v.to_bits()).collect();
            eprintln!("{}", json!({"name": name, "ne": t.ne, "bits": bits}));
        }
    }
    true
}

/// Context settings taken from the command line.
#[derive(Clone, Copy, Debug)]
struct CtxOpts {
    n_ctx: u32,
    n_batch: u32,
    n_ubatch: u32,
    threads: i32,
    flash_attn: sys::llama_flash_attn_type,
    /// Sequences the context holds at once (1 except for `batched`).
    n_seq_max: u32,
}

/// An inference context over a model; freed on drop.
struct Ctx<'m> {
    ptr: NonNull<sys::llama_context>,
    model: &'m Model,
}

impl<'m> Ctx<'m> {
    fn new(model: &'m Model, o: CtxOpts) -> Result<Ctx<'m>> {
        // SAFETY: default params are plain data.
        let mut p = unsafe { sys::llama_context_default_params() };
        p.n_ctx = o.n_ctx;
        p.n_batch = o.n_batch;
        p.n_ubatch = o.n_ubatch.min(o.n_batch);
        p.n_threads = o.threads;
        p.n_threads_batch = o.threads;
        p.flash_attn_type = o.flash_attn;
        p.n_seq_max = o.n_seq_max;
        p.no_perf = true;
        if std::env::var_os("LLAMACPP_DUMP").is_some() {
            p.cb_eval = Some(dump_cb);
        }
        // SAFETY: live model; params by value.
        let ptr = unsafe { sys::llama_init_from_model(model.ptr.as_ptr(), p) };
        NonNull::new(ptr)
            .map(|ptr| Ctx { ptr, model })
            .ok_or(Error::Context)
    }

    fn clear(&self) {
        // SAFETY: live context; its memory object lives as long as it does.
        unsafe { sys::llama_memory_clear(sys::llama_get_memory(self.ptr.as_ptr()), true) }
    }

    /// Forgets every position from `pos` on (the next decode continues at `pos`).
    fn truncate(&self, pos: usize) {
        // SAFETY: live context; its memory object lives as long as it does.
        unsafe {
            sys::llama_memory_seq_rm(sys::llama_get_memory(self.ptr.as_ptr()), 0, pos as i32, -1);
        }
    }

    /// Decodes `tokens` (appended after what is in the KV cache, llama.cpp tracks positions),
    /// in chunks of `n_batch`; only the last token's logits are computed.
    fn decode(&self, tokens: &mut [sys::llama_token], n_batch: usize) -> Result<()> {
        for chunk in tokens.chunks_mut(n_batch.max(1)) {
            // SAFETY: the batch borrows `chunk`, which outlives the llama_decode call.
            let rc = unsafe {
                let batch = sys::llama_batch_get_one(chunk.as_mut_ptr(), chunk.len() as i32);
                sys::llama_decode(self.ptr.as_ptr(), batch)
            };
            if rc != 0 {
                return Err(Error::Decode(rc));
            }
        }
        Ok(())
    }

    /// Decodes `tokens` at positions `pos0..` of sequence 0 with logits for every token.
    fn decode_all_logits(&self, tokens: &[sys::llama_token], pos0: usize) -> Result<()> {
        let entries: Vec<_> = tokens
            .iter()
            .enumerate()
            .map(|(i, &t)| (t, pos0 + i, 0))
            .collect();
        self.decode_entries(&entries)
    }

    /// Decodes one batch of `(token, position, sequence)` entries, each with its logits.
    fn decode_entries(&self, entries: &[(sys::llama_token, usize, i32)]) -> Result<()> {
        let n = entries.len();
        // SAFETY: llama_batch_init allocates n entries of each array (1 seq id each); we fill
        // exactly n entries, decode, and free the batch on every path.
        unsafe {
            let mut batch = sys::llama_batch_init(n as i32, 0, 1);
            for (i, &(t, pos, seq)) in entries.iter().enumerate() {
                *batch.token.add(i) = t;
                *batch.pos.add(i) = pos as sys::llama_pos;
                *batch.n_seq_id.add(i) = 1;
                *(*batch.seq_id.add(i)) = seq;
                *batch.logits.add(i) = 1;
            }
            batch.n_tokens = n as i32;
            let rc = sys::llama_decode(self.ptr.as_ptr(), batch);
            sys::llama_batch_free(batch);
            if rc != 0 {
                return Err(Error::Decode(rc));
            }
        }
        Ok(())
    }

    fn sync(&self) {
        // SAFETY: live context.
        unsafe { sys::llama_synchronize(self.ptr.as_ptr()) }
    }

    /// The logits of output row `i` (-1: the last one), `n_vocab` floats.
    fn logits(&self, i: i32) -> Result<&[f32]> {
        let n = self.model.n_vocab();
        // SAFETY: after a successful decode that requested output row i, llama.cpp returns a
        // pointer to n_vocab floats that stays valid until the next decode on this context;
        // the returned slice borrows self, so no decode can happen while it is alive.
        unsafe {
            let p = sys::llama_get_logits_ith(self.ptr.as_ptr(), i);
            if p.is_null() {
                return Err(Error::NoLogits(i));
            }
            Ok(std::slice::from_raw_parts(p, n))
        }
    }
}

impl Drop for Ctx<'_> {
    fn drop(&mut self) {
        // SAFETY: the pointer came from llama_init_from_model and is freed once.
        unsafe { sys::llama_free(self.ptr.as_ptr()) }
    }
}

// ---------------------------------------------------------------------------------------------
// Command line

struct Args {
    pos: Vec<String>,
    opts: Vec<(String, Option<String>)>,
}

/// Flags that take no value.
const SWITCHES: &[&str] = &[
    "--json",
    "-v",
    "--pure",
    "--allow-requantize",
    "--no-repack",
];

impl Args {
    fn parse(raw: &[String]) -> Result<Args> {
        let mut pos = Vec::new();
        let mut opts = Vec::new();
        let mut it = raw.iter();
        while let Some(a) = it.next() {
            if a.starts_with('-') && a.len() > 1 {
                if SWITCHES.contains(&a.as_str()) {
                    opts.push((a.clone(), None));
                } else {
                    let v = it
                        .next()
                        .ok_or_else(|| Error::Usage(format!("{a} needs a value")))?;
                    opts.push((a.clone(), Some(v.clone())));
                }
            } else {
                pos.push(a.clone());
            }
        }
        Ok(Args { pos, opts })
    }

    fn flag(&self, name: &str) -> bool {
        self.opts.iter().any(|(k, _)| k == name)
    }

    fn str(&self, names: &[&str]) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(k, _)| names.contains(&k.as_str()))
            .and_then(|(_, v)| v.as_deref())
    }

    fn num<T: std::str::FromStr>(&self, names: &[&str], default: T) -> Result<T> {
        match self.str(names) {
            None => Ok(default),
            Some(v) => v
                .parse()
                .map_err(|_| Error::Usage(format!("{} expects a number, got {v:?}", names[0]))),
        }
    }

    fn required(&self, names: &[&str]) -> Result<&str> {
        self.str(names)
            .ok_or_else(|| Error::Usage(format!("{} is required", names[0])))
    }

    fn check_known(&self, known: &[&str]) -> Result<()> {
        for (k, _) in &self.opts {
            if !known.contains(&k.as_str()) && k != "-v" && k != "--no-repack" {
                return Err(Error::Usage(format!("unknown option {k}")));
            }
        }
        Ok(())
    }

    fn flash_attn(&self) -> Result<sys::llama_flash_attn_type> {
        match self.str(&["-fa", "--flash-attn"]).unwrap_or("auto") {
            "auto" => Ok(sys::LLAMA_FLASH_ATTN_TYPE_AUTO),
            "on" | "1" => Ok(sys::LLAMA_FLASH_ATTN_TYPE_ENABLED),
            "off" | "0" => Ok(sys::LLAMA_FLASH_ATTN_TYPE_DISABLED),
            v => Err(Error::Usage(format!(
                "-fa expects auto, on or off, got {v:?}"
            ))),
        }
    }

    fn threads(&self) -> Result<i32> {
        let t: i32 = self.num(&["-t", "--threads"], 2)?;
        if t < 1 {
            return Err(Error::Usage("-t must be at least 1".into()));
        }
        Ok(t)
    }
}

fn fa_name(fa: sys::llama_flash_attn_type) -> &'static str {
    match fa {
        sys::LLAMA_FLASH_ATTN_TYPE_ENABLED => "on",
        sys::LLAMA_FLASH_ATTN_TYPE_DISABLED => "off",
        _ => "auto",
    }
}

fn system_info() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string.
    unsafe { CStr::from_ptr(sys::llama_print_system_info()) }
        .to_string_lossy()
        .trim()
        .to_string()
}

fn read_to_string(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

// ---------------------------------------------------------------------------------------------
// bench

/// splitmix64: a small seeded generator for the random prompt tokens.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn token(&mut self, n_vocab: usize) -> sys::llama_token {
        (self.next() % n_vocab as u64) as sys::llama_token
    }
}

/// CPU time and run-queue wait of this process so far, in seconds, summed over its threads
/// (Linux `/proc/self/task/*/schedstat`: ns on a CPU, ns runnable but waiting for one). The wait
/// is the direct measure of interference from other processes on a shared machine.
fn sched_times() -> Option<(f64, f64)> {
    let (mut run, mut wait) = (0u64, 0u64);
    for e in std::fs::read_dir("/proc/self/task").ok()? {
        let Ok(text) = std::fs::read_to_string(e.ok()?.path().join("schedstat")) else {
            continue;
        };
        let mut f = text
            .split_whitespace()
            .map(|x| x.parse::<u64>().unwrap_or(0));
        run += f.next().unwrap_or(0);
        wait += f.next().unwrap_or(0);
    }
    Some((run as f64 * 1e-9, wait as f64 * 1e-9))
}

/// Timing of one benchmark phase: wall time plus the CPU and run-queue-wait time it cost.
#[derive(Default)]
struct Phase {
    wall: f64,
    cpu: f64,
    wait: f64,
}

impl Phase {
    fn json(&self, threads: i32) -> Value {
        let r3 = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({
            "wall_s": r3(self.wall),
            "cpu_s": r3(self.cpu),
            "runqueue_wait_s": r3(self.wait),
            // Fraction of the threads' wall time they actually spent on a CPU: ~1.0 on a quiet
            // machine (ggml threads spin rather than sleep), far below it under contention.
            "cpu_share": if self.wall > 0.0 { r3(self.cpu / (self.wall * threads as f64)) } else { 0.0 },
        })
    }
}

/// Times `f`: its wall time and the CPU and run-queue-wait time the process spent meanwhile.
fn timed(f: impl FnOnce() -> Result<()>) -> Result<Phase> {
    let s0 = sched_times();
    let t0 = Instant::now();
    f()?;
    let wall = t0.elapsed().as_secs_f64();
    let (cpu, wait) = match (s0, sched_times()) {
        (Some((c0, w0)), Some((c1, w1))) => (c1 - c0, w1 - w0),
        _ => (f64::NAN, f64::NAN),
    };
    Ok(Phase { wall, cpu, wait })
}

/// Timed repetitions of one benchmark phase, with contended runs optionally thrown away.
struct Reps {
    threads: i32,
    /// Runs whose `cpu_share` is below this are redone (up to `max_retries` times in all).
    min_share: f64,
    max_retries: usize,
    retried: usize,
    total: Phase,
    rates: Vec<f64>,
}

impl Reps {
    fn new(threads: i32, min_share: f64, max_retries: usize) -> Reps {
        Reps {
            threads,
            min_share,
            max_retries,
            retried: 0,
            total: Phase::default(),
            rates: Vec::new(),
        }
    }

    /// Runs `f` (which processes `n` tokens) until it gets a run with enough CPU share or runs
    /// out of retries, and records that run.
    fn run(&mut self, n: usize, mut f: impl FnMut() -> Result<()>) -> Result<()> {
        loop {
            let ph = timed(&mut f)?;
            let share = ph.cpu / (ph.wall * self.threads as f64);
            if share < self.min_share && self.retried < self.max_retries {
                self.retried += 1;
                continue;
            }
            self.total.wall += ph.wall;
            self.total.cpu += ph.cpu;
            self.total.wait += ph.wait;
            self.rates.push(n as f64 / ph.wall);
            return Ok(());
        }
    }

    fn share(&self) -> f64 {
        if self.total.wall > 0.0 {
            self.total.cpu / (self.total.wall * self.threads as f64)
        } else {
            1.0
        }
    }
}

fn loadavg() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

fn cmd_bench(a: &Args) -> Result<()> {
    a.check_known(&[
        "-m",
        "-p",
        "-n",
        "-d",
        "--n-depth",
        "-t",
        "--threads",
        "-r",
        "-b",
        "-ub",
        "-fa",
        "--flash-attn",
        "--json",
        "--min-cpu-share",
        "--max-retries",
    ])?;
    let path = PathBuf::from(a.required(&["-m"])?);
    let n_prompt: usize = a.num(&["-p"], 512)?;
    let n_gen: usize = a.num(&["-n"], 128)?;
    let depth: usize = a.num(&["-d", "--n-depth"], 0)?;
    let threads = a.threads()?;
    let reps: usize = a.num(&["-r"], 3)?;
    let n_batch: u32 = a.num(&["-b"], 2048)?;
    let n_ubatch: u32 = a.num(&["-ub"], 512)?;
    let fa = a.flash_attn()?;
    let min_share: f64 = a.num(&["--min-cpu-share"], 0.0)?;
    let max_retries: usize = a.num(&["--max-retries"], 5)?;
    if reps == 0 || n_batch == 0 || n_ubatch == 0 {
        return Err(Error::Usage("-r, -b and -ub must be at least 1".into()));
    }
    let model = Model::load(&path)?;
    let n_vocab = model.n_vocab();
    let mut rng = SplitMix(0x5EED_1234);

    // Random prompt, BOS first where the model adds one (as llama-bench does).
    let make_prompt = |rng: &mut SplitMix, n: usize| -> Vec<sys::llama_token> {
        (0..n)
            .map(|i| {
                if i == 0 && model.add_bos() {
                    model.bos()
                } else {
                    rng.token(n_vocab)
                }
            })
            .collect()
    };

    // `-d`: every run (warm-up included) starts from a context of `depth` random tokens,
    // decoded untimed, as llama-bench's `-d` does.
    let fill = |ctx: &Ctx<'_>, rng: &mut SplitMix| -> Result<()> {
        ctx.clear();
        if depth > 0 {
            let mut toks = make_prompt(rng, depth);
            ctx.decode(&mut toks, n_batch as usize)?;
            ctx.sync();
        }
        Ok(())
    };

    let load_before = loadavg();
    let mut pp = Reps::new(threads, min_share, max_retries);
    if n_prompt > 0 {
        let opts = CtxOpts {
            n_ctx: (depth + n_prompt) as u32,
            n_batch,
            n_ubatch,
            threads,
            flash_attn: fa,
            n_seq_max: 1,
        };
        let ctx = Ctx::new(&model, opts)?;
        // Warm-up run (untimed), then reps.
        for rep in 0..=reps {
            fill(&ctx, &mut rng)?;
            let mut toks = make_prompt(&mut rng, n_prompt);
            if depth > 0 {
                // A continuation: no second BOS.
                toks[0] = rng.token(n_vocab);
            }
            let mut run = || {
                // (a retried run starts from the same context)
                ctx.truncate(depth);
                ctx.decode(&mut toks, n_batch as usize)?;
                ctx.sync();
                Ok(())
            };
            if rep == 0 {
                run()?;
            } else {
                pp.run(n_prompt, run)?;
            }
        }
    }

    let mut tg = Reps::new(threads, min_share, max_retries);
    if n_gen > 0 {
        let opts = CtxOpts {
            n_ctx: (depth + n_gen + 1) as u32,
            n_batch,
            n_ubatch,
            threads,
            flash_attn: fa,
            n_seq_max: 1,
        };
        let ctx = Ctx::new(&model, opts)?;
        let bos = model.add_bos().then(|| model.bos());
        for rep in 0..=reps {
            // The warm-up is a single token, as in llama-bench.
            let n = if rep == 0 { 1 } else { n_gen };
            fill(&ctx, &mut rng)?;
            let first = if depth > 0 { None } else { bos };
            let mut run = || {
                ctx.truncate(depth);
                let mut tok = first.unwrap_or_else(|| rng.token(n_vocab));
                for _ in 0..n {
                    ctx.decode(std::slice::from_mut(&mut tok), 1)?;
                    ctx.sync();
                    tok = rng.token(n_vocab);
                }
                Ok(())
            };
            if rep == 0 {
                run()?;
            } else {
                tg.run(n_gen, run)?;
            }
        }
    }

    let round = |v: f64| (v * 100.0).round() / 100.0;
    let out = json!({
        "model": path.file_name().map(|s| s.to_string_lossy().into_owned()),
        "desc": model.desc(),
        "size_bytes": model.size_bytes(),
        "n_params": model.n_params(),
        "threads": threads,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "n_depth": depth,
        "reps": reps,
        "n_batch": n_batch,
        "n_ubatch": n_ubatch,
        "flash_attn": fa_name(fa),
        "pp_tok_s": if pp.rates.is_empty() { Value::Null } else { json!(round(median(&pp.rates))) },
        "tg_tok_s": if tg.rates.is_empty() { Value::Null } else { json!(round(median(&tg.rates))) },
        "pp_samples": pp.rates.iter().map(|&v| round(v)).collect::<Vec<_>>(),
        "tg_samples": tg.rates.iter().map(|&v| round(v)).collect::<Vec<_>>(),
        "pp_timing": pp.total.json(threads),
        "tg_timing": tg.total.json(threads),
        "min_cpu_share": min_share,
        "pp_retried": pp.retried,
        "tg_retried": tg.retried,
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "system_info": system_info(),
    });
    let (pp_share, tg_share) = (pp.share(), tg.share());
    if pp_share < 0.8 || tg_share < 0.8 {
        eprintln!(
            "llamacpp-bench: WARNING: the threads got only {:.0}% (pp) / {:.0}% (tg) of their CPUs \
             (other processes compete for them; load average {}): these figures are not representative",
            100.0 * pp_share,
            100.0 * tg_share,
            load_before.as_deref().unwrap_or("?")
        );
    }
    if a.flag("--json") {
        println!("{out}");
    } else {
        println!(
            "{}  {}  t={threads}  d={depth}  pp{n_prompt}: {} tok/s  tg{n_gen}: {} tok/s  (median of {reps})",
            path.display(),
            model.desc(),
            out["pp_tok_s"],
            out["tg_tok_s"]
        );
    }
    Ok(())
}

/// `batched`, like `llama-batched-bench`: for each count of parallel sequences, every sequence
/// gets its own random prompt of `-p` tokens (decoded in one batch, untimed by the decode
/// figure), then `-n` steps each decode one token for every sequence in one batch. Reports the
/// aggregate decode rate (sequences x steps / time) and its ratio to one sequence.
fn cmd_batched(a: &Args) -> Result<()> {
    a.check_known(&[
        "-m",
        "-p",
        "-n",
        "--npl",
        "-t",
        "--threads",
        "-r",
        "-fa",
        "--flash-attn",
        "--json",
    ])?;
    let path = PathBuf::from(a.required(&["-m"])?);
    let n_prompt: usize = a.num(&["-p"], 16)?;
    let n_gen: usize = a.num(&["-n"], 32)?;
    let threads = a.threads()?;
    let reps: usize = a.num(&["-r"], 3)?;
    let fa = a.flash_attn()?;
    let npls: Vec<usize> = a
        .str(&["--npl"])
        .unwrap_or("1,2,4,8")
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::Usage(format!("--npl: {e}")))?;
    if reps == 0 || n_prompt == 0 || n_gen == 0 || npls.contains(&0) {
        return Err(Error::Usage(
            "-r, -p, -n and every --npl must be at least 1".into(),
        ));
    }
    let model = Model::load(&path)?;
    let n_vocab = model.n_vocab();
    let mut rng = SplitMix(0x5EED_1234);
    let load_before = loadavg();
    let mut rows = Vec::new();
    for &npl in &npls {
        // llama.cpp pads the context to a multiple of 256 and splits it evenly between the
        // sequences: give each a multiple of 256.
        let per_seq = (n_prompt + n_gen + 1).next_multiple_of(256);
        let opts = CtxOpts {
            n_ctx: (npl * per_seq) as u32,
            n_batch: (npl * n_prompt).max(npl) as u32,
            n_ubatch: (npl * n_prompt).max(npl) as u32,
            threads,
            flash_attn: fa,
            n_seq_max: npl as u32,
        };
        let ctx = Ctx::new(&model, opts)?;
        let mut pp_rates = Vec::new();
        let mut tg = Reps::new(threads, 0.0, 0);
        for rep in 0..=reps {
            ctx.clear();
            let mut prompt = Vec::with_capacity(npl * n_prompt);
            for s in 0..npl {
                for i in 0..n_prompt {
                    let t = if i == 0 && model.add_bos() {
                        model.bos()
                    } else {
                        rng.token(n_vocab)
                    };
                    prompt.push((t, i, s as i32));
                }
            }
            let ph = timed(|| {
                ctx.decode_entries(&prompt)?;
                ctx.sync();
                Ok(())
            })?;
            // The first round is a warm-up.
            let steps = if rep == 0 { 1 } else { n_gen };
            let mut run = || {
                for step in 0..steps {
                    let entries: Vec<_> = (0..npl)
                        .map(|s| (rng.token(n_vocab), n_prompt + step, s as i32))
                        .collect();
                    ctx.decode_entries(&entries)?;
                    ctx.sync();
                }
                Ok(())
            };
            if rep == 0 {
                run()?;
            } else {
                pp_rates.push((npl * n_prompt) as f64 / ph.wall);
                tg.run(npl * n_gen, run)?;
            }
        }
        rows.push((npl, median(&pp_rates), median(&tg.rates), tg.rates.clone()));
    }
    let round = |v: f64| (v * 100.0).round() / 100.0;
    let base = rows
        .iter()
        .find(|r| r.0 == 1)
        .map(|r| r.2)
        .unwrap_or(f64::NAN);
    let out: Vec<Value> = rows
        .iter()
        .map(|(npl, pp, tg, samples)| {
            json!({
                "npl": npl,
                "pp_tok_s": round(*pp),
                "tg_tok_s": round(*tg),
                "tg_vs_npl1": (tg / base * 1000.0).round() / 1000.0,
                "tg_samples": samples.iter().map(|&v| round(v)).collect::<Vec<_>>(),
            })
        })
        .collect();
    if a.flag("--json") {
        println!(
            "{}",
            json!({
                "model": path.file_name().map(|s| s.to_string_lossy().into_owned()),
                "desc": model.desc(),
                "threads": threads,
                "n_prompt": n_prompt,
                "n_gen": n_gen,
                "reps": reps,
                "flash_attn": fa_name(fa),
                "rows": out,
                "loadavg_before": load_before,
                "loadavg_after": loadavg(),
                "system_info": system_info(),
            })
        );
    } else {
        println!(
            "{}  {}  t={threads}  p={n_prompt}  n={n_gen}",
            path.display(),
            model.desc()
        );
        for r in &out {
            println!(
                "npl {:>3}: tg {} tok/s ({}x npl 1), pp {} tok/s",
                r["npl"], r["tg_tok_s"], r["tg_vs_npl1"], r["pp_tok_s"]
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// generate / golden

/// One greedy continuation with its token ids.
struct Generation {
    prompt_ids: Vec<sys::llama_token>,
    generated_ids: Vec<sys::llama_token>,
    /// The token that ended generation, when it was end-of-generation rather than the limit.
    eog_id: Option<sys::llama_token>,
    text: String,
}

/// Greedy decoding as `llama-simple` does it: the prompt in one batch, then the arg-max token
/// (first one on ties) until an end-of-generation token or `n_predict` tokens.
fn generate(
    model: &Model,
    prompt: &str,
    n_predict: usize,
    threads: i32,
    fa: sys::llama_flash_attn_type,
    prompt_batch: usize,
) -> Result<Generation> {
    let prompt_ids = model.tokenize(prompt, true)?;
    if prompt_ids.is_empty() {
        return Err(Error::TooShort("the prompt tokenizes to nothing".into()));
    }
    let n_prompt = prompt_ids.len() as u32;
    let opts = CtxOpts {
        n_ctx: n_prompt + n_predict as u32 + 1,
        n_batch: n_prompt,
        n_ubatch: n_prompt,
        threads,
        flash_attn: fa,
        n_seq_max: 1,
    };
    let ctx = Ctx::new(model, opts)?;
    let mut toks = prompt_ids.clone();
    let n_toks = toks.len();
    ctx.decode(
        &mut toks,
        if prompt_batch == 0 {
            n_toks
        } else {
            prompt_batch
        },
    )?;
    let mut generated_ids = Vec::new();
    let mut bytes = Vec::new();
    let mut eog_id = None;
    while generated_ids.len() < n_predict {
        let logits = ctx.logits(-1)?;
        let mut best = 0usize;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        let mut tok = best as sys::llama_token;
        if model.is_eog(tok) {
            eog_id = Some(tok);
            break;
        }
        generated_ids.push(tok);
        bytes.extend_from_slice(&model.piece(tok));
        ctx.decode(std::slice::from_mut(&mut tok), 1)?;
    }
    Ok(Generation {
        prompt_ids,
        generated_ids,
        eog_id,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    })
}

fn cmd_generate(a: &Args) -> Result<()> {
    a.check_known(&[
        "-m",
        "-p",
        "-n",
        "-t",
        "--threads",
        "-fa",
        "--flash-attn",
        "--prompt-batch",
    ])?;
    let path = PathBuf::from(a.required(&["-m"])?);
    let prompt = a.required(&["-p"])?;
    let n: usize = a.num(&["-n"], 32)?;
    let fa = a.flash_attn()?;
    let model = Model::load(&path)?;
    let g = generate(
        &model,
        prompt,
        n,
        a.threads()?,
        fa,
        a.num(&["--prompt-batch"], 0)?,
    )?;
    let out = json!({
        "model": path.file_name().map(|s| s.to_string_lossy().into_owned()),
        "prompt": prompt,
        "prompt_ids": g.prompt_ids,
        "generated_ids": g.generated_ids,
        "eog_id": g.eog_id,
        "text": g.text,
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    Ok(())
}

fn cmd_golden(a: &Args) -> Result<()> {
    a.check_known(&[
        "-n",
        "-t",
        "--threads",
        "-o",
        "-fa",
        "--flash-attn",
        "--prompt-batch",
    ])?;
    let n: usize = a.num(&["-n"], 32)?;
    let prompt_batch: usize = a.num(&["--prompt-batch"], 0)?;
    let threads = a.threads()?;
    let fa = a.flash_attn()?;
    let out_path = PathBuf::from(a.required(&["-o"])?);
    if a.pos.is_empty() || !a.pos.len().is_multiple_of(2) {
        return Err(Error::Usage("golden takes MODEL GOLDEN.json pairs".into()));
    }
    let mut cases = Vec::new();
    let (mut matched, mut total) = (0usize, 0usize);
    for pair in a.pos.chunks(2) {
        let (model_path, golden_path) = (PathBuf::from(&pair[0]), PathBuf::from(&pair[1]));
        let golden: Value =
            serde_json::from_str(&read_to_string(&golden_path)?).map_err(|e| Error::Json {
                path: golden_path.clone(),
                what: e.to_string(),
            })?;
        let gcases = golden["cases"].as_array().ok_or_else(|| Error::Json {
            path: golden_path.clone(),
            what: "no `cases` array".into(),
        })?;
        let model = Model::load(&model_path)?;
        let name = model_path
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for c in gcases {
            let (Some(prompt), Some(want)) = (c["prompt"].as_str(), c["continuation"].as_str())
            else {
                return Err(Error::Json {
                    path: golden_path.clone(),
                    what: "a case lacks a string `prompt` or `continuation`".into(),
                });
            };
            let g = generate(&model, prompt, n, threads, fa, prompt_batch)?;
            let ok = g.text == want;
            total += 1;
            matched += ok as usize;
            eprintln!(
                "{} {name}: {prompt:?}",
                if ok { "MATCH   " } else { "MISMATCH" }
            );
            if !ok {
                eprintln!("    golden: {want:?}\n    ours:   {:?}", g.text);
            }
            cases.push(json!({
                "model": name,
                "prompt": prompt,
                "prompt_ids": g.prompt_ids,
                "generated_ids": g.generated_ids,
                "eog_id": g.eog_id,
                "text": g.text,
                "matches_golden": ok,
            }));
        }
    }
    let out = json!({
        "generator": format!(
            "benches/llamacpp (llamacpp-bench golden): llama.cpp vendored in llama-cpp-sys-2 {}, greedy (arg-max, first on ties) like llama-simple, up to {n} new tokens, stops before an end-of-generation token (its id in eog_id, not in generated_ids), prompt tokenized with add_special=true and parse_special=true (BOS where the file says add_bos_token) and decoded in {}, weights {}, tiled K-quant matmul {}, text = concatenated pieces of generated_ids with special tokens rendered, CPU, {threads} threads, flash_attn {}",
            LLAMA_CPP_SYS_VERSION,
            if prompt_batch == 0 {
                "one batch".to_string()
            } else {
                format!("batches of {prompt_batch} tokens")
            },
            if NO_REPACK.load(std::sync::atomic::Ordering::Relaxed) {
                "not repacked (--no-repack)"
            } else {
                "repacked where llama.cpp repacks them"
            },
            if std::env::var("GGML_CPU_TILED_MM").is_ok_and(|v| v.trim() == "0") {
                "off (GGML_CPU_TILED_MM=0)"
            } else {
                "on"
            },
            fa_name(fa)
        ),
        "cases": cases,
    });
    let text = serde_json::to_string_pretty(&out).unwrap_or_default() + "\n";
    std::fs::write(&out_path, text).map_err(|source| Error::Io {
        path: out_path.clone(),
        source,
    })?;
    eprintln!(
        "{matched}/{total} continuations equal the goldens; wrote {}",
        out_path.display()
    );
    println!("{matched} passed, {} failed", total - matched);
    if matched != total {
        std::process::exit(1);
    }
    Ok(())
}

const LLAMA_CPP_SYS_VERSION: &str = "0.1.161";

// ---------------------------------------------------------------------------------------------
// perplexity

fn cmd_perplexity(a: &Args) -> Result<()> {
    a.check_known(&[
        "-m",
        "-f",
        "-c",
        "-b",
        "-t",
        "--threads",
        "--chunks",
        "-fa",
        "--flash-attn",
    ])?;
    let path = PathBuf::from(a.required(&["-m"])?);
    let text_path = PathBuf::from(a.required(&["-f"])?);
    let n_ctx: usize = a.num(&["-c"], 512)?;
    let n_batch: usize = a.num::<usize>(&["-b"], 2048)?.min(n_ctx);
    let max_chunks: usize = a.num(&["--chunks"], usize::MAX)?;
    let threads = a.threads()?;
    let fa = a.flash_attn()?;
    if n_ctx < 8 || n_batch == 0 {
        return Err(Error::Usage(
            "-c must be at least 8 and -b at least 1".into(),
        ));
    }
    let text = read_to_string(&text_path)?;
    let model = Model::load(&path)?;
    let tokens = model.tokenize(&text, true)?;
    let n_chunks = (tokens.len() / n_ctx).min(max_chunks);
    if n_chunks == 0 {
        return Err(Error::TooShort(format!(
            "{} tokens, need at least one window of {n_ctx}",
            tokens.len()
        )));
    }
    let opts = CtxOpts {
        n_ctx: n_ctx as u32,
        n_batch: n_batch as u32,
        n_ubatch: n_batch.min(512) as u32,
        threads,
        flash_attn: fa,
        n_seq_max: 1,
    };
    let ctx = Ctx::new(&model, opts)?;
    let first = n_ctx / 2;
    let (mut nll, mut count) = (0f64, 0usize);
    let t0 = Instant::now();
    for chunk in 0..n_chunks {
        let start = chunk * n_ctx;
        let mut win = tokens[start..start + n_ctx].to_vec();
        if model.add_bos() {
            win[0] = model.bos();
        }
        ctx.clear();
        // Decode the window in n_batch pieces, scoring each piece's rows before the next decode.
        for b0 in (0..n_ctx).step_by(n_batch) {
            let b1 = (b0 + n_batch).min(n_ctx);
            ctx.decode_all_logits(&win[b0..b1], b0)?;
            for i in b0.max(first)..b1.min(n_ctx - 1) {
                let logits = ctx.logits((i - b0) as i32)?;
                let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
                let target = tokens[start + i + 1] as usize;
                nll += -(logits[target] as f64 - max - sum.ln());
                count += 1;
            }
        }
        eprint!("[{}]{:.4} ", chunk + 1, (nll / count as f64).exp());
    }
    eprintln!();
    let ppl = (nll / count as f64).exp();
    let out = json!({
        "model": path.file_name().map(|s| s.to_string_lossy().into_owned()),
        "text": text_path.file_name().map(|s| s.to_string_lossy().into_owned()),
        "n_tokens": tokens.len(),
        "n_ctx": n_ctx,
        "chunks": n_chunks,
        "scored_tokens": count,
        "perplexity": (ppl * 10000.0).round() / 10000.0,
        "seconds": (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        "threads": threads,
        "flash_attn": fa_name(fa),
    });
    println!("{out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// logits of token ids

/// Parses a comma-separated list of token ids.
fn parse_ids(s: &str) -> Result<Vec<sys::llama_token>> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<sys::llama_token>()
                .map_err(|_| Error::Usage(format!("--ids: {t:?} is not a token id")))
        })
        .collect()
}

/// The prompt `--ids` decoded in one batch with logits for every row, then `-n` greedy tokens
/// (arg-max, first on ties; end-of-generation tokens are not special here) decoded one at a time.
/// Prints `ids` (prompt + generated), `n_prompt` and `logits`: one row per id, row `i` the logits
/// after consuming `ids[..=i]`, so `ids[i + 1] == argmax(logits[i])` for every generated id.
fn cmd_logits(a: &Args) -> Result<()> {
    a.check_known(&[
        "-m",
        "--ids",
        "-n",
        "-t",
        "--threads",
        "-fa",
        "--flash-attn",
    ])?;
    let path = PathBuf::from(a.required(&["-m"])?);
    let mut ids = parse_ids(a.required(&["--ids"])?)?;
    let n_gen: usize = a.num(&["-n"], 8)?;
    let threads = a.threads()?;
    let fa = a.flash_attn()?;
    let model = Model::load(&path)?;
    let n_vocab = model.n_vocab();
    if ids.is_empty() {
        return Err(Error::TooShort("--ids is empty".into()));
    }
    if let Some(t) = ids.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
        return Err(Error::Usage(format!(
            "--ids: token {t} is outside the vocabulary of {n_vocab}"
        )));
    }
    let n_prompt = ids.len();
    let opts = CtxOpts {
        n_ctx: (n_prompt + n_gen + 1) as u32,
        n_batch: n_prompt as u32,
        n_ubatch: n_prompt as u32,
        threads,
        flash_attn: fa,
        n_seq_max: 1,
    };
    let ctx = Ctx::new(&model, opts)?;
    ctx.decode_all_logits(&ids, 0)?;
    let mut rows: Vec<Vec<f32>> = Vec::with_capacity(n_prompt + n_gen);
    for i in 0..n_prompt {
        rows.push(ctx.logits(i as i32)?.to_vec());
    }
    for step in 0..n_gen {
        let last = rows.last().map(|r| r.as_slice()).unwrap_or_default();
        let mut best = 0usize;
        for (i, &l) in last.iter().enumerate() {
            if l > last[best] {
                best = i;
            }
        }
        let tok = best as sys::llama_token;
        ids.push(tok);
        ctx.decode_all_logits(std::slice::from_ref(&tok), n_prompt + step)?;
        rows.push(ctx.logits(0)?.to_vec());
    }
    let out = json!({
        "generator": format!(
            "benches/llamacpp (llamacpp-bench logits): llama.cpp vendored in llama-cpp-sys-2 {}, prompt decoded in one batch with every row's logits, then greedy (arg-max, first on ties) one token per decode, CPU, {threads} threads, flash_attn {}",
            LLAMA_CPP_SYS_VERSION,
            fa_name(fa)
        ),
        "model": path.file_name().map(|s| s.to_string_lossy().into_owned()),
        "n_prompt": n_prompt,
        "ids": ids,
        "logits": rows,
    });
    println!("{}", serde_json::to_string(&out).unwrap_or_default());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// quantize

fn cmd_quantize(a: &Args) -> Result<()> {
    a.check_known(&["--pure", "--allow-requantize", "-t", "--threads"])?;
    let [inp, out, ftype] = a.pos.as_slice() else {
        return Err(Error::Usage("quantize takes IN OUT FTYPE_NUMBER".into()));
    };
    let ftype: u32 = ftype
        .parse()
        .map_err(|_| Error::Usage(format!("FTYPE must be a llama_ftype number, not {ftype:?}")))?;
    let c = |s: &str| CString::new(s).map_err(|_| Error::Nul(s.into()));
    let (ci, co) = (c(inp)?, c(out)?);
    // SAFETY: returns a plain struct of defaults.
    let mut p = unsafe { sys::llama_model_quantize_default_params() };
    p.nthread = a.threads()?;
    p.ftype = ftype as _;
    p.pure_ = a.flag("--pure");
    p.allow_requantize = a.flag("--allow-requantize");
    // SAFETY: both paths are NUL-terminated C strings that outlive the call; `p` is a valid
    // parameter struct (defaults with plain fields changed; its pointers stay null).
    let rc = unsafe { sys::llama_model_quantize(ci.as_ptr(), co.as_ptr(), &p) };
    if rc != 0 {
        return Err(Error::ModelLoad(PathBuf::from(inp)));
    }
    eprintln!("wrote {out}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------

fn run() -> Result<()> {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = raw.split_first() else {
        return Err(Error::Usage("no command given".into()));
    };
    let args = Args::parse(rest)?;
    VERBOSE.store(args.flag("-v"), std::sync::atomic::Ordering::Relaxed);
    NO_REPACK.store(
        args.flag("--no-repack"),
        std::sync::atomic::Ordering::Relaxed,
    );
    // SAFETY: installs a static callback; then initializes the (statically linked) backends once.
    unsafe {
        sys::llama_log_set(Some(log_callback), std::ptr::null_mut());
        sys::llama_backend_init();
    }
    let r = match cmd.as_str() {
        "bench" => cmd_bench(&args),
        "generate" => cmd_generate(&args),
        "golden" => cmd_golden(&args),
        "perplexity" => cmd_perplexity(&args),
        "logits" => cmd_logits(&args),
        "quantize" => cmd_quantize(&args),
        "batched" => cmd_batched(&args),
        "info" => {
            println!(
                "{}",
                json!({ "llama_cpp_sys_2": LLAMA_CPP_SYS_VERSION, "system_info": system_info() })
            );
            Ok(())
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => Err(Error::Usage(format!("unknown command {other:?}"))),
    };
    // SAFETY: all models and contexts were dropped inside the command functions.
    unsafe { sys::llama_backend_free() };
    r
}

fn main() {
    if let Err(e) = run() {
        eprintln!("llamacpp-bench: {e}");
        std::process::exit(2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Result<Args> {
        Args::parse(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn median_odd_even_and_unsorted() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(median(&[7.5]), 7.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn splitmix_tokens_in_range_and_seeded() {
        let (mut a, mut b) = (SplitMix(42), SplitMix(42));
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let t = a.token(49_152);
            assert_eq!(t, b.token(49_152));
            assert!((0..49_152).contains(&t));
            seen.insert(t);
        }
        assert!(seen.len() > 8_000, "poorly spread: {}", seen.len());
    }

    #[test]
    fn token_id_lists() {
        assert_eq!(parse_ids("1, 2,30").unwrap(), vec![1, 2, 30]);
        assert!(matches!(parse_ids("1,x"), Err(Error::Usage(_))));
        assert!(matches!(parse_ids(""), Err(Error::Usage(_))));
    }

    #[test]
    fn args_values_switches_and_errors() {
        let a = args(&["-m", "x.gguf", "--json", "-p", "64", "pos"]).unwrap();
        assert_eq!(a.str(&["-m"]), Some("x.gguf"));
        assert!(a.flag("--json"));
        assert_eq!(a.num::<usize>(&["-p"], 512).unwrap(), 64);
        assert_eq!(a.num::<usize>(&["-n"], 128).unwrap(), 128);
        assert_eq!(a.pos, vec!["pos".to_string()]);
        assert!(a.check_known(&["-m", "-p", "--json"]).is_ok());
        assert!(matches!(a.check_known(&["-m"]), Err(Error::Usage(_))));
        assert!(matches!(args(&["-m"]), Err(Error::Usage(_))));
        let bad = args(&["-p", "lots"]).unwrap();
        assert!(matches!(bad.num::<usize>(&["-p"], 1), Err(Error::Usage(_))));
        assert!(matches!(
            args(&["-t", "0"]).unwrap().threads(),
            Err(Error::Usage(_))
        ));
        assert!(matches!(
            args(&["-fa", "maybe"]).unwrap().flash_attn(),
            Err(Error::Usage(_))
        ));
        assert_eq!(
            args(&["-fa", "off"]).unwrap().flash_attn().unwrap(),
            sys::LLAMA_FLASH_ATTN_TYPE_DISABLED
        );
    }

    #[test]
    fn sched_times_count_cpu_work() {
        let (c0, _) = sched_times().expect("/proc/self/task readable");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed().as_millis() < 50 {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        let (c1, _) = sched_times().unwrap();
        assert!(
            x > 0 && c1 - c0 > 0.005,
            "cpu time did not advance: {c0} -> {c1}"
        );
    }

    #[test]
    fn missing_model_is_a_typed_error() {
        assert!(matches!(
            Model::load(Path::new("/nonexistent/model.gguf")),
            Err(Error::Io { .. })
        ));
    }
}
