//! A generated SentencePiece-style vocabulary (`tokenizer.ggml.model = "llama"`).

use crate::SynthError;

/// Token type ids of `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
pub mod token_type {
    /// An ordinary piece.
    pub const NORMAL: i32 = 1;
    /// `<unk>`.
    pub const UNKNOWN: i32 = 2;
    /// `<s>`, `</s>`.
    pub const CONTROL: i32 = 3;
    /// `<0x00>` .. `<0xFF>`.
    pub const BYTE: i32 = 6;
}

/// Tokens before the generated pieces: `<unk>`, `<s>`, `</s>` and the 256 byte tokens.
pub const FIXED_TOKENS: usize = 3 + 256;

/// The smallest vocabulary: the fixed tokens plus the space piece `▁`.
pub const MIN_VOCAB: usize = FIXED_TOKENS + 1;

/// Characters the generated pieces are made of, `▁` (SentencePiece's space) first. `<` and `>`
/// are left out so no piece can look like a special or byte token.
const ALPHABET: &[char] = &[
    '▁', 'e', 't', 'a', 'o', 'i', 'n', 's', 'h', 'r', 'd', 'l', 'c', 'u', 'm', 'w', 'f', 'g', 'y',
    'p', 'b', 'v', 'k', 'j', 'x', 'q', 'z', 'E', 'T', 'A', 'O', 'I', 'N', 'S', 'H', 'R', 'D', 'L',
    'C', 'U', 'M', 'W', 'F', 'G', 'Y', 'P', 'B', 'V', 'K', 'J', 'X', 'Q', 'Z', '0', '1', '2', '3',
    '4', '5', '6', '7', '8', '9', '.', ',', '\'', '-', '!', '?', ':', ';', '"', '(', ')',
];

/// A vocabulary as stored in `tokenizer.ggml.tokens`, `.scores` and `.token_type`.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    /// The piece of each id.
    pub tokens: Vec<String>,
    /// SentencePiece scores (higher merges first).
    pub scores: Vec<f32>,
    /// Token types (see [`token_type`]).
    pub token_types: Vec<i32>,
}

impl Vocab {
    /// `<s>`.
    pub const BOS: u32 = 1;
    /// `</s>`.
    pub const EOS: u32 = 2;
    /// `<unk>`.
    pub const UNK: u32 = 0;
}

/// Builds an `n_vocab`-token vocabulary: `<unk>` (type 2), `<s>` and `</s>` (type 3),
/// `<0x00>`..`<0xFF>` (type 6, byte fallback), then unique pieces over a fixed alphabet in
/// order of length (`▁` only at the start of a piece), so that every prefix and suffix of a
/// piece is itself a piece and SentencePiece's bigram merges can build each one. Scores fall
/// with the piece's rank; the special and byte tokens score 0.
pub fn build_vocab(n_vocab: usize) -> Result<Vocab, SynthError> {
    if n_vocab < MIN_VOCAB {
        return Err(SynthError::BadShape(format!(
            "n_vocab {n_vocab} is below the minimum {MIN_VOCAB} (3 special tokens, 256 byte tokens, one piece)"
        )));
    }
    if n_vocab > u32::MAX as usize {
        return Err(SynthError::BadShape(format!(
            "n_vocab {n_vocab} is too large"
        )));
    }
    let mut tokens = Vec::with_capacity(n_vocab);
    let mut scores = Vec::with_capacity(n_vocab);
    let mut token_types = Vec::with_capacity(n_vocab);
    for (t, ty) in [
        ("<unk>", token_type::UNKNOWN),
        ("<s>", token_type::CONTROL),
        ("</s>", token_type::CONTROL),
    ] {
        tokens.push(t.to_owned());
        scores.push(0.0);
        token_types.push(ty);
    }
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        token_types.push(token_type::BYTE);
    }
    let mut rank = 0u32;
    let mut len = 1usize;
    'outer: while tokens.len() < n_vocab {
        // Odometer over positions: position 0 takes any character, the others any but `▁`.
        let mut digits = vec![0usize; len];
        for d in digits.iter_mut().skip(1) {
            *d = 1;
        }
        loop {
            let piece: String = digits.iter().map(|&d| ALPHABET[d]).collect();
            tokens.push(piece);
            scores.push(-(rank as f32));
            token_types.push(token_type::NORMAL);
            rank += 1;
            if tokens.len() == n_vocab {
                break 'outer;
            }
            // Advance the odometer (last position fastest).
            let mut pos = len;
            loop {
                if pos == 0 {
                    break;
                }
                pos -= 1;
                let lo = if pos == 0 { 0 } else { 1 };
                digits[pos] += 1;
                if digits[pos] < ALPHABET.len() {
                    break;
                }
                digits[pos] = lo;
                if pos == 0 {
                    // Wrapped around: every piece of this length is out.
                    len += 1;
                    continue 'outer;
                }
            }
        }
    }
    Ok(Vocab {
        tokens,
        scores,
        token_types,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn vocab_is_unique_closed_and_sized() {
        for n in [MIN_VOCAB, 300, 5000, 32000] {
            let v = build_vocab(n).unwrap();
            assert_eq!(v.tokens.len(), n);
            assert_eq!(v.scores.len(), n);
            assert_eq!(v.token_types.len(), n);
            let set: HashSet<&str> = v.tokens.iter().map(String::as_str).collect();
            assert_eq!(set.len(), n, "pieces are unique");
            assert_eq!(v.tokens[3], "<0x00>");
            assert_eq!(v.tokens[3 + 0x0A], "<0x0A>");
            assert_eq!(v.tokens[FIXED_TOKENS], "▁");
            for (i, t) in v.tokens.iter().enumerate().skip(FIXED_TOKENS) {
                assert_eq!(v.token_types[i], token_type::NORMAL);
                let chars: Vec<char> = t.chars().collect();
                assert!(!chars[1..].contains(&'▁'), "{t}");
                // Every proper prefix and suffix is a piece.
                for cut in 1..chars.len() {
                    let pre: String = chars[..cut].iter().collect();
                    let suf: String = chars[cut..].iter().collect();
                    assert!(
                        set.contains(pre.as_str()) && set.contains(suf.as_str()),
                        "{t}"
                    );
                }
            }
        }
        assert!(build_vocab(MIN_VOCAB - 1).is_err());
    }
}
