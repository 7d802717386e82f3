//! In-place update and removal.
//!
//! ```text
//!  update(key, v')
//!   ├─ write v' into a private cell
//!   ├─ swap the slot's cell word (entry lock)   ◄─ atomic to every reader:
//!   │                                              old vector or new, never torn
//!   ├─ retire the old cell (recycled after the epoch grace period)
//!   ├─ repair: each old neighbour n re-selects its list from
//!   │          (n's list ∪ the node's old list) by the heuristic
//!   └─ connect: search from the entry point (layer 1 with a full beam
//!               too, for long links), write the node's lists, add
//!               reverse links (as an insert does)
//! ```
//!
//! This is hnswlib's `updatePoint` (repair the one-hop neighbourhood from
//! two-hop candidates) plus `repairConnectionsForUpdate` (relink the node
//! itself), with one addition: the node also gets *reverse* links at its new
//! position. hnswlib relinks only the node's forward lists, so a vector that
//! moves far is reachable only through stale in-links near its old position;
//! the reverse links make it findable where it now is, which is what keeps
//! recall from decaying under repeated updates. And a second one: the
//! node's layer-0 candidates include a layer-1 search's, so a node that
//! moved into a dense region still gets long links (see `plan_links`);
//! without them, updates that move entries between clusters eroded the
//! links between clusters.
//!
//! Removal marks the slot as a tombstone: the entry leaves results at once,
//! its vector and lists keep bridging the graph, and the slot is reused by the
//! next insert, which relinks it like an update.

use crossbeam_epoch::Guard;

use crate::error::{Error, Result};
use crate::graph::{NO_CELL, TOMBSTONE};

/// What [`Index::upsert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Upserted {
    /// The key was absent: a new entry.
    Inserted,
    /// The key was present: its vector (and payload, if given) replaced
    /// in place.
    Updated,
}
use crate::index::Index;
use crate::insert::Pruned;
use crate::sync::Ordering;

impl Index {
    /// Replaces `key`'s vector in place and relinks its neighbourhood.
    ///
    /// Readers see the old vector or the new one, never a mix; the entry is
    /// never missing from the index during the update.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(1, Metric::L2))?;
    /// for key in 0..50u64 {
    ///     index.insert(key, &[key as f32])?;
    /// }
    /// index.update(7, &[100.0])?;
    /// assert_eq!(index.search(&[99.0], 1, 16)?[0].key, 7);
    /// assert!(index.update(1000, &[0.0]).is_err());
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn update(&self, key: u64, vector: &[f32]) -> Result<()> {
        self.update_inner(key, vector, None)
    }

