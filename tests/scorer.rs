//! The scorer hook and NANN beam retrieval (`Index::search_with`).

use nann::{BeamParams, CandidateBatch, Error, Index, IndexParams, Metric, MetricScorer, Scorer};

/// Deterministic uniform vectors in [0, 1).
fn random_vectors(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            (0..dim)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 40) as f32 / (1u64 << 24) as f32
                })
                .collect()
        })
        .collect()
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Stops an updater thread also when an assertion panics (the scope would
/// otherwise wait for it forever).
struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// For 2 s, runs `search(query)` on this thread while another rewrites
/// every `stride`-th key per round (round `r >= 1` starts at key
/// `r % stride`) with its vector from `a` on even rounds and from `b` on odd
/// ones, through `write(key, vector, round)`. Returns the searches run.
fn search_while_alternating(
    a: &[Vec<f32>],
    b: &[Vec<f32>],
    stride: usize,
    write: impl Fn(usize, &[f32], u32) + Sync,
    query_seed: u64,
    mut search: impl FnMut(&[f32]),
) -> usize {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut round = 1u32;
            while !stop.load(Ordering::Relaxed) {
                let set = if round.is_multiple_of(2) { a } else { b };
                for key in (round as usize % stride..a.len()).step_by(stride) {
                    write(key, &set[key], round);
                }
                round += 1;
            }
        });
        let _stop = StopOnDrop(&stop);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let mut searches = 0;
        for q in random_vectors(100_000, a[0].len(), query_seed) {
            if std::time::Instant::now() > deadline {
                break;
            }
            search(&q);
            searches += 1;
        }
        searches
    })
}

fn build(vectors: &[Vec<f32>]) -> Index {
    let dim = vectors[0].len();
    let index = Index::new(IndexParams::new(dim, Metric::L2).m(16)).unwrap();
    let keys: Vec<u64> = (0..vectors.len() as u64).collect();
    index.insert_many(&keys, vectors, 2, |_| {}).unwrap();
    index
}

/// The true top-k keys of `query` by `score` (higher is better).
fn brute_force(vectors: &[Vec<f32>], k: usize, score: impl Fn(&[f32]) -> f32) -> Vec<u64> {
    let mut all: Vec<(f32, u64)> = vectors
        .iter()
        .enumerate()
        .map(|(key, v)| (score(v), key as u64))
        .collect();
    all.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    all.into_iter().take(k).map(|(_, key)| key).collect()
}

fn recall(found: &[u64], truth: &[u64]) -> f64 {
    found.iter().filter(|k| truth.contains(k)).count() as f64 / truth.len() as f64
}

/// With the metric as the scorer, beam retrieval is as good as the
/// ordinary search: recall@10 against brute force, beside `search` at the
/// same layer-0 beam (ef 400) and at a typical ef (64).
#[test]
fn a_metric_scorer_matches_the_ordinary_search() {
    let vectors = random_vectors(20_000, 16, 1);
    let queries = random_vectors(200, 16, 2);
    let index = build(&vectors);
    let scorer = MetricScorer::new(Metric::L2);
    let params = BeamParams::default().top(10);
    let (mut beam, mut ef64, mut ef400) = (0.0, 0.0, 0.0);
    for q in &queries {
        let truth = brute_force(&vectors, 10, |v| -l2(q, v));
        let hits = index.search_with(&scorer, &q[..], &params).unwrap();
        assert_eq!(hits.len(), 10);
        for pair in hits.windows(2) {
            assert!(pair[0].score >= pair[1].score, "{hits:?}");
        }
        for hit in &hits {
            let d = l2(q, &vectors[hit.key as usize]);
            assert!((hit.score + d).abs() <= 1e-4 * d.max(1.0), "{hit:?} vs {d}");
        }
        let keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
        beam += recall(&keys, &truth);
        let ordinary = |ef| -> Vec<u64> {
            index
                .search(q, 10, ef)
                .unwrap()
                .iter()
                .map(|h| h.key)
                .collect()
        };
        ef64 += recall(&ordinary(64), &truth);
        ef400 += recall(&ordinary(400), &truth);
    }
    let n = queries.len() as f64;
    let (beam, ef64, ef400) = (beam / n, ef64 / n, ef400 / n);
    eprintln!("recall@10: beam retrieval {beam:.4}, search ef 64 {ef64:.4}, ef 400 {ef400:.4}");
    assert!(beam >= ef64, "beam {beam} below search at ef 64 ({ef64})");
    assert!(
        beam >= ef400 - 0.01,
        "beam {beam} vs search at ef 400 ({ef400})"
    );
}

