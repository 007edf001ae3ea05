//! `falcon`: Falcon-7B/40B as llama.cpp runs them, and PowerInfer's ReluFalcon-40B; plus the
//! layer loop shared by the LayerNorm decoders (`falcon` here, `opt` in [`super::opt`]).
//!
//! Falcon (llama.cpp's graph): LayerNorm with bias (`falcon.attention.layer_norm_epsilon`),
//! a fused `attn_qkv` (rows: the query heads, then the key heads, then the value heads;
//! multi-query or grouped KV), NEOX RoPE over whole heads, no attention biases, and parallel
//! attention: attention and FFN both read the normed layer input and both outputs are added to
//! the layer input. Falcon-40B style files have two norms per layer (`attn_norm_2` feeds the
//! attention, `attn_norm` the FFN), 7B style one (`attn_norm` feeds both). The dense FFN is
//! `down(gelu(up·x))` (ggml's table GELU); a PowerInfer file's is `down(relu(up·x))` over the
//! predicted neurons, its predictor reading the layer's input before any norm. The output head
//! is tied to the embedding when `output.weight` is absent.

use std::time::Instant;

use half::f16;
use powerinfer_cpu::ThreadPool;
use powerinfer_cpu::matmul::matvec_quantized_many;
use powerinfer_cpu::ops::{self, AttnParams, RopeKind};
use powerinfer_gguf::GgufFile;
use powerinfer_predictor::PredictorQuality;

use super::sparse::{self as model_sparse, SparseFfn};
use super::{
    Activation, Arch, ConfigDefaults, FfnObserver, Loader, Model, ModelConfig, ModelState, OutRows,
    Parts, RopeSpec, Scratch, Weight, add_bias, mm, requant,
};
use crate::error::ModelError;
use crate::kv_cache::KvCache;

/// A LayerNorm with bias: `(x - mean) / sqrt(var + eps) * weight + bias`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale.
    pub weight: Vec<f32>,
    /// Shift.
    pub bias: Vec<f32>,
}

impl LayerNorm {
    pub(crate) fn load(l: &Loader, prefix: &str, n: usize) -> Result<Self, ModelError> {
        Ok(LayerNorm {
            weight: l.vector(&format!("{prefix}.weight"), n)?,
            bias: l.vector(&format!("{prefix}.bias"), n)?,
        })
    }

    /// Normalises every row of `x` (`n` values each) into `out`.
    fn rows(&self, x: &[f32], eps: f32, out: &mut [f32]) -> Result<(), ModelError> {
        let d = self.weight.len();
        for (src, dst) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            ops::layer_norm(src, &self.weight, Some(&self.bias), eps, dst)?;
        }
        Ok(())
    }
}

/// The attention block of a LayerNorm decoder layer.
#[derive(Debug, Clone)]
pub struct LnAttention {
    /// Query projection (for Falcon the first rows of `attn_qkv`).
    pub wq: Weight,
    /// Key projection.
    pub wk: Weight,
    /// Value projection.
    pub wv: Weight,
    /// Output projection.
    pub wo: Weight,
    /// Query bias.
    pub bq: Option<Vec<f32>>,
    /// Key bias.
    pub bk: Option<Vec<f32>>,
    /// Value bias.
    pub bv: Option<Vec<f32>>,
    /// Output bias.
    pub bo: Option<Vec<f32>>,
}

/// A dense ungated FFN: `down(act(up·x + b_up)) + b_down`.
#[derive(Debug, Clone)]
pub struct PlainFfn {
    /// `ffn_up`: n_embd -> n_ff.
    pub up: Weight,
    /// `ffn_up.bias`.
    pub up_bias: Option<Vec<f32>>,
    /// `ffn_down`: n_ff -> n_embd.
    pub down: Weight,
    /// `ffn_down.bias`.
    pub down_bias: Option<Vec<f32>>,
    /// The activation.
    pub act: Activation,
}

/// The FFN of a LayerNorm decoder layer.
#[derive(Debug, Clone)]
pub enum LnFfn {
    /// Every neuron computed.
    Dense(PlainFfn),
    /// Neurons chosen per token by the layer's predictor (PowerInfer files).
    Sparse(Box<SparseFfn>),
}

