//! The error type of costream and splicer, with the exit status of the reference program
//! for the same failure.

use std::path::PathBuf;

/// Which input stream an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Type-1 files: the high-count side's own events.
    Type1,
    /// Type-2 files: the low-count side's events received over the channel.
    Type2,
    /// Type-3 files: chopper's local measurement results on the low-count side.
    Type3,
    /// Type-4 files: the kept-event lists received from the high-count side.
    Type4,
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Stream::Type1 => "type-1",
            Stream::Type2 => "type-2",
            Stream::Type3 => "type-3",
            Stream::Type4 => "type-4",
        };
        f.write_str(name)
    }
}

/// A costream or splicer failure, carrying the offending values.
#[derive(Debug, thiserror::Error)]
pub enum CoincidenceError {
    #[error("invalid {option}: {detail}")]
    InvalidOption {
        option: &'static str,
        detail: String,
    },
    #[error("{stream} file of epoch {epoch:08x} not found at {}; is the peer or the chopper running?", path.display())]
    MissingInput {
        stream: Stream,
        epoch: u32,
        path: PathBuf,
    },
    #[error("invalid {stream} file of epoch {epoch:08x}: {source}")]
    Format {
        stream: Stream,
        epoch: u32,
        #[source]
        source: qkd_formats::FormatError,
    },
    #[error("{stream} file labelled epoch {found:08x} where epoch {expected:08x} was expected")]
    WrongEpoch {
        stream: Stream,
        expected: u32,
        found: u32,
    },
    #[error("{stream} file of epoch {epoch:08x} has {found} base bits, protocol {protocol} needs {expected}; do both sides run the same protocol?")]
    BaseBits {
        stream: Stream,
        epoch: u32,
        protocol: u8,
        expected: u32,
        found: u32,
    },
    #[error("type-4 file of epoch {epoch:08x} points at type-3 entry {index}, but the type-3 file has only {length} entries")]
    IndexOutOfRange { epoch: u32, index: u32, length: u32 },
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CoincidenceError {
    /// Returns the exit status the reference costream or splicer uses for this failure
    /// (256 minus its error code), so supervising scripts keep working.
    pub fn exit_status(&self) -> i32 {
        let code = match self {
            CoincidenceError::InvalidOption { .. } => 1,
            CoincidenceError::MissingInput { stream, .. } => match stream {
                Stream::Type1 => 31,
                Stream::Type2 => 32,
                Stream::Type3 => 17,
                Stream::Type4 => 18,
            },
            CoincidenceError::Format { stream, .. }
            | CoincidenceError::WrongEpoch { stream, .. } => match stream {
                Stream::Type1 => 43,
                Stream::Type2 => 48,
                Stream::Type3 => 24,
                Stream::Type4 => 30,
            },
            CoincidenceError::BaseBits { stream, .. } => match stream {
                Stream::Type3 => 25,
                Stream::Type4 => 31,
                _ => 63,
            },
            CoincidenceError::IndexOutOfRange { .. } => 37,
            CoincidenceError::Io { .. } => 34,
        };
        256 - code
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoincidenceError::Io {
            path: path.into(),
            source,
        }
    }
}
