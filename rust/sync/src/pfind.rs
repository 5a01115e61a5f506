//! Time offset between the two sides by FFT cross-correlation, as the reference `pfind`
//! computes it.
//!
//! Both event lists (type-1 times of the high-count side H, type-2 times of the low-count
//! side L, ticks of 1/8 ns) are binned twice into `Z = 2^order` bins, with bin index
//! `(t >> shift) & (Z − 1)`: once at the coarse bin width `R` ns and once at the fine width
//! `r` ns, both powers of two. Each pair of histograms is correlated circularly; the first
//! strictly highest correlation bin is the peak, and its signal-to-noise figure is
//! `peak / sigma` with sigma the population standard deviation over all bins. The coarse
//! peak fixes the offset to within a coarse bin, the fine peak refines it modulo the fine
//! span `Z·r`.
//!
//! The result `offset_ticks = t_L − t_H` is what costream takes as its `-t` option.
//!
//! Limits: offsets beyond half the coarse span (`Z·R/2`) alias. The combination reproduces
//! the reference's 32-bit multiplication `coarse position × 8R`, which wraps for offsets
//! of 2^31 ticks (268 ms) and more.

use std::path::Path;

use crate::correlate::{join, Correlator, Transforms, MAX_ORDER, MIN_ORDER};
use crate::epochs::{read_epoch_range, Deletion, TimeBase};
use crate::{EpochKind, SyncError};

/// Options of the offset search, in the reference's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PfindParams {
    /// Buffer order `Q`: histograms have `2^Q` bins (reference `-q`, default 17).
    pub buffer_order: u32,
    /// Fine bin width in ns, a power of two (reference `-r`, default 2).
    pub fine_resolution_ns: u32,
    /// Coarse bin width in ns, a power of two (reference `-R`, default 2048).
    pub coarse_resolution_ns: u32,
}

impl Default for PfindParams {
    fn default() -> Self {
        PfindParams {
            buffer_order: 17,
            fine_resolution_ns: 2,
            coarse_resolution_ns: 2048,
        }
    }
}

impl PfindParams {
    /// Checks every option and returns `(fine shift, coarse shift)`: log2 of the bin widths
    /// in ticks.
    pub fn shifts(&self) -> Result<(u32, u32), SyncError> {
        if !(MIN_ORDER..=MAX_ORDER).contains(&self.buffer_order) {
            return Err(SyncError::InvalidParameter {
                name: "buffer order",
                value: self.buffer_order.to_string(),
                expected: format!("an integer from {MIN_ORDER} to {MAX_ORDER} (2^order FFT bins)"),
            });
        }
        let fine = resolution_shift("fine resolution", self.fine_resolution_ns)?;
        let coarse = resolution_shift("coarse resolution", self.coarse_resolution_ns)?;
        Ok((fine, coarse))
    }
}

/// Returns log2 of a bin width of `ns` nanoseconds expressed in ticks.
fn resolution_shift(name: &'static str, ns: u32) -> Result<u32, SyncError> {
    // A shift of 63 or more would bin every 64-bit time into bin 0.
    if !ns.is_power_of_two() || ns.trailing_zeros() + 3 > 60 {
        return Err(SyncError::InvalidParameter {
            name,
            value: format!("{ns} ns"),
            expected: "a power of two of at least 1 ns, such as 1, 2, 4 or 2048".into(),
        });
    }
    Ok(ns.trailing_zeros() + 3)
}

/// The correlation peak of one resolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peak {
    /// Bin of the first strictly highest correlation value, in `0..Z` (0 if no bin is
    /// positive).
    pub position: u64,
    /// Peak value divided by the population standard deviation of all bins.
    pub snr: f64,
}

/// The outcome of one offset search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OffsetResult {
    /// `t_L − t_H` in ticks of 1/8 ns: costream's `-t`.
    pub offset_ticks: i64,
    /// Fine-resolution peak.
    pub fine: Peak,
    /// Coarse-resolution peak.
    pub coarse: Peak,
    /// Coarse position with the upper half of the buffer mapped to negative lags.
    pub coarse_signed: i64,
    /// Coarse part of the offset in ticks, after the reference's 32-bit wrap.
    pub coarse_offset_ticks: i64,
    /// Number of type-1 events (side H) binned.
    pub type1_events: u64,
    /// Number of type-2 events (side L) binned.
    pub type2_events: u64,
}

