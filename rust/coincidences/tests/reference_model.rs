//! Costream against a plain model of the reference loop on seeded random links.
//!
//! The model takes one event per pass, as the reference costream's main loop does, and
//! its clock servo divides with the plain integer division. The engine's batched
//! scans, branch-free sifting and multiply-shift division must give the same epochs:
//! counters, histogram, key bases and the entries of the type-3, type-4 and type-5
//! files. The inputs add what the synthetic link lacks: out-of-order and repeated
//! type-1 events, skews, crowded events, every protocol and both servo modes.

use qkd_coincidences::synthetic::SyntheticLink;
use qkd_coincidences::{
    ClosedEpoch, Costream, CostreamConfig, CostreamProtocol, Need, Sift, ZeroPolicy,
    HISTOGRAM_BINS, HISTOGRAM_FIRST_TICK,
};
use qkd_formats::raw::make_word;
use qkd_formats::type1::{self, Type1File};
use qkd_formats::type2::{self, Type2File, PROTOCOLS};
use qkd_formats::type3::Type3File;
use qkd_formats::type4::Type4File;

/// One closed epoch as the model computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ModelEpoch {
    epoch: u32,
    type2_events: u32,
    coincidences: u32,
    accidentals: u32,
    tracked_drift: i64,
    type1_events: u32,
    histogram: Vec<u32>,
    key_bases: Vec<u8>,
    /// Type-4 entries: type-2 index and data.
    type4: Vec<(u32, u8)>,
    type3: Vec<u8>,
    type5: Vec<u8>,
}

/// Runs the reference loop over whole files until a file is missing or the epoch count
/// is reached.
fn model(
    config: &CostreamConfig,
    type1_files: &[Vec<u8>],
    type2_files: &[Vec<u8>],
) -> Vec<ModelEpoch> {
    let protocol = CostreamProtocol::new(config.protocol).unwrap();
    let (w, u, a) = (
        config.coincidence_window,
        config.tracking_window,
        config.accidental_distance,
    );
    let mut skew = [0u64; 16];
    for (i, s) in config.skews.iter().enumerate() {
        skew[1 << i] = *s as u64;
    }
    // Type-1 stream: (time, pattern) per file, loaded when needed.
    let mut files1 = type1_files.iter().enumerate();
    let mut events1: Vec<(u64, u8)> = Vec::new();
    let mut next1 = 0;
    let mut n1_last = 0u32;
    let mut files2 = type2_files.iter();
    let mut events2: Vec<(u64, u8)> = Vec::new();
    let mut next2 = 0;

    let start = u64::from(config.start_epoch.wrapping_sub(1)) << 32;
    let (mut t1, mut p1, mut t2, mut p2) = (start, 0u8, start, 0u8);
    let (mut need1, mut need2) = (true, true);
    let mut offset = config.time_offset;
    let mut float = 0i64;
    let mut drift = 0i64;
    let mut last = 0u64;
    let mut open: Option<ModelEpoch> = None;
    let mut closed = Vec::new();
    loop {
        let diff = (t1.wrapping_sub(t2) as i64).wrapping_add(offset);
        if need1 || diff < -u {
            if next1 == events1.len() {
                let Some((k, bytes)) = files1.next() else {
                    return closed;
                };
                let file = Type1File::parse(bytes).unwrap();
                let label = config.start_epoch.wrapping_add(k as u32);
                let first = file.events.first().map_or(0, |&w| (w >> 47) as u32);
                let base = u64::from((label & 0xFFFF_8000).wrapping_sub(first & 0x1_8000)) << 32;
                events1 = file
                    .events
                    .iter()
                    .map(|&w| {
                        let t = (w >> 15)
                            .wrapping_add(base)
                            .wrapping_add(skew[(w & 0xF) as usize]);
                        (t, (w & 0xF) as u8)
                    })
                    .collect();
                n1_last = file.header.length;
                next1 = 0;
                continue;
            }
            let (t, p) = events1[next1];
            next1 += 1;
            if t <= t1 {
                continue;
            }
            (t1, p1) = (t, p);
            need1 = false;
            continue;
        }
        if need2 || diff > a {
            if next2 == events2.len() {
                if let Some(mut epoch) = open.take() {
                    epoch.tracked_drift = drift;
                    epoch.type1_events = n1_last;
                    closed.push(epoch);
                }
                if config.epoch_count > 0 && closed.len() as u32 >= config.epoch_count {
                    return closed;
                }
                let Some(bytes) = files2.next() else {
                    return closed;
                };
                let file = Type2File::parse(bytes).unwrap();
                let decoded = file.decode().unwrap();
                events2 = decoded.times.into_iter().zip(decoded.values).collect();
                next2 = 0;
                open = Some(ModelEpoch {
                    epoch: file.header.epoch,
                    type2_events: events2.len() as u32,
                    coincidences: 0,
                    accidentals: 0,
                    tracked_drift: 0,
                    type1_events: 0,
                    histogram: vec![0; HISTOGRAM_BINS],
                    key_bases: Vec::new(),
                    type4: Vec::new(),
                    type3: Vec::new(),
                    type5: Vec::new(),
                });
                continue;
            }
            (t2, p2) = events2[next2];
            next2 += 1;
            need2 = false;
            continue;
        }
        let epoch = open.as_mut().unwrap();
        let bin = diff - HISTOGRAM_FIRST_TICK;
        if (0..HISTOGRAM_BINS as i64).contains(&bin) {
            epoch.histogram[bin as usize] += 1;
        }
        if diff > a - 2 * w {
            epoch.accidentals += 1;
        }
        if -w < diff && diff < w {
            epoch.coincidences += 1;
            let index = next2 as u32 - 1;
            match protocol.sift(p1, p2) {
                Sift::Discard => {}
                Sift::Key { value, data } => {
                    epoch.type3.push(value);
                    if protocol.index == 1 {
                        epoch.key_bases.push(p2);
                    }
                    epoch.type4.push((index, data));
                }
                Sift::Test { value, data } => {
                    epoch.type5.push(value);
                    epoch.type4.push((index, data));
                }
            }
        }
        if config.track_filter != 0 && diff < u {
            if config.track_filter > 0 {
                float += diff * (4096 / config.track_filter);
            } else {
                let divisor = -config.track_filter * 8000 / 4096;
                let cap = (-config.track_filter * 8000).min(800_000_000);
                let gap = t1.wrapping_sub(last) as i64;
                if last != 0 && gap < cap {
                    float += ((diff * gap) << 1) / divisor;
                }
                last = t1;
            }
            drift = float / 4096;
            offset = config.time_offset - drift;
        }
        need1 = true;
        need2 = true;
    }
}

