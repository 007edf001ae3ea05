//! Byte-level BPE merging (llama.cpp's "BPE" tokenizer with GPT-2 byte encoding).
//!
//! Each pre-tokenized word is mapped byte by byte to GPT-2's printable characters, split into one
//! symbol per character, then the adjacent pair with the lowest merge rank (ties: leftmost) is
//! merged until no pair has a rank. Merges work on interned piece ids: every string that appears
//! on either side of a merge rule, or as a merge result, gets an id at load time, so the merge loop
//! never hashes strings.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use super::pretok::BYTE_TO_CHAR;

/// The merge table.
#[derive(Debug, Clone, Default)]
pub(crate) struct Merges {
    /// Interned strings.
    piece_ids: HashMap<String, u32>,
    /// (left piece, right piece) -> (rank, merged piece).
    ranks: HashMap<(u32, u32), (u32, u32)>,
}

impl Merges {
    /// Builds the table from `"left right"` rules in rank order.
    pub(crate) fn new<S: AsRef<str>>(rules: &[S]) -> Self {
        let mut m = Merges::default();
        m.piece_ids.reserve(rules.len() * 2);
        m.ranks.reserve(rules.len());
        for (rank, rule) in rules.iter().enumerate() {
            let rule = rule.as_ref();
            // The separator is the first space after the first byte (a piece may be " " itself
            // in non-byte-level vocabularies).
            let Some(pos) = rule.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
                continue;
            };
            let (left, right) = (&rule[..pos], &rule[pos + 1..]);
            let l = m.intern(left);
            let r = m.intern(right);
            let merged = m.intern(&format!("{left}{right}"));
            // The first (lowest-rank) rule for a pair wins, as with llama.cpp's map emplace.
            m.ranks.entry((l, r)).or_insert((rank as u32, merged));
        }
        m
    }

    fn intern(&mut self, s: &str) -> u32 {
        let next = self.piece_ids.len() as u32;
        *self.piece_ids.entry(s.to_owned()).or_insert(next)
    }

    /// Number of merge rules kept.
    pub(crate) fn len(&self) -> usize {
        self.ranks.len()
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
    piece: Option<u32>,
}

const NONE: usize = usize::MAX;

#[derive(PartialEq, Eq)]
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    left_piece: u32,
    right_piece: u32,
    merged: u32,
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: the lowest rank first, then the smaller left index.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .rank
            .cmp(&self.rank)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Reusable buffers for [`tokenize_word`].
#[derive(Default)]
pub(crate) struct Scratch {
    word: String,
    symbols: Vec<Symbol>,
    heap: BinaryHeap<Bigram>,
}

/// Byte-encodes `raw` (one pre-tokenized word), merges it and appends token ids to `out`.
///
/// `token_id` looks a final piece up in the vocabulary. A final piece that is not a token is
/// emitted as the tokens of its single-byte characters, skipping any that are missing (as
/// llama.cpp does).
pub(crate) fn tokenize_word(
    merges: &Merges,
    token_id: &impl Fn(&str) -> Option<u32>,
    raw: &str,
    scratch: &mut Scratch,
    out: &mut Vec<u32>,
) {
    let Scratch {
        word,
        symbols,
        heap,
    } = scratch;
    word.clear();
    symbols.clear();
    heap.clear();
    for &b in raw.as_bytes() {
        word.push(BYTE_TO_CHAR[b as usize]);
    }
    let mut buf = [0u8; 4];
    for (i, (start, c)) in word.char_indices().enumerate() {
        symbols.push(Symbol {
            start,
            len: c.len_utf8(),
            prev: if i == 0 { NONE } else { i - 1 },
            next: i + 1,
            piece: merges.piece_ids.get(&*c.encode_utf8(&mut buf)).copied(),
        });
    }
    if symbols.is_empty() {
        return;
    }
    if let Some(last) = symbols.last_mut() {
        last.next = NONE;
    }

    let try_add = |heap: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: usize, right: usize| {
        if left == NONE || right == NONE {
            return;
        }
        let (Some(lp), Some(rp)) = (symbols[left].piece, symbols[right].piece) else {
            return;
        };
        if let Some(&(rank, merged)) = merges.ranks.get(&(lp, rp)) {
            heap.push(Bigram {
                rank,
                left,
                right,
                left_piece: lp,
                right_piece: rp,
                merged,
            });
        }
    };
    for i in 1..symbols.len() {
        try_add(heap, symbols, i - 1, i);
    }
    while let Some(b) = heap.pop() {
        let (l, r) = (symbols[b.left], symbols[b.right]);
        // A candidate is stale once either side changed.
        if l.len == 0
            || r.len == 0
            || l.piece != Some(b.left_piece)
            || r.piece != Some(b.right_piece)
        {
            continue;
        }
        symbols[b.left].len += r.len;
        symbols[b.left].piece = Some(b.merged);
        symbols[b.right].len = 0;
        symbols[b.left].next = r.next;
        if r.next != NONE {
            symbols[r.next].prev = b.left;
        }
        let prev = symbols[b.left].prev;
        let next = symbols[b.left].next;
        try_add(heap, symbols, prev, b.left);
        try_add(heap, symbols, b.left, next);
    }

    let mut i = 0;
    while i != NONE {
        let s = symbols[i];
        let piece = &word[s.start..s.start + s.len];
        match token_id(piece) {
            Some(id) => out.push(id),
            None => {
                for &byte in piece.as_bytes() {
                    if byte.is_ascii() {
                        let one = [byte];
                        // An ASCII byte is a one-byte string.
                        if let Some(id) = std::str::from_utf8(&one).ok().and_then(token_id) {
                            out.push(id);
                        }
                    }
                }
            }
        }
        i = s.next;
    }
}
