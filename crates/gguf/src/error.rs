//! Error types: [`GgufError`] for parsing, [`MetadataError`] for typed metadata look-ups,
//! [`WriteError`] for the writer.

use std::path::PathBuf;

use crate::types::{GgmlType, Magic};

/// Everything that can go wrong while opening or parsing a GGUF / PWRI file.
///
/// Every variant that concerns a position in the file carries the byte `offset` of the field
/// at fault. Keys and tensor names are printed with `{:?}` so hostile names cannot break the
/// one-line message.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read {path:?}: {source}")]
    Io {
        /// The path that was opened.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The first four bytes are neither `GGUF` nor `PWRI`.
    #[error("not a GGUF file: magic {found:02x?} at byte 0 is neither \"GGUF\" nor \"PWRI\"")]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// A version other than 2 or 3 (version 1 and big-endian files are not supported).
    #[error(
        "unsupported version {version} at byte 4 (only GGUF v2 and v3 little-endian are supported)"
    )]
    UnsupportedVersion {
        /// The version field as read (little-endian).
        version: u32,
    },
    /// A field runs past the end of the file.
    #[error("truncated file: {what} at byte {offset} runs past the end of the file")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Where the field starts.
        offset: u64,
    },
    /// A count or length cannot possibly fit in the bytes that remain.
    #[error("{what} {len} at byte {offset} is larger than the rest of the file allows")]
    LengthTooLarge {
        /// The field being read ("tensor count", "string length", "array length", ...).
        what: &'static str,
        /// The value read.
        len: u64,
        /// Where the field starts.
        offset: u64,
    },
    /// A string is not valid UTF-8.
    #[error("{what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 {
        /// The string being read ("metadata key", "tensor name", "string value").
        what: &'static str,
        /// Where the string's bytes start.
        offset: u64,
    },
    /// A metadata value type id outside 0..=12.
    #[error("metadata key {key:?}: unknown value type id {id} at byte {offset}")]
    UnknownValueType {
        /// The key whose value (or array element type) is at fault.
        key: String,
        /// The id read.
        id: u32,
        /// Where the id is stored.
        offset: u64,
    },
    /// Arrays nested deeper than [`crate::MAX_ARRAY_DEPTH`].
    #[error("metadata key {key:?}: arrays nested deeper than {max} levels at byte {offset}")]
    ArrayTooDeep {
        /// The key holding the array.
        key: String,
        /// The limit.
        max: usize,
        /// Where the over-deep array's type id is stored.
        offset: u64,
    },
    /// The file's arrays hold more elements in total than [`crate::MAX_ARRAY_ELEMENTS`].
    #[error(
        "metadata key {key:?}: array length at byte {offset} takes the file past {limit} array elements in total"
    )]
    TooManyArrayElements {
        /// The key holding the array.
        key: String,
        /// The limit.
        limit: u64,
        /// Where the array length is stored.
        offset: u64,
    },
    /// A bool value other than 0 or 1.
    #[error("metadata key {key:?}: bool byte {value} at byte {offset} is neither 0 nor 1")]
    InvalidBool {
        /// The key.
        key: String,
        /// The byte read.
        value: u8,
        /// Where it is stored.
        offset: u64,
    },
    /// The same metadata key appears twice.
    #[error("duplicate metadata key {key:?} at byte {offset}")]
    DuplicateKey {
        /// The key.
        key: String,
        /// Where the second occurrence starts.
        offset: u64,
    },
    /// `general.alignment` is not an integer power of two up to [`crate::MAX_ALIGNMENT`].
    #[error("general.alignment at byte {offset} is {value}, not a power of two between 1 and 2^24")]
    BadAlignment {
        /// The value, printed.
        value: String,
        /// Where the key/value pair starts.
        offset: u64,
    },
    /// A tensor with more than four dimensions.
    #[error("tensor {tensor:?}: {n_dims} dimensions at byte {offset} (at most 4 are allowed)")]
    TooManyDims {
        /// Tensor name.
        tensor: String,
        /// Dimensions claimed.
        n_dims: u32,
        /// Where the dimension count is stored.
        offset: u64,
    },
    /// A dimension above `i64::MAX` (negative in ggml's signed `ne`).
    #[error("tensor {tensor:?}: dimension {index} is {value} at byte {offset} (above i64::MAX)")]
    BadDim {
        /// Tensor name.
        tensor: String,
        /// Which dimension.
        index: usize,
        /// The value read.
        value: u64,
        /// Where it is stored.
        offset: u64,
    },
    /// A tensor type id that is not known in this file's numbering.
    #[error("tensor {tensor:?}: unknown ggml type id {id} at byte {offset}")]
    UnknownType {
        /// Tensor name.
        tensor: String,
        /// The id read.
        id: u32,
        /// Where the id is stored.
        offset: u64,
    },
    /// The row length (`shape[0]`) is not a whole number of the type's blocks.
    #[error(
        "tensor {tensor:?}: row length {row_len} is not a multiple of the {ty} block size {block} (type id at byte {offset})"
    )]
    BadRowLength {
        /// Tensor name.
        tensor: String,
        /// Element type.
        ty: GgmlType,
        /// `shape[0]`.
        row_len: u64,
        /// The type's block size.
        block: u64,
        /// Where the type id is stored.
        offset: u64,
    },
    /// The element count or byte size overflows (elements above `i64::MAX`, bytes above `u64`).
    #[error(
        "tensor {tensor:?}: shape at byte {offset} gives an element count or byte size that overflows"
    )]
    TensorTooLarge {
        /// Tensor name.
        tensor: String,
        /// Where the tensor's shape is stored.
        offset: u64,
    },
    /// The same tensor name appears twice.
    #[error("duplicate tensor name {name:?} at byte {offset}")]
    DuplicateTensor {
        /// Tensor name.
        name: String,
        /// Where the second occurrence starts.
        offset: u64,
    },
    /// A tensor's data offset is not a multiple of the file's alignment.
    #[error(
        "tensor {tensor:?}: data offset {data_offset} (stored at byte {offset}) is not a multiple of the alignment {alignment}"
    )]
    MisalignedTensor {
        /// Tensor name.
        tensor: String,
        /// The offset relative to the data section, as stored.
        data_offset: u64,
        /// The file's alignment.
        alignment: u64,
        /// Where the offset field is stored.
        offset: u64,
    },
    /// A tensor's data extends past the end of the file.
    #[error(
        "tensor {tensor:?}: data bytes {start}..{end} (offset stored at byte {offset}) run past the end of the {file_size}-byte file"
    )]
    TensorOutOfBounds {
        /// Tensor name.
        tensor: String,
        /// Absolute start (saturated at `u64::MAX` on overflow).
        start: u64,
        /// Absolute end (saturated at `u64::MAX` on overflow).
        end: u64,
        /// File size.
        file_size: u64,
        /// Where the offset field is stored.
        offset: u64,
    },
    /// Two tensors' data ranges overlap.
    #[error(
        "tensors {first:?} and {second:?} overlap: {second:?} starts at byte {start}, inside {first:?}"
    )]
    OverlappingTensors {
        /// The tensor that starts first.
        first: String,
        /// The tensor starting inside it.
        second: String,
        /// Absolute start of `second`.
        start: u64,
    },
}

