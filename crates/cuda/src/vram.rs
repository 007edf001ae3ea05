//! The VRAM accountant: every device allocation of this crate reserves its bytes here first.
//!
//! The counting is plain Rust with no CUDA in it, so it is tested on any machine.

use crate::CudaError;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts the bytes reserved on one device against a budget and refuses a reservation that would
/// exceed it ([`CudaError::Budget`]). Thread-safe; reservations are released when their
/// [`Reservation`] is dropped.
#[derive(Debug)]
pub struct VramAccountant {
    budget: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

/// Bytes held against a [`VramAccountant`]; dropping it gives them back.
#[derive(Debug)]
pub struct Reservation {
    owner: Arc<VramAccountant>,
    bytes: u64,
}

impl VramAccountant {
    /// A new accountant allowing at most `budget` bytes at once.
    pub fn new(budget: u64) -> Arc<Self> {
        Arc::new(Self {
            budget,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        })
    }

    /// Reserve `bytes` for `what`, or fail with [`CudaError::Budget`] leaving the count unchanged.
    pub fn reserve(
        self: &Arc<Self>,
        what: &'static str,
        bytes: u64,
    ) -> Result<Reservation, CudaError> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            let new = match used.checked_add(bytes) {
                Some(n) if n <= self.budget => n,
                _ => {
                    return Err(CudaError::Budget {
                        what,
                        requested: bytes,
                        used,
                        budget: self.budget,
                    });
                }
            };
            match self
                .used
                .compare_exchange_weak(used, new, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(new, Ordering::Relaxed);
                    return Ok(Reservation {
                        owner: Arc::clone(self),
                        bytes,
                    });
                }
                Err(now) => used = now,
            }
        }
    }

    /// The budget in bytes.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Bytes still available under the budget.
    pub fn available(&self) -> u64 {
        self.budget.saturating_sub(self.used())
    }

    /// The most bytes ever reserved at once.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Reservation {
    /// Bytes this reservation holds.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.owner.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_refuses_and_releases() {
        let acc = VramAccountant::new(1000);
        let a = acc.reserve("a", 600).unwrap();
        assert_eq!(acc.used(), 600);
        assert_eq!(acc.available(), 400);
        let err = acc.reserve("b", 401).unwrap_err();
        match err {
            CudaError::Budget {
                what,
                requested,
                used,
                budget,
            } => assert_eq!((what, requested, used, budget), ("b", 401, 600, 1000)),
            e => panic!("wrong error {e}"),
        }
        assert_eq!(acc.used(), 600, "a refused reservation must not count");
        let b = acc.reserve("b", 400).unwrap();
        assert_eq!(acc.used(), 1000);
        assert!(acc.reserve("c", 1).is_err());
        assert!(acc.reserve("zero", 0).is_ok());
        drop(a);
        assert_eq!(acc.used(), 400);
        assert_eq!(b.bytes(), 400);
        drop(b);
        assert_eq!(acc.used(), 0);
        assert_eq!(acc.peak(), 1000);
    }

    #[test]
    fn overflow_is_refused() {
        let acc = VramAccountant::new(u64::MAX);
        let _a = acc.reserve("a", u64::MAX - 5).unwrap();
        assert!(matches!(
            acc.reserve("b", 10),
            Err(CudaError::Budget { .. })
        ));
    }

    #[test]
    fn concurrent_reservations_never_exceed_budget() {
        let acc = VramAccountant::new(10_000);
        std::thread::scope(|s| {
            for _ in 0..4 {
                let acc = &acc;
                s.spawn(move || {
                    let mut held = Vec::new();
                    for i in 0..2000u64 {
                        if let Ok(r) = acc.reserve("t", 1 + i % 37) {
                            held.push(r);
                        }
                        assert!(acc.used() <= acc.budget());
                        if held.len() > 50 {
                            held.drain(..25);
                        }
                    }
                });
            }
        });
        assert_eq!(acc.used(), 0);
        assert!(acc.peak() <= 10_000);
    }
}
