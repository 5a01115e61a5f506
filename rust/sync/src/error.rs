//! The error type of the sync stage.

use std::path::PathBuf;

use qkd_formats::FormatError;

/// Which epoch file a reading error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochKind {
    /// Type-1 file of the high-count side (raw events, from chopper2).
    Type1,
    /// Type-2 file of the low-count side (compressed times, from chopper).
    Type2,
}

impl std::fmt::Display for EpochKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EpochKind::Type1 => "type-1",
            EpochKind::Type2 => "type-2",
        })
    }
}

/// A sync error: what failed, on which value or file, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("invalid {name} {value}: expected {expected}")]
    InvalidParameter {
        name: &'static str,
        value: String,
        expected: String,
    },
    #[error("{kind} epoch file {path} not found or unreadable ({source}); check the folder and that epoch {epoch:08x} was written")]
    MissingFile {
        kind: EpochKind,
        epoch: u32,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{kind} epoch file {path} is empty; the writer may still be writing it")]
    EmptyFile { kind: EpochKind, path: PathBuf },
    #[error("{kind} epoch file {path} is {len} bytes, shorter than its {header} byte header")]
    ShortHeader {
        kind: EpochKind,
        path: PathBuf,
        len: usize,
        header: usize,
    },
    #[error("{kind} epoch file {path} has tag {tag:#x}; expected {expected}")]
    WrongTag {
        kind: EpochKind,
        path: PathBuf,
        tag: u32,
        expected: &'static str,
    },
    #[error("{kind} epoch file {path} is inconsistent: {source}")]
    Inconsistent {
        kind: EpochKind,
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error("{kind} epoch file {path} holds epoch {found:08x} in its header; expected {expected:08x} from its name")]
    EpochMismatch {
        kind: EpochKind,
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("could not delete the consumed {kind} epoch file {path}: {source}")]
    DeleteFailed {
        kind: EpochKind,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no {kind} events in {source_desc}; a time offset needs events on both sides, so supply epochs in which both sides detected photons")]
    NoEvents {
        kind: EpochKind,
        /// What was searched, e.g. "epochs 00004f87 to 00004f8a".
        source_desc: String,
    },
    #[error("no correlation peak found: {detail}")]
    NoPeak { detail: String },
}

impl SyncError {
    /// Returns the error code the reference pfind uses for the same failure, if it has one.
    ///
    /// The reference exits with status `256 − code`. Failures the reference does not
    /// detect (no events, no peak) return `None`.
    pub fn pfind_code(&self) -> Option<u8> {
        use EpochKind::{Type1, Type2};
        let code = match self {
            SyncError::InvalidParameter { name, .. } => match *name {
                "buffer order" => 30,
                "fine resolution" | "coarse resolution" => 9,
                _ => 1,
            },
            SyncError::MissingFile { kind: Type1, .. } => 20,
            SyncError::MissingFile { kind: Type2, .. } => 23,
            SyncError::EmptyFile { kind: Type1, .. } => 12,
            SyncError::EmptyFile { kind: Type2, .. } => 16,
            SyncError::ShortHeader { kind: Type1, .. } => 14,
            SyncError::ShortHeader { kind: Type2, .. } => 18,
            SyncError::Inconsistent { kind: Type1, .. } => 15,
            SyncError::Inconsistent { kind: Type2, .. } => 19,
            SyncError::EpochMismatch { kind: Type1, .. } => 21,
            SyncError::EpochMismatch { kind: Type2, .. } => 24,
            SyncError::DeleteFailed { kind: Type1, .. } => 22,
            SyncError::DeleteFailed { kind: Type2, .. } => 25,
            SyncError::WrongTag { kind: Type1, .. } => 27,
            SyncError::WrongTag { kind: Type2, .. } => 28,
            SyncError::NoEvents { .. } | SyncError::NoPeak { .. } => return None,
        };
        Some(code)
    }
}
