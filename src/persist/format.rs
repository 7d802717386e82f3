//! Format versions 1 and 2: the fixed header and section table, decoded by
//! hand.
//!
//! Version 2 is version 1 plus entry payloads: the header carries
//! `payload_len` (bytes per entry, 1..=65536) at offset 96 and the section
//! table a seventh section, `payloads`. An index without payloads is still
//! written as version 1, byte for byte as before; one with payloads is
//! written as version 2. This build reads both.
//!
//! Everything here is explicit little-endian byte arithmetic over `&[u8]`
//! with checked offsets: no rkyv, no casts, no `unsafe`. The header is what
//! decides whether the rest of the file may be looked at, so it must be
//! readable by a build whose rkyv format features differ from the writer's
//! (Cargo unifies features: any crate in a user's build can flip them).

use crate::distance::Metric;

use super::FormatError;

/// First 8 bytes of every index file.
pub(crate) const MAGIC: [u8; 8] = *b"NANNIDX\0";
/// The version written for an index without payloads (and read).
pub(crate) const VERSION_PLAIN: u32 = 1;
/// The version written for an index with payloads (and read): version 1
/// plus `payload_len` in the header and the `payloads` section.
pub(crate) const VERSION_PAYLOADS: u32 = 2;
/// Offset of `payload_len` (u32) in a version-2 header; version 1 leaves
/// the bytes from here to the section table zero.
pub(crate) const PAYLOAD_LEN_AT: usize = 96;
/// Alignment of every section offset (a cache line; rkyv needs 16).
pub(crate) const SECTION_ALIGN: u64 = 64;
/// Bytes of the fixed fields, before the section table.
const FIXED_LEN: usize = 128;
/// Bytes per section-table entry.
const ENTRY_LEN: usize = 32;

/// The sections of a file, in file order (`Payloads` in version 2 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum SectionKind {
    /// Level-0 records: `slots x (2 + M0)` u32 (lock word saved as 0).
    Level0 = 1,
    /// Cell word per slot: the slot itself, with the tombstone bit if removed.
    Cells = 2,
    /// Anchor per slot.
    Anchors = 3,
    /// Upper-layer blocks, in table order: `level, level x (1 + M)` u32 each.
    Upper = 4,
    /// `slots x dim` f32, one vector per slot.
    Vectors = 5,
    /// Key per slot (u64).
    Keys = 6,
    /// Version 2: `slots x ceil(payload_len / 4)` u32, one payload per slot:
    /// the payload's bytes in order, as little-endian words, the last word
    /// zero-padded; zeros for a slot that holds no entry.
    Payloads = 7,
}

/// The sections of a version-1 file, in file order.
pub(crate) const SECTION_KINDS: [SectionKind; 6] = [
    SectionKind::Level0,
    SectionKind::Cells,
    SectionKind::Anchors,
    SectionKind::Upper,
    SectionKind::Vectors,
    SectionKind::Keys,
];

/// The sections of a version-2 file, in file order.
pub(crate) const SECTION_KINDS_V2: [SectionKind; 7] = [
    SectionKind::Level0,
    SectionKind::Cells,
    SectionKind::Anchors,
    SectionKind::Upper,
    SectionKind::Vectors,
    SectionKind::Keys,
    SectionKind::Payloads,
];

/// The sections of a file of `version` (`None`: a version this build does
/// not read).
pub(crate) fn section_kinds(version: u32) -> Option<&'static [SectionKind]> {
    match version {
        VERSION_PLAIN => Some(&SECTION_KINDS),
        VERSION_PAYLOADS => Some(&SECTION_KINDS_V2),
        _ => None,
    }
}

impl SectionKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            SectionKind::Level0 => "level0",
            SectionKind::Cells => "cells",
            SectionKind::Anchors => "anchors",
            SectionKind::Upper => "upper",
            SectionKind::Vectors => "vectors",
            SectionKind::Keys => "keys",
            SectionKind::Payloads => "payloads",
        }
    }
}

/// rkyv's format controls in effect in a build (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RkyvFormat {
    /// 0 little-endian, 1 big-endian.
    pub(crate) big_endian: u8,
    /// 1 if archived primitives are unaligned.
    pub(crate) unaligned: u8,
    /// Bytes of a relative pointer (2, 4 or 8).
    pub(crate) pointer_width: u8,
}

impl RkyvFormat {
    /// The controls of this build, probed from rkyv itself.
    pub(crate) fn current() -> Self {
        // The archived form of 1u32 starts with 0 only under big-endian.
        let big_endian = rkyv::to_bytes::<rkyv::rancor::Error>(&1u32)
            .map(|bytes| bytes.first() == Some(&0))
            .unwrap_or(false);
        Self {
            big_endian: u8::from(big_endian),
            unaligned: u8::from(std::mem::align_of::<rkyv::Archived<u32>>() == 1),
            // `Archived<usize>` is rkyv's fixed-width size type, as wide as
            // its relative pointers.
            pointer_width: std::mem::size_of::<rkyv::Archived<usize>>() as u8,
        }
    }
}

