//! MSB-first bit packing into little-endian 32-bit words, as used by epoch file types 2,
//! 3, 4 and 7.
//!
//! The first entry starts at bit 31 of the first word. An entry may straddle two words:
//! its high part ends the first word and its low part starts the next. Zero bits pad the
//! last, partly filled word. On disk every word is little-endian, so a reader
//! must load whole words, not bytes.

use crate::FormatError;

/// Appends bit fields of up to 32 bits each, most significant bit first.
#[derive(Debug, Clone, Default)]
pub struct BitWriter {
    words: Vec<u32>,
    acc: u32,
    /// Free bits left in `acc`, 1..=32.
    free: u32,
}

impl BitWriter {
    /// Creates an empty writer.
    pub fn new() -> Self {
        BitWriter {
            words: Vec::new(),
            acc: 0,
            free: 32,
        }
    }

    /// Appends the low `width` bits of `value` (`width` in 0..=32; higher bits of `value`
    /// must be zero).
    #[inline]
    pub fn put(&mut self, value: u32, width: u32) {
        debug_assert!(width <= 32);
        debug_assert!(width == 32 || value >> width == 0);
        if width == 0 {
            return;
        }
        if width < self.free {
            self.free -= width;
            self.acc |= value << self.free;
        } else {
            let spill = width - self.free;
            // `spill` is below 32 because `free` is at least 1.
            self.acc |= ((u64::from(value)) >> spill) as u32;
            self.words.push(self.acc);
            self.free = 32 - spill;
            self.acc = if spill == 0 {
                0
            } else {
                ((u64::from(value)) << self.free) as u32
            };
        }
    }

    /// Returns a writer of many `width`-bit fields (1..=32) with its state in registers;
    /// dropping it stores the state back. The bits equal those of [`BitWriter::put`].
    #[inline]
    pub fn run_writer(&mut self, width: u32) -> BitRunWriter<'_> {
        debug_assert!((1..=32).contains(&width));
        BitRunWriter {
            acc: u64::from(self.acc) << 32,
            filled: 32 - self.free,
            width,
            writer: self,
        }
    }

    /// Appends each value in `values` as a `width`-bit field (`width` in 1..=32); the same
    /// as calling [`BitWriter::put`] for each, with the state kept in registers.
    pub fn put_all(&mut self, values: impl Iterator<Item = u32>, width: u32) {
        debug_assert!((1..=32).contains(&width));
        // `acc` holds the unwritten bits left-aligned at bit 63; `filled` counts them.
        let mut acc = u64::from(self.acc) << 32;
        let mut filled = 32 - self.free;
        for value in values {
            acc |= u64::from(value) << (64 - filled - width);
            filled += width;
            if filled >= 32 {
                self.words.push((acc >> 32) as u32);
                acc <<= 32;
                filled -= 32;
            }
        }
        self.acc = (acc >> 32) as u32;
        self.free = 32 - filled;
    }

    /// Number of bits written so far.
    pub fn bit_len(&self) -> u64 {
        self.words.len() as u64 * 32 + u64::from(32 - self.free)
    }

    /// Appends all words, the partial one zero-padded, to `out` as little-endian bytes and
    /// empties the writer, keeping its buffer for reuse.
    pub fn drain_le_bytes(&mut self, out: &mut Vec<u8>) {
        extend_le_bytes(out, &self.words);
        if self.free < 32 {
            out.extend_from_slice(&self.acc.to_le_bytes());
        }
        self.words.clear();
        self.acc = 0;
        self.free = 32;
    }

    /// Emits the partial word (zero-padded) and returns all words.
    pub fn finish(mut self) -> Vec<u32> {
        if self.free < 32 {
            self.words.push(self.acc);
        }
        self.words
    }
}

/// Fast writer of fixed-width fields, from [`BitWriter::run_writer`].
pub struct BitRunWriter<'a> {
    /// Unwritten bits left-aligned at bit 63; `filled` counts them, below 32 between puts.
    acc: u64,
    filled: u32,
    width: u32,
    writer: &'a mut BitWriter,
}

impl BitRunWriter<'_> {
    /// Appends `value` (below 2^width) as one field.
    #[inline(always)]
    pub fn put(&mut self, value: u32) {
        self.acc |= u64::from(value) << (64 - self.filled - self.width);
        self.filled += self.width;
        if self.filled >= 32 {
            self.writer.words.push((self.acc >> 32) as u32);
            self.acc <<= 32;
            self.filled -= 32;
        }
    }
}

impl Drop for BitRunWriter<'_> {
    fn drop(&mut self) {
        self.writer.acc = (self.acc >> 32) as u32;
        self.writer.free = 32 - self.filled;
    }
}

