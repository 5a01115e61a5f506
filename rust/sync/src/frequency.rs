//! Joint search of the frequency offset and time offset between the two sides' clocks,
//! by the method of fpfind. It cross-correlates an early and a late time window and reads
//! the frequency offset from how far the peak moved between them. Then it corrects side
//! H and refines at a finer bin width.
//!
//! Inputs are the event times of the reference side L (type-2) and of the target side H
//! (type-1) in ticks of 1/8 ns. Both are taken relative to the origin
//! `t0 = max(first L time, first H time)`; earlier events are dropped. The result states
//! `t_L − t0 ≈ (t_H − t0)·(1 + relative_frequency) + offset_ticks`, the convention of
//! costream's `-t` extended by a rate; [`crate::correct::FrequencyCorrector`] applies it to
//! side H's stream.
//!
//! One search runs these steps at bin width `r` (starting at the coarse width):
//! 1. Correlate the window `[0, D)` of both sides, `D = k·r·N`, `N = 2^order` bins. In the
//!    first iteration, while the peak significance is below the threshold, sum pairs of
//!    bins (doubling `r`) up to a bin width of 10 µs.
//! 2. Correlate the window `[Ts, Ts + D)`, `Ts = separation · R · N`; the frequency offset
//!    is the change of delay over `Ts`.
//! 3. Fold the delay (carried from the early window's middle back to the origin) and the
//!    rate into the running correction of side H, then shrink `r` by
//!    `convergence_rate / separation` down to the fine width. At the fine width, repeat
//!    up to 3 more times while the frequency step exceeds `frequency_threshold`.
//!
//! A later iteration accepts only peaks within twice what the previous step can have left
//! ([`Residual`]): a rate error smears a coarse peak over a plateau, and its highest bin
//! may lie anywhere on it. A peak beyond that is noise and makes the window `k` times
//! longer, up to `max_wraps`. After that the search fails, unless the previous step was
//! already at the fine width. When the search fails it is retried on side H pre-compensated by
//! each entry of `precompensations` in turn.
//!
//! Differences from fpfind v1.2024.13, which the reference server runs: peak delays are
//! refined to a fraction of a bin by the centroid of the three bins around the maximum;
//! the early delay is referred to the origin instead of the window's middle; the fine
//! width may be iterated more than once; times are `f64` ticks (exact to 2^53 ticks,
//! about 13 days) instead of extended precision. On the golden event sets drifted by
//! 1e-8 to 1e-5 this recovers the rate to about 1e-9 and the offset to about 1 ns.

use crate::correlate::Correlator;
use crate::SyncError;

/// Ticks (1/8 ns) per nanosecond.
const TICKS_PER_NS: f64 = 8.0;
/// Widest bin the first iteration may reach while doubling: 10 µs.
const MAX_BIN_TICKS: f64 = 1e4 * TICKS_PER_NS;

/// Extra iterations at the fine bin width while the frequency step stays above the
/// threshold.
const MAX_FINE_ITERATIONS: u32 = 3;

/// Options of the frequency and time offset search. Defaults are those the reference
/// server passes to fpfind.
#[derive(Debug, Clone, PartialEq)]
pub struct FrequencySearchParams {
    /// Histograms have `2^buffer_order` bins.
    pub buffer_order: u32,
    /// Starting bin width in ns.
    pub coarse_resolution_ns: f64,
    /// Final bin width in ns.
    pub fine_resolution_ns: f64,
    /// Distance of the late window from the early one, in units of the coarse span
    /// `coarse_resolution · 2^buffer_order`.
    pub separation: f64,
    /// Peak significance (peak over background, in standard deviations) that counts as
    /// found.
    pub threshold: f64,
    /// Factor by which the bin width shrinks per iteration, times `separation`.
    pub convergence_rate: f64,
    /// Frequency corrections below this stop the frequency refinement.
    pub frequency_threshold: f64,
    /// Maximum number of coarse spans a window may cover after spurious peaks.
    pub max_wraps: u32,
    /// Largest accepted time offset in ticks (default 100 ms).
    pub max_delay_ticks: f64,
    /// Largest accepted relative frequency offset (default 2^-13, about 122 ppm).
    pub max_frequency: f64,
    /// Frequency pre-compensations of side H tried in order until one locks.
    pub precompensations: Vec<f64>,
}

