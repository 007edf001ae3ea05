//! `gemma3`: Gemma 3 text decoders, as llama.cpp runs them: embeddings scaled by
//! `sqrt(n_embd)`, per-head RMS QK-norm, NEOX RoPE, post-attention and post-FFN norms, GeGLU with
//! ggml's table GELU, tied output head, and sliding-window attention on 5 of every 6 layers
//! (layer `il` is global iff `(il + 1) % 6 == 0`; local layers use RoPE base 10000, global ones
//! `rope.freq_base` and the file's linear RoPE scaling). The GGUF norm weights already include
//! Gemma's `+1`.

use powerinfer_cpu::ops::RopeKind;
use powerinfer_gguf::GgufFile;

use powerinfer_cpu::sparse::{self, FfnKind};

use super::{Activation, Attention, ConfigDefaults, Layer, Loader, Parts, RopeSpec};
use crate::error::ModelError;

/// Every `SWA_PATTERN`-th layer is global.
const SWA_PATTERN: usize = 6;
/// RoPE base of the local (sliding-window) layers.
const ROPE_BASE_LOCAL: f32 = 10000.0;

pub(crate) fn load(file: &GgufFile) -> Result<Parts, ModelError> {
    let l = Loader { file };
    let window = l.arch_usize_or("attention.sliding_window", 0)?;
    let defaults = ConfigDefaults {
        n_ctx_train: 32768,
        rms_eps: 1e-6,
        rope_base: 1e6,
    };
    let config = l.config(
        super::Arch::Gemma3,
        defaults,
        (window > 0).then_some(window),
    )?;
    let c = &config;
    let sparse_file = file.magic() == powerinfer_gguf::Magic::Pwri;
    let thresholds = if sparse_file {
        super::sparse::layer_thresholds(file, c.n_layer)?
    } else {
        Vec::new()
    };
    let activity = if sparse_file {
        super::sparse::activity_thresholds(file, c.n_layer)?
    } else {
        None
    };
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
        let ffn = super::sparse::load_gated_ffn(
            &l,
            i,
            c,
            Activation::Gelu,
            FfnKind::Gated(sparse::Activation::Gelu),
            &thresholds,
            activity.as_deref(),
        )?;
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