/// One section-table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Section {
    pub(crate) kind: u32,
    pub(crate) align: u32,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) crc: u32,
}

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) version: u32,
    pub(crate) rkyv: RkyvFormat,
    pub(crate) metric: Metric,
    pub(crate) dim: u32,
    pub(crate) m: u32,
    pub(crate) ef_construction: u32,
    pub(crate) seed: u64,
    pub(crate) level_counter: u64,
    /// Slots saved (high-water mark).
    pub(crate) slots: u64,
    /// Live entries.
    pub(crate) live: u64,
    /// Upper-layer blocks.
    pub(crate) upper_count: u64,
    /// Entry slot and max level, or `u32::MAX` twice for an empty graph.
    pub(crate) entry_slot: u32,
    pub(crate) entry_level: u32,
    /// The last update-log sequence number the snapshot contains (0: none;
    /// see `DurableIndex`). Offset 88; older writers left it zero.
    pub(crate) log_lsn: u64,
    /// Total file length the writer produced.
    pub(crate) file_len: u64,
    /// Payload bytes per entry: 0 in version 1, 1..=65536 in version 2
    /// (offset 96).
    pub(crate) payload_len: u32,
    pub(crate) sections: Vec<Section>,
}

fn metric_code(metric: Metric) -> u8 {
    match metric {
        Metric::L2 => 1,
        Metric::InnerProduct => 2,
        Metric::Cosine => 3,
    }
}

fn metric_from_code(code: u8) -> Option<Metric> {
    match code {
        1 => Some(Metric::L2),
        2 => Some(Metric::InnerProduct),
        3 => Some(Metric::Cosine),
        _ => None,
    }
}

/// Header length for `sections` entries (fixed fields, table, checksum),
/// rounded up to the section alignment.
pub(crate) fn header_len(sections: usize) -> u64 {
    let raw = (FIXED_LEN + sections * ENTRY_LEN + 4) as u64;
    raw.next_multiple_of(SECTION_ALIGN)
}

