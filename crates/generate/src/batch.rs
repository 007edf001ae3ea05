//! Continuous batching: many generations share one model, one decode step at a time.
//!
//! A [`Scheduler`] owns `n_parallel` slots, each a [`ModelState`] (its own KV cache). Requests
//! ([`BatchRequest`]: prompt tokens and [`GenerateOptions`]) are handed in through a
//! [`Submitter`] (cloneable, usable from any thread) and wait in a bounded queue. Between two
//! decode steps the scheduler moves waiting requests into free slots (prefilling each prompt
//! with [`Model::forward`]); each step then feeds the last sampled token of every running
//! sequence through one batched forward pass ([`Model::forward_batch`]: every weight matrix is
//! read once for all rows, attention runs per sequence over its own cache) and samples each
//! sequence's next token with its own [`Sampler`].
//!
//! Each sequence reports to its own [`EventSink`] (an `mpsc::Sender`, a closure, or anything
//! else): its tokens ([`BatchEvent::Token`]) and then one [`BatchEvent::Done`] or
//! [`BatchEvent::Error`]. A sink that reports its receiver gone (`send` returns `false`)
//! cancels the sequence and frees its slot at once.
//!
//! A sequence's tokens are the ones [`Generator`](crate::generation::Generator) would produce
//! for the same prompt and options: the same prefill, the same sampler, stop strings
//! ([`StopCondition`]) and detokenizer ([`StreamDecoder`]), and a batched matrix product that
//! equals the single-row one bit for bit.
//!
//! Prompt cache ([`BatchConfig::cache_prompt`], on by default): a slot keeps its KV cache after
//! its sequence ends, and a new request goes to the free slot whose cache it can reuse most
//! of; only the rest of the prompt is computed (at least its last token). Prompts with a
//! common instruction and conversations, which resend every earlier turn, start sooner. The
//! reuse keeps the bits of a full computation ([`crate::prompt_cache`]: only positions whose
//! numerics a full computation would repeat are reused, and the rest is computed as parts of
//! its full micro-batches), except for the sparse FFNs of PWRI files, which compute a
//! micro-batch's union of active neurons: there an answer can differ in the last bits of its
//! logits. [`BatchConfig::cache_prompt`] `= false` computes every prompt
//! in full. [`Generator`](crate::generation::Generator) reuses its cache the same way.
//!
//! ```no_run
//! # use powerinfer_generate::{Model, batch::*, generation::GenerateOptions, tokenizer::Tokenizer};
//! # use powerinfer_cpu::ThreadPool;
//! # let model = Model::load("m.gguf").unwrap();
//! # let tok = Tokenizer::from_gguf(model.file()).unwrap();
//! # let pool = ThreadPool::new(0);
//! let cfg = BatchConfig { n_parallel: 4, n_ctx: 512, max_queue: 16, ..Default::default() };
//! let (scheduler, submitter) = Scheduler::new(&model, &tok, &pool, cfg).unwrap();
//! std::thread::scope(|s| {
//!     s.spawn(move || scheduler.run());
//!     let rx = submitter
//!         .submit_channel(BatchRequest::new(tok.encode("Hello", true, true), GenerateOptions::default()))
//!         .unwrap();
//!     drop(submitter); // the scheduler returns once every submitter is gone and all work is done
//!     for event in rx {
//!         if let BatchEvent::Token(t) = event { print!("{}", t.text) }
//!     }
//! });
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use powerinfer_cpu::ThreadPool;

use crate::ModelError;
use crate::generation::{
    FinishReason, GenerateError, GenerateOptions, GeneratedToken, GenerationStats,
};
use crate::model::{BatchState, Model, ModelState};
use crate::prompt_cache::PromptCache;
use crate::sampling::{Sampler, StopCondition};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// Settings of a [`Scheduler`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchConfig {
    /// Sequences decoded together (slots, each with its own KV cache).
    pub n_parallel: usize,
    /// Context size of each slot.
    pub n_ctx: usize,
    /// Prompt tokens per forward pass while prefilling.
    pub n_batch: usize,
    /// Requests that may wait for a slot; more are refused with [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// Reuse the longest prefix a free slot's KV cache shares with a new prompt (see the
    /// module documentation).
    pub cache_prompt: bool,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            n_parallel: 4,
            n_ctx: 2048,
            n_batch: 512,
            max_queue: 64,
            cache_prompt: true,
        }
    }
}

