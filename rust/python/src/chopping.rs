//! Python bindings of the chopping stage: `qkd_core.Chopper` (low-count side, type-2 and
//! type-3 files) and `qkd_core.Chopper2` (high-count side, type-1 files).
//!
//! Both are fed batches of events and return one dict per epoch finished and written
//! during the call:
//! `{"epoch": int, "name": "0000abcd", "events": int, "time_order": int | None,
//!   "patterns": list of 16 ints (events per detector pattern), "log_line": str | None}`.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use numpy::{PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};
use qkd_chopping::{
    ChopError as CoreChopError, ChopStats, Chopper as CoreChopper, Chopper2 as CoreChopper2,
    Chopper2Config, ChopperConfig, Destination, EpochSummary,
};

use crate::error::{format_error, ChopError};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Chopper>()?;
    m.add_class::<Chopper2>()?;
    Ok(())
}

/// Maps a chopping error: bad options become `ValueError`, file trouble `OSError` or
/// `FormatError`, epoch jumps and use after an error `ChopError`.
pub fn chop_error(err: CoreChopError) -> PyErr {
    match err {
        CoreChopError::Config(_) => PyValueError::new_err(err.to_string()),
        CoreChopError::Format(inner) => format_error(inner),
        CoreChopError::EpochJump { .. } | CoreChopError::Stopped => {
            ChopError::new_err(err.to_string())
        }
    }
}

/// Extracts a 1-D numpy array of exactly dtype `T`, with a message naming the argument.
pub(crate) fn typed_array<'py, T: numpy::Element>(
    value: &Bound<'py, PyAny>,
    name: &str,
    dtype: &str,
) -> PyResult<PyReadonlyArray1<'py, T>> {
    value.extract::<PyReadonlyArray1<'py, T>>().map_err(|_| {
        let got = match value.cast::<numpy::PyUntypedArray>() {
            Ok(a) => format!("a {}-D array of dtype {}", a.ndim(), a.dtype()),
            Err(_) => format!("{}", value.get_type()),
        };
        PyTypeError::new_err(format!(
            "{name} must be a 1-D numpy array of dtype {dtype}, got {got}; convert with np.asarray({name}, dtype=np.{dtype})"
        ))
    })
}

/// Builds event words `time << 15 | pattern` from ticks and 4-bit patterns.
/// Packs times and patterns into raw event words in `words`, which is cleared first. The
/// caller keeps `words` between batches, so a batch of a few million events does not map
/// fresh pages each time. Those page faults were a large part of the link's kernel time.
fn fill_event_words(times: &[u64], patterns: &[u8], words: &mut Vec<u64>) -> PyResult<()> {
    if times.len() != patterns.len() {
        return Err(PyValueError::new_err(format!(
            "times and patterns differ in length: {} and {}",
            times.len(),
            patterns.len()
        )));
    }
    if let Some(i) = patterns.iter().position(|&p| p > 0xF) {
        return Err(PyValueError::new_err(format!(
            "pattern {} at index {i} is above 15; a detector pattern has 4 bits",
            patterns[i]
        )));
    }
    words.clear();
    words.extend(
        times
            .iter()
            .zip(patterns)
            .map(|(&t, &p)| ((t & qkd_formats::raw::TIME_MASK) << 15) | u64::from(p)),
    );
    Ok(())
}

fn summary_dict<'py>(py: Python<'py>, s: &EpochSummary) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("epoch", s.epoch)?;
    d.set_item("name", format!("{:08x}", s.epoch))?;
    d.set_item("events", s.events)?;
    d.set_item("time_order", s.time_order)?;
    d.set_item("patterns", s.patterns.to_vec())?;
    d.set_item("log_line", s.log_line.as_deref())?;
    Ok(d)
}

