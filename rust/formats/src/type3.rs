//! Type-3 epoch files: one small value per event, kept locally by chopper (measurement
//! results matching the events of the type-2 file of the same epoch) and also the format
//! of raw-key files.
//!
//! Layout (all fields little-endian):
//!
//! | offset | field | meaning |
//! |---|---|---|
//! | 0 | tag (i32) | 3, or 0x103 for an extended epoch |
//! | 4 | epoch (u32) | same epoch as the matching type-2 file |
//! | 8 | length (u32) | number of entries |
//! | 12 | bits per entry (i32) | value width, e.g. 1 for BBM92 results |
//!
//! The data are `ceil(length * bits / 32)` words, entries packed MSB first
//! ([`crate::bits`]), the last word zero-padded. There is no terminator, so the length is
//! authoritative and a file with more or fewer words is rejected.
//!
//! ```
//! use qkd_formats::type3::{self, Type3File};
//! let bytes = type3::encode(0x42, false, 1, &[0, 1, 1, 0]).unwrap();
//! assert_eq!(&bytes[16..], &0x6000_0000_u32.to_le_bytes());
//! assert_eq!(Type3File::parse(&bytes).unwrap().values, vec![0, 1, 1, 0]);
//! ```

use std::path::Path;

use crate::bits::{extend_le_bytes, words_from_le_bytes, BitReader, BitWriter};
use crate::epoch::{check_tag, header_fields, make_tag, read_file, with_path, write_atomic};
use crate::FormatError;

/// Type number in the header tag.
pub const FILE_TYPE: i32 = 3;
/// Size of the header in bytes.
pub const HEADER_BYTES: usize = 16;
/// Widest entry this reader returns as `u8` values.
pub const MAX_BITS_PER_ENTRY: u32 = 8;

/// Header of a type-3 file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Type3Header {
    /// Whether the epoch is extended (tag 0x103) rather than local (tag 3).
    pub extended: bool,
    /// Epoch number.
    pub epoch: u32,
    /// Number of entries.
    pub length: u32,
    /// Bits per entry.
    pub bits_per_entry: u32,
}

impl Type3Header {
    /// Returns the header tag, 3 or 0x103.
    pub fn tag(&self) -> i32 {
        make_tag(FILE_TYPE, self.extended)
    }

    /// Number of data words the header's length and width call for.
    pub fn data_words(&self) -> usize {
        (u64::from(self.length) * u64::from(self.bits_per_entry)).div_ceil(32) as usize
    }

    /// Serialises the 16-byte header.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let fields = [
            self.tag() as u32,
            self.epoch,
            self.length,
            self.bits_per_entry,
        ];
        let mut out = [0u8; HEADER_BYTES];
        for (i, f) in fields.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&f.to_le_bytes());
        }
        out
    }
}

/// A type-3 file in memory with its entries unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type3File {
    pub header: Type3Header,
    /// One value per entry, `bits_per_entry` wide.
    pub values: Vec<u8>,
}

impl Type3File {
    /// Parses a whole file, checking the tag, the entry width and the data size.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "type-3 file";
        let (fields, data) = header_fields::<4>(bytes, WHAT)?;
        let extended = check_tag(fields[0] as i32, FILE_TYPE, WHAT)?;
        let header = Type3Header {
            extended,
            epoch: fields[1],
            length: fields[2],
            bits_per_entry: fields[3],
        };
        if !(1..=MAX_BITS_PER_ENTRY).contains(&header.bits_per_entry) {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: format!(
                    "epoch {:08x}: {} bits per entry, expected 1 to {MAX_BITS_PER_ENTRY}",
                    header.epoch, header.bits_per_entry as i32
                ),
            });
        }
        let words = words_from_le_bytes(data, "type-3 data")?;
        if words.len() != header.data_words() {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: format!(
                    "epoch {:08x}: header length {} with {} bits per entry needs {} data bytes, file has {}",
                    header.epoch,
                    header.length,
                    header.bits_per_entry,
                    4 * header.data_words(),
                    data.len()
                ),
            });
        }
        let mut reader = BitReader::new(&words);
        let values = (0..header.length)
            .map(|_| reader.get(header.bits_per_entry).expect("size checked") as u8)
            .collect();
        Ok(Type3File { header, values })
    }

    /// Serialises header and packed data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut writer = BitWriter::new();
        for &v in &self.values {
            writer.put(u32::from(v), self.header.bits_per_entry);
        }
        let words = writer.finish();
        let mut out = Vec::with_capacity(HEADER_BYTES + 4 * words.len());
        out.extend_from_slice(&self.header.to_bytes());
        extend_le_bytes(&mut out, &words);
        out
    }
}

/// Encodes values into a type-3 file; each value must fit in `bits_per_entry` bits.
pub fn encode(
    epoch: u32,
    extended: bool,
    bits_per_entry: u32,
    values: &[u8],
) -> Result<Vec<u8>, FormatError> {
    if !(1..=MAX_BITS_PER_ENTRY).contains(&bits_per_entry) {
        return Err(FormatError::Invalid {
            what: "type-3 input",
            detail: format!("{bits_per_entry} bits per entry, expected 1 to {MAX_BITS_PER_ENTRY}"),
        });
    }
    if let Some(i) = values
        .iter()
        .position(|&v| u32::from(v) >> bits_per_entry != 0)
    {
        return Err(FormatError::Invalid {
            what: "type-3 input",
            detail: format!(
                "value {} of entry {i} does not fit in {bits_per_entry} bits",
                values[i]
            ),
        });
    }
    let file = Type3File {
        header: Type3Header {
            extended,
            epoch,
            length: values.len() as u32,
            bits_per_entry,
        },
        values: values.to_vec(),
    };
    Ok(file.to_bytes())
}

/// Reads and parses a type-3 file.
pub fn read(path: &Path) -> Result<Type3File, FormatError> {
    let bytes = read_file(path)?;
    Type3File::parse(&bytes).map_err(|e| with_path(e, path))
}

/// Writes a type-3 file atomically (temporary file, then rename).
pub fn write(path: &Path, file: &Type3File) -> Result<(), FormatError> {
    write_atomic(path, &file.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn worked_example_protocol_0() {
        let bytes = encode(0x42, false, 4, &[1, 4, 8, 2]).unwrap();
        let words: Vec<u32> = bytes
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(words, vec![3, 0x42, 4, 4, 0x1482_0000]);
    }

    #[test]
    fn extra_or_missing_words_are_rejected() {
        let mut bytes = encode(0x42, true, 1, &[1; 40]).unwrap();
        bytes.extend_from_slice(&[0; 4]);
        let err = Type3File::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("needs 8 data bytes"), "{err}");
        let err = Type3File::parse(&bytes[..bytes.len() - 8]).unwrap_err();
        assert!(err.to_string().contains("file has 4"), "{err}");
    }

    #[test]
    fn impossible_width_is_rejected() {
        let mut bytes = encode(0x42, false, 1, &[1]).unwrap();
        bytes[12] = 0;
        let err = Type3File::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("0 bits per entry"), "{err}");
    }

    proptest! {
        #[test]
        fn parse_inverts_encode(bits in 1u32..=8, raw in prop::collection::vec(any::<u8>(), 0..500)) {
            let values: Vec<u8> = raw.iter().map(|v| ((u32::from(*v)) & ((1 << bits) - 1)) as u8).collect();
            let bytes = encode(7, false, bits, &values).unwrap();
            let file = Type3File::parse(&bytes).unwrap();
            prop_assert_eq!(file.values, values);
            prop_assert_eq!(file.header.bits_per_entry, bits);
        }
    }
}
