//! Coincidence matching, clock tracking and sifting on the high-count side (costream).
//!
//! [`Costream`] merges the type-1 events of this node with the type-2 events of the peer,
//! epoch by epoch. It reproduces the reference costream exactly: the greedy pairing, the
//! windows, the clock-tracking servo and the type-4 width servo, so that its type-4 and
//! raw-key (type-3) files are byte-identical to the reference for the same input.
//!
//! Units: times and windows in ticks of 1/8 ns; the time offset `Δ = t_L - t_H`.
//!
//! Pairing: both streams are walked in time order. With `diff = t1 - t2 + Δ`, the
//! type-1 stream advances while `diff < -U`, the type-2 stream while `diff > A`. Any other
//! pair is examined once, and both of its events are consumed. An examined pair counts as
//! an accidental when `diff > A - 2W`, as a coincidence when `-W < diff < W`, and feeds the
//! clock servo when `diff < U`.
//!
//! The engine is fed whole epoch files ([`Costream::push_type1`], [`Costream::push_type2`])
//! and runs until it needs a file it does not have ([`Costream::advance`]). Closing type-2
//! epoch `e` needs type-1 events past the end of `e`, so the type-1 stream runs about
//! one file ahead. No buffer has a fixed size: any epoch size works.

use std::collections::VecDeque;

use qkd_formats::bits::BitWriter;
use qkd_formats::type1::Type1File;
use qkd_formats::type2::Type2File;
use qkd_formats::type4::Type4Encoder;

use qkd_sync::FrequencyCorrector;

use crate::error::{CoincidenceError, Stream};
use crate::protocol::{CostreamProtocol, Sift};
use crate::splicer::bit_file;

/// Output policy for epochs without kept events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroPolicy {
    /// No files for an epoch without kept events (`-T 0`).
    NoFiles = 0,
    /// Only a type-4 file holding just the end entry (`-T 1`, the reference default).
    Type4Only = 1,
    /// A type-4 file and a type-3 file with a bare header (`-T 2`, used by the server).
    BothFiles = 2,
}

/// Settings of one costream run; the defaults are the reference's.
#[derive(Debug, Clone)]
pub struct CostreamConfig {
    /// First epoch of both streams (`-e`).
    pub start_epoch: u32,
    /// Number of type-2 epochs to process; 0 runs until the input stops (`-q`).
    pub epoch_count: u32,
    /// Initial time offset `Δ0 = t_L - t_H` in ticks (`-t`, default 17).
    pub time_offset: i64,
    /// Coincidence half-window `W` in ticks (`-w`, default 8).
    pub coincidence_window: i64,
    /// Tracking half-window `U` in ticks (`-u`, default 40).
    pub tracking_window: i64,
    /// Accidentals reference distance `A` in ticks (`-a`, default 160).
    pub accidental_distance: i64,
    /// Clock servo: `q > 0` averages over q events, `q < 0` has time constant `-q` µs,
    /// 0 is off (`-Q`).
    pub track_filter: i64,
    /// Protocol 0..=6 (`-p`, default 1).
    pub protocol: i64,
    /// Type-4 width servo constant; 0 keeps the width at 8 (`-R`).
    pub width_filter: i32,
    /// Output policy for epochs without kept events (`-T`, default 1).
    pub zero_policy: ZeroPolicy,
    /// Skew in ticks added to type-1 events of detectors 1..=4 alone (`-S`).
    pub skews: [i64; 4],
    /// Whether test events are written to type-5 files (`-B`/`-b`, required for
    /// protocols 3 and 4).
    pub type5_output: bool,
    /// Rescales the type-1 event times before matching, so that side H's clock runs at
    /// side L's rate (the frequency offset search's result). `time_offset` is then the
    /// offset between side L and the corrected side H. None matches the times as read,
    /// as the reference does.
    pub frequency_correction: Option<FrequencyCorrector>,
    /// Time-mode clock servo (`track_filter < 0`): carry the remainder of each step's
    /// division into the next step. The reference truncates every step toward zero, so
    /// a step below 1/4096 tick is lost. At about 1e6 pairs per epoch nearly all steps
    /// of pairs near the peak are lost, but the rarer pairs of an earlier uncorrelated
    /// type-1 event (diff between -U and the peak) still move the offset. The offset then
    /// walks away from the peak by about one tick every two epochs until the peak leaves
    /// the coincidence window. false computes as the reference does.
    pub servo_remainder: bool,
}

impl Default for CostreamConfig {
    fn default() -> Self {
        CostreamConfig {
            start_epoch: 0,
            epoch_count: 0,
            time_offset: 17,
            coincidence_window: 8,
            tracking_window: 40,
            accidental_distance: 160,
            track_filter: 0,
            protocol: 1,
            width_filter: 0,
            zero_policy: ZeroPolicy::Type4Only,
            skews: [0; 4],
            type5_output: false,
            frequency_correction: None,
            servo_remainder: false,
        }
    }
}

/// The input that [`Costream::advance`] waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// The type-1 file of this epoch.
    Type1(u32),
    /// The type-2 file of this epoch.
    Type2(u32),
    /// Nothing: the requested number of epochs is done.
    Done,
}

/// One step of the type-4 width servo, as the reference writes it to its debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WidthServoStep {
    /// Filtered width in 1/256 bit.
    pub long_width: i32,
    /// Optimal width for this epoch in 1/16 bit.
    pub optimal_width: i32,
    /// Mean index distance between kept events, at least 8.
    pub average_distance: u32,
}

