#![cfg(not(loom))]
//! Saving and opening: round trips, and damaged or forged files that must
//! give a typed error (never a panic, never an index that fails its
//! invariants).

use nann::{Error, FormatError, Index, IndexParams, InvariantViolation, Metric};

fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn random_vector(next: &mut impl FnMut() -> u64, dim: usize) -> Vec<f32> {
    (0..dim)
        .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect()
}

/// An index with several layers, removals (tombstones) and in-place updates.
fn churned_index(n: u64, dim: usize, m: usize, metric: Metric) -> Index {
    let mut next = rng(n ^ dim as u64);
    let index = Index::new(IndexParams::new(dim, metric).m(m).ef_construction(64)).unwrap();
    for key in 0..n {
        index.insert(key, &random_vector(&mut next, dim)).unwrap();
    }
    for key in (0..n).step_by(7) {
        index.remove(key).unwrap();
    }
    for key in (1..n).step_by(5) {
        if index.contains(key) {
            index.update(key, &random_vector(&mut next, dim)).unwrap();
        }
    }
    // Reuse some removed slots.
    for key in n..n + n / 20 {
        index.insert(key, &random_vector(&mut next, dim)).unwrap();
    }
    index
}

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("nann-persist-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn saved_bytes(index: &Index, name: &str) -> Vec<u8> {
    let path = temp_path(name);
    index.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    bytes
}

#[test]
fn round_trip_keeps_every_answer_and_stays_writable() {
    for metric in [Metric::L2, Metric::InnerProduct, Metric::Cosine] {
        let index = churned_index(3000, 12, 8, metric);
        let path = temp_path(&format!("round-trip-{metric:?}.nann"));
        index.save(&path).unwrap();
        let reopened = Index::open(&path).unwrap();
        let copied = Index::open_untrusted(&path).unwrap();
        assert_eq!(reopened.len(), index.len());
        assert_eq!(reopened.stats().removed, index.stats().removed);
        reopened.check_invariants().unwrap();

        let mut next = rng(99);
        for _ in 0..100 {
            let q = random_vector(&mut next, 12);
            let want = index.search(&q, 10, 48).unwrap();
            assert_eq!(reopened.search(&q, 10, 48).unwrap(), want);
            assert_eq!(copied.search(&q, 10, 48).unwrap(), want);
        }
        for key in [0u64, 1, 7, 11, 2999, 3100] {
            assert_eq!(reopened.contains(key), index.contains(key), "key {key}");
            if index.contains(key) {
                assert_eq!(reopened.get(key).unwrap(), index.get(key).unwrap());
            }
        }

        // The reopened index is live: writes work and keep it consistent.
        reopened
            .insert(1_000_000, &random_vector(&mut next, 12))
            .unwrap();
        reopened.update(1, &random_vector(&mut next, 12)).unwrap();
        reopened.remove(2).unwrap();
        reopened.check_invariants().unwrap();
        reopened.save(&path).unwrap();
        let again = Index::open(&path).unwrap();
        assert!(again.contains(1_000_000) && !again.contains(2));
        assert_eq!(again.len(), reopened.len());
        std::fs::remove_file(&path).unwrap();
    }
}

/// Applies the same heavy writes to `index` (inserts past the saved slot
/// count, so new chunks grow beside the borrowed ones; updates, which recycle
/// cells of the borrowed vector chunk; removes) and returns the live keys.
fn heavy_writes(index: &Index, n: u64, dim: usize) {
    let mut next = rng(4242);
    for key in 10_000..10_000 + 2 * n {
        index.insert(key, &random_vector(&mut next, dim)).unwrap();
    }
    for round in 0..3 {
        for key in (round..n).step_by(3) {
            if index.contains(key) {
                index.update(key, &random_vector(&mut next, dim)).unwrap();
            }
        }
    }
    for key in (0..n).step_by(4) {
        if index.contains(key) {
            index.remove(key).unwrap();
        }
    }
    for key in (10_000..10_000 + 2 * n).step_by(5) {
        index.remove(key).unwrap();
    }
}