/// Inner product as the "model": a similarity the graph (built with L2)
/// was not built for, as in NANN, where the graph proposes and the model
/// ranks. Uniform vectors in [0, 1)^16 with a query of mixed signs.
struct InnerProduct;

impl Scorer for InnerProduct {
    type Query = [f32];
    fn score_batch(
        &self,
        q: &[f32],
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> nann::Result<()> {
        for (i, score) in out.iter_mut().enumerate() {
            *score = q.iter().zip(batch.vector(i)).map(|(a, b)| a * b).sum();
        }
        Ok(())
    }
}

#[test]
fn a_foreign_similarity_is_served_from_the_metric_graph() {
    let vectors = random_vectors(20_000, 16, 3);
    let index = build(&vectors);
    let params = BeamParams::default().top(10);
    let mut total = 0.0;
    let queries = random_vectors(100, 16, 4);
    for q in &queries {
        let q: Vec<f32> = q.iter().map(|x| x - 0.5).collect();
        let truth = brute_force(&vectors, 10, |v| q.iter().zip(v).map(|(a, b)| a * b).sum());
        let hits = index.search_with(&InnerProduct, &q[..], &params).unwrap();
        let keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
        total += recall(&keys, &truth);
    }
    let r = total / queries.len() as f64;
    eprintln!("inner-product scorer on an L2 graph: recall@10 {r:.4}");
    assert!(r >= 0.9, "recall@10 {r}");
}

/// Wraps a scorer, counting its batches and candidates.
struct Counting<S> {
    inner: S,
    batches: std::cell::Cell<usize>,
    candidates: std::cell::Cell<usize>,
}

impl<S: Scorer> Scorer for Counting<S> {
    type Query = S::Query;
    fn score_batch(
        &self,
        q: &S::Query,
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> nann::Result<()> {
        self.batches.set(self.batches.get() + 1);
        self.candidates.set(self.candidates.get() + batch.len());
        assert_eq!(out.len(), batch.len());
        assert_eq!(batch.vectors().len(), batch.len() * batch.dim());
        self.inner.score_batch(q, batch, out)
    }
}

/// One batch for the top layer, then at most one per round below it; the
/// candidates scored stay well below a scan (about a quarter of this small
/// corpus at these beams: layer 0's three rounds fan out from up to 200
/// nodes with up to 32 neighbours each), and removed entries are never
/// returned.
#[test]
fn rounds_are_batches_and_removed_entries_stay_out() {
    let vectors = random_vectors(20_000, 16, 5);
    let index = build(&vectors);
    for key in (0..20_000u64).step_by(3) {
        index.remove(key).unwrap();
    }
    let scorer = Counting {
        inner: MetricScorer::new(Metric::L2),
        batches: Default::default(),
        candidates: Default::default(),
    };
    let params = BeamParams::default()
        .layers(&[(50, 1), (100, 2), (200, 3)])
        .top(50);
    for q in random_vectors(20, 16, 6) {
        scorer.batches.set(0);
        scorer.candidates.set(0);
        let hits = index.search_with(&scorer, &q[..], &params).unwrap();
        assert_eq!(hits.len(), 50);
        assert!(
            hits.iter().all(|h| h.key % 3 != 0),
            "a removed key: {hits:?}"
        );
        let mut keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), 50, "a key twice");
        assert!(
            scorer.batches.get() <= 1 + 2 + 3,
            "{} batches",
            scorer.batches.get()
        );
        assert!(
            scorer.candidates.get() < 20_000 / 2,
            "{} candidates",
            scorer.candidates.get()
        );
        eprintln!(
            "{} batches, {} candidates scored",
            scorer.batches.get(),
            scorer.candidates.get()
        );
    }
}

