//! Sparse FFN operators at LLaMA-7B FFN shapes (n_embd 4096, n_ff 11008), Q4_0, 2 threads:
//! row-gather matvec and axpy at 10/30/50% active neurons against the dense matvec they
//! replace, and the fused per-neuron FFN against the unfused sequence.
//!
//! Run: `cargo bench -p powerinfer-cpu --bench sparse`
//!
//! Weights rotate over three layers (228 MB) so that every product streams from DRAM, as in
//! decoding, rather than from the 32 MiB L3. Active sets are a perfect predictor's (neurons whose
//! gate is positive), thinned uniformly at random to the target share; real sets cluster, which
//! only helps the sparse path.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use powerinfer_cpu::sparse::{
    Activation, FfnKind, SparseFfn, SparseScratch, sparse_axpy_with, sparse_ffn_with,
    sparse_matvec_with,
};
use powerinfer_cpu::{ActBuffer, Matrix, ThreadPool, matvec_with};
use powerinfer_gguf::GgmlType;

const N_EMBD: usize = 4096;
const N_FF: usize = 11008;
/// Layers cycled through, so that a layer's active rows are read from memory, not from the
/// last-level cache (32 MB here): with 3 layers the 10% gathers ran from L3 and measured
/// about 1.8x faster than in a real 32-layer model.
const LAYERS: usize = 12;

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn sym(&mut self) -> f32 {
        self.unit() * 2.0 - 1.0
    }
}

/// Random Q4_0 weights: one quantized random row repeated with random scales would be cheaper,
/// but distinct rows keep the benchmark honest; quantizing 45 M values takes well under a second.
fn random_q4_0(rng: &mut Rng, rows: usize, cols: usize) -> Vec<u8> {
    let rb = powerinfer_quant::row_bytes(GgmlType::Q4_0, cols).unwrap();
    let mut data = vec![0u8; rows * rb];
    let mut v = vec![0f32; cols];
    for r in 0..rows {
        v.iter_mut().for_each(|x| *x = rng.sym());
        powerinfer_quant::quantize_row(GgmlType::Q4_0, &v, &mut data[r * rb..(r + 1) * rb])
            .unwrap();
    }
    data
}

/// A Q4_0 matrix view.
fn m(d: &[u8], rows: usize, cols: usize) -> Matrix<'_> {
    Matrix::new(GgmlType::Q4_0, rows, cols, d).unwrap()
}

struct Layer {
    gate: Vec<u8>,
    up: Vec<u8>,
    down: Vec<u8>,
    down_t: Vec<u8>,
}