/// Results of one closed type-2 epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedEpoch {
    /// Epoch of the type-2 file.
    pub epoch: u32,
    /// Type-2 events of the epoch.
    pub type2_events: u32,
    /// Kept events (type-4 entries: key plus test events).
    pub kept: u32,
    /// Test events among the kept ones.
    pub tests: u32,
    /// Type-4 width used for this epoch.
    pub type4_width: u32,
    /// Type-4 width for the next epoch, after the width servo.
    pub next_type4_width: u32,
    /// Tracked clock drift `ft` in ticks; the offset in use is `Δ0 - ft`.
    pub tracked_drift: i64,
    /// Examined pairs in the accidentals window `(A - 2W, A]`.
    pub accidentals: u32,
    /// Examined pairs in the coincidence window `(-W, W)`.
    pub coincidences: u32,
    /// Header length of the most recently loaded type-1 file.
    pub type1_events: u32,
    /// Examined pairs by time difference from the tracked offset: bin `i` counts pairs
    /// with `diff == HISTOGRAM_FIRST_TICK + i` ticks, [`HISTOGRAM_BINS`] bins. The
    /// reference's `-H` histogram uses the same bins, summed over all patterns.
    pub histogram: Vec<u32>,
    /// Protocol 1 only: the basis of each raw key bit, in key order (0 for H/V, 1 for
    /// the diagonal basis, as side L's type-2 entry names it). Empty for other protocols.
    pub key_bases: Vec<u8>,
    /// The width servo step, when it ran.
    pub width_servo: Option<WidthServoStep>,
    /// Type-4 file for the peer, unless the zero policy skips it.
    pub type4: Option<Vec<u8>>,
    /// Raw-key (type-3) file, unless the zero policy skips it.
    pub type3: Option<Vec<u8>>,
    /// Test-event (type-5) file, when configured and type-3 is written.
    pub type5: Option<Vec<u8>>,
}

impl ClosedEpoch {
    /// Key events written to the raw key.
    pub fn key_events(&self) -> u32 {
        self.kept - self.tests
    }

    /// Formats the reference's main log line for verbosity `-V`; None for levels that
    /// print nothing (below 0 or above 5).
    pub fn log_line(&self, verbosity: i32) -> Option<String> {
        let e = self.epoch;
        let line = match verbosity {
            0 => format!("{e:08x}\n"),
            1 => format!("{e:08x}\t{}\n", self.kept),
            2 => format!("epoch: {e:08x}\t survived raw entries: {}\n", self.kept),
            3 => format!(
                "epoch: {e:08x}, stream2 evnts: {}, stream4 evnts: {}, new bitwidth4: {}\n",
                self.type2_events, self.kept, self.next_type4_width
            ),
            4 => format!(
                "epoch: {e:08x}, 2-evnts: {}, 4-evnts: {}, new bw4: {}, ft: {}, acc: {}, true: {}, 1-events: {}\n",
                self.type2_events,
                self.kept,
                self.next_type4_width,
                self.tracked_drift,
                self.accidentals as i32,
                self.coincidences as i32,
                self.type1_events
            ),
            5 => format!(
                "{e:08x}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                self.type2_events,
                self.kept,
                self.next_type4_width,
                self.tracked_drift,
                self.accidentals as i32,
                self.coincidences as i32,
                self.type1_events as i32
            ),
            _ => return None,
        };
        Some(line)
    }
}

/// Events of one epoch file, times already in the merged time base.
#[derive(Debug, Default)]
struct EpochEvents {
    epoch: u32,
    /// Header length (type-1) or number of events (type-2).
    length: u32,
    times: Vec<u64>,
    patterns: Vec<u8>,
}

/// Number of bins of [`ClosedEpoch::histogram`], 1 tick (1/8 ns) each.
pub const HISTOGRAM_BINS: usize = 128;
/// Time difference in ticks of the first bin of [`ClosedEpoch::histogram`].
pub const HISTOGRAM_FIRST_TICK: i64 = -64;

/// Raw events of one type-1 file; times are computed as they are read.
#[derive(Debug, Default)]
struct Type1Events {
    epoch: u32,
    /// Header length.
    length: u32,
    words: Vec<u64>,
    /// Added to `word >> 15` so that epoch bits 15..31 come from the file label.
    base: u64,
}

/// Counters of the type-2 epoch being matched, and its kept events.
#[derive(Debug)]
struct OpenEpoch {
    epoch: u32,
    type2_events: u32,
    coincidences: u32,
    accidentals: u32,
    histogram: [u32; HISTOGRAM_BINS],
    /// One slot per type-2 event of the epoch; the first `kept_count` hold the kept
    /// events as [`kept_entry`] words, in type-2 order. The slot after them is scratch:
    /// every examined pair writes it, and only a kept one advances `kept_count`, so
    /// the matching loop has no branch on the sifting outcome.
    kept_events: Vec<u64>,
    kept_count: usize,
    /// Encoder with the type-4 width of this epoch; the entries go in at closing.
    type4: Type4Encoder,
}

/// Sifting outcome of one pattern pair as the matching loop stores it: the type-3 or
/// type-5 value in bits 0..=7, the type-4 data in bits 8..=15, [`SIFT_TEST`], the
/// remote data `p2` in bits 24..=27 and [`SIFT_KEEP`].
const SIFT_TEST: u32 = 1 << 16;
const SIFT_KEEP: u32 = 1 << 31;

/// Returns the word stored for a kept event: the type-2 index in bits 32..=63 and the
/// sifting code in bits 0..=31.
#[inline(always)]
fn kept_entry(index: u32, code: u32) -> u64 {
    u64::from(index) << 32 | u64::from(code)
}

/// Stream whose current file a matching step has run past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exhausted {
    Type1,
    Type2,
}

/// Division by a divisor fixed for the whole run, as one multiplication and one shift
/// (Granlund and Montgomery, 1994), with the result of C's truncating `/`.
///
/// For a divisor `d` >= 2, `l = ceil(log2 d)` and `m = ceil(2^(63 + l) / d)` (below
/// 2^64), `floor(n · m / 2^(63 + l)) = floor(n / d)` for every `n < 2^63`, which covers
/// the magnitude of every `i64` but `i64::MIN`; that one value takes the plain division.
/// As `63 + l >= 64`, the shift takes the high word of the product and shifts it by
/// `l - 1`. A divisor of 1 returns `n` itself.
#[derive(Debug, Clone, Copy)]
struct FixedDivisor {
    divisor: i64,
    multiplier: u64,
    /// `l - 1`, the shift applied to the high word of the product.
    high_shift: u32,
}

