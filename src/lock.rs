//! The per-entry readers-writer spinlock, with an optimistic (seqlock) read path.
//!
//! Every slot of the index owns one [`EntryLock`]: a single `u32` laid out as
//!
//! ```text
//!  31                              8 7             1   0
//! +---------------------------------+---------------+---+
//! |         version (24 bits)       | readers (7 b) | W |
//! +---------------------------------+---------------+---+
//! ```
//!
//! * `W` is set while a writer holds the entry exclusively.
//! * `readers` counts *pessimistic* shared holders (callers of the public
//!   `lock_shared`; the index itself reads optimistically, or under its
//!   exclusive writer gate). A writer waits for it to drain; a reader waits
//!   while `W` is set.
//! * `version` is bumped by every exclusive unlock.
//!
//! # Why searches do not take the lock
//!
//! A search visits hundreds of nodes. If each visit incremented a reader count,
//! every search would write the lock word of every hot node (the entry point
//! and its neighbourhood are hot in *every* query) and the cache line would
//! ping-pong between cores: the scaling failure eloqkv #128 measured in
//! usearch. Searches instead read optimistically, seqlock style:
//!
//! ```text
//!  v = read_begin()          // Acquire load; waits while W is set
//!  copy the neighbour list   // Relaxed atomic loads, may be torn
//!  if !read_validate(v) retry // Acquire fence, then Relaxed reload of the word
//! ```
//!
//! Nothing is written, so readers never contend with each other. A copy that
//! raced with a writer is discarded by `read_validate`; because all shared data
//! is read through atomics, the torn copy is merely useless, never undefined
//! behaviour.
//!
//! # Memory orderings (the argument for each)
//!
//! * `lock_exclusive`: CAS with `Acquire` (sees everything the previous holder
//!   published), followed by `fence(Release)`. The fence orders the CAS before
//!   the writer's subsequent Relaxed data stores: if an optimistic reader's
//!   Relaxed load observes one of those stores, the reader's `fence(Acquire)`
//!   in `read_validate` synchronises with this fence, so its reload of the word
//!   sees `W` (or a later version) and validation fails (Boehm, "Can seqlocks
//!   get along with programming language memory models?", 2012).
//! * `unlock_exclusive`: a `Release` store of the bumped version. Only the
//!   holder can change the word while `W` is set (failed CASes write nothing),
//!   so a plain store is exact. Pairs with the `Acquire` of `read_begin`,
//!   `lock_shared` and `lock_exclusive`.
//! * `read_begin`: `Acquire`, so data written before the unlock that produced
//!   this version is visible to the copy that follows.
//! * `read_validate`: `fence(Acquire)` then a `Relaxed` load, as argued above.
//! * `lock_shared` / `unlock_shared`: CAS `Acquire` / `fetch_sub` `Release`, the
//!   usual reader-writer lock pairing.
//!
//! The 24-bit version wraps after 16.7 million writes to one entry; a reader
//! would have to stall through exactly that many writes *to the same entry*
//! between `read_begin` and `read_validate` to be fooled. At BAR's rates
//! (thousands of writes per second spread over millions of entries) that is
//! not a practical concern, and the cost of a 64-bit word is 4 bytes per entry.
//!
//! Writers back off (spin, then yield: [`Backoff`]), so the lock stays live when
//! there are more threads than cores. A steady stream of pessimistic readers
//! can delay a writer; the index uses pessimistic reads only off the hot path.

use crate::sync::{fence, mutant, AtomicU32, Backoff, Ordering};

// Seeded mutants (`crate::sync::mutant`: loom builds with `NANN_MUTANT=NAME`;
// see `scripts/loom-mutants.sh`): each weakens one step argued in the module
// docs, and the loom models in `tests/loom.rs` must catch every one. In a
// normal build every constant below is the correct value.

