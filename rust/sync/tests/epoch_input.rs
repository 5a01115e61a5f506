//! Offset search on epoch files the tests write themselves: good files, files the
//! reference rejects, and broken files.

use std::fs;
use std::path::Path;

use qkd_formats::{type1, type2};
use qkd_sync::{Deletion, EpochKind, OffsetFinder, PfindParams, SyncError};

const OFFSET_TICKS: u64 = 4_000;
const PARAMS: PfindParams = PfindParams {
    buffer_order: 14,
    fine_resolution_ns: 1,
    coarse_resolution_ns: 2048,
};

/// Event times of one epoch, irregularly spaced by 2000 to 32000 ticks (so the
/// correlation has a single peak and every type-2 entry fits a 15-bit time field); side
/// L, `OFFSET_TICKS` later, stays inside the epoch.
fn epoch_times(epoch: u32, events: u64) -> Vec<u64> {
    let mut state = u64::from(epoch) | 1;
    let mut t = u64::from(epoch) << 32;
    (0..events)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            t += 8 * (250 + state % 3750);
            t
        })
        .collect()
}

fn write_type1(dir: &Path, epoch: u32, times: &[u64]) {
    let words: Vec<u64> = times.iter().map(|&t| (t << 15) | 1).collect();
    type1::write(&dir.join(format!("{epoch:08x}")), epoch, false, &words).unwrap();
}

/// Writes side L's file for the side H times: BBM92 protocol, time order `order`.
fn write_type2(dir: &Path, epoch: u32, times: &[u64], order: u32) {
    let shifted: Vec<u64> = times.iter().map(|&t| t + OFFSET_TICKS).collect();
    let values = vec![0u8; shifted.len()];
    let bytes = type2::encode(epoch, false, order, 1, &shifted, &values).unwrap();
    fs::write(dir.join(format!("{epoch:08x}")), bytes).unwrap();
}

struct Folders {
    _root: tempfile::TempDir,
    t1: std::path::PathBuf,
    t2: std::path::PathBuf,
}

fn folders() -> Folders {
    let root = tempfile::tempdir().unwrap();
    let (t1, t2) = (root.path().join("t1"), root.path().join("t2"));
    fs::create_dir(&t1).unwrap();
    fs::create_dir(&t2).unwrap();
    Folders {
        _root: root,
        t1,
        t2,
    }
}

fn linked_epochs(first: u32, count: u32, events: u64) -> Folders {
    let f = folders();
    for epoch in first..first + count {
        let times = epoch_times(epoch, events);
        write_type1(&f.t1, epoch, &times);
        write_type2(&f.t2, epoch, &times, 20);
    }
    f
}

fn search(f: &Folders, first: u32, count: u32) -> Result<qkd_sync::OffsetResult, SyncError> {
    OffsetFinder::new(PARAMS).unwrap().find_in_folders(
        &f.t1,
        &f.t2,
        first,
        count,
        Deletion::default(),
    )
}

#[test]
fn written_epochs_give_their_offset() {
    let f = linked_epochs(0x100, 3, 3000);
    let result = search(&f, 0x100, 3).unwrap();
    assert_eq!(result.offset_ticks, OFFSET_TICKS as i64);
    assert_eq!(result.type1_events, 9000);
    assert_eq!(result.type2_events, 9000);
}

#[test]
fn type2_with_last_entry_in_final_word_decodes() {
    // With time order 15 and 1 base bit every entry is 16 bits wide. With an odd event
    // count the last event starts exactly at the final data word, where the reference
    // stops decoding one field early and exits with status 237.
    let f = folders();
    let epoch = 0x200;
    let times = epoch_times(epoch, 1001);
    write_type1(&f.t1, epoch, &times);
    write_type2(&f.t2, epoch, &times, 15);
    let bytes = fs::read(f.t2.join("00000200")).unwrap();
    let words = (bytes.len() - 24) / 4;
    assert_eq!(
        words * 32,
        16 * (1001 + 1),
        "last event must start the final word"
    );

    let result = search(&f, epoch, 1).unwrap();
    assert_eq!(result.type2_events, 1001);
    assert_eq!(result.offset_ticks, OFFSET_TICKS as i64);
}

