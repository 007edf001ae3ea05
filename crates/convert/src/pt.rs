//! PyTorch `torch.save` checkpoints (zip archives holding `*/data.pkl` and `*/data/N`
//! storages) read without Python.
//!
//! The pickle is run by a small virtual machine that knows only the opcodes `torch.save`
//! writes and only an allow-list of globals (`collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_parameter`,
//! `torch._tensor._rebuild_from_type_v2`, `torch.*Storage`); anything else is refused with a
//! [`PtError`], so a hostile file cannot run code, and a damaged one cannot panic.
//!
//! Two kinds of file are read: a state dict (`torch.save(model.state_dict())`, the
//! reference's predictor `model_{i}.pt`), opened with [`PtFile::open`], and a single bare
//! tensor (`torch.save(tensor)`, the reference's per-layer activation counts
//! `activation_{i}.pt`), opened with [`PtFile::open_tensor`] or read at once with
//! [`read_tensor`].
//!
//! ```no_run
//! let pt = powerinfer_convert::pt::PtFile::open("model_0.pt")?;
//! for info in pt.tensors() {
//!     let t = pt.load(info)?;
//!     println!("{} {:?} {}", t.name, t.shape, t.dtype);
//! }
//! # Ok::<(), powerinfer_convert::pt::PtError>(())
//! ```

use std::collections::HashMap;
use std::io::{Cursor, Read};
use std::path::Path;
use std::sync::Mutex;

use crate::tensor::{DType, Tensor, gather};

/// Most dimensions a tensor may have.
pub const MAX_DIMS: usize = 16;

/// What went wrong reading a PyTorch file.
#[derive(Debug, thiserror::Error)]
pub enum PtError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The zip container is damaged or uses a feature not supported (compression).
    #[error("bad zip archive: {0}")]
    Zip(String),
    /// The archive holds no pickle, or more than one.
    #[error("expected exactly one .pkl entry in the archive, found {0}")]
    PickleCount(usize),
    /// The pickle stream is malformed at `offset`.
    #[error("pickle byte {offset}: {msg}")]
    Pickle {
        /// Byte offset in the pickle of the opcode.
        offset: usize,
        /// What is wrong.
        msg: String,
    },
    /// The pickle names a global outside the allow-list.
    #[error("pickle byte {offset}: refusing global {module}.{name} (not on the allow-list)")]
    RefusedGlobal {
        /// Byte offset of the opcode.
        offset: usize,
        /// Module.
        module: String,
        /// Name.
        name: String,
    },
    /// An opcode the reader does not implement.
    #[error("pickle byte {offset}: unsupported opcode 0x{opcode:02x}")]
    UnsupportedOpcode {
        /// Byte offset.
        offset: usize,
        /// The opcode.
        opcode: u8,
    },
    /// The pickle does not describe a `{name: tensor}` mapping.
    #[error("not a state dict: {0}")]
    NotStateDict(String),
    /// The pickle's root object is not a single tensor (what [`PtFile::open_tensor`] reads).
    #[error("not a single tensor: {0}")]
    NotTensor(String),
    /// A storage entry is missing or too short for the tensors viewing it.
    #[error("storage {key}: {msg}")]
    Storage {
        /// Storage key (`data/KEY` in the archive).
        key: String,
        /// What is wrong.
        msg: String,
    },
    /// The archive declares a byte order other than little-endian.
    #[error("unsupported byte order {0:?} (only little-endian files are read)")]
    ByteOrder(String),
}

impl From<zip::result::ZipError> for PtError {
    fn from(e: zip::result::ZipError) -> Self {
        PtError::Zip(e.to_string())
    }
}

/// Where a tensor's elements live: `storage_key` in the archive, viewed with an offset and
/// strides (all in elements), as `torch._utils._rebuild_tensor_v2` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtTensorInfo {
    /// Name (the state-dict key; empty for a file holding one bare tensor).
    pub name: String,
    /// Element type (from the storage class).
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Strides in elements.
    pub strides: Vec<usize>,
    /// Offset of the first element in the storage, in elements.
    pub storage_offset: usize,
    /// Storage key (the archive entry `<dir>/data/<key>`).
    pub storage_key: String,
    /// Elements in the storage (from the persistent id).
    pub storage_numel: usize,
}

/// A seekable byte source for the archive (a file, or bytes in memory).
trait ReadSeek: Read + std::io::Seek + Send {}
impl<T: Read + std::io::Seek + Send> ReadSeek for T {}

type Archive = zip::ZipArchive<Box<dyn ReadSeek>>;

