//! Python bindings of the coincidences stage (crate qkd-coincidences): the costream and
//! splicer stage objects and the per-epoch rate and QBER figures.

use std::path::PathBuf;

use numpy::PyReadonlyArray1;
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use qkd_coincidences::{
    splice, stats, ClosedEpoch, CoincidenceError, Costream as CoreCostream, CostreamConfig,
    CostreamFolders, Need, SplicedEpoch as CoreSplicedEpoch, SplicerProtocol, ZeroPolicy,
};
use qkd_formats::epoch::{file_path, write_atomic};
use qkd_sync::FrequencyCorrector;

use crate::error::{format_error, sync_error, FormatError};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Costream>()?;
    m.add_class::<CostreamEpoch>()?;
    m.add_class::<Splicer>()?;
    m.add_class::<SplicedEpoch>()?;
    m.add("HISTOGRAM_BINS", qkd_coincidences::HISTOGRAM_BINS)?;
    m.add(
        "HISTOGRAM_FIRST_TICK",
        qkd_coincidences::HISTOGRAM_FIRST_TICK,
    )?;
    m.add_function(wrap_pyfunction!(service_qber, m)?)?;
    m.add_function(wrap_pyfunction!(detector_counts, m)?)?;
    Ok(())
}

/// Maps a costream or splicer error and attaches the reference program's exit status as
/// `exit_status`: bad settings become `ValueError`, a missing input `FileNotFoundError`,
/// other I/O `OSError`, bad file content `FormatError`.
fn coincidence_error(err: CoincidenceError) -> PyErr {
    let status = err.exit_status();
    let py_err = match &err {
        CoincidenceError::InvalidOption { .. } => PyValueError::new_err(err.to_string()),
        CoincidenceError::MissingInput { .. } => PyFileNotFoundError::new_err(err.to_string()),
        CoincidenceError::Io { .. } => PyOSError::new_err(err.to_string()),
        _ => FormatError::new_err(err.to_string()),
    };
    Python::attach(|py| {
        // Setting an attribute on a fresh exception instance cannot fail in practice;
        // the error itself matters more than its status, so a failure is ignored.
        let _ = py_err.value(py).setattr("exit_status", status);
    });
    py_err
}

fn need_tuple(need: Need) -> (&'static str, Option<u32>) {
    match need {
        Need::Type1(e) => ("type1", Some(e)),
        Need::Type2(e) => ("type2", Some(e)),
        Need::Done => ("done", None),
    }
}

fn zero_policy(value: i64) -> PyResult<ZeroPolicy> {
    match value {
        0 => Ok(ZeroPolicy::NoFiles),
        1 => Ok(ZeroPolicy::Type4Only),
        2 => Ok(ZeroPolicy::BothFiles),
        other => Err(PyValueError::new_err(format!(
            "invalid zero_policy {other}: expected 0 (no files), 1 (type-4 only) or 2 (both files)"
        ))),
    }
}

/// Results of one epoch closed by `Costream`.
///
/// Attributes: epoch, type2_events, kept (type-4 entries), tests, key_events,
/// type4_width (used for this epoch), next_type4_width, tracked_drift (ticks, `ft`),
/// accidentals, coincidences, type1_events (header length of the last type-1 file read),
/// width_servo (None or (long_width, optimal_width, average_distance)), the files as
/// bytes or None when the zero policy skips them: type4, type3 (raw key), type5, and
/// log_fields, the fields of the server's log line (epoch, type2_events, kept,
/// next_type4_width, tracked_drift, accidentals, coincidences, type1_events).
/// histogram: examined pairs per time difference from the tracked offset, a list of
/// HISTOGRAM_BINS counts of 1 tick starting at HISTOGRAM_FIRST_TICK ticks. key_bases:
/// protocol 1 only, bytes with the basis (0 H/V, 1 diagonal) of each raw key bit.
#[pyclass(module = "qkd_core", frozen, get_all)]
pub struct CostreamEpoch {
    epoch: u32,
    type2_events: u32,
    kept: u32,
    tests: u32,
    key_events: u32,
    type4_width: u32,
    next_type4_width: u32,
    tracked_drift: i64,
    accidentals: u32,
    coincidences: u32,
    type1_events: u32,
    histogram: Vec<u32>,
    key_bases: Py<PyBytes>,
    width_servo: Option<(i32, i32, u32)>,
    type4: Option<Py<PyBytes>>,
    type3: Option<Py<PyBytes>>,
    type5: Option<Py<PyBytes>>,
    log_fields: (u32, u32, u32, u32, i64, u32, u32, u32),
}