pub(crate) fn summaries<'py>(
    py: Python<'py>,
    list: &[EpochSummary],
) -> PyResult<Bound<'py, PyList>> {
    let out = PyList::empty(py);
    for s in list {
        out.append(summary_dict(py, s)?)?;
    }
    Ok(out)
}

fn stats_dict<'py>(py: Python<'py>, s: &ChopStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("events_in", s.events_in)?;
    d.set_item("accepted", s.accepted)?;
    d.set_item("dropped_backward", s.dropped_backward)?;
    d.set_item("dropped_gap", s.dropped_gap)?;
    d.set_item("dropped_epoch_jump", s.dropped_epoch_jump)?;
    d.set_item("dropped_not_after_previous", s.dropped_not_after_previous)?;
    d.set_item("dropped_after_flush", s.dropped_after_flush)?;
    d.set_item("epochs_written", s.epochs_written)?;
    Ok(d)
}

/// Picks the destination from a folder or a single file, exactly one of them.
fn destination(dir: Option<PathBuf>, file: Option<PathBuf>, what: &str) -> PyResult<Destination> {
    match (dir, file) {
        (Some(dir), None) => Destination::directory(dir).map_err(format_error),
        (None, Some(file)) => Destination::single_file(&file).map_err(format_error),
        (None, None) => Err(PyValueError::new_err(format!(
            "no {what} destination: pass {what}_dir (one file per epoch) or {what}_file"
        ))),
        (Some(_), Some(_)) => Err(PyValueError::new_err(format!(
            "{what}_dir and {what}_file given; pass only one of them"
        ))),
    }
}

fn lock<T>(m: &Mutex<T>) -> PyResult<MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| PyOSError::new_err("chopper state poisoned by an earlier panic"))
}

/// Low-count side chopper: writes a type-2 file (compressed times and basis bits for the
/// peer) and a type-3 file (local results) per epoch, byte-identical to qcrypto `chopper`.
///
/// Chopper(t2_dir=None, t3_dir=None, *, t2_file=None, t3_file=None, protocol=1,
///         time_order=17, servo_filter=0, max_gap_us=0, extended=False,
///         six_detectors=False, verbosity=3, now=None)
///
/// Give each output as a folder (one file per epoch, written atomically) or as one file
/// that receives every packet. `protocol` 0..6 (`-p`), `time_order` 4..32 (`-q`),
/// `servo_filter` (`-Q`, 0 = fixed), `max_gap_us` (`-m`, 0 = off), `extended` (`-U`),
/// `six_detectors` (`-6`), `verbosity` (`-V`, chooses `log_line`). `now` fixes the Unix
/// time in seconds used for extended epochs (default: the system clock).
#[pyclass(module = "qkd_core", frozen)]
pub struct Chopper {
    pub(crate) inner: Mutex<CoreChopper>,
    /// Event words of the last `feed` call, kept for the next one (see fill_event_words).
    words: Mutex<Vec<u64>>,
}

