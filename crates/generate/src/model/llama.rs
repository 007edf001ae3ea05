//! `llama`: LLaMA-family decoders (LLaMA 1/2, SmolLM2, and Mistral/Qwen2-style files stored as
//! `llama`): RMS norm, RoPE with adjacent pairs, SwiGLU FFN; optional q/k/v/o biases; output head
//! tied to the embedding when `output.weight` is absent.

use powerinfer_cpu::ops::RopeKind;
use powerinfer_gguf::GgufFile;

use powerinfer_cpu::sparse::{self, FfnKind};

use super::{Activation, Arch, Attention, ConfigDefaults, Layer, Loader, Parts, RopeSpec};
use crate::error::ModelError;

/// Loads a `llama` file (dense GGUF or sparse PowerInfer), or a `bamboo` PowerInfer file
/// (`arch`: the same tensors with a dReLU FFN).
pub(crate) fn load(file: &GgufFile, arch: Arch) -> Result<Parts, ModelError> {
    let l = Loader { file };
    if l.has("rope_freqs.weight") {
        return Err(ModelError::InvalidConfig(
            "per-dimension RoPE frequency factors (rope_freqs.weight, Llama 3.1 style) are not supported".into(),
        ));
    }
    let defaults = ConfigDefaults {
        n_ctx_train: 2048,
        rms_eps: 1e-5,
        rope_base: 10000.0,
    };
    let config = l.config(arch, defaults, None)?;
    let c = &config;
    // PowerInfer's `llama` files are ReLU models (ReluLLaMA, ProSparse) unless ours name another
    // activation; `bamboo` is dReLU.
    let sparse_kind = match arch {
        Arch::Bamboo => FfnKind::DRelu,
        _ => FfnKind::Gated(sparse::Activation::Relu),
    };
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
    let kq_scale = match l.arch_f32_or("attention.scale", 0.0)? {
        s if s > 0.0 => s,
        _ => 1.0 / (c.head_dim_k as f32).sqrt(),
    };
    let (q_dim, k_dim, v_dim) = (
        c.n_head * c.head_dim_k,
        c.n_head_kv * c.head_dim_k,
        c.n_head_kv * c.head_dim_v,
    );
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        let attn = Attention {
            wq: l.matrix(&p("attn_q.weight"), c.n_embd, q_dim)?,
            wk: l.matrix(&p("attn_k.weight"), c.n_embd, k_dim)?,
            wv: l.matrix(&p("attn_v.weight"), c.n_embd, v_dim)?,
            wo: l.matrix(&p("attn_output.weight"), c.n_head * c.head_dim_v, c.n_embd)?,
            bq: l.opt_vector(&p("attn_q.bias"), q_dim)?,
            bk: l.opt_vector(&p("attn_k.bias"), k_dim)?,
            bv: l.opt_vector(&p("attn_v.bias"), v_dim)?,
            bo: l.opt_vector(&p("attn_output.bias"), c.n_embd)?,
            q_norm: None,
            k_norm: None,
            rope: RopeSpec {
                kind: RopeKind::Normal,
                n_dims: c.rope_dims,
                base: c.rope_base,
                freq_scale: c.rope_freq_scale,
            },
            q_scale: 1.0,
            kq_scale,
            window: None,
        };
        let ffn = super::sparse::load_gated_ffn(
            &l,
            i,
            c,
            Activation::Silu,
            sparse_kind,
            &thresholds,
            activity.as_deref(),
        )?;
        layers.push(Layer {
            attn_norm: l.vector(&p("attn_norm.weight"), c.n_embd)?,
            attn,
            post_attn_norm: None,
            ffn_norm: l.vector(&p("ffn_norm.weight"), c.n_embd)?,
            ffn,
            post_ffn_norm: None,
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
        config,
        tok_embd,
        embd_scale: None,
        layers,
        output,
    })
}
