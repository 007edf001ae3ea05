//! vec_dot per type, every implementation usable on this CPU (scalar first), over one
//! 4096-element row held in cache. Throughput is reported in weight bytes per second.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use powerinfer_quant::{GgmlType, all_kernels, quantize_row, row_bytes, scalar_kernels};
use std::hint::black_box;
use std::time::Duration;

const N: usize = 4096;

fn data(seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..N)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    use GgmlType as T;
    let types = [
        T::F32,
        T::F16,
        T::BF16,
        T::Q4_0,
        T::Q4_1,
        T::Q5_0,
        T::Q5_1,
        T::Q8_0,
        T::Q2_K,
        T::Q3_K,
        T::Q4_K,
        T::Q5_K,
        T::Q6_K,
        T::IQ4_NL,
        T::IQ4_XS,
    ];
    let mut g = c.benchmark_group("vec_dot_4096");
    g.warm_up_time(Duration::from_millis(200));
    g.measurement_time(Duration::from_millis(600));
    g.sample_size(20);
    for ty in types {
        let sk = scalar_kernels(ty).unwrap();
        let mut w = vec![0u8; row_bytes(ty, N).unwrap()];
        quantize_row(ty, &data(1), &mut w).unwrap();
        let mut a = vec![0u8; row_bytes(sk.act_ty, N).unwrap()];
        (sk.quantize_act)(&data(2), &mut a);
        g.throughput(Throughput::Bytes(w.len() as u64));
        for k in all_kernels(ty) {
            g.bench_function(format!("{}/{}", ty.name(), k.name), |b| {
                b.iter(|| (k.vec_dot)(black_box(N), black_box(&w), black_box(&a)))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
