//! The decode path does not allocate once warmed up (a binary of its own, with a counting global
//! allocator).

mod matmul_common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use matmul_common::{Rng, random_weights};
use powerinfer_cpu::{Matrix, ThreadPool, matmul, matvec};
use powerinfer_gguf::GgmlType;

/// Counts allocations made by threads that opted in (the test thread and the pool's workers),
/// so that the test harness's own threads do not disturb the count.
struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static TRACKED: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if TRACKED.with(Cell::get) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator unchanged, only counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn warm_matvec_and_matmul_do_not_allocate() {
    let mut rng = Rng::new(9);
    let pool = ThreadPool::new(2);
    // Every thread of the pool (this one included) opts in to counting.
    pool.run(|_, _| TRACKED.with(|t| t.set(true)));
    let (rows, cols) = (300, 1024);
    let mats: Vec<(GgmlType, Vec<u8>)> = [GgmlType::Q4_0, GgmlType::Q6_K, GgmlType::F16]
        .into_iter()
        .map(|ty| (ty, random_weights(ty, rows * cols, &mut rng)))
        .collect();
    let x = rng.activations(cols * 4);
    let mut y = vec![0f32; rows * 4];
    let run = |y: &mut [f32]| {
        for (ty, data) in &mats {
            let w = Matrix::new(*ty, rows, cols, data).unwrap();
            matvec(&pool, &w, &x[..cols], &mut y[..rows]).unwrap();
            matmul(&pool, &w, &x, 4, y).unwrap();
        }
    };
    run(&mut y); // warm-up: sizes the thread-local activation buffer
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..20 {
        run(&mut y);
    }
    assert_eq!(ALLOCS.load(Ordering::Relaxed) - before, 0);
    // The counter works: an allocation here is seen.
    let v = std::hint::black_box(vec![1u8; 10]);
    assert_eq!(ALLOCS.load(Ordering::Relaxed) - before, 1);
    drop(v);
}
