//! The pieces of a SentencePiece `tokenizer.model` (a `ModelProto` protobuf), read with a
//! minimal protobuf decoder: field 1 (`pieces`) of the model, and in each piece field 1
//! (`piece`), 2 (`score`) and 3 (`type`). Everything else is skipped.

/// SentencePiece piece types (`ModelProto.SentencePiece.Type`); the same numbers as GGUF's
/// `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// 1: an ordinary piece.
    Normal,
    /// 2: the unknown token.
    Unknown,
    /// 3: a control token (`<s>`, `</s>`).
    Control,
    /// 4: user defined.
    UserDefined,
    /// 5: unused.
    Unused,
    /// 6: a byte-fallback piece (`<0x41>`).
    Byte,
}

impl PieceType {
    fn from_id(v: u64) -> Option<Self> {
        Some(match v {
            1 => PieceType::Normal,
            2 => PieceType::Unknown,
            3 => PieceType::Control,
            4 => PieceType::UserDefined,
            5 => PieceType::Unused,
            6 => PieceType::Byte,
            _ => return None,
        })
    }

    /// The GGUF token type the reference converter writes: user-defined pieces become
    /// NORMAL (1), the other types keep their number.
    pub fn gguf_token_type(self) -> i32 {
        match self {
            PieceType::Normal | PieceType::UserDefined => 1,
            PieceType::Unknown => 2,
            PieceType::Control => 3,
            PieceType::Unused => 5,
            PieceType::Byte => 6,
        }
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Piece {
    /// The piece text (`▁` marks a leading space).
    pub piece: String,
    /// Its score (log probability for unigram, merge rank for BPE models).
    pub score: f32,
    /// Its type.
    pub kind: PieceType,
}

/// A malformed `tokenizer.model`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tokenizer.model byte {offset}: {msg}")]
pub struct SpmError {
    /// Byte offset of the problem.
    pub offset: usize,
    /// What is wrong.
    pub msg: String,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, msg: impl Into<String>) -> SpmError {
        SpmError {
            offset: self.base + self.pos,
            msg: msg.into(),
        }
    }

    fn varint(&mut self) -> Result<u64, SpmError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = *self
                .data
                .get(self.pos)
                .ok_or_else(|| self.err("truncated varint"))?;
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(self.err("varint overflows 64 bits"));
            }
            v |= ((b & 0x7f) as u64) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("varint longer than 10 bytes"))
    }

    fn bytes(&mut self, n: u64) -> Result<&'a [u8], SpmError> {
        let left = (self.data.len() - self.pos) as u64;
        if n > left {
            return Err(self.err(format!("field of {n} bytes, only {left} left")));
        }
        let s = &self.data[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    /// Next (field number, wire type), or `None` at the end.
    fn key(&mut self) -> Result<Option<(u64, u8)>, SpmError> {
        if self.pos == self.data.len() {
            return Ok(None);
        }
        let k = self.varint()?;
        Ok(Some((k >> 3, (k & 7) as u8)))
    }

    fn skip(&mut self, wire: u8) -> Result<(), SpmError> {
        match wire {
            0 => {
                self.varint()?;
            }
            1 => {
                self.bytes(8)?;
            }
            2 => {
                let n = self.varint()?;
                self.bytes(n)?;
            }
            5 => {
                self.bytes(4)?;
            }
            w => return Err(self.err(format!("unsupported wire type {w}"))),
        }
        Ok(())
    }
}

fn parse_piece(data: &[u8], base: usize) -> Result<Piece, SpmError> {
    let mut r = Reader { data, pos: 0, base };
    let mut piece = None;
    let mut score = 0.0f32;
    let mut kind = PieceType::Normal;
    while let Some((field, wire)) = r.key()? {
        match (field, wire) {
            (1, 2) => {
                let n = r.varint()?;
                let b = r.bytes(n)?;
                piece = Some(
                    std::str::from_utf8(b)
                        .map_err(|_| r.err("piece is not valid UTF-8"))?
                        .to_owned(),
                );
            }
            (2, 5) => {
                let b = r.bytes(4)?;
                score = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
            (3, 0) => {
                let v = r.varint()?;
                kind = PieceType::from_id(v).ok_or_else(|| r.err(format!("piece type {v}")))?;
            }
            (1..=3, w) => return Err(r.err(format!("field {field} with wire type {w}"))),
            (_, w) => r.skip(w)?,
        }
    }
    let piece = piece.ok_or_else(|| r.err("piece without text"))?;
    Ok(Piece { piece, score, kind })
}

/// Parses the pieces of a serialized `ModelProto`, in id order.
pub fn parse_model(data: &[u8]) -> Result<Vec<Piece>, SpmError> {
    let mut r = Reader {
        data,
        pos: 0,
        base: 0,
    };
    let mut pieces = Vec::new();
    while let Some((field, wire)) = r.key()? {
        if field == 1 {
            if wire != 2 {
                return Err(r.err(format!("pieces field with wire type {wire}")));
            }
            let n = r.varint()?;
            let start = r.pos;
            let b = r.bytes(n)?;
            pieces.push(parse_piece(b, start)?);
        } else {
            r.skip(wire)?;
        }
    }
    if pieces.is_empty() {
        return Err(SpmError {
            offset: 0,
            msg: "no pieces (not a SentencePiece model?)".into(),
        });
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn piece(text: &str, score: f32, ty: Option<u64>) -> Vec<u8> {
        let mut p = vec![0x0a];
        varint(text.len() as u64, &mut p);
        p.extend_from_slice(text.as_bytes());
        p.push(0x15);
        p.extend_from_slice(&score.to_le_bytes());
        if let Some(t) = ty {
            p.push(0x18);
            varint(t, &mut p);
        }
        let mut out = vec![0x0a];
        varint(p.len() as u64, &mut out);
        out.extend(p);
        out
    }

    #[test]
    fn parses_pieces_and_skips_other_fields() {
        let mut m = piece("<unk>", 0.0, Some(2));
        m.extend(piece("▁the", -1.5, None));
        // trainer_spec (field 2) with a nested varint, then a fixed64 field 9.
        m.extend([0x12, 0x02, 0x08, 0x05, 0x49, 1, 2, 3, 4, 5, 6, 7, 8]);
        m.extend(piece("<0x41>", 0.0, Some(6)));
        let p = parse_model(&m).unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[0].kind, PieceType::Unknown);
        assert_eq!(p[1].piece, "▁the");
        assert_eq!(p[1].score, -1.5);
        assert_eq!(p[1].kind, PieceType::Normal);
        assert_eq!(p[2].kind.gguf_token_type(), 6);
        for n in 0..m.len() {
            // Truncations either fail or (at a field boundary) give fewer pieces.
            if let Ok(v) = parse_model(&m[..n]) {
                assert!(v.len() < 3);
            }
        }
        assert!(parse_model(&[0x0b]).is_err()); // group wire type
        assert!(parse_model(&[]).is_err());
    }
}
