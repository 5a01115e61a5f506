//! Type-1 epoch files: the raw events of one epoch, as chopper2 writes them on the
//! high-count side.
//!
//! Layout (all fields little-endian):
//!
//! | offset | field | value |
//! |---|---|---|
//! | 0 | tag (i32) | 1, or 0x101 for an extended epoch |
//! | 4 | epoch (u32) | local 17-bit or extended 32-bit epoch |
//! | 8 | length (u32) | number of events, without the terminator |
//! | 12 | bits per entry (i32) | 49 |
//! | 16 | base bits (i32) | 4 |
//!
//! Then `length` events of 8 bytes each in the legacy serialisation (high word first, see
//! [`crate::raw`]), copied verbatim with flags and sub-tick bits, then one terminator of 8
//! zero bytes. A file with `length` 0 ends at its first zero record instead.
//!
//! Example:
//!
//! ```
//! use qkd_formats::type1::{self, Type1File};
//! let events = [(0x0021_0000_u64 << 32) | 0x0800_0301];
//! let bytes = type1::encode(0x42, false, &events);
//! let file = Type1File::parse(&bytes).unwrap();
//! assert_eq!(file.header.epoch, 0x42);
//! assert_eq!(file.times(), vec![(0x42 << 32) | 0x1000]);
//! assert_eq!(file.patterns(), vec![1]);
//! ```

use std::path::Path;

use crate::epoch::{check_tag, header_fields, make_tag, read_file, with_path, write_atomic};
use crate::raw::{self, Serialisation, EVENT_BYTES};
use crate::FormatError;

/// Type number in the header tag.
pub const FILE_TYPE: i32 = 1;
/// Size of the header in bytes.
pub const HEADER_BYTES: usize = 20;
/// The bits-per-entry field: every event carries a 49-bit tick time.
pub const BITS_PER_ENTRY: i32 = 49;
/// The base-bits field: 4 detector pattern bits per event.
pub const BASE_BITS: i32 = 4;

/// Header of a type-1 file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Type1Header {
    /// Whether the epoch is extended (tag 0x101) rather than local (tag 1).
    pub extended: bool,
    /// Epoch number; the low 17 bits equal the upper 17 bits of every event's tick time.
    pub epoch: u32,
    /// Number of events (0 means "until the zero terminator").
    pub length: u32,
}

impl Type1Header {
    /// Returns the header tag, 1 or 0x101.
    pub fn tag(&self) -> i32 {
        make_tag(FILE_TYPE, self.extended)
    }

    /// Serialises the 20-byte header.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        out[0..4].copy_from_slice(&self.tag().to_le_bytes());
        out[4..8].copy_from_slice(&self.epoch.to_le_bytes());
        out[8..12].copy_from_slice(&self.length.to_le_bytes());
        out[12..16].copy_from_slice(&BITS_PER_ENTRY.to_le_bytes());
        out[16..20].copy_from_slice(&BASE_BITS.to_le_bytes());
        out
    }
}

/// A type-1 file in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type1File {
    pub header: Type1Header,
    /// Event words as in the raw stream: 49-bit tick time in bits 63..15, flags in bits
    /// 14..4, detector pattern in bits 3..0.
    pub events: Vec<u64>,
}

impl Type1File {
    /// Parses a whole file, checking the tag, the constant fields, the length against the
    /// file size and the zero terminator.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        Self::parse_reusing(bytes, Vec::new())
    }

    /// Parses like [`Type1File::parse`], but decodes into `events`, whose contents are
    /// dropped and whose allocation is kept. A reader that hands back the vector of the
    /// epoch it finished does not map fresh pages for every file.
    pub fn parse_reusing(bytes: &[u8], mut events: Vec<u64>) -> Result<Self, FormatError> {
        const WHAT: &str = "type-1 file";
        let (fields, data) = header_fields::<5>(bytes, WHAT)?;
        let extended = check_tag(fields[0] as i32, FILE_TYPE, WHAT)?;
        let header = Type1Header {
            extended,
            epoch: fields[1],
            length: fields[2],
        };
        let (bits, base) = (fields[3] as i32, fields[4] as i32);
        if bits != BITS_PER_ENTRY || base != BASE_BITS {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: format!(
                    "header of epoch {:08x} has {bits} bits per entry and {base} base bits, expected {BITS_PER_ENTRY} and {BASE_BITS}",
                    header.epoch
                ),
            });
        }
        if data.len() % EVENT_BYTES != 0 {
            return Err(FormatError::Truncated {
                what: "type-1 event data",
                record_bytes: EVENT_BYTES,
                len: data.len(),
            });
        }
        events.clear();
        let mut words = events;
        raw::decode_into(data, Serialisation::Legacy, &mut words)?;
        let records = words.len();
        let count = if header.length > 0 {
            let expected = header.length as usize + 1;
            if records != expected {
                return Err(FormatError::Invalid {
                    what: WHAT,
                    detail: format!(
                        "epoch {:08x}: header length {} needs {} bytes, file has {}; the file is truncated or has trailing data",
                        header.epoch,
                        header.length,
                        HEADER_BYTES + EVENT_BYTES * expected,
                        bytes.len()
                    ),
                });
            }
            header.length as usize
        } else {
            words
                .iter()
                .position(|&w| w == 0)
                .ok_or_else(|| FormatError::Invalid {
                    what: WHAT,
                    detail: format!(
                        "epoch {:08x}: header length 0 and no zero terminator record; the file is truncated",
                        header.epoch
                    ),
                })?
        };
        if words[count] != 0 || count + 1 != records {
            return Err(FormatError::Invalid {
                what: WHAT,
                detail: format!(
                    "epoch {:08x}: record {count} should be the zero terminator and the last record, got {:#018x} with {} records after it",
                    header.epoch,
                    words[count],
                    records - count - 1
                ),
            });
        }
        words.truncate(count);
        Ok(Type1File {
            header,
            events: words,
        })
    }

    /// Returns the full event times in ticks of 1/8 ns: the event's 49-bit time plus the
    /// header epoch's bits above the low 17, i.e. `(epoch << 32) + offset` when the two
    /// agree in their low 17 bits (as chopper2 always writes them).
    pub fn times(&self) -> Vec<u64> {
        let high = (u64::from(self.header.epoch) >> 17) << 49;
        self.events
            .iter()
            .map(|&w| high | raw::time_ticks(w))
            .collect()
    }

    /// Returns the detector patterns (bits 3..0 of each event).
    pub fn patterns(&self) -> Vec<u8> {
        self.events.iter().map(|&w| raw::pattern(w)).collect()
    }
}

