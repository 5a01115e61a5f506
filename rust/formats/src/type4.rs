//! Type-4 epoch files: the list of type-2 events that the high-count side kept after
//! coincidence matching and sifting, sent back to the low-count side.
//!
//! Layout (all fields little-endian):
//!
//! | offset | field | meaning |
//! |---|---|---|
//! | 0 | tag (i32) | 4, or 0x104 for an extended epoch |
//! | 4 | epoch (u32) | epoch of the type-2 file the indices refer to |
//! | 8 | length (u32) | number of entries (the end entry is not counted) |
//! | 12 | time order `T` (i32) | width of the index-difference field |
//! | 16 | base bits `D` (i32) | width of the per-entry data: 0, 3 or 4 by protocol |
//!
//! The data are 32-bit words filled MSB first ([`crate::bits`]) and coded like a type-2
//! body, with index differences in place of time differences. With kept zero-based
//! indices `i_1 < i_2 < ...` the coded values are `i_1 + 2`, then `i_k - i_(k-1) + 2`. A
//! value below `2^T` takes `T` bits; a larger one is an escape: `T` zero bits, the value
//! in 32 bits. The `D`-bit data follow either form. The end entry (the value 1 in `T` bits,
//! `D` zero bits) is present even in a file with no entries.
//!
//! ```
//! use qkd_formats::type4::{self, Entry};
//! let bytes = type4::encode(0x42, false, 8, 0, &[Entry { index: 0, data: 0 }]).unwrap();
//! assert_eq!(&bytes[20..], &0x0201_0000_u32.to_le_bytes());
//! assert_eq!(type4::Type4File::parse(&bytes).unwrap().entries[0].index, 0);
//! ```
//!
//! Limits: `T` is 2..=31, `D` at most 8 and `T + D` at most 32; a coded value must be
//! below 2^32.

use std::path::Path;

use crate::bits::{extend_le_bytes, words_from_le_bytes, BitReader, BitWriter};
use crate::epoch::{check_tag, header_fields, make_tag, read_file, with_path, write_atomic};
use crate::FormatError;

/// Type number in the header tag.
pub const FILE_TYPE: i32 = 4;
/// Size of the header in bytes.
pub const HEADER_BYTES: usize = 20;
/// Coded value of index 0: values 0 and 1 are the escape and the end entry.
const INDEX_OFFSET: u64 = 2;

/// Header of a type-4 file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Type4Header {
    /// Whether the epoch is extended (tag 0x104) rather than local (tag 4).
    pub extended: bool,
    /// Epoch of the type-2 file the indices refer to.
    pub epoch: u32,
    /// Number of entries.
    pub length: u32,
    /// Width `T` of the index-difference field in bits.
    pub time_order: u32,
    /// Width `D` of the per-entry data in bits.
    pub base_bits: u32,
}

impl Type4Header {
    /// Returns the header tag, 4 or 0x104.
    pub fn tag(&self) -> i32 {
        make_tag(FILE_TYPE, self.extended)
    }

    /// Serialises the 20-byte header.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let fields = [
            self.tag() as u32,
            self.epoch,
            self.length,
            self.time_order,
            self.base_bits,
        ];
        let mut out = [0u8; HEADER_BYTES];
        for (i, f) in fields.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&f.to_le_bytes());
        }
        out
    }
}

/// Checks that an entry code with these widths can be written and read back.
pub fn check_widths(time_order: u32, base_bits: u32) -> Result<(), FormatError> {
    if !(2..=31).contains(&time_order) || base_bits > 8 || time_order + base_bits > 32 {
        return Err(FormatError::Invalid {
            what: "type-4 widths",
            detail: format!(
                "time order {time_order} and base bits {base_bits}; need 2 <= T <= 31, D <= 8 and T + D <= 32"
            ),
        });
    }
    Ok(())
}

