//! ggml tensor element types, their on-disk ids and their block geometry.

/// Which file flavour a type id is read from.
///
/// The reference PowerInfer forked ggml before the IQ types existed, so its `PWRI` files number
/// the integer types `I8 = 16`, `I16 = 17`, `I32 = 18`; modern GGUF uses 24, 25 and 26 for them
/// and 16.. for IQ types. The magic decides which numbering applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Magic {
    /// A standard GGUF file (`GGUF`).
    Gguf,
    /// A PowerInfer file (`PWRI`): standard GGUF layout with the older integer type ids.
    Pwri,
}

impl Magic {
    /// The four magic bytes at the start of the file.
    pub const fn bytes(self) -> [u8; 4] {
        match self {
            Magic::Gguf => *b"GGUF",
            Magic::Pwri => *b"PWRI",
        }
    }

    /// Recognises the four magic bytes.
    pub fn from_bytes(b: [u8; 4]) -> Option<Self> {
        match &b {
            b"GGUF" => Some(Magic::Gguf),
            b"PWRI" => Some(Magic::Pwri),
            _ => None,
        }
    }

    /// A short display name ("GGUF" or "PWRI").
    pub const fn name(self) -> &'static str {
        match self {
            Magic::Gguf => "GGUF",
            Magic::Pwri => "PWRI",
        }
    }
}

