//! Detector skew correction as every readevents variant applies it.
//!
//! Each of the four detectors may get a time offset (its cable and electronics delay).
//! readevents prepares a table of 16 entries, one per 4-bit pattern: patterns 1, 2, 4 and 8
//! (a single detector) get that detector's skew shifted into place, every other pattern
//! (0, or several detectors at once) gets nothing. The table entry is added to the whole
//! 64-bit event word with a wrapping two's-complement add, so a negative skew borrows from
//! the upper bits and a fine skew that is not a multiple of 32 fine ticks sets the sub-tick
//! bits 14..10. Dummy and self-test events with a single-detector pattern are shifted too.
//!
//! Skew correction can reorder events: two detectors' events closer than their skew
//! difference swap places. Nothing here sorts them again; chopper and chopper2 drop the
//! event that steps back.

use crate::raw::PATTERN_MASK;

/// Bit position of a skew given in ticks of 1/8 ns (readevents `-d`).
pub const TICK_SHIFT: u32 = 15;
/// Bit position of a skew given in fine ticks of 1/256 ns (readevents5/7 `-D`).
pub const FINE_TICK_SHIFT: u32 = 10;

/// The per-pattern offsets added to event words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorSkew {
    offsets: [u64; 16],
}

impl DetectorSkew {
    /// No correction.
    pub const NONE: DetectorSkew = DetectorSkew { offsets: [0; 16] };

    /// Skews of detectors 1..4 in ticks of 1/8 ns.
    pub fn from_ticks(skews: [i64; 4]) -> Self {
        Self::with_shift(skews, TICK_SHIFT)
    }

    /// Skews of detectors 1..4 in fine ticks of 1/256 ns.
    pub fn from_fine_ticks(skews: [i64; 4]) -> Self {
        Self::with_shift(skews, FINE_TICK_SHIFT)
    }

    fn with_shift(skews: [i64; 4], shift: u32) -> Self {
        let mut offsets = [0u64; 16];
        for (detector, &skew) in skews.iter().enumerate() {
            offsets[1 << detector] = (skew as u64).wrapping_shl(shift);
        }
        DetectorSkew { offsets }
    }

    /// True when every offset is zero.
    pub fn is_none(&self) -> bool {
        self.offsets == [0; 16]
    }

    /// Returns the corrected event word.
    #[inline]
    pub fn apply(&self, word: u64) -> u64 {
        word.wrapping_add(self.offsets[(word & PATTERN_MASK) as usize])
    }

    /// Corrects every word in place.
    pub fn apply_all(&self, words: &mut [u64]) {
        if self.is_none() {
            return;
        }
        for w in words {
            *w = self.apply(*w);
        }
    }
}

impl Default for DetectorSkew {
    fn default() -> Self {
        Self::NONE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::{make_word, time_ticks};

    #[test]
    fn single_detectors_shift_others_do_not() {
        let skew = DetectorSkew::from_ticks([1, 2, 3, -4]);
        let t = 1_000;
        assert_eq!(time_ticks(skew.apply(make_word(t, 1))), t + 1);
        assert_eq!(time_ticks(skew.apply(make_word(t, 2))), t + 2);
        assert_eq!(time_ticks(skew.apply(make_word(t, 4))), t + 3);
        assert_eq!(time_ticks(skew.apply(make_word(t, 8))), t - 4);
        assert_eq!(skew.apply(make_word(t, 3)), make_word(t, 3));
        assert_eq!(skew.apply(make_word(t, 0)), make_word(t, 0));
    }

    #[test]
    fn negative_skew_wraps_the_49_bit_time() {
        let skew = DetectorSkew::from_ticks([-1, 0, 0, 0]);
        assert_eq!(time_ticks(skew.apply(make_word(0, 1))), (1 << 49) - 1);
    }

    #[test]
    fn fine_skew_sets_sub_tick_bits() {
        let skew = DetectorSkew::from_fine_ticks([33, 0, 0, 0]);
        let word = skew.apply(make_word(10, 1));
        assert_eq!(time_ticks(word), 11);
        assert_eq!((word >> 10) & 0x1F, 1);
    }

    #[test]
    fn dummy_with_single_pattern_is_shifted() {
        let skew = DetectorSkew::from_ticks([0, 0, 0, 5]);
        let dummy = make_word(100, 0x18);
        assert_eq!(time_ticks(skew.apply(dummy)), 105);
    }
}