impl Default for FrequencySearchParams {
    fn default() -> Self {
        FrequencySearchParams {
            buffer_order: 23,
            coarse_resolution_ns: 32.0,
            fine_resolution_ns: 4.0,
            separation: 5.0,
            threshold: 6.0,
            convergence_rate: 0.1,
            frequency_threshold: 1e-9,
            max_wraps: 4,
            max_delay_ticks: 0.1 * 8e9,
            max_frequency: 2f64.powi(-13),
            precompensations: flip_flop(0.0, 1e-7, 1e-6),
        }
    }
}

/// Maximum number of pre-compensation steps on each side of zero that
/// [`precompensations`] accepts. Each step may cost a full retry of the search, and
/// without a bound a fine step requested gigabytes for the list alone.
pub const MAX_PRECOMPENSATION_STEPS: f64 = 1000.0;

/// Returns the pre-compensations `0, +step, −step, …` up to `±max` ([`flip_flop`]) after
/// checking that `step` and `max` are finite, not negative, and that `max / step` is at
/// most [`MAX_PRECOMPENSATION_STEPS`]. A zero step or max gives only 0.
pub fn precompensations(step: f64, max: f64) -> Result<Vec<f64>, SyncError> {
    for (name, value) in [("precompensation step", step), ("precompensation max", max)] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(SyncError::InvalidParameter {
                name,
                value: value.to_string(),
                expected: "a finite value of 0 or more".into(),
            });
        }
    }
    if step > 0.0 && max / step > MAX_PRECOMPENSATION_STEPS {
        return Err(SyncError::InvalidParameter {
            name: "precompensation step",
            value: step.to_string(),
            expected: format!(
                "at least precompensation max / {MAX_PRECOMPENSATION_STEPS} = {}; raise the step or lower the max {max}",
                max / MAX_PRECOMPENSATION_STEPS
            ),
        });
    }
    Ok(flip_flop(0.0, step, max))
}

/// Returns `start + step·[0, +1, −1, +2, −2, …, +m, −m]` with `m = floor(stop / step)`:
/// pre-compensations ordered by distance from `start`.
pub fn flip_flop(start: f64, step: f64, stop: f64) -> Vec<f64> {
    if step == 0.0 {
        return vec![start];
    }
    let m = (stop / step).floor().max(0.0) as i64;
    let mut out = vec![start];
    for i in 1..=m {
        out.push(start + step * i as f64);
        out.push(start - step * i as f64);
    }
    out
}

/// The outcome of a frequency and time offset search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrequencyOffset {
    /// `t_L − t_H` at the origin, in ticks (fractional: the search resolves below a bin).
    pub offset_ticks: f64,
    /// Relative rate: `t_L − t0 ≈ (t_H − t0)·(1 + relative_frequency) + offset_ticks`.
    pub relative_frequency: f64,
    /// Significance of the last early-window peak (standard deviations above background).
    pub significance: f64,
    /// Origin `t0` in ticks: the later of the two sides' first event times.
    pub origin_ticks: u64,
    /// Bin width of the last iteration, in ns.
    pub resolution_ns: f64,
    /// The pre-compensation that locked.
    pub precompensation: f64,
}

/// A stateful frequency and time offset finder; plans its FFTs once.
pub struct FrequencyFinder {
    params: FrequencySearchParams,
    correlator: Correlator,
}

/// A correlation peak: delay in ticks (side H later than side L when positive) and its
/// significance.
#[derive(Debug, Clone, Copy)]
struct WindowPeak {
    delay: f64,
    significance: f64,
}

/// The running correction of side H: `t_corrected = (t_H − dt) / f`.
#[derive(Debug, Clone, Copy)]
struct Correction {
    dt: f64,
    f: f64,
}

/// Safety factor on the residual that a step of the search leaves.
const RESIDUAL_MARGIN: f64 = 2.0;

