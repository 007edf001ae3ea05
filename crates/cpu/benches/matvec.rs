//! Dense matvec throughput (GB/s of weights read) against the machine's read bandwidth, and the
//! thread pool's hand-off cost on a small model's decode step (our pool vs rayon).
//!
//! Run: `cargo bench -p powerinfer-cpu --bench matvec`

#[path = "../tests/matmul_common/mod.rs"]
mod matmul_common;

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use matmul_common::{Rng, random_weights};
use powerinfer_cpu::{ActBuffer, Matrix, ThreadPool, matmul_with, matvec_rows, matvec_with};
use powerinfer_gguf::GgmlType;
use rayon::prelude::*;

/// Weight bytes per rayon task, the same as the pool's matvec chunk.
const CHUNK_BYTES: usize = 16 * 1024;

/// At least this many bytes of distinct weights per benchmark, so that the product streams from
/// DRAM rather than the 32 MiB L3.
const MIN_WORKING_SET: usize = 160 << 20;

fn matvec_rayon(
    pool: &rayon::ThreadPool,
    w: &Matrix,
    x: &[f32],
    y: &mut [f32],
    acts: &mut ActBuffer,
) {
    acts.quantize(w.ty, x, w.cols, 1).unwrap();
    let acts = &*acts;
    let chunk_rows = (CHUNK_BYTES / w.row_bytes()).max(1);
    pool.install(|| {
        y.par_chunks_mut(chunk_rows)
            .enumerate()
            .for_each(|(i, yc)| matvec_rows(w, acts, 0, i * chunk_rows, yc).unwrap());
    });
}

fn rayon_pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}

/// Sums `data` with eight independent lanes (so the loop is load-bound, not add-bound).
fn sum_u64(data: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let chunks = data.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.wrapping_add(*v);
        }
    }
    acc.iter().chain(rest).fold(0u64, |s, v| s.wrapping_add(*v))
}

fn bandwidth(c: &mut Criterion) {
    let n = (1usize << 30) / 8;
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut g = c.benchmark_group("bandwidth");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::BytesDecimal((n * 8) as u64));
    for threads in [1usize, 2] {
        let pool = ThreadPool::new(threads);
        g.bench_function(format!("read_sum_1GiB/{threads}t"), |b| {
            b.iter(|| {
                let parts: Vec<std::sync::atomic::AtomicU64> = (0..threads)
                    .map(|_| std::sync::atomic::AtomicU64::new(0))
                    .collect();
                pool.run(|i, nt| {
                    let per = n.div_ceil(nt);
                    let part = &buf[(i * per).min(n)..((i + 1) * per).min(n)];
                    parts[i].store(sum_u64(part), std::sync::atomic::Ordering::Relaxed);
                });
                black_box(
                    parts
                        .iter()
                        .map(|p| p.load(std::sync::atomic::Ordering::Relaxed))
                        .sum::<u64>(),
                )
            })
        });
    }
    g.finish();
}

fn dense_matvec(c: &mut Criterion) {
    let mut rng = Rng::new(42);
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let rayon2 = rayon_pool(2);
    let mut g = c.benchmark_group("matvec");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1));
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q8_0,
        GgmlType::F16,
    ] {
        for (rows, cols) in [(11008usize, 4096usize), (4096, 11008)] {
            let one = random_weights(ty, rows * cols, &mut rng);
            let copies = MIN_WORKING_SET.div_ceil(one.len()).max(2);
            let store: Vec<Vec<u8>> = (0..copies).map(|_| one.clone()).collect();
            drop(one);
            let mats: Vec<Matrix> = store
                .iter()
                .map(|d| Matrix::new(ty, rows, cols, d).unwrap())
                .collect();
            let x = rng.activations(cols);
            let mut y = vec![0f32; rows];
            let mut acts = ActBuffer::new();
            g.throughput(Throughput::BytesDecimal(mats[0].data.len() as u64));
            for pool in &pools {
                let mut i = 0;
                g.bench_function(
                    format!("{ty}/{rows}x{cols}/pool-{}t", pool.n_threads()),
                    |b| {
                        b.iter(|| {
                            i = (i + 1) % copies;
                            matvec_with(pool, &mats[i], &x, &mut y, &mut acts).unwrap();
                        })
                    },
                );
            }
            if ty == GgmlType::Q4_0 {
                let mut i = 0;
                g.bench_function(format!("{ty}/{rows}x{cols}/rayon-2t"), |b| {
                    b.iter(|| {
                        i = (i + 1) % copies;
                        matvec_rayon(&rayon2, &mats[i], &x, &mut y, &mut acts);
                    })
                });
            }
        }
    }
    g.finish();
}