/// One generation to run.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    /// Prompt tokens (BOS included where the model wants one).
    pub prompt: Vec<u32>,
    /// Limits, sampler settings and stop conditions.
    pub options: GenerateOptions,
}

impl BatchRequest {
    /// A request.
    pub fn new(prompt: Vec<u32>, options: GenerateOptions) -> Self {
        BatchRequest { prompt, options }
    }
}

/// How a sequence ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    /// Why it ended.
    pub reason: FinishReason,
    /// Text held back until the end (an unfinished character, or a partial stop string that
    /// never completed); append it to the tokens' text.
    pub tail: String,
    /// Prompt and generation counts and timings (`generation_time` is the wall time of the
    /// batched steps the sequence took part in).
    pub stats: GenerationStats,
}

/// What a sequence reports, in order: tokens, then `Done` or `Error`.
#[derive(Debug)]
pub enum BatchEvent {
    /// The prompt is processed; generation starts.
    Started {
        /// Prompt tokens.
        prompt_tokens: usize,
    },
    /// A generated token and the text it completed.
    Token(GeneratedToken),
    /// The sequence ended normally.
    Done(Finished),
    /// The sequence failed (the model or the sampler returned an error).
    Error(BatchError),
}

/// Why a sequence failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// Its prompt or sampler failed (as in the single-sequence loop).
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// The batched decode step it took part in failed (every sequence of the step gets it).
    #[error("batched decode step: {0}")]
    Step(#[source] Arc<ModelError>),
}

/// Where a sequence's events go.
pub trait EventSink: Send {
    /// Delivers an event; `false` means nobody listens any more (the sequence is cancelled).
    fn send(&mut self, event: BatchEvent) -> bool;
}

impl EventSink for Sender<BatchEvent> {
    fn send(&mut self, event: BatchEvent) -> bool {
        Sender::send(self, event).is_ok()
    }
}

impl<F: FnMut(BatchEvent) -> bool + Send> EventSink for F {
    fn send(&mut self, event: BatchEvent) -> bool {
        self(event)
    }
}

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The queue holds `max_queue` waiting requests already.
    #[error("the queue is full ({0} requests waiting)")]
    QueueFull(usize),
    /// The scheduler has stopped.
    #[error("the scheduler has stopped")]
    Closed,
    /// The request cannot run (empty prompt, prompt longer than the context, bad sampler
    /// settings).
    #[error(transparent)]
    Invalid(#[from] GenerateError),
}

/// Invalid scheduler settings.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchConfigError {
    /// A size is zero.
    #[error("invalid batch setting {name} = 0: must be at least 1")]
    Zero {
        /// The setting.
        name: &'static str,
    },
    /// Allocating a slot's state failed (e.g. the KV caches do not fit in memory).
    #[error(transparent)]
    Model(#[from] crate::ModelError),
}

/// Counters the scheduler keeps (read them with [`Submitter::metrics`]).
#[derive(Debug, Default)]
struct Counters {
    submitted: AtomicU64,
    rejected: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    queued: AtomicU64,
    active: AtomicU64,
    steps: AtomicU64,
    decode_nanos: AtomicU64,
    prefill_nanos: AtomicU64,
}

/// A snapshot of the scheduler's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchMetrics {
    /// Requests accepted into the queue.
    pub submitted: u64,
    /// Requests refused because the queue was full.
    pub rejected: u64,
    /// Sequences that ended normally.
    pub completed: u64,
    /// Sequences that ended with an error.
    pub failed: u64,
    /// Sequences whose listener went away before they ended.
    pub cancelled: u64,
    /// Prompt tokens prefilled (computed; those taken from a slot's cache are not counted).
    pub prompt_tokens: u64,
    /// Prompt tokens taken from a slot's cache instead of being computed.
    pub cached_prompt_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Requests waiting for a slot now.
    pub queued: u64,
    /// Sequences running now.
    pub active: u64,
    /// Batched decode steps run.
    pub steps: u64,
    /// Time spent in decode steps.
    pub decode_time: Duration,
    /// Time spent prefilling prompts.
    pub prefill_time: Duration,
}

