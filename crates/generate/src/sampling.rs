//! Token sampling: llama.cpp's default sampler chain, and stop strings.
//!
//! [`Sampler::sample`] applies, in llama.cpp's default order:
//! repetition penalties -> top-k -> top-p -> min-p -> temperature -> a seeded random draw.
//! A temperature `<= 0` is greedy: the arg-max of the penalised logits (lowest id on ties).
//! The candidate set is narrowed without sorting the whole vocabulary: top-k keeps a k-element
//! heap over one pass, top-p (when top-k is off) pulls tokens from a heap in probability order
//! only until the mass is reached.
//!
//! ```
//! use powerinfer_generate::sampling::{Sampler, SamplerConfig};
//! let mut s = Sampler::new(SamplerConfig { seed: 7, ..Default::default() }).unwrap();
//! let logits = [0.1f32, 2.0, -1.0, 1.5];
//! let t = s.sample(&logits).unwrap();
//! s.accept(t);
//! assert!(t == 1 || t == 3); // min-p 0.05 and top-p 0.95 drop the unlikely ones
//! ```

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use thiserror::Error;

/// Bad sampler settings or inputs.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum SamplerError {
    /// No logits to sample from.
    #[error("cannot sample from an empty logit vector")]
    EmptyLogits,
    /// A setting is NaN or out of its range.
    #[error("invalid sampler setting {name} = {value}: {why}")]
    InvalidSetting {
        /// The setting.
        name: &'static str,
        /// Its value.
        value: f32,
        /// The allowed range.
        why: &'static str,
    },
}

/// Sampler settings; the defaults are llama.cpp's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature (default 0.8); `<= 0` means greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (default 40); 0 turns it off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (default 0.95);
    /// 1.0 turns it off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one (default 0.05); 0 turns it
    /// off.
    pub min_p: f32,
    /// Divide positive / multiply negative logits of recent tokens (default 1.0 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at (default 64); 0 turns penalties off.
    pub repeat_last_n: usize,
    /// Subtract `count * frequency_penalty` from a recent token's logit (default 0).
    pub frequency_penalty: f32,
    /// Subtract `presence_penalty` from any recent token's logit (default 0).
    pub presence_penalty: f32,
    /// Seed of the random draw (default 0xFFFF_FFFF, llama.cpp's `LLAMA_DEFAULT_SEED` value,
    /// used here as a fixed seed so runs are reproducible).
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0xFFFF_FFFF,
        }
    }
}

impl SamplerConfig {
    /// Greedy decoding (temperature 0, no penalties).
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..Default::default()
        }
    }

    /// Checks every setting for NaN and range.
    pub fn validate(&self) -> Result<(), SamplerError> {
        let check = |name, value: f32, ok: bool, why| {
            if ok && !value.is_nan() {
                Ok(())
            } else {
                Err(SamplerError::InvalidSetting { name, value, why })
            }
        };
        check(
            "temperature",
            self.temperature,
            self.temperature.is_finite(),
            "must be finite",
        )?;
        check(
            "top_p",
            self.top_p,
            (0.0..=1.0).contains(&self.top_p),
            "must be in [0, 1]",
        )?;
        check(
            "min_p",
            self.min_p,
            (0.0..=1.0).contains(&self.min_p),
            "must be in [0, 1]",
        )?;
        check(
            "repeat_penalty",
            self.repeat_penalty,
            self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0,
            "must be positive",
        )?;
        check(
            "frequency_penalty",
            self.frequency_penalty,
            self.frequency_penalty.is_finite(),
            "must be finite",
        )?;
        check(
            "presence_penalty",
            self.presence_penalty,
            self.presence_penalty.is_finite(),
            "must be finite",
        )
    }

    fn penalties_active(&self) -> bool {
        self.repeat_last_n > 0
            && (self.repeat_penalty != 1.0
                || self.frequency_penalty != 0.0
                || self.presence_penalty != 0.0)
    }
}

/// A candidate token and its probability in the final distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenProb {
    /// Token id.
    pub id: u32,
    /// Probability (the kept candidates sum to 1).
    pub p: f32,
}

