//! Perplexity the way llama.cpp's `llama-perplexity` computes it.
//!
//! The token stream is cut into `len / n_ctx` windows of `n_ctx` tokens (the rest is dropped).
//! Each window is evaluated from an empty KV cache with its first token replaced by BOS (when
//! one is given); the logits at positions `n_ctx/2 .. n_ctx-2` score the tokens that follow them,
//! so `n_ctx - 1 - n_ctx/2` tokens per window. With `nll` the mean negative log-likelihood and
//! `nll2` the mean of its squares, `PPL = exp(nll)` and its standard error is
//! `sqrt((nll2 - nll^2) / (count - 1)) * PPL` (llama.cpp's `Final estimate: PPL = X +/- Y`).

use powerinfer_cpu::ThreadPool;

use crate::error::ModelError;
use crate::model::{Logits, Model, ModelState};

/// The result of [`perplexity`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// `exp(mean NLL)`.
    pub ppl: f64,
    /// The standard error of `ppl` as llama.cpp prints it (0 with fewer than two tokens).
    pub ppl_stderr: f64,
    /// Mean negative log-likelihood (nats per token).
    pub mean_nll: f64,
    /// Tokens scored.
    pub n_scored: usize,
    /// Windows evaluated.
    pub n_chunks: usize,
}

/// Progress after each window: `(chunks done, chunks total, running PPL)`.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize, f64);

/// Negative log-likelihood of `target` under `logits` (log-softmax in `f64`, like llama.cpp).
pub fn token_nll(logits: &[f32], target: u32) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    -(f64::from(logits[target as usize] - max) - sum.ln())
}

/// Perplexity of `model` on `tokens` with windows of `n_ctx` tokens (see the module docs).
/// `bos` replaces the first token of every window (`None` keeps it). Logits are computed in
/// pieces of at most `n_batch` tokens, which bounds the memory for the logits to
/// `n_batch * n_vocab` floats.
pub fn perplexity(
    model: &Model,
    pool: &ThreadPool,
    tokens: &[u32],
    n_ctx: usize,
    n_batch: usize,
    bos: Option<u32>,
    progress: Option<Progress<'_>>,
) -> Result<Perplexity, ModelError> {
    let mut state = model.new_state(n_ctx.max(1), n_batch.max(1))?;
    perplexity_with_state(
        model, pool, &mut state, tokens, n_ctx, n_batch, bos, progress,
    )
}

/// [`perplexity`] reusing a state (its context must hold `n_ctx` tokens; it is cleared).
#[allow(clippy::too_many_arguments)]
pub fn perplexity_with_state(
    model: &Model,
    pool: &ThreadPool,
    state: &mut ModelState,
    tokens: &[u32],
    n_ctx: usize,
    n_batch: usize,
    bos: Option<u32>,
    mut progress: Option<Progress<'_>>,
) -> Result<Perplexity, ModelError> {
    if n_ctx < 4 {
        return Err(ModelError::InvalidConfig(format!(
            "perplexity context {n_ctx} is below 4 tokens"
        )));
    }
    if state.n_ctx() < n_ctx {
        return Err(ModelError::ContextOverflow {
            pos: 0,
            n_tokens: n_ctx,
            n_ctx: state.n_ctx(),
        });
    }
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks == 0 {
        return Err(ModelError::InvalidConfig(format!(
            "{} tokens are fewer than one window of {n_ctx}",
            tokens.len()
        )));
    }
    let n_batch = n_batch.max(1);
    let first = n_ctx / 2;
    let n_vocab = model.config().n_vocab;
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut window = vec![0u32; n_ctx];
    for chunk in 0..n_chunks {
        window.copy_from_slice(&tokens[chunk * n_ctx..(chunk + 1) * n_ctx]);
        if let Some(b) = bos {
            window[0] = b;
        }
        state.clear();
        // first half: cache only
        model.forward(pool, state, &window[..first], Logits::None)?;
        // second half: logits of rows first .. n_ctx-2 predict tokens first+1 .. n_ctx-1
        let mut pos = first;
        while pos < n_ctx - 1 {
            let n = n_batch.min(n_ctx - 1 - pos);
            let logits = model.forward(pool, state, &window[pos..pos + n], Logits::All)?;
            for i in 0..n {
                let target = tokens[chunk * n_ctx + pos + i + 1];
                let v = token_nll(&logits[i * n_vocab..(i + 1) * n_vocab], target);
                nll += v;
                nll2 += v * v;
                count += 1;
            }
            pos += n;
        }
        if let Some(cb) = progress.as_mut() {
            cb(chunk + 1, n_chunks, (nll / count as f64).exp());
        }
    }
    let mean = nll / count as f64;
    let ppl = mean.exp();
    let var = nll2 / count as f64 - mean * mean;
    let ppl_stderr = if var > 0.0 && count > 1 {
        (var / (count - 1) as f64).sqrt() * ppl
    } else {
        0.0
    };
    Ok(Perplexity {
        ppl,
        ppl_stderr,
        mean_nll: mean,
        n_scored: count,
        n_chunks,
    })
}
