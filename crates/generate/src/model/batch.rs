//! Batched decoding: one new token for each of several sequences in one forward pass.
//!
//! Each sequence keeps its own [`ModelState`] (KV cache, position). The row-wise work — the
//! embedding, norms, the Q/K/V and output projections, the FFN and the output head — runs once
//! over all rows as a matrix product (each weight matrix is read once per step, not once per
//! sequence); attention runs per row over that row's own cache. The batched products equal the
//! single-row ones bit for bit (`powerinfer_cpu::matmul`, with `ActBuffer::set_decode_order`, so
//! also for Q4_K, which prompt batches sum in llama.cpp's grouped order), and each row's attention uses the
//! numerics of a single-token decode, so a sequence decoded in a batch gets exactly the logits it
//! would get alone (dense FFNs; a sparse FFN computes the union of the rows' active neurons, so
//! its rows may differ from single-row runs within the predictor's tolerance).

use crate::error::ModelError;

use half::f16;
use powerinfer_cpu::ThreadPool;
use powerinfer_cpu::ops;

use super::{Model, ModelState, Scratch, mm};

/// Buffers of [`Model::forward_batch`]: scratch sized for the largest batch seen and the logits
/// of the last call.
#[derive(Debug, Default)]
pub struct BatchState {
    scratch: Scratch,
    logits: Vec<f32>,
}

impl BatchState {
    /// The logits of the last [`Model::forward_batch`] call (`n_rows x n_vocab`, row-major).
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }
}

impl Model {
    /// Buffers for [`forward_batch`](Self::forward_batch).
    pub fn new_batch_state(&self) -> BatchState {
        BatchState::default()
    }

