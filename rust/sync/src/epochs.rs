//! Reading a range of type-1 and type-2 epoch files into event time lists for the
//! offset searches.
//!
//! Files are `<folder>/<epoch as 8 hex digits>`. All type-1 epochs are read first, then
//! all type-2 epochs, in epoch order (wrapping modulo 2^32), as the reference pfind does,
//! so the first bad file in that order is the one reported. Nothing waits for a missing
//! file: the search runs on epochs that are already complete.
//!
//! Behaviour that differs from the reference pfind on purpose:
//! - a type-1 file with header length 0 is read as an empty epoch (the reference rejects
//!   every such file through an operator-precedence error in its size test);
//! - a type-2 file whose last entry starts in its last data word decodes (the reference
//!   stops decoding one field early there and exits with status 237);
//! - files are read whole, with no 6.4 MB or 20 MB size limit.

use std::path::{Path, PathBuf};

use qkd_formats::epoch::file_path;
use qkd_formats::raw;
use qkd_formats::type1::{self, Type1File};
use qkd_formats::type2::{self, Type2File};

use crate::{EpochKind, SyncError};

/// How event times are laid out in the returned lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeBase {
    /// The reference pfind's times: type-2 `(epoch << 32) + differences`; type-1 the 49-bit
    /// event time plus pfind's epoch correction of the bits above 49. Only the low bits
    /// matter for binning, so this reproduces pfind's histograms exactly.
    Pfind,
    /// Both sides as 49-bit times (modulo 2^49, as the hardware counts), made continuous
    /// from the first epoch on: the layout the frequency search needs.
    Continuous,
}

/// Which consumed files to delete after reading (the reference's `-k` and `-K`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deletion {
    /// Delete each type-1 file once read (`-K`).
    pub type1: bool,
    /// Delete each type-2 file once read (`-k`).
    pub type2: bool,
}

/// Event times of both sides over a range of epochs, in ticks of 1/8 ns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EpochTimes {
    /// Side H (type-1) event times.
    pub type1: Vec<u64>,
    /// Side L (type-2) event times.
    pub type2: Vec<u64>,
}

/// Reads epochs `start .. start + count` (modulo 2^32) from both folders.
pub fn read_epoch_range(
    type1_dir: &Path,
    type2_dir: &Path,
    start: u32,
    count: u32,
    base: TimeBase,
    deletion: Deletion,
) -> Result<EpochTimes, SyncError> {
    if count == 0 {
        return Err(SyncError::InvalidParameter {
            name: "epoch count",
            value: "0".into(),
            expected: "at least 1 epoch".into(),
        });
    }
    let mut times = EpochTimes::default();
    for i in 0..count {
        let epoch = start.wrapping_add(i);
        let path = file_path(type1_dir, epoch);
        let file = read_type1(&path, epoch)?;
        append_type1_times(&file, epoch, start, base, &mut times.type1);
        if deletion.type1 {
            delete(EpochKind::Type1, &path)?;
        }
    }
    for i in 0..count {
        let epoch = start.wrapping_add(i);
        let path = file_path(type2_dir, epoch);
        let decoded = read_type2(&path, epoch)?;
        append_type2_times(&decoded, epoch, start, base, &mut times.type2);
        if deletion.type2 {
            delete(EpochKind::Type2, &path)?;
        }
    }
    log::info!(
        "read epochs {start:08x} to {:08x}: {} type-1 and {} type-2 events",
        start.wrapping_add(count - 1),
        times.type1.len(),
        times.type2.len()
    );
    Ok(times)
}

fn delete(kind: EpochKind, path: &Path) -> Result<(), SyncError> {
    std::fs::remove_file(path).map_err(|source| SyncError::DeleteFailed {
        kind,
        path: path.to_owned(),
        source,
    })
}