fn sparse_ops(c: &mut Criterion) {
    let mut rng = Rng(42);
    let layers: Vec<Layer> = (0..LAYERS)
        .map(|_| Layer {
            gate: random_q4_0(&mut rng, N_FF, N_EMBD),
            up: random_q4_0(&mut rng, N_FF, N_EMBD),
            down: random_q4_0(&mut rng, N_EMBD, N_FF),
            down_t: random_q4_0(&mut rng, N_FF, N_EMBD),
        })
        .collect();
    let x: Vec<f32> = (0..N_EMBD).map(|_| rng.sym()).collect();
    let h: Vec<f32> = (0..N_FF).map(|_| rng.sym()).collect();
    let pool = ThreadPool::new(2);
    let mut acts = ActBuffer::new();
    let mut scratch = SparseScratch::new();
    let mut y_ff = vec![0f32; N_FF];
    let mut y_embd = vec![0f32; N_EMBD];

    let mut g = c.benchmark_group("sparse_7b_q4_0_2t");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));

    let mut i = 0;
    g.bench_function("dense_matvec_gate_11008x4096", |b| {
        b.iter(|| {
            i = (i + 1) % LAYERS;
            let w = m(&layers[i].gate, N_FF, N_EMBD);
            matvec_with(&pool, &w, &x, &mut y_ff, &mut acts).unwrap();
            black_box(&y_ff);
        })
    });
    g.bench_function("dense_matvec_down_4096x11008", |b| {
        b.iter(|| {
            i = (i + 1) % LAYERS;
            let w = m(&layers[i].down, N_EMBD, N_FF);
            matvec_with(&pool, &w, &h, &mut y_embd, &mut acts).unwrap();
            black_box(&y_embd);
        })
    });
    g.bench_function("dense_ffn_gate_up_down", |b| {
        let mut u = vec![0f32; N_FF];
        b.iter(|| {
            i = (i + 1) % LAYERS;
            let l = &layers[i];
            matvec_with(&pool, &m(&l.gate, N_FF, N_EMBD), &x, &mut y_ff, &mut acts).unwrap();
            matvec_with(&pool, &m(&l.up, N_FF, N_EMBD), &x, &mut u, &mut acts).unwrap();
            y_ff.iter_mut()
                .zip(&u)
                .for_each(|(g, u)| *g = g.max(0.0) * u);
            matvec_with(
                &pool,
                &m(&l.down, N_EMBD, N_FF),
                &y_ff,
                &mut y_embd,
                &mut acts,
            )
            .unwrap();
            black_box(&y_embd);
        })
    });

    // Each layer's true gate pre-activations for `x`: the benchmark's active sets are what a
    // perfect predictor would give (only neurons with gate > 0, so the fused path saves no up
    // rows), thinned at random to the target share of all neurons.
    let positive: Vec<Vec<u32>> = layers
        .iter()
        .map(|l| {
            matvec_with(&pool, &m(&l.gate, N_FF, N_EMBD), &x, &mut y_ff, &mut acts).unwrap();
            (0..N_FF as u32)
                .filter(|&j| y_ff[j as usize] > 0.0)
                .collect()
        })
        .collect();
    for pct in [10u32, 30, 50] {
        let sets: Vec<Vec<u32>> = positive
            .iter()
            .map(|p| {
                let keep = (pct as f32 / 100.0) * N_FF as f32 / p.len() as f32;
                p.iter().copied().filter(|_| rng.unit() < keep).collect()
            })
            .collect();
        eprintln!(
            "{pct}%: active per layer {:?} of {N_FF}",
            sets.iter().map(Vec::len).collect::<Vec<_>>()
        );
        g.bench_function(format!("sparse_matvec_gate/{pct}%"), |b| {
            b.iter(|| {
                i = (i + 1) % LAYERS;
                let w = m(&layers[i].gate, N_FF, N_EMBD);
                sparse_matvec_with(&pool, &w, &x, &sets[i], &mut y_ff, &mut scratch).unwrap();
                black_box(&y_ff);
            })
        });
        g.bench_function(format!("sparse_axpy_down_t/{pct}%"), |b| {
            b.iter(|| {
                i = (i + 1) % LAYERS;
                let w = m(&layers[i].down_t, N_FF, N_EMBD);
                sparse_axpy_with(&pool, &w, &h, &sets[i], &mut y_embd, &mut scratch).unwrap();
                black_box(&y_embd);
            })
        });
        g.bench_function(format!("unfused_ffn/{pct}%"), |b| {
            let mut u = vec![0f32; N_FF];
            b.iter(|| {
                i = (i + 1) % LAYERS;
                let (l, active) = (&layers[i], &sets[i]);
                let gate = m(&l.gate, N_FF, N_EMBD);
                let up = m(&l.up, N_FF, N_EMBD);
                sparse_matvec_with(&pool, &gate, &x, active, &mut y_ff, &mut scratch).unwrap();
                sparse_matvec_with(&pool, &up, &x, active, &mut u, &mut scratch).unwrap();
                for &j in active {
                    let j = j as usize;
                    y_ff[j] = y_ff[j].max(0.0) * u[j];
                }
                let dt = m(&l.down_t, N_FF, N_EMBD);
                sparse_axpy_with(&pool, &dt, &y_ff, active, &mut y_embd, &mut scratch).unwrap();
                black_box(&y_embd);
            })
        });
        g.bench_function(format!("fused_ffn/{pct}%"), |b| {
            b.iter(|| {
                i = (i + 1) % LAYERS;
                let l = &layers[i];
                let ffn = SparseFfn {
                    gate: Some(m(&l.gate, N_FF, N_EMBD)),
                    up: m(&l.up, N_FF, N_EMBD),
                    down_t: m(&l.down_t, N_FF, N_EMBD),
                    kind: FfnKind::Gated(Activation::Relu),
                    round_coefficients: false,
                    zero_below: 0.0,
                    down_grouped: None,
                };
                sparse_ffn_with(&pool, &ffn, &x, &sets[i], &mut y_embd, &mut scratch).unwrap();
                black_box(&y_embd);
            })
        });
    }
    // An imperfect predictor: 30% of neurons active, half of them with a negative gate (precision
    // 0.5). The fused path skips the up rows of those.
    let sets: Vec<Vec<u32>> = positive
        .iter()
        .map(|p| {
            let keep = 0.15 * N_FF as f32 / p.len() as f32;
            let drop = 0.15 * N_FF as f32 / (N_FF - p.len()) as f32;
            (0..N_FF as u32)
                .filter(|j| {
                    let r = rng.unit();
                    if p.binary_search(j).is_ok() {
                        r < keep
                    } else {
                        r < drop
                    }
                })
                .collect()
        })
        .collect();
    g.bench_function("unfused_ffn/30%_precision_0.5", |b| {
        let mut u = vec![0f32; N_FF];
        b.iter(|| {
            i = (i + 1) % LAYERS;
            let (l, active) = (&layers[i], &sets[i]);
            let gate = m(&l.gate, N_FF, N_EMBD);
            let up = m(&l.up, N_FF, N_EMBD);
            sparse_matvec_with(&pool, &gate, &x, active, &mut y_ff, &mut scratch).unwrap();
            sparse_matvec_with(&pool, &up, &x, active, &mut u, &mut scratch).unwrap();
            for &j in active {
                let j = j as usize;
                y_ff[j] = y_ff[j].max(0.0) * u[j];
            }
            let dt = m(&l.down_t, N_FF, N_EMBD);
            sparse_axpy_with(&pool, &dt, &y_ff, active, &mut y_embd, &mut scratch).unwrap();
            black_box(&y_embd);
        })
    });
    g.bench_function("fused_ffn/30%_precision_0.5", |b| {
        b.iter(|| {
            i = (i + 1) % LAYERS;
            let l = &layers[i];
            let ffn = SparseFfn {
                gate: Some(m(&l.gate, N_FF, N_EMBD)),
                up: m(&l.up, N_FF, N_EMBD),
                down_t: m(&l.down_t, N_FF, N_EMBD),
                kind: FfnKind::Gated(Activation::Relu),
                round_coefficients: false,
                zero_below: 0.0,
                down_grouped: None,
            };
            sparse_ffn_with(&pool, &ffn, &x, &sets[i], &mut y_embd, &mut scratch).unwrap();
            black_box(&y_embd);
        })
    });
    g.finish();
}

criterion_group!(benches, sparse_ops);
criterion_main!(benches);
