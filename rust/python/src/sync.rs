//! Python bindings of the sync stage (crate qkd-sync): time offset (pfind), frequency and
//! time offset (the fpfind method) and frequency correction of a stream.

use std::path::PathBuf;

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use qkd_sync::frequency::precompensations;
use qkd_sync::{
    Deletion, FrequencyCorrector as CoreCorrector, FrequencyFinder as CoreFrequencyFinder,
    FrequencyOffset as CoreFrequencyOffset, FrequencySearchParams,
    OffsetFinder as CoreOffsetFinder, OffsetResult as CoreOffsetResult, PfindParams, TimeBase,
};

use crate::error::sync_error;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<OffsetFinder>()?;
    m.add_class::<OffsetResult>()?;
    m.add_class::<FrequencyFinder>()?;
    m.add_class::<FrequencyOffset>()?;
    m.add_class::<FrequencyCorrector>()?;
    m.add_function(wrap_pyfunction!(find_time_offset, m)?)?;
    m.add_function(wrap_pyfunction!(find_frequency_offset, m)?)?;
    Ok(())
}

/// The outcome of a time offset search (pfind).
///
/// offset_ticks is t_L - t_H in ticks of 1/8 ns (costream's -t); fine_snr and coarse_snr
/// are the peak heights over the standard deviation of the correlation; fine_position,
/// coarse_position and coarse_signed are the peak bins; coarse_offset_ticks the coarse
/// part of the offset; type1_events and type2_events the events binned per side.
#[pyclass(module = "qkd_core", frozen)]
pub struct OffsetResult {
    #[pyo3(get)]
    offset_ticks: i64,
    #[pyo3(get)]
    fine_snr: f64,
    #[pyo3(get)]
    coarse_snr: f64,
    #[pyo3(get)]
    fine_position: u64,
    #[pyo3(get)]
    coarse_position: u64,
    #[pyo3(get)]
    coarse_signed: i64,
    #[pyo3(get)]
    coarse_offset_ticks: i64,
    #[pyo3(get)]
    type1_events: u64,
    #[pyo3(get)]
    type2_events: u64,
    params: PfindParams,
}

impl OffsetResult {
    fn new(r: CoreOffsetResult, params: PfindParams) -> Self {
        OffsetResult {
            offset_ticks: r.offset_ticks,
            fine_snr: r.fine.snr,
            coarse_snr: r.coarse.snr,
            fine_position: r.fine.position,
            coarse_position: r.coarse.position,
            coarse_signed: r.coarse_signed,
            coarse_offset_ticks: r.coarse_offset_ticks,
            type1_events: r.type1_events,
            type2_events: r.type2_events,
            params,
        }
    }

    fn core(&self) -> CoreOffsetResult {
        CoreOffsetResult {
            offset_ticks: self.offset_ticks,
            fine: qkd_sync::Peak {
                position: self.fine_position,
                snr: self.fine_snr,
            },
            coarse: qkd_sync::Peak {
                position: self.coarse_position,
                snr: self.coarse_snr,
            },
            coarse_signed: self.coarse_signed,
            coarse_offset_ticks: self.coarse_offset_ticks,
            type1_events: self.type1_events,
            type2_events: self.type2_events,
        }
    }
}

#[pymethods]
impl OffsetResult {
    /// Return the result text the reference pfind prints with -V verbosity (0 to 3).
    fn report(&self, verbosity: i64) -> String {
        self.core().report(verbosity, &self.params)
    }

    /// Return the reference pfind's stderr line ("pfind: pos_f:..., ep:<start_epoch>").
    fn diagnostic_line(&self, start_epoch: u32) -> String {
        self.core().diagnostic_line(start_epoch)
    }

    fn __repr__(&self) -> String {
        format!(
            "OffsetResult(offset_ticks={}, fine_snr={:.2}, coarse_snr={:.2})",
            self.offset_ticks, self.fine_snr, self.coarse_snr
        )
    }
}

/// Time offset finder by FFT cross-correlation, as the reference pfind computes it.
///
/// OffsetFinder(buffer_order=17, fine_resolution_ns=2, coarse_resolution_ns=2048): 2^order
/// bins per histogram (12 to 27; about 48 * 2^order bytes of buffers, planned once), bin
/// widths in ns (powers of two). Reuse one finder for repeated searches.
#[pyclass(module = "qkd_core")]
pub struct OffsetFinder {
    inner: CoreOffsetFinder,
}

fn times_vec(times: &PyReadonlyArray1<'_, u64>) -> PyResult<Vec<u64>> {
    Ok(times.as_array().iter().copied().collect())
}