#[pymethods]
impl Chopper {
    #[new]
    #[pyo3(signature = (t2_dir=None, t3_dir=None, *, t2_file=None, t3_file=None, protocol=1,
        time_order=17, servo_filter=0, max_gap_us=0, extended=false, six_detectors=false,
        verbosity=3, now=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        t2_dir: Option<PathBuf>,
        t3_dir: Option<PathBuf>,
        t2_file: Option<PathBuf>,
        t3_file: Option<PathBuf>,
        protocol: u8,
        time_order: u32,
        servo_filter: u32,
        max_gap_us: u64,
        extended: bool,
        six_detectors: bool,
        verbosity: i32,
        now: Option<u64>,
    ) -> PyResult<Self> {
        let config = ChopperConfig {
            protocol,
            time_order,
            servo_filter,
            max_gap_us,
            extended,
            six_detectors,
            verbosity,
        };
        let t2 = destination(t2_dir, t2_file, "t2")?;
        let t3 = destination(t3_dir, t3_file, "t3")?;
        let mut chopper = CoreChopper::new(config, t2, t3).map_err(chop_error)?;
        if let Some(now) = now {
            chopper.set_clock(Box::new(now));
        }
        Ok(Chopper {
            inner: Mutex::new(chopper),
            words: Mutex::new(Vec::new()),
        })
    }

    /// Feed events: times (uint64 ticks of 1/8 ns, low 49 bits used) and detector
    /// patterns (uint8, 0..15). Returns the list of epochs written during the call.
    fn feed<'py>(
        &self,
        py: Python<'py>,
        times: &Bound<'py, PyAny>,
        patterns: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let times = typed_array::<u64>(times, "times", "uint64")?;
        let patterns = typed_array::<u8>(patterns, "patterns", "uint8")?;
        let (times, patterns) = (times.as_slice()?, patterns.as_slice()?);
        let done = py.detach(|| {
            let mut words = lock(&self.words)?;
            fill_event_words(times, patterns, &mut words)?;
            lock(&self.inner)?.feed(&words).map_err(chop_error)
        })?;
        summaries(py, &done)
    }

    /// Feed raw event words (uint64: tick time in bits 63..15, pattern in bits 3..0).
    fn feed_words<'py>(
        &self,
        py: Python<'py>,
        words: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let words = typed_array::<u64>(words, "words", "uint64")?;
        let words = words.as_slice()?;
        let done = py.detach(|| lock(&self.inner)?.feed(words).map_err(chop_error))?;
        summaries(py, &done)
    }

    /// Feed raw events in the legacy serialisation (readevents -a 1 -X); whole 8-byte
    /// records only.
    fn feed_bytes<'py>(&self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyList>> {
        let done = py.detach(|| {
            lock(&self.inner)?
                .feed_legacy_bytes(data)
                .map_err(chop_error)
        })?;
        summaries(py, &done)
    }

    /// Write the epoch in progress now; returns its summary dict, or None without events.
    /// Later events of that epoch are dropped (counted in stats["dropped_after_flush"]).
    fn flush<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let done = py.detach(|| lock(&self.inner)?.flush().map_err(chop_error))?;
        done.map(|s| summary_dict(py, &s)).transpose()
    }

    /// Fix the Unix time in seconds used for extended epochs (None: the system clock).
    #[pyo3(signature = (now=None))]
    fn set_clock(&self, now: Option<u64>) -> PyResult<()> {
        let mut inner = lock(&self.inner)?;
        match now {
            Some(now) => inner.set_clock(Box::new(now)),
            None => inner.set_clock(Box::new(qkd_chopping::SystemClock)),
        }
        Ok(())
    }

    /// Event counts since creation (dict of ints).
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = lock(&self.inner)?.stats();
        stats_dict(py, &s)
    }

    /// Time order T the next epoch will use.
    #[getter]
    fn time_order(&self) -> PyResult<u32> {
        Ok(lock(&self.inner)?.time_order())
    }

    /// Accepted events of the epoch in progress.
    #[getter]
    fn pending_events(&self) -> PyResult<u32> {
        Ok(lock(&self.inner)?.pending_events())
    }
}

/// High-count side chopper: writes each epoch's raw events as a type-1 file,
/// byte-identical to qcrypto `chopper2`.
///
/// Chopper2(t1_dir=None, *, t1_file=None, max_gap_us=0, extended=False,
///          four_detectors=False, verbosity=3, now=None, reference_messages=False)
///
/// `max_gap_us` (`-m`), `extended` (`-U`), `four_detectors` (`-4`), `verbosity` (`-V`).
/// `reference_messages` records the reference's stderr lines for `take_messages()`.
#[pyclass(module = "qkd_core", frozen)]
pub struct Chopper2 {
    pub(crate) inner: Mutex<CoreChopper2>,
    /// Event words of the last `feed` call, kept for the next one (see fill_event_words).
    words: Mutex<Vec<u64>>,
}

