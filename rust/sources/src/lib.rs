//! Event sources of a QKD node: the two-node link simulator, the S-Fifteen TDC1 serial
//! time tagger, and recorded files or pipes of raw events.
//!
//! Every source hands out raw event words (`qkd_formats::raw`: 49-bit time in ticks of
//! 1/8 ns in bits 63..15, detector pattern in bits 3..0) in batches, through one trait, so
//! that the chopper stages and the orchestration cannot tell them apart.

pub mod error;
pub mod file;
pub mod simulator;
pub mod tdc1_device;
pub mod tdc1_emulator;

pub use error::SourceError;
pub use simulator::{
    LinkConfig, LinkSimulator, LinkStats, NodeConfig, NodeStats, Side, SimulatedNode,
};

/// A stream of raw event words, read in batches.
pub trait EventSource: Send {
    /// Appends the next batch of event words to `out`, in the order the source produced
    /// them; returns `Ok(false)` once the stream has ended and nothing more will come.
    ///
    /// A batch may be empty while the stream goes on (a quiet device, a pipe without data
    /// yet), so callers loop until `Ok(false)` or an error.
    fn read_batch(&mut self, out: &mut Vec<u64>) -> Result<bool, SourceError>;

    /// Ends the stream and releases the source (a device is stopped and reset). The
    /// default does nothing beyond what dropping the source does.
    fn stop(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
}