impl FixedDivisor {
    /// Prepares division by `divisor`, which must be at least 1.
    fn new(divisor: i64) -> FixedDivisor {
        assert!(divisor >= 1, "FixedDivisor needs a divisor of 1 or more");
        if divisor == 1 {
            return FixedDivisor {
                divisor,
                multiplier: 0,
                high_shift: 0,
            };
        }
        let d = divisor as u128;
        let l = 64 - (divisor as u64 - 1).leading_zeros();
        let multiplier = ((1u128 << (63 + l)).div_ceil(d)) as u64;
        FixedDivisor {
            divisor,
            multiplier,
            high_shift: l - 1,
        }
    }

    /// Returns `n / divisor`, rounded toward zero.
    #[inline]
    fn divide(&self, n: i64) -> i64 {
        if self.divisor == 1 {
            return n;
        }
        if n == i64::MIN {
            return n / self.divisor;
        }
        let high = (u128::from(n.unsigned_abs()) * u128::from(self.multiplier)) >> 64;
        let q = ((high as u64) >> self.high_shift) as i64;
        // The sign of a tracking pair's diff is random, so it is applied without a
        // branch: `sign` is 0 or -1, and (q ^ -1) - (-1) = -q.
        let sign = n >> 63;
        (q ^ sign) - sign
    }
}

/// The clock-tracking servo. `accumulator` is the offset correction in 1/4096 tick.
#[derive(Debug, Clone)]
struct ClockServo {
    filter: i64,
    /// Event mode: gain per pair; time mode: divisor of the time-weighted update.
    gain: i64,
    /// Time mode: `gain` prepared for division, when it is 1 or more.
    gain_divisor: Option<FixedDivisor>,
    /// Time mode: pairs further apart than this many ticks do not update.
    max_gap: i64,
    accumulator: i64,
    /// Time mode with remainder carry: numerator left over by the last step's division,
    /// in 1/4096 tick times `gain`; its magnitude stays below `gain`.
    remainder: i64,
    carry_remainder: bool,
    last_time: u64,
}

impl ClockServo {
    fn new(filter: i64, carry_remainder: bool) -> ClockServo {
        let (gain, max_gap) = if filter > 0 {
            (4096 / filter, 0)
        } else {
            let ticks = filter.saturating_neg().saturating_mul(8000);
            // Time constant in ticks over 4096, and a gap cap of 100 ms.
            (ticks / 4096, ticks.min(800_000_000))
        };
        ClockServo {
            filter,
            gain,
            gain_divisor: (filter < 0 && gain >= 1).then(|| FixedDivisor::new(gain)),
            max_gap,
            accumulator: 0,
            remainder: 0,
            carry_remainder,
            last_time: 0,
        }
    }

    /// Updates with a tracking pair at type-1 time `t1`; returns the drift in ticks.
    #[inline]
    fn update(&mut self, diff: i64, t1: u64) -> i64 {
        if self.filter > 0 {
            self.accumulator = self.accumulator.wrapping_add(diff.wrapping_mul(self.gain));
        } else {
            let gap = t1.wrapping_sub(self.last_time) as i64;
            if self.last_time != 0 && gap < self.max_gap {
                if let Some(divisor) = &self.gain_divisor {
                    // A hardware division here cost more than the rest of the pair.
                    let numerator = diff.wrapping_mul(gap).wrapping_shl(1);
                    if self.carry_remainder {
                        let numerator = numerator.wrapping_add(self.remainder);
                        let step = divisor.divide(numerator);
                        self.remainder = numerator.wrapping_sub(step.wrapping_mul(self.gain));
                        self.accumulator = self.accumulator.wrapping_add(step);
                    } else {
                        let step = divisor.divide(numerator);
                        self.accumulator = self.accumulator.wrapping_add(step);
                    }
                }
            }
            self.last_time = t1;
        }
        self.accumulator / 4096
    }
}

/// The costream engine. See the module documentation.
#[derive(Debug)]
pub struct Costream {
    config: CostreamConfig,
    protocol: CostreamProtocol,
    /// The protocol's outcome per `p1 | p2 << 4` as `SIFT_*` codes.
    sift_codes: [u32; 256],
    /// Kept-event slots of the last closed epoch, reused by the next one.
    spare_kept: Vec<u64>,

    // Type-1 stream: queued files, the file being read, and the current event.
    queue1: VecDeque<Type1Events>,
    current1: Type1Events,
    /// Event vector of the last finished type-1 epoch, decoded into by the next
    /// `push_type1` so that each epoch does not map fresh pages.
    spare1: Vec<u64>,
    /// Skew in ticks per detector pattern (two's complement).
    skew: [u64; 16],
    position1: usize,
    next_epoch1: u32,
    type1_events: u32,
    t1: u64,
    p1: u8,
    need1: bool,

    // Type-2 stream.
    queue2: VecDeque<EpochEvents>,
    current2: EpochEvents,
    position2: usize,
    next_epoch2: u32,
    t2: u64,
    need2: bool,
    extended: Option<bool>,

    /// Rescales type-1 times as they are queued; see [`CostreamConfig::frequency_correction`].
    corrector: Option<FrequencyCorrector>,

    // Offsets in ticks: the one in use and the tracked drift `ft`.
    offset: i64,
    drift: i64,
    servo: ClockServo,

    // Type-4 width servo: filtered width in 1/256 bit and the width of the next epoch.
    long_width: i32,
    type4_width: u32,

