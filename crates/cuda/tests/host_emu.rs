//! The CUDA kernels themselves, run on the HOST by a small emulator of the CUDA execution model
//! (one std::thread per CUDA thread, blocks one after another, `__syncthreads` and warp shuffles
//! through barriers, `__shared__` as function statics), built with the system C++ compiler from
//! the very sources NVRTC compiles (`kernels/*.cu`, `PI_HOST_EMULATION` selecting software f16
//! conversions instead of PTX `cvt`). Every kernel is checked against CPU references with the
//! launch configuration the `Gpu` wrappers use. This is no substitute for the GPU tests
//! (`tests/gpu.rs`): it checks the kernels' logic (indexing, predicates, reductions, chunking),
//! not the device, the driver or cudarc. Skips, printing why, when no C++20 compiler is found.

mod common;

use common::{Rng, matvec_ref, random_matrix, rel_err};
use powerinfer_cuda::{FAMILIES, GPU_TYPES, kernels::type_suffix};
use powerinfer_quant::{GgmlType, f16};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

// Launch geometry of the `Gpu` wrappers (src/gpu.rs).
const MATVEC_BLOCK: u32 = 128;
const ELEM_BLOCK: u32 = 256;
const AXPY_CHUNK_ROWS: usize = 64;
const ATTN_BLOCK: u32 = 128;
const NORM_BLOCK: u32 = 256;
/// `LaunchConfig::for_num_elems`.
const FOR_NUM_ELEMS_BLOCK: u32 = 1024;

const PRELUDE: &str = r#"
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>
#define PI_HOST_EMULATION 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __shared__ static
struct Dim { unsigned x = 0, y = 0, z = 0; };
thread_local Dim threadIdx, blockIdx;
Dim blockDim, gridDim;
static std::barrier<>* g_block = nullptr;
static std::vector<std::unique_ptr<std::barrier<>>> g_warps;
static std::vector<float> g_shfl;
inline void __syncthreads() { g_block->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    const int t = threadIdx.x;
    std::barrier<>* w = g_warps[t >> 5].get();
    g_shfl[t] = v;
    w->arrive_and_wait();
    const float r = g_shfl[t ^ o];
    w->arrive_and_wait();
    return r;
}
inline float __int_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
using std::min;
using std::max;
"#;

const MAIN: &str = r#"
struct Args {
    std::vector<std::vector<unsigned char>>* bufs;
    std::vector<int> kind;
    std::vector<uint64_t> raw;
    void* p(int k) const { return kind[k] == 4 ? nullptr : (void*)(*bufs)[raw[k]].data(); }
    int i(int k) const { return (int)(int32_t)(uint32_t)raw[k]; }
    float f(int k) const { uint32_t b = (uint32_t)raw[k]; float x; memcpy(&x, &b, 4); return x; }
    uint64_t u(int k) const { return raw[k]; }
};
typedef const u8* CB; typedef const float* CF; typedef float* F; typedef const int* CI;
#define REG_T(T)                                                                                 \
    tab["matvec_" #T] = [](const Args& a) {                                                      \
        matvec_##T((CB)a.p(0), (CF)a.p(1), (F)a.p(2), a.i(3), a.i(4), a.u(5), a.i(6)); };         \
    tab["sparse_matvec_" #T] = [](const Args& a) {                                               \
        sparse_matvec_##T((CB)a.p(0), (CF)a.p(1), (F)a.p(2), a.i(3), a.i(4), a.u(5), (CF)a.p(6),  \
                          (CI)a.p(7), a.f(8)); };                                                \
    tab["sparse_axpy_partial_" #T] = [](const Args& a) {                                         \
        sparse_axpy_partial_##T((CB)a.p(0), (CF)a.p(1), (F)a.p(2), a.i(3), a.i(4), a.u(5),       \
                                (CF)a.p(6), (CI)a.p(7), a.f(8), a.i(9)); };
