//! A small persistent thread pool tuned for many short parallel sections.
//!
//! Decoding one token of a small model is a few hundred matrix-vector products of a few hundred
//! kilobytes each, so the cost of handing work to other threads matters as much as the work.
//! [`ThreadPool`] keeps its workers alive between calls: after a job they spin for a short while
//! waiting for the next one (a hand-off then costs one atomic store and a cache-line transfer)
//! and only then park on a condition variable. While spinning they yield their time slice now
//! and then, and the caller, waiting for a worker, does the same and then sleeps: on a machine
//! with more runnable threads than cores, a thread that spins without yielding uses up the time
//! its partner needs to finish, which made two threads several times slower than one in our
//! measurements (see `docs/PERFORMANCE.md`). The calling thread always takes part in the job
//! as thread 0, and a pool of one thread runs everything inline with no synchronisation at all.
//!
//! Work is shared either with [`ThreadPool::run`] (every thread calls the closure once with its
//! index) or with [`ThreadPool::for_each_chunk`] (threads take chunks of an index range from a
//! shared atomic counter until none are left). In the latter, a worker that has not started by
//! the time the caller has taken the last chunk is struck off the job instead of waited for, so
//! a descheduled worker on a busy machine does not stall the caller. [`SharedSlice`] lets the
//! threads write disjoint parts of one output slice.

use std::cell::UnsafeCell;
use std::marker::PhantomData;
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

/// How many times an idle worker polls for new work before it parks (each poll is one load and
/// one `spin_loop` hint: a few hundred microseconds in all).
const SPIN_POLLS: u32 = 1 << 13;

/// An idle worker yields its time slice once every this many polls.
const YIELD_EVERY: u32 = 128;

/// How many times the caller polls for a running worker to finish before it goes to sleep until
/// the worker wakes it (only matters when the worker was descheduled).
const WAIT_POLLS: u32 = 1 << 12;

/// Worker slot states.
const IDLE: u32 = 0;
/// A job is published for this worker and it has not started it.
const PENDING: u32 = 1;
/// The worker is running the job.
const RUNNING: u32 = 2;
/// The pool is shutting down.
const SHUTDOWN: u32 = 3;

/// A job as the workers see it: the caller's closure with its lifetime erased.
type JobPtr = *const (dyn Fn(usize, usize) + Sync + 'static);

/// One worker's state word, alone on its cache line(s).
#[repr(align(128))]
struct Slot(AtomicU32);

/// State shared by the caller and the workers of one pool.
struct Shared {
    /// The current job. Written only by the thread that owns the pool's `busy` flag while every
    /// slot is `IDLE`; read by a worker only between its slot's `PENDING -> RUNNING` and
    /// `RUNNING -> IDLE` transitions.
    job: UnsafeCell<Option<JobPtr>>,
    /// One state word per worker (worker `i` uses `slots[i - 1]`).
    slots: Box<[Slot]>,
    /// Workers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    /// Set when a worker's call of the job panicked.
    panicked: AtomicBool,
    /// Guards parking; holds nothing.
    lock: Mutex<()>,
    /// Parked workers wait here.
    wake: Condvar,
    /// Set while the caller sleeps on `done` waiting for a slow worker.
    caller_waiting: AtomicBool,
    /// The caller waits here for a slow worker.
    done: Condvar,
}

// SAFETY: every field but `job` is Sync by itself. `job` is written only by the single thread
// that won the pool's `busy` flag, and only while every slot is IDLE (no worker reads it); it is
// published to a worker by the Release store of PENDING into that worker's slot and read by the
// worker after its Acquire CAS to RUNNING, before its Release store of IDLE, which the caller
// observes (Acquire) before it writes `job` again. So accesses to `job` never race. The pointee
// is `Sync`, so calling it from several threads at once is allowed.
unsafe impl Sync for Shared {}
// SAFETY: see above; the raw pointer is only dereferenced under the protocol described there.
unsafe impl Send for Shared {}

/// A persistent pool of worker threads.
///
/// `ThreadPool::new(n)` starts `n - 1` workers; the thread that calls [`run`](Self::run) is the
/// `n`-th. Results of the operators in this crate never depend on the number of threads: every
/// output element is computed by exactly one thread, the same way whichever thread it is.
///
/// ```
/// use powerinfer_cpu::ThreadPool;
/// use std::sync::atomic::{AtomicUsize, Ordering};
///
/// let pool = ThreadPool::new(2);
/// let sum = AtomicUsize::new(0);
/// pool.for_each_chunk(1000, 64, |range| {
///     sum.fetch_add(range.sum::<usize>(), Ordering::Relaxed);
/// });
/// assert_eq!(sum.into_inner(), 999 * 1000 / 2);
/// ```
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    n_threads: usize,
    /// Held while a job runs; a second concurrent or nested `run` finds it set and runs inline.
    busy: AtomicBool,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.n_threads)
            .finish_non_exhaustive()
    }
}

