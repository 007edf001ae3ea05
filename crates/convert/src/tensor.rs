//! Element types and owned tensors shared by the checkpoint readers.

use half::{bf16, f16};

/// Element type of a checkpoint tensor (PyTorch storage types and safetensors dtypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 64-bit float.
    F64,
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 16-bit signed integer.
    I16,
    /// 8-bit signed integer.
    I8,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean (one byte).
    Bool,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// Short upper-case name ("F16", "BF16", ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F64 => "F64",
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// Whether the converter can read this type as floating point (F32, F16, BF16).
    pub const fn is_convertible(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A named, contiguous (row-major) tensor with little-endian element bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Name in the checkpoint (e.g. `model.layers.0.mlp.up_proj.weight`).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost dimension first (PyTorch order).
    pub shape: Vec<usize>,
    /// `shape.product() * dtype.size()` bytes, row-major, little-endian.
    pub data: Vec<u8>,
}

impl Tensor {
    /// Number of elements.
    pub fn n_elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements as `f32` (F32, F16 and BF16 only; `None` for other types).
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let mut out = vec![0f32; self.n_elements()];
        to_f32_into(self.dtype, &self.data, &mut out)?;
        Some(out)
    }
}

/// Converts `src` bytes of `dtype` into `dst` (`None` for non-float types or a length mismatch).
pub(crate) fn to_f32_into(dtype: DType, src: &[u8], dst: &mut [f32]) -> Option<()> {
    if src.len() != dst.len() * dtype.size() {
        return None;
    }
    match dtype {
        DType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        DType::F16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        DType::BF16 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        _ => return None,
    }
    Some(())
}

/// Converts float element bytes to F32 bytes (exact for F16 and BF16).
pub(crate) fn bytes_to_f32_bytes(dtype: DType, src: &[u8]) -> Option<Vec<u8>> {
    if dtype == DType::F32 {
        return Some(src.to_vec());
    }
    let mut tmp = vec![0f32; src.len() / dtype.size().max(1)];
    to_f32_into(dtype, src, &mut tmp)?;
    Some(tmp.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Converts float element bytes to F16 bytes (round to nearest even, like numpy's `astype`;
/// F16 input is copied unchanged).
pub(crate) fn bytes_to_f16_bytes(dtype: DType, src: &[u8]) -> Option<Vec<u8>> {
    if dtype == DType::F16 {
        return Some(src.to_vec());
    }
    let mut tmp = vec![0f32; src.len() / dtype.size().max(1)];
    to_f32_into(dtype, src, &mut tmp)?;
    Some(
        tmp.iter()
            .flat_map(|v| f16::from_f32(*v).to_bits().to_le_bytes())
            .collect(),
    )
}

/// Copies the strided view (`offset`, `size`, `stride` in elements) of `storage` into a
/// contiguous buffer. The caller has checked that every index lies inside `storage`.
pub(crate) fn gather(
    storage: &[u8],
    es: usize,
    offset: usize,
    size: &[usize],
    stride: &[usize],
) -> Vec<u8> {
    let n: usize = size.iter().product();
    if n == 0 {
        return Vec::new();
    }
    // Contiguous (row-major) fast path.
    let mut expect = 1usize;
    let mut contiguous = true;
    for (&s, &st) in size.iter().zip(stride).rev() {
        if s != 1 && st != expect {
            contiguous = false;
            break;
        }
        expect *= s;
    }
    if contiguous {
        return storage[offset * es..(offset + n) * es].to_vec();
    }
    let mut out = Vec::with_capacity(n * es);
    let mut idx = vec![0usize; size.len()];
    let mut pos = offset;
    for _ in 0..n {
        out.extend_from_slice(&storage[pos * es..(pos + 1) * es]);
        // Odometer increment, innermost dimension first.
        for d in (0..size.len()).rev() {
            idx[d] += 1;
            pos += stride[d];
            if idx[d] < size[d] {
                break;
            }
            pos -= stride[d] * size[d];
            idx[d] = 0;
        }
    }
    out
}

/// Rows of a `[rows, cols]` row-major matrix of `es`-byte elements permuted the way llama.cpp
/// undoes the Hugging Face rotary layout of Q/K: `reshape(n_head, 2, rows/n_head/2, cols)
/// .swapaxes(1, 2)`. `None` if `rows` is not a multiple of `2 * n_head`.
pub(crate) fn permute_qk(
    data: &[u8],
    rows: usize,
    row_bytes: usize,
    n_head: usize,
) -> Option<Vec<u8>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || data.len() != rows * row_bytes {
        return None;
    }
    let half = rows / n_head / 2;
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * 2 * half + j * half + i;
                out.extend_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Some(out)
}

/// Transposes a `[rows, cols]` row-major matrix of `es`-byte elements.
pub(crate) fn transpose(data: &[u8], rows: usize, cols: usize, es: usize) -> Vec<u8> {
    let mut out = vec![0u8; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            let s = (r * cols + c) * es;
            let d = (c * rows + r) * es;
            out[d..d + es].copy_from_slice(&data[s..s + es]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_matches_index_formula() {
        // storage of 40 one-byte elements; view [3, 4] with stride [1, 3] at offset 2.
        let storage: Vec<u8> = (0..40).collect();
        let got = gather(&storage, 1, 2, &[3, 4], &[1, 3]);
        let mut want = Vec::new();
        for i in 0..3 {
            for j in 0..4 {
                want.push((2 + i + 3 * j) as u8);
            }
        }
        assert_eq!(got, want);
        // Contiguous path and broadcast (stride 0).
        assert_eq!(
            gather(&storage, 1, 5, &[2, 3], &[3, 1]),
            vec![5, 6, 7, 8, 9, 10]
        );
        assert_eq!(gather(&storage, 1, 1, &[2, 2], &[0, 1]), vec![1, 2, 1, 2]);
        assert_eq!(gather(&storage, 2, 1, &[2], &[3]), vec![2, 3, 8, 9]);
    }

    #[test]
    fn permute_matches_reshape_swapaxes() {
        // rows = 8, n_head = 2 -> half = 2; row r of head h: (h, j, i) -> out (h, i, j).
        let rows = 8;
        let data: Vec<u8> = (0..rows as u8).collect();
        let got = permute_qk(&data, rows, 1, 2).unwrap();
        assert_eq!(got, vec![0, 2, 1, 3, 4, 6, 5, 7]);
        assert!(permute_qk(&data, rows, 1, 3).is_none());
    }

    #[test]
    fn transpose_roundtrip() {
        let data: Vec<u8> = (0..24).collect();
        let t = transpose(&data, 3, 4, 2);
        assert_eq!(&t[0..4], &[0, 1, 8, 9]);
        assert_eq!(transpose(&t, 4, 3, 2), data);
    }

    #[test]
    fn f16_conversion_rounds_to_nearest_even() {
        // 1 + 2^-11 is exactly half way between 1 and the next f16: ties to even (1.0).
        let x = 1.0f32 + f32::powi(2.0, -11);
        let b = bytes_to_f16_bytes(DType::F32, &x.to_le_bytes()).unwrap();
        assert_eq!(
            u16::from_le_bytes([b[0], b[1]]),
            f16::from_f32(1.0).to_bits()
        );
        let bf = bf16::from_f32(3.5).to_bits().to_le_bytes();
        let f = bytes_to_f32_bytes(DType::BF16, &bf).unwrap();
        assert_eq!(f32::from_le_bytes([f[0], f[1], f[2], f[3]]), 3.5);
    }
}