impl BatchMetrics {
    /// Generated tokens per second of decode time (aggregate over all sequences).
    pub fn decode_tokens_per_s(&self) -> f64 {
        let t = self.decode_time.as_secs_f64();
        if t > 0.0 {
            self.generated_tokens as f64 / t
        } else {
            0.0
        }
    }
}

struct Job {
    request: BatchRequest,
    sink: Box<dyn EventSink>,
}

/// Hands requests to a [`Scheduler`]; cheap to clone and usable from any thread. The scheduler
/// stops once every submitter is dropped and its work is done.
#[derive(Clone)]
pub struct Submitter {
    tx: Sender<Job>,
    counters: Arc<Counters>,
    cfg: BatchConfig,
    n_vocab: usize,
}

impl std::fmt::Debug for Submitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitter")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Submitter {
    /// The scheduler's settings.
    pub fn config(&self) -> BatchConfig {
        self.cfg
    }

    /// Checks a request the way the scheduler would, without queueing it.
    pub fn validate(&self, request: &BatchRequest) -> Result<(), GenerateError> {
        if request.prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if request.prompt.len() > self.cfg.n_ctx {
            return Err(GenerateError::PromptTooLong {
                n_prompt: request.prompt.len(),
                n_ctx: self.cfg.n_ctx,
            });
        }
        if let Some(&t) = request.prompt.iter().find(|&&t| t as usize >= self.n_vocab) {
            return Err(crate::ModelError::TokenOutOfRange {
                token: t,
                n_vocab: self.n_vocab,
            }
            .into());
        }
        request.options.sampler.validate()?;
        Ok(())
    }

    /// Queues a request whose events go to `sink`. Fails at once when the request is invalid,
    /// the queue is full or the scheduler has stopped.
    pub fn submit(
        &self,
        request: BatchRequest,
        sink: Box<dyn EventSink>,
    ) -> Result<(), SubmitError> {
        self.validate(&request)?;
        let c = &self.counters;
        let max = self.cfg.max_queue as u64;
        let claimed = c
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q < max).then_some(q + 1)
            });
        if let Err(q) = claimed {
            c.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull(q as usize));
        }
        if self.tx.send(Job { request, sink }).is_err() {
            c.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Closed);
        }
        c.submitted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// [`submit`](Self::submit) with a fresh channel; returns its receiving end (dropping it
    /// cancels the request).
    pub fn submit_channel(
        &self,
        request: BatchRequest,
    ) -> Result<Receiver<BatchEvent>, SubmitError> {
        let (tx, rx) = mpsc::channel();
        self.submit(request, Box::new(tx))?;
        Ok(rx)
    }

    /// The scheduler's counters now.
    pub fn metrics(&self) -> BatchMetrics {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BatchMetrics {
            submitted: get(&c.submitted),
            rejected: get(&c.rejected),
            completed: get(&c.completed),
            failed: get(&c.failed),
            cancelled: get(&c.cancelled),
            prompt_tokens: get(&c.prompt_tokens),
            cached_prompt_tokens: get(&c.cached_prompt_tokens),
            generated_tokens: get(&c.generated_tokens),
            queued: get(&c.queued),
            active: get(&c.active),
            steps: get(&c.steps),
            decode_time: Duration::from_nanos(get(&c.decode_nanos)),
            prefill_time: Duration::from_nanos(get(&c.prefill_nanos)),
        }
    }
}

/// A running sequence: the per-request half of the generation loop.
struct Seq {
    sink: Box<dyn EventSink>,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopCondition,
    stop_at_eog: bool,
    max_tokens: usize,
    stats: GenerationStats,
    /// A sampled token not yet fed through the model.
    pending: Option<u32>,
    /// When generation started (after the prefill).
    gen_start: Instant,
    /// Which logits to sample from next: the slot's own (right after the prefill) or a row of
    /// the batch's.
    logits_row: Option<usize>,
}

struct Slot {
    state: ModelState,
    /// What `state`'s KV cache holds.
    cache: PromptCache,
    /// When a sequence last started here (the scheduler's count of starts; 0: never).
    last_used: u64,
    seq: Option<Seq>,
}

impl Slot {
    /// Empties the KV cache.
    fn reset(&mut self) {
        self.state.clear();
        self.cache.clear();
    }
}