/// Parameters are checked, a scorer's error ends the search with it, and a
/// NaN score ranks last instead of breaking the order.
#[test]
fn bad_parameters_scorer_errors_and_nan_scores() {
    let index = build(&random_vectors(500, 4, 7));
    let scorer = MetricScorer::new(Metric::L2);
    let q = [0.5f32; 4];
    for params in [
        BeamParams::default().layers(&[]),
        BeamParams::default().layers(&[(0, 1)]),
        BeamParams::default().top(0),
    ] {
        assert!(matches!(
            index.search_with(&scorer, &q[..], &params),
            Err(Error::InvalidParameter { .. })
        ));
    }
    assert!(matches!(
        index.search_with(&scorer, &[0.5f32; 3][..], &BeamParams::default()),
        Err(Error::DimensionMismatch { .. })
    ));

    struct Failing;
    impl Scorer for Failing {
        type Query = ();
        fn score_batch(&self, _: &(), _: &CandidateBatch<'_>, _: &mut [f32]) -> nann::Result<()> {
            Err(Error::Scorer {
                message: "device lost".into(),
            })
        }
    }
    assert_eq!(
        index.search_with(&Failing, &(), &BeamParams::default()),
        Err(Error::Scorer {
            message: "device lost".into()
        })
    );

    /// NaN for odd keys: they must come after every even key.
    struct HalfNan;
    impl Scorer for HalfNan {
        type Query = ();
        fn score_batch(
            &self,
            _: &(),
            batch: &CandidateBatch<'_>,
            out: &mut [f32],
        ) -> nann::Result<()> {
            for (score, key) in out.iter_mut().zip(batch.keys()) {
                *score = if key % 2 == 1 { f32::NAN } else { *key as f32 };
            }
            Ok(())
        }
    }
    let hits = index
        .search_with(&HalfNan, &(), &BeamParams::default().top(500))
        .unwrap();
    let first_odd = hits
        .iter()
        .position(|h| h.key % 2 == 1)
        .unwrap_or(hits.len());
    assert!(hits[first_odd..].iter().all(|h| h.key % 2 == 1), "{hits:?}");
    assert!(hits[..first_odd]
        .windows(2)
        .all(|w| w[0].score >= w[1].score));
}

/// Beam retrieval while the entries move: an updater flips every key
/// between two known vectors while searches run. Each hit's score must be
/// the score of one of its key's two vectors (key and vector from one
/// version), keys unique, scores sorted.
#[test]
fn retrieval_during_updates_sees_whole_versions() {
    let n = 5_000usize;
    let a = random_vectors(n, 8, 11);
    let b = random_vectors(n, 8, 12);
    let index = build(&a);
    let scorer = MetricScorer::new(Metric::L2);
    let params = BeamParams::default().layers(&[(32, 1), (64, 2)]).top(20);
    let write = |key: usize, v: &[f32], _round: u32| index.update(key as u64, v).unwrap();
    let searches = search_while_alternating(&a, &b, 7, write, 13, |q| {
        let hits = index.search_with(&scorer, q, &params).unwrap();
        assert_eq!(hits.len(), 20);
        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
        let mut keys: Vec<u64> = hits.iter().map(|h| h.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), hits.len(), "a key twice: {hits:?}");
        for hit in &hits {
            let k = hit.key as usize;
            let whole = [&a[k], &b[k]].iter().any(|v| {
                let d = l2(q, v);
                (hit.score + d).abs() <= 1e-4 * d.max(1.0)
            });
            assert!(whole, "{hit:?} matches neither version of its key");
        }
    });
    assert!(searches > 0);
    index.check_invariants().unwrap();
}

/// Payload = (key, version) as two little-endian u32; version even means
/// vector set `a`, odd means set `b`.
fn version_payload(key: usize, version: u32) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&(key as u32).to_le_bytes());
    p[4..].copy_from_slice(&version.to_le_bytes());
    p
}

/// Fails the search when a candidate's payload belongs to another key or to
/// another version than its vector.
struct PayloadChecker<'a> {
    a: &'a [Vec<f32>],
    b: &'a [Vec<f32>],
}

