//! Transformer models read from GGUF files: hyper-parameters, memory-mapped weights and the
//! dense forward pass (batched prompt processing and single-token decode).
//!
//! One file per architecture ([`llama`], [`gemma3`], [`falcon`], [`opt`]) reads that
//! architecture's metadata and tensors into the shared description here: a stack of [`Layer`]s,
//! each a pre-norm attention block ([`Attention`]) and a feed-forward block ([`Ffn`]) with
//! optional post-norms. The FFN and the attention are separate types so a later change can route
//! them elsewhere (sparse operators, a GPU) without touching the forward loop. The LayerNorm
//! decoders (`falcon`, `opt`) have their own description and layer loop ([`falcon::LnModel`]),
//! which reuses the attention kernels and the sparse FFN here.
//!
//! Weights are never copied: each matrix is a byte range of the memory-mapped file, resolved to
//! a [`Matrix`] when it is used. Only the small f32 vectors (norm weights, biases) are copied.

mod batch;
pub mod falcon;
pub mod gemma3;
pub mod llama;
pub mod opt;
pub mod sparse;

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use half::f16;
use powerinfer_cpu::matmul::matvec_quantized_many;
use powerinfer_cpu::ops::{self, AttnParams, AttnPrecision, AttnScratch, RopeKind};

/// Micro-batches of at least this many tokens use f32 attention numerics (ggml's tiled kernel).
const TILED_ATTN_MIN_TOKENS: usize = 64;
/// Tokens per work item of the tiled prompt attention (times the heads of a KV group, the
/// kernel's query rows: a multiple of its 16 lanes).
const TILED_ATTN_ITEM_TOKENS: usize = 16;
use powerinfer_cpu::{
    ActBuffer, CpuError, Matrix, SharedSlice, ThreadPool, matmul_quantized, matvec_quantized,
};
use powerinfer_gguf::{GgmlType, GgufFile};

use crate::error::ModelError;
use crate::kv_cache::KvCache;
pub use batch::BatchState;
use powerinfer_predictor::PredictorQuality;
pub use sparse::{SparseFfn, SparseMode};

/// The architectures this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama` (LLaMA, SmolLM2, Mistral- and Qwen2-style variants stored as `llama`).
    Llama,
    /// `gemma3` (Gemma 3 text models).
    Gemma3,
    /// `bamboo` (Bamboo-7B, PowerInfer files only): `llama` with a dReLU FFN,
    /// `relu(gate·x) * relu(up·x)`.
    Bamboo,
    /// `falcon` (Falcon-7B/40B; ReluFalcon-40B in PowerInfer files): LayerNorm, fused QKV,
    /// parallel attention and FFN.
    Falcon,
    /// `opt` (OPT; PowerInfer files): LayerNorm, learned positions, biases, ReLU FFN.
    Opt,
}

impl Arch {
    /// The `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Gemma3 => "gemma3",
            Arch::Bamboo => "bamboo",
            Arch::Falcon => "falcon",
            Arch::Opt => "opt",
        }
    }
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Architecture.
    pub arch: Arch,
    /// Vocabulary size (rows of the embedding).
    pub n_vocab: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// FFN inner size.
    pub n_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Dimension of a query/key head.
    pub head_dim_k: usize,
    /// Dimension of a value head.
    pub head_dim_v: usize,
    /// Context length the model was trained for.
    pub n_ctx_train: usize,
    /// RMS-norm epsilon (the LayerNorm epsilon for `falcon` and `opt`).
    pub rms_eps: f32,
    /// Rotated dimensions per head.
    pub rope_dims: usize,
    /// RoPE base of the (global) attention layers.
    pub rope_base: f32,
    /// RoPE frequency scale of the (global) attention layers (1 / linear scaling factor).
    pub rope_freq_scale: f32,
    /// Sliding window of the local attention layers, if the model has any.
    pub sliding_window: Option<usize>,
}

/// A weight matrix: a byte range of the model file with its type and shape.
#[derive(Debug, Clone)]
pub struct Weight {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// Output dimension (ggml `ne[1]`).
    pub rows: usize,
    /// Input dimension (ggml `ne[0]`, the row length).
    pub cols: usize,
    range: Range<usize>,
}

impl Weight {
    /// The matrix over `file_bytes` (the whole file).
    pub fn matrix<'a>(&self, file_bytes: &'a [u8]) -> Result<Matrix<'a>, CpuError> {
        Matrix::new(
            self.ty,
            self.rows,
            self.cols,
            &file_bytes[self.range.clone()],
        )
    }

    /// Bytes of the weight in the file.
    pub fn n_bytes(&self) -> usize {
        self.range.len()
    }
}

/// Activation of the FFN gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU when gated).
    Silu,
    /// GELU, tanh approximation through ggml's f16 table (GeGLU when gated).
    Gelu,
    /// ReLU.
    Relu,
}

/// A dense gated FFN: `down(act(gate x) * up x)`.
#[derive(Debug, Clone)]
pub struct DenseFfn {
    /// `ffn_gate`: n_embd -> n_ff.
    pub gate: Weight,
    /// `ffn_up`: n_embd -> n_ff.
    pub up: Weight,
    /// `ffn_down`: n_ff -> n_embd.
    pub down: Weight,
    /// The gate activation.
    pub act: Activation,
}

/// The feed-forward block of a layer.
#[derive(Debug, Clone)]
pub enum Ffn {
    /// Every neuron computed.
    Dense(DenseFfn),
    /// Neurons chosen per token by the layer's predictor (PowerInfer files).
    Sparse(SparseFfn),
}

/// Sees what each layer's FFN receives and computes during [`Model::forward_observed`] (for
/// activation profiling and predictor training).
pub trait FfnObserver {
    /// Called once per layer per micro-batch. `input`: the FFN's input rows, i.e. the
    /// predictor's input (the residual stream before the FFN norm), `n_tokens x n_embd`
    /// row-major. `hidden`: the down projection's input `h = act(gate·xn) * (up·xn)` (for sparse
    /// layers exactly 0 for skipped neurons), `n_tokens x n_ff`.
    fn observe(&mut self, layer: usize, n_tokens: usize, input: &[f32], hidden: &[f32]);
}

/// RoPE settings of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeSpec {
    /// Pairing of rotated dimensions.
    pub kind: RopeKind,
    /// Rotated dimensions per head.
    pub n_dims: usize,
    /// Frequency base.
    pub base: f32,
    /// Frequency scale (positions are multiplied by it).
    pub freq_scale: f32,
}