#[pymethods]
impl CostreamEpoch {
    /// Return the reference costream's log line for verbosity 0..=5 (with newline), or
    /// None for levels that print nothing.
    fn log_line(&self, verbosity: i32) -> Option<String> {
        self.to_core().log_line(verbosity)
    }

    fn __repr__(&self) -> String {
        format!(
            "CostreamEpoch(epoch=0x{:08x}, type2_events={}, kept={}, coincidences={}, accidentals={}, tracked_drift={})",
            self.epoch,
            self.type2_events,
            self.kept,
            self.coincidences,
            self.accidentals,
            self.tracked_drift
        )
    }
}

impl CostreamEpoch {
    fn from_core(py: Python<'_>, e: ClosedEpoch) -> CostreamEpoch {
        let bytes = |b: &Option<Vec<u8>>| b.as_ref().map(|b| PyBytes::new(py, b).unbind());
        CostreamEpoch {
            epoch: e.epoch,
            type2_events: e.type2_events,
            kept: e.kept,
            tests: e.tests,
            key_events: e.key_events(),
            type4_width: e.type4_width,
            next_type4_width: e.next_type4_width,
            tracked_drift: e.tracked_drift,
            accidentals: e.accidentals,
            coincidences: e.coincidences,
            type1_events: e.type1_events,
            key_bases: PyBytes::new(py, &e.key_bases).unbind(),
            histogram: e.histogram,
            width_servo: e
                .width_servo
                .map(|s| (s.long_width, s.optimal_width, s.average_distance)),
            type4: bytes(&e.type4),
            type3: bytes(&e.type3),
            type5: bytes(&e.type5),
            log_fields: (
                e.epoch,
                e.type2_events,
                e.kept,
                e.next_type4_width,
                e.tracked_drift,
                e.accidentals,
                e.coincidences,
                e.type1_events,
            ),
        }
    }

    /// The fields the log line needs; the files are not needed for it.
    fn to_core(&self) -> ClosedEpoch {
        ClosedEpoch {
            epoch: self.epoch,
            type2_events: self.type2_events,
            kept: self.kept,
            tests: self.tests,
            type4_width: self.type4_width,
            next_type4_width: self.next_type4_width,
            tracked_drift: self.tracked_drift,
            accidentals: self.accidentals,
            coincidences: self.coincidences,
            type1_events: self.type1_events,
            histogram: Vec::new(),
            key_bases: Vec::new(),
            width_servo: None,
            type4: None,
            type3: None,
            type5: None,
        }
    }
}

