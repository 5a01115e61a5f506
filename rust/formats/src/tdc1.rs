//! The event stream of the S-Fifteen TDC1 serial time tagger, and its conversion to raw
//! event words.
//!
//! In timestamp mode the TDC1 sends little-endian 32-bit words with no framing:
//! bits 31..5 a 27-bit time in units of 2 ns (16 ticks), which rolls over every
//! 2^27 * 2 ns = 268.435456 ms; bit 4 a dummy flag (no detection, sent about every half
//! counter period so that a host can count rollovers); bits 3..0 the detector pattern.
//!
//! Conversion, as readevents4a does it: a rollover is counted whenever bit 31 falls from
//! 1 to 0 between consecutive words (dummies included), each adding 2^27 units = 2^31 ticks;
//! the raw word is `offset + ((w & !0x1F) << 14) + (w & 0x1F)`, so bits 18..15 of the
//! tick time are zero (2 ns granularity), bits 4..0 are copied and bits 14..5 are zero.
//! Dummies are dropped unless kept explicitly; the detector skew is applied last.
//!
//! Limits: a stream that steps back in time without a rollover is reported as corrupt or
//! misaligned (at high rates the USB link can lose bytes) instead of being re-aligned.

use crate::raw::{DUMMY_FLAG, TIME_MASK, TIME_SHIFT};
use crate::skew::DetectorSkew;
use crate::FormatError;

/// Bytes of one TDC1 word.
pub const WORD_BYTES: usize = 4;
/// Ticks of 1/8 ns in one TDC1 time unit of 2 ns.
pub const UNIT_TICKS: u64 = 16;
/// Bits of the TDC1 time field.
pub const TIME_BITS: u32 = 27;
/// TDC1 time units per counter period.
pub const PERIOD_UNITS: u64 = 1 << TIME_BITS;
/// Increment of the raw event word per counter rollover (2^31 ticks at bit 15).
const ROLLOVER_WORD_STEP: u64 = 1 << 46;

/// Decodes a TDC1 byte stream into raw event words, across any number of reads.
#[derive(Debug, Clone)]
pub struct Tdc1Decoder {
    keep_dummies: bool,
    skew: DetectorSkew,
    offset: u64,
    previous_high_bit: bool,
    /// Unwrapped time of the previous word in units, to spot backward steps.
    previous_units: Option<u64>,
    /// Bytes of an incomplete word left over from the previous read.
    partial: Vec<u8>,
    words_read: u64,
}

impl Tdc1Decoder {
    /// Creates a decoder whose event times start at `start_ticks`: 0 for device-relative times,
    /// or a wall-clock reading as readevents4a `-A` uses.
    pub fn new(start_ticks: u64, skew: DetectorSkew, keep_dummies: bool) -> Self {
        Tdc1Decoder {
            keep_dummies,
            skew,
            offset: (start_ticks & TIME_MASK) << TIME_SHIFT,
            previous_high_bit: false,
            previous_units: None,
            partial: Vec::with_capacity(WORD_BYTES),
            words_read: 0,
        }
    }

    /// Number of 32-bit words decoded so far, dummies included.
    pub fn words_read(&self) -> u64 {
        self.words_read
    }

    /// Decodes one device word; returns the raw event word, or `None` for a dropped dummy.
    pub fn decode_word(&mut self, w: u32) -> Result<Option<u64>, FormatError> {
        let high_bit = w & 0x8000_0000 != 0;
        let mut rollover = 0;
        if self.previous_high_bit && !high_bit {
            self.offset = self.offset.wrapping_add(ROLLOVER_WORD_STEP);
            rollover = 1;
        }
        self.previous_high_bit = high_bit;

        let units = u64::from(w >> 5);
        let unwrapped = match self.previous_units {
            Some(prev) => (prev & !(PERIOD_UNITS - 1)) + rollover * PERIOD_UNITS + units,
            None => units,
        };
        if let Some(prev) = self.previous_units {
            if unwrapped < prev {
                return Err(FormatError::Invalid {
                    what: "TDC1 event stream",
                    detail: format!(
                        "word {} (0x{w:08x}) is {} ns earlier than the word before it without a counter rollover; the stream is corrupt or misaligned (lost bytes, or a text reply read as events)",
                        self.words_read,
                        (prev - unwrapped) * 2
                    ),
                });
            }
        }
        self.previous_units = Some(unwrapped);
        self.words_read += 1;

        if u64::from(w) & DUMMY_FLAG != 0 && !self.keep_dummies {
            return Ok(None);
        }
        let word = self
            .offset
            .wrapping_add(u64::from(w & !0x1F) << 14)
            .wrapping_add(u64::from(w & 0x1F));
        Ok(Some(self.skew.apply(word)))
    }

