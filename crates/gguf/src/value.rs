//! Metadata values and their on-disk type ids.

/// The on-disk type id of a metadata value (`gguf_type` in ggml).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValueType {
    /// `u8` (id 0).
    U8,
    /// `i8` (id 1).
    I8,
    /// `u16` (id 2).
    U16,
    /// `i16` (id 3).
    I16,
    /// `u32` (id 4).
    U32,
    /// `i32` (id 5).
    I32,
    /// `f32` (id 6).
    F32,
    /// `bool`, one byte 0 or 1 (id 7).
    Bool,
    /// UTF-8 string with a u64 length (id 8).
    String,
    /// Array: element type id, u64 count, elements (id 9).
    Array,
    /// `u64` (id 10).
    U64,
    /// `i64` (id 11).
    I64,
    /// `f64` (id 12).
    F64,
}

impl ValueType {
    /// The id stored in the file.
    pub const fn id(self) -> u32 {
        match self {
            ValueType::U8 => 0,
            ValueType::I8 => 1,
            ValueType::U16 => 2,
            ValueType::I16 => 3,
            ValueType::U32 => 4,
            ValueType::I32 => 5,
            ValueType::F32 => 6,
            ValueType::Bool => 7,
            ValueType::String => 8,
            ValueType::Array => 9,
            ValueType::U64 => 10,
            ValueType::I64 => 11,
            ValueType::F64 => 12,
        }
    }

    /// Decodes a stored id.
    pub const fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// The smallest number of bytes one value of this type takes in a file (a string is at least
    /// its 8-byte length, an array at least its type id and count).
    pub const fn min_size(self) -> u64 {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
            ValueType::U16 | ValueType::I16 => 2,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
            ValueType::U64 | ValueType::I64 | ValueType::F64 | ValueType::String => 8,
            ValueType::Array => 12,
        }
    }

    /// Lower-case name ("u32", "string", "array", ...).
    pub const fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "u8",
            ValueType::I8 => "i8",
            ValueType::U16 => "u16",
            ValueType::I16 => "i16",
            ValueType::U32 => "u32",
            ValueType::I32 => "i32",
            ValueType::F32 => "f32",
            ValueType::Bool => "bool",
            ValueType::String => "string",
            ValueType::Array => "array",
            ValueType::U64 => "u64",
            ValueType::I64 => "i64",
            ValueType::F64 => "f64",
        }
    }
}

/// One metadata value.
///
/// Arrays are homogeneous in the file; nested arrays (arrays of arrays) are supported up to
/// [`crate::MAX_ARRAY_DEPTH`] levels.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Homogeneous array, stored compactly (see [`Array`]).
    Array(Array),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

impl Value {
    /// The on-disk type of this value.
    pub const fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Lower-case type name ("u32", "string", "array", ...).
    pub const fn type_name(&self) -> &'static str {
        self.value_type().name()
    }

    /// The value as a u64, for any integer type holding a non-negative value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as an i64, for any integer type whose value fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => i64::try_from(v).ok(),
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as an f32, from `f32` or (rounded) `f64`.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(v) => Some(v),
            Value::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    /// The value as an f64, from `f32` or `f64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if this is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The bool, if this is a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The array, if this is an array.
    pub fn as_array(&self) -> Option<&Array> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    /// True for the eight integer types.
    pub const fn is_integer(&self) -> bool {
        matches!(
            self,
            Value::U8(_)
                | Value::I8(_)
                | Value::U16(_)
                | Value::I16(_)
                | Value::U32(_)
                | Value::I32(_)
                | Value::U64(_)
                | Value::I64(_)
        )
    }

    /// The integer as an i128 (wide enough for every integer type), if this is an integer.
    pub(crate) fn as_i128(&self) -> Option<i128> {
        match *self {
            Value::U64(v) => Some(v.into()),
            _ => self.as_i64().map(i128::from),
        }
    }
}

impl std::fmt::Display for Value {
    /// Scalars print plainly, strings with quotes and escapes, arrays as `[a, b, ...]` (at most
    /// eight elements, then `... (N items)`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(s) => write!(f, "{s:?}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Array(a) => write!(f, "{a}"),
        }
    }
}

macro_rules! value_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for Value {
            fn from(x: $t) -> Self {
                Value::$v(x)
            }
        }
    )*};
}
value_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64, Array => Array);

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}

/// Many strings packed into one UTF-8 buffer plus end offsets: one allocation for a whole
/// vocabulary instead of one `String` (24 bytes + a heap block) per entry.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct StringArray {
    bytes: String,
    /// `ends[i]` is the end of string `i` in `bytes`; it starts where string `i - 1` ends.
    ends: Vec<usize>,
}

