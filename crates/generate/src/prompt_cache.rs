//! What a KV cache holds, so that a new prompt can reuse the prefix it shares with it **and get
//! the bits a full computation would give**.
//!
//! A prompt's numerics depend on how many tokens are computed together only through attention:
//! a micro-batch of 64 queries or more runs f32 attention (ggml's tiled kernel), a smaller one
//! (and decoding) f16 accumulation ([`Model::attention_numerics`]); f16 accumulation gives the
//! same bits in any split, and the matrix products give the same bits in any batch for every
//! weight type but Q4_K (whose prompt products follow llama.cpp's groups of 4 tokens) and in
//! every FFN but a predicted-sparse one (a batch computes the union of its tokens' neurons).
//!
//! [`PromptCache`] records, for every cached position, its token and the attention numerics it
//! was computed with. A new prompt reuses the longest prefix whose tokens are the same **and**
//! whose numerics are those a full computation of the new prompt would use at each position
//! (the micro-batch each position falls in, [`ModelState::n_ubatch`] tokens at a time), and
//! computes the rest in pieces cut at the same micro-batch boundaries, each with its full
//! micro-batch's numerics ([`Model::forward_as_ubatch_of`]). So a shared instruction is reused
//! whatever followed it, and a conversation's earlier turns are reused up to the first token
//! that a full computation would compute otherwise (tokens generated one at a time, in f16,
//! that the next turn's prompt computes in a micro-batch of 64 or more, in f32).

use powerinfer_cpu::ThreadPool;
use powerinfer_cpu::ops::AttnPrecision;

use crate::ModelError;
use crate::model::{Logits, Model, ModelState};

/// The tokens in a [`ModelState`]'s KV cache and the attention numerics of each position.
#[derive(Debug, Clone, Default)]
pub struct PromptCache {
    tokens: Vec<u32>,
    numerics: Vec<AttnPrecision>,
}

impl PromptCache {
    /// An empty record (for an empty KV cache).
    pub fn new() -> Self {
        Self::default()
    }

    /// The cached tokens, position by position.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets everything (call with [`ModelState::clear`]).
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.numerics.clear();
    }

    /// How many leading positions of `prompt` a full computation in `state`'s micro-batches
    /// would compute exactly as cached: same tokens, same attention numerics. At most
    /// `prompt.len() - 1` (the last prompt token is always computed: its logits are needed).
    pub fn reusable(&self, model: &Model, state: &ModelState, prompt: &[u32]) -> usize {
        let ub = state.n_ubatch();
        let n = prompt.len();
        self.tokens
            .iter()
            .zip(&self.numerics)
            .zip(prompt)
            .enumerate()
            .take_while(|&(p, ((&t, &num), &want))| {
                t == want && num == model.attention_numerics(fresh_ubatch(p, n, ub))
            })
            .count()
            .min(n.saturating_sub(1))
    }

    /// Processes `prompt` in `state`, reusing the first `reuse` cached positions (at most
    /// [`reusable`](Self::reusable)), and returns the last token's logits. On an error both the
    /// state and this record are cleared.
    pub fn prefill<'s>(
        &mut self,
        model: &Model,
        pool: &ThreadPool,
        state: &'s mut ModelState,
        prompt: &[u32],
        reuse: usize,
    ) -> Result<&'s [f32], ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        let reuse = reuse.min(self.reusable(model, state, prompt));
        state.rewind(reuse);
        self.tokens.truncate(reuse);
        self.numerics.truncate(reuse);
        let (n, ub) = (prompt.len(), state.n_ubatch());
        let mut start = reuse;
        while start < n {
            // The rest of the micro-batch `start` falls in when the whole prompt is computed.
            let mb = start / ub * ub;
            let end = (mb + ub).min(n);
            let size = end - mb;
            let logits = if end == n { Logits::Last } else { Logits::None };
            if let Err(e) =
                model.forward_as_ubatch_of(pool, state, &prompt[start..end], logits, size)
            {
                state.clear();
                self.clear();
                return Err(e);
            }
            self.tokens.extend_from_slice(&prompt[start..end]);
            let num = model.attention_numerics(size);
            self.numerics.resize(end, num);
            start = end;
        }
        Ok(state.logits())
    }

    /// Records a token fed alone (a decoding step) after the cached ones.
    pub fn push_decoded(&mut self, model: &Model, token: u32) {
        self.tokens.push(token);
        self.numerics.push(model.attention_numerics(1));
    }
}

/// The size of the micro-batch position `p` falls in when `n` tokens are computed `ub` at a
/// time.
fn fresh_ubatch(p: usize, n: usize, ub: usize) -> usize {
    let mb = p / ub * ub;
    (mb + ub).min(n) - mb
}

#[cfg(test)]
mod tests {
    use super::fresh_ubatch;

    #[test]
    fn micro_batch_sizes() {
        // 600 tokens, 512 at a time: [0, 512) and [512, 600).
        assert_eq!(fresh_ubatch(0, 600, 512), 512);
        assert_eq!(fresh_ubatch(511, 600, 512), 512);
        assert_eq!(fresh_ubatch(512, 600, 512), 88);
        assert_eq!(fresh_ubatch(599, 600, 512), 88);
        assert_eq!(fresh_ubatch(3, 5, 512), 5);
        assert_eq!(fresh_ubatch(7, 8, 1), 1);
    }
}
