//! The generation loop: prompt in, a stream of sampled tokens out.
//!
//! [`Generator`] owns a model state (KV cache and buffers) and remembers which tokens that cache
//! holds, so a follow-up prompt that extends an earlier one (a chat turn) only computes the new
//! tokens. [`Generator::generate`] processes the prompt eagerly (so a prompt that does not fit
//! fails at once) and returns a [`TokenStream`], an iterator that decodes one token per step.

use std::time::{Duration, Instant};

use powerinfer_cpu::ThreadPool;

use crate::ModelError;
use crate::model::{Logits, Model, ModelState};
use crate::prompt_cache::PromptCache;
use crate::sampling::{Sampler, SamplerConfig, SamplerError, StopCondition};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What can go wrong while generating.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// The model failed (bad token, context overflow, ...).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The sampler settings are invalid.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// The prompt holds no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt does not fit in the context.
    #[error(
        "the prompt has {n_prompt} tokens but the context holds {n_ctx}; use a larger context (-c) or a shorter prompt"
    )]
    PromptTooLong {
        /// Prompt tokens.
        n_prompt: usize,
        /// Context size.
        n_ctx: usize,
    },
}

/// Settings of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Most tokens to generate (the context size also bounds it).
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampler: SamplerConfig,
    /// Generation ends when the text contains one of these; the stop string is not emitted.
    pub stop: Vec<String>,
    /// Whether to stop at the model's end-of-generation tokens (default true).
    pub stop_at_eog: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 128,
            sampler: SamplerConfig::default(),
            stop: Vec::new(),
            stop_at_eog: true,
        }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// `max_tokens` were generated.
    Length,
    /// The context is full.
    ContextFull,
    /// A stop string appeared.
    StopString,
}

impl FinishReason {
    /// OpenAI-style name (`stop` or `length`).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::EndOfGeneration | FinishReason::StopString => "stop",
            FinishReason::Length | FinishReason::ContextFull => "length",
        }
    }
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    /// Its id.
    pub id: u32,
    /// The text that became complete with it (may be empty: part of a character, or text held
    /// back because it might start a stop string).
    pub text: String,
}

/// Timings of a generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationStats {
    /// Prompt tokens computed (those already in the cache are not counted).
    pub prompt_tokens: usize,
    /// Time spent on them.
    pub prompt_time: Duration,
    /// Tokens generated.
    pub generated_tokens: usize,
    /// Time spent generating (forward passes and sampling).
    pub generation_time: Duration,
}

impl GenerationStats {
    /// Prompt processing speed in tokens per second.
    pub fn prompt_tokens_per_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_time)
    }
    /// Decode speed in tokens per second.
    pub fn tokens_per_s(&self) -> f64 {
        rate(self.generated_tokens, self.generation_time)
    }
}

fn rate(n: usize, t: Duration) -> f64 {
    if t.is_zero() {
        0.0
    } else {
        n as f64 / t.as_secs_f64()
    }
}

/// A model state plus the tokens it holds; generates from prompts.
#[derive(Debug)]
pub struct Generator<'m> {
    model: &'m Model,
    tokenizer: &'m Tokenizer,
    pool: &'m ThreadPool,
    state: ModelState,
    /// The tokens whose keys and values are in the cache, in order, and their numerics.
    cache: PromptCache,
}

impl<'m> Generator<'m> {
    /// A generator with a context of `n_ctx` tokens (prompts processed `n_batch` at a time).
    pub fn new(
        model: &'m Model,
        tokenizer: &'m Tokenizer,
        pool: &'m ThreadPool,
        n_ctx: usize,
        n_batch: usize,
    ) -> Result<Self, GenerateError> {
        Ok(Generator {
            model,
            tokenizer,
            pool,
            state: model.new_state(n_ctx, n_batch)?,
            cache: PromptCache::new(),
        })
    }

    /// The context size.
    pub fn n_ctx(&self) -> usize {
        self.state.n_ctx()
    }

    /// The tokens currently in the KV cache.
    pub fn history(&self) -> &[u32] {
        self.cache.tokens()
    }

    /// Forgets the cache.
    pub fn reset(&mut self) {
        self.state.clear();
        self.cache.clear();
    }

