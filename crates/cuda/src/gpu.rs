//! The device: context, compiled kernels, device buffers and the operators.

use crate::CudaError;
use crate::error::shape;
use crate::kernels::{FAMILIES, arch_name, type_suffix};
use crate::nvrtc::{compile_family_cached, ensure_nvrtc};
use crate::vram::{Reservation, VramAccountant};
use cudarc::driver::sys::CUresult;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, DriverError, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use half::f16;
use powerinfer_gguf::GgmlType;
use std::collections::HashMap;
use std::sync::Arc;

/// Threads per block of the one-warp-per-row matvec kernels (4 rows per block).
const MATVEC_BLOCK: u32 = 128;
/// Threads per block of the elementwise kernels.
const ELEM_BLOCK: u32 = 256;
/// Compact rows per chunk of the sparse axpy's first phase.
const AXPY_CHUNK_ROWS: usize = 64;
/// Threads per block of the attention kernel (a power of two, a multiple of 32).
const ATTN_BLOCK: u32 = 128;
/// Threads per block of RMS norm (a power of two).
const NORM_BLOCK: u32 = 256;

fn driver(what: &'static str) -> impl Fn(DriverError) -> CudaError {
    move |e| CudaError::Driver {
        what,
        msg: e.to_string(),
    }
}

fn alloc_err(what: &'static str, bytes: u64) -> impl Fn(DriverError) -> CudaError {
    move |e| {
        if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
            CudaError::OutOfMemory { what, bytes }
        } else {
            CudaError::Driver {
                what,
                msg: e.to_string(),
            }
        }
    }
}

fn launch_err(kernel: &'static str) -> impl Fn(DriverError) -> CudaError {
    move |e| CudaError::Launch {
        kernel,
        msg: e.to_string(),
    }
}

fn to_i32(op: &'static str, what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| shape(op, format!("{what} {v} exceeds i32::MAX")))
}

/// Device memory of `T`, its bytes held against the [`Gpu`]'s VRAM budget.
#[derive(Debug)]
pub struct DeviceBuffer<T> {
    buf: CudaSlice<T>,
    _res: Reservation,
}

impl<T> DeviceBuffer<T> {
    /// Elements.
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    /// Whether it holds no elements.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == 0
    }
    /// The underlying cudarc slice (to launch kernels of one's own).
    pub fn slice(&self) -> &CudaSlice<T> {
        &self.buf
    }
}

/// An f32 vector on the device.
pub type DeviceVec = DeviceBuffer<f32>;

/// A ggml weight matrix on the device: `rows` rows of `cols` elements of type `ty`, each row
/// `row_bytes` bytes, stored exactly as in the GGUF file.
#[derive(Debug)]
pub struct DeviceMatrix {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    data: DeviceBuffer<u8>,
}

impl DeviceMatrix {
    /// Weight type.
    pub fn ty(&self) -> GgmlType {
        self.ty
    }
    /// Rows (output length of a matvec).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Columns (input length of a matvec).
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.row_bytes
    }
    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

/// The original neuron ids of a compact hot-neuron matrix's rows (a `.gpuidx` `gpu_bucket`):
/// compact row `j` is neuron `ids[j]` of a layer with `n_ff` neurons.
#[derive(Debug)]
pub struct DeviceBucket {
    ids: DeviceBuffer<i32>,
    n_ff: usize,
}

impl DeviceBucket {
    /// Compact rows.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// Whether it holds no rows.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
    /// Neurons of the layer (the length the score vector must have).
    pub fn n_ff(&self) -> usize {
        self.n_ff
    }
}

/// A per-layer F16 KV cache on the device: `n_ctx` rows of `k_dim` key values and of `v_dim`
/// value values.
#[derive(Debug)]
pub struct DeviceKvCache {
    k: DeviceBuffer<u16>,
    v: DeviceBuffer<u16>,
    n_ctx: usize,
    k_dim: usize,
    v_dim: usize,
}

impl DeviceKvCache {
    /// Positions it can hold.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }
    /// Values per key row (`n_head_kv * head_dim_k`).
    pub fn k_dim(&self) -> usize {
        self.k_dim
    }
    /// Values per value row (`n_head_kv * head_dim_v`).
    pub fn v_dim(&self) -> usize {
        self.v_dim
    }
}

/// Which dimensions RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeKind {
    /// Adjacent pairs `(2i, 2i+1)` (llama.cpp NORM, LLaMA).
    Normal,
    /// Split halves `(i, i + n_dims/2)` (llama.cpp NEOX: Gemma, Qwen).
    Neox,
}

