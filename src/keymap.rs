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
//! ```text
//!   key ──hash──► bits 40..44 pick a shard ──► shard's RwLock<HashTable<slot>>
//!                 (hashbrown uses the low bits for the bucket and the top 7
//!                  for its tag byte, so the shard choice steals from neither)
//! ```
//!
//! Sixteen shards, each behind its own lock: writers of different keys
//! rarely meet on one lock, and filling the map of an opened file (1M keys)
//! runs on every core, each worker owning whole shards.
//!
//! The hash is foldhash's (`foldhash::fast::RandomState`, hashbrown's own
//! default): randomly seeded per process, so keys chosen by an outsider
//! cannot be aimed at one bucket chain without knowing the seed, and about
//! 10x cheaper than std's SipHash, which was most of the key map's share of
//! `Index::open` (1M keys: 82 ms with SipHash and one lock per insert,
//! 17 ms with foldhash and one lock for the whole fill).

use std::hash::BuildHasher;

/// Randomly seeded per map (see the module docs). Under loom a fixed seed:
/// a model must run the same way each time it is replayed.
#[cfg(not(loom))]
type KeyHasher = foldhash::fast::RandomState;
#[cfg(loom)]
type KeyHasher = foldhash::fast::FixedState;
use hashbrown::HashTable;

use crate::sync::{AtomicBool, Mutex, Ordering, RwLock};

/// Shards (a power of two). One under loom: its models gain nothing from
/// more lock objects to explore.
#[cfg(not(loom))]
const SHARDS: usize = 16;
#[cfg(loom)]
const SHARDS: usize = 1;

/// The shard of a key's hash (its high bits: the low ones pick the bucket
/// inside the shard's table).
#[inline]
// Loom builds have one shard, where clippy sees a modulo by one.
#[cfg_attr(loom, allow(clippy::modulo_one))]
fn shard_of(hash: u64) -> usize {
    (hash >> 40) as usize % SHARDS
}

/// Keys below which a fill runs on the caller's thread alone.
#[cfg_attr(loom, allow(dead_code))]
const PARALLEL_FILL_FROM: usize = 1 << 17;

/// One shard, on its own cache lines so two writers' lock words do not
/// share a line.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard(RwLock<HashTable<u32>>);

/// What [`KeyMap::fill_from`] does with a key seen twice.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Duplicates {
    /// Keep the first slot (an unvalidated file may hold duplicates).
    KeepFirst,
    /// Stop and report the key (a validated open rejects the file).
    Reject,
}

#[derive(Debug)]
pub(crate) struct KeyMap {
    shards: Box<[Shard]>,
    hasher: KeyHasher,
    /// The map still has to be filled from the index's slots (an index
    /// opened without validation defers that O(n) work to its first key
    /// operation; see [`KeyMap::deferred`]).
    pending: AtomicBool,
    /// Held by the one [`KeyMap::fill`] that runs.
    filling: Mutex<()>,
}

