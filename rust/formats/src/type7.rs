//! Type-7 files: the final key of one reconciled block, named by its start epoch.
//!
//! Layout (all fields little-endian):
//!
//! | offset | field | meaning |
//! |---|---|---|
//! | 0 | tag (i32) | 7 |
//! | 4 | start epoch (u32) | first epoch of the block; also the file name |
//! | 8 | number of epochs (u32) | epochs the block was assembled from |
//! | 12 | key bits (i32) | number of final key bits `m`, may be 0 |
//!
//! The data are `ceil(m / 32)` words, key bits packed MSB first ([`crate::bits`]), the last
//! word zero-padded. Keys are secret: files are written with mode 0600, atomically.
//!
//! ```
//! use qkd_formats::type7::Type7File;
//! let file = Type7File::new(0x4f87, 2, vec![0b1010_0000], 3).unwrap();
//! let bytes = file.to_bytes();
//! assert_eq!(&bytes[16..], &0xa000_0000_u32.to_le_bytes());
//! assert_eq!(Type7File::parse(&bytes).unwrap(), file);
//! ```

use std::io::Write;
use std::path::Path;

use crate::epoch::{check_tag, header_fields, read_file, with_path};
use crate::FormatError;

/// Type number in the header tag.
pub const FILE_TYPE: i32 = 7;
/// Size of the header in bytes.
pub const HEADER_BYTES: usize = 16;

/// A final-key file in memory.
#[derive(Clone, PartialEq, Eq)]
pub struct Type7File {
    pub start_epoch: u32,
    pub epochs: u32,
    /// Number of key bits.
    pub bits: u32,
    /// Key bits packed MSB first into `ceil(bits / 8)` bytes, trailing bits zero.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for Type7File {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Type7File {{ start_epoch: {:08x}, epochs: {}, bits: {} }}",
            self.start_epoch, self.epochs, self.bits
        )
    }
}