/// How far from zero the peaks of the next iteration may lie once a step's correction is
/// applied, times [`RESIDUAL_MARGIN`]. A later peak beyond it is noise.
///
/// A rate error ε smears the peak of a window of span `D` over `ε·D` ticks, and the
/// highest bin may lie anywhere on that plateau. So at bin width `r` a window's delay is
/// known to `ε·D/2 + r`, and the rate step, the change of delay over the separation `S`,
/// to `(ε·(D_early + D_late)/2 + 2r)/S`. The bounds use the measured step for ε. With the
/// defaults at a drift of 1e-5 the first plateau is 84 bins of 32 ns wide, which leaves
/// up to 2e-6 of rate and 1e4 ticks of delay for the next iteration.
#[derive(Debug, Clone, Copy)]
struct Residual {
    /// Delay at the origin, in ticks.
    delay: f64,
    /// Relative rate.
    rate: f64,
}

impl Residual {
    /// Computes the residual after a step of rate `df` at bin width `r` ticks, measured in
    /// an early window of `early_span` ticks and a late one of `late_span` ticks. A `late_span`
    /// of None means the step measured no rate, so the `previous` residual rate remains.
    fn after_step(
        df: f64,
        early_span: f64,
        late_span: Option<f64>,
        r: f64,
        separation_ticks: f64,
        previous: Option<Residual>,
    ) -> Self {
        let rate = match (late_span, previous) {
            (Some(late_span), _) => {
                RESIDUAL_MARGIN * (df.abs() * (early_span + late_span) / 2.0 + 2.0 * r)
                    / separation_ticks
            }
            (None, Some(previous)) => previous.rate,
            (None, None) => 0.0,
        };
        let delay = RESIDUAL_MARGIN * (df.abs() * early_span / 2.0 + r) + rate * early_span / 2.0;
        Residual { delay, rate }
    }

    /// Largest delay of the next early window, of `span` ticks at bin width `r`.
    fn early_delay_limit(&self, span: f64, r: f64) -> f64 {
        self.delay + self.rate * span / 2.0 + r
    }

    /// Largest change of delay from the next early window to the late one, at bin width
    /// `r`.
    fn delay_change_limit(&self, separation_ticks: f64, r: f64) -> f64 {
        self.rate * separation_ticks + 2.0 * r
    }
}

