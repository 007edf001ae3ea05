//! Incremental detokenization that only ever emits whole UTF-8 characters.

use super::Tokenizer;

/// Turns generated token ids into text as they arrive.
///
/// A character split across tokens (byte-fallback tokens, or a byte-level BPE piece ending
/// mid-character) is held back until its last byte arrives. Bytes that can never form a valid
/// character are emitted as U+FFFD as soon as that is certain.
///
/// ```
/// # use powerinfer_generate::tokenizer::{StreamDecoder, Tokenizer, TokenizerData};
/// # let mut tokens: Vec<String> = (0..=255u8).map(|b| format!("<0x{b:02X}>")).collect();
/// # tokens.push("▁hi".into());
/// # let tok = Tokenizer::from_parts(TokenizerData {
/// #     model: "llama".into(), tokens: tokens.into(), token_types: [vec![6; 256], vec![1]].concat(),
/// #     add_bos: Some(false), ..Default::default() }).unwrap();
/// let mut dec = StreamDecoder::new(false);
/// assert_eq!(dec.push(&tok, 0xE2), "");          // first byte of "€"
/// assert_eq!(dec.push(&tok, 0x82), "");
/// assert_eq!(dec.push(&tok, 0xAC), "€");
/// assert_eq!(dec.push(&tok, 256), " hi");
/// assert_eq!(dec.flush(), "");
/// ```
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    special: bool,
}

impl StreamDecoder {
    /// A decoder; `special` renders control tokens as their text.
    pub fn new(special: bool) -> Self {
        StreamDecoder {
            pending: Vec::new(),
            special,
        }
    }

    /// Adds one token and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.pending
            .extend_from_slice(tok.token_to_piece(id, self.special));
        self.take_complete()
    }

    /// Adds raw bytes (for callers that render pieces themselves).
    pub fn push_bytes(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        self.take_complete()
    }

    /// Bytes held back waiting for the rest of a character.
    pub fn pending(&self) -> &[u8] {
        &self.pending
    }

    /// Ends the stream: whatever is held back, with an unfinished character as U+FFFD.
    pub fn flush(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }

    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, tail) = rest.split_at(e.valid_up_to());
                    // `good` was just validated by from_utf8, so this never falls back.
                    out.push_str(std::str::from_utf8(good).unwrap_or_default());
                    match e.error_len() {
                        // Invalid bytes: replace and continue after them.
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &tail[n..];
                        }
                        // An incomplete character at the end: keep it for later.
                        None => {
                            rest = tail;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let len = self.pending.len();
        self.pending.drain(..len - keep);
        out
    }
}
