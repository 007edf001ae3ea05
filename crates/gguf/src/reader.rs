//! The zero-copy reader: [`GgufFile`] and [`TensorInfo`].

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use crate::error::{GgufError, MetadataError};
use crate::types::{GgmlType, Magic};
use crate::value::{Array, StringArray, Value, ValueType};

/// Deepest array nesting accepted (an array of scalars is depth 1).
pub const MAX_ARRAY_DEPTH: usize = 8;

/// Most array elements (summed over all arrays, nested ones included) one file may hold.
///
/// Real vocabularies stay below a few million entries; the limit keeps a corrupted count from
/// making the parser turn gigabytes of tensor data into metadata values.
pub const MAX_ARRAY_ELEMENTS: u64 = 1 << 24;

/// Capacity reserved up front for a count read from the file; beyond this, vectors grow as
/// items are actually parsed, so a corrupted count never drives an allocation by itself.
const MAX_PREALLOC: usize = 1 << 12;

/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// Alignment of the data section and of every tensor when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Largest `general.alignment` accepted (16 MiB). Real files use 32; the cap keeps a
/// corrupted value from making a writer pad a copy of the file with gigabytes of zeros.
pub const MAX_ALIGNMENT: u64 = 1 << 24;

/// The key that overrides the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// One tensor's header entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// Dimensions in ggml `ne` order: `shape[0]` is the row length (contiguous elements).
    pub shape: Vec<u64>,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Bytes of data (`shape` x type size).
    pub size: u64,
}

