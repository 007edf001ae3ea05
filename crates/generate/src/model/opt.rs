//! `opt`: Meta's OPT decoders (pre-norm: every size but 350M), as the Hugging Face model
//! computes them: learned absolute position embeddings (row `pos + 2` of `position_embd`, OPT's
//! offset), LayerNorm with bias (`opt.attention.layer_norm_epsilon`, 1e-5 when absent), biased
//! Q/K/V/output projections, no RoPE, scores scaled by `1/sqrt(head_dim)`, sequential residual
//! blocks and the FFN `down(relu(up·x + b_up)) + b_down`; output head tied to the embedding when
//! `output.weight` is absent.
//!
//! Dense files hold `ffn_down`; PowerInfer files `ffn_down_t` (its bias named
//! `ffn_down_t.bias`, as the reference's converter renames every `ffn_down` tensor) and the
//! predictors `fc1`/`fc2`, which read the residual stream before the FFN norm.

use powerinfer_gguf::GgufFile;

use super::falcon::{
    LayerNorm, LnAttention, LnFfn, LnLayer, LnModel, PlainFfn, PositionEmbedding, SparseSetup,
    check_eps, ln_parts,
};
use super::sparse as model_sparse;
use super::{Activation, Arch, ConfigDefaults, Loader, Parts};
use crate::error::ModelError;

/// Rows of `position_embd` before position 0.
pub const POSITION_OFFSET: usize = 2;

/// The learned position table.
const POSITION_EMBD: &str = "position_embd.weight";

/// Rows of the position table (more than [`POSITION_OFFSET`]); `n_ctx` (the file's context
/// length, which the reference writes as the number of rows) for the error message.
fn position_rows(l: &Loader, n_embd: usize, n_ctx: usize) -> Result<usize, ModelError> {
    let t = l
        .file
        .tensor(POSITION_EMBD)
        .ok_or_else(|| ModelError::MissingTensor(POSITION_EMBD.into()))?;
    match t.shape.as_slice() {
        [cols, rows] if *cols == n_embd as u64 && *rows > POSITION_OFFSET as u64 => {
            Ok(*rows as usize)
        }
        other => Err(ModelError::TensorShape {
            name: POSITION_EMBD.into(),
            expected: vec![n_embd as u64, n_ctx as u64],
            found: other.to_vec(),
        }),
    }
}

/// Loads an `opt` file (dense GGUF, or a PowerInfer file with predictors).
pub(crate) fn load(file: &GgufFile) -> Result<(Parts, LnModel), ModelError> {
    let l = Loader { file };
    let defaults = ConfigDefaults {
        n_ctx_train: 2048,
        rms_eps: 1e-5,
        rope_base: 10000.0,
    };
    let mut config = l.config(Arch::Opt, defaults, None)?;
    config.rms_eps = l.arch_f32_or("attention.layer_norm_epsilon", 1e-5)?;
    check_eps(config.rms_eps)?;
    let n_pos = position_rows(&l, config.n_embd, config.n_ctx_train)?;
    // The reference's converter writes the table's rows (2050) as the context length; the
    // model sees `rows - 2` positions.
    config.n_ctx_train = config.n_ctx_train.min(n_pos - POSITION_OFFSET);
    let c = &config;
    let sparse = SparseSetup::read(file, c.n_layer)?;
    let (q_dim, k_dim, v_dim) = (
        c.n_head * c.head_dim_k,
        c.n_head_kv * c.head_dim_k,
        c.n_head_kv * c.head_dim_v,
    );
    let positions = PositionEmbedding {
        table: l.raw_matrix(POSITION_EMBD, c.n_embd, n_pos)?,
        offset: POSITION_OFFSET,
    };
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let p = |s: &str| format!("blk.{i}.{s}");
        let attn = LnAttention {
            wq: l.matrix(&p("attn_q.weight"), c.n_embd, q_dim)?,
            wk: l.matrix(&p("attn_k.weight"), c.n_embd, k_dim)?,
            wv: l.matrix(&p("attn_v.weight"), c.n_embd, v_dim)?,
            wo: l.matrix(&p("attn_output.weight"), c.n_head * c.head_dim_v, c.n_embd)?,
            bq: Some(l.vector(&p("attn_q.bias"), q_dim)?),
            bk: Some(l.vector(&p("attn_k.bias"), k_dim)?),
            bv: Some(l.vector(&p("attn_v.bias"), v_dim)?),
            bo: Some(l.vector(&p("attn_output.bias"), c.n_embd)?),
        };
        let ffn = match &sparse {
            Some(s) => LnFfn::Sparse(Box::new(model_sparse::load_ungated_sparse_ffn(
                &l,
                i,
                c,
                true,
                &s.thresholds,
                s.activity.as_deref(),
            )?)),
            None => LnFfn::Dense(PlainFfn {
                up: l.matrix(&p("ffn_up.weight"), c.n_embd, c.n_ff)?,
                up_bias: Some(l.vector(&p("ffn_up.bias"), c.n_ff)?),
                down: l.matrix(&p("ffn_down.weight"), c.n_ff, c.n_embd)?,
                down_bias: Some(l.vector(&p("ffn_down.bias"), c.n_embd)?),
                act: Activation::Relu,
            }),
        };
        layers.push(LnLayer {
            attn_norm: LayerNorm::load(&l, &p("attn_norm"), c.n_embd)?,
            ffn_norm: Some(LayerNorm::load(&l, &p("ffn_norm"), c.n_embd)?),
            attn,
            ffn,
        });
    }
    let ln = LnModel {
        eps: c.rms_eps,
        parallel: false,
        rope: None,
        kq_scale: 1.0 / (c.head_dim_k as f32).sqrt(),
        positions: Some(positions),
        layers,
        output_norm: LayerNorm::load(&l, "output_norm", c.n_embd)?,
    };
    let parts = ln_parts(&l, config, &ln)?;
    Ok((parts, ln))
}
