//! Time of an offset search at buffer orders 17, 23 and 26, next to the time to merely
//! read the same epoch files, so docs/benchmarks.md can report the ratio.
//!
//! Input: the golden case "realistic" (20 epochs, 1.07e6 type-1 and 2.1e5 type-2 events)
//! when ../shared/golden exists or QKD_GOLDEN points to it, else 20 synthetic epochs of
//! the same size written to a temporary folder.

use std::path::{Path, PathBuf};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use qkd_formats::{type1, type2};
use qkd_sync::epochs::read_epoch_range;
use qkd_sync::{Deletion, OffsetFinder, PfindParams, TimeBase};

const START: u32 = 0x4f87;
const EPOCHS: u32 = 20;

/// Returns (type-1 folder, type-2 folder) and the temporary folder that keeps them alive.
fn input() -> (PathBuf, PathBuf, Option<tempfile::TempDir>) {
    let root = std::env::var_os("QKD_GOLDEN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden"));
    let case = root.join("realistic");
    if case.join("t1").is_dir() {
        return (case.join("t1"), case.join("t2"), None);
    }
    let tmp = tempfile::tempdir().unwrap();
    let (t1, t2) = (tmp.path().join("t1"), tmp.path().join("t2"));
    std::fs::create_dir(&t1).unwrap();
    std::fs::create_dir(&t2).unwrap();
    for epoch in START..START + EPOCHS {
        let base = u64::from(epoch) << 32;
        let h: Vec<u64> = (1..=53_000u64).map(|i| base + i * 81_000).collect();
        let words: Vec<u64> = h.iter().map(|&t| (t << 15) | 1).collect();
        type1::write(&t1.join(format!("{epoch:08x}")), epoch, false, &words).unwrap();
        let l: Vec<u64> = h.iter().step_by(5).map(|&t| t + 34_592).collect();
        let bytes = type2::encode(epoch, false, 17, 1, &l, &vec![0; l.len()]).unwrap();
        std::fs::write(t2.join(format!("{epoch:08x}")), bytes).unwrap();
    }
    (t1, t2, Some(tmp))
}

fn bench(c: &mut Criterion) {
    let (t1, t2, _keep) = input();
    let mut group = c.benchmark_group("pfind");
    group.sample_size(10);
    group.bench_function("read epochs", |b| {
        b.iter(|| {
            read_epoch_range(
                &t1,
                &t2,
                START,
                EPOCHS,
                TimeBase::Pfind,
                Deletion::default(),
            )
            .unwrap()
        })
    });
    for order in [17u32, 23, 26] {
        let params = PfindParams {
            buffer_order: order,
            fine_resolution_ns: 1,
            coarse_resolution_ns: 2048,
        };
        let mut finder = OffsetFinder::new(params).unwrap();
        group.bench_with_input(BenchmarkId::new("read and find", order), &order, |b, _| {
            b.iter(|| {
                finder
                    .find_in_folders(&t1, &t2, START, EPOCHS, Deletion::default())
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
