//! Type-2 epoch files: compressed event times plus a few basis bits per event, as chopper
//! writes them on the low-count side and sends them to the peer.
//!
//! Layout (all fields little-endian):
//!
//! | offset | field | meaning |
//! |---|---|---|
//! | 0 | tag (i32) | 2, or 0x102 for an extended epoch |
//! | 4 | epoch (u32) | local 17-bit or extended 32-bit epoch |
//! | 8 | length (u32) | number of events (the end entry is not counted) |
//! | 12 | time order `T` (i32) | width of the time-difference field |
//! | 16 | base bits `D` (i32) | width of the per-event value, from the protocol table |
//! | 20 | protocol (i32) | protocol index 0..=6 (see [`Protocol`]) |
//!
//! The data are 32-bit words filled MSB first ([`crate::bits`]). Each event is the
//! difference `d` in ticks from the previous event (the first from the epoch start), as
//! `T` bits, then its `D`-bit value. A difference of `2^T` or more is an escape: `T` zero
//! bits, `d` in 32 bits, then the value. The end entry is the value 1 in `T` bits followed
//! by `D` zero bits; zero bits pad the last word. Time fields 0 and 1 are thus reserved,
//! and every encoded difference is at least 2.
//!
//! Example (epoch 0x42, protocol 1, `T` = 17):
//!
//! ```
//! use qkd_formats::type2::{self, Type2File};
//! let bytes = type2::encode(0x42, false, 17, 1, &[0x4200001000, 0x4200001003], &[0, 1]).unwrap();
//! let events = Type2File::parse(&bytes).unwrap().decode().unwrap();
//! assert_eq!(events.times, vec![0x4200001000, 0x4200001003]);
//! assert_eq!(events.values, vec![0, 1]);
//! ```
//!
//! Limitations: the reference chopper can write files with `T` = 32 or `T + D` > 32 when
//! the event rate stays very low; [`Type2Encoder`] reproduces those bytes, but no decoder
//! (this one included) can read them back, so [`Type2File::decode`] rejects them.

use std::path::Path;

use crate::bits::{extend_le_bytes, words_from_le_bytes, BitReader};
use crate::epoch::{check_tag, header_fields, make_tag, read_file, with_path, write_atomic};
use crate::FormatError;

/// Type number in the header tag.
pub const FILE_TYPE: i32 = 2;
/// Size of the header in bytes.
pub const HEADER_BYTES: usize = 24;

/// Values that one protocol sends in type-2 and keeps in type-3 files, per detector pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protocol {
    /// Protocol index as given to chopper `-p`.
    pub index: u8,
    /// Bits per event in type-2 files (`D`).
    pub type2_bits: u32,
    /// Type-2 value of each pattern 0..=15.
    pub type2_values: [u8; 16],
    /// Bits per event in type-3 files (`D3`).
    pub type3_bits: u32,
    /// Type-3 value of each pattern 0..=15.
    pub type3_values: [u8; 16],
    /// Detector columns of the detailed log line (4, or 6 for the device-independent one).
    pub detectors: u8,
}