impl Scorer for PayloadChecker<'_> {
    type Query = [f32];
    fn score_batch(
        &self,
        q: &[f32],
        batch: &CandidateBatch<'_>,
        out: &mut [f32],
    ) -> nann::Result<()> {
        for (i, score) in out.iter_mut().enumerate() {
            let p = batch.payload(i);
            let key = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as u64;
            let version = u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
            if key != batch.keys()[i] {
                return Err(Error::Scorer {
                    message: format!("payload of key {key} on candidate {}", batch.keys()[i]),
                });
            }
            let set = if version.is_multiple_of(2) {
                self.a
            } else {
                self.b
            };
            if batch.vector(i) != &set[key as usize][..] {
                return Err(Error::Scorer {
                    message: format!(
                        "key {key}: payload version {version} with another version's vector"
                    ),
                });
            }
            *score = -l2(q, batch.vector(i));
        }
        Ok(())
    }
}

#[test]
fn payloads_travel_with_their_vectors_during_updates() {
    let n = 3_000usize;
    let a = random_vectors(n, 8, 21);
    let b = random_vectors(n, 8, 22);
    let index = Index::new(IndexParams::new(8, Metric::L2).m(12).payload_len(8)).unwrap();
    for (key, v) in a.iter().enumerate() {
        index
            .insert_with_payload(key as u64, v, &version_payload(key, 0))
            .unwrap();
    }
    let scorer = PayloadChecker { a: &a, b: &b };
    let params = BeamParams::default().layers(&[(32, 1), (64, 2)]).top(20);
    let write = |key: usize, v: &[f32], round: u32| {
        index
            .update_with_payload(key as u64, v, &version_payload(key, round))
            .unwrap()
    };
    let searches = search_while_alternating(&a, &b, 5, write, 23, |q| {
        let hits = index.search_with(&scorer, q, &params).unwrap();
        assert_eq!(hits.len(), 20);
    });
    assert!(searches > 0);
    // A plain update keeps the payload it had.
    let (v, p) = index.get_with_payload(7).unwrap();
    index.update(7, &a[7]).unwrap();
    assert_eq!(index.get_payload(7).unwrap(), p);
    assert_ne!(v.len(), 0);
    index.check_invariants().unwrap();
}

#[test]
fn payload_length_and_save_are_checked() {
    let index = Index::new(IndexParams::new(2, Metric::L2).payload_len(4)).unwrap();
    index.insert(1, &[0.0, 0.0]).unwrap();
    assert_eq!(index.get_payload(1).unwrap(), vec![0; 4]);
    assert_eq!(
        index.insert_with_payload(2, &[0.0, 1.0], &[1, 2, 3]),
        Err(Error::PayloadLength {
            expected: 4,
            actual: 3
        })
    );
    assert_eq!(
        index.update_with_payload(1, &[0.0, 1.0], &[1; 5]),
        Err(Error::PayloadLength {
            expected: 4,
            actual: 5
        })
    );
    assert!(!index.contains(2));
    assert_eq!(
        index.get(1).unwrap(),
        vec![0.0, 0.0],
        "a rejected update changed nothing"
    );
    assert_eq!(index.get_payload(3), Err(Error::KeyNotFound(3)));
    // Removed and reinserted: the slot's old payload does not leak into the new entry.
    index.update_with_payload(1, &[0.0, 1.0], &[9; 4]).unwrap();
    index.remove(1).unwrap();
    index.insert(3, &[1.0, 1.0]).unwrap();
    index.collect_garbage();
    assert_eq!(index.get_payload(3).unwrap(), vec![0; 4]);
    // Saved files keep payloads (format version 2; tests/persist_payload.rs).
    let dir = std::env::temp_dir().join(format!("nann-payload-save-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    index.save(dir.join("x.nann")).unwrap();
    let reopened = Index::open(dir.join("x.nann")).unwrap();
    assert_eq!(reopened.get_payload(3).unwrap(), vec![0; 4]);
    assert_eq!(reopened.get_payload(1), Err(Error::KeyNotFound(1)));
    drop(reopened);
    std::fs::remove_dir_all(&dir).unwrap();
    // Without payloads, payloads are empty and only an empty one is accepted.
    let plain = Index::new(IndexParams::new(1, Metric::L2)).unwrap();
    plain.insert_with_payload(1, &[1.0], &[]).unwrap();
    assert_eq!(plain.get_payload(1).unwrap(), Vec::<u8>::new());
    assert!(plain.insert_with_payload(2, &[1.0], &[0]).is_err());
    assert!(Index::new(IndexParams::new(1, Metric::L2).payload_len(1 << 17)).is_err());
}
