//! A two-node BBM92 link simulator: an entangled-pair source seen by two time taggers.
//!
//! The source emits photon pairs as a Poisson process at `pair_rate` pairs/s. One photon of
//! each pair travels to the high-count node (H), the other to the low-count node (L). Each
//! node has four detectors in the BBM92 layout that chopper and costream assume: detectors
//! 1 and 3 (pattern bits 1 and 4) measure basis 0, detectors 2 and 4 (pattern bits 2 and 8)
//! measure basis 1, and a node picks its basis at random with probability 1/2 (a passive
//! beam splitter). In matching bases the pair is anti-correlated: H detector `d` pairs with
//! L detector `d ^ 2` (H 1 with L 4, H 2 with L 8, H 4 with L 1, H 8 with L 2), except that
//! with probability `qber` the L photon lands in the other detector of its basis, which is
//! how a basis misalignment shows up. In different bases the L outcome is random.
//!
//! A photon is detected with probability `transmission * efficiency[detector]` of its node.
//! Detections get Gaussian timing jitter; each detector also produces dark counts, and a
//! node may see extra background counts spread evenly over its detectors. A detector that
//! clicked stays blind for its dead time (non-paralysable). Every event time is then read
//! on the node's own clock: H's clock reads `start_ticks + t`; L's clock reads
//! `start_ticks + offset_ticks + t * (1 + drift)`, so a positive `drift` means L's clock runs
//! fast. Two clicks at one node never merge into a multi-detector pattern.
//!
//! Output: raw event words (`qkd_formats::raw`), time ordered per node, with the 49-bit tick
//! time wrapping as the device counter does. The output depends only on the configuration
//! (seed included), not on how the run is split into batches: every random stream is drawn
//! event by event. Memory is one batch plus the events held back at its end.
//!
//! # Segments and skipping ahead
//!
//! Source time is cut into segments of 2^29 ticks (67.1 ms). Each segment draws its pairs
//! and each node's noise from generators seeded by (seed, segment index, stream) alone, and
//! the Poisson processes restart at every segment start, which leaves them Poisson because
//! they are memoryless. A run can therefore begin at any source time
//! ([`LinkConfig::skip_ticks`]) after generating at most two segments plus one dead time
//! and the jitter margin before it, instead of everything since the start. The events a node
//! hands out from that time on are exactly those of a run from the start.
//!
//! Dead time is the one state that reaches back further, through chains of clicks less
//! than a dead time apart. So that it does not, the dead time of a detector's first click
//! in a segment of its node's clock counts from the detector's latest click before it,
//! whether that click was accepted or lost. Within a segment, the dead time counts from the
//! last accepted click as usual. The rule applies in every run, skipped or not, and never
//! accepts a click within a dead time of an accepted one. Its only effect is that a click
//! lost at the end of a segment may also block a click just after the boundary.
//!
//! Internal time unit: 1/1024 tick (about 0.12 ps), as an `i64` counted from the start, which
//! lasts about 13 days of simulated time.

use rand_core::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp1, StandardNormal};
use rand_xoshiro::Xoshiro256PlusPlus;

use qkd_formats::raw;

use crate::SourceError;

/// Bits of the internal sub-tick resolution: one internal unit is 2^-10 tick.
const FINE_BITS: u32 = 10;
/// Internal units per second: 8e9 ticks/s times 1024.
const FINE_PER_SECOND: f64 = 8e9 * 1024.0;
/// Internal units per picosecond: 1/125 tick times 1024.
const FINE_PER_PS: f64 = 1024.0 / 125.0;
/// Jitter draws are clamped to this many standard deviations, so that an event from a later
/// batch can never precede an event already handed out.
const JITTER_CLAMP_SIGMAS: f64 = 8.0;
/// Bias added to a node-relative tick time in the sort key, so negative clock offsets sort
/// correctly; leaves 2^59 ticks (about 2.3 years) of range.
const KEY_BIAS: i64 = 1 << 58;
/// Largest relative frequency difference accepted.
const MAX_DRIFT: f64 = 1e-3;
/// Log2 of the segment length in ticks: 2^29 ticks is 67.1 ms. A segment's random streams
/// depend only on the seed and the segment index, and dead-time chains break at segment
/// boundaries of each node's clock, so a skipped run regenerates at most two segments.
const SEGMENT_BITS: u32 = 29;
/// Segment length in internal units.
const SEGMENT_FINE: i64 = 1 << (SEGMENT_BITS + FINE_BITS);
/// Largest `skip_ticks`: 2^52 ticks (6.5 days), which leaves as much simulated time again
/// to the run before the internal time (an `i64` of 1/1024 ticks) runs out.
pub const MAX_SKIP_TICKS: u64 = 1 << 52;
/// Stream numbers of the per-segment generators.
const PAIR_STREAM: u64 = 0;
const HIGH_NOISE_STREAM: u64 = 1;
const LOW_NOISE_STREAM: u64 = 2;
/// Biased tick time standing for "no click yet": far enough below every real one that
/// subtracting it from a real time neither overflows nor falls inside a dead time.
const NO_CLICK: i64 = i64::MIN / 2;

/// One node's optics and detectors.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Probability that a pair photon reaches this node's detectors (1 minus the link loss).
    pub transmission: f64,
    /// Detection efficiency of detectors 1..4 (pattern bits 1, 2, 4, 8).
    pub efficiency: [f64; 4],
    /// Dark count rate of detectors 1..4, in counts/s.
    pub dark_count_rate: [f64; 4],
    /// Extra uncorrelated background at this node, in counts/s over all four detectors.
    pub background_rate: f64,
    /// Standard deviation of the Gaussian timing jitter of each detection, in ps.
    pub jitter_ps: f64,
    /// Time a detector stays blind after a click, in ps.
    pub dead_time_ps: f64,
}

impl Default for NodeConfig {
    /// A lossless node with perfect, noiseless, jitter-free detectors.
    fn default() -> Self {
        NodeConfig {
            transmission: 1.0,
            efficiency: [1.0; 4],
            dark_count_rate: [0.0; 4],
            background_rate: 0.0,
            jitter_ps: 0.0,
            dead_time_ps: 0.0,
        }
    }
}