impl TensorInfo {
    /// Total number of elements (1 for a tensor with no dimensions).
    pub fn n_elements(&self) -> u64 {
        self.shape.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Elements per row (`shape[0]`, or 1 for a tensor with no dimensions).
    pub fn row_len(&self) -> u64 {
        self.shape.first().copied().unwrap_or(1)
    }

    /// Number of rows: the product of `shape[1..]`.
    pub fn n_rows(&self) -> u64 {
        self.shape
            .iter()
            .skip(1)
            .fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> u64 {
        (self.row_len() / self.ty.block_size() as u64).saturating_mul(self.ty.type_size() as u64)
    }
}

enum Backing {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mmap(m) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A parsed GGUF or PWRI file: header, metadata and tensor directory, with zero-copy access to
/// the tensor data (memory-mapped by [`GgufFile::open`], or an owned buffer).
///
/// Parsing validates everything before anything is returned, so every [`TensorInfo`] of a
/// `GgufFile` describes an in-bounds, aligned, non-overlapping byte range.
pub struct GgufFile {
    data: Backing,
    magic: Magic,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("magic", &self.magic)
            .field("version", &self.version)
            .field("file_size", &self.file_size())
            .field("alignment", &self.alignment)
            .field("n_kv", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses a file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this value. Like every mmap-based model
        // loader, we rely on the file not being truncated or rewritten while it is mapped; that
        // is a documented precondition of `open`.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::parse(Backing::Mmap(map))
    }

    /// Parses a file held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
        Self::parse(Backing::Owned(bytes))
    }

    fn parse(data: Backing) -> Result<GgufFile, GgufError> {
        let h = parse_header(data.bytes())?;
        Ok(GgufFile {
            data,
            magic: h.magic,
            version: h.version,
            alignment: h.alignment,
            data_offset: h.data_offset,
            metadata: h.metadata,
            key_index: h.key_index,
            tensors: h.tensors,
            tensor_index: h.tensor_index,
        })
    }

    /// The file flavour (which also decides the type id numbering).
    pub fn magic(&self) -> Magic {
        self.magic
    }

    /// The format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Size of the whole file in bytes.
    pub fn file_size(&self) -> u64 {
        self.data.bytes().len() as u64
    }

    /// The alignment of the data section and tensors: `general.alignment`, default 32.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the data section (the aligned end of the header).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// `general.architecture`, if present and a string.
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// All key/value pairs, in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The value of a key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn require(&self, key: &str) -> Result<&Value, MetadataError> {
        self.get(key).ok_or_else(|| MetadataError::Missing {
            key: key.to_owned(),
        })
    }

    fn get_int<T: TryFrom<i128>>(
        &self,
        key: &str,
        expected: &'static str,
    ) -> Result<T, MetadataError> {
        let v = self.require(key)?;
        let wide = v.as_i128().ok_or_else(|| MetadataError::WrongType {
            key: key.to_owned(),
            expected,
            found: v.type_name(),
        })?;
        T::try_from(wide).map_err(|_| MetadataError::OutOfRange {
            key: key.to_owned(),
            expected,
            value: wide.to_string(),
        })
    }

    /// An integer key as u32; any integer value type whose value fits is accepted.
    pub fn get_u32(&self, key: &str) -> Result<u32, MetadataError> {
        self.get_int(key, "u32")
    }

    /// An integer key as u64; any integer value type whose value fits is accepted.
    pub fn get_u64(&self, key: &str) -> Result<u64, MetadataError> {
        self.get_int(key, "u64")
    }

    /// An integer key as i32; any integer value type whose value fits is accepted.
    pub fn get_i32(&self, key: &str) -> Result<i32, MetadataError> {
        self.get_int(key, "i32")
    }

    /// An integer key as i64; any integer value type whose value fits is accepted.
    pub fn get_i64(&self, key: &str) -> Result<i64, MetadataError> {
        self.get_int(key, "i64")
    }

    /// A float key as f32 (from an `f32` or a rounded `f64`).
    pub fn get_f32(&self, key: &str) -> Result<f32, MetadataError> {
        let v = self.require(key)?;
        v.as_f32().ok_or_else(|| MetadataError::WrongType {
            key: key.to_owned(),
            expected: "f32",
            found: v.type_name(),
        })
    }

    /// A bool key.
    pub fn get_bool(&self, key: &str) -> Result<bool, MetadataError> {
        let v = self.require(key)?;
        v.as_bool().ok_or_else(|| MetadataError::WrongType {
            key: key.to_owned(),
            expected: "bool",
            found: v.type_name(),
        })
    }

    /// A string key.
    pub fn get_str(&self, key: &str) -> Result<&str, MetadataError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| MetadataError::WrongType {
            key: key.to_owned(),
            expected: "string",
            found: v.type_name(),
        })
    }

    /// An array key's value.
    pub fn get_array(&self, key: &str) -> Result<&Array, MetadataError> {
        let v = self.require(key)?;
        v.as_array().ok_or_else(|| MetadataError::WrongType {
            key: key.to_owned(),
            expected: "array",
            found: v.type_name(),
        })
    }

    fn wrong_elements(key: &str, expected: &'static str, a: &Array) -> MetadataError {
        MetadataError::WrongType {
            key: key.to_owned(),
            expected,
            found: a.element_type().name(),
        }
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`) as a list of borrowed `&str` (one
    /// pointer and length per element; the text is not copied). [`get_strings`](Self::get_strings)
    /// gives the packed array itself without any allocation.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, MetadataError> {
        self.get_strings(key).map(|s| s.iter().collect())
    }

    /// An array of strings, without copying or allocating. An empty array of any element type
    /// reads as an empty string array.
    pub fn get_strings(&self, key: &str) -> Result<&StringArray, MetadataError> {
        static EMPTY: StringArray = StringArray::new();
        let a = self.get_array(key)?;
        match a {
            Array::String(s) => Ok(s),
            a if a.is_empty() => Ok(&EMPTY),
            a => Err(Self::wrong_elements(key, "array of string", a)),
        }
    }

    /// An array of floats: borrowed for `f32` elements, converted (rounded) for `f64`. An empty
    /// array of any element type reads as empty.
    pub fn get_f32_array(&self, key: &str) -> Result<Cow<'_, [f32]>, MetadataError> {
        match self.get_array(key)? {
            Array::F32(v) => Ok(Cow::Borrowed(v)),
            Array::F64(v) => Ok(Cow::Owned(v.iter().map(|&x| x as f32).collect())),
            a if a.is_empty() => Ok(Cow::Borrowed(&[])),
            a => Err(Self::wrong_elements(key, "array of f32", a)),
        }
    }

    /// An array of integers that all fit in an i32 (e.g. `tokenizer.ggml.token_type`):
    /// borrowed for `i32` elements, converted for other integer types. An empty array of any
    /// element type reads as empty.
    pub fn get_i32_array(&self, key: &str) -> Result<Cow<'_, [i32]>, MetadataError> {
        let a = self.get_array(key)?;
        match a {
            Array::I32(v) => return Ok(Cow::Borrowed(v)),
            a if a.is_empty() => return Ok(Cow::Borrowed(&[])),
            _ => {}
        }
        (0..a.len())
            .map(|i| match a.int_at(i) {
                None => Err(Self::wrong_elements(key, "array of i32", a)),
                Some(w) => i32::try_from(w).map_err(|_| MetadataError::OutOfRange {
                    key: key.to_owned(),
                    expected: "i32",
                    value: w.to_string(),
                }),
            })
            .collect::<Result<Vec<i32>, _>>()
            .map(Cow::Owned)
    }

    /// `"{arch}.{suffix}"`, e.g. `"llama.block_count"`. Without a `general.architecture` string
    /// the key is `suffix` alone.
    pub fn arch_key(&self, suffix: &str) -> String {
        match self.architecture() {
            Some(a) => format!("{a}.{suffix}"),
            None => suffix.to_owned(),
        }
    }

    fn require_arch(&self) -> Result<(), MetadataError> {
        match self.get("general.architecture") {
            None => Err(MetadataError::Missing {
                key: "general.architecture".to_owned(),
            }),
            Some(Value::String(_)) => Ok(()),
            Some(v) => Err(MetadataError::WrongType {
                key: "general.architecture".to_owned(),
                expected: "string",
                found: v.type_name(),
            }),
        }
    }

    /// [`get_u32`](Self::get_u32) of [`arch_key`](Self::arch_key)`(suffix)`.
    pub fn get_arch_u32(&self, suffix: &str) -> Result<u32, MetadataError> {
        self.require_arch()?;
        self.get_u32(&self.arch_key(suffix))
    }

    /// [`get_u64`](Self::get_u64) of [`arch_key`](Self::arch_key)`(suffix)`.
    pub fn get_arch_u64(&self, suffix: &str) -> Result<u64, MetadataError> {
        self.require_arch()?;
        self.get_u64(&self.arch_key(suffix))
    }

    /// [`get_f32`](Self::get_f32) of [`arch_key`](Self::arch_key)`(suffix)`.
    pub fn get_arch_f32(&self, suffix: &str) -> Result<f32, MetadataError> {
        self.require_arch()?;
        self.get_f32(&self.arch_key(suffix))
    }

    /// [`get_str`](Self::get_str) of [`arch_key`](Self::arch_key)`(suffix)`.
    pub fn get_arch_str(&self, suffix: &str) -> Result<&str, MetadataError> {
        self.require_arch()?;
        self.get_str(&self.arch_key(suffix))
    }

    /// [`get_bool`](Self::get_bool) of [`arch_key`](Self::arch_key)`(suffix)`.
    pub fn get_arch_bool(&self, suffix: &str) -> Result<bool, MetadataError> {
        self.require_arch()?;
        self.get_bool(&self.arch_key(suffix))
    }

    /// All tensors, in file (header) order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The data bytes of a tensor of this file (zero-copy).
    ///
    /// # Panics
    /// If `t` is not a tensor of this file and its range lies outside the file; tensors
    /// returned by this file's own [`tensors`](Self::tensors) / [`tensor`](Self::tensor) are
    /// always in bounds.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let range = usize::try_from(t.offset)
            .ok()
            .zip(
                t.offset
                    .checked_add(t.size)
                    .and_then(|e| usize::try_from(e).ok()),
            )
            .and_then(|(s, e)| self.data.bytes().get(s..e));
        match range {
            Some(r) => r,
            None => panic!(
                "tensor {:?} ({}..+{}) is not a tensor of this {}-byte file",
                t.name,
                t.offset,
                t.size,
                self.file_size()
            ),
        }
    }

    /// The data bytes of a tensor by name (zero-copy).
    pub fn tensor_bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensor(name).map(|t| self.tensor_data(t))
    }

    /// The raw bytes of the whole file.
    pub fn as_bytes(&self) -> &[u8] {
        self.data.bytes()
    }
}

struct Header {
    magic: Magic,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: Vec<(String, Value)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

/// A bounds-checked little-endian reader over the file bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Array elements still allowed (see [`MAX_ARRAY_ELEMENTS`]).
    budget: u64,
}

impl<'a> Cursor<'a> {
    fn offset(&self) -> u64 {
        self.pos as u64
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(GgufError::Truncated {
                what,
                offset: self.offset(),
            });
        }
        // `n <= remaining`, so it fits in usize and the slice is in bounds.
        let n = n as usize;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, GgufError> {
        self.array(what).map(u16::from_le_bytes)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Reads a u64 count and checks that `count` items of at least `min_size` bytes fit.
    fn count(&mut self, what: &'static str, min_size: u64) -> Result<u64, GgufError> {
        let offset = self.offset();
        let n = self.u64(what)?;
        if n.checked_mul(min_size).is_none_or(|b| b > self.remaining()) {
            return Err(GgufError::LengthTooLarge {
                what,
                len: n,
                offset,
            });
        }
        Ok(n)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.count(what, 1)?;
        let at = self.offset();
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::InvalidUtf8 { what, offset: at }),
        }
    }

    fn value(&mut self, key: &str, ty: ValueType, depth: usize) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8("u8 value")?),
            ValueType::I8 => Value::I8(self.u8("i8 value")? as i8),
            ValueType::U16 => Value::U16(self.u16("u16 value")?),
            ValueType::I16 => Value::I16(self.u16("i16 value")? as i16),
            ValueType::U32 => Value::U32(self.u32("u32 value")?),
            ValueType::I32 => Value::I32(self.u32("i32 value")? as i32),
            ValueType::F32 => Value::F32(f32::from_bits(self.u32("f32 value")?)),
            ValueType::U64 => Value::U64(self.u64("u64 value")?),
            ValueType::I64 => Value::I64(self.u64("i64 value")? as i64),
            ValueType::F64 => Value::F64(f64::from_bits(self.u64("f64 value")?)),
            ValueType::Bool => {
                let offset = self.offset();
                match self.u8("bool value")? {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    value => {
                        return Err(GgufError::InvalidBool {
                            key: key.to_owned(),
                            value,
                            offset,
                        });
                    }
                }
            }
            ValueType::String => Value::String(self.string("string value")?),
            ValueType::Array => Value::Array(self.array_value(key, depth)?),
        })
    }

    /// Reads `n` fixed-size little-endian elements (the count was checked against the file).
    fn fixed<const N: usize, T>(
        &mut self,
        n: u64,
        what: &'static str,
        conv: fn([u8; N]) -> T,
    ) -> Result<Vec<T>, GgufError> {
        let bytes = self.take(n.saturating_mul(N as u64), what)?;
        Ok(bytes
            .chunks_exact(N)
            .map(|c| {
                let mut a = [0u8; N];
                a.copy_from_slice(c);
                conv(a)
            })
            .collect())
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<Array, GgufError> {
        let offset = self.offset();
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::ArrayTooDeep {
                key: key.to_owned(),
                max: MAX_ARRAY_DEPTH,
                offset,
            });
        }
        let elem = self.value_type(key, "array element type")?;
        let len_offset = self.offset();
        // `count` checks that `n` elements of at least their minimum size fit in the rest of
        // the file, so the typed reads below never allocate more than the file holds.
        let n = self.count("array length", elem.min_size())?;
        self.budget =
            self.budget
                .checked_sub(n)
                .ok_or_else(|| GgufError::TooManyArrayElements {
                    key: key.to_owned(),
                    limit: MAX_ARRAY_ELEMENTS,
                    offset: len_offset,
                })?;
        const W: &str = "array elements";
        Ok(match elem {
            ValueType::U8 => Array::U8(self.fixed(n, W, |[b]: [u8; 1]| b)?),
            ValueType::I8 => Array::I8(self.fixed(n, W, i8::from_le_bytes)?),
            ValueType::U16 => Array::U16(self.fixed(n, W, u16::from_le_bytes)?),
            ValueType::I16 => Array::I16(self.fixed(n, W, i16::from_le_bytes)?),
            ValueType::U32 => Array::U32(self.fixed(n, W, u32::from_le_bytes)?),
            ValueType::I32 => Array::I32(self.fixed(n, W, i32::from_le_bytes)?),
            ValueType::F32 => Array::F32(self.fixed(n, W, f32::from_le_bytes)?),
            ValueType::U64 => Array::U64(self.fixed(n, W, u64::from_le_bytes)?),
            ValueType::I64 => Array::I64(self.fixed(n, W, i64::from_le_bytes)?),
            ValueType::F64 => Array::F64(self.fixed(n, W, f64::from_le_bytes)?),
            ValueType::Bool => {
                let start = self.offset();
                let bytes = self.take(n, W)?;
                let mut out = Vec::with_capacity(bytes.len());
                for (i, &b) in bytes.iter().enumerate() {
                    match b {
                        0 => out.push(false),
                        1 => out.push(true),
                        value => {
                            return Err(GgufError::InvalidBool {
                                key: key.to_owned(),
                                value,
                                offset: start + i as u64,
                            });
                        }
                    }
                }
                Array::Bool(out)
            }
            ValueType::String => {
                let cap = (n as usize).min(MAX_PREALLOC);
                let mut out = StringArray::with_capacity(cap, 0);
                for _ in 0..n {
                    let len = self.count("string value", 1)?;
                    let at = self.offset();
                    let bytes = self.take(len, "string value")?;
                    match std::str::from_utf8(bytes) {
                        Ok(s) => out.push(s),
                        Err(_) => {
                            return Err(GgufError::InvalidUtf8 {
                                what: "string value",
                                offset: at,
                            });
                        }
                    }
                }
                out.shrink_to_fit();
                Array::String(out)
            }
            ValueType::Array => {
                let mut out = Vec::with_capacity((n as usize).min(MAX_PREALLOC));
                for _ in 0..n {
                    out.push(self.array_value(key, depth + 1)?);
                }
                Array::Array(out)
            }
        })
    }

    fn value_type(&mut self, key: &str, what: &'static str) -> Result<ValueType, GgufError> {
        let offset = self.offset();
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
            key: key.to_owned(),
            id,
            offset,
        })
    }
}

/// The element count of `shape`, or `None` if the tensor is too large: the product of the
/// non-zero dimensions must stay within `i64::MAX` elements and `u64` bytes, so that every
/// derived quantity (row length, row count, row bytes) fits even in a zero-element tensor.
pub(crate) fn checked_elements(shape: &[u64], ty: GgmlType) -> Option<u64> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)?;
    nonzero
        .div_ceil(ty.block_size() as u64)
        .checked_mul(ty.type_size() as u64)?;
    Some(if shape.contains(&0) { 0 } else { nonzero })
}

/// Minimum bytes of one key/value pair: key length, value type, a one-byte value.
const MIN_KV_SIZE: u64 = 8 + 4 + 1;
/// Minimum bytes of one tensor info: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_SIZE: u64 = 8 + 4 + 4 + 8;

fn parse_header(buf: &[u8]) -> Result<Header, GgufError> {
    let mut c = Cursor {
        buf,
        pos: 0,
        budget: MAX_ARRAY_ELEMENTS,
    };
    let magic_bytes = c.array::<4>("magic")?;
    let magic = Magic::from_bytes(magic_bytes).ok_or(GgufError::BadMagic { found: magic_bytes })?;
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion { version });
    }
    let n_tensors = c.count("tensor count", MIN_TENSOR_INFO_SIZE)?;
    let n_kv = c.count("metadata key/value count", MIN_KV_SIZE)?;

    // Metadata.
    let mut metadata = Vec::with_capacity((n_kv as usize).min(MAX_PREALLOC));
    let mut key_index = HashMap::with_capacity((n_kv as usize).min(MAX_PREALLOC));
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let kv_offset = c.offset();
        let key = c.string("metadata key")?;
        let ty = c.value_type(&key, "metadata value type")?;
        let value = c.value(&key, ty, 0)?;
        if key_index.contains_key(&key) {
            return Err(GgufError::DuplicateKey {
                key,
                offset: kv_offset,
            });
        }
        if key == ALIGNMENT_KEY {
            alignment = match value.as_u64() {
                Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
                _ => {
                    return Err(GgufError::BadAlignment {
                        value: format!("{value} ({})", value.type_name()),
                        offset: kv_offset,
                    });
                }
            };
        }
        key_index.insert(key.clone(), metadata.len());
        metadata.push((key, value));
    }

    // Tensor directory. Offsets are checked once the data section start is known.
    struct Raw {
        info: TensorInfo,
        rel_offset: u64,
        offset_field: u64,
    }
    let mut raws: Vec<Raw> = Vec::with_capacity((n_tensors as usize).min(MAX_PREALLOC));
    let mut tensor_index = HashMap::with_capacity((n_tensors as usize).min(MAX_PREALLOC));
    for _ in 0..n_tensors {
        let entry_offset = c.offset();
        let name = c.string("tensor name")?;
        if tensor_index.contains_key(&name) {
            return Err(GgufError::DuplicateTensor {
                name,
                offset: entry_offset,
            });
        }
        let dims_offset = c.offset();
        let n_dims = c.u32("tensor dimension count")?;
        if n_dims as usize > MAX_DIMS {
            return Err(GgufError::TooManyDims {
                tensor: name,
                n_dims,
                offset: dims_offset,
            });
        }
        let mut shape = Vec::with_capacity(n_dims as usize);
        for index in 0..n_dims as usize {
            let offset = c.offset();
            let d = c.u64("tensor dimension")?;
            if d > i64::MAX as u64 {
                return Err(GgufError::BadDim {
                    tensor: name,
                    index,
                    value: d,
                    offset,
                });
            }
            shape.push(d);
        }
        let type_offset = c.offset();
        let id = c.u32("tensor type")?;
        let ty = GgmlType::from_id(id, magic).ok_or_else(|| GgufError::UnknownType {
            tensor: name.clone(),
            id,
            offset: type_offset,
        })?;
        let Some(n_elements) = checked_elements(&shape, ty) else {
            return Err(GgufError::TensorTooLarge {
                tensor: name,
                offset: dims_offset,
            });
        };
        let row_len = shape.first().copied().unwrap_or(1);
        let block = ty.block_size() as u64;
        if row_len % block != 0 {
            return Err(GgufError::BadRowLength {
                tensor: name,
                ty,
                row_len,
                block,
                offset: type_offset,
            });
        }
        let Some(size) = ty.bytes_for(n_elements) else {
            return Err(GgufError::TensorTooLarge {
                tensor: name,
                offset: dims_offset,
            });
        };
        let offset_field = c.offset();
        let rel_offset = c.u64("tensor data offset")?;
        tensor_index.insert(name.clone(), raws.len());
        raws.push(Raw {
            info: TensorInfo {
                name,
                ty,
                shape,
                offset: 0,
                size,
            },
            rel_offset,
            offset_field,
        });
    }

    let file_size = buf.len() as u64;
    // The header end is at most the file size and the alignment at most 2^24: no overflow.
    let data_offset = c.offset().next_multiple_of(alignment);
    let mut tensors = Vec::with_capacity(raws.len());
    for r in raws {
        let mut info = r.info;
        if r.rel_offset % alignment != 0 {
            return Err(GgufError::MisalignedTensor {
                tensor: info.name,
                data_offset: r.rel_offset,
                alignment,
                offset: r.offset_field,
            });
        }
        let start = data_offset.checked_add(r.rel_offset);
        let end = start.and_then(|s| s.checked_add(info.size));
        match (start, end) {
            (Some(s), Some(e)) if e <= file_size => info.offset = s,
            _ => {
                return Err(GgufError::TensorOutOfBounds {
                    tensor: info.name,
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_size,
                    offset: r.offset_field,
                });
            }
        }
        tensors.push(info);
    }

    // Overlap: walk the ranges by start, each must begin at or after the furthest end so far.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (tensors[i].offset, tensors[i].size));
    let mut furthest: Option<usize> = None;
    for &i in &order {
        let t = &tensors[i];
        if let Some(f) = furthest {
            let prev = &tensors[f];
            if t.offset < prev.offset + prev.size && t.size > 0 {
                return Err(GgufError::OverlappingTensors {
                    first: prev.name.clone(),
                    second: t.name.clone(),
                    start: t.offset,
                });
            }
        }
        if furthest.is_none_or(|f| t.offset + t.size >= tensors[f].offset + tensors[f].size) {
            furthest = Some(i);
        }
    }

    Ok(Header {
        magic,
        version,
        alignment,
        data_offset,
        metadata,
        key_index,
        tensors,
        tensor_index,
    })
}
