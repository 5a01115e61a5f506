//! Directory mode of costream: epoch files named by 8 hex digits are read from the input
//! folders as they appear and the outputs are written atomically to the output folders.

use std::fs;
use std::io::ErrorKind;
use std::path::PathBuf;

use qkd_formats::epoch::{file_path, write_atomic};

use crate::costream::{ClosedEpoch, Costream, Need};
use crate::error::CoincidenceError;

/// Input and output folders of a costream run, and whether inputs are deleted once read.
#[derive(Debug, Clone)]
pub struct CostreamFolders {
    /// Type-1 input (`-D`).
    pub type1: PathBuf,
    /// Type-2 input (`-d`).
    pub type2: PathBuf,
    /// Raw-key (type-3) output (`-f`).
    pub type3: PathBuf,
    /// Type-4 output (`-F`).
    pub type4: PathBuf,
    /// Type-5 output (`-B`), required for protocols 3 and 4.
    pub type5: Option<PathBuf>,
    /// Delete each type-1 file after reading it (`-K`).
    pub delete_type1: bool,
    /// Delete each type-2 file after reading it (`-k`).
    pub delete_type2: bool,
}

impl CostreamFolders {
    /// Runs `costream` until an input file is missing or the run is done. Returns the
    /// closed epochs, whose files are already written, and what is missing.
    ///
    /// Never waits: the caller decides how long to wait for a missing file.
    pub fn step(
        &self,
        costream: &mut Costream,
    ) -> Result<(Vec<ClosedEpoch>, Need), CoincidenceError> {
        let mut closed = Vec::new();
        let mut written = 0;
        loop {
            let need = costream.advance(&mut closed)?;
            self.write_outputs(&closed[written..])?;
            written = closed.len();
            let (path, delete, is_type1) = match need {
                Need::Done => return Ok((closed, need)),
                Need::Type1(epoch) => (file_path(&self.type1, epoch), self.delete_type1, true),
                Need::Type2(epoch) => (file_path(&self.type2, epoch), self.delete_type2, false),
            };
            let bytes = match fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok((closed, need)),
                Err(e) => return Err(CoincidenceError::io(&path, e)),
            };
            if is_type1 {
                costream.push_type1(&bytes)?;
            } else {
                costream.push_type2(&bytes)?;
            }
            if delete {
                fs::remove_file(&path).map_err(|e| CoincidenceError::io(&path, e))?;
            }
        }
    }

    fn write_outputs(&self, closed: &[ClosedEpoch]) -> Result<(), CoincidenceError> {
        for epoch in closed {
            // Type-4 first, like the reference: the peer may already ask for it.
            let outputs = [
                (&epoch.type4, Some(&self.type4)),
                (&epoch.type3, Some(&self.type3)),
                (&epoch.type5, self.type5.as_ref()),
            ];
            for (bytes, folder) in outputs {
                if let (Some(bytes), Some(folder)) = (bytes, folder) {
                    let path = file_path(folder, epoch.epoch);
                    write_atomic(&path, bytes).map_err(|e| match e {
                        qkd_formats::FormatError::Io { path, source } => {
                            CoincidenceError::Io { path, source }
                        }
                        other => CoincidenceError::Io {
                            path,
                            source: std::io::Error::other(other.to_string()),
                        },
                    })?;
                }
            }
        }
        Ok(())
    }
}
