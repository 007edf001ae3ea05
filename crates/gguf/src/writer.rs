//! The writer: [`GgufWriter`] declares metadata and tensors, then either streams the tensor
//! data through a [`TensorStream`] or builds the whole file in memory.

use std::collections::HashSet;
use std::io::{Read, Write};

use crate::error::WriteError;
use crate::reader::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS, checked_elements,
};
use crate::types::{GgmlType, Magic};
use crate::value::{Array, Value, ValueType};

struct PendingTensor {
    name: String,
    ty: GgmlType,
    shape: Vec<u64>,
    size: u64,
    data: Option<Vec<u8>>,
}

/// Builds a GGUF / PWRI file (version 3 unless [`set_version`](Self::set_version) says 2).
///
/// Layout is the standard one llama.cpp writes: header, key/value pairs, tensor infos, zero
/// padding to the alignment, then each tensor's data in declaration order, each padded with
/// zeros to the alignment.
///
/// ```
/// use powerinfer_gguf::{GgmlType, GgufFile, GgufWriter, Magic, Value};
/// let mut w = GgufWriter::new(Magic::Gguf);
/// w.add_kv("general.architecture", Value::from("llama")).unwrap();
/// w.add_tensor("x", GgmlType::F32, &[2], vec![0u8; 8]).unwrap();
/// let bytes = w.write_to_vec().unwrap();
/// let f = GgufFile::from_bytes(bytes).unwrap();
/// assert_eq!(f.tensor_bytes("x"), Some(&[0u8; 8][..]));
/// ```
pub struct GgufWriter {
    magic: Magic,
    version: u32,
    kvs: Vec<(String, Value)>,
    keys: HashSet<String>,
    tensors: Vec<PendingTensor>,
    names: HashSet<String>,
}

impl GgufWriter {
    /// A writer for a version-3 file with the given magic.
    pub fn new(magic: Magic) -> Self {
        GgufWriter {
            magic,
            version: 3,
            kvs: Vec::new(),
            keys: HashSet::new(),
            tensors: Vec::new(),
            names: HashSet::new(),
        }
    }

    /// Selects the format version (2 or 3; the layout is the same).
    pub fn set_version(&mut self, version: u32) -> Result<(), WriteError> {
        if version != 2 && version != 3 {
            return Err(WriteError::UnsupportedVersion(version));
        }
        self.version = version;
        Ok(())
    }

    /// Adds a key/value pair (keys are written in the order added).
    ///
    /// Arrays are homogeneous by construction ([`Array`]) and keep their element type even
    /// when empty. `general.alignment` must be an integer
    /// power of two up to [`MAX_ALIGNMENT`]; it sets the alignment the file is laid out with.
    pub fn add_kv(&mut self, key: impl Into<String>, value: Value) -> Result<(), WriteError> {
        self.push_kv(key.into(), value)
    }

    /// Adds an array of `element_type` built from values, which must all be of that type.
    pub fn add_array(
        &mut self,
        key: impl Into<String>,
        element_type: ValueType,
        items: Vec<Value>,
    ) -> Result<(), WriteError> {
        let key = key.into();
        match Array::from_values(element_type, items) {
            Ok(a) => self.push_kv(key, Value::Array(a)),
            Err(e) => Err(WriteError::MixedArray {
                key,
                first: e.first.name(),
                other: e.other.name(),
            }),
        }
    }

    fn push_kv(&mut self, key: String, value: Value) -> Result<(), WriteError> {
        if self.keys.contains(&key) {
            return Err(WriteError::DuplicateKey { key });
        }
        check_value(&key, &value, 0)?;
        if key == ALIGNMENT_KEY {
            match value.as_u64() {
                Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => {}
                _ => {
                    return Err(WriteError::BadAlignment {
                        value: format!("{value} ({})", value.type_name()),
                    });
                }
            }
        }
        self.keys.insert(key.clone());
        self.kvs.push((key, value));
        Ok(())
    }

    /// Declares a tensor whose data will be streamed later with
    /// [`TensorStream::write_tensor_data`]. Tensors are laid out in declaration order.
    pub fn add_tensor_info(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        shape: &[u64],
    ) -> Result<(), WriteError> {
        self.push_tensor(name.into(), ty, shape, None)
    }