/// Reads and parses a type-1 file.
pub fn read(path: &Path) -> Result<Type1File, FormatError> {
    let bytes = read_file(path)?;
    Type1File::parse(&bytes).map_err(|e| with_path(e, path))
}

/// Serialises a type-1 file whose header length is the number of events.
pub fn encode(epoch: u32, extended: bool, events: &[u64]) -> Vec<u8> {
    let header = Type1Header {
        extended,
        epoch,
        length: events.len() as u32,
    };
    let mut out = Vec::with_capacity(HEADER_BYTES + EVENT_BYTES * (events.len() + 1));
    out.extend_from_slice(&header.to_bytes());
    raw::encode_into(events, Serialisation::Legacy, &mut out);
    out.extend_from_slice(&[0u8; EVENT_BYTES]);
    out
}

/// Writes a type-1 file atomically (temporary file, then rename).
pub fn write(path: &Path, epoch: u32, extended: bool, events: &[u64]) -> Result<(), FormatError> {
    write_atomic(path, &encode(epoch, extended, events))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u64> {
        vec![
            0x0021_0000_0800_0301,
            0x0021_0000_0800_8304,
            0x0021_0001_8008_0322,
        ]
    }

    #[test]
    fn round_trip_keeps_every_bit() {
        let bytes = encode(0x1_0042, true, &sample());
        assert_eq!(bytes.len(), HEADER_BYTES + 8 * 4);
        let file = Type1File::parse(&bytes).unwrap();
        assert!(file.header.extended);
        assert_eq!(file.header.length, 3);
        assert_eq!(file.events, sample());
    }

    #[test]
    fn extended_epoch_sets_high_time_bits() {
        let file = Type1File::parse(&encode(0xbc3a_0042, true, &sample())).unwrap();
        let times = file.times();
        assert_eq!(times[0], (0xbc3a_0042_u64 << 32) | 0x1000);
        assert_eq!(times[2] >> 32, 0xbc3a_0042);
    }

    #[test]
    fn header_matches_reference_layout() {
        let bytes = encode(0x42, false, &sample());
        let words: Vec<u32> = bytes[..20]
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(words, vec![1, 0x42, 3, 49, 4]);
        assert_eq!(&bytes[20..24], &0x0021_0000_u32.to_le_bytes());
    }

    #[test]
    fn zero_length_reads_to_terminator() {
        let mut bytes = encode(0x42, false, &sample());
        bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(Type1File::parse(&bytes).unwrap().events, sample());
    }

    #[test]
    fn truncated_file_is_rejected() {
        let bytes = encode(0x42, false, &sample());
        let err = Type1File::parse(&bytes[..bytes.len() - 8]).unwrap_err();
        assert!(err.to_string().contains("header length 3"), "{err}");
        let err = Type1File::parse(&bytes[..bytes.len() - 3]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let err = Type1File::parse(&bytes[..10]).unwrap_err();
        assert!(err.to_string().contains("20-byte header"), "{err}");
    }

    #[test]
    fn wrong_tag_is_rejected() {
        let mut bytes = encode(0x42, false, &sample());
        bytes[0] = 2;
        let err = Type1File::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("not a type-1"), "{err}");
    }

    #[test]
    fn impossible_constant_fields_are_rejected() {
        let mut bytes = encode(0x42, false, &sample());
        bytes[12] = 48;
        let err = Type1File::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("48 bits per entry"), "{err}");
    }

    #[test]
    fn nonzero_terminator_is_rejected() {
        let mut bytes = encode(0x42, false, &sample());
        let n = bytes.len();
        bytes[n - 1] = 1;
        let err = Type1File::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("zero terminator"), "{err}");
    }
}