/// `Release`; the mutant `unlock_relaxed` publishes nothing.
const UNLOCK_ORDERING: Ordering = if mutant("unlock_relaxed") {
    Ordering::Relaxed
} else {
    Ordering::Release
};
/// The writer's release fence after taking the lock; dropped by the mutant
/// `no_writer_fence`.
const WRITER_FENCE: bool = !mutant("no_writer_fence");
/// The reader's acquire fence before revalidating; dropped by the mutant
/// `no_validate_fence`.
const VALIDATE_FENCE: bool = !mutant("no_validate_fence");
/// What blocks a writer: a writer or a reader; the mutant
/// `writer_ignores_readers` drops the readers, `writers_share` the writer.
const EXCLUDES: u32 = if mutant("writer_ignores_readers") {
    WRITER
} else if mutant("writers_share") {
    READER_MASK
} else {
    WRITER | READER_MASK
};

const WRITER: u32 = 1;
const READER_ONE: u32 = 1 << 1;
const READER_MASK: u32 = 0x7f << 1;
const VERSION_SHIFT: u32 = 8;
const VERSION_MASK: u32 = !0xff;

/// A version observed by [`EntryLock::read_begin`], checked by
/// [`EntryLock::read_validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadVersion(u32);

/// A readers-writer spinlock with an optimistic read path. See the module docs.
///
/// `repr(transparent)` over one `AtomicU32`, so the index can keep each lock
/// as word 0 of the entry's level-0 record (one cache line holds the lock, the
/// degree and the first neighbours).
#[derive(Debug)]
#[repr(transparent)]
pub struct EntryLock {
    state: AtomicU32,
}

impl Default for EntryLock {
    fn default() -> Self {
        Self::new()
    }
}

impl EntryLock {
    /// Views an atomic word as a lock (the word must start at 0 or hold a
    /// state written by this type).
    pub(crate) fn from_word(word: &AtomicU32) -> &EntryLock {
        // SAFETY: `EntryLock` is `repr(transparent)` over `AtomicU32`, so the
        // two types have the same layout and validity, and the returned
        // reference borrows `word` for the same lifetime.
        unsafe { &*(word as *const AtomicU32 as *const EntryLock) }
    }

    /// An unlocked lock at version 0.
    ///
    /// ```
    /// let lock = nann::EntryLock::new();
    /// lock.lock_exclusive();
    /// assert!(!lock.try_lock_shared());
    /// // SAFETY: this thread holds the lock exclusively.
    /// unsafe { lock.unlock_exclusive() };
    /// ```
    pub fn new() -> Self {
        Self {
            state: AtomicU32::new(0),
        }
    }

    /// Tries once to take the lock exclusively.
    pub fn try_lock_exclusive(&self) -> bool {
        let current = self.state.load(Ordering::Relaxed);
        if current & EXCLUDES != 0 {
            return false;
        }
        // Acquire: see everything the previous holder published (module docs).
        if self
            .state
            .compare_exchange(
                current,
                current | WRITER,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            // Release fence: order the lock acquisition before this writer's
            // Relaxed data stores, for optimistic readers (module docs).
            if WRITER_FENCE {
                fence(Ordering::Release);
            }
            true
        } else {
            false
        }
    }

    /// Takes the lock exclusively, spinning with backoff.
    pub fn lock_exclusive(&self) {
        let mut backoff = Backoff::new();
        while !self.try_lock_exclusive() {
            backoff.snooze();
        }
    }

    /// Releases an exclusive hold and publishes a new version.
    ///
    /// # Safety
    /// The caller must hold the lock exclusively.
    pub unsafe fn unlock_exclusive(&self) {
        // Relaxed: we hold W, so no other thread changes the word; this load
        // reads our own CAS.
        let held = self.state.load(Ordering::Relaxed);
        debug_assert!(
            held & WRITER != 0,
            "unlock_exclusive without holding the lock"
        );
        let next_version = ((held >> VERSION_SHIFT).wrapping_add(1)) << VERSION_SHIFT;
        // Release: publish this writer's data to the next Acquire of the word.
        self.state.store(next_version, UNLOCK_ORDERING);
    }