/// One layer of a LayerNorm decoder.
#[derive(Debug, Clone)]
pub struct LnLayer {
    /// Norm whose output feeds the attention.
    pub attn_norm: LayerNorm,
    /// Norm whose output feeds the FFN; `None`: the attention's normed input (Falcon-7B).
    /// Parallel layers apply it to the layer input, sequential ones to the residual after
    /// attention.
    pub ffn_norm: Option<LayerNorm>,
    /// Attention.
    pub attn: LnAttention,
    /// FFN.
    pub ffn: LnFfn,
}

/// Learned absolute position embeddings (OPT): row `pos + offset` is added to the token
/// embedding at position `pos`.
#[derive(Debug, Clone)]
pub struct PositionEmbedding {
    /// The table (`position_embd.weight`).
    pub table: Weight,
    /// Rows before position 0 (2 for OPT).
    pub offset: usize,
}

/// A LayerNorm decoder (`falcon`, `opt`): what [`Model`] runs instead of its [`super::Layer`]s.
#[derive(Debug, Clone)]
pub struct LnModel {
    /// LayerNorm epsilon.
    pub eps: f32,
    /// Attention and FFN read the same layer input and add to it together (Falcon); otherwise
    /// the FFN follows the attention's residual add (OPT).
    pub parallel: bool,
    /// RoPE (Falcon: NEOX); `None` for none (OPT).
    pub rope: Option<RopeSpec>,
    /// Score scale of the attention.
    pub kq_scale: f32,
    /// Position embeddings added to the token embeddings (OPT).
    pub positions: Option<PositionEmbedding>,
    /// The layers.
    pub layers: Vec<LnLayer>,
    /// The final norm.
    pub output_norm: LayerNorm,
}

impl LnModel {
    pub(super) fn is_sparse(&self) -> bool {
        self.layers
            .iter()
            .any(|l| matches!(l.ffn, LnFfn::Sparse(_)))
    }

    pub(super) fn sparse_thresholds(&self, over: Option<f32>) -> Vec<Option<f32>> {
        self.layers
            .iter()
            .map(|l| match &l.ffn {
                LnFfn::Sparse(f) => Some(over.unwrap_or(f.threshold)),
                LnFfn::Dense(_) => None,
            })
            .collect()
    }
}

