//! ggml block quantization formats.