    /// Tries once to take a shared (pessimistic) hold.
    pub fn try_lock_shared(&self) -> bool {
        let current = self.state.load(Ordering::Relaxed);
        if current & WRITER != 0 || current & READER_MASK == READER_MASK {
            return false;
        }
        // Acquire: pairs with the Release unlock of the last writer.
        self.state
            .compare_exchange(
                current,
                current + READER_ONE,
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Takes a shared (pessimistic) hold, spinning with backoff.
    pub fn lock_shared(&self) {
        let mut backoff = Backoff::new();
        while !self.try_lock_shared() {
            backoff.snooze();
        }
    }

    /// Releases a shared hold.
    ///
    /// # Safety
    /// The caller must hold the lock shared.
    pub unsafe fn unlock_shared(&self) {
        // Release: our reads happen-before a writer that later acquires.
        self.state.fetch_sub(READER_ONE, Ordering::Release);
    }

    /// Starts an optimistic read: waits until no writer holds the entry and
    /// returns the version to validate against. Data read after this call
    /// must be read through atomics (it may race with a writer) and is only
    /// meaningful if [`read_validate`](Self::read_validate) then succeeds.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// let lock = nann::EntryLock::new();
    /// let data = AtomicU32::new(7);
    /// let value = loop {
    ///     let version = lock.read_begin();
    ///     let value = data.load(Ordering::Relaxed);
    ///     if lock.read_validate(version) {
    ///         break value;
    ///     }
    /// };
    /// assert_eq!(value, 7);
    /// ```
    pub fn read_begin(&self) -> ReadVersion {
        let mut backoff = Backoff::new();
        loop {
            // Acquire: see the data published by the unlock that made this version.
            let state = self.state.load(Ordering::Acquire);
            if state & WRITER == 0 {
                return ReadVersion(state & VERSION_MASK);
            }
            backoff.snooze();
        }
    }

    /// Returns whether no writer has held the entry since `begin` was taken,
    /// i.e. whether the data read in between is a consistent snapshot.
    pub fn read_validate(&self, begin: ReadVersion) -> bool {
        // Acquire fence then Relaxed load: the seqlock reader recipe (module docs).
        if VALIDATE_FENCE {
            fence(Ordering::Acquire);
        }
        let state = self.state.load(Ordering::Relaxed);
        state & (VERSION_MASK | WRITER) == begin.0
    }

    /// Locks exclusively and returns a guard that unlocks on drop.
    pub(crate) fn write(&self) -> EntryWriteGuard<'_> {
        self.lock_exclusive();
        EntryWriteGuard { lock: self }
    }

    /// Locks shared and returns a guard that unlocks on drop (tests only:
    /// the index itself reads lists optimistically, or under its exclusive
    /// writer gate).
    #[cfg(test)]
    pub(crate) fn read(&self) -> EntryReadGuard<'_> {
        self.lock_shared();
        EntryReadGuard { lock: self }
    }

    /// Whether a writer currently holds the lock.
    pub fn is_locked_exclusive(&self) -> bool {
        self.state.load(Ordering::Relaxed) & WRITER != 0
    }
}

/// Exclusive hold on an entry; unlocks (and bumps the version) on drop, also
/// when unwinding, so a panic in caller code cannot leave an entry locked.
#[must_use = "the entry is unlocked as soon as the guard is dropped"]
#[derive(Debug)]
pub(crate) struct EntryWriteGuard<'a> {
    lock: &'a EntryLock,
}

impl Drop for EntryWriteGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: the guard exists only while `write` holds the lock exclusively.
        unsafe { self.lock.unlock_exclusive() }
    }
}

/// Shared hold on an entry; unlocks on drop.
#[must_use = "the entry is unlocked as soon as the guard is dropped"]
#[derive(Debug)]
#[cfg(test)]
pub(crate) struct EntryReadGuard<'a> {
    lock: &'a EntryLock,
}

#[cfg(test)]
impl Drop for EntryReadGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: the guard exists only while `read` holds the lock shared.
        unsafe { self.lock.unlock_shared() }
    }
}