impl StringArray {
    /// An empty array.
    pub const fn new() -> Self {
        StringArray {
            bytes: String::new(),
            ends: Vec::new(),
        }
    }

    /// An empty array with room for `n` strings of `bytes` bytes in total.
    pub fn with_capacity(n: usize, bytes: usize) -> Self {
        StringArray {
            bytes: String::with_capacity(bytes),
            ends: Vec::with_capacity(n),
        }
    }

    /// Appends a string.
    pub fn push(&mut self, s: &str) {
        self.bytes.push_str(s);
        self.ends.push(self.bytes.len());
    }

    /// Number of strings.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// True when there are no strings.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// String `i`, if `i < len()`.
    pub fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        // Every end is a char boundary: it is the length of the buffer after a whole `&str`
        // was appended.
        self.bytes.get(start..end)
    }

    /// The byte range of string `i` inside [`as_packed_str`](Self::as_packed_str).
    pub fn range(&self, i: usize) -> Option<std::ops::Range<usize>> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(start..end)
    }

    /// All strings concatenated.
    pub fn as_packed_str(&self) -> &str {
        &self.bytes
    }

    /// The strings in order.
    pub fn iter(&self) -> StringArrayIter<'_> {
        StringArrayIter { a: self, i: 0 }
    }

    /// Heap bytes held (buffer and offsets, by capacity).
    pub fn heap_bytes(&self) -> usize {
        self.bytes.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
    }

    /// Releases spare capacity.
    pub fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.ends.shrink_to_fit();
    }
}

impl std::fmt::Debug for StringArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl std::ops::Index<usize> for StringArray {
    type Output = str;

    /// String `i`.
    ///
    /// # Panics
    /// If `i >= len()`, like slice indexing; use [`get`](StringArray::get) for a checked read.
    fn index(&self, i: usize) -> &str {
        match self.get(i) {
            Some(s) => s,
            None => panic!("index {i} out of range for a StringArray of {}", self.len()),
        }
    }
}

/// Iterator over a [`StringArray`].
#[derive(Debug, Clone)]
pub struct StringArrayIter<'a> {
    a: &'a StringArray,
    i: usize,
}

impl<'a> Iterator for StringArrayIter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.a.get(self.i)?;
        self.i += 1;
        Some(s)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.a.len() - self.i;
        (n, Some(n))
    }
}

impl ExactSizeIterator for StringArrayIter<'_> {}

impl<'a> IntoIterator for &'a StringArray {
    type Item = &'a str;
    type IntoIter = StringArrayIter<'a>;

    fn into_iter(self) -> StringArrayIter<'a> {
        self.iter()
    }
}

impl<S: AsRef<str>> FromIterator<S> for StringArray {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut a = StringArray::new();
        for s in iter {
            a.push(s.as_ref());
        }
        a
    }
}

impl From<Vec<String>> for StringArray {
    fn from(v: Vec<String>) -> Self {
        v.iter().collect()
    }
}

impl From<Vec<&str>> for StringArray {
    fn from(v: Vec<&str>) -> Self {
        v.iter().collect()
    }
}

/// An [`Array`] built from [`Value`]s that are not all of the element type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("mixed array: element type {first} but an element of type {other}", first = .first.name(), other = .other.name())]
pub struct MixedArray {
    /// The array's element type.
    pub first: ValueType,
    /// The type of the first element that differs.
    pub other: ValueType,
}

/// A homogeneous metadata array, stored as a typed vector: 4 bytes per `f32`/`i32` element,
/// strings packed in one buffer ([`StringArray`]), nested arrays as a `Vec<Array>` (each
/// inner array has its own element type).
///
/// The element type of an empty array is kept, so files round-trip exactly.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    /// `u8` elements.
    U8(Vec<u8>),
    /// `i8` elements.
    I8(Vec<i8>),
    /// `u16` elements.
    U16(Vec<u16>),
    /// `i16` elements.
    I16(Vec<i16>),
    /// `u32` elements.
    U32(Vec<u32>),
    /// `i32` elements.
    I32(Vec<i32>),
    /// `f32` elements.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// String elements.
    String(StringArray),
    /// Array elements (arrays of arrays).
    Array(Vec<Array>),
    /// `u64` elements.
    U64(Vec<u64>),
    /// `i64` elements.
    I64(Vec<i64>),
    /// `f64` elements.
    F64(Vec<f64>),
}