impl FrequencyFinder {
    /// Checks the options and allocates about `32 · 2^buffer_order` bytes of buffers.
    pub fn new(params: FrequencySearchParams) -> Result<Self, SyncError> {
        let positive = |name: &'static str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(SyncError::InvalidParameter {
                    name,
                    value: value.to_string(),
                    expected: "a finite number greater than 0".into(),
                })
            }
        };
        positive("coarse resolution", params.coarse_resolution_ns)?;
        positive("fine resolution", params.fine_resolution_ns)?;
        positive("separation", params.separation)?;
        positive("threshold", params.threshold)?;
        positive("convergence rate", params.convergence_rate)?;
        positive("maximum delay", params.max_delay_ticks)?;
        positive("maximum frequency", params.max_frequency)?;
        if params.fine_resolution_ns > params.coarse_resolution_ns {
            return Err(SyncError::InvalidParameter {
                name: "fine resolution",
                value: format!("{} ns", params.fine_resolution_ns),
                expected: format!(
                    "at most the coarse resolution {} ns",
                    params.coarse_resolution_ns
                ),
            });
        }
        if params.precompensations.is_empty()
            || params
                .precompensations
                .iter()
                .any(|p| !p.is_finite() || p.abs() >= params.max_frequency)
        {
            return Err(SyncError::InvalidParameter {
                name: "pre-compensation list",
                value: format!("{:?}", params.precompensations),
                expected: format!(
                    "at least one value, each of magnitude below {}",
                    params.max_frequency
                ),
            });
        }
        let correlator = Correlator::new(params.buffer_order)?;
        Ok(FrequencyFinder { params, correlator })
    }

    /// The options this finder was made with.
    pub fn params(&self) -> &FrequencySearchParams {
        &self.params
    }

    /// Finds the frequency and time offset between side L (`reference`, type-2 times) and
    /// side H (`target`, type-1 times), both in ticks.
    pub fn find(
        &mut self,
        reference: &[u64],
        target: &[u64],
    ) -> Result<FrequencyOffset, SyncError> {
        let (Some(first_l), Some(first_h)) = (reference.iter().min(), target.iter().min()) else {
            return Err(SyncError::NoPeak {
                detail: format!(
                    "side L has {} events and side H {}; both need events",
                    reference.len(),
                    target.len()
                ),
            });
        };
        let origin = *first_l.max(first_h);
        let a = relative_sorted(reference, origin);
        let b = relative_sorted(target, origin);

        let mut failures = Vec::new();
        for &pre in &self.params.precompensations.clone() {
            match self.search(&a, &b, pre) {
                Ok((correction, significance, resolution_ticks)) => {
                    let result = FrequencyOffset {
                        offset_ticks: -correction.dt / correction.f,
                        relative_frequency: 1.0 / correction.f - 1.0,
                        significance,
                        origin_ticks: origin,
                        resolution_ns: resolution_ticks / TICKS_PER_NS,
                        precompensation: pre,
                    };
                    log::info!(
                        "frequency search locked with pre-compensation {pre:e}: offset {:.1} ticks, relative frequency {:e}, significance {:.1}",
                        result.offset_ticks,
                        result.relative_frequency,
                        significance
                    );
                    return Ok(result);
                }
                Err(reason) => {
                    log::debug!("frequency search with pre-compensation {pre:e} failed: {reason}");
                    failures.push(format!("{pre:e}: {reason}"));
                }
            }
        }
        Err(SyncError::NoPeak {
            detail: format!(
                "every pre-compensation failed ({}); use more epochs, a coarser resolution or a wider pre-compensation range",
                failures.join("; ")
            ),
        })
    }

    /// One search from the pre-compensation `pre`: returns the correction of side H, the
    /// last significance and the last bin width in ticks, or why it failed.
    fn search(&mut self, a: &[f64], b: &[f64], pre: f64) -> Result<(Correction, f64, f64), String> {
        let p = &self.params;
        let bins = self.correlator.len() as f64;
        let coarse = p.coarse_resolution_ns * TICKS_PER_NS;
        let fine = p.fine_resolution_ns * TICKS_PER_NS;
        let separation_ticks = p.separation * coarse * bins;
        let (max_delay, max_frequency, threshold) =
            (p.max_delay_ticks, p.max_frequency, p.threshold);
        let (convergence, separation, frequency_threshold, max_wraps) = (
            p.convergence_rate,
            p.separation,
            p.frequency_threshold,
            p.max_wraps,
        );

        let mut correction = Correction {
            dt: 0.0,
            f: 1.0 + pre,
        };
        let mut r = coarse;
        let mut wraps = 1u32;
        let mut frequency_on = true;
        let mut iteration = 1u32;
        let mut fine_iterations = 0u32;
        // What the last step leaves to find; None before the first step, whose peak may
        // lie anywhere in the histogram.
        let mut residual: Option<Residual> = None;
        // The last accepted step, when it was at the fine width: the result to return if
        // a further refinement finds peaks that disagree with it.
        let mut fine_result: Option<(Correction, f64, f64)> = None;
        let last_a = *a.last().ok_or("no side L events after the origin")?;
        let last_b = *b.last().ok_or("no side H events after the origin")?;
        loop {
            let end = last_a.min((last_b - correction.dt) / correction.f);
            let spans = (wraps as f64).min((end / (r * bins)).floor().max(1.0));
            let span = spans * r * bins;
            let mut early = self.window_peak(a, b, correction, 0.0, span, r)?;
            if iteration == 1 {
                // Sum pairs of bins until the peak exceeds the threshold. The late window
                // and the next iteration then bin afresh at the wider bin width.
                let mut correlation = self.last_correlation();
                while early.significance < threshold {
                    if early.significance == 0.0 {
                        return Err("flat correlation (no events overlap in time)".into());
                    }
                    correlation = pairwise_sums(&correlation);
                    r *= 2.0;
                    if r > MAX_BIN_TICKS {
                        return Err(format!(
                            "no peak above {threshold} standard deviations up to a bin width of {} ns",
                            MAX_BIN_TICKS / TICKS_PER_NS
                        ));
                    }
                    early = peak_of(&correlation, r);
                }
            }
            if let Some(expected) = residual {
                let limit = expected.early_delay_limit(span, r);
                if early.delay.abs() > limit {
                    if wraps < max_wraps {
                        wraps += 1;
                        continue;
                    }
                    return fine_result.ok_or_else(|| {
                        format!(
                            "iteration {iteration} at {} ns bins found a delay of {:.0} ticks, but the previous step leaves at most {limit:.0}; the peak is noise",
                            r / TICKS_PER_NS,
                            early.delay
                        )
                    });
                }
            }
            if early.delay.abs() > max_delay {
                return Err(format!(
                    "delay {:.0} ticks exceeds the maximum {max_delay:.0}",
                    early.delay
                ));
            }

            let mut late_delay = early.delay;
            let mut df = 0.0;
            let late_span = spans * r * bins;
            if frequency_on {
                let late = self.window_peak(
                    a,
                    b,
                    correction,
                    separation_ticks,
                    separation_ticks + late_span,
                    r,
                )?;
                late_delay = late.delay;
                df = (late.delay - early.delay) / separation_ticks;
                if let Some(expected) = residual {
                    let limit = expected.delay_change_limit(separation_ticks, r);
                    if (late.delay - early.delay).abs() > limit {
                        if wraps < max_wraps {
                            wraps += 1;
                            continue;
                        }
                        return fine_result.ok_or_else(|| {
                            format!(
                                "iteration {iteration} at {} ns bins found the delay moving by {:.0} ticks between the windows, but the previous step leaves at most {limit:.0}; a peak is noise",
                                r / TICKS_PER_NS,
                                late.delay - early.delay
                            )
                        });
                    }
                }
            }
            if late_delay.abs() > max_delay {
                return Err(format!(
                    "late delay {late_delay:.0} ticks exceeds the maximum {max_delay:.0}"
                ));
            }

            // The early delay is an average over its window, so it belongs to the
            // window's middle. This step's rate carries it back to the origin.
            let delay_at_origin = early.delay - df * span / 2.0;
            correction.dt += correction.f * delay_at_origin;
            correction.f *= 1.0 + df;
            if (correction.f - 1.0).abs() >= max_frequency {
                return Err(format!(
                    "frequency offset {:e} exceeds the maximum {max_frequency:e}",
                    correction.f - 1.0
                ));
            }
            residual = Some(Residual::after_step(
                df,
                span,
                frequency_on.then_some(late_span),
                r,
                separation_ticks,
                residual,
            ));
            log::debug!(
                "iteration {iteration} at {} ns bins: delay {:.1} ticks, frequency step {df:e}, significance {:.1}",
                r / TICKS_PER_NS,
                early.delay,
                early.significance
            );
            if r <= fine {
                fine_iterations += 1;
                // At the fine width, repeat while the rate still moves by more than the
                // threshold; noise bounds how small the step gets, hence the cap.
                if !frequency_on
                    || df.abs() < frequency_threshold
                    || fine_iterations > MAX_FINE_ITERATIONS
                {
                    return Ok((correction, early.significance, r));
                }
                fine_result = Some((correction, early.significance, r));
            }
            if df.abs() < frequency_threshold {
                frequency_on = false;
            }
            r = (r * convergence / separation).max(fine);
            iteration += 1;
        }
    }

    /// Correlates the events of both sides inside `[start, stop)` (side H after the
    /// correction) at bin width `r` ticks.
    fn window_peak(
        &mut self,
        a: &[f64],
        b: &[f64],
        correction: Correction,
        start: f64,
        stop: f64,
        r: f64,
    ) -> Result<WindowPeak, String> {
        let a_window = &a[a.partition_point(|&x| x < start)..a.partition_point(|&x| x < stop)];
        let to_b = |x: f64| correction.dt + correction.f * x;
        let b_window =
            &b[b.partition_point(|&x| x < to_b(start))..b.partition_point(|&x| x < to_b(stop))];
        if a_window.is_empty() || b_window.is_empty() {
            return Err(format!(
                "no events of side {} between {:.3} s and {:.3} s after the origin; supply more epochs",
                if a_window.is_empty() { "L" } else { "H" },
                start / 8e9,
                stop / 8e9
            ));
        }
        let mask = (self.correlator.len() - 1) as u64;
        let correlation = self.correlator.correlate(
            |bins| {
                for &x in a_window {
                    bins[((x / r) as u64 & mask) as usize] += 1.0;
                }
            },
            |bins| {
                for &x in b_window {
                    let corrected = (x - correction.dt) / correction.f;
                    bins[((corrected / r) as u64 & mask) as usize] += 1.0;
                }
            },
        );
        Ok(peak_of(correlation, r))
    }

    fn last_correlation(&mut self) -> Vec<f64> {
        // The correlator keeps its last output in its first real buffer.
        self.correlator.last_output().to_vec()
    }
}