/// One entry of a type-4 file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Zero-based index of the kept event in the type-2 event list of the epoch.
    pub index: u32,
    /// The `D`-bit data of the entry (the high-count side's detector data by protocol).
    pub data: u8,
}

/// A type-4 file with its entries decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type4File {
    pub header: Type4Header,
    pub entries: Vec<Entry>,
}

impl Type4File {
    /// Parses a whole file.
    ///
    /// Rejects widths outside the limits, data that are not whole words, a missing end
    /// entry, non-zero bits after it, an entry count different from the header length,
    /// and indices beyond u32.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "type-4 file";
        let (fields, data) = header_fields::<5>(bytes, WHAT)?;
        let extended = check_tag(fields[0] as i32, FILE_TYPE, WHAT)?;
        let header = Type4Header {
            extended,
            epoch: fields[1],
            length: fields[2],
            time_order: fields[3],
            base_bits: fields[4],
        };
        let invalid = |detail: String| FormatError::Invalid {
            what: WHAT,
            detail: format!("epoch {:08x}: {detail}", header.epoch),
        };
        check_widths(header.time_order, header.base_bits).map_err(|e| invalid(e.to_string()))?;
        let words = words_from_le_bytes(data, "type-4 data")?;
        let (t, d) = (header.time_order, header.base_bits);
        let mut reader = BitReader::new(&words);
        let capacity = (header.length as usize).min(words.len() * 32 / (t + d) as usize);
        let mut entries = Vec::with_capacity(capacity);
        let truncated = |n: usize| {
            invalid(format!(
                "data end after {n} entries without the end entry; the file is truncated"
            ))
        };
        let mut index: u64 = 0;
        loop {
            let n = entries.len();
            let field = reader.get(t).ok_or_else(|| truncated(n))?;
            if field == 1 {
                let data = reader.get(d).ok_or_else(|| truncated(n))?;
                if data != 0 {
                    return Err(invalid(format!(
                        "end entry after {n} entries carries data {data}, expected 0"
                    )));
                }
                break;
            }
            let value = if field == 0 {
                reader.get(32).ok_or_else(|| truncated(n))?
            } else {
                field
            };
            let data = reader.get(d).ok_or_else(|| truncated(n))?;
            // Value 2 means "the same index as before", legal only for index 0.
            if value < 2 || (value == 2 && n > 0) {
                return Err(invalid(format!(
                    "entry {n} codes the index difference {value}, which would repeat or precede the previous index"
                )));
            }
            index += u64::from(value) - INDEX_OFFSET;
            let index = u32::try_from(index)
                .map_err(|_| invalid(format!("entry {n} points at index {index}, beyond u32")))?;
            entries.push(Entry {
                index,
                data: data as u8,
            });
        }
        let rest = reader.remaining();
        if rest >= 32 || reader.get(rest as u32) != Some(0) {
            return Err(invalid(format!(
                "{rest} bits follow the end entry, expected at most 31 zero padding bits"
            )));
        }
        if entries.len() != header.length as usize {
            return Err(invalid(format!(
                "header length is {} but the data hold {} entries",
                header.length,
                entries.len()
            )));
        }
        Ok(Type4File { header, entries })
    }

    /// Serialises header and entries.
    pub fn to_bytes(&self) -> Result<Vec<u8>, FormatError> {
        let h = &self.header;
        encode(
            h.epoch,
            h.extended,
            h.time_order,
            h.base_bits,
            &self.entries,
        )
    }
}

/// Encodes entries, whose indices must increase strictly, into a type-4 file.
pub fn encode(
    epoch: u32,
    extended: bool,
    time_order: u32,
    base_bits: u32,
    entries: &[Entry],
) -> Result<Vec<u8>, FormatError> {
    let mut encoder = Type4Encoder::new(time_order, base_bits)?;
    for entry in entries {
        encoder.push(entry.index, entry.data)?;
    }
    Ok(encoder.finish(epoch, extended))
}

