//! Pre-tokenizers for GPT-2 style byte-level BPE vocabularies, and the byte <-> unicode mapping.
//!
//! llama.cpp splits text into words before running BPE merges, with a regex chosen by the
//! `tokenizer.ggml.pre` key. The regexes supported here are matched by hand (no regex engine; the
//! GPT-2 pattern needs a lookahead):
//!
//! - GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//!   (the `\s+` tail is how llama.cpp's hand-written matcher treats a lone whitespace character).
//! - "digits first" (SmolLM, StarCoder, ...): first `\p{N}` (every number character is its own
//!   piece, the text between numbers stays together), then the GPT-2 pattern on each piece.
//!
//! Matching works on code points; a lookahead never looks past the end of the current piece.

use super::unicode_tables::{LETTER_RANGES, NUMBER_RANGES};

/// Which word-splitting rules a byte-level BPE vocabulary uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// The GPT-2 regex alone (`tokenizer.ggml.pre` = "gpt-2", "phi-2", "mpt", "olmo", ...).
    Gpt2,
    /// Every number character split off first, then the GPT-2 regex (`tokenizer.ggml.pre` =
    /// "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b").
    DigitsThenGpt2,
}

impl PreTokenizer {
    /// Maps a `tokenizer.ggml.pre` value to a supported pre-tokenizer.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" => Some(PreTokenizer::Gpt2),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => Some(PreTokenizer::DigitsThenGpt2),
            _ => None,
        }
    }

    /// Splits `text` into words; returns byte ranges into `text`, in order, covering it exactly.
    pub fn split(self, text: &str) -> Vec<(usize, usize)> {
        let cps: Vec<(usize, char)> = text.char_indices().collect();
        let byte_at = |i: usize| if i < cps.len() { cps[i].0 } else { text.len() };
        let mut out = Vec::with_capacity(cps.len() / 3 + 1);
        let mut emit = |s: usize, e: usize| out.push((byte_at(s), byte_at(e)));
        match self {
            PreTokenizer::Gpt2 => gpt2_split(&cps, 0, cps.len(), &mut emit),
            PreTokenizer::DigitsThenGpt2 => {
                let mut start = 0;
                for i in 0..cps.len() {
                    if is_number(cps[i].1) {
                        if start < i {
                            gpt2_split(&cps, start, i, &mut emit);
                        }
                        // A lone number character: the GPT-2 pattern keeps it whole.
                        emit(i, i + 1);
                        start = i + 1;
                    }
                }
                if start < cps.len() {
                    gpt2_split(&cps, start, cps.len(), &mut emit);
                }
            }
        }
        out
    }
}

/// Character classes of the GPT-2 pattern; `End` is "past the end of the piece".
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
    End,
}