/// What the pickle of a [`PtFile`] holds at its root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtRoot {
    /// A `{name: tensor}` mapping (`dict` or `OrderedDict`): a state dict.
    StateDict,
    /// One bare tensor (`torch.save(tensor)`); its [`PtTensorInfo::name`] is empty.
    Tensor,
}

/// An opened PyTorch checkpoint: the tensor list from the pickle; data is read on demand,
/// one storage at a time (the file is read, not memory-mapped, so converting a large
/// checkpoint keeps only the tensor being converted in memory).
pub struct PtFile {
    archive: Mutex<Archive>,
    prefix: String,
    len: usize,
    root: PtRoot,
    tensors: Vec<PtTensorInfo>,
}

impl std::fmt::Debug for PtFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtFile")
            .field("prefix", &self.prefix)
            .field("root", &self.root)
            .field("tensors", &self.tensors)
            .finish()
    }
}

impl PtFile {
    /// Opens and parses the state dict at `path` (the pickle's root must be a
    /// `{name: tensor}` mapping, else [`PtError::NotStateDict`]).
    pub fn open(path: impl AsRef<Path>) -> Result<PtFile, PtError> {
        Self::open_as(path.as_ref(), PtRoot::StateDict)
    }

    /// Opens and parses a file holding one bare tensor (`torch.save(tensor)`; anything else
    /// is [`PtError::NotTensor`]). [`tensors`](Self::tensors) then has one entry, with an
    /// empty name.
    pub fn open_tensor(path: impl AsRef<Path>) -> Result<PtFile, PtError> {
        Self::open_as(path.as_ref(), PtRoot::Tensor)
    }

    fn open_as(path: &Path, root: PtRoot) -> Result<PtFile, PtError> {
        let io = |source| PtError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        Self::from_reader(Box::new(std::io::BufReader::new(file)), len, root)
    }

    /// Parses an in-memory state dict file (see [`open`](Self::open)).
    pub fn from_bytes(bytes: Vec<u8>) -> Result<PtFile, PtError> {
        let len = bytes.len();
        Self::from_reader(Box::new(Cursor::new(bytes)), len, PtRoot::StateDict)
    }

    /// Parses an in-memory file holding one bare tensor (see
    /// [`open_tensor`](Self::open_tensor)).
    pub fn tensor_from_bytes(bytes: Vec<u8>) -> Result<PtFile, PtError> {
        let len = bytes.len();
        Self::from_reader(Box::new(Cursor::new(bytes)), len, PtRoot::Tensor)
    }

    fn from_reader(r: Box<dyn ReadSeek>, len: usize, root: PtRoot) -> Result<PtFile, PtError> {
        let mut archive: Archive = zip::ZipArchive::new(r)?;
        let pkls: Vec<String> = archive
            .file_names()
            .filter(|n| n.ends_with(".pkl"))
            .map(str::to_owned)
            .collect();
        if pkls.len() != 1 {
            return Err(PtError::PickleCount(pkls.len()));
        }
        let pkl_name = &pkls[0];
        // "<dir>/data.pkl" -> storages under "<dir>/data/".
        let prefix = pkl_name[..pkl_name.len() - 4].to_owned();
        let byteorder = archive
            .file_names()
            .find(|n| n.ends_with("/byteorder") || *n == "byteorder")
            .map(str::to_owned);
        if let Some(bo) = byteorder {
            let raw = read_entry(&mut archive, &bo, 64, len)?;
            let s = String::from_utf8_lossy(&raw).trim().to_owned();
            if s != "little" {
                return Err(PtError::ByteOrder(s));
            }
        }
        let pickle = read_entry(&mut archive, pkl_name, usize::MAX, len)?;
        let tensors = match root {
            PtRoot::StateDict => unpickle_state_dict(&pickle)?,
            PtRoot::Tensor => vec![unpickle_tensor(&pickle)?],
        };
        Ok(PtFile {
            archive: Mutex::new(archive),
            prefix,
            len,
            root,
            tensors,
        })
    }

    /// What the pickle holds at its root.
    pub fn root(&self) -> PtRoot {
        self.root
    }

    /// The tensors in state-dict order (one, named `""`, for a bare tensor file).
    pub fn tensors(&self) -> &[PtTensorInfo] {
        &self.tensors
    }