/// The attention block of a layer.
#[derive(Debug, Clone)]
pub struct Attention {
    /// Query projection.
    pub wq: Weight,
    /// Key projection.
    pub wk: Weight,
    /// Value projection.
    pub wv: Weight,
    /// Output projection.
    pub wo: Weight,
    /// Optional biases of q, k, v, o.
    pub bq: Option<Vec<f32>>,
    /// Key bias.
    pub bk: Option<Vec<f32>>,
    /// Value bias.
    pub bv: Option<Vec<f32>>,
    /// Output bias.
    pub bo: Option<Vec<f32>>,
    /// Per-head RMS norm of the queries (Gemma 3).
    pub q_norm: Option<Vec<f32>>,
    /// Per-head RMS norm of the keys (Gemma 3).
    pub k_norm: Option<Vec<f32>>,
    /// Rotary embedding.
    pub rope: RopeSpec,
    /// Multiplies the queries after RoPE (before they are rounded to f16), 1 for none.
    pub q_scale: f32,
    /// Multiplies each `q . k` score.
    pub kq_scale: f32,
    /// Sliding window (local attention), `None` for global.
    pub window: Option<usize>,
}

/// One transformer block.
#[derive(Debug, Clone)]
pub struct Layer {
    /// Norm before attention.
    pub attn_norm: Vec<f32>,
    /// Attention.
    pub attn: Attention,
    /// Norm of the attention output before the residual add (Gemma).
    pub post_attn_norm: Option<Vec<f32>>,
    /// Norm before the FFN.
    pub ffn_norm: Vec<f32>,
    /// FFN.
    pub ffn: Ffn,
    /// Norm of the FFN output before the residual add (Gemma).
    pub post_ffn_norm: Option<Vec<f32>>,
}

/// Which logits a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (fill the KV cache only).
    None,
    /// The last token's (`n_vocab` values).
    Last,
    /// Every token's (`n_tokens x n_vocab`, row-major).
    All,
}

