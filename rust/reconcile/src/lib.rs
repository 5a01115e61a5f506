//! QKDServer core: error correction, key verification and privacy amplification.
//!
//! Two peers hold raw keys that differ in a fraction QBER of their bits. The
//! [`protocol::Reconciler`] state machines turn them into identical secret final keys:
//! Cascade reconciliation ([`cascade`]), verification by a universal hash with a fresh
//! random key ([`verify`]), a final length from a finite-key bound that counts every
//! disclosed bit ([`finite_key`]) and Toeplitz privacy amplification ([`toeplitz`]).
//! Messages follow the versioned wire format of [`message`]; bit strings are [`bits::BitVec`].
//!
//! The crate owns no socket and no clock, and knows nothing of Python.

pub mod bits;
pub mod cascade;
pub mod finite_key;
pub mod message;
pub mod protocol;
pub mod rng;
pub mod toeplitz;
pub mod verify;

pub use protocol::{BlockOutcome, BlockResult, BlockStats, Config, Reconciler, Role};

/// Errors that do not belong to a block in progress, and configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("random source failed: {0}")]
    Random(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("block {0:#x} is already in progress or finished; every block needs a new id")]
    DuplicateBlock(u64),
    #[error("block of {bits} raw bits is invalid: expected 1 ..= {max} bits")]
    BlockSize { bits: usize, max: usize },
    #[error("message for unknown block {0:#x}; start the block on this node first")]
    UnknownBlock(u64),
    #[error("message for block {0:#x}, which has already finished (replayed or late message)")]
    FinishedBlock(u64),
    #[error("more than {0} START messages wait for their raw key; start the blocks on this node")]
    TooManyPending(usize),
    #[error("invalid message: {0}")]
    Message(#[from] message::MessageError),
}
