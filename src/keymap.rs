//! External key -> internal slot.
//!
//! A `hashbrown::HashTable<u32>` stores only the slot; the key is read back
//! from the slot's cell when the table needs it (probe comparison, rehash).
//! That costs one indirection per lookup but keeps the map at ~4-8 bytes per
//! entry, against ~24 for a `HashMap<u64, u32>`, which is what lets an entry's
//! fixed state stay within 32 bytes. Lookups are off the search path (search
//! returns keys straight from the cells), so the indirection is cheap where it
//! is paid.
//!
//! The hash is foldhash's (`foldhash::fast::RandomState`, hashbrown's own
//! default): randomly seeded per process, so keys chosen by an outsider
//! cannot be aimed at one bucket chain without knowing the seed, and about
//! 10x cheaper than std's SipHash, which was most of the key map's share of
//! `Index::open` (1M keys: 82 ms with SipHash and one lock per insert,
//! 17 ms with foldhash and one lock for the whole fill).

use std::hash::BuildHasher;

use foldhash::fast::RandomState;

use hashbrown::HashTable;

use crate::sync::{AtomicBool, Ordering, RwLock};

#[derive(Debug, Default)]
pub(crate) struct KeyMap {
    table: RwLock<HashTable<u32>>,
    hasher: RandomState,
    /// The map still has to be filled from the index's slots (an index
    /// opened without validation defers that O(n) work to its first key
    /// operation; see [`KeyMap::deferred`]).
    pending: AtomicBool,
}

impl KeyMap {
    /// An empty map that must be [`fill`](Self::fill)ed before first use.
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn deferred() -> Self {
        Self {
            pending: AtomicBool::new(true),
            ..Self::default()
        }
    }

    /// Fills an empty map from `(key, slot)` pairs under one lock hold;
    /// on a key seen twice returns it (the map is then partly filled).
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn fill_unique(
        &self,
        entries: &[(u64, u32)],
        key_of: impl Fn(u32) -> u64,
    ) -> std::result::Result<(), u64> {
        let mut table = self.table.write();
        table.reserve(entries.len(), |&s| self.hash(key_of(s)));
        for &(key, slot) in entries {
            let hash = self.hash(key);
            if table.find(hash, |&s| key_of(s) == key).is_some() {
                return Err(key);
            }
            table.insert_unique(hash, slot, |&s| self.hash(key_of(s)));
        }
        Ok(())
    }

    /// Whether [`fill`](Self::fill) still has to run.
    #[inline]
    pub(crate) fn is_pending(&self) -> bool {
        // Acquire: pairs with the Release in `fill`, so a caller that sees
        // `false` also sees the filled table (it then takes the table's lock,
        // which orders its accesses anyway; this flag only skips the call).
        self.pending.load(Ordering::Acquire)
    }

    /// Fills a deferred map from `(key, slot)` pairs, once: concurrent and
    /// later calls return without reading `entries`. A key seen twice keeps
    /// its first slot (only an unvalidated file can hold duplicates).
    pub(crate) fn fill(
        &self,
        entries: impl FnOnce() -> Vec<(u64, u32)>,
        key_of: impl Fn(u32) -> u64,
    ) {
        let mut table = self.table.write();
        // Relaxed: read and written only under the table's write lock.
        if !self.pending.load(Ordering::Relaxed) {
            return;
        }
        let entries = entries();
        table.reserve(entries.len(), |&s| self.hash(key_of(s)));
        for (key, slot) in entries {
            let hash = self.hash(key);
            if table.find(hash, |&s| key_of(s) == key).is_none() {
                table.insert_unique(hash, slot, |&s| self.hash(key_of(s)));
            }
        }
        // Release: see `is_pending`.
        self.pending.store(false, Ordering::Release);
    }

    fn hash(&self, key: u64) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The slot of `key`; `key_of` reads the key stored at a slot.
    pub(crate) fn get(&self, key: u64, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        let table = self.table.read();
        table
            .find(self.hash(key), |&slot| key_of(slot) == key)
            .copied()
    }

    /// Maps `key` to `slot`; returns `false` (and changes nothing) if `key`
    /// is already present.
    pub(crate) fn insert(&self, key: u64, slot: u32, key_of: impl Fn(u32) -> u64) -> bool {
        let mut table = self.table.write();
        let hash = self.hash(key);
        if table.find(hash, |&s| key_of(s) == key).is_some() {
            return false;
        }
        table.insert_unique(hash, slot, |&s| self.hash(key_of(s)));
        true
    }

    /// Removes `key`, returning its slot.
    pub(crate) fn remove(&self, key: u64, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        let mut table = self.table.write();
        match table.find_entry(self.hash(key), |&s| key_of(s) == key) {
            Ok(entry) => Some(entry.remove().0),
            Err(_) => None,
        }
    }

    /// Every mapped slot (for invariant checks).
    pub(crate) fn slots(&self) -> Vec<u32> {
        self.table.read().iter().copied().collect()
    }

    /// Bytes of the table's buckets and control bytes.
    pub(crate) fn allocated_bytes(&self) -> usize {
        let capacity = self.table.read().capacity();
        if capacity == 0 {
            return 0;
        }
        // hashbrown's bucket count is the power of two whose 7/8 is at least
        // the capacity; each bucket is a 4-byte slot plus one control byte
        // (plus 16 trailing control bytes for the SIMD probe).
        let buckets = (capacity * 8).div_ceil(7).next_power_of_two();
        buckets * 5 + 16
    }

    /// Test hook: map a key to a slot without any check.
    #[cfg(test)]
    pub(crate) fn force_insert(&self, key: u64, slot: u32, key_of: impl Fn(u32) -> u64) {
        let mut table = self.table.write();
        table.insert_unique(self.hash(key), slot, |&s| self.hash(key_of(s)));
    }
}
