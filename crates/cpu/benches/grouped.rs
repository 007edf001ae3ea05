//! The grouped down projection (`powerinfer_cpu::grouped`) at SmolLM2-135M's FFN shape (n_embd
//! 576, n_ff 1536, Q4_1), 2 threads: `grouped_axpy` over 100/60/50/40% of the neurons against
//! the dense product it replaces (`matvec` of the same weights).
//!
//! Run: `cargo bench -p powerinfer-cpu --bench grouped`
//!
//! Weights rotate over 64 layers (35 MB, more than the 32 MiB L3) so that every product reads
//! its weights from memory, as in decoding. Active neurons are chosen uniformly at random.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use powerinfer_cpu::grouped::{GroupedDown, grouped_axpy};
use powerinfer_cpu::{Matrix, ThreadPool, matvec};
use powerinfer_gguf::GgmlType;

const N_EMBD: usize = 576;
const N_FF: usize = 1536;
const LAYERS: usize = 64;

/// xorshift64: a tiny seeded PRNG.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn grouped_down(c: &mut Criterion) {
    let ty = GgmlType::Q4_1;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let rb = powerinfer_quant::row_bytes(ty, N_FF).unwrap();
    let dense: Vec<Vec<u8>> = (0..LAYERS)
        .map(|_| {
            let mut d = vec![0u8; N_EMBD * rb];
            for r in d.chunks_exact_mut(rb) {
                let v: Vec<f32> = (0..N_FF).map(|_| rng.sym()).collect();
                powerinfer_quant::quantize_row(ty, &v, r).unwrap();
            }
            d
        })
        .collect();
    let grouped: Vec<GroupedDown> = dense
        .iter()
        .map(|d| GroupedDown::from_down(&Matrix::new(ty, N_EMBD, N_FF, d).unwrap()).unwrap())
        .collect();
    let pool = ThreadPool::new(2);
    let mut out = vec![0f32; N_EMBD];

    let mut g = c.benchmark_group("grouped_down_smollm2_q4_1_2t");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    let h: Vec<f32> = (0..N_FF).map(|_| rng.sym()).collect();
    let mut i = 0;
    g.bench_function("dense_matvec", |b| {
        b.iter(|| {
            i = (i + 1) % LAYERS;
            let w = Matrix::new(ty, N_EMBD, N_FF, &dense[i]).unwrap();
            matvec(&pool, &w, &h, &mut out).unwrap();
            black_box(&out);
        })
    });
    for pct in [100u64, 60, 50, 40] {
        let ids: Vec<u32> = (0..N_FF as u32)
            .filter(|_| rng.next_u64() % 100 < pct)
            .collect();
        let coef: Vec<f32> = ids.iter().map(|&k| h[k as usize]).collect();
        g.bench_function(format!("grouped_axpy/{pct}%"), |b| {
            b.iter(|| {
                i = (i + 1) % LAYERS;
                grouped_axpy(&pool, &grouped[i], &ids, &coef, &mut out).unwrap();
                black_box(&out);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, grouped_down);
criterion_main!(benches);
