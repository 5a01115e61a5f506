//! QKDServer core: sync. Finds the clock offset between the two nodes before
//! coincidence matching starts.
//!
//! - [`pfind`]: time offset by FFT cross-correlation of binned event times, as the
//!   reference `pfind` computes it, from time arrays or epoch files
//!   ([`epochs`]).
//! - [`frequency`]: joint frequency and time offset search (the fpfind method), for clocks
//!   that differ in rate by up to about 1e-5.
//! - [`correct`]: rescales side H's event times by the frequency found.
//! - [`correlate`]: the reusable FFT correlator both searches use.
//!
//! Units: ticks of 1/8 ns for times, ns for bin widths (the reference's option units).
//! This crate knows nothing of Python; `qkd_core` wraps it.

pub mod correct;
pub mod correlate;
pub mod epochs;
pub mod error;
pub mod frequency;
pub mod pfind;

pub use correct::FrequencyCorrector;
pub use epochs::{Deletion, EpochTimes, TimeBase};
pub use error::{EpochKind, SyncError};
pub use frequency::{FrequencyFinder, FrequencyOffset, FrequencySearchParams};
pub use pfind::{OffsetFinder, OffsetResult, Peak, PfindParams};