macro_rules! ggml_types {
    ($( $(#[$doc:meta])* $name:ident = $id:literal, $blck:literal, $size:literal, $label:literal; )*) => {
        /// A ggml tensor element type.
        ///
        /// Quantized types store `block_size()` elements in `type_size()` bytes.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum GgmlType {
            $( $(#[$doc])* $name, )*
        }

        impl GgmlType {
            /// Every type this crate knows, in modern id order.
            pub const ALL: &'static [GgmlType] = &[ $( GgmlType::$name, )* ];

            /// The type id in a modern GGUF file.
            pub const fn gguf_id(self) -> u32 {
                match self { $( GgmlType::$name => $id, )* }
            }

            /// Elements per block (1 for plain scalar types).
            pub const fn block_size(self) -> usize {
                match self { $( GgmlType::$name => $blck, )* }
            }

            /// Bytes per block.
            pub const fn type_size(self) -> usize {
                match self { $( GgmlType::$name => $size, )* }
            }

            /// The name llama.cpp prints for the type ("Q4_0", "F16", ...).
            pub const fn name(self) -> &'static str {
                match self { $( GgmlType::$name => $label, )* }
            }

            fn from_gguf_id(id: u32) -> Option<Self> {
                match id { $( $id => Some(GgmlType::$name), )* _ => None }
            }
        }
    };
}

ggml_types! {
    /// 32-bit IEEE float.
    F32 = 0, 1, 4, "F32";
    /// 16-bit IEEE float.
    F16 = 1, 1, 2, "F16";
    /// 4-bit, 32 per block, one f16 scale.
    Q4_0 = 2, 32, 18, "Q4_0";
    /// 4-bit, 32 per block, f16 scale and minimum.
    Q4_1 = 3, 32, 20, "Q4_1";
    /// 5-bit, 32 per block, one f16 scale.
    Q5_0 = 6, 32, 22, "Q5_0";
    /// 5-bit, 32 per block, f16 scale and minimum.
    Q5_1 = 7, 32, 24, "Q5_1";
    /// 8-bit, 32 per block, one f16 scale.
    Q8_0 = 8, 32, 34, "Q8_0";
    /// 8-bit, 32 per block, f16 scale and f16 scaled sum (an activation type).
    Q8_1 = 9, 32, 36, "Q8_1";
    /// 2-bit K-quant, 256 per super-block.
    Q2_K = 10, 256, 84, "Q2_K";
    /// 3-bit K-quant, 256 per super-block.
    Q3_K = 11, 256, 110, "Q3_K";
    /// 4-bit K-quant, 256 per super-block.
    Q4_K = 12, 256, 144, "Q4_K";
    /// 5-bit K-quant, 256 per super-block.
    Q5_K = 13, 256, 176, "Q5_K";
    /// 6-bit K-quant, 256 per super-block.
    Q6_K = 14, 256, 210, "Q6_K";
    /// 8-bit K-quant with f32 scale and block sums (an activation type).
    Q8_K = 15, 256, 292, "Q8_K";
    /// IQ2_XXS (readable, not computable here).
    IQ2_XXS = 16, 256, 66, "IQ2_XXS";
    /// IQ2_XS (readable, not computable here).
    IQ2_XS = 17, 256, 74, "IQ2_XS";
    /// IQ3_XXS (readable, not computable here).
    IQ3_XXS = 18, 256, 98, "IQ3_XXS";
    /// IQ1_S (readable, not computable here).
    IQ1_S = 19, 256, 50, "IQ1_S";
    /// IQ4_NL: 4-bit indices into a non-linear table, 32 per block, one f16 scale.
    IQ4_NL = 20, 32, 18, "IQ4_NL";
    /// IQ3_S (readable, not computable here).
    IQ3_S = 21, 256, 110, "IQ3_S";
    /// IQ2_S (readable, not computable here).
    IQ2_S = 22, 256, 82, "IQ2_S";
    /// IQ4_XS: IQ4_NL values in 256-element super-blocks with 6-bit sub-block scales.
    IQ4_XS = 23, 256, 136, "IQ4_XS";
    /// Signed 8-bit integer.
    I8 = 24, 1, 1, "I8";
    /// Signed 16-bit integer.
    I16 = 25, 1, 2, "I16";
    /// Signed 32-bit integer.
    I32 = 26, 1, 4, "I32";
    /// Signed 64-bit integer.
    I64 = 27, 1, 8, "I64";
    /// 64-bit IEEE float.
    F64 = 28, 1, 8, "F64";
    /// IQ1_M (readable, not computable here).
    IQ1_M = 29, 256, 56, "IQ1_M";
    /// bfloat16.
    BF16 = 30, 1, 2, "BF16";
    /// Ternary TQ1_0 (readable, not computable here).
    TQ1_0 = 34, 256, 54, "TQ1_0";
    /// Ternary TQ2_0 (readable, not computable here).
    TQ2_0 = 35, 256, 66, "TQ2_0";
    /// MXFP4 (readable, not computable here).
    MXFP4 = 39, 32, 17, "MXFP4";
}

impl GgmlType {
    /// Decodes a type id as stored in a file with the given magic.
    ///
    /// `PWRI` files use the reference's older ggml numbering: 16, 17 and 18 are `I8`, `I16` and
    /// `I32`, and no id above 18 exists there.
    pub fn from_id(id: u32, magic: Magic) -> Option<Self> {
        match magic {
            Magic::Gguf => Self::from_gguf_id(id),
            Magic::Pwri => match id {
                16 => Some(GgmlType::I8),
                17 => Some(GgmlType::I16),
                18 => Some(GgmlType::I32),
                0..=15 => Self::from_gguf_id(id),
                _ => None,
            },
        }
    }

    /// The id this type is stored under in a file with the given magic, or `None` if that
    /// flavour cannot represent it (IQ types and newer in a `PWRI` file).
    pub fn id(self, magic: Magic) -> Option<u32> {
        match magic {
            Magic::Gguf => Some(self.gguf_id()),
            Magic::Pwri => match self {
                GgmlType::I8 => Some(16),
                GgmlType::I16 => Some(17),
                GgmlType::I32 => Some(18),
                t if t.gguf_id() <= 15 => Some(t.gguf_id()),
                _ => None,
            },
        }
    }

    /// Parses a type name such as `q4_0` or `Q4_K` (case-insensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// True for block-quantized types (block size above one).
    pub const fn is_quantized(self) -> bool {
        self.block_size() > 1
    }

    /// Bytes taken by `n_elements` consecutive elements, or `None` if `n_elements` is not a
    /// whole number of blocks or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let bs = self.block_size() as u64;
        if !n_elements.is_multiple_of(bs) {
            return None;
        }
        (n_elements / bs).checked_mul(self.type_size() as u64)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_in_both_numberings() {
        for &t in GgmlType::ALL {
            assert_eq!(GgmlType::from_id(t.gguf_id(), Magic::Gguf), Some(t));
            if let Some(id) = t.id(Magic::Pwri) {
                assert_eq!(GgmlType::from_id(id, Magic::Pwri), Some(t));
            }
        }
        assert_eq!(GgmlType::from_id(18, Magic::Pwri), Some(GgmlType::I32));
        assert_eq!(GgmlType::from_id(18, Magic::Gguf), Some(GgmlType::IQ3_XXS));
        assert_eq!(GgmlType::from_id(26, Magic::Pwri), None);
        assert_eq!(GgmlType::from_id(4, Magic::Gguf), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(GgmlType::Q4_0.bytes_for(64), Some(36));
        assert_eq!(GgmlType::Q4_K.bytes_for(4096), Some(16 * 144));
        assert_eq!(GgmlType::Q4_0.bytes_for(33), None);
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
        assert_eq!(GgmlType::from_name("q6_k"), Some(GgmlType::Q6_K));
    }
}
