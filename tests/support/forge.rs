//! Forging index files: the parts of format v1's header (src/persist/format.rs)
//! a test needs to edit a saved file and recompute its checksums, so the
//! structural validation behind the checksums is what a damaged file meets.
//! Shared by `tests/persist.rs` and `examples/corrupt_corpus.rs` (included
//! with `#[path]`). The CRC is written out here, independent of the crate's.
#![allow(dead_code)]

/// Fixed header bytes before the section table.
pub const FIXED_LEN: usize = 128;
/// Bytes per section-table entry (kind, align, offset, length, checksum).
pub const ENTRY_LEN: usize = 32;
/// Sections in a version-1 file.
pub const SECTIONS: usize = 6;

/// Byte range of section `index` as the table states it (`None` if the
/// table itself is cut off or the range overflows).
pub fn section_range(bytes: &[u8], index: usize) -> Option<std::ops::Range<usize>> {
    let e = FIXED_LEN + index * ENTRY_LEN;
    let offset = u64::from_le_bytes(bytes.get(e + 8..e + 16)?.try_into().ok()?) as usize;
    let len = u64::from_le_bytes(bytes.get(e + 16..e + 24)?.try_into().ok()?) as usize;
    Some(offset..offset.checked_add(len)?)
}

/// Recomputes every section checksum and the header checksum, as far as
/// the (possibly damaged) table still lets it find them.
pub fn reseal(bytes: &mut [u8]) {
    for i in 0..SECTIONS {
        let Some(range) = section_range(bytes, i) else {
            continue;
        };
        let Some(section) = bytes.get(range) else {
            continue; // an edited table entry: only the header is resealed
        };
        let crc = crc32c(section);
        let e = FIXED_LEN + i * ENTRY_LEN;
        if let Some(slot) = bytes.get_mut(e + 24..e + 28) {
            slot.copy_from_slice(&crc.to_le_bytes());
        }
    }
    let table_end = FIXED_LEN + SECTIONS * ENTRY_LEN;
    if bytes.len() >= table_end + 4 {
        let crc = crc32c(&bytes[..table_end]);
        bytes[table_end..table_end + 4].copy_from_slice(&crc.to_le_bytes());
    }
}

/// Bitwise CRC32C (Castagnoli, reflected).
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
