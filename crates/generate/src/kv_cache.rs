//! The key/value cache: one F16 key and value row per position and layer, as llama.cpp's CPU
//! backend keeps it.

use half::f16;

use crate::error::ModelError;

/// Keys and values of every layer for positions `0..n_ctx`, stored as F16.
///
/// Row `p` of layer `l` holds the (already rotated) keys and the values of the token at position
/// `p`. Rows at and after [`len`](Self::len) are stale and never read.
#[derive(Debug, Clone)]
pub struct KvCache {
    n_ctx: usize,
    k_dim: usize,
    v_dim: usize,
    k: Vec<Vec<f16>>,
    v: Vec<Vec<f16>>,
    len: usize,
}

impl KvCache {
    /// Bytes a cache of `n_ctx` positions takes for `n_layer` layers with rows of `k_dim` keys
    /// and `v_dim` values (`None` on overflow).
    pub fn bytes_needed(n_layer: usize, n_ctx: usize, k_dim: usize, v_dim: usize) -> Option<u64> {
        let per_pos = (k_dim as u64).checked_add(v_dim as u64)?.checked_mul(2)?;
        per_pos
            .checked_mul(n_ctx as u64)?
            .checked_mul(n_layer as u64)
    }

    /// A zeroed cache, after checking its size against `MemAvailable` (when `/proc/meminfo` is
    /// readable).
    pub fn new(
        n_layer: usize,
        n_ctx: usize,
        k_dim: usize,
        v_dim: usize,
    ) -> Result<Self, ModelError> {
        let needed = Self::bytes_needed(n_layer, n_ctx, k_dim, v_dim).unwrap_or(u64::MAX);
        if let Some(available) = mem_available()
            && needed > available
        {
            return Err(ModelError::ContextTooLarge {
                n_ctx,
                needed,
                available,
            });
        }
        Ok(Self {
            n_ctx,
            k_dim,
            v_dim,
            // Zeroed allocations: the pages of positions never reached are never touched (a
            // `vec![f16::ZERO; n]` writes all of them, which made every new sequence of a
            // 4096-position SmolLM2 context fault in and clear 94 MB).
            k: (0..n_layer)
                .map(|_| bytemuck::zeroed_vec(n_ctx * k_dim))
                .collect(),
            v: (0..n_layer)
                .map(|_| bytemuck::zeroed_vec(n_ctx * v_dim))
                .collect(),
            len: 0,
        })
    }

    /// Positions the cache can hold.
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// Positions filled so far (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no position is filled.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forget positions `n..` (keeps the first `n`, e.g. a shared prompt prefix). `n` larger than
    /// [`len`](Self::len) is clamped.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> u64 {
        Self::bytes_needed(self.k.len(), self.n_ctx, self.k_dim, self.v_dim).unwrap_or(u64::MAX)
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.n_ctx);
        self.len = len;
    }

    /// Keys of layer `layer` (all `n_ctx` rows of `k_dim`).
    pub fn keys(&self, layer: usize) -> &[f16] {
        &self.k[layer]
    }

    /// Values of layer `layer` (all `n_ctx` rows of `v_dim`).
    pub fn values(&self, layer: usize) -> &[f16] {
        &self.v[layer]
    }

    pub(crate) fn layer_mut(&mut self, layer: usize) -> (&mut [f16], &mut [f16]) {
        (&mut self.k[layer], &mut self.v[layer])
    }

    pub(crate) fn k_dim(&self) -> usize {
        self.k_dim
    }

    pub(crate) fn v_dim(&self) -> usize {
        self.v_dim
    }
}

/// `MemAvailable` in bytes, from `/proc/meminfo`.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kb| kb * 1024)
}
