//! Wire format of the reconciliation protocol, version 2.
//!
//! Every message is `header (24 bytes) | payload | CRC-32 (4 bytes)`, all integers
//! little-endian:
//!
//! | offset | field | meaning |
//! |---|---|---|
//! | 0 | 4 bytes `QKDR` | magic |
//! | 4 | u8 | protocol version, 2 |
//! | 5 | u8 | message kind ([`Kind`]) |
//! | 6 | u16 | flags, must be 0 |
//! | 8 | u64 | block id |
//! | 16 | u32 | sequence number of this message within its block and direction, from 0 |
//! | 20 | u32 | payload length in bytes |
//!
//! The CRC-32 (IEEE 802.3 polynomial) covers header and payload. It catches corruption and
//! truncation; authenticity is the classical channel's job (mutual TLS). Payload layouts
//! are in docs/reconciliation.md; every decoder checks the exact length.

use crate::bits::{pack_flags, unpack_flags, BitVec};
use crate::cascade::{ParityRange, ParityRequest};

pub const MAGIC: [u8; 4] = *b"QKDR";
/// Version 2 replaced the single open-pass field of a parity request by a list of passes,
/// so that half passes open in batches, and stopped disclosing the inferred last block
/// parity of every pass after the first.
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 24;
pub const TRAILER_LEN: usize = 4;
/// Largest payload accepted: 64 MiB, far above the Toeplitz seed of a 2^26-bit block.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Longest abort text accepted, in bytes.
pub const MAX_ABORT_TEXT: usize = 1024;

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Start = 1,
    ParityRequest = 2,
    ParityAnswer = 3,
    Verify = 4,
    Confirm = 5,
    Abort = 6,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Start,
            2 => Kind::ParityRequest,
            3 => Kind::ParityAnswer,
            4 => Kind::Verify,
            5 => Kind::Confirm,
            6 => Kind::Abort,
            _ => return None,
        })
    }
}

/// Why a block ended without a key. The numbers are the wire codes of an abort message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum DiscardReason {
    QberAboveLimit = 1,
    NoSecretKey = 2,
    VerificationFailed = 3,
    ProtocolError = 4,
    ConfigMismatch = 5,
    LengthMismatch = 6,
    Aborted = 7,
}

impl DiscardReason {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => DiscardReason::QberAboveLimit,
            2 => DiscardReason::NoSecretKey,
            3 => DiscardReason::VerificationFailed,
            4 => DiscardReason::ProtocolError,
            5 => DiscardReason::ConfigMismatch,
            6 => DiscardReason::LengthMismatch,
            7 => DiscardReason::Aborted,
            _ => return None,
        })
    }

    /// Short snake_case name, as used in logs and in Python.
    pub fn as_str(self) -> &'static str {
        match self {
            DiscardReason::QberAboveLimit => "qber_above_limit",
            DiscardReason::NoSecretKey => "no_secret_key",
            DiscardReason::VerificationFailed => "verification_failed",
            DiscardReason::ProtocolError => "protocol_error",
            DiscardReason::ConfigMismatch => "config_mismatch",
            DiscardReason::LengthMismatch => "length_mismatch",
            DiscardReason::Aborted => "aborted",
        }
    }
}

