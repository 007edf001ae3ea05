//! Device timings of the main kernels at LLaMA-7B FFN shapes (4096 x 11008), with CUDA events
//! after a warm-up. Needs a GPU; without one it prints why and exits with status 1.
//!
//! `cargo run --release -p powerinfer-cuda --example gpu_bench`

use powerinfer_cuda::{GgmlType, Gpu};
use powerinfer_quant::{quantize_row, row_bytes};

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn quantized(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let rb = row_bytes(ty, cols).expect("block multiple");
    let src = random(cols, 7);
    let mut row = vec![0u8; rb];
    quantize_row(ty, &src, &mut row).expect("quantize");
    // The same row repeated: timing does not depend on the values.
    row.repeat(rows)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("no GPU: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "{} ({}), {} MiB",
        gpu.name(),
        gpu.arch(),
        gpu.total_mem() >> 20
    );
    let (n_embd, n_ff) = (4096usize, 11008usize);
    let iters = 50;
    println!("| op | type | shape | us | GB/s of weights |");
    println!("|---|---|---|---|---|");
    for ty in [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let cols = n_embd;
        let bytes = quantized(ty, n_ff, cols);
        let w = gpu.upload_matrix(ty, n_ff, cols, &bytes)?;
        let x = gpu.upload(&random(cols, 1))?;
        let mut y = gpu.zeros(n_ff)?;
        let ms = gpu.time_ms(iters, || gpu.matvec(&w, &x, &mut y))?;
        let gbs = bytes.len() as f64 / (f64::from(ms) * 1e-3) / 1e9;
        println!(
            "| matvec | {ty:?} | {n_ff}x{cols} | {:.1} | {gbs:.0} |",
            ms * 1e3
        );
        // Sparse row-gather with ~10% and ~50% of the rows active.
        for frac in [0.1f32, 0.5] {
            let scores: Vec<f32> = random(n_ff, 3).iter().map(|v| v + 0.5).collect();
            let s = gpu.upload(&scores)?;
            let thr = 1.0 - frac;
            let ms = gpu.time_ms(iters, || gpu.sparse_matvec(&w, &x, &s, None, thr, &mut y))?;
            println!(
                "| sparse_matvec {:.0}% | {ty:?} | {n_ff}x{cols} | {:.1} | |",
                frac * 100.0,
                ms * 1e3
            );
            let mut out = gpu.zeros(cols)?;
            let h = gpu.upload(&random(n_ff, 4))?;
            let ms = gpu.time_ms(iters, || {
                gpu.sparse_axpy(&w, &h, &s, None, thr, &mut out, false)
            })?;
            println!(
                "| sparse_axpy {:.0}% | {ty:?} | {n_ff}x{cols} | {:.1} | |",
                frac * 100.0,
                ms * 1e3
            );
        }
    }
    Ok(())
}