    /// Reads one tensor's elements into a contiguous buffer (checking the entry's CRC).
    pub fn load(&self, info: &PtTensorInfo) -> Result<Tensor, PtError> {
        let es = info.dtype.size();
        let entry = format!("{}/{}", self.prefix, info.storage_key);
        let need = info
            .storage_numel
            .checked_mul(es)
            .ok_or_else(|| storage_err(&info.storage_key, "size overflows"))?;
        let mut archive = self.archive.lock().unwrap_or_else(|p| p.into_inner());
        let data = match read_entry(&mut archive, &entry, need, self.len) {
            Ok(d) => d,
            Err(PtError::Zip(msg)) => {
                return Err(storage_err(
                    &info.storage_key,
                    &format!("entry {entry}: {msg}"),
                ));
            }
            Err(e) => return Err(e),
        };
        if data.len() < need {
            return Err(storage_err(
                &info.storage_key,
                &format!("{} bytes, the pickle declares {need}", data.len()),
            ));
        }
        let bytes = gather(&data, es, info.storage_offset, &info.shape, &info.strides);
        Ok(Tensor {
            name: info.name.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            data: bytes,
        })
    }

    /// Reads every tensor, in order.
    pub fn read_all(&self) -> Result<Vec<Tensor>, PtError> {
        self.tensors.iter().map(|t| self.load(t)).collect()
    }
}

/// Reads a file holding one bare tensor (`torch.save(tensor)`, e.g. the reference's
/// `activation_{i}.pt`): its elements, contiguous, with an empty name. Errors name what is
/// wrong: not a zip, a root that is not a tensor ([`PtError::NotTensor`]), a storage entry
/// missing or of another size than the pickle declares ([`PtError::Storage`]).
pub fn read_tensor(path: impl AsRef<Path>) -> Result<Tensor, PtError> {
    let f = PtFile::open_tensor(path)?;
    f.load(&f.tensors[0])
}

fn storage_err(key: &str, msg: &str) -> PtError {
    PtError::Storage {
        key: key.to_owned(),
        msg: msg.to_owned(),
    }
}

/// Reads an archive entry of at most `limit` bytes (more is an error), verifying its CRC.
fn read_entry(
    archive: &mut Archive,
    name: &str,
    limit: usize,
    total: usize,
) -> Result<Vec<u8>, PtError> {
    let mut f = archive.by_name(name)?;
    let size = f.size();
    if size > limit as u64 || size > total as u64 {
        return Err(PtError::Zip(format!(
            "entry {name} claims {size} bytes (limit {})",
            limit.min(total)
        )));
    }
    let mut out = Vec::with_capacity(size as usize);
    f.by_ref()
        .take(size)
        .read_to_end(&mut out)
        .map_err(|e| PtError::Zip(format!("entry {name}: {e}")))?;
    if out.len() as u64 != size {
        return Err(PtError::Zip(format!(
            "entry {name}: {} of {size} bytes",
            out.len()
        )));
    }
    // Reading to the end makes the zip reader check the CRC-32.
    let mut rest = [0u8; 1];
    match f.read(&mut rest) {
        Ok(0) => {}
        Ok(_) => return Err(PtError::Zip(format!("entry {name}: longer than declared"))),
        Err(e) => return Err(PtError::Zip(format!("entry {name}: {e}"))),
    }
    Ok(out)
}

// ----------------------------------------------------------------------------------------
// The pickle virtual machine.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildFromTypeV2,
    Storage(DType),
    /// `torch.Tensor` / `torch.nn.parameter.Parameter`: only usable as `new_type` of
    /// `_rebuild_from_type_v2`.
    TensorType,
}

fn lookup_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch", "Tensor") | ("torch.nn.parameter", "Parameter") => Global::TensorType,
        ("torch", s) => Global::Storage(match s {
            "DoubleStorage" => DType::F64,
            "FloatStorage" => DType::F32,
            "HalfStorage" => DType::F16,
            "BFloat16Storage" => DType::BF16,
            "LongStorage" => DType::I64,
            "IntStorage" => DType::I32,
            "ShortStorage" => DType::I16,
            "CharStorage" => DType::I8,
            "ByteStorage" => DType::U8,
            "BoolStorage" => DType::Bool,
            _ => return None,
        }),
        _ => return None,
    })
}

#[derive(Debug, Clone)]
struct StorageRef {
    dtype: DType,
    key: String,
    numel: usize,
}

#[derive(Debug, Clone)]
struct TensorMeta {
    storage: StorageRef,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
}

/// Objects live in an arena and refer to each other by index, so shared and even cyclic
/// references (through the memo) need no reference counting and never recurse on drop.
#[derive(Debug)]
enum Obj {
    None,
    Bool(bool),
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<usize>),
    List(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(Global),
    Storage(StorageRef),
    Tensor(Box<TensorMeta>),
}

