//! Quick, noise-resistant vec_dot timing: the minimum over many repetitions of one
//! 4096-element row per type and implementation (min time resists a shared, busy machine).
//!
//! `cargo run --release -p powerinfer-quant --example dot_speed`

use powerinfer_quant::{GgmlType, all_kernels, quantize_row, row_bytes, scalar_kernels};
use std::hint::black_box;
use std::time::Instant;

fn main() {
    const N: usize = 4096;
    let mut s = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    let wf: Vec<f32> = (0..N).map(|_| rnd()).collect();
    let af: Vec<f32> = (0..N).map(|_| rnd()).collect();
    use GgmlType as T;
    println!(
        "{:<6} {:<11} {:>9} {:>9} {:>8}",
        "type", "kernel", "ns/row", "GB/s", "speedup"
    );
    for ty in [
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
    ] {
        let sk = scalar_kernels(ty).unwrap();
        let mut w = vec![0u8; row_bytes(ty, N).unwrap()];
        quantize_row(ty, &wf, &mut w).unwrap();
        let mut a = vec![0u8; row_bytes(sk.act_ty, N).unwrap()];
        (sk.quantize_act)(&af, &mut a);
        let mut base = 0.0;
        for k in all_kernels(ty) {
            let mut best = f64::MAX;
            for _ in 0..200 {
                let t = Instant::now();
                for _ in 0..20 {
                    black_box((k.vec_dot)(black_box(N), black_box(&w), black_box(&a)));
                }
                best = best.min(t.elapsed().as_secs_f64() / 20.0);
            }
            if k.name == "scalar" {
                base = best;
            }
            println!(
                "{:<6} {:<11} {:>9.0} {:>9.2} {:>7.1}x",
                ty.name(),
                k.name,
                best * 1e9,
                w.len() as f64 / best / 1e9,
                base / best
            );
        }
    }
    println!("\nquantize_act of 4096 f32");
    for ty in [T::F16, T::Q4_0, T::Q4_1, T::Q4_K] {
        let mut base = 0.0;
        for k in all_kernels(ty) {
            let mut a = vec![0u8; row_bytes(k.act_ty, N).unwrap()];
            let mut best = f64::MAX;
            for _ in 0..100 {
                let t = Instant::now();
                for _ in 0..10 {
                    (k.quantize_act)(black_box(&af), black_box(&mut a));
                }
                best = best.min(t.elapsed().as_secs_f64() / 10.0);
            }
            if k.name == "scalar" {
                base = best;
            }
            println!(
                "{:<6} {:<11} {:>9.0} ns {:>7.1}x",
                k.act_ty.name(),
                k.name,
                best * 1e9,
                base / best
            );
        }
    }
}
