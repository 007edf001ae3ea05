//! `gemma3`: Gemma 3 text decoders, as llama.cpp runs them: embeddings scaled by
//! `sqrt(n_embd)`, per-head RMS QK-norm, NEOX RoPE, post-attention and post-FFN norms, GeGLU with
//! ggml's table GELU, tied output head, and sliding-window attention on 5 of every 6 layers
//! (layer `il` is global iff `(il + 1) % 6 == 0`; local layers use RoPE base 10000, global ones
//! `rope.freq_base` and the file's linear RoPE scaling). The GGUF norm weights already include
//! Gemma's `+1`.

use powerinfer_cpu::ops::RopeKind;
use powerinfer_gguf::GgufFile;

use super::{
    Activation, Attention, DenseFfn, Ffn, Layer, Loader, ModelConfig, Parts, RopeSpec, validate,
};
use crate::error::ModelError;

/// Every `SWA_PATTERN`-th layer is global.
const SWA_PATTERN: usize = 6;
/// RoPE base of the local (sliding-window) layers.
const ROPE_BASE_LOCAL: f32 = 10000.0;

pub(crate) fn load(file: &GgufFile) -> Result<Parts, ModelError> {
    let l = Loader { file };
    let n_embd = l.arch_usize("embedding_length")?;
    let n_head = l.arch_usize("attention.head_count")?;
    let n_head_kv = l.arch_usize_or("attention.head_count_kv", n_head)?;
    let head_dim_k = l.arch_usize_or("attention.key_length", n_embd / n_head.max(1))?;
    let head_dim_v = l.arch_usize_or("attention.value_length", head_dim_k)?;
    let window = l.arch_usize_or("attention.sliding_window", 0)?;
    let config = ModelConfig {
        arch: super::Arch::Gemma3,
        n_vocab: l.n_vocab(n_embd)?,
        n_embd,
        n_layer: l.arch_usize("block_count")?,
        n_ff: l.arch_usize("feed_forward_length")?,
        n_head,
        n_head_kv,
        head_dim_k,
        head_dim_v,
        n_ctx_train: l.arch_usize_or("context_length", 32768)?,
        rms_eps: l.arch_f32_or("attention.layer_norm_rms_epsilon", 1e-6)?,
        rope_dims: l.arch_usize_or("rope.dimension_count", head_dim_k)?,
        rope_base: l.arch_f32_or("rope.freq_base", 1e6)?,
        rope_freq_scale: l.rope_freq_scale()?,
        sliding_window: (window > 0).then_some(window),
    };
    validate(&config)?;
    let c = &config;
    // llama.cpp: 1/sqrt(query_pre_attn_scalar) = 1/sqrt(head_dim) (27B: 1/sqrt(n_embd/n_head)),
    // applied to Q before attention; the score scale is then 1.
    let q_scale = 1.0 / (c.head_dim_k as f32).sqrt();
    let (q_dim, k_dim, v_dim) = (
        c.n_head * c.head_dim_k,
        c.n_head_kv * c.head_dim_k,
        c.n_head_kv * c.head_dim_v,
    );
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        let global = (i + 1) % SWA_PATTERN == 0 || c.sliding_window.is_none();
        let rope = if global {
            RopeSpec {
                kind: RopeKind::Neox,
                n_dims: c.rope_dims,
                base: c.rope_base,
                freq_scale: c.rope_freq_scale,
            }
        } else {
            RopeSpec {
                kind: RopeKind::Neox,
                n_dims: c.rope_dims,
                base: ROPE_BASE_LOCAL,
                freq_scale: 1.0,
            }
        };
        let attn = Attention {
            wq: l.matrix(&p("attn_q.weight"), c.n_embd, q_dim)?,
            wk: l.matrix(&p("attn_k.weight"), c.n_embd, k_dim)?,
            wv: l.matrix(&p("attn_v.weight"), c.n_embd, v_dim)?,
            wo: l.matrix(&p("attn_output.weight"), c.n_head * c.head_dim_v, c.n_embd)?,
            bq: None,
            bk: None,
            bv: None,
            bo: None,
            q_norm: Some(l.vector(&p("attn_q_norm.weight"), c.head_dim_k)?),
            k_norm: Some(l.vector(&p("attn_k_norm.weight"), c.head_dim_k)?),
            rope,
            q_scale,
            kq_scale: 1.0,
            window: if global { None } else { c.sliding_window },
        };
        let ffn = Ffn::Dense(DenseFfn {
            gate: l.matrix(&p("ffn_gate.weight"), c.n_embd, c.n_ff)?,
            up: l.matrix(&p("ffn_up.weight"), c.n_embd, c.n_ff)?,
            down: l.matrix(&p("ffn_down.weight"), c.n_ff, c.n_embd)?,
            act: Activation::Gelu,
        });
        layers.push(Layer {
            attn_norm: l.vector(&p("attn_norm.weight"), c.n_embd)?,
            attn,
            post_attn_norm: Some(l.vector(&p("post_attention_norm.weight"), c.n_embd)?),
            ffn_norm: l.vector(&p("ffn_norm.weight"), c.n_embd)?,
            ffn,
            post_ffn_norm: Some(l.vector(&p("post_ffw_norm.weight"), c.n_embd)?),
        });
    }
    let tok_embd = l.raw_matrix("token_embd.weight", c.n_embd, c.n_vocab)?;
    let output = if l.has("output.weight") {
        l.matrix("output.weight", c.n_embd, c.n_vocab)?
    } else {
        l.matrix("token_embd.weight", c.n_embd, c.n_vocab)?
    };
    Ok(Parts {
        output_norm: l.vector("output_norm.weight", c.n_embd)?,
        embd_scale: Some((c.n_embd as f32).sqrt()),
        config,
        tok_embd,
        layers,
        output,
    })
}
