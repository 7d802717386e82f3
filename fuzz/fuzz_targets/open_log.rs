//! Bytes as the update log of a durable index: `DurableIndex::open` over a
//! valid empty snapshot and this log (in `SimStorage`, no disk) must give
//! a typed error or an index that passes every invariant and takes a
//! write; never a panic. The first byte chooses whether the harness
//! reseals every record's checksum (walking the frames it can), so inputs
//! reach the record decoding behind the CRCs, as `open_structured` does
//! for index files. The stable stand-in is
//! `tests/durable.rs::damaged_or_crafted_logs_replay_a_prefix_or_fail_typed_never_panic`.
#![no_main]

use std::path::Path;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nann::persist::{SimStorage, Storage};
use nann::{Durability, DurableIndex, DurableOptions, IndexParams, Metric};

const DIM: usize = 4;

fn reseal(bytes: &mut [u8]) {
    if bytes.len() >= 32 {
        // Version-1 header checksum.
        let crc = crc32c(&bytes[..24]);
        bytes[24..28].copy_from_slice(&crc.to_le_bytes());
    }
    let mut at = 32;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let Some(end) = (at + 8).checked_add(len).filter(|&e| e <= bytes.len()) else {
            break;
        };
        let crc = crc32c(&bytes[at + 8..end]);
        bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
        at = end;
    }
}

/// CRC-32C (Castagnoli), bitwise: the harness's copy of the log's checksum.
fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82F6_3B78 & 0u32.wrapping_sub(crc & 1));
        }
    }
    !crc
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, log)) = data.split_first() else {
        return;
    };
    let storage = SimStorage::new(1);
    let options = DurableOptions::new(Durability::PerOp)
        .storage(Arc::new(storage.clone()) as Arc<dyn Storage>);
    // A valid snapshot (and its first log, which the input replaces).
    drop(DurableIndex::create("/db", IndexParams::new(DIM, Metric::L2), options.clone()).unwrap());
    let path = Path::new("/db/log-0000000000000001.wal");
    storage.remove(path).unwrap();
    let mut bytes = log.to_vec();
    if mode & 1 == 1 {
        reseal(&mut bytes);
    }
    let mut file = storage.create(path).unwrap();
    file.append(&bytes).unwrap();
    drop(file);
    let opened = DurableIndex::open("/db", options);
    if std::env::var_os("NANN_FUZZ_SHOW").is_some() {
        eprintln!("{:?}", opened.as_ref().map(|i| i.replay_report()));
    }
    if let Ok(index) = opened {
        index
            .index()
            .check_invariants()
            .expect("a replayed index must pass its invariants");
        index
            .insert(u64::MAX, &[0.5; DIM])
            .or_else(|_| index.update(u64::MAX, &[0.5; DIM]))
            .expect("a replayed index takes writes");
    }
});
