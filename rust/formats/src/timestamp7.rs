//! Recordings of the timestamp7 (TDC2) time tagger, as readevents7 writes them and fpfind
//! reads them, and their conversion to raw events in ticks of 1/8 ns.
//!
//! A timestamp7 event is a 64-bit word with the raw event layout, except that bits 63..10
//! hold a 54-bit time in fine ticks of 1/256 ns (so bits 14..10 are the sub-tick part),
//! bits 9..6 a constant `0b1100`, bit 5 the self-test flag, bit 4 the dummy flag and
//! bits 3..0 the detector pattern. fpfind names the file layouts after readevents7's `-a`
//! option:
//!
//! | layout | per event |
//! |---|---|
//! | `a0` | two text lines of 8 lowercase hex digits: low 32 bits, then high 32 bits |
//! | `a1` | the word as a little-endian u64 |
//! | `a1X` | legacy order (`-X`): high 32 bits, then low 32 bits, each little-endian |
//! | `a2` | one text line of 16 lowercase hex digits |
//!
//! Conversion to the raw events chopper reads is readevents7's short mode: clear bits
//! 14..10 (`word & 0xFFFF_FFFF_FFFF_83FF`), then add the detector skew. Flag bits are kept.
//!
//! The fast (32-bit) device format is expanded by [`FastModeExpander`].

use crate::raw::{self, Serialisation};
use crate::FormatError;

/// readevents7 short mode: the mask that truncates the fine time to whole ticks.
pub const SHORT_MODE_MASK: u64 = 0xFFFF_FFFF_FFFF_83FF;
/// The constant field in bits 9..6 of every long-format event (`0b1100`).
pub const CONSTANT_FIELD: u64 = 0x300;

/// File layout of a timestamp7 recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Text, two 8-hex-digit lines per event: low word, then high word.
    A0,
    /// Binary, each word a little-endian u64.
    A1,
    /// Binary, legacy word order (high 32 bits first).
    A1Legacy,
    /// Text, one 16-hex-digit line per event.
    A2,
}

impl Layout {
    /// Parses fpfind's layout name: "a0", "a1", "a1X" (also "a1x") or "a2".
    pub fn parse(name: &str) -> Result<Layout, FormatError> {
        match name {
            "a0" => Ok(Layout::A0),
            "a1" => Ok(Layout::A1),
            "a1X" | "a1x" => Ok(Layout::A1Legacy),
            "a2" => Ok(Layout::A2),
            other => Err(FormatError::Invalid {
                what: "timestamp7 layout",
                detail: format!(
                    "{other:?}; expected \"a0\" (text words), \"a1\" (binary), \"a1X\" (binary, legacy word order) or \"a2\" (text events)"
                ),
            }),
        }
    }
}

/// Parses `count` hex digits of one text line, naming the line on error.
fn parse_hex_line(line: &[u8], digits: usize, line_number: usize) -> Result<u64, FormatError> {
    let valid = line.len() == digits && line.iter().all(u8::is_ascii_hexdigit);
    if !valid {
        return Err(FormatError::Invalid {
            what: "timestamp7 text recording",
            detail: format!(
                "line {line_number} is {:?}; expected exactly {digits} hex digits",
                String::from_utf8_lossy(&line[..line.len().min(40)])
            ),
        });
    }
    let text = std::str::from_utf8(line).expect("hex digits are ASCII");
    Ok(u64::from_str_radix(text, 16).expect("checked hex digits"))
}

/// Splits text into lines; the last line may lack its newline, an empty text has no lines.
fn text_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.split(|&b| b == b'\n')
        .filter(move |_| !bytes.is_empty())
}

/// Decodes a recording into its 64-bit event words, appending them to `out`.
pub fn decode_into(bytes: &[u8], layout: Layout, out: &mut Vec<u64>) -> Result<(), FormatError> {
    match layout {
        Layout::A1 => raw::decode_into(bytes, Serialisation::Native, out),
        Layout::A1Legacy => raw::decode_into(bytes, Serialisation::Legacy, out),
        Layout::A2 => {
            for (i, line) in text_lines(bytes).enumerate() {
                out.push(parse_hex_line(line, 16, i + 1)?);
            }
            Ok(())
        }
        Layout::A0 => {
            let mut low: Option<u64> = None;
            for (i, line) in text_lines(bytes).enumerate() {
                let value = parse_hex_line(line, 8, i + 1)?;
                match low.take() {
                    None => low = Some(value),
                    Some(l) => out.push((value << 32) | l),
                }
            }
            if low.is_some() {
                return Err(FormatError::Invalid {
                    what: "timestamp7 a0 recording",
                    detail: "odd number of lines: the last event has its low word but no high word; the recording is truncated".into(),
                });
            }
            Ok(())
        }
    }
}

