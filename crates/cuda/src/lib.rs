//! CUDA operators for powerinfer.
//!
//! Not implemented yet: this crate reserves its place in the workspace and exports nothing.
//! See the crate README for what it will hold.