/// The whole link: source, both nodes and their clocks.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Seed of every random stream; equal seeds give equal output.
    pub seed: u64,
    /// Pair emission rate of the source, in pairs/s.
    pub pair_rate: f64,
    /// Probability that a pair measured in matching bases gives wrong correlation (0..0.5).
    pub qber: f64,
    /// L's clock minus H's clock at the start, in ticks of 1/8 ns.
    pub offset_ticks: i64,
    /// Relative frequency difference of L's clock against H's (positive: L runs fast).
    pub drift: f64,
    /// H's clock reading at the start, in ticks; only its low 49 bits reach the events.
    pub start_ticks: u64,
    /// Stop after this many emitted pairs; `None` runs for ever. Counts from the
    /// beginning of the run, so it cannot be combined with `skip_ticks`.
    pub pair_limit: Option<u64>,
    /// Source time at which the run begins, in ticks (at most [`MAX_SKIP_TICKS`]). Each
    /// node hands out exactly the events that a run from 0 hands out from its clock's
    /// reading at that time on. Nothing earlier is generated beyond two segments (134 ms)
    /// and one dead time before it.
    pub skip_ticks: u64,
    /// The high-count node.
    pub high: NodeConfig,
    /// The low-count node.
    pub low: NodeConfig,
}

/// Default start: 2020-04-19T17:51:32.304817123Z in ticks, the fixed start time of the
/// reference simulator, so that default runs land in the same epochs as its outputs.
pub const DEFAULT_START_TICKS: u64 = 1_587_318_692_304_817_123 * 8;

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            seed: 0,
            pair_rate: 1e5,
            qber: 0.0,
            offset_ticks: 0,
            drift: 0.0,
            start_ticks: DEFAULT_START_TICKS,
            pair_limit: None,
            skip_ticks: 0,
            high: NodeConfig::default(),
            low: NodeConfig::default(),
        }
    }
}

fn check_probability(name: &'static str, value: f64) -> Result<(), SourceError> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(SourceError::invalid(
            name,
            value,
            "a probability between 0 and 1",
        ))
    }
}

fn check_rate(name: &'static str, value: f64) -> Result<(), SourceError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(SourceError::invalid(
            name,
            value,
            "a finite rate >= 0 per second",
        ))
    }
}

impl NodeConfig {
    fn validate(&self) -> Result<(), SourceError> {
        check_probability("transmission", self.transmission)?;
        for &e in &self.efficiency {
            check_probability("efficiency", e)?;
        }
        for &r in &self.dark_count_rate {
            check_rate("dark_count_rate", r)?;
        }
        check_rate("background_rate", self.background_rate)?;
        if !(self.jitter_ps.is_finite() && self.jitter_ps >= 0.0 && self.jitter_ps <= 1e6) {
            return Err(SourceError::invalid(
                "jitter_ps",
                self.jitter_ps,
                "a standard deviation between 0 and 1e6 ps",
            ));
        }
        if !(self.dead_time_ps.is_finite() && self.dead_time_ps >= 0.0 && self.dead_time_ps <= 1e12)
        {
            return Err(SourceError::invalid(
                "dead_time_ps",
                self.dead_time_ps,
                "a dead time between 0 and 1e12 ps",
            ));
        }
        Ok(())
    }
}

impl LinkConfig {
    /// Checks every value; the error names the first one out of range.
    pub fn validate(&self) -> Result<(), SourceError> {
        if !(self.pair_rate.is_finite() && self.pair_rate > 0.0 && self.pair_rate <= 1e10) {
            return Err(SourceError::invalid(
                "pair_rate",
                self.pair_rate,
                "a rate above 0 and at most 1e10 pairs/s",
            ));
        }
        if !(0.0..=0.5).contains(&self.qber) {
            return Err(SourceError::invalid(
                "qber",
                self.qber,
                "a value between 0 and 0.5",
            ));
        }
        if !(self.drift.is_finite() && self.drift.abs() <= MAX_DRIFT) {
            return Err(SourceError::invalid(
                "drift",
                self.drift,
                "a relative frequency difference between -1e-3 and 1e-3",
            ));
        }
        if self.offset_ticks.unsigned_abs() >= 1 << 50 {
            return Err(SourceError::invalid(
                "offset_ticks",
                self.offset_ticks,
                "an offset below 2^50 ticks in magnitude",
            ));
        }
        if self.skip_ticks > MAX_SKIP_TICKS {
            return Err(SourceError::invalid(
                "skip_ticks",
                self.skip_ticks,
                "at most 2^52 ticks (6.5 days) of simulated time",
            ));
        }
        if self.skip_ticks > 0 && self.pair_limit.is_some() {
            return Err(SourceError::invalid(
                "skip_ticks",
                self.skip_ticks,
                "0 when pair_limit is set, because the limit counts pairs from time 0",
            ));
        }
        self.high.validate()?;
        self.low.validate()?;
        Ok(())
    }
}

/// Converts a probability into a threshold for a uniform u64: `next_u64() < threshold`
/// happens with that probability (up to 2^-64).
fn probability_threshold(p: f64) -> u64 {
    if p >= 1.0 {
        u64::MAX
    } else {
        (p * 18_446_744_073_709_551_616.0) as u64
    }
}

/// Converts a probability into a threshold for a uniform 32-bit value `u`: `u < threshold`
/// happens with that probability to within 2^-33, and exactly for 0 and 1. Half a draw per
/// decision keeps the per-pair cost down.
fn probability_threshold_32(p: f64) -> u64 {
    (p * 4_294_967_296.0 + 0.5) as u64
}

/// Finalizer of SplitMix64 (Steele, Lea and Flood, 2014): a bijection of u64 whose output
/// bits each depend on every input bit.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Generator of one random stream of one segment. Distinct (seed, segment, stream)
/// triples hash to distinct 64-bit seeds except with probability about 2^-64 per pair,
/// and `seed_from_u64` expands that seed with SplitMix64 into the full xoshiro state.
fn segment_rng(seed: u64, segment: i64, stream: u64) -> Xoshiro256PlusPlus {
    const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut h = mix64(seed.wrapping_add(GOLDEN_GAMMA));
    h = mix64(h ^ (segment as u64).wrapping_mul(GOLDEN_GAMMA));
    h = mix64(h ^ stream.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA));
    Xoshiro256PlusPlus::seed_from_u64(h)
}

