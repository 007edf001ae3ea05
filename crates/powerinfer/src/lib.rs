//! powerinfer: activation-sparse LLM inference.
