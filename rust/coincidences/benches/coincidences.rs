//! Throughput of costream and splicer against merely reading the same input in the same
//! run.
//!
//! Input: 6 epochs of a synthetic BBM92 link ([`SyntheticLink`]): per epoch 1e5 photon
//! pairs, 4e5 background events on the high-count side and 2e4 on the low-count side,
//! offset 34 568 ticks (about 1e6 type-1 events/s, the reference's design point). All
//! files are in memory, so the figures leave out disk I/O.
//!
//! - `read_costream_input`: parse the type-1 files and decode the type-2 files.
//! - `costream`: the same parsing plus matching, clock tracking, sifting and building
//!   the type-3 and type-4 files of 5 epochs (the 6th type-1 file closes the 5th epoch).
//! - `costream_frequency_corrected`: as `costream`, with every type-1 time rescaled by a
//!   frequency correction. Its rate is one fixed-point step (about 9e-13), which moves
//!   no event by a whole tick. So the matching does the same work, and the difference
//!   is the cost of the correction.
//! - `read_splicer_input`: parse the type-3 files and decode the type-4 files.
//! - `splicer`: the same plus sifting and building the raw-key files.
//!
//! Throughput is counted in input events: type-1 plus type-2 events for costream,
//! type-3 entries for splicer.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qkd_coincidences::synthetic::{LinkEpoch, SyntheticLink};
use qkd_coincidences::{splice, Costream, CostreamConfig, SplicerProtocol, ZeroPolicy};
use qkd_formats::type1::Type1File;
use qkd_formats::type2::Type2File;
use qkd_formats::type3::Type3File;
use qkd_formats::type4::Type4File;
use qkd_sync::FrequencyCorrector;

const START: u32 = 0x4f87;
const EPOCHS: u32 = 6;
const OFFSET: i64 = 34_568;

fn config() -> CostreamConfig {
    CostreamConfig {
        start_epoch: START,
        epoch_count: EPOCHS - 1,
        time_offset: OFFSET,
        coincidence_window: 6,
        tracking_window: 30,
        track_filter: -200_000,
        width_filter: 5,
        zero_policy: ZeroPolicy::BothFiles,
        ..CostreamConfig::default()
    }
}

fn run_costream(files: &[LinkEpoch], config: CostreamConfig) -> Vec<qkd_coincidences::ClosedEpoch> {
    // Files arrive one epoch at a time, as in a running node.
    let mut costream = Costream::new(config).unwrap();
    let mut closed = Vec::new();
    for f in files {
        costream.push_type1(&f.type1).unwrap();
        costream.push_type2(&f.type2).unwrap();
        costream.advance(&mut closed).unwrap();
    }
    closed
}

fn benches(c: &mut Criterion) {
    let link = SyntheticLink {
        pairs: 100_000,
        background_high: 400_000,
        background_low: 20_000,
        offset: OFFSET,
        protocol: 1,
        seed: 1,
    };
    let files: Vec<LinkEpoch> = (0..EPOCHS)
        .map(|k| link.epoch(START + k).unwrap())
        .collect();
    let costream_events: usize = files.iter().map(|f| f.type1_events + f.type2_events).sum();

    let closed = run_costream(&files, config());
    let corrected = CostreamConfig {
        frequency_correction: Some(FrequencyCorrector::new(1e-12, None).unwrap()),
        ..config()
    };
    let protocol = SplicerProtocol::new(1).unwrap();
    let splice_inputs: Vec<(u32, &[u8], Vec<u8>)> = closed
        .iter()
        .zip(&files)
        .map(|(e, f)| (e.epoch, f.type3.as_slice(), e.type4.clone().unwrap()))
        .collect();
    let splicer_events: usize = files[..closed.len()].iter().map(|f| f.type2_events).sum();

    let mut group = c.benchmark_group("coincidences");
    group.sample_size(10);
    group.throughput(Throughput::Elements(costream_events as u64));
    group.bench_function("read_costream_input", |b| {
        b.iter(|| {
            for f in &files {
                black_box(Type1File::parse(&f.type1).unwrap());
                black_box(Type2File::parse(&f.type2).unwrap().decode().unwrap());
            }
        })
    });
    group.bench_function("costream", |b| {
        b.iter(|| black_box(run_costream(&files, config())))
    });
    group.bench_function("costream_frequency_corrected", |b| {
        b.iter(|| black_box(run_costream(&files, corrected.clone())))
    });

    group.throughput(Throughput::Elements(splicer_events as u64));
    group.bench_function("read_splicer_input", |b| {
        b.iter(|| {
            for (_, type3, type4) in &splice_inputs {
                black_box(Type3File::parse(type3).unwrap());
                black_box(Type4File::parse(type4).unwrap());
            }
        })
    });
    group.bench_function("splicer", |b| {
        b.iter(|| {
            for (epoch, type3, type4) in &splice_inputs {
                black_box(splice(*epoch, type3, type4, &protocol, false).unwrap());
            }
        })
    });
    group.finish();
}

criterion_group!(coincidence_benches, benches);
criterion_main!(coincidence_benches);