/// A stateful offset finder: plans its FFTs once and reuses its buffers between searches.
pub struct OffsetFinder {
    params: PfindParams,
    fine_shift: u32,
    coarse_shift: u32,
    coarse: Correlator,
    /// A second correlator for the fine resolution, so both resolutions run at once with
    /// the `parallel` feature; without it the coarse one serves both in turn.
    fine: Option<Correlator>,
}

impl OffsetFinder {
    /// Checks the options and allocates the buffers: about `48 · 2^order` bytes with the
    /// `parallel` feature (3 GiB at order 26), `24 · 2^order` bytes without.
    pub fn new(params: PfindParams) -> Result<Self, SyncError> {
        let (fine_shift, coarse_shift) = params.shifts()?;
        let order = params.buffer_order;
        let fine = if cfg!(feature = "parallel") {
            Some(Correlator::with_transforms(order, Transforms::Sequential)?)
        } else {
            None
        };
        Ok(OffsetFinder {
            params,
            fine_shift,
            coarse_shift,
            coarse: Correlator::with_transforms(order, Transforms::Sequential)?,
            fine,
        })
    }

    /// The options this finder was made with.
    pub fn params(&self) -> PfindParams {
        self.params
    }

    /// Finds the offset `t_L − t_H` between type-1 times (side H) and type-2 times
    /// (side L), both in ticks. Neither list needs to be sorted.
    pub fn find(&mut self, type1: &[u64], type2: &[u64]) -> Result<OffsetResult, SyncError> {
        for (kind, times) in [(EpochKind::Type1, type1), (EpochKind::Type2, type2)] {
            if times.is_empty() {
                return Err(SyncError::NoEvents {
                    kind,
                    source_desc: "the given time list".into(),
                });
            }
        }
        let (coarse_shift, fine_shift) = (self.coarse_shift, self.fine_shift);
        let (coarse, fine) = match self.fine.as_mut() {
            Some(fine_correlator) => {
                let coarse_correlator = &mut self.coarse;
                let (mut coarse, mut fine) = (None, None);
                join(
                    || coarse = Some(peak(coarse_correlator, type1, type2, coarse_shift)),
                    || fine = Some(peak(fine_correlator, type1, type2, fine_shift)),
                );
                (coarse.expect("joined"), fine.expect("joined"))
            }
            None => (
                peak(&mut self.coarse, type1, type2, coarse_shift),
                peak(&mut self.coarse, type1, type2, fine_shift),
            ),
        };
        let (coarse_signed, coarse_offset_ticks, offset_ticks) = combine(
            self.params.buffer_order,
            coarse.position,
            fine.position,
            self.params.coarse_resolution_ns,
            self.params.fine_resolution_ns,
        );
        Ok(OffsetResult {
            offset_ticks,
            fine,
            coarse,
            coarse_signed,
            coarse_offset_ticks,
            type1_events: type1.len() as u64,
            type2_events: type2.len() as u64,
        })
    }

    /// Reads epochs `start .. start + count` of type-1 files from `type1_dir` and type-2
    /// files from `type2_dir` and finds the offset, as `pfind -D type1_dir -d type2_dir
    /// -e start -n count` does.
    pub fn find_in_folders(
        &mut self,
        type1_dir: &Path,
        type2_dir: &Path,
        start: u32,
        count: u32,
        deletion: Deletion,
    ) -> Result<OffsetResult, SyncError> {
        let times = read_epoch_range(
            type1_dir,
            type2_dir,
            start,
            count,
            TimeBase::Pfind,
            deletion,
        )?;
        let result = self
            .find(&times.type1, &times.type2)
            .map_err(|err| match err {
                SyncError::NoEvents { kind, .. } => SyncError::NoEvents {
                    kind,
                    source_desc: epoch_range_text(start, count),
                },
                other => other,
            })?;
        log::info!(
            "time offset over {}: {} ticks, fine SNR {:.2}, coarse SNR {:.2}",
            epoch_range_text(start, count),
            result.offset_ticks,
            result.fine.snr,
            result.coarse.snr
        );
        Ok(result)
    }
}