/// One decode step of SmolLM2-135M's projections (30 layers of q, k, v, o, gate, up, down in
/// Q4_1: 210 matvecs, 66 MB), and the same count of one L2-resident 1536 x 576 matvec, which
/// isolates the hand-off cost.
fn decode_handoff(c: &mut Criterion) {
    let mut rng = Rng::new(7);
    let ty = GgmlType::Q4_1;
    let (e, f, kv) = (576usize, 1536usize, 192usize);
    let layer: [(usize, usize); 7] = [(e, e), (kv, e), (kv, e), (e, e), (f, e), (f, e), (e, f)];
    let store: Vec<(usize, usize, Vec<u8>)> = (0..30)
        .flat_map(|_| layer)
        .map(|(r, c)| (r, c, random_weights(ty, r * c, &mut rng)))
        .collect();
    let mats: Vec<Matrix> = store
        .iter()
        .map(|(r, c, d)| Matrix::new(ty, *r, *c, d).unwrap())
        .collect();
    let total: usize = mats.iter().map(|m| m.data.len()).sum();
    let small_data = random_weights(ty, f * e, &mut rng);
    let small = Matrix::new(ty, f, e, &small_data).unwrap();
    let xs = rng.activations(f);
    let mut y = vec![0f32; f];
    let mut acts = ActBuffer::new();
    let pools = [ThreadPool::new(1), ThreadPool::new(2)];
    let rayon2 = rayon_pool(2);

    let mut g = c.benchmark_group("decode_smollm2_q4_1");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::BytesDecimal(total as u64));
    for pool in &pools {
        g.bench_function(format!("210_matvecs/pool-{}t", pool.n_threads()), |b| {
            b.iter(|| {
                for m in &mats {
                    matvec_with(pool, m, &xs[..m.cols], &mut y[..m.rows], &mut acts).unwrap();
                }
            })
        });
    }
    g.bench_function("210_matvecs/rayon-2t", |b| {
        b.iter(|| {
            for m in &mats {
                matvec_rayon(&rayon2, m, &xs[..m.cols], &mut y[..m.rows], &mut acts);
            }
        })
    });
    g.throughput(Throughput::Elements(210));
    // Round trips: every thread must run the (empty) job before the call returns.
    g.bench_function("210_empty_jobs/pool-2t", |b| {
        b.iter(|| {
            for _ in 0..210 {
                pools[1].run(|i, _| {
                    black_box(i);
                });
            }
        })
    });
    g.bench_function("210_empty_jobs/rayon-2t", |b| {
        b.iter(|| {
            for _ in 0..210 {
                black_box(rayon2.broadcast(|ctx| black_box(ctx.index())));
            }
        })
    });
    g.throughput(Throughput::BytesDecimal((small.data.len() * 210) as u64));
    for pool in &pools {
        g.bench_function(
            format!("210x_1536x576_in_L2/pool-{}t", pool.n_threads()),
            |b| {
                b.iter(|| {
                    for _ in 0..210 {
                        matvec_with(pool, &small, &xs[..e], &mut y, &mut acts).unwrap();
                    }
                })
            },
        );
    }
    g.bench_function("210x_1536x576_in_L2/rayon-2t", |b| {
        b.iter(|| {
            for _ in 0..210 {
                matvec_rayon(&rayon2, &small, &xs[..e], &mut y, &mut acts);
            }
        })
    });
    g.finish();
}

/// Prompt processing: one 1536 x 576 Q4_1 matrix (SmolLM2's FFN up) times 64 tokens, tiled
/// `matmul` against 64 separate matvecs (the same numbers, bit for bit).
fn prompt_tiles(c: &mut Criterion) {
    let mut rng = Rng::new(11);
    let (rows, cols, n_tok) = (1536usize, 576usize, 64usize);
    let ty = GgmlType::Q4_1;
    let data = random_weights(ty, rows * cols, &mut rng);
    let w = Matrix::new(ty, rows, cols, &data).unwrap();
    let x = rng.activations(cols * n_tok);
    let mut y = vec![0f32; rows * n_tok];
    let mut acts = ActBuffer::new();
    let mut g = c.benchmark_group("prompt_q4_1_1536x576_64tok");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_secs(1));
    g.throughput(Throughput::Elements(n_tok as u64));
    for threads in [1usize, 2] {
        let pool = ThreadPool::new(threads);
        g.bench_function(format!("matmul/{threads}t"), |b| {
            b.iter(|| matmul_with(&pool, &w, &x, n_tok, &mut y, &mut acts).unwrap())
        });
        g.bench_function(format!("64_matvecs/{threads}t"), |b| {
            b.iter(|| {
                for (xt, yt) in x.chunks_exact(cols).zip(y.chunks_exact_mut(rows)) {
                    matvec_with(&pool, &w, xt, yt, &mut acts).unwrap();
                }
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    bandwidth,
    dense_matvec,
    decode_handoff,
    prompt_tiles
);
criterion_main!(benches);
