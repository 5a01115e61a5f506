//! Sifting rules of costream and splicer per protocol: which coincidences become key or
//! test events, and what each side writes for them.
//!
//! Detector patterns are 4 bits (bit 0 = V, bit 1 = -45°, bit 2 = H, bit 3 = +45° in the
//! BB84 variants). On the high-count side the local pattern `p1` comes from the type-1
//! event and the remote data `p2` from the type-2 event.

use crate::CoincidenceError;

/// What costream does with one coincidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sift {
    /// Counted as a coincidence, nothing written.
    Discard,
    /// A key event: `value` goes to the raw key (type-3), `data` to the type-4 entry.
    Key { value: u8, data: u8 },
    /// A test event: `value` goes to the type-5 file, `data` to the type-4 entry.
    Test { value: u8, data: u8 },
}

/// Bit widths and sifting table of one protocol on the high-count side.
#[derive(Debug, Clone)]
pub struct CostreamProtocol {
    /// Protocol index 0..=6.
    pub index: u8,
    /// Bits per raw-key (type-3) entry.
    pub type3_bits: u32,
    /// Data bits per type-4 entry.
    pub type4_bits: u32,
    /// Bits per test (type-5) entry; 0 when the protocol has no test events.
    pub type5_bits: u32,
    /// Base bits a type-2 file of this protocol must announce.
    pub type2_bits: u32,
    /// Outcome per `p1 | p2 << 4`.
    table: [Sift; 256],
}

const SINGLES: [u8; 4] = [1, 2, 4, 8];

impl CostreamProtocol {
    /// Builds the table of protocol `index` (0 service, 1 BBM92, 2 copy of 0, 3 and 4
    /// device-independent, 5 time-only BB84, 6 service with single clicks only).
    pub fn new(index: i64) -> Result<CostreamProtocol, CoincidenceError> {
        let (type3_bits, type4_bits, type5_bits, type2_bits) = match index {
            0 | 2 | 6 => (8, 4, 0, 4),
            1 => (1, 0, 0, 1),
            3 => (1, 3, 4, 3),
            4 => (1, 3, 2, 1),
            5 => (2, 0, 0, 0),
            _ => {
                return Err(CoincidenceError::InvalidOption {
                    option: "protocol",
                    detail: format!("{index} is not a protocol; use 0 to 6 (0 service, 1 BBM92)"),
                })
            }
        };
        let mut table = [Sift::Discard; 256];
        for p2 in 0u8..16 {
            for p1 in 0u8..16 {
                table[usize::from(p1 | p2 << 4)] = decide(index as u8, p1, p2);
            }
        }
        Ok(CostreamProtocol {
            index: index as u8,
            type3_bits,
            type4_bits,
            type5_bits,
            type2_bits,
            table,
        })
    }

    /// Returns the outcome for local pattern `p1` and remote data `p2` (below 16).
    #[inline]
    pub fn sift(&self, p1: u8, p2: u8) -> Sift {
        self.table[usize::from((p1 & 0xF) | (p2 << 4))]
    }
}

fn decide(protocol: u8, p1: u8, p2: u8) -> Sift {
    let single = |p: u8| SINGLES.contains(&p);
    let log2 = |p: u8| p.trailing_zeros() as u8;
    match protocol {
        // Both full patterns: L's in the high nibble, H's in the low nibble.
        0 | 2 => Sift::Key {
            value: p1 | p2 << 4,
            data: p1,
        },
        6 if single(p1) && single(p2) => Sift::Key {
            value: p1 | p2 << 4,
            data: p1,
        },
        // p2 is L's basis (1 = diagonal); V and -45 give bit 1, H and +45 bit 0.
        1 => match (p2, p1) {
            (0, 1 | 4) | (1, 2 | 8) => Sift::Key {
                value: u8::from(p1 == 1 || p1 == 2),
                data: 0,
            },
            _ => Sift::Discard,
        },
        // Basis in the high bit, value in the low bit.
        5 => match p1 {
            1 => Sift::Key { value: 0, data: 0 },
            4 => Sift::Key { value: 1, data: 0 },
            2 => Sift::Key { value: 2, data: 0 },
            8 => Sift::Key { value: 3, data: 0 },
            _ => Sift::Discard,
        },
        3 => match (p2, p1) {
            (4, 1) => Sift::Key { value: 0, data: 4 },
            (4, 4) => Sift::Key { value: 1, data: 4 },
            (0..=3, _) if single(p1) => Sift::Test {
                value: p2 << 2 | log2(p1),
                data: log2(p1),
            },
            _ => Sift::Discard,
        },
        4 => match (p2, p1) {
            (1, 3) => Sift::Key { value: 0, data: 4 },
            (1, 6) => Sift::Key { value: 1, data: 4 },
            (1, _) if single(p1) => Sift::Test {
                value: log2(p1),
                data: log2(p1),
            },
            _ => Sift::Discard,
        },
        _ => Sift::Discard,
    }
}