/// Correlates the histograms of both sides at bin width `2^shift` ticks and finds the peak.
fn peak(correlator: &mut Correlator, type1: &[u64], type2: &[u64], shift: u32) -> Peak {
    let mask = (correlator.len() - 1) as u64;
    let correlation = correlator.correlate(
        |bins| histogram(bins, type1, shift, mask),
        |bins| histogram(bins, type2, shift, mask),
    );
    scan_peak(correlation)
}

/// Describes an epoch range for messages, e.g. "epochs 00004f87 to 00004f8a".
pub(crate) fn epoch_range_text(start: u32, count: u32) -> String {
    format!(
        "epochs {start:08x} to {:08x}",
        start.wrapping_add(count.saturating_sub(1))
    )
}

impl OffsetResult {
    /// The line the reference prints to stderr before its result, e.g.
    /// `pfind: pos_f:4324, pos_s:2, t0:32768, timediff:34592, ep:00004f87`.
    pub fn diagnostic_line(&self, start_epoch: u32) -> String {
        format!(
            "pfind: pos_f:{}, pos_s:{}, t0:{}, timediff:{}, ep:{start_epoch:08x}\n",
            self.fine.position, self.coarse_signed, self.coarse_offset_ticks, self.offset_ticks
        )
    }

    /// The result text the reference prints for `-V verbosity` (levels 0 to 3; any other
    /// level gives the reference's "Verbosity level undefined." line).
    pub fn report(&self, verbosity: i64, params: &PfindParams) -> String {
        let offset = self.offset_ticks;
        let (fine, coarse) = (self.fine.snr, self.coarse.snr);
        match verbosity {
            0 => format!("{offset}\n"),
            1 => format!("{offset}\t{fine:.6}\t{coarse:.6}\n"),
            2 => format!("difference: {offset}, sig_f: {fine:.6}, sig_c:{coarse:.6}\n"),
            3 => format!(
                "fine resolution: {:.2} nsec, coarse resolution: {:.2} nsec\n\
                 difference: {offset} units of 1/8 nsec or {:.9} sec\n\
                 peak height: fine: {fine:.2} sigma, coarse: {coarse:.2} sigma\n\
                 counts from channel 1: {}, channel2: {}\n",
                f64::from(params.fine_resolution_ns),
                f64::from(params.coarse_resolution_ns),
                offset as f64 * 1.25e-10,
                self.type1_events,
                self.type2_events
            ),
            _ => "Verbosity level undefined.\n".into(),
        }
    }
}

fn histogram(bins: &mut [f64], times: &[u64], shift: u32, mask: u64) {
    for &t in times {
        bins[((t >> shift) & mask) as usize] += 1.0;
    }
}

/// Block length of the peak scan; fixed so the sums do not depend on the thread count.
const SCAN_BLOCK: usize = 1 << 16;

/// Partial figures of one block: (first maximum, its index, Σc, Σc²).
type ScanPart = (f64, usize, f64, f64);

fn scan_block(offset: usize, block: &[f64]) -> ScanPart {
    let (mut max, mut position, mut sum, mut sum_sq) = (0.0, 0, 0.0, 0.0);
    for (i, &c) in block.iter().enumerate() {
        if c > max {
            max = c;
            position = offset + i;
        }
        sum += c;
        sum_sq += c * c;
    }
    (max, position, sum, sum_sq)
}

