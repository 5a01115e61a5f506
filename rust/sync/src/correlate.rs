//! Circular cross-correlation of two histograms by real FFTs, with plans and buffers
//! made once and reused for every call.
//!
//! For histograms `h` and `l` of length `Z = 2^order` the correlation is
//! `c[k] = Z · Σ_m (h[m] − mean h) · (l[(m + k) mod Z] − mean l)`, so a peak at `k` means
//! the events binned into `l` are `k` bins later than those binned into `h`. The factor
//! `Z` comes from the unnormalised forward and inverse transforms; every figure derived
//! from `c` here is a ratio, so it cancels. The means are removed by zeroing the DC term
//! of the cross spectrum, which equals subtracting them before the transform.
//!
//! Memory: one real buffer of `Z` doubles per histogram that is transformed at the same
//! time (one or two), two spectra of `Z/2 + 1` complex doubles and the FFT scratch space:
//! about `24·Z` bytes sequential, `32·Z` bytes with parallel transforms (256 MiB at order
//! 23, 2 GiB at order 26).

use std::sync::Arc;

use realfft::num_complex::Complex;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};

use crate::SyncError;

/// Smallest supported buffer order.
pub const MIN_ORDER: u32 = 12;
/// Largest supported buffer order; 2^27 bins need about 4 GiB of buffers.
pub const MAX_ORDER: u32 = 27;

/// How a correlator runs the two forward transforms of one correlation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transforms {
    /// One after the other, through one real buffer.
    Sequential,
    /// On two rayon tasks with a real buffer each (one task without the `parallel`
    /// feature).
    Parallel,
}

/// Reusable FFT plans and buffers for correlating histograms of `2^order` bins.
pub struct Correlator {
    order: u32,
    forward: Arc<dyn RealToComplex<f64>>,
    inverse: Arc<dyn ComplexToReal<f64>>,
    real_h: Vec<f64>,
    real_l: Vec<f64>,
    spectrum_h: Vec<Complex<f64>>,
    spectrum_l: Vec<Complex<f64>>,
    scratch_h: Vec<Complex<f64>>,
    scratch_l: Vec<Complex<f64>>,
}

impl Correlator {
    /// Plans the transforms and allocates the buffers for `2^order` bins, with parallel
    /// forward transforms.
    pub fn new(order: u32) -> Result<Self, SyncError> {
        Self::with_transforms(order, Transforms::Parallel)
    }

    /// Plans the transforms and allocates the buffers for `2^order` bins.
    pub fn with_transforms(order: u32, transforms: Transforms) -> Result<Self, SyncError> {
        if !(MIN_ORDER..=MAX_ORDER).contains(&order) {
            return Err(SyncError::InvalidParameter {
                name: "buffer order",
                value: order.to_string(),
                expected: format!("an integer from {MIN_ORDER} to {MAX_ORDER} (2^order FFT bins)"),
            });
        }
        let len = 1usize << order;
        let mut planner = RealFftPlanner::<f64>::new();
        let forward = planner.plan_fft_forward(len);
        let inverse = planner.plan_fft_inverse(len);
        let scratch_len = forward.get_scratch_len().max(inverse.get_scratch_len());
        let parallel = transforms == Transforms::Parallel;
        Ok(Correlator {
            order,
            real_h: forward.make_input_vec(),
            real_l: if parallel {
                forward.make_input_vec()
            } else {
                Vec::new()
            },
            spectrum_h: forward.make_output_vec(),
            spectrum_l: forward.make_output_vec(),
            scratch_h: vec![Complex::default(); scratch_len],
            scratch_l: if parallel {
                vec![Complex::default(); scratch_len]
            } else {
                Vec::new()
            },
            forward,
            inverse,
        })
    }

    /// Buffer order: the histograms have `2^order` bins.
    pub fn order(&self) -> u32 {
        self.order
    }

    /// Number of histogram bins, `2^order`.
    pub fn len(&self) -> usize {
        1 << self.order
    }

    /// Always false: a correlator has at least `2^12` bins.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The output of the last [`Correlator::correlate`] call (zeros before the first).
    pub fn last_output(&self) -> &[f64] {
        &self.real_h
    }

