//! Tensor files of a checkpoint, opened lazily: PyTorch zip pickles (`.bin`, `.pt`, `.pth`)
//! and safetensors, detected by content.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::Error;
use crate::pt::{PtFile, PtTensorInfo};
use crate::tensor::{DType, Tensor};

enum Source {
    Pt(Arc<PtFile>, PtTensorInfo),
    Safetensors {
        file: Arc<Mutex<std::fs::File>>,
        start: u64,
        end: u64,
    },
}

/// A tensor of a checkpoint file whose data is read on [`LazyTensor::load`].
pub struct LazyTensor {
    /// Name in the file.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first (PyTorch order).
    pub shape: Vec<usize>,
    /// The file it comes from.
    pub path: PathBuf,
    src: Source,
}

impl std::fmt::Debug for LazyTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyTensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .field("path", &self.path)
            .finish()
    }
}

impl LazyTensor {
    /// Reads the elements (contiguous, little-endian).
    pub fn load(&self) -> Result<Tensor, Error> {
        match &self.src {
            Source::Pt(f, info) => f.load(info).map_err(|source| Error::Pt {
                path: self.path.clone(),
                source,
            }),
            Source::Safetensors { file, start, end } => {
                use std::io::{Read, Seek, SeekFrom};
                let io = |source| Error::Io {
                    path: self.path.clone(),
                    source,
                };
                let mut data = vec![0u8; (end - start) as usize];
                let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
                f.seek(SeekFrom::Start(*start)).map_err(io)?;
                f.read_exact(&mut data).map_err(io)?;
                Ok(Tensor {
                    name: self.name.clone(),
                    dtype: self.dtype,
                    shape: self.shape.clone(),
                    data,
                })
            }
        }
    }

    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F64 => DType::F64,
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        S::I8 => DType::I8,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool,
        _ => return None,
    })
}

/// Opens a PyTorch zip checkpoint or a safetensors file and lists its tensors in file order
/// (the pickle's dict order; for safetensors, the order of the data in the file).
pub fn open_tensors(path: &Path) -> Result<Vec<LazyTensor>, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut magic = [0u8; 2];
    {
        use std::io::Read;
        let mut f = &file;
        let _ = f.read(&mut magic).map_err(io)?;
    }
    if magic[0] == 0x80 {
        // A bare pickle: PyTorch's legacy (pre-1.6, non-zip) serialization.
        return Err(Error::Pt {
            path: path.to_path_buf(),
            source: crate::pt::PtError::Zip(
                "legacy (non-zip) PyTorch serialization is not supported; re-save it with \
                 torch >= 1.6 or as safetensors"
                    .into(),
            ),
        });
    }
    if &magic == b"PK" {
        let pt = Arc::new(PtFile::open(path).map_err(|source| Error::Pt {
            path: path.to_path_buf(),
            source,
        })?);
        return Ok(pt
            .tensors()
            .iter()
            .map(|info| LazyTensor {
                name: info.name.clone(),
                dtype: info.dtype,
                shape: info.shape.clone(),
                path: path.to_path_buf(),
                src: Source::Pt(pt.clone(), info.clone()),
            })
            .collect());
    }
    // The header is parsed from a map (only its first pages are touched); tensor data is
    // read with ordinary reads when converted, so only one tensor is in memory at a time.
    // SAFETY: read-only private map of a regular file, dropped before this function
    // returns; the file must not be truncated meanwhile (the usual mmap contract).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
    let st_err = |msg: String| Error::Safetensors {
        path: path.to_path_buf(),
        msg,
    };
    let (n, meta) =
        safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| st_err(format!("{e:?}")))?;
    let base = 8 + n as u64;
    drop(map);
    let file = Arc::new(Mutex::new(file));
    let mut out = Vec::new();
    for name in meta.offset_keys() {
        let info = meta
            .info(&name)
            .ok_or_else(|| st_err(format!("tensor {name} vanished from the header")))?;
        let dtype = st_dtype(info.dtype).ok_or_else(|| Error::UnsupportedDtype {
            tensor: name.clone(),
            dtype: format!("{:?}", info.dtype),
        })?;
        out.push(LazyTensor {
            name,
            dtype,
            shape: info.shape.clone(),
            path: path.to_path_buf(),
            src: Source::Safetensors {
                file: file.clone(),
                start: base + info.data_offsets.0 as u64,
                end: base + info.data_offsets.1 as u64,
            },
        });
    }
    Ok(out)
}

/// Reads every tensor of a PyTorch or safetensors file into memory, in file order.
pub fn read_tensors(path: &Path) -> Result<Vec<Tensor>, Error> {
    open_tensors(path)?.iter().map(LazyTensor::load).collect()
}