impl Type7File {
    /// Builds a file from a key packed MSB first; checks the byte count and clears nothing:
    /// bits beyond `bits` in the last byte must already be zero.
    pub fn new(
        start_epoch: u32,
        epochs: u32,
        key: Vec<u8>,
        bits: u32,
    ) -> Result<Self, FormatError> {
        const WHAT: &str = "final key";
        if bits > i32::MAX as u32 {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: format!("{bits} key bits do not fit the signed 32-bit length field"),
            });
        }
        let need = (bits as usize).div_ceil(8);
        if key.len() != need {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: format!("{bits} key bits need {need} bytes, got {}", key.len()),
            });
        }
        if bits % 8 != 0 && key[need - 1] & (0xff >> (bits % 8)) != 0 {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: format!("bits after the last of {bits} key bits are not zero"),
            });
        }
        Ok(Type7File {
            start_epoch,
            epochs,
            bits,
            key,
        })
    }

    /// Parses a whole file, checking the tag and the data size.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "type-7 file";
        let (fields, data) = header_fields::<4>(bytes, WHAT)?;
        let extended = check_tag(fields[0] as i32, FILE_TYPE, WHAT)?;
        if extended {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: format!("tag {:#x}: final-key files only use tag 7", fields[0]),
            });
        }
        let bits = fields[3];
        if bits > i32::MAX as u32 {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: format!("negative key length {}", bits as i32),
            });
        }
        let words = (bits as usize).div_ceil(32);
        if data.len() != 4 * words {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: format!(
                    "epoch {:08x}: {bits} key bits need {} data bytes, file has {}",
                    fields[1],
                    4 * words,
                    data.len()
                ),
            });
        }
        let mut key = Vec::with_capacity(4 * words);
        for chunk in data.chunks_exact(4) {
            let w = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
            key.extend_from_slice(&w.to_be_bytes());
        }
        key.truncate((bits as usize).div_ceil(8));
        if bits % 8 != 0 {
            let last = key.len() - 1;
            key[last] &= !(0xffu8 >> (bits % 8));
        }
        Ok(Type7File {
            start_epoch: fields[1],
            epochs: fields[2],
            bits,
            key,
        })
    }

    /// Serialises header and packed data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let words = (self.bits as usize).div_ceil(32);
        let mut out = Vec::with_capacity(HEADER_BYTES + 4 * words);
        for f in [FILE_TYPE as u32, self.start_epoch, self.epochs, self.bits] {
            out.extend_from_slice(&f.to_le_bytes());
        }
        let mut padded = self.key.clone();
        padded.resize(4 * words, 0);
        for chunk in padded.chunks_exact(4) {
            let w = u32::from_be_bytes(chunk.try_into().expect("4 bytes"));
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// Reads a type-7 file.
pub fn read(path: &Path) -> Result<Type7File, FormatError> {
    Type7File::parse(&read_file(path)?).map_err(|e| with_path(e, path))
}

/// Writes `file` into `dir` under its start epoch's name, atomically and with mode 0600,
/// and returns the path.
pub fn write(dir: &Path, file: &Type7File) -> Result<std::path::PathBuf, FormatError> {
    let path = crate::epoch::file_path(dir, file.start_epoch);
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        crate::epoch::file_name(file.start_epoch),
        std::process::id()
    ));
    let bytes = file.to_bytes();
    let result = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // The key must never be readable by others, not even for a moment.
            options.mode(0o600);
        }
        let mut f = options.open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(FormatError::io(&path, e));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_key_bit_is_top_bit_of_byte_3() {
        let file = Type7File::new(1, 1, vec![0x80], 1).unwrap();
        let bytes = file.to_bytes();
        assert_eq!(bytes.len(), 20);
        assert_eq!(
            &bytes[..16],
            &[7, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0]
        );
        assert_eq!(&bytes[16..], &[0, 0, 0, 0x80]);
    }

    #[test]
    fn empty_key_is_a_16_byte_file() {
        let file = Type7File::new(0x4f87, 3, vec![], 0).unwrap();
        assert_eq!(file.to_bytes().len(), 16);
        assert_eq!(Type7File::parse(&file.to_bytes()).unwrap(), file);
    }

    #[test]
    fn round_trip_of_odd_lengths() {
        for bits in [1u32, 7, 8, 31, 32, 33, 100] {
            let mut key: Vec<u8> = (0..bits.div_ceil(8)).map(|i| (i * 37 + 11) as u8).collect();
            if bits % 8 != 0 {
                let last = key.len() - 1;
                key[last] &= !(0xff >> (bits % 8));
            }
            let file = Type7File::new(9, 2, key, bits).unwrap();
            assert_eq!(Type7File::parse(&file.to_bytes()).unwrap(), file, "{bits}");
        }
    }

    #[test]
    fn invalid_files_are_rejected() {
        let good = Type7File::new(9, 2, vec![0xff, 0xf0], 12)
            .unwrap()
            .to_bytes();
        let mut bad_tag = good.clone();
        bad_tag[0] = 3;
        assert!(Type7File::parse(&bad_tag)
            .unwrap_err()
            .to_string()
            .contains("tag"));
        assert!(Type7File::parse(&good[..18])
            .unwrap_err()
            .to_string()
            .contains("need 4 data bytes"));
        assert!(Type7File::parse(&good[..10]).is_err());
        assert!(Type7File::new(9, 2, vec![0xff], 12).is_err());
        assert!(Type7File::new(9, 2, vec![0xff, 0xff], 12).is_err());
    }

    #[test]
    fn written_file_is_private_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let file = Type7File::new(0x4f87, 2, vec![0xde, 0xad, 0xbe, 0xef, 0x80], 33).unwrap();
        let path = write(dir.path(), &file).unwrap();
        assert_eq!(path.file_name().unwrap(), "00004f87");
        assert_eq!(read(&path).unwrap(), file);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let missing = dir.path().join("missing");
        assert!(write(&missing, &file).is_err());
    }
}