/// Coincidence matching, clock tracking and sifting on the high-count side.
///
/// Costream(start_epoch, time_offset=17, *, epoch_count=0, protocol=1,
///          coincidence_window=8, tracking_window=40, accidental_distance=160,
///          track_filter=0, width_filter=0, zero_policy=1, skews=(0, 0, 0, 0),
///          type5_output=False, relative_frequency=0.0, frequency_origin_ticks=None,
///          servo_remainder=False)
///
/// Times and windows are in ticks of 1/8 ns; time_offset is t_L - t_H (pfind's result).
/// A non-zero relative_frequency rescales the type-1 times before matching, as
/// FrequencyCorrector(relative_frequency, frequency_origin_ticks) does; pass a
/// FrequencyOffset's relative_frequency, origin_ticks and rounded offset_ticks.
/// track_filter > 0 averages the clock servo over that many pairs, < 0 gives its time
/// constant in -µs, 0 turns it off. servo_remainder=True carries each time-constant
/// servo step's division remainder into the next step instead of truncating the step
/// as the reference does; the reference's truncation loses the steps of the pairs near
/// the peak at about 1e6 pairs per epoch, and the offset then walks off the peak.
/// width_filter adapts the type-4 width (0: fixed at 8).
/// zero_policy: 0 no files for epochs without kept events, 1 only a type-4 file, 2 both.
/// epoch_count 0 runs without end.
///
/// Feed whole files in epoch order with push_type1(bytes) and push_type2(bytes), then
/// call advance(); or let step_folders(...) read and write epoch folders. Closing type-2
/// epoch e needs type-1 events past its end, so type-1 files run about one epoch ahead.
/// Heavy calls release the GIL. Errors carry `exit_status`, the reference's status.
#[pyclass(module = "qkd_core")]
pub struct Costream {
    inner: CoreCostream,
}