const IDENTITY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// The protocol tables of chopper `-p 0` to `-p 6`. Detector wiring assumed by the BB84
/// variants: pattern bit 0 = V, bit 1 = -45°, bit 2 = H, bit 3 = +45°.
pub const PROTOCOLS: [Protocol; 7] = [
    // 0: service mode, the full pattern both ways.
    Protocol {
        index: 0,
        type2_bits: 4,
        type2_values: IDENTITY,
        type3_bits: 4,
        type3_values: IDENTITY,
        detectors: 4,
    },
    // 1: BB84 / BBM92, basis sent (0 = H/V, 1 = ±45), value kept (1 = H or +45).
    Protocol {
        index: 1,
        type2_bits: 1,
        type2_values: [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        type3_bits: 1,
        type3_values: [0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        detectors: 4,
    },
    // 2: BB84 with event classes: 2 = two detectors, 3 = none or three or more.
    Protocol {
        index: 2,
        type2_bits: 2,
        type2_values: [3, 0, 1, 2, 0, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 3],
        type3_bits: 2,
        type3_values: [3, 0, 0, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 3],
        detectors: 4,
    },
    // 3: device-independent with 6 detectors; patterns 3 and 6 are the key detectors.
    Protocol {
        index: 3,
        type2_bits: 3,
        type2_values: [5, 0, 1, 4, 2, 5, 4, 5, 3, 5, 5, 5, 5, 5, 5, 5],
        type3_bits: 4,
        type3_values: IDENTITY,
        detectors: 6,
    },
    // 4: device-independent with 4 detectors: only "single click or not" is sent.
    Protocol {
        index: 4,
        type2_bits: 1,
        type2_values: [0, 1, 1, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
        type3_bits: 4,
        type3_values: IDENTITY,
        detectors: 4,
    },
    // 5: reduced BB84, only times are sent; type 3 keeps basis (bit 1) and value (bit 0).
    Protocol {
        index: 5,
        type2_bits: 0,
        type2_values: [0; 16],
        type3_bits: 2,
        type3_values: [0, 0, 2, 0, 1, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0],
        detectors: 4,
    },
    // 6: service mode with some multi-detector patterns blanked to 0.
    Protocol {
        index: 6,
        type2_bits: 4,
        type2_values: [0, 1, 2, 3, 4, 0, 6, 0, 8, 9, 0, 0, 12, 0, 0, 0],
        type3_bits: 4,
        type3_values: [0, 1, 2, 3, 4, 0, 6, 0, 8, 9, 0, 0, 12, 0, 0, 0],
        detectors: 4,
    },
];

impl Protocol {
    /// Looks up a protocol by its index 0..=6.
    pub fn get(index: i64) -> Result<&'static Protocol, FormatError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| PROTOCOLS.get(i))
            .ok_or_else(|| FormatError::Invalid {
                what: "protocol",
                detail: format!("{index} is not a protocol index; use 0 to 6 (0 service, 1 BBM92)"),
            })
    }
}

/// Header of a type-2 file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Type2Header {
    /// Whether the epoch is extended (tag 0x102) rather than local (tag 2).
    pub extended: bool,
    /// Epoch number.
    pub epoch: u32,
    /// Number of events.
    pub length: u32,
    /// Width `T` of the time-difference field in bits.
    pub time_order: u32,
    /// Width `D` of the per-event value in bits.
    pub base_bits: u32,
    /// Protocol index.
    pub protocol: i32,
}

impl Type2Header {
    /// Returns the header tag, 2 or 0x102.
    pub fn tag(&self) -> i32 {
        make_tag(FILE_TYPE, self.extended)
    }

    /// Serialises the 24-byte header.
    pub fn to_bytes(&self) -> [u8; HEADER_BYTES] {
        let fields = [
            self.tag() as u32,
            self.epoch,
            self.length,
            self.time_order,
            self.base_bits,
            self.protocol as u32,
        ];
        let mut out = [0u8; HEADER_BYTES];
        for (i, f) in fields.iter().enumerate() {
            out[4 * i..4 * i + 4].copy_from_slice(&f.to_le_bytes());
        }
        out
    }
}

/// A type-2 file in memory: header and packed data words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type2File {
    pub header: Type2Header,
    /// Packed entries, MSB first in each word.
    pub words: Vec<u32>,
}

/// Events decoded from a type-2 file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Type2Events {
    /// Event times in ticks of 1/8 ns: `(epoch << 32)` plus the running sum of the
    /// differences. Times equal the chopper's input, except that an event less than 2 ticks
    /// after the previous decoded time decodes at 2 ticks after it (0 and 1 are reserved
    /// codes). A file from the reference chopper sends a 1-tick difference as 3, and the
    /// rest of that epoch then decodes 2 ticks late.
    pub times: Vec<u64>,
    /// Per-event values of `D` bits (basis bits for protocol 1).
    pub values: Vec<u8>,
    /// Time differences as stored, in ticks.
    pub differences: Vec<u32>,
}