    /// Decodes a chunk of the byte stream, appending raw event words to `out`. A word split
    /// across chunks is completed by the next call.
    pub fn push_bytes(&mut self, bytes: &[u8], out: &mut Vec<u64>) -> Result<(), FormatError> {
        let mut rest = bytes;
        if !self.partial.is_empty() {
            let need = WORD_BYTES - self.partial.len();
            let take = need.min(rest.len());
            self.partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.partial.len() < WORD_BYTES {
                return Ok(());
            }
            let w = u32::from_le_bytes([
                self.partial[0],
                self.partial[1],
                self.partial[2],
                self.partial[3],
            ]);
            self.partial.clear();
            if let Some(e) = self.decode_word(w)? {
                out.push(e);
            }
        }
        let mut chunks = rest.chunks_exact(WORD_BYTES);
        out.reserve(rest.len() / WORD_BYTES);
        for c in &mut chunks {
            let w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if let Some(e) = self.decode_word(w)? {
                out.push(e);
            }
        }
        self.partial.extend_from_slice(chunks.remainder());
        Ok(())
    }

    /// Checks that the stream ended on a word boundary.
    pub fn finish(&self) -> Result<(), FormatError> {
        if self.partial.is_empty() {
            Ok(())
        } else {
            Err(FormatError::Truncated {
                what: "TDC1 event stream",
                record_bytes: WORD_BYTES,
                len: (self.words_read as usize) * WORD_BYTES + self.partial.len(),
            })
        }
    }
}

/// Decodes a whole TDC1 recording into raw event words.
pub fn decode(
    bytes: &[u8],
    start_ticks: u64,
    skew: DetectorSkew,
    keep_dummies: bool,
) -> Result<Vec<u64>, FormatError> {
    if bytes.len() % WORD_BYTES != 0 {
        return Err(FormatError::Truncated {
            what: "TDC1 event stream",
            record_bytes: WORD_BYTES,
            len: bytes.len(),
        });
    }
    let mut decoder = Tdc1Decoder::new(start_ticks, skew, keep_dummies);
    let mut out = Vec::with_capacity(bytes.len() / WORD_BYTES);
    decoder.push_bytes(bytes, &mut out)?;
    Ok(out)
}

/// Encodes events as the TDC1 would send them, inserting a dummy word at every half
/// counter period that passes without an event, so that a decoder can count rollovers.
#[derive(Debug, Clone, Default)]
pub struct Tdc1Encoder {
    /// Unwrapped time in units of the last word written.
    last_units: Option<u64>,
}

impl Tdc1Encoder {
    /// Creates an encoder. The first event's time is written modulo the counter period.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the words of events at `time_ticks` (truncated to 2 ns) with `pattern`
    /// (bits 3..0) to `out`. Times must not decrease.
    pub fn push(
        &mut self,
        time_ticks: u64,
        pattern: u8,
        out: &mut Vec<u8>,
    ) -> Result<(), FormatError> {
        let units = time_ticks / UNIT_TICKS;
        if let Some(last) = self.last_units {
            if units < last {
                return Err(FormatError::Invalid {
                    what: "event times for the TDC1 stream",
                    detail: format!(
                        "time {time_ticks} ticks is earlier than the event before it; sort the events first"
                    ),
                });
            }
            let half = PERIOD_UNITS / 2;
            let mut boundary = (last / half + 1) * half;
            while boundary <= units {
                push_word(out, boundary, DUMMY_FLAG as u8);
                boundary += half;
            }
        }
        push_word(out, units, pattern & 0xF);
        self.last_units = Some(units);
        Ok(())
    }
}

fn push_word(out: &mut Vec<u8>, units: u64, low_bits: u8) {
    let w = (((units % PERIOD_UNITS) as u32) << 5) | u32::from(low_bits & 0x1F);
    out.extend_from_slice(&w.to_le_bytes());
}