#[test]
fn every_open_mode_serves_from_the_file_and_takes_heavy_writes() {
    let (n, dim) = (1500u64, 10usize);
    let original = churned_index(n, dim, 6, Metric::L2);
    let path = temp_path("heavy-writes.nann");
    original.save(&path).unwrap();
    let file_before = std::fs::read(&path).unwrap();

    let mapped = Index::open(&path).unwrap();
    // SAFETY: the file was just written by `save` and nothing modifies it.
    let unchecked = unsafe { Index::open_unchecked(&path) }.unwrap();
    let copied = Index::open_untrusted(&path).unwrap();
    for index in [&original, &mapped, &unchecked, &copied] {
        heavy_writes(index, n, dim);
        index.check_invariants().unwrap();
    }
    // ef >= len makes every search exact, so all four must agree exactly.
    let exact = original.len() + 1;
    let mut next = rng(7);
    for _ in 0..50 {
        let q = random_vector(&mut next, dim);
        let want = original.search(&q, 10, exact).unwrap();
        for index in [&mapped, &unchecked, &copied] {
            assert_eq!(index.search(&q, 10, exact).unwrap(), want);
        }
    }
    for index in [&mapped, &unchecked, &copied] {
        assert_eq!(index.len(), original.len());
        for key in [1u64, 2, 4, 10_000, 10_001, 10_005, 10_000 + 2 * n - 1] {
            assert_eq!(index.get(key).ok(), original.get(key).ok(), "key {key}");
        }
    }
    // Writes went to private pages: the file is byte for byte what was saved,
    // and its checksums still hold.
    assert_eq!(std::fs::read(&path).unwrap(), file_before);
    mapped.verify_checksums().unwrap();
    unchecked.verify_checksums().unwrap();
    drop((mapped, unchecked));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn verify_checksums_finds_a_flipped_vector_bit_that_open_accepts() {
    let index = churned_index(400, 8, 4, Metric::L2);
    let path = temp_path("flipped-vector.nann");
    index.save(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    // A low mantissa bit of a vector component: structurally valid, so only
    // the checksum can tell.
    let vectors = section_range(&bytes, 4);
    bytes[vectors.start + 64] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let opened = Index::open(&path).expect("a vector bit flip is structurally valid");
    assert!(matches!(
        opened.verify_checksums(),
        Err(Error::Format(nann::FormatError::SectionChecksum {
            section: "vectors"
        }))
    ));
    assert!(matches!(
        Index::open_untrusted(&path),
        Err(Error::Format(nann::FormatError::SectionChecksum { .. }))
    ));
    drop(opened);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn empty_and_single_entry_indexes_round_trip() {
    let empty = Index::new(IndexParams::new(3, Metric::L2)).unwrap();
    let reopened = Index::from_bytes(&saved_bytes(&empty, "empty.nann")).unwrap();
    assert!(reopened.is_empty());
    assert!(reopened.search(&[0.0; 3], 5, 10).unwrap().is_empty());
    reopened.insert(4, &[1.0, 2.0, 3.0]).unwrap();
    assert_eq!(reopened.search(&[1.0, 2.0, 3.0], 1, 10).unwrap()[0].key, 4);

    let one = Index::new(IndexParams::new(3, Metric::L2)).unwrap();
    one.insert(42, &[1.0, 0.0, 0.0]).unwrap();
    let reopened = Index::from_bytes(&saved_bytes(&one, "one.nann")).unwrap();
    assert_eq!(reopened.search(&[0.0; 3], 1, 10).unwrap()[0].key, 42);
}

#[test]
fn a_failed_save_leaves_the_previous_file_intact() {
    let index = churned_index(200, 4, 4, Metric::L2);
    let missing_dir = temp_path("no-such-dir").join("index.nann");
    assert!(matches!(index.save(&missing_dir), Err(Error::Io { .. })));
    let path = temp_path("intact.nann");
    index.save(&path).unwrap();
    let before = std::fs::read(&path).unwrap();
    // Saving onto a path whose directory is a file fails; the old file stays.
    let bad = path.join("child");
    assert!(index.save(&bad).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), before);
    std::fs::remove_file(&path).unwrap();
}

/// Opening must give `Err(Format)` or an index that passes its invariants;
/// a panic fails the test.
fn open_is_safe(bytes: &[u8]) -> bool {
    match Index::from_bytes(bytes) {
        Ok(index) => {
            index.check_invariants().expect("an opened index is valid");
            true
        }
        Err(Error::Format(_)) => false,
        Err(other) => panic!("unexpected error kind: {other}"),
    }
}

#[test]
fn truncation_at_every_offset_is_rejected() {
    let bytes = saved_bytes(&churned_index(120, 4, 4, Metric::L2), "trunc.nann");
    assert!(bytes.len() < 64 * 1024, "file is {} bytes", bytes.len());
    for len in 0..bytes.len() {
        assert!(
            !open_is_safe(&bytes[..len]),
            "truncated to {len} bytes but accepted"
        );
    }
    // Trailing garbage is rejected too (the header records the length).
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 64]);
    assert!(!open_is_safe(&longer));
    assert!(open_is_safe(&bytes));
}

