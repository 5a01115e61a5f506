//! Rate and QBER figures per epoch: detector counts of a raw event stream (as getrate
//! counts them) and the service-mode error matrix of a raw key (as the server's
//! service-mode evaluation and `diagnosis` count it, but in the correct bit order).

use qkd_formats::type3::Type3File;

use crate::error::{CoincidenceError, Stream};

/// Detector patterns counted by getrate, in its column order: detectors 1 to 4, then the
/// pairs 1+2, 2+3, 3+4 and 4+1.
pub const RATE_PATTERNS: [u8; 8] = [1, 2, 4, 8, 3, 6, 0xC, 9];

/// Event counts of one stretch of raw events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DetectorCounts {
    /// Events with a non-zero detector pattern.
    pub total: u64,
    /// Events whose pattern equals [`RATE_PATTERNS`]`[i]` exactly.
    pub patterns: [u64; 8],
}

/// Counts the detector patterns of raw event words (pattern in bits 3..0).
pub fn detector_counts(events: &[u64]) -> DetectorCounts {
    let mut histogram = [0u64; 16];
    for &word in events {
        histogram[(word & 0xF) as usize] += 1;
    }
    DetectorCounts {
        total: events.len() as u64 - histogram[0],
        patterns: RATE_PATTERNS.map(|p| histogram[usize::from(p)]),
    }
}

/// Correlation matrix of a service-mode raw key: rows are the low-count side's detector
/// (V, -45, H, +45), columns the high-count side's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServiceMatrix {
    pub counts: [[u64; 4]; 4],
    /// Entries where both sides had exactly one detector.
    pub valid: u64,
    /// Entries whose low-count side pattern was not a single detector.
    pub invalid_low: u64,
    /// Entries whose high-count side pattern was not a single detector.
    pub invalid_high: u64,
}

// Row and column order V, -45, H, +45 = detector bits 0, 1, 2, 3.
const V: usize = 0;
const MINUS: usize = 1;
const H: usize = 2;
const PLUS: usize = 3;

impl ServiceMatrix {
    /// Counts the 8-bit entries of a service-mode (protocol 0) raw-key file.
    pub fn from_type3(bytes: &[u8]) -> Result<ServiceMatrix, CoincidenceError> {
        let file = Type3File::parse(bytes).map_err(|source| CoincidenceError::Format {
            stream: Stream::Type3,
            epoch: 0,
            source,
        })?;
        if file.header.bits_per_entry != 8 {
            return Err(CoincidenceError::BaseBits {
                stream: Stream::Type3,
                epoch: file.header.epoch,
                protocol: 0,
                expected: 8,
                found: file.header.bits_per_entry,
            });
        }
        Ok(ServiceMatrix::from_entries(&file.values))
    }

    /// Counts service-mode entries `L pattern << 4 | H pattern`.
    pub fn from_entries(entries: &[u8]) -> ServiceMatrix {
        let detector = |p: u8| match p {
            1 => Some(V),
            2 => Some(MINUS),
            4 => Some(H),
            8 => Some(PLUS),
            _ => None,
        };
        let mut m = ServiceMatrix::default();
        for &entry in entries {
            match (detector(entry >> 4), detector(entry & 0xF)) {
                (Some(low), Some(high)) => {
                    m.counts[low][high] += 1;
                    m.valid += 1;
                }
                (None, high) => {
                    m.invalid_low += 1;
                    m.invalid_high += u64::from(high.is_none());
                }
                (Some(_), None) => m.invalid_high += 1,
            }
        }
        m
    }

    /// QBER of the H/V basis: same-detector pairs over all H/V pairs (the photon pairs
    /// are anti-correlated), 1.0 without events.
    pub fn qber_hv(&self) -> f64 {
        let c = &self.counts;
        ratio(c[V][V] + c[H][H], c[V][H] + c[H][V])
    }

    /// QBER of the diagonal basis, 1.0 without events.
    pub fn qber_diagonal(&self) -> f64 {
        let c = &self.counts;
        ratio(
            c[MINUS][MINUS] + c[PLUS][PLUS],
            c[MINUS][PLUS] + c[PLUS][MINUS],
        )
    }

    /// QBER over both bases, 1.0 without events.
    pub fn qber(&self) -> f64 {
        let c = &self.counts;
        ratio(
            c[V][V] + c[H][H] + c[MINUS][MINUS] + c[PLUS][PLUS],
            c[V][H] + c[H][V] + c[MINUS][PLUS] + c[PLUS][MINUS],
        )
    }
}

fn ratio(errors: u64, good: u64) -> f64 {
    if errors + good == 0 {
        1.0
    } else {
        errors as f64 / (errors + good) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_patterns_like_getrate() {
        let events = [0x10u64 | 1, 1, 2, 3, 0, 9, 0xF];
        let counts = detector_counts(&events);
        assert_eq!(counts.total, 6);
        assert_eq!(counts.patterns, [2, 1, 0, 0, 1, 0, 0, 1]);
    }

    #[test]
    fn service_matrix_splits_bases() {
        // L=V,H=H twice (good), L=V,H=V once (error), L=-,H=+ (good), invalid L.
        let entries = [0x14, 0x14, 0x11, 0x28, 0x34];
        let m = ServiceMatrix::from_entries(&entries);
        assert_eq!(m.counts[V][H], 2);
        assert_eq!(m.counts[V][V], 1);
        assert_eq!(m.valid, 4);
        assert_eq!(m.invalid_low, 1);
        assert!((m.qber_hv() - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.qber_diagonal(), 0.0);
        assert!((m.qber() - 0.25).abs() < 1e-12);
    }

    #[test]
    fn empty_matrix_reports_full_error() {
        assert_eq!(ServiceMatrix::default().qber(), 1.0);
    }
}