/// Times at or after `origin`, relative to it, as sorted `f64` ticks.
fn relative_sorted(times: &[u64], origin: u64) -> Vec<f64> {
    let mut out: Vec<f64> = times
        .iter()
        .filter(|&&t| t >= origin)
        .map(|&t| (t - origin) as f64)
        .collect();
    if !out.is_sorted() {
        out.sort_unstable_by(f64::total_cmp);
    }
    out
}

/// Sums neighbouring pairs of bins: the correlation at twice the bin width.
fn pairwise_sums(c: &[f64]) -> Vec<f64> {
    c.chunks_exact(2).map(|pair| pair[0] + pair[1]).collect()
}

/// Returns the delay of the first maximum (the upper half of the bins counts as negative
/// delays, the exact middle included) and its significance.
fn peak_of(c: &[f64], r: f64) -> WindowPeak {
    let n = c.len();
    let mut p = 0;
    for (i, &v) in c.iter().enumerate() {
        if v > c[p] {
            p = i;
        }
    }
    // Centroid of the three bins around the maximum, weights clipped at zero: events
    // whose true delay falls between two bin edges split between neighbouring bins.
    let prev = c[(p + n - 1) % n].max(0.0);
    let next = c[(p + 1) % n].max(0.0);
    let centre = c[p].max(0.0);
    let total = prev + centre + next;
    let fraction = if total > 0.0 {
        (next - prev) / total
    } else {
        0.0
    };
    let position = p as f64 + fraction;
    let delay = if p < n - p {
        position * r
    } else {
        (position - n as f64) * r
    };
    WindowPeak {
        delay,
        significance: significance(c, p),
    }
}