/// xoshiro256** seeded through splitmix64: small, fast, reproducible.
#[derive(Debug, Clone)]
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Logit order: higher first, then the lower id.
fn better(a: (u32, f32), b: (u32, f32)) -> bool {
    a.1 > b.1 || (a.1 == b.1 && a.0 < b.0)
}

/// Heap entry ordered so that the *worst* candidate is on top (for a bounded top-k heap).
#[derive(Clone, Copy)]
struct Worst(u32, f32);
impl PartialEq for Worst {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Worst {
    fn cmp(&self, o: &Self) -> Ordering {
        // "Greater" = worse: lower logit, or same logit and higher id.
        o.1.total_cmp(&self.1).then(self.0.cmp(&o.0))
    }
}

/// Heap entry with the *best* candidate on top.
#[derive(Clone, Copy)]
struct Best(u32, f32);
impl PartialEq for Best {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Best {}
impl PartialOrd for Best {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Best {
    fn cmp(&self, o: &Self) -> Ordering {
        self.1.total_cmp(&o.1).then(o.0.cmp(&self.0))
    }
}

/// A stateful sampler: settings, recent tokens for the penalties, and the random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    cfg: SamplerConfig,
    rng: Rng,
    history: VecDeque<u32>,
    logits: Vec<f32>,
}

impl Sampler {
    /// A sampler with validated settings.
    pub fn new(cfg: SamplerConfig) -> Result<Self, SamplerError> {
        cfg.validate()?;
        Ok(Sampler {
            cfg,
            rng: Rng::new(cfg.seed),
            history: VecDeque::with_capacity(cfg.repeat_last_n),
            logits: Vec::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    /// Records a token as generated (or as prompt context) for the repetition penalties.
    pub fn accept(&mut self, token: u32) {
        if self.cfg.repeat_last_n == 0 {
            return;
        }
        if self.history.len() == self.cfg.repeat_last_n {
            self.history.pop_front();
        }
        self.history.push_back(token);
    }

    /// Forgets the accepted tokens and re-seeds the random state.
    pub fn reset(&mut self) {
        self.history.clear();
        self.rng = Rng::new(self.cfg.seed);
    }

    /// Picks the next token from `logits` (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32, SamplerError> {
        self.prepare(logits)?;
        if self.cfg.temperature <= 0.0 {
            return Ok(self.argmax());
        }
        let dist = self.distribution_prepared();
        let u = self.rng.next_f64();
        let mut acc = 0.0f64;
        for c in &dist {
            acc += f64::from(c.p);
            if u < acc {
                return Ok(c.id);
            }
        }
        // Rounding left u at or above the total: the last candidate.
        Ok(dist.last().map(|c| c.id).unwrap_or(0))
    }

    /// The distribution [`sample`](Self::sample) would draw from: kept candidates in decreasing
    /// probability (ties: lower id first). Greedy settings give the arg-max with probability 1.
    pub fn distribution(&mut self, logits: &[f32]) -> Result<Vec<TokenProb>, SamplerError> {
        self.prepare(logits)?;
        if self.cfg.temperature <= 0.0 {
            return Ok(vec![TokenProb {
                id: self.argmax(),
                p: 1.0,
            }]);
        }
        Ok(self.distribution_prepared())
    }

    /// Copies the logits (NaN -> -inf) and applies the repetition penalties.
    fn prepare(&mut self, logits: &[f32]) -> Result<(), SamplerError> {
        if logits.is_empty() {
            return Err(SamplerError::EmptyLogits);
        }
        self.logits.clear();
        self.logits.extend(
            logits
                .iter()
                .map(|&l| if l.is_nan() { f32::NEG_INFINITY } else { l }),
        );
        if self.cfg.penalties_active() {
            let mut counts: HashMap<u32, u32> = HashMap::with_capacity(self.history.len());
            for &t in &self.history {
                *counts.entry(t).or_insert(0) += 1;
            }
            for (&t, &count) in &counts {
                let Some(l) = self.logits.get_mut(t as usize) else {
                    continue;
                };
                if *l <= 0.0 {
                    *l *= self.cfg.repeat_penalty;
                } else {
                    *l /= self.cfg.repeat_penalty;
                }
                *l -= count as f32 * self.cfg.frequency_penalty + self.cfg.presence_penalty;
            }
        }
        Ok(())
    }

    fn argmax(&self) -> u32 {
        let mut best = 0usize;
        for (i, &l) in self.logits.iter().enumerate() {
            if l > self.logits[best] {
                best = i;
            }
        }
        best as u32
    }

    /// top-k -> top-p -> min-p -> temperature -> softmax over the prepared logits.
    fn distribution_prepared(&mut self) -> Vec<TokenProb> {
        let cfg = self.cfg;
        let n = self.logits.len();
        // Candidates sorted best first (when `sorted`), or all of them unsorted.
        let mut cands: Vec<(u32, f32)>;
        let mut sorted = false;
        if cfg.top_k > 0 && cfg.top_k < n {
            let k = cfg.top_k;
            let mut heap: BinaryHeap<Worst> = BinaryHeap::with_capacity(k + 1);
            for (i, &l) in self.logits.iter().enumerate() {
                let c = Worst(i as u32, l);
                if heap.len() < k {
                    heap.push(c);
                } else if let Some(top) = heap.peek()
                    && better((c.0, c.1), (top.0, top.1))
                {
                    heap.pop();
                    heap.push(c);
                }
            }
            // into_sorted_vec is ascending by Ord, i.e. best first.
            cands = heap
                .into_sorted_vec()
                .into_iter()
                .map(|w| (w.0, w.1))
                .collect();
            sorted = true;
        } else {
            cands = self
                .logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, l))
                .collect();
        }

        if cfg.top_p < 1.0 {
            let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                return uniform_first(&cands);
            }
            let total: f64 = cands.iter().map(|c| f64::from((c.1 - max).exp())).sum();
            let target = f64::from(cfg.top_p) * total;
            if sorted {
                let mut acc = 0.0f64;
                let mut keep = cands.len();
                for (i, c) in cands.iter().enumerate() {
                    acc += f64::from((c.1 - max).exp());
                    if acc >= target {
                        keep = i + 1;
                        break;
                    }
                }
                cands.truncate(keep.max(1));
            } else {
                // min-p after top-p keeps {l >= max + ln min_p}; both filters keep a prefix of
                // the sorted order and the maximum survives top-p, so applying min-p first (to
                // a smaller heap) gives the same set. The top-p target still uses the full mass.
                if cfg.min_p > 0.0 {
                    let threshold = max + cfg.min_p.ln();
                    cands.retain(|c| c.1 >= threshold);
                }
                // Pull from a max-heap only as far as needed.
                let mut heap: BinaryHeap<Best> = cands.iter().map(|&(i, l)| Best(i, l)).collect();
                let mut kept = Vec::new();
                let mut acc = 0.0f64;
                while let Some(Best(i, l)) = heap.pop() {
                    kept.push((i, l));
                    acc += f64::from((l - max).exp());
                    if acc >= target {
                        break;
                    }
                }
                cands = kept;
                sorted = true;
            }
        }