impl Type2File {
    /// Parses the header and data words; checks the tag and that the data are whole words.
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        const WHAT: &str = "type-2 file";
        let (fields, data) = header_fields::<6>(bytes, WHAT)?;
        let extended = check_tag(fields[0] as i32, FILE_TYPE, WHAT)?;
        let header = Type2Header {
            extended,
            epoch: fields[1],
            length: fields[2],
            time_order: fields[3],
            base_bits: fields[4],
            protocol: fields[5] as i32,
        };
        let words = words_from_le_bytes(data, "type-2 data")?;
        Ok(Type2File { header, words })
    }

    /// Serialises header and data.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_BYTES + 4 * self.words.len());
        out.extend_from_slice(&self.header.to_bytes());
        extend_le_bytes(&mut out, &self.words);
        out
    }

    /// Decodes the events up to the end entry.
    ///
    /// Rejects widths no decoder can read (`T` outside 2..=31, `D` above 8, `T + D` above
    /// 32), a missing end entry, non-zero bits after it, and a count that differs from a
    /// non-zero header length.
    pub fn decode(&self) -> Result<Type2Events, FormatError> {
        decode(&self.header, &self.words)
    }
}

/// Decodes the packed words of a type-2 file with the given header.
pub fn decode(header: &Type2Header, words: &[u32]) -> Result<Type2Events, FormatError> {
    let (t, d) = (header.time_order, header.base_bits);
    let invalid = |detail: String| FormatError::Invalid {
        what: "type-2 file",
        detail: format!("epoch {:08x}: {detail}", header.epoch),
    };
    if !(2..=31).contains(&t) || d > 8 || t + d > 32 {
        return Err(invalid(format!(
            "time order {t} and base bits {d} cannot be decoded; need 2 <= T <= 31, D <= 8 and T + D <= 32"
        )));
    }
    let mut reader = BitReader::new(words);
    let capacity = (header.length as usize).min(words.len() * 32 / (t + d) as usize);
    let mut events = Type2Events {
        times: Vec::with_capacity(capacity),
        values: Vec::with_capacity(capacity),
        differences: Vec::with_capacity(capacity),
    };
    let mut time = u64::from(header.epoch) << 32;
    let truncated = |n: usize| {
        invalid(format!(
            "data end after {n} events without the end entry; the file is truncated"
        ))
    };
    loop {
        let n = events.times.len();
        let field = reader.get(t).ok_or_else(|| truncated(n))?;
        if field == 1 {
            let value = reader.get(d).ok_or_else(|| truncated(n))?;
            if value != 0 {
                return Err(invalid(format!(
                    "end entry after {n} events carries value {value}, expected 0"
                )));
            }
            break;
        }
        let diff = if field == 0 {
            reader.get(32).ok_or_else(|| truncated(n))?
        } else {
            field
        };
        let value = reader.get(d).ok_or_else(|| truncated(n))?;
        time = time.wrapping_add(u64::from(diff));
        events.times.push(time);
        events.values.push(value as u8);
        events.differences.push(diff);
    }
    let rest = reader.remaining();
    if rest >= 32 || reader.get(rest as u32) != Some(0) {
        return Err(invalid(format!(
            "{rest} bits follow the end entry, expected at most 31 zero padding bits"
        )));
    }
    let n = events.times.len();
    if header.length != 0 && n != header.length as usize {
        return Err(invalid(format!(
            "header length is {} but the data hold {n} events",
            header.length
        )));
    }
    Ok(events)
}

/// Streaming type-2 encoder with the exact bit output of the reference chopper.
///
/// For `T <= 31` and `T + D <= 32` this is a plain MSB-first bit writer. Outside that range
/// the reference's 32-bit shifts take their count modulo 32 (x86 semantics); this encoder
/// reproduces that so that files stay byte-identical, but such files cannot be decoded.
#[derive(Debug, Clone)]
pub struct Type2Encoder {
    time_order: u32,
    base_bits: u32,
    /// `2^T - 1` with the shift count taken modulo 32.
    mask: u32,
    /// Full words in `words[..used]`. The words after them are scratch space that
    /// [`Type2Encoder::push_packed`] writes ahead into, kept between packets so that it
    /// is zeroed only when it grows.
    words: Vec<u32>,
    used: usize,
    acc: u32,
    /// Free bits in `acc`; signed because degenerate widths can drive it below zero.
    free: i32,
    count: u32,
}

#[inline]
fn shl32(v: u32, count: i32) -> u32 {
    v.wrapping_shl(count as u32)
}

#[inline]
fn shr32(v: u32, count: i32) -> u32 {
    v.wrapping_shr(count as u32)
}