/// Streaming type-4 encoder: entries are pushed as the high-count side keeps events.
#[derive(Debug, Clone)]
pub struct Type4Encoder {
    writer: BitWriter,
    time_order: u32,
    base_bits: u32,
    /// Index after the last pushed entry; the first entry counts from index 0.
    next_index: u64,
    length: u32,
}

impl Type4Encoder {
    /// Starts an empty type-4 stream with field widths `T` and `D`.
    pub fn new(time_order: u32, base_bits: u32) -> Result<Self, FormatError> {
        check_widths(time_order, base_bits)?;
        Ok(Type4Encoder {
            writer: BitWriter::new(),
            time_order,
            base_bits,
            next_index: 0,
            length: 0,
        })
    }

    /// Appends the type-2 event `index` with its data; indices must increase strictly.
    #[inline]
    pub fn push(&mut self, index: u32, data: u8) -> Result<(), FormatError> {
        let index = u64::from(index);
        if index < self.next_index {
            return Err(FormatError::Invalid {
                what: "type-4 entry",
                detail: format!(
                    "index {index} does not follow the previous entry (next allowed index {})",
                    self.next_index
                ),
            });
        }
        let previous = if self.length == 0 {
            0
        } else {
            self.next_index - 1
        };
        let value = index - previous + INDEX_OFFSET;
        // An index below 2^32 - 2 always fits; the two largest indices do not.
        let value = u32::try_from(value).map_err(|_| FormatError::Invalid {
            what: "type-4 entry",
            detail: format!("index {index} is too large to code; the limit is 2^32 - 3"),
        })?;
        let (t, d) = (self.time_order, self.base_bits);
        let data = u32::from(data) & ((1u32 << d) - 1);
        if value >> t == 0 {
            self.writer.put(value, t);
        } else {
            self.writer.put(0, t);
            self.writer.put(value, 32);
        }
        self.writer.put(data, d);
        self.next_index = index + 1;
        self.length += 1;
        Ok(())
    }

    /// Number of entries pushed so far.
    pub fn len(&self) -> u32 {
        self.length
    }

    /// Returns true when no entry was pushed.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Width `T` of the index-difference field.
    pub fn time_order(&self) -> u32 {
        self.time_order
    }

    /// Appends the end entry and returns the whole file: header, then the words.
    pub fn finish(mut self, epoch: u32, extended: bool) -> Vec<u8> {
        self.writer.put(1, self.time_order);
        self.writer.put(0, self.base_bits);
        let header = Type4Header {
            extended,
            epoch,
            length: self.length,
            time_order: self.time_order,
            base_bits: self.base_bits,
        };
        let words = self.writer.finish();
        let mut out = Vec::with_capacity(HEADER_BYTES + 4 * words.len());
        out.extend_from_slice(&header.to_bytes());
        extend_le_bytes(&mut out, &words);
        out
    }
}

/// Reads and parses a type-4 file.
pub fn read(path: &Path) -> Result<Type4File, FormatError> {
    let bytes = read_file(path)?;
    Type4File::parse(&bytes).map_err(|e| with_path(e, path))
}

