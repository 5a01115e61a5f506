//! The offset search against the reference pfind's outputs on the golden cases.

use std::path::PathBuf;

use qkd_sync::{Deletion, OffsetFinder, PfindParams};

fn golden(case: &str) -> Option<PathBuf> {
    let root = std::env::var_os("QKD_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden")
        });
    let dir = root.join(case);
    if dir.join("t1").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: golden case {case} not found at {}",
            dir.display()
        );
        None
    }
}

/// Returns the first epoch and the count of the pfind run of a golden case.
fn pfind_range(dir: &std::path::Path) -> (u32, u32) {
    let commands = std::fs::read_to_string(dir.join("commands.log")).unwrap();
    let line = commands.lines().find(|l| l.starts_with("pfind ")).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    let value = |flag: &str| words[words.iter().position(|w| *w == flag).unwrap() + 1];
    let start = u32::from_str_radix(value("-e").trim_start_matches("0x"), 16).unwrap();
    (start, value("-n").parse().unwrap())
}

#[test]
fn golden_offsets_and_lines_match_reference() {
    for case in ["tiny", "realistic", "noisy", "fail"] {
        let Some(dir) = golden(case) else { continue };
        let (start, count) = pfind_range(&dir);
        let params = PfindParams {
            buffer_order: 17,
            fine_resolution_ns: 1,
            coarse_resolution_ns: 2048,
        };
        let mut finder = OffsetFinder::new(params).unwrap();
        let result = finder
            .find_in_folders(
                &dir.join("t1"),
                &dir.join("t2"),
                start,
                count,
                Deletion::default(),
            )
            .unwrap();
        let expected = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap();
        assert_eq!(
            result.report(0, &params),
            expected("pfind.stdout"),
            "{case} -V 0"
        );
        assert_eq!(
            result.report(3, &params),
            expected("pfind_V3.stdout"),
            "{case} -V 3"
        );
        assert_eq!(
            result.diagnostic_line(start),
            expected("pfind.stderr"),
            "{case} stderr"
        );
    }
}
