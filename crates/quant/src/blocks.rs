//! Typed ggml blocks, `#[repr(C)]` and bit-identical to ggml's structs.
//!
//! The kernels in this crate read raw byte slices (GGUF tensors are not guaranteed to be aligned
//! for these structs); the types document the layouts and let callers build or inspect blocks
//! with [`bytemuck`].

use bytemuck::{Pod, Zeroable};
use half::f16;
use powerinfer_gguf::GgmlType;

/// Elements per block of the 32-element formats.
pub const QK: usize = 32;
/// Elements per K-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of packed 6-bit scales/mins in a Q4_K / Q5_K super-block.
pub const K_SCALE_SIZE: usize = 12;

/// Q4_0: 32 weights as 4-bit values `q - 8`, times `d`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_0 {
    /// Scale.
    pub d: f16,
    /// Nibbles: low nibble of byte `j` is element `j`, high nibble element `j + 16`.
    pub qs: [u8; QK / 2],
}

/// Q4_1: 32 weights as 4-bit values `q * d + m`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_1 {
    /// Scale.
    pub d: f16,
    /// Minimum.
    pub m: f16,
    /// Nibbles, as in [`BlockQ4_0`].
    pub qs: [u8; QK / 2],
}

/// Q5_0: 32 weights as 5-bit values `q - 16`, times `d`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_0 {
    /// Scale.
    pub d: f16,
    /// Fifth bits, bit `j` of the little-endian u32 belongs to element `j`.
    pub qh: [u8; 4],
    /// Low nibbles, as in [`BlockQ4_0`].
    pub qs: [u8; QK / 2],
}

/// Q5_1: 32 weights as 5-bit values `q * d + m`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_1 {
    /// Scale.
    pub d: f16,
    /// Minimum.
    pub m: f16,
    /// Fifth bits, as in [`BlockQ5_0`].
    pub qh: [u8; 4],
    /// Low nibbles.
    pub qs: [u8; QK / 2],
}

/// Q8_0: 32 signed bytes times `d`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// Scale.
    pub d: f16,
    /// Quants.
    pub qs: [i8; QK],
}

/// Q8_1: Q8_0 plus `s = d * sum(qs)` (activation type for Q4_1 / Q5_1).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_1 {
    /// Scale.
    pub d: f16,
    /// `d * sum(qs)`.
    pub s: f16,
    /// Quants.
    pub qs: [i8; QK],
}

/// Q4_K: 8 sub-blocks of 32 with 6-bit scales and mins.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4K {
    /// Super-block scale of the scales.
    pub d: f16,
    /// Super-block scale of the mins.
    pub dmin: f16,
    /// Packed 6-bit scales and mins.
    pub scales: [u8; K_SCALE_SIZE],
    /// Nibbles: for each 64-element chunk, 32 bytes, low nibbles first 32 elements.
    pub qs: [u8; QK_K / 2],
}

/// Q5_K: Q4_K plus one high bit per element.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5K {
    /// Super-block scale of the scales.
    pub d: f16,
    /// Super-block scale of the mins.
    pub dmin: f16,
    /// Packed 6-bit scales and mins.
    pub scales: [u8; K_SCALE_SIZE],
    /// High bits.
    pub qh: [u8; QK_K / 8],
    /// Low nibbles.
    pub qs: [u8; QK_K / 2],
}

/// Q6_K: 16 sub-blocks of 16 with signed 8-bit scales, 6-bit values `q - 32`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ6K {
    /// Low 4 bits.
    pub ql: [u8; QK_K / 2],
    /// High 2 bits.
    pub qh: [u8; QK_K / 4],
    /// Sub-block scales.
    pub scales: [i8; QK_K / 16],
    /// Super-block scale.
    pub d: f16,
}

/// Q2_K: 16 sub-blocks of 16 with 4-bit scales and mins, 2-bit values `q * d * sc - dmin * m`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ2K {
    /// Sub-block `j`'s scale in the low nibble of byte `j`, its min in the high nibble.
    pub scales: [u8; QK_K / 16],
    /// 2-bit values: for each 128-element half, 32 bytes; bits `2k..2k+2` of byte `l` hold
    /// element `32k + l` of that half.
    pub qs: [u8; QK_K / 4],
    /// Super-block scale of the scales.
    pub d: f16,
    /// Super-block scale of the mins.
    pub dmin: f16,
}

/// Q3_K: 16 sub-blocks of 16 with signed 6-bit scales, 3-bit values `q - 4` times `d * sc`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ3K {
    /// High bits: bit `k` of byte `l` belongs to element `32k + l` (set means no `- 4`).
    pub hmask: [u8; QK_K / 8],
    /// Low 2 bits, packed as in [`BlockQ2K::qs`].
    pub qs: [u8; QK_K / 4],
    /// Packed 6-bit scales (stored `+ 32`): low nibbles in bytes 0..8, high 2 bits in 8..12.
    pub scales: [u8; 12],
    /// Super-block scale.
    pub d: f16,
}

/// IQ4_NL: 32 weights as 4-bit indices into the non-linear table [`KVALUES_IQ4NL`], times `d`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockIQ4NL {
    /// Scale.
    pub d: f16,
    /// Index nibbles, as in [`BlockQ4_0`].
    pub qs: [u8; QK / 2],
}

/// IQ4_XS: 8 sub-blocks of 32 with 6-bit scales (stored `+ 32`), 4-bit indices into
/// [`KVALUES_IQ4NL`].
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockIQ4XS {
    /// Super-block scale.
    pub d: f16,
    /// High 2 bits of the scales: bits `2j..2j+2` belong to sub-block `j`.
    pub scales_h: u16,
    /// Low 4 bits of the scales: sub-block `2i` in the low nibble of byte `i`, `2i + 1` in
    /// the high one.
    pub scales_l: [u8; QK_K / 64],
    /// Index nibbles: 16 bytes per sub-block, as in [`BlockQ4_0`].
    pub qs: [u8; QK_K / 2],
}

/// The 16 values of ggml's non-linear 4-bit grid (`kvalues_iq4nl`), used by IQ4_NL / IQ4_XS.
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Q8_K: 256 signed bytes with an f32 scale and per-16 sums (activation type for K-quants).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8K {
    /// Scale.
    pub d: f32,
    /// Quants.
    pub qs: [i8; QK_K],
    /// Sum of each group of 16 quants.
    pub bsums: [i16; QK_K / 16],
}

macro_rules! assert_size {
    ($($t:ty => $g:expr),* $(,)?) => {
        $(
            const _: () = assert!(std::mem::size_of::<$t>() == $g.type_size());
            const _: () = assert!($g.block_size() == QK || $g.block_size() == QK_K);
        )*
    };
}

assert_size! {
    BlockQ4_0 => GgmlType::Q4_0,
    BlockQ4_1 => GgmlType::Q4_1,
    BlockQ5_0 => GgmlType::Q5_0,
    BlockQ5_1 => GgmlType::Q5_1,
    BlockQ8_0 => GgmlType::Q8_0,
    BlockQ8_1 => GgmlType::Q8_1,
    BlockQ4K => GgmlType::Q4_K,
    BlockQ5K => GgmlType::Q5_K,
    BlockQ6K => GgmlType::Q6_K,
    BlockQ8K => GgmlType::Q8_K,
    BlockQ2K => GgmlType::Q2_K,
    BlockQ3K => GgmlType::Q3_K,
    BlockIQ4NL => GgmlType::IQ4_NL,
    BlockIQ4XS => GgmlType::IQ4_XS,
}