impl Obj {
    fn kind(&self) -> &'static str {
        match self {
            Obj::None => "None",
            Obj::Bool(_) => "bool",
            Obj::Int(_) => "int",
            Obj::Float => "float",
            Obj::Str(_) => "str",
            Obj::Bytes => "bytes",
            Obj::Tuple(_) => "tuple",
            Obj::List(_) => "list",
            Obj::Dict(_) => "dict",
            Obj::Global(_) => "global",
            Obj::Storage(_) => "storage",
            Obj::Tensor(_) => "tensor",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Item {
    Mark,
    Obj(usize),
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    op_at: usize,
    objs: Vec<Obj>,
    stack: Vec<Item>,
    memo: HashMap<u64, usize>,
}

impl<'a> Vm<'a> {
    fn err(&self, msg: impl Into<String>) -> PtError {
        PtError::Pickle {
            offset: self.op_at,
            msg: msg.into(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], PtError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| self.err(format!("truncated: needs {n} more bytes")))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, PtError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PtError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PtError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, PtError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn len_arg(&mut self, n: u64) -> Result<usize, PtError> {
        if n > (self.data.len() - self.pos) as u64 {
            return Err(self.err(format!("length {n} runs past the end of the pickle")));
        }
        Ok(n as usize)
    }

    fn line(&mut self) -> Result<String, PtError> {
        let rest = &self.data[self.pos..];
        let nl = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("truncated: unterminated line"))?;
        let s = std::str::from_utf8(&rest[..nl])
            .map_err(|_| self.err("invalid UTF-8 in GLOBAL"))?
            .to_owned();
        self.pos += nl + 1;
        Ok(s)
    }

    fn new_obj(&mut self, o: Obj) -> usize {
        self.objs.push(o);
        self.objs.len() - 1
    }

    fn push(&mut self, o: Obj) {
        let h = self.new_obj(o);
        self.stack.push(Item::Obj(h));
    }

    fn pop(&mut self) -> Result<usize, PtError> {
        match self.stack.pop() {
            Some(Item::Obj(h)) => Ok(h),
            Some(Item::Mark) => Err(self.err("unexpected MARK on the stack")),
            None => Err(self.err("stack underflow")),
        }
    }

    fn top(&self) -> Result<usize, PtError> {
        match self.stack.last() {
            Some(Item::Obj(h)) => Ok(*h),
            Some(Item::Mark) => Err(self.err("unexpected MARK on the stack")),
            None => Err(self.err("stack underflow")),
        }
    }

    /// Pops everything above the topmost MARK, and the MARK.
    fn pop_mark(&mut self) -> Result<Vec<usize>, PtError> {
        let m = self
            .stack
            .iter()
            .rposition(|i| matches!(i, Item::Mark))
            .ok_or_else(|| self.err("no MARK on the stack"))?;
        let items = self.stack.split_off(m + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|i| match i {
                Item::Obj(h) => h,
                Item::Mark => unreachable!("rposition found the last mark"),
            })
            .collect())
    }

    fn memo_put(&mut self, idx: u64) -> Result<(), PtError> {
        let h = self.top()?;
        self.memo.insert(idx, h);
        Ok(())
    }

    fn memo_get(&mut self, idx: u64) -> Result<(), PtError> {
        let h = *self
            .memo
            .get(&idx)
            .ok_or_else(|| self.err(format!("memo entry {idx} missing")))?;
        self.stack.push(Item::Obj(h));
        Ok(())
    }

    fn int(&self, h: usize, what: &str) -> Result<i64, PtError> {
        match &self.objs[h] {
            Obj::Int(v) => Ok(*v),
            Obj::Bool(b) => Ok(*b as i64),
            o => Err(self.err(format!("{what}: expected int, found {}", o.kind()))),
        }
    }

    fn usize(&self, h: usize, what: &str) -> Result<usize, PtError> {
        let v = self.int(h, what)?;
        usize::try_from(v).map_err(|_| self.err(format!("{what}: {v} is negative")))
    }

    fn str(&self, h: usize, what: &str) -> Result<&str, PtError> {
        match &self.objs[h] {
            Obj::Str(s) => Ok(s),
            o => Err(self.err(format!("{what}: expected str, found {}", o.kind()))),
        }
    }

    fn tuple(&self, h: usize, what: &str) -> Result<Vec<usize>, PtError> {
        match &self.objs[h] {
            Obj::Tuple(v) | Obj::List(v) => Ok(v.clone()),
            o => Err(self.err(format!("{what}: expected tuple, found {}", o.kind()))),
        }
    }

    fn persistent_load(&mut self, pid: usize) -> Result<Obj, PtError> {
        let t = self.tuple(pid, "persistent id")?;
        if t.len() != 5 {
            return Err(self.err(format!("persistent id has {} fields, expected 5", t.len())));
        }
        if self.str(t[0], "persistent id tag")? != "storage" {
            return Err(self.err("persistent id is not a 'storage' record"));
        }
        let dtype = match &self.objs[t[1]] {
            Obj::Global(Global::Storage(d)) => *d,
            o => {
                return Err(self.err(format!(
                    "persistent id: expected a torch storage type, found {}",
                    o.kind()
                )));
            }
        };
        let key = self.str(t[2], "storage key")?.to_owned();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(self.err(format!("storage key {key:?} is not a plain name")));
        }
        self.str(t[3], "storage location")?;
        let numel = self.usize(t[4], "storage size")?;
        Ok(Obj::Storage(StorageRef { dtype, key, numel }))
    }