/// A typed metadata look-up failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// The key is absent.
    #[error("metadata key {key:?} is missing")]
    Missing {
        /// The key looked up.
        key: String,
    },
    /// The key holds a value of another type.
    #[error("metadata key {key:?} holds a {found}, expected {expected}")]
    WrongType {
        /// The key looked up.
        key: String,
        /// What the caller asked for ("u32", "array of string", ...).
        expected: &'static str,
        /// What the file holds ([`crate::Value::type_name`]).
        found: &'static str,
    },
    /// The key holds an integer of a compatible type whose value does not fit.
    #[error("metadata key {key:?} holds {value}, which does not fit in a {expected}")]
    OutOfRange {
        /// The key looked up.
        key: String,
        /// What the caller asked for.
        expected: &'static str,
        /// The value, printed.
        value: String,
    },
}

/// Everything that can go wrong while writing a file with [`crate::GgufWriter`].
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The output failed.
    #[error("write failed: {0}")]
    Io(#[from] std::io::Error),
    /// A version other than 2 or 3 was requested.
    #[error("cannot write GGUF version {0} (only 2 and 3)")]
    UnsupportedVersion(u32),
    /// A metadata key was added twice.
    #[error("duplicate metadata key {key:?}")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// An array whose elements are not all of the same value type.
    #[error("metadata key {key:?}: array mixes {first} and {other} elements")]
    MixedArray {
        /// The key.
        key: String,
        /// Type of the first element.
        first: &'static str,
        /// Type of a differing element.
        other: &'static str,
    },
    /// Arrays nested deeper than [`crate::MAX_ARRAY_DEPTH`].
    #[error("metadata key {key:?}: arrays nested deeper than {max} levels")]
    ArrayTooDeep {
        /// The key.
        key: String,
        /// The limit.
        max: usize,
    },
    /// `general.alignment` is not an integer power of two up to [`crate::MAX_ALIGNMENT`].
    #[error("general.alignment must be an integer power of two up to 2^24, got {value}")]
    BadAlignment {
        /// The value, printed.
        value: String,
    },
    /// A tensor name was declared twice.
    #[error("duplicate tensor name {name:?}")]
    DuplicateTensor {
        /// The name.
        name: String,
    },
    /// The type has no id in this file flavour (IQ and newer types in a `PWRI` file).
    #[error("tensor {tensor:?}: type {ty} cannot be stored in a {} file", magic.name())]
    UnsupportedType {
        /// Tensor name.
        tensor: String,
        /// The type.
        ty: GgmlType,
        /// The file flavour.
        magic: Magic,
    },
    /// The shape is not storable (more than 4 dims, a dim above `i64::MAX`, a row length that is
    /// not a whole number of blocks, or a size that overflows).
    #[error("tensor {tensor:?}: bad shape {shape:?}: {reason}")]
    BadShape {
        /// Tensor name.
        tensor: String,
        /// The shape given.
        shape: Vec<u64>,
        /// Why it is rejected.
        reason: &'static str,
    },
    /// Tensor data was written out of declaration order or for an unknown tensor.
    #[error("tensor data written out of order: expected {expected:?}, got {got:?}")]
    OutOfOrder {
        /// The next tensor due (`None`: all are written).
        expected: Option<String>,
        /// The name given.
        got: String,
    },
    /// Tensor data of the wrong length.
    #[error("tensor {tensor:?}: got {got} data bytes, its shape and type need {expected}")]
    SizeMismatch {
        /// Tensor name.
        tensor: String,
        /// Bytes needed.
        expected: u64,
        /// Bytes given.
        got: u64,
    },
    /// `finish` or `write_to_vec` was reached before every tensor had its data.
    #[error("tensor {tensor:?} has no data")]
    MissingData {
        /// The first tensor without data.
        tensor: String,
    },
}