/// Loads a `falcon` file (dense GGUF, or a PowerInfer file with a ReLU FFN and predictors).
pub(crate) fn load(file: &GgufFile) -> Result<(Parts, LnModel), ModelError> {
    let l = Loader { file };
    let defaults = ConfigDefaults {
        n_ctx_train: 2048,
        rms_eps: 1e-5,
        rope_base: 10000.0,
    };
    let mut config = l.config(Arch::Falcon, defaults, None)?;
    config.rms_eps = l.file.get_arch_f32("attention.layer_norm_epsilon")?;
    check_eps(config.rms_eps)?;
    let c = &config;
    if c.head_dim_k != c.head_dim_v
        || c.rope_dims != c.head_dim_k
        || c.n_head * c.head_dim_k != c.n_embd
    {
        // llama.cpp asserts the same for falcon.
        return Err(ModelError::InvalidConfig(format!(
            "falcon needs head dims k = v = rope dims and n_head * head_dim = n_embd (k {}, v {}, rope {}, {} heads, n_embd {})",
            c.head_dim_k, c.head_dim_v, c.rope_dims, c.n_head, c.n_embd
        )));
    }
    let sparse = SparseSetup::read(file, c.n_layer)?;
    let (q_dim, kv_dim) = (c.n_head * c.head_dim_k, c.n_head_kv * c.head_dim_k);
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        let qkv = l.matrix(&p("attn_qkv.weight"), c.n_embd, q_dim + 2 * kv_dim)?;
        let attn = LnAttention {
            wq: row_slice(&qkv, 0, q_dim),
            wk: row_slice(&qkv, q_dim, kv_dim),
            wv: row_slice(&qkv, q_dim + kv_dim, kv_dim),
            wo: l.matrix(&p("attn_output.weight"), q_dim, c.n_embd)?,
            bq: None,
            bk: None,
            bv: None,
            bo: None,
        };
        let norm = LayerNorm::load(&l, &p("attn_norm"), c.n_embd)?;
        // Falcon-40B: attn_norm_2 feeds the attention, attn_norm the FFN.
        let (attn_norm, ffn_norm) = if l.has(&p("attn_norm_2.weight")) {
            (
                LayerNorm::load(&l, &p("attn_norm_2"), c.n_embd)?,
                Some(norm),
            )
        } else {
            (norm, None)
        };
        let ffn = match &sparse {
            Some(s) => LnFfn::Sparse(Box::new(model_sparse::load_ungated_sparse_ffn(
                &l,
                i,
                c,
                false,
                &s.thresholds,
                s.activity.as_deref(),
            )?)),
            None => LnFfn::Dense(PlainFfn {
                up: l.matrix(&p("ffn_up.weight"), c.n_embd, c.n_ff)?,
                up_bias: None,
                down: l.matrix(&p("ffn_down.weight"), c.n_ff, c.n_embd)?,
                down_bias: None,
                act: Activation::Gelu,
            }),
        };
        layers.push(LnLayer {
            attn_norm,
            ffn_norm,
            attn,
            ffn,
        });
    }
    let ln = LnModel {
        eps: c.rms_eps,
        parallel: true,
        rope: Some(RopeSpec {
            kind: RopeKind::Neox,
            n_dims: c.rope_dims,
            base: c.rope_base,
            freq_scale: c.rope_freq_scale,
        }),
        kq_scale: 1.0 / (c.head_dim_k as f32).sqrt(),
        positions: None,
        layers,
        output_norm: LayerNorm::load(&l, "output_norm", c.n_embd)?,
    };
    let parts = ln_parts(&l, config, &ln)?;
    Ok((parts, ln))
}

/// The PowerInfer settings of a sparse file, `None` for a dense one.
pub(crate) struct SparseSetup {
    pub thresholds: Vec<f32>,
    pub activity: Option<Vec<f32>>,
}

impl SparseSetup {
    pub(crate) fn read(file: &GgufFile, n_layer: usize) -> Result<Option<Self>, ModelError> {
        if file.magic() != powerinfer_gguf::Magic::Pwri {
            return Ok(None);
        }
        Ok(Some(SparseSetup {
            thresholds: model_sparse::layer_thresholds(file, n_layer)?,
            activity: model_sparse::activity_thresholds(file, n_layer)?,
        }))
    }
}

/// A LayerNorm epsilon must be a finite non-negative number.
pub(crate) fn check_eps(eps: f32) -> Result<(), ModelError> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(ModelError::InvalidConfig(format!(
            "layer norm epsilon {eps}"
        )));
    }
    Ok(())
}

/// The shared parts of a LayerNorm decoder: embedding, output head (tied to the embedding when
/// `output.weight` is absent); the layers live in the [`LnModel`].
pub(crate) fn ln_parts(l: &Loader, config: ModelConfig, ln: &LnModel) -> Result<Parts, ModelError> {
    let c = &config;
    let tok_embd = l.raw_matrix("token_embd.weight", c.n_embd, c.n_vocab)?;
    let output = if l.has("output.weight") {
        l.matrix("output.weight", c.n_embd, c.n_vocab)?
    } else {
        l.matrix("token_embd.weight", c.n_embd, c.n_vocab)?
    };
    Ok(Parts {
        output_norm: ln.output_norm.weight.clone(),
        config,
        tok_embd,
        embd_scale: None,
        layers: Vec::new(),
        output,
    })
}

/// Rows `first..first + rows` of `w` as a matrix of their own (a byte range of the file).
fn row_slice(w: &Weight, first: usize, rows: usize) -> Weight {
    let row = w.range.len() / w.rows;
    let start = w.range.start + first * row;
    Weight {
        name: w.name.clone(),
        ty: w.ty,
        rows,
        cols: w.cols,
        range: start..start + rows * row,
    }
}