    open: Option<OpenEpoch>,
    epochs_done: u32,
    done: bool,
}

/// Largest coincidence window, tracking window and accidentals distance in ticks: just
/// under one epoch (2^32 ticks, 0.54 s). A window of an epoch or more would pair events
/// of different epochs and is a mistake in the settings.
pub const MAX_WINDOW_TICKS: i64 = (1 << 32) - 1;

/// Type-4 width before the servo has run.
const INITIAL_TYPE4_WIDTH: u32 = 8;

impl Costream {
    /// Checks the settings and starts a run at `config.start_epoch`.
    pub fn new(config: CostreamConfig) -> Result<Costream, CoincidenceError> {
        let protocol = CostreamProtocol::new(config.protocol)?;
        check_window(
            "coincidence window (-w)",
            config.coincidence_window,
            1,
            "use a value such as 8 (the reference default) or 6 (the server's)",
        )?;
        check_window(
            "tracking window (-u)",
            config.tracking_window,
            1,
            "use a value such as 40 (the reference default) or 30 (the server's)",
        )?;
        check_window(
            "accidentals distance (-a)",
            config.accidental_distance,
            0,
            "use a value such as 160 (the reference default)",
        )?;
        if config.width_filter < 0 {
            return Err(CoincidenceError::InvalidOption {
                option: "type-4 width filter (-R)",
                detail: format!(
                    "{} is negative; use 0 (width fixed at 8) or more",
                    config.width_filter
                ),
            });
        }
        if protocol.type5_bits > 0 && !config.type5_output {
            return Err(CoincidenceError::InvalidOption {
                option: "type-5 output",
                detail: format!(
                    "protocol {} produces test events; give a type-5 output",
                    protocol.index
                ),
            });
        }
        // Both streams start one epoch before the first one, so the first events of
        // either stream are never dropped as out of order.
        let start_time = u64::from(config.start_epoch.wrapping_sub(1)) << 32;
        Ok(Costream {
            sift_codes: sift_codes(&protocol),
            spare_kept: Vec::new(),
            servo: ClockServo::new(config.track_filter, config.servo_remainder),
            corrector: config.frequency_correction,
            offset: config.time_offset,
            drift: 0,
            queue1: VecDeque::new(),
            current1: Type1Events::default(),
            spare1: Vec::new(),
            skew: skew_table(&config.skews),
            position1: 0,
            next_epoch1: config.start_epoch,
            type1_events: 0,
            t1: start_time,
            p1: 0,
            need1: true,
            queue2: VecDeque::new(),
            current2: EpochEvents::default(),
            position2: 0,
            next_epoch2: config.start_epoch,
            t2: start_time,
            need2: true,
            extended: None,
            long_width: (INITIAL_TYPE4_WIDTH as i32) << 8,
            type4_width: INITIAL_TYPE4_WIDTH,
            open: None,
            epochs_done: 0,
            done: false,
            protocol,
            config,
        })
    }

    /// The settings of this run.
    pub fn config(&self) -> &CostreamConfig {
        &self.config
    }

    /// Epoch of the next type-1 file to push.
    pub fn next_type1_epoch(&self) -> u32 {
        self.next_epoch1.wrapping_add(self.queue1.len() as u32)
    }

    /// Epoch of the next type-2 file to push.
    pub fn next_type2_epoch(&self) -> u32 {
        self.next_epoch2.wrapping_add(self.queue2.len() as u32)
    }

    /// Offset `t_L - t_H` in ticks in use now: the initial offset minus the tracked drift.
    pub fn current_offset(&self) -> i64 {
        self.offset
    }

    /// Tracked drift `ft` in ticks.
    pub fn tracked_drift(&self) -> i64 {
        self.drift
    }

    /// Queues the next type-1 file (of epoch [`Costream::next_type1_epoch`]).
    ///
    /// A header length of 0 is read as "count the events up to the terminator"; the
    /// reference rejects such files.
    pub fn push_type1(&mut self, bytes: &[u8]) -> Result<(), CoincidenceError> {
        let expected = self.next_type1_epoch();
        let spare = std::mem::take(&mut self.spare1);
        let mut file =
            Type1File::parse_reusing(bytes, spare).map_err(|source| CoincidenceError::Format {
                stream: Stream::Type1,
                epoch: expected,
                source,
            })?;
        if file.header.epoch != expected {
            return Err(CoincidenceError::WrongEpoch {
                stream: Stream::Type1,
                expected,
                found: file.header.epoch,
            });
        }
        // The corrected times stay in order because the rate stays within 2^-13 of 1.
        // NOTE: an event that the correction moves across a multiple of 2^15 epochs (every
        // 4.9 hours) gets the wrong epoch bits below, and is dropped as out of order.
        if let Some(corrector) = &mut self.corrector {
            corrector.correct_words(&mut file.events);
        }
        // Bits 15..31 of the epoch come from the file label, bits 0..14 from each event,
        // relative to the first event of the file.
        let first_epoch17 = file.events.first().map_or(0, |&w| (w >> 47) as u32);
        let high = expected & 0xFFFF_8000;
        let base = u64::from(high.wrapping_sub(first_epoch17 & 0x1_8000)) << 32;
        let events = Type1Events {
            epoch: expected,
            length: file.events.len() as u32,
            words: file.events,
            base,
        };
        self.queue1.push_back(events);
        Ok(())
    }