/// Segment index of a source time in internal units (time 0 begins segment 0).
#[inline]
fn segment_of(t: i64) -> i64 {
    t >> (SEGMENT_BITS + FINE_BITS)
}

/// A node's clock: maps internal source time to the node's reading in internal units.
#[derive(Debug, Clone, Copy)]
struct Clock {
    offset_fine: i64,
    drift: f64,
}

impl Clock {
    /// Non-decreasing in `t`, because |drift| < 1 and truncation moves by at most one unit.
    /// Truncation instead of `round` keeps this free of a libm call on baseline x86-64;
    /// the bias is below one internal unit (1/1024 tick).
    #[inline]
    fn read(self, t: i64) -> i64 {
        let skew = if self.drift == 0.0 {
            0
        } else {
            (t as f64 * self.drift) as i64
        };
        t + skew + self.offset_fine
    }

    /// Returns a source time whose reading is at most `reading` (both in internal units),
    /// at most a microsecond earlier than necessary. The margin covers the rounding of `read` and
    /// of the f64 division, which is a few hundred units at 2^62.
    fn earliest_source_time(self, reading: i64) -> i64 {
        const MARGIN_FINE: i64 = 8_000 << FINE_BITS;
        let exact = (reading - self.offset_fine) as f64 / (1.0 + self.drift);
        exact as i64 - MARGIN_FINE
    }
}

/// Dark counts plus background of one node as one Poisson process in source time, restarted
/// at every segment start with that segment's generator.
#[derive(Debug, Clone)]
struct NoiseStream {
    seed: u64,
    stream: u64,
    segment: i64,
    rng: Xoshiro256PlusPlus,
    mean_interval_fine: f64,
    /// Thresholds choosing detectors 1..3; above the last one it is detector 4.
    detector_thresholds: [u64; 3],
    next_fine: Option<i64>,
}

impl NoiseStream {
    /// Starts the noise at the beginning of `segment`.
    fn new(seed: u64, stream: u64, segment: i64, node: &NodeConfig) -> Self {
        let mut rng = segment_rng(seed, segment, stream);
        let per_detector: Vec<f64> = node
            .dark_count_rate
            .iter()
            .map(|&d| d + node.background_rate / 4.0)
            .collect();
        let total: f64 = per_detector.iter().sum();
        if total <= 0.0 {
            return NoiseStream {
                seed,
                stream,
                segment,
                rng,
                mean_interval_fine: 0.0,
                detector_thresholds: [0; 3],
                next_fine: None,
            };
        }
        let mut thresholds = [0u64; 3];
        let mut cumulative = 0.0;
        for (k, t) in thresholds.iter_mut().enumerate() {
            cumulative += per_detector[k];
            *t = probability_threshold(cumulative / total);
        }
        let mean_interval_fine = FINE_PER_SECOND / total;
        let first = segment * SEGMENT_FINE + sample_interval(&mut rng, mean_interval_fine);
        let mut noise = NoiseStream {
            seed,
            stream,
            segment,
            rng,
            mean_interval_fine,
            detector_thresholds: thresholds,
            next_fine: Some(first),
        };
        noise.settle(first);
        noise
    }

    /// Moves on to later segments while `next` lies beyond the current one, and stores the
    /// next noise time.
    fn settle(&mut self, mut next: i64) {
        while segment_of(next) != self.segment {
            self.segment += 1;
            self.rng = segment_rng(self.seed, self.segment, self.stream);
            next = self.segment * SEGMENT_FINE
                + sample_interval(&mut self.rng, self.mean_interval_fine);
        }
        self.next_fine = Some(next);
    }

    /// Appends the noise events with source time before `end` as (source time, detector).
    fn generate(&mut self, end: i64, out: &mut Vec<(i64, u8)>) {
        while let Some(t) = self.next_fine {
            if t >= end {
                break;
            }
            let u = self.rng.next_u64();
            let detector = self
                .detector_thresholds
                .iter()
                .position(|&th| u < th)
                .unwrap_or(3) as u8;
            out.push((t, detector));
            let next = t + sample_interval(&mut self.rng, self.mean_interval_fine);
            self.settle(next);
        }
    }
}

#[inline]
fn sample_interval(rng: &mut Xoshiro256PlusPlus, mean_interval_fine: f64) -> i64 {
    let x: f64 = Exp1.sample(rng);
    // Adding 0.5 before truncating rounds the positive interval to nearest.
    (x * mean_interval_fine + 0.5) as i64
}

/// Per-node state: thresholds, clock, pending events and dead-time bookkeeping.
#[derive(Debug, Clone)]
struct Node {
    detect_thresholds: [u64; 4],
    jitter_sigma_fine: f64,
    jitter_clamp_fine: f64,
    dead_time_ticks: i64,
    clock: Clock,
    noise: NoiseStream,
    /// Sort keys `(relative ticks + KEY_BIAS) << 4 | pattern` of events not yet handed out.
    pending: Vec<u64>,
    noise_scratch: Vec<(i64, u8)>,
    merge_scratch: Vec<u64>,
    /// Biased tick time (relative ticks + `KEY_BIAS`) from which each detector's dead time
    /// counts: its last accepted click, or at a segment boundary its latest click.
    dead_from: [i64; 4],
    /// Biased tick time of each detector's latest click, accepted or lost.
    last_raw: [i64; 4],
    stats: NodeStats,
}

/// Counts of what happened at one node since the run began (at `skip_ticks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Pair photons detected (before dead time).
    pub pair_detections: u64,
    /// Dark and background counts generated (before dead time).
    pub noise_counts: u64,
    /// Clicks lost because the detector was still dead.
    pub dead_time_losses: u64,
    /// Events handed out.
    pub events: u64,
}