impl Default for ThreadPool {
    /// A pool with one thread per available CPU.
    fn default() -> Self {
        Self::new(0)
    }
}

impl ThreadPool {
    /// Starts a pool of `n_threads` threads in all (the caller counts as one).
    ///
    /// `0` means one thread per CPU reported by [`std::thread::available_parallelism`]. If the
    /// operating system refuses to start a worker, the pool simply has fewer threads (see
    /// [`n_threads`](Self::n_threads)); this never fails.
    pub fn new(n_threads: usize) -> Self {
        let wanted = if n_threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n_threads
        };
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            slots: (1..wanted).map(|_| Slot(AtomicU32::new(IDLE))).collect(),
            sleepers: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            caller_waiting: AtomicBool::new(false),
            done: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(wanted.saturating_sub(1));
        // Workers learn the final thread count when they run a job, which is only after `new`
        // has returned; spawning may stop early, so fix the count afterwards.
        let n_final = Arc::new(AtomicUsize::new(0));
        for idx in 1..wanted {
            let s = Arc::clone(&shared);
            let n = Arc::clone(&n_final);
            let spawned = std::thread::Builder::new()
                .name(format!("powerinfer-cpu-{idx}"))
                .spawn(move || worker_loop(&s, idx, &n));
            match spawned {
                Ok(h) => workers.push(h),
                Err(_) => break,
            }
        }
        let n_threads = workers.len() + 1;
        n_final.store(n_threads, Ordering::Release);
        ThreadPool {
            shared,
            workers,
            n_threads,
            busy: AtomicBool::new(false),
        }
    }

    /// The number of threads that take part in a job, the caller included.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(thread_idx, n_threads)` once on every thread of the pool and returns when all
    /// calls have returned. The calling thread runs `thread_idx == 0`.
    ///
    /// With one thread, or when the pool is already running a job (a nested call from inside a
    /// job, or a call from another thread at the same time), the call runs inline as
    /// `f(0, 1)`. Work split with [`for_each_chunk`](Self::for_each_chunk) is unaffected by
    /// this; code that splits work by `thread_idx` must use the `n_threads` it is given.
    ///
    /// A panic in any call is propagated to the caller after every thread has finished.
    pub fn run<F>(&self, f: F)
    where
        F: Fn(usize, usize) + Sync,
    {
        self.run_job(&f, false);
    }

    /// Publishes `f` to the workers, runs thread 0's share, and waits. With `strike_late`, a
    /// worker that has not started when the caller's share returns is struck off instead of
    /// waited for (only valid when the caller's share leaves no work behind).
    fn run_job(&self, f: &(dyn Fn(usize, usize) + Sync + '_), strike_late: bool) {
        if self.n_threads == 1
            || self
                .busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            f(0, 1);
            return;
        }
        let shared = &*self.shared;
        // SAFETY: this only erases the lifetime of the trait object. Workers use the pointer only
        // while their slot is RUNNING, and this function does not return (nor unwind: the
        // caller's own call is wrapped in `catch_unwind`) before every slot is IDLE again, so
        // `f` outlives every use.
        let job: JobPtr =
            unsafe { std::mem::transmute::<*const (dyn Fn(usize, usize) + Sync + '_), JobPtr>(f) };
        // SAFETY: we own `busy`, and every slot is IDLE (we waited for that before releasing
        // `busy` last time), so no worker reads `job` now.
        unsafe { *shared.job.get() = Some(job) };
        // SeqCst pairs with the worker's SeqCst `sleepers` increment: either the worker sees
        // PENDING before parking, or we see it parked and wake it.
        for slot in shared.slots.iter() {
            slot.0.store(PENDING, Ordering::SeqCst);
        }
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.lock.lock().unwrap_or_else(PoisonError::into_inner);
            shared.wake.notify_all();
        }

        let own = catch_unwind(AssertUnwindSafe(|| f(0, self.n_threads)));

        for slot in shared.slots.iter() {
            if strike_late
                && slot
                    .0
                    .compare_exchange(PENDING, IDLE, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                continue;
            }
            let mut polls = 0u32;
            while slot.0.load(Ordering::Acquire) != IDLE {
                if polls < WAIT_POLLS {
                    polls += 1;
                    if polls.is_multiple_of(YIELD_EVERY) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                    continue;
                }
                // The worker is slow (most likely descheduled on a busy machine): sleep until it
                // finishes rather than burn the time slice it may need.
                let guard = shared.lock.lock().unwrap_or_else(PoisonError::into_inner);
                shared.caller_waiting.store(true, Ordering::SeqCst);
                let guard = shared
                    .done
                    .wait_while(guard, |_| slot.0.load(Ordering::SeqCst) != IDLE)
                    .unwrap_or_else(PoisonError::into_inner);
                shared.caller_waiting.store(false, Ordering::SeqCst);
                drop(guard);
            }
        }
        // SAFETY: every slot is IDLE: no worker uses the job; clear the dangling pointer.
        unsafe { *shared.job.get() = None };
        let worker_panicked = shared.panicked.swap(false, Ordering::Relaxed);
        self.busy.store(false, Ordering::Release);

        if let Err(payload) = own {
            resume_unwind(payload);
        }
        if worker_panicked {
            panic!("a powerinfer-cpu thread pool worker panicked while running a job");
        }
    }

    /// Splits `0..n_items` into chunks of `chunk_size` items (the last may be shorter) and calls
    /// `f(range)` once per chunk, on whichever thread takes the chunk from a shared atomic counter.
    ///
    /// Chunks run in no particular order and possibly concurrently; `f` must not rely on either.
    /// A `chunk_size` of 0 is treated as 1. With one thread, or a single chunk, everything runs
    /// inline in order.
    pub fn for_each_chunk<F>(&self, n_items: usize, chunk_size: usize, f: F)
    where
        F: Fn(Range<usize>) + Sync,
    {
        let chunk = chunk_size.max(1);
        let n_chunks = n_items.div_ceil(chunk);
        let range_of = |c: usize| c * chunk..((c + 1) * chunk).min(n_items);
        if self.n_threads == 1 || n_chunks <= 1 {
            for c in 0..n_chunks {
                f(range_of(c));
            }
            return;
        }
        let next = AtomicUsize::new(0);
        let job = |_: usize, _: usize| {
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= n_chunks {
                    break;
                }
                f(range_of(c));
            }
        };
        // The caller's share ends only when every chunk has been taken, so late workers would
        // find nothing to do: strike them off.
        self.run_job(&job, true);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let shared = &*self.shared;
        for slot in shared.slots.iter() {
            slot.0.store(SHUTDOWN, Ordering::SeqCst);
        }
        {
            let _guard = shared.lock.lock().unwrap_or_else(PoisonError::into_inner);
            shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            // A worker never panics outside `catch_unwind`; nothing useful to do on error.
            let _ = h.join();
        }
    }
}