    /// Declares a tensor together with its data (for in-memory files; a [`TensorStream`]
    /// writes such data by itself when it reaches the tensor).
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        shape: &[u64],
        data: impl Into<Vec<u8>>,
    ) -> Result<(), WriteError> {
        self.push_tensor(name.into(), ty, shape, Some(data.into()))
    }

    fn push_tensor(
        &mut self,
        name: String,
        ty: GgmlType,
        shape: &[u64],
        data: Option<Vec<u8>>,
    ) -> Result<(), WriteError> {
        if self.names.contains(&name) {
            return Err(WriteError::DuplicateTensor { name });
        }
        if ty.id(self.magic).is_none() {
            return Err(WriteError::UnsupportedType {
                tensor: name,
                ty,
                magic: self.magic,
            });
        }
        let bad = |reason| WriteError::BadShape {
            tensor: name.clone(),
            shape: shape.to_vec(),
            reason,
        };
        if shape.len() > MAX_DIMS {
            return Err(bad("more than 4 dimensions"));
        }
        if shape.iter().any(|&d| d > i64::MAX as u64) {
            return Err(bad("a dimension is above i64::MAX"));
        }
        let n = checked_elements(shape, ty)
            .ok_or_else(|| bad("element count or byte size overflows"))?;
        if shape.first().copied().unwrap_or(1) % ty.block_size() as u64 != 0 {
            return Err(bad("row length is not a multiple of the type's block size"));
        }
        let size = ty.bytes_for(n).ok_or_else(|| bad("byte size overflows"))?;
        if let Some(d) = &data
            && d.len() as u64 != size
        {
            return Err(WriteError::SizeMismatch {
                tensor: name,
                expected: size,
                got: d.len() as u64,
            });
        }
        self.names.insert(name.clone());
        self.tensors.push(PendingTensor {
            name,
            ty,
            shape: shape.to_vec(),
            size,
            data,
        });
        Ok(())
    }

    /// The alignment the file will use (`general.alignment` if added, else 32).
    pub fn alignment(&self) -> u64 {
        self.kvs
            .iter()
            .find(|(k, _)| k == ALIGNMENT_KEY)
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// The header bytes, padded to the alignment (where the data section starts).
    pub fn header_bytes(&self) -> Vec<u8> {
        let align = self.alignment();
        let mut h = Vec::new();
        h.extend_from_slice(&self.magic.bytes());
        h.extend_from_slice(&self.version.to_le_bytes());
        h.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        h.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut h, k);
            h.extend_from_slice(&v.value_type().id().to_le_bytes());
            put_value(&mut h, v);
        }
        let mut rel = 0u64;
        for t in &self.tensors {
            put_str(&mut h, &t.name);
            h.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for d in &t.shape {
                h.extend_from_slice(&d.to_le_bytes());
            }
            // Checked in `push_tensor`.
            let id = t.ty.id(self.magic).unwrap_or_default();
            h.extend_from_slice(&id.to_le_bytes());
            h.extend_from_slice(&rel.to_le_bytes());
            rel += t.size.next_multiple_of(align);
        }
        h.resize((h.len() as u64).next_multiple_of(align) as usize, 0);
        h
    }

    /// Total size of the file this writer produces.
    pub fn file_size(&self) -> u64 {
        let align = self.alignment();
        self.header_bytes().len() as u64
            + self
                .tensors
                .iter()
                .map(|t| t.size.next_multiple_of(align))
                .sum::<u64>()
    }

    /// Writes the header to `out` and returns a stream that takes the tensor data in
    /// declaration order.
    pub fn begin<W: Write>(self, mut out: W) -> Result<TensorStream<W>, WriteError> {
        let header = self.header_bytes();
        out.write_all(&header)?;
        Ok(TensorStream {
            alignment: self.alignment(),
            tensors: self.tensors,
            next: 0,
            out,
        })
    }

    /// Builds the whole file in memory; every tensor needs its data
    /// (from [`add_tensor`](Self::add_tensor)).
    pub fn write_to_vec(self) -> Result<Vec<u8>, WriteError> {
        if let Some(t) = self.tensors.iter().find(|t| t.data.is_none()) {
            return Err(WriteError::MissingData {
                tensor: t.name.clone(),
            });
        }
        let cap = usize::try_from(self.file_size()).unwrap_or(0);
        self.begin(Vec::with_capacity(cap))?.finish()
    }

    /// Writes the file to `path` (every tensor needs its data).
    pub fn write_to_file(self, path: impl AsRef<std::path::Path>) -> Result<(), WriteError> {
        if let Some(t) = self.tensors.iter().find(|t| t.data.is_none()) {
            return Err(WriteError::MissingData {
                tensor: t.name.clone(),
            });
        }
        let f = std::io::BufWriter::new(std::fs::File::create(path)?);
        self.begin(f)?
            .finish()?
            .into_inner()
            .map_err(|e| e.into_error())?;
        Ok(())
    }
}

/// Streams tensor data after [`GgufWriter::begin`] wrote the header.
pub struct TensorStream<W: Write> {
    alignment: u64,
    tensors: Vec<PendingTensor>,
    next: usize,
    out: W,
}

impl<W: Write> TensorStream<W> {
    /// The name of the next tensor whose data is due, if any.
    pub fn next_tensor(&self) -> Option<&str> {
        self.tensors.get(self.next).map(|t| t.name.as_str())
    }

    fn flush_attached(&mut self) -> Result<(), WriteError> {
        while let Some(t) = self.tensors.get_mut(self.next) {
            let Some(d) = t.data.take() else { break };
            self.out.write_all(&d)?;
            let size = t.size;
            self.pad(size)?;
            self.next += 1;
        }
        Ok(())
    }