/// A loaded model: hyper-parameters and weights mapped from the file.
pub struct Model {
    file: Arc<GgufFile>,
    config: ModelConfig,
    tok_embd: Weight,
    embd_scale: Option<f32>,
    layers: Vec<Layer>,
    output_norm: Vec<f32>,
    output: Weight,
    bos: Option<u32>,
    sparse_mode: SparseMode,
    threshold_override: Option<f32>,
    /// The sparse modes compute the FFNs of a sequence's first `dense_prefix` positions densely.
    dense_prefix: usize,
    /// PowerInfer files run with the attention numerics of the llama.cpp the reference forked
    /// (no flash attention), so that their results match the reference's.
    legacy_attention: bool,
    /// The LayerNorm decoders' own layers (`falcon`, `opt`); `layers` is then empty.
    ln: Option<falcon::LnModel>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Memory-maps and loads a GGUF model.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        Self::from_gguf(Arc::new(GgufFile::open(path)?))
    }

    /// Loads a model from an opened file.
    pub fn from_gguf(file: Arc<GgufFile>) -> Result<Self, ModelError> {
        let arch = file
            .architecture()
            .ok_or(ModelError::NoArchitecture)?
            .to_owned();
        let (parts, ln) = match arch.as_str() {
            "llama" => (llama::load(&file, Arch::Llama)?, None),
            "bamboo" if file.magic() == powerinfer_gguf::Magic::Pwri => {
                (llama::load(&file, Arch::Bamboo)?, None)
            }
            "gemma3" => (gemma3::load(&file)?, None),
            "falcon" => {
                let (p, ln) = falcon::load(&file)?;
                (p, Some(ln))
            }
            "opt" => {
                let (p, ln) = opt::load(&file)?;
                (p, Some(ln))
            }
            other => return Err(ModelError::UnknownArchitecture(other.to_owned())),
        };
        let bos = file.get_u32("tokenizer.ggml.bos_token_id").ok();
        // The reference's own files (which never name their FFN activation) get its attention
        // numerics; the PWRI files our `train-predictor` writes from a dense model keep that
        // model's (today's llama.cpp's).
        let legacy_attention = file.magic() == powerinfer_gguf::Magic::Pwri
            && file.get(sparse::FFN_ACTIVATION_KEY).is_none();
        let dense_prefix = sparse::dense_prefix(&file)?;
        Ok(Self {
            file,
            config: parts.config,
            tok_embd: parts.tok_embd,
            embd_scale: parts.embd_scale,
            layers: parts.layers,
            output_norm: parts.output_norm,
            output: parts.output,
            bos,
            sparse_mode: SparseMode::default(),
            threshold_override: None,
            dense_prefix,
            legacy_attention,
            ln,
        })
    }

    /// Uses the attention numerics of llama.cpp before flash attention (late 2023, what the
    /// reference PowerInfer computes) instead of today's llama.cpp; on by default for the
    /// reference's PowerInfer files (PWRI without `powerinfer.ffn_activation`), so that their
    /// results match the reference's.
    pub fn set_legacy_attention(&mut self, on: bool) {
        self.legacy_attention = on;
    }

    /// Whether any layer has a predictor-driven sparse FFN (a PowerInfer file).
    pub fn is_sparse(&self) -> bool {
        if let Some(ln) = &self.ln {
            return ln.is_sparse();
        }
        self.layers.iter().any(|l| matches!(l.ffn, Ffn::Sparse(_)))
    }

    /// How the sparse layers run (predicted neurons, or every neuron).
    pub fn sparse_mode(&self) -> SparseMode {
        self.sparse_mode
    }

    /// Sets how the sparse layers run (no effect on dense models).
    pub fn set_sparse_mode(&mut self, mode: SparseMode) {
        self.sparse_mode = mode;
    }

    /// How many leading positions of a sequence the sparse modes compute densely (every neuron,
    /// no activity threshold): the file's `powerinfer.dense_prefix`, 0 when it names none.
    pub fn dense_prefix(&self) -> usize {
        self.dense_prefix
    }

    /// Sets [`Model::dense_prefix`] (for experiments: 0 makes every position sparse).
    pub fn set_dense_prefix(&mut self, n: usize) {
        self.dense_prefix = n;
    }

    /// For each row at these positions, whether it sits in the dense prefix; empty when none
    /// does (the common case).
    fn dense_rows(&self, positions: impl Iterator<Item = usize>) -> Vec<bool> {
        if self.dense_prefix == 0 {
            return Vec::new();
        }
        let rows: Vec<bool> = positions.map(|p| p < self.dense_prefix).collect();
        if rows.contains(&true) {
            rows
        } else {
            Vec::new()
        }
    }

    /// Overrides every sparse layer's predictor threshold (`--sparse-threshold`); `None` goes
    /// back to the file's (or `LLAMA_SPARSE_PRED_THRESHOLD`'s) values. A NaN is refused.
    pub fn set_sparse_threshold(&mut self, threshold: Option<f32>) -> Result<(), ModelError> {
        if let Some(t) = threshold
            && t.is_nan()
        {
            return Err(ModelError::InvalidConfig(
                "the sparse threshold is not a number".into(),
            ));
        }
        self.threshold_override = threshold;
        Ok(())
    }

    /// The predictor threshold each sparse layer uses now (`None` for dense layers).
    pub fn sparse_thresholds(&self) -> Vec<Option<f32>> {
        if let Some(ln) = &self.ln {
            return ln.sparse_thresholds(self.threshold_override);
        }
        self.layers
            .iter()
            .map(|l| match &l.ffn {
                Ffn::Sparse(f) => Some(self.threshold_override.unwrap_or(f.threshold)),
                Ffn::Dense(_) => None,
            })
            .collect()
    }

    /// Hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The layers (empty for the LayerNorm decoders `falcon` and `opt`, whose layers have
    /// their own description).
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The underlying file.
    pub fn file(&self) -> &Arc<GgufFile> {
        &self.file
    }

    /// `tokenizer.ggml.bos_token_id`, if the file has one.
    pub fn bos_token(&self) -> Option<u32> {
        self.bos
    }

    /// A fresh state (KV cache and buffers) for up to `n_ctx` positions, processing prompts in
    /// micro-batches of at most `n_ubatch` tokens.
    pub fn new_state(&self, n_ctx: usize, n_ubatch: usize) -> Result<ModelState, ModelError> {
        if n_ctx == 0 {
            return Err(ModelError::InvalidConfig("context size 0".into()));
        }
        let c = &self.config;
        let kv = KvCache::new(
            c.n_layer,
            n_ctx,
            c.n_head_kv * c.head_dim_k,
            c.n_head_kv * c.head_dim_v,
        )?;
        Ok(ModelState {
            kv,
            n_ubatch: n_ubatch.clamp(1, n_ctx),
            scratch: Scratch::default(),
            logits: Vec::new(),
            quality: None,
            timings: OpTimings::default(),
        })
    }

    /// Runs `tokens` at the next positions of `state` and returns the requested logits (borrowed
    /// from `state`). Prompts longer than the state's micro-batch are processed in pieces.
    pub fn forward<'s>(
        &self,
        pool: &ThreadPool,
        state: &'s mut ModelState,
        tokens: &[u32],
        logits: Logits,
    ) -> Result<&'s [f32], ModelError> {
        self.forward_impl(pool, state, tokens, logits, None, None)
    }

    /// [`forward`](Self::forward) of `tokens` as positions `offset..offset + tokens.len()` of
    /// a micro-batch of `ubatch_tokens` tokens: with that micro-batch's attention numerics and
    /// its products' order, whatever the number of `tokens` (one micro-batch at most: fails if
    /// `tokens` is longer than the state's). A prompt's bits depend on how it is cut into
    /// micro-batches only through attention (from 64 queries on, f32 and the tiled kernel, as
    /// in ggml; below, f16 accumulation, the same bits in any split) and, for Q4_K weights,
    /// the products (llama.cpp's order for whole groups of 4 tokens of a micro-batch). So a
    /// prompt computed in part this way, after a cached prefix, gets the bits a full
    /// computation gives the same positions ([`crate::prompt_cache`]), with dense FFNs (a
    /// predicted-sparse FFN computes the union of its micro-batch's active neurons).
    pub fn forward_as_ubatch_of<'s>(
        &self,
        pool: &ThreadPool,
        state: &'s mut ModelState,
        tokens: &[u32],
        logits: Logits,
        ubatch_tokens: usize,
        offset: usize,
    ) -> Result<&'s [f32], ModelError> {
        if tokens.len() > state.n_ubatch {
            return Err(ModelError::InvalidConfig(format!(
                "forward_as_ubatch_of: {} tokens exceed the state's micro-batch of {}",
                tokens.len(),
                state.n_ubatch
            )));
        }
        let s = ubatch_tokens.max(1);
        let grouped = (s - s % 4).saturating_sub(offset);
        self.forward_impl(pool, state, tokens, logits, None, Some((s, grouped)))
    }

    /// [`forward`](Self::forward) that shows every layer's FFN input and intermediate
    /// activation to `observer` (profiling).
    pub fn forward_observed<'s>(
        &self,
        pool: &ThreadPool,
        state: &'s mut ModelState,
        tokens: &[u32],
        logits: Logits,
        observer: &mut dyn FfnObserver,
    ) -> Result<&'s [f32], ModelError> {
        self.forward_impl(pool, state, tokens, logits, Some(observer), None)
    }

    fn forward_impl<'s>(
        &self,
        pool: &ThreadPool,
        state: &'s mut ModelState,
        tokens: &[u32],
        logits: Logits,
        mut observer: Option<&mut dyn FfnObserver>,
        as_part: Option<(usize, usize)>,
    ) -> Result<&'s [f32], ModelError> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyInput);
        }
        // (micro-batch size, tokens in the grouped order) of a part of a micro-batch
        state.scratch.attn_tokens = as_part.map(|(s, _)| s);
        let grouped = as_part.map(|(_, g)| g);
        state.scratch.acts_a.set_grouped_tokens(grouped);
        state.scratch.acts_b.set_grouped_tokens(grouped);
        let n_vocab = self.config.n_vocab;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(ModelError::TokenOutOfRange { token: t, n_vocab });
        }
        let pos = state.kv.len();
        let n_ctx = state.kv.n_ctx();
        if pos + tokens.len() > n_ctx {
            return Err(ModelError::ContextOverflow {
                pos,
                n_tokens: tokens.len(),
                n_ctx,
            });
        }
        let n_rows = match logits {
            Logits::None => 0,
            Logits::Last => 1,
            Logits::All => tokens.len(),
        };
        state.logits.resize(n_rows * n_vocab, 0.0);
        let ub = state.n_ubatch;
        let mut done = 0;
        while done < tokens.len() {
            let n = ub.min(tokens.len() - done);
            let chunk = &tokens[done..done + n];
            let last_chunk = done + n == tokens.len();
            let rows = match logits {
                Logits::None => OutRows::None,
                Logits::Last if last_chunk => OutRows::Last,
                Logits::Last => OutRows::None,
                Logits::All => OutRows::All(done),
            };
            self.ubatch(
                pool,
                state,
                chunk,
                rows,
                observer.as_mut().map(|o| &mut **o as &mut dyn FfnObserver),
            )?;
            done += n;
        }
        Ok(&state.logits)
    }

    fn ubatch(
        &self,
        pool: &ThreadPool,
        st: &mut ModelState,
        tokens: &[u32],
        rows: OutRows,
        mut observer: Option<&mut dyn FfnObserver>,
    ) -> Result<(), ModelError> {
        if let Some(ln) = &self.ln {
            return self.ln_ubatch(ln, pool, st, tokens, rows, observer);
        }
        let c = &self.config;
        let bytes = self.file.as_bytes();
        let n = tokens.len();
        let pos0 = st.kv.len();
        let d = c.n_embd;
        let sc = &mut st.scratch;
        sc.ensure(c, n, pool.n_threads());

        // embeddings
        let emb = &self.tok_embd;
        let rb = emb.range.len() / emb.rows;
        for (t, &tok) in tokens.iter().enumerate() {
            let start = emb.range.start + tok as usize * rb;
            let row = &bytes[start..start + rb];
            let dst = &mut sc.x[t * d..(t + 1) * d];
            powerinfer_quant::dequantize_row(emb.ty, row, dst).map_err(|e| {
                ModelError::Dequantize {
                    name: emb.name.clone(),
                    msg: e.to_string(),
                }
            })?;
            if let Some(s) = self.embd_scale {
                dst.iter_mut().for_each(|v| *v *= s);
            }
        }

        // RoPE tables for every distinct spec, one row of n_dims per token
        sc.rope_tables.clear();
        for layer in &self.layers {
            let r = layer.attn.rope;
            if !sc.rope_tables.iter().any(|(spec, _)| *spec == r) {
                let mut tab = vec![0.0f32; n * r.n_dims];
                for t in 0..n {
                    ops::rope_cache(
                        (pos0 + t) as f32,
                        r.base,
                        r.freq_scale,
                        &mut tab[t * r.n_dims..(t + 1) * r.n_dims],
                    )?;
                }
                sc.rope_tables.push((r, tab));
            }
        }

        let dense_rows = self.dense_rows(pos0..pos0 + n);
        for (il, layer) in self.layers.iter().enumerate() {
            let t0 = std::time::Instant::now();
            self.attention_block(pool, il, layer, &mut st.kv, sc, n, pos0)?;
            st.timings.attention += t0.elapsed();
            let t1 = std::time::Instant::now();
            sc.sparse.predictor_time = std::time::Duration::ZERO;
            let quality = st.quality.as_mut();
            self.ffn_block(
                pool,
                il,
                layer,
                sc,
                n,
                &dense_rows,
                quality,
                observer.as_mut().map(|o| &mut **o as &mut dyn FfnObserver),
            )?;
            let pred = sc.sparse.predictor_time;
            st.timings.predictor += pred;
            st.timings.ffn += t1.elapsed().saturating_sub(pred);
        }
        st.kv.set_len(pos0 + n);

        // output head
        let (first_row, n_out, dst_row) = match rows {
            OutRows::None => return Ok(()),
            OutRows::Last => (n - 1, 1, 0),
            OutRows::All(offset) => (0, n, offset),
        };
        for t in 0..n_out {
            let src = &sc.x[(first_row + t) * d..(first_row + t + 1) * d];
            ops::rms_norm(
                src,
                &self.output_norm,
                c.rms_eps,
                &mut sc.xn[t * d..(t + 1) * d],
            )?;
        }
        let w = self.output.matrix(bytes)?;
        sc.acts_a.quantize(w.ty, &sc.xn[..n_out * d], d, n_out)?;
        let nv = c.n_vocab;
        let out = &mut st.logits[dst_row * nv..(dst_row + n_out) * nv];
        if matches!(rows, OutRows::Last) {
            // One row alone, as a full micro-batch computes it too (whatever the grouped order
            // the part of a micro-batch set for its own tokens).
            matvec_quantized(pool, &w, &sc.acts_a, out)?;
        } else {
            mm(pool, &w, &sc.acts_a, n_out, out)?;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_block(
        &self,
        pool: &ThreadPool,
        il: usize,
        layer: &Layer,
        kv: &mut KvCache,
        sc: &mut Scratch,
        n: usize,
        pos0: usize,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let (k_dim, v_dim) = (kv.k_dim(), kv.v_dim());
        self.attn_qkv(pool, layer, sc, n)?;
        // store K, V
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
        let p = self.attn_params(layer, sc.attn_tokens.unwrap_or(n));
        let kc: &[f16] = &kv.keys(il)[..(pos0 + n) * k_dim];
        let vc: &[f16] = &kv.values(il)[..(pos0 + n) * v_dim];
        if powerinfer_cpu::flash::tiled_available(&p) {
            // Long chunks: blocks of queries against blocks of keys.
            self.attend_tiled(pool, &p, sc, n, pos0, kc, vc)?;
        } else {
            // work items: (token, group of heads); whole KV groups for prompts, single heads
            // for decode
            let heads_per_item = if n > 1 { c.n_head / c.n_head_kv } else { 1 };
            self.attend(pool, &p, sc, n, heads_per_item, |t| (kc, vc, pos0 + t))?;
        }
        self.attn_out(pool, layer, sc, n)
    }

    /// Attention norm, Q/K/V projections of `n` rows (`sc.xn` -> `sc.q`, `sc.k`, `sc.v`), biases,
    /// Q/K norms, RoPE from `sc.rope_tables` (row `t` of each table for row `t`), query scale.
    fn attn_qkv(
        &self,
        pool: &ThreadPool,
        layer: &Layer,
        sc: &mut Scratch,
        n: usize,
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
        for t in 0..n {
            ops::rms_norm(
                &sc.x[t * d..(t + 1) * d],
                &layer.attn_norm,
                c.rms_eps,
                &mut sc.xn[t * d..(t + 1) * d],
            )?;
        }
        // projections; activations quantized once per distinct weight type
        let wq = a.wq.matrix(bytes)?;
        let wk = a.wk.matrix(bytes)?;
        let wv = a.wv.matrix(bytes)?;
        let xn = &sc.xn[..n * d];
        sc.acts_a.quantize(wq.ty, xn, d, n)?;
        if n == 1 && (wv.ty == wq.ty || wv.ty == wk.ty) {
            // Decode: Q, K and V in one pool job (at most two activation types).
            if wk.ty != wq.ty {
                sc.acts_b.quantize(wk.ty, xn, d, n)?;
            }
            let ak = if wk.ty == wq.ty {
                &sc.acts_a
            } else {
                &sc.acts_b
            };
            let av = if wv.ty == wq.ty { &sc.acts_a } else { ak };
            matvec_quantized_many(
                pool,
                &mut [
                    (&wq, &sc.acts_a, &mut sc.q[..q_dim]),
                    (&wk, ak, &mut sc.k[..k_dim]),
                    (&wv, av, &mut sc.v[..v_dim]),
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
        if let Some(w) = &a.q_norm {
            ops::rms_norm_rows_inplace(&mut sc.q[..n * q_dim], w, c.rms_eps)?;
        }
        if let Some(w) = &a.k_norm {
            ops::rms_norm_rows_inplace(&mut sc.k[..n * k_dim], w, c.rms_eps)?;
        }
        let tab = &sc
            .rope_tables
            .iter()
            .find(|(s, _)| *s == a.rope)
            .expect("rope table built for every layer")
            .1;
        let nd = a.rope.n_dims;
        for t in 0..n {
            let cache = &tab[t * nd..(t + 1) * nd];
            ops::rope_apply(
                &mut sc.q[t * q_dim..(t + 1) * q_dim],
                c.head_dim_k,
                cache,
                a.rope.kind,
            )?;
            ops::rope_apply(
                &mut sc.k[t * k_dim..(t + 1) * k_dim],
                c.head_dim_k,
                cache,
                a.rope.kind,
            )?;
        }
        if a.q_scale != 1.0 {
            sc.q[..n * q_dim].iter_mut().for_each(|v| *v *= a.q_scale);
        }
        Ok(())
    }

    /// Attention settings of `layer` for a micro-batch of `n_tokens` queries.
    fn attn_params(&self, layer: &Layer, n_tokens: usize) -> AttnParams {
        let c = &self.config;
        AttnParams {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim_k: c.head_dim_k,
            head_dim_v: c.head_dim_v,
            scale: layer.attn.kq_scale,
            window: layer.attn.window,
            precision: self.attention_numerics(n_tokens),
        }
    }

    /// Whether some of this model's weight matrices have a type whose prompt products sum whole
    /// groups of 4 tokens in another order than single tokens on this CPU (Q4_K, see
    /// `powerinfer_quant::gemm::grouped_for`): then a prompt's bits also depend on where its
    /// micro-batches start ([`crate::prompt_cache`]).
    pub fn groups_prompt_products(&self) -> bool {
        self.file.tensors().iter().any(|t| {
            powerinfer_quant::kernels(t.ty)
                .is_some_and(|k| powerinfer_quant::gemm::grouped_for(k).is_some())
        })
    }

    /// The attention numerics of a micro-batch of `n_tokens` queries (1: decoding): what makes
    /// a prompt's bits depend on how it is cut into micro-batches
    /// ([`crate::prompt_cache`]).
    pub fn attention_numerics(&self, n_tokens: usize) -> AttnPrecision {
        // ggml switches to its tiled (f32) flash-attention kernel from 64 queries on
        if self.legacy_attention {
            AttnPrecision::Legacy
        } else if n_tokens >= TILED_ATTN_MIN_TOKENS {
            AttnPrecision::F32
        } else {
            AttnPrecision::F16Accumulate
        }
    }

    /// Attention of the `n` queries of a prompt chunk in `sc.q` (token `t` at position
    /// `pos0 + t`) into `sc.att` with the tiled kernel ([`powerinfer_cpu::flash`]): work items of
    /// [`TILED_ATTN_ITEM_TOKENS`] tokens and one KV group, the latest tokens (the most keys)
    /// handed out first.
    #[allow(clippy::too_many_arguments)]
    fn attend_tiled(
        &self,
        pool: &ThreadPool,
        p: &AttnParams,
        sc: &mut Scratch,
        n: usize,
        pos0: usize,
        kc: &[f16],
        vc: &[f16],
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let (q_dim, out_dim, dv) = (p.q_dim(), p.out_dim(), p.head_dim_v);
        let group = c.n_head / c.n_head_kv;
        let n_blocks = n.div_ceil(TILED_ATTN_ITEM_TOKENS);
        let n_items = n_blocks * c.n_head_kv;
        let next = AtomicUsize::new(0);
        let first_err: Mutex<Option<ops::OpsError>> = Mutex::new(None);
        let q = &sc.q[..n * q_dim];
        let out = SharedSlice::new(&mut sc.att[..n * out_dim]);
        pool.run(|_, _| {
            let mut scratch = powerinfer_cpu::flash::TiledScratch::default();
            let mut res = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n_items {
                    break;
                }
                let b = n_blocks - 1 - i / c.n_head_kv;
                let g = i % c.n_head_kv;
                let tokens = b * TILED_ATTN_ITEM_TOKENS..((b + 1) * TILED_ATTN_ITEM_TOKENS).min(n);
                res.resize(tokens.len() * group * dv, 0.0);
                let r = powerinfer_cpu::flash::attention_tiled(
                    p,
                    q,
                    pos0,
                    tokens.clone(),
                    g,
                    kc,
                    vc,
                    &mut res,
                    &mut scratch,
                );
                if let Err(e) = r {
                    first_err
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                    continue;
                }
                for (k, t) in tokens.enumerate() {
                    let at = t * out_dim + g * group * dv;
                    // SAFETY: item (block b, group g) is handed out once by the atomic counter,
                    // and its ranges (tokens of block b, the heads of group g) are disjoint from
                    // every other item's.
                    let o = unsafe { out.slice_mut(at..at + group * dv) };
                    o.copy_from_slice(&res[k * group * dv..(k + 1) * group * dv]);
                }
            }
        });
        if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e.into());
        }
        Ok(())
    }

    /// Attention of the `n` queries in `sc.q` into `sc.att`; `row(t)` gives query `t`'s keys,
    /// values (F16 rows up to at least its position) and position.
    fn attend<'k>(
        &self,
        pool: &ThreadPool,
        p: &AttnParams,
        sc: &mut Scratch,
        n: usize,
        heads_per_item: usize,
        row: impl Fn(usize) -> (&'k [f16], &'k [f16], usize) + Sync,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let q_dim = c.n_head * c.head_dim_k;
        let out_dim = c.n_head * c.head_dim_v;
        let items_per_token = c.n_head / heads_per_item;
        let n_items = n * items_per_token;
        let next = AtomicUsize::new(0);
        let first_err: Mutex<Option<ops::OpsError>> = Mutex::new(None);
        {
            let q = &sc.q[..n * q_dim];
            let out = SharedSlice::new(&mut sc.att[..n * out_dim]);
            let scr = SharedSlice::new(&mut sc.attn[..]);
            let dv = c.head_dim_v;
            pool.run(|tid, _| {
                // SAFETY: every thread of a job has a distinct `tid`, and `sc.attn` holds at least
                // `pool.n_threads()` entries (`Scratch::ensure`), so each scratch is used by one thread.
                let s = unsafe { scr.slice_mut(tid..tid + 1) };
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n_items {
                        break;
                    }
                    let t = i / items_per_token;
                    let h0 = (i % items_per_token) * heads_per_item;
                    let range = t * out_dim + h0 * dv..t * out_dim + (h0 + heads_per_item) * dv;
                    // SAFETY: items are handed out once each by the atomic counter and their output
                    // ranges (token t, heads h0..h0+heads_per_item) are disjoint.
                    let o = unsafe { out.slice_mut(range) };
                    let (kc, vc, pos) = row(t);
                    let r = ops::attention_heads(
                        p,
                        &q[t * q_dim..(t + 1) * q_dim],
                        pos,
                        kc,
                        vc,
                        h0..h0 + heads_per_item,
                        o,
                        &mut s[0],
                    );
                    if let Err(e) = r {
                        first_err
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get_or_insert(e);
                    }
                }
            });
        }
        if let Some(e) = first_err.into_inner().unwrap_or_else(|p| p.into_inner()) {
            return Err(e.into());
        }
        Ok(())
    }

    /// Output projection of `sc.att`, bias, post-norm and residual add into `sc.x`.
    fn attn_out(
        &self,
        pool: &ThreadPool,
        layer: &Layer,
        sc: &mut Scratch,
        n: usize,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let bytes = self.file.as_bytes();
        let d = c.n_embd;
        let a = &layer.attn;
        let out_dim = c.n_head * c.head_dim_v;
        let wo = a.wo.matrix(bytes)?;
        sc.acts_a
            .quantize(wo.ty, &sc.att[..n * out_dim], out_dim, n)?;
        mm(pool, &wo, &sc.acts_a, n, &mut sc.o[..n * d])?;
        add_bias(&mut sc.o[..n * d], a.bo.as_deref());
        if let Some(w) = &layer.post_attn_norm {
            ops::rms_norm_rows_inplace(&mut sc.o[..n * d], w, c.rms_eps)?;
        }
        for (x, o) in sc.x[..n * d].iter_mut().zip(&sc.o[..n * d]) {
            *x += o;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn ffn_block(
        &self,
        pool: &ThreadPool,
        il: usize,
        layer: &Layer,
        sc: &mut Scratch,
        n: usize,
        dense_rows: &[bool],
        quality: Option<&mut PredictorQuality>,
        observer: Option<&mut dyn FfnObserver>,
    ) -> Result<(), ModelError> {
        let c = &self.config;
        let bytes = self.file.as_bytes();
        let d = c.n_embd;
        for t in 0..n {
            ops::rms_norm(
                &sc.x[t * d..(t + 1) * d],
                &layer.ffn_norm,
                c.rms_eps,
                &mut sc.xn[t * d..(t + 1) * d],
            )?;
        }
        match &layer.ffn {
            Ffn::Dense(f) => {
                let ff = f.gate.rows;
                let wg = f.gate.matrix(bytes)?;
                let wu = f.up.matrix(bytes)?;
                let wd = f.down.matrix(bytes)?;
                let xn = &sc.xn[..n * d];
                sc.acts_a.quantize(wg.ty, xn, d, n)?;
                if n == 1 {
                    // Decode: gate and up in one pool job.
                    if wu.ty != wg.ty {
                        sc.acts_b.quantize(wu.ty, xn, d, n)?;
                    }
                    let au = if wu.ty == wg.ty {
                        &sc.acts_a
                    } else {
                        &sc.acts_b
                    };
                    matvec_quantized_many(
                        pool,
                        &mut [
                            (&wg, &sc.acts_a, &mut sc.gate[..ff]),
                            (&wu, au, &mut sc.up[..ff]),
                        ],
                    )?;
                } else {
                    mm(pool, &wg, &sc.acts_a, n, &mut sc.gate[..n * ff])?;
                    let acts = requant(&mut sc.acts_a, &mut sc.acts_b, wu.ty, xn, d, n)?;
                    mm(pool, &wu, acts, n, &mut sc.up[..n * ff])?;
                }
                let (g, u) = (&mut sc.gate[..n * ff], &sc.up[..n * ff]);
                match f.act {
                    Activation::Silu => ops::swiglu_inplace(g, u)?,
                    Activation::Gelu => ops::geglu_inplace(g, u)?,
                    Activation::Relu => {
                        ops::relu_inplace(g);
                        g.iter_mut().zip(u).for_each(|(a, b)| *a *= b);
                    }
                }
                if let Some(obs) = observer {
                    obs.observe(il, n, &sc.x[..n * d], &sc.gate[..n * ff]);
                }
                sc.acts_a.quantize(wd.ty, &sc.gate[..n * ff], ff, n)?;
                mm(pool, &wd, &sc.acts_a, n, &mut sc.o[..n * d])?;
            }
            Ffn::Sparse(f) => {
                let ff = f.up.rows;
                let call = sparse::SparseCall {
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
        if let Some(w) = &layer.post_ffn_norm {
            ops::rms_norm_rows_inplace(&mut sc.o[..n * d], w, c.rms_eps)?;
        }
        for (x, o) in sc.x[..n * d].iter_mut().zip(&sc.o[..n * d]) {
            *x += o;
        }
        Ok(())
    }
}

/// Quantize `x` for `ty` unless `a` already holds it for that type; returns the buffer to use.
fn requant<'b>(
    a: &'b mut ActBuffer,
    b: &'b mut ActBuffer,
    ty: GgmlType,
    x: &[f32],
    cols: usize,
    n: usize,
) -> Result<&'b ActBuffer, CpuError> {
    if a.weight_type() == Some(ty) {
        Ok(a)
    } else {
        b.quantize(ty, x, cols, n)?;
        Ok(b)
    }
}

fn mm(
    pool: &ThreadPool,
    w: &Matrix,
    acts: &ActBuffer,
    n: usize,
    y: &mut [f32],
) -> Result<(), CpuError> {
    if n == 1 && !acts.forces_grouped(1) {
        matvec_quantized(pool, w, acts, y)
    } else {
        matmul_quantized(pool, w, acts, y)
    }
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(v, bb)| *v += bb);
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum OutRows {
    None,
    Last,
    /// All rows of the micro-batch, written from this row of the output on.
    All(usize),
}

/// The mutable side of running a model: the KV cache, scratch buffers and the last logits.
#[derive(Debug)]
pub struct ModelState {
    kv: KvCache,
    n_ubatch: usize,
    scratch: Scratch,
    logits: Vec<f32>,
    quality: Option<PredictorQuality>,
    timings: OpTimings,
}

/// Time spent in the parts of the layers since the state was made (or
/// [`ModelState::reset_timings`]): wall-clock, all threads together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpTimings {
    /// Attention blocks (norm, projections, attention, output projection).
    pub attention: std::time::Duration,
    /// Predictors of sparse layers (scores and active sets).
    pub predictor: std::time::Duration,
    /// FFN blocks without their predictors.
    pub ffn: std::time::Duration,
}
impl ModelState {
    /// The KV cache.
    pub fn kv_cache(&self) -> &KvCache {
        &self.kv
    }

    /// Position of the next token (tokens processed so far).
    pub fn pos(&self) -> usize {
        self.kv.len()
    }

    /// Context size.
    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx()
    }

    /// Most tokens [`Model::forward`] computes together (longer prompts go in pieces of this
    /// many).
    pub fn n_ubatch(&self) -> usize {
        self.n_ubatch
    }

    /// Forget all positions from `pos` on (e.g. to start over, or to rewind to a prompt prefix).
    pub fn rewind(&mut self, pos: usize) {
        self.kv.truncate(pos);
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.kv.clear();
    }

    /// The logits of the last forward call.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Starts measuring the predictors against the true activations: from now on, sparse
    /// layers compute every neuron (so the output is the dense one) and record, per layer and
    /// token, how the predicted set compares with the neurons that really fired.
    pub fn measure_predictors(&mut self, n_layer: usize) {
        self.quality = Some(PredictorQuality::new(n_layer));
    }

    /// Time spent in attention, predictors and FFNs so far.
    pub fn timings(&self) -> OpTimings {
        self.timings
    }

    /// Zeroes [`timings`](Self::timings).
    pub fn reset_timings(&mut self) {
        self.timings = OpTimings::default();
    }

    /// What [`measure_predictors`](Self::measure_predictors) has recorded so far.
    pub fn predictor_quality(&self) -> Option<&PredictorQuality> {
        self.quality.as_ref()
    }
}