    fn rebuild_tensor(&self, args: &[usize]) -> Result<Obj, PtError> {
        if args.len() < 4 {
            return Err(self.err(format!(
                "_rebuild_tensor_v2 takes at least 4 arguments, got {}",
                args.len()
            )));
        }
        let storage = match &self.objs[args[0]] {
            Obj::Storage(s) => s.clone(),
            o => {
                return Err(self.err(format!(
                    "_rebuild_tensor_v2: expected a storage, found {}",
                    o.kind()
                )));
            }
        };
        let offset = self.usize(args[1], "storage offset")?;
        let size_h = self.tuple(args[2], "tensor size")?;
        let stride_h = self.tuple(args[3], "tensor stride")?;
        if size_h.len() != stride_h.len() || size_h.len() > MAX_DIMS {
            return Err(self.err(format!(
                "tensor with {} sizes and {} strides",
                size_h.len(),
                stride_h.len()
            )));
        }
        let size = size_h
            .iter()
            .map(|&h| self.usize(h, "tensor size"))
            .collect::<Result<Vec<_>, _>>()?;
        let stride = stride_h
            .iter()
            .map(|&h| self.usize(h, "tensor stride"))
            .collect::<Result<Vec<_>, _>>()?;
        let n = size
            .iter()
            .try_fold(1usize, |a, &s| a.checked_mul(s))
            .ok_or_else(|| self.err("tensor element count overflows"))?;
        if n > storage.numel {
            // Only broadcast (stride-0) views can be larger than their storage; they are
            // not state-dict material, and would let a tiny file demand a huge buffer.
            return Err(self.err(format!(
                "tensor view of {n} elements over a storage of {}",
                storage.numel
            )));
        }
        if n > 0 {
            let mut last = offset;
            for (&s, &st) in size.iter().zip(&stride) {
                last = (s - 1)
                    .checked_mul(st)
                    .and_then(|x| x.checked_add(last))
                    .ok_or_else(|| self.err("tensor view overflows"))?;
            }
            if last >= storage.numel {
                return Err(self.err(format!(
                    "tensor view reaches element {last} of storage {} with {} elements",
                    storage.key, storage.numel
                )));
            }
        }
        Ok(Obj::Tensor(Box::new(TensorMeta {
            storage,
            offset,
            size,
            stride,
        })))
    }