    /// Queues the next type-2 file (of epoch [`Costream::next_type2_epoch`]).
    ///
    /// Its base bits must match the protocol. A header length of 0 is read as "decode up
    /// to the end entry"; the reference fails on such files.
    pub fn push_type2(&mut self, bytes: &[u8]) -> Result<(), CoincidenceError> {
        let expected = self.next_type2_epoch();
        let format_error = |source| CoincidenceError::Format {
            stream: Stream::Type2,
            epoch: expected,
            source,
        };
        let file = Type2File::parse(bytes).map_err(format_error)?;
        let header = file.header;
        if header.epoch != expected {
            return Err(CoincidenceError::WrongEpoch {
                stream: Stream::Type2,
                expected,
                found: header.epoch,
            });
        }
        if header.base_bits != self.protocol.type2_bits {
            return Err(CoincidenceError::BaseBits {
                stream: Stream::Type2,
                epoch: expected,
                protocol: self.protocol.index,
                expected: self.protocol.type2_bits,
                found: header.base_bits,
            });
        }
        let decoded = file.decode().map_err(format_error)?;
        // The first file of the run decides between plain and extended output tags. An
        // epoch queued by `skip_type2` before it has no tag style of its own.
        if self.extended.is_none() {
            self.extended = Some(header.extended);
        }
        self.queue2.push_back(EpochEvents {
            epoch: expected,
            length: decoded.times.len() as u32,
            times: decoded.times,
            patterns: decoded.values,
        });
        Ok(())
    }

    /// Queues epoch [`Costream::next_type2_epoch`] without events, in place of a type-2
    /// file that never arrived or that `push_type2` rejected, and returns that epoch.
    ///
    /// The epoch closes as a type-2 file without events would: no coincidences, an empty
    /// raw key and the outputs of the zero policy. With [`ZeroPolicy::BothFiles`] these
    /// are a type-4 file holding only the end entry and a bare type-3 header, so the
    /// peer's splicer also takes no key bits from that epoch. The type-1 events of the
    /// epoch find no partner and are passed over, and the clock servo keeps its
    /// correction over the gap. The reference costream has no such step: it stops on a
    /// missing or bad type-2 file.
    pub fn skip_type2(&mut self) -> u32 {
        let epoch = self.next_type2_epoch();
        self.queue2.push_back(EpochEvents {
            epoch,
            ..EpochEvents::default()
        });
        epoch
    }

    /// Queues epoch [`Costream::next_type1_epoch`] without events, in place of a type-1
    /// file that `push_type1` rejected or that was never written, and returns that epoch.
    ///
    /// The type-2 events of that epoch then find no partner, so the epoch closes with no
    /// coincidences apart from pairs across its edges with the neighbouring type-1 epochs.
    /// Its type-4 file lists only the pairs found, so the peer's splicer takes the same
    /// bits as this side. The reference costream has no such step: it stops on a missing
    /// or bad type-1 file.
    pub fn skip_type1(&mut self) -> u32 {
        let epoch = self.next_type1_epoch();
        self.queue1.push_back(Type1Events {
            epoch,
            ..Type1Events::default()
        });
        epoch
    }

    /// Matches the queued events until a file is missing or the run is done; every epoch
    /// closed on the way is appended to `closed`.
    pub fn advance(&mut self, closed: &mut Vec<ClosedEpoch>) -> Result<Need, CoincidenceError> {
        if self.done {
            return Ok(Need::Done);
        }
        loop {
            let exhausted = if self.skew == [0; 16] {
                self.match_current_files::<false>()
            } else {
                self.match_current_files::<true>()
            };
            match exhausted {
                Exhausted::Type1 => {
                    let Some(next) = self.queue1.pop_front() else {
                        return Ok(Need::Type1(self.next_epoch1));
                    };
                    self.type1_events = next.length;
                    self.next_epoch1 = next.epoch.wrapping_add(1);
                    let finished = std::mem::replace(&mut self.current1, next);
                    self.spare1 = finished.words;
                    self.position1 = 0;
                }
                Exhausted::Type2 => {
                    if let Some(open) = self.open.take() {
                        closed.push(self.close_epoch(open)?);
                        self.epochs_done += 1;
                    }
                    if self.config.epoch_count > 0 && self.epochs_done >= self.config.epoch_count {
                        self.done = true;
                        return Ok(Need::Done);
                    }
                    let Some(next) = self.queue2.pop_front() else {
                        return Ok(Need::Type2(self.next_epoch2));
                    };
                    self.open_epoch(&next)?;
                    self.next_epoch2 = next.epoch.wrapping_add(1);
                    self.current2 = next;
                    self.position2 = 0;
                }
            }
        }
    }