/// The model thread's side: slots, the queue's receiving end and the batched decode loop.
pub struct Scheduler<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    pool: &'m ThreadPool,
    cfg: BatchConfig,
    rx: Receiver<Job>,
    counters: Arc<Counters>,
    slots: Vec<Slot>,
    /// Buffers and logits of the batched forward pass (one row per fed sequence).
    batch: BatchState,
    closed: bool,
    /// Sequences started so far (the clock of [`Slot::last_used`]).
    starts: u64,
}

impl std::fmt::Debug for Scheduler<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("cfg", &self.cfg)
            .field("active", &self.n_active())
            .finish_non_exhaustive()
    }
}

impl<'m> Scheduler<'m> {
    /// A scheduler with `cfg.n_parallel` slots of `cfg.n_ctx` positions, and the submitter that
    /// feeds it.
    pub fn new(
        model: &'m Model,
        tokenizer: &'m Tokenizer,
        pool: &'m ThreadPool,
        cfg: BatchConfig,
    ) -> Result<(Self, Submitter), BatchConfigError> {
        for (name, v) in [
            ("n_parallel", cfg.n_parallel),
            ("n_ctx", cfg.n_ctx),
            ("n_batch", cfg.n_batch),
        ] {
            if v == 0 {
                return Err(BatchConfigError::Zero { name });
            }
        }
        let slots = (0..cfg.n_parallel)
            .map(|_| {
                Ok(Slot {
                    state: model.new_state(cfg.n_ctx, cfg.n_batch)?,
                    cache: PromptCache::new(),
                    last_used: 0,
                    seq: None,
                })
            })
            .collect::<Result<Vec<_>, crate::ModelError>>()?;
        let (tx, rx) = mpsc::channel();
        let counters = Arc::new(Counters::default());
        let submitter = Submitter {
            tx,
            counters: counters.clone(),
            cfg,
            n_vocab: model.config().n_vocab,
        };
        Ok((
            Scheduler {
                model,
                tokenizer,
                pool,
                cfg,
                rx,
                counters,
                slots,
                batch: model.new_batch_state(),
                closed: false,
                starts: 0,
            },
            submitter,
        ))
    }

    /// Sequences running now.
    pub fn n_active(&self) -> usize {
        self.slots.iter().filter(|s| s.seq.is_some()).count()
    }

    /// Runs until every [`Submitter`] is dropped and every accepted request has ended.
    pub fn run(mut self) {
        while self.step_blocking() {}
    }

    /// Admits waiting requests into free slots (blocking for one when nothing runs) and runs one
    /// decode step. Returns `false` once the submitters are gone and nothing is left to do.
    pub fn step_blocking(&mut self) -> bool {
        self.admit(true);
        if self.n_active() == 0 {
            return !self.closed;
        }
        self.decode_step();
        true
    }