/// Reads a file and applies the reference's checks that come before decoding, so each
/// failure keeps the reference's error code.
fn read_checked(
    kind: EpochKind,
    path: &Path,
    epoch: u32,
    header_bytes: usize,
    file_type: u32,
) -> Result<Vec<u8>, SyncError> {
    let bytes = std::fs::read(path).map_err(|source| SyncError::MissingFile {
        kind,
        epoch,
        path: path.to_owned(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(SyncError::EmptyFile {
            kind,
            path: path.to_owned(),
        });
    }
    if bytes.len() < header_bytes {
        return Err(SyncError::ShortHeader {
            kind,
            path: path.to_owned(),
            len: bytes.len(),
            header: header_bytes,
        });
    }
    let tag = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes"));
    if tag != file_type && tag != (file_type | 0x100) {
        return Err(SyncError::WrongTag {
            kind,
            path: path.to_owned(),
            tag,
            expected: if file_type == 1 {
                "1 or 0x101"
            } else {
                "2 or 0x102"
            },
        });
    }
    Ok(bytes)
}

fn check_epoch(kind: EpochKind, path: &Path, expected: u32, found: u32) -> Result<(), SyncError> {
    if expected == found {
        Ok(())
    } else {
        Err(SyncError::EpochMismatch {
            kind,
            path: path.to_owned(),
            expected,
            found,
        })
    }
}

fn inconsistent(
    kind: EpochKind,
    path: &Path,
) -> impl FnOnce(qkd_formats::FormatError) -> SyncError {
    let path: PathBuf = path.to_owned();
    move |source| SyncError::Inconsistent { kind, path, source }
}

/// Reads and checks one type-1 file.
pub fn read_type1(path: &Path, epoch: u32) -> Result<Type1File, SyncError> {
    let kind = EpochKind::Type1;
    let bytes = read_checked(kind, path, epoch, type1::HEADER_BYTES, 1)?;
    let file = Type1File::parse(&bytes).map_err(inconsistent(kind, path))?;
    check_epoch(kind, path, epoch, file.header.epoch)?;
    Ok(file)
}

/// Reads, checks and decodes one type-2 file; returns its event times,
/// `(epoch << 32) + differences`.
pub fn read_type2(path: &Path, epoch: u32) -> Result<Vec<u64>, SyncError> {
    let kind = EpochKind::Type2;
    let bytes = read_checked(kind, path, epoch, type2::HEADER_BYTES, 2)?;
    let file = Type2File::parse(&bytes).map_err(inconsistent(kind, path))?;
    check_epoch(kind, path, epoch, file.header.epoch)?;
    let events = file.decode().map_err(inconsistent(kind, path))?;
    Ok(events.times)
}

/// Corrections of the epoch bits 17..31 indexed by
/// `(top two bits of the first event's high word) << 2 | (epoch bits 16 and 15)`,
/// added modulo 2^32, as the reference pfind tabulates them.
const EPOCH_CORRECTION: [i32; 16] = [
    0, 0x10000, 0, -0x10000, -0x10000, 0, 0x10000, 0, 0, -0x10000, 0, 0x10000, 0x10000, 0,
    -0x10000, 0,
];

/// The reference pfind's value for the type-1 time bits 49 and up: taken from the epoch
/// label with a table meant to absorb a wrap of the 17-bit raw epoch. It does not really
/// correct such a wrap, but it only reaches binning when `shift + order > 49`.
fn pfind_epoch_bits(epoch: u32, first_event: u64) -> u64 {
    let high_word = (first_event >> 32) as u32;
    let index = ((high_word >> 28) & 0xC) | ((epoch >> 15) & 3);
    let corrected = epoch.wrapping_add_signed(EPOCH_CORRECTION[index as usize]);
    u64::from(corrected & 0xFFFE_0000) << 32
}

const TIME_MASK_49: u64 = (1 << 49) - 1;

/// Makes a 49-bit time continuous from the start epoch on: epochs of the range lie less
/// than 2^49 ticks after the start, so the distance modulo 2^49 is the true one.
fn continuous(time: u64, start: u32) -> u64 {
    let base = u64::from(start & 0x1FFFF) << 32;
    base + (time.wrapping_sub(base) & TIME_MASK_49)
}

fn append_type1_times(
    file: &Type1File,
    epoch: u32,
    start: u32,
    base: TimeBase,
    out: &mut Vec<u64>,
) {
    let Some(&first) = file.events.first() else {
        return;
    };
    match base {
        TimeBase::Pfind => {
            let high = pfind_epoch_bits(epoch, first);
            out.extend(
                file.events
                    .iter()
                    .map(|&w| raw::time_ticks(w).wrapping_add(high)),
            );
        }
        TimeBase::Continuous => {
            out.extend(
                file.events
                    .iter()
                    .map(|&w| continuous(raw::time_ticks(w), start)),
            );
        }
    }
}

fn append_type2_times(times: &[u64], _epoch: u32, start: u32, base: TimeBase, out: &mut Vec<u64>) {
    match base {
        TimeBase::Pfind => out.extend_from_slice(times),
        TimeBase::Continuous => out.extend(times.iter().map(|&t| continuous(t, start))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_bits_follow_reference_table() {
        // Top event bits 0b01 and epoch bits 16..15 = 0b10: index 6 adds 0x10000, which
        // carries into bit 17.
        let first_event = 0x4000_0000u64 << 32;
        assert_eq!(
            pfind_epoch_bits(0x0001_0000, first_event),
            0x0002_0000u64 << 32
        );
        // Index 0: no correction; the low 17 epoch bits are masked off.
        assert_eq!(pfind_epoch_bits(0x0004_4f87, 0), 0x0004_0000u64 << 32);
    }

    #[test]
    fn continuous_unwraps_49_bit_times() {
        let start = 0x1_ffff;
        let late_in_start = (0x1_ffffu64 << 32) + 5;
        let after_wrap = 7;
        assert_eq!(continuous(late_in_start, start), late_in_start);
        assert_eq!(continuous(after_wrap, start), (1 << 49) + 7);
    }
}
