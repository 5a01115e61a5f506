//! Throughput of chopper and chopper2 on 3.2e7 events, against the time needed merely to
//! decode and sum the same legacy-serialised input in the same run.
//!
//! The input is 40 epochs of 8e5 events each (about 1.5e6 events/s), patterns cycling
//! over the four detectors, with uniform random gaps from a fixed-seed generator. Every
//! case reads the input from a file in 4 MiB blocks. The choppers write their epoch files
//! into a fresh temporary folder per iteration, and the `_no_output` cases discard them.

use std::fs::File;
use std::hint::black_box;
use std::io::Read;
use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use qkd_chopping::{Chopper, Chopper2, Chopper2Config, ChopperConfig, Destination};

const EPOCHS: u64 = 40;
const EVENTS_PER_EPOCH: u64 = 800_000;
/// Read size of the input, as the command-line tools use.
const BLOCK_BYTES: usize = 4 << 20;

/// Builds the legacy byte stream: high word, then low word, each little-endian.
fn input() -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mean_gap = (1u64 << 32) / EVENTS_PER_EPOCH;
    let mut time = 0x4f86u64 << 32;
    let end = (0x4f86 + EPOCHS) << 32;
    let mut out = Vec::with_capacity((EPOCHS * EVENTS_PER_EPOCH * 8) as usize + 64);
    let mut i = 0u64;
    while time < end {
        // xorshift64*: a cheap deterministic generator for the gaps.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        time += 1 + (r >> 40) % (2 * mean_gap);
        let word = (time << 15) | (1 << (i % 4));
        out.extend_from_slice(&((word >> 32) as u32).to_le_bytes());
        out.extend_from_slice(&(word as u32).to_le_bytes());
        i += 1;
    }
    out
}

/// Reads the input file in blocks of 4 MiB, as the command-line tools do.
fn for_each_block(path: &Path, mut f: impl FnMut(&[u8])) {
    let mut file = File::open(path).unwrap();
    let mut block = vec![0u8; BLOCK_BYTES];
    loop {
        let mut filled = 0;
        while filled < BLOCK_BYTES {
            let n = file.read(&mut block[filled..]).unwrap();
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            return;
        }
        f(&block[..filled - filled % 8]);
    }
}

fn read_and_sum(path: &Path) -> u64 {
    let mut sum = 0u64;
    for_each_block(path, |bytes| {
        sum = bytes
            .chunks_exact(8)
            .map(|c| {
                let high = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                let low = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
                (u64::from(high) << 32) | u64::from(low)
            })
            .fold(sum, u64::wrapping_add)
    });
    sum
}

fn run_chopper2(path: &Path, out: Destination) -> usize {
    let config = Chopper2Config {
        verbosity: 3,
        ..Default::default()
    };
    let mut chopper2 = Chopper2::new(config, out).unwrap();
    let mut written = 0;
    for_each_block(path, |bytes| {
        written += chopper2.feed_legacy_bytes(bytes).unwrap().len()
    });
    written
}

fn run_chopper(path: &Path, t2: Destination, t3: Destination) -> usize {
    let config = ChopperConfig {
        servo_filter: 5,
        verbosity: 3,
        ..Default::default()
    };
    let mut chopper = Chopper::new(config, t2, t3).unwrap();
    let mut written = 0;
    for_each_block(path, |bytes| {
        written += chopper.feed_legacy_bytes(bytes).unwrap().len()
    });
    written
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let input_path = dir.path().join("events.raw");
    let bytes = input();
    let events = (bytes.len() / 8) as u64;
    std::fs::write(&input_path, &bytes).unwrap();
    drop(bytes);
    // Each iteration writes into fresh folders, as production writes new file names:
    // replacing existing files would make ext4 start writeback at every rename.
    let fresh = || {
        let out = tempfile::tempdir_in(dir.path()).unwrap();
        for sub in ["t1", "t2", "t3"] {
            std::fs::create_dir(out.path().join(sub)).unwrap();
        }
        out
    };

    let mut group = c.benchmark_group("chopping");
    group.sample_size(10);
    group.throughput(Throughput::Elements(events));
    group.bench_function("read_and_sum", |b| {
        b.iter(|| black_box(read_and_sum(&input_path)))
    });
    group.bench_function("chopper2", |b| {
        b.iter_batched(
            fresh,
            |out| {
                let t1 = Destination::directory(out.path().join("t1")).unwrap();
                black_box(run_chopper2(&input_path, t1));
                out
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("chopper", |b| {
        b.iter_batched(
            fresh,
            |out| {
                let t2 = Destination::directory(out.path().join("t2")).unwrap();
                let t3 = Destination::directory(out.path().join("t3")).unwrap();
                black_box(run_chopper(&input_path, t2, t3));
                out
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("chopper2_no_output", |b| {
        b.iter(|| black_box(run_chopper2(&input_path, Destination::Discard)))
    });
    group.bench_function("chopper_no_output", |b| {
        b.iter(|| {
            black_box(run_chopper(
                &input_path,
                Destination::Discard,
                Destination::Discard,
            ))
        })
    });
    // The baseline again, to show how much the shared machine's load drifted in the run.
    group.bench_function("read_and_sum_again", |b| {
        b.iter(|| black_box(read_and_sum(&input_path)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
