//! The block fast paths of both choppers against the event-by-event path: the same input
//! fed in one large batch and one event per call must give the same files, summaries
//! and drop counts. The input mixes every rule's case: backward steps, duplicates, 1-tick
//! steps, gaps above the maximum, long runs of one pattern, epoch changes and a skipped
//! epoch.

use std::fs;
use std::path::Path;

use qkd_chopping::{
    ChopError, ChopStats, Chopper, Chopper2, Chopper2Config, ChopperConfig, Destination,
    EpochSummary,
};

/// Event words of a messy stream over several epochs, from a fixed seed.
fn messy_stream(seed: u64, events: usize) -> Vec<u64> {
    let mut state = seed;
    let mut next = move || {
        // splitmix64: deterministic and cheap.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    let mut time = 0x4f86u64 << 32;
    let mut pattern = 1u64;
    let mut out = Vec::with_capacity(events);
    for _ in 0..events {
        let r = next();
        time = match r % 1000 {
            0..=4 => time.saturating_sub(r >> 54),   // backward step
            5..=9 => time,                           // duplicate
            10..=19 => time + 1,                     // 1-tick step
            20..=21 => time + (3 << 27) + (r >> 40), // above the maximum gap
            22 if r & 0xFF == 0 => time + (2 << 32), // skips an epoch
            _ => time + 1 + (r >> 40) % 40_000,      // ordinary gap
        };
        // Mostly runs of one pattern, so that packed counters fill up.
        if r % 300 == 0 {
            pattern = (r >> 8) & 0xF;
        }
        // Flag bits 14..4 vary too; chopper2 copies them verbatim.
        out.push((time << 15) | ((r >> 50) & 0x7FF) << 4 | pattern);
    }
    out
}

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Feeds `input` in one call or one event per call; returns every summary.
fn feed_stream(
    input: &[u64],
    one_by_one: bool,
    mut feed: impl FnMut(&[u64]) -> Result<Vec<EpochSummary>, ChopError>,
) -> Vec<EpochSummary> {
    if !one_by_one {
        return feed(input).unwrap();
    }
    let mut summaries = Vec::new();
    for word in input {
        summaries.extend(feed(std::slice::from_ref(word)).unwrap());
    }
    summaries
}

/// Checks that the stream exercised what the case is for.
fn check_coverage(seed: u64, max_gap_us: u64, summaries: &[EpochSummary], stats: &ChopStats) {
    // The first gap above the maximum drops the rest of the stream (rule B).
    if max_gap_us > 0 {
        assert!(stats.dropped_gap > 0, "seed {seed}: no gap");
    } else {
        assert!(summaries.len() > 3, "seed {seed}: too few epochs");
    }
    assert!(stats.dropped_backward > 0, "seed {seed}: no backward step");
}

#[test]
fn chopper2_batch_equals_event_by_event() {
    for (seed, max_gap_us) in [(1, 0), (2, 50_000), (3, 0)] {
        let input = messy_stream(seed, 400_000);
        let mut outcomes = Vec::new();
        for one_by_one in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let config = Chopper2Config {
                verbosity: 3,
                max_gap_us,
                ..Default::default()
            };
            let mut c = Chopper2::new(config, Destination::directory(dir.path()).unwrap()).unwrap();
            let mut summaries = feed_stream(&input, one_by_one, |words| c.feed(words));
            summaries.extend(c.flush().unwrap());
            let stats = c.stats();
            drop(c);
            check_coverage(seed, max_gap_us, &summaries, &stats);
            outcomes.push((summaries, stats, listing(dir.path())));
        }
        assert!(
            outcomes[0] == outcomes[1],
            "seed {seed}: chopper2 outputs differ"
        );
    }
}

#[test]
fn chopper_batch_equals_event_by_event() {
    for (seed, max_gap_us, protocol) in [(4, 0, 1), (5, 50_000, 0), (6, 0, 3)] {
        let input = messy_stream(seed, 400_000);
        let mut outcomes = Vec::new();
        for one_by_one in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let (t2, t3) = (dir.path().join("t2"), dir.path().join("t3"));
            fs::create_dir(&t2).unwrap();
            fs::create_dir(&t3).unwrap();
            let config = ChopperConfig {
                protocol,
                servo_filter: 5,
                verbosity: 4,
                max_gap_us,
                ..Default::default()
            };
            let mut c = Chopper::new(
                config,
                Destination::directory(&t2).unwrap(),
                Destination::directory(&t3).unwrap().in_caller_thread(),
            )
            .unwrap();
            let mut summaries = feed_stream(&input, one_by_one, |words| c.feed(words));
            summaries.extend(c.flush().unwrap());
            let stats = c.stats();
            drop(c);
            check_coverage(seed, max_gap_us, &summaries, &stats);
            outcomes.push((summaries, stats, listing(&t2), listing(&t3)));
        }
        assert!(
            outcomes[0] == outcomes[1],
            "seed {seed}: chopper outputs differ"
        );
    }
}
