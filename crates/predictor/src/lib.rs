//! Activation-sparsity neuron predictors (PowerInfer's per-layer MLP predictors).
//!
//! PowerInfer decides, per layer and per token, which FFN neurons to compute with a small
//! two-layer MLP on the FFN's input: `p = fc2 · relu(fc1 · x)` (no biases, no sigmoid); neuron `i`
//! is computed iff `p[i] >= threshold`, every other neuron contributes exactly zero.
//!
//! - [`Predictor`]: one layer's `fc1` (`H x n_embd`) and `fc2` (`n_ff x H`), of any weight type
//!   `powerinfer-quant` computes, borrowed from a model file or owned; [`Predictor::predict`]
//!   fills the sorted active set, [`reference_predict`] is its scalar reference.
//! - [`load_predictors`] / [`load_layer`]: `blk.N.fc1.weight` / `blk.N.fc2.weight` from a
//!   [`GgufFile`](powerinfer_gguf::GgufFile), with shape checks.
//! - [`resolve_threshold`]: CLI > `LLAMA_SPARSE_PRED_THRESHOLD` > file > `0.0`.
//! - [`PredictorQuality`]: per-layer true/false positives and false negatives against true
//!   activations, recall, precision and a printable table.

mod load;
mod predictor;
pub mod profile;
mod quality;
mod threshold;
pub mod train;

pub use load::{LoadError, file_threshold, load_layer, load_predictors, load_predictors_auto};
pub use predictor::{
    Predictor, PredictorError, PredictorScratch, Weights, reference_predict, reference_scores,
};
pub use quality::{LayerCounts, PredictorQuality, QualityError};
pub use threshold::{
    THRESHOLD_ENV, Threshold, ThresholdError, ThresholdSource, resolve_threshold,
    resolve_threshold_from_env,
};