impl Header {
    /// Encodes the header (padded to `header_len`), checksum included.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(header_len(self.sections.len()) as usize);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.push(self.rkyv.big_endian);
        out.push(self.rkyv.unaligned);
        out.push(self.rkyv.pointer_width);
        out.push(metric_code(self.metric));
        out.extend_from_slice(&self.dim.to_le_bytes());
        out.extend_from_slice(&self.m.to_le_bytes());
        out.extend_from_slice(&self.ef_construction.to_le_bytes());
        out.extend_from_slice(&(self.sections.len() as u32).to_le_bytes());
        for v in [
            self.seed,
            self.level_counter,
            self.slots,
            self.live,
            self.upper_count,
            self.file_len,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.entry_slot.to_le_bytes());
        out.extend_from_slice(&self.entry_level.to_le_bytes());
        out.extend_from_slice(&self.log_lsn.to_le_bytes());
        if self.version == VERSION_PAYLOADS {
            // Version 1 leaves these bytes zero (written by the resize).
            debug_assert_eq!(out.len(), PAYLOAD_LEN_AT);
            out.extend_from_slice(&self.payload_len.to_le_bytes());
        }
        out.resize(FIXED_LEN, 0);
        for s in &self.sections {
            out.extend_from_slice(&s.kind.to_le_bytes());
            out.extend_from_slice(&s.align.to_le_bytes());
            out.extend_from_slice(&s.offset.to_le_bytes());
            out.extend_from_slice(&s.len.to_le_bytes());
            out.extend_from_slice(&s.crc.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out.resize(header_len(self.sections.len()) as usize, 0);
        out
    }

    /// Decodes and checks the header at the start of `file`: magic, version,
    /// checksum, format controls, parameters, and a section table whose
    /// sections lie inside the file, aligned and without overlap, in the
    /// order of the file's version; for version 2, `payload_len` in
    /// 1..=65536. Nothing is allocated from a count before the count has
    /// been bounded by the file length.
    pub(crate) fn decode(file: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader { bytes: file, at: 0 };
        let magic = r.take(8)?;
        if magic != MAGIC {
            return Err(FormatError::NotAnIndex);
        }
        let version = r.u32()?;
        let Some(kinds) = section_kinds(version) else {
            return Err(FormatError::UnsupportedVersion { found: version });
        };
        let rkyv = RkyvFormat {
            big_endian: r.u8()?,
            unaligned: r.u8()?,
            pointer_width: r.u8()?,
        };
        let metric_raw = r.u8()?;
        let dim = r.u32()?;
        let m = r.u32()?;
        let ef_construction = r.u32()?;
        let section_count = r.u32()? as usize;
        if section_count != kinds.len() {
            return Err(FormatError::Corrupt(format!(
                "the header lists {section_count} sections; version {version} has {}",
                kinds.len()
            )));
        }
        let table_end = FIXED_LEN + section_count * ENTRY_LEN;
        if file.len() < table_end + 4 {
            return Err(FormatError::Truncated {
                needed: (table_end + 4) as u64,
                found: file.len() as u64,
            });
        }
        let stored_crc = u32::from_le_bytes(
            file[table_end..table_end + 4]
                .try_into()
                .map_err(|_| FormatError::Corrupt("header checksum".into()))?,
        );
        if crc32c::crc32c(&file[..table_end]) != stored_crc {
            return Err(FormatError::HeaderChecksum);
        }
        // From here on the header is what the writer wrote (or a deliberate
        // forgery with a recomputed checksum: every field is still checked).
        let here = RkyvFormat::current();
        if rkyv != here {
            return Err(FormatError::IncompatibleFormat(format!(
                "written with rkyv format controls {rkyv:?}, this build uses {here:?} \
                 (a crate in the build may have enabled an rkyv format feature)"
            )));
        }
        let metric = metric_from_code(metric_raw)
            .ok_or_else(|| FormatError::Corrupt(format!("unknown metric code {metric_raw}")))?;
        let seed = r.u64()?;
        let level_counter = r.u64()?;
        let slots = r.u64()?;
        let live = r.u64()?;
        let upper_count = r.u64()?;
        let file_len = r.u64()?;
        let entry_slot = r.u32()?;
        let entry_level = r.u32()?;
        let log_lsn = r.u64()?;
        let payload_len = if version == VERSION_PAYLOADS {
            r.at = PAYLOAD_LEN_AT;
            let n = r.u32()?;
            if n == 0 || n as usize > crate::params::MAX_PAYLOAD_LEN {
                return Err(FormatError::Corrupt(format!(
                    "the header says entries carry {n}-byte payloads; a version-2 file \
                     needs 1..={} (the file is damaged or was not written by nann)",
                    crate::params::MAX_PAYLOAD_LEN
                )));
            }
            n
        } else {
            // Version 1 has no payloads; the bytes are not read (writers
            // left them zero).
            0
        };
        if file_len != file.len() as u64 {
            return Err(if (file.len() as u64) < file_len {
                FormatError::Truncated {
                    needed: file_len,
                    found: file.len() as u64,
                }
            } else {
                FormatError::Corrupt(format!(
                    "the file is {} bytes but its header says {file_len}",
                    file.len()
                ))
            });
        }
        r.at = FIXED_LEN;
        let mut sections = Vec::with_capacity(section_count);
        let mut previous_end = header_len(section_count);
        for &kind in kinds {
            let s = Section {
                kind: r.u32()?,
                align: r.u32()?,
                offset: r.u64()?,
                len: r.u64()?,
                crc: r.u32()?,
            };
            let _reserved = r.u32()?;
            let name = kind.name();
            if s.kind != kind as u32 {
                return Err(FormatError::Corrupt(format!(
                    "section table entry for {name} has kind {}",
                    s.kind
                )));
            }
            if s.align as u64 != SECTION_ALIGN || !s.offset.is_multiple_of(SECTION_ALIGN) {
                return Err(FormatError::Corrupt(format!(
                    "section {name} is not {SECTION_ALIGN}-byte aligned"
                )));
            }
            let end = s
                .offset
                .checked_add(s.len)
                .ok_or_else(|| FormatError::Corrupt(format!("section {name} length overflows")))?;
            if s.offset < previous_end {
                return Err(FormatError::Corrupt(format!(
                    "section {name} overlaps the header or the previous section"
                )));
            }
            if end > file.len() as u64 {
                return Err(FormatError::Truncated {
                    needed: end,
                    found: file.len() as u64,
                });
            }
            previous_end = end;
            sections.push(s);
        }
        Ok(Self {
            version,
            rkyv,
            metric,
            dim,
            m,
            ef_construction,
            seed,
            level_counter,
            slots,
            live,
            upper_count,
            entry_slot,
            entry_level,
            log_lsn,
            file_len,
            payload_len,
            sections,
        })
    }

    /// The sections of this header's version, in file order.
    pub(crate) fn kinds(&self) -> &'static [SectionKind] {
        section_kinds(self.version).unwrap_or(&SECTION_KINDS)
    }

    /// The bytes of section `kind` (bounds were checked by `decode`; empty
    /// for a section the file does not have).
    pub(crate) fn section<'f>(&self, file: &'f [u8], kind: SectionKind) -> &'f [u8] {
        self.sections
            .iter()
            .find(|s| s.kind == kind as u32)
            .and_then(|s| file.get(s.offset as usize..(s.offset + s.len) as usize))
            .unwrap_or(&[])
    }
}

/// A bounds-checked little-endian cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(FormatError::Truncated {
                needed: (self.at + n) as u64,
                found: self.bytes.len() as u64,
            });
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}