// SAFETY: lock_api's contract for `RawRwLock` is that an exclusive hold
// excludes every other hold and a shared hold excludes exclusive holds. The
// state word guarantees it: `try_lock_exclusive` succeeds only by CAS from a
// state with no writer bit and a zero reader count, and `try_lock_shared` only
// by CAS from a state without the writer bit; both CASes are `Acquire` and both
// unlocks `Release`, so each hold happens-after the previous conflicting one.
#[cfg(not(loom))]
unsafe impl lock_api::RawRwLock for EntryLock {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = Self {
        state: AtomicU32::new(0),
    };
    type GuardMarker = lock_api::GuardSend;

    fn lock_shared(&self) {
        EntryLock::lock_shared(self)
    }
    fn try_lock_shared(&self) -> bool {
        EntryLock::try_lock_shared(self)
    }
    unsafe fn unlock_shared(&self) {
        // SAFETY: forwarded contract: the caller holds a shared lock.
        unsafe { EntryLock::unlock_shared(self) }
    }
    fn lock_exclusive(&self) {
        EntryLock::lock_exclusive(self)
    }
    fn try_lock_exclusive(&self) -> bool {
        EntryLock::try_lock_exclusive(self)
    }
    unsafe fn unlock_exclusive(&self) {
        // SAFETY: forwarded contract: the caller holds the exclusive lock.
        unsafe { EntryLock::unlock_exclusive(self) }
    }
    fn is_locked(&self) -> bool {
        self.state.load(Ordering::Relaxed) & (WRITER | READER_MASK) != 0
    }
    fn is_locked_exclusive(&self) -> bool {
        EntryLock::is_locked_exclusive(self)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_shared_and_exclusive() {
        let lock = EntryLock::new();
        assert!(lock.try_lock_exclusive());
        assert!(!lock.try_lock_exclusive());
        assert!(!lock.try_lock_shared());
        unsafe { lock.unlock_exclusive() };
        assert!(lock.try_lock_shared());
        assert!(lock.try_lock_shared());
        assert!(!lock.try_lock_exclusive());
        unsafe {
            lock.unlock_shared();
            lock.unlock_shared();
        }
        assert!(lock.try_lock_exclusive());
        unsafe { lock.unlock_exclusive() };
    }

    #[test]
    fn a_write_invalidates_an_optimistic_read() {
        let lock = EntryLock::new();
        let v = lock.read_begin();
        assert!(lock.read_validate(v));
        drop(lock.write());
        assert!(
            !lock.read_validate(v),
            "a completed write must change the version"
        );
        let v2 = lock.read_begin();
        let _held = lock.write();
        assert!(
            !lock.read_validate(v2),
            "a write in progress must fail validation"
        );
    }

    #[test]
    fn shared_holds_do_not_invalidate_optimistic_reads() {
        let lock = EntryLock::new();
        let v = lock.read_begin();
        let guard = lock.read();
        assert!(lock.read_validate(v));
        drop(guard);
        assert!(lock.read_validate(v));
    }

    #[test]
    fn reader_count_saturates_instead_of_overflowing_into_the_version() {
        let lock = EntryLock::new();
        let mut held = 0;
        while lock.try_lock_shared() {
            held += 1;
            assert!(held <= 127);
        }
        assert_eq!(held, 127);
        let v = lock.read_begin();
        for _ in 0..held {
            unsafe { lock.unlock_shared() };
        }
        assert!(lock.read_validate(v));
    }

    #[test]
    fn version_wraps_without_touching_the_low_bits() {
        let lock = EntryLock::new();
        lock.state.store(VERSION_MASK, Ordering::Relaxed);
        drop(lock.write());
        assert_eq!(lock.state.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn writers_are_mutually_exclusive_under_threads() {
        use std::cell::UnsafeCell;
        struct Shared(EntryLock, UnsafeCell<u64>);
        // SAFETY (test): the cell is only touched while holding the lock exclusively.
        unsafe impl Sync for Shared {}
        impl Shared {
            fn bump(&self) {
                let _g = self.0.write();
                // SAFETY: exclusive lock held.
                unsafe { *self.1.get() += 1 };
            }
        }
        let shared = Shared(EntryLock::new(), UnsafeCell::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        shared.bump();
                    }
                });
            }
        });
        assert_eq!(unsafe { *shared.1.get() }, 80_000);
    }
}
