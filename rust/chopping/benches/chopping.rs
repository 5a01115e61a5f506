//! Throughput of chopper and chopper2 on 3.2e7 events, against the time needed merely to
//! decode and sum the same legacy-serialised input in the same run.
//!
//! The input is 40 epochs of 8e5 events each (about 1.5e6 events/s), patterns cycling
//! over the four detectors, with exponential-like gaps from a fixed-seed generator. Epoch
//! files go to a temporary folder, written atomically as in production.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qkd_chopping::{Chopper, Chopper2, Chopper2Config, ChopperConfig, Destination};

const EPOCHS: u64 = 40;
const EVENTS_PER_EPOCH: u64 = 800_000;

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

fn read_and_sum(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let high = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let low = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
            (u64::from(high) << 32) | u64::from(low)
        })
        .fold(0u64, u64::wrapping_add)
}

fn bench(c: &mut Criterion) {
    let bytes = input();
    let events = (bytes.len() / 8) as u64;
    let mut group = c.benchmark_group("chopping");
    group.sample_size(10);
    group.throughput(Throughput::Elements(events));

    group.bench_function("read_and_sum", |b| {
        b.iter(|| black_box(read_and_sum(black_box(&bytes))))
    });

    group.bench_function("chopper2", |b| {
        let dir = tempfile::tempdir().unwrap();
        b.iter(|| {
            let config = Chopper2Config {
                verbosity: 3,
                ..Default::default()
            };
            let out = Destination::directory(dir.path()).unwrap();
            let mut chopper2 = Chopper2::new(config, out).unwrap();
            black_box(chopper2.feed_legacy_bytes(&bytes).unwrap())
        })
    });

    group.bench_function("chopper", |b| {
        let dir = tempfile::tempdir().unwrap();
        let (t2, t3) = (dir.path().join("t2"), dir.path().join("t3"));
        std::fs::create_dir(&t2).unwrap();
        std::fs::create_dir(&t3).unwrap();
        b.iter(|| {
            let config = ChopperConfig {
                servo_filter: 5,
                verbosity: 3,
                ..Default::default()
            };
            let mut chopper = Chopper::new(
                config,
                Destination::directory(&t2).unwrap(),
                Destination::directory(&t3).unwrap(),
            )
            .unwrap();
            black_box(chopper.feed_legacy_bytes(&bytes).unwrap())
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
