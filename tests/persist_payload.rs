#![cfg(not(loom))]
//! Entry payloads in saved files (format version 2) and in the durable
//! update log (log version 2): round trips through every open mode, after
//! inserts, updates (with and without a new payload), removes and
//! compaction; and damaged or forged payload sections and header fields,
//! which must give typed errors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use nann::{
    BeamParams, CandidateBatch, Durability, DurableIndex, DurableOptions, Error, FileInfo,
    FormatError, Index, IndexParams, Metric, Scorer,
};

#[path = "support/forge.rs"]
mod forge;
use forge::{crc32c, ENTRY_LEN, FIXED_LEN};

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn vector(key: u64, version: u64, dim: usize) -> Vec<f32> {
    (0..dim as u64)
        .map(|i| {
            let z = mix(key ^ version.wrapping_mul(0x1000_0001) ^ (i << 48));
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// A payload that differs per key, version and byte, and is never all
/// zeros (so it cannot be mistaken for a missing one).
fn payload(key: u64, version: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (mix(key.wrapping_mul(31) ^ (version << 20) ^ (i << 40)) % 255) as u8 + 1)
        .collect()
}

/// key -> (vector, payload) of every live entry, as the index should hold it.
type Model = BTreeMap<u64, (Vec<f32>, Vec<u8>)>;

/// Applies inserts (with and without payload), removes, updates with a new
/// payload, plain updates (which keep the payload) and re-inserts into
/// removed slots to `index`, mirroring them in `model`.
fn churn(index: &Index, model: &mut Model, keys: std::ops::Range<u64>, round: u64) {
    let dim = index.dim();
    let len = index.params().payload_len;
    for key in keys.clone() {
        let v = vector(key, round, dim);
        if key % 4 == 3 {
            index.insert(key, &v).unwrap();
            model.insert(key, (v, vec![0; len]));
        } else {
            let p = payload(key, round, len);
            index.insert_with_payload(key, &v, &p).unwrap();
            model.insert(key, (v, p));
        }
    }
    for key in keys.clone().step_by(7) {
        index.remove(key).unwrap();
        model.remove(&key);
    }
    for key in keys.clone().skip(1).step_by(5) {
        if let Some(entry) = model.get_mut(&key) {
            let (v, p) = (vector(key, round + 1, dim), payload(key, round + 1, len));
            index.update_with_payload(key, &v, &p).unwrap();
            *entry = (v, p);
        }
    }
    for key in keys.clone().skip(2).step_by(3) {
        if let Some(entry) = model.get_mut(&key) {
            let v = vector(key, round + 2, dim);
            index.update(key, &v).unwrap();
            entry.0 = v; // the payload stays
        }
    }
    // Some removed keys come back (into recycled slots) with new payloads.
    for key in keys.step_by(14) {
        let (v, p) = (vector(key, round + 3, dim), payload(key, round + 3, len));
        index.insert_with_payload(key, &v, &p).unwrap();
        model.insert(key, (v, p));
    }
}

fn params(dim: usize, payload_len: usize) -> IndexParams {
    IndexParams::new(dim, Metric::L2)
        .m(4)
        .ef_construction(32)
        .payload_len(payload_len)
}

fn churned(n: u64, dim: usize, payload_len: usize) -> (Index, Model) {
    let index = Index::new(params(dim, payload_len)).unwrap();
    let mut model = Model::new();
    churn(&index, &mut model, 0..n, 0);
    (index, model)
}

/// Fails the search when a candidate carries the vector the model holds
/// for its key but another payload; counts the candidates it checked.
/// (Removed entries still bridge the graph, so a candidate may also be a
/// tombstone holding an older version of a key: those are not checked.)
struct ModelScorer<'a> {
    model: &'a Model,
    checked: AtomicUsize,
}

impl Scorer for ModelScorer<'_> {
    type Query = [f32];
    fn score_batch(
        &self,
        q: &[f32],
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> nann::Result<()> {
        for (i, score) in out.iter_mut().enumerate() {
            let key = batch.keys()[i];
            if let Some((v, p)) = self.model.get(&key) {
                if batch.vector(i) == &v[..] {
                    if batch.payload(i) != &p[..] {
                        return Err(Error::Scorer {
                            message: format!("candidate {key}: another payload"),
                        });
                    }
                    self.checked.fetch_add(1, Ordering::Relaxed);
                }
            }
            *score = -q
                .iter()
                .zip(batch.vector(i))
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>();
        }
        Ok(())
    }
}

/// Every live entry of `model` has its vector and payload in `index`, the
/// removed ones are gone, and searches hand the scorer the same pairs.
fn assert_matches(index: &Index, model: &Model, what: &str) {
    assert_eq!(index.len(), model.len(), "{what}: len");
    for (key, (v, p)) in model {
        assert_eq!(
            index.get_with_payload(*key).as_ref().map(|(_, p)| p),
            Ok(p),
            "{what}: payload of key {key}"
        );
        assert_eq!(&index.get(*key).unwrap(), v, "{what}: vector of key {key}");
    }
    let last = model.keys().next_back().copied().unwrap_or(0);
    for key in (0..=last).filter(|k| !model.contains_key(k)) {
        assert_eq!(
            index.get_payload(key),
            Err(Error::KeyNotFound(key)),
            "{what}: key {key}"
        );
    }
    if model.is_empty() {
        return;
    }
    let scorer = ModelScorer {
        model,
        checked: AtomicUsize::new(0),
    };
    let beam = BeamParams::default().layers(&[(32, 1), (64, 2)]).top(10);
    for q in 0..8 {
        let query = vector(1_000_000 + q, 0, index.dim());
        index
            .search_with(&scorer, &query, &beam)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    assert!(scorer.checked.load(Ordering::Relaxed) > 0, "{what}");
    index.check_invariants().unwrap();
}

fn temp_path(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("nann-payload-{}", std::process::id()));
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

/// The file at `path` opened in every mode: mapped (validated), mapped
/// unchecked, read into memory (`open_untrusted`), from bytes.
fn open_every_way(path: &std::path::Path) -> Vec<(&'static str, Index)> {
    vec![
        ("open", Index::open(path).unwrap()),
        // SAFETY: every caller passes a file `save` just wrote, which
        // nothing modifies while the index lives.
        (
            "open_unchecked",
            unsafe { Index::open_unchecked(path) }.unwrap(),
        ),
        ("open_untrusted", Index::open_untrusted(path).unwrap()),
        (
            "from_bytes",
            Index::from_bytes(&std::fs::read(path).unwrap()).unwrap(),
        ),
    ]
}

#[test]
fn payloads_round_trip_through_every_open_mode_and_later_writes() {
    for payload_len in [1usize, 3, 4, 6, 13, 64] {
        let (n, dim) = (300u64, 6usize);
        let (index, model) = churned(n, dim, payload_len);
        assert_matches(&index, &model, "original");
        let path = temp_path(&format!("round-trip-{payload_len}.nann"));
        index.save(&path).unwrap();
        let file = std::fs::read(&path).unwrap();
        let info = FileInfo::read(&file).unwrap();
        assert_eq!((info.version, info.payload_len), (2, payload_len as u32));
        assert_eq!(info.sections.last().unwrap().0, "payloads");

        for (mode, opened) in open_every_way(&path) {
            let what = format!("payload_len {payload_len}, {mode}");
            assert_matches(&opened, &model, &what);
            assert_eq!(opened.params().payload_len, payload_len, "{what}");
            // Saving what was opened writes the same file.
            assert_eq!(
                saved_bytes(&opened, &format!("resave-{payload_len}-{mode}.nann")),
                file,
                "{what}: re-save"
            );
            // Writes after the open: new keys beyond the saved slots (new
            // chunks beside the borrowed ones), updates that recycle cells
            // of the file, removes, and slots reused.
            let mut model = model.clone();
            churn(&opened, &mut model, n..3 * n, 10);
            for key in (0..n).step_by(3) {
                if let Some(entry) = model.get_mut(&key) {
                    let (v, p) = (vector(key, 20, dim), payload(key, 20, payload_len));
                    opened.update_with_payload(key, &v, &p).unwrap();
                    *entry = (v, p);
                }
            }
            for key in (1..n).step_by(4) {
                if let Some(entry) = model.get_mut(&key) {
                    let v = vector(key, 21, dim);
                    opened.update(key, &v).unwrap();
                    entry.0 = v;
                }
            }
            for key in (2..n).step_by(9) {
                if model.remove(&key).is_some() {
                    opened.remove(key).unwrap();
                }
            }
            assert_matches(&opened, &model, &format!("{what}, after writes"));
            let again = temp_path(&format!("again-{payload_len}-{mode}.nann"));
            opened.save(&again).unwrap();
            for (mode2, reopened) in open_every_way(&again) {
                assert_matches(&reopened, &model, &format!("{what}, saved, {mode2}"));
            }
            std::fs::remove_file(&again).unwrap();
        }
        // Writes to the mapped indexes went to private pages.
        assert_eq!(std::fs::read(&path).unwrap(), file);
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn compaction_then_save_keeps_every_payload() {
    let (index, mut model) = churned(600, 5, 10);
    // More removals than inserts, so compaction has tombstones to detach.
    for key in (0..600).step_by(3) {
        if model.remove(&key).is_some() {
            index.remove(key).unwrap();
        }
    }
    let compaction = index.compact();
    assert!(compaction.unlinked > 0);
    assert_matches(&index, &model, "compacted");
    let path = temp_path("compacted.nann");
    index.save(&path).unwrap();
    for (mode, opened) in open_every_way(&path) {
        assert_matches(&opened, &model, &format!("compacted, {mode}"));
        // Detached slots are reused, with their new payloads.
        let mut model = model.clone();
        churn(&opened, &mut model, 5000..5200, 30);
        opened.compact();
        assert_matches(&opened, &model, &format!("compacted, {mode}, reused"));
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn empty_single_and_largest_payload_indexes_round_trip() {
    let empty = Index::new(params(3, 5)).unwrap();
    let bytes = saved_bytes(&empty, "empty.nann");
    let info = FileInfo::read(&bytes).unwrap();
    assert_eq!((info.version, info.payload_len, info.slots), (2, 5, 0));
    let reopened = Index::from_bytes(&bytes).unwrap();
    assert!(reopened.is_empty());
    assert_eq!(reopened.params().payload_len, 5);
    reopened
        .insert_with_payload(1, &[1.0, 2.0, 3.0], b"hello")
        .unwrap();
    assert_eq!(reopened.get_payload(1).unwrap(), b"hello");
    assert!(matches!(
        reopened.insert_with_payload(2, &[1.0, 2.0, 3.0], b"hi"),
        Err(Error::PayloadLength {
            expected: 5,
            actual: 2
        })
    ));

    let path = temp_path("one.nann");
    reopened.save(&path).unwrap();
    for (mode, one) in open_every_way(&path) {
        assert_eq!(one.get_payload(1).unwrap(), b"hello", "{mode}");
        assert_eq!(
            one.get_with_payload(1).unwrap().0,
            vec![1.0, 2.0, 3.0],
            "{mode}"
        );
    }
    std::fs::remove_file(&path).unwrap();

    // The largest payload a file may declare.
    let big = Index::new(params(2, 65536)).unwrap();
    let mut model = Model::new();
    for key in 0..12u64 {
        let (v, p) = (vector(key, 0, 2), payload(key, 0, 65536));
        big.insert_with_payload(key, &v, &p).unwrap();
        model.insert(key, (v, p));
    }
    big.remove(5).unwrap();
    model.remove(&5);
    let path = temp_path("big.nann");
    big.save(&path).unwrap();
    for (mode, opened) in open_every_way(&path) {
        assert_matches(&opened, &model, &format!("65536-byte payloads, {mode}"));
    }
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn indexes_without_payloads_are_still_written_as_version_1() {
    let index = Index::new(params(4, 0)).unwrap();
    for key in 0..50u64 {
        index.insert(key, &vector(key, 0, 4)).unwrap();
    }
    let bytes = saved_bytes(&index, "plain.nann");
    let info = FileInfo::read(&bytes).unwrap();
    assert_eq!((info.version, info.payload_len), (1, 0));
    assert_eq!(info.sections.len(), 6);
    // The bytes where version 2 keeps `payload_len` stay zero.
    assert!(bytes[96..FIXED_LEN].iter().all(|&b| b == 0));
    assert_eq!(Index::from_bytes(&bytes).unwrap().params().payload_len, 0);
}

// ---- damaged and forged files ----

/// Byte range of section `index` as the table states it.
fn section_range(bytes: &[u8], index: usize) -> std::ops::Range<usize> {
    forge::section_range(bytes, index).expect("an intact section table")
}

/// The payload section of a version-2 file.
const PAYLOADS: usize = 6;

/// `forge::reseal` for a file of any section count (it knows version 1's
/// six): every section checksum and the header checksum recomputed, as far
/// as the table lets them be found.
fn reseal(bytes: &mut [u8]) {
    let count = u32::from_le_bytes(bytes[28..32].try_into().unwrap()).min(16) as usize;
    for i in 0..count {
        let Some(range) = forge::section_range(bytes, i) else {
            continue;
        };
        let Some(section) = bytes.get(range) else {
            continue;
        };
        let crc = crc32c(section);
        let e = FIXED_LEN + i * ENTRY_LEN;
        bytes[e + 24..e + 28].copy_from_slice(&crc.to_le_bytes());
    }
    let table_end = FIXED_LEN + count * ENTRY_LEN;
    if bytes.len() >= table_end + 4 {
        let crc = crc32c(&bytes[..table_end]);
        bytes[table_end..table_end + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

fn forged(bytes: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = bytes.to_vec();
    edit(&mut b);
    reseal(&mut b);
    b
}

fn u32_at(bytes: &mut [u8], at: usize, value: u32) {
    bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

/// The `Corrupt` message of a rejected file (any other outcome fails).
fn corrupt_message(r: Result<Index, Error>, what: &str) -> String {
    match r {
        Err(Error::Format(FormatError::Corrupt(message))) => message,
        Err(other) => panic!("{what}: expected FormatError::Corrupt, got {other:?}"),
        Ok(_) => panic!("{what}: accepted"),
    }
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
    let (index, _) = churned(100, 4, 6);
    let bytes = saved_bytes(&index, "trunc.nann");
    assert!(bytes.len() < 64 * 1024, "file is {} bytes", bytes.len());
    for len in 0..bytes.len() {
        assert!(
            !open_is_safe(&bytes[..len]),
            "truncated to {len} bytes but accepted"
        );
    }
    // Cut inside the payload section, the header's file length says so.
    let payloads = section_range(&bytes, PAYLOADS);
    assert!(matches!(
        Index::from_bytes(&bytes[..payloads.start + 8]),
        Err(Error::Format(FormatError::Truncated { .. }))
    ));
    // Also when a forger fixes the header's file length: the section table
    // then points past the end.
    let cut = forged(&bytes[..payloads.start + 8], |b| {
        let len = b.len() as u64;
        b[72..80].copy_from_slice(&len.to_le_bytes());
    });
    assert!(matches!(
        Index::from_bytes(&cut),
        Err(Error::Format(FormatError::Truncated { .. }))
    ));
    assert!(open_is_safe(&bytes));
}

#[test]
fn random_bit_flips_and_overwrites_are_rejected_or_change_nothing() {
    let (index, model) = churned(200, 4, 7);
    let bytes = saved_bytes(&index, "flips.nann");
    let mut state = 11u64;
    let mut next = move || {
        state = mix(state);
        state
    };
    for _ in 0..2000 {
        let mut damaged = bytes.clone();
        // Half the flips land in the payload section.
        let range = if next() % 2 == 0 {
            section_range(&bytes, PAYLOADS)
        } else {
            0..bytes.len()
        };
        let bit = range.start * 8 + (next() % (range.len() as u64 * 8)) as usize;
        damaged[bit / 8] ^= 1 << (bit % 8);
        if open_is_safe(&damaged) {
            // Only unprotected padding between sections can change and
            // still be accepted: the contents must be the original's.
            let opened = Index::from_bytes(&damaged).unwrap();
            for (key, (_, p)) in &model {
                assert_eq!(&opened.get_payload(*key).unwrap(), p, "bit {bit}");
            }
        }
    }
    for _ in 0..500 {
        let mut damaged = bytes.clone();
        let at = (next() % damaged.len() as u64) as usize;
        for b in damaged.iter_mut().skip(at).take(1 + (next() % 8) as usize) {
            *b = next() as u8;
        }
        open_is_safe(&damaged);
    }
}

#[test]
fn a_flipped_payload_byte_is_caught_by_the_checksums() {
    let (index, model) = churned(150, 4, 6);
    let path = temp_path("flipped-payload.nann");
    index.save(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let payloads = section_range(&bytes, PAYLOADS);
    // Slot 9's first payload byte (two words per slot).
    bytes[payloads.start + 9 * 8] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(
        Index::from_bytes(&bytes).err(),
        Some(Error::Format(FormatError::SectionChecksum {
            section: "payloads"
        }))
    );
    assert!(matches!(
        Index::open_untrusted(&path),
        Err(Error::Format(FormatError::SectionChecksum {
            section: "payloads"
        }))
    ));
    // `open` leaves content checks to `verify_checksums`, like a vector's.
    let opened = Index::open(&path).expect("a payload flip is structurally valid");
    assert_eq!(
        opened.verify_checksums(),
        Err(Error::Format(FormatError::SectionChecksum {
            section: "payloads"
        }))
    );
    let changed: Vec<u64> = model
        .iter()
        .filter(|(key, (_, p))| &opened.get_payload(**key).unwrap() != p)
        .map(|(key, _)| *key)
        .collect();
    assert_eq!(changed.len(), 1, "exactly slot 9's entry differs");
    drop(opened);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn forged_payload_headers_and_sections_are_rejected_with_typed_errors() {
    let (index, model) = churned(150, 4, 6);
    let bytes = saved_bytes(&index, "forged.nann");
    assert!(
        Index::from_bytes(&forged(&bytes, |_| {})).is_ok(),
        "the resealing helper is faithful"
    );
    let payloads = section_range(&bytes, PAYLOADS);
    let slots = FileInfo::read(&bytes).unwrap().slots as usize;

    // The header's payload length (offset 96): out of range.
    for bad in [0u32, 65537, u32::MAX] {
        let message = corrupt_message(
            Index::from_bytes(&forged(&bytes, |b| u32_at(b, 96, bad))),
            &format!("payload_len {bad}"),
        );
        assert!(
            message.contains(&format!("{bad}-byte payloads")),
            "{message}"
        );
    }
    // In range but needing another number of words than the section holds.
    for bad in [1u32, 4, 9, 100] {
        let message = corrupt_message(
            Index::from_bytes(&forged(&bytes, |b| u32_at(b, 96, bad))),
            &format!("payload_len {bad}"),
        );
        assert!(message.contains("section payloads"), "{message}");
    }
    // Same word count (5 bytes also take two words), so the section fits:
    // the sixth byte becomes padding, which the content check wants zero.
    let five = forged(&bytes, |b| u32_at(b, 96, 5));
    let message = corrupt_message(Index::from_bytes(&five), "payload_len 5");
    assert!(message.contains("padding"), "{message}");

    // Version and section count must agree.
    let message = corrupt_message(
        Index::from_bytes(&forged(&bytes, |b| u32_at(b, 8, 1))),
        "version 1 with seven sections",
    );
    assert!(message.contains("version 1 has 6"), "{message}");
    let message = corrupt_message(
        Index::from_bytes(&forged(&bytes, |b| u32_at(b, 28, 6))),
        "six sections in version 2",
    );
    assert!(message.contains("version 2 has 7"), "{message}");
    assert!(matches!(
        Index::from_bytes(&forged(&bytes, |b| u32_at(b, 8, 3))),
        Err(Error::Format(FormatError::UnsupportedVersion { found: 3 }))
    ));
    // The payload section's table entry: wrong kind, shorter than its
    // archive (rkyv's root sits at the end), past the end of the file.
    let entry = FIXED_LEN + PAYLOADS * ENTRY_LEN;
    assert!(matches!(
        Index::from_bytes(&forged(&bytes, |b| u32_at(b, entry, 6))),
        Err(Error::Format(FormatError::Corrupt(_)))
    ));
    assert!(matches!(
        Index::from_bytes(&forged(&bytes, |b| {
            let len = payloads.len() as u64 - 64;
            b[entry + 16..entry + 24].copy_from_slice(&len.to_le_bytes());
        })),
        Err(Error::Format(_))
    ));
    assert!(matches!(
        Index::from_bytes(&forged(&bytes, |b| {
            let len = payloads.len() as u64 + 64;
            b[entry + 16..entry + 24].copy_from_slice(&len.to_le_bytes());
        })),
        Err(Error::Format(FormatError::Truncated { .. }))
    ));
    // The archive's own element count (last word of the section): one word
    // short is a length mismatch, one too many an invalid archive.
    let count_at = payloads.end - 4;
    let count = u32::from_le_bytes(bytes[count_at..payloads.end].try_into().unwrap());
    assert_eq!(count as usize, 2 * slots, "two words per slot");
    let message = corrupt_message(
        Index::from_bytes(&forged(&bytes, |b| u32_at(b, count_at, count - 1))),
        "one word short",
    );
    assert!(message.contains("section payloads"), "{message}");
    assert!(matches!(
        Index::from_bytes(&forged(&bytes, |b| u32_at(b, count_at, count + 1))),
        Err(Error::Format(_))
    ));

    // Non-zero padding after a payload (byte 7 of slot 3's run): rejected
    // by the content checks, harmless to `open` (never returned).
    let padded = forged(&bytes, |b| b[payloads.start + 3 * 8 + 7] = 0xee);
    let message = corrupt_message(Index::from_bytes(&padded), "padding");
    assert!(message.contains("slot 3"), "{message}");
    let path = temp_path("padded.nann");
    std::fs::write(&path, &padded).unwrap();
    assert!(Index::open_untrusted(&path).is_err());
    let opened = Index::open(&path).expect("padding is not read by open");
    for (key, (_, p)) in &model {
        assert_eq!(&opened.get_payload(*key).unwrap(), p);
    }
    drop(opened);
    std::fs::remove_file(&path).unwrap();
}

// ---- the durable log ----

fn durable_dir(name: &str) -> std::path::PathBuf {
    let dir = temp_path(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn log_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    logs.sort();
    logs
}

#[test]
fn a_durable_index_logs_and_replays_payloads() {
    let dir = durable_dir("durable");
    let options = DurableOptions::new(Durability::PerOp);
    let (dim, len) = (4usize, 6usize);
    let mut model = Model::new();
    {
        let durable = DurableIndex::create(&dir, params(dim, len), options.clone()).unwrap();
        for key in 0..60u64 {
            let (v, p) = (vector(key, 0, dim), payload(key, 0, len));
            if key % 5 == 4 {
                durable.insert(key, &v).unwrap(); // zeros
                model.insert(key, (v, vec![0; len]));
            } else {
                durable.insert_with_payload(key, &v, &p).unwrap();
                model.insert(key, (v, p));
            }
        }
        // Rejected before logging: nothing reaches the log.
        assert!(matches!(
            durable.insert_with_payload(100, &vector(100, 0, dim), &[1, 2]),
            Err(Error::PayloadLength { .. })
        ));
        assert!(matches!(
            durable.update_with_payload(1, &vector(1, 0, dim), &[0; 7]),
            Err(Error::PayloadLength { .. })
        ));
        assert_eq!(
            durable.update_with_payload(1000, &vector(1, 0, dim), &[0; 6]),
            Err(Error::KeyNotFound(1000))
        );
        for key in (0..60u64).step_by(3) {
            let (v, p) = (vector(key, 1, dim), payload(key, 1, len));
            durable.update_with_payload(key, &v, &p).unwrap();
            model.insert(key, (v, p));
        }
        for key in (1..60u64).step_by(4) {
            let v = vector(key, 2, dim);
            durable.update(key, &v).unwrap();
            model.get_mut(&key).unwrap().0 = v;
        }
        for key in (0..60u64).step_by(7) {
            durable.remove(key).unwrap();
            model.remove(&key);
        }
        assert_matches(durable.index(), &model, "durable, live");
    } // no checkpoint: everything is in the log
    {
        let reopened = DurableIndex::open(&dir, options.clone()).unwrap();
        assert_eq!(reopened.replay_report().skipped, 0);
        assert_matches(reopened.index(), &model, "durable, replayed");
        // A checkpoint writes a version-2 snapshot; later ops go to a new log.
        reopened.checkpoint().unwrap();
        let snapshot = std::fs::read(dir.join(nann::SNAPSHOT_FILE)).unwrap();
        assert_eq!(FileInfo::read(&snapshot).unwrap().payload_len, len as u32);
        for key in 200..220u64 {
            let (v, p) = (vector(key, 0, dim), payload(key, 0, len));
            reopened.insert_with_payload(key, &v, &p).unwrap();
            model.insert(key, (v, p));
        }
        let (v, p) = (vector(1, 9, dim), payload(1, 9, len));
        reopened.update_with_payload(1, &v, &p).unwrap();
        model.insert(1, (v, p));
    }
    let reopened = DurableIndex::open(&dir, options.clone()).unwrap();
    assert_eq!(reopened.replay_report().applied, 21);
    assert_matches(reopened.index(), &model, "durable, checkpoint + log");
    drop(reopened);

    // Every log of a payload index is version 2 and names the payload length.
    for log in log_files(&dir) {
        let head = std::fs::read(&log).unwrap();
        assert_eq!(u32::from_le_bytes(head[8..12].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(head[24..28].try_into().unwrap()), 6);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_torn_payload_record_loses_only_itself_and_a_foreign_log_is_refused() {
    let dir = durable_dir("durable-torn");
    let options = DurableOptions::new(Durability::PerOp);
    let (dim, len) = (3usize, 5usize);
    {
        let durable = DurableIndex::create(&dir, params(dim, len), options.clone()).unwrap();
        for key in 0..5u64 {
            durable
                .insert_with_payload(key, &vector(key, 0, dim), &payload(key, 0, len))
                .unwrap();
        }
    }
    let log = log_files(&dir).pop().unwrap();
    let full = std::fs::read(&log).unwrap();
    // Each record: 8 frame + 17 fixed + 12 vector + 5 payload bytes.
    let record = 8 + 17 + 4 * dim + len;
    assert_eq!(full.len(), 32 + 5 * record);
    for cut in [1, 9, record - 1] {
        std::fs::write(&log, &full[..full.len() - cut]).unwrap();
        let reopened = DurableIndex::open(&dir, options.clone()).unwrap();
        let report = reopened.replay_report();
        assert_eq!((report.applied, report.torn_tails), (4, 1), "cut {cut}");
        for key in 0..4u64 {
            assert_eq!(
                reopened.index().get_payload(key).unwrap(),
                payload(key, 0, len)
            );
        }
        assert!(!reopened.index().contains(4));
        drop(reopened);
        // Only the first log counts for the next round.
        for extra in log_files(&dir).into_iter().filter(|p| p != &log) {
            std::fs::remove_file(extra).unwrap();
        }
    }

    // A log written for another payload length is another index's log.
    let mut foreign = full.clone();
    foreign[24..28].copy_from_slice(&4u32.to_le_bytes());
    let crc = crc32c(&foreign[..28]);
    foreign[28..32].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&log, &foreign).unwrap();
    match DurableIndex::open(&dir, options.clone()) {
        Err(Error::Format(FormatError::Corrupt(message))) => {
            assert!(message.contains("4-byte payloads"), "{message}")
        }
        other => panic!("expected Corrupt, got {:?}", other.err()),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn durable_indexes_without_payloads_keep_log_version_1() {
    let dir = durable_dir("durable-plain");
    let options = DurableOptions::new(Durability::PerOp);
    {
        let durable = DurableIndex::create(&dir, params(2, 0), options.clone()).unwrap();
        durable.insert(1, &[1.0, 2.0]).unwrap();
        assert!(matches!(
            durable.insert_with_payload(2, &[1.0, 2.0], &[1]),
            Err(Error::PayloadLength { .. })
        ));
        durable.insert_with_payload(3, &[3.0, 4.0], &[]).unwrap();
    }
    for log in log_files(&dir) {
        let head = std::fs::read(&log).unwrap();
        assert_eq!(u32::from_le_bytes(head[8..12].try_into().unwrap()), 1);
        assert!(head[28..32].iter().all(|&b| b == 0));
    }
    let reopened = DurableIndex::open(&dir, options).unwrap();
    assert_eq!(reopened.index().len(), 2);
    std::fs::remove_dir_all(&dir).unwrap();
}