/// Bit widths and sifting rule of one protocol on the low-count side (splicer).
#[derive(Debug, Clone, Copy)]
pub struct SplicerProtocol {
    /// Protocol index 0..=6.
    pub index: u8,
    /// Bits per entry of chopper's type-3 file.
    pub type3_in_bits: u32,
    /// Data bits per type-4 entry.
    pub type4_bits: u32,
    /// Bits per raw-key entry written.
    pub type3_out_bits: u32,
    /// Bits per test (type-5) entry written; 0 without test events.
    pub type5_bits: u32,
}

impl SplicerProtocol {
    /// Returns the splicer parameters of protocol `index` 0..=6.
    pub fn new(index: i64) -> Result<SplicerProtocol, CoincidenceError> {
        let (type3_in_bits, type4_bits, type3_out_bits, type5_bits) = match index {
            0 | 2 | 6 => (4, 4, 8, 0),
            1 => (1, 0, 1, 0),
            3 | 4 => (4, 3, 1, 4),
            5 => (2, 0, 2, 0),
            _ => {
                return Err(CoincidenceError::InvalidOption {
                    option: "protocol",
                    detail: format!("{index} is not a protocol; use 0 to 6 (0 service, 1 BBM92)"),
                })
            }
        };
        Ok(SplicerProtocol {
            index: index as u8,
            type3_in_bits,
            type4_bits,
            type3_out_bits,
            type5_bits,
        })
    }

    /// Returns the outcome for L's type-3 `entry` and H's type-4 `data`.
    #[inline]
    pub fn sift(&self, entry: u8, data: u8) -> Sift {
        match self.index {
            0 | 2 | 6 => Sift::Key {
                value: entry << 4 | data,
                data,
            },
            1 | 5 => Sift::Key { value: entry, data },
            3 | 4 => {
                if data <= 3 && SINGLES.contains(&entry) {
                    return Sift::Test {
                        value: (entry.trailing_zeros() as u8) << 2 | data,
                        data,
                    };
                }
                match (self.index, data, entry) {
                    (3, 4, 6) | (4, 4, 2) => Sift::Key { value: 0, data },
                    (3, 4, 3) | (4, 4, 1) => Sift::Key { value: 1, data },
                    _ => Sift::Discard,
                }
            }
            _ => Sift::Discard,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bbm92_keeps_matching_bases_only() {
        let p = CostreamProtocol::new(1).unwrap();
        assert_eq!(p.sift(1, 0), Sift::Key { value: 1, data: 0 });
        assert_eq!(p.sift(4, 0), Sift::Key { value: 0, data: 0 });
        assert_eq!(p.sift(2, 1), Sift::Key { value: 1, data: 0 });
        assert_eq!(p.sift(8, 1), Sift::Key { value: 0, data: 0 });
        assert_eq!(p.sift(2, 0), Sift::Discard);
        assert_eq!(p.sift(1, 1), Sift::Discard);
        assert_eq!(p.sift(3, 0), Sift::Discard);
    }

    #[test]
    fn service_keeps_both_patterns() {
        let p = CostreamProtocol::new(0).unwrap();
        assert_eq!(
            p.sift(0x4, 0x8),
            Sift::Key {
                value: 0x84,
                data: 4
            }
        );
        let filtered = CostreamProtocol::new(6).unwrap();
        assert_eq!(filtered.sift(3, 8), Sift::Discard);
        assert_eq!(
            filtered.sift(2, 8),
            Sift::Key {
                value: 0x82,
                data: 2
            }
        );
    }

    #[test]
    fn device_independent_tests_and_keys() {
        let p3 = CostreamProtocol::new(3).unwrap();
        assert_eq!(p3.sift(1, 4), Sift::Key { value: 0, data: 4 });
        assert_eq!(
            p3.sift(8, 2),
            Sift::Test {
                value: 0b1011,
                data: 3
            }
        );
        let p4 = CostreamProtocol::new(4).unwrap();
        assert_eq!(p4.sift(6, 1), Sift::Key { value: 1, data: 4 });
        assert_eq!(p4.sift(4, 1), Sift::Test { value: 2, data: 2 });
        assert_eq!(p4.sift(4, 0), Sift::Discard);
    }

    #[test]
    fn splicer_service_byte_matches_costream() {
        let h = CostreamProtocol::new(0).unwrap();
        let l = SplicerProtocol::new(0).unwrap();
        for p1 in 0..16 {
            for p2 in 0..16 {
                let Sift::Key { value, data } = h.sift(p1, p2) else {
                    panic!("service mode keeps everything");
                };
                assert_eq!(l.sift(p2, data), Sift::Key { value, data });
            }
        }
    }

    #[test]
    fn unknown_protocol_is_rejected() {
        assert!(CostreamProtocol::new(7).is_err());
        assert!(SplicerProtocol::new(-1).is_err());
    }
}
