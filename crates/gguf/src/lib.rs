//! GGUF and PowerInfer (`PWRI`) model files.
//!
//! - [`types`]: ggml element types, their ids in both numberings, and block geometry.

pub mod types;

pub use types::{GgmlType, Magic};
