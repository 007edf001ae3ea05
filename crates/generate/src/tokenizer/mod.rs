//! Tokenizers read from GGUF vocabularies, matching llama.cpp token for token.
//!
//! Two vocabulary kinds are supported, chosen by `tokenizer.ggml.model`:
//!
//! - `"llama"`: SentencePiece-style ([`TokenizerKind::Spm`]; LLaMA 1/2, Gemma, the PowerInfer
//!   fixtures): spaces become `▁`, a space is prepended when `add_space_prefix` is on (default
//!   true, Gemma 3 turns it off), pieces merge by score, unknown characters fall back to
//!   `<0xXX>` byte tokens.
//! - `"gpt2"`: byte-level BPE ([`TokenizerKind::Bpe`]; SmolLM2 and other GPT-2 style
//!   vocabularies): text is split by the pre-tokenizer named in `tokenizer.ggml.pre` (see
//!   [`PreTokenizer`]), bytes map to GPT-2's printable characters, pieces merge by rank.
//!
//! Special tokens (control, user-defined and unknown types) are split out of the text before
//! either algorithm runs, longest first, as llama.cpp does: user-defined tokens always, control
//! tokens only when `parse_special` is set.
//!
//! ```no_run
//! use powerinfer_generate::tokenizer::Tokenizer;
//! let gguf = powerinfer_gguf::GgufFile::open("model.gguf").unwrap();
//! let tok = Tokenizer::from_gguf(&gguf).unwrap();
//! let ids = tok.encode("Hello world", true, false);
//! assert_eq!(tok.decode(&ids, false), "Hello world");
//! ```

mod bpe;
mod pretok;
mod spm;
mod stream;
mod unicode_tables;
mod vocab;

use std::collections::{HashMap, HashSet};

use powerinfer_gguf::{Array, GgufFile, StringArray, Value};

use thiserror::Error;
use vocab::Vocab;

pub use pretok::PreTokenizer;
pub use stream::StreamDecoder;

/// Errors while building a tokenizer.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TokenizerError {
    /// A required metadata key is absent.
    #[error("tokenizer metadata key `{0}` is missing")]
    MissingKey(&'static str),
    /// A metadata key holds the wrong type.
    #[error("tokenizer metadata key `{key}` should be {expected}")]
    WrongType {
        /// The key.
        key: &'static str,
        /// What it should hold.
        expected: &'static str,
    },
    /// `tokenizer.ggml.model` names a tokenizer this crate does not implement.
    #[error("unsupported tokenizer model `{0}` (supported: \"llama\", \"gpt2\")")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    #[error("unsupported BPE pre-tokenizer `{0}`")]
    UnsupportedPreTokenizer(String),
    /// The vocabulary is empty.
    #[error("the vocabulary is empty")]
    EmptyVocab,
    /// A per-token array is shorter than the token list.
    #[error("{what} has {got} entries for {expected} tokens")]
    LengthMismatch {
        /// Which array.
        what: &'static str,
        /// The number of tokens.
        expected: usize,
        /// The array's length.
        got: usize,
    },
    /// The same piece appears twice.
    #[error("duplicate token {text:?} at ids {first} and {second}")]
    DuplicateToken {
        /// The piece.
        text: String,
        /// Its first id.
        first: u32,
        /// Its second id.
        second: u32,
    },
    /// BOS/EOS insertion is requested but the token is not set.
    #[error("{0} is enabled but the token id is not set")]
    MissingSpecialToken(&'static str),
    /// A BPE vocabulary without merge rules.
    #[error("BPE vocabulary without `tokenizer.ggml.merges`")]
    MissingMerges,
}

/// The token type stored per token in `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// 0: undefined.
    Undefined,
    /// 1: a normal piece.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token (BOS, EOS, chat markers).
    Control,
    /// 4: a user-defined piece, always matched whole in input text.
    UserDefined,
    /// 5: unused.
    Unused,
    /// 6: a byte-fallback token `<0xXX>`.
    Byte,
}

impl TokenType {
    /// Decodes the GGUF integer (unknown values are [`TokenType::Undefined`]).
    pub fn from_i32(v: i32) -> Self {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }
}

/// Which merge algorithm a vocabulary uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// SentencePiece-style, score-ordered merges (`tokenizer.ggml.model` = "llama").
    Spm,
    /// GPT-2 byte-level BPE, rank-ordered merges (`tokenizer.ggml.model` = "gpt2").
    Bpe(PreTokenizer),
}

