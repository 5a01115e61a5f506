//! Frequency correction of a stream of event times: side H's clock is rescaled to run at
//! side L's rate before coincidence matching.
//!
//! A corrector with relative frequency `df` and origin `t0` maps a time `t` (ticks) to
//! `t + floor((t − t0)·df) + offset`. The rate is held as a fixed-point number with 40
//! fractional bits (steps of 9.1e-13), so the result of each event depends only on the
//! event, never on how the stream was split into batches. Times before the origin are
//! corrected backwards. Raw event words keep their low 15 bits (sub-tick time, flags,
//! detector pattern) and their 49-bit time wraps modulo 2^49 like the hardware's.

use crate::SyncError;

/// Fractional bits of the fixed-point rate.
const RATE_BITS: u32 = 40;
/// Largest accepted relative frequency: 2^-13, about 122 ppm.
pub const MAX_RELATIVE_FREQUENCY: f64 = 1.0 / 8192.0;

const TIME_BITS: u32 = 49;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;

/// Rescales event times by `1 + df` around an origin; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrequencyCorrector {
    rate: i64,
    origin: Option<u64>,
    offset: i64,
}

impl FrequencyCorrector {
    /// Makes a corrector for the relative frequency `df`. With `origin` `None` the first
    /// corrected time becomes the origin.
    pub fn new(relative_frequency: f64, origin: Option<u64>) -> Result<Self, SyncError> {
        Ok(FrequencyCorrector {
            rate: fixed_rate(relative_frequency)?,
            origin,
            offset: 0,
        })
    }

    /// The relative frequency in force, after rounding to the fixed-point step.
    pub fn relative_frequency(&self) -> f64 {
        self.rate as f64 / (1u64 << RATE_BITS) as f64
    }

    /// Changes the rate from time `at` on (ticks) without a jump at `at`: later times are
    /// rescaled around `at` with the new rate, on top of the correction reached there.
    pub fn set_frequency(&mut self, relative_frequency: f64, at: u64) -> Result<(), SyncError> {
        let rate = fixed_rate(relative_frequency)?;
        let reached = self.correction(at);
        self.origin = Some(at);
        self.offset = reached;
        self.rate = rate;
        Ok(())
    }

    fn correction(&mut self, t: u64) -> i64 {
        let origin = *self.origin.get_or_insert(t);
        let elapsed = t.wrapping_sub(origin) as i64;
        let scaled = ((elapsed as i128 * self.rate as i128) >> RATE_BITS) as i64;
        scaled + self.offset
    }

    /// Corrects times in ticks in place (64-bit times, wrapping).
    pub fn correct_times(&mut self, times: &mut [u64]) {
        for t in times {
            *t = t.wrapping_add_signed(self.correction(*t));
        }
    }

    /// Corrects raw event words in place: bits 63..15 are the 49-bit time, bits 14..0
    /// stay as they are.
    pub fn correct_words(&mut self, words: &mut [u64]) {
        for w in words {
            let time = *w >> 15;
            let corrected = time.wrapping_add_signed(self.correction_49(time)) & TIME_MASK;
            *w = (corrected << 15) | (*w & 0x7FFF);
        }
    }

    /// Like `correction`, with the elapsed time taken modulo 2^49 and sign-extended, so a
    /// stream that wraps its 49-bit counter keeps a continuous correction.
    fn correction_49(&mut self, time: u64) -> i64 {
        let origin = *self.origin.get_or_insert(time);
        let elapsed = ((time.wrapping_sub(origin) << (64 - TIME_BITS)) as i64) >> (64 - TIME_BITS);
        let scaled = ((elapsed as i128 * self.rate as i128) >> RATE_BITS) as i64;
        scaled + self.offset
    }
}

fn fixed_rate(relative_frequency: f64) -> Result<i64, SyncError> {
    if !relative_frequency.is_finite() || relative_frequency.abs() >= MAX_RELATIVE_FREQUENCY {
        return Err(SyncError::InvalidParameter {
            name: "relative frequency",
            value: relative_frequency.to_string(),
            expected: format!("a magnitude below {MAX_RELATIVE_FREQUENCY:e} (2^-13)"),
        });
    }
    Ok((relative_frequency * (1u64 << RATE_BITS) as f64).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rescales_around_origin() {
        let origin = 10_000_000;
        // 2^-20 (about 9.5e-7) is exact in the fixed-point rate.
        let mut c = FrequencyCorrector::new(1.0 / 1048576.0, Some(origin)).unwrap();
        let mut times = [origin, origin + 8_000_000_000, origin - 8_000_000];
        c.correct_times(&mut times);
        assert_eq!(times[0], origin);
        // 8e9 · 2^-20 = 7629.39 and −8e6 · 2^-20 = −7.63, both rounded down.
        assert_eq!(times[1], origin + 8_000_000_000 + 7629);
        assert_eq!(times[2], origin - 8_000_000 - 8);
    }

    #[test]
    fn batches_give_same_result_as_one_call() {
        let mut whole: Vec<u64> = (0..10_000u64).map(|i| 5_000 + i * 123_457).collect();
        let mut split = whole.clone();
        let mut one = FrequencyCorrector::new(-3.3e-6, None).unwrap();
        one.correct_times(&mut whole);
        let mut two = FrequencyCorrector::new(-3.3e-6, None).unwrap();
        let (first, second) = split.split_at_mut(777);
        two.correct_times(first);
        two.correct_times(second);
        assert_eq!(whole, split);
    }

    #[test]
    fn words_keep_low_bits_and_wrap_at_49_bits() {
        let near_end = TIME_MASK - 10;
        let mut words = [(near_end << 15) | 0x1234, (5 << 15) | 0x0F];
        let mut d = FrequencyCorrector::new(1e-5, Some(near_end)).unwrap();
        d.correct_words(&mut words);
        assert_eq!(words[0] & 0x7FFF, 0x1234);
        assert_eq!(words[1] & 0x7FFF, 0x0F);
        // 16 ticks after the origin across the wrap: the correction rounds down to 0.
        assert_eq!(words[1] >> 15, 5);
    }

    #[test]
    fn rate_change_is_continuous() {
        let rate = 1.0 / 131072.0;
        let mut c = FrequencyCorrector::new(rate, Some(0)).unwrap();
        c.set_frequency(-rate, 1_000_000).unwrap();
        let mut t = [1_000_000, 2_000_000];
        c.correct_times(&mut t);
        // 1e6 · 2^-17 = 7.63 rounds down to 7 and −7.63 to −8.
        assert_eq!(t[0], 1_000_000 + 7);
        assert_eq!(t[1], 2_000_000 + 7 - 8);
    }

    #[test]
    fn excessive_frequency_is_rejected() {
        let err = FrequencyCorrector::new(1e-3, None).unwrap_err();
        assert!(err.to_string().contains("relative frequency"), "{err}");
    }
}