/// Encodes event words in a layout, appending the bytes to `out`.
pub fn encode_into(words: &[u64], layout: Layout, out: &mut Vec<u8>) {
    match layout {
        Layout::A1 => raw::encode_into(words, Serialisation::Native, out),
        Layout::A1Legacy => raw::encode_into(words, Serialisation::Legacy, out),
        Layout::A2 => {
            for w in words {
                out.extend_from_slice(format!("{w:016x}\n").as_bytes());
            }
        }
        Layout::A0 => {
            for &w in words {
                out.extend_from_slice(format!("{:08x}\n{:08x}\n", w as u32, w >> 32).as_bytes());
            }
        }
    }
}

/// Converts a timestamp7 event word to a raw event word in whole ticks (short mode).
#[inline]
pub fn to_raw(word: u64) -> u64 {
    word & SHORT_MODE_MASK
}

/// Builds a timestamp7 word from a time in ticks and a pattern, as fpfind's writers do:
/// bits 9..4 (constant field and flags) are zero.
#[inline]
pub fn from_ticks(time_ticks: u64, pattern: u8) -> u64 {
    raw::make_word(time_ticks, u16::from(pattern & 0xF))
}

/// Expands the fast (32-bit) device format of timestamp7 into long-format words.
///
/// A fast word contains a 26-bit time in fine ticks in bits 31..6 and the flags and pattern
/// in bits 5..0; the counter rolls over every 2^26 fine ticks (262.144 us) and the device
/// injects dummy words so the host sees every rollover as a fall of bit 31. Zero words are
/// fillers and yield nothing. Late dummies can make the expanded stream step back.
#[derive(Debug, Clone, Default)]
pub struct FastModeExpander {
    previous: u32,
    rollovers: u64,
}

impl FastModeExpander {
    /// Creates an expander with no rollovers counted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Expands one device word; `None` for a zero filler.
    pub fn expand(&mut self, w: u32) -> Option<u64> {
        if w == 0 {
            return None;
        }
        if self.previous & 0x8000_0000 != 0 && w & 0x8000_0000 == 0 {
            self.rollovers = (self.rollovers + 1) & 0xFFFF_FFFF;
        }
        self.previous = w;
        let time_bits = u64::from(w & !0x3F) | (self.rollovers << 32);
        Some(u64::from(w & 0x3F) | CONSTANT_FIELD | (time_bits << 4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_layouts_round_trip() {
        let words = [0xedae_1bd7_4ce8_8f21u64, 0xedae_1bd7_4f14_3308];
        for layout in [Layout::A0, Layout::A1, Layout::A1Legacy, Layout::A2] {
            let mut bytes = Vec::new();
            encode_into(&words, layout, &mut bytes);
            let mut back = Vec::new();
            decode_into(&bytes, layout, &mut back).unwrap();
            assert_eq!(back, words, "{layout:?}");
        }
    }

    #[test]
    fn a0_is_low_word_first() {
        let mut out = Vec::new();
        decode_into(b"4ce88f21\nedae1bd7\n", Layout::A0, &mut out).unwrap();
        assert_eq!(out, [0xedae_1bd7_4ce8_8f21]);
    }

    #[test]
    fn a2_without_final_newline() {
        let mut out = Vec::new();
        decode_into(b"edae1bd74ce88f21", Layout::A2, &mut out).unwrap();
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn bad_text_names_the_line() {
        let mut out = Vec::new();
        let err = decode_into(b"edae1bd74ce88f21\nxyz\n", Layout::A2, &mut out).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
        let err = decode_into(b"4ce88f21\n", Layout::A0, &mut out).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn short_mode_clears_sub_tick_bits() {
        assert_eq!(to_raw(0xfd42_23d2_0308_f704), 0xfd42_23d2_0308_8304);
    }

    #[test]
    fn fast_mode_counts_rollovers() {
        let mut x = FastModeExpander::new();
        assert_eq!(x.expand(0), None);
        let a = x.expand(0xFFFF_FFC1).unwrap();
        let b = x.expand(0x0000_0042).unwrap();
        assert_eq!(a >> 10, (0xFFFF_FFC0u64 >> 6));
        assert_eq!(b >> 10, (1 << 26) + 1);
        assert_eq!(b & 0x3FF, 0x302);
    }

    #[test]
    fn unknown_layout_is_named() {
        let err = Layout::parse("a3").unwrap_err();
        assert!(err.to_string().contains("\"a3\""), "{err}");
    }
}