    /// Runs the reference's matching loop over the current type-1 and type-2 files
    /// until a step needs the next file of one stream, and returns that stream.
    ///
    /// One pass of the reference loop, with `diff = t1 - t2 + Δ`: take a type-1 event
    /// while `need1` or `diff < -U`, else a type-2 event while `need2` or `diff > A`,
    /// else examine the pair and set both `need` flags. The state lives in locals
    /// here and goes back to `self` on return, so the next call resumes exactly.
    /// `SKEWED` is false when every skew is 0, which saves a table lookup per type-1
    /// event.
    fn match_current_files<const SKEWED: bool>(&mut self) -> Exhausted {
        let tracking = self.config.tracking_window;
        let accidental = self.config.accidental_distance;
        let type1 = Type1Scan {
            words: &self.current1.words,
            base: self.current1.base,
            skew: self.skew,
        };
        let times = &self.current2.times[..];
        let patterns = &self.current2.patterns[..];
        let mut examiner = Examiner {
            window: self.config.coincidence_window,
            accidental_floor: accidental - 2 * self.config.coincidence_window,
            tracking,
            tracking_on: self.config.track_filter != 0,
            time_offset: self.config.time_offset,
            codes: &self.sift_codes,
            servo: &mut self.servo,
            open: self.open.as_mut(),
            drift: self.drift,
        };

        let (mut t1, mut p1, mut position1, mut need1) =
            (self.t1, self.p1, self.position1, self.need1);
        let (mut t2, mut position2, mut need2) = (self.t2, self.position2, self.need2);
        let mut offset = self.offset;

        let exhausted = 'steps: loop {
            let diff = (t1.wrapping_sub(t2) as i64).wrapping_add(offset);
            if need1 || diff < -tracking {
                if position1 == type1.words.len() {
                    break Exhausted::Type1;
                }
                if type1.scan::<SKEWED>(&mut position1, &mut t1, &mut p1, t2, offset, -tracking) {
                    need1 = false;
                }
                continue;
            }
            if !(need2 || diff > accidental) {
                // Here -U <= diff <= A: examine the pair and consume both events.
                let index = position2 - 1;
                offset = examiner.examine(diff, t1, p1, patterns[index], index as u32, offset);
                need1 = true;
                need2 = true;
                continue;
            }
            // The next step takes a type-2 event, and no type-1 event is pending. From
            // here the steps repeat per type-2 event, and the place in the loop stands
            // for `need1` and `need2`. Any other case goes back to the general steps.
            loop {
                if position2 == times.len() {
                    need2 = true;
                    break 'steps Exhausted::Type2;
                }
                t2 = times[position2];
                position2 += 1;
                let diff = loop {
                    let diff = (t1.wrapping_sub(t2) as i64).wrapping_add(offset);
                    if diff >= -tracking {
                        break diff;
                    }
                    if !type1.scan_block::<SKEWED>(
                        &mut position1,
                        &mut t1,
                        &mut p1,
                        t2,
                        offset,
                        -tracking,
                    ) {
                        (need1, need2) = (true, false);
                        continue 'steps;
                    }
                };
                if diff > accidental {
                    continue;
                }
                let index = position2 - 1;
                let servo_offset =
                    examiner.examine(diff, t1, p1, patterns[index], index as u32, offset);
                if servo_offset != offset {
                    // The servo moved the offset. With the server's time-mode filter
                    // few pairs do, so the next steps assume the old offset instead of
                    // waiting for the servo's arithmetic, and this branch corrects them.
                    offset = servo_offset;
                    (need1, need2) = (true, true);
                    continue 'steps;
                }
                // Both events are consumed: take the next type-1 event, scanning
                // against this type-2 event as the reference does, then the next
                // type-2 event.
                if !type1.scan::<SKEWED>(&mut position1, &mut t1, &mut p1, t2, offset, -tracking) {
                    (need1, need2) = (true, true);
                    continue 'steps;
                }
            }
        };

        self.drift = examiner.drift;
        (self.t1, self.p1, self.position1, self.need1) = (t1, p1, position1, need1);
        (self.t2, self.position2, self.need2) = (t2, position2, need2);
        self.offset = offset;
        exhausted
    }

    fn open_epoch(&mut self, events: &EpochEvents) -> Result<(), CoincidenceError> {
        let type4 =
            Type4Encoder::new(self.type4_width, self.protocol.type4_bits).map_err(|source| {
                CoincidenceError::Format {
                    stream: Stream::Type4,
                    epoch: events.epoch,
                    source,
                }
            })?;
        log::debug!(
            "costream opens epoch {:08x}: {} type-2 events, type-4 width {}",
            events.epoch,
            events.length,
            self.type4_width
        );
        // Only grows: the slots past the kept events are never read.
        let mut kept_events = std::mem::take(&mut self.spare_kept);
        if kept_events.len() < events.times.len() {
            kept_events.resize(events.times.len(), 0);
        }
        self.open = Some(OpenEpoch {
            epoch: events.epoch,
            type2_events: events.length,
            coincidences: 0,
            accidentals: 0,
            histogram: [0; HISTOGRAM_BINS],
            kept_events,
            kept_count: 0,
            type4,
        });
        Ok(())
    }

    fn close_epoch(&mut self, open: OpenEpoch) -> Result<ClosedEpoch, CoincidenceError> {
        let OpenEpoch {
            epoch,
            type2_events,
            coincidences,
            accidentals,
            histogram,
            kept_events,
            kept_count,
            type4: mut type4_encoder,
        } = open;
        let protocol = &self.protocol;
        let mut type3_writer = BitWriter::new();
        let mut type5_writer = BitWriter::new();
        let mut key_bases = Vec::new();
        if protocol.index == 1 {
            key_bases.reserve(kept_count);
        }
        let mut tests = 0u32;
        for &entry in &kept_events[..kept_count] {
            let value = (entry & 0xFF) as u32;
            let data = (entry >> 8) as u8;
            if entry & u64::from(SIFT_TEST) != 0 {
                type5_writer.put(value, protocol.type5_bits);
                tests += 1;
            } else {
                type3_writer.put(value, protocol.type3_bits);
                if protocol.index == 1 {
                    key_bases.push((entry >> 24) as u8 & 0xF);
                }
            }
            type4_encoder
                .push((entry >> 32) as u32, data)
                .map_err(|source| CoincidenceError::Format {
                    stream: Stream::Type4,
                    epoch,
                    source,
                })?;
        }
        self.spare_kept = kept_events;

        let extended = self.extended.unwrap_or(false);
        let kept = type4_encoder.len();
        let policy = self.config.zero_policy;
        let type4_width = self.type4_width;
        let mut width_servo = None;
        let mut type4 = None;
        if kept > 0 || policy != ZeroPolicy::NoFiles {
            type4 = Some(type4_encoder.finish(epoch, extended));
            if kept > 0 {
                width_servo = self.update_type4_width(type2_events, kept);
            }
        }
        let mut type3 = None;
        let mut type5 = None;
        if kept > 0 || policy == ZeroPolicy::BothFiles {
            let key = kept - tests;
            type3 = Some(bit_file(
                epoch,
                extended,
                key,
                self.protocol.type3_bits,
                type3_writer,
            ));
            if self.config.type5_output {
                type5 = Some(bit_file(
                    epoch,
                    extended,
                    tests,
                    self.protocol.type5_bits,
                    type5_writer,
                ));
            }
        }
        let closed = ClosedEpoch {
            epoch,
            type2_events,
            kept,
            tests,
            type4_width,
            next_type4_width: self.type4_width,
            tracked_drift: self.drift,
            accidentals,
            coincidences,
            type1_events: self.type1_events,
            histogram: histogram.to_vec(),
            key_bases,
            width_servo,
            type4,
            type3,
            type5,
        };
        log::info!(
            "costream closed epoch {:08x}: {} type-2 events, {} coincidences, {} accidentals, {} kept, drift {} ticks",
            closed.epoch,
            closed.type2_events,
            closed.coincidences,
            closed.accidentals,
            closed.kept,
            closed.tracked_drift
        );
        Ok(closed)
    }

    /// Adapts the type-4 width to the mean index distance of kept events, as the
    /// reference does: single-precision log, C truncation, width clamped to 3..=20.
    fn update_type4_width(&mut self, type2_events: u32, kept: u32) -> Option<WidthServoStep> {
        let average_distance = (type2_events / kept).max(8);
        let bits = f64::from(average_distance as f32).ln() / 2f64.ln();
        let optimal_width = ((bits + 2.2117) * 16.0) as i32;
        let filter = self.config.width_filter;
        if filter <= 0 {
            return None;
        }
        self.long_width += (optimal_width * 16 - self.long_width) / filter;
        self.type4_width = (self.long_width >> 8).clamp(3, 20) as u32;
        Some(WidthServoStep {
            long_width: self.long_width,
            optimal_width,
            average_distance,
        })
    }
}