static void rd(void* p, size_t n) { if (fread(p, 1, n, stdin) != n) { fprintf(stderr, "short input\n"); exit(2); } }
int main() {
    std::map<std::string, std::function<void(const Args&)>> tab;
    PI_FOR_EACH_TYPE(REG_T)
    tab["sparse_axpy_reduce"] = [](const Args& a) { sparse_axpy_reduce((CF)a.p(0), (F)a.p(1), a.i(2), a.i(3), a.i(4)); };
    tab["rms_norm"] = [](const Args& a) { rms_norm((CF)a.p(0), (CF)a.p(1), (F)a.p(2), a.i(3), a.f(4)); };
    tab["rope"] = [](const Args& a) { rope((F)a.p(0), a.i(1), a.i(2), a.i(3), a.i(4), a.f(5), a.f(6), a.i(7)); };
    tab["glu"] = [](const Args& a) { glu((CF)a.p(0), (CF)a.p(1), (F)a.p(2), a.i(3), a.i(4), a.i(5)); };
    tab["attn_decode"] = [](const Args& a) {
        attn_decode((CF)a.p(0), (const u16*)a.p(1), (const u16*)a.p(2), (F)a.p(3), (F)a.p(4), a.i(5), a.i(6),
                    a.i(7), a.i(8), a.i(9), a.i(10), a.i(11), a.f(12)); };
    tab["store_f16"] = [](const Args& a) { store_f16((CF)a.p(0), (u16*)a.p(1), a.i(2)); };

    uint32_t name_len; rd(&name_len, 4);
    std::string name(name_len, '\0'); rd(name.data(), name_len);
    uint32_t g[3]; rd(g, 12);
    uint32_t nb; rd(&nb, 4);
    std::vector<std::vector<unsigned char>> bufs(nb);
    for (auto& b : bufs) { uint64_t n; rd(&n, 8); b.resize(n); rd(b.data(), n); }
    Args a; a.bufs = &bufs;
    uint32_t na; rd(&na, 4);
    for (uint32_t k = 0; k < na; ++k) { uint8_t kd; uint64_t v; rd(&kd, 1); rd(&v, 8); a.kind.push_back(kd); a.raw.push_back(v); }
    auto it = tab.find(name);
    if (it == tab.end()) { fprintf(stderr, "unknown kernel %s\n", name.c_str()); return 3; }
    gridDim = Dim{g[0], g[1], 1};
    blockDim = Dim{g[2], 1, 1};
    const unsigned nt = g[2];
    for (unsigned by = 0; by < g[1]; ++by) {
        for (unsigned bx = 0; bx < g[0]; ++bx) {
            std::barrier<> blk(nt);
            g_block = &blk;
            g_warps.clear();
            for (unsigned w = 0; w < (nt + 31) / 32; ++w)
                g_warps.emplace_back(new std::barrier<>(std::min(32u, nt - w * 32)));
            g_shfl.assign(nt, 0.f);
            std::vector<std::thread> ts;
            for (unsigned t = 0; t < nt; ++t) {
                ts.emplace_back([&, t, bx, by] {
                    threadIdx = Dim{t, 0, 0};
                    blockIdx = Dim{bx, by, 0};
                    it->second(a);
                    blk.arrive_and_drop();
                    g_warps[t >> 5]->arrive_and_drop();
                });
            }
            for (auto& th : ts) th.join();
        }
    }
    for (auto& b : bufs) { uint64_t n = b.size(); fwrite(&n, 8, 1, stdout); fwrite(b.data(), 1, n, stdout); }
    return 0;
}
"#;

fn harness() -> Option<&'static PathBuf> {
    static EXE: OnceLock<Option<PathBuf>> = OnceLock::new();
    EXE.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("powerinfer-cuda-host-emu");
        std::fs::create_dir_all(&dir).unwrap();
        let mut src = String::from(PRELUDE);
        let common = FAMILIES[0].source(); // common.cuh + quant.cuh + matvec.cu
        src.push_str(&common);
        for f in &FAMILIES[1..] {
            src.push('\n');
            src.push_str(f.body);
        }
        src.push_str(MAIN);
        let file = dir.join("emu.cpp");
        std::fs::write(&file, src).unwrap();
        let exe = dir.join("emu");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = match Command::new(&cxx)
            .args([
                "-O1",
                "-std=c++20",
                "-pthread",
                "-ffp-contract=off",
                "-w",
                "-o",
            ])
            .arg(&exe)
            .arg(&file)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipped: cannot run {cxx}: {e}");
                return None;
            }
        };
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            // An old compiler without C++20 <barrier> is a reason to skip; anything else fails.
            if log.contains("barrier") && log.contains("No such file") {
                eprintln!("skipped: {cxx} has no C++20 <barrier>");
                return None;
            }
            panic!("{cxx} rejected the host emulation of the kernels:\n{log}");
        }
        Some(exe)
    })
    .as_ref()
}

