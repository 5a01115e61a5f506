//! The error type of every event source in this crate.

use std::path::PathBuf;

use qkd_formats::FormatError;

/// A source error: what failed, on which value or device, and what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A configuration value outside its valid range.
    #[error("invalid {name} = {value}: expected {expected}")]
    InvalidConfig {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    /// Content of a file, pipe or device stream that cannot be decoded.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// An I/O error on a file or pipe.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The serial device could not be opened, answered wrongly or went away.
    #[error("device {path}: {detail}")]
    Device { path: String, detail: String },
    /// The device did not answer or stream within the time limit.
    #[error("device {path}: timed out after {millis} ms waiting for {what}; check that the device is connected and powered, and that no other program uses it")]
    Timeout {
        path: String,
        what: &'static str,
        millis: u64,
    },
}

impl SourceError {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SourceError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn invalid(
        name: &'static str,
        value: impl ToString,
        expected: &'static str,
    ) -> Self {
        SourceError::InvalidConfig {
            name,
            value: value.to_string(),
            expected,
        }
    }
}