    /// Feeds `tokens[i]` at the next position of `seqs[i]`, for every `i` at once, and returns
    /// the logits of every row (`seqs.len() x n_vocab`, borrowed from `batch`). Every state must
    /// have room for one more position; the states must be distinct (they are, being `&mut`).
    pub fn forward_batch<'b>(
        &self,
        pool: &ThreadPool,
        batch: &'b mut BatchState,
        seqs: &mut [&mut ModelState],
        tokens: &[u32],
    ) -> Result<&'b [f32], ModelError> {
        let c = &self.config;
        let n = tokens.len();
        if n == 0 {
            return Err(ModelError::EmptyInput);
        }
        if seqs.len() != n {
            return Err(ModelError::InvalidConfig(format!(
                "forward_batch: {n} tokens for {} sequences",
                seqs.len()
            )));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(ModelError::TokenOutOfRange {
                token: t,
                n_vocab: c.n_vocab,
            });
        }
        let kv_dims = (c.n_head_kv * c.head_dim_k, c.n_head_kv * c.head_dim_v);
        for s in seqs.iter() {
            let (pos, n_ctx) = (s.kv.len(), s.kv.n_ctx());
            if pos >= n_ctx {
                return Err(ModelError::ContextOverflow {
                    pos,
                    n_tokens: 1,
                    n_ctx,
                });
            }
            if (s.kv.k_dim(), s.kv.v_dim()) != kv_dims {
                return Err(ModelError::InvalidConfig(
                    "forward_batch: a state of another model".into(),
                ));
            }
        }
        // The rows are independent sequences: each gets what it would get decoded alone.
        batch.scratch.acts_a.set_decode_order(true);
        batch.scratch.acts_b.set_decode_order(true);
        if let Some(ln) = &self.ln {
            self.ln_forward_batch(
                ln,
                pool,
                &mut batch.scratch,
                seqs,
                tokens,
                &mut batch.logits,
            )?;
            return Ok(&batch.logits);
        }
        let positions: Vec<usize> = seqs.iter().map(|s| s.kv.len()).collect();
        let d = c.n_embd;
        let (k_dim, v_dim) = kv_dims;
        let sc = &mut batch.scratch;
        sc.ensure(c, n, pool.n_threads());
        self.embed(tokens, &mut sc.x[..n * d])?;
        self.rope_tables(sc, &positions)?;
        let dense_rows = self.dense_rows(positions.iter().copied());

        for (il, layer) in self.layers.iter().enumerate() {
            self.attn_qkv(pool, layer, sc, n)?;
            // Each row's K and V go to its own cache, at its own position.
            for (t, s) in seqs.iter_mut().enumerate() {
                let pos = positions[t];
                let (kc, vc) = s.kv.layer_mut(il);
                ops::f32_to_f16(
                    &sc.k[t * k_dim..(t + 1) * k_dim],
                    &mut kc[pos * k_dim..(pos + 1) * k_dim],
                )?;
                ops::f32_to_f16(
                    &sc.v[t * v_dim..(t + 1) * v_dim],
                    &mut vc[pos * v_dim..(pos + 1) * v_dim],
                )?;
            }
            let rows: Vec<(&[f16], &[f16], usize)> = seqs
                .iter()
                .zip(&positions)
                .map(|(s, &pos)| {
                    (
                        &s.kv.keys(il)[..(pos + 1) * k_dim],
                        &s.kv.values(il)[..(pos + 1) * v_dim],
                        pos,
                    )
                })
                .collect();
            // Every row with the numerics of a single-token decode (precision for one query,
            // one head per work item).
            let p = self.attn_params(layer, 1);
            self.attend(pool, &p, sc, n, 1, |t| rows[t])?;
            drop(rows);
            self.attn_out(pool, layer, sc, n)?;
            self.ffn_block(pool, il, layer, sc, n, &dense_rows, None, None)?;
        }
        for (s, &pos) in seqs.iter_mut().zip(&positions) {
            s.kv.set_len(pos + 1);
        }

        // output head over all rows
        for t in 0..n {
            ops::rms_norm(
                &sc.x[t * d..(t + 1) * d],
                &self.output_norm,
                c.rms_eps,
                &mut sc.xn[t * d..(t + 1) * d],
            )?;
        }
        let w = self.output.matrix(self.file.as_bytes())?;
        sc.acts_a.quantize(w.ty, &sc.xn[..n * d], d, n)?;
        batch.logits.resize(n * c.n_vocab, 0.0);
        mm(pool, &w, &sc.acts_a, n, &mut batch.logits)?;
        Ok(&batch.logits)
    }

    /// Embedding rows of `tokens` into `x` (`tokens.len() x n_embd`), scaled where the
    /// architecture scales them (what the prompt path computes).
    fn embed(&self, tokens: &[u32], x: &mut [f32]) -> Result<(), ModelError> {
        let d = self.config.n_embd;
        let bytes = self.file.as_bytes();
        let emb = &self.tok_embd;
        let rb = emb.range.len() / emb.rows;
        for (t, &tok) in tokens.iter().enumerate() {
            let start = emb.range.start + tok as usize * rb;
            let dst = &mut x[t * d..(t + 1) * d];
            powerinfer_quant::dequantize_row(emb.ty, &bytes[start..start + rb], dst).map_err(
                |e| ModelError::Dequantize {
                    name: emb.name.clone(),
                    msg: e.to_string(),
                },
            )?;
            if let Some(s) = self.embd_scale {
                dst.iter_mut().for_each(|v| *v *= s);
            }
        }
        Ok(())
    }

    /// RoPE tables for every distinct spec of the layers, row `t` for position `positions[t]`.
    fn rope_tables(&self, sc: &mut Scratch, positions: &[usize]) -> Result<(), ModelError> {
        sc.rope_tables.clear();
        for layer in &self.layers {
            let r = layer.attn.rope;
            if !sc.rope_tables.iter().any(|(spec, _)| *spec == r) {
                let mut tab = vec![0.0f32; positions.len() * r.n_dims];
                for (row, &pos) in tab.chunks_exact_mut(r.n_dims).zip(positions) {
                    ops::rope_cache(pos as f32, r.base, r.freq_scale, row)?;
                }
                sc.rope_tables.push((r, tab));
            }
        }
        Ok(())
    }
}
