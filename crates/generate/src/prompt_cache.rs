//! What a KV cache holds, so that a new prompt can reuse the prefix it shares with it **and get
//! the bits a full computation would give**.
//!
//! A prompt's bits depend on how its tokens are cut into micro-batches in two places:
//! attention (a micro-batch of 64 queries or more runs f32 attention, ggml's tiled kernel; a
//! smaller one, and decoding, f16 accumulation, which gives the same bits in any split:
//! [`Model::attention_numerics`]) and, for Q4_K weights, the products (llama.cpp sums the first
//! `n - n % 4` tokens of a micro-batch of `n` in another order than single tokens:
//! [`Model::groups_prompt_products`]). Every other product gives the same bits in any batch.
//!
//! [`PromptCache`] records, for every cached position, its token and how it was computed. A
//! new prompt reuses the longest prefix whose tokens are the same **and** which a full
//! computation of the new prompt would compute the same way at each position (given the
//! micro-batch each position falls in, [`ModelState::n_ubatch`] tokens at a time), and computes
//! the rest in pieces cut at the same micro-batch boundaries, each as that part of its
//! micro-batch ([`Model::forward_as_ubatch_of`]). So a shared instruction is reused whatever
//! followed it, and a conversation's earlier turns are reused up to the first token that a
//! full computation would compute otherwise (tokens generated one at a time, in f16, that the
//! next turn's prompt computes in a micro-batch of 64 or more, in f32). The one exception is
//! the sparse FFNs of PWRI files, which compute a micro-batch's union of active neurons.

use powerinfer_cpu::ThreadPool;
use powerinfer_cpu::ops::AttnPrecision;

use crate::ModelError;
use crate::model::{Logits, Model, ModelState};

/// How one cached position was computed: its attention numerics, and whether its products
/// took the grouped order of a micro-batch's whole groups of 4 tokens (Q4_K).
type Numerics = (AttnPrecision, bool);

/// The tokens in a [`ModelState`]'s KV cache and how each position was computed.
#[derive(Debug, Clone, Default)]
pub struct PromptCache {
    tokens: Vec<u32>,
    numerics: Vec<Numerics>,
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
        let grouping = model.groups_prompt_products();
        self.tokens
            .iter()
            .zip(&self.numerics)
            .zip(prompt)
            .enumerate()
            .take_while(|&(p, ((&t, &num), &want))| {
                t == want && num == fresh_numerics(model, grouping, p, n, ub)
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
            let part = &prompt[start..end];
            if let Err(e) = model.forward_as_ubatch_of(pool, state, part, logits, size, start - mb)
            {
                state.clear();
                self.clear();
                return Err(e);
            }
            self.tokens.extend_from_slice(part);
            let grouping = model.groups_prompt_products();
            self.numerics
                .extend((start..end).map(|p| fresh_numerics(model, grouping, p, n, ub)));
            start = end;
        }
        Ok(state.logits())
    }

    /// Records a token fed alone (a decoding step) after the cached ones.
    pub fn push_decoded(&mut self, model: &Model, token: u32) {
        self.tokens.push(token);
        self.numerics.push((model.attention_numerics(1), false));
    }
}

/// How a full computation of `n` prompt tokens, `ub` at a time, computes position `p`
/// (`grouping`: [`Model::groups_prompt_products`]).
fn fresh_numerics(model: &Model, grouping: bool, p: usize, n: usize, ub: usize) -> Numerics {
    let size = fresh_ubatch(p, n, ub);
    let index = p % ub;
    (
        model.attention_numerics(size),
        grouping && index < size - size % 4,
    )
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
