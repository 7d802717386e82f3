//! Golden files under `tests/data`, opened by every future build: format
//! version 1 (no payloads) and version 2 (`v2-payloads.nann`, payloads).
//!
//! The files were written once by these tests with `NANN_WRITE_GOLDEN=1`
//! (the version-1 files on 2026-11-24; the version-2 file later, by running
//! only its test: `NANN_WRITE_GOLDEN=1 cargo test --test golden v2`); from
//! then on they are never rewritten. Their contents are defined by the
//! deterministic recipe below, so the check does not trust the reader: every
//! expected key and vector comes from the recipe, and an exhaustive search
//! (ef >= n) must agree with brute force over the recipe's vectors.
#![cfg(not(loom))]

use std::collections::BTreeMap;
use std::path::PathBuf;

use nann::{BeamParams, CandidateBatch, Error, FileInfo, Index, IndexParams, Metric, Scorer};

fn vector(key: u64, version: u64, dim: usize) -> Vec<f32> {
    (0..dim as u64)
        .map(|i| {
            let mut z = key
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .wrapping_add(version.wrapping_mul(0xbf58_476d_1ce4_e5b9))
                .wrapping_add(i);
            z = (z ^ (z >> 31)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 29;
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

/// (file name, metric, dim, entries, removed every nth (0: none), update rounds)
const RECIPES: [(&str, Metric, usize, u64, u64, u64); 4] = [
    ("v1-empty.nann", Metric::L2, 4, 0, 0, 0),
    ("v1-one.nann", Metric::L2, 4, 1, 0, 0),
    ("v1-layers-removals.nann", Metric::L2, 8, 600, 7, 0),
    ("v1-many-updates.nann", Metric::InnerProduct, 8, 300, 0, 10),
];

/// The live entries a recipe leaves: key -> vector.
fn expected(dim: usize, n: u64, remove_every: u64, rounds: u64) -> BTreeMap<u64, Vec<f32>> {
    let mut live = BTreeMap::new();
    for key in 0..n {
        live.insert(key, vector(key, 0, dim));
    }
    if remove_every > 0 {
        for key in (0..n).step_by(remove_every as usize) {
            live.remove(&key);
        }
    }
    for round in 1..=rounds {
        for key in 0..n {
            live.insert(key, vector(key, round, dim));
        }
    }
    live
}

fn build(metric: Metric, dim: usize, n: u64, remove_every: u64, rounds: u64) -> Index {
    let index = Index::new(
        IndexParams::new(dim, metric)
            .m(4)
            .ef_construction(32)
            .seed(1),
    )
    .unwrap();
    for key in 0..n {
        index.insert(key, &vector(key, 0, dim)).unwrap();
    }
    if remove_every > 0 {
        for key in (0..n).step_by(remove_every as usize) {
            index.remove(key).unwrap();
        }
    }
    for round in 1..=rounds {
        for key in 0..n {
            index.update(key, &vector(key, round, dim)).unwrap();
        }
    }
    index
}

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn distance(metric: Metric, a: &[f32], b: &[f32]) -> f32 {
    match metric {
        Metric::L2 => a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum(),
        _ => 1.0 - a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>(),
    }
}

#[test]
fn golden_files_of_format_v1_open_with_their_recipe_contents() {
    for (name, metric, dim, n, remove_every, rounds) in RECIPES {
        let path = data_dir().join(name);
        if std::env::var("NANN_WRITE_GOLDEN").is_ok() {
            build(metric, dim, n, remove_every, rounds)
                .save(&path)
                .unwrap();
        }
        let index = Index::open(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let live = expected(dim, n, remove_every, rounds);
        assert_eq!(index.len(), live.len(), "{name}");
        assert_eq!(index.metric(), metric, "{name}");
        for (key, v) in &live {
            assert_eq!(&index.get(*key).unwrap(), v, "{name} key {key}");
        }
        for q in 0..5 {
            let query = vector(10_000 + q, 0, dim);
            let mut want: Vec<(f32, u64)> = live
                .iter()
                .map(|(k, v)| (distance(metric, &query, v), *k))
                .collect();
            want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let k = 5.min(want.len());
            let got: Vec<u64> = index
                .search(&query, k, live.len().max(1) + 10)
                .unwrap()
                .iter()
                .map(|h| h.key)
                .collect();
            let want: Vec<u64> = want.iter().take(k).map(|w| w.1).collect();
            assert_eq!(got, want, "{name} query {q}");
        }
        index.check_invariants().unwrap();
        assert_resave_keeps_v1(&index, name, &std::fs::read(&path).unwrap());
    }
}

/// Saving an index opened from a version-1 golden file writes version 1
/// again: the same header fields and section table, the same cells,
/// anchors, vectors and keys byte for byte. Only the neighbour lists
/// (level0, upper) may differ: these files predate `save` writing every
/// list sorted, and a re-save sorts them. Saving that re-save's index once
/// more is byte-exact.
fn assert_resave_keeps_v1(index: &Index, name: &str, golden: &[u8]) {
    let resaved = saved_bytes(index, name);
    let (was, now) = (
        FileInfo::read(golden).unwrap(),
        FileInfo::read(&resaved).unwrap(),
    );
    assert_eq!((now.version, now.payload_len), (1, 0), "{name}");
    assert_eq!(resaved.len(), golden.len(), "{name}");
    // The header's fixed fields (offsets 0..128; the section table follows).
    assert_eq!(resaved[..128], golden[..128], "{name}: header fields");
    for (i, (a, b)) in was.sections.iter().zip(&now.sections).enumerate() {
        assert_eq!((a.0, a.1, a.2), (b.0, b.1, b.2), "{name}: section {i}");
        if !["level0", "upper"].contains(&a.0) {
            assert_eq!(a.3, b.3, "{name}: section {} checksum", a.0);
            let range = a.1 as usize..(a.1 + a.2) as usize;
            assert!(
                resaved[range.clone()] == golden[range],
                "{name}: section {} bytes",
                a.0
            );
        }
    }
    let again = saved_bytes(&Index::from_bytes(&resaved).unwrap(), name);
    assert!(again == resaved, "{name}: a second re-save differs");
}

fn saved_bytes(index: &Index, name: &str) -> Vec<u8> {
    let path = temp_path(name);
    index.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    bytes
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nann-golden-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

// ---- format version 2: payloads ----

const V2_NAME: &str = "v2-payloads.nann";
const V2_DIM: usize = 4;
/// Not a multiple of 4: each payload ends in two bytes of padding.
const V2_PAYLOAD_LEN: usize = 6;

fn payload(key: u64, version: u64) -> Vec<u8> {
    // The vector recipe's mixing, read as bytes; never all zeros.
    vector(key ^ 0x5555, version + 100, V2_PAYLOAD_LEN)
        .iter()
        .map(|x| ((x + 0.5) * 254.0) as u8 + 1)
        .collect()
}

/// The version-2 recipe: inserts with and without payload, removes,
/// updates with a new payload and plain updates (which keep it), slots
/// reused, compaction (detached slots), and tombstones left at the end.
/// Applied to `index` when given; returns the live entries it leaves.
fn v2_recipe(index: Option<&Index>) -> BTreeMap<u64, (Vec<f32>, Vec<u8>)> {
    let mut live = BTreeMap::new();
    let zeros = vec![0u8; V2_PAYLOAD_LEN];
    let insert = |live: &mut BTreeMap<_, _>, key: u64, version: u64, with: bool| {
        let v = vector(key, version, V2_DIM);
        let p = if with {
            payload(key, version)
        } else {
            zeros.clone()
        };
        if let Some(index) = index {
            if with {
                index.insert_with_payload(key, &v, &p).unwrap();
            } else {
                index.insert(key, &v).unwrap();
            }
        }
        live.insert(key, (v, p));
    };
    let remove = |live: &mut BTreeMap<u64, _>, key: u64| {
        if let Some(index) = index {
            index.remove(key).unwrap();
        }
        live.remove(&key);
    };
    for key in 0..200 {
        insert(&mut live, key, 0, key % 4 != 3);
    }
    for key in (0..200).step_by(7) {
        remove(&mut live, key);
    }
    for key in (1..200).step_by(5) {
        if live.contains_key(&key) {
            let (v, p) = (vector(key, 1, V2_DIM), payload(key, 1));
            if let Some(index) = index {
                index.update_with_payload(key, &v, &p).unwrap();
            }
            live.insert(key, (v, p));
        }
    }
    for key in (2..200).step_by(3) {
        if let Some(entry) = live.get_mut(&key) {
            let v = vector(key, 2, V2_DIM);
            if let Some(index) = index {
                index.update(key, &v).unwrap();
            }
            entry.0 = v;
        }
    }
    for key in (0..200).step_by(14) {
        insert(&mut live, key, 3, true);
    }
    for key in (5..200).step_by(11) {
        if live.contains_key(&key) {
            remove(&mut live, key);
        }
    }
    if let Some(index) = index {
        assert!(index.compact().unlinked > 0);
    }
    for key in 1000..1010 {
        insert(&mut live, key, 0, key % 2 == 0);
    }
    for key in (3..200).step_by(13) {
        if live.contains_key(&key) {
            remove(&mut live, key);
        }
    }
    live
}

/// Fails the search when a candidate that holds the recipe's vector for
/// its key carries another payload (tombstones of removed versions are
/// candidates too, and are not checked); counts the checked ones.
struct RecipeScorer<'a> {
    live: &'a BTreeMap<u64, (Vec<f32>, Vec<u8>)>,
    checked: std::cell::Cell<usize>,
}

impl Scorer for RecipeScorer<'_> {
    type Query = [f32];
    fn score_batch(
        &self,
        q: &[f32],
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> nann::Result<()> {
        for (i, score) in out.iter_mut().enumerate() {
            let key = batch.keys()[i];
            if let Some((v, p)) = self.live.get(&key) {
                if batch.vector(i) == &v[..] {
                    if batch.payload(i) != &p[..] {
                        return Err(Error::Scorer {
                            message: format!("key {key}: another payload"),
                        });
                    }
                    self.checked.set(self.checked.get() + 1);
                }
            }
            *score = -distance(Metric::L2, q, batch.vector(i));
        }
        Ok(())
    }
}

#[test]
fn golden_file_of_format_v2_keeps_its_payloads_and_resaves_byte_exact() {
    let path = data_dir().join(V2_NAME);
    if std::env::var("NANN_WRITE_GOLDEN").is_ok() {
        let index = Index::new(
            IndexParams::new(V2_DIM, Metric::L2)
                .m(4)
                .ef_construction(32)
                .seed(1)
                .payload_len(V2_PAYLOAD_LEN),
        )
        .unwrap();
        assert_eq!(v2_recipe(Some(&index)), v2_recipe(None));
        index.save(&path).unwrap();
    }
    let golden = std::fs::read(&path).unwrap();
    let info = FileInfo::read(&golden).unwrap();
    assert_eq!((info.version, info.payload_len), (2, V2_PAYLOAD_LEN as u32));
    let live = v2_recipe(None);
    // SAFETY: a committed file that nothing modifies while the index lives.
    let unchecked = unsafe { Index::open_unchecked(&path) }.unwrap();
    let opened = [
        ("open", Index::open(&path).unwrap()),
        ("open_unchecked", unchecked),
        ("open_untrusted", Index::open_untrusted(&path).unwrap()),
        ("from_bytes", Index::from_bytes(&golden).unwrap()),
    ];
    for (mode, index) in &opened {
        assert_eq!(index.len(), live.len(), "{mode}");
        for (key, (v, p)) in &live {
            let (got_v, got_p) = index.get_with_payload(*key).unwrap();
            assert_eq!((&got_v, &got_p), (v, p), "{mode}: key {key}");
        }
        for q in 0..5 {
            let query = vector(10_000 + q, 0, V2_DIM);
            let mut want: Vec<(f32, u64)> = live
                .iter()
                .map(|(k, (v, _))| (distance(Metric::L2, &query, v), *k))
                .collect();
            want.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let got: Vec<u64> = index
                .search(&query, 5, live.len() + 10)
                .unwrap()
                .iter()
                .map(|h| h.key)
                .collect();
            let want: Vec<u64> = want.iter().take(5).map(|w| w.1).collect();
            assert_eq!(got, want, "{mode}: query {q}");
        }
        let scorer = RecipeScorer {
            live: &live,
            checked: std::cell::Cell::new(0),
        };
        let beam = BeamParams::default().layers(&[(32, 1), (64, 2)]).top(10);
        for q in 0..5 {
            index
                .search_with(&scorer, &vector(20_000 + q, 0, V2_DIM), &beam)
                .unwrap_or_else(|e| panic!("{mode}: {e}"));
        }
        assert!(scorer.checked.get() > 0, "{mode}");
        index.check_invariants().unwrap();
        // Written by this build's `save`: a re-save is the same file.
        assert!(
            saved_bytes(index, V2_NAME) == golden,
            "{mode}: re-save differs from {V2_NAME}"
        );
    }
}