/// Returns the histogram bin of a time difference, or None outside the histogram.
#[inline]
fn histogram_bin(diff: i64) -> Option<usize> {
    let bin = diff.wrapping_sub(HISTOGRAM_FIRST_TICK);
    (0..HISTOGRAM_BINS as i64)
        .contains(&bin)
        .then_some(bin as usize)
}

/// Rejects a window or distance (in ticks) outside `minimum ..= MAX_WINDOW_TICKS`.
fn check_window(
    option: &'static str,
    ticks: i64,
    minimum: i64,
    hint: &str,
) -> Result<(), CoincidenceError> {
    if (minimum..=MAX_WINDOW_TICKS).contains(&ticks) {
        return Ok(());
    }
    Err(CoincidenceError::InvalidOption {
        option,
        detail: format!(
            "{ticks} ticks is outside the accepted range {minimum} to {MAX_WINDOW_TICKS} \
             ticks of 1/8 ns (shorter than one epoch); {hint}"
        ),
    })
}

/// Counters and kept events of the open epoch, and the clock servo: the state that
/// examining a pair updates.
struct Examiner<'a> {
    window: i64,
    accidental_floor: i64,
    tracking: i64,
    tracking_on: bool,
    time_offset: i64,
    codes: &'a [u32; 256],
    servo: &'a mut ClockServo,
    /// None only before the first type-2 file, when there is no pair to examine.
    open: Option<&'a mut OpenEpoch>,
    /// Tracked drift `ft` in ticks.
    drift: i64,
}

impl Examiner<'_> {
    /// Counts the pair with time difference `diff`, keeps it if the protocol does, feeds
    /// the servo, and returns the offset in use after it.
    ///
    /// Kept out of line, so that its state does not compete with the scans for
    /// registers; inlined, it measured no faster.
    #[inline(never)]
    fn examine(&mut self, diff: i64, t1: u64, p1: u8, p2: u8, index: u32, offset: i64) -> i64 {
        let open = self
            .open
            .as_deref_mut()
            .expect("a type-2 event implies an open epoch");
        if let Some(bin) = histogram_bin(diff) {
            open.histogram[bin] += 1;
        }
        open.accidentals += u32::from(diff > self.accidental_floor);
        let coincident = -self.window < diff && diff < self.window;
        open.coincidences += u32::from(coincident);
        // The sifting outcome is random (a basis match or not), so it is stored
        // without a branch; see `OpenEpoch::kept_events`.
        let code = self.codes[usize::from(p1 | p2 << 4)];
        open.kept_events[open.kept_count] = kept_entry(index, code);
        open.kept_count += usize::from(coincident) & (code >> 31) as usize;
        if self.tracking_on && diff < self.tracking {
            self.drift = self.servo.update(diff, t1);
            return self.time_offset.wrapping_sub(self.drift);
        }
        offset
    }
}

/// The type-1 file being matched, read in place: times are computed from the raw words
/// as the scan reaches them.
struct Type1Scan<'a> {
    words: &'a [u64],
    /// Added to `word >> 15` so that epoch bits 15..31 come from the file label.
    base: u64,
    /// Skew in ticks per detector pattern (two's complement).
    skew: [u64; 16],
}

