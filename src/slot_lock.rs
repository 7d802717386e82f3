//! The lock the graph takes on a slot, and its stand-in inside loom models.
//!
//! In every real build a slot's lock is its [`EntryLock`], word 0 of the
//! slot's level-0 record (`graph.rs`), and everything here compiles to that
//! word: [`SlotLocks`] is empty and [`SlotLock`] is `&EntryLock`.
//!
//! Loom builds (`--cfg loom`) keep the same word and add, beside every slot,
//! a `loom::sync::RwLock<()>` that an index can be switched to with
//! `nann::model_hooks::block_on_slot_locks`:
//!
//! ```text
//!                       search (read_links, links_view)     writer (lock_node)
//!   spinning (default)  EntryLock read_begin / validate     EntryLock write
//!   blocking (models)   RwLock read guard, begin..validate  RwLock write guard
//! ```
//!
//! Why: a spinning lock with a writer preempted inside it makes loom explore
//! every spin of every waiter, and at preemption bound 2 the index models
//! do not finish. The spinlock is model-checked on its own (models L1a-c);
//! algorithm-level models (L3-L6) then take a blocking lock in its place,
//! as tokio's models do, so bound 2 is affordable. The optimistic read
//! becomes a shared hold from `begin` to `validate` and validation always
//! succeeds: a validated optimistic read and a shared hold observe the
//! same snapshots (no writer between begin and validate), so the algorithm
//! sees the same states. What the blocking models cannot reach is the retry
//! after a failed validation; models L3-L6 also run with the spinning
//! lock at bound 1, which covers it.

#[cfg(not(loom))]
pub(crate) use real::*;

#[cfg(loom)]
pub(crate) use model::*;

#[cfg(not(loom))]
mod real {
    use crate::error::Result;
    use crate::lock::EntryLock;
    use crate::sync::AtomicU32;

    /// A slot's lock: its record's lock word.
    pub(crate) type SlotLock<'a> = &'a EntryLock;
    /// What an optimistic read checks at the end (`SlotLock::read_validate`).
    pub(crate) type ReadTicket<'a> = crate::lock::ReadVersion;
    /// An exclusive hold on a slot.
    pub(crate) type SlotWriteGuard<'a> = crate::lock::EntryWriteGuard<'a>;

    /// Nothing beside the records: the lock is word 0 of each.
    #[derive(Debug, Default)]
    pub(crate) struct SlotLocks;

    impl SlotLocks {
        pub(crate) fn new(_capacity: usize) -> Result<Self> {
            Ok(Self)
        }

        pub(crate) fn reserve(&self, _slots: usize) -> Result<()> {
            Ok(())
        }

        /// The lock of the slot whose record starts with `word`.
        #[inline(always)]
        pub(crate) fn get<'a>(&'a self, word: &'a AtomicU32, _slot: u32) -> Option<SlotLock<'a>> {
            Some(EntryLock::from_word(word))
        }
    }
}

#[cfg(loom)]
mod model {
    use crate::error::Result;
    use crate::lock::{EntryLock, EntryWriteGuard, ReadVersion};
    use crate::storage::Chunked;
    use crate::sync::AtomicU32;

    type Blocking = loom::sync::RwLock<()>;

    /// The blocking lock beside every slot, and whether the index uses it.
    #[derive(Debug)]
    pub(crate) struct SlotLocks {
        blocking: Chunked<Blocking>,
        /// Set once, before the model's threads start
        /// (`model_hooks::block_on_slot_locks`); a std atomic, not a loom
        /// one, because it is configuration, not modelled state.
        use_blocking: std::sync::atomic::AtomicBool,
    }

    impl SlotLocks {
        pub(crate) fn new(capacity: usize) -> Result<Self> {
            Ok(Self {
                blocking: Chunked::new(capacity, 1, || Blocking::new(()))?,
                use_blocking: std::sync::atomic::AtomicBool::new(false),
            })
        }

        pub(crate) fn reserve(&self, slots: usize) -> Result<()> {
            self.blocking.reserve(slots)
        }

        /// Switches every slot to its blocking lock (before any thread uses
        /// the index).
        pub(crate) fn block(&self) {
            self.use_blocking
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }

        /// The lock of `slot`, whose record starts with `word`.
        pub(crate) fn get<'a>(&'a self, word: &'a AtomicU32, slot: u32) -> Option<SlotLock<'a>> {
            if self.use_blocking.load(std::sync::atomic::Ordering::Relaxed) {
                let lock = &self.blocking.get(slot as usize)?[0];
                Some(SlotLock::Blocking(lock))
            } else {
                Some(SlotLock::Spinning(EntryLock::from_word(word)))
            }
        }
    }

    /// A slot's lock under loom: the real spinlock or the blocking stand-in.
    #[derive(Debug, Clone, Copy)]
    pub(crate) enum SlotLock<'a> {
        Spinning(&'a EntryLock),
        Blocking(&'a Blocking),
    }

    /// An optimistic read in progress: a version, or a shared hold.
    #[derive(Debug)]
    pub(crate) enum ReadTicket<'a> {
        Spinning(ReadVersion),
        Blocking(loom::sync::RwLockReadGuard<'a, ()>),
    }

    /// An exclusive hold on a slot (held for its `Drop`, never read).
    #[derive(Debug)]
    #[allow(dead_code)]
    pub(crate) enum SlotWriteGuard<'a> {
        Spinning(EntryWriteGuard<'a>),
        Blocking(loom::sync::RwLockWriteGuard<'a, ()>),
    }

    impl<'a> SlotLock<'a> {
        /// As [`EntryLock::read_begin`]; the blocking lock takes a shared hold.
        pub(crate) fn read_begin(self) -> ReadTicket<'a> {
            match self {
                SlotLock::Spinning(lock) => ReadTicket::Spinning(lock.read_begin()),
                SlotLock::Blocking(lock) => {
                    ReadTicket::Blocking(lock.read().unwrap_or_else(|p| p.into_inner()))
                }
            }
        }

        /// As [`EntryLock::read_validate`]; the blocking lock releases its
        /// shared hold and always validates (no writer ran meanwhile).
        pub(crate) fn read_validate(self, ticket: ReadTicket<'a>) -> bool {
            match (self, ticket) {
                (SlotLock::Spinning(lock), ReadTicket::Spinning(version)) => {
                    lock.read_validate(version)
                }
                (SlotLock::Blocking(_), ReadTicket::Blocking(hold)) => {
                    drop(hold);
                    true
                }
                // A ticket from another lock: never produced (one index uses
                // one kind), and failing validation is the safe answer.
                _ => false,
            }
        }

        /// As [`EntryLock::write`].
        pub(crate) fn write(self) -> SlotWriteGuard<'a> {
            match self {
                SlotLock::Spinning(lock) => SlotWriteGuard::Spinning(lock.write()),
                SlotLock::Blocking(lock) => {
                    SlotWriteGuard::Blocking(lock.write().unwrap_or_else(|p| p.into_inner()))
                }
            }
        }
    }
}
