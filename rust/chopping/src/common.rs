//! Pieces shared by both choppers: errors, statistics, the wall clock of extended epochs,
//! and the ordering rules A to C.

use std::time::{SystemTime, UNIX_EPOCH};

use qkd_formats::FormatError;

/// Suspicious epoch changes tolerated since the last good one; the next one is fatal.
pub const MAX_SUSPICIOUS_EVENTS: u32 = 5;

/// Largest backward step (in ticks) that counts as disorder rather than a 49-bit rollover.
pub(crate) const MAX_BACKWARD_TICKS: u64 = 1 << 48;

/// Ticks of 1/8 ns per microsecond, the unit of the maximum-gap option.
pub const TICKS_PER_MICROSECOND: u64 = 8000;

/// Errors of the chopping stage.
#[derive(Debug, thiserror::Error)]
pub enum ChopError {
    #[error("invalid chopper option: {0}")]
    Config(String),
    #[error(
        "more than {MAX_SUSPICIOUS_EVENTS} events jumped from epoch {old:08x} to epoch {new:08x} \
         ({kind}); an epoch without any event means the timestamp stream paused for more than \
         0.54 s or the input is not time ordered raw events. Restart the chopper with the stream running"
    )]
    EpochJump {
        old: u32,
        new: u32,
        /// "backward" or "forward by 2 or more"
        kind: &'static str,
    },
    #[error("the chopper stopped after an earlier error; create a new one")]
    Stopped,
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// Counts of input events and of the reasons events were dropped, since creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChopStats {
    /// Event words fed.
    pub events_in: u64,
    /// Events written into an epoch (or pending in the open one).
    pub accepted: u64,
    /// Dropped because earlier than a previous event (rule A).
    pub dropped_backward: u64,
    /// Dropped because more than the maximum gap after the previous event (rule B).
    pub dropped_gap: u64,
    /// Dropped because their epoch jumped backward or ahead by 2 or more (rule C).
    pub dropped_epoch_jump: u64,
    /// Dropped by chopper because not strictly after the previous encoded event of the
    /// epoch (rule D: duplicates, offset 0, disorder).
    pub dropped_not_after_previous: u64,
    /// Dropped because their epoch was already written by an explicit flush.
    pub dropped_after_flush: u64,
    /// Epochs written.
    pub epochs_written: u64,
}

/// Summary of one written epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochSummary {
    /// Epoch as written in the header and file name.
    pub epoch: u32,
    /// Number of events in the files.
    pub events: u32,
    /// Type-2 time order `T` of the packet (chopper only).
    pub time_order: Option<u32>,
    /// Events of this epoch per detector pattern 0..=15.
    pub patterns: [u32; 16],
    /// The line the reference program logs at the chosen verbosity, with its newline.
    pub log_line: Option<String>,
}

/// Source of the wall-clock time used to extend 17-bit epochs (the `-U` option).
pub trait Clock: Send {
    /// Returns the current Unix time in whole seconds.
    fn unix_seconds(&mut self) -> u64;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn unix_seconds(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A clock that always returns the same second (for tests and reproducible runs).
impl Clock for u64 {
    fn unix_seconds(&mut self) -> u64 {
        *self
    }
}

/// Extends a 17-bit event epoch to the 32-bit epoch counted from the Unix epoch, using
/// the host clock `unix_seconds`.
///
/// The result is right when the event time is at most a quarter of the 17-bit range
/// (2^15 epochs, about 4 h 53 min) ahead of the host clock and at most two quarters
/// behind it. Further out, its upper 15 bits are off by 0x20000. Its low 17 bits always
/// equal `epoch17`.
pub fn extended_epoch(epoch17: u32, unix_seconds: u64) -> u32 {
    // 10^9 ns / 2^29 ns = 1953125 / 2^20 epochs per second.
    let host = ((unix_seconds.wrapping_mul(1_953_125)) >> 20) as u32;
    let index = ((host >> 15) & 3) | ((epoch17 >> 13) & 0xC);
    let correction: u32 = match index {
        3 => 0x2_0000,
        8 | 12 | 13 => 0x2_0000_u32.wrapping_neg(),
        _ => 0,
    };
    (host & 0xFFFE_0000)
        .wrapping_add(epoch17)
        .wrapping_add(correction)
}

/// Verdict of rules A and B on one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    Accept,
    Backward,
    Gap,
}

/// Rules A and B: the time `last` of the last event that passed them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OrderFilter {
    pub last: u64,
    /// Maximum gap in ticks, 0 for none.
    pub max_gap: u64,
}

impl OrderFilter {
    /// Checks the 49-bit tick time `t` and, if it passes, makes it the new `last`.
    #[inline]
    pub fn check(&mut self, t: u64) -> Order {
        if t < self.last && self.last - t <= MAX_BACKWARD_TICKS {
            return Order::Backward;
        }
        if self.max_gap > 0 && self.last != 0 {
            // Wrapping as in the reference: only an excess in 1..=2^48 counts as a gap.
            let excess = t.wrapping_sub(self.last).wrapping_sub(self.max_gap);
            if excess != 0 && excess <= MAX_BACKWARD_TICKS {
                return Order::Gap;
            }
        }
        self.last = t;
        Order::Accept
    }
}