#[test]
fn random_bit_flips_and_overwrites_are_rejected() {
    let original = churned_index(300, 6, 4, Metric::Cosine);
    let bytes = saved_bytes(&original, "flips.nann");
    let mut next = rng(7);
    let probes: Vec<Vec<f32>> = (0..4).map(|_| random_vector(&mut next, 6)).collect();
    let flips: usize = std::env::var("NANN_FLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    for _ in 0..flips {
        let mut damaged = bytes.clone();
        let bit = (next() % (damaged.len() as u64 * 8)) as usize;
        damaged[bit / 8] ^= 1 << (bit % 8);
        // CRC32C catches every single-bit error in a checksummed region;
        // padding between sections is the only unprotected space.
        // So an accepted file must be the original, answer for answer.
        if open_is_safe(&damaged) {
            let opened = Index::from_bytes(&damaged).unwrap();
            assert_eq!(opened.len(), original.len());
            for q in &probes {
                assert_eq!(
                    opened.search(q, 5, 300).unwrap(),
                    original.search(q, 5, 300).unwrap(),
                    "bit {bit} flipped, file accepted with different contents"
                );
            }
        }
    }
    for _ in 0..flips / 3 {
        let mut damaged = bytes.clone();
        let at = (next() % damaged.len() as u64) as usize;
        let n = (1 + next() % 8) as usize;
        for b in damaged.iter_mut().skip(at).take(n) {
            *b = next() as u8;
        }
        open_is_safe(&damaged);
    }
}

// ---- forged files: checksums recomputed, so only validation stands guard ----

#[path = "support/forge.rs"]
mod forge;
use forge::{reseal, ENTRY_LEN, FIXED_LEN};

fn section_range(bytes: &[u8], index: usize) -> std::ops::Range<usize> {
    forge::section_range(bytes, index).expect("an intact section table")
}