/// Applies `$e` to the vector inside any variant of an [`Array`].
macro_rules! each_vec {
    ($a:expr, $v:ident => $e:expr) => {
        match $a {
            Array::U8($v) => $e,
            Array::I8($v) => $e,
            Array::U16($v) => $e,
            Array::I16($v) => $e,
            Array::U32($v) => $e,
            Array::I32($v) => $e,
            Array::F32($v) => $e,
            Array::Bool($v) => $e,
            Array::String($v) => $e,
            Array::Array($v) => $e,
            Array::U64($v) => $e,
            Array::I64($v) => $e,
            Array::F64($v) => $e,
        }
    };
}

macro_rules! slice_getters {
    ($($name:ident => $v:ident : $t:ty),*) => {$(
        #[doc = concat!("The elements, if they are `", stringify!($t), "`.")]
        pub fn $name(&self) -> Option<&[$t]> {
            match self {
                Array::$v(x) => Some(x),
                _ => None,
            }
        }
    )*};
}

impl Array {
    /// An empty array of the given element type.
    pub fn empty(element_type: ValueType) -> Array {
        match element_type {
            ValueType::U8 => Array::U8(Vec::new()),
            ValueType::I8 => Array::I8(Vec::new()),
            ValueType::U16 => Array::U16(Vec::new()),
            ValueType::I16 => Array::I16(Vec::new()),
            ValueType::U32 => Array::U32(Vec::new()),
            ValueType::I32 => Array::I32(Vec::new()),
            ValueType::F32 => Array::F32(Vec::new()),
            ValueType::Bool => Array::Bool(Vec::new()),
            ValueType::String => Array::String(StringArray::new()),
            ValueType::Array => Array::Array(Vec::new()),
            ValueType::U64 => Array::U64(Vec::new()),
            ValueType::I64 => Array::I64(Vec::new()),
            ValueType::F64 => Array::F64(Vec::new()),
        }
    }

    /// Builds an array of `element_type` from values that must all be of that type.
    pub fn from_values(element_type: ValueType, items: Vec<Value>) -> Result<Array, MixedArray> {
        let mut a = Array::empty(element_type);
        for v in items {
            a.push(v)?;
        }
        Ok(a)
    }

    /// Builds an array whose element type is that of the first value (`u8` when empty).
    pub fn from_values_inferred(items: Vec<Value>) -> Result<Array, MixedArray> {
        let ty = items.first().map_or(ValueType::U8, Value::value_type);
        Array::from_values(ty, items)
    }

    /// Appends a value of the element type.
    pub fn push(&mut self, v: Value) -> Result<(), MixedArray> {
        match (self, v) {
            (Array::U8(a), Value::U8(x)) => a.push(x),
            (Array::I8(a), Value::I8(x)) => a.push(x),
            (Array::U16(a), Value::U16(x)) => a.push(x),
            (Array::I16(a), Value::I16(x)) => a.push(x),
            (Array::U32(a), Value::U32(x)) => a.push(x),
            (Array::I32(a), Value::I32(x)) => a.push(x),
            (Array::F32(a), Value::F32(x)) => a.push(x),
            (Array::Bool(a), Value::Bool(x)) => a.push(x),
            (Array::String(a), Value::String(x)) => a.push(&x),
            (Array::Array(a), Value::Array(x)) => a.push(x),
            (Array::U64(a), Value::U64(x)) => a.push(x),
            (Array::I64(a), Value::I64(x)) => a.push(x),
            (Array::F64(a), Value::F64(x)) => a.push(x),
            (a, v) => {
                return Err(MixedArray {
                    first: a.element_type(),
                    other: v.value_type(),
                });
            }
        }
        Ok(())
    }

