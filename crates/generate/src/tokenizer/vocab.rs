//! The vocabulary: every piece packed in one buffer ([`StringArray`]) plus an open-addressing
//! index from piece text to id that stores only ids (4 bytes a slot), so a 262,144-token
//! vocabulary costs a few MB instead of two `String` copies per token.

use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};

use powerinfer_gguf::StringArray;

/// Marks an empty slot of the index.
const EMPTY: u32 = u32::MAX;

/// Pieces by id and ids by piece.
#[derive(Clone, Default)]
pub(crate) struct Vocab {
    tokens: StringArray,
    /// Open addressing with linear probing; a power-of-two length at most half full.
    slots: Vec<u32>,
}

/// The same piece appears at two ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Duplicate {
    pub text: String,
    pub first: u32,
    pub second: u32,
}

fn hash(s: &str) -> u64 {
    // Fixed keys: the table is deterministic, and its keys come from the model file, not from
    // untrusted users at run time.
    BuildHasherDefault::<DefaultHasher>::default().hash_one(s)
}

impl Vocab {
    /// Indexes `tokens` (at most `u32::MAX - 1` of them); a repeated piece is an error.
    pub(crate) fn new(tokens: StringArray) -> Result<Self, Duplicate> {
        let n = tokens.len();
        let len = (n.saturating_mul(2)).next_power_of_two().max(8);
        let mut v = Vocab {
            tokens,
            slots: vec![EMPTY; len],
        };
        let mask = len - 1;
        for id in 0..n {
            let text = &v.tokens[id];
            let mut at = hash(text) as usize & mask;
            loop {
                let slot = v.slots[at];
                if slot == EMPTY {
                    v.slots[at] = id as u32;
                    break;
                }
                if &v.tokens[slot as usize] == text {
                    return Err(Duplicate {
                        text: text.to_owned(),
                        first: slot,
                        second: id as u32,
                    });
                }
                at = (at + 1) & mask;
            }
        }
        Ok(v)
    }

    /// Number of pieces.
    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
    }

    /// The piece of `id`.
    pub(crate) fn text(&self, id: usize) -> Option<&str> {
        self.tokens.get(id)
    }

    /// The id of an exact piece.
    pub(crate) fn id(&self, text: &str) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut at = hash(text) as usize & mask;
        loop {
            let slot = self.slots[at];
            if slot == EMPTY {
                return None;
            }
            if self.tokens.get(slot as usize) == Some(text) {
                return Some(slot);
            }
            at = (at + 1) & mask;
        }
    }

    /// Heap bytes held (pieces, offsets and index).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.tokens.heap_bytes() + self.slots.capacity() * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// splitmix64.
    fn next(s: &mut u64) -> u64 {
        *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    #[test]
    fn matches_a_hash_map_on_random_vocabularies() {
        let mut seed = 7u64;
        for n in [0usize, 1, 3, 17, 1000, 4099] {
            let mut seen = std::collections::HashMap::new();
            let mut tokens = StringArray::new();
            while tokens.len() < n {
                let len = (next(&mut seed) % 5) as usize;
                let s: String = (0..len)
                    .map(|_| ['a', 'b', 'é', '▁', 'Z'][(next(&mut seed) % 5) as usize])
                    .chain(std::iter::once(char::from(
                        b'0' + (tokens.len() % 10) as u8,
                    )))
                    .collect();
                if seen.contains_key(&s) {
                    continue;
                }
                seen.insert(s.clone(), tokens.len() as u32);
                tokens.push(&s);
            }
            let v = Vocab::new(tokens).unwrap();
            assert_eq!(v.len(), n);
            for (s, &id) in &seen {
                assert_eq!(v.id(s), Some(id), "{s:?}");
                assert_eq!(v.text(id as usize), Some(s.as_str()));
            }
            assert_eq!(v.id("not there"), None);
            assert_eq!(v.text(n), None);
        }
    }

    #[test]
    fn duplicates_are_reported_with_both_ids() {
        let t: StringArray = ["x", "y", "z", "y"].into_iter().collect();
        assert_eq!(
            Vocab::new(t).err(),
            Some(Duplicate {
                text: "y".into(),
                first: 1,
                second: 3
            })
        );
    }
}
