//! loom models of nann's concurrency (run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --test loom`).
//!
//! Each model runs at most 3 threads. The lock models (L1) use the real
//! [`EntryLock`] under loom's atomics; every model has a seeded mutant in the
//! library (`--cfg nann_mutant="NAME"`) that it must catch:
//! `scripts/loom-mutants.sh` builds each mutant and expects its model to fail.
//!
//! | model | threads | bound | mutants it catches |
//! |---|---|---|---|
//! | L1a lock: 1 writer, 1 reader (optimistic, then shared) | 2 | 2 | `unlock_relaxed`, `no_writer_fence`, `no_validate_fence` |
//! | L1b lock: 1 writer, 2 readers (one optimistic, one shared) | 3 | 2 | `writer_ignores_readers` |
//! | L1c lock: 2 writers, 1 reader | 3 | 1 | `writers_share` |
#![cfg(loom)]

use loom::sync::atomic::{AtomicU32, Ordering};
use loom::sync::Arc;
use nann::EntryLock;

/// Runs `f` under loom with `bound` preemptions.
fn model(bound: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(bound);
    model.check(f);
}

/// A pair of words a writer sets together under the lock.
struct Guarded {
    lock: EntryLock,
    a: AtomicU32,
    b: AtomicU32,
}

impl Guarded {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            lock: EntryLock::new(),
            a: AtomicU32::new(0),
            b: AtomicU32::new(0),
        })
    }

    /// Writes `value` to both words under an exclusive hold.
    fn write(&self, value: u32) {
        self.lock.lock_exclusive();
        self.a.store(value, Ordering::Relaxed);
        self.b.store(value, Ordering::Relaxed);
        // SAFETY: this thread holds the lock exclusively.
        unsafe { self.lock.unlock_exclusive() };
    }

    /// One optimistic read: the pair if it validated.
    fn read_optimistic(&self) -> Option<(u32, u32)> {
        let version = self.lock.read_begin();
        let pair = (
            self.a.load(Ordering::Relaxed),
            self.b.load(Ordering::Relaxed),
        );
        self.lock.read_validate(version).then_some(pair)
    }

    /// A read under a shared hold.
    fn read_shared(&self) -> (u32, u32) {
        self.lock.lock_shared();
        let pair = (
            self.a.load(Ordering::Relaxed),
            self.b.load(Ordering::Relaxed),
        );
        // SAFETY: this thread holds the lock shared.
        unsafe { self.lock.unlock_shared() };
        pair
    }
}

/// L1b: one writer, one optimistic and one shared reader (bound 2). A
/// writer that ignored shared holders would write under the shared reader.
#[test]
fn l1b_entry_lock_one_writer_two_readers() {
    model(2, || {
        let shared = Guarded::new();
        let writer = {
            let shared = shared.clone();
            loom::thread::spawn(move || shared.write(1))
        };
        let optimistic = {
            let shared = shared.clone();
            loom::thread::spawn(move || {
                if let Some((a, b)) = shared.read_optimistic() {
                    assert_eq!(a, b, "validated a torn read");
                }
            })
        };
        let (a, b) = shared.read_shared();
        assert_eq!(a, b, "torn read under a shared hold");
        writer.join().unwrap();
        optimistic.join().unwrap();
    });
}

/// L1c: two writers and an optimistic reader (bound 1): the writers exclude
/// each other (a counter bumped non-atomically under the lock ends at 2),
/// and the reader never validates a mix of the two writes.
#[test]
fn l1c_entry_lock_two_writers_one_reader() {
    model(1, || {
        let shared = Guarded::new();
        let count = Arc::new(AtomicU32::new(0));
        let writers: Vec<_> = [1u32, 2]
            .into_iter()
            .map(|value| {
                let (shared, count) = (shared.clone(), count.clone());
                loom::thread::spawn(move || {
                    shared.lock.lock_exclusive();
                    // A read-modify-write that only the lock makes atomic.
                    let seen = count.load(Ordering::Relaxed);
                    shared.a.store(value, Ordering::Relaxed);
                    shared.b.store(value, Ordering::Relaxed);
                    count.store(seen + 1, Ordering::Relaxed);
                    // SAFETY: this thread holds the lock exclusively.
                    unsafe { shared.lock.unlock_exclusive() };
                })
            })
            .collect();
        if let Some((a, b)) = shared.read_optimistic() {
            assert_eq!(a, b, "validated a torn read");
        }
        for writer in writers {
            writer.join().unwrap();
        }
        shared.lock.lock_shared();
        assert_eq!(
            count.load(Ordering::Relaxed),
            2,
            "a lost update: writers overlapped"
        );
        // SAFETY: this thread holds the lock shared.
        unsafe { shared.lock.unlock_shared() };
    });
}

/// L1a: one writer updates two words under the lock; an optimistic reader
/// must never validate a torn pair, and a pessimistic reader must never see
/// one (bound 2).
#[test]
fn l1a_entry_lock_one_writer_one_reader() {
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
