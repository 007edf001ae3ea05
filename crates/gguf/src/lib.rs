//! GGUF and PowerInfer (`PWRI`) model files.
//!
//! - [`GgufFile`]: a zero-copy (memory-mapped) reader for GGUF v2/v3 and `PWRI` files that
//!   validates every count, offset and size against the file before use.
//! - [`GgufWriter`]: writes the same formats, in memory or streamed tensor by tensor.
//! - [`gpuidx`]: PowerInfer's GPU placement files (`.gpuidx`).
//! - [`types`]: ggml element types, their ids in both numberings, and block geometry.
//!
//! ```
//! use powerinfer_gguf::{GgmlType, GgufFile, GgufWriter, Magic, Value};
//! let mut w = GgufWriter::new(Magic::Gguf);
//! w.add_kv("general.architecture", Value::from("llama")).unwrap();
//! w.add_kv("llama.block_count", Value::U32(2)).unwrap();
//! w.add_tensor("w", GgmlType::F32, &[3, 2], vec![0u8; 24]).unwrap();
//! let f = GgufFile::from_bytes(w.write_to_vec().unwrap()).unwrap();
//! assert_eq!(f.get_arch_u32("block_count"), Ok(2));
//! assert_eq!(f.tensor("w").unwrap().n_rows(), 2);
//! ```

pub mod error;
pub mod gpuidx;
pub mod reader;
pub mod types;
pub mod value;
pub mod writer;

pub use error::{GgufError, MetadataError, WriteError};
pub use gpuidx::{GpuIndex, GpuIndexError, LayerGpuIndex};
pub use reader::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GgufFile, MAX_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_ARRAY_ELEMENTS,
    MAX_DIMS, TensorInfo,
};
pub use types::{GgmlType, Magic};
pub use value::{Array, MixedArray, StringArray, StringArrayIter, Value, ValueType};
pub use writer::{GgufWriter, TensorStream};

#[cfg(test)]
mod tests {
    #[test]
    fn file_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<crate::GgufFile>();
        check::<crate::GpuIndex>();
    }
}
