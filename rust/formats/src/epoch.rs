//! Epoch numbers, epoch file names and the atomic file write every writer uses.
//!
//! An event belongs to epoch `e` when the upper 17 bits of its 49-bit tick time equal the
//! low 17 bits of `e`; an epoch lasts 2^32 ticks = 2^29 ns. Files are named by the epoch as
//! exactly 8 lowercase hex digits.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::FormatError;

/// Number of ticks (1/8 ns) in one epoch.
pub const EPOCH_TICKS: u64 = 1 << 32;

/// Returns the file name of an epoch: 8 lowercase hex digits.
pub fn file_name(epoch: u32) -> String {
    format!("{epoch:08x}")
}

/// Parses an epoch file name (8 hex digits, either case).
pub fn parse_file_name(name: &str) -> Result<u32, FormatError> {
    if name.len() != 8 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FormatError::Invalid {
            what: "epoch file name",
            detail: format!("{name:?} is not 8 hex digits such as 00004f87"),
        });
    }
    u32::from_str_radix(name, 16).map_err(|e| FormatError::Invalid {
        what: "epoch file name",
        detail: format!("{name:?}: {e}"),
    })
}

/// Returns the path of an epoch's file inside `dir`.
pub fn file_path(dir: &Path, epoch: u32) -> PathBuf {
    dir.join(file_name(epoch))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
///
/// A reader of `path` sees either the old file or the whole new one, never a part. On error
/// the temporary file is removed, so nothing partial is left behind.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FormatError> {
    write_replace(path, bytes, true)
}

/// Writes `bytes` to `path` through a temporary file and a rename, with an fsync of the
/// temporary file only when `durable` is set.
///
/// Without the fsync a reader still never sees a partial file while the system runs, but
/// after a power loss the newest files may be empty. The choppers write epoch files this
/// way, because an fsync per file costs more than chopping the epoch and the reference
/// programs never synced them either.
pub fn write_replace(path: &Path, bytes: &[u8], durable: bool) -> Result<(), FormatError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| FormatError::Invalid {
            what: "output path",
            detail: format!("{} has no file name", path.display()),
        })?
        .to_string_lossy();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        if durable {
            f.sync_all()?;
        }
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(FormatError::io(path, e));
    }
    Ok(())
}

/// Bit of the header tag that marks an extended (Unix-based, 32-bit) epoch; tags without
/// it carry a local 17-bit epoch.
pub const EXTENDED_TAG: i32 = 0x100;

/// Returns the header tag of an epoch file of `file_type` (1, 2, 3, ...).
pub fn make_tag(file_type: i32, extended: bool) -> i32 {
    if extended {
        file_type | EXTENDED_TAG
    } else {
        file_type
    }
}

/// Checks a header tag against the expected file type and returns whether it marks an
/// extended epoch.
pub fn check_tag(tag: i32, file_type: i32, what: &'static str) -> Result<bool, FormatError> {
    if tag == file_type {
        Ok(false)
    } else if tag == file_type | EXTENDED_TAG {
        Ok(true)
    } else {
        Err(FormatError::Invalid {
            what,
            detail: format!(
                "header tag is {tag:#x}, expected {file_type} or {:#x}; this is not a type-{file_type} epoch file",
                file_type | EXTENDED_TAG
            ),
        })
    }
}

/// Splits the first `N` little-endian 32-bit header fields off `bytes`.
pub(crate) fn header_fields<'a, const N: usize>(
    bytes: &'a [u8],
    what: &'static str,
) -> Result<([u32; N], &'a [u8]), FormatError> {
    if bytes.len() < 4 * N {
        return Err(FormatError::Invalid {
            what,
            detail: format!(
                "file has {} bytes, shorter than the {}-byte header",
                bytes.len(),
                4 * N
            ),
        });
    }
    let mut fields = [0u32; N];
    for (i, field) in fields.iter_mut().enumerate() {
        *field = u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes"));
    }
    Ok((fields, &bytes[4 * N..]))
}

/// Reads a whole file, naming the path in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>, FormatError> {
    fs::read(path).map_err(|e| FormatError::io(path, e))
}

/// Adds the file path to an error about file content.
pub(crate) fn with_path(err: FormatError, path: &Path) -> FormatError {
    match err {
        FormatError::Invalid { what, detail } => FormatError::Invalid {
            what,
            detail: format!("{}: {detail}", path.display()),
        },
        FormatError::Truncated {
            what,
            record_bytes,
            len,
        } => FormatError::Invalid {
            what,
            detail: format!(
                "{}: truncated, {len} bytes of data is not a multiple of {record_bytes}",
                path.display()
            ),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_name_is_eight_hex_digits() {
        assert_eq!(file_name(0x4f87), "00004f87");
        assert_eq!(parse_file_name("bc3a19f2").unwrap(), 0xbc3a_19f2);
        assert!(parse_file_name("4f87").is_err());
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_path(dir.path(), 7);
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn atomic_write_into_missing_folder_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("00000001");
        let err = write_atomic(&path, b"x").unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
