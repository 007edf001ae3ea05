//! SentencePiece-style merging (llama.cpp's "SPM" tokenizer).
//!
//! The text (spaces already replaced by `▁`) starts as one symbol per UTF-8 character. Every
//! adjacent pair whose concatenation is a vocabulary entry is a candidate; the candidate with the
//! highest score (ties: leftmost) is merged, its neighbours become new candidates, until none is
//! left. Each final symbol is emitted as its token, or, when it is not in the vocabulary (a
//! character without a piece), as byte-fallback tokens `<0xXX>`, one per UTF-8 byte.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// What the merge loop needs from the vocabulary.
pub(crate) trait SpmVocab {
    /// The id of an exact piece, if any.
    fn piece_id(&self, piece: &str) -> Option<u32>;
    /// The merge score of a token.
    fn score(&self, id: u32) -> f32;
    /// The byte-fallback token for one byte (None if the vocabulary has none).
    fn byte_token(&self, byte: u8) -> Option<u32>;
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the smaller left index.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Tokenizes already-escaped text (spaces replaced by `▁`) and appends the ids to `out`.
///
/// Characters with no token and no byte-fallback token are replaced by `unk` when given,
/// dropped otherwise.
pub(crate) fn tokenize(vocab: &impl SpmVocab, text: &str, unk: Option<u32>, out: &mut Vec<u32>) {
    if text.is_empty() {
        return;
    }
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        symbols.push(Symbol {
            start,
            len: c.len_utf8(),
            prev: if i == 0 { NONE } else { i - 1 },
            next: i + 1,
        });
    }
    if let Some(last) = symbols.last_mut() {
        last.next = NONE;
    }

    let mut heap = BinaryHeap::with_capacity(symbols.len());
    let try_add = |heap: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: usize, right: usize| {
        if left == NONE || right == NONE {
            return;
        }
        let l = symbols[left];
        let r = symbols[right];
        let piece = &text[l.start..r.start + r.len];
        if let Some(id) = vocab.piece_id(piece) {
            heap.push(Bigram {
                left,
                right,
                score: vocab.score(id),
                size: piece.len(),
            });
        }
    };
    for i in 1..symbols.len() {
        try_add(&mut heap, &symbols, i - 1, i);
    }

    while let Some(b) = heap.pop() {
        let (l, r) = (symbols[b.left], symbols[b.right]);
        // Skip candidates made stale by an earlier merge.
        if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
            continue;
        }
        symbols[b.left].len += r.len;
        symbols[b.right].len = 0;
        symbols[b.left].next = r.next;
        if r.next != NONE {
            symbols[r.next].prev = b.left;
        }
        let prev = symbols[b.left].prev;
        let next = symbols[b.left].next;
        try_add(&mut heap, &symbols, prev, b.left);
        try_add(&mut heap, &symbols, b.left, next);
    }

    let mut i = 0;
    while i != NONE {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.len];
        match vocab.piece_id(piece) {
            Some(id) => out.push(id),
            None => {
                for &byte in piece.as_bytes() {
                    match vocab.byte_token(byte) {
                        Some(id) => out.push(id),
                        None => {
                            if let Some(u) = unk {
                                out.push(u);
                            }
                        }
                    }
                }
            }
        }
        i = s.next;
    }
}