impl Default for KeyMap {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: KeyHasher::default(),
            pending: AtomicBool::new(false),
            filling: Mutex::new(()),
        }
    }
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

    fn hash(&self, key: u64) -> u64 {
        self.hasher.hash_one(key)
    }

    fn shard(&self, hash: u64) -> &RwLock<HashTable<u32>> {
        &self.shards[shard_of(hash)].0
    }

    /// Fills an empty map with every slot below `slots` that has a live
    /// key (`live_key`); on a key seen twice returns it (the map is then
    /// partly filled and must be dropped).
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn fill_unique(
        &self,
        slots: u32,
        live_key: impl Fn(u32) -> Option<u64> + Sync,
        key_of: impl Fn(u32) -> u64 + Sync,
    ) -> std::result::Result<(), u64> {
        self.fill_from(slots, &live_key, &key_of, Duplicates::Reject)
    }

    /// Whether [`fill`](Self::fill) still has to run.
    #[inline]
    pub(crate) fn is_pending(&self) -> bool {
        // Acquire: pairs with the Release in `fill`, so a caller that sees
        // `false` also sees the filled shards (it then takes a shard's lock,
        // which orders its accesses anyway; this flag only skips the call).
        self.pending.load(Ordering::Acquire)
    }

    /// Fills a deferred map as [`fill_unique`](Self::fill_unique) does,
    /// once: concurrent and later calls wait for the first to finish, then
    /// return without calling `slots`. A key seen twice keeps its first
    /// slot (only an unvalidated file can hold duplicates).
    pub(crate) fn fill(
        &self,
        slots: impl FnOnce() -> u32,
        live_key: impl Fn(u32) -> Option<u64> + Sync,
        key_of: impl Fn(u32) -> u64 + Sync,
    ) {
        let _filling = self.filling.lock();
        // Relaxed: written only under `filling`, which this thread holds.
        if !self.pending.load(Ordering::Relaxed) {
            return;
        }
        // KeepFirst never reports a duplicate.
        let _ = self.fill_from(slots(), &live_key, &key_of, Duplicates::KeepFirst);
        // Release: see `is_pending`.
        self.pending.store(false, Ordering::Release);
    }

    /// Inserts the live slots below `slots`, with one worker per core for
    /// large fills, each owning the shards `s` with `s % workers == w`
    /// (locked for the whole fill) and reading every slot, keeping its own.
    /// Slots are read in place (no list of pairs is built: for 1M keys that
    /// was 16 MB of fresh pages to fault in). A key lives in one shard, so
    /// each shard sees its keys in slot order: which slot `KeepFirst` keeps
    /// does not depend on the number of workers.
    fn fill_from(
        &self,
        slots: u32,
        live_key: &(impl Fn(u32) -> Option<u64> + Sync),
        key_of: &(impl Fn(u32) -> u64 + Sync),
        duplicates: Duplicates,
    ) -> std::result::Result<(), u64> {
        let workers = crate::parallel::pass_workers(slots as usize, PARALLEL_FILL_FROM).min(SHARDS);
        let outcomes = crate::parallel::run_workers(workers, |w| {
            let mut tables: Vec<_> = (0..SHARDS)
                .map(|s| (s % workers == w).then(|| self.shards[s].0.write()))
                .collect();
            // Room for an even share of the slots plus a margin (a shard's
            // count varies by ~sqrt(share): 0.4% of 62k for 1M keys), so a
            // fill almost never grows a table; if one does, it rehashes,
            // correctly. Counting first cost a second pass over the keys.
            let share = slots as usize / SHARDS;
            for table in tables.iter_mut().flatten() {
                table.reserve(share + share / 32 + 64, |&s| self.hash(key_of(s)));
            }
            for slot in 0..slots {
                let Some(key) = live_key(slot) else {
                    continue;
                };
                let hash = self.hash(key);
                let Some(table) = tables[shard_of(hash)].as_mut() else {
                    continue;
                };
                // One probe finds the key or the place to put it.
                match table.entry(hash, |&s| key_of(s) == key, |&s| self.hash(key_of(s))) {
                    hashbrown::hash_table::Entry::Occupied(_) => {
                        if duplicates == Duplicates::Reject {
                            return Err(key);
                        }
                    }
                    hashbrown::hash_table::Entry::Vacant(place) => {
                        place.insert(slot);
                    }
                }
            }
            Ok(())
        });
        outcomes.into_iter().collect()
    }

    /// The slot of `key`; `key_of` reads the key stored at a slot.
    pub(crate) fn get(&self, key: u64, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        let hash = self.hash(key);
        let table = self.shard(hash).read();
        table.find(hash, |&slot| key_of(slot) == key).copied()
    }

    /// Maps `key` to `slot`; returns `false` (and changes nothing) if `key`
    /// is already present.
    pub(crate) fn insert(&self, key: u64, slot: u32, key_of: impl Fn(u32) -> u64) -> bool {
        let hash = self.hash(key);
        let mut table = self.shard(hash).write();
        if table.find(hash, |&s| key_of(s) == key).is_some() {
            return false;
        }
        table.insert_unique(hash, slot, |&s| self.hash(key_of(s)));
        true
    }

    /// Removes `key`, returning its slot.
    pub(crate) fn remove(&self, key: u64, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        let hash = self.hash(key);
        let mut table = self.shard(hash).write();
        match table.find_entry(hash, |&s| key_of(s) == key) {
            Ok(entry) => Some(entry.remove().0),
            Err(_) => None,
        }
    }

    /// Mapped keys, summed over the shards (each read under its lock).
    #[cfg_attr(loom, allow(dead_code))]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|shard| shard.0.read().len()).sum()
    }

    /// Calls `f` on every mapped slot, shard by shard (each shard's lock
    /// held while its slots are visited).
    pub(crate) fn for_each_slot(&self, mut f: impl FnMut(u32)) {
        for shard in self.shards.iter() {
            shard.0.read().iter().for_each(|&slot| f(slot));
        }
    }

    /// Every mapped slot.
    #[cfg(test)]
    pub(crate) fn slots(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            out.extend(shard.0.read().iter().copied());
        }
        out
    }

    /// Bytes of the shards' buckets and control bytes.
    pub(crate) fn allocated_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let capacity = shard.0.read().capacity();
                if capacity == 0 {
                    return 0;
                }
                // hashbrown's bucket count is the power of two whose 7/8 is
                // at least the capacity; each bucket is a 4-byte slot plus
                // one control byte (plus 16 trailing control bytes for the
                // SIMD probe).
                let buckets = (capacity * 8).div_ceil(7).next_power_of_two();
                buckets * 5 + 16
            })
            .sum()
    }

    /// Test hook: map a key to a slot without any check.
    #[cfg(test)]
    pub(crate) fn force_insert(&self, key: u64, slot: u32, key_of: impl Fn(u32) -> u64) {
        let hash = self.hash(key);
        let mut table = self.shard(hash).write();
        table.insert_unique(hash, slot, |&s| self.hash(key_of(s)));
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// Keys live at `slot * 3 + 1`; a fill large enough to run on several
    /// workers keeps every key findable, keeps the first slot of a repeated
    /// key, and a rejecting fill names the repeated key.
    #[test]
    fn parallel_fill_matches_one_by_one_inserts() {
        let n = PARALLEL_FILL_FROM as u32 + 1000;
        let key_of = |slot: u32| u64::from(slot) * 3 + 1;
        // Every third slot is not live.
        let live = |slot: u32| (slot % 3 != 2).then(|| key_of(slot));
        let map = KeyMap::deferred();
        map.fill(|| n, live, key_of);
        assert!(!map.is_pending());
        for s in (0..n).step_by(997) {
            let expected = (s % 3 != 2).then_some(s);
            assert_eq!(map.get(key_of(s), key_of), expected);
        }
        assert_eq!(map.slots().len(), (0..n).filter(|s| s % 3 != 2).count());

        // Slot n repeats (live) slot 4's key: KeepFirst keeps 4, Reject
        // names it.
        let key_of_dup = |slot: u32| if slot == n { key_of(4) } else { key_of(slot) };
        let live_dup = |slot: u32| (slot % 3 != 2 || slot == n).then(|| key_of_dup(slot));
        let map = KeyMap::deferred();
        map.fill(|| n + 1, live_dup, key_of_dup);
        assert_eq!(map.get(key_of(4), key_of_dup), Some(4));
        let map = KeyMap::default();
        assert_eq!(map.fill_unique(n + 1, live_dup, key_of_dup), Err(key_of(4)));
    }
}
