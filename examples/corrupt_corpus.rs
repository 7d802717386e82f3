//! The corruption corpus, run as a program so it can be built with
//! `panic = "abort"` (cargo ignores that setting for test binaries):
//!
//! ```sh
//! cargo run --profile corpus --example corrupt_corpus -- [--cases N] [--seed S] [--json]
//! ```
//!
//! It saves a handful of indexes (three metrics, several M, removals,
//! in-place updates, reused slots, an empty one, a one-entry one, one large
//! enough to have many upper layers), then opens damaged copies with
//! `Index::from_bytes` (validation including checksums). Each damage is
//! tried twice: as is, and **resealed** (every checksum recomputed), so
//! the structural validation behind the checksums is what stands guard.
//!
//! Damage kinds: truncation at every offset (files up to 64 KiB) and at
//! every section boundary +-16; single bit flips; runs of random bytes;
//! zeroed 4 KiB pages; aligned words set to boundary values (0, 1, n - 1,
//! n, n + 1, M0 + 1, 2^31, u32::MAX, ...); one section spliced in from
//! another save.
//!
//! Pass: every case is a typed `Error::Format` or an index that passes
//! `check_invariants()` and answers a search; no other error, and no panic
//! (which aborts the process: exit status non-zero). It also records the
//! peak heap of each open against the bound of the persistence issue,
//! 64 MiB + 1.1 x the file's length, and fails if any open exceeds it.
//! Prints a summary (or one JSON object with `--json`); exit 1 on failure.

use std::process::ExitCode;

use nann::{Error, Index, IndexParams, Metric};

#[path = "support/mod.rs"]
mod support;

#[global_allocator]
static ALLOCATOR: support::heap::Counting = support::heap::Counting;

/// splitmix64, so a seed reproduces a run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn vector(&mut self, dim: usize) -> Vec<f32> {
        (0..dim)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
            .collect()
    }
}

#[path = "../tests/support/forge.rs"]
mod forge;
use forge::{reseal, section_range, SECTIONS};

// ---- the base files ----

/// An index with several layers, removals, in-place updates and reused slots.
fn churned(n: u64, dim: usize, m: usize, metric: Metric, seed: u64) -> Index {
    let mut rng = Rng(seed);
    let index = Index::new(
        IndexParams::new(dim, metric)
            .m(m)
            .ef_construction(48)
            .seed(seed),
    )
    .expect("valid parameters");
    for key in 0..n {
        index.insert(key, &rng.vector(dim)).expect("insert");
    }
    for key in (0..n).step_by(7) {
        index.remove(key).expect("remove");
    }
    for key in (1..n).step_by(5) {
        if index.contains(key) {
            index.update(key, &rng.vector(dim)).expect("update");
        }
    }
    for key in n..n + n / 20 {
        index.insert(key, &rng.vector(dim)).expect("insert");
    }
    index
}

fn saved(index: &Index, name: &str) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("nann-corpus-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    index.save(&path).expect("save");
    let bytes = std::fs::read(&path).expect("read back");
    let _ = std::fs::remove_dir_all(&dir);
    bytes
}

// ---- the verdict on one damaged file ----

#[derive(Default)]
struct Tally {
    cases: usize,
    rejected: usize,
    accepted: usize,
    failures: Vec<String>,
    /// Largest (peak heap - 1.1 x file length) seen, in bytes, and the case.
    worst_heap_over_payload: i64,
    worst_heap_case: String,
}

impl Tally {
    fn open(&mut self, what: &str, bytes: &[u8], probe: &[f32]) {
        self.cases += 1;
        let (opened, _, peak) = support::heap::measured(|| Index::from_bytes(bytes));
        let over = peak as i64 - (bytes.len() as f64 * 1.1) as i64;
        if over > self.worst_heap_over_payload {
            self.worst_heap_over_payload = over;
            self.worst_heap_case = what.to_string();
        }
        if over > 64 << 20 {
            self.fail(format!(
                "{what}: open used {peak} bytes of heap for a {}-byte file",
                bytes.len()
            ));
        }
        match opened {
            Err(Error::Format(_)) => self.rejected += 1,
            Err(other) => self.fail(format!("{what}: not a format error: {other:?}")),
            Ok(index) => {
                self.accepted += 1;
                if let Err(violation) = index.check_invariants() {
                    self.fail(format!("{what}: accepted with {violation:?}"));
                }
                if index.dim() == probe.len() {
                    if let Err(e) = index.search(probe, 5, 32) {
                        self.fail(format!("{what}: accepted, then search failed: {e}"));
                    }
                }
            }
        }
    }

    fn fail(&mut self, message: String) {
        if self.failures.len() < 20 {
            eprintln!("FAIL {message}");
        }
        self.failures.push(message);
    }

    /// Opens `bytes` as is and resealed.
    fn both(&mut self, what: &str, mut bytes: Vec<u8>, probe: &[f32]) {
        self.open(what, &bytes, probe);
        reseal(&mut bytes);
        self.open(&format!("{what} (resealed)"), &bytes, probe);
    }
}