    fn pad(&mut self, size: u64) -> Result<(), WriteError> {
        let pad = size.next_multiple_of(self.alignment) - size;
        self.out.write_all(&vec![0u8; pad as usize])?;
        Ok(())
    }

    fn expect(&mut self, name: &str) -> Result<u64, WriteError> {
        self.flush_attached()?;
        match self.tensors.get(self.next) {
            Some(t) if t.name == name => Ok(t.size),
            other => Err(WriteError::OutOfOrder {
                expected: other.map(|t| t.name.clone()),
                got: name.to_owned(),
            }),
        }
    }

    /// Writes the data of the next declared tensor, which must be `name`, and pads it.
    pub fn write_tensor_data(&mut self, name: &str, bytes: &[u8]) -> Result<(), WriteError> {
        let size = self.expect(name)?;
        if bytes.len() as u64 != size {
            return Err(WriteError::SizeMismatch {
                tensor: name.to_owned(),
                expected: size,
                got: bytes.len() as u64,
            });
        }
        self.out.write_all(bytes)?;
        self.pad(size)?;
        self.next += 1;
        Ok(())
    }

    /// Copies exactly the tensor's size in bytes from `src` (for tensors too large to hold in
    /// memory), then pads. A short `src` is a [`WriteError::SizeMismatch`].
    pub fn write_tensor_from_reader(
        &mut self,
        name: &str,
        src: &mut impl Read,
    ) -> Result<(), WriteError> {
        let size = self.expect(name)?;
        let got = std::io::copy(&mut src.take(size), &mut self.out)?;
        if got != size {
            return Err(WriteError::SizeMismatch {
                tensor: name.to_owned(),
                expected: size,
                got,
            });
        }
        self.pad(size)?;
        self.next += 1;
        Ok(())
    }

    /// Checks that every tensor has been written, flushes, and returns the output.
    pub fn finish(mut self) -> Result<W, WriteError> {
        self.flush_attached()?;
        if let Some(t) = self.tensors.get(self.next) {
            return Err(WriteError::MissingData {
                tensor: t.name.clone(),
            });
        }
        self.out.flush()?;
        Ok(self.out)
    }
}

fn check_value(key: &str, v: &Value, depth: usize) -> Result<(), WriteError> {
    match v {
        Value::Array(a) => check_array(key, a, depth),
        _ => Ok(()),
    }
}

fn check_array(key: &str, a: &Array, depth: usize) -> Result<(), WriteError> {
    if depth >= MAX_ARRAY_DEPTH {
        return Err(WriteError::ArrayTooDeep {
            key: key.to_owned(),
            max: MAX_ARRAY_DEPTH,
        });
    }
    if let Array::Array(inner) = a {
        for x in inner {
            check_array(key, x, depth + 1)?;
        }
    }
    Ok(())
}

fn put_str(h: &mut Vec<u8>, s: &str) {
    h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    h.extend_from_slice(s.as_bytes());
}

fn put_value(h: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => h.push(*x),
        Value::I8(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => h.extend_from_slice(&x.to_bits().to_le_bytes()),
        Value::Bool(x) => h.push(u8::from(*x)),
        Value::String(s) => put_str(h, s),
        Value::U64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => h.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => h.extend_from_slice(&x.to_bits().to_le_bytes()),
        Value::Array(a) => put_array(h, a),
    }
}

fn put_array(h: &mut Vec<u8>, a: &Array) {
    h.extend_from_slice(&a.element_type().id().to_le_bytes());
    h.extend_from_slice(&(a.len() as u64).to_le_bytes());
    match a {
        Array::U8(v) => h.extend_from_slice(v),
        Array::I8(v) => v.iter().for_each(|x| h.extend_from_slice(&x.to_le_bytes())),
        Array::U16(v) => v.iter().for_each(|x| h.extend_from_slice(&x.to_le_bytes())),
        Array::I16(v) => v.iter().for_each(|x| h.extend_from_slice(&x.to_le_bytes())),
        Array::U32(v) => v.iter().for_each(|x| h.extend_from_slice(&x.to_le_bytes())),
        Array::I32(v) => v.iter().for_each(|x| h.extend_from_slice(&x.to_le_bytes())),
        Array::F32(v) => v
            .iter()
            .for_each(|x| h.extend_from_slice(&x.to_bits().to_le_bytes())),
        Array::Bool(v) => v.iter().for_each(|&x| h.push(u8::from(x))),
        Array::String(v) => v.iter().for_each(|s| put_str(h, s)),
        Array::Array(v) => v.iter().for_each(|x| put_array(h, x)),
        Array::U64(v) => v.iter().for_each(|x| h.extend_from_slice(&x.to_le_bytes())),
        Array::I64(v) => v.iter().for_each(|x| h.extend_from_slice(&x.to_le_bytes())),
        Array::F64(v) => v
            .iter()
            .for_each(|x| h.extend_from_slice(&x.to_bits().to_le_bytes())),
    }
}