/// Per-call buffers, grown to the largest micro-batch seen, then reused (no allocation per
/// decoded token).
#[derive(Debug, Default)]
struct Scratch {
    n_cap: usize,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    rope_tables: Vec<(RopeSpec, Vec<f32>)>,
    acts_a: ActBuffer,
    acts_b: ActBuffer,
    attn: Vec<AttnScratch>,
    sparse: sparse::SparseBuffers,
    /// Attention output of the LayerNorm decoders (sized by them).
    ln_attn: Vec<f32>,
    /// Attention numerics as for a micro-batch of this many tokens instead of the real count
    /// ([`Model::forward_as_ubatch_of`]).
    attn_tokens: Option<usize>,
}

impl Scratch {
    fn ensure(&mut self, c: &ModelConfig, n: usize, n_threads: usize) {
        if n > self.n_cap {
            let d = c.n_embd;
            self.x = vec![0.0; n * d];
            self.xn = vec![0.0; n * d];
            self.q = vec![0.0; n * c.n_head * c.head_dim_k];
            self.k = vec![0.0; n * c.n_head_kv * c.head_dim_k];
            self.v = vec![0.0; n * c.n_head_kv * c.head_dim_v];
            self.att = vec![0.0; n * c.n_head * c.head_dim_v];
            self.o = vec![0.0; n * d];
            self.gate = vec![0.0; n * c.n_ff];
            self.up = vec![0.0; n * c.n_ff];
            self.n_cap = n;
        }
        if self.attn.len() < n_threads.max(1) {
            let p = AttnParams {
                n_head: c.n_head,
                n_head_kv: c.n_head_kv,
                head_dim_k: c.head_dim_k,
                head_dim_v: c.head_dim_v,
                scale: 1.0,
                window: None,
                precision: AttnPrecision::F16Accumulate,
            };
            self.attn
                .resize_with(n_threads.max(1), || AttnScratch::new(&p));
        }
    }
}

