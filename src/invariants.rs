//! `check_invariants`: the structural checks every test (and a cautious
//! service) can run, in release builds too. It is not a `debug_assert!`:
//! hnswlib's `checkIntegrity` vanishes under `NDEBUG`.
//!
//! | id | invariant |
//! |----|-----------|
//! | I1 | every neighbour id is an allocated slot |
//! | I2 | no node links to itself |
//! | I3 | no list holds an id twice |
//! | I4 | degree <= M on layers >= 1, <= M0 = 2M on layer 0 |
//! | I5 | a node appears in layer-l lists only if its level >= l |
//! | I6 | the entry point exists when any node does, and sits at the max level |
//! | I7 | the key map is a bijection onto the live slots (each key's slot holds that key) |
//! | I8 | removed slots are not in the key map (part of I7's check) |
//! | I9 | every live node is reachable from the entry point on layer 0 |
//! | I11 | every stored vector is finite |
//! | I12 | the entry point is the anchor tree's root; every other node's anchor links it on layer 0 |
//!
//! (I10, "in-degree >= 1", is implied by I9 for every node but the entry.)

use crate::error::InvariantViolation;
use crate::graph::{NO_CELL, ROOT, TOMBSTONE, UNANCHORED};
use crate::index::Index;
use crate::sync::Ordering;

impl Index {
    /// Checks the graph's structural invariants (see the table in the module
    /// docs), returning the first violation found.
    ///
    /// It waits for in-flight writes to finish and blocks new ones while it
    /// runs (searches continue), so it sees a quiescent graph even when
    /// called under concurrent writes. Cost: O(n * M) plus a BFS.
    ///
    /// ```
    /// use nann::{Index, IndexParams, Metric};
    /// let index = Index::new(IndexParams::new(3, Metric::L2))?;
    /// for key in 0..500u64 {
    ///     index.insert(key, &[key as f32, (key % 11) as f32, (key % 5) as f32])?;
    /// }
    /// for key in (0..500u64).step_by(3) {
    ///     index.remove(key)?;
    /// }
    /// index.check_invariants().expect("a fresh index is consistent");
    /// # Ok::<(), nann::Error>(())
    /// ```
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let _quiescent = self.writer_gate.write();
        let slots = self.next_slot.load(Ordering::Acquire) as u32;
        let guard = self.pin();

        // I1-I5 and I11, node by node.
        let mut max_level: Option<usize> = None;
        let mut live_slots = Vec::new();
        for slot in 0..slots {
            let word = self.graph.cell_word(slot);
            if word == NO_CELL {
                continue; // never published (e.g. an allocation that failed)
            }
            let level = self.graph.level(slot);
            max_level = Some(max_level.map_or(level, |m: usize| m.max(level)));
            if word & TOMBSTONE == 0 {
                live_slots.push(slot);
            }
            if let Some(v) = self.graph.vector(slot, &guard) {
                if v.vector.iter().any(|x| !x.is_finite()) {
                    return Err(InvariantViolation::NonFiniteVector { slot });
                }
            }
            for layer in 0..=level {
                let Some((degree, ids)) = self.graph.raw_list(slot, layer) else {
                    continue;
                };
                let max = self.graph.max_degree(layer);
                if degree > max {
                    return Err(InvariantViolation::DegreeTooHigh {
                        slot,
                        layer,
                        degree,
                        max,
                    });
                }
                let mut seen = ids.clone();
                seen.sort_unstable();
                if let Some(pair) = seen.windows(2).find(|w| w[0] == w[1]) {
                    return Err(InvariantViolation::DuplicateNeighbour {
                        slot,
                        layer,
                        neighbour: pair[0],
                    });
                }
                for &n in &ids {
                    if n >= slots || self.graph.cell_word(n) == NO_CELL {
                        return Err(InvariantViolation::NeighbourOutOfRange {
                            slot,
                            layer,
                            neighbour: n,
                            slots,
                        });
                    }
                    if n == slot {
                        return Err(InvariantViolation::SelfLoop { slot, layer });
                    }
                    let n_level = self.graph.level(n);
                    if n_level < layer {
                        return Err(InvariantViolation::AboveLevel {
                            slot: n,
                            level: n_level,
                            from: slot,
                            layer,
                        });
                    }
                }
            }
        }