        if cfg.min_p > 0.0 && cands.len() > 1 {
            let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
            let threshold = max + cfg.min_p.ln();
            let before = cands.clone();
            cands.retain(|c| c.1 >= threshold);
            if cands.is_empty() {
                cands = before;
                cands.truncate(1);
            }
        }

        if !sorted {
            cands.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        }

        // Temperature, then softmax.
        let max = cands.first().map(|c| c.1).unwrap_or(f32::NEG_INFINITY);
        if max == f32::NEG_INFINITY {
            return uniform_first(&cands);
        }
        let t = cfg.temperature;
        let weights: Vec<f64> = cands
            .iter()
            .map(|c| (f64::from(c.1 - max) / f64::from(t)).exp())
            .collect();
        let sum: f64 = weights.iter().sum();
        cands
            .iter()
            .zip(weights)
            .map(|(c, w)| TokenProb {
                id: c.0,
                p: (w / sum) as f32,
            })
            .collect()
    }
}

/// Every logit is -inf: fall back to the lowest id with probability 1.
fn uniform_first(cands: &[(u32, f32)]) -> Vec<TokenProb> {
    let id = cands.iter().map(|c| c.0).min().unwrap_or(0);
    vec![TokenProb { id, p: 1.0 }]
}

/// What [`StopCondition::push`] decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopCheck {
    /// Text that is safe to show now.
    pub emit: String,
    /// Whether a stop string was found; generation should end, and the stop string and anything
    /// after it are dropped.
    pub stopped: bool,
    /// The stop string that matched.
    pub matched: Option<String>,
}