impl Node {
    fn new(config: &NodeConfig, clock: Clock, noise: NoiseStream) -> Self {
        let mut detect_thresholds = [0u64; 4];
        for (t, &eff) in detect_thresholds.iter_mut().zip(&config.efficiency) {
            *t = probability_threshold_32(config.transmission * eff);
        }
        Node {
            detect_thresholds,
            jitter_sigma_fine: config.jitter_ps * FINE_PER_PS,
            jitter_clamp_fine: jitter_clamp_fine(config),
            dead_time_ticks: dead_time_ticks(config),
            clock,
            noise,
            pending: Vec::new(),
            noise_scratch: Vec::new(),
            merge_scratch: Vec::new(),
            dead_from: [NO_CLICK; 4],
            last_raw: [NO_CLICK; 4],
            stats: NodeStats::default(),
        }
    }

    #[inline]
    fn key(&self, source_fine: i64, detector: u8) -> u64 {
        sort_key(self.clock, source_fine, detector)
    }

    /// Detection time of a pair photon with jitter, in source time.
    #[inline]
    fn jittered(&self, rng: &mut Xoshiro256PlusPlus, t: i64) -> i64 {
        if self.jitter_sigma_fine == 0.0 {
            return t;
        }
        let z: f64 = StandardNormal.sample(rng);
        let j = (z * self.jitter_sigma_fine).clamp(-self.jitter_clamp_fine, self.jitter_clamp_fine);
        // Truncation toward zero keeps the jitter distribution symmetric.
        t + j as i64
    }

    /// Adds the noise before `end`, sorts everything pending and hands out the events that
    /// no later batch can precede: those with a clock reading before `clock(limit)`.
    /// `limit = None` hands out everything (end of the run).
    fn release(&mut self, end: i64, limit: Option<i64>, start_ticks: u64, out: &mut Vec<u64>) {
        self.noise_scratch.clear();
        self.noise.generate(end, &mut self.noise_scratch);
        self.stats.noise_counts += self.noise_scratch.len() as u64;

        insertion_sort(&mut self.pending);
        self.merge_scratch.clear();
        self.merge_scratch
            .reserve(self.pending.len() + self.noise_scratch.len());
        let clock = self.clock;
        let mut noise_keys = self
            .noise_scratch
            .iter()
            .map(|&(t, d)| sort_key(clock, t, d))
            .peekable();
        for &k in &self.pending {
            while let Some(&n) = noise_keys.peek() {
                if n < k {
                    self.merge_scratch.push(n);
                    noise_keys.next();
                } else {
                    break;
                }
            }
            self.merge_scratch.push(k);
        }
        self.merge_scratch.extend(noise_keys);

        let limit_key = match limit {
            Some(t) => {
                let ticks = self.clock.read(t) >> FINE_BITS;
                ((ticks + KEY_BIAS) as u64) << 4
            }
            None => u64::MAX,
        };
        let split = self.merge_scratch.partition_point(|&k| k < limit_key);

        out.reserve(split);
        let before = out.len();
        for &k in &self.merge_scratch[..split] {
            let biased = (k >> 4) as i64;
            let pattern = (k & 0xF) as u8;
            let detector = pattern.trailing_zeros() as usize;
            let previous = self.last_raw[detector];
            self.last_raw[detector] = biased;
            // KEY_BIAS is a multiple of the segment length, so biased times share the
            // segment boundaries of relative ones.
            if biased >> SEGMENT_BITS != previous >> SEGMENT_BITS {
                // First click of this detector in a new segment: see the module docs.
                self.dead_from[detector] = previous;
            }
            if biased - self.dead_from[detector] < self.dead_time_ticks {
                self.stats.dead_time_losses += 1;
                continue;
            }
            self.dead_from[detector] = biased;
            let time = start_ticks.wrapping_add_signed(biased - KEY_BIAS);
            out.push(raw::make_word(time, u16::from(pattern)));
        }
        self.stats.events += (out.len() - before) as u64;

        self.pending.clear();
        self.pending.extend_from_slice(&self.merge_scratch[split..]);
    }
}

/// Dead time of a node's detectors in whole ticks, rounded up.
fn dead_time_ticks(node: &NodeConfig) -> i64 {
    (node.dead_time_ps / 125.0).ceil() as i64
}

/// Largest jitter of a node's detections, in internal units.
fn jitter_clamp_fine(node: &NodeConfig) -> f64 {
    node.jitter_ps * FINE_PER_PS * JITTER_CLAMP_SIGMAS
}

/// Returns the earliest source time, before the jitter margin, whose events a node needs
/// so that its events from `begin_fine` on come out as in a run from 0. These are its
/// clicks from one dead time before the start of the clock segment that contains its
/// reading at `begin_fine`.
fn warmup_start(clock: Clock, dead_time_ticks: i64, begin_fine: i64) -> i64 {
    let begin_biased = (clock.read(begin_fine) >> FINE_BITS) + KEY_BIAS;
    let boundary = (begin_biased >> SEGMENT_BITS) << SEGMENT_BITS;
    let from_fine = (boundary - dead_time_ticks - KEY_BIAS) << FINE_BITS;
    clock.earliest_source_time(from_fine)
}

/// Sort key of an event: the node's clock reading in ticks, biased, above the pattern.
#[inline]
fn sort_key(clock: Clock, source_fine: i64, detector: u8) -> u64 {
    let ticks = clock.read(source_fine) >> FINE_BITS;
    (((ticks + KEY_BIAS) as u64) << 4) | (1u64 << detector)
}

/// Sorts a slice that is almost sorted (jitter swaps only neighbours a few places apart) in
/// time linear in its length plus the number of inversions.
fn insertion_sort(keys: &mut [u64]) {
    for i in 1..keys.len() {
        let k = keys[i];
        if keys[i - 1] <= k {
            continue;
        }
        let mut j = i;
        while j > 0 && keys[j - 1] > k {
            keys[j] = keys[j - 1];
            j -= 1;
        }
        keys[j] = k;
    }
}

/// Counts of what the source did since the run began (at `skip_ticks`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Pairs emitted by the source.
    pub pairs: u64,
    /// Pairs emitted before `skip_ticks` only to rebuild the dead-time and jitter state
    /// there: at most two segments plus one dead time and the jitter margin, and 0 without
    /// a skip. Not part of the other counts.
    pub warmup_pairs: u64,
    /// Pairs with both photons detected (before dead time).
    pub both_detected: u64,
    /// Of those, pairs measured in matching bases.
    pub matching_basis: u64,
    /// Of those, pairs with the wrong correlation (the QBER numerator).
    pub errors: u64,
    /// The high-count node.
    pub high: NodeStats,
    /// The low-count node.
    pub low: NodeStats,
}