#[pymethods]
impl OffsetFinder {
    #[new]
    #[pyo3(signature = (buffer_order = 17, fine_resolution_ns = 2, coarse_resolution_ns = 2048))]
    fn new(
        py: Python<'_>,
        buffer_order: u32,
        fine_resolution_ns: u32,
        coarse_resolution_ns: u32,
    ) -> PyResult<Self> {
        let params = PfindParams {
            buffer_order,
            fine_resolution_ns,
            coarse_resolution_ns,
        };
        let inner = py
            .detach(|| CoreOffsetFinder::new(params))
            .map_err(|e| sync_error(py, e))?;
        Ok(OffsetFinder { inner })
    }

    /// Find t_L - t_H from type-1 times (side H) and type-2 times (side L), both uint64
    /// arrays of ticks of 1/8 ns.
    fn find(
        &mut self,
        py: Python<'_>,
        type1_times: PyReadonlyArray1<'_, u64>,
        type2_times: PyReadonlyArray1<'_, u64>,
    ) -> PyResult<OffsetResult> {
        let (t1, t2) = (times_vec(&type1_times)?, times_vec(&type2_times)?);
        let params = self.inner.params();
        let inner = &mut self.inner;
        let result = py
            .detach(|| inner.find(&t1, &t2))
            .map_err(|e| sync_error(py, e))?;
        Ok(OffsetResult::new(result, params))
    }

    /// Read epochs start_epoch .. start_epoch + epoch_count - 1 from type1_dir and
    /// type2_dir (files named by 8 hex digits) and find the offset. delete_type1 and
    /// delete_type2 remove each file once read (pfind -K and -k).
    #[pyo3(signature = (type1_dir, type2_dir, start_epoch, epoch_count, delete_type1 = false, delete_type2 = false))]
    #[allow(clippy::too_many_arguments)]
    fn find_in_folders(
        &mut self,
        py: Python<'_>,
        type1_dir: PathBuf,
        type2_dir: PathBuf,
        start_epoch: u32,
        epoch_count: u32,
        delete_type1: bool,
        delete_type2: bool,
    ) -> PyResult<OffsetResult> {
        let params = self.inner.params();
        let inner = &mut self.inner;
        let deletion = Deletion {
            type1: delete_type1,
            type2: delete_type2,
        };
        let result = py
            .detach(|| {
                inner.find_in_folders(&type1_dir, &type2_dir, start_epoch, epoch_count, deletion)
            })
            .map_err(|e| sync_error(py, e))?;
        Ok(OffsetResult::new(result, params))
    }
}

/// Find the time offset t_L - t_H over epochs start_epoch .. start_epoch + epoch_count - 1.
///
/// find_time_offset(type1_dir, type2_dir, start_epoch, epoch_count=4, buffer_order=23,
/// fine_resolution_ns=4, coarse_resolution_ns=32) -> OffsetResult. The defaults are the
/// reference server's pfind options. Raises FileNotFoundError for a missing epoch file,
/// FormatError for a bad one, SyncError when a side has no events, ValueError for bad
/// options.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (type1_dir, type2_dir, start_epoch, epoch_count = 4, buffer_order = 23, fine_resolution_ns = 4, coarse_resolution_ns = 32))]
fn find_time_offset(
    py: Python<'_>,
    type1_dir: PathBuf,
    type2_dir: PathBuf,
    start_epoch: u32,
    epoch_count: u32,
    buffer_order: u32,
    fine_resolution_ns: u32,
    coarse_resolution_ns: u32,
) -> PyResult<OffsetResult> {
    let params = PfindParams {
        buffer_order,
        fine_resolution_ns,
        coarse_resolution_ns,
    };
    let result = py
        .detach(|| {
            CoreOffsetFinder::new(params)?.find_in_folders(
                &type1_dir,
                &type2_dir,
                start_epoch,
                epoch_count,
                Deletion::default(),
            )
        })
        .map_err(|e| sync_error(py, e))?;
    Ok(OffsetResult::new(result, params))
}

/// The outcome of a frequency and time offset search.
///
/// With t0 = origin_ticks: t_L - t0 ~ (t_H - t0) * (1 + relative_frequency) + offset_ticks.
/// offset_ticks is a float (the search resolves below a bin); significance is the last
/// peak's height over its background in standard deviations; resolution_ns the last bin
/// width; precompensation the starting frequency that locked.
#[pyclass(module = "qkd_core", frozen, get_all)]
pub struct FrequencyOffset {
    offset_ticks: f64,
    relative_frequency: f64,
    significance: f64,
    origin_ticks: u64,
    resolution_ns: f64,
    precompensation: f64,
}

