//! Model architectures and the generation loop.
//!
//! - [`model`]: GGUF models ([`Model`]) and their dense forward pass over a [`ModelState`]
//!   (KV cache + buffers): `llama` and `gemma3`.
//! - [`kv_cache`]: the F16 [`KvCache`].
//! - [`perplexity`](mod@perplexity): llama.cpp-compatible perplexity.
//! - [`error`](mod@error): [`ModelError`].

pub mod batch;
pub mod chat;
pub mod error;
pub mod generation;
pub mod kv_cache;
pub mod model;
pub mod perplexity;
pub mod profile;
pub mod prompt_cache;
pub mod pwri;
pub mod sampling;
pub mod tokenizer;

pub use error::ModelError;
pub use kv_cache::KvCache;
pub use model::{Arch, Logits, Model, ModelConfig, ModelState};
pub use perplexity::{Perplexity, perplexity};