    /// Processes `prompt` (reusing the longest cached prefix that keeps a full computation's
    /// bits, see [`crate::prompt_cache`]) and returns the stream of generated tokens.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
    ) -> Result<TokenStream<'_, 'm>, GenerateError> {
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        let n_ctx = self.state.n_ctx();
        if prompt.len() > n_ctx {
            return Err(GenerateError::PromptTooLong {
                n_prompt: prompt.len(),
                n_ctx,
            });
        }
        let sampler = Sampler::new(opts.sampler)?;
        // Reuse the cached prefix, but always compute at least the last prompt token: its
        // logits choose the first generated token.
        let common = self.cache.reusable(self.model, &self.state, prompt);
        let start = Instant::now();
        let result = self
            .cache
            .prefill(self.model, self.pool, &mut self.state, prompt, common);
        if let Err(e) = result {
            // A failed forward leaves the cache in an unknown state.
            self.reset();
            return Err(e.into());
        }
        let stats = GenerationStats {
            prompt_tokens: prompt.len() - common,
            prompt_time: start.elapsed(),
            ..Default::default()
        };
        let mut sampler = sampler;
        for &t in prompt {
            sampler.accept(t);
        }
        Ok(TokenStream {
            generator: self,
            sampler,
            decoder: StreamDecoder::new(false),
            stop: StopCondition::new(opts.stop.iter().cloned()),
            stop_at_eog: opts.stop_at_eog,
            max_tokens: opts.max_tokens,
            stats,
            finish: None,
            pending_token: None,
        })
    }
}

/// The tokens of one generation, one per `next()`.
///
/// After the last token, [`finish_reason`](Self::finish_reason) says why it ended and
/// [`stats`](Self::stats) holds the timings. Text held back at the end (an unfinished
/// character or a possible stop-string start that did not complete) is returned by
/// [`flush`](Self::flush).
#[derive(Debug)]
pub struct TokenStream<'g, 'm> {
    generator: &'g mut Generator<'m>,
    sampler: Sampler,
    decoder: StreamDecoder,
    stop: StopCondition,
    stop_at_eog: bool,
    max_tokens: usize,
    stats: GenerationStats,
    finish: Option<FinishReason>,
    /// A sampled token not yet fed through the model (fed at the start of the next step, so
    /// the last token of a generation costs no forward pass).
    pending_token: Option<u32>,
}

impl TokenStream<'_, '_> {
    /// Why generation ended (`None` while it goes on).
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Timings so far.
    pub fn stats(&self) -> GenerationStats {
        self.stats
    }

    /// Text held back at the end of the stream.
    pub fn flush(&mut self) -> String {
        let mut s = self.decoder.flush();
        if !self.stop.is_stopped() {
            let check = self.stop.push(&s);
            s = check.emit;
            if !check.stopped {
                s.push_str(&self.stop.flush());
            }
        }
        s
    }

    fn step(&mut self) -> Result<Option<GeneratedToken>, GenerateError> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if self.stats.generated_tokens >= self.max_tokens {
            self.finish = Some(FinishReason::Length);
            return Ok(None);
        }
        let start = Instant::now();
        if let Some(t) = self.pending_token.take() {
            let g = &mut *self.generator;
            if g.state.pos() >= g.state.n_ctx() {
                self.finish = Some(FinishReason::ContextFull);
                return Ok(None);
            }
            g.model.forward(g.pool, &mut g.state, &[t], Logits::Last)?;
            g.cache.push_decoded(g.model, t);
        }
        let id = self.sampler.sample(self.generator.state.logits())?;
        self.sampler.accept(id);
        self.stats.generated_tokens += 1;
        if self.stop_at_eog && self.generator.tokenizer.is_eog(id) {
            self.finish = Some(FinishReason::EndOfGeneration);
            self.stats.generation_time += start.elapsed();
            return Ok(Some(GeneratedToken {
                id,
                text: String::new(),
            }));
        }
        self.pending_token = Some(id);
        let piece = self.decoder.push(self.generator.tokenizer, id);
        let check = self.stop.push(&piece);
        if check.stopped {
            self.finish = Some(FinishReason::StopString);
        }
        self.stats.generation_time += start.elapsed();
        Ok(Some(GeneratedToken {
            id,
            text: check.emit,
        }))
    }
}

impl Iterator for TokenStream<'_, '_> {
    type Item = Result<GeneratedToken, GenerateError>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.step() {
            Ok(Some(t)) => Some(Ok(t)),
            Ok(None) => None,
            Err(e) => {
                self.finish = Some(FinishReason::EndOfGeneration);
                Some(Err(e))
            }
        }
    }
}