impl From<CoreFrequencyOffset> for FrequencyOffset {
    fn from(r: CoreFrequencyOffset) -> Self {
        FrequencyOffset {
            offset_ticks: r.offset_ticks,
            relative_frequency: r.relative_frequency,
            significance: r.significance,
            origin_ticks: r.origin_ticks,
            resolution_ns: r.resolution_ns,
            precompensation: r.precompensation,
        }
    }
}

#[pymethods]
impl FrequencyOffset {
    /// Return (offset_ticks, relative_frequency, significance).
    fn as_tuple(&self) -> (f64, f64, f64) {
        (
            self.offset_ticks,
            self.relative_frequency,
            self.significance,
        )
    }

    fn __repr__(&self) -> String {
        format!(
            "FrequencyOffset(offset_ticks={:.1}, relative_frequency={:e}, significance={:.1})",
            self.offset_ticks, self.relative_frequency, self.significance
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn frequency_params(
    buffer_order: u32,
    coarse_resolution_ns: f64,
    fine_resolution_ns: f64,
    separation: f64,
    threshold: f64,
    convergence_rate: f64,
    precompensation_step: f64,
    precompensation_max: f64,
) -> Result<FrequencySearchParams, qkd_sync::SyncError> {
    Ok(FrequencySearchParams {
        buffer_order,
        coarse_resolution_ns,
        fine_resolution_ns,
        separation,
        threshold,
        convergence_rate,
        precompensations: precompensations(precompensation_step, precompensation_max)?,
        ..FrequencySearchParams::default()
    })
}

/// Frequency and time offset finder (the fpfind method); plans its FFTs once.
///
/// FrequencyFinder(buffer_order=23, coarse_resolution_ns=32, fine_resolution_ns=4,
/// separation=5, threshold=6, convergence_rate=0.1, precompensation_step=1e-7,
/// precompensation_max=1e-6): the defaults are the reference server's fpfind options. The
/// late window starts separation coarse spans (coarse_resolution_ns * 2^buffer_order)
/// after the early one; when a search fails it is retried with side H pre-compensated by
/// 0, +step, -step, +2 step, ... up to +-precompensation_max, at most 1000 steps each way.
#[pyclass(module = "qkd_core")]
pub struct FrequencyFinder {
    inner: CoreFrequencyFinder,
}

#[pymethods]
impl FrequencyFinder {
    #[new]
    #[pyo3(signature = (buffer_order = 23, coarse_resolution_ns = 32.0, fine_resolution_ns = 4.0, separation = 5.0, threshold = 6.0, convergence_rate = 0.1, precompensation_step = 1e-7, precompensation_max = 1e-6))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        buffer_order: u32,
        coarse_resolution_ns: f64,
        fine_resolution_ns: f64,
        separation: f64,
        threshold: f64,
        convergence_rate: f64,
        precompensation_step: f64,
        precompensation_max: f64,
    ) -> PyResult<Self> {
        let params = frequency_params(
            buffer_order,
            coarse_resolution_ns,
            fine_resolution_ns,
            separation,
            threshold,
            convergence_rate,
            precompensation_step,
            precompensation_max,
        )
        .map_err(|e| sync_error(py, e))?;
        let inner = py
            .detach(|| CoreFrequencyFinder::new(params))
            .map_err(|e| sync_error(py, e))?;
        Ok(FrequencyFinder { inner })
    }

    /// Find the frequency and time offset from side L times (type-2, the reference) and
    /// side H times (type-1), both uint64 arrays of ticks of 1/8 ns covering at least
    /// (separation + 1) coarse spans.
    fn find(
        &mut self,
        py: Python<'_>,
        type2_times: PyReadonlyArray1<'_, u64>,
        type1_times: PyReadonlyArray1<'_, u64>,
    ) -> PyResult<FrequencyOffset> {
        let (l, h) = (times_vec(&type2_times)?, times_vec(&type1_times)?);
        let inner = &mut self.inner;
        let result = py
            .detach(|| inner.find(&l, &h))
            .map_err(|e| sync_error(py, e))?;
        Ok(result.into())
    }

    /// Read epochs start_epoch .. start_epoch + epoch_count - 1 of both folders and find
    /// the frequency and time offset.
    fn find_in_folders(
        &mut self,
        py: Python<'_>,
        type1_dir: PathBuf,
        type2_dir: PathBuf,
        start_epoch: u32,
        epoch_count: u32,
    ) -> PyResult<FrequencyOffset> {
        let inner = &mut self.inner;
        let result = py
            .detach(|| {
                let times = qkd_sync::epochs::read_epoch_range(
                    &type1_dir,
                    &type2_dir,
                    start_epoch,
                    epoch_count,
                    TimeBase::Continuous,
                    Deletion::default(),
                )?;
                inner.find(&times.type2, &times.type1)
            })
            .map_err(|e| sync_error(py, e))?;
        Ok(result.into())
    }
}

/// Find the frequency and time offset over epochs start_epoch .. + epoch_count - 1.
///
/// find_frequency_offset(type1_dir, type2_dir, start_epoch, epoch_count=5, **options) ->
/// FrequencyOffset, with the options of FrequencyFinder. Five epochs cover the server's
/// defaults (early and late windows 5 coarse spans of 0.27 s apart). Raises like
/// find_time_offset, and SyncError when no pre-compensation locks.
#[pyfunction]
#[pyo3(signature = (type1_dir, type2_dir, start_epoch, epoch_count = 5, buffer_order = 23, coarse_resolution_ns = 32.0, fine_resolution_ns = 4.0, separation = 5.0, threshold = 6.0, convergence_rate = 0.1, precompensation_step = 1e-7, precompensation_max = 1e-6))]
#[allow(clippy::too_many_arguments)]
fn find_frequency_offset(
    py: Python<'_>,
    type1_dir: PathBuf,
    type2_dir: PathBuf,
    start_epoch: u32,
    epoch_count: u32,
    buffer_order: u32,
    coarse_resolution_ns: f64,
    fine_resolution_ns: f64,
    separation: f64,
    threshold: f64,
    convergence_rate: f64,
    precompensation_step: f64,
    precompensation_max: f64,
) -> PyResult<FrequencyOffset> {
    let mut finder = FrequencyFinder::new(
        py,
        buffer_order,
        coarse_resolution_ns,
        fine_resolution_ns,
        separation,
        threshold,
        convergence_rate,
        precompensation_step,
        precompensation_max,
    )?;
    finder.find_in_folders(py, type1_dir, type2_dir, start_epoch, epoch_count)
}

/// Frequency correction of side H's events: t -> t + floor((t - origin) * relative_frequency).
///
/// FrequencyCorrector(relative_frequency, origin_ticks=None): with no origin the first
/// corrected time becomes it. Pass a FrequencyOffset's relative_frequency and origin_ticks;
/// its offset_ticks then applies to the corrected times. Results do not depend on how the
/// stream is cut into calls.
#[pyclass(module = "qkd_core")]
pub struct FrequencyCorrector {
    inner: CoreCorrector,
}

#[pymethods]
impl FrequencyCorrector {
    #[new]
    #[pyo3(signature = (relative_frequency, origin_ticks = None))]
    fn new(py: Python<'_>, relative_frequency: f64, origin_ticks: Option<u64>) -> PyResult<Self> {
        let inner =
            CoreCorrector::new(relative_frequency, origin_ticks).map_err(|e| sync_error(py, e))?;
        Ok(FrequencyCorrector { inner })
    }

    /// The rate in force after rounding to the fixed-point step (2^-40).
    #[getter]
    fn relative_frequency(&self) -> f64 {
        self.inner.relative_frequency()
    }

    /// Change the rate from time at_ticks on, continuing the correction reached there.
    fn set_frequency(
        &mut self,
        py: Python<'_>,
        relative_frequency: f64,
        at_ticks: u64,
    ) -> PyResult<()> {
        self.inner
            .set_frequency(relative_frequency, at_ticks)
            .map_err(|e| sync_error(py, e))
    }

    /// Return corrected copies of times (uint64 ticks of 1/8 ns).
    fn correct_times<'py>(
        &mut self,
        py: Python<'py>,
        times: PyReadonlyArray1<'py, u64>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let mut out = times_vec(&times)?;
        let inner = &mut self.inner;
        py.detach(|| inner.correct_times(&mut out));
        Ok(out.into_pyarray(py))
    }

    /// Return corrected copies of raw event words (uint64; the 49-bit time in bits 63..15
    /// is corrected, bits 14..0 are kept).
    fn correct_words<'py>(
        &mut self,
        py: Python<'py>,
        words: PyReadonlyArray1<'py, u64>,
    ) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let mut out = times_vec(&words)?;
        let inner = &mut self.inner;
        py.detach(|| inner.correct_words(&mut out));
        Ok(out.into_pyarray(py))
    }
}