    /// Moves queued requests into free slots, blocking for one if `block` and nothing runs.
    fn admit(&mut self, block: bool) {
        loop {
            let free = self.slots.iter().any(|s| s.seq.is_none());
            if !free {
                return;
            }
            let job = if self.closed {
                return;
            } else if block && self.n_active() == 0 {
                match self.rx.recv() {
                    Ok(job) => job,
                    Err(_) => {
                        self.closed = true;
                        return;
                    }
                }
            } else {
                match self.rx.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty) => return,
                    Err(TryRecvError::Disconnected) => {
                        self.closed = true;
                        return;
                    }
                }
            };
            self.counters.queued.fetch_sub(1, Ordering::AcqRel);
            let idx = self.pick_slot(&job.request.prompt);
            self.start(idx, job);
        }
    }

    /// The free slot for `prompt`: the one whose cache it can reuse most of, if that is at
    /// least half the prompt; otherwise the least recently used (empty ones first), so that an
    /// unrelated prompt does not evict a conversation's cache when it need not. Panics if no
    /// slot is free.
    fn pick_slot(&self, prompt: &[u32]) -> usize {
        let free = || {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.seq.is_none())
        };
        if self.cfg.cache_prompt {
            let best = free()
                .map(|(i, s)| {
                    let reusable = s.cache.reusable(self.model, &s.state, prompt);
                    (reusable, std::cmp::Reverse(i))
                })
                .max();
            if let Some((shared, std::cmp::Reverse(i))) = best
                && shared > 0
                && 2 * shared >= prompt.len()
            {
                return i;
            }
        }
        free()
            .min_by_key(|(i, s)| (s.last_used, *i))
            .map(|(i, _)| i)
            .expect("a free slot was checked above")
    }

    /// Prefills `job`'s prompt in slot `idx`; on failure reports the error and leaves the slot
    /// free.
    fn start(&mut self, idx: usize, job: Job) {
        let Job { request, mut sink } = job;
        let prompt = &request.prompt;
        let opts = &request.options;
        let fail = |sink: &mut Box<dyn EventSink>, counters: &Counters, e: GenerateError| {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            sink.send(BatchEvent::Error(e.into()));
        };
        // The same checks as the generation loop (the submitter checked already; the scheduler
        // does not trust it).
        if prompt.is_empty() {
            return fail(&mut sink, &self.counters, GenerateError::EmptyPrompt);
        }
        let sampler = match Sampler::new(opts.sampler) {
            Ok(s) => s,
            Err(e) => return fail(&mut sink, &self.counters, e.into()),
        };
        self.starts += 1;
        let slot = &mut self.slots[idx];
        slot.last_used = self.starts;
        // Reuse what the cache can give exactly; the last prompt token is always computed (its
        // logits choose the first generated token).
        let cached = if self.cfg.cache_prompt {
            slot.cache.reusable(self.model, &slot.state, prompt)
        } else {
            0
        };
        let start = Instant::now();
        if let Err(e) = slot
            .cache
            .prefill(self.model, self.pool, &mut slot.state, prompt, cached)
        {
            slot.reset();
            let e = match e {
                crate::ModelError::ContextOverflow { n_ctx, .. } => GenerateError::PromptTooLong {
                    n_prompt: prompt.len(),
                    n_ctx,
                },
                e => e.into(),
            };
            return fail(&mut sink, &self.counters, e);
        }
        let prompt_time = start.elapsed();
        self.counters
            .prefill_nanos
            .fetch_add(prompt_time.as_nanos() as u64, Ordering::Relaxed);
        self.counters
            .prompt_tokens
            .fetch_add((prompt.len() - cached) as u64, Ordering::Relaxed);
        self.counters
            .cached_prompt_tokens
            .fetch_add(cached as u64, Ordering::Relaxed);
        if !sink.send(BatchEvent::Started {
            prompt_tokens: prompt.len(),
        }) {
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut sampler = sampler;
        for &t in prompt {
            sampler.accept(t);
        }
        slot.seq = Some(Seq {
            sink,
            sampler,
            decoder: StreamDecoder::new(false),
            stop: StopCondition::new(opts.stop.iter().cloned()),
            stop_at_eog: opts.stop_at_eog,
            max_tokens: opts.max_tokens,
            stats: GenerationStats {
                prompt_tokens: prompt.len(),
                prompt_time,
                ..Default::default()
            },
            pending: None,
            gen_start: Instant::now(),
            logits_row: None,
        });
        self.counters.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends the sequence in slot `idx`: reports `Done` (with the held-back text) and frees the
    /// slot.
    fn finish(&mut self, idx: usize, reason: FinishReason) {
        let Some(mut seq) = self.slots[idx].seq.take() else {
            return;
        };
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
        seq.stats.generation_time = seq.gen_start.elapsed();
        // What `TokenStream::flush` returns: the decoder's rest through the stop condition.
        let mut tail = seq.decoder.flush();
        if !seq.stop.is_stopped() {
            let check = seq.stop.push(&tail);
            tail = check.emit;
            if !check.stopped {
                tail.push_str(&seq.stop.flush());
            }
        }
        let done = BatchEvent::Done(Finished {
            reason,
            tail,
            stats: seq.stats,
        });
        // Counted before the send, so a listener that saw `Done` also sees the count.
        self.counters.completed.fetch_add(1, Ordering::Relaxed);
        if !seq.sink.send(done) {
            self.counters.completed.fetch_sub(1, Ordering::Relaxed);
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Feeds `tokens[i]` to the sequence in slot `rows[i]` and leaves the logits in
    /// `self.logits` (row `i` for `rows[i]`).
    fn forward_rows(&mut self, rows: &[usize], tokens: &[u32]) -> Result<(), ModelError> {
        let mut states: Vec<&mut ModelState> = Vec::with_capacity(rows.len());
        let mut wanted = rows.iter().peekable();
        for (idx, slot) in self.slots.iter_mut().enumerate() {
            if wanted.peek() == Some(&&idx) {
                wanted.next();
                states.push(&mut slot.state);
            }
        }
        self.model
            .forward_batch(self.pool, &mut self.batch, &mut states, tokens)?;
        Ok(())
    }

    /// Drops the sequence in slot `idx` whose listener is gone.
    fn cancel(&mut self, idx: usize) {
        if self.slots[idx].seq.take().is_some() {
            self.counters.active.fetch_sub(1, Ordering::Relaxed);
            self.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reports `e` to the sequence in slot `idx` and frees the slot.
    fn fail(&mut self, idx: usize, e: BatchError) {
        if let Some(mut seq) = self.slots[idx].seq.take() {
            self.counters.active.fetch_sub(1, Ordering::Relaxed);
            self.counters.failed.fetch_add(1, Ordering::Relaxed);
            seq.sink.send(BatchEvent::Error(e));
        }
        self.slots[idx].reset();
    }

    /// One step of every running sequence: feed pending tokens (one batched forward pass),
    /// then sample, detokenize and report one token each.
    fn decode_step(&mut self) {
        let start = Instant::now();
        // 1. Limits, then the rows to feed.
        let mut rows: Vec<usize> = Vec::new();
        let mut tokens: Vec<u32> = Vec::new();
        for idx in 0..self.slots.len() {
            let slot = &self.slots[idx];
            let Some(seq) = &slot.seq else { continue };
            if seq.stats.generated_tokens >= seq.max_tokens {
                self.finish(idx, FinishReason::Length);
                continue;
            }
            if let Some(t) = seq.pending {
                if slot.state.pos() >= slot.state.n_ctx() {
                    self.finish(idx, FinishReason::ContextFull);
                    continue;
                }
                rows.push(idx);
                tokens.push(t);
            }
        }
        if !rows.is_empty() {
            if let Err(e) = self.forward_rows(&rows, &tokens) {
                let e = Arc::new(e);
                for &idx in &rows {
                    self.fail(idx, BatchError::Step(e.clone()));
                }
            }
            for (i, (&idx, &t)) in rows.iter().zip(&tokens).enumerate() {
                let slot = &mut self.slots[idx];
                if let Some(seq) = slot.seq.as_mut() {
                    // (A failed step reset the slot and ended its sequence.)
                    slot.cache.push_decoded(self.model, t);
                    seq.pending = None;
                    seq.logits_row = Some(i);
                }
            }
        }
        // 2. Sample one token per running sequence.
        let n_vocab = self.model.config().n_vocab;
        let mut n_generated = 0u64;
        for idx in 0..self.slots.len() {
            let slot = &mut self.slots[idx];
            let Some(seq) = slot.seq.as_mut() else {
                continue;
            };
            if seq.pending.is_some() {
                continue; // not fed this step (cannot happen: every pending row is fed)
            }
            let logits = match seq.logits_row {
                None => slot.state.logits(),
                Some(i) => &self.batch.logits()[i * n_vocab..(i + 1) * n_vocab],
            };
            let id = match seq.sampler.sample(logits) {
                Ok(id) => id,
                Err(e) => {
                    self.fail(idx, GenerateError::from(e).into());
                    continue;
                }
            };
            seq.sampler.accept(id);
            seq.stats.generated_tokens += 1;
            n_generated += 1;
            let (text, finish) = if seq.stop_at_eog && self.tokenizer.is_eog(id) {
                (String::new(), Some(FinishReason::EndOfGeneration))
            } else {
                seq.pending = Some(id);
                let piece = seq.decoder.push(self.tokenizer, id);
                let check = seq.stop.push(&piece);
                (
                    check.emit,
                    check.stopped.then_some(FinishReason::StopString),
                )
            };
            if !seq
                .sink
                .send(BatchEvent::Token(GeneratedToken { id, text }))
            {
                self.cancel(idx);
                continue;
            }
            if let Some(reason) = finish {
                self.finish(idx, reason);
            }
        }
        let elapsed = start.elapsed();
        let c = &self.counters;
        c.generated_tokens.fetch_add(n_generated, Ordering::Relaxed);
        c.steps.fetch_add(1, Ordering::Relaxed);
        c.decode_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }
}