impl Type2Encoder {
    /// Creates an encoder for time order `T` and `D` base bits.
    pub fn new(time_order: u32, base_bits: u32) -> Self {
        let mut e = Type2Encoder {
            time_order: 0,
            base_bits: 0,
            mask: 0,
            words: Vec::new(),
            used: 0,
            acc: 0,
            free: 32,
            count: 0,
        };
        e.reset(time_order, base_bits);
        e
    }

    /// Starts a new packet, keeping the allocated buffer.
    pub fn reset(&mut self, time_order: u32, base_bits: u32) {
        self.time_order = time_order;
        self.base_bits = base_bits;
        self.mask = shl32(1, time_order as i32).wrapping_sub(1);
        self.used = 0;
        self.acc = 0;
        self.free = 32;
        self.count = 0;
    }

    /// Time order `T` of the current packet.
    pub fn time_order(&self) -> u32 {
        self.time_order
    }

    /// Number of events pushed since the last reset.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Returns whether no event was pushed since the last reset.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    #[inline]
    fn push_word(&mut self, word: u32) {
        match self.words.get_mut(self.used) {
            Some(slot) => *slot = word,
            None => self.words.push(word),
        }
        self.used += 1;
    }

    #[inline]
    fn put(&mut self, value: u32, width: i32) {
        if self.free >= width {
            self.acc |= shl32(value, self.free - width);
            self.free -= width;
            if self.free == 0 {
                self.push_word(self.acc);
                self.acc = 0;
                self.free = 32;
            }
        } else {
            let spill = width - self.free;
            self.acc |= shr32(value, spill);
            self.push_word(self.acc);
            self.free = 32 - spill;
            self.acc = shl32(value, self.free);
        }
    }

    /// Appends one event: time difference `diff` in ticks (at least 2 for a decodable
    /// file) and its `D`-bit value.
    #[inline]
    pub fn push(&mut self, diff: u32, value: u32) {
        let low = diff & self.mask;
        if diff != low {
            // Escape: the bits of `diff` above the low `T` go out as one 32-bit field, so
            // with the normal entry below the stream reads T zeros, 32-bit diff, value.
            let high = shr32(diff, self.time_order as i32);
            if self.free == 32 {
                self.push_word(high);
            } else {
                self.acc |= shr32(high, 32 - self.free);
                self.push_word(self.acc);
                self.acc = shl32(high, self.free);
            }
        }
        let width = (self.time_order + self.base_bits) as i32;
        self.put(shl32(low, self.base_bits as i32) | value, width);
        self.count += 1;
    }

    /// Appends many events, each given as `(diff << D) | value` (see
    /// [`Type2Encoder::packed_event`]). Gives the same bits as calling
    /// [`Type2Encoder::push`] for each event, faster.
    pub fn push_packed(&mut self, events: &[u64]) {
        let (t, d) = (self.time_order, self.base_bits);
        let width = t + d;
        if t > 31 || width > 32 || width == 0 {
            // Degenerate widths: only the word-level emulation gives the reference's bits.
            for &event in events {
                self.push((event >> d) as u32, (event & ((1 << d) - 1)) as u32);
            }
            return;
        }
        // An escape is 32 bits longer than a normal entry.
        let max_bits = events.len() * (width as usize + 32);
        let mut bits = PackedBits::new(&mut self.words, self.used, self.acc, self.free, max_bits);
        let max_normal = (1u64 << width) - 1;
        let mut rest = events;
        if 2 * width <= 32 {
            // Two normal entries go in as one field of 2 (T + D) bits.
            let pairs = events.chunks_exact(2);
            rest = pairs.remainder();
            for pair in pairs {
                let (first, second) = (pair[0], pair[1]);
                if first | second > max_normal {
                    bits.put_event(first, t, d, max_normal);
                    bits.put_event(second, t, d, max_normal);
                } else {
                    bits.put((first << width) | second, 2 * width);
                }
            }
        }
        for &event in rest {
            bits.put_event(event, t, d, max_normal);
        }
        (self.used, self.acc, self.free) = bits.finish();
        self.count += events.len() as u32;
    }

    /// Returns an event as [`Type2Encoder::push_packed`] takes it: the time difference
    /// `diff` in ticks above the `D`-bit `value`.
    #[inline]
    pub fn packed_event(diff: u32, value: u32, base_bits: u32) -> u64 {
        (u64::from(diff) << base_bits) | u64::from(value)
    }

