//! CUDA operators for powerinfer, compiled at run time by NVRTC and driven through `cudarc`
//! with dynamic loading: the crate builds, links and passes its tests on machines without any
//! CUDA, and every GPU entry point reports a missing driver, NVRTC or device as a typed
//! [`CudaError`] instead of panicking.
//!
//! - [`Gpu`] (feature `cuda`, on by default): one device, every kernel family compiled for its
//!   `sm_XX`, the operators: dense quantized [`Gpu::matvec`] (F32, F16, Q4_0, Q8_0, Q4_K, Q6_K
//!   weights, f32 activations), the predictor [`Gpu::predictor`], the sparse FFN operators
//!   [`Gpu::sparse_matvec`] / [`Gpu::sparse_axpy`] over compact hot-neuron matrices, [`Gpu::rms_norm`],
//!   [`Gpu::rope`], [`Gpu::glu`], decode [`Gpu::attention`] over an F16 KV cache.
//! - [`VramAccountant`]: every device allocation reserves its bytes against a budget first.
//! - [`kernels`]: the CUDA C++ sources (`kernels/*.cu`), usable without the feature.
//! - [`nvrtc`] (feature `cuda`): finding NVRTC and compiling the kernels without a GPU.
//!
//! Nothing here has run on a GPU yet: see the README.

mod error;
pub mod kernels;
mod vram;

#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
pub mod nvrtc;

pub use error::CudaError;
pub use half::f16;
pub use kernels::{FAMILIES, GPU_TYPES, KernelFamily};
pub use powerinfer_gguf::GgmlType;
pub use vram::{Reservation, VramAccountant};

#[cfg(feature = "cuda")]
pub use gpu::{
    Activation, AttnShape, DeviceBucket, DeviceBuffer, DeviceKvCache, DeviceMatrix, DeviceVec, Gpu,
    RopeKind,
};