/// Watches streamed text for user stop strings.
///
/// Text that could be the beginning of a stop string is held back until it is clear either
/// way, so a stop string never reaches the output even when it arrives split across tokens.
///
/// ```
/// use powerinfer_generate::sampling::StopCondition;
/// let mut stop = StopCondition::new(["\nUser:"]);
/// assert_eq!(stop.push("Hello").emit, "Hello");
/// assert_eq!(stop.push("!\nUs").emit, "!");      // "\nUs" might start "\nUser:"
/// let c = stop.push("er: hi");
/// assert!(c.stopped);
/// assert_eq!(c.emit, "");
/// ```
#[derive(Debug, Clone, Default)]
pub struct StopCondition {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

impl StopCondition {
    /// Watches for these strings (empty ones are ignored).
    pub fn new<I, S>(stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        StopCondition {
            stops: stops
                .into_iter()
                .map(Into::into)
                .filter(|s: &String| !s.is_empty())
                .collect(),
            held: String::new(),
            stopped: false,
        }
    }

    /// Whether a stop string has been seen.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Adds newly generated text; returns what can be shown and whether to stop.
    pub fn push(&mut self, text: &str) -> StopCheck {
        if self.stopped {
            return StopCheck {
                emit: String::new(),
                stopped: true,
                matched: None,
            };
        }
        self.held.push_str(text);
        // The earliest stop string occurrence (longest on equal starts).
        let mut hit: Option<(usize, &String)> = None;
        for s in &self.stops {
            if let Some(pos) = self.held.find(s.as_str()) {
                let better = match hit {
                    None => true,
                    Some((p, h)) => pos < p || (pos == p && s.len() > h.len()),
                };
                if better {
                    hit = Some((pos, s));
                }
            }
        }
        if let Some((pos, s)) = hit {
            let matched = s.clone();
            let emit = self.held[..pos].to_owned();
            self.held.clear();
            self.stopped = true;
            return StopCheck {
                emit,
                stopped: true,
                matched: Some(matched),
            };
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut keep_from = self.held.len();
        for (i, _) in self.held.char_indices().rev() {
            let suffix = &self.held[i..];
            if self
                .stops
                .iter()
                .any(|s| s.len() > suffix.len() && s.starts_with(suffix))
            {
                keep_from = i;
            }
            if self.held.len() - i >= self.max_stop_len() {
                break;
            }
        }
        let emit = self.held[..keep_from].to_owned();
        self.held.drain(..keep_from);
        StopCheck {
            emit,
            stopped: false,
            matched: None,
        }
    }

    /// Ends the stream: returns the held-back text (it did not turn into a stop string).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    fn max_stop_len(&self) -> usize {
        self.stops.iter().map(String::len).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_reproducible_and_uniformish() {
        let mut a = Rng::new(1);
        let mut b = Rng::new(1);
        let mut c = Rng::new(2);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..8).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(xs, (0..8).map(|_| c.next_u64()).collect::<Vec<_>>());
        let mean: f64 = (0..100_000).map(|_| a.next_f64()).sum::<f64>() / 100_000.0;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }

    #[test]
    fn bad_settings_are_errors() {
        for cfg in [
            SamplerConfig {
                top_p: 1.5,
                ..Default::default()
            },
            SamplerConfig {
                min_p: f32::NAN,
                ..Default::default()
            },
            SamplerConfig {
                repeat_penalty: 0.0,
                ..Default::default()
            },
            SamplerConfig {
                temperature: f32::INFINITY,
                ..Default::default()
            },
        ] {
            assert!(matches!(
                Sampler::new(cfg),
                Err(SamplerError::InvalidSetting { .. })
            ));
        }
        let mut s = Sampler::new(SamplerConfig::default()).unwrap();
        assert_eq!(s.sample(&[]), Err(SamplerError::EmptyLogits));
    }
}