    /// Replaces `key`'s vector and payload together, in place: a search
    /// sees either the old pair or the new pair, never a mix (the payload
    /// lives in the same immutable cell version as the vector).
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(1, Metric::L2).payload_len(2))?;
    /// index.insert_with_payload(7, &[1.0], &[1, 1])?;
    /// index.update_with_payload(7, &[2.0], &[2, 2])?;
    /// assert_eq!(index.get_with_payload(7)?, (vec![2.0], vec![2, 2]));
    /// index.update(7, &[3.0])?; // keeps the payload
    /// assert_eq!(index.get_payload(7)?, vec![2, 2]);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn update_with_payload(&self, key: u64, vector: &[f32], payload: &[u8]) -> Result<()> {
        self.check_payload(payload)?;
        self.update_inner(key, vector, Some(payload))
    }

    /// Inserts `key` if it is absent, or updates it in place if it is
    /// present, as one operation: no other writer of `key` comes between
    /// the check and the write (a caller's `update`, then `insert` on
    /// [`Error::KeyNotFound`], can lose to a concurrent insert of the same
    /// key and fail with [`Error::DuplicateKey`]). An update keeps the
    /// entry's payload; an insert stores zeros, as
    /// [`insert`](Self::insert) does.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric, Upserted};
    /// let index = Index::new(IndexParams::new(2, Metric::L2))?;
    /// assert_eq!(index.upsert(7, &[0.0, 1.0])?, Upserted::Inserted);
    /// assert_eq!(index.upsert(7, &[2.0, 3.0])?, Upserted::Updated);
    /// assert_eq!(index.get(7)?, vec![2.0, 3.0]);
    /// assert_eq!(index.len(), 1);
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn upsert(&self, key: u64, vector: &[f32]) -> Result<Upserted> {
        self.upsert_inner(key, vector, None)
    }

    /// [`upsert`](Self::upsert) with a payload, which replaces the entry's
    /// (update) or comes with it (insert).
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric, Upserted};
    /// let index = Index::new(IndexParams::new(1, Metric::L2).payload_len(2))?;
    /// index.upsert_with_payload(1, &[1.0], &[1, 1])?;
    /// assert_eq!(index.upsert_with_payload(1, &[2.0], &[2, 2])?, Upserted::Updated);
    /// assert_eq!(index.get_with_payload(1)?, (vec![2.0], vec![2, 2]));
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn upsert_with_payload(
        &self,
        key: u64,
        vector: &[f32],
        payload: &[u8],
    ) -> Result<Upserted> {
        self.check_payload(payload)?;
        self.upsert_inner(key, vector, Some(payload))
    }

    fn upsert_inner(&self, key: u64, vector: &[f32], payload: Option<&[u8]>) -> Result<Upserted> {
        let vector = self.prepare(vector)?;
        // The key is looked up under its op lock, so no writer of it comes
        // between the lookup and the write. The seeded mutant
        // `upsert_checks_unlocked` (loom builds) looks it up before taking
        // the lock; model L8 must catch it (two upserts both inserting).
        let early = crate::sync::mutant("upsert_checks_unlocked").then(|| self.slot_of(key));
        let _op = self.op_lock(key).lock();
        let _gate = self.writer_gate.read();
        match early.unwrap_or_else(|| self.slot_of(key)) {
            Some(slot) => {
                self.update_locked(key, slot, &vector, payload)?;
                Ok(Upserted::Updated)
            }
            None => {
                self.insert_locked(key, &vector, payload.unwrap_or(&[]))?;
                Ok(Upserted::Inserted)
            }
        }
    }

    /// `update`; `payload` `None` keeps the entry's current one.
    fn update_inner(&self, key: u64, vector: &[f32], payload: Option<&[u8]>) -> Result<()> {
        let vector = self.prepare(vector)?;
        let _op = self.op_lock(key).lock();
        let _gate = self.writer_gate.read();
        let slot = self.slot_of(key).ok_or(Error::KeyNotFound(key))?;
        self.update_locked(key, slot, &vector, payload)
    }

    /// Updates `key`, which lives in `slot`, with its prepared `vector`;
    /// `payload` `None` keeps the current one. The caller holds `key`'s op
    /// lock and the writer gate (shared), under which it found `slot`.
    fn update_locked(
        &self,
        key: u64,
        slot: u32,
        vector: &[f32],
        payload: Option<&[u8]>,
    ) -> Result<()> {
        // The current payload, when it is kept: the op lock held above
        // serialises writers of this key, so it cannot change before the
        // new cell is published.
        let mut kept = Vec::new();
        let payload = match payload {
            Some(p) => p,
            None => {
                if self.params.payload_len > 0 {
                    let guard = self.pin();
                    if let Some(v) = self.graph.vector(slot, &guard) {
                        self.graph.vectors.payload_into(v.cell, &guard, &mut kept);
                    }
                }
                &kept
            }
        };
        // The key is written with the vector, before the cell is published.
        // The seeded mutant `update_key_after_publish` (loom builds) writes
        // it after, which model L3 must catch: a search could then pair the
        // new vector with a stale key.
        let late_key = crate::sync::mutant("update_key_after_publish");
        let cell = self.graph.vectors.allocate_with_payload(
            if late_key { u64::MAX } else { key },
            vector,
            payload,
        )?;
        let guard = self.pin();
        let old = match self.graph.lock_node(slot) {
            Some(node) => {
                let old = self.graph.publish_cell(&node, cell);
                if late_key {
                    self.graph.vectors.set_key(cell, key);
                }
                old
            }
            None => NO_CELL,
        };
        if old != NO_CELL {
            self.graph.vectors.retire(old & !TOMBSTONE, &guard);
        }
        self.relink(slot, &guard);
        Ok(())
    }

    /// Removes `key`: it is absent from every search that starts after this
    /// returns, and its slot is reused by a later insert.
    ///
    /// ```
    /// use nann::{Error, Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(1, Metric::L2))?;
    /// index.insert(1, &[1.0])?;
    /// index.insert(2, &[2.0])?;
    /// index.remove(1)?;
    /// assert_eq!(index.search(&[1.0], 5, 16)?.len(), 1);
    /// assert_eq!(index.remove(1), Err(Error::KeyNotFound(1)));
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn remove(&self, key: u64) -> Result<()> {
        // The key's op lock orders this remove against an update of the
        // same key. The seeded mutant `remove_skips_op_lock` (loom builds,
        // `scripts/loom-mutants.sh`) drops it; model L6 must catch that.
        let _op = (!crate::sync::mutant("remove_skips_op_lock")).then(|| self.op_lock(key).lock());
        let _gate = self.writer_gate.read();
        let slot = self
            .key_map()
            .remove(key, |s| self.key_at(s))
            .ok_or(Error::KeyNotFound(key))?;
        if let Some(node) = self.graph.lock_node(slot) {
            self.graph.set_tombstone(&node);
        }
        self.live.fetch_sub(1, Ordering::Relaxed);
        self.free_slots.lock().push(slot);
        Ok(())
    }

    /// Repairs the old neighbourhood of `slot` after its vector changed, then
    /// links it at its new position.
    pub(crate) fn relink(&self, slot: u32, guard: &Guard) {
        let level = self.graph.level(slot);
        self.repair_neighbourhood(slot, level, guard);
        self.connect(slot, level, true, guard);
    }

    /// Each old neighbour re-selects its list from its own list plus the
    /// moved node's old neighbours (its two-hop candidates), by the heuristic.
    /// The moved node stays a candidate, at its new position: after a small
    /// move it is usually kept.
    fn repair_neighbourhood(&self, slot: u32, level: usize, guard: &Guard) {
        let mut old_neighbours = Vec::new();
        let mut list = Vec::new();
        let mut adopted = Vec::new();
        for layer in 0..=level {
            self.graph.read_links(slot, layer, &mut old_neighbours);
            for &n in &old_neighbours {
                adopted.clear();
                {
                    let Some(node) = self.graph.lock_node(n) else {
                        continue;
                    };
                    self.graph.read_links_locked(&node, layer, &mut list);
                    if !list.contains(&slot) {
                        continue;
                    }
                    list.extend(old_neighbours.iter().copied().filter(|&o| o != n));
                    list.sort_unstable();
                    list.dedup();
                    let selected = self.reselect(
                        n,
                        &list,
                        self.graph.max_degree(layer),
                        layer,
                        Pruned::Refill,
                        guard,
                    );
                    self.graph.write_links(&node, layer, &selected);
                    if layer == 0 {
                        // Children the moved node anchored, now also linked
                        // from `n`: let `n` anchor them, so the moved node is
                        // free to drop them from its list.
                        adopted.extend(
                            selected
                                .iter()
                                .copied()
                                .filter(|&c| self.graph.anchor(c) == slot),
                        );
                    }
                }
                for &child in &adopted {
                    self.try_anchor_at(child, n);
                }
            }
        }
    }
}
