//! The canonical 64-bit raw timestamp event and its two byte serialisations.
//!
//! Bit layout of an event word `E`: bits 63..15 are the 49-bit time in ticks of 1/8 ns,
//! bits 14..10 the sub-tick part of the timestamp7 fine time (1/256 ns), bits 9..4 device
//! flags (bit 4 marks a dummy event, bit 5 a self-test event), bits 3..0 the detector
//! pattern (bit k set means input k+1 fired).
//!
//! Serialisations, 8 bytes per event, no header:
//! - legacy (`readevents -X`, what chopper, chopper2 and costream read): the high 32 bits
//!   as a little-endian u32, then the low 32 bits as a little-endian u32;
//! - native: `E` as one little-endian u64.
//!
//! The 49-bit time wraps every 2^49 ticks (about 19.5 h); nothing here unwraps it.

use crate::FormatError;

/// Number of bytes of one serialised event.
pub const EVENT_BYTES: usize = 8;
/// Bit position of the 49-bit tick time inside the event word.
pub const TIME_SHIFT: u32 = 15;
/// Mask of the 49-bit tick time once shifted down.
pub const TIME_MASK: u64 = (1 << 49) - 1;
/// Mask of the detector pattern bits.
pub const PATTERN_MASK: u64 = 0xF;
/// Flag bit of a dummy event (no detection, a filler for counter rollovers).
pub const DUMMY_FLAG: u64 = 1 << 4;
/// Flag bit of a detector self-test event (blinding countermeasure).
pub const SELF_TEST_FLAG: u64 = 1 << 5;

/// Byte order of the two 32-bit halves of an event word on disk or in a pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serialisation {
    /// High word first, each half little-endian (`readevents -X`).
    Legacy,
    /// The whole word little-endian.
    Native,
}

/// Returns the 49-bit time in ticks of 1/8 ns.
#[inline]
pub fn time_ticks(word: u64) -> u64 {
    word >> TIME_SHIFT
}

/// Returns the 4-bit detector pattern.
#[inline]
pub fn pattern(word: u64) -> u8 {
    (word & PATTERN_MASK) as u8
}

/// Builds an event word from a tick time (only its low 49 bits are kept) and the low
/// bits (pattern and flags, bits 14..0).
#[inline]
pub fn make_word(time_ticks: u64, low_bits: u16) -> u64 {
    ((time_ticks & TIME_MASK) << TIME_SHIFT) | u64::from(low_bits & 0x7FFF)
}

/// Decodes one serialised event.
#[inline]
pub fn decode_one(bytes: [u8; EVENT_BYTES], order: Serialisation) -> u64 {
    match order {
        Serialisation::Native => u64::from_le_bytes(bytes),
        Serialisation::Legacy => {
            let high = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
            let low = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
            (u64::from(high) << 32) | u64::from(low)
        }
    }
}

/// Encodes one event word.
#[inline]
pub fn encode_one(word: u64, order: Serialisation) -> [u8; EVENT_BYTES] {
    match order {
        Serialisation::Native => word.to_le_bytes(),
        Serialisation::Legacy => {
            let mut out = [0u8; EVENT_BYTES];
            out[..4].copy_from_slice(&((word >> 32) as u32).to_le_bytes());
            out[4..].copy_from_slice(&(word as u32).to_le_bytes());
            out
        }
    }
}

/// Decodes a buffer of whole events, appending the words to `out`.
///
/// A buffer whose length is not a multiple of 8 is rejected whole, so a truncated
/// final record is reported instead of silently dropped.
pub fn decode_into(
    bytes: &[u8],
    order: Serialisation,
    out: &mut Vec<u64>,
) -> Result<(), FormatError> {
    if bytes.len() % EVENT_BYTES != 0 {
        return Err(FormatError::Truncated {
            what: "raw event stream",
            record_bytes: EVENT_BYTES,
            len: bytes.len(),
        });
    }
    out.reserve(bytes.len() / EVENT_BYTES);
    out.extend(
        bytes
            .chunks_exact(EVENT_BYTES)
            .map(|c| decode_one(c.try_into().expect("chunk of 8 bytes"), order)),
    );
    Ok(())
}

/// Encodes event words, appending the bytes to `out`.
pub fn encode_into(words: &[u64], order: Serialisation, out: &mut Vec<u8>) {
    out.reserve(words.len() * EVENT_BYTES);
    for &w in words {
        out.extend_from_slice(&encode_one(w, order));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_puts_high_word_first() {
        let word = 0x0123_4567_89ab_cdef_u64;
        let bytes = encode_one(word, Serialisation::Legacy);
        assert_eq!(bytes, [0x67, 0x45, 0x23, 0x01, 0xef, 0xcd, 0xab, 0x89]);
        assert_eq!(decode_one(bytes, Serialisation::Legacy), word);
    }

    #[test]
    fn native_is_little_endian_word() {
        let word = 0x0123_4567_89ab_cdef_u64;
        assert_eq!(encode_one(word, Serialisation::Native), word.to_le_bytes());
    }

    #[test]
    fn time_and_pattern_split() {
        let word = make_word(0x1_2345_6789_abcd, 0b1010);
        assert_eq!(time_ticks(word), 0x1_2345_6789_abcd);
        assert_eq!(pattern(word), 0b1010);
    }

    #[test]
    fn truncated_buffer_is_rejected() {
        let mut out = Vec::new();
        let err = decode_into(&[0u8; 12], Serialisation::Legacy, &mut out).unwrap_err();
        assert!(err.to_string().contains("got 12 bytes"), "{err}");
        assert!(out.is_empty());
    }
}