/// Height of bin `p` above the background in standard deviations. The background is the
/// bins from `p/2` to `(n + p)/2` without `p` itself, which keeps clear of the mirrored
/// neighbourhood of the peak.
fn significance(c: &[f64], p: usize) -> f64 {
    let n = c.len();
    let background = c[p / 2..p]
        .iter()
        .chain(&c[p + 1..((n + p) / 2 + 1).min(n)]);
    let (mut count, mut sum, mut sum_sq) = (0usize, 0.0, 0.0);
    for &v in background {
        count += 1;
        sum += v;
        sum_sq += v * v;
    }
    if count == 0 {
        return 0.0;
    }
    let mean = sum / count as f64;
    let variance = (sum_sq / count as f64 - mean * mean).max(0.0);
    if variance == 0.0 {
        return 0.0;
    }
    (c[p] - mean) / variance.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precompensations_reject_huge_counts() {
        assert_eq!(precompensations(1e-7, 2e-7).unwrap().len(), 5);
        assert_eq!(precompensations(0.0, 1e-6).unwrap(), vec![0.0]);
        assert_eq!(precompensations(1e-7, 0.0).unwrap(), vec![0.0]);
        assert!(precompensations(1e-9, 1.0).is_err());
        assert!(precompensations(1e-300, 1e300).is_err());
        assert!(precompensations(f64::NAN, 1e-6).is_err());
        assert!(precompensations(1e-7, f64::INFINITY).is_err());
        assert!(precompensations(-1e-7, 1e-6).is_err());
    }

    #[test]
    fn flip_flop_orders_by_distance() {
        let list = flip_flop(0.0, 1e-7, 2e-7);
        assert_eq!(list, vec![0.0, 1e-7, -1e-7, 2e-7, -2e-7]);
        assert_eq!(flip_flop(3e-7, 0.0, 1e-6), vec![3e-7]);
    }

    #[test]
    fn centroid_refines_delay_between_bins() {
        let mut c = vec![0.0; 64];
        c[10] = 3.0;
        c[11] = 1.0;
        let peak = peak_of(&c, 8.0);
        assert!((peak.delay - 10.25 * 8.0).abs() < 1e-9, "{}", peak.delay);
    }

    #[test]
    fn upper_half_is_negative_delay() {
        let mut c = vec![0.0; 64];
        c[60] = 5.0;
        assert_eq!(peak_of(&c, 1.0).delay, -4.0);
        let mut c = vec![0.0; 64];
        c[32] = 5.0;
        assert_eq!(peak_of(&c, 1.0).delay, -32.0);
    }

    #[test]
    fn flat_correlation_has_no_significance() {
        assert_eq!(significance(&[1.0; 16], 0), 0.0);
    }

    /// Side H events with pseudo-random gaps, and side L seeing every second one at
    /// `t_L = t0 + (t_H − t0)·(1 + drift) + offset`, plus as many unrelated events.
    fn drifted_pair(drift: f64, offset: f64) -> (Vec<u64>, Vec<u64>) {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let t0 = 1u64 << 40;
        let (mut high, mut low) = (Vec::new(), Vec::new());
        let mut t = t0;
        // 40 ms at about 2e6 events/s: gaps of 1 to 8000 ticks.
        while t < t0 + 320_000_000 {
            t += 1 + next() % 8000;
            high.push(t);
            if next() % 2 == 0 {
                let relative = (t - t0) as f64 * (1.0 + drift) + offset;
                low.push(t0 + relative.round() as u64);
            }
            low.push(t0 + next() % 320_000_000);
        }
        low.sort_unstable();
        (low, high)
    }

    #[test]
    fn search_recovers_synthetic_drift() {
        let params = FrequencySearchParams {
            buffer_order: 16,
            precompensations: vec![0.0],
            ..FrequencySearchParams::default()
        };
        let mut finder = FrequencyFinder::new(params).unwrap();
        for drift in [2e-5, -1e-5, 0.0] {
            let (low, high) = drifted_pair(drift, 3000.0);
            let found = finder.find(&low, &high).unwrap();
            // The 10.5 ms window separation and 4 ns bins resolve the rate to about 1e-7.
            assert!(
                (found.relative_frequency - drift).abs() < 2e-7,
                "drift {drift}: {found:?}"
            );
            assert!(
                (found.offset_ticks - 3000.0).abs() < 16.0,
                "drift {drift}: {found:?}"
            );
            assert_eq!(found.origin_ticks, low[0].max(high[0]));
        }
    }

    #[test]
    fn search_without_overlap_fails_clearly() {
        let params = FrequencySearchParams {
            buffer_order: 14,
            precompensations: vec![0.0],
            ..FrequencySearchParams::default()
        };
        let mut finder = FrequencyFinder::new(params).unwrap();
        let high: Vec<u64> = (0..1000u64).map(|i| i * 1000).collect();
        let low: Vec<u64> = (0..1000u64).map(|i| (1 << 40) | (i * 1000)).collect();
        let err = finder.find(&low, &high).unwrap_err();
        assert!(err.to_string().contains("no correlation peak"), "{err}");
    }

    #[test]
    fn precompensation_beyond_maximum_is_rejected() {
        let params = FrequencySearchParams {
            buffer_order: 12,
            precompensations: vec![1e-3],
            ..FrequencySearchParams::default()
        };
        let err = FrequencyFinder::new(params).err().unwrap();
        assert!(err.to_string().contains("pre-compensation"), "{err}");
    }
}
