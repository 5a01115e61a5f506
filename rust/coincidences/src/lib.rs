//! Coincidence finding and sifting: costream on the high-count side, splicer on the
//! low-count side, and per-epoch rate and QBER figures.
//!
//! Data flow of one epoch `e`: the high-count side matches its type-1 file with the
//! peer's type-2 file in [`Costream`], writes its raw key (type-3) and sends a type-4
//! file back; the low-count side selects the same events from chopper's type-3 file with
//! [`splice`]. Both raw keys then hold the same bits up to measurement errors.
//!
//! Units: times and windows in ticks of 1/8 ns, epochs of 2^32 ticks.
//!
//! ```no_run
//! use qkd_coincidences::{Costream, CostreamConfig, CostreamFolders, Need};
//! let mut costream = Costream::new(CostreamConfig {
//!     start_epoch: 0x4f87,
//!     epoch_count: 91,
//!     time_offset: 8,
//!     ..CostreamConfig::default()
//! })?;
//! let folders = CostreamFolders {
//!     type1: "t1".into(), type2: "t2".into(), type3: "rawkey".into(), type4: "t4".into(),
//!     type5: None, delete_type1: false, delete_type2: false,
//! };
//! let (closed, need) = folders.step(&mut costream)?;
//! for epoch in &closed {
//!     print!("{}", epoch.log_line(5).unwrap());
//! }
//! assert_eq!(need, Need::Done);
//! # Ok::<(), qkd_coincidences::CoincidenceError>(())
//! ```

pub mod costream;
pub mod directories;
pub mod error;
pub mod protocol;
pub mod splicer;
pub mod stats;
pub mod synthetic;

pub use costream::{
    ClosedEpoch, Costream, CostreamConfig, Need, WidthServoStep, ZeroPolicy, HISTOGRAM_BINS,
    HISTOGRAM_FIRST_TICK, MAX_WINDOW_TICKS,
};
pub use directories::CostreamFolders;
pub use error::{CoincidenceError, Stream};
pub use protocol::{CostreamProtocol, Sift, SplicerProtocol};
pub use splicer::{splice, SplicedEpoch};