    /// The element type.
    pub const fn element_type(&self) -> ValueType {
        match self {
            Array::U8(_) => ValueType::U8,
            Array::I8(_) => ValueType::I8,
            Array::U16(_) => ValueType::U16,
            Array::I16(_) => ValueType::I16,
            Array::U32(_) => ValueType::U32,
            Array::I32(_) => ValueType::I32,
            Array::F32(_) => ValueType::F32,
            Array::Bool(_) => ValueType::Bool,
            Array::String(_) => ValueType::String,
            Array::Array(_) => ValueType::Array,
            Array::U64(_) => ValueType::U64,
            Array::I64(_) => ValueType::I64,
            Array::F64(_) => ValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        each_vec!(self, v => v.len())
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as an owned [`Value`] (a string or nested array is copied; prefer the typed
    /// accessors such as [`str_at`](Self::str_at) or [`as_f32_slice`](Self::as_f32_slice)).
    pub fn get(&self, i: usize) -> Option<Value> {
        Some(match self {
            Array::U8(a) => Value::U8(*a.get(i)?),
            Array::I8(a) => Value::I8(*a.get(i)?),
            Array::U16(a) => Value::U16(*a.get(i)?),
            Array::I16(a) => Value::I16(*a.get(i)?),
            Array::U32(a) => Value::U32(*a.get(i)?),
            Array::I32(a) => Value::I32(*a.get(i)?),
            Array::F32(a) => Value::F32(*a.get(i)?),
            Array::Bool(a) => Value::Bool(*a.get(i)?),
            Array::String(a) => Value::String(a.get(i)?.to_owned()),
            Array::Array(a) => Value::Array(a.get(i)?.clone()),
            Array::U64(a) => Value::U64(*a.get(i)?),
            Array::I64(a) => Value::I64(*a.get(i)?),
            Array::F64(a) => Value::F64(*a.get(i)?),
        })
    }

    /// The elements as owned [`Value`]s (see [`get`](Self::get) about copies).
    pub fn iter(&self) -> impl Iterator<Item = Value> + '_ {
        (0..self.len()).map_while(move |i| self.get(i))
    }

    /// Integer element `i` widened to i128 (`None` past the end or for a non-integer array).
    pub fn int_at(&self, i: usize) -> Option<i128> {
        Some(match self {
            Array::U8(a) => (*a.get(i)?).into(),
            Array::I8(a) => (*a.get(i)?).into(),
            Array::U16(a) => (*a.get(i)?).into(),
            Array::I16(a) => (*a.get(i)?).into(),
            Array::U32(a) => (*a.get(i)?).into(),
            Array::I32(a) => (*a.get(i)?).into(),
            Array::U64(a) => (*a.get(i)?).into(),
            Array::I64(a) => (*a.get(i)?).into(),
            _ => return None,
        })
    }

    /// String element `i`, if this is a string array and `i < len()`.
    pub fn str_at(&self, i: usize) -> Option<&str> {
        self.as_strings()?.get(i)
    }

    /// The strings, if this is a string array.
    pub fn as_strings(&self) -> Option<&StringArray> {
        match self {
            Array::String(s) => Some(s),
            _ => None,
        }
    }

    /// The inner arrays, if this is an array of arrays.
    pub fn as_arrays(&self) -> Option<&[Array]> {
        match self {
            Array::Array(a) => Some(a),
            _ => None,
        }
    }

    slice_getters!(as_u8_slice => U8: u8, as_i8_slice => I8: i8, as_u16_slice => U16: u16,
        as_i16_slice => I16: i16, as_u32_slice => U32: u32, as_i32_slice => I32: i32,
        as_f32_slice => F32: f32, as_bool_slice => Bool: bool, as_u64_slice => U64: u64,
        as_i64_slice => I64: i64, as_f64_slice => F64: f64);

    /// Heap bytes held by the elements (by capacity, nested arrays included).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Array::String(s) => s.heap_bytes(),
            Array::Array(a) => {
                a.capacity() * std::mem::size_of::<Array>()
                    + a.iter().map(Array::heap_bytes).sum::<usize>()
            }
            Array::U8(v) => vec_heap(v),
            Array::I8(v) => vec_heap(v),
            Array::U16(v) => vec_heap(v),
            Array::I16(v) => vec_heap(v),
            Array::U32(v) => vec_heap(v),
            Array::I32(v) => vec_heap(v),
            Array::F32(v) => vec_heap(v),
            Array::Bool(v) => vec_heap(v),
            Array::U64(v) => vec_heap(v),
            Array::I64(v) => vec_heap(v),
            Array::F64(v) => vec_heap(v),
        }
    }
}

fn vec_heap<T>(v: &Vec<T>) -> usize {
    v.capacity() * std::mem::size_of::<T>()
}

impl std::fmt::Display for Array {
    /// `[a, b, ...]`: at most eight elements, then `... (N items)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[")?;
        for (i, v) in self.iter().take(8).enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{v}")?;
        }
        if self.len() > 8 {
            write!(f, ", ... ({} items)", self.len())?;
        }
        f.write_str("]")
    }
}

macro_rules! array_from {
    ($($t:ty => $v:ident),*) => {$(
        impl From<Vec<$t>> for Array {
            fn from(x: Vec<$t>) -> Self {
                Array::$v(x)
            }
        }
    )*};
}
array_from!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, u64 => U64, i64 => I64, f64 => F64, Array => Array);

impl From<StringArray> for Array {
    fn from(s: StringArray) -> Self {
        Array::String(s)
    }
}

impl From<Vec<String>> for Array {
    fn from(v: Vec<String>) -> Self {
        Array::String(v.into())
    }
}

impl From<Vec<&str>> for Array {
    fn from(v: Vec<&str>) -> Self {
        Array::String(v.into())
    }
}