    /// Appends the end entry and the padding; returns the packed words.
    pub fn finish(&mut self) -> &[u32] {
        let width = (self.time_order + self.base_bits) as i32;
        self.put(shl32(1, self.base_bits as i32), width);
        if self.free < 32 {
            self.push_word(self.acc);
            self.acc = 0;
            self.free = 32;
        }
        &self.words[..self.used]
    }
}

/// Bit writer of [`Type2Encoder::push_packed`] with its state in registers.
///
/// `acc` contains the unwritten bits left-aligned at bit 63 and `filled` counts them. It
/// stays below 32 between fields, so a field of up to 32 bits always fits. Every field
/// stores the top word of `acc` at `pos` and moves `pos` on only when that word is full,
/// which needs no branch, so `words` must have room for the partial word after the bits.
struct PackedBits<'a> {
    words: &'a mut [u32],
    acc: u64,
    filled: u32,
    pos: usize,
}

impl<'a> PackedBits<'a> {
    /// Continues after the full words `words[..used]` and the partial word `acc` with
    /// `free` bits left, first growing `words` to hold at most `bits` more bits.
    fn new(words: &'a mut Vec<u32>, used: usize, acc: u32, free: i32, bits: usize) -> Self {
        let filled = (32 - free) as u32;
        let needed = used + (filled as usize + bits) / 32 + 1;
        if words.len() < needed {
            words.resize(needed, 0);
        }
        PackedBits {
            words,
            acc: u64::from(acc) << 32,
            filled,
            pos: used,
        }
    }

    /// Appends the low `bits` bits of `value` (1..=32; higher bits must be zero).
    #[inline(always)]
    fn put(&mut self, value: u64, bits: u32) {
        self.acc |= value << (64 - self.filled - bits);
        self.filled += bits;
        self.flush();
    }

    /// Stores the top word of `acc` and moves on past it if it is full.
    #[inline(always)]
    fn flush(&mut self) {
        self.words[self.pos] = (self.acc >> 32) as u32;
        self.pos += (self.filled >> 5) as usize;
        self.acc <<= self.filled & 32;
        self.filled &= 31;
    }

    /// Appends one event `(diff << d) | value`, as an escape if its difference needs
    /// more than `t` bits, that is if the event exceeds `max_normal`.
    #[inline(always)]
    fn put_event(&mut self, event: u64, t: u32, d: u32, max_normal: u64) {
        if event <= max_normal {
            self.put(event, t + d);
            return;
        }
        // Escape: T zero bits, the 32-bit difference, then the value. The zero bits are
        // already in `acc`, so they only need counting.
        self.filled += t;
        self.flush();
        self.put(event >> d, 32);
        if d > 0 {
            self.put(event & ((1 << d) - 1), d);
        }
    }

    /// Returns the number of full words, the partial word and its free bits.
    fn finish(self) -> (usize, u32, i32) {
        (self.pos, (self.acc >> 32) as u32, 32 - self.filled as i32)
    }
}

