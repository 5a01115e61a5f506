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

    /// Appends `table[key & 0xF]` as a `width`-bit field (`width` in 1..=8) for each key in
    /// `keys`, with the same bits as calling [`BitWriter::put`] for each. Widths that
    /// divide 32 are packed a whole word at a time once the writer is at a word boundary.
    pub fn put_mapped(&mut self, keys: &[u8], table: &[u8; 16], width: u32) {
        debug_assert!((1..=8).contains(&width));
        debug_assert!(table.iter().all(|&v| u32::from(v) >> width == 0));
        let mut rest = keys;
        // Fill the partial word field by field. With a width that divides 32 and a word
        // filled by fields of that width, this ends at a word boundary.
        while self.free < 32 {
            let Some((&key, tail)) = rest.split_first() else {
                return;
            };
            self.put(u32::from(table[usize::from(key & 0xF)]), width);
            rest = tail;
        }
        rest = match width {
            1 => self.put_mapped_words::<1>(rest, table),
            2 => self.put_mapped_words::<2>(rest, table),
            4 => self.put_mapped_words::<4>(rest, table),
            8 => self.put_mapped_words::<8>(rest, table),
            _ => rest,
        };
        for &key in rest {
            self.put(u32::from(table[usize::from(key & 0xF)]), width);
        }
    }

    /// Appends whole words of `32 / WIDTH` mapped keys each, the writer being at a word
    /// boundary; returns the keys left over for a partial word.
    #[inline]
    fn put_mapped_words<'k, const WIDTH: u32>(
        &mut self,
        keys: &'k [u8],
        table: &[u8; 16],
    ) -> &'k [u8] {
        debug_assert_eq!(self.free, 32);
        let groups = keys.chunks_exact((32 / WIDTH) as usize);
        let rest = groups.remainder();
        self.words.extend(groups.map(|group| {
            group.iter().fold(0u32, |word, &key| {
                (word << WIDTH) | u32::from(table[usize::from(key & 0xF)])
            })
        }));
        rest
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
    let start = out.len();
    out.resize(start + 4 * words.len(), 0);
    for (bytes, word) in out[start..].chunks_exact_mut(4).zip(words) {
        bytes.copy_from_slice(&word.to_le_bytes());
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
        fn put_mapped_equals_put(
            width in 1u32..=8,
            raw_table in any::<[u8; 16]>(),
            keys in prop::collection::vec(any::<u8>(), 0..300),
            lead in 0u32..32,
            split in 0usize..300,
        ) {
            let table = raw_table.map(|v| (u32::from(v) & ((1 << width) - 1)) as u8);
            let split = split.min(keys.len());
            let mut one = BitWriter::new();
            let mut mapped = BitWriter::new();
            one.put(0, lead);
            mapped.put(0, lead);
            for &key in &keys {
                one.put(u32::from(table[usize::from(key & 0xF)]), width);
            }
            mapped.put_mapped(&keys[..split], &table, width);
            mapped.put_mapped(&keys[split..], &table, width);
            prop_assert_eq!(one.bit_len(), mapped.bit_len());
            prop_assert_eq!(one.finish(), mapped.finish());
        }
    }
}