/// Where the rows of a step keep their keys and values.
enum KvRows<'a, 'b> {
    /// Consecutive tokens of one sequence from position `pos0` on.
    Seq { kv: &'a mut KvCache, pos0: usize },
    /// One token of each sequence, at its own position.
    Batch {
        seqs: &'a mut [&'b mut ModelState],
        positions: &'a [usize],
    },
}

impl KvRows<'_, '_> {
    fn pos(&self, t: usize) -> usize {
        match self {
            KvRows::Seq { pos0, .. } => pos0 + t,
            KvRows::Batch { positions, .. } => positions[t],
        }
    }
}

/// Time spent per part of the layers during one step.
#[derive(Default)]
struct StepTimes {
    attention: std::time::Duration,
    predictor: std::time::Duration,
    ffn: std::time::Duration,
}

impl Model {
    /// One micro-batch of a LayerNorm decoder (what [`Model::forward`] runs for `falcon` and
    /// `opt`): `tokens` at the next positions of `st`.
    pub(super) fn ln_ubatch(
        &self,
        ln: &LnModel,
        pool: &ThreadPool,
        st: &mut ModelState,
        tokens: &[u32],
        rows: OutRows,
        observer: Option<&mut dyn FfnObserver>,
    ) -> Result<(), ModelError> {
        let n = tokens.len();
        let pos0 = st.kv.len();
        let d = self.config.n_embd;
        let sc = &mut st.scratch;
        sc.ensure(&self.config, n, pool.n_threads());
        let positions: Vec<usize> = (pos0..pos0 + n).collect();
        self.ln_embed(ln, tokens, &positions, &mut sc.x[..n * d])?;
        let mut times = StepTimes::default();
        self.ln_layers(
            ln,
            pool,
            sc,
            n,
            KvRows::Seq {
                kv: &mut st.kv,
                pos0,
            },
            st.quality.as_mut(),
            observer,
            &mut times,
        )?;
        st.timings.attention += times.attention;
        st.timings.predictor += times.predictor;
        st.timings.ffn += times.ffn;
        st.kv.set_len(pos0 + n);
        let (first_row, n_out, dst_row) = match rows {
            OutRows::None => return Ok(()),
            OutRows::Last => (n - 1, 1, 0),
            OutRows::All(offset) => (0, n, offset),
        };
        let nv = self.config.n_vocab;
        let out = &mut st.logits[dst_row * nv..(dst_row + n_out) * nv];
        self.ln_head(ln, pool, sc, first_row, n_out, out)
    }

    /// [`Model::forward_batch`] for a LayerNorm decoder: `tokens[i]` at the next position of
    /// `seqs[i]` (checked by the caller), every row's logits into `logits`.
    pub(super) fn ln_forward_batch(
        &self,
        ln: &LnModel,
        pool: &ThreadPool,
        sc: &mut Scratch,
        seqs: &mut [&mut ModelState],
        tokens: &[u32],
        logits: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        let n = tokens.len();
        let d = self.config.n_embd;
        sc.ensure(&self.config, n, pool.n_threads());
        let positions: Vec<usize> = seqs.iter().map(|s| s.kv.len()).collect();
        self.ln_embed(ln, tokens, &positions, &mut sc.x[..n * d])?;
        let mut times = StepTimes::default();
        self.ln_layers(
            ln,
            pool,
            sc,
            n,
            KvRows::Batch {
                seqs,
                positions: &positions,
            },
            None,
            None,
            &mut times,
        )?;
        for (s, &pos) in seqs.iter_mut().zip(&positions) {
            s.kv.set_len(pos + 1);
        }
        logits.resize(n * self.config.n_vocab, 0.0);
        self.ln_head(ln, pool, sc, 0, n, logits)
    }

