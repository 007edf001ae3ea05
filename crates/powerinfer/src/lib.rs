//! powerinfer: activation-sparse LLM inference in Rust.
//!
//! This facade holds the few types an embedder needs — load a model, generate text as a stream
//! of tokens, hold a chat — and re-exports the crates underneath for everything else:
//! [`gguf`] (file formats), [`quant`] (block formats and dot products), [`cpu`] (operators),
//! [`generate`] (architectures, tokenizers, sampling, the generation loop).
//!
//! ```
//! use powerinfer::{GenerateOptions, Llm, LoadOptions, SamplerConfig};
//!
//! # let path = concat!(env!("CARGO_MANIFEST_DIR"),
//! #     "/../../../shared/fixtures/powerinfer-tiny/tiny-relu-llama.dense.f16.gguf");
//! # if !std::path::Path::new(path).exists() { return Ok(()); }
//! let llm = Llm::load(path, &LoadOptions { n_threads: 2, n_ctx: 256, ..Default::default() })?;
//! let opts = GenerateOptions { max_tokens: 8, sampler: SamplerConfig::greedy(), ..Default::default() };
//! let mut session = llm.session()?;
//! let mut text = String::new();
//! for token in session.generate_text("Once upon a time", &opts)? {
//!     text.push_str(&token?.text);
//! }
//! assert!(!text.is_empty());
//! # Ok::<(), powerinfer::Error>(())
//! ```

use std::path::Path;

pub use powerinfer_cpu as cpu;
pub use powerinfer_generate as generate;
pub use powerinfer_gguf as gguf;
pub use powerinfer_quant as quant;

pub use powerinfer_cpu::ThreadPool;
pub use powerinfer_generate::chat::{ChatMessage, ChatTemplate};
pub use powerinfer_generate::generation::{
    FinishReason, GenerateError, GenerateOptions, GeneratedToken, GenerationStats, Generator,
    TokenStream,
};
pub use powerinfer_generate::model::SparseMode;
pub use powerinfer_generate::sampling::SamplerConfig;
pub use powerinfer_generate::tokenizer::Tokenizer;
pub use powerinfer_generate::{Model, ModelError};

/// Everything the facade can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The tokenizer could not be built from the file.
    #[error("tokenizer: {0}")]
    Tokenizer(#[from] powerinfer_generate::tokenizer::TokenizerError),
    /// The chat template failed.
    #[error("chat template: {0}")]
    Chat(#[from] powerinfer_generate::chat::ChatError),
    /// Generation failed.
    #[error(transparent)]
    Generate(#[from] GenerateError),
    /// The model has no chat template and none could be chosen.
    #[error("the model has no chat template")]
    NoChatTemplate,
}

/// How to load a model.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Threads for computation; 0 means one per CPU.
    pub n_threads: usize,
    /// Context size in tokens; 0 means the model's training context, capped at 4096.
    pub n_ctx: usize,
    /// Prompt tokens processed per forward call.
    pub n_batch: usize,
    /// How sparse (PowerInfer) files run: the predicted neurons (the default), every neuron
    /// (`SparseMode::Dense`, `--disable-sparse`: the dense reference of the same weights), or
    /// every gate and up with the down projection skipping neurons under the activity threshold
    /// (`SparseMode::Threshold`). No effect on dense files.
    pub sparse_mode: SparseMode,
    /// Sparse files: the predictor threshold for every layer (`--sparse-threshold`), overriding
    /// `LLAMA_SPARSE_PRED_THRESHOLD` and the file's values.
    pub sparse_threshold: Option<f32>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            n_threads: 0,
            n_ctx: 0,
            n_batch: 512,
            sparse_mode: SparseMode::Predicted,
            sparse_threshold: None,
        }
    }
}

/// A loaded model with its tokenizer, chat template and thread pool.
#[derive(Debug)]
pub struct Llm {
    model: Model,
    tokenizer: Tokenizer,
    chat_template: Option<ChatTemplate>,
    pool: ThreadPool,
    n_ctx: usize,
    n_batch: usize,
}

impl Llm {
    /// Memory-maps a GGUF model and builds its tokenizer.
    pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Llm, Error> {
        Self::load_with_progress(path, opts, |_, _| {})
    }