#[pymethods]
impl Costream {
    #[new]
    #[pyo3(signature = (
        start_epoch,
        time_offset = 17,
        *,
        epoch_count = 0,
        protocol = 1,
        coincidence_window = 8,
        tracking_window = 40,
        accidental_distance = 160,
        track_filter = 0,
        width_filter = 0,
        zero_policy = 1,
        skews = (0, 0, 0, 0),
        type5_output = false,
        relative_frequency = 0.0,
        frequency_origin_ticks = None,
        servo_remainder = false,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        start_epoch: u32,
        time_offset: i64,
        epoch_count: u32,
        protocol: i64,
        coincidence_window: i64,
        tracking_window: i64,
        accidental_distance: i64,
        track_filter: i64,
        width_filter: i32,
        zero_policy: i64,
        skews: (i64, i64, i64, i64),
        type5_output: bool,
        relative_frequency: f64,
        frequency_origin_ticks: Option<u64>,
        servo_remainder: bool,
    ) -> PyResult<Costream> {
        let frequency_correction = if relative_frequency == 0.0 {
            None
        } else {
            Some(
                FrequencyCorrector::new(relative_frequency, frequency_origin_ticks)
                    .map_err(|e| sync_error(py, e))?,
            )
        };
        let config = CostreamConfig {
            start_epoch,
            epoch_count,
            time_offset,
            coincidence_window,
            tracking_window,
            accidental_distance,
            track_filter,
            protocol,
            width_filter,
            zero_policy: self::zero_policy(zero_policy)?,
            skews: [skews.0, skews.1, skews.2, skews.3],
            type5_output,
            frequency_correction,
            servo_remainder,
        };
        let inner = CoreCostream::new(config).map_err(coincidence_error)?;
        Ok(Costream { inner })
    }

    /// Queue the type-1 file of epoch `next_type1_epoch` (its bytes).
    fn push_type1(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let inner = &mut self.inner;
        py.detach(|| inner.push_type1(data))
            .map_err(coincidence_error)
    }

    /// Queue the type-2 file of epoch `next_type2_epoch` (its bytes).
    fn push_type2(&mut self, py: Python<'_>, data: &[u8]) -> PyResult<()> {
        let inner = &mut self.inner;
        py.detach(|| inner.push_type2(data))
            .map_err(coincidence_error)
    }

    /// Queue epoch `next_type2_epoch` without events and return that epoch, in place of
    /// a type-2 file that never arrived or that push_type2 rejected.
    ///
    /// The epoch closes with no coincidences and an empty raw key. With zero_policy=2
    /// its type-4 file contains only the end entry, so the peer's splicer takes no bits
    /// from it either. The reference costream has no such step.
    fn skip_type2(&mut self) -> u32 {
        self.inner.skip_type2()
    }

    /// Queue epoch `next_type1_epoch` without events and return that epoch, in place of
    /// a type-1 file that push_type1 rejected or that chopper2 never wrote.
    ///
    /// The peer's type-2 events of that epoch find no partner, apart from pairs across
    /// its edges. Its type-4 file lists only the pairs found, so the peer's splicer takes
    /// the same bits as this side.
    /// The reference costream has no such step.
    fn skip_type1(&mut self) -> u32 {
        self.inner.skip_type1()
    }

    /// Match the queued files until one is missing or the run is done.
    ///
    /// Returns (closed, need, epoch): the list of CostreamEpoch closed on the way, then
    /// "type1" or "type2" with the epoch whose file is needed next, or ("done", None).
    #[allow(clippy::type_complexity)]
    fn advance(
        &mut self,
        py: Python<'_>,
    ) -> PyResult<(Vec<CostreamEpoch>, &'static str, Option<u32>)> {
        let inner = &mut self.inner;
        let (closed, need) = py
            .detach(|| {
                let mut closed = Vec::new();
                inner.advance(&mut closed).map(|need| (closed, need))
            })
            .map_err(coincidence_error)?;
        let (kind, epoch) = need_tuple(need);
        let closed = closed
            .into_iter()
            .map(|e| CostreamEpoch::from_core(py, e))
            .collect();
        Ok((closed, kind, epoch))
    }

    /// Read epoch files from folders and write the outputs until a file is missing.
    ///
    /// step_folders(type1_dir, type2_dir, type3_dir, type4_dir, type5_dir=None,
    ///              delete_type1=False, delete_type2=False) -> (closed, need, epoch)
    ///
    /// Files are named by 8 hex digits; outputs are written atomically, type-4 before
    /// type-3. Never waits: the caller decides how long to wait for the missing file.
    #[pyo3(signature = (type1_dir, type2_dir, type3_dir, type4_dir, type5_dir = None, delete_type1 = false, delete_type2 = false))]
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn step_folders(
        &mut self,
        py: Python<'_>,
        type1_dir: PathBuf,
        type2_dir: PathBuf,
        type3_dir: PathBuf,
        type4_dir: PathBuf,
        type5_dir: Option<PathBuf>,
        delete_type1: bool,
        delete_type2: bool,
    ) -> PyResult<(Vec<CostreamEpoch>, &'static str, Option<u32>)> {
        let folders = CostreamFolders {
            type1: type1_dir,
            type2: type2_dir,
            type3: type3_dir,
            type4: type4_dir,
            type5: type5_dir,
            delete_type1,
            delete_type2,
        };
        let inner = &mut self.inner;
        let (closed, need) = py
            .detach(|| folders.step(inner))
            .map_err(coincidence_error)?;
        let (kind, epoch) = need_tuple(need);
        let closed = closed
            .into_iter()
            .map(|e| CostreamEpoch::from_core(py, e))
            .collect();
        Ok((closed, kind, epoch))
    }

    /// Epoch of the next type-1 file to push.
    #[getter]
    fn next_type1_epoch(&self) -> u32 {
        self.inner.next_type1_epoch()
    }

    /// Epoch of the next type-2 file to push.
    #[getter]
    fn next_type2_epoch(&self) -> u32 {
        self.inner.next_type2_epoch()
    }

    /// Offset t_L - t_H in ticks in use now (time_offset minus the tracked drift).
    #[getter]
    fn current_offset(&self) -> i64 {
        self.inner.current_offset()
    }

    /// Tracked drift `ft` in ticks.
    #[getter]
    fn tracked_drift(&self) -> i64 {
        self.inner.tracked_drift()
    }
}

/// Results of one epoch spliced by `Splicer`.
///
/// Attributes: epoch, key_events, tests, type3 (raw-key file bytes), type5 (bytes or
/// None).
#[pyclass(module = "qkd_core", frozen, get_all)]
pub struct SplicedEpoch {
    epoch: u32,
    key_events: u32,
    tests: u32,
    type3: Py<PyBytes>,
    type5: Option<Py<PyBytes>>,
}

