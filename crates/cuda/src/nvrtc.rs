//! Finding NVRTC and compiling the kernel families with it (no GPU needed).

use crate::CudaError;
use crate::kernels::{FAMILIES, KernelFamily};
use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Environment variable naming the NVRTC library file, or a directory holding
/// `libnvrtc.so.13` (e.g. the `nvidia/cu13/lib` directory of the `nvidia-cuda-nvrtc` wheel).
pub const NVRTC_ENV: &str = "POWERINFER_NVRTC_LIB";

/// Libraries opened by [`load_nvrtc_from`]; kept open for the life of the process.
static PRELOADED: Mutex<Vec<libloading::os::unix::Library>> = Mutex::new(Vec::new());

/// Open NVRTC from `path` (the library file, or a directory holding `libnvrtc.so.13`), together
/// with the `libnvrtc-builtins` beside it, globally, so that cudarc's later
/// `dlopen("libnvrtc.so.13")` finds the already-loaded library by its soname.
pub fn load_nvrtc_from(path: &Path) -> Result<(), CudaError> {
    let fail = |msg: String| CudaError::NvrtcLoad {
        path: path.to_path_buf(),
        msg,
    };
    let (dir, lib) = if path.is_dir() {
        (path.to_path_buf(), path.join("libnvrtc.so.13"))
    } else {
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        (dir, path.to_path_buf())
    };
    if !lib.is_file() {
        return Err(fail(format!("{} does not exist", lib.display())));
    }
    let mut to_open: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| fail(e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libnvrtc-builtins.so."))
        })
        .collect();
    to_open.sort();
    to_open.push(lib);
    let mut held = PRELOADED.lock().unwrap_or_else(|e| e.into_inner());
    for p in to_open {
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL;
        // SAFETY: loading NVIDIA's NVRTC runs its initialisers, which have no preconditions; the
        // handle is kept for the rest of the process, so nothing it exports is ever unloaded.
        let l = unsafe { libloading::os::unix::Library::open(Some(&p), flags) }
            .map_err(|e| fail(format!("{}: {e}", p.display())))?;
        held.push(l);
    }
    Ok(())
}

/// Make NVRTC usable: load it from [`NVRTC_ENV`] if that is set, then check that cudarc can open
/// it (from there, `LD_LIBRARY_PATH` or the system). [`CudaError::NoNvrtc`] if it cannot.
pub fn ensure_nvrtc() -> Result<(), CudaError> {
    if let Some(p) = std::env::var_os(NVRTC_ENV).filter(|p| !p.is_empty()) {
        load_nvrtc_from(Path::new(&p))?;
    }
    // SAFETY: only tries to dlopen the candidate library names and closes them again.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoNvrtc)
    }
}

/// Compile one kernel family to PTX for `arch` (e.g. `"sm_90"`). NVRTC must be available
/// ([`ensure_nvrtc`]); otherwise this returns [`CudaError::NoNvrtc`] instead of letting cudarc
/// panic.
pub fn compile_family(family: &KernelFamily, arch: &'static str) -> Result<Ptx, CudaError> {
    ensure_nvrtc()?;
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(format!("{}.cu", family.name)),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(family.source(), opts).map_err(|e| {
        let (msg, log) = match e {
            CompileError::CompileError { nvrtc, log, .. } => {
                (format!("{nvrtc:?}"), log.to_string_lossy().into_owned())
            }
            other => (format!("{other:?}"), String::new()),
        };
        CudaError::Compile {
            family: family.name,
            arch: arch.to_string(),
            msg,
            log,
        }
    })
}

/// PTX text of each (family, arch) compiled so far in this process.
static PTX_CACHE: Mutex<BTreeMap<(&'static str, &'static str), String>> =
    Mutex::new(BTreeMap::new());

/// [`compile_family`], compiled once per process for each family and target (every
/// [`crate::Gpu`] opened after the first reuses the PTX).
pub fn compile_family_cached(family: &KernelFamily, arch: &'static str) -> Result<Ptx, CudaError> {
    let key = (family.name, arch);
    if let Some(src) = PTX_CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
    {
        return Ok(Ptx::from_src(src.clone()));
    }
    let src = compile_family(family, arch)?.to_src();
    PTX_CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, src.clone());
    Ok(Ptx::from_src(src))
}

/// Compile every family for `arch`; returns each family's name and PTX size in bytes.
pub fn compile_all(arch: &'static str) -> Result<Vec<(&'static str, usize)>, CudaError> {
    FAMILIES
        .iter()
        .map(|f| {
            let ptx = compile_family(f, arch)?;
            let n = ptx.as_bytes().map_or(0, <[u8]>::len);
            Ok((f.name, n))
        })
        .collect()
}
