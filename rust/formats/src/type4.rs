//! Type-4 epoch files: the list of type-2 events that the high-count side kept after
//! coincidence matching and sifting, sent back to the low-count side.
//!
//! Layout: a 20-byte header of five little-endian u32 fields (`tag` 4, or 0x104 for
//! extended epochs; `epoch`; `length`, the number of entries without the end marker;
//! `timeorder` `w`; `basebits` `b`), then a bit stream packed into 32-bit words from bit 31
//! downwards, each word stored little-endian, zero padded after the last field.
//!
//! Each entry codes an index difference into the type-2 event list of the same epoch.
//! With kept zero-based indices `i_1 < i_2 < ...` the coded values are `i_1 + 2`, then
//! `i_k - i_(k-1) + 2`; 0 and 1 are reserved. A value `v < 2^w` is one `(w + b)`-bit field
//! `v << b | data`. A larger value is a 32-bit field `v >> w` followed by the `(w + b)`-bit
//! field `(v mod 2^w) << b | data`; neither part is word aligned. The stream ends with
//! the field `1 << b` (time part 1, data 0), present even in a file with no entries.
//! Type-2 event times use the same entry code with time differences in ticks, so
//! [`EntryReader`] and [`EntryWriter`] serve both formats.
//!
//! Limits: `w` is 1..=31 and `w + b <= 32`; a value must be below 2^32.

use crate::FormatError;

/// Size of the type-4 header in bytes.
pub const HEADER_BYTES: usize = 20;
/// Header tag of a file labelled with a plain epoch.
pub const TAG: u32 = 4;
/// Header tag of a file labelled with an extended epoch (`chopper -U`).
pub const TAG_EXTENDED: u32 = 0x104;
/// Coded value of the first possible entry: index 0 of the type-2 event list.
const INDEX_OFFSET: u64 = 2;

/// The five header fields of a type-4 file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// 4 or 0x104.
    pub tag: u32,
    /// Epoch of the type-2 file the indices refer to.
    pub epoch: u32,
    /// Number of entries, not counting the end marker.
    pub length: u32,
    /// Width `w` in bits of the short index-difference field.
    pub timeorder: u32,
    /// Width `b` in bits of the per-entry data field (0, 3 or 4 by protocol).
    pub basebits: u32,
}

impl Header {
    /// Parses and checks the header at the start of a type-4 file.
    pub fn parse(bytes: &[u8]) -> Result<Header, FormatError> {
        if bytes.len() < HEADER_BYTES {
            return Err(FormatError::Invalid {
                what: "type-4 file",
                detail: format!(
                    "{} bytes is shorter than the {HEADER_BYTES}-byte header; the file is truncated",
                    bytes.len()
                ),
            });
        }
        let field = |i: usize| u32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
        let header = Header {
            tag: field(0),
            epoch: field(1),
            length: field(2),
            timeorder: field(3),
            basebits: field(4),
        };
        if header.tag != TAG && header.tag != TAG_EXTENDED {
            return Err(FormatError::Invalid {
                what: "type-4 header tag",
                detail: format!(
                    "expected 4 or 0x104, got {:#x}; is this a type-4 file?",
                    header.tag
                ),
            });
        }
        check_widths("type-4 header", header.timeorder, header.basebits)?;
        Ok(header)
    }

    /// Returns true when the epoch field holds an extended epoch (tag 0x104).
    pub fn is_extended(&self) -> bool {
        self.tag == TAG_EXTENDED
    }

    /// Serialises the header as five little-endian u32 fields.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0u8; HEADER_BYTES];
        let fields = [
            self.tag,
            self.epoch,
            self.length,
            self.timeorder,
            self.basebits,
        ];
        for (chunk, value) in out.chunks_exact_mut(4).zip(fields) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        out
    }
}