/// Encodes a whole event list (times in ticks, patterns) as a TDC1 byte stream.
pub fn encode(times_ticks: &[u64], patterns: &[u8]) -> Result<Vec<u8>, FormatError> {
    let mut encoder = Tdc1Encoder::new();
    let mut out = Vec::with_capacity(times_ticks.len() * WORD_BYTES);
    for (&t, &p) in times_ticks.iter().zip(patterns) {
        encoder.push(t, p, &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::{pattern, time_ticks};

    fn word_bytes(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn word_layout_and_two_ns_units() {
        let bytes = word_bytes(&[(1000 << 5) | 0b0100]);
        let events = decode(&bytes, 0, DetectorSkew::NONE, false).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(time_ticks(events[0]), 1000 * 16);
        assert_eq!(pattern(events[0]), 4);
    }

    #[test]
    fn rollover_counted_on_falling_high_bit() {
        let late = ((PERIOD_UNITS as u32 - 10) << 5) | 1;
        let early = (5 << 5) | 2;
        let events = decode(&word_bytes(&[late, early]), 0, DetectorSkew::NONE, false).unwrap();
        assert_eq!(time_ticks(events[1]), (PERIOD_UNITS + 5) * 16);
    }

    #[test]
    fn dummies_count_rollovers_then_drop() {
        let half = (PERIOD_UNITS / 2) as u32;
        let words = [
            (10 << 5) | 1,
            ((half + 3960) << 5) | 0x10,
            (3960 << 5) | 0x10,
            (5000 << 5) | 8,
        ];
        let events = decode(&word_bytes(&words), 0, DetectorSkew::NONE, false).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(time_ticks(events[1]), (PERIOD_UNITS + 5000) * 16);
        let kept = decode(&word_bytes(&words), 0, DetectorSkew::NONE, true).unwrap();
        assert_eq!(kept.len(), 4);
        assert_eq!(kept[1] & 0x1F, 0x10);
    }

    #[test]
    fn backward_step_is_reported_as_corrupt() {
        let words = [(5000 << 5) | 1, (100 << 5) | 2];
        let err = decode(&word_bytes(&words), 0, DetectorSkew::NONE, false).unwrap_err();
        assert!(err.to_string().contains("corrupt or misaligned"), "{err}");
    }

    #[test]
    fn words_split_across_reads() {
        let bytes = word_bytes(&[(7 << 5) | 1, (9 << 5) | 2, (11 << 5) | 4]);
        let mut decoder = Tdc1Decoder::new(0, DetectorSkew::NONE, false);
        let mut out = Vec::new();
        for chunk in bytes.chunks(3) {
            decoder.push_bytes(chunk, &mut out).unwrap();
        }
        decoder.finish().unwrap();
        assert_eq!(
            out.iter().map(|&e| time_ticks(e)).collect::<Vec<_>>(),
            [112, 144, 176]
        );
        decoder.push_bytes(&[1, 2], &mut out).unwrap();
        assert!(decoder.finish().is_err());
    }

    #[test]
    fn truncated_recording_is_rejected() {
        let err = decode(&[0; 6], 0, DetectorSkew::NONE, false).unwrap_err();
        assert!(err.to_string().contains("got 6 bytes"), "{err}");
    }

    #[test]
    fn skew_applies_after_conversion() {
        let bytes = word_bytes(&[(100 << 5) | 2]);
        let events = decode(&bytes, 0, DetectorSkew::from_ticks([0, 3, 0, 0]), false).unwrap();
        assert_eq!(time_ticks(events[0]), 1603);
    }

    #[test]
    fn encode_decode_round_trip_over_rollovers() {
        let times: Vec<u64> = (0..50u64).map(|k| k * 123_456_789 * 16).collect();
        let patterns: Vec<u8> = (0..50).map(|k| 1 << (k % 4)).collect();
        let bytes = encode(&times, &patterns).unwrap();
        let events = decode(&bytes, 0, DetectorSkew::NONE, false).unwrap();
        assert_eq!(
            events.iter().map(|&e| time_ticks(e)).collect::<Vec<_>>(),
            times
        );
        assert_eq!(
            events.iter().map(|&e| pattern(e)).collect::<Vec<_>>(),
            patterns
        );
    }

    #[test]
    fn start_ticks_offsets_times() {
        let bytes = word_bytes(&[(1 << 5) | 1]);
        let events = decode(&bytes, 1 << 40, DetectorSkew::NONE, false).unwrap();
        assert_eq!(time_ticks(events[0]), (1 << 40) + 16);
    }
}
