//! File and stream formats of the QKD pipeline: raw timestamp events and the epoch
//! files of types 1, 2, 3, 4 and 7.
//!
//! Units: times are ticks of 1/8 ns unless a name says otherwise. An epoch is
//! 2^32 ticks (about 0.537 s); a file is named by its epoch in 8 lowercase hex digits.
//! Every multi-byte field on disk is little-endian, and packed bit streams fill each
//! 32-bit word from bit 31 downwards.
//!
//! This crate knows nothing of Python; `qkd_core` wraps it.

pub mod bits;
pub mod epoch;
pub mod error;
pub mod raw;
pub mod skew;
pub mod tdc1;
pub mod timestamp7;
pub mod type1;
pub mod type2;
pub mod type3;
pub mod type4;
pub mod type7;

pub use error::FormatError;
