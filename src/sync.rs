//! The one place where nann gets its atomics, locks and spin hints.
//!
//! Every shared-memory primitive the index uses is imported from here, never
//! from `std::sync` directly. Under `--cfg loom` the same names resolve to
//! [loom]'s model-checked versions, so the concurrency models (see
//! `tests/loom.rs`) exercise the real algorithm code rather than a copy of it.
//! This is the crossbeam-epoch `primitive` module pattern, and tokio's
//! `loom/mocked.rs`.
//!
//! ```text
//!            normal build                      --cfg loom
//!   Atomic*  std::sync::atomic::*             loom::sync::atomic::*
//!   fence    std::sync::atomic::fence         loom::sync::atomic::fence
//!   Mutex    parking_lot::Mutex               loom::sync::Mutex (wrapped)
//!   RwLock   parking_lot::RwLock              loom::sync::RwLock (wrapped)
//!   backoff  spin_loop, then yield_now        loom::thread::yield_now
//! ```
//!
//! [loom]: https://docs.rs/loom

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{
    fence, AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};

#[cfg(not(loom))]
pub(crate) use parking_lot::{Mutex, RwLock};

#[cfg(loom)]
pub(crate) use loom_locks::{Mutex, RwLock};

/// loom's locks return `LockResult`s; these wrappers give them parking_lot's
/// infallible signatures so the algorithm code is identical in both builds.
#[cfg(loom)]
mod loom_locks {
    pub(crate) use loom::sync::{MutexGuard, RwLockReadGuard, RwLockWriteGuard};

    #[derive(Debug, Default)]
    pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

    impl<T> Mutex<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::Mutex::new(value))
        }
        pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
            self.0
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }

    #[derive(Debug, Default)]
    pub(crate) struct RwLock<T>(loom::sync::RwLock<T>);

    impl<T> RwLock<T> {
        pub(crate) fn new(value: T) -> Self {
            Self(loom::sync::RwLock::new(value))
        }
        pub(crate) fn read(&self) -> RwLockReadGuard<'_, T> {
            self.0
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
        pub(crate) fn write(&self) -> RwLockWriteGuard<'_, T> {
            self.0
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        }
    }
}

/// Exponential backoff for spin loops: a few rounds of `spin_loop` hints that
/// double each time, then `yield_now` so an oversubscribed machine (more
/// runnable threads than cores) lets the lock holder run. This is
/// parking_lot_core's `SpinWait` policy; usearch's un-backed-off busy wait is
/// what it avoids.
#[derive(Debug, Default)]
#[cfg_attr(loom, allow(dead_code))]
pub(crate) struct Backoff {
    step: u32,
}

#[cfg_attr(loom, allow(dead_code))]
impl Backoff {
    /// Rounds of pure spinning before the first yield (2^SPIN_LIMIT hints in all).
    const SPIN_LIMIT: u32 = 6;

    pub(crate) fn new() -> Self {
        Self { step: 0 }
    }

    /// Waits a little; call once per failed attempt.
    pub(crate) fn snooze(&mut self) {
        #[cfg(loom)]
        {
            // loom explores interleavings only at yield points; a spin loop
            // without one exceeds its branch limit.
            loom::thread::yield_now();
        }
        #[cfg(not(loom))]
        {
            if self.step < Self::SPIN_LIMIT {
                for _ in 0..(1u32 << self.step) {
                    std::hint::spin_loop();
                }
                self.step += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// Views atomic words as plain integers, so a pass that runs while no
/// thread can write them reads them with ordinary (vectorisable) loads;
/// atomic loads are never merged or vectorised. `None` under loom, whose
/// atomics are not plain words: callers then take their atomic path.
///
/// # Safety
///
/// No thread may write any of `words` while the returned slice is alive
/// (concurrent *reads*, atomic or not, are fine: reads never race).
#[cfg(not(loom))]
#[inline]
pub(crate) unsafe fn as_plain(words: &[AtomicU32]) -> Option<&[u32]> {
    // SAFETY: `AtomicU32` has the size, alignment and bit validity of `u32`
    // (documented by std), so the words are valid `u32`s in place, for as
    // long as `words` is borrowed; the caller guarantees that nothing
    // writes them meanwhile, so these plain reads cannot race.
    Some(unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u32>(), words.len()) })
}

/// See the non-loom version.
///
/// # Safety
///
/// None needed: this version views nothing.
#[cfg(loom)]
#[inline]
pub(crate) unsafe fn as_plain(_words: &[AtomicU32]) -> Option<&[u32]> {
    None
}

/// Whether this build is the seeded mutant `name` (`scripts/loom-mutants.sh`
/// sets `NANN_MUTANT=name` at compile time). Only loom builds read the
/// variable, so a normal build is never a mutant whatever its environment;
/// an environment variable (unlike a `--cfg` in `RUSTFLAGS`) rebuilds only
/// this crate, not every dependency, for each mutant.
#[cfg(loom)]
pub(crate) const fn mutant(name: &str) -> bool {
    let Some(set) = option_env!("NANN_MUTANT") else {
        return false;
    };
    let (a, b) = (set.as_bytes(), name.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// See the loom version: a normal build is never a mutant.
#[cfg(not(loom))]
pub(crate) const fn mutant(_name: &str) -> bool {
    false
}
