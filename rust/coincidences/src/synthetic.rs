//! Synthetic epoch files of a two-node link, for tests and benchmarks that must not
//! depend on recorded data.
//!
//! Each epoch holds photon pairs seen by both nodes plus uncorrelated background on
//! each side. Both nodes pick a BB84 basis per pair; in equal bases their detectors are
//! anti-correlated (V with H, -45 with +45), in different bases the low-count side's
//! detector is random. The low-count side's clock reads `t_H + offset` (ticks), with
//! a jitter of up to ±2 ticks. Pairs are kept away from the epoch edges so both events
//! of a pair fall into the same epoch.

use qkd_formats::raw::make_word;
use qkd_formats::type2::{self, PROTOCOLS};
use qkd_formats::{type1, type3, FormatError};

/// Files of one epoch on both sides.
#[derive(Debug, Clone)]
pub struct LinkEpoch {
    pub epoch: u32,
    /// High-count side's type-1 file.
    pub type1: Vec<u8>,
    /// Low-count side's type-2 file.
    pub type2: Vec<u8>,
    /// Low-count side's type-3 file (chopper's local results).
    pub type3: Vec<u8>,
    /// Number of events in the type-1 file.
    pub type1_events: usize,
    /// Number of events in the type-2 file.
    pub type2_events: usize,
}

/// Parameters of the synthetic link.
#[derive(Debug, Clone)]
pub struct SyntheticLink {
    /// Photon pairs per epoch.
    pub pairs: usize,
    /// Background events per epoch on the high-count side.
    pub background_high: usize,
    /// Background events per epoch on the low-count side.
    pub background_low: usize,
    /// Clock offset `t_L - t_H` in ticks, below 2^20 in magnitude.
    pub offset: i64,
    /// Chopper protocol of the type-2 and type-3 files (0 service, 1 BBM92).
    pub protocol: u8,
    /// Seed of the generator; the same seed gives the same files.
    pub seed: u64,
}

const SINGLES: [u8; 4] = [1, 2, 4, 8];
// Partner detector in the same basis: V <-> H, -45 <-> +45.
const PARTNER: [u8; 16] = [0, 4, 8, 0, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
/// Distance in ticks kept between pairs and the epoch edges; also the largest offset.
const EDGE: u64 = 1 << 20;
/// Width of the type-2 time field.
const TYPE2_TIME_ORDER: u32 = 17;

/// A small xorshift generator: enough randomness for test data, no dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl SyntheticLink {
    /// Builds the files of `epoch` (a plain 17-bit epoch).
    pub fn epoch(&self, epoch: u32) -> Result<LinkEpoch, FormatError> {
        if self.offset.unsigned_abs() >= EDGE {
            return Err(FormatError::Invalid {
                what: "synthetic link offset",
                detail: format!("{} ticks; use less than 2^20 in magnitude", self.offset),
            });
        }
        let mut rng = XorShift(self.seed ^ (u64::from(epoch) << 20) ^ 0x9e37_79b9_7f4a_7c15);
        let start = u64::from(epoch) << 32;
        let span = (1u64 << 32) - 2 * EDGE;
        let mut high: Vec<(u64, u8)> = Vec::new();
        let mut low: Vec<(u64, u8)> = Vec::new();
        for _ in 0..self.pairs {
            let t = start + EDGE + rng.below(span);
            let p_high = SINGLES[rng.below(4) as usize];
            let same_basis = rng.below(2) == 0;
            let p_low = if same_basis {
                PARTNER[usize::from(p_high)]
            } else {
                // The other basis: -45/+45 for V/H and V/H for the diagonal detectors.
                let other = if p_high & 0b0101 != 0 { [2, 8] } else { [1, 4] };
                other[rng.below(2) as usize]
            };
            let jitter = rng.below(5) as i64 - 2;
            high.push((t, p_high));
            low.push(((t as i64 + self.offset + jitter) as u64, p_low));
        }
        for _ in 0..self.background_high {
            high.push((start + rng.below(1 << 32), SINGLES[rng.below(4) as usize]));
        }
        for _ in 0..self.background_low {
            let t = start + 2 + rng.below((1 << 32) - 2);
            low.push((t, SINGLES[rng.below(4) as usize]));
        }
        high.sort_unstable();
        high.dedup_by_key(|e| e.0);
        low.sort_unstable();
        // Type-2 times must be at least 2 ticks apart.
        let mut last = start;
        low.retain(|&(t, _)| {
            let keep = t >= last + 2;
            if keep {
                last = t;
            }
            keep
        });

        let words: Vec<u64> = high
            .iter()
            .map(|&(t, p)| make_word(t, u16::from(p)))
            .collect();
        let protocol = &PROTOCOLS[usize::from(self.protocol)];
        let times: Vec<u64> = low.iter().map(|e| e.0).collect();
        let values2: Vec<u8> = low
            .iter()
            .map(|e| protocol.type2_values[usize::from(e.1)])
            .collect();
        let values3: Vec<u8> = low
            .iter()
            .map(|e| protocol.type3_values[usize::from(e.1)])
            .collect();
        Ok(LinkEpoch {
            epoch,
            type1: type1::encode(epoch, false, &words),
            type2: type2::encode(
                epoch,
                false,
                TYPE2_TIME_ORDER,
                self.protocol,
                &times,
                &values2,
            )?,
            type3: type3::encode(epoch, false, protocol.type3_bits, &values3)?,
            type1_events: words.len(),
            type2_events: times.len(),
        })
    }
}