    /// Token embeddings (plus position embeddings where the model has them) into `x`.
    fn ln_embed(
        &self,
        ln: &LnModel,
        tokens: &[u32],
        positions: &[usize],
        x: &mut [f32],
    ) -> Result<(), ModelError> {
        let d = self.config.n_embd;
        let bytes = self.file.as_bytes();
        let row_of = |w: &Weight, i: usize, dst: &mut [f32]| -> Result<(), ModelError> {
            let rb = w.range.len() / w.rows;
            let start = w.range.start + i * rb;
            powerinfer_quant::dequantize_row(w.ty, &bytes[start..start + rb], dst).map_err(|e| {
                ModelError::Dequantize {
                    name: w.name.clone(),
                    msg: e.to_string(),
                }
            })
        };
        let mut pos_row = vec![0.0f32; if ln.positions.is_some() { d } else { 0 }];
        for (t, (&tok, &pos)) in tokens.iter().zip(positions).enumerate() {
            let dst = &mut x[t * d..(t + 1) * d];
            row_of(&self.tok_embd, tok as usize, dst)?;
            if let Some(pe) = &ln.positions {
                let row = pos + pe.offset;
                if row >= pe.table.rows {
                    // Past the learned positions.
                    return Err(ModelError::ContextOverflow {
                        pos,
                        n_tokens: 1,
                        n_ctx: pe.table.rows - pe.offset,
                    });
                }
                row_of(&pe.table, row, &mut pos_row)?;
                dst.iter_mut().zip(&pos_row).for_each(|(a, b)| *a += b);
            }
        }
        Ok(())
    }

    /// Final norm of `n_out` rows of `sc.x` from `first_row` on, and the output head.
    fn ln_head(
        &self,
        ln: &LnModel,
        pool: &ThreadPool,
        sc: &mut Scratch,
        first_row: usize,
        n_out: usize,
        out: &mut [f32],
    ) -> Result<(), ModelError> {
        let d = self.config.n_embd;
        ln.output_norm.rows(
            &sc.x[first_row * d..(first_row + n_out) * d],
            ln.eps,
            &mut sc.xn[..n_out * d],
        )?;
        let w = self.output.matrix(self.file.as_bytes())?;
        sc.acts_a.quantize(w.ty, &sc.xn[..n_out * d], d, n_out)?;
        mm(pool, &w, &sc.acts_a, n_out, out)?;
        Ok(())
    }

    /// Every layer over the `n` rows of `sc.x`.
    #[allow(clippy::too_many_arguments)]
    fn ln_layers(
        &self,
        ln: &LnModel,
        pool: &ThreadPool,
        sc: &mut Scratch,
        n: usize,
        mut kv: KvRows,
        mut quality: Option<&mut PredictorQuality>,
        mut observer: Option<&mut dyn FfnObserver>,
        times: &mut StepTimes,
    ) -> Result<(), ModelError> {
        let d = self.config.n_embd;
        sc.ln_attn.resize(n * d, 0.0);
        // RoPE table, one row of n_dims per token.
        let mut rope_tab = Vec::new();
        if let Some(r) = &ln.rope {
            rope_tab = vec![0.0f32; n * r.n_dims];
            for (t, row) in rope_tab.chunks_exact_mut(r.n_dims).enumerate() {
                ops::rope_cache(kv.pos(t) as f32, r.base, r.freq_scale, row)?;
            }
        }
        let dense_rows = self.dense_rows((0..n).map(|t| kv.pos(t)));
        for (il, layer) in ln.layers.iter().enumerate() {
            let t0 = Instant::now();
            layer
                .attn_norm
                .rows(&sc.x[..n * d], ln.eps, &mut sc.xn[..n * d])?;
            self.ln_attention(ln, pool, il, layer, sc, n, &mut kv, &rope_tab)?;
            if !ln.parallel {
                for (x, a) in sc.x[..n * d].iter_mut().zip(&sc.ln_attn[..n * d]) {
                    *x += a;
                }
            }
            times.attention += t0.elapsed();
            let t1 = Instant::now();
            // The FFN input: parallel layers norm the layer input (sc.x, not yet changed),
            // sequential ones the residual after attention; no ffn_norm reuses sc.xn.
            if let Some(norm) = &layer.ffn_norm {
                norm.rows(&sc.x[..n * d], ln.eps, &mut sc.xn[..n * d])?;
            }
            sc.sparse.predictor_time = std::time::Duration::ZERO;
            self.ln_ffn(
                pool,
                il,
                layer,
                sc,
                n,
                &dense_rows,
                quality.as_deref_mut(),
                observer.as_mut().map(|o| &mut **o as &mut dyn FfnObserver),
            )?;
            let pred = sc.sparse.predictor_time;
            times.predictor += pred;
            times.ffn += t1.elapsed().saturating_sub(pred);
            if ln.parallel {
                // llama.cpp: (ffn + attn) + input.
                for ((x, o), a) in sc.x[..n * d]
                    .iter_mut()
                    .zip(&sc.o[..n * d])
                    .zip(&sc.ln_attn[..n * d])
                {
                    *x += *o + *a;
                }
            } else {
                for (x, o) in sc.x[..n * d].iter_mut().zip(&sc.o[..n * d]) {
                    *x += o;
                }
            }
        }
        Ok(())
    }

