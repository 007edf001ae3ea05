//! The weight-format device code of `kernels/quant.cuh`, compiled for the HOST with the system
//! C++ compiler (the CUDA qualifiers defined away, f16 conversion in software, one warp emulated
//! lane by lane), checked against powerinfer-quant: every dequantized element bit for bit against
//! `dequantize_row`, every row dot product against an f64 reference. This checks the block
//! layouts and index arithmetic the GPU kernels use without a GPU. Skips (printing why) when no
//! C++ compiler is found.

mod common;

use common::{Rng, matvec_ref, random_matrix, rel_err};
use powerinfer_quant::GgmlType;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const QUANT: &str = include_str!("../kernels/quant.cuh");

const PRELUDE: &str = r#"
#include <cstdio>
#include <cstring>
#include <cmath>
#include <vector>
#define __device__
#define __forceinline__ inline
typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
static float h2f(u16 h) {
    const u32 sign = (u32)(h >> 15) << 31;
    const int exp = (h >> 10) & 0x1F;
    const u32 man = h & 0x3FF;
    float f;
    if (exp == 0) {
        f = std::ldexp((float)man, -24);
        return sign ? -f : f;
    }
    u32 bits;
    if (exp == 31) bits = sign | 0x7F800000u | (man << 13);
    else bits = sign | ((u32)(exp - 15 + 127) << 23) | (man << 13);
    std::memcpy(&f, &bits, 4);
    return f;
}
static float load_f16(const u8* p) { return h2f((u16)((u32)p[0] | ((u32)p[1] << 8))); }
// One lane at a time: the lane sums are added by the caller.
static float warp_sum(float v) { return v; }
"#;

const MAIN: &str = r#"
template <typename E, typename D>
static void run(int rows, int cols, u64 rb, const u8* w, const float* x, E elem, D rowdot) {
    for (int r = 0; r < rows; ++r) {
        const u8* row = w + (u64)r * rb;
        std::vector<float> out(cols + 1);
        for (int c = 0; c < cols; ++c) out[c] = elem(row, c);
        float lanes[32];
        for (int lane = 0; lane < 32; ++lane) lanes[lane] = rowdot(row, x, cols, lane);
        // The device's butterfly: step 16, 8, 4, 2, 1 (lane 0's view).
        for (int o = 16; o > 0; o >>= 1) {
            float next[32];
            for (int l = 0; l < 32; ++l) next[l] = lanes[l] + lanes[l ^ o];
            std::memcpy(lanes, next, sizeof lanes);
        }
        out[cols] = lanes[0];
        fwrite(out.data(), 4, cols + 1, stdout);
    }
}
int main() {
    int ty, rows, cols;
    unsigned long long rb;
    if (fread(&ty, 4, 1, stdin) != 1 || fread(&rows, 4, 1, stdin) != 1 || fread(&cols, 4, 1, stdin) != 1 ||
        fread(&rb, 8, 1, stdin) != 1) return 2;
    std::vector<u8> w(rb * rows);
    std::vector<float> x(cols);
    if (fread(w.data(), 1, w.size(), stdin) != w.size()) return 3;
    if (fread(x.data(), 4, cols, stdin) != (size_t)cols) return 4;
    switch (ty) {
        case 0: run(rows, cols, rb, w.data(), x.data(), elem_f32, row_dot_f32); break;
        case 1: run(rows, cols, rb, w.data(), x.data(), elem_f16, row_dot_f16); break;
        case 2: run(rows, cols, rb, w.data(), x.data(), elem_q4_0, row_dot_q4_0); break;
        case 3: run(rows, cols, rb, w.data(), x.data(), elem_q8_0, row_dot_q8_0); break;
        case 4: run(rows, cols, rb, w.data(), x.data(), elem_q4_k, row_dot_q4_k); break;
        case 5: run(rows, cols, rb, w.data(), x.data(), elem_q6_k, row_dot_q6_k); break;
        default: return 5;
    }
    return 0;
}
"#;

fn build_harness() -> Result<PathBuf, String> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("powerinfer-cuda-host-quant");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let src = dir.join("harness.cpp");
    let exe = dir.join("harness");
    std::fs::write(&src, format!("{PRELUDE}\n{QUANT}\n{MAIN}")).map_err(|e| e.to_string())?;
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    // No -ffast-math and no FMA contraction: the host arithmetic is plain IEEE f32.
    let out = Command::new(&cxx)
        .args(["-O1", "-std=c++17", "-ffp-contract=off", "-w", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run {cxx}: {e}"))?;
    if !out.status.success() {
        // A compiler that exists but rejects the source is a failure, not a skip.
        panic!(
            "{cxx} rejected the host harness of quant.cuh:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(exe)
}

#[test]
fn quant_cuh_matches_powerinfer_quant_on_the_host() {
    let exe = match build_harness() {
        Ok(e) => e,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let mut rng = Rng(0x5eed_00aa);
    let types = [
        (GgmlType::F32, 0i32),
        (GgmlType::F16, 1),
        (GgmlType::Q4_0, 2),
        (GgmlType::Q8_0, 3),
        (GgmlType::Q4_K, 4),
        (GgmlType::Q6_K, 5),
    ];
    for (ty, code) in types {
        for blocks in [1usize, 3, 37] {
            let cols = match ty {
                GgmlType::F32 | GgmlType::F16 => 32 * blocks + 7,
                _ => ty.block_size() * blocks,
            };
            let rows = 5;
            let (bytes, deq) = random_matrix(&mut rng, ty, rows, cols);
            let x = rng.vec(cols, 1.0);
            let rb = (bytes.len() / rows) as u64;
            let mut input = Vec::new();
            input.extend_from_slice(&code.to_le_bytes());
            input.extend_from_slice(&(rows as i32).to_le_bytes());
            input.extend_from_slice(&(cols as i32).to_le_bytes());
            input.extend_from_slice(&rb.to_le_bytes());
            input.extend_from_slice(&bytes);
            for v in &x {
                input.extend_from_slice(&v.to_le_bytes());
            }
            let mut child = Command::new(&exe)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&input).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "harness failed for {ty:?}: {:?}",
                out.status
            );
            let vals: Vec<f32> = out
                .stdout
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            assert_eq!(vals.len(), rows * (cols + 1));
            let want_dot = matvec_ref(&deq, cols, &x);
            let mut got_dot = Vec::new();
            for r in 0..rows {
                let got = &vals[r * (cols + 1)..(r + 1) * (cols + 1)];
                for c in 0..cols {
                    assert_eq!(
                        got[c].to_bits(),
                        deq[r * cols + c].to_bits(),
                        "{ty:?} cols {cols}: row {r} element {c}: {} vs {}",
                        got[c],
                        deq[r * cols + c]
                    );
                }
                got_dot.push(got[cols]);
            }
            let e = rel_err(&got_dot, &want_dot);
            assert!(e < 1e-5, "{ty:?} cols {cols}: row dot rel err {e}");
        }
    }
}