    fn apply(&mut self, f: Global, args: &[usize], depth: u32) -> Result<usize, PtError> {
        match f {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err(self.err("OrderedDict() with arguments"));
                }
                Ok(self.new_obj(Obj::Dict(Vec::new())))
            }
            Global::RebuildTensorV2 => {
                let t = self.rebuild_tensor(args)?;
                Ok(self.new_obj(t))
            }
            Global::RebuildParameter => match args.first() {
                Some(&h) if matches!(self.objs[h], Obj::Tensor(_)) => Ok(h),
                _ => Err(self.err("_rebuild_parameter without a tensor")),
            },
            Global::RebuildFromTypeV2 => {
                if depth > 0 || args.len() != 4 {
                    return Err(self.err("bad _rebuild_from_type_v2 call"));
                }
                let func = match &self.objs[args[0]] {
                    Obj::Global(g @ (Global::RebuildTensorV2 | Global::RebuildParameter)) => *g,
                    _ => return Err(self.err("_rebuild_from_type_v2 of a non-tensor function")),
                };
                if !matches!(self.objs[args[1]], Obj::Global(Global::TensorType)) {
                    return Err(self.err("_rebuild_from_type_v2 with an unknown type"));
                }
                let inner = self.tuple(args[2], "_rebuild_from_type_v2 arguments")?;
                self.apply(func, &inner, depth + 1)
            }
            Global::Storage(_) | Global::TensorType => {
                Err(self.err("calling a torch type is not supported"))
            }
        }
    }

    fn run(&mut self) -> Result<usize, PtError> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    self.u64()?;
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Item::Mark),
                b'0' => {
                    self.stack
                        .pop()
                        .ok_or_else(|| self.err("stack underflow"))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let h = self.top()?;
                    self.stack.push(Item::Obj(h));
                }
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(Obj::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Obj::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(Obj::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let n = self.len_arg(n)?;
                    if n > 8 {
                        return Err(self.err(format!("integer of {n} bytes is too large")));
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &x) in b.iter().enumerate() {
                        v |= (x as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Obj::Int(v));
                }
                b'G' => {
                    self.take(8)?;
                    self.push(Obj::Float);
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => self.u32()? as u64,
                        0x8c => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len_arg(n)?;
                    let b = self.take(n)?;
                    let s = std::str::from_utf8(b)
                        .map_err(|_| self.err("invalid UTF-8 string"))?
                        .to_owned();
                    self.push(Obj::Str(s));
                }
                b'U' | b'T' => {
                    let n = if op == b'U' {
                        self.u8()? as u64
                    } else {
                        self.u32()? as u64
                    };
                    let n = self.len_arg(n)?;
                    let b = self.take(n)?;
                    // Protocol-2 byte strings: Latin-1 text.
                    let s: String = b.iter().map(|&c| c as char).collect();
                    self.push(Obj::Str(s));
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => self.u32()? as u64,
                        b'C' => self.u8()? as u64,
                        _ => self.u64()?,
                    };
                    let n = self.len_arg(n)?;
                    self.take(n)?;
                    self.push(Obj::Bytes);
                }
                b')' => self.push(Obj::Tuple(Vec::new())),
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut v = Vec::with_capacity(n);
                    for _ in 0..n {
                        v.push(self.pop()?);
                    }
                    v.reverse();
                    self.push(Obj::Tuple(v));
                }
                b't' => {
                    let v = self.pop_mark()?;
                    self.push(Obj::Tuple(v));
                }
                b']' => self.push(Obj::List(Vec::new())),
                b'l' => {
                    let v = self.pop_mark()?;
                    self.push(Obj::List(v));
                }
                b'a' | b'e' => {
                    let items = if op == b'a' {
                        vec![self.pop()?]
                    } else {
                        self.pop_mark()?
                    };
                    let l = self.top()?;
                    match &mut self.objs[l] {
                        Obj::List(v) => v.extend(items),
                        o => {
                            let k = o.kind();
                            return Err(self.err(format!("APPEND to a {k}")));
                        }
                    }
                }
                b'}' => self.push(Obj::Dict(Vec::new())),
                b'd' | b's' | b'u' => {
                    let items = match op {
                        b's' => {
                            let v = self.pop()?;
                            let k = self.pop()?;
                            vec![k, v]
                        }
                        _ => self.pop_mark()?,
                    };
                    if items.len() % 2 != 0 {
                        return Err(self.err("odd number of items for a dict"));
                    }
                    let pairs: Vec<(usize, usize)> =
                        items.chunks_exact(2).map(|c| (c[0], c[1])).collect();
                    if op == b'd' {
                        self.push(Obj::Dict(pairs));
                    } else {
                        let d = self.top()?;
                        match &mut self.objs[d] {
                            Obj::Dict(v) => v.extend(pairs),
                            o => {
                                let k = o.kind();
                                return Err(self.err(format!("SETITEM on a {k}")));
                            }
                        }
                    }
                }
                b'c' | 0x93 => {
                    let (module, name) = if op == b'c' {
                        let m = self.line()?;
                        let n = self.line()?;
                        (m, n)
                    } else {
                        let n = self.pop()?;
                        let m = self.pop()?;
                        (
                            self.str(m, "STACK_GLOBAL module")?.to_owned(),
                            self.str(n, "STACK_GLOBAL name")?.to_owned(),
                        )
                    };
                    let g = lookup_global(&module, &name).ok_or(PtError::RefusedGlobal {
                        offset: self.op_at,
                        module,
                        name,
                    })?;
                    self.push(Obj::Global(g));
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let args = match &self.objs[args] {
                        Obj::Tuple(v) => v.clone(),
                        o => {
                            let k = o.kind();
                            return Err(self.err(format!("REDUCE with {k} arguments")));
                        }
                    };
                    let g = match &self.objs[f] {
                        Obj::Global(g) => *g,
                        o => {
                            let k = o.kind();
                            return Err(self.err(format!("REDUCE of a {k}")));
                        }
                    };
                    let h = self.apply(g, &args, 0)?;
                    self.stack.push(Item::Obj(h));
                }
                b'b' => {
                    self.pop()?;
                    let t = self.top()?;
                    // State of a state dict (its `_metadata`) or a tensor: not needed.
                    if !matches!(self.objs[t], Obj::Dict(_) | Obj::Tensor(_)) {
                        let k = self.objs[t].kind();
                        return Err(self.err(format!("BUILD on a {k}")));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = self.persistent_load(pid)?;
                    self.push(s);
                }
                b'q' => {
                    let i = self.u8()? as u64;
                    self.memo_put(i)?;
                }
                b'r' => {
                    let i = self.u32()? as u64;
                    self.memo_put(i)?;
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?;
                }
                b'h' => {
                    let i = self.u8()? as u64;
                    self.memo_get(i)?;
                }
                b'j' => {
                    let i = self.u32()? as u64;
                    self.memo_get(i)?;
                }
                _ => {
                    return Err(PtError::UnsupportedOpcode {
                        offset: self.op_at,
                        opcode: op,
                    });
                }
            }
        }
    }
}

