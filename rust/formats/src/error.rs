//! The error type of every reader and writer in this crate.

use std::path::PathBuf;

/// A format error: what was wrong, with the offending value and, where it helps, the fix.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("truncated input: {what} needs a multiple of {record_bytes} bytes, got {len} bytes; the last record is incomplete")]
    Truncated {
        what: &'static str,
        record_bytes: usize,
        len: usize,
    },
    #[error("invalid {what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FormatError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FormatError::Io {
            path: path.into(),
            source,
        }
    }
}