        // I6.
        let entry = self.graph.entry();
        match (entry, max_level) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(InvariantViolation::EntryPoint {
                    reason: "nodes exist but there is no entry point".into(),
                })
            }
            (Some((slot, level)), max) => {
                if slot >= slots || self.graph.cell_word(slot) == NO_CELL {
                    return Err(InvariantViolation::EntryPoint {
                        reason: format!("entry slot {slot} is not an allocated node"),
                    });
                }
                let actual = self.graph.level(slot);
                if actual != level || Some(level) != max {
                    return Err(InvariantViolation::EntryPoint {
                        reason: format!(
                            "entry slot {slot} recorded at level {level}, node level {actual}, max level {max:?}"
                        ),
                    });
                }
            }
        }

        // I7 / I8.
        let mut mapped = self.keys.slots();
        mapped.sort_unstable();
        if let Some(pair) = mapped.windows(2).find(|w| w[0] == w[1]) {
            return Err(InvariantViolation::KeyMap {
                reason: format!("slot {} is mapped by two keys", pair[0]),
            });
        }
        if mapped != live_slots {
            let stray = mapped.iter().find(|s| live_slots.binary_search(s).is_err());
            let missing = live_slots.iter().find(|s| mapped.binary_search(s).is_err());
            return Err(InvariantViolation::KeyMap {
                reason: format!(
                    "{} mapped slots vs {} live slots (mapped but not live: {stray:?}; live but unmapped: {missing:?})",
                    mapped.len(),
                    live_slots.len()
                ),
            });
        }
        for &slot in &mapped {
            let key = self.key_at(slot);
            if self.slot_of(key) != Some(slot) {
                return Err(InvariantViolation::KeyMap {
                    reason: format!("key {key} stored at slot {slot} does not look up to it"),
                });
            }
        }
        if self.len() != live_slots.len() {
            return Err(InvariantViolation::KeyMap {
                reason: format!(
                    "len() is {} but {} slots are live",
                    self.len(),
                    live_slots.len()
                ),
            });
        }

        // I9: BFS over layer 0 from the entry point, through tombstones.
        let mut list = Vec::new();
        if let Some((entry_slot, _)) = entry {
            let mut reached = vec![false; slots as usize];
            let mut queue = std::collections::VecDeque::from([entry_slot]);
            reached[entry_slot as usize] = true;
            while let Some(s) = queue.pop_front() {
                self.graph.read_links(s, 0, &mut list);
                for &n in &list {
                    if let Some(flag) = reached.get_mut(n as usize) {
                        if !*flag {
                            *flag = true;
                            queue.push_back(n);
                        }
                    }
                }
            }
            let unreachable: Vec<u32> = live_slots
                .iter()
                .copied()
                .filter(|&s| !reached[s as usize])
                .collect();
            if let Some(&example) = unreachable.first() {
                return Err(InvariantViolation::Unreachable {
                    unreachable: unreachable.len(),
                    example,
                });
            }
        }
        // I12: the anchor tree.
        for slot in 0..slots {
            if self.graph.cell_word(slot) == NO_CELL {
                continue;
            }
            let anchor = self.graph.anchor(slot);
            let is_entry = entry.is_some_and(|(e, _)| e == slot);
            let reason = match anchor {
                ROOT if is_entry => None,
                ROOT => Some("a root that is not the entry point".to_string()),
                UNANCHORED => Some("no anchor".to_string()),
                _ if is_entry => Some(format!("the entry point has anchor {anchor}")),
                parent => {
                    self.graph.read_links(parent, 0, &mut list);
                    (!list.contains(&slot))
                        .then(|| format!("anchor {parent} does not link it on layer 0"))
                }
            };
            if let Some(reason) = reason {
                return Err(InvariantViolation::Anchor { slot, reason });
            }
        }

        Ok(())
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use crate::{Index, IndexParams, InvariantViolation, Metric};

    fn small_index() -> Index {
        let index = Index::new(IndexParams::new(4, Metric::L2).m(4).seed(3)).unwrap();
        for key in 0..300u64 {
            let x = key as f32;
            index
                .insert(key, &[x.sin(), x.cos(), (x * 0.37).sin(), (x * 0.11).cos()])
                .unwrap();
        }
        index.check_invariants().expect("valid before corruption");
        index
    }

    fn node_at_level(index: &Index, level: usize) -> u32 {
        (0..300)
            .find(|&s| index.graph.level(s) == level)
            .expect("a node at that level")
    }

    #[test]
    fn i1_out_of_range_neighbour_is_caught() {
        let index = small_index();
        index.graph.corrupt_links(5, 0, &[100_000]);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::NeighbourOutOfRange { .. })
        ));
    }

    #[test]
    fn i2_self_loop_is_caught() {
        let index = small_index();
        index.graph.corrupt_links(5, 0, &[5]);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::SelfLoop { .. })
        ));
    }

    #[test]
    fn i3_duplicate_neighbour_is_caught() {
        let index = small_index();
        index.graph.corrupt_links(5, 0, &[6, 6]);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::DuplicateNeighbour { .. })
        ));
    }

    #[test]
    fn i4_degree_above_m0_is_caught() {
        let index = small_index();
        index.graph.corrupt_degree(5, 0, 9); // M0 = 8
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::DegreeTooHigh { .. })
        ));
    }

    #[test]
    fn i5_node_linked_above_its_level_is_caught() {
        let index = small_index();
        let upper = node_at_level(&index, 1);
        let ground = node_at_level(&index, 0);
        index.graph.corrupt_links(upper, 1, &[ground]);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::AboveLevel { .. })
        ));
    }

    #[test]
    fn i6_entry_point_off_the_max_level_is_caught() {
        let index = small_index();
        let ground = node_at_level(&index, 0);
        index.graph.corrupt_entry(ground, 0);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::EntryPoint { .. })
        ));
    }

    #[test]
    fn i7_key_map_with_a_stray_key_is_caught() {
        let index = small_index();
        index.keys.force_insert(999_999, 7, |s| index.key_at(s));
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::KeyMap { .. })
        ));
    }

    #[test]
    fn i8_removed_slot_left_in_the_key_map_is_caught() {
        let index = small_index();
        let slot = index.slot_of(9).unwrap();
        let node = index.graph.lock_node(slot).unwrap();
        index.graph.set_tombstone(&node); // tombstone without unmapping the key
        drop(node);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::KeyMap { .. })
        ));
    }

    #[test]
    fn i9_unreachable_node_is_caught() {
        let index = small_index();
        let victim = index.slot_of(42).unwrap();
        let (entry, _) = index.graph.entry().unwrap();
        assert_ne!(entry, victim);
        // Cut every layer-0 edge into the victim.
        for slot in 0..300u32 {
            let (_, ids) = index.graph.raw_list(slot, 0).unwrap();
            if ids.contains(&victim) {
                let kept: Vec<u32> = ids.into_iter().filter(|&n| n != victim).collect();
                index.graph.corrupt_links(slot, 0, &kept);
            }
        }
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::Unreachable { .. })
        ));
    }

    #[test]
    fn i12_anchor_that_does_not_link_its_child_is_caught() {
        let index = small_index();
        let child = index.slot_of(17).unwrap();
        let (entry, _) = index.graph.entry().unwrap();
        let stranger = (0..300u32)
            .find(|&s| {
                s != child && s != entry && !index.graph.raw_list(s, 0).unwrap().1.contains(&child)
            })
            .unwrap();
        index.graph.set_anchor(child, stranger);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::Anchor { .. })
        ));
    }

    #[test]
    fn i11_non_finite_vector_is_caught() {
        let index = small_index();
        let slot = index.slot_of(11).unwrap();
        let cell = index
            .graph
            .vectors
            .allocate(11, &[f32::NAN, 0.0, 0.0, 0.0])
            .unwrap();
        let node = index.graph.lock_node(slot).unwrap();
        index.graph.publish_cell(&node, cell);
        drop(node);
        assert!(matches!(
            index.check_invariants(),
            Err(InvariantViolation::NonFiniteVector { .. })
        ));
    }
}