#[test]
fn type1_with_header_length_zero_is_an_empty_epoch() {
    let f = linked_epochs(0x300, 2, 2000);
    // A valid empty type-1 file: header with length 0, then the zero terminator.
    write_type1(&f.t1, 0x302, &[]);
    write_type2(&f.t2, 0x302, &epoch_times(0x302, 10), 20);
    let result = search(&f, 0x300, 3).unwrap();
    assert_eq!(result.type1_events, 4000);
    assert_eq!(result.offset_ticks, OFFSET_TICKS as i64);
}

#[test]
fn only_empty_type1_epochs_are_an_error() {
    let f = folders();
    write_type1(&f.t1, 0x400, &[]);
    write_type2(&f.t2, 0x400, &epoch_times(0x400, 10), 20);
    let err = search(&f, 0x400, 1).unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::NoEvents {
                kind: EpochKind::Type1,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("epochs 00000400 to 00000400"),
        "{err}"
    );
    assert_eq!(err.pfind_code(), None);
}

#[test]
fn missing_type1_file_names_path_and_code() {
    let f = linked_epochs(0x500, 2, 100);
    fs::remove_file(f.t1.join("00000501")).unwrap();
    let err = search(&f, 0x500, 2).unwrap_err();
    assert!(err.to_string().contains("00000501"), "{err}");
    assert_eq!(err.pfind_code(), Some(20));
}

#[test]
fn epochs_that_do_not_overlap_report_missing_file() {
    let f = folders();
    for epoch in 0x600..0x603 {
        write_type1(&f.t1, epoch, &epoch_times(epoch, 100));
    }
    for epoch in 0x700..0x703 {
        write_type2(&f.t2, epoch, &epoch_times(epoch, 100), 20);
    }
    let err = search(&f, 0x600, 3).unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::MissingFile {
                kind: EpochKind::Type2,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(err.pfind_code(), Some(23));
}

#[test]
fn truncated_files_are_rejected_with_reference_codes() {
    let f = linked_epochs(0x800, 1, 500);
    let t1_path = f.t1.join("00000800");
    let whole = fs::read(&t1_path).unwrap();
    let cases: [(&[u8], u8); 3] = [
        (&[], 12),
        (&whole[..12], 14),
        (&whole[..whole.len() - 5], 15),
    ];
    for (bytes, code) in cases {
        fs::write(&t1_path, bytes).unwrap();
        let err = search(&f, 0x800, 1).unwrap_err();
        assert_eq!(err.pfind_code(), Some(code), "{} bytes: {err}", bytes.len());
    }

    fs::write(&t1_path, &whole).unwrap();
    let t2_path = f.t2.join("00000800");
    let whole = fs::read(&t2_path).unwrap();
    fs::write(&t2_path, &whole[..whole.len() - 8]).unwrap();
    let err = search(&f, 0x800, 1).unwrap_err();
    assert_eq!(err.pfind_code(), Some(19), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn wrong_tag_and_epoch_are_rejected() {
    let f = linked_epochs(0x900, 1, 50);
    let path = f.t1.join("00000900");
    let mut bytes = fs::read(&path).unwrap();
    bytes[0] = 3;
    fs::write(&path, &bytes).unwrap();
    assert_eq!(search(&f, 0x900, 1).unwrap_err().pfind_code(), Some(27));

    bytes[0] = 1;
    bytes[4] = 0x01;
    fs::write(&path, &bytes).unwrap();
    let err = search(&f, 0x900, 1).unwrap_err();
    assert_eq!(err.pfind_code(), Some(21), "{err}");
    assert!(err.to_string().contains("00000901"), "{err}");
}

#[test]
fn deletion_removes_consumed_files() {
    let f = linked_epochs(0xa00, 2, 200);
    let deletion = Deletion {
        type1: true,
        type2: true,
    };
    OffsetFinder::new(PARAMS)
        .unwrap()
        .find_in_folders(&f.t1, &f.t2, 0xa00, 2, deletion)
        .unwrap();
    assert_eq!(fs::read_dir(&f.t1).unwrap().count(), 0);
    assert_eq!(fs::read_dir(&f.t2).unwrap().count(), 0);
}
