//! The multi-token (gemm) path of `matmul` against one `vec_dot` per output, over shapes that
//! span several token tiles and row tiles, with token counts that leave partial kernel groups
//! (for Q4_K, the grouped-order dot for whole groups of 4 tokens, as llama.cpp's x86 build).

mod matmul_common;

use matmul_common::{Rng, random_weights};
use powerinfer_cpu::{ActBuffer, Matrix, ThreadPool, matmul_quantized};
use powerinfer_gguf::GgmlType;
use powerinfer_quant::gemm::gemm_for;
use powerinfer_quant::kernels;

#[test]
fn gemm_matmul_matches_vec_dot_per_output() {
    let pools: Vec<ThreadPool> = [1, 2, 3].into_iter().map(ThreadPool::new).collect();
    let mut rng = Rng::new(0x6e33_0001);
    let cases = [
        (GgmlType::Q4_0, 4096, 23, 37),
        (GgmlType::Q4_1, 4096, 23, 37),
        (GgmlType::Q5_0, 4096, 23, 37),
        (GgmlType::Q8_0, 4096, 23, 37),
        (GgmlType::Q5_0, 96, 131, 6),
        (GgmlType::Q4_K, 4096, 19, 33),
        (GgmlType::Q6_K, 4096, 19, 33),
        (GgmlType::Q4_K, 512, 67, 9),
        (GgmlType::Q6_K, 768, 5, 2),
        // A few tokens: Q4_1's four-row kernel over the threads' runs of rows, with leftover
        // rows (and runs too short for it).
        (GgmlType::Q4_1, 576, 1541, 2),
        (GgmlType::Q4_1, 576, 1541, 3),
        (GgmlType::Q4_1, 4096, 37, 3),
        (GgmlType::Q4_1, 576, 1541, 4),
        (GgmlType::Q4_1, 4096, 7, 2),
        (GgmlType::Q8_0, 576, 1541, 2),
        (GgmlType::Q8_0, 576, 1541, 3),
        (GgmlType::Q8_0, 576, 999, 4),
        (GgmlType::Q4_0, 4096, 301, 2),
        (GgmlType::Q5_0, 576, 1001, 3),
    ];
    for (ty, cols, rows, n_tokens) in cases {
        let k = kernels(ty).unwrap();
        let data = random_weights(ty, rows * cols, &mut rng);
        let w = Matrix::new(ty, rows, cols, &data).unwrap();
        let x = rng.activations(cols * n_tokens);
        let mut acts = ActBuffer::new();
        acts.quantize_with(k, &x, cols, n_tokens).unwrap();
        // Q4_K: the first `n_tokens - n_tokens % 4` tokens in llama.cpp's grouped order
        let grouped = powerinfer_quant::gemm::grouped_for(k);
        let split = n_tokens - n_tokens % 4;
        let mut want = vec![0f32; rows * n_tokens];
        for t in 0..n_tokens {
            let dot = match grouped {
                Some((_, g)) if t < split => g,
                _ => k.vec_dot,
            };
            for r in 0..rows {
                want[t * rows + r] = dot(cols, w.row(r).unwrap(), acts.token(t).unwrap());
            }
        }
        for pool in &pools {
            let mut y = vec![f32::NAN; rows * n_tokens];
            matmul_quantized(pool, &w, &acts, &mut y).unwrap();
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{ty} {} (gemm: {}) {rows}x{cols}, {n_tokens} tokens, {} threads, output {i}",
                    k.name,
                    gemm_for(k).is_some(),
                    pool.n_threads()
                );
            }
        }
    }
}

/// With `set_decode_order`, every token of a Q4_K batch gets the single-token (`vec_dot`) result.
#[test]
fn decode_order_gives_every_token_the_single_token_result() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng::new(0x6e33_0002);
    // 9 tokens: the tiles; 2 and 3 (a small decoding batch): the few-token path.
    for (ty, cols, rows, n_tokens) in [
        (GgmlType::Q4_K, 1024, 29, 9),
        (GgmlType::Q4_K, 1024, 1029, 3),
        (GgmlType::Q4_K, 512, 301, 2),
    ] {
        decode_order_case(&pool, &mut rng, ty, cols, rows, n_tokens);
    }
}

fn decode_order_case(
    pool: &ThreadPool,
    rng: &mut Rng,
    ty: GgmlType,
    cols: usize,
    rows: usize,
    n_tokens: usize,
) {
    let k = kernels(ty).unwrap();
    let data = random_weights(ty, rows * cols, rng);
    let w = Matrix::new(ty, rows, cols, &data).unwrap();
    let x = rng.activations(cols * n_tokens);
    let mut acts = ActBuffer::new();
    acts.set_decode_order(true);
    acts.quantize_with(k, &x, cols, n_tokens).unwrap();
    let mut y = vec![f32::NAN; rows * n_tokens];
    matmul_quantized(pool, &w, &acts, &mut y).unwrap();
    for t in 0..n_tokens {
        for r in 0..rows {
            let want = (k.vec_dot)(cols, w.row(r).unwrap(), acts.token(t).unwrap());
            assert_eq!(
                y[t * rows + r].to_bits(),
                want.to_bits(),
                "{n_tokens} tokens: t{t} r{r}"
            );
        }
    }
}

/// With `set_grouped_tokens(Some(k))`, exactly the first `k` tokens of a Q4_K batch (any `k`,
/// also past the batch or not a multiple of 4; one token too) get the grouped-order result and
/// the rest the single-token one; `set_decode_order` still wins.
#[test]
fn grouped_tokens_sets_exactly_which_tokens_take_the_grouped_order() {
    let pool = ThreadPool::new(2);
    let mut rng = Rng::new(0x6e33_0003);
    let (ty, cols, rows) = (GgmlType::Q4_K, 512, 13);
    let k = kernels(ty).unwrap();
    let Some((_, grouped_dot)) = powerinfer_quant::gemm::grouped_for(k) else {
        return; // no grouped order on this CPU
    };
    let data = random_weights(ty, rows * cols, &mut rng);
    let w = Matrix::new(ty, rows, cols, &data).unwrap();
    for (n_tokens, kk) in [
        (10usize, 3usize),
        (10, 0),
        (10, 10),
        (5, 9),
        (1, 1),
        (1, 0),
        (9, 6),
    ] {
        let x = rng.activations(cols * n_tokens);
        for decode in [false, true] {
            let mut acts = ActBuffer::new();
            acts.set_grouped_tokens(Some(kk));
            acts.set_decode_order(decode);
            acts.quantize_with(k, &x, cols, n_tokens).unwrap();
            assert_eq!(acts.forces_grouped(n_tokens), !decode && kk > 0);
            let mut y = vec![f32::NAN; rows * n_tokens];
            matmul_quantized(&pool, &w, &acts, &mut y).unwrap();
            for t in 0..n_tokens {
                let dot = if t < kk && !decode {
                    grouped_dot
                } else {
                    k.vec_dot
                };
                for r in 0..rows {
                    let want = dot(cols, w.row(r).unwrap(), acts.token(t).unwrap());
                    assert_eq!(
                        y[t * rows + r].to_bits(),
                        want.to_bits(),
                        "{n_tokens} tokens, k {kk}, decode {decode}: t{t} r{r}"
                    );
                }
            }
        }
    }
}