#[pymethods]
impl Chopper2 {
    #[new]
    #[pyo3(signature = (t1_dir=None, *, t1_file=None, max_gap_us=0, extended=false,
        four_detectors=false, verbosity=3, now=None, reference_messages=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        t1_dir: Option<PathBuf>,
        t1_file: Option<PathBuf>,
        max_gap_us: u64,
        extended: bool,
        four_detectors: bool,
        verbosity: i32,
        now: Option<u64>,
        reference_messages: bool,
    ) -> PyResult<Self> {
        let config = Chopper2Config {
            max_gap_us,
            extended,
            four_detectors,
            verbosity,
            reference_messages,
        };
        let out = destination(t1_dir, t1_file, "t1")?;
        let mut chopper = CoreChopper2::new(config, out).map_err(chop_error)?;
        if let Some(now) = now {
            chopper.set_clock(Box::new(now));
        }
        Ok(Chopper2 {
            inner: Mutex::new(chopper),
            words: Mutex::new(Vec::new()),
        })
    }

    /// Feed events: times (uint64 ticks of 1/8 ns, low 49 bits used) and detector
    /// patterns (uint8, 0..15). Flag bits are zero in the type-1 file; use feed_words or
    /// feed_bytes to keep them.
    fn feed<'py>(
        &self,
        py: Python<'py>,
        times: &Bound<'py, PyAny>,
        patterns: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let times = typed_array::<u64>(times, "times", "uint64")?;
        let patterns = typed_array::<u8>(patterns, "patterns", "uint8")?;
        let (times, patterns) = (times.as_slice()?, patterns.as_slice()?);
        let done = py.detach(|| {
            let mut words = lock(&self.words)?;
            fill_event_words(times, patterns, &mut words)?;
            lock(&self.inner)?.feed(&words).map_err(chop_error)
        })?;
        summaries(py, &done)
    }

    /// Feed raw event words (uint64), copied verbatim into the type-1 files.
    fn feed_words<'py>(
        &self,
        py: Python<'py>,
        words: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        let words = typed_array::<u64>(words, "words", "uint64")?;
        let words = words.as_slice()?;
        let done = py.detach(|| lock(&self.inner)?.feed(words).map_err(chop_error))?;
        summaries(py, &done)
    }

    /// Feed raw events in the legacy serialisation (readevents -a 1 -X); whole 8-byte
    /// records only.
    fn feed_bytes<'py>(&self, py: Python<'py>, data: &[u8]) -> PyResult<Bound<'py, PyList>> {
        let done = py.detach(|| {
            lock(&self.inner)?
                .feed_legacy_bytes(data)
                .map_err(chop_error)
        })?;
        summaries(py, &done)
    }

    /// Write the epoch in progress now; returns its summary dict, or None without events.
    fn flush<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        let done = py.detach(|| lock(&self.inner)?.flush().map_err(chop_error))?;
        done.map(|s| summary_dict(py, &s)).transpose()
    }

    /// Return and clear the reference's stderr lines recorded so far.
    fn take_messages(&self) -> PyResult<Vec<String>> {
        Ok(lock(&self.inner)?.take_messages())
    }

    /// Fix the Unix time in seconds used for extended epochs (None: the system clock).
    #[pyo3(signature = (now=None))]
    fn set_clock(&self, now: Option<u64>) -> PyResult<()> {
        let mut inner = lock(&self.inner)?;
        match now {
            Some(now) => inner.set_clock(Box::new(now)),
            None => inner.set_clock(Box::new(qkd_chopping::SystemClock)),
        }
        Ok(())
    }

    /// Event counts since creation (dict of ints).
    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = lock(&self.inner)?.stats();
        stats_dict(py, &s)
    }

    /// Accepted events of the epoch in progress.
    #[getter]
    fn pending_events(&self) -> PyResult<u32> {
        Ok(lock(&self.inner)?.pending_events())
    }
}
