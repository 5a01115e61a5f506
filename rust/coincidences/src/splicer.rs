//! Final sifting on the low-count side (splicer): the type-4 file from the high-count side
//! selects entries of chopper's local type-3 file, which become the raw key.
//!
//! For the same epoch the output is bit for bit the raw key costream wrote on the other
//! side, up to measurement errors: in service mode (protocol 0) both hold the byte
//! `L pattern << 4 | H pattern`, in BBM92 mode (protocol 1) one bit per kept event.

use qkd_formats::bits::{extend_le_bytes, BitWriter};
use qkd_formats::type3::{Type3File, Type3Header};
use qkd_formats::type4::Type4File;

use crate::error::{CoincidenceError, Stream};
use crate::protocol::{Sift, SplicerProtocol};

/// Results of splicing one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplicedEpoch {
    pub epoch: u32,
    /// Entries of the raw key written.
    pub key_events: u32,
    /// Test events written to the type-5 output.
    pub tests: u32,
    /// Raw-key (type-3) file; written even when it has no entries.
    pub type3: Vec<u8>,
    /// Test-event (type-5) file, when requested.
    pub type5: Option<Vec<u8>>,
}

impl SplicedEpoch {
    /// Formats the reference's log line for verbosity `-V`; None for levels that print
    /// nothing.
    pub fn log_line(&self, verbosity: i32) -> Option<String> {
        let e = self.epoch;
        match verbosity {
            0 => Some(format!("{e:08x}\n")),
            1 => Some(format!("{e:08x}\t{}\n", self.key_events)),
            2 => Some(format!(
                "epoch: {e:08x}, final events: {}\n",
                self.key_events
            )),
            _ => None,
        }
    }
}

/// Splices epoch `epoch` from the bytes of chopper's type-3 file and the peer's type-4
/// file.
///
/// Both headers must carry `epoch` and the base bits of the protocol, and every type-4
/// index must point inside the type-3 file.
pub fn splice(
    epoch: u32,
    type3: &[u8],
    type4: &[u8],
    protocol: &SplicerProtocol,
    type5_output: bool,
) -> Result<SplicedEpoch, CoincidenceError> {
    let local = Type3File::parse(type3).map_err(|source| CoincidenceError::Format {
        stream: Stream::Type3,
        epoch,
        source,
    })?;
    let remote = Type4File::parse(type4).map_err(|source| CoincidenceError::Format {
        stream: Stream::Type4,
        epoch,
        source,
    })?;
    for (stream, found) in [
        (Stream::Type3, local.header.epoch),
        (Stream::Type4, remote.header.epoch),
    ] {
        if found != epoch {
            return Err(CoincidenceError::WrongEpoch {
                stream,
                expected: epoch,
                found,
            });
        }
    }
    for (stream, expected, found) in [
        (
            Stream::Type3,
            protocol.type3_in_bits,
            local.header.bits_per_entry,
        ),
        (Stream::Type4, protocol.type4_bits, remote.header.base_bits),
    ] {
        if found != expected {
            return Err(CoincidenceError::BaseBits {
                stream,
                epoch,
                protocol: protocol.index,
                expected,
                found,
            });
        }
    }

    let mut key = BitWriter::new();
    let mut test = BitWriter::new();
    let (mut key_events, mut tests) = (0u32, 0u32);
    for entry in &remote.entries {
        let value =
            *local
                .values
                .get(entry.index as usize)
                .ok_or(CoincidenceError::IndexOutOfRange {
                    epoch,
                    index: entry.index,
                    length: local.header.length,
                })?;
        match protocol.sift(value, entry.data) {
            Sift::Discard => {}
            Sift::Key { value, .. } => {
                key.put(u32::from(value), protocol.type3_out_bits);
                key_events += 1;
            }
            Sift::Test { value, .. } => {
                test.put(u32::from(value), protocol.type5_bits);
                tests += 1;
            }
        }
    }
    let extended = remote.header.extended;
    let type3 = bit_file(epoch, extended, key_events, protocol.type3_out_bits, key);
    let type5 = type5_output.then(|| bit_file(epoch, extended, tests, protocol.type5_bits, test));
    log::info!(
        "splicer wrote epoch {epoch:08x}: {key_events} raw-key entries from {} type-4 entries",
        remote.entries.len()
    );
    Ok(SplicedEpoch {
        epoch,
        key_events,
        tests,
        type3,
        type5,
    })
}

/// Builds a type-3 (or type-5, same layout) file from packed entries.
pub(crate) fn bit_file(
    epoch: u32,
    extended: bool,
    length: u32,
    bits: u32,
    data: BitWriter,
) -> Vec<u8> {
    let header = Type3Header {
        extended,
        epoch,
        length,
        bits_per_entry: bits,
    };
    let words = data.finish();
    let mut out = Vec::with_capacity(16 + 4 * words.len());
    out.extend_from_slice(&header.to_bytes());
    extend_le_bytes(&mut out, &words);
    out
}