    /// Attention of the normed rows in `sc.xn` into `sc.ln_attn` (output projection and bias
    /// included), keys and values stored in the rows' caches.
    #[allow(clippy::too_many_arguments)]
    fn ln_attention(
        &self,
        ln: &LnModel,
        pool: &ThreadPool,
        il: usize,
        layer: &LnLayer,
        sc: &mut Scratch,
        n: usize,
        kv: &mut KvRows,
        rope_tab: &[f32],
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let bytes = self.file.as_bytes();
        let d = c.n_embd;
        let a = &layer.attn;
        let (q_dim, k_dim, v_dim) = (
            c.n_head * c.head_dim_k,
            c.n_head_kv * c.head_dim_k,
            c.n_head_kv * c.head_dim_v,
        );
        let (wq, wk, wv) = (
            a.wq.matrix(bytes)?,
            a.wk.matrix(bytes)?,
            a.wv.matrix(bytes)?,
        );
        let xn = &sc.xn[..n * d];
        sc.acts_a.quantize(wq.ty, xn, d, n)?;
        if n == 1 && wk.ty == wq.ty && wv.ty == wq.ty {
            // Decode: Q, K and V in one pool job.
            matvec_quantized_many(
                pool,
                &mut [
                    (&wq, &sc.acts_a, &mut sc.q[..q_dim]),
                    (&wk, &sc.acts_a, &mut sc.k[..k_dim]),
                    (&wv, &sc.acts_a, &mut sc.v[..v_dim]),
                ],
            )?;
        } else {
            mm(pool, &wq, &sc.acts_a, n, &mut sc.q[..n * q_dim])?;
            let acts = requant(&mut sc.acts_a, &mut sc.acts_b, wk.ty, xn, d, n)?;
            mm(pool, &wk, acts, n, &mut sc.k[..n * k_dim])?;
            let acts = requant(&mut sc.acts_a, &mut sc.acts_b, wv.ty, xn, d, n)?;
            mm(pool, &wv, acts, n, &mut sc.v[..n * v_dim])?;
        }
        add_bias(&mut sc.q[..n * q_dim], a.bq.as_deref());
        add_bias(&mut sc.k[..n * k_dim], a.bk.as_deref());
        add_bias(&mut sc.v[..n * v_dim], a.bv.as_deref());
        if let Some(r) = &ln.rope {
            for (t, cache) in rope_tab.chunks_exact(r.n_dims).enumerate() {
                ops::rope_apply(
                    &mut sc.q[t * q_dim..(t + 1) * q_dim],
                    c.head_dim_k,
                    cache,
                    r.kind,
                )?;
                ops::rope_apply(
                    &mut sc.k[t * k_dim..(t + 1) * k_dim],
                    c.head_dim_k,
                    cache,
                    r.kind,
                )?;
            }
        }
        let params = |n_tokens: usize| AttnParams {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim_k: c.head_dim_k,
            head_dim_v: c.head_dim_v,
            scale: ln.kq_scale,
            window: None,
            precision: self.attention_numerics(n_tokens),
        };
        match kv {
            KvRows::Seq { kv, pos0 } => {
                let pos0 = *pos0;
                {
                    let (kc, vc) = kv.layer_mut(il);
                    ops::f32_to_f16(
                        &sc.k[..n * k_dim],
                        &mut kc[pos0 * k_dim..(pos0 + n) * k_dim],
                    )?;
                    ops::f32_to_f16(
                        &sc.v[..n * v_dim],
                        &mut vc[pos0 * v_dim..(pos0 + n) * v_dim],
                    )?;
                }
                let kc: &[f16] = &kv.keys(il)[..(pos0 + n) * k_dim];
                let vc: &[f16] = &kv.values(il)[..(pos0 + n) * v_dim];
                // whole KV groups per work item for prompts, single heads for decode
                let heads_per_item = if n > 1 { c.n_head / c.n_head_kv } else { 1 };
                let p = params(sc.attn_tokens.unwrap_or(n));
                self.attend(pool, &p, sc, n, heads_per_item, |t| (kc, vc, pos0 + t))?;
            }
            KvRows::Batch { seqs, positions } => {
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
                    .zip(positions.iter())
                    .map(|(s, &pos)| {
                        (
                            &s.kv.keys(il)[..(pos + 1) * k_dim],
                            &s.kv.values(il)[..(pos + 1) * v_dim],
                            pos,
                        )
                    })
                    .collect();
                // every row with the numerics of a single-token decode
                self.attend(pool, &params(1), sc, n, 1, |t| rows[t])?;
            }
        }
        let out_dim = c.n_head * c.head_dim_v;
        let wo = a.wo.matrix(bytes)?;
        sc.acts_a
            .quantize(wo.ty, &sc.att[..n * out_dim], out_dim, n)?;
        mm(pool, &wo, &sc.acts_a, n, &mut sc.ln_attn[..n * d])?;
        add_bias(&mut sc.ln_attn[..n * d], a.bo.as_deref());
        Ok(())
    }

