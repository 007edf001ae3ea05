//! Model conversion for powerinfer: Hugging Face LLaMA checkpoints (safetensors or PyTorch
//! pickles, SentencePiece `tokenizer.model`) plus PowerInfer predictor directories into GGUF
//! and PowerInfer `PWRI` files laid out exactly as the reference converter writes them, and
//! quantization of such files with llama.cpp's (PowerInfer's) type rules.
//!
//! - [`pt`]: a reader of `torch.save` zip files without Python (allow-listed pickle VM).
//! - [`checkpoint`]: lazy tensors from `.pt`/`.bin` or `.safetensors` files.
//! - [`spm`]: the pieces of a SentencePiece `tokenizer.model`.
//! - [`convert`]: [`convert::convert_hf`], HF directory (+ predictors) to GGUF/PWRI.
//! - [`quantize`]: [`quantize::quantize_file`], GGUF/PWRI to a quantized GGUF/PWRI, streamed
//!   tensor by tensor.
//!
//! ```no_run
//! use std::path::Path;
//! use powerinfer_convert::convert::{ConvertOptions, convert_hf};
//! use powerinfer_convert::quantize::{FileType, QuantizeOptions, quantize_file};
//!
//! let opts = ConvertOptions::default(); // F16
//! convert_hf(Path::new("hf_model"), Some(Path::new("predictor")), Path::new("m.gguf"), &opts, &mut |_| {})?;
//! let q = QuantizeOptions::new(FileType::Q4_0);
//! quantize_file(Path::new("m.gguf"), Path::new("m.q4_0.gguf"), &q, &mut |_| {})?;
//! # Ok::<(), powerinfer_convert::Error>(())
//! ```

use std::path::PathBuf;

pub mod checkpoint;
pub mod convert;
pub mod pt;
pub mod quantize;
pub mod spm;
pub mod tensor;

pub use tensor::{DType, Tensor};

/// Progress of a conversion or quantization, reported after each tensor is written.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    /// Tensors written so far (1-based after the first).
    pub done: usize,
    /// Tensors in all.
    pub total: usize,
    /// The tensor just written.
    pub tensor: &'a str,
    /// Its size in the output, in bytes.
    pub bytes: u64,
}

/// Everything that can go wrong converting or quantizing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A required input file is missing.
    #[error("missing {what}: {path} not found")]
    MissingFile {
        /// What the file is.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A JSON file is malformed or lacks a required field.
    #[error("{path}: {msg}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The checkpoint's architecture is not supported.
    #[error("unsupported architecture {0:?} (supported: LlamaForCausalLM)")]
    UnsupportedArchitecture(String),
    /// The checkpoint's activation function is not supported.
    #[error("unsupported hidden_act {0:?} (supported: relu, silu)")]
    UnsupportedActivation(String),
    /// A PyTorch file could not be read.
    #[error("{path}: {source}")]
    Pt {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: pt::PtError,
    },
    /// A safetensors file could not be read.
    #[error("{path}: bad safetensors file: {msg}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The tokenizer could not be read.
    #[error("{path}: {source}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: spm::SpmError,
    },
    /// The model and the tokenizer disagree on the vocabulary size.
    #[error("vocab size mismatch: the model has {model} tokens, the tokenizer {tokenizer}")]
    VocabMismatch {
        /// `vocab_size` of config.json.
        model: usize,
        /// Pieces (+ added tokens) of the tokenizer.
        tokenizer: usize,
    },
    /// A tensor name the converter does not know.
    #[error("unexpected tensor {name:?} in {path}")]
    UnexpectedTensor {
        /// The name.
        name: String,
        /// The file it came from.
        path: PathBuf,
    },
    /// A tensor the model needs is absent.
    #[error("missing tensor {0}")]
    MissingTensor(String),
    /// A tensor appears in two files.
    #[error("tensor {0} appears more than once")]
    DuplicateTensor(String),
    /// A tensor has the wrong shape.
    #[error("{tensor}: shape {got:?}, expected {expected:?}{note}")]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// Expected shape (PyTorch order).
        expected: Vec<usize>,
        /// Actual shape.
        got: Vec<usize>,
        /// Extra explanation (may be empty).
        note: String,
    },
    /// A tensor's element type cannot be converted.
    #[error("{tensor}: unsupported dtype {dtype} (F32, F16 and BF16 are supported)")]
    UnsupportedDtype {
        /// The tensor.
        tensor: String,
        /// Its type.
        dtype: String,
    },
    /// The predictor directory lacks a layer's predictor.
    #[error(
        "predictor for layer {layer} missing: neither model_{layer}.pt nor model_{layer}.safetensors in {dir}"
    )]
    MissingPredictor {
        /// The layer.
        layer: usize,
        /// The predictor directory.
        dir: PathBuf,
    },
    /// Any other problem with the predictors.
    #[error("predictors: {0}")]
    Predictor(String),
    /// A problem with the input of `quantize`.
    #[error("{0}")]
    Quantize(String),
    /// Reading a GGUF file failed.
    #[error(transparent)]
    Gguf(#[from] powerinfer_gguf::GgufError),
    /// Writing the output failed.
    #[error(transparent)]
    Write(#[from] powerinfer_gguf::WriteError),
    /// A (de)quantization failed.
    #[error(transparent)]
    Quant(#[from] powerinfer_quant::QuantError),
}

/// Writes to `out` through a temporary file next to it, renamed into place only on success,
/// so a failed run never leaves a truncated model behind.
pub(crate) fn write_atomically<T>(
    out: &std::path::Path,
    f: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<T, Error>,
) -> Result<T, Error> {
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let result = f(&mut w).and_then(|v| {
        use std::io::Write;
        w.flush().map_err(io(&tmp))?;
        Ok(v)
    });
    drop(w);
    match result {
        Ok(v) => {
            std::fs::rename(&tmp, out).map_err(io(out))?;
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}