/// Everything a tokenizer is built from: the `tokenizer.ggml.*` metadata as plain data.
///
/// `None` / empty fields take llama.cpp's defaults for the model type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizerData {
    /// `tokenizer.ggml.model`: "llama" or "gpt2".
    pub model: String,
    /// `tokenizer.ggml.pre` (BPE only).
    pub pre: Option<String>,
    /// `tokenizer.ggml.tokens`: the piece of each id, packed in one buffer.
    pub tokens: StringArray,
    /// `tokenizer.ggml.scores` (empty: all 0).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type` (empty: all normal).
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.merges`: `"left right"` rules in rank order (BPE only).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.bos_token_id` (default: 1 for "llama", 11 for "gpt2").
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id` (default: 2 for "llama", 11 for "gpt2").
    pub eos: Option<u32>,
    /// `tokenizer.ggml.eot_token_id` (default: found by name, e.g. `<|im_end|>`).
    pub eot: Option<u32>,
    /// `tokenizer.ggml.eom_token_id` (default: `<|eom_id|>` by name).
    pub eom: Option<u32>,
    /// `tokenizer.ggml.unknown_token_id` (default: 0 for "llama").
    pub unk: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` (default: true for "llama", false for "gpt2").
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token` (default: false).
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix` (default: true for "llama", false for "gpt2").
    pub add_space_prefix: Option<bool>,
}

// Token attribute bits (llama.cpp's llama_token_attr, the subset used here).
const ATTR_NORMAL: u8 = 1;
const ATTR_UNKNOWN: u8 = 2;
const ATTR_CONTROL: u8 = 4;
const ATTR_USER_DEFINED: u8 = 8;
const ATTR_UNUSED: u8 = 16;
const ATTR_BYTE: u8 = 32;

fn attr_of(t: TokenType) -> u8 {
    match t {
        TokenType::Normal => ATTR_NORMAL,
        TokenType::Unknown => ATTR_UNKNOWN,
        TokenType::Control => ATTR_CONTROL,
        TokenType::UserDefined => ATTR_USER_DEFINED,
        TokenType::Unused => ATTR_UNUSED,
        TokenType::Byte => ATTR_BYTE,
        TokenType::Undefined => 0,
    }
}

/// Names llama.cpp treats as end-of-turn when `eot_token_id` is absent.
const EOT_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// Names llama.cpp treats as end-of-generation.
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
];

/// Fill-in-the-middle pad / repo / file-separator names; llama.cpp ends generation on them too.
const FIM_EOG_NAMES: &[&[&str]] = &[
    &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    &[
        "<|fim_repo|>",
        "<|repo_name|>",
        "<fim-repo>",
        "<REPO>",
        "<reponame>",
    ],
    &["<|file_sep|>"],
];

/// One piece of input after special tokens are split out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment {
    /// Byte range of ordinary text.
    Text(usize, usize),
    /// A special token matched whole.
    Token(u32),
}

/// A byte trie over the special tokens' texts.
#[derive(Debug, Clone)]
struct SpecialTrie {
    edges: HashMap<(u32, u8), u32>,
    /// Token ending at each node.
    token: Vec<Option<u32>>,
    /// Whether any special token starts with this byte (fast skip).
    first_byte: [bool; 256],
}

impl Default for SpecialTrie {
    fn default() -> Self {
        SpecialTrie {
            edges: HashMap::new(),
            token: Vec::new(),
            first_byte: [false; 256],
        }
    }
}

impl SpecialTrie {
    fn insert(&mut self, text: &[u8], id: u32) {
        if self.token.is_empty() {
            self.token.push(None);
        }
        let mut node = 0u32;
        for &b in text {
            let next = self.token.len() as u32;
            node = *self.edges.entry((node, b)).or_insert_with(|| next);
            if node == next {
                self.token.push(None);
            }
        }
        self.token[node as usize] = Some(id);
        if let Some(&b) = text.first() {
            self.first_byte[b as usize] = true;
        }
    }
}