    /// The FFN of the normed rows in `sc.xn` into `sc.o`; the predictor (sparse layers) reads
    /// `sc.x`.
    #[allow(clippy::too_many_arguments)]
    fn ln_ffn(
        &self,
        pool: &ThreadPool,
        il: usize,
        layer: &LnLayer,
        sc: &mut Scratch,
        n: usize,
        dense_rows: &[bool],
        quality: Option<&mut PredictorQuality>,
        observer: Option<&mut dyn FfnObserver>,
    ) -> Result<(), ModelError> {
        let bytes = self.file.as_bytes();
        let d = self.config.n_embd;
        match &layer.ffn {
            LnFfn::Dense(f) => {
                let ff = f.up.rows;
                let wu = f.up.matrix(bytes)?;
                let wd = f.down.matrix(bytes)?;
                sc.acts_a.quantize(wu.ty, &sc.xn[..n * d], d, n)?;
                mm(pool, &wu, &sc.acts_a, n, &mut sc.up[..n * ff])?;
                let h = &mut sc.up[..n * ff];
                add_bias(h, f.up_bias.as_deref());
                match f.act {
                    Activation::Gelu => ops::gelu_inplace(h),
                    Activation::Relu => ops::relu_inplace(h),
                    Activation::Silu => ops::silu_inplace(h),
                }
                if let Some(obs) = observer {
                    obs.observe(il, n, &sc.x[..n * d], &sc.up[..n * ff]);
                }
                sc.acts_a.quantize(wd.ty, &sc.up[..n * ff], ff, n)?;
                mm(pool, &wd, &sc.acts_a, n, &mut sc.o[..n * d])?;
                add_bias(&mut sc.o[..n * d], f.down_bias.as_deref());
            }
            LnFfn::Sparse(f) => {
                let ff = f.up.rows;
                let call = model_sparse::SparseCall {
                    pool,
                    bytes,
                    layer: il,
                    n,
                    n_embd: d,
                    pred_in: &sc.x[..n * d],
                    xn: &sc.xn[..n * d],
                    mode: self.sparse_mode,
                    threshold: self.threshold_override,
                    want_hidden: observer.is_some(),
                    dense_rows,
                };
                f.forward(
                    &call,
                    &mut sc.sparse,
                    quality,
                    &mut sc.gate,
                    &mut sc.up,
                    &mut sc.o[..n * d],
                )?;
                if let Some(obs) = observer {
                    obs.observe(il, n, &sc.x[..n * d], &sc.gate[..n * ff]);
                }
            }
        }
        Ok(())
    }
}