    /// Correlates two histograms filled by the callbacks and returns the correlation.
    ///
    /// Each callback receives a zeroed buffer of `len()` bins and adds its events' counts.
    /// With [`Transforms::Parallel`] and the `parallel` feature the two fills and forward
    /// transforms run on two rayon tasks. The returned slice stays valid until the next
    /// call.
    pub fn correlate<FH, FL>(&mut self, fill_h: FH, fill_l: FL) -> &[f64]
    where
        FH: FnOnce(&mut [f64]) + Send,
        FL: FnOnce(&mut [f64]) + Send,
    {
        let forward = self.forward.as_ref();
        let (real_h, spectrum_h, scratch_h) =
            (&mut self.real_h, &mut self.spectrum_h, &mut self.scratch_h);
        if self.real_l.is_empty() {
            fill_and_transform(forward, real_h, spectrum_h, scratch_h, fill_h);
            fill_and_transform(forward, real_h, &mut self.spectrum_l, scratch_h, fill_l);
        } else {
            let (real_l, spectrum_l, scratch_l) =
                (&mut self.real_l, &mut self.spectrum_l, &mut self.scratch_l);
            join(
                || fill_and_transform(forward, real_h, spectrum_h, scratch_h, fill_h),
                || fill_and_transform(forward, real_l, spectrum_l, scratch_l, fill_l),
            );
        }

        cross_spectrum(&mut self.spectrum_h, &self.spectrum_l);
        self.inverse
            .process_with_scratch(&mut self.spectrum_h, &mut self.real_h, &mut self.scratch_h)
            .expect("buffer lengths come from the plan and the DC and Nyquist terms are real");
        &self.real_h
    }
}

fn fill_and_transform(
    forward: &dyn RealToComplex<f64>,
    real: &mut [f64],
    spectrum: &mut [Complex<f64>],
    scratch: &mut [Complex<f64>],
    fill: impl FnOnce(&mut [f64]),
) {
    real.fill(0.0);
    fill(real);
    forward
        .process_with_scratch(real, spectrum, scratch)
        .expect("buffer lengths come from the plan");
}

/// Replaces `h` by `conj(h)·l`, with the DC term zeroed (mean removal) and the Nyquist
/// term made exactly real, as the inverse real transform requires.
fn cross_spectrum(h: &mut [Complex<f64>], l: &[Complex<f64>]) {
    let product = |(a, b): (&mut Complex<f64>, &Complex<f64>)| *a = a.conj() * b;
    #[cfg(feature = "parallel")]
    {
        use rayon::prelude::*;
        h.par_iter_mut()
            .zip(l.par_iter())
            .with_min_len(1 << 14)
            .for_each(product);
    }
    #[cfg(not(feature = "parallel"))]
    h.iter_mut().zip(l.iter()).for_each(product);
    h[0] = Complex::default();
    let last = h.len() - 1;
    h[last].im = 0.0;
}

#[cfg(feature = "parallel")]
pub(crate) fn join<A, B>(a: A, b: B)
where
    A: FnOnce() + Send,
    B: FnOnce() + Send,
{
    rayon::join(a, b);
}

#[cfg(not(feature = "parallel"))]
pub(crate) fn join<A, B>(a: A, b: B)
where
    A: FnOnce() + Send,
    B: FnOnce() + Send,
{
    a();
    b();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct O(Z²) evaluation of the mean-removed circular correlation.
    fn naive(h: &[f64], l: &[f64]) -> Vec<f64> {
        let z = h.len();
        let mh = h.iter().sum::<f64>() / z as f64;
        let ml = l.iter().sum::<f64>() / z as f64;
        (0..z)
            .map(|k| {
                let s: f64 = (0..z).map(|m| (h[m] - mh) * (l[(m + k) % z] - ml)).sum();
                s * z as f64
            })
            .collect()
    }

    #[test]
    fn fft_correlation_matches_naive_sum() {
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) % 5) as f64
        };
        let z = 1 << MIN_ORDER;
        let h: Vec<f64> = (0..z).map(|_| next()).collect();
        let l: Vec<f64> = (0..z).map(|_| next()).collect();
        let mut correlator = Correlator::new(MIN_ORDER).unwrap();
        let fast = correlator
            .correlate(|b| b.copy_from_slice(&h), |b| b.copy_from_slice(&l))
            .to_vec();
        let slow = naive(&h, &l);
        for k in [0, 1, 7, z / 2, z - 1] {
            assert!(
                (fast[k] - slow[k]).abs() < 1e-6 * slow[k].abs().max(1.0),
                "bin {k}"
            );
        }
    }

    #[test]
    fn sequential_and_parallel_transforms_agree() {
        let z = 1 << MIN_ORDER;
        let h: Vec<f64> = (0..z).map(|i| ((i * 7919) % 13) as f64).collect();
        let l: Vec<f64> = (0..z).map(|i| ((i * 104_729) % 11) as f64).collect();
        let mut parallel = Correlator::with_transforms(MIN_ORDER, Transforms::Parallel).unwrap();
        let mut sequential =
            Correlator::with_transforms(MIN_ORDER, Transforms::Sequential).unwrap();
        let a = parallel
            .correlate(|b| b.copy_from_slice(&h), |b| b.copy_from_slice(&l))
            .to_vec();
        let b = sequential
            .correlate(|b| b.copy_from_slice(&h), |b| b.copy_from_slice(&l))
            .to_vec();
        assert_eq!(a, b);
    }

    #[test]
    fn order_outside_range_is_rejected() {
        let err = Correlator::new(MAX_ORDER + 1).err().unwrap();
        assert!(err.to_string().contains("buffer order"), "{err}");
        assert!(Correlator::new(MIN_ORDER - 1).is_err());
    }
}