/// Writes a type-4 file atomically (temporary file, then rename).
pub fn write(path: &Path, file: &Type4File) -> Result<(), FormatError> {
    write_atomic(path, &file.to_bytes()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn words(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn empty_file_holds_only_end_entry() {
        let bytes = encode(0x4f87, false, 8, 0, &[]).unwrap();
        assert_eq!(words(&bytes), vec![4, 0x4f87, 0, 8, 0, 0x0100_0000]);
        assert!(Type4File::parse(&bytes).unwrap().entries.is_empty());
    }

    #[test]
    fn first_entry_codes_index_plus_two() {
        let entries = [Entry { index: 0, data: 0 }, Entry { index: 3, data: 0 }];
        let bytes = encode(1, false, 8, 0, &entries).unwrap();
        // Fields 2, 5 and the end entry 1, 8 bits each.
        assert_eq!(words(&bytes)[5], 0x0205_0100);
    }

    #[test]
    fn escape_for_large_difference() {
        let entries = [Entry {
            index: 300,
            data: 0b1010,
        }];
        let bytes = encode(9, true, 8, 4, &entries).unwrap();
        // 8 zero bits, 302 in 32 bits, data 0xa, then the end entry 0x01 and data 0.
        assert_eq!(&words(&bytes)[5..], &[0x0000_0001, 0x2ea0_1000]);
        let file = Type4File::parse(&bytes).unwrap();
        assert_eq!(file.entries, entries);
        assert!(file.header.extended);
        assert_eq!(file.header.tag(), 0x104);
    }

    #[test]
    fn truncated_data_are_rejected() {
        let entries: Vec<Entry> = (0..40)
            .map(|i| Entry {
                index: i * 7,
                data: 0,
            })
            .collect();
        let bytes = encode(1, false, 5, 0, &entries).unwrap();
        let err = Type4File::parse(&bytes[..bytes.len() - 4]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn short_header_is_rejected() {
        let err = Type4File::parse(&[4, 0, 0, 0]).unwrap_err();
        assert!(
            err.to_string().contains("shorter than the 20-byte header"),
            "{err}"
        );
    }

    #[test]
    fn wrong_tag_is_rejected() {
        let mut bytes = encode(1, false, 8, 0, &[]).unwrap();
        bytes[0] = 3;
        let err = Type4File::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("not a type-4 epoch file"), "{err}");
    }

    #[test]
    fn zero_time_order_is_rejected() {
        let mut bytes = encode(1, false, 8, 0, &[]).unwrap();
        bytes[12] = 0;
        let err = Type4File::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("time order 0"), "{err}");
    }

    #[test]
    fn length_mismatch_is_rejected() {
        let mut bytes = encode(1, false, 8, 0, &[Entry { index: 1, data: 0 }]).unwrap();
        bytes[8] = 2;
        let err = Type4File::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("header length is 2"), "{err}");
    }

    #[test]
    fn repeated_index_is_rejected() {
        let mut encoder = Type4Encoder::new(8, 0).unwrap();
        encoder.push(5, 0).unwrap();
        assert!(encoder.push(5, 0).is_err());
    }

    #[test]
    fn golden_files_round_trip() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden");
        let mut checked = 0;
        for case in ["tiny", "realistic", "noisy", "fail"] {
            let Ok(dir) = std::fs::read_dir(root.join(case).join("t4")) else {
                continue;
            };
            for file in dir {
                let bytes = std::fs::read(file.unwrap().path()).unwrap();
                let t4 = Type4File::parse(&bytes).unwrap();
                assert_eq!(
                    t4.to_bytes().unwrap(),
                    bytes,
                    "{case} {:08x}",
                    t4.header.epoch
                );
                checked += 1;
            }
        }
        if checked == 0 {
            eprintln!(
                "golden type-4 files not found under {}; skipped",
                root.display()
            );
        }
    }

    proptest! {
        #[test]
        fn round_trip(
            gaps in proptest::collection::vec((0u32..100_000, 0u8..16), 0..300),
            time_order in 3u32..21,
            base_bits in prop::sample::select(vec![0u32, 3, 4]),
        ) {
            let mut index = 0u32;
            let mut entries = Vec::new();
            for (k, (gap, data)) in gaps.into_iter().enumerate() {
                index += if k == 0 { gap } else { gap + 1 };
                entries.push(Entry { index, data: data & ((1u8 << base_bits) - 1) });
            }
            let bytes = encode(0x1234, false, time_order, base_bits, &entries).unwrap();
            let file = Type4File::parse(&bytes).unwrap();
            prop_assert_eq!(file.header.length as usize, entries.len());
            prop_assert_eq!(file.entries, entries);
        }
    }
}