/// The link simulator. See the module documentation for the model.
#[derive(Debug, Clone)]
pub struct LinkSimulator {
    config: LinkConfig,
    /// Generator of the pairs of segment `pair_segment`.
    pair_rng: Xoshiro256PlusPlus,
    pair_segment: i64,
    mean_pair_interval_fine: f64,
    qber_threshold: u64,
    next_pair_fine: i64,
    /// Source time up to which everything is generated.
    now_fine: i64,
    /// Source time of the end of the run, once the pair limit is reached.
    end_fine: Option<i64>,
    finished: bool,
    margin_fine: i64,
    high: Node,
    low: Node,
    stats: LinkStats,
}

/// Which node of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The high-count node: runs chopper2 and costream.
    High,
    /// The low-count node: runs chopper and splicer.
    Low,
}

impl LinkSimulator {
    /// Builds a simulator; fails with the first configuration value out of range. With
    /// `skip_ticks` set, it also generates the stretch before that time which the state
    /// there depends on (see the module documentation).
    pub fn new(config: LinkConfig) -> Result<Self, SourceError> {
        config.validate()?;
        let high_clock = Clock {
            offset_fine: 0,
            drift: 0.0,
        };
        let low_clock = Clock {
            offset_fine: config.offset_ticks << FINE_BITS,
            drift: config.drift,
        };
        let high_dead_ticks = dead_time_ticks(&config.high);
        let low_dead_ticks = dead_time_ticks(&config.low);
        let margin_fine = jitter_clamp_fine(&config.high)
            .max(jitter_clamp_fine(&config.low))
            .ceil() as i64
            + 1;

        // `skip_ticks` is at most 2^52, so the shift stays within i64.
        let begin_fine = (config.skip_ticks as i64) << FINE_BITS;
        let first_segment = if config.skip_ticks == 0 {
            0
        } else {
            let high_from = warmup_start(high_clock, high_dead_ticks, begin_fine);
            let low_from = warmup_start(low_clock, low_dead_ticks, begin_fine);
            segment_of((high_from.min(low_from) - margin_fine).max(0))
        };

        let seed = config.seed;
        let high_noise = NoiseStream::new(seed, HIGH_NOISE_STREAM, first_segment, &config.high);
        let low_noise = NoiseStream::new(seed, LOW_NOISE_STREAM, first_segment, &config.low);
        let high = Node::new(&config.high, high_clock, high_noise);
        let low = Node::new(&config.low, low_clock, low_noise);

        let mean_pair_interval_fine = FINE_PER_SECOND / config.pair_rate;
        let end_fine = match config.pair_limit {
            Some(0) => Some(0),
            _ => None,
        };
        let mut simulator = LinkSimulator {
            qber_threshold: probability_threshold_32(config.qber),
            config,
            pair_rng: segment_rng(seed, first_segment, PAIR_STREAM),
            pair_segment: first_segment,
            mean_pair_interval_fine,
            next_pair_fine: 0,
            now_fine: first_segment * SEGMENT_FINE,
            end_fine,
            finished: false,
            margin_fine,
            high,
            low,
            stats: LinkStats::default(),
        };
        simulator.enter_pair_segment(first_segment);
        if begin_fine > 0 {
            simulator.warm_up(begin_fine);
        }
        Ok(simulator)
    }

    /// Starts the pair stream of `segment`, or of the first later one with a pair in it.
    fn enter_pair_segment(&mut self, segment: i64) {
        self.pair_segment = segment;
        self.pair_rng = segment_rng(self.config.seed, segment, PAIR_STREAM);
        let next = segment * SEGMENT_FINE
            + sample_interval(&mut self.pair_rng, self.mean_pair_interval_fine);
        self.settle_next_pair(next);
    }

    /// Stores the next pair time, moving on to later segments while it lies beyond the
    /// current one: each segment's process starts afresh at the segment start.
    #[inline]
    fn settle_next_pair(&mut self, next: i64) {
        if segment_of(next) == self.pair_segment {
            self.next_pair_fine = next;
        } else {
            self.enter_pair_segment(self.pair_segment + 1);
        }
    }

    /// Generates everything from the first segment up to `begin_fine` and drops it, so
    /// that both nodes contain exactly the pending events and dead-time state of a run
    /// from 0 at that time. Their events with clock readings from `begin_fine` on stay
    /// pending for the first batch.
    fn warm_up(&mut self, begin_fine: i64) {
        self.generate_pairs(begin_fine);
        let before = self.stats();
        // Pairs up to the jitter margin after `begin_fine` can be detected before it.
        self.generate_pairs(begin_fine + self.margin_fine);
        let start = self.config.start_ticks;
        let mut dropped = Vec::new();
        self.high
            .release(begin_fine, Some(begin_fine), start, &mut dropped);
        self.low
            .release(begin_fine, Some(begin_fine), start, &mut dropped);
        self.now_fine = begin_fine;

        // What was emitted from `begin_fine` on belongs to the run; the noise generated so
        // far and the events dropped all lie before it.
        self.stats = LinkStats {
            pairs: self.stats.pairs - before.pairs,
            warmup_pairs: before.pairs,
            both_detected: self.stats.both_detected - before.both_detected,
            matching_basis: self.stats.matching_basis - before.matching_basis,
            errors: self.stats.errors - before.errors,
            ..LinkStats::default()
        };
        for (node, earlier) in [(&mut self.high, before.high), (&mut self.low, before.low)] {
            node.stats = NodeStats {
                pair_detections: node.stats.pair_detections - earlier.pair_detections,
                ..NodeStats::default()
            };
        }
    }