/// Rule C: classifies a change from epoch `current` to `new` (both 17-bit).
/// Returns `None` for a good change (next epoch, or a backward jump of more than 2^16
/// epochs, which is the 49-bit rollover), else the kind of suspicious jump.
#[inline]
pub(crate) fn suspicious_change(current: u32, new: u32) -> Option<&'static str> {
    if new.wrapping_sub(current) & 0x1_0000 != 0 {
        Some("backward")
    } else if new > current.wrapping_add(1) {
        Some("forward by 2 or more")
    } else {
        None
    }
}

/// Event words over several epochs from a fixed seed, for tests of the block fast paths
/// against the event-by-event rules. The steps mix duplicates, backward steps, 1- and
/// 2-tick steps and about 100000 ticks on average. With `max_gap` 0 there are
/// escape-sized steps and steps to offset 0 of the next epoch too. Otherwise there are
/// steps of exactly `max_gap` ticks, and one step above it near the end drops the rest
/// of the stream (rule B).
#[cfg(test)]
pub(crate) fn messy_events(seed: u64, count: usize, max_gap: u64) -> Vec<u64> {
    let mut state = seed;
    let mut time = 0x4f86u64 << 32;
    // Latest time so far: the time that rules A and B measure from.
    let mut latest = time;
    let mut pattern = 1u64;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        // splitmix64: deterministic and cheap.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut r = state;
        r = (r ^ (r >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        r = (r ^ (r >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        r ^= r >> 31;
        time = match r % 1000 {
            0..=4 => time - (r >> 56),
            5..=9 => time,
            10..=29 => time + 1,
            30..=34 => time + 2,
            35 if max_gap > 0 => latest + max_gap,
            36 if max_gap == 0 => time + (1 << 24) + (r >> 40),
            37 if max_gap == 0 => ((time >> 32) + 1) << 32,
            _ => time + 1 + (r >> 40) % 200_000,
        };
        if max_gap > 0 && i == count - 100 {
            time = latest + max_gap + 1;
        }
        latest = latest.max(time);
        if r % 50 == 0 {
            pattern = (r >> 8) & 0xF;
        }
        out.push((time << 15) | ((r >> 50) & 0x7FF) << 4 | pattern);
    }
    out
}

/// Names and contents of the files in `dir`, sorted by name, for tests that compare
/// two runs.
#[cfg(test)]
pub(crate) fn file_listing(dir: &std::path::Path) -> Vec<(std::ffi::OsString, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name(), std::fs::read(e.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extended_epoch_matches_host_epoch() {
        // 2026-01-01T00:00:00Z
        let now = 1_767_225_600u64;
        let host = ((now * 1_953_125) >> 20) as u32;
        assert_eq!(extended_epoch(host & 0x1_FFFF, now), host);
        // One epoch behind and one ahead of the host clock.
        assert_eq!(
            extended_epoch(host.wrapping_sub(1) & 0x1_FFFF, now),
            host - 1
        );
        assert_eq!(extended_epoch((host + 1) & 0x1_FFFF, now), host + 1);
    }

    #[test]
    fn extended_epoch_window_edges() {
        // Host in the last quarter of a 17-bit period, event just after the wrap.
        let host_epoch: u32 = 0xBC3F_F000;
        let now = (u64::from(host_epoch) << 20).div_ceil(1_953_125);
        let host = ((now * 1_953_125) >> 20) as u32;
        let ahead = host + 0x2000;
        assert_eq!(extended_epoch(ahead & 0x1_FFFF, now), ahead);
        let behind = host - 0xF000;
        assert_eq!(extended_epoch(behind & 0x1_FFFF, now), behind);
    }

    #[test]
    fn rollover_is_a_good_change() {
        assert_eq!(suspicious_change(0x1_FFFF, 0), None);
        assert_eq!(suspicious_change(5, 6), None);
        assert_eq!(suspicious_change(6, 5), Some("backward"));
        assert_eq!(suspicious_change(5, 7), Some("forward by 2 or more"));
        assert_eq!(suspicious_change(0x1_0000, 0), Some("backward"));
        assert_eq!(suspicious_change(0x1_0001, 0), None);
    }

    #[test]
    fn order_filter_rules() {
        let mut f = OrderFilter {
            last: 0,
            max_gap: 100,
        };
        assert_eq!(f.check(1000), Order::Accept);
        assert_eq!(f.check(999), Order::Backward);
        assert_eq!(f.check(1100), Order::Accept);
        assert_eq!(f.check(1201), Order::Gap);
        assert_eq!(f.check(1300), Order::Gap);
        assert_eq!(f.last, 1100);
        // A step back of more than 2^48 ticks is a rollover of the 49-bit time.
        let mut r = OrderFilter {
            last: (1 << 49) - 10,
            max_gap: 0,
        };
        assert_eq!(r.check(5), Order::Accept);
    }
}