/// Encodes events of one epoch into a type-2 file.
///
/// `times` are ticks of 1/8 ns inside `epoch` (their upper bits must equal `epoch`'s low
/// 17 bits), strictly increasing and at least 2 ticks apart (and at least 2 ticks after the
/// epoch start), because differences 0 and 1 are reserved codes. `values` are the `D`-bit
/// values, where `D` is the protocol's type-2 width.
pub fn encode(
    epoch: u32,
    extended: bool,
    time_order: u32,
    protocol: u8,
    times: &[u64],
    values: &[u8],
) -> Result<Vec<u8>, FormatError> {
    let proto = Protocol::get(i64::from(protocol))?;
    let d = proto.type2_bits;
    let invalid = |detail: String| FormatError::Invalid {
        what: "type-2 input",
        detail,
    };
    if times.len() != values.len() {
        return Err(invalid(format!(
            "{} times but {} values",
            times.len(),
            values.len()
        )));
    }
    if !(2..=31).contains(&time_order) || time_order + d > 32 {
        return Err(invalid(format!(
            "time order {time_order} with {d} base bits is not decodable; use 2..={}",
            (32 - d).min(31)
        )));
    }
    let epoch17 = u64::from(epoch & 0x1_FFFF);
    let mut encoder = Type2Encoder::new(time_order, d);
    let mut previous = 0u64;
    for (i, (&t, &v)) in times.iter().zip(values).enumerate() {
        if (t >> 32) & 0x1_FFFF != epoch17 {
            return Err(invalid(format!(
                "event {i} at tick {t:#x} is not in epoch {epoch:08x}"
            )));
        }
        let offset = t & 0xFFFF_FFFF;
        if offset < previous + 2 {
            return Err(invalid(format!(
                "event {i} at offset {offset:#x} is less than 2 ticks after the previous one at {previous:#x}; times must increase by at least 2"
            )));
        }
        if u32::from(v) >> d != 0 {
            return Err(invalid(format!(
                "value {v} of event {i} does not fit in {d} base bits"
            )));
        }
        encoder.push((offset - previous) as u32, u32::from(v));
        previous = offset;
    }
    let header = Type2Header {
        extended,
        epoch,
        length: times.len() as u32,
        time_order,
        base_bits: d,
        protocol: i32::from(protocol),
    };
    let file = Type2File {
        header,
        words: encoder.finish().to_vec(),
    };
    Ok(file.to_bytes())
}

/// Reads and parses a type-2 file (the data stay packed; call [`Type2File::decode`]).
pub fn read(path: &Path) -> Result<Type2File, FormatError> {
    let bytes = read_file(path)?;
    Type2File::parse(&bytes).map_err(|e| with_path(e, path))
}

/// Reads and decodes a type-2 file.
pub fn read_events(path: &Path) -> Result<(Type2Header, Type2Events), FormatError> {
    let file = read(path)?;
    let events = file.decode().map_err(|e| with_path(e, path))?;
    Ok((file.header, events))
}