/// Reads bit fields of up to 32 bits, most significant bit first, from 32-bit words.
#[derive(Debug, Clone)]
pub struct BitReader<'a> {
    words: &'a [u32],
    next_word: usize,
    /// Unread bits, left-aligned at bit 63.
    buffer: u64,
    buffered: u32,
}

impl<'a> BitReader<'a> {
    /// Creates a reader positioned at bit 31 of the first word.
    pub fn new(words: &'a [u32]) -> Self {
        BitReader {
            words,
            next_word: 0,
            buffer: 0,
            buffered: 0,
        }
    }

    /// Number of bits not yet read.
    pub fn remaining(&self) -> u64 {
        (self.words.len() - self.next_word) as u64 * 32 + u64::from(self.buffered)
    }

    /// Reads `width` bits (0..=32) as an unsigned value, or `None` at the end of the data.
    #[inline]
    pub fn get(&mut self, width: u32) -> Option<u32> {
        debug_assert!(width <= 32);
        if width == 0 {
            return Some(0);
        }
        if self.buffered < width {
            let word = *self.words.get(self.next_word)?;
            self.next_word += 1;
            self.buffer |= u64::from(word) << (32 - self.buffered);
            self.buffered += 32;
        }
        let value = (self.buffer >> (64 - width)) as u32;
        self.buffer <<= width;
        self.buffered -= width;
        Some(value)
    }
}

/// Splits a data section into little-endian 32-bit words.
pub fn words_from_le_bytes(bytes: &[u8], what: &'static str) -> Result<Vec<u32>, FormatError> {
    if bytes.len() % 4 != 0 {
        return Err(FormatError::Truncated {
            what,
            record_bytes: 4,
            len: bytes.len(),
        });
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Appends 32-bit words as little-endian bytes.
pub fn extend_le_bytes(out: &mut Vec<u8>, words: &[u32]) {
    out.reserve(words.len() * 4);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn first_entry_starts_at_bit_31() {
        let mut w = BitWriter::new();
        w.put(1, 1);
        w.put(0b101, 3);
        assert_eq!(w.finish(), vec![0xD000_0000]);
    }

    #[test]
    fn entry_straddles_two_words() {
        let mut w = BitWriter::new();
        w.put(0, 30);
        w.put(0b1111, 4);
        assert_eq!(w.finish(), vec![0b11, 0xC000_0000]);
    }

    #[test]
    fn drain_empties_writer() {
        let mut w = BitWriter::new();
        w.put(0xABC, 12);
        let mut out = Vec::new();
        w.drain_le_bytes(&mut out);
        assert_eq!(out, 0xABC0_0000_u32.to_le_bytes());
        assert_eq!(w.bit_len(), 0);
        w.put(1, 1);
        assert_eq!(w.finish(), vec![0x8000_0000]);
    }

    #[test]
    fn full_word_adds_no_padding_word() {
        let mut w = BitWriter::new();
        w.put(0xABCD, 16);
        w.put(0x1234, 16);
        assert_eq!(w.finish(), vec![0xABCD_1234]);
    }

    proptest! {
        #[test]
        fn reader_returns_what_writer_wrote(fields in prop::collection::vec((any::<u32>(), 0u32..=32), 0..200)) {
            let mut w = BitWriter::new();
            let fields: Vec<(u32, u32)> = fields
                .into_iter()
                .map(|(v, n)| (if n == 32 { v } else { v & ((1u32 << n) - 1) }, n))
                .collect();
            for &(v, n) in &fields {
                w.put(v, n);
            }
            let total = w.bit_len();
            let words = w.finish();
            prop_assert_eq!(words.len() as u64, total.div_ceil(32));
            let mut r = BitReader::new(&words);
            for &(v, n) in &fields {
                prop_assert_eq!(r.get(n), Some(v));
            }
            prop_assert!(r.remaining() < 32);
        }

        #[test]
        fn put_all_equals_put(width in 1u32..=32, raw in prop::collection::vec(any::<u32>(), 0..100), lead in 0u32..32) {
            let values: Vec<u32> = raw.iter().map(|v| if width == 32 { *v } else { v & ((1 << width) - 1) }).collect();
            let mut one = BitWriter::new();
            let mut all = BitWriter::new();
            one.put(0, lead);
            all.put(0, lead);
            for &v in &values {
                one.put(v, width);
            }
            all.put_all(values.iter().copied(), width);
            let mut run = BitWriter::new();
            run.put(0, lead);
            {
                let mut w = run.run_writer(width);
                for &v in &values {
                    w.put(v);
                }
            }
            let expected = one.finish();
            prop_assert_eq!(&expected, &all.finish());
            prop_assert_eq!(&expected, &run.finish());
        }
    }
}