/// Runs a pickle to its end: the machine (its objects) and the root object's handle.
fn unpickle(pickle: &[u8]) -> Result<(Vm<'_>, usize), PtError> {
    let mut vm = Vm {
        data: pickle,
        pos: 0,
        op_at: 0,
        objs: Vec::new(),
        stack: Vec::new(),
        memo: HashMap::new(),
    };
    let root = vm.run()?;
    Ok((vm, root))
}

fn tensor_info(name: String, t: &TensorMeta) -> PtTensorInfo {
    PtTensorInfo {
        name,
        dtype: t.storage.dtype,
        shape: t.size.clone(),
        strides: t.stride.clone(),
        storage_offset: t.offset,
        storage_key: t.storage.key.clone(),
        storage_numel: t.storage.numel,
    }
}

/// Runs a `torch.save` pickle whose root is one bare tensor and returns where its elements
/// live (name empty). A root of any other kind (a state dict, a list, ...) is
/// [`PtError::NotTensor`].
///
/// Public for testing hand-made pickles; [`PtFile::open_tensor`] is the normal entry point.
pub fn unpickle_tensor(pickle: &[u8]) -> Result<PtTensorInfo, PtError> {
    let (vm, root) = unpickle(pickle)?;
    match &vm.objs[root] {
        Obj::Tensor(t) => Ok(tensor_info(String::new(), t)),
        Obj::Dict(_) => Err(PtError::NotTensor(
            "the pickle holds a dict (a state dict, as in a predictor's model_{i}.pt), not one tensor"
                .to_owned(),
        )),
        o => Err(PtError::NotTensor(format!(
            "the pickle holds a {}, not a tensor",
            o.kind()
        ))),
    }
}