/// The body of worker `idx` (1-based).
fn worker_loop(shared: &Shared, idx: usize, n_final: &AtomicUsize) {
    let slot = &shared.slots[idx - 1].0;
    let ready = |s: u32| s == PENDING || s == SHUTDOWN;
    loop {
        let mut polls = 0u32;
        while !ready(slot.load(Ordering::Acquire)) {
            if polls < SPIN_POLLS {
                polls += 1;
                if polls.is_multiple_of(YIELD_EVERY) {
                    // Let other runnable threads in now and then, so that on a busy machine a
                    // spinning worker does not use up the time it will need for real work.
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            let guard = shared.lock.lock().unwrap_or_else(PoisonError::into_inner);
            shared.sleepers.fetch_add(1, Ordering::SeqCst);
            let guard = shared
                .wake
                .wait_while(guard, |_| !ready(slot.load(Ordering::SeqCst)))
                .unwrap_or_else(PoisonError::into_inner);
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(guard);
        }
        if slot
            .compare_exchange(PENDING, RUNNING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            if slot.load(Ordering::Acquire) == SHUTDOWN {
                return;
            }
            // Struck off by the caller before we started: wait for the next job.
            continue;
        }
        // SAFETY: our slot is RUNNING, so the caller has stored the job and keeps it (and its
        // pointee) alive until we store IDLE.
        let job = unsafe { *shared.job.get() };
        if let Some(job) = job {
            let n = n_final.load(Ordering::Acquire);
            // SAFETY: the pointee is alive until our slot is IDLE again (see `run_job`).
            let r = catch_unwind(AssertUnwindSafe(|| unsafe { (*job)(idx, n) }));
            if r.is_err() {
                shared.panicked.store(true, Ordering::Relaxed);
            }
        }
        // SeqCst pairs with the caller's SeqCst `caller_waiting` store: either the caller sees
        // IDLE before sleeping, or we see it sleeping and wake it.
        slot.store(IDLE, Ordering::SeqCst);
        if shared.caller_waiting.load(Ordering::SeqCst) {
            let _guard = shared.lock.lock().unwrap_or_else(PoisonError::into_inner);
            shared.done.notify_all();
        }
    }
}

/// A mutable slice that several threads may write at once, each to its own part.
///
/// The pool's jobs get `&` access to their environment only; this wrapper turns a `&mut [T]`
/// into something `Sync` whose parts can be borrowed mutably under an `unsafe` promise that no
/// two threads touch the same element concurrently.
pub struct SharedSlice<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: PhantomData<&'a mut [T]>,
}

// SAFETY: a SharedSlice is a `&mut [T]` split across threads; sending or sharing it is sound when
// `T: Send`, given that the unsafe accessors' contract (disjoint accesses) is upheld.
unsafe impl<T: Send> Send for SharedSlice<'_, T> {}
// SAFETY: as above; all mutation goes through the `unsafe` accessors.
unsafe impl<T: Send> Sync for SharedSlice<'_, T> {}

impl<'a, T> SharedSlice<'a, T> {
    /// Wraps a slice for the duration of its borrow.
    pub fn new(slice: &'a mut [T]) -> Self {
        SharedSlice {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _borrow: PhantomData,
        }
    }

    /// The length of the wrapped slice.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the wrapped slice is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Borrows `range` mutably.
    ///
    /// # Panics
    /// If `range` is out of bounds or reversed.
    ///
    /// # Safety
    /// While the returned slice lives, no other thread (and no other borrow from this wrapper)
    /// may access any element of `range`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice_mut(&self, range: Range<usize>) -> &mut [T] {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "SharedSlice range {range:?} out of bounds for length {}",
            self.len
        );
        // SAFETY: in bounds (checked above) of a live `&'a mut [T]`; exclusivity of the range
        // is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// Writes `value` at index `i`.
    ///
    /// # Panics
    /// If `i` is out of bounds.
    ///
    /// # Safety
    /// No other thread may access element `i` concurrently.
    pub unsafe fn write(&self, i: usize, value: T) {
        assert!(
            i < self.len,
            "SharedSlice index {i} out of bounds for length {}",
            self.len
        );
        // SAFETY: in bounds; exclusive access to element `i` is the caller's promise. Assigning
        // through the place drops the previous value, which is initialised.
        unsafe { *self.ptr.add(i) = value };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_calls_every_thread_once() {
        for n in [1, 2, 3, 5] {
            let pool = ThreadPool::new(n);
            assert_eq!(pool.n_threads(), n);
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..100 {
                pool.run(|i, nt| {
                    assert_eq!(nt, n);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), 100);
            }
        }
    }

    #[test]
    fn chunks_cover_range_exactly_once() {
        let pool = ThreadPool::new(3);
        for (n_items, chunk) in [(0, 4), (1, 4), (7, 3), (1000, 7), (64, 64), (65, 0)] {
            let seen: Vec<AtomicUsize> = (0..n_items).map(|_| AtomicUsize::new(0)).collect();
            pool.for_each_chunk(n_items, chunk, |r| {
                for i in r {
                    seen[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let pool = ThreadPool::new(2);
        let count = AtomicUsize::new(0);
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(20));
            pool.run(|_, _| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        }
        assert_eq!(count.into_inner(), 6);
    }

    #[test]
    fn many_tiny_jobs_stay_exact() {
        // Exercises the hand-off races: late workers struck off, workers finishing just as the
        // caller checks, run() and for_each_chunk() interleaved.
        let pool = ThreadPool::new(3);
        let total = AtomicUsize::new(0);
        let mut expected = 0;
        for i in 0..2000 {
            let n = 1 + i % 5;
            pool.for_each_chunk(n, 1, |r| {
                total.fetch_add(r.len(), Ordering::Relaxed);
            });
            expected += n;
            if i % 7 == 0 {
                pool.run(|_, _| {
                    total.fetch_add(1, Ordering::Relaxed);
                });
                expected += 3;
            }
        }
        assert_eq!(total.into_inner(), expected);
    }

    #[test]
    fn caller_waits_for_a_slow_worker() {
        // The caller's share ends at once; it must sleep until the worker wakes it, and see the
        // worker's effects afterwards.
        let pool = ThreadPool::new(2);
        for _ in 0..3 {
            let done = AtomicBool::new(false);
            pool.run(|i, _| {
                if i == 1 {
                    std::thread::sleep(std::time::Duration::from_millis(15));
                    done.store(true, Ordering::Relaxed);
                }
            });
            assert!(done.into_inner());
        }
    }

    #[test]
    fn nested_run_is_inline() {
        let pool = ThreadPool::new(2);
        let inner = AtomicUsize::new(0);
        pool.run(|_, _| {
            pool.run(|i, n| {
                assert_eq!((i, n), (0, 1));
                inner.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(inner.into_inner(), 2);
    }

    #[test]
    fn worker_panic_propagates_and_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(|i, _| {
                if i == 0 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.into_inner(), 2);
    }

    #[test]
    fn shared_slice_disjoint_writes() {
        let pool = ThreadPool::new(4);
        let mut v = vec![0usize; 1001];
        let s = SharedSlice::new(&mut v);
        pool.for_each_chunk(s.len(), 10, |r| {
            // SAFETY: chunks handed out by for_each_chunk are disjoint.
            let part = unsafe { s.slice_mut(r.clone()) };
            for (x, i) in part.iter_mut().zip(r) {
                *x = i * 2;
            }
        });
        assert!(v.iter().enumerate().all(|(i, &x)| x == 2 * i));
    }
}