/// Parameters both peers must share; the responder compares them with its own.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedParams {
    pub eps_sec: f64,
    pub eps_cor: f64,
    pub qber_limit: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    /// Raw key bits of the block before the sample is removed.
    pub raw_bits: u64,
    /// The initiator's QBER estimate from earlier blocks (NaN: none).
    pub qber_estimate: f64,
    pub shuffle_seed: u64,
    pub sample_seed: u64,
    pub params: SharedParams,
    /// The initiator's values at the sample positions.
    pub sample: BitVec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verify {
    pub errors: u64,
    pub leak_ec: u64,
    pub final_bits: u64,
    pub hash_keys: [u64; 2],
    pub tag: [u64; 2],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confirm {
    pub tag: [u64; 2],
    pub final_bits: u64,
    pub pa_seed: BitVec,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    pub reason: DiscardReason,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Start(Start),
    ParityRequest(ParityRequest),
    ParityAnswer(Vec<bool>),
    Verify(Verify),
    Confirm(Confirm),
    Abort(Abort),
}

impl Body {
    pub fn kind(&self) -> Kind {
        match self {
            Body::Start(_) => Kind::Start,
            Body::ParityRequest(_) => Kind::ParityRequest,
            Body::ParityAnswer(_) => Kind::ParityAnswer,
            Body::Verify(_) => Kind::Verify,
            Body::Confirm(_) => Kind::Confirm,
            Body::Abort(_) => Kind::Abort,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub block_id: u64,
    pub seq: u32,
    pub body: Body,
}

/// Errors of decoding a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message of {len} bytes is shorter than the {min}-byte header and checksum")]
    TooShort { len: usize, min: usize },
    #[error("bad magic {found:02x?}: not a reconciliation message (expected \"QKDR\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported protocol version {found}: this peer speaks version {VERSION}; upgrade the older node")]
    Version { found: u8 },
    #[error("unknown message kind {found}")]
    UnknownKind { found: u8 },
    #[error("flags {found:#06x} are not zero")]
    Flags { found: u16 },
    #[error("payload length field says {declared} bytes, but the message carries {actual}")]
    Length { declared: usize, actual: usize },
    #[error("checksum mismatch: computed {computed:#010x}, message has {stored:#010x}; the message was corrupted or truncated")]
    Checksum { computed: u32, stored: u32 },
    #[error("invalid {kind:?} payload: {detail}")]
    Payload { kind: Kind, detail: String },
}

/// Returns the block id of a message whose header is at least present, even if the rest
/// fails to decode, so that the block it belongs to can be aborted.
pub fn peek_block_id(data: &[u8]) -> Option<u64> {
    if data.len() < HEADER_LEN || data[..4] != MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(data[8..16].try_into().ok()?))
}

/// CRC-32 (IEEE 802.3, reflected) with eight tables, eight bytes per step: the CONFIRM
/// message of a 10^6-bit block carries a 190 kB seed, checked on both sides.
fn crc32(data: &[u8]) -> u32 {
    static TABLES: std::sync::OnceLock<[[u32; 256]; 8]> = std::sync::OnceLock::new();
    let t = TABLES.get_or_init(|| {
        let mut t = [[0u32; 256]; 8];
        for (i, entry) in t[0].iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *entry = c;
        }
        for i in 0..256 {
            for k in 1..8 {
                let prev = t[k - 1][i];
                t[k][i] = t[0][(prev & 0xff) as usize] ^ (prev >> 8);
            }
        }
        t
    });
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        crc = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][c[4] as usize]
            ^ t[2][c[5] as usize]
            ^ t[1][c[6] as usize]
            ^ t[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = t[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let mut payload = Vec::new();
        encode_body(&self.body, &mut payload);
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(self.body.kind() as u8);
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.block_id.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        let crc = crc32(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(data: &[u8]) -> Result<Message, MessageError> {
        let min = HEADER_LEN + TRAILER_LEN;
        if data.len() < min {
            return Err(MessageError::TooShort {
                len: data.len(),
                min,
            });
        }
        let magic: [u8; 4] = data[..4].try_into().expect("4 bytes");
        if magic != MAGIC {
            return Err(MessageError::BadMagic { found: magic });
        }
        if data[4] != VERSION {
            return Err(MessageError::Version { found: data[4] });
        }
        let kind = Kind::from_u8(data[5]).ok_or(MessageError::UnknownKind { found: data[5] })?;
        let flags = u16::from_le_bytes([data[6], data[7]]);
        if flags != 0 {
            return Err(MessageError::Flags { found: flags });
        }
        let block_id = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
        let seq = u32::from_le_bytes(data[16..20].try_into().expect("4 bytes"));
        let declared = u32::from_le_bytes(data[20..24].try_into().expect("4 bytes")) as usize;
        let actual = data.len() - min;
        if declared != actual || declared > MAX_PAYLOAD {
            return Err(MessageError::Length { declared, actual });
        }
        let body_end = HEADER_LEN + declared;
        let stored = u32::from_le_bytes(data[body_end..].try_into().expect("4 bytes"));
        let computed = crc32(&data[..body_end]);
        if stored != computed {
            return Err(MessageError::Checksum { computed, stored });
        }
        let body = decode_body(kind, &data[HEADER_LEN..body_end])?;
        Ok(Message {
            block_id,
            seq,
            body,
        })
    }
}

fn encode_body(body: &Body, out: &mut Vec<u8>) {
    match body {
        Body::Start(s) => {
            out.extend_from_slice(&s.raw_bits.to_le_bytes());
            out.extend_from_slice(&s.qber_estimate.to_le_bytes());
            out.extend_from_slice(&s.shuffle_seed.to_le_bytes());
            out.extend_from_slice(&s.sample_seed.to_le_bytes());
            out.extend_from_slice(&s.params.eps_sec.to_le_bytes());
            out.extend_from_slice(&s.params.eps_cor.to_le_bytes());
            out.extend_from_slice(&s.params.qber_limit.to_le_bytes());
            out.extend_from_slice(&(s.sample.len() as u32).to_le_bytes());
            out.extend_from_slice(&s.sample.to_msb_bytes());
        }
        Body::ParityRequest(r) => {
            out.push(r.open.len() as u8);
            for &(pass, size) in &r.open {
                out.push(pass);
                out.extend_from_slice(&size.to_le_bytes());
            }
            out.extend_from_slice(&(r.ranges.len() as u32).to_le_bytes());
            for range in &r.ranges {
                out.push(range.pass);
                out.extend_from_slice(&range.start.to_le_bytes());
                out.extend_from_slice(&range.len.to_le_bytes());
            }
        }
        Body::ParityAnswer(bits) => {
            out.extend_from_slice(&(bits.len() as u32).to_le_bytes());
            out.extend_from_slice(&pack_flags(bits));
        }
        Body::Verify(v) => {
            for x in [
                v.errors,
                v.leak_ec,
                v.final_bits,
                v.hash_keys[0],
                v.hash_keys[1],
            ] {
                out.extend_from_slice(&x.to_le_bytes());
            }
            out.extend_from_slice(&v.tag[0].to_le_bytes());
            out.extend_from_slice(&v.tag[1].to_le_bytes());
        }
        Body::Confirm(c) => {
            out.extend_from_slice(&c.tag[0].to_le_bytes());
            out.extend_from_slice(&c.tag[1].to_le_bytes());
            out.extend_from_slice(&c.final_bits.to_le_bytes());
            out.extend_from_slice(&(c.pa_seed.len() as u64).to_le_bytes());
            out.extend_from_slice(&c.pa_seed.to_msb_bytes());
        }
        Body::Abort(a) => {
            let text = truncate_utf8(&a.detail, MAX_ABORT_TEXT);
            out.extend_from_slice(&(a.reason as u16).to_le_bytes());
            out.extend_from_slice(&(text.len() as u16).to_le_bytes());
            out.extend_from_slice(text.as_bytes());
        }
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Little-endian reader over a payload; every read checks the remaining length.
struct Reader<'a> {
    kind: Kind,
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn err(&self, detail: String) -> MessageError {
        MessageError::Payload {
            kind: self.kind,
            detail,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], MessageError> {
        if self.data.len() < n {
            return Err(self.err(format!("needs {n} more bytes, {} remain", self.data.len())));
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, MessageError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, MessageError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, MessageError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, MessageError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn f64(&mut self) -> Result<f64, MessageError> {
        Ok(f64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    /// Reads `count` bits packed MSB first and checks that padding bits are zero.
    fn bits(&mut self, count: usize) -> Result<BitVec, MessageError> {
        let bytes = self.take(count.div_ceil(8))?;
        if count % 8 != 0 {
            let pad_mask = 0xffu8 >> (count % 8);
            if bytes[bytes.len() - 1] & pad_mask != 0 {
                return Err(self.err("padding bits after the last bit are not zero".into()));
            }
        }
        Ok(BitVec::from_msb_bytes(bytes, count).expect("length checked"))
    }

    fn finish(self) -> Result<(), MessageError> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.data.len())))
        }
    }
}

fn decode_body(kind: Kind, data: &[u8]) -> Result<Body, MessageError> {
    let mut r = Reader { kind, data };
    let body = match kind {
        Kind::Start => {
            let raw_bits = r.u64()?;
            let qber_estimate = r.f64()?;
            let shuffle_seed = r.u64()?;
            let sample_seed = r.u64()?;
            let params = SharedParams {
                eps_sec: r.f64()?,
                eps_cor: r.f64()?,
                qber_limit: r.f64()?,
            };
            let count = r.u32()? as usize;
            if count as u64 > raw_bits {
                return Err(r.err(format!(
                    "sample of {count} bits exceeds the {raw_bits}-bit block"
                )));
            }
            let sample = r.bits(count)?;
            Body::Start(Start {
                raw_bits,
                qber_estimate,
                shuffle_seed,
                sample_seed,
                params,
                sample,
            })
        }
        Kind::ParityRequest => {
            let opened = r.u8()? as usize;
            let mut open = Vec::with_capacity(opened);
            for _ in 0..opened {
                open.push((r.u8()?, r.u32()?));
            }
            let count = r.u32()? as usize;
            if r.data.len() != count.saturating_mul(9) {
                return Err(r.err(format!(
                    "{count} ranges need {} bytes, {} present",
                    count.saturating_mul(9),
                    r.data.len()
                )));
            }
            let mut ranges = Vec::with_capacity(count);
            for _ in 0..count {
                ranges.push(ParityRange {
                    pass: r.u8()?,
                    start: r.u32()?,
                    len: r.u32()?,
                });
            }
            Body::ParityRequest(ParityRequest { open, ranges })
        }
        Kind::ParityAnswer => {
            let count = r.u32()? as usize;
            let packed = r.take(count.div_ceil(8))?;
            if count % 8 != 0 && packed[packed.len() - 1] & (0xffu8 >> (count % 8)) != 0 {
                return Err(r.err("padding bits after the last parity are not zero".into()));
            }
            Body::ParityAnswer(unpack_flags(packed, count))
        }
        Kind::Verify => Body::Verify(Verify {
            errors: r.u64()?,
            leak_ec: r.u64()?,
            final_bits: r.u64()?,
            hash_keys: [r.u64()?, r.u64()?],
            tag: [r.u64()?, r.u64()?],
        }),
        Kind::Confirm => {
            let tag = [r.u64()?, r.u64()?];
            let final_bits = r.u64()?;
            let seed_bits = r.u64()?;
            if seed_bits > (MAX_PAYLOAD as u64) * 8 {
                return Err(r.err(format!("seed of {seed_bits} bits is too long")));
            }
            let pa_seed = r.bits(seed_bits as usize)?;
            Body::Confirm(Confirm {
                tag,
                final_bits,
                pa_seed,
            })
        }
        Kind::Abort => {
            let code = r.u16()?;
            let reason = DiscardReason::from_u16(code)
                .ok_or_else(|| r.err(format!("unknown abort reason {code}")))?;
            let len = r.u16()? as usize;
            if len > MAX_ABORT_TEXT {
                return Err(r.err(format!(
                    "abort text of {len} bytes exceeds {MAX_ABORT_TEXT}"
                )));
            }
            let text = r.take(len)?;
            let detail = String::from_utf8(text.to_vec())
                .map_err(|_| r.err("abort text is not UTF-8".into()))?;
            Body::Abort(Abort { reason, detail })
        }
    };
    r.finish()?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Message> {
        let start = Start {
            raw_bits: 1000,
            qber_estimate: 0.03,
            shuffle_seed: 7,
            sample_seed: 9,
            params: SharedParams {
                eps_sec: 1e-10,
                eps_cor: 1e-10,
                qber_limit: 0.11,
            },
            sample: BitVec::from_bits(&[1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1]),
        };
        vec![
            Message {
                block_id: 5,
                seq: 0,
                body: Body::Start(start),
            },
            Message {
                block_id: 5,
                seq: 1,
                body: Body::ParityRequest(ParityRequest {
                    open: vec![(0, 64), (1, 256), (2, 0)],
                    ranges: vec![ParityRange {
                        pass: 0,
                        start: 3,
                        len: 17,
                    }],
                }),
            },
            Message {
                block_id: 5,
                seq: 2,
                body: Body::ParityAnswer(vec![true, false, true]),
            },
            Message {
                block_id: 5,
                seq: 3,
                body: Body::Verify(Verify {
                    errors: 1,
                    leak_ec: 2,
                    final_bits: 3,
                    hash_keys: [4, 5],
                    tag: [6, 7],
                }),
            },
            Message {
                block_id: 5,
                seq: 4,
                body: Body::Confirm(Confirm {
                    tag: [1, 2],
                    final_bits: 3,
                    pa_seed: BitVec::from_bits(&[1, 1, 0]),
                }),
            },
            Message {
                block_id: 5,
                seq: 5,
                body: Body::Abort(Abort {
                    reason: DiscardReason::QberAboveLimit,
                    detail: "QBER 0.15".into(),
                }),
            },
        ]
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        // The CRC-32 check value of "123456789", and a bytewise reference on odd lengths.
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 131 % 251) as u8).collect();
        for len in [0usize, 1, 7, 8, 9, 63, 1000] {
            let mut crc = !0u32;
            for &b in &data[..len] {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        0xedb8_8320 ^ (crc >> 1)
                    } else {
                        crc >> 1
                    };
                }
            }
            assert_eq!(crc32(&data[..len]), !crc, "{len} bytes");
        }
    }

    #[test]
    fn every_kind_round_trips() {
        for m in samples() {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn every_truncation_is_rejected() {
        for m in samples() {
            let bytes = m.encode();
            for cut in 0..bytes.len() {
                assert!(
                    Message::decode(&bytes[..cut]).is_err(),
                    "{:?} cut at {cut}",
                    m.body.kind()
                );
            }
        }
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        for m in samples() {
            let bytes = m.encode();
            for bit in 0..bytes.len() * 8 {
                let mut t = bytes.clone();
                t[bit / 8] ^= 1 << (bit % 8);
                assert!(
                    Message::decode(&t).is_err(),
                    "{:?} bit {bit}",
                    m.body.kind()
                );
            }
        }
    }

    #[test]
    fn header_errors_name_the_problem() {
        let mut bytes = samples()[0].encode();
        bytes[4] = 1;
        let err = Message::decode(&bytes).unwrap_err();
        assert!(err.to_string().contains("version 1"), "{err}");
        assert_eq!(peek_block_id(&bytes), Some(5));
        assert!(matches!(
            Message::decode(b"short"),
            Err(MessageError::TooShort { .. })
        ));
    }
}