/// Runs a `torch.save` pickle and returns its `{name: tensor}` entries in order.
///
/// Public for testing hand-made pickles; [`PtFile`] is the normal entry point.
pub fn unpickle_state_dict(pickle: &[u8]) -> Result<Vec<PtTensorInfo>, PtError> {
    let (vm, root) = unpickle(pickle)?;
    let entries = match &vm.objs[root] {
        Obj::Dict(e) => e.clone(),
        o => {
            return Err(PtError::NotStateDict(format!(
                "the pickle holds a {}, not a dict{}",
                o.kind(),
                if matches!(o, Obj::Tensor(_)) {
                    " (a bare tensor, as in the reference's activation_{i}.pt)"
                } else {
                    ""
                }
            )));
        }
    };
    let mut out: Vec<PtTensorInfo> = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::new();
    for (k, v) in entries {
        let name = match &vm.objs[k] {
            Obj::Str(s) => s.clone(),
            o => return Err(PtError::NotStateDict(format!("a {} key", o.kind()))),
        };
        let t = match &vm.objs[v] {
            Obj::Tensor(t) => t,
            o => {
                return Err(PtError::NotStateDict(format!(
                    "entry {name:?} is a {}, not a tensor",
                    o.kind()
                )));
            }
        };
        if !seen.insert(name.clone()) {
            return Err(PtError::NotStateDict(format!("duplicate entry {name:?}")));
        }
        out.push(tensor_info(name, t));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protocol-2 pickle of `OrderedDict(w=tensor)` with the given storage/view.
    fn state_dict_pickle(size: &[u8], stride: &[u8], offset: u8, numel: u8) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend_from_slice(b"ccollections\nOrderedDict\n)R(");
        p.extend_from_slice(b"X\x01\x00\x00\x00w");
        p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        p.extend_from_slice(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK");
        p.push(numel);
        p.extend_from_slice(b"tQK");
        p.push(offset);
        p.push(b'(');
        for &s in size {
            p.extend_from_slice(&[b'K', s]);
        }
        p.extend_from_slice(b"t(");
        for &s in stride {
            p.extend_from_slice(&[b'K', s]);
        }
        p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtRu.");
        p
    }

    #[test]
    fn parses_minimal_state_dict() {
        let t = unpickle_state_dict(&state_dict_pickle(&[2, 3], &[3, 1], 1, 7)).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "w");
        assert_eq!(t[0].shape, vec![2, 3]);
        assert_eq!(t[0].strides, vec![3, 1]);
        assert_eq!(t[0].storage_offset, 1);
        assert_eq!(t[0].dtype, DType::F32);
    }

    #[test]
    fn view_outside_storage_is_refused() {
        // Last element index 1 + 5 = 6 >= numel 6.
        let e = unpickle_state_dict(&state_dict_pickle(&[2, 3], &[3, 1], 1, 6)).unwrap_err();
        assert!(e.to_string().contains("reaches element 6"), "{e}");
    }

    #[test]
    fn broadcast_views_larger_than_storage_are_refused() {
        // 200 x 200 elements with strides (0, 0) over a 1-element storage.
        let e = unpickle_state_dict(&state_dict_pickle(&[200, 200], &[0, 0], 0, 1)).unwrap_err();
        assert!(
            e.to_string().contains("40000 elements over a storage of 1"),
            "{e}"
        );
    }

    #[test]
    fn refuses_globals_outside_allow_list() {
        let p = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.";
        match unpickle_state_dict(p) {
            Err(PtError::RefusedGlobal { module, name, .. }) => {
                assert_eq!((module.as_str(), name.as_str()), ("os", "system"));
            }
            other => panic!("{other:?}"),
        }
        let p = b"\x80\x02X\x08\x00\x00\x00builtinsX\x04\x00\x00\x00eval\x93.";
        assert!(matches!(
            unpickle_state_dict(p),
            Err(PtError::RefusedGlobal { .. })
        ));
        // NEWOBJ / INST / OBJ are not implemented.
        assert!(matches!(
            unpickle_state_dict(b"\x80\x02)\x81."),
            Err(PtError::UnsupportedOpcode { opcode: 0x81, .. })
        ));
    }

    #[test]
    fn malformed_pickles_are_errors() {
        let cases: &[&[u8]] = &[
            b"",
            b"\x80",
            b"\x80\x02",
            b"\x80\x02.",
            b"\x80\x02(.",
            b"\x80\x02h\x05.",
            b"\x80\x02X\xff\xff\xff\xff.",
            b"\x80\x02\x8b\xff\xff\xff\x7f.",
            b"\x80\x02K\x01K\x02s.",
            b"\x80\x02}K\x01a.",
            b"\x80\x02N.",
            b"\x80\x02}K\x01K\x02s.",
            b"\x80\x02cos\n",
            b"\x80\x02t.",
            b"\x80\x02(K\x01\x80\x09",
            b"\x80\x02]q\x00h\x00ah\x00b.",
        ];
        for c in cases {
            assert!(unpickle_state_dict(c).is_err(), "{c:?}");
        }
        // Every prefix of a good pickle fails cleanly.
        let good = state_dict_pickle(&[2, 3], &[3, 1], 0, 6);
        for n in 0..good.len() {
            assert!(unpickle_state_dict(&good[..n]).is_err());
        }
    }

    #[test]
    fn long_ints_are_sign_extended() {
        // LONG1 with 2 bytes 0xff 0xff = -1 as storage offset -> negative error.
        let mut p = state_dict_pickle(&[1], &[1], 0, 1);
        let at = p.windows(2).position(|w| w == b"K\x00").unwrap();
        p.splice(at..at + 2, [0x8a, 2, 0xff, 0xff]);
        let e = unpickle_state_dict(&p).unwrap_err();
        assert!(e.to_string().contains("-1 is negative"), "{e}");
    }
}