/// The activation of a gated FFN ([`Gpu::glu`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(x)` (SwiGLU).
    Silu,
    /// GELU, tanh approximation, evaluated in f32 (GeGLU).
    Gelu,
    /// `max(x, 0)` (ReLU models, PowerInfer's sparse FFNs).
    Relu,
}

/// Shape of one attention layer for [`Gpu::attention`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (`n_head` a multiple of it; query head `h` reads KV head
    /// `h / (n_head / n_head_kv)`).
    pub n_head_kv: usize,
    /// Dimension of each query/key head.
    pub head_dim_k: usize,
    /// Dimension of each value head.
    pub head_dim_v: usize,
    /// Factor applied to each `q . k` before the softmax.
    pub scale: f32,
    /// Sliding window: position `p` sees keys `p - window < t <= p`; `None`: all `t <= p`.
    pub window: Option<usize>,
}

/// One CUDA device with every kernel family compiled and loaded, a stream, and the VRAM
/// accountant all allocations go through. Every operator queues work on the stream and returns;
/// [`Gpu::download`] and [`Gpu::synchronize`] wait for it.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: &'static str,
    name: String,
    total_mem: u64,
    vram: Arc<VramAccountant>,
    funcs: HashMap<String, CudaFunction>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("name", &self.name)
            .field("arch", &self.arch)
            .field("total_mem", &self.total_mem)
            .field("vram", &self.vram)
            .finish()
    }
}

impl Gpu {
    /// Open device `ordinal` with a VRAM budget of its total memory. See [`Gpu::with_budget`].
    pub fn new(ordinal: usize) -> Result<Gpu, CudaError> {
        Self::with_budget(ordinal, None)
    }