    /// Like [`load`](Self::load), and then reads the weights through once so the first tokens
    /// do not wait on the disk, calling `progress(bytes_done, bytes_total)` as it goes.
    pub fn load_with_progress(
        path: impl AsRef<Path>,
        opts: &LoadOptions,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<Llm, Error> {
        let mut model = Model::load(path)?;
        model.set_sparse_mode(opts.sparse_mode);
        model.set_sparse_threshold(opts.sparse_threshold)?;
        let file = model.file().clone();
        let tokenizer = Tokenizer::from_gguf(&file)?;
        let chat_template = ChatTemplate::from_gguf(&file).ok();
        let total: u64 = file.tensors().iter().map(|t| t.size).sum();
        let mut done = 0u64;
        let mut sink = 0u8;
        for t in file.tensors() {
            // Touch one byte per page: the kernel reads the mapping in.
            for b in file.tensor_data(t).iter().step_by(4096) {
                sink ^= b;
            }
            done += t.size;
            progress(done, total);
        }
        std::hint::black_box(sink);
        let train_ctx = model.config().n_ctx_train;
        let n_ctx = match opts.n_ctx {
            0 => train_ctx.clamp(1, 4096),
            n => n,
        };
        Ok(Llm {
            model,
            tokenizer,
            chat_template,
            pool: ThreadPool::new(opts.n_threads),
            n_ctx,
            n_batch: opts.n_batch.max(1),
        })
    }

    /// The model.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template from the file, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// The thread pool computations run on.
    pub fn pool(&self) -> &ThreadPool {
        &self.pool
    }

    /// The context size sessions get.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Tokenizes `text` the way llama.cpp does for a prompt (BOS where the model wants one,
    /// special tokens parsed).
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text, true, true)
    }

    /// A new session with its own KV cache.
    pub fn session(&self) -> Result<Session<'_>, Error> {
        Ok(Session {
            llm: self,
            generator: Generator::new(
                &self.model,
                &self.tokenizer,
                &self.pool,
                self.n_ctx,
                self.n_batch,
            )?,
        })
    }

    /// A chat with the model's template (or a built-in one the template name selects).
    pub fn chat(&self) -> Result<Chat<'_>, Error> {
        let template = self.chat_template.clone().ok_or(Error::NoChatTemplate)?;
        Ok(Chat {
            session: self.session()?,
            template,
            messages: Vec::new(),
        })
    }
}

/// A KV cache and the generation loop over it.
#[derive(Debug)]
pub struct Session<'a> {
    llm: &'a Llm,
    generator: Generator<'a>,
}

impl<'a> Session<'a> {
    /// Generates from prompt tokens.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
    ) -> Result<TokenStream<'_, 'a>, Error> {
        Ok(self.generator.generate(prompt, opts)?)
    }

    /// Tokenizes `prompt` and generates from it.
    pub fn generate_text(
        &mut self,
        prompt: &str,
        opts: &GenerateOptions,
    ) -> Result<TokenStream<'_, 'a>, Error> {
        let tokens = self.llm.tokenize(prompt);
        self.generate(&tokens, opts)
    }

    /// The underlying generator.
    pub fn generator(&mut self) -> &mut Generator<'a> {
        &mut self.generator
    }
}

/// A conversation: messages rendered through the chat template, the KV cache reused from turn
/// to turn.
#[derive(Debug)]
pub struct Chat<'a> {
    session: Session<'a>,
    template: ChatTemplate,
    messages: Vec<ChatMessage>,
}

impl Chat<'_> {
    /// Sets a system message (before the first user message).
    pub fn system(&mut self, content: &str) {
        self.messages.push(ChatMessage::new("system", content));
    }

    /// The messages so far.
    pub fn messages(&self) -> &[ChatMessage] {
        &self.messages
    }

    /// Sends a user message; streams the answer's text pieces to `on_text` and returns the
    /// whole answer.
    pub fn send(
        &mut self,
        content: &str,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<String, Error> {
        self.messages.push(ChatMessage::new("user", content));
        let prompt = self.template.apply(&self.messages, true)?;
        // The template renders BOS itself where the model wants one.
        let add_special = !self.template.renders_bos();
        let tokens = self
            .session
            .llm
            .tokenizer
            .encode(&prompt, add_special, true);
        let mut answer = String::new();
        let mut stream = self.session.generate(&tokens, opts)?;
        for t in stream.by_ref() {
            let t = t?;
            on_text(&t.text);
            answer.push_str(&t.text);
        }
        let rest = stream.flush();
        on_text(&rest);
        answer.push_str(&rest);
        self.messages
            .push(ChatMessage::new("assistant", answer.clone()));
        Ok(answer)
    }
}