/// What an architecture loader produces.
pub(crate) struct Parts {
    pub config: ModelConfig,
    pub tok_embd: Weight,
    pub embd_scale: Option<f32>,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    pub output: Weight,
}

/// Tensor look-ups with shape and type checks, shared by the architecture loaders.
/// An architecture's fallbacks for optional hyper-parameter keys.
pub(crate) struct ConfigDefaults {
    /// `context_length`.
    pub n_ctx_train: usize,
    /// `attention.layer_norm_rms_epsilon`.
    pub rms_eps: f32,
    /// `rope.freq_base`.
    pub rope_base: f32,
}

pub(crate) struct Loader<'a> {
    pub file: &'a GgufFile,
}

impl Loader<'_> {
    /// The hyper-parameters every architecture reads the same way (llama.cpp's keys and
    /// defaults: head sizes default to `n_embd / n_head`, KV heads to `n_head`), checked by
    /// [`validate`]. `defaults` gives the architecture's own fallbacks for optional keys.
    pub fn config(
        &self,
        arch: Arch,
        defaults: ConfigDefaults,
        sliding_window: Option<usize>,
    ) -> Result<ModelConfig, ModelError> {
        let n_embd = self.arch_usize("embedding_length")?;
        let n_head = self.arch_usize("attention.head_count")?;
        let n_head_kv = self.arch_usize_or("attention.head_count_kv", n_head)?;
        let head_dim = n_embd.checked_div(n_head).unwrap_or(0);
        let head_dim_k = self.arch_usize_or("attention.key_length", head_dim)?;
        let head_dim_v = self.arch_usize_or("attention.value_length", head_dim)?;
        let config = ModelConfig {
            arch,
            n_vocab: self.n_vocab(n_embd)?,
            n_embd,
            n_layer: self.arch_usize("block_count")?,
            n_ff: self.arch_usize("feed_forward_length")?,
            n_head,
            n_head_kv,
            head_dim_k,
            head_dim_v,
            n_ctx_train: self.arch_usize_or("context_length", defaults.n_ctx_train)?,
            rms_eps: self.arch_f32_or("attention.layer_norm_rms_epsilon", defaults.rms_eps)?,
            rope_dims: self.arch_usize_or("rope.dimension_count", head_dim_k)?,
            rope_base: self.arch_f32_or("rope.freq_base", defaults.rope_base)?,
            rope_freq_scale: self.rope_freq_scale()?,
            sliding_window,
        };
        validate(&config)?;
        Ok(config)
    }

    pub fn has(&self, name: &str) -> bool {
        self.file.tensor(name).is_some()
    }

    fn check_shape(name: &str, expected: &[u64], found: &[u64]) -> Result<(), ModelError> {
        if expected != found {
            return Err(ModelError::TensorShape {
                name: name.into(),
                expected: expected.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    /// A matrix of `rows` rows of `cols` elements (ggml shape `[cols, rows]`) usable in products.
    pub fn matrix(&self, name: &str, cols: usize, rows: usize) -> Result<Weight, ModelError> {
        let w = self.raw_matrix(name, cols, rows)?;
        if powerinfer_quant::kernels(w.ty).is_none() {
            return Err(ModelError::UnsupportedTensorType {
                name: name.into(),
                ty: w.ty,
                why: "no dot-product kernels",
            });
        }
        Ok(w)
    }

    /// Like [`matrix`](Self::matrix) but only needs row dequantization (embedding tables).
    pub fn raw_matrix(&self, name: &str, cols: usize, rows: usize) -> Result<Weight, ModelError> {
        let t = self
            .file
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        Self::check_shape(name, &[cols as u64, rows as u64], &t.shape)?;
        let start = usize::try_from(t.offset)
            .map_err(|_| ModelError::InvalidConfig(format!("{name}: offset")))?;
        let len = usize::try_from(t.size)
            .map_err(|_| ModelError::InvalidConfig(format!("{name}: size")))?;
        let row =
            powerinfer_quant::row_bytes(t.ty, cols).ok_or(ModelError::UnsupportedTensorType {
                name: name.into(),
                ty: t.ty,
                why: "not a block type with whole blocks per row",
            })?;
        if row * rows != len {
            return Err(ModelError::InvalidConfig(format!(
                "{name}: {len} bytes for {rows} rows of {row}"
            )));
        }
        Ok(Weight {
            name: name.into(),
            ty: t.ty,
            rows,
            cols,
            range: start..start + len,
        })
    }

    /// A 1-D f32 vector of `n` elements (F32, F16 or BF16 in the file), copied.
    pub fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>, ModelError> {
        let t = self
            .file
            .tensor(name)
            .ok_or_else(|| ModelError::MissingTensor(name.into()))?;
        Self::check_shape(name, &[n as u64], &t.shape)?;
        if !matches!(t.ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) {
            return Err(ModelError::UnsupportedTensorType {
                name: name.into(),
                ty: t.ty,
                why: "norm/bias vectors must be F32, F16 or BF16",
            });
        }
        let mut out = vec![0.0; n];
        powerinfer_quant::dequantize_row(t.ty, self.file.tensor_data(t), &mut out).map_err(
            |e| ModelError::Dequantize {
                name: name.into(),
                msg: e.to_string(),
            },
        )?;
        Ok(out)
    }

    pub fn opt_vector(&self, name: &str, n: usize) -> Result<Option<Vec<f32>>, ModelError> {
        if self.has(name) {
            self.vector(name, n).map(Some)
        } else {
            Ok(None)
        }
    }

    /// `{arch}.{suffix}` as usize.
    pub fn arch_usize(&self, suffix: &str) -> Result<usize, ModelError> {
        Ok(self.file.get_arch_u32(suffix)? as usize)
    }

    /// `{arch}.{suffix}` as usize, or `default` when absent.
    pub fn arch_usize_or(&self, suffix: &str, default: usize) -> Result<usize, ModelError> {
        if self.file.get(&self.file.arch_key(suffix)).is_none() {
            return Ok(default);
        }
        self.arch_usize(suffix)
    }

    /// `{arch}.{suffix}` as f32, or `default` when absent.
    pub fn arch_f32_or(&self, suffix: &str, default: f32) -> Result<f32, ModelError> {
        if self.file.get(&self.file.arch_key(suffix)).is_none() {
            return Ok(default);
        }
        Ok(self.file.get_arch_f32(suffix)?)
    }

    /// Vocabulary size: rows of `token_embd.weight`.
    pub fn n_vocab(&self, n_embd: usize) -> Result<usize, ModelError> {
        let t = self
            .file
            .tensor("token_embd.weight")
            .ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        match t.shape.as_slice() {
            [c, r] if *c == n_embd as u64 => Ok(*r as usize),
            other => Err(ModelError::TensorShape {
                name: "token_embd.weight".into(),
                expected: vec![n_embd as u64, 0],
                found: other.to_vec(),
            }),
        }
    }

    /// RoPE linear scaling: `1/factor` when `{arch}.rope.scaling.type` is `linear` (or absent with
    /// a factor given), else 1.
    pub fn rope_freq_scale(&self) -> Result<f32, ModelError> {
        let ty = self.file.get_arch_str("rope.scaling.type").ok();
        let factor = self.arch_f32_or("rope.scaling.factor", 0.0)?;
        match ty {
            None | Some("linear") if factor > 0.0 => Ok(1.0 / factor),
            None | Some("none") | Some("linear") => Ok(1.0),
            Some(other) => Err(ModelError::InvalidConfig(format!(
                "RoPE scaling type {other:?} is not supported"
            ))),
        }
    }
}

/// Checks shared by the loaders.
pub(crate) fn validate(c: &ModelConfig) -> Result<(), ModelError> {
    let bad = |m: String| Err(ModelError::InvalidConfig(m));
    if c.n_layer == 0 || c.n_embd == 0 || c.n_ff == 0 || c.n_vocab == 0 {
        return bad(format!("zero size: {c:?}"));
    }
    if c.n_head == 0 || c.n_head_kv == 0 || !c.n_head.is_multiple_of(c.n_head_kv) {
        return bad(format!("head counts {} / {} (kv)", c.n_head, c.n_head_kv));
    }
    if c.head_dim_k == 0
        || c.head_dim_v == 0
        || c.rope_dims > c.head_dim_k
        || !c.rope_dims.is_multiple_of(2)
        || c.rope_dims == 0
    {
        return bad(format!(
            "head dims {} / {}, rope dims {}",
            c.head_dim_k, c.head_dim_v, c.rope_dims
        ));
    }
    let eps_ok = c.rms_eps.is_finite() && c.rms_eps >= 0.0;
    let base_ok = c.rope_base.is_finite() && c.rope_base > 0.0;
    if !eps_ok || !base_ok {
        return bad(format!("rms eps {} / rope base {}", c.rms_eps, c.rope_base));
    }
    if c.sliding_window == Some(0) {
        return bad("sliding window of 0".into());
    }
    Ok(())
}