#[derive(Clone, Copy)]
enum Arg {
    Buf(u32),
    I(i32),
    F(f32),
    U(u64),
    Null,
}

/// Launch `kernel` on the emulator with `grid` x `block` threads; returns the buffers after it.
fn launch(
    kernel: &str,
    grid: (u32, u32),
    block: u32,
    bufs: &[Vec<u8>],
    args: &[Arg],
) -> Vec<Vec<u8>> {
    let exe = harness().expect("harness");
    let mut input = Vec::new();
    input.extend_from_slice(&(kernel.len() as u32).to_le_bytes());
    input.extend_from_slice(kernel.as_bytes());
    for v in [grid.0, grid.1, block] {
        input.extend_from_slice(&v.to_le_bytes());
    }
    input.extend_from_slice(&(bufs.len() as u32).to_le_bytes());
    for b in bufs {
        input.extend_from_slice(&(b.len() as u64).to_le_bytes());
        input.extend_from_slice(b);
    }
    input.extend_from_slice(&(args.len() as u32).to_le_bytes());
    for a in args {
        let (k, v): (u8, u64) = match *a {
            Arg::Buf(i) => (0, u64::from(i)),
            Arg::I(x) => (1, u64::from(x as u32)),
            Arg::F(x) => (2, u64::from(x.to_bits())),
            Arg::U(x) => (3, x),
            Arg::Null => (4, 0),
        };
        input.push(k);
        input.extend_from_slice(&v.to_le_bytes());
    }
    let mut child = Command::new(exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{kernel}: emulator failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut res = Vec::new();
    let mut s = &out.stdout[..];
    while !s.is_empty() {
        let n = u64::from_le_bytes(s[..8].try_into().unwrap()) as usize;
        res.push(s[8..8 + n].to_vec());
        s = &s[8 + n..];
    }
    assert_eq!(res.len(), bufs.len());
    res
}

fn fb(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn bf(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}
fn nan(n: usize) -> Vec<u8> {
    fb(&vec![f32::NAN; n])
}
fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

macro_rules! need_harness {
    () => {
        if harness().is_none() {
            return;
        }
    };
}

fn cols_for(ty: GgmlType, blocks: usize) -> usize {
    match ty {
        GgmlType::F32 | GgmlType::F16 => 32 * blocks + 13,
        _ => ty.block_size() * blocks,
    }
}

#[test]
fn emu_dense_matvec_all_types() {
    need_harness!();
    let mut rng = Rng(0xe1);
    for &ty in GPU_TYPES {
        for (rows, blocks) in [(1usize, 1usize), (11, 3)] {
            let cols = cols_for(ty, blocks);
            let (bytes, deq) = random_matrix(&mut rng, ty, rows, cols);
            let x = rng.vec(cols, 1.0);
            let want = matvec_ref(&deq, cols, &x);
            let rb = (bytes.len() / rows) as u64;
            for relu in [0, 1] {
                let out = launch(
                    &format!("matvec_{}", type_suffix(ty).unwrap()),
                    ((rows as u32).div_ceil(MATVEC_BLOCK / 32), 1),
                    MATVEC_BLOCK,
                    &[bytes.clone(), fb(&x), nan(rows)],
                    &[
                        Arg::Buf(0),
                        Arg::Buf(1),
                        Arg::Buf(2),
                        Arg::I(rows as i32),
                        Arg::I(cols as i32),
                        Arg::U(rb),
                        Arg::I(relu),
                    ],
                );
                let got = bf(&out[2]);
                let want: Vec<f32> = want
                    .iter()
                    .map(|&v| if relu == 1 { v.max(0.0) } else { v })
                    .collect();
                let e = rel_err(&got, &want);
                assert!(e < 1e-5, "{ty:?} {rows}x{cols} relu {relu}: rel err {e}");
            }
        }
    }
}

#[test]
fn emu_sparse_matvec_and_axpy() {
    need_harness!();
    let mut rng = Rng(0xe2);
    let n_ff = 200;
    let threshold = 0.05;
    for &ty in GPU_TYPES {
        let suffix = type_suffix(ty).unwrap();
        let cols = cols_for(ty, 2);
        let k = 70; // two axpy chunks, the second partial
        let mut ids: Vec<u32> = vec![1, 2];
        while ids.len() < k {
            let i = rng.below(n_ff) as u32;
            if !ids.contains(&i) {
                ids.push(i);
            }
        }
        ids.sort_unstable();
        let ids_i: Vec<u8> = ids.iter().flat_map(|&i| (i as i32).to_le_bytes()).collect();
        let mut s = rng.vec(n_ff, 1.0);
        s[1] = threshold; // exactly at the threshold: active
        s[2] = f32::NAN; // inactive
        let act = |n: u32| s[n as usize] >= threshold;
        let (bytes, deq) = random_matrix(&mut rng, ty, k, cols);
        let rb = (bytes.len() / k) as u64;
        // Row-gather matvec.
        let x = rng.vec(cols, 1.0);
        let dense = matvec_ref(&deq, cols, &x);
        let want: Vec<f32> = ids
            .iter()
            .zip(&dense)
            .map(|(&n, &v)| if act(n) { v } else { 0.0 })
            .collect();
        let out = launch(
            &format!("sparse_matvec_{suffix}"),
            ((k as u32).div_ceil(MATVEC_BLOCK / 32), 1),
            MATVEC_BLOCK,
            &[bytes.clone(), fb(&x), nan(k), fb(&s), ids_i.clone()],
            &[
                Arg::Buf(0),
                Arg::Buf(1),
                Arg::Buf(2),
                Arg::I(k as i32),
                Arg::I(cols as i32),
                Arg::U(rb),
                Arg::Buf(3),
                Arg::Buf(4),
                Arg::F(threshold),
            ],
        );
        let got = bf(&out[2]);
        for (j, &n) in ids.iter().enumerate() {
            if !act(n) {
                assert_eq!(
                    got[j].to_bits(),
                    0,
                    "{ty:?}: inactive row {j} not exactly 0"
                );
            }
        }
        assert!(rel_err(&got, &want) < 1e-5, "{ty:?} sparse matvec");
        // Axpy over the same compact rows as down_t (k x cols).
        let h = rng.vec(k, 2.0);
        let mut want = vec![0f64; cols];
        for (j, &n) in ids.iter().enumerate() {
            if act(n) {
                for c in 0..cols {
                    want[c] += f64::from(h[j]) * f64::from(deq[j * cols + c]);
                }
            }
        }
        let want: Vec<f32> = want.into_iter().map(|v| v as f32).collect();
        let n_chunks = k.div_ceil(AXPY_CHUNK_ROWS);
        let col_blocks = (cols as u32).div_ceil(ELEM_BLOCK);
        let part = launch(
            &format!("sparse_axpy_partial_{suffix}"),
            (col_blocks, n_chunks as u32),
            ELEM_BLOCK,
            &[
                bytes.clone(),
                fb(&h),
                nan(n_chunks * cols),
                fb(&s),
                ids_i.clone(),
            ],
            &[
                Arg::Buf(0),
                Arg::Buf(1),
                Arg::Buf(2),
                Arg::I(k as i32),
                Arg::I(cols as i32),
                Arg::U(rb),
                Arg::Buf(3),
                Arg::Buf(4),
                Arg::F(threshold),
                Arg::I(AXPY_CHUNK_ROWS as i32),
            ],
        );
        let base = rng.vec(cols, 1.0);
        for accumulate in [0, 1] {
            let out = launch(
                "sparse_axpy_reduce",
                (col_blocks, 1),
                ELEM_BLOCK,
                &[
                    part[2].clone(),
                    if accumulate == 1 {
                        fb(&base)
                    } else {
                        nan(cols)
                    },
                ],
                &[
                    Arg::Buf(0),
                    Arg::Buf(1),
                    Arg::I(cols as i32),
                    Arg::I(n_chunks as i32),
                    Arg::I(accumulate),
                ],
            );
            let got = bf(&out[1]);
            let want: Vec<f32> = if accumulate == 1 {
                want.iter().zip(&base).map(|(a, b)| a + b).collect()
            } else {
                want.clone()
            };
            let e = rel_err(&got, &want);
            assert!(e < 1e-5, "{ty:?} axpy accumulate {accumulate}: rel err {e}");
        }
        // Identity bucket (null pointer): scores indexed by compact row.
        let s_id: Vec<f32> = ids.iter().map(|&n| s[n as usize]).collect();
        let out = launch(
            &format!("sparse_matvec_{suffix}"),
            ((k as u32).div_ceil(MATVEC_BLOCK / 32), 1),
            MATVEC_BLOCK,
            &[bytes.clone(), fb(&x), nan(k), fb(&s_id)],
            &[
                Arg::Buf(0),
                Arg::Buf(1),
                Arg::Buf(2),
                Arg::I(k as i32),
                Arg::I(cols as i32),
                Arg::U(rb),
                Arg::Buf(3),
                Arg::Null,
                Arg::F(threshold),
            ],
        );
        assert_eq!(bits(&bf(&out[2])), bits(&got), "{ty:?} identity bucket");
    }
}

#[test]
fn emu_rms_norm() {
    need_harness!();
    let mut rng = Rng(0xe3);
    let n = 300;
    let rows = 3;
    let x = rng.vec(n * rows, 3.0);
    let w = rng.vec(n, 1.0);
    let mut want = x.clone();
    powerinfer_cpu::ops::rms_norm_rows_inplace(&mut want, &w, 1e-6).unwrap();
    let out = launch(
        "rms_norm",
        (rows as u32, 1),
        NORM_BLOCK,
        &[fb(&x), fb(&w), nan(n * rows)],
        &[
            Arg::Buf(0),
            Arg::Buf(1),
            Arg::Buf(2),
            Arg::I(n as i32),
            Arg::F(1e-6),
        ],
    );
    let e = rel_err(&bf(&out[2]), &want);
    assert!(e < 1e-6, "rel err {e}");
}

#[test]
fn emu_rope_both_kinds() {
    use powerinfer_cpu::ops::{RopeKind, rope_apply, rope_cache};
    need_harness!();
    let mut rng = Rng(0xe4);
    let (n_heads, head_dim) = (3, 64);
    for (neox, kind) in [(0, RopeKind::Normal), (1, RopeKind::Neox)] {
        for (n_dims, pos) in [(64usize, 17i32), (32, 5)] {
            let x = rng.vec(n_heads * head_dim, 1.0);
            let mut cache = vec![0f32; n_dims];
            rope_cache(pos as f32, 10000.0, 1.0, &mut cache).unwrap();
            let mut want = x.clone();
            rope_apply(&mut want, head_dim, &cache, kind).unwrap();
            let pairs = (n_heads * n_dims / 2) as u32;
            let out = launch(
                "rope",
                (pairs.div_ceil(FOR_NUM_ELEMS_BLOCK), 1),
                FOR_NUM_ELEMS_BLOCK,
                &[fb(&x)],
                &[
                    Arg::Buf(0),
                    Arg::I(n_heads as i32),
                    Arg::I(head_dim as i32),
                    Arg::I(n_dims as i32),
                    Arg::I(pos),
                    Arg::F(10000.0),
                    Arg::F(1.0),
                    Arg::I(neox),
                ],
            );
            let e = rel_err(&bf(&out[0]), &want);
            assert!(e < 1e-5, "{kind:?} n_dims {n_dims}: rel err {e}");
        }
    }
}

#[test]
fn emu_glu() {
    use powerinfer_cpu::ops::{gelu_tanh, silu};
    need_harness!();
    let mut rng = Rng(0xe5);
    let n = 1100; // two blocks of 1024, the second partial
    let gate = rng.vec(n, 6.0);
    let up = rng.vec(n, 2.0);
    for kind in 0..3 {
        for (with_up, relu_up) in [(true, 0), (true, 1), (false, 0)] {
            let want: Vec<f32> = (0..n)
                .map(|i| {
                    let g = gate[i];
                    let a = match kind {
                        0 => silu(g),
                        1 => gelu_tanh(g),
                        _ => g.max(0.0),
                    };
                    let u = if !with_up {
                        1.0
                    } else if relu_up == 1 {
                        up[i].max(0.0)
                    } else {
                        up[i]
                    };
                    a * u
                })
                .collect();
            let out = launch(
                "glu",
                ((n as u32).div_ceil(FOR_NUM_ELEMS_BLOCK), 1),
                FOR_NUM_ELEMS_BLOCK,
                &[fb(&gate), fb(&up), nan(n)],
                &[
                    Arg::Buf(0),
                    if with_up { Arg::Buf(1) } else { Arg::Null },
                    Arg::Buf(2),
                    Arg::I(n as i32),
                    Arg::I(kind),
                    Arg::I(relu_up),
                ],
            );
            let e = rel_err(&bf(&out[2]), &want);
            assert!(
                e < 1e-6,
                "kind {kind} up {with_up} relu_up {relu_up}: rel err {e}"
            );
        }
    }
}

#[test]
fn emu_attention_gqa_and_window() {
    need_harness!();
    let mut rng = Rng(0xe6);
    let n_ctx = 40;
    for (n_head, n_head_kv, hd_k, hd_v, window, pos) in [
        (4usize, 2usize, 64usize, 64usize, None::<usize>, 29usize),
        (3, 3, 40, 24, None, 0),
        (2, 1, 32, 32, Some(7), 39),
    ] {
        let (kd, vd) = (n_head_kv * hd_k, n_head_kv * hd_v);
        let k: Vec<f16> = rng
            .vec(n_ctx * kd, 2.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let v: Vec<f16> = rng
            .vec(n_ctx * vd, 1.0)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let q = rng.vec(n_head * hd_k, 1.0);
        let scale = 1.0 / (hd_k as f32).sqrt();
        // f64 reference.
        let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
        let group = n_head / n_head_kv;
        let mut want = vec![0f32; n_head * hd_v];
        for h in 0..n_head {
            let kvh = h / group;
            let s: Vec<f64> = (first..=pos)
                .map(|t| {
                    (0..hd_k)
                        .map(|d| {
                            f64::from(q[h * hd_k + d])
                                * f64::from(k[t * kd + kvh * hd_k + d].to_f32())
                        })
                        .sum::<f64>()
                        * f64::from(scale)
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd_v {
                let acc: f64 = (first..=pos)
                    .zip(&e)
                    .map(|(t, w)| w * f64::from(v[t * vd + kvh * hd_v + d].to_f32()))
                    .sum();
                want[h * hd_v + d] = (acc / sum) as f32;
            }
        }
        let n = pos + 1 - first;
        let kb: Vec<u8> = k.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        let vb: Vec<u8> = v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        let out = launch(
            "attn_decode",
            (n_head as u32, 1),
            ATTN_BLOCK,
            &[fb(&q), kb, vb, nan(n_head * hd_v), nan(n_head * n)],
            &[
                Arg::Buf(0),
                Arg::Buf(1),
                Arg::Buf(2),
                Arg::Buf(3),
                Arg::Buf(4),
                Arg::I(n_head as i32),
                Arg::I(n_head_kv as i32),
                Arg::I(hd_k as i32),
                Arg::I(hd_v as i32),
                Arg::I(first as i32),
                Arg::I((pos + 1) as i32),
                Arg::I(n as i32),
                Arg::F(scale),
            ],
        );
        let e = rel_err(&bf(&out[3]), &want);
        assert!(
            e < 1e-5,
            "heads {n_head}/{n_head_kv} window {window:?} pos {pos}: rel err {e}"
        );
    }
}

#[test]
fn emu_store_f16_rounds_to_nearest_even() {
    need_harness!();
    let mut rng = Rng(0xe7);
    let mut x = rng.vec(1500, 70000.0); // some overflow to inf
    x.extend([
        0.0,
        -0.0,
        1e-8,
        65519.0,
        65520.0,
        f32::INFINITY,
        2049.0,
        2051.0,
    ]);
    let n = x.len();
    let out = launch(
        "store_f16",
        ((n as u32).div_ceil(FOR_NUM_ELEMS_BLOCK), 1),
        FOR_NUM_ELEMS_BLOCK,
        &[fb(&x), vec![0u8; n * 2]],
        &[Arg::Buf(0), Arg::Buf(1), Arg::I(n as i32)],
    );
    let got: Vec<u16> = out[1]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let want: Vec<u16> = x.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
    assert_eq!(got, want);
}
