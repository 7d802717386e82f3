//! Prints what an index file holds and whether it is valid.
//!
//! ```sh
//! cargo run --release --example inspect -- PATH
//! ```
//!
//! Exit status 0 on a valid file, 1 (with the typed error's message) on an
//! invalid one, 2 on a usage error. The file is read into memory, never
//! mapped, so inspecting a file that is being replaced is safe.

use std::io::Write;
use std::process::ExitCode;

/// `println!` that ignores a closed pipe (`inspect FILE | head` must not panic).
macro_rules! out {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

use nann::{FileInfo, Index};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [path] = args.as_slice() else {
        eprintln!("usage: inspect PATH");
        return ExitCode::from(2);
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            out!("file: {path}");
            out!("invalid: cannot read: {e}");
            return ExitCode::from(1);
        }
    };
    out!("file: {path} ({} bytes)", bytes.len());
    match FileInfo::read(&bytes) {
        Ok(info) => {
            out!("format version: {}", info.version);
            let (be, unaligned, width) = info.rkyv_format;
            out!(
                "rkyv format: {}-endian, {}, {}-byte relative pointers",
                if be { "big" } else { "little" },
                if unaligned { "unaligned" } else { "aligned" },
                width
            );
            out!(
                "metric: {:?}  dim: {}  M: {}  ef_construction: {}",
                info.metric,
                info.dim,
                info.m,
                info.ef_construction
            );
            out!(
                "slots: {}  live: {}  removed or unpublished: {}  nodes with upper layers: {}",
                info.slots,
                info.live,
                info.slots.saturating_sub(info.live),
                info.upper_blocks
            );
            if info.payload_len > 0 {
                out!("payload: {} bytes per entry", info.payload_len);
            }
            match info.entry {
                Some((slot, level)) => out!("entry point: slot {slot}, max level {level}"),
                None => out!("entry point: none (empty graph)"),
            }
            out!("sections:");
            out!(
                "  {:<8} {:>12} {:>12}  {:>10}",
                "name",
                "offset",
                "length",
                "crc32c"
            );
            for (name, offset, len, crc) in &info.sections {
                out!("  {name:<8} {offset:>12} {len:>12}  {crc:>#10x}");
            }
        }
        Err(e) => {
            out!("invalid: {e}");
            return ExitCode::from(1);
        }
    }
    match Index::from_bytes(&bytes) {
        Ok(index) => {
            out!("valid: checksums, archives, structure and graph invariants all pass ({} live entries)", index.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            out!("invalid: {e}");
            ExitCode::from(1)
        }
    }
}
