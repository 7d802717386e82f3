//! A valid saved index, edited by the fuzzer's input, with every checksum
//! recomputed (the harness "reseals" the file), so the edits reach the
//! structural validation behind the checksums: counts, offsets, degrees,
//! neighbour ids, levels, anchors, keys, the entry point. The input is a
//! list of edits: 1 byte choosing the base file, then per edit 4 bytes of
//! offset and 4 bytes of value written little-endian at that (4-aligned)
//! offset. Same pass rule as `open_bytes`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nann::{Index, IndexParams, Metric};

#[path = "../../tests/support/forge.rs"]
mod forge;

/// Saved files to start from: small, with upper layers, removals and
/// in-place updates, in three metrics.
fn bases() -> &'static [Vec<u8>] {
    static BASES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    BASES.get_or_init(|| {
        [
            (Metric::L2, 4usize),
            (Metric::InnerProduct, 6),
            (Metric::Cosine, 2),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (metric, m))| {
            let dim = 4;
            let index = Index::new(IndexParams::new(dim, metric).m(m).seed(i as u64)).unwrap();
            for key in 0..120u64 {
                let x = key as f32 * 0.37 + i as f32;
                index
                    .insert(
                        key,
                        &[x.sin(), x.cos(), (x * 0.5).sin(), 0.25 + (x * 0.1).cos()],
                    )
                    .unwrap();
            }
            for key in (0..120u64).step_by(7) {
                index.remove(key).unwrap();
            }
            for key in (1..120u64).step_by(5) {
                if index.contains(key) {
                    let x = key as f32 * 0.11;
                    index.update(key, &[x.cos(), x.sin(), 0.5, -0.5]).unwrap();
                }
            }
            let path =
                std::env::temp_dir().join(format!("nann-fuzz-{}-{i}.nann", std::process::id()));
            index.save(&path).unwrap();
            let bytes = std::fs::read(&path).unwrap();
            let _ = std::fs::remove_file(&path);
            bytes
        })
        .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, edits)) = data.split_first() else {
        return;
    };
    let bases = bases();
    let mut bytes = bases[choice as usize % bases.len()].clone();
    for edit in edits.chunks_exact(8) {
        let at = u32::from_le_bytes(edit[..4].try_into().unwrap()) as usize % bytes.len();
        let at = at - at % 4;
        if let Some(word) = bytes.get_mut(at..at + 4) {
            word.copy_from_slice(&edit[4..]);
        }
    }
    forge::reseal(&mut bytes);
    if let Ok(index) = Index::from_bytes(&bytes) {
        index
            .check_invariants()
            .expect("an index that opened must pass its invariants");
        let probe = vec![0.25f32; index.dim()];
        index
            .search(&probe, 5, 32)
            .expect("search on an opened index");
    }
});