struct Args {
    cases: usize,
    seed: u64,
    json: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        cases: 20_000,
        seed: 1,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .ok_or_else(|| format!("{name} needs a value"))
                .and_then(|v| v.parse::<u64>().map_err(|e| format!("{name}: {e}")))
        };
        match flag.as_str() {
            "--cases" => args.cases = value("--cases")? as usize,
            "--seed" => args.seed = value("--seed")?,
            "--json" => args.json = true,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("corrupt_corpus: {e}");
            return ExitCode::from(2);
        }
    };
    let mut rng = Rng(args.seed);
    let bases: Vec<(&str, Vec<u8>, usize)> = vec![
        ("l2 m4", saved(&churned(150, 4, 4, Metric::L2, 11), "a"), 4),
        (
            "ip m6",
            saved(&churned(300, 6, 6, Metric::InnerProduct, 12), "b"),
            6,
        ),
        (
            "cos m4",
            saved(&churned(300, 6, 4, Metric::Cosine, 13), "c"),
            6,
        ),
        (
            "l2 m2 deep",
            saved(&churned(3000, 3, 2, Metric::L2, 14), "d"),
            3,
        ),
        (
            "empty",
            saved(
                &Index::new(IndexParams::new(4, Metric::L2)).expect("params"),
                "e",
            ),
            4,
        ),
        ("one", saved(&churned(1, 4, 4, Metric::L2, 15), "f"), 4),
    ];
    let mut tally = Tally::default();

    // Every base file opens as saved.
    for (name, bytes, dim) in &bases {
        let probe = rng.vector(*dim);
        tally.open(&format!("{name} undamaged"), bytes, &probe);
    }
    if tally.rejected > 0 || !tally.failures.is_empty() {
        eprintln!("FAIL an undamaged base file was rejected");
        return ExitCode::FAILURE;
    }

    // Deterministic damage: truncations and section boundaries.
    for (name, bytes, dim) in &bases {
        let probe = rng.vector(*dim);
        let mut cuts: Vec<usize> = if bytes.len() <= 64 * 1024 {
            (0..bytes.len()).collect()
        } else {
            (0..1000).map(|_| rng.below(bytes.len())).collect()
        };
        for i in 0..SECTIONS {
            if let Some(range) = section_range(bytes, i) {
                for edge in [range.start, range.end] {
                    cuts.extend(edge.saturating_sub(16)..(edge + 17).min(bytes.len()));
                }
            }
        }
        for cut in cuts {
            tally.both(
                &format!("{name} cut at {cut}"),
                bytes[..cut].to_vec(),
                &probe,
            );
        }
        // Zeroed 4 KiB pages, each one.
        for page in 0..bytes.len().div_ceil(4096) {
            let mut damaged = bytes.clone();
            let end = ((page + 1) * 4096).min(damaged.len());
            damaged[page * 4096..end].fill(0);
            tally.both(&format!("{name} page {page} zeroed"), damaged, &probe);
        }
    }

    // Random damage, spread over the base files.
    let other = saved(&churned(150, 4, 4, Metric::L2, 99), "g");
    for case in 0..args.cases {
        let (name, bytes, dim) = &bases[case % bases.len()];
        let probe = rng.vector(*dim);
        let mut damaged = bytes.clone();
        let kind = rng.below(5);
        let what = match kind {
            0 => {
                let bit = rng.below(damaged.len() * 8);
                damaged[bit / 8] ^= 1 << (bit % 8);
                format!("{name} bit {bit} flipped")
            }
            1 => {
                let at = rng.below(damaged.len());
                let run = 1 + rng.below(16);
                for b in damaged.iter_mut().skip(at).take(run) {
                    *b = rng.next() as u8;
                }
                format!("{name} {run} random bytes at {at}")
            }
            2 => {
                let at = rng.below(damaged.len() / 4) * 4;
                let n = u32::try_from(bytes.len() / 4).unwrap_or(u32::MAX);
                let values = [
                    0,
                    1,
                    2,
                    n.saturating_sub(1),
                    n,
                    n + 1,
                    9,
                    13,
                    17,
                    33,
                    0x8000_0000,
                    0x7fff_ffff,
                    u32::MAX,
                    u32::MAX - 1,
                    rng.next() as u32,
                ];
                let value = values[rng.below(values.len())];
                if let Some(word) = damaged.get_mut(at..at + 4) {
                    word.copy_from_slice(&value.to_le_bytes());
                }
                format!("{name} word at {at} = {value:#x}")
            }
            3 => {
                let page = rng.below(damaged.len().div_ceil(4096));
                let end = ((page + 1) * 4096).min(damaged.len());
                let at = page * 4096 + rng.below(end - page * 4096);
                let len = 1 + rng.below(end - at);
                damaged[at..at + len].fill(0);
                format!("{name} {len} bytes zeroed at {at}")
            }
            _ => {
                // One section from another save, where the sizes allow.
                let i = rng.below(SECTIONS);
                match (section_range(&damaged, i), section_range(&other, i)) {
                    (Some(mine), Some(theirs)) if mine.len() <= theirs.len() => {
                        let len = mine.len();
                        damaged[mine.clone()]
                            .copy_from_slice(&other[theirs.start..theirs.start + len]);
                    }
                    _ => damaged.truncate(damaged.len() / 2),
                }
                format!("{name} section {i} from another save")
            }
        };
        tally.both(&what, damaged, &probe);
    }

    let ok = tally.failures.is_empty();
    if args.json {
        println!(
            "{{\"cases\":{},\"rejected\":{},\"accepted_valid\":{},\"failures\":{},\"worst_heap_over_1_1x_payload_bytes\":{},\"seed\":{}}}",
            tally.cases,
            tally.rejected,
            tally.accepted,
            tally.failures.len(),
            tally.worst_heap_over_payload,
            args.seed
        );
    } else {
        println!(
            "seed {}: {} opens: {} rejected with a format error, {} accepted and valid, {} failures; \
             worst peak heap over 1.1 x file length: {} bytes (bound 64 MiB; {})",
            args.seed,
            tally.cases,
            tally.rejected,
            tally.accepted,
            tally.failures.len(),
            tally.worst_heap_over_payload,
            tally.worst_heap_case
        );
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