    /// Open device `ordinal`: probe for the driver library and NVRTC (typed errors
    /// [`CudaError::NoDriver`], [`CudaError::NoNvrtc`]), check the device count
    /// ([`CudaError::NoDevice`]), create the context, compile every kernel family for the device's
    /// `sm_XX` with NVRTC and load them. `budget` caps the bytes this `Gpu` may allocate
    /// (`None`: the device's total memory).
    pub fn with_budget(ordinal: usize, budget: Option<u64>) -> Result<Gpu, CudaError> {
        // SAFETY: only tries to dlopen the candidate library names and closes them again.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(CudaError::NoDriver);
        }
        ensure_nvrtc()?;
        let count = match CudaContext::device_count() {
            Ok(n) => usize::try_from(n).unwrap_or(0),
            Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => 0,
            Err(e) => return Err(driver("cuInit / cuDeviceGetCount")(e)),
        };
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal).map_err(driver("create context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("compute capability"))?;
        let arch = arch_name(major, minor);
        let name = ctx.name().map_err(driver("device name"))?;
        let total_mem = ctx.total_mem().map_err(driver("total memory"))? as u64;
        let stream = ctx.default_stream();
        let mut funcs = HashMap::new();
        for fam in FAMILIES {
            let ptx = compile_family_cached(fam, arch)?;
            let module = ctx.load_module(ptx).map_err(|e| CudaError::Load {
                kernel: fam.name.to_string(),
                msg: e.to_string(),
            })?;
            for k in fam.kernels() {
                let f = module.load_function(&k).map_err(|e| CudaError::Load {
                    kernel: k.clone(),
                    msg: e.to_string(),
                })?;
                funcs.insert(k, f);
            }
        }
        Ok(Gpu {
            ctx,
            stream,
            arch,
            name,
            total_mem,
            vram: VramAccountant::new(budget.unwrap_or(total_mem)),
            funcs,
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The NVRTC target the kernels were compiled for (`sm_90`, ...).
    pub fn arch(&self) -> &'static str {
        self.arch
    }
    /// The device's total memory in bytes.
    pub fn total_mem(&self) -> u64 {
        self.total_mem
    }
    /// The VRAM accountant of this device.
    pub fn vram(&self) -> &Arc<VramAccountant> {
        &self.vram
    }
    /// The cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }
    /// The stream all operators queue on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Wait for all queued work; an asynchronous kernel failure surfaces here.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(launch_err("(queued work, seen at synchronize)"))
    }

    /// Device time per call of `f` in milliseconds, measured with CUDA events around `iters`
    /// calls (after one untimed warm-up call). `f` should only queue work on [`Gpu::stream`].
    pub fn time_ms(
        &self,
        iters: usize,
        mut f: impl FnMut() -> Result<(), CudaError>,
    ) -> Result<f32, CudaError> {
        use cudarc::driver::sys::CUevent_flags;
        f()?;
        let start = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("create event"))?;
        let end = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(driver("create event"))?;
        start.record(&self.stream).map_err(driver("record event"))?;
        for _ in 0..iters.max(1) {
            f()?;
        }
        end.record(&self.stream).map_err(driver("record event"))?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(launch_err("(queued work, seen at timing)"))?;
        Ok(ms / iters.max(1) as f32)
    }

    fn func(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.funcs.get(name).ok_or_else(|| CudaError::Load {
            kernel: name.to_string(),
            msg: "not in the compiled modules".into(),
        })
    }

    // -----------------------------------------------------------------------------------------
    // Memory
    // -----------------------------------------------------------------------------------------

    fn alloc<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        what: &'static str,
        len: usize,
    ) -> Result<DeviceBuffer<T>, CudaError> {
        if len == 0 {
            return Err(shape(what, "empty device buffer"));
        }
        let bytes = (len as u64).saturating_mul(std::mem::size_of::<T>() as u64);
        let res = self.vram.reserve(what, bytes)?;
        let buf = self
            .stream
            .alloc_zeros::<T>(len)
            .map_err(alloc_err(what, bytes))?;
        Ok(DeviceBuffer { buf, _res: res })
    }

    fn upload_raw<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        what: &'static str,
        data: &[T],
    ) -> Result<DeviceBuffer<T>, CudaError> {
        if data.is_empty() {
            return Err(shape(what, "empty device buffer"));
        }
        let bytes = std::mem::size_of_val(data) as u64;
        let res = self.vram.reserve(what, bytes)?;
        let buf = self
            .stream
            .clone_htod(data)
            .map_err(alloc_err(what, bytes))?;
        Ok(DeviceBuffer { buf, _res: res })
    }

    /// A zeroed f32 vector of `n > 0` values (an empty one is a [`CudaError::Shape`]).
    pub fn zeros(&self, n: usize) -> Result<DeviceVec, CudaError> {
        self.alloc("vector", n)
    }

    /// Copy a non-empty `x` to a new device vector.
    pub fn upload(&self, x: &[f32]) -> Result<DeviceVec, CudaError> {
        self.upload_raw("vector", x)
    }

    /// Overwrite `dst` with `x` (same length).
    pub fn write(&self, dst: &mut DeviceVec, x: &[f32]) -> Result<(), CudaError> {
        if dst.len() != x.len() {
            return Err(shape(
                "write",
                format!("device vector has {} values, host {}", dst.len(), x.len()),
            ));
        }
        self.stream
            .memcpy_htod(x, &mut dst.buf)
            .map_err(driver("copy to device"))
    }

    /// Wait for queued work and copy `x` back to the host.
    pub fn download(&self, x: &DeviceVec) -> Result<Vec<f32>, CudaError> {
        self.stream
            .clone_dtoh(&x.buf)
            .map_err(launch_err("(queued work, seen at download)"))
    }

    /// Upload a ggml weight matrix: `rows` rows of `cols` elements of `ty`, `data` exactly
    /// `rows * row_bytes(ty, cols)` bytes (a GGUF tensor's bytes). `ty` must have a GPU kernel
    /// ([`crate::GPU_TYPES`]) and `cols` must be a multiple of its block size.
    pub fn upload_matrix(
        &self,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        data: &[u8],
    ) -> Result<DeviceMatrix, CudaError> {
        const OP: &str = "upload_matrix";
        if type_suffix(ty).is_none() {
            return Err(CudaError::UnsupportedType { op: OP, ty });
        }
        if rows == 0 || cols == 0 {
            return Err(shape(OP, format!("empty matrix {rows} x {cols}")));
        }
        to_i32(OP, "rows", rows)?;
        to_i32(OP, "cols", cols)?;
        if !cols.is_multiple_of(ty.block_size()) {
            return Err(shape(
                OP,
                format!(
                    "cols {cols} is not a multiple of {ty:?}'s block size {}",
                    ty.block_size()
                ),
            ));
        }
        let row_bytes = cols / ty.block_size() * ty.type_size();
        let need = rows
            .checked_mul(row_bytes)
            .ok_or_else(|| shape(OP, "size overflows"))?;
        if data.len() != need {
            return Err(shape(
                OP,
                format!(
                    "{rows} x {cols} {ty:?} needs {need} bytes, got {}",
                    data.len()
                ),
            ));
        }
        Ok(DeviceMatrix {
            ty,
            rows,
            cols,
            row_bytes,
            data: self.upload_raw("weight matrix", data)?,
        })
    }

    /// Upload a compact matrix's neuron ids: every id `< n_ff`.
    pub fn upload_bucket(&self, ids: &[u32], n_ff: usize) -> Result<DeviceBucket, CudaError> {
        const OP: &str = "upload_bucket";
        to_i32(OP, "n_ff", n_ff)?;
        if ids.is_empty() {
            return Err(shape(OP, "empty bucket"));
        }
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= n_ff) {
            return Err(shape(OP, format!("neuron id {bad} out of range 0..{n_ff}")));
        }
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        Ok(DeviceBucket {
            ids: self.upload_raw("neuron bucket", &ids)?,
            n_ff,
        })
    }

    /// A zeroed F16 KV cache of `n_ctx` positions.
    pub fn kv_cache(
        &self,
        n_ctx: usize,
        k_dim: usize,
        v_dim: usize,
    ) -> Result<DeviceKvCache, CudaError> {
        const OP: &str = "kv_cache";
        if n_ctx == 0 || k_dim == 0 || v_dim == 0 {
            return Err(shape(OP, "n_ctx, k_dim and v_dim must be > 0"));
        }
        to_i32(OP, "n_ctx", n_ctx)?;
        let nk = n_ctx
            .checked_mul(k_dim)
            .ok_or_else(|| shape(OP, "size overflows"))?;
        let nv = n_ctx
            .checked_mul(v_dim)
            .ok_or_else(|| shape(OP, "size overflows"))?;
        Ok(DeviceKvCache {
            k: self.alloc("kv cache (k)", nk)?,
            v: self.alloc("kv cache (v)", nv)?,
            n_ctx,
            k_dim,
            v_dim,
        })
    }

    /// Copy host F16 rows into the cache from position `first`: `k` holds whole key rows, `v` the
    /// same number of value rows.
    pub fn kv_upload(
        &self,
        cache: &mut DeviceKvCache,
        first: usize,
        k: &[f16],
        v: &[f16],
    ) -> Result<(), CudaError> {
        const OP: &str = "kv_upload";
        if !k.len().is_multiple_of(cache.k_dim) || !v.len().is_multiple_of(cache.v_dim) {
            return Err(shape(OP, "k / v are not whole rows"));
        }
        let n = k.len() / cache.k_dim;
        if v.len() / cache.v_dim != n {
            return Err(shape(OP, "k and v hold different numbers of rows"));
        }
        if first + n > cache.n_ctx {
            return Err(shape(
                OP,
                format!(
                    "rows {first}..{} outside the cache of {}",
                    first + n,
                    cache.n_ctx
                ),
            ));
        }
        let kb: Vec<u16> = k.iter().map(|h| h.to_bits()).collect();
        let vb: Vec<u16> = v.iter().map(|h| h.to_bits()).collect();
        let mut kd = cache
            .k
            .buf
            .slice_mut(first * cache.k_dim..(first + n) * cache.k_dim);
        self.stream
            .memcpy_htod(&kb, &mut kd)
            .map_err(driver("copy to device"))?;
        let mut vd = cache
            .v
            .buf
            .slice_mut(first * cache.v_dim..(first + n) * cache.v_dim);
        self.stream
            .memcpy_htod(&vb, &mut vd)
            .map_err(driver("copy to device"))
    }

    /// Store one token's key and value rows (f32, rounded to f16) at position `pos`.
    pub fn kv_store(
        &self,
        cache: &mut DeviceKvCache,
        pos: usize,
        k: &DeviceVec,
        v: &DeviceVec,
    ) -> Result<(), CudaError> {
        const OP: &str = "kv_store";
        if pos >= cache.n_ctx {
            return Err(shape(
                OP,
                format!("position {pos} outside the cache of {}", cache.n_ctx),
            ));
        }
        if k.len() != cache.k_dim || v.len() != cache.v_dim {
            return Err(shape(
                OP,
                format!(
                    "rows of {} / {} values, the cache wants {} / {}",
                    k.len(),
                    v.len(),
                    cache.k_dim,
                    cache.v_dim
                ),
            ));
        }
        let f = self.func("store_f16")?;
        for (src, dst, dim) in [
            (k, &mut cache.k, cache.k_dim),
            (v, &mut cache.v, cache.v_dim),
        ] {
            let n = to_i32(OP, "row", dim)?;
            let mut view = dst.buf.slice_mut(pos * dim..(pos + 1) * dim);
            let mut b = self.stream.launch_builder(f);
            b.arg(&src.buf).arg(&mut view).arg(&n);
            // SAFETY: store_f16(const float*, u16*, int): src holds `dim` f32, the view `dim`
            // u16 (checked above); threads past n return.
            unsafe { b.launch(LaunchConfig::for_num_elems(dim as u32)) }
                .map_err(launch_err("store_f16"))?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Dense and sparse products
    // -----------------------------------------------------------------------------------------

    fn matvec_inner(
        &self,
        op: &'static str,
        w: &DeviceMatrix,
        x: &DeviceVec,
        y: &mut DeviceVec,
        relu: bool,
    ) -> Result<(), CudaError> {
        if x.len() != w.cols || y.len() != w.rows {
            return Err(shape(
                op,
                format!(
                    "matrix {} x {}, x has {} values, y {}",
                    w.rows,
                    w.cols,
                    x.len(),
                    y.len()
                ),
            ));
        }
        let suffix = type_suffix(w.ty).ok_or(CudaError::UnsupportedType { op, ty: w.ty })?;
        let name = format!("matvec_{suffix}");
        let f = self.func(&name)?;
        let (rows, cols) = (w.rows as i32, w.cols as i32);
        let row_bytes = w.row_bytes as u64;
        let relu = i32::from(relu);
        let rows_per_block = MATVEC_BLOCK / 32;
        let cfg = LaunchConfig {
            grid_dim: ((w.rows as u32).div_ceil(rows_per_block), 1, 1),
            block_dim: (MATVEC_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(f);
        b.arg(&w.data.buf)
            .arg(&x.buf)
            .arg(&mut y.buf)
            .arg(&rows)
            .arg(&cols)
            .arg(&row_bytes)
            .arg(&relu);
        // SAFETY: matvec_T(const u8* w, const float* x, float* y, int rows, int cols, u64
        // row_bytes, int relu); the matrix holds rows * row_bytes bytes of type T, x cols f32
        // and y rows f32 (checked above); warps past the last row return.
        unsafe { b.launch(cfg) }.map_err(launch_err(op))?;
        Ok(())
    }

    /// `y = W x` for any supported weight type, f32 activations, f32 accumulation.
    pub fn matvec(
        &self,
        w: &DeviceMatrix,
        x: &DeviceVec,
        y: &mut DeviceVec,
    ) -> Result<(), CudaError> {
        self.matvec_inner("matvec", w, x, y, false)
    }

    /// `y = max(W x, 0)`.
    pub fn matvec_relu(
        &self,
        w: &DeviceMatrix,
        x: &DeviceVec,
        y: &mut DeviceVec,
    ) -> Result<(), CudaError> {
        self.matvec_inner("matvec_relu", w, x, y, true)
    }

    /// The predictor `scores = fc2 · relu(fc1 · x)`: `fc1` is `hidden x n_embd`, `fc2` is
    /// `n_ff x hidden`; `hidden` receives the intermediate layer.
    pub fn predictor(
        &self,
        fc1: &DeviceMatrix,
        fc2: &DeviceMatrix,
        x: &DeviceVec,
        hidden: &mut DeviceVec,
        scores: &mut DeviceVec,
    ) -> Result<(), CudaError> {
        if fc2.cols != fc1.rows {
            return Err(shape(
                "predictor",
                format!(
                    "fc1 is {} x {}, fc2 {} x {}",
                    fc1.rows, fc1.cols, fc2.rows, fc2.cols
                ),
            ));
        }
        self.matvec_inner("predictor fc1", fc1, x, hidden, true)?;
        self.matvec_inner("predictor fc2", fc2, hidden, scores, false)
    }

    fn check_sparse(
        op: &'static str,
        rows: usize,
        scores: &DeviceVec,
        bucket: Option<&DeviceBucket>,
    ) -> Result<(), CudaError> {
        match bucket {
            Some(b) => {
                if b.len() != rows {
                    return Err(shape(
                        op,
                        format!("bucket has {} ids for {rows} compact rows", b.len()),
                    ));
                }
                if scores.len() != b.n_ff {
                    return Err(shape(
                        op,
                        format!("{} scores for a layer of {} neurons", scores.len(), b.n_ff),
                    ));
                }
            }
            None => {
                if scores.len() != rows {
                    return Err(shape(
                        op,
                        format!("{} scores for {rows} rows", scores.len()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Row-gather matvec over a compact hot-neuron matrix: `y[j] = W[j] · x` if neuron
    /// `bucket[j]` (or `j` without a bucket) has `scores[neuron] >= threshold`, else exactly 0;
    /// an inactive row is never read. `y` has `w.rows()` values (compact order).
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_matvec(
        &self,
        w: &DeviceMatrix,
        x: &DeviceVec,
        scores: &DeviceVec,
        bucket: Option<&DeviceBucket>,
        threshold: f32,
        y: &mut DeviceVec,
    ) -> Result<(), CudaError> {
        const OP: &str = "sparse_matvec";
        if x.len() != w.cols || y.len() != w.rows {
            return Err(shape(
                OP,
                format!(
                    "matrix {} x {}, x has {} values, y {}",
                    w.rows,
                    w.cols,
                    x.len(),
                    y.len()
                ),
            ));
        }
        Self::check_sparse(OP, w.rows, scores, bucket)?;
        let suffix = type_suffix(w.ty).ok_or(CudaError::UnsupportedType { op: OP, ty: w.ty })?;
        let f = self.func(&format!("sparse_matvec_{suffix}"))?;
        let (rows, cols) = (w.rows as i32, w.cols as i32);
        let row_bytes = w.row_bytes as u64;
        let cfg = LaunchConfig {
            grid_dim: ((w.rows as u32).div_ceil(MATVEC_BLOCK / 32), 1, 1),
            block_dim: (MATVEC_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(f);
        b.arg(&w.data.buf)
            .arg(&x.buf)
            .arg(&mut y.buf)
            .arg(&rows)
            .arg(&cols)
            .arg(&row_bytes)
            .arg(&scores.buf);
        match bucket {
            Some(bk) => b.arg(&bk.ids.buf),
            None => b.arg(&null),
        };
        b.arg(&threshold);
        // SAFETY: sparse_matvec_T(const u8* w, const float* x, float* y, int rows, int cols, u64
        // row_bytes, const float* scores, const int* bucket, float threshold): sizes checked
        // above; every bucket id is < n_ff == scores.len() (checked at upload), and without a
        // bucket (null pointer) scores has `rows` values.
        unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
        Ok(())
    }

    /// Sparse axpy over a compact transposed down projection (`down_t`, `k x n_embd`, row `j`
    /// the output vector of neuron `bucket[j]`):
    /// `out = (accumulate ? out : 0) + sum over active j of h[j] * down_t[j]`, active as in
    /// [`Gpu::sparse_matvec`]. Deterministic: every output column sums its rows in increasing
    /// `j`, in chunks of 64 rows added in increasing order; no atomics.
    #[allow(clippy::too_many_arguments)]
    pub fn sparse_axpy(
        &self,
        down_t: &DeviceMatrix,
        h: &DeviceVec,
        scores: &DeviceVec,
        bucket: Option<&DeviceBucket>,
        threshold: f32,
        out: &mut DeviceVec,
        accumulate: bool,
    ) -> Result<(), CudaError> {
        const OP: &str = "sparse_axpy";
        if h.len() != down_t.rows || out.len() != down_t.cols {
            return Err(shape(
                OP,
                format!(
                    "down_t {} x {}, h has {} values, out {}",
                    down_t.rows,
                    down_t.cols,
                    h.len(),
                    out.len()
                ),
            ));
        }
        Self::check_sparse(OP, down_t.rows, scores, bucket)?;
        let suffix = type_suffix(down_t.ty).ok_or(CudaError::UnsupportedType {
            op: OP,
            ty: down_t.ty,
        })?;
        let partial_f = self.func(&format!("sparse_axpy_partial_{suffix}"))?;
        let reduce_f = self.func("sparse_axpy_reduce")?;
        let n_chunks = down_t.rows.div_ceil(AXPY_CHUNK_ROWS);
        let mut partial: DeviceVec = self.alloc("sparse_axpy scratch", n_chunks * down_t.cols)?;
        let (rows, cols) = (down_t.rows as i32, down_t.cols as i32);
        let row_bytes = down_t.row_bytes as u64;
        let chunk_rows = AXPY_CHUNK_ROWS as i32;
        let n_chunks_i = to_i32(OP, "chunks", n_chunks)?;
        let col_blocks = (down_t.cols as u32).div_ceil(ELEM_BLOCK);
        let null: u64 = 0;
        let mut b = self.stream.launch_builder(partial_f);
        b.arg(&down_t.data.buf)
            .arg(&h.buf)
            .arg(&mut partial.buf)
            .arg(&rows)
            .arg(&cols)
            .arg(&row_bytes)
            .arg(&scores.buf);
        match bucket {
            Some(bk) => b.arg(&bk.ids.buf),
            None => b.arg(&null),
        };
        b.arg(&threshold).arg(&chunk_rows);
        let cfg = LaunchConfig {
            grid_dim: (col_blocks, n_chunks as u32, 1),
            block_dim: (ELEM_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: sparse_axpy_partial_T(const u8* w, const float* h, float* partial, int rows,
        // int cols, u64 row_bytes, const float* scores, const int* bucket, float threshold, int
        // chunk_rows): partial holds n_chunks * cols f32, gridDim.y == n_chunks, other sizes
        // checked above; threads past the last column return.
        unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
        let acc = i32::from(accumulate);
        let mut b = self.stream.launch_builder(reduce_f);
        b.arg(&partial.buf)
            .arg(&mut out.buf)
            .arg(&cols)
            .arg(&n_chunks_i)
            .arg(&acc);
        let cfg = LaunchConfig {
            grid_dim: (col_blocks, 1, 1),
            block_dim: (ELEM_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: sparse_axpy_reduce(const float* partial, float* out, int cols, int n_chunks,
        // int accumulate): partial n_chunks * cols f32, out cols f32.
        unsafe { b.launch(cfg) }.map_err(launch_err("sparse_axpy_reduce"))?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Elementwise and attention
    // -----------------------------------------------------------------------------------------

    /// RMS norm of each `w.len()`-long row of `x` (one row, or per-head rows for QK norm):
    /// `out = x / sqrt(mean(x^2) + eps) * w`.
    pub fn rms_norm(
        &self,
        x: &DeviceVec,
        w: &DeviceVec,
        eps: f32,
        out: &mut DeviceVec,
    ) -> Result<(), CudaError> {
        const OP: &str = "rms_norm";
        let n = w.len();
        if n == 0 || !x.len().is_multiple_of(n) || out.len() != x.len() {
            return Err(shape(
                OP,
                format!("x {} values, weight {n}, out {}", x.len(), out.len()),
            ));
        }
        let n_rows = x.len() / n;
        let n_i = to_i32(OP, "row length", n)?;
        let f = self.func("rms_norm")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&x.buf)
            .arg(&w.buf)
            .arg(&mut out.buf)
            .arg(&n_i)
            .arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (n_rows as u32, 1, 1),
            block_dim: (NORM_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: rms_norm(const float* x, const float* w, float* out, int n, float eps): one
        // block per row of n values; x and out hold n_rows * n f32, w n (checked above).
        unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
        Ok(())
    }

    /// RoPE in place over every `head_dim`-long head of `x`, rotating the first `n_dims`
    /// dimensions of each at position `pos`: `theta_i = pos * freq_scale * base^(-2i/n_dims)`.
    #[allow(clippy::too_many_arguments)]
    pub fn rope(
        &self,
        x: &mut DeviceVec,
        head_dim: usize,
        n_dims: usize,
        pos: usize,
        base: f32,
        freq_scale: f32,
        kind: RopeKind,
    ) -> Result<(), CudaError> {
        const OP: &str = "rope";
        if head_dim == 0 || !x.len().is_multiple_of(head_dim) {
            return Err(shape(
                OP,
                format!(
                    "length {} is not a multiple of head_dim {head_dim}",
                    x.len()
                ),
            ));
        }
        if n_dims == 0 || n_dims > head_dim || !n_dims.is_multiple_of(2) {
            return Err(shape(
                OP,
                format!("n_dims {n_dims} must be even, > 0 and <= head_dim {head_dim}"),
            ));
        }
        let n_heads = x.len() / head_dim;
        let pairs = n_heads * (n_dims / 2);
        let f = self.func("rope")?;
        let (nh, hd, nd, p) = (
            to_i32(OP, "heads", n_heads)?,
            to_i32(OP, "head_dim", head_dim)?,
            to_i32(OP, "n_dims", n_dims)?,
            to_i32(OP, "pos", pos)?,
        );
        let neox = i32::from(kind == RopeKind::Neox);
        let mut b = self.stream.launch_builder(f);
        b.arg(&mut x.buf)
            .arg(&nh)
            .arg(&hd)
            .arg(&nd)
            .arg(&p)
            .arg(&base)
            .arg(&freq_scale)
            .arg(&neox);
        // SAFETY: rope(float* x, int n_heads, int head_dim, int n_dims, int pos, float base,
        // float freq_scale, int neox): x holds n_heads * head_dim f32, n_dims <= head_dim;
        // threads past n_heads * n_dims / 2 return.
        unsafe { b.launch(LaunchConfig::for_num_elems(pairs as u32)) }.map_err(launch_err(OP))?;
        Ok(())
    }

    /// Gated activation: `out = act(gate) * up'` with `up' = up`, `max(up, 0)` if `relu_up`
    /// (dReLU), or 1 without `up` (a plain activation). `out` may not alias the inputs.
    pub fn glu(
        &self,
        act: Activation,
        gate: &DeviceVec,
        up: Option<&DeviceVec>,
        relu_up: bool,
        out: &mut DeviceVec,
    ) -> Result<(), CudaError> {
        const OP: &str = "glu";
        if out.len() != gate.len() || up.is_some_and(|u| u.len() != gate.len()) {
            return Err(shape(OP, "gate, up and out must have the same length"));
        }
        let n = to_i32(OP, "length", gate.len())?;
        let kind: i32 = match act {
            Activation::Silu => 0,
            Activation::Gelu => 1,
            Activation::Relu => 2,
        };
        let relu_up = i32::from(relu_up);
        let null: u64 = 0;
        let f = self.func("glu")?;
        let mut b = self.stream.launch_builder(f);
        b.arg(&gate.buf);
        match up {
            Some(u) => b.arg(&u.buf),
            None => b.arg(&null),
        };
        b.arg(&mut out.buf).arg(&n).arg(&kind).arg(&relu_up);
        // SAFETY: glu(const float* gate, const float* up /* may be null */, float* out, int n,
        // int kind, int relu_up): all n f32 (checked above).
        unsafe { b.launch(LaunchConfig::for_num_elems(n as u32)) }.map_err(launch_err(OP))?;
        Ok(())
    }

    /// Attention of one query row (`n_head * head_dim_k` values, RoPE applied) at position
    /// `pos` over the cache's rows `0..=pos` (or the window's): `out` receives
    /// `n_head * head_dim_v` values. Scores, softmax and the V sum in f32.
    pub fn attention(
        &self,
        p: &AttnShape,
        q: &DeviceVec,
        cache: &DeviceKvCache,
        pos: usize,
        out: &mut DeviceVec,
    ) -> Result<(), CudaError> {
        const OP: &str = "attention";
        if p.n_head == 0 || p.n_head_kv == 0 || p.head_dim_k == 0 || p.head_dim_v == 0 {
            return Err(shape(OP, "head counts and dims must be > 0"));
        }
        if !p.n_head.is_multiple_of(p.n_head_kv) {
            return Err(shape(
                OP,
                format!(
                    "n_head {} not a multiple of n_head_kv {}",
                    p.n_head, p.n_head_kv
                ),
            ));
        }
        if p.window == Some(0) {
            return Err(shape(OP, "sliding window of 0"));
        }
        if cache.k_dim != p.n_head_kv * p.head_dim_k || cache.v_dim != p.n_head_kv * p.head_dim_v {
            return Err(shape(
                OP,
                "cache row sizes do not match the attention shape",
            ));
        }
        if q.len() != p.n_head * p.head_dim_k || out.len() != p.n_head * p.head_dim_v {
            return Err(shape(
                OP,
                format!("q has {} values, out {}", q.len(), out.len()),
            ));
        }
        if pos >= cache.n_ctx {
            return Err(shape(
                OP,
                format!("position {pos} outside the cache of {}", cache.n_ctx),
            ));
        }
        let n_keys = pos + 1;
        let first = p.window.map_or(0, |w| n_keys.saturating_sub(w));
        let n = n_keys - first;
        let mut scratch: DeviceVec = self.alloc("attention scratch", p.n_head * n)?;
        let f = self.func("attn_decode")?;
        let args = [
            to_i32(OP, "n_head", p.n_head)?,
            to_i32(OP, "n_head_kv", p.n_head_kv)?,
            to_i32(OP, "head_dim_k", p.head_dim_k)?,
            to_i32(OP, "head_dim_v", p.head_dim_v)?,
            first as i32,
            n_keys as i32,
            to_i32(OP, "keys", n)?,
        ];
        let mut b = self.stream.launch_builder(f);
        b.arg(&q.buf)
            .arg(&cache.k.buf)
            .arg(&cache.v.buf)
            .arg(&mut out.buf)
            .arg(&mut scratch.buf);
        for a in &args {
            b.arg(a);
        }
        b.arg(&p.scale);
        let cfg = LaunchConfig {
            grid_dim: (p.n_head as u32, 1, 1),
            block_dim: (ATTN_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: attn_decode(const float* q, const u16* k, const u16* v, float* out, float*
        // scratch, int n_head, int n_head_kv, int hd_k, int hd_v, int first, int n_keys, int
        // scratch_stride, float scale): q and out sized above, the cache holds n_ctx > pos rows
        // of k_dim / v_dim, scratch n_head * (n_keys - first) f32 with stride n_keys - first.
        unsafe { b.launch(cfg) }.map_err(launch_err(OP))?;
        Ok(())
    }
}