    /// The configuration the simulator runs with.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Counts of pairs, detections and errors so far.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            high: self.high.stats,
            low: self.low.stats,
            ..self.stats
        }
    }

    /// Source time simulated so far, in ticks counted from time 0, so a skip is included.
    pub fn elapsed_ticks(&self) -> u64 {
        (self.now_fine >> FINE_BITS) as u64
    }

    /// True once the pair limit is reached and every event has been handed out.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Simulates the next `duration_ticks` of source time and appends both nodes' raw event
    /// words to `high` and `low`, each in time order.
    ///
    /// Events within a few jitter widths of the batch end are held back for the next call,
    /// so a batch may lag the simulated time slightly. After the pair limit the final call
    /// hands out everything left; later calls append nothing.
    pub fn next_batch_into(
        &mut self,
        duration_ticks: u64,
        high: &mut Vec<u64>,
        low: &mut Vec<u64>,
    ) {
        if self.finished {
            return;
        }
        let step = i64::try_from(duration_ticks.min(1 << 40)).unwrap_or(1 << 40) << FINE_BITS;
        let mut end = self.now_fine.saturating_add(step);
        if let Some(stop) = self.end_fine {
            end = end.min(stop);
        }
        self.generate_pairs(end);
        if let Some(stop) = self.end_fine {
            end = end.min(stop);
        }
        self.now_fine = end;

        let done = self.end_fine.is_some_and(|stop| end >= stop);
        let limit = if done {
            None
        } else {
            Some(end - self.margin_fine)
        };
        let start = self.config.start_ticks;
        self.high.release(end, limit, start, high);
        self.low.release(end, limit, start, low);
        self.finished = done;
    }

    /// Generates every pair emitted before `end` into the nodes' pending buffers.
    fn generate_pairs(&mut self, end: i64) {
        let limit = self.config.pair_limit.unwrap_or(u64::MAX);
        while self.next_pair_fine < end {
            if self.stats.pairs >= limit {
                break;
            }
            let t = self.next_pair_fine;
            self.emit_pair(t);
            self.stats.pairs += 1;
            if self.stats.pairs >= limit {
                // The run ends just after the last pair, as the reference simulator's does.
                self.end_fine = Some(t + 1);
                break;
            }
            let next = t + sample_interval(&mut self.pair_rng, self.mean_pair_interval_fine);
            self.settle_next_pair(next);
        }
    }

    #[inline]
    fn emit_pair(&mut self, t: i64) {
        // Bits 0..3 choose bases and outcomes, bits 32..63 decide an error.
        let bits = self.pair_rng.next_u64();
        let high_basis = (bits & 1) as u8;
        let high_detector = high_basis | (((bits >> 1) & 1) as u8) << 1;
        let low_basis = ((bits >> 2) & 1) as u8;
        let matching = high_basis == low_basis;
        let low_detector = if matching {
            let error = (bits >> 32) < self.qber_threshold;
            // Anti-correlated outcome: the other detector of the same basis; an error
            // puts the photon into the same-numbered detector instead.
            if error {
                high_detector
            } else {
                high_detector ^ 2
            }
        } else {
            low_basis | (((bits >> 3) & 1) as u8) << 1
        };

        // The low 32 bits decide H's detection, the high 32 bits L's.
        let hits = self.pair_rng.next_u64();
        let high_hit = (hits & 0xFFFF_FFFF) < self.high.detect_thresholds[high_detector as usize];
        let low_hit = (hits >> 32) < self.low.detect_thresholds[low_detector as usize];
        if high_hit {
            let when = self.high.jittered(&mut self.pair_rng, t);
            let key = self.high.key(when, high_detector);
            self.high.pending.push(key);
            self.high.stats.pair_detections += 1;
        }
        if low_hit {
            let when = self.low.jittered(&mut self.pair_rng, t);
            let key = self.low.key(when, low_detector);
            self.low.pending.push(key);
            self.low.stats.pair_detections += 1;
        }
        if high_hit && low_hit {
            self.stats.both_detected += 1;
            if matching {
                self.stats.matching_basis += 1;
                if low_detector == high_detector {
                    self.stats.errors += 1;
                }
            }
        }
    }
}

/// One node of a simulated link, as a single-stream event source.
///
/// Both nodes of a link may run in different processes: two `SimulatedNode`s with the same
/// configuration and opposite sides produce exactly the two streams of one `LinkSimulator`.
#[derive(Debug, Clone)]
pub struct SimulatedNode {
    simulator: LinkSimulator,
    side: Side,
    batch_ticks: u64,
    discard: Vec<u64>,
}

impl SimulatedNode {
    /// Builds the source of one side; each `read_batch` simulates `batch_ticks` of time.
    pub fn new(config: LinkConfig, side: Side, batch_ticks: u64) -> Result<Self, SourceError> {
        if batch_ticks == 0 {
            return Err(SourceError::invalid(
                "batch_ticks",
                0,
                "a batch length of at least 1 tick",
            ));
        }
        Ok(SimulatedNode {
            simulator: LinkSimulator::new(config)?,
            side,
            batch_ticks,
            discard: Vec::new(),
        })
    }

    /// The underlying link simulator (statistics, configuration).
    pub fn simulator(&self) -> &LinkSimulator {
        &self.simulator
    }
}

