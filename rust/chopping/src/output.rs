//! Destinations of the epoch files a chopper writes.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use qkd_formats::epoch::{file_path, write_replace};
use qkd_formats::FormatError;

/// Destination of one kind of epoch file.
pub enum Destination {
    /// One file per epoch in this folder, named by the epoch in 8 hex digits and written
    /// through a temporary file and a rename, so readers never see a partial file. The
    /// files are not fsynced (see [`qkd_formats::epoch::write_replace`]).
    Directory(PathBuf),
    /// Every packet appended to one stream (file or FIFO), as the reference's `-O`/`-o`.
    Stream(Box<dyn Write + Send>),
    /// Packets are built and counted but not stored (benchmarks, dry runs).
    Discard,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Directory(p) => write!(f, "Directory({})", p.display()),
            Destination::Stream(_) => f.write_str("Stream"),
            Destination::Discard => f.write_str("Discard"),
        }
    }
}

impl Destination {
    /// Checks that `dir` is an existing folder we can create files in.
    pub fn directory(dir: impl Into<PathBuf>) -> Result<Self, FormatError> {
        let dir = dir.into();
        if !dir.is_dir() {
            return Err(FormatError::Invalid {
                what: "output folder",
                detail: format!(
                    "{} is not an existing folder; create it first",
                    dir.display()
                ),
            });
        }
        let probe = dir.join(format!(".qkd-write-test.{}", std::process::id()));
        fs::write(&probe, b"").map_err(|e| FormatError::io(&dir, e))?;
        let _ = fs::remove_file(&probe);
        Ok(Destination::Directory(dir))
    }

    /// Opens (creating or truncating) one file that receives every packet.
    pub fn single_file(path: &Path) -> Result<Self, FormatError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| FormatError::io(path, e))?;
        Ok(Destination::Stream(Box::new(file)))
    }

    /// Writes one packet; returns the path written in folder mode.
    pub(crate) fn write(
        &mut self,
        epoch: u32,
        bytes: &[u8],
    ) -> Result<Option<PathBuf>, FormatError> {
        match self {
            Destination::Directory(dir) => {
                let path = file_path(dir, epoch);
                write_replace(&path, bytes, false)?;
                Ok(Some(path))
            }
            Destination::Stream(w) => {
                w.write_all(bytes).and_then(|_| w.flush()).map_err(|e| {
                    FormatError::io(format!("output stream (epoch {epoch:08x})"), e)
                })?;
                Ok(None)
            }
            Destination::Discard => Ok(None),
        }
    }
}