#[pymethods]
impl SplicedEpoch {
    /// Return the reference splicer's log line for verbosity 0..=2 (with newline), or
    /// None for levels that print nothing.
    fn log_line(&self, verbosity: i32) -> Option<String> {
        let core = CoreSplicedEpoch {
            epoch: self.epoch,
            key_events: self.key_events,
            tests: self.tests,
            type3: Vec::new(),
            type5: None,
        };
        core.log_line(verbosity)
    }

    fn __repr__(&self) -> String {
        format!(
            "SplicedEpoch(epoch=0x{:08x}, key_events={}, tests={})",
            self.epoch, self.key_events, self.tests
        )
    }
}

impl SplicedEpoch {
    fn from_core(py: Python<'_>, s: CoreSplicedEpoch) -> SplicedEpoch {
        SplicedEpoch {
            epoch: s.epoch,
            key_events: s.key_events,
            tests: s.tests,
            type3: PyBytes::new(py, &s.type3).unbind(),
            type5: s.type5.map(|b| PyBytes::new(py, &b).unbind()),
        }
    }
}

/// Final sifting on the low-count side: chopper's type-3 file and the peer's type-4 file
/// of the same epoch give the raw key.
///
/// Splicer(protocol=1, *, type5_output=False)
///
/// splice(epoch, type3, type4) works on bytes; splice_folders(...) reads and writes
/// epoch folders. Both release the GIL. Errors carry `exit_status`.
#[pyclass(module = "qkd_core", frozen)]
pub struct Splicer {
    protocol: SplicerProtocol,
    type5_output: bool,
}

#[pymethods]
impl Splicer {
    #[new]
    #[pyo3(signature = (protocol = 1, *, type5_output = false))]
    fn new(protocol: i64, type5_output: bool) -> PyResult<Splicer> {
        let protocol = SplicerProtocol::new(protocol).map_err(coincidence_error)?;
        Ok(Splicer {
            protocol,
            type5_output,
        })
    }

    /// Splice one epoch from the bytes of the type-3 and type-4 files.
    fn splice(
        &self,
        py: Python<'_>,
        epoch: u32,
        type3: &[u8],
        type4: &[u8],
    ) -> PyResult<SplicedEpoch> {
        let spliced = py
            .detach(|| splice(epoch, type3, type4, &self.protocol, self.type5_output))
            .map_err(coincidence_error)?;
        Ok(SplicedEpoch::from_core(py, spliced))
    }

    /// Splice one epoch from folders and write the raw key (and type-5 file) atomically.
    ///
    /// splice_folders(epoch, type3_dir, type4_dir, out_dir, type5_dir=None,
    ///                delete_type3=False, delete_type4=False) -> SplicedEpoch
    ///
    /// A missing input raises FileNotFoundError; no output is written then.
    #[pyo3(signature = (epoch, type3_dir, type4_dir, out_dir, type5_dir = None, delete_type3 = false, delete_type4 = false))]
    #[allow(clippy::too_many_arguments)]
    fn splice_folders(
        &self,
        py: Python<'_>,
        epoch: u32,
        type3_dir: PathBuf,
        type4_dir: PathBuf,
        out_dir: PathBuf,
        type5_dir: Option<PathBuf>,
        delete_type3: bool,
        delete_type4: bool,
    ) -> PyResult<SplicedEpoch> {
        if self.type5_output && type5_dir.is_none() {
            return Err(PyValueError::new_err(
                "this Splicer writes test events: give type5_dir",
            ));
        }
        let spliced = py
            .detach(|| -> Result<CoreSplicedEpoch, PyErrSource> {
                let type3_path = file_path(&type3_dir, epoch);
                let type4_path = file_path(&type4_dir, epoch);
                let type3 = read_input(&type3_path, qkd_coincidences::Stream::Type3, epoch)?;
                let type4 = read_input(&type4_path, qkd_coincidences::Stream::Type4, epoch)?;
                let spliced = splice(epoch, &type3, &type4, &self.protocol, self.type5_output)?;
                write_atomic(&file_path(&out_dir, epoch), &spliced.type3)?;
                if let (Some(dir), Some(bytes)) = (&type5_dir, &spliced.type5) {
                    write_atomic(&file_path(dir, epoch), bytes)?;
                }
                for (delete, path) in [(delete_type3, &type3_path), (delete_type4, &type4_path)] {
                    if delete {
                        std::fs::remove_file(path).map_err(|e| CoincidenceError::Io {
                            path: path.clone(),
                            source: e,
                        })?;
                    }
                }
                Ok(spliced)
            })
            .map_err(PyErrSource::into_py_err)?;
        Ok(SplicedEpoch::from_core(py, spliced))
    }
}

