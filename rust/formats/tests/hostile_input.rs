//! Feeds every reader of the crate hostile input: random bytes, golden epoch files cut
//! short or with single bits flipped, and headers that claim huge lengths. Each reader must
//! return `Ok` or a `FormatError`; a panic fails the test. Each parse must also finish
//! quickly and allocate no more than the input size calls for, which the huge-length cases
//! check by handing over headers whose length fields alone would ask for gigabytes.
//!
//! The golden folder sits beside the checkout (`../shared/golden`); `QKD_GOLDEN` overrides.
//! The golden-based cases print why and pass without it; the random cases always run.

use std::fs;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use qkd_formats::raw::{self, Serialisation};
use qkd_formats::skew::DetectorSkew;
use qkd_formats::type1::Type1File;
use qkd_formats::type2::Type2File;
use qkd_formats::type3::Type3File;
use qkd_formats::type4::Type4File;
use qkd_formats::type7::Type7File;
use qkd_formats::{tdc1, timestamp7};

/// Runs every byte reader on `bytes` and drops the results, because only panics matter.
fn read_all_ways(bytes: &[u8]) {
    let _ = Type1File::parse(bytes);
    if let Ok(file) = Type2File::parse(bytes) {
        let _ = file.decode();
    }
    let _ = Type3File::parse(bytes);
    let _ = Type4File::parse(bytes);
    let _ = Type7File::parse(bytes);
    let mut words = Vec::new();
    let _ = raw::decode_into(bytes, Serialisation::Legacy, &mut words);
    words.clear();
    let _ = raw::decode_into(bytes, Serialisation::Native, &mut words);
    for name in ["a0", "a1", "a1X", "a2"] {
        let layout = timestamp7::Layout::parse(name).expect("known layout");
        words.clear();
        let _ = timestamp7::decode_into(bytes, layout, &mut words);
    }
    let _ = tdc1::decode(bytes, 0, DetectorSkew::NONE, false);
    let _ = tdc1::decode(
        bytes,
        u64::MAX,
        DetectorSkew::from_ticks([i64::MAX, i64::MIN, -1, 1]),
        true,
    );
}

fn le_words(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn golden_files() -> Vec<PathBuf> {
    let root = std::env::var_os("QKD_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden"));
    if !root.is_dir() {
        eprintln!(
            "skipped: golden folder {} not found; set QKD_GOLDEN",
            root.display()
        );
        return Vec::new();
    }
    let mut files = Vec::new();
    // One epoch file of each kind from the smallest case is enough to reach every branch.
    for sub in ["t1", "t2", "t3", "t4", "rawkey.lec", "rawkey.hec"] {
        let dir = root.join("tiny").join(sub);
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        files.extend(names.into_iter().take(2));
    }
    files
}

#[test]
fn damaged_golden_files_fail_cleanly() {
    for path in golden_files() {
        let bytes = fs::read(&path).unwrap();
        for cut in 0..bytes.len().min(200) {
            read_all_ways(&bytes[..cut]);
        }
        // Every single-bit flip of the header and of the first data words.
        for bit in 0..(8 * bytes.len().min(96)) {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            read_all_ways(&flipped);
        }
    }
}

#[test]
fn huge_header_lengths_fail_fast() {
    // Length fields at their maxima over a few words of data: a reader that trusted them
    // would ask for 2^32 entries (tens of gigabytes) or loop for minutes.
    let cases: Vec<Vec<u32>> = vec![
        vec![1, 0x4f87, u32::MAX, 49, 4, 0, 0],
        vec![2, 0x4f87, u32::MAX, 17, 4, 1, 0x0000_8000],
        vec![2, 0x4f87, u32::MAX, 2, 0, 1, 0xffff_ffff, 0xffff_ffff],
        vec![3, 0x4f87, u32::MAX, 8, 0],
        vec![3, 0x4f87, u32::MAX, u32::MAX, 0],
        vec![4, 0x4f87, u32::MAX, 8, 0, 0x0100_0000],
        vec![7, 0x4f87, u32::MAX, u32::MAX, 0],
        vec![7, 0x4f87, u32::MAX, i32::MAX as u32, 0],
        vec![0x102, 0x4f87, u32::MAX, 31, 1, 1, 0],
    ];
    for words in cases {
        read_all_ways(&le_words(&words));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        read_all_ways(&bytes);
    }

    /// A valid tag at the start reaches past the tag checks into the body of each parser.
    #[test]
    fn random_bodies_after_valid_tags(
        tag in prop::sample::select(vec![1u32, 2, 3, 4, 7, 0x101, 0x102, 0x103, 0x104, 0x107]),
        small in prop::collection::vec(0u32..40, 5),
        rest in prop::collection::vec(any::<u32>(), 0..24),
    ) {
        let mut words = vec![tag];
        words.extend(small);
        words.extend(rest);
        read_all_ways(&le_words(&words));
    }
}