/// A tokenizer: encode text to ids and decode ids to text, as llama.cpp does for the same GGUF.
#[derive(Clone)]
pub struct Tokenizer {
    kind: TokenizerKind,
    /// Pieces by id and ids by piece.
    vocab: Vocab,
    scores: Vec<f32>,
    attrs: Vec<u8>,
    merges: bpe::Merges,
    /// SPM byte-fallback token of each byte.
    byte_tokens: Box<[Option<u32>; 256]>,
    /// Decoded bytes of every token (special tokens rendered), concatenated.
    piece_bytes: Vec<u8>,
    piece_offsets: Vec<usize>,
    /// Special tokens in matching order (longest text first) and their rank in that order.
    special_rank: HashMap<u32, usize>,
    trie: SpecialTrie,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    eog: HashSet<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
}

impl Tokenizer {
    /// Builds a tokenizer from plain data (see [`TokenizerData`] for defaults).
    pub fn from_parts(data: TokenizerData) -> Result<Self, TokenizerError> {
        let TokenizerData {
            model,
            pre,
            tokens,
            scores,
            token_types,
            merges,
            bos,
            eos,
            eot,
            eom,
            unk,
            pad,
            add_bos,
            add_eos,
            add_space_prefix,
        } = data;
        let n = tokens.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        let kind = match model.as_str() {
            "llama" => TokenizerKind::Spm,
            "gpt2" => {
                let name = pre.unwrap_or_else(|| "default".to_owned());
                match PreTokenizer::from_name(&name) {
                    Some(p) => TokenizerKind::Bpe(p),
                    None => return Err(TokenizerError::UnsupportedPreTokenizer(name)),
                }
            }
            other => return Err(TokenizerError::UnsupportedModel(other.to_owned())),
        };
        if !scores.is_empty() && scores.len() < n {
            return Err(TokenizerError::LengthMismatch {
                what: "tokenizer.ggml.scores",
                expected: n,
                got: scores.len(),
            });
        }
        if !token_types.is_empty() && token_types.len() < n {
            return Err(TokenizerError::LengthMismatch {
                what: "tokenizer.ggml.token_type",
                expected: n,
                got: token_types.len(),
            });
        }
        if matches!(kind, TokenizerKind::Bpe(_)) && merges.is_empty() {
            return Err(TokenizerError::MissingMerges);
        }

        // Empty pieces get a placeholder, as in llama.cpp, so every id has a distinct text.
        let tokens = if tokens.iter().any(str::is_empty) {
            let mut named = StringArray::with_capacity(n, tokens.as_packed_str().len());
            for (i, t) in tokens.iter().enumerate() {
                if t.is_empty() {
                    named.push(&format!("[EMPTY_{i}]"));
                } else {
                    named.push(t);
                }
            }
            named
        } else {
            tokens
        };
        let vocab = Vocab::new(tokens).map_err(|d| TokenizerError::DuplicateToken {
            text: d.text,
            first: d.first,
            second: d.second,
        })?;
        let mut scores = scores;
        if scores.is_empty() {
            scores = vec![0.0; n];
        } else {
            scores.truncate(n);
            scores.shrink_to_fit();
        }
        let mut attrs: Vec<u8> = if token_types.is_empty() {
            vec![ATTR_NORMAL; n]
        } else {
            token_types[..n]
                .iter()
                .map(|&t| attr_of(TokenType::from_i32(t)))
                .collect()
        };

        // Special ids: defaults by model type, keys override when in range.
        let in_range = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        let (def_bos, def_eos, def_unk) = match kind {
            TokenizerKind::Spm => (Some(1), Some(2), Some(0)),
            TokenizerKind::Bpe(_) => (Some(11), Some(11), None),
        };
        let bos = in_range(bos).or(in_range(def_bos));
        let eos = in_range(eos).or(in_range(def_eos));
        let unk = in_range(unk).or(in_range(def_unk));
        let pad = in_range(pad);
        let mut eot = in_range(eot);
        let mut eom = in_range(eom);
        let lookup = |name: &str| vocab.id(name);
        if eot.is_none() {
            eot = EOT_NAMES.iter().filter_map(|s| lookup(s)).min();
        }
        if eom.is_none() {
            eom = lookup("<|eom_id|>");
        }
        let mut eog = HashSet::new();
        for names in FIM_EOG_NAMES {
            if let Some(id) = names.iter().filter_map(|s| lookup(s)).min() {
                eog.insert(id);
            }
        }
        for name in EOG_NAMES {
            if let Some(id) = lookup(name) {
                eog.insert(id);
            }
        }
        // Tokens found by name are control tokens whatever the file says (llama.cpp overrides).
        for &id in eog.iter().chain(eot.iter()).chain(eom.iter()) {
            attrs[id as usize] |= ATTR_CONTROL;
        }
        eog.extend(eos.iter().chain(eot.iter()).chain(eom.iter()));

        let (def_add_bos, def_prefix) = match kind {
            TokenizerKind::Spm => (true, true),
            TokenizerKind::Bpe(_) => (false, false),
        };
        let add_bos = add_bos.unwrap_or(def_add_bos);
        let add_eos = add_eos.unwrap_or(false);
        let add_space_prefix = add_space_prefix.unwrap_or(def_prefix);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken("add_bos_token"));
        }
        if add_eos && eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken("add_eos_token"));
        }

        let merges = match kind {
            TokenizerKind::Bpe(_) => bpe::Merges::new(&merges),
            TokenizerKind::Spm => bpe::Merges::default(),
        };

        let mut byte_tokens = Box::new([None; 256]);
        if kind == TokenizerKind::Spm {
            for (b, slot) in byte_tokens.iter_mut().enumerate() {
                *slot = vocab.id(&format!("<0x{b:02X}>")).or_else(|| {
                    let one = [b as u8];
                    std::str::from_utf8(&one).ok().and_then(|s| vocab.id(s))
                });
            }
        }

        // Special tokens: matched longest first (ties by id).
        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| attrs[i as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0)
            .collect();
        let text_len = |id: u32| vocab.text(id as usize).map_or(0, str::len);
        specials.sort_by(|&a, &b| text_len(b).cmp(&text_len(a)).then(a.cmp(&b)));
        let mut trie = SpecialTrie::default();
        let mut special_rank = HashMap::with_capacity(specials.len());
        for (rank, &id) in specials.iter().enumerate() {
            trie.insert(vocab.text(id as usize).unwrap_or("").as_bytes(), id);
            special_rank.insert(id, rank);
        }

        let mut tok = Tokenizer {
            kind,
            vocab,
            scores,
            attrs,
            merges,
            byte_tokens,
            piece_bytes: Vec::new(),
            piece_offsets: Vec::new(),
            special_rank,
            trie,
            bos,
            eos,
            eot,
            eom,
            unk,
            pad,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
        };
        tok.build_piece_cache();
        Ok(tok)
    }

    /// Builds a tokenizer from a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(file: &GgufFile) -> Result<Self, TokenizerError> {
        Self::from_parts(data_from_gguf(file)?)
    }

    fn build_piece_cache(&mut self) {
        let n = self.vocab.len();
        let mut bytes = Vec::with_capacity(n * 6);
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        for id in 0..n {
            self.render_piece(id, &mut bytes);
            offsets.push(bytes.len());
        }
        bytes.shrink_to_fit();
        self.piece_bytes = bytes;
        self.piece_offsets = offsets;
    }

    /// llama.cpp's token_to_piece with special tokens rendered.
    fn render_piece(&self, id: usize, out: &mut Vec<u8>) {
        let Some(text) = self.vocab.text(id) else {
            return;
        };
        let attr = self.attrs[id];
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            out.extend_from_slice(text.as_bytes());
        } else if attr & ATTR_NORMAL != 0 {
            match self.kind {
                TokenizerKind::Spm => out.extend_from_slice(text.replace('▁', " ").as_bytes()),
                TokenizerKind::Bpe(_) => {
                    let mut buf = [0u8; 4];
                    for c in text.chars() {
                        match pretok::char_to_byte(c) {
                            Some(b) => out.push(b),
                            // Not a byte-level character: pass it through unchanged.
                            None => out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
                        }
                    }
                }
            }
        } else if attr & ATTR_BYTE != 0
            && let Some(b) = parse_byte_token(text)
        {
            out.push(b);
        }
    }

    /// Which algorithm this vocabulary uses.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// Heap bytes held by the per-token tables: the packed vocabulary and its index, scores,
    /// attributes and the decoded-piece cache (merge rules and special-token tables, which
    /// are small next to these, are not counted).
    pub fn heap_bytes(&self) -> usize {
        self.vocab.heap_bytes()
            + self.scores.capacity() * std::mem::size_of::<f32>()
            + self.attrs.capacity()
            + self.piece_bytes.capacity()
            + self.piece_offsets.capacity() * std::mem::size_of::<usize>()
    }

    /// Number of BPE merge rules (0 for SentencePiece vocabularies).
    pub fn n_merges(&self) -> usize {
        self.merges.len()
    }

    /// The raw vocabulary entry of `id` (e.g. `"▁the"`, `"Ġthe"`, `"<s>"`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.vocab.text(id as usize)
    }

    /// The id of an exact vocabulary entry.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.vocab.id(text)
    }

    /// The merge score of `id` (SentencePiece vocabularies; 0 when absent).
    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    /// The type of `id` (after llama.cpp's by-name overrides, e.g. `<|im_end|>` is control).
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        let a = *self.attrs.get(id as usize)?;
        Some(if a & ATTR_CONTROL != 0 {
            TokenType::Control
        } else if a & ATTR_USER_DEFINED != 0 {
            TokenType::UserDefined
        } else if a & ATTR_UNKNOWN != 0 {
            TokenType::Unknown
        } else if a & ATTR_BYTE != 0 {
            TokenType::Byte
        } else if a & ATTR_UNUSED != 0 {
            TokenType::Unused
        } else if a & ATTR_NORMAL != 0 {
            TokenType::Normal
        } else {
            TokenType::Undefined
        })
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// End-of-turn token (from the key or found by name).
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// End-of-message token.
    pub fn eom(&self) -> Option<u32> {
        self.eom
    }

    /// Unknown token.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// Padding token.
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// Whether [`encode`](Self::encode) with `add_special` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether [`encode`](Self::encode) with `add_special` appends EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Whether SentencePiece encoding prepends a space to text at the start and after special
    /// tokens.
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }

    /// Whether generating `id` ends generation (EOS, EOT, EOM, `<|im_end|>`, `<end_of_turn>`,
    /// `<|endoftext|>`, ... as llama.cpp decides).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// All end-of-generation ids, sorted.
    pub fn eog_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eog.iter().copied().collect();
        v.sort_unstable();
        v
    }

    /// Whether `id` is a control token (not printed unless asked for).
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & ATTR_CONTROL != 0)
    }

    /// Encodes `text` to token ids.
    ///
    /// `add_special` adds BOS/EOS as the vocabulary asks (`add_bos_token` / `add_eos_token`);
    /// `parse_special` lets control tokens written in the text (`<|im_start|>`, `<bos>`) be
    /// recognised as such; user-defined tokens are always recognised. Characters that have no
    /// token and no byte-fallback token become the unknown token (or are dropped without one).
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        match self.kind {
            TokenizerKind::Spm => {
                let mut prev_special = true;
                let mut buf = String::new();
                for f in fragments {
                    match f {
                        Fragment::Text(s, e) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push('▁');
                            }
                            for c in text[s..e].chars() {
                                buf.push(if c == ' ' { '▁' } else { c });
                            }
                            spm::tokenize(self, &buf, self.unk, &mut out);
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
            TokenizerKind::Bpe(pre) => {
                let mut scratch = bpe::Scratch::default();
                let lookup = |s: &str| self.vocab.id(s);
                for f in fragments {
                    match f {
                        Fragment::Text(s, e) => {
                            let frag = &text[s..e];
                            for (a, b) in pre.split(frag) {
                                bpe::tokenize_word(
                                    &self.merges,
                                    &lookup,
                                    &frag[a..b],
                                    &mut scratch,
                                    &mut out,
                                );
                            }
                        }
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// Splits special tokens out of `text`, as llama.cpp's `tokenizer_st_partition`: tokens are
    /// taken longest first; each takes its leftmost non-overlapping occurrences in text not yet
    /// claimed by a longer one.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let bytes = text.as_bytes();
        if bytes.is_empty() {
            return Vec::new();
        }
        // Every occurrence of every eligible special token: (rank, start, len, id).
        let mut cands: Vec<(usize, usize, usize, u32)> = Vec::new();
        if !self.trie.token.is_empty() {
            for start in 0..bytes.len() {
                if !self.trie.first_byte[bytes[start] as usize] {
                    continue;
                }
                let mut node = 0u32;
                for (k, &b) in bytes[start..].iter().enumerate() {
                    match self.trie.edges.get(&(node, b)) {
                        Some(&next) => node = next,
                        None => break,
                    }
                    if let Some(id) = self.trie.token[node as usize] {
                        let attr = self.attrs[id as usize];
                        if parse_special || attr & (ATTR_CONTROL | ATTR_UNKNOWN) == 0 {
                            cands.push((self.special_rank[&id], start, k + 1, id));
                        }
                    }
                }
            }
        }
        if cands.is_empty() {
            return vec![Fragment::Text(0, bytes.len())];
        }
        cands.sort_unstable();
        let mut claimed = vec![false; bytes.len()];
        let mut taken: Vec<(usize, usize, u32)> = Vec::new();
        for (_, start, len, id) in cands {
            if claimed[start..start + len].iter().any(|&c| c) {
                continue;
            }
            claimed[start..start + len]
                .iter_mut()
                .for_each(|c| *c = true);
            taken.push((start, len, id));
        }
        taken.sort_unstable();
        let mut out = Vec::with_capacity(taken.len() * 2 + 1);
        let mut pos = 0;
        for (start, len, id) in taken {
            if start > pos {
                out.push(Fragment::Text(pos, start));
            }
            out.push(Fragment::Token(id));
            pos = start + len;
        }
        if pos < bytes.len() {
            out.push(Fragment::Text(pos, bytes.len()));
        }
        out
    }

    /// The bytes `id` stands for. Control and unknown tokens give their text when `special`,
    /// nothing otherwise. A byte-fallback token gives one byte, which may be part of a UTF-8
    /// character (see [`StreamDecoder`]). Out-of-range ids give nothing.
    pub fn token_to_piece(&self, id: u32, special: bool) -> &[u8] {
        let i = id as usize;
        if i >= self.vocab.len() {
            return &[];
        }
        if !special && self.attrs[i] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
            return &[];
        }
        &self.piece_bytes[self.piece_offsets[i]..self.piece_offsets[i + 1]]
    }

    /// Decodes ids to text: the pieces concatenated (control tokens shown when `special`), with
    /// invalid UTF-8 replaced by U+FFFD. When the vocabulary adds a space prefix, the space that
    /// [`encode`](Self::encode) put before the first word is removed again, so
    /// `decode(encode(s, true, false), false) == s`. No other clean-up is applied.
    pub fn decode(&self, ids: &[u32], special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut strip = self.add_space_prefix && self.kind == TokenizerKind::Spm;
        for &id in ids {
            let piece = self.token_to_piece(id, special);
            if strip && Some(id) != self.bos {
                strip = false;
                if self
                    .attrs
                    .get(id as usize)
                    .is_some_and(|a| a & ATTR_NORMAL != 0)
                    && piece.first() == Some(&b' ')
                {
                    bytes.extend_from_slice(&piece[1..]);
                    continue;
                }
            }
            bytes.extend_from_slice(piece);
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }
}

impl std::fmt::Debug for Tokenizer {
    /// A summary (the vocabulary itself is far too large to print).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab.len())
            .field("n_merges", &self.merges.len())
            .field("n_special", &self.special_rank.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eot", &self.eot)
            .field("eog", &self.eog_ids())
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .finish_non_exhaustive()
    }
}

impl spm::SpmVocab for Tokenizer {
    fn piece_id(&self, piece: &str) -> Option<u32> {
        self.vocab.id(piece)
    }
    fn score(&self, id: u32) -> f32 {
        self.scores[id as usize]
    }
    fn byte_token(&self, byte: u8) -> Option<u32> {
        self.byte_tokens[byte as usize]
    }
}

/// `<0xAB>` -> 0xAB.
fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

fn meta_u32(file: &GgufFile, key: &'static str) -> Result<Option<u32>, TokenizerError> {
    let wrong = TokenizerError::WrongType {
        key,
        expected: "an unsigned integer",
    };
    Ok(match file.get(key) {
        None => None,
        Some(Value::U32(v)) => Some(*v),
        Some(Value::U8(v)) => Some(u32::from(*v)),
        Some(Value::U16(v)) => Some(u32::from(*v)),
        Some(Value::I32(v)) => Some(u32::try_from(*v).map_err(|_| wrong)?),
        Some(Value::U64(v)) => Some(u32::try_from(*v).map_err(|_| wrong)?),
        Some(Value::I64(v)) => Some(u32::try_from(*v).map_err(|_| wrong)?),
        Some(_) => return Err(wrong),
    })
}

fn meta_bool(file: &GgufFile, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    match file.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(TokenizerError::WrongType {
            key,
            expected: "a bool",
        }),
    }
}

fn meta_str(file: &GgufFile, key: &'static str) -> Result<Option<String>, TokenizerError> {
    match file.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(TokenizerError::WrongType {
            key,
            expected: "a string",
        }),
    }
}

fn meta_array<'a>(
    file: &'a GgufFile,
    key: &'static str,
) -> Result<Option<&'a Array>, TokenizerError> {
    match file.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(TokenizerError::WrongType {
            key,
            expected: "an array",
        }),
    }
}