/// Finds the first strictly greatest positive bin (bin 0 with value 0 if none is
/// positive) and its height over the population standard deviation of all bins.
pub fn scan_peak(correlation: &[f64]) -> Peak {
    #[cfg(feature = "parallel")]
    let parts: Vec<ScanPart> = {
        use rayon::prelude::*;
        correlation
            .par_chunks(SCAN_BLOCK)
            .enumerate()
            .map(|(i, block)| scan_block(i * SCAN_BLOCK, block))
            .collect()
    };
    #[cfg(not(feature = "parallel"))]
    let parts: Vec<ScanPart> = correlation
        .chunks(SCAN_BLOCK)
        .enumerate()
        .map(|(i, block)| scan_block(i * SCAN_BLOCK, block))
        .collect();

    let (mut max, mut position, mut sum, mut sum_sq) = (0.0, 0usize, 0.0, 0.0);
    for (block_max, block_position, block_sum, block_sum_sq) in parts {
        if block_max > max {
            max = block_max;
            position = block_position;
        }
        sum += block_sum;
        sum_sq += block_sum_sq;
    }
    let n = correlation.len() as f64;
    let mean = sum / n;
    let sigma = (sum_sq / n - mean * mean).sqrt();
    Peak {
        position: position as u64,
        snr: max / sigma,
    }
}

/// Combines the coarse and fine peak positions into `(signed coarse position, coarse
/// offset in ticks, offset in ticks)`, with the reference's 32-bit wrap of the coarse
/// offset.
pub fn combine(
    order: u32,
    coarse_position: u64,
    fine_position: u64,
    coarse_ns: u32,
    fine_ns: u32,
) -> (i64, i64, i64) {
    let bins = 1i64 << order;
    let half = bins / 2;
    let coarse_ticks = (coarse_ns as i64) * 8;
    let fine_ticks = (fine_ns as i64) * 8;

    let mut coarse_signed = coarse_position as i64;
    if coarse_signed & half != 0 {
        coarse_signed -= bins;
    }
    // The reference multiplies two 32-bit ints here; offsets of 2^31 ticks and more wrap.
    let coarse_offset = (coarse_signed as i32).wrapping_mul(coarse_ticks as i32) as i64;
    let mut fine_lag = (fine_position as i64 - coarse_offset / fine_ticks) & (bins - 1);
    if fine_lag & half != 0 {
        fine_lag -= bins;
    }
    (
        coarse_signed,
        coarse_offset,
        fine_lag * fine_ticks + coarse_offset,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_reproduces_reference_lines() {
        // Positions and results printed by the reference on its golden cases.
        assert_eq!(combine(17, 2, 4324, 2048, 1), (2, 32768, 34592));
        assert_eq!(combine(17, 0, 1, 2048, 1), (0, 0, 8));
        assert_eq!(combine(17, 2, 4322, 2048, 1), (2, 32768, 34576));
    }

    #[test]
    fn combine_maps_upper_half_to_negative_lag() {
        let z = 1u64 << 17;
        let (signed, coarse, offset) = combine(17, z - 8, z - 123_456 / 16, 2048, 2);
        assert_eq!(signed, -8);
        assert_eq!(coarse, -8 * 16384);
        assert_eq!(offset, -123_456);
    }

    #[test]
    fn combine_wraps_coarse_offset_at_32_bits() {
        // 2^17 coarse bins of 16384 ticks: 2^31 ticks overflow the reference's int.
        let (_, coarse, _) = combine(23, 1 << 17, 0, 2048, 2);
        assert_eq!(coarse, i32::MIN as i64);
    }

    #[test]
    fn invalid_resolution_is_rejected() {
        let params = PfindParams {
            fine_resolution_ns: 3,
            ..PfindParams::default()
        };
        let err = OffsetFinder::new(params).err().unwrap();
        assert!(err.to_string().contains("fine resolution 3 ns"), "{err}");
        assert_eq!(err.pfind_code(), Some(9));
    }

    #[test]
    fn scan_takes_first_of_equal_maxima() {
        let mut c = vec![-1.0; 1 << 12];
        c[5] = 3.0;
        c[9] = 3.0;
        let peak = scan_peak(&c);
        assert_eq!(peak.position, 5);
        assert!(peak.snr > 0.0);
    }

    #[test]
    fn scan_without_positive_bin_reports_bin_zero() {
        let c = vec![-1.0; 1 << 12];
        assert_eq!(scan_peak(&c).position, 0);
    }
}
