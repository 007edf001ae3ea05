//! The crate's error type.

use powerinfer_gguf::GgmlType;
use std::path::PathBuf;

/// Everything that can go wrong on the GPU side; no entry point of this crate panics on a missing
/// library, a missing device, an allocation failure or a bad shape.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The crate was built without its `cuda` feature.
    #[error("powerinfer-cuda was built without its `cuda` feature: no GPU support")]
    NotCompiled,
    /// `libcuda.so` could not be opened: no NVIDIA driver on this machine.
    #[error("the CUDA driver library (libcuda.so) was not found: no NVIDIA driver on this machine")]
    NoDriver,
    /// `libnvrtc.so.13` could not be opened.
    #[error(
        "the NVRTC library (libnvrtc.so.13) was not found: put its directory on LD_LIBRARY_PATH \
         or set POWERINFER_NVRTC_LIB to the library or its directory"
    )]
    NoNvrtc,
    /// An explicitly named NVRTC library could not be loaded.
    #[error("could not load NVRTC from {path}: {msg}")]
    NvrtcLoad {
        /// The file or directory tried.
        path: PathBuf,
        /// Why it failed.
        msg: String,
    },
    /// The driver reports no device with this ordinal.
    #[error("no CUDA device with ordinal {ordinal} ({count} found)")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: usize,
        /// Devices present.
        count: usize,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver call failed ({what}): {msg}")]
    Driver {
        /// What was being done.
        what: &'static str,
        /// The driver's error name and description.
        msg: String,
    },
    /// The device could not allocate memory.
    #[error("device out of memory allocating {bytes} bytes for {what}")]
    OutOfMemory {
        /// What the allocation was for.
        what: &'static str,
        /// Bytes asked for.
        bytes: u64,
    },
    /// The VRAM accountant refused an allocation that would exceed the budget.
    #[error(
        "VRAM budget exceeded: {what} needs {requested} bytes, {used} of {budget} bytes already in use"
    )]
    Budget {
        /// What the allocation was for.
        what: &'static str,
        /// Bytes asked for.
        requested: u64,
        /// Bytes already reserved.
        used: u64,
        /// The budget.
        budget: u64,
    },
    /// NVRTC rejected a kernel family's source; `log` is NVRTC's program log.
    #[error("NVRTC failed to compile kernel family `{family}` for {arch}: {msg}\n{log}")]
    Compile {
        /// The kernel family (file under `kernels/`).
        family: &'static str,
        /// The target, e.g. `sm_90`.
        arch: String,
        /// NVRTC's error code.
        msg: String,
        /// NVRTC's program log.
        log: String,
    },
    /// Loading a compiled module or finding a kernel in it failed.
    #[error("could not load kernel `{kernel}`: {msg}")]
    Load {
        /// Kernel or family name.
        kernel: String,
        /// The driver's message.
        msg: String,
    },
    /// A kernel launch (or the work it queued, seen at the next synchronisation) failed.
    #[error("kernel `{kernel}` failed: {msg}")]
    Launch {
        /// Kernel name.
        kernel: &'static str,
        /// The driver's message.
        msg: String,
    },
    /// Arguments of the wrong length or shape.
    #[error("{op}: {msg}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What does not fit.
        msg: String,
    },
    /// A weight type without a GPU kernel.
    #[error(
        "{op}: weight type {ty:?} has no GPU kernel (supported: F32, F16, Q4_0, Q8_0, Q4_K, Q6_K)"
    )]
    UnsupportedType {
        /// The operation.
        op: &'static str,
        /// The type.
        ty: GgmlType,
    },
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn shape(op: &'static str, msg: impl Into<String>) -> CudaError {
    CudaError::Shape {
        op,
        msg: msg.into(),
    }
}