fn forged(bytes: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Result<Index, Error> {
    let mut b = bytes.to_vec();
    edit(&mut b);
    reseal(&mut b);
    Index::from_bytes(&b)
}

fn u32_at(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

fn u64_at(bytes: &mut [u8], at: usize, value: u64) {
    bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[test]
fn forged_files_with_valid_checksums_are_rejected() {
    let index = churned_index(150, 4, 4, Metric::L2);
    let bytes = saved_bytes(&index, "forged.nann");
    // The resealing helper itself is faithful: an unedited file opens.
    if let Err(e) = forged(&bytes, |_| {}) {
        panic!("resealed original rejected: {e}");
    }
    let m0 = 8usize;
    let stride = 2 + m0;
    let level0 = section_range(&bytes, 0).start;
    let cells = section_range(&bytes, 1).start;
    let keys = section_range(&bytes, 5).start;

    let is_format = |r: Result<Index, Error>| {
        if std::env::var("NANN_SHOW").is_ok() {
            eprintln!("{:?}", r.as_ref().err());
        }
        matches!(r, Err(Error::Format(_)))
    };
    // Header fields (fixed offsets, see src/persist/format.rs).
    for (what, at, value) in [
        ("version", 8usize, 2u64),
        ("metric", 15, 9),
        ("dim = 0", 16, 0),
        ("M = 1", 20, 1),
        ("M = 300", 20, 300),
    ] {
        let r = forged(&bytes, |b| {
            if at == 15 {
                b[at] = value as u8
            } else {
                u32_at(b, at, value as u32)
            }
        });
        assert!(is_format(r), "{what}");
    }
    // slots, live, upper count, file length: 0, 1, huge, overflowing.
    for field in [48usize, 56, 64, 72] {
        for value in [0u64, 1, u32::MAX as u64, u64::MAX, u64::MAX / 4 + 1] {
            assert!(
                is_format(forged(&bytes, |b| u64_at(b, field, value))),
                "field at {field} = {value}"
            );
        }
    }
    // Entry point out of range, level too high.
    assert!(is_format(forged(&bytes, |b| u32_at(b, 80, 100_000))));
    assert!(is_format(forged(&bytes, |b| u32_at(b, 84, 40))));
    // Section offset not aligned / overlapping / beyond the file.
    for (at, value) in [
        (FIXED_LEN + 8, 1u64),
        (FIXED_LEN + ENTRY_LEN + 8, 64),
        (FIXED_LEN + 8, u64::MAX - 8),
    ] {
        assert!(is_format(forged(&bytes, |b| u64_at(b, at, value))));
    }

    // The section payloads start at the archive's data (rkyv puts a Vec's
    // elements first and its root at the end).
    let record = |slot: usize| level0 + slot * stride * 4;
    // Neighbour id = n, u32::MAX; self-loop; duplicate neighbour.
    for bad in [10_000u32, u32::MAX] {
        assert!(is_format(forged(&bytes, |b| {
            u32_at(b, record(3) + 4, 1); // degree 1, no upper block
            u32_at(b, record(3) + 8, bad);
        })));
    }
    assert!(is_format(forged(&bytes, |b| {
        let meta = u32::from_le_bytes(b[record(5) + 4..record(5) + 8].try_into().unwrap());
        u32_at(b, record(5) + 4, (meta & !0x1ff) | 2);
        u32_at(b, record(5) + 8, 5);
        u32_at(b, record(5) + 12, 6);
    })));
    // Degree = M0 + 1.
    assert!(is_format(forged(&bytes, |b| {
        let meta = u32::from_le_bytes(b[record(5) + 4..record(5) + 8].try_into().unwrap());
        u32_at(b, record(5) + 4, (meta & !0x1ff) | (m0 as u32 + 1));
    })));
    // An upper-block reference that does not exist.
    assert!(is_format(forged(&bytes, |b| {
        let meta = u32::from_le_bytes(b[record(5) + 4..record(5) + 8].try_into().unwrap());
        u32_at(b, record(5) + 4, (meta & 0x1ff) | (5000 << 9));
    })));
    // A cell word naming another slot.
    assert!(is_format(forged(&bytes, |b| u32_at(b, cells + 4 * 9, 10))));
    // Duplicate live keys.
    assert!(is_format(forged(&bytes, |b| {
        let k = b[keys + 8..keys + 16].to_vec();
        b[keys + 16..keys + 24].copy_from_slice(&k);
    })));
    // A non-finite vector value.
    let vectors = section_range(&bytes, 4).start;
    assert!(is_format(forged(&bytes, |b| u32_at(
        b,
        vectors + 4,
        f32::NAN.to_bits()
    ))));
    // Sections from two different saves: level0 of another index.
    let other = saved_bytes(
        &churned_index(150, 4, 4, Metric::InnerProduct),
        "other.nann",
    );
    let mixed = forged(&bytes, |b| {
        let (mine, theirs) = (section_range(b, 0), section_range(&other, 0));
        if mine.len() == theirs.len() {
            b[mine].copy_from_slice(&other[theirs]);
        } else {
            b[mine.start] ^= 0xff;
        }
    });
    // A swapped section may even describe a valid graph; it must never be
    // accepted with broken invariants.
    if let Ok(index) = mixed {
        index.check_invariants().unwrap();
    }
}

/// Upper-layer lists are saved sorted too, and `open` checks them block by
/// block with the fast test (range, self-loop, ascent, level of each id);
/// each forgery below breaks one of those and must still be named exactly.
#[test]
fn forged_ids_in_sorted_upper_lists_are_caught_one_by_one() {
    let m = 4usize;
    let index = churned_index(600, 4, m, Metric::L2);
    let bytes = saved_bytes(&index, "sorted-upper.nann");
    let stride = 2 + 2 * m;
    let level0 = section_range(&bytes, 0).start;
    let upper = section_range(&bytes, 3);
    let word = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let slots = u64::from_le_bytes(bytes[48..56].try_into().unwrap()) as usize;
    // Owner and level of each block, from the level-0 records' references.
    let mut owner = std::collections::HashMap::new();
    let mut level_of = vec![0usize; slots];
    let mut blocks = Vec::new(); // (byte offset of the block's level word, level)
    let mut at = upper.start;
    for _ in 0..nann::FileInfo::read(&bytes).unwrap().upper_blocks {
        let level = word(&bytes, at) as usize;
        blocks.push((at, level));
        at += 4 * (1 + level * (1 + m));
    }
    assert!(at <= upper.end);
    for (slot, level) in level_of.iter_mut().enumerate() {
        let index = (word(&bytes, level0 + slot * stride * 4 + 4) >> 9) as usize;
        if index > 0 {
            owner.insert(index - 1, slot as u32);
            *level = blocks[index - 1].1;
        }
    }
    // Every saved upper list ascends; pick a layer-1 list with >= 2 ids.
    let mut target = None;
    for (b, &(at, level)) in blocks.iter().enumerate() {
        for layer in 1..=level {
            let list = at + 4 + 4 * (layer - 1) * (1 + m);
            let degree = (word(&bytes, list) & 0x1ff) as usize;
            let ids: Vec<u32> = (0..degree)
                .map(|i| word(&bytes, list + 4 + 4 * i))
                .collect();
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "block {b} layer {layer}: {ids:?}"
            );
            if layer == 1 && degree >= 2 && target.is_none() {
                target = Some((owner[&b], list, ids));
            }
        }
    }
    let (slot, list, ids) = target.expect("an upper list with two ids");
    let id_at = |i: usize| list + 4 + 4 * i;
    let violation = |r: Result<Index, Error>| match r {
        Err(Error::Format(FormatError::Invariant(v))) => v,
        other => panic!("expected an invariant violation, got {:?}", other.err()),
    };
    let last = ids.len() - 1;
    // Out of range, still ascending.
    let v = violation(forged(&bytes, |b| u32_at(b, id_at(last), slots as u32)));
    assert!(
        matches!(v, InvariantViolation::NeighbourOutOfRange { layer: 1, .. }),
        "{v:?}"
    );
    // A duplicate.
    let v = violation(forged(&bytes, |b| u32_at(b, id_at(1), ids[0])));
    assert!(
        matches!(v, InvariantViolation::DuplicateNeighbour { layer: 1, .. }),
        "{v:?}"
    );
    // A self-loop.
    let v = violation(forged(&bytes, |b| u32_at(b, id_at(last), slot)));
    assert!(
        matches!(v, InvariantViolation::SelfLoop { layer: 1, .. }),
        "{v:?}"
    );
    // A level-0 node on layer 1, placed so the list still ascends.
    let low = (ids[last - 1] + 1..slots as u32)
        .find(|&s| level_of[s as usize] == 0 && s != slot)
        .expect("a level-0 slot above the list's ids");
    let v = violation(forged(&bytes, |b| u32_at(b, id_at(last), low)));
    assert!(
        matches!(v, InvariantViolation::AboveLevel { layer: 1, .. }),
        "{v:?}"
    );
}

/// A file whose vectors hold NaN and infinities (checksums resealed, so
/// only the content is wrong): `open` does not read vectors and accepts it;
/// the index stays safe to use (searches terminate with k answers, writes
/// work, the graph invariants hold), `check_vectors` names the first bad
/// slot, and `from_bytes` / `open_untrusted`, which run it, reject the file.
#[test]
fn non_finite_vectors_are_a_content_check_not_a_safety_one() {
    let dim = 4;
    let index = churned_index(400, dim, 4, Metric::L2);
    let bytes = saved_bytes(&index, "nan-source.nann");
    let vectors = section_range(&bytes, 4).start;
    let mut b = bytes.clone();
    // Cells 3, 40, 41 and 200: NaN, +inf, -inf, NaN in various components.
    for (cell, component, value) in [
        (3usize, 0usize, f32::NAN),
        (40, 1, f32::INFINITY),
        (41, 3, f32::NEG_INFINITY),
        (200, 2, f32::NAN),
    ] {
        u32_at(
            &mut b,
            vectors + 4 * (cell * dim + component),
            value.to_bits(),
        );
    }
    reseal(&mut b);
    assert!(matches!(
        Index::from_bytes(&b),
        Err(Error::Format(FormatError::Invariant(
            InvariantViolation::NonFiniteVector { .. }
        )))
    ));
    let path = temp_path("nan.nann");
    std::fs::write(&path, &b).unwrap();
    assert!(Index::open_untrusted(&path).is_err());
    let opened = Index::open(&path).expect("open does not read vectors");
    opened.check_invariants().unwrap();
    assert!(matches!(
        opened.check_vectors(),
        Err(InvariantViolation::NonFiniteVector { .. })
    ));
    let mut next = rng(77);
    for _ in 0..200 {
        let hits = opened
            .search(&random_vector(&mut next, dim), 10, 32)
            .unwrap();
        assert_eq!(hits.len(), 10);
    }
    for key in 1000..1100u64 {
        opened.insert(key, &random_vector(&mut next, dim)).unwrap();
    }
    for key in (1..400u64).filter(|k| opened.contains(*k)).step_by(3) {
        opened.update(key, &random_vector(&mut next, dim)).unwrap();
    }
    opened.check_invariants().unwrap();
    std::fs::remove_file(&path).unwrap();
}

/// `save` writes every layer-0 list sorted, and `open` checks such a list
/// with vectorised folds (range, self-loop, strict ascent). These forgeries
/// break exactly one of those and nothing else: the edited id is one the
/// list's node does not anchor, so the anchor tree stays intact.
#[test]
fn forged_ids_in_sorted_lists_are_caught_one_by_one() {
    let index = churned_index(150, 4, 4, Metric::L2);
    let bytes = saved_bytes(&index, "sorted.nann");
    let stride = 2 + 8; // lock, meta, M0 = 8 ids
    let level0 = section_range(&bytes, 0).start;
    let anchors = section_range(&bytes, 2).start;
    let word = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    // The header's slot count (offset 48, see src/persist/format.rs).
    let slots = u64::from_le_bytes(bytes[48..56].try_into().unwrap()) as usize;
    let list = |slot: usize| -> Vec<u32> {
        let at = level0 + slot * stride * 4;
        let degree = (word(&bytes, at + 4) & 0x1ff) as usize;
        (0..degree).map(|i| word(&bytes, at + 8 + 4 * i)).collect()
    };
    let anchor = |slot: u32| word(&bytes, anchors + 4 * slot as usize);
    // Every saved list ascends.
    for slot in 0..slots {
        let ids = list(slot);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "slot {slot}: {ids:?}");
    }
    // A slot whose last id (its largest) and second id it does not anchor.
    let (slot, ids) = (0..slots)
        .map(|s| (s, list(s)))
        .find(|(s, ids)| {
            ids.len() >= 3 && anchor(ids[ids.len() - 1]) != *s as u32 && anchor(ids[1]) != *s as u32
        })
        .expect("a list with unanchored ids");
    let at = |i: usize| level0 + slot * stride * 4 + 8 + 4 * i;
    let violation = |r: Result<Index, Error>| match r {
        Err(Error::Format(FormatError::Invariant(v))) => v,
        other => panic!("expected an invariant violation, got {:?}", other.err()),
    };
    // Out of range, still ascending.
    let v = violation(forged(&bytes, |b| {
        u32_at(b, at(ids.len() - 1), slots as u32)
    }));
    assert!(
        matches!(v, InvariantViolation::NeighbourOutOfRange { .. }),
        "{v:?}"
    );
    // A duplicate: in range, no longer strictly ascending.
    let v = violation(forged(&bytes, |b| u32_at(b, at(1), ids[0])));
    assert!(
        matches!(v, InvariantViolation::DuplicateNeighbour { .. }),
        "{v:?}"
    );
}

#[test]
fn an_opened_index_reports_the_memory_it_allocated_not_the_file() {
    // Opened zero-copy, the records live in the mapped file: the heap
    // holds less than the built index's, and writes that grow the index
    // past the file allocate and are counted.
    let built = churned_index(2_000, 8, 8, Metric::L2);
    let path = temp_path("memory_usage");
    built.save(&path).unwrap();
    let opened = Index::open(&path).unwrap();
    let (b, o) = (built.memory_usage(), opened.memory_usage());
    assert!(o.total() < b.total(), "opened {o:?} built {b:?}");
    assert_eq!(o.live, b.live);
    heavy_writes(&opened, 3_000, 8);
    let grown = opened.memory_usage();
    assert!(
        grown.links > o.links && grown.total() > o.total(),
        "{grown:?} after writes, {o:?} before"
    );
    let _ = std::fs::remove_file(&path);
}