/// A string array (absent: empty; an empty array of another element type also reads as empty).
fn str_array<'a>(
    file: &'a GgufFile,
    key: &'static str,
) -> Result<Option<&'a StringArray>, TokenizerError> {
    match meta_array(file, key)? {
        None => Ok(None),
        Some(Array::String(s)) => Ok(Some(s)),
        Some(a) if a.is_empty() => Ok(None),
        Some(_) => Err(TokenizerError::WrongType {
            key,
            expected: "an array of strings",
        }),
    }
}

/// Reads the `tokenizer.ggml.*` keys of a GGUF file into [`TokenizerData`].
pub fn data_from_gguf(file: &GgufFile) -> Result<TokenizerData, TokenizerError> {
    const MODEL: &str = "tokenizer.ggml.model";
    const TOKENS: &str = "tokenizer.ggml.tokens";
    const SCORES: &str = "tokenizer.ggml.scores";
    const TYPES: &str = "tokenizer.ggml.token_type";
    let model = meta_str(file, MODEL)?.ok_or(TokenizerError::MissingKey(MODEL))?;
    if file.get(TOKENS).is_none() {
        return Err(TokenizerError::MissingKey(TOKENS));
    }
    let tokens = str_array(file, TOKENS)?.cloned().unwrap_or_default();
    let scores = match meta_array(file, SCORES)? {
        None => Vec::new(),
        Some(Array::F32(v)) => v.clone(),
        Some(Array::I32(v)) => v.iter().map(|&x| x as f32).collect(),
        Some(a) if a.is_empty() => Vec::new(),
        Some(_) => {
            return Err(TokenizerError::WrongType {
                key: SCORES,
                expected: "an array of f32",
            });
        }
    };
    let token_types = match meta_array(file, TYPES)? {
        None => Vec::new(),
        Some(Array::I32(v)) => v.clone(),
        Some(Array::U32(v)) => v.iter().map(|&x| x as i32).collect(),
        Some(a) if a.is_empty() => Vec::new(),
        Some(_) => {
            return Err(TokenizerError::WrongType {
                key: TYPES,
                expected: "an array of i32",
            });
        }
    };
    Ok(TokenizerData {
        model,
        pre: meta_str(file, "tokenizer.ggml.pre")?,
        tokens,
        scores,
        token_types,
        merges: str_array(file, "tokenizer.ggml.merges")?
            .map(|m| m.iter().map(str::to_owned).collect())
            .unwrap_or_default(),
        bos: meta_u32(file, "tokenizer.ggml.bos_token_id")?,
        eos: meta_u32(file, "tokenizer.ggml.eos_token_id")?,
        eot: meta_u32(file, "tokenizer.ggml.eot_token_id")?,
        eom: meta_u32(file, "tokenizer.ggml.eom_token_id")?,
        unk: meta_u32(file, "tokenizer.ggml.unknown_token_id")?,
        pad: meta_u32(file, "tokenizer.ggml.padding_token_id")?,
        add_bos: meta_bool(file, "tokenizer.ggml.add_bos_token")?,
        add_eos: meta_bool(file, "tokenizer.ggml.add_eos_token")?,
        add_space_prefix: meta_bool(file, "tokenizer.ggml.add_space_prefix")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spm_vocab() -> Tokenizer {
        // A toy SentencePiece vocabulary with byte fallback.
        let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
        }
        let pieces = ["▁", "a", "b", "c", "ab", "▁a", "▁ab", "bc", "<tag>"];
        for p in pieces {
            tokens.push(p.into());
            types.push(if p == "<tag>" { 4 } else { 1 });
        }
        let mut scores = vec![0.0; tokens.len()];
        let score_of = |p: &str| match p {
            "ab" => -1.0,
            "▁a" => -2.0,
            "▁ab" => -0.5,
            "bc" => -0.1,
            _ => -10.0,
        };
        for (i, t) in tokens.iter().enumerate() {
            if types[i] == 1 {
                scores[i] = score_of(t);
            }
        }
        Tokenizer::from_parts(TokenizerData {
            model: "llama".into(),
            tokens: tokens.into(),
            scores,
            token_types: types,
            ..Default::default()
        })
        .unwrap()
    }

    fn pieces(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&i| t.token_text(i).unwrap().to_owned())
            .collect()
    }

    #[test]
    fn spm_merges_by_score() {
        let t = spm_vocab();
        // "▁abc": bigrams ▁a(-2) ab(-1) bc(-0.1): bc first, then ▁a, then nothing ("▁abc" absent).
        assert_eq!(pieces(&t, &t.encode("abc", false, false)), ["▁a", "bc"]);
        // "▁ab": ab(-1) beats ▁a(-2), then ▁ab(-0.5).
        assert_eq!(pieces(&t, &t.encode("ab", true, false)), ["<s>", "▁ab"]);
        // Unknown character -> UTF-8 bytes.
        assert_eq!(
            pieces(&t, &t.encode("é", false, false)),
            ["▁", "<0xC3>", "<0xA9>"]
        );
    }

    #[test]
    fn special_tokens_partition() {
        let t = spm_vocab();
        // User-defined pieces are split out even without parse_special; the next fragment gets
        // the space prefix again.
        assert_eq!(
            pieces(&t, &t.encode("a<tag>b", false, false)),
            ["▁a", "<tag>", "▁", "b"]
        );
        // Control tokens only with parse_special.
        assert_eq!(pieces(&t, &t.encode("<s>a", false, true)), ["<s>", "▁a"]);
        assert_ne!(pieces(&t, &t.encode("<s>a", false, false))[0], "<s>");
    }

    #[test]
    fn decode_strips_prefix_space_once() {
        let t = spm_vocab();
        for s in ["abc", " ab", "é a", ""] {
            let ids = t.encode(s, true, false);
            assert_eq!(t.decode(&ids, false), s, "{s:?}");
        }
        assert_eq!(t.decode(&t.encode("ab", true, false), true), "<s>ab");
    }

    /// Gemma 3's 262,144-token vocabulary stays compact (about 13 bytes a token for text,
    /// offsets, index, score, attribute and decoded piece), and the GGUF metadata holding it
    /// is compact too.
    #[test]
    fn gemma_vocabulary_heap_is_small() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models/gemma-3-270m-q4_k_m.gguf");
        let Ok(file) = GgufFile::open(&path) else {
            eprintln!("skipped: {} not found", path.display());
            return;
        };
        let t = Tokenizer::from_gguf(&file).unwrap();
        assert_eq!(t.vocab_size(), 262_144);
        let heap = t.heap_bytes();
        let meta: usize = file
            .metadata()
            .iter()
            .filter_map(|(_, v)| v.as_array())
            .map(Array::heap_bytes)
            .sum();
        eprintln!("gemma tokenizer heap {heap} bytes, metadata arrays {meta} bytes");
        assert!(heap < 16 << 20, "tokenizer heap {heap} bytes");
        assert!(meta < 12 << 20, "metadata arrays {meta} bytes");
        assert_eq!(
            t.token_id("<start_of_turn>").and_then(|i| t.token_text(i)),
            Some("<start_of_turn>")
        );
    }

    #[test]
    fn debug_is_a_summary() {
        let d = format!("{:?}", spm_vocab());
        assert!(
            d.contains("vocab_size: 268") && d.contains("kind: Spm"),
            "{d}"
        );
    }

    #[test]
    fn bad_data_is_an_error() {
        assert_eq!(
            Tokenizer::from_parts(TokenizerData::default()).unwrap_err(),
            TokenizerError::EmptyVocab
        );
        let dup = TokenizerData {
            model: "llama".into(),
            tokens: vec!["a", "b", "a"].into(),
            ..Default::default()
        };
        assert!(matches!(
            Tokenizer::from_parts(dup),
            Err(TokenizerError::DuplicateToken {
                first: 0,
                second: 2,
                ..
            })
        ));
        let bpe = TokenizerData {
            model: "gpt2".into(),
            pre: Some("no-such-pre".into()),
            tokens: vec!["a"].into(),
            merges: vec!["a a".into()],
            ..Default::default()
        };
        assert!(matches!(
            Tokenizer::from_parts(bpe),
            Err(TokenizerError::UnsupportedPreTokenizer(_))
        ));
        let short = TokenizerData {
            model: "llama".into(),
            tokens: vec!["a", "b"].into(),
            scores: vec![0.0],
            ..Default::default()
        };
        assert!(matches!(
            Tokenizer::from_parts(short),
            Err(TokenizerError::LengthMismatch { .. })
        ));
    }
}
