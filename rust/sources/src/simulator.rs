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
//! Internal time unit: 1/1024 tick (about 0.12 ps), as an `i64` counted from the start, which
//! lasts about 26 days of simulated time.

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
    /// Stop after this many emitted pairs; `None` runs for ever.
    pub pair_limit: Option<u64>,
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
}

/// Dark counts plus background of one node as one Poisson process in source time.
#[derive(Debug, Clone)]
struct NoiseStream {
    rng: Xoshiro256PlusPlus,
    mean_interval_fine: f64,
    /// Thresholds choosing detectors 1..3; above the last one it is detector 4.
    detector_thresholds: [u64; 3],
    next_fine: Option<i64>,
}

impl NoiseStream {
    fn new(mut rng: Xoshiro256PlusPlus, node: &NodeConfig) -> Self {
        let per_detector: Vec<f64> = node
            .dark_count_rate
            .iter()
            .map(|&d| d + node.background_rate / 4.0)
            .collect();
        let total: f64 = per_detector.iter().sum();
        if total <= 0.0 {
            return NoiseStream {
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
        let first = sample_interval(&mut rng, mean_interval_fine);
        NoiseStream {
            rng,
            mean_interval_fine,
            detector_thresholds: thresholds,
            next_fine: Some(first),
        }
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
            self.next_fine = Some(t + sample_interval(&mut self.rng, self.mean_interval_fine));
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
    /// Relative tick time of each detector's last accepted click.
    last_click: [Option<i64>; 4],
    stats: NodeStats,
}

/// Counts of what happened at one node since the start.
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
    fn new(config: &NodeConfig, clock: Clock, noise_rng: Xoshiro256PlusPlus) -> Self {
        let mut detect_thresholds = [0u64; 4];
        for (t, &eff) in detect_thresholds.iter_mut().zip(&config.efficiency) {
            *t = probability_threshold_32(config.transmission * eff);
        }
        let sigma = config.jitter_ps * FINE_PER_PS;
        Node {
            detect_thresholds,
            jitter_sigma_fine: sigma,
            jitter_clamp_fine: sigma * JITTER_CLAMP_SIGMAS,
            dead_time_ticks: (config.dead_time_ps / 125.0).ceil() as i64,
            clock,
            noise: NoiseStream::new(noise_rng, config),
            pending: Vec::new(),
            noise_scratch: Vec::new(),
            merge_scratch: Vec::new(),
            last_click: [None; 4],
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
            let ticks = (k >> 4) as i64 - KEY_BIAS;
            let pattern = (k & 0xF) as u8;
            let detector = pattern.trailing_zeros() as usize;
            if let Some(last) = self.last_click[detector] {
                if ticks - last < self.dead_time_ticks {
                    self.stats.dead_time_losses += 1;
                    continue;
                }
            }
            self.last_click[detector] = Some(ticks);
            let time = start_ticks.wrapping_add_signed(ticks);
            out.push(raw::make_word(time, u16::from(pattern)));
        }
        self.stats.events += (out.len() - before) as u64;

        self.pending.clear();
        self.pending.extend_from_slice(&self.merge_scratch[split..]);
    }
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

/// Counts of what the source did since the start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Pairs emitted by the source.
    pub pairs: u64,
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
    pair_rng: Xoshiro256PlusPlus,
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
    /// Builds a simulator; fails with the first configuration value out of range.
    pub fn new(config: LinkConfig) -> Result<Self, SourceError> {
        config.validate()?;
        // Four independent streams: xoshiro's jump advances by 2^128 draws, so the streams
        // never overlap.
        let mut base = Xoshiro256PlusPlus::seed_from_u64(config.seed);
        let mut pair_rng = base.clone();
        base.jump();
        let high_noise = base.clone();
        base.jump();
        let low_noise = base.clone();

        let high_clock = Clock {
            offset_fine: 0,
            drift: 0.0,
        };
        let low_clock = Clock {
            offset_fine: config.offset_ticks << FINE_BITS,
            drift: config.drift,
        };
        let high = Node::new(&config.high, high_clock, high_noise);
        let low = Node::new(&config.low, low_clock, low_noise);
        let margin_fine = high.jitter_clamp_fine.max(low.jitter_clamp_fine).ceil() as i64 + 1;

        let mean_pair_interval_fine = FINE_PER_SECOND / config.pair_rate;
        let next_pair_fine = sample_interval(&mut pair_rng, mean_pair_interval_fine);
        let end_fine = match config.pair_limit {
            Some(0) => Some(0),
            _ => None,
        };
        Ok(LinkSimulator {
            qber_threshold: probability_threshold_32(config.qber),
            config,
            pair_rng,
            mean_pair_interval_fine,
            next_pair_fine,
            now_fine: 0,
            end_fine,
            finished: false,
            margin_fine,
            high,
            low,
            stats: LinkStats::default(),
        })
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

    /// Simulated source time so far, in ticks.
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
            self.next_pair_fine =
                t + sample_interval(&mut self.pair_rng, self.mean_pair_interval_fine);
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