/// Checks the field widths of an entry-coded stream: `1 <= w <= 31` and `w + b <= 32`.
pub fn check_widths(what: &'static str, timeorder: u32, basebits: u32) -> Result<(), FormatError> {
    if timeorder == 0 || timeorder > 31 || timeorder + basebits > 32 {
        return Err(FormatError::Invalid {
            what,
            detail: format!(
                "timeorder {timeorder} with basebits {basebits}: the time field must be 1..=31 bits \
                 and both fields together at most 32 bits"
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
    /// The `basebits`-wide data field (the high-count side's detector data by protocol).
    pub data: u8,
}

/// A decoded type-4 file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type4 {
    pub header: Header,
    pub entries: Vec<Entry>,
}

/// Decodes a whole type-4 file.
///
/// Rejects a body that is not whole words, a stream that ends before its end marker,
/// words after the end marker, an entry count that differs from the header's `length`,
/// and indices that overflow u32.
pub fn decode(bytes: &[u8]) -> Result<Type4, FormatError> {
    let header = Header::parse(bytes)?;
    let body = &bytes[HEADER_BYTES..];
    if body.len() % 4 != 0 {
        return Err(FormatError::Truncated {
            what: "type-4 body",
            record_bytes: 4,
            len: body.len(),
        });
    }
    let mut reader = EntryReader::new(body, header.timeorder, header.basebits)?;
    let mut entries = Vec::with_capacity(header.length.min(1 << 24) as usize);
    let mut index: u64 = 0;
    while let Some((value, data)) = reader.next_entry()? {
        if value < INDEX_OFFSET || (value == INDEX_OFFSET && !entries.is_empty()) {
            return Err(invalid_body(format!(
                "entry {} codes index difference {value}; after the first entry it must be at least 3",
                entries.len()
            )));
        }
        index += value - INDEX_OFFSET;
        let index = u32::try_from(index).map_err(|_| {
            invalid_body(format!(
                "entry {} points at type-2 event {index}, beyond the u32 range",
                entries.len()
            ))
        })?;
        entries.push(Entry {
            index,
            data: data as u8,
        });
    }
    if reader.words_left() != 0 {
        return Err(invalid_body(format!(
            "{} words follow the end marker; the file is corrupt",
            reader.words_left()
        )));
    }
    if entries.len() != header.length as usize {
        return Err(invalid_body(format!(
            "header announces {} entries but the stream holds {}",
            header.length,
            entries.len()
        )));
    }
    Ok(Type4 { header, entries })
}

fn invalid_body(detail: String) -> FormatError {
    FormatError::Invalid {
        what: "type-4 body",
        detail,
    }
}

/// Encodes a type-4 file from its entries, whose indices must increase strictly.
pub fn encode(
    tag: u32,
    epoch: u32,
    timeorder: u32,
    basebits: u32,
    entries: &[Entry],
) -> Result<Vec<u8>, FormatError> {
    let mut encoder = Encoder::new(timeorder, basebits)?;
    for entry in entries {
        encoder.push(entry.index, entry.data)?;
    }
    Ok(encoder.finish(tag, epoch))
}

/// Streaming type-4 encoder: entries are pushed as the high-count side keeps events.
#[derive(Debug, Clone)]
pub struct Encoder {
    writer: EntryWriter,
    next_index: u64,
    length: u32,
}

impl Encoder {
    /// Starts an empty type-4 stream with time field width `timeorder` and data width
    /// `basebits`.
    pub fn new(timeorder: u32, basebits: u32) -> Result<Encoder, FormatError> {
        Ok(Encoder {
            writer: EntryWriter::new(timeorder, basebits)?,
            next_index: 0,
            length: 0,
        })
    }

    /// Appends the type-2 event `index` with its data field; indices must increase.
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
        // The first entry counts from index 0, later ones from the previous index.
        let value = if self.length == 0 {
            index + INDEX_OFFSET
        } else {
            index - (self.next_index - 1) + INDEX_OFFSET
        };
        self.writer.push(value, u32::from(data))?;
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

    /// Appends the end marker and returns the whole file: header, then the words.
    pub fn finish(self, tag: u32, epoch: u32) -> Vec<u8> {
        let header = Header {
            tag,
            epoch,
            length: self.length,
            timeorder: self.writer.timeorder,
            basebits: self.writer.basebits,
        };
        let words = self.writer.finish();
        let mut out = Vec::with_capacity(HEADER_BYTES + 4 * words.len());
        out.extend_from_slice(&header.to_bytes());
        for word in words {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out
    }
}

/// Packs fields of up to 32 bits MSB first into 32-bit words.
#[derive(Debug, Clone, Default)]
pub struct BitWriter {
    // Pending bits, right-aligned; fewer than 32 between calls.
    acc: u64,
    pending: u32,
    words: Vec<u32>,
}

impl BitWriter {
    /// Starts an empty bit stream.
    pub fn new() -> BitWriter {
        BitWriter::default()
    }

    /// Appends the low `bits` bits of `value` (`bits <= 32`).
    #[inline]
    pub fn put(&mut self, value: u32, bits: u32) {
        debug_assert!(bits <= 32);
        if bits == 0 {
            return;
        }
        let masked = u64::from(value) & ((1u64 << bits) - 1);
        self.acc = (self.acc << bits) | masked;
        self.pending += bits;
        if self.pending >= 32 {
            self.pending -= 32;
            self.words.push((self.acc >> self.pending) as u32);
            self.acc &= (1u64 << self.pending) - 1;
        }
    }

    /// Number of whole words written so far.
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Flushes a partial last word, zero padded in its low bits, and returns the words.
    pub fn finish(mut self) -> Vec<u32> {
        if self.pending > 0 {
            self.words.push((self.acc << (32 - self.pending)) as u32);
        }
        self.words
    }
}

/// Reads fields of up to 32 bits MSB first from little-endian 32-bit words.
#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    words: &'a [u8],
    next_word: usize,
    // Buffered bits, right-aligned; bits above `available` are stale.
    acc: u64,
    available: u32,
}

impl<'a> BitReader<'a> {
    /// Reads from `body`; a trailing partial word is never read.
    pub fn new(body: &'a [u8]) -> BitReader<'a> {
        BitReader {
            words: body,
            next_word: 0,
            acc: 0,
            available: 0,
        }
    }

    /// Returns the next `bits` bits (`bits <= 32`), or None when the words run out.
    #[inline]
    pub fn get(&mut self, bits: u32) -> Option<u32> {
        debug_assert!(bits <= 32);
        if bits == 0 {
            return Some(0);
        }
        if self.available < bits {
            let start = 4 * self.next_word;
            let chunk = self.words.get(start..start + 4)?;
            let word = u32::from_le_bytes(chunk.try_into().unwrap());
            self.acc = (self.acc << 32) | u64::from(word);
            self.available += 32;
            self.next_word += 1;
        }
        self.available -= bits;
        Some(((self.acc >> self.available) & ((1u64 << bits) - 1)) as u32)
    }

    /// Number of whole words not yet touched.
    pub fn words_left(&self) -> usize {
        self.words.len() / 4 - self.next_word
    }
}

/// Writes the entry code of type-2 and type-4 bodies: short, long and end fields.
#[derive(Debug, Clone)]
pub struct EntryWriter {
    bits: BitWriter,
    timeorder: u32,
    basebits: u32,
}

impl EntryWriter {
    /// Starts a stream with time field width `timeorder` and data width `basebits`.
    pub fn new(timeorder: u32, basebits: u32) -> Result<EntryWriter, FormatError> {
        check_widths("entry code", timeorder, basebits)?;
        Ok(EntryWriter {
            bits: BitWriter::new(),
            timeorder,
            basebits,
        })
    }

    /// Appends one entry: `value` (at least 2, below 2^32) with its data field.
    #[inline]
    pub fn push(&mut self, value: u64, data: u32) -> Result<(), FormatError> {
        if !(2..1 << 32).contains(&value) {
            return Err(FormatError::Invalid {
                what: "entry value",
                detail: format!("{value} is outside 2..2^32; 0 and 1 are reserved markers"),
            });
        }
        let (w, b) = (self.timeorder, self.basebits);
        let data = data & ((1u32 << b) - 1);
        if value >> w != 0 {
            // Long form: the high part first, then the low part like a short field.
            self.bits.put((value >> w) as u32, 32);
        }
        let low = (value & ((1u64 << w) - 1)) as u32;
        self.bits.put(low << b | data, w + b);
        Ok(())
    }

    /// Appends the end marker and returns the words.
    pub fn finish(mut self) -> Vec<u32> {
        self.bits
            .put(1u32 << self.basebits, self.timeorder + self.basebits);
        self.bits.finish()
    }
}

/// Reads the entry code of type-2 and type-4 bodies.
#[derive(Debug, Clone)]
pub struct EntryReader<'a> {
    bits: BitReader<'a>,
    timeorder: u32,
    basebits: u32,
    finished: bool,
}

impl<'a> EntryReader<'a> {
    /// Reads entries from `body` (the words after the header).
    pub fn new(
        body: &'a [u8],
        timeorder: u32,
        basebits: u32,
    ) -> Result<EntryReader<'a>, FormatError> {
        check_widths("entry code", timeorder, basebits)?;
        Ok(EntryReader {
            bits: BitReader::new(body),
            timeorder,
            basebits,
            finished: false,
        })
    }

    /// Returns the next `(value, data)`, or None after the end marker.
    ///
    /// A stream that ends before its end marker is an error.
    #[inline]
    pub fn next_entry(&mut self) -> Result<Option<(u64, u32)>, FormatError> {
        if self.finished {
            return Ok(None);
        }
        let (w, b) = (self.timeorder, self.basebits);
        let field = self.bits.get(w + b).ok_or_else(missing_end_marker)?;
        let data_mask = (1u32 << b) - 1;
        let time_part = field >> b;
        match time_part {
            0 => {
                // Long form: this field held the top bits of the 32-bit high part.
                let rest = self.bits.get(32).ok_or_else(missing_end_marker)?;
                let head = if b == 0 {
                    0
                } else {
                    u64::from(field & data_mask) << (32 - b)
                };
                let value = head | u64::from(rest >> b);
                Ok(Some((value, rest & data_mask)))
            }
            1 => {
                self.finished = true;
                Ok(None)
            }
            _ => Ok(Some((u64::from(time_part), field & data_mask))),
        }
    }

    /// Number of whole words not yet touched.
    pub fn words_left(&self) -> usize {
        self.bits.words_left()
    }
}

fn missing_end_marker() -> FormatError {
    FormatError::Invalid {
        what: "entry-coded body",
        detail: "the words end before the end marker; the file is truncated".to_string(),
    }
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
    fn bit_writer_packs_msb_first() {
        let mut w = BitWriter::new();
        w.put(1, 1);
        w.put(0, 30);
        w.put(0b11, 2);
        assert_eq!(w.finish(), vec![0x8000_0001, 0x8000_0000]);
    }

    #[test]
    fn bit_writer_adds_no_word_when_aligned() {
        let mut w = BitWriter::new();
        w.put(0xdead_beef, 32);
        assert_eq!(w.finish(), vec![0xdead_beef]);
    }

    #[test]
    fn empty_file_holds_only_end_marker() {
        let bytes = encode(TAG, 0x4f87, 8, 0, &[]).unwrap();
        assert_eq!(bytes.len(), HEADER_BYTES + 4);
        assert_eq!(words(&bytes), vec![4, 0x4f87, 0, 8, 0, 0x0100_0000]);
        let file = decode(&bytes).unwrap();
        assert!(file.entries.is_empty());
    }

    #[test]
    fn first_entry_codes_index_plus_two() {
        let entries = [Entry { index: 0, data: 0 }, Entry { index: 3, data: 0 }];
        let bytes = encode(TAG, 1, 8, 0, &entries).unwrap();
        // Fields 2, 5, end marker 1, each 8 bits.
        assert_eq!(words(&bytes)[5], 0x0205_0100);
    }

    #[test]
    fn long_form_for_large_difference() {
        let entries = [Entry {
            index: 300,
            data: 0b1010,
        }];
        let bytes = encode(TAG_EXTENDED, 9, 8, 4, &entries).unwrap();
        let body = &words(&bytes)[5..];
        // 302 = 0x12e: high part 1 in 32 bits, then 0x2e << 4 | 0xa, then end 0x010.
        assert_eq!(body, &[0x0000_0001, 0x2ea0_1000]);
        let file = decode(&bytes).unwrap();
        assert_eq!(file.entries, entries);
        assert!(file.header.is_extended());
    }

    #[test]
    fn truncated_body_is_rejected() {
        let entries: Vec<Entry> = (0..40)
            .map(|i| Entry {
                index: i * 7,
                data: 0,
            })
            .collect();
        let bytes = encode(TAG, 1, 5, 0, &entries).unwrap();
        let err = decode(&bytes[..bytes.len() - 4]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn short_header_is_rejected() {
        let err = decode(&[4, 0, 0, 0]).unwrap_err();
        assert!(
            err.to_string().contains("shorter than the 20-byte header"),
            "{err}"
        );
    }

    #[test]
    fn wrong_tag_is_rejected() {
        let mut bytes = encode(TAG, 1, 8, 0, &[]).unwrap();
        bytes[0] = 3;
        let err = decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("got 0x3"), "{err}");
    }

    #[test]
    fn zero_timeorder_is_rejected() {
        let mut bytes = encode(TAG, 1, 8, 0, &[]).unwrap();
        bytes[12] = 0;
        let err = decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("timeorder 0"), "{err}");
    }

    #[test]
    fn length_mismatch_is_rejected() {
        let mut bytes = encode(TAG, 1, 8, 0, &[Entry { index: 1, data: 0 }]).unwrap();
        bytes[8] = 2;
        let err = decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("announces 2 entries"), "{err}");
    }

    #[test]
    fn decreasing_index_is_rejected() {
        let mut encoder = Encoder::new(8, 0).unwrap();
        encoder.push(5, 0).unwrap();
        assert!(encoder.push(5, 0).is_err());
    }

    #[test]
    fn golden_files_round_trip() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden");
        let mut checked = 0;
        for case in ["tiny", "realistic", "noisy", "fail"] {
            let Ok(dir) = std::fs::read_dir(root.join(case).join("t4")) else {
                continue;
            };
            for file in dir {
                let bytes = std::fs::read(file.unwrap().path()).unwrap();
                let t4 = decode(&bytes).unwrap();
                let h = t4.header;
                let again = encode(h.tag, h.epoch, h.timeorder, h.basebits, &t4.entries).unwrap();
                assert_eq!(again, bytes, "epoch {:08x} of {case}", h.epoch);
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
            timeorder in 3u32..21,
            basebits in prop::sample::select(vec![0u32, 3, 4]),
        ) {
            let mut index = 0u32;
            let mut entries = Vec::new();
            for (k, (gap, data)) in gaps.into_iter().enumerate() {
                index += if k == 0 { gap } else { gap + 1 };
                entries.push(Entry { index, data: data & ((1u8 << basebits) - 1) });
            }
            let bytes = encode(TAG, 0x1234, timeorder, basebits, &entries).unwrap();
            let file = decode(&bytes).unwrap();
            prop_assert_eq!(file.header.length as usize, entries.len());
            prop_assert_eq!(file.entries, entries);
        }
    }
}