fn class_of(c: char) -> Class {
    if is_letter(c) {
        Class::Letter
    } else if is_number(c) {
        Class::Number
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

/// The GPT-2 pattern over code points `[ini, end)` of `cps`, calling `emit(start, end)` for each
/// word (code point indices).
fn gpt2_split(cps: &[(usize, char)], ini: usize, end: usize, emit: &mut impl FnMut(usize, usize)) {
    let cpt = |p: usize| if p < end { Some(cps[p].1) } else { None };
    let class = |p: usize| {
        if p < end {
            class_of(cps[p].1)
        } else {
            Class::End
        }
    };
    let mut prev = ini;
    let mut pos = ini;
    let mut add = |to: usize, prev: &mut usize| {
        if to > *prev {
            emit(*prev, to);
        }
        *prev = to;
    };
    while pos < end {
        let c = cps[pos].1;
        // 's|'t|'re|'ve|'m|'ll|'d (lower case only, as in the GPT-2 pattern)
        if c == '\'' && pos + 1 < end {
            let n1 = cpt(pos + 1);
            if matches!(n1, Some('s' | 't' | 'm' | 'd')) {
                pos += 2;
                add(pos, &mut prev);
                continue;
            }
            if pos + 2 < end {
                let n2 = cpt(pos + 2);
                if matches!(
                    (n1, n2),
                    (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
                ) {
                    pos += 3;
                    add(pos, &mut prev);
                    continue;
                }
            }
        }
        let lead_space = c == ' ';
        let c2 = if lead_space {
            class(pos + 1)
        } else {
            class(pos)
        };
        match c2 {
            //  ?\p{L}+ and  ?\p{N}+
            Class::Letter | Class::Number => {
                pos += lead_space as usize;
                while class(pos) == c2 {
                    pos += 1;
                }
                add(pos, &mut prev);
                continue;
            }
            //  ?[^\s\p{L}\p{N}]+
            Class::Other => {
                pos += lead_space as usize;
                while class(pos) == Class::Other {
                    pos += 1;
                }
                add(pos, &mut prev);
                continue;
            }
            Class::Space | Class::End => {}
        }
        let mut n_ws = 0;
        while class(pos + n_ws) == Class::Space {
            n_ws += 1;
        }
        // \s+(?!\S): a run followed by a non-space keeps its last space for the next word.
        if n_ws > 1 && pos + n_ws < end {
            pos += n_ws - 1;
            add(pos, &mut prev);
            continue;
        }
        if n_ws > 0 {
            pos += n_ws;
            add(pos, &mut prev);
            continue;
        }
        // No rule matched (cannot happen for valid input, kept as llama.cpp's fallback).
        pos += 1;
        add(pos, &mut prev);
    }
}

fn in_ranges(table: &[(u32, u32)], c: u32) -> bool {
    match table.binary_search_by(|&(lo, _)| lo.cmp(&c)) {
        Ok(_) => true,
        Err(0) => false,
        Err(i) => c <= table[i - 1].1,
    }
}

/// `\p{L}`: general category Lu, Ll, Lt, Lm or Lo.
pub fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_alphabetic();
    }
    in_ranges(LETTER_RANGES, c as u32)
}

/// `\p{N}`: general category Nd, Nl or No.
pub fn is_number(c: char) -> bool {
    if c.is_ascii() {
        return c.is_ascii_digit();
    }
    in_ranges(NUMBER_RANGES, c as u32)
}

/// GPT-2's reversible byte -> printable character table: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100.. in byte order.
pub const fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    let mut b = 0usize;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        let cp = if printable {
            b as u32
        } else {
            n += 1;
            255 + n
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    table
}

/// [`byte_to_char_table`], computed at compile time.
pub static BYTE_TO_CHAR: [char; 256] = byte_to_char_table();

/// The inverse of [`BYTE_TO_CHAR`]: the byte a GPT-2 byte-level character stands for.
pub fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    let printable =
        (0x21..=0x7E).contains(&cp) || (0xA1..=0xAC).contains(&cp) || (0xAE..=0xFF).contains(&cp);
    if printable {
        return Some(cp as u8);
    }
    // The non-printable bytes, in order: 0x00..=0x20, 0x7F..=0xA0, 0xAD.
    match cp.checked_sub(0x100)? {
        k @ 0..=32 => Some(k as u8),
        k @ 33..=66 => Some((0x7F + k - 33) as u8),
        67 => Some(0xAD),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(p: PreTokenizer, s: &str) -> Vec<&str> {
        p.split(s).into_iter().map(|(a, b)| &s[a..b]).collect()
    }

    #[test]
    fn gpt2_pattern_basics() {
        let p = PreTokenizer::Gpt2;
        assert_eq!(words(p, "Hello world"), ["Hello", " world"]);
        assert_eq!(words(p, "it's 42!"), ["it", "'s", " 42", "!"]);
        assert_eq!(words(p, "a   b"), ["a", "  ", " b"]);
        assert_eq!(words(p, "a \n"), ["a", " \n"]);
        assert_eq!(words(p, "x\n\ny"), ["x", "\n", "\n", "y"]);
        assert_eq!(words(p, "  "), ["  "]);
        assert_eq!(words(p, " ,."), [" ,."]);
        assert_eq!(words(p, "naïve café"), ["naïve", " café"]);
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = BYTE_TO_CHAR[b as usize];
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(char_to_byte('€'), None);
    }
}