/// Returns the engine's epoch in the model's terms, decoding its files.
fn as_model(closed: &ClosedEpoch) -> ModelEpoch {
    let type4 = Type4File::parse(closed.type4.as_ref().unwrap()).unwrap();
    let type3 = Type3File::parse(closed.type3.as_ref().unwrap()).unwrap();
    let type5 = closed
        .type5
        .as_ref()
        .map_or(Vec::new(), |f| Type3File::parse(f).unwrap().values);
    ModelEpoch {
        epoch: closed.epoch,
        type2_events: closed.type2_events,
        coincidences: closed.coincidences,
        accidentals: closed.accidentals,
        tracked_drift: closed.tracked_drift,
        type1_events: closed.type1_events,
        histogram: closed.histogram.clone(),
        key_bases: closed.key_bases.clone(),
        type4: type4.entries.iter().map(|e| (e.index, e.data)).collect(),
        type3: type3.values,
        type5,
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Swaps, repeats and pushes forward some type-1 events, so that the drop rule for
/// events not later than the last accepted one has work to do.
fn disorder_type1(bytes: &[u8], epoch: u32, rng: &mut Rng, per_mille: u64) -> Vec<u8> {
    let mut words = Type1File::parse(bytes).unwrap().events;
    for i in 1..words.len() {
        match rng.below(1000 * 3) {
            r if r < per_mille => words.swap(i - 1, i),
            r if r < 2 * per_mille => words[i] = words[i - 1],
            r if r < 3 * per_mille => words[i] += rng.below(300) << 15,
            _ => {}
        }
    }
    type1::encode(epoch, false, &words)
}

/// Builds the type-1 and type-2 files of an epoch whose events crowd into a few
/// thousand ticks, so that windows overlap and every comparison of the loop matters.
fn dense_epoch(epoch: u32, protocol: u8, offset: i64, rng: &mut Rng) -> (Vec<u8>, Vec<u8>) {
    let start = (u64::from(epoch) << 32) + (1 << 20);
    let span = 2000 + rng.below(20_000);
    let mut times1: Vec<u64> = (0..50 + rng.below(600))
        .map(|_| start + rng.below(span))
        .collect();
    times1.sort_unstable();
    times1.dedup();
    let words: Vec<u64> = times1
        .iter()
        .map(|&t| make_word(t, rng.below(16) as u16))
        .collect();

    // Two thirds of the type-2 events lie within 8 ticks of a type-1 event.
    let mut times2: Vec<u64> = (0..20 + rng.below(300))
        .map(|_| {
            let near = times1[rng.below(times1.len() as u64) as usize] as i64 + offset;
            match rng.below(3) {
                0 => (start as i64 + offset) as u64 + rng.below(span),
                _ => (near + rng.below(17) as i64 - 8) as u64,
            }
        })
        .collect();
    times2.sort_unstable();
    // Type-2 times are at least 2 ticks apart.
    let mut last = 0;
    times2.retain(|&t| {
        let keep = t >= last + 2;
        if keep {
            last = t;
        }
        keep
    });

    let bits = PROTOCOLS[usize::from(protocol)].type2_bits;
    let values: Vec<u8> = times2.iter().map(|_| rng.below(1 << bits) as u8).collect();
    let type1 = type1::encode(epoch, false, &words);
    let type2 = type2::encode(
        epoch,
        false,
        10 + rng.below(8) as u32,
        protocol,
        &times2,
        &values,
    )
    .unwrap();
    (type1, type2)
}

const START: u32 = 0x2_1f00;

/// Runs the engine over the files, pushing `lead` files of each stream ahead of each
/// `advance` call, until it needs a file that is not there or is done.
fn engine(
    config: &CostreamConfig,
    type1: &[Vec<u8>],
    type2: &[Vec<u8>],
    lead: usize,
) -> Vec<ClosedEpoch> {
    let mut costream = Costream::new(config.clone()).unwrap();
    let mut closed = Vec::new();
    let (mut pushed1, mut pushed2) = (0, 0);
    loop {
        match costream.advance(&mut closed).unwrap() {
            Need::Done => return closed,
            Need::Type1(_) if pushed1 == type1.len() => return closed,
            Need::Type2(_) if pushed2 == type2.len() => return closed,
            Need::Type1(_) | Need::Type2(_) => {
                for _ in 0..lead {
                    if pushed1 < type1.len() {
                        costream.push_type1(&type1[pushed1]).unwrap();
                        pushed1 += 1;
                    }
                    if pushed2 < type2.len() {
                        costream.push_type2(&type2[pushed2]).unwrap();
                        pushed2 += 1;
                    }
                }
            }
        }
    }
}

#[test]
fn engine_matches_reference_loop_model() {
    let mut rng = Rng(0x5eed_c057_2ea3);
    for case in 0..96 {
        let protocol = [0u8, 1, 3, 4, 5, 6][case / 2 % 6];
        let offset = rng.below(200_000) as i64 - 100_000;
        let link = SyntheticLink {
            pairs: 300 + rng.below(3000) as usize,
            background_high: rng.below(8000) as usize,
            background_low: rng.below(1500) as usize,
            offset,
            protocol,
            seed: rng.next(),
        };
        let epochs = 2 + rng.below(3) as u32;
        let per_mille = [0, 0, 5, 50][rng.below(4) as usize];
        let dense = case % 2 == 1;
        let mut type1 = Vec::new();
        let mut type2 = Vec::new();
        for k in 0..epochs {
            let (one, two) = if dense {
                dense_epoch(START + k, protocol, offset, &mut rng)
            } else {
                let files = link.epoch(START + k).unwrap();
                (files.type1, files.type2)
            };
            type1.push(disorder_type1(&one, START + k, &mut rng, per_mille));
            type2.push(two);
        }
        let skews = if rng.below(3) == 0 {
            [0, 0, 0, 0].map(|_: i64| rng.below(41) as i64 - 20)
        } else {
            [0; 4]
        };
        let config = CostreamConfig {
            start_epoch: START,
            epoch_count: rng.below(epochs as u64) as u32,
            // Off by a few ticks, so that the servo has a drift to follow.
            time_offset: offset + rng.below(9) as i64 - 4,
            coincidence_window: 1 + rng.below(12) as i64,
            tracking_window: 1 + rng.below(60) as i64,
            accidental_distance: rng.below(300) as i64,
            track_filter: [0, 1, 50, 5000, -1, -2000, -200_000][rng.below(7) as usize],
            protocol: i64::from(protocol),
            width_filter: rng.below(6) as i32,
            zero_policy: ZeroPolicy::BothFiles,
            skews,
            type5_output: protocol == 3 || protocol == 4,
            frequency_correction: None,
            // The model computes the servo as the reference does.
            servo_remainder: false,
        };
        let expected = model(&config, &type1, &type2);
        assert!(!expected.is_empty(), "case {case} closes no epoch");
        for lead in [1, epochs as usize] {
            let closed = engine(&config, &type1, &type2, lead);
            let got: Vec<ModelEpoch> = closed.iter().map(as_model).collect();
            assert_eq!(
                got.len(),
                expected.len(),
                "case {case}, lead {lead}: {config:?}"
            );
            for (g, e) in got.iter().zip(&expected) {
                assert_eq!(g, e, "case {case}, lead {lead}: {config:?}");
            }
        }
    }
}