impl Type1Scan<'_> {
    /// Takes events from `position` until one is accepted with `diff >= floor`;
    /// returns false when the file ends first.
    ///
    /// This is the reference's one-event-per-pass loop in one scan: events not later
    /// than the last accepted one (`t1`) are dropped, every other event becomes the
    /// current one (`t1`, `p1`), and the scan goes on while `diff < floor`. The offset
    /// cannot change here because the servo only runs on examined pairs.
    #[inline(always)]
    fn scan<const SKEWED: bool>(
        &self,
        position: &mut usize,
        t1: &mut u64,
        p1: &mut u8,
        t2: u64,
        offset: i64,
        floor: i64,
    ) -> bool {
        let mut time_last = *t1;
        let mut accepted = None;
        let mut found = false;
        let mut next = *position;
        while next < self.words.len() {
            let word = self.words[next];
            next += 1;
            let mut time = (word >> 15).wrapping_add(self.base);
            if SKEWED {
                time = time.wrapping_add(self.skew[(word & 0xF) as usize]);
            }
            // Out-of-order events (after skew) are dropped.
            if time <= time_last {
                continue;
            }
            time_last = time;
            accepted = Some(word);
            if (time.wrapping_sub(t2) as i64).wrapping_add(offset) >= floor {
                found = true;
                break;
            }
        }
        *position = next;
        if let Some(word) = accepted {
            *t1 = time_last;
            *p1 = (word & 0xF) as u8;
        }
        found
    }

    /// Scans like [`Type1Scan::scan`], but judges the next [`SCAN_BLOCK`] events at
    /// once, without a branch per event.
    ///
    /// After a type-2 event is taken, the number of type-1 events to pass is geometric
    /// (about 4 at 1e6 type-1 events/s). A branch per event then costs one
    /// mispredicted loop exit per scan, which took longer than the extra comparisons.
    #[inline(always)]
    fn scan_block<const SKEWED: bool>(
        &self,
        position: &mut usize,
        t1: &mut u64,
        p1: &mut u8,
        t2: u64,
        offset: i64,
        floor: i64,
    ) -> bool {
        let start = *position;
        if let Some(block) = self.words.get(start..start + SCAN_BLOCK) {
            let mut times = [0u64; SCAN_BLOCK];
            for (time, &word) in times.iter_mut().zip(block) {
                *time = self.time::<SKEWED>(word);
            }
            // The block is used only when no event in it is dropped as out of order,
            // so the drop rule stays exact even where `diff` wraps around.
            let mut ordered = times[0] > *t1;
            let mut reached = 0u32;
            for k in 0..SCAN_BLOCK {
                if k > 0 {
                    ordered &= times[k] > times[k - 1];
                }
                let diff = (times[k].wrapping_sub(t2) as i64).wrapping_add(offset);
                reached |= u32::from(diff >= floor) << k;
            }
            if ordered {
                let last = (reached.trailing_zeros() as usize).min(SCAN_BLOCK - 1);
                *position = start + last + 1;
                *t1 = times[last];
                *p1 = (block[last] & 0xF) as u8;
                if reached != 0 {
                    return true;
                }
            }
        }
        self.scan::<SKEWED>(position, t1, p1, t2, offset, floor)
    }

    /// Returns the time of `word` in ticks, skew included.
    #[inline(always)]
    fn time<const SKEWED: bool>(&self, word: u64) -> u64 {
        let time = (word >> 15).wrapping_add(self.base);
        if SKEWED {
            time.wrapping_add(self.skew[(word & 0xF) as usize])
        } else {
            time
        }
    }
}

/// Type-1 events that [`Type1Scan::scan_block`] judges at once.
const SCAN_BLOCK: usize = 8;

/// Returns the `SIFT_*` code of every `p1 | p2 << 4`.
fn sift_codes(protocol: &CostreamProtocol) -> [u32; 256] {
    let mut codes = [0u32; 256];
    for (pair, code) in codes.iter_mut().enumerate() {
        let (p1, p2) = (pair as u8 & 0xF, (pair >> 4) as u8);
        *code = match protocol.sift(p1, p2) {
            Sift::Discard => 0,
            Sift::Key { value, data } => SIFT_KEEP | u32::from(data) << 8 | u32::from(value),
            Sift::Test { value, data } => {
                SIFT_KEEP | SIFT_TEST | u32::from(data) << 8 | u32::from(value)
            }
        } | u32::from(p2) << 24;
    }
    codes
}

/// Returns the skew of each 4-bit detector pattern: `skews[i]` for the single detector
/// `i + 1`, 0 for every other pattern.
fn skew_table(skews: &[i64; 4]) -> [u64; 16] {
    let mut table = [0u64; 16];
    for (i, skew) in skews.iter().enumerate() {
        table[1 << i] = *skew as u64;
    }
    table
}

#[cfg(test)]
mod tests {
    use super::{ClockServo, FixedDivisor};

    /// Feeds `pairs` tracking pairs of one `diff`, `gap` ticks apart, to a servo with the
    /// server's time constant (0.2 s, divisor 390 625); returns the accumulator.
    fn servo_after(diff: i64, gap: u64, pairs: u64, carry_remainder: bool) -> i64 {
        let mut servo = ClockServo::new(-200_000, carry_remainder);
        // The first pair only sets the time of the last pair.
        for k in 0..=pairs {
            servo.update(diff, (k + 1) * gap);
        }
        servo.accumulator
    }

    #[test]
    fn servo_remainder_keeps_small_steps() {
        // 2 · 1 · 4000 = 8000 per pair, 1/48.8 of a unit: the reference loses every step.
        assert_eq!(servo_after(1, 4000, 390_625, false), 0);
        assert_eq!(servo_after(1, 4000, 390_625, true), 8000);
        assert_eq!(servo_after(-1, 4000, 390_625, true), -8000);
        // Steps of one unit and more lose only their fraction in the reference.
        assert_eq!(servo_after(30, 10_000, 1000, false), 1000);
        assert_eq!(servo_after(30, 10_000, 1000, true), 1536);
    }

    #[test]
    fn fixed_divisor_equals_truncating_division() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut divisors = vec![
            1i64,
            2,
            3,
            7,
            48,
            390,
            48_828,
            390_625,
            i64::MAX / 4096,
            i64::MAX,
        ];
        divisors.extend((0..62).map(|k| 1i64 << k));
        divisors.extend((1..62).map(|k| (1i64 << k) + 1));
        divisors.extend((0..200).map(|_| (next() >> (next() % 63 + 1)) as i64 | 1));
        for d in divisors {
            let divisor = FixedDivisor::new(d);
            let mut numerators = vec![
                0i64,
                1,
                -1,
                d,
                -d,
                d - 1,
                1 - d,
                i64::MAX,
                i64::MIN,
                i64::MIN + 1,
            ];
            numerators.extend((0..300).map(|_| (next() as i64) >> (next() % 64)));
            for n in numerators {
                assert_eq!(divisor.divide(n), n / d, "{n} / {d}");
            }
        }
    }
}
