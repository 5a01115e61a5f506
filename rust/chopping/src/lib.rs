//! Chopping: cutting a stream of raw timestamp events into epochs and writing one set of
//! epoch files per epoch.
//!
//! - [`Chopper`] runs on the low-count side and writes a type-2 file (compressed times and
//!   basis bits, sent to the peer) and a type-3 file (measurement results, kept locally).
//! - [`Chopper2`] runs on the high-count side and writes a type-1 file (the raw events).
//!
//! Both are stage objects: feed them batches of event words (49-bit tick time in bits
//! 63..15, detector pattern in bits 3..0, see [`qkd_formats::raw`]) and each call returns
//! a summary of every epoch it finished and wrote. An epoch is finished when the first
//! accepted event of the next epoch arrives, so the epoch in progress is only written by
//! an explicit [`Chopper::flush`] / [`Chopper2::flush`]. Memory is bounded by one epoch.
//!
//! The output is byte-identical to the reference programs `chopper` and `chopper2` of
//! qcrypto for the same input and options, including their rules for dropping events:
//!
//! - A: an event earlier than the last time that passed rules A and B by at most 2^48 ticks
//!   is dropped; a larger backward step is a 49-bit rollover and accepted.
//! - B (`max_gap_us` > 0): an event more than the maximum gap after that time is dropped.
//!   Because dropped events do not move that time, one long gap drops the rest of the
//!   stream (the reference locks up the same way).
//! - C: an epoch may only advance by one (or roll over); other changes are suspicious, and
//!   the 6th suspicious event since the last good change is a fatal
//!   [`ChopError::EpochJump`].
//! - D and E (chopper only): events not strictly after the previous encoded one in the
//!   epoch are dropped (so offset 0 always is). A 1-tick difference is sent as 2. The
//!   next difference counts from the decoded time (docs/epoch-files.md, rule E).
//!
//! Example:
//!
//! ```
//! use qkd_chopping::{Chopper2, Chopper2Config, Destination};
//! let dir = tempfile::tempdir().unwrap();
//! let mut chopper2 = Chopper2::new(
//!     Chopper2Config { verbosity: 3, four_detectors: true, ..Default::default() },
//!     Destination::directory(dir.path()).unwrap(),
//! ).unwrap();
//! let epoch = |e: u64, offset: u64, pattern: u64| (((e << 32) | offset) << 15) | pattern;
//! let done = chopper2.feed(&[epoch(0x42, 5, 1), epoch(0x42, 9, 2), epoch(0x43, 1, 4)]).unwrap();
//! assert_eq!(done.len(), 1);
//! assert_eq!(done[0].log_line.as_deref(), Some("00000042\t2\t1\t1\t0\t0\n"));
//! assert!(dir.path().join("00000042").exists());
//! ```

mod chopper;
mod chopper2;
mod common;
mod output;

pub use chopper::{Chopper, ChopperConfig};
pub use chopper2::{Chopper2, Chopper2Config};
pub use common::{
    extended_epoch, ChopError, ChopStats, Clock, EpochSummary, SystemClock, MAX_SUSPICIOUS_EVENTS,
};
pub use output::Destination;