/// Writes a type-2 file atomically (temporary file, then rename).
pub fn write(path: &Path, file: &Type2File) -> Result<(), FormatError> {
    write_atomic(path, &file.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn words(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// The worked example of the format description: protocol 1, T = 17, with one escape.
    #[test]
    fn worked_example_protocol_1() {
        let mut e = Type2Encoder::new(17, 1);
        e.push(0x1000, 0);
        e.push(3, 0);
        e.push(0x2EFFF, 1);
        e.push(0x10, 1);
        assert_eq!(
            e.finish(),
            &[0x0800_0000, 0x6000_0000, 0x177f_fc00, 0x2100_0080]
        );
    }

    #[test]
    fn worked_example_protocol_0() {
        let mut e = Type2Encoder::new(17, 4);
        e.push(0x1000, 1);
        e.push(3, 4);
        e.push(0x2EFFF, 8);
        e.push(0x10, 2);
        assert_eq!(
            e.finish(),
            &[
                0x0800_0800,
                0x0d00_0000,
                0x005d_fff0,
                0x0010_2000,
                0x0800_0000
            ]
        );
    }

    #[test]
    fn decode_reads_escape_and_end() {
        let header = Type2Header {
            extended: false,
            epoch: 0x42,
            length: 4,
            time_order: 17,
            base_bits: 1,
            protocol: 1,
        };
        let ev = decode(
            &header,
            &[0x0800_0000, 0x6000_0000, 0x177f_fc00, 0x2100_0080],
        )
        .unwrap();
        assert_eq!(ev.differences, vec![0x1000, 3, 0x2EFFF, 0x10]);
        assert_eq!(ev.values, vec![0, 0, 1, 1]);
        assert_eq!(ev.times[3], (0x42 << 32) + 0x1000 + 3 + 0x2EFFF + 0x10);
    }

    #[test]
    fn header_layout() {
        let bytes = encode(0x42, true, 17, 1, &[(0x42 << 32) | 5], &[1]).unwrap();
        assert_eq!(words(&bytes[..24]), vec![0x102, 0x42, 1, 17, 1, 1]);
    }

    #[test]
    fn degenerate_width_is_not_decodable() {
        let header = Type2Header {
            extended: false,
            epoch: 1,
            length: 1,
            time_order: 32,
            base_bits: 1,
            protocol: 1,
        };
        let err = decode(&header, &[0, 0, 0]).unwrap_err();
        assert!(err.to_string().contains("cannot be decoded"), "{err}");
    }

    #[test]
    fn missing_end_entry_is_truncation() {
        let bytes = encode(
            0x42,
            false,
            17,
            1,
            &[(0x42 << 32) | 5, (0x42 << 32) | 9],
            &[1, 0],
        )
        .unwrap();
        let mut file = Type2File::parse(&bytes).unwrap();
        file.words.pop();
        let err = file.decode().unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
    }

    #[test]
    fn length_mismatch_is_rejected() {
        let bytes = encode(0x42, false, 17, 1, &[(0x42 << 32) | 5], &[1]).unwrap();
        let mut file = Type2File::parse(&bytes).unwrap();
        file.header.length = 2;
        let err = file.decode().unwrap_err();
        assert!(err.to_string().contains("header length is 2"), "{err}");
    }

    #[test]
    fn wrong_tag_and_short_header_are_rejected() {
        let mut bytes = encode(0x42, false, 17, 1, &[(0x42 << 32) | 5], &[1]).unwrap();
        assert!(Type2File::parse(&bytes[..20]).is_err());
        bytes[0] = 3;
        let err = Type2File::parse(&bytes).unwrap_err();
        assert!(err.to_string().contains("not a type-2"), "{err}");
    }

    #[test]
    fn encode_rejects_reserved_differences() {
        let err = encode(0x42, false, 17, 1, &[(0x42 << 32) | 1], &[0]).unwrap_err();
        assert!(err.to_string().contains("at least 2"), "{err}");
    }

    fn stream() -> impl Strategy<Value = (u32, u8, Vec<(u32, u8)>)> {
        (2u32..=31, 0u8..=6).prop_flat_map(|(t, p)| {
            let d = PROTOCOLS[p as usize].type2_bits;
            let t = t.min(32 - d);
            // Gaps mix small steps, steps near 2^T and long escapes.
            let gap = prop_oneof![
                2u32..64,
                (1u32 << t).saturating_sub(2)..=(1u32 << t).saturating_add(2),
                0x100_0000u32..0x2000_0000,
            ];
            let value = 0u8..=((1u16 << d) - 1) as u8;
            (
                Just(t),
                Just(p),
                prop::collection::vec((gap, value), 0..300),
            )
        })
    }

    proptest! {
        #[test]
        fn push_packed_equals_push(
            t in 2u32..=33,
            d in 0u32..=4,
            entries in prop::collection::vec((prop_oneof![2u32..1000, 2u32..=u32::MAX], 0u32..16), 0..300),
            split in 0usize..300,
        ) {
            let entries: Vec<(u32, u32)> = entries.into_iter().map(|(diff, v)| (diff, v & ((1 << d) - 1))).collect();
            let packed: Vec<u64> = entries.iter().map(|&(diff, v)| Type2Encoder::packed_event(diff, v, d)).collect();
            let split = split.min(entries.len());
            let mut one = Type2Encoder::new(t, d);
            for &(diff, v) in &entries {
                one.push(diff, v);
            }
            let mut run = Type2Encoder::new(t, d);
            run.push_packed(&packed[..split]);
            run.push_packed(&packed[split..]);
            prop_assert_eq!(one.len(), run.len());
            let expected = one.finish().to_vec();
            prop_assert_eq!(&expected[..], run.finish());
        }

        #[test]
        fn decode_inverts_encode((t, p, entries) in stream(), epoch in any::<u32>()) {
            let mut times = Vec::new();
            let mut values = Vec::new();
            let mut offset = 0u64;
            for (gap, v) in entries {
                offset += u64::from(gap.max(2));
                if offset >= 1 << 32 {
                    break;
                }
                times.push((u64::from(epoch & 0x1_FFFF) << 32) | offset);
                values.push(v);
            }
            let bytes = encode(epoch, true, t, p, &times, &values).unwrap();
            let ev = Type2File::parse(&bytes).unwrap().decode().unwrap();
            let high = (u64::from(epoch) >> 17) << 49;
            let expected: Vec<u64> = times.iter().map(|&x| x | high).collect();
            prop_assert_eq!(ev.times, expected);
            prop_assert_eq!(ev.values, values);
        }
    }
}
