//! Helpers shared by the `falcon` and `opt` tests: a seeded generator, an in-memory GGUF/PWRI
//! builder that quantizes rows with our quantizer, and forward-pass drivers.

#![allow(dead_code)]

use std::sync::Arc;

use powerinfer_cpu::ThreadPool;
use powerinfer_generate::model::SparseMode;
use powerinfer_generate::{Logits, Model};
use powerinfer_gguf::{GgmlType, GgufFile, GgufWriter, Magic, Value};

/// splitmix64: a seeded stream of uniform values.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// FNV-1a over the bytes (pins a generated file to the one the reference ran on).
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// `rows x cols` row-major values in `ty`'s bytes.
pub fn encode(ty: GgmlType, values: &[f32], cols: usize) -> Vec<u8> {
    let rb = powerinfer_quant::row_bytes(ty, cols).expect("whole blocks per row");
    let rows = values.len() / cols;
    let mut out = vec![0u8; rb * rows];
    for (src, dst) in values.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
        powerinfer_quant::quantize_row(ty, src, dst).unwrap();
    }
    out
}

/// `values` (`rows x cols`, row-major) transposed.
pub fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = values[r * cols + c];
        }
    }
    t
}

/// Writes a model in memory; `drop` leaves a tensor out, `shrink` writes one with a row (or,
/// for a vector, an element) fewer: damaged files for the error tests.
pub struct Builder {
    pub w: GgufWriter,
    pub drop: Option<String>,
    pub shrink: Option<String>,
}

impl Builder {
    pub fn new(magic: Magic, arch: &str) -> Self {
        let mut w = GgufWriter::new(magic);
        w.add_kv("general.architecture", Value::from(arch)).unwrap();
        Builder {
            w,
            drop: None,
            shrink: None,
        }
    }

    /// Whether to write `name`, and how many of its `n` rows.
    fn keep(&self, name: &str, n: usize) -> Option<usize> {
        if self.drop.as_deref() == Some(name) {
            None
        } else if self.shrink.as_deref() == Some(name) {
            Some(n - 1)
        } else {
            Some(n)
        }
    }

    pub fn kv(&mut self, key: &str, v: impl Into<Value>) {
        self.w.add_kv(key, v.into()).unwrap();
    }

    /// A matrix of `rows` rows of `cols` values (ggml shape `[cols, rows]`).
    pub fn matrix(&mut self, name: &str, ty: GgmlType, values: &[f32], cols: usize) {
        let Some(rows) = self.keep(name, values.len() / cols) else {
            return;
        };
        let values = &values[..rows * cols];
        self.w
            .add_tensor(
                name,
                ty,
                &[cols as u64, rows as u64],
                encode(ty, values, cols),
            )
            .unwrap();
    }

    /// A 1-D F32 tensor.
    pub fn vector(&mut self, name: &str, values: &[f32]) {
        self.matrix_1d(name, GgmlType::F32, values);
    }

    pub fn matrix_1d(&mut self, name: &str, ty: GgmlType, values: &[f32]) {
        let Some(n) = self.keep(name, values.len()) else {
            return;
        };
        let values = &values[..n];
        self.w
            .add_tensor(
                name,
                ty,
                &[values.len() as u64],
                encode(ty, values, values.len()),
            )
            .unwrap();
    }

    pub fn finish(self) -> Vec<u8> {
        self.w.write_to_vec().unwrap()
    }
}

pub fn load(bytes: Vec<u8>) -> Model {
    Model::from_gguf(Arc::new(GgufFile::from_bytes(bytes).unwrap())).unwrap()
}

pub fn load_err(bytes: Vec<u8>) -> String {
    match GgufFile::from_bytes(bytes) {
        Err(e) => e.to_string(),
        Ok(f) => Model::from_gguf(Arc::new(f))
            .map(|_| ())
            .expect_err("the model loaded")
            .to_string(),
    }
}

/// llama.cpp's order of work: the first `n_prompt` ids in one batch (every row's logits), then
/// every further id decoded alone; one logits row per id.
pub fn prompt_then_decode(
    model: &Model,
    threads: usize,
    ids: &[u32],
    n_prompt: usize,
) -> Vec<Vec<f32>> {
    let pool = ThreadPool::new(threads);
    let nv = model.config().n_vocab;
    let mut st = model.new_state(ids.len() + 1, n_prompt.max(1)).unwrap();
    let all = model
        .forward(&pool, &mut st, &ids[..n_prompt], Logits::All)
        .unwrap();
    let mut rows: Vec<Vec<f32>> = all.chunks_exact(nv).map(|r| r.to_vec()).collect();
    for &t in &ids[n_prompt..] {
        rows.push(
            model
                .forward(&pool, &mut st, &[t], Logits::Last)
                .unwrap()
                .to_vec(),
        );
    }
    rows
}

/// Runs `ids` as prompt + decodes with the sparse layers in `mode` (and `threshold` overriding
/// the file's), every row's logits concatenated.
pub fn run_sparse(
    model: &mut Model,
    threads: usize,
    ids: &[u32],
    n_prompt: usize,
    mode: SparseMode,
    threshold: Option<f32>,
) -> Vec<f32> {
    model.set_sparse_mode(mode);
    model.set_sparse_threshold(threshold).unwrap();
    prompt_then_decode(model, threads, ids, n_prompt).concat()
}

/// Arg-max, first index on ties.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Same bits (NaN-free inputs).
pub fn bit_equal(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}
