//! loom models of nann's concurrency (run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --test loom`).
//!
//! This file holds the seed model that proves the `sync` seam works: the
//! per-entry lock under loom's atomics. The full model set (L1-L6: lock,
//! epoch publish/retire, in-place update, entry promotion, publication,
//! remove vs update) is the concurrency issue's work.
#![cfg(loom)]

use loom::sync::atomic::{AtomicU32, Ordering};
use loom::sync::Arc;
use nann::EntryLock;

/// One writer updates two words under the lock; an optimistic reader must
/// never validate a torn pair, and a pessimistic reader must never see one.
#[test]
fn entry_lock_one_writer_one_reader() {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let shared = Arc::new((EntryLock::new(), AtomicU32::new(0), AtomicU32::new(0)));
        let writer = {
            let shared = shared.clone();
            loom::thread::spawn(move || {
                shared.0.lock_exclusive();
                shared.1.store(1, Ordering::Relaxed);
                shared.2.store(1, Ordering::Relaxed);
                // SAFETY: this thread holds the lock exclusively.
                unsafe { shared.0.unlock_exclusive() };
            })
        };
        let version = shared.0.read_begin();
        let a = shared.1.load(Ordering::Relaxed);
        let b = shared.2.load(Ordering::Relaxed);
        if shared.0.read_validate(version) {
            assert_eq!(a, b, "validated a torn read");
        }
        shared.0.lock_shared();
        let (a, b) = (
            shared.1.load(Ordering::Relaxed),
            shared.2.load(Ordering::Relaxed),
        );
        // SAFETY: this thread holds the lock shared.
        unsafe { shared.0.unlock_shared() };
        assert_eq!(a, b, "torn read under a shared hold");
        writer.join().unwrap();
    });
}