/// Either error of a folder splice, converted to Python after the GIL is back.
enum PyErrSource {
    Coincidence(CoincidenceError),
    Format(qkd_formats::FormatError),
}

impl From<CoincidenceError> for PyErrSource {
    fn from(e: CoincidenceError) -> Self {
        PyErrSource::Coincidence(e)
    }
}

impl From<qkd_formats::FormatError> for PyErrSource {
    fn from(e: qkd_formats::FormatError) -> Self {
        PyErrSource::Format(e)
    }
}

impl PyErrSource {
    fn into_py_err(self) -> PyErr {
        match self {
            PyErrSource::Coincidence(e) => coincidence_error(e),
            PyErrSource::Format(e) => format_error(e),
        }
    }
}

fn read_input(
    path: &std::path::Path,
    stream: qkd_coincidences::Stream,
    epoch: u32,
) -> Result<Vec<u8>, CoincidenceError> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            CoincidenceError::MissingInput {
                stream,
                epoch,
                path: path.to_path_buf(),
            }
        } else {
            CoincidenceError::Io {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

/// Count a service-mode (protocol 0) raw-key file: the 4x4 matrix of detector pairs
/// (rows: low-count side V, -45, H, +45; columns: high-count side) and QBER per basis.
///
/// Returns a dict: matrix (list of 4 lists), valid, invalid_low, invalid_high, qber,
/// qber_hv, qber_diagonal. QBER values are 1.0 when there are no valid entries.
#[pyfunction]
fn service_qber<'py>(py: Python<'py>, type3: &[u8]) -> PyResult<Bound<'py, PyDict>> {
    let m = py
        .detach(|| stats::ServiceMatrix::from_type3(type3))
        .map_err(coincidence_error)?;
    let d = PyDict::new(py);
    d.set_item("matrix", m.counts.map(|row| row.to_vec()).to_vec())?;
    d.set_item("valid", m.valid)?;
    d.set_item("invalid_low", m.invalid_low)?;
    d.set_item("invalid_high", m.invalid_high)?;
    d.set_item("qber", m.qber())?;
    d.set_item("qber_hv", m.qber_hv())?;
    d.set_item("qber_diagonal", m.qber_diagonal())?;
    Ok(d)
}

/// Count detector patterns of raw event words (uint64 array) as getrate does.
///
/// Returns (total, counts): total events with a non-zero pattern, and the counts of the
/// exact patterns 1, 2, 4, 8, 3, 6, 12, 9 (detectors 1..4, then the pairs 1+2, 2+3,
/// 3+4, 4+1).
#[pyfunction]
fn detector_counts(py: Python<'_>, events: PyReadonlyArray1<'_, u64>) -> PyResult<(u64, [u64; 8])> {
    let events = events.as_slice()?;
    let counts = py.detach(|| stats::detector_counts(events));
    Ok((counts.total, counts.patterns))
}