impl crate::EventSource for SimulatedNode {
    fn read_batch(&mut self, out: &mut Vec<u64>) -> Result<bool, SourceError> {
        if self.simulator.is_finished() {
            return Ok(false);
        }
        self.discard.clear();
        match self.side {
            Side::High => self
                .simulator
                .next_batch_into(self.batch_ticks, out, &mut self.discard),
            Side::Low => self
                .simulator
                .next_batch_into(self.batch_ticks, &mut self.discard, out),
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(config: LinkConfig, batch_ticks: u64, total_ticks: u64) -> (Vec<u64>, Vec<u64>) {
        let mut sim = LinkSimulator::new(config).unwrap();
        let (mut high, mut low) = (Vec::new(), Vec::new());
        let mut done = 0;
        while done < total_ticks && !sim.is_finished() {
            sim.next_batch_into(batch_ticks, &mut high, &mut low);
            done += batch_ticks;
        }
        (high, low)
    }

    fn noisy_config() -> LinkConfig {
        LinkConfig {
            seed: 7,
            pair_rate: 2e5,
            qber: 0.05,
            offset_ticks: -12_345,
            drift: -3e-6,
            high: NodeConfig {
                transmission: 0.5,
                efficiency: [0.9, 0.8, 0.7, 0.6],
                dark_count_rate: [1e3, 2e3, 3e3, 4e3],
                background_rate: 5e3,
                jitter_ps: 300.0,
                dead_time_ps: 50_000.0,
            },
            low: NodeConfig {
                transmission: 0.2,
                jitter_ps: 500.0,
                dead_time_ps: 30_000.0,
                dark_count_rate: [500.0; 4],
                ..NodeConfig::default()
            },
            ..LinkConfig::default()
        }
    }

    #[test]
    fn output_independent_of_batch_length() {
        let (h1, l1) = run(noisy_config(), 80_000_000, 800_000_000);
        let (h2, l2) = run(noisy_config(), 3_333_333, 800_000_000);
        let n = h1.len().min(h2.len()) - 100;
        assert!(n > 5_000, "{n}");
        assert_eq!(h1[..n], h2[..n]);
        let m = l1.len().min(l2.len()) - 100;
        assert_eq!(l1[..m], l2[..m]);
    }

    #[test]
    fn same_seed_same_output_other_seed_differs() {
        let (h1, _) = run(noisy_config(), 8_000_000, 80_000_000);
        let (h2, _) = run(noisy_config(), 8_000_000, 80_000_000);
        let (h3, _) = run(
            LinkConfig {
                seed: 8,
                ..noisy_config()
            },
            8_000_000,
            80_000_000,
        );
        assert_eq!(h1, h2);
        assert_ne!(h1, h3);
    }

    #[test]
    fn streams_are_time_ordered_across_batches() {
        let (high, low) = run(noisy_config(), 1_000_000, 400_000_000);
        for words in [&high, &low] {
            assert!(words
                .windows(2)
                .all(|w| raw::time_ticks(w[0]) <= raw::time_ticks(w[1])));
            assert!(words
                .iter()
                .all(|&w| [1, 2, 4, 8].contains(&raw::pattern(w))));
        }
    }

    #[test]
    fn dead_time_is_respected_per_detector() {
        let config = noisy_config();
        let dead_ticks = (config.high.dead_time_ps / 125.0) as u64;
        let (high, _) = run(config, 5_000_000, 400_000_000);
        let mut last = [None::<u64>; 4];
        for &w in &high {
            let d = raw::pattern(w).trailing_zeros() as usize;
            let t = raw::time_ticks(w);
            if let Some(prev) = last[d] {
                assert!(t - prev >= dead_ticks, "detector {d}: {prev} then {t}");
            }
            last[d] = Some(t);
        }
    }

    /// Returns a link whose dead-time chains often cross segment boundaries: 10 us of dead time
    /// against about 1e5 counts/s per detector.
    fn long_dead_time_config() -> LinkConfig {
        let node = NodeConfig {
            transmission: 0.5,
            dark_count_rate: [5e4; 4],
            jitter_ps: 400.0,
            dead_time_ps: 1e7,
            ..NodeConfig::default()
        };
        LinkConfig {
            seed: 11,
            pair_rate: 4e5,
            qber: 0.04,
            offset_ticks: -987_654_321,
            drift: 2e-5,
            start_ticks: 0,
            high: node.clone(),
            low: NodeConfig {
                dead_time_ps: 7.5e6,
                ..node
            },
            ..LinkConfig::default()
        }
    }

    /// Times and patterns of a node's events as (signed ticks from start_ticks = 0, pattern).
    fn relative(words: &[u64]) -> Vec<(i64, u8)> {
        words
            .iter()
            .map(|&w| {
                let t = raw::time_ticks(w) as i64;
                let t = if t >= 1 << 48 { t - (1 << 49) } else { t };
                (t, raw::pattern(w) as u8)
            })
            .collect()
    }

    #[test]
    fn dead_time_holds_across_segment_boundaries() {
        let config = long_dead_time_config();
        let dead_ticks = [dead_time_ticks(&config.high), dead_time_ticks(&config.low)];
        // Five segment boundaries.
        let (high, low) = run(config, 100_000_000, 5 << SEGMENT_BITS);
        for (words, dead) in [(&high, dead_ticks[0]), (&low, dead_ticks[1])] {
            let mut last = [None::<i64>; 4];
            for (t, pattern) in relative(words) {
                let d = pattern.trailing_zeros() as usize;
                if let Some(prev) = last[d] {
                    assert!(t - prev >= dead, "detector {d}: {prev} then {t}");
                }
                last[d] = Some(t);
            }
        }
    }

    /// Runs from `skip_ticks` to `end_ticks` of source time in one batch.
    fn run_skipped(config: LinkConfig, skip_ticks: u64, end_ticks: u64) -> LinkSimulator {
        let mut sim = LinkSimulator::new(LinkConfig {
            skip_ticks,
            ..config
        })
        .unwrap();
        assert_eq!(sim.elapsed_ticks(), skip_ticks);
        let (mut high, mut low) = (Vec::new(), Vec::new());
        sim.next_batch_into(end_ticks - skip_ticks, &mut high, &mut low);
        sim.high.pending = high;
        sim.low.pending = low;
        sim
    }

    #[test]
    fn skipped_run_matches_run_from_zero() {
        let config = long_dead_time_config();
        let end_ticks = 6 << SEGMENT_BITS;
        let (full_high, full_low) = run(config.clone(), end_ticks / 8, end_ticks);
        let segment = 1u64 << SEGMENT_BITS;
        // Mid-segment, on a boundary, and just after boundaries of either node's clock,
        // inside a dead time of clicks before them.
        let low_boundary =
            ((3 * segment) as f64 - config.offset_ticks as f64) / (1.0 + config.drift);
        let low_boundary = low_boundary as u64;
        for skip in [
            segment + 123_457,
            2 * segment,
            3 * segment + 900,
            low_boundary + 300,
        ] {
            let sim = run_skipped(config.clone(), skip, end_ticks);
            let begin_fine = (skip as i64) << FINE_BITS;
            let sides = [
                (&sim.high, &full_high, "high"),
                (&sim.low, &full_low, "low"),
            ];
            for (node, full, side) in sides {
                let cut = node.clock.read(begin_fine) >> FINE_BITS;
                let expected: Vec<_> = relative(full).into_iter().filter(|e| e.0 >= cut).collect();
                let got = relative(&node.pending);
                assert!(
                    got.len() > 10_000,
                    "{side} from {skip}: {} events",
                    got.len()
                );
                assert_eq!(got.len(), expected.len(), "{side} from {skip}");
                assert!(got == expected, "{side} events from {skip} differ");
            }
        }
    }

    #[test]
    fn skipped_run_matches_through_dead_time_chains() {
        // Each detector clicks about 100 times per dead time of 1 ms, so a gap longer than
        // a dead time (probability about e^-100 each) never breaks its chain of dead times.
        // Without the restart at segment boundaries (module docs), the clicks a detector
        // accepts would depend on where its chain began. A skipped run begins it at the
        // warm-up, so it would accept other clicks than a run from zero.
        let node = NodeConfig {
            transmission: 0.5,
            dark_count_rate: [1e5; 4],
            dead_time_ps: 1e9,
            ..NodeConfig::default()
        };
        let config = LinkConfig {
            seed: 5,
            pair_rate: 1e4,
            offset_ticks: 4_321,
            drift: -1e-5,
            start_ticks: 0,
            high: node.clone(),
            low: node,
            ..LinkConfig::default()
        };
        let segment = 1u64 << SEGMENT_BITS;
        let end_ticks = 4 * segment;
        let (full_high, full_low) = run(config.clone(), segment / 4, end_ticks);
        for skip in [2 * segment, 2 * segment + 1_000_000] {
            let sim = run_skipped(config.clone(), skip, end_ticks);
            let begin_fine = (skip as i64) << FINE_BITS;
            for (node, full, side) in [
                (&sim.high, &full_high, "high"),
                (&sim.low, &full_low, "low"),
            ] {
                let cut = node.clock.read(begin_fine) >> FINE_BITS;
                let expected: Vec<_> = relative(full).into_iter().filter(|e| e.0 >= cut).collect();
                let got = relative(&node.pending);
                // A detector accepts about 1000 clicks per second: about 530 events in
                // the 2 segments from the skip on.
                assert!(got.len() > 400, "{side} from {skip}: {} events", got.len());
                assert_eq!(got.len(), expected.len(), "{side} from {skip}");
                assert!(got == expected, "{side} events from {skip} differ");
            }
        }
    }

    #[test]
    fn skip_warms_up_at_most_two_segments() {
        let config = long_dead_time_config();
        let skip = 1_000 << SEGMENT_BITS;
        let sim = run_skipped(config.clone(), skip, skip + (1 << SEGMENT_BITS));
        let stats = sim.stats();
        // At most two segments plus dead time and margin before the skip, at 4e5 pairs/s
        // about 27_000 pairs per segment, so 3 segments' worth is a safe bound.
        let pairs_per_segment = config.pair_rate * (1u64 << SEGMENT_BITS) as f64 / 8e9;
        assert!(stats.warmup_pairs > 0);
        assert!(
            (stats.warmup_pairs as f64) < 3.0 * pairs_per_segment,
            "{} warm-up pairs",
            stats.warmup_pairs
        );
        assert!(
            (stats.pairs as f64) < 1.2 * pairs_per_segment,
            "{}",
            stats.pairs
        );
        assert_eq!(sim.elapsed_ticks(), skip + (1 << SEGMENT_BITS));
    }

    #[test]
    fn skip_rejects_pair_limit_and_huge_values() {
        let with_limit = LinkConfig {
            skip_ticks: 1,
            pair_limit: Some(10),
            ..LinkConfig::default()
        };
        let err = LinkSimulator::new(with_limit).unwrap_err().to_string();
        assert!(err.contains("skip_ticks = 1"), "{err}");
        assert!(err.contains("pair_limit"), "{err}");
        let huge = LinkConfig {
            skip_ticks: MAX_SKIP_TICKS + 1,
            ..LinkConfig::default()
        };
        let err = LinkSimulator::new(huge).unwrap_err().to_string();
        assert!(err.contains("skip_ticks"), "{err}");
        let largest = LinkConfig {
            skip_ticks: MAX_SKIP_TICKS,
            ..LinkConfig::default()
        };
        assert!(LinkSimulator::new(largest).is_ok());
    }

    #[test]
    fn pair_limit_ends_run_and_flushes() {
        let config = LinkConfig {
            pair_limit: Some(1000),
            pair_rate: 1e3,
            ..LinkConfig::default()
        };
        let (high, low) = run(config, 1 << 30, u64::MAX);
        assert_eq!(high.len(), 1000);
        assert_eq!(low.len(), 1000);
    }

    #[test]
    fn lossless_pairs_correlate_as_bbm92() {
        let config = LinkConfig {
            pair_limit: Some(20_000),
            offset_ticks: 8,
            ..LinkConfig::default()
        };
        let (high, low) = run(config, 1 << 30, u64::MAX);
        let mut matching = 0;
        for (&h, &l) in high.iter().zip(&low) {
            assert_eq!(raw::time_ticks(l), raw::time_ticks(h) + 8);
            let (ph, pl) = (raw::pattern(h), raw::pattern(l));
            let same_basis = (ph & 0b1010 != 0) == (pl & 0b1010 != 0);
            if same_basis {
                matching += 1;
                // H 1 <-> L 4, H 2 <-> L 8, H 4 <-> L 1, H 8 <-> L 2.
                assert_eq!(pl, (ph.rotate_left(2) & 0xF) | (ph >> 2), "H {ph} L {pl}");
            }
        }
        assert!((9_500..10_500).contains(&matching), "{matching}");
    }

    #[test]
    fn invalid_values_are_named() {
        let bad = LinkConfig {
            qber: 0.7,
            ..LinkConfig::default()
        };
        let err = LinkSimulator::new(bad).unwrap_err().to_string();
        assert!(err.contains("qber = 0.7"), "{err}");
        let bad = LinkConfig {
            low: NodeConfig {
                transmission: -0.1,
                ..NodeConfig::default()
            },
            ..LinkConfig::default()
        };
        let err = LinkSimulator::new(bad).unwrap_err().to_string();
        assert!(err.contains("transmission = -0.1"), "{err}");
        let bad = LinkConfig {
            pair_rate: f64::NAN,
            ..LinkConfig::default()
        };
        assert!(LinkSimulator::new(bad).is_err());
    }
}
