//! Python bindings of the event sources (crate qkd-sources): the link simulator, the
//! TDC1 device and its emulator, recorded files and pipes.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};
use qkd_formats::raw;
use qkd_sources::file::{StreamFormat, StreamSource};
use qkd_sources::simulator::{
    LinkConfig, LinkSimulator as CoreSimulator, NodeConfig, NodeStats, DEFAULT_START_TICKS,
};
use qkd_sources::tdc1_device::{InputLevel, Tdc1Config, Tdc1Device};
use qkd_sources::tdc1_emulator::{EmulatorConfig, Fault, Tdc1Emulator as CoreEmulator};
use qkd_sources::{EventSource, Side, SimulatedNode};

use crate::error::{source_error, QkdError};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LinkSimulator>()?;
    m.add_class::<EventStream>()?;
    m.add_class::<Tdc1Emulator>()?;
    m.add_function(wrap_pyfunction!(open_tdc1, m)?)?;
    m.add_function(wrap_pyfunction!(open_event_stream, m)?)?;
    m.add("DEFAULT_START_TICKS", DEFAULT_START_TICKS)?;
    Ok(())
}

/// Ticks of 1/8 ns per second.
const TICKS_PER_SECOND: f64 = 8e9;

/// Parses a per-node value: one number for both nodes, or a pair (high, low).
fn per_node(name: &str, value: &Bound<'_, PyAny>) -> PyResult<(f64, f64)> {
    if let Ok(v) = value.extract::<f64>() {
        return Ok((v, v));
    }
    if let Ok((h, l)) = value.extract::<(f64, f64)>() {
        return Ok((h, l));
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a number (both nodes) or a pair (high, low) of numbers, got {}",
        value.repr()?
    )))
}

/// Parses a per-detector value of one node: one number for all four detectors, or four.
fn per_detector(name: &str, value: &Bound<'_, PyAny>) -> PyResult<[f64; 4]> {
    if let Ok(v) = value.extract::<f64>() {
        return Ok([v; 4]);
    }
    if let Ok(v) = value.extract::<[f64; 4]>() {
        return Ok(v);
    }
    Err(PyTypeError::new_err(format!(
        "{name} of a node must be a number or 4 numbers (detectors 1..4), got {}",
        value.repr()?
    )))
}

/// Parses a per-node, per-detector value: a number, 4 numbers, or a pair (high, low) of either.
fn per_node_detector(name: &str, value: &Bound<'_, PyAny>) -> PyResult<([f64; 4], [f64; 4])> {
    if let Ok(v) = per_detector(name, value) {
        return Ok((v, v));
    }
    if let Ok((h, l)) = value.extract::<(Bound<'_, PyAny>, Bound<'_, PyAny>)>() {
        return Ok((per_detector(name, &h)?, per_detector(name, &l)?));
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a number, 4 numbers (detectors 1..4), or a pair (high, low) of those, got {}",
        value.repr()?
    )))
}

fn duration_ticks(duration: f64) -> PyResult<u64> {
    if !(duration.is_finite() && duration > 0.0 && duration <= 3600.0) {
        return Err(PyValueError::new_err(format!(
            "invalid duration {duration}: expected seconds of simulated time, above 0 and at most 3600"
        )));
    }
    Ok(((duration * TICKS_PER_SECOND).round() as u64).max(1))
}

type Batch<'py> = (
    Bound<'py, PyArray1<u64>>,
    Bound<'py, PyArray1<u8>>,
    Bound<'py, PyArray1<u64>>,
    Bound<'py, PyArray1<u8>>,
);

type WordBatch<'py> = (Bound<'py, PyArray1<u64>>, Bound<'py, PyArray1<u64>>);

fn split_words(words: &[u64]) -> (Vec<u64>, Vec<u8>) {
    let times = words.iter().map(|&w| raw::time_ticks(w)).collect();
    let patterns = words.iter().map(|&w| raw::pattern(w)).collect();
    (times, patterns)
}

fn node_stats<'py>(py: Python<'py>, s: &NodeStats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("pair_detections", s.pair_detections)?;
    d.set_item("noise_counts", s.noise_counts)?;
    d.set_item("dead_time_losses", s.dead_time_losses)?;
    d.set_item("events", s.events)?;
    Ok(d)
}

/// Simulated two-node BBM92 link: an entangled-pair source seen by the high-count node (H)
/// and the low-count node (L), each with four detectors (1, 3: basis 0; 2, 4: basis 1).
///
/// LinkSimulator(seed=0, pair_rate=1e5, qber=0.0, offset_ticks=0, drift=0.0,
///               start_ticks=DEFAULT_START_TICKS, pair_limit=None, transmission=1.0,
///               efficiency=1.0, dark_count_rate=0.0, background_rate=0.0,
///               jitter_ps=0.0, dead_time_ps=0.0, skip_ticks=0)
///
/// - pair_rate: pairs/s emitted; qber: error probability in matching bases (0..0.5);
/// - offset_ticks: L's clock minus H's at the start, in ticks of 1/8 ns; drift: relative
///   frequency difference of L's clock (positive: L fast), at most 1e-3 in magnitude;
/// - start_ticks: H's clock at the start (only the low 49 bits reach the events);
/// - pair_limit: stop after that many pairs (None: never);
/// - skip_ticks: source time at which the run begins, in ticks of 1/8 ns (at most 2^52).
///   Each node returns exactly the events that a run from 0 returns from its clock's
///   reading at that time on. The cost is at most two segments (2^30 ticks) and one dead
///   time of simulation before it. Cannot be combined with pair_limit;
/// - per node, a number for both nodes or a pair (high, low): transmission (1 - loss),
///   background_rate (counts/s over the node's 4 detectors), jitter_ps (Gaussian sigma),
///   dead_time_ps (per detector);
/// - per detector, a number, 4 numbers, or a pair (high, low) of those: efficiency,
///   dark_count_rate (counts/s).
///
/// Equal arguments give equal output, however the run is cut into batches.
#[pyclass(module = "qkd_core")]
pub struct LinkSimulator {
    inner: CoreSimulator,
    /// Raw event words of the high and low node from the last `next_batch`, kept for the
    /// next call. Growing fresh vectors to a few million words per batch mapped new pages
    /// every time, and those page faults were a large part of the link's kernel time.
    words: (Vec<u64>, Vec<u64>),
}

#[pymethods]
impl LinkSimulator {
    #[new]
    #[pyo3(signature = (
        seed = 0, pair_rate = 1e5, qber = 0.0, offset_ticks = 0, drift = 0.0,
        start_ticks = DEFAULT_START_TICKS, pair_limit = None, transmission = None,
        efficiency = None, dark_count_rate = None, background_rate = None, jitter_ps = None,
        dead_time_ps = None, skip_ticks = 0
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: u64,
        pair_rate: f64,
        qber: f64,
        offset_ticks: i64,
        drift: f64,
        start_ticks: u64,
        pair_limit: Option<u64>,
        transmission: Option<Bound<'_, PyAny>>,
        efficiency: Option<Bound<'_, PyAny>>,
        dark_count_rate: Option<Bound<'_, PyAny>>,
        background_rate: Option<Bound<'_, PyAny>>,
        jitter_ps: Option<Bound<'_, PyAny>>,
        dead_time_ps: Option<Bound<'_, PyAny>>,
        skip_ticks: u64,
    ) -> PyResult<Self> {
        let mut high = NodeConfig::default();
        let mut low = NodeConfig::default();
        if let Some(v) = transmission {
            (high.transmission, low.transmission) = per_node("transmission", &v)?;
        }
        if let Some(v) = background_rate {
            (high.background_rate, low.background_rate) = per_node("background_rate", &v)?;
        }
        if let Some(v) = jitter_ps {
            (high.jitter_ps, low.jitter_ps) = per_node("jitter_ps", &v)?;
        }
        if let Some(v) = dead_time_ps {
            (high.dead_time_ps, low.dead_time_ps) = per_node("dead_time_ps", &v)?;
        }
        if let Some(v) = efficiency {
            (high.efficiency, low.efficiency) = per_node_detector("efficiency", &v)?;
        }
        if let Some(v) = dark_count_rate {
            (high.dark_count_rate, low.dark_count_rate) = per_node_detector("dark_count_rate", &v)?;
        }
        let config = LinkConfig {
            seed,
            pair_rate,
            qber,
            offset_ticks,
            drift,
            start_ticks,
            pair_limit,
            skip_ticks,
            high,
            low,
        };
        let inner = CoreSimulator::new(config).map_err(source_error)?;
        Ok(LinkSimulator {
            inner,
            words: (Vec::new(), Vec::new()),
        })
    }

    /// Simulate the next `duration` seconds and return
    /// (high_times, high_patterns, low_times, low_patterns): times as uint64 ticks of 1/8 ns
    /// (49 bits, wrapping like the device counter), patterns as uint8, each node time ordered.
    ///
    /// Events near the batch end are held back for the next call; after the pair limit the
    /// last call returns the rest and later calls return empty arrays.
    fn next_batch<'py>(&mut self, py: Python<'py>, duration: f64) -> PyResult<Batch<'py>> {
        let ticks = duration_ticks(duration)?;
        let (inner, (high, low)) = (&mut self.inner, &mut self.words);
        let (high, low) = py.detach(|| {
            high.clear();
            low.clear();
            inner.next_batch_into(ticks, high, low);
            (split_words(high), split_words(low))
        });
        Ok((
            high.0.into_pyarray(py),
            high.1.into_pyarray(py),
            low.0.into_pyarray(py),
            low.1.into_pyarray(py),
        ))
    }

    /// Simulate the next `duration` seconds and return (high_words, low_words): the raw
    /// 64-bit event words (uint64) of both nodes, as chopper and chopper2 read them.
    fn next_batch_words<'py>(
        &mut self,
        py: Python<'py>,
        duration: f64,
    ) -> PyResult<WordBatch<'py>> {
        let ticks = duration_ticks(duration)?;
        let inner = &mut self.inner;
        let (high, low) = py.detach(|| {
            let (mut high, mut low) = (Vec::new(), Vec::new());
            inner.next_batch_into(ticks, &mut high, &mut low);
            (high, low)
        });
        Ok((high.into_pyarray(py), low.into_pyarray(py)))
    }

    /// Return one node of this link as an EventStream that simulates `batch_duration`
    /// seconds per batch, from skip_ticks and with the same configuration (this simulator
    /// is not advanced). Two streams with sides "high" and "low" are the two nodes of one link,
    /// even in different processes.
    #[pyo3(signature = (side, batch_duration = 0.1))]
    fn source(&self, side: &str, batch_duration: f64) -> PyResult<EventStream> {
        let side = parse_side(side)?;
        let ticks = duration_ticks(batch_duration)?;
        let node =
            SimulatedNode::new(self.inner.config().clone(), side, ticks).map_err(source_error)?;
        Ok(EventStream::new(
            Box::new(node),
            format!("simulated {side:?} node"),
        ))
    }

    /// True once the pair limit is reached and every event has been returned.
    #[getter]
    fn finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// Simulated source time so far, in ticks of 1/8 ns, counted from time 0 (skip_ticks
    /// included).
    #[getter]
    fn elapsed_ticks(&self) -> u64 {
        self.inner.elapsed_ticks()
    }

    /// Counts since the run began (at skip_ticks): pairs, both_detected, matching_basis,
    /// errors, and per node ("high", "low") pair_detections, noise_counts,
    /// dead_time_losses, events. warmup_pairs counts the pairs generated before skip_ticks
    /// only to rebuild the state there (0 without a skip).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("pairs", s.pairs)?;
        d.set_item("warmup_pairs", s.warmup_pairs)?;
        d.set_item("both_detected", s.both_detected)?;
        d.set_item("matching_basis", s.matching_basis)?;
        d.set_item("errors", s.errors)?;
        d.set_item("high", node_stats(py, &s.high)?)?;
        d.set_item("low", node_stats(py, &s.low)?)?;
        Ok(d)
    }
}

type Words = Vec<u64>;

/// One batch as numpy arrays: (times in ticks, patterns).
type EventArrays<'py> = (Bound<'py, PyArray1<u64>>, Bound<'py, PyArray1<u8>>);

/// Locks a source, mapping a poisoned lock to an error instead of a panic.
fn lock_source(
    m: &Mutex<Option<Box<dyn EventSource>>>,
) -> PyResult<MutexGuard<'_, Option<Box<dyn EventSource>>>> {
    m.lock()
        .map_err(|_| QkdError::new_err("event source state poisoned by an earlier panic"))
}

/// Destination stage of a source's events when pumped in Rust.
enum Stage<'a> {
    Chopper(&'a Mutex<qkd_chopping::Chopper>),
    Chopper2(&'a Mutex<qkd_chopping::Chopper2>),
}

/// A stream of timestamp events from a simulator, a TDC1 device, a file or a pipe.
///
/// Build one with `LinkSimulator.source(side, batch_duration)`, `open_tdc1(...)` or
/// `open_event_stream(...)`. `read_batch()` returns the next (times, patterns) arrays
/// (uint64 ticks of 1/8 ns, uint8 patterns), possibly empty, or None at the end of the
/// stream; iterating yields the batches until the end. `pump(stage)` feeds a `Chopper` or
/// `Chopper2` directly in Rust. `stop()` ends the stream (a TDC1 is stopped and reset) and
/// raises if the device reported lost events. Usable as a context manager.
#[pyclass(module = "qkd_core", frozen)]
pub struct EventStream {
    inner: Mutex<Option<Box<dyn EventSource>>>,
    description: String,
}

impl EventStream {
    fn new(source: Box<dyn EventSource>, description: String) -> Self {
        EventStream {
            inner: Mutex::new(Some(source)),
            description,
        }
    }

    /// Reads one batch of words with the GIL released; `None` at the end of the stream.
    fn read_words(&self, py: Python<'_>) -> PyResult<Option<Words>> {
        py.detach(|| {
            let mut guard = lock_source(&self.inner)?;
            let Some(source) = guard.as_mut() else {
                return Ok(None);
            };
            let mut words = Vec::new();
            match source.read_batch(&mut words) {
                Ok(true) => Ok(Some(words)),
                Ok(false) => {
                    *guard = None;
                    Ok(if words.is_empty() { None } else { Some(words) })
                }
                Err(e) => {
                    *guard = None;
                    Err(source_error(e))
                }
            }
        })
    }
}

#[pymethods]
impl EventStream {
    /// Next batch as (times, patterns), or None once the stream has ended.
    fn read_batch<'py>(&self, py: Python<'py>) -> PyResult<Option<EventArrays<'py>>> {
        Ok(self.read_words(py)?.map(|w| {
            let (t, p) = split_words(&w);
            (t.into_pyarray(py), p.into_pyarray(py))
        }))
    }

    /// Next batch as raw event words (uint64, flag bits kept), or None at the end.
    fn read_batch_words<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<Option<Bound<'py, PyArray1<u64>>>> {
        Ok(self.read_words(py)?.map(|w| w.into_pyarray(py)))
    }

    /// Feed up to `max_batches` batches (None: until the stream ends) straight into a
    /// `Chopper` or `Chopper2`, in Rust with the GIL released. Returns (open, epochs): whether
    /// the stream goes on, and the summary dicts of the epochs written.
    #[pyo3(signature = (stage, max_batches = None))]
    fn pump<'py>(
        &self,
        py: Python<'py>,
        stage: &Bound<'py, PyAny>,
        max_batches: Option<u64>,
    ) -> PyResult<(bool, Bound<'py, PyList>)> {
        let chopper = stage.cast::<crate::chopping::Chopper>().ok();
        let chopper2 = stage.cast::<crate::chopping::Chopper2>().ok();
        let target = match (&chopper, &chopper2) {
            (Some(c), _) => Stage::Chopper(&c.get().inner),
            (None, Some(c)) => Stage::Chopper2(&c.get().inner),
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "pump needs a qkd_core.Chopper or qkd_core.Chopper2, got {}",
                    stage.get_type()
                )))
            }
        };
        let (open, done) = py.detach(|| {
            let mut guard = lock_source(&self.inner)?;
            let mut done = Vec::new();
            let mut words = Vec::new();
            let mut batches = 0u64;
            let open = loop {
                let Some(source) = guard.as_mut() else {
                    break false;
                };
                if max_batches.is_some_and(|m| batches >= m) {
                    break true;
                }
                words.clear();
                let more = match source.read_batch(&mut words) {
                    Ok(more) => more,
                    Err(e) => {
                        *guard = None;
                        return Err(source_error(e));
                    }
                };
                batches += 1;
                let written = match &target {
                    Stage::Chopper(c) => c
                        .lock()
                        .map_err(|_| QkdError::new_err("chopper state poisoned"))?
                        .feed(&words),
                    Stage::Chopper2(c) => c
                        .lock()
                        .map_err(|_| QkdError::new_err("chopper2 state poisoned"))?
                        .feed(&words),
                };
                done.extend(written.map_err(crate::chopping::chop_error)?);
                if !more {
                    *guard = None;
                    break false;
                }
            };
            Ok::<_, PyErr>((open, done))
        })?;
        Ok((open, crate::chopping::summaries(py, &done)?))
    }

    /// End the stream. A TDC1 is aborted, checked for FIFO overflow and reset.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            let source = lock_source(&self.inner)?.take();
            if let Some(mut source) = source {
                source.stop().map_err(source_error)?;
            }
            Ok(())
        })
    }

    /// True until the stream has ended or was stopped.
    #[getter]
    fn open(&self) -> PyResult<bool> {
        Ok(lock_source(&self.inner)?.is_some())
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<EventArrays<'py>>> {
        self.read_batch(py)
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.stop(py)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("<EventStream {}>", self.description)
    }
}

fn parse_side(side: &str) -> PyResult<Side> {
    match side {
        "high" => Ok(Side::High),
        "low" => Ok(Side::Low),
        other => Err(PyValueError::new_err(format!(
            "invalid side {other:?}: expected \"high\" (chopper2, costream) or \"low\" (chopper, splicer)"
        ))),
    }
}

/// Open an S-Fifteen TDC1 at `path` and start timestamping; returns an EventStream.
///
/// `input_level` is "NIM" or "TTL"; `skew_ticks` the skews of detectors 1..4 in ticks of
/// 1/8 ns; `start_ticks` the time of the first counter period; `reply_timeout` and
/// `stall_timeout` in seconds bound the wait for a reply and for stream data. Raises
/// DeviceError when the port is missing, inaccessible or not a TDC1.
#[pyfunction]
#[pyo3(signature = (path, input_level = "NIM", skew_ticks = None, start_ticks = 0,
    reply_timeout = 1.0, stall_timeout = 2.0))]
fn open_tdc1(
    py: Python<'_>,
    path: String,
    input_level: &str,
    skew_ticks: Option<[i64; 4]>,
    start_ticks: u64,
    reply_timeout: f64,
    stall_timeout: f64,
) -> PyResult<EventStream> {
    let input_level = match input_level.to_ascii_uppercase().as_str() {
        "NIM" => InputLevel::Nim,
        "TTL" => InputLevel::Ttl,
        _ => {
            return Err(PyValueError::new_err(format!(
                "invalid input_level {input_level:?}: expected \"NIM\" or \"TTL\""
            )))
        }
    };
    let seconds = |name: &str, v: f64| {
        if v.is_finite() && v > 0.0 && v <= 3600.0 {
            Ok(Duration::from_secs_f64(v))
        } else {
            Err(PyValueError::new_err(format!(
                "invalid {name} {v}: expected seconds above 0 and at most 3600"
            )))
        }
    };
    let config = Tdc1Config {
        path: path.clone(),
        input_level,
        skew_ticks: skew_ticks.unwrap_or([0; 4]),
        start_ticks,
        reply_timeout: seconds("reply_timeout", reply_timeout)?,
        stall_timeout: seconds("stall_timeout", stall_timeout)?,
    };
    let device = py
        .detach(|| Tdc1Device::open(config))
        .map_err(source_error)?;
    Ok(EventStream::new(Box::new(device), format!("TDC1 {path}")))
}

/// Open a recorded file or a pipe (FIFO) of events as an EventStream.
///
/// `format` is "raw" (legacy raw events, readevents -a1 -X), "raw-native", "a1" or "a1X"
/// (timestamp7, converted to whole ticks), or "tdc1"; `skew` the skews of detectors 1..4
/// in the format's unit (1/256 ns for timestamp7, ticks otherwise).
#[pyfunction]
#[pyo3(signature = (path, format = "raw", skew = None))]
fn open_event_stream(path: PathBuf, format: &str, skew: Option<[i64; 4]>) -> PyResult<EventStream> {
    let format = StreamFormat::parse(format).map_err(source_error)?;
    let source = StreamSource::open(&path, format, skew.unwrap_or([0; 4])).map_err(source_error)?;
    Ok(EventStream::new(
        Box::new(source),
        format!("{}", path.display()),
    ))
}

/// An emulated TDC1 on a pseudo-terminal, for tests and demonstrations.
///
/// Tdc1Emulator(stream, bytes_per_write=4096, write_interval=0.001, fault=None,
///              fault_after_bytes=0, overflow=False, identification=...)
///
/// `stream` is a TDC1 byte stream (see encode_tdc1) sent after `counts?` in timestamp mode;
/// `fault` is None, "garbage", "hang" or "unplug", injected after `fault_after_bytes`;
/// `overflow` makes `status?` report a FIFO overflow. `path` is the device to open.
#[pyclass(module = "qkd_core", frozen)]
pub struct Tdc1Emulator {
    inner: Mutex<CoreEmulator>,
    path: String,
}

#[pymethods]
impl Tdc1Emulator {
    #[new]
    #[pyo3(signature = (stream, bytes_per_write = 4096, write_interval = 0.001, fault = None,
        fault_after_bytes = 0, overflow = false, identification = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        stream: Vec<u8>,
        bytes_per_write: usize,
        write_interval: f64,
        fault: Option<&str>,
        fault_after_bytes: usize,
        overflow: bool,
        identification: Option<String>,
    ) -> PyResult<Self> {
        let fault = match fault {
            None => None,
            Some("garbage") => Some(Fault::Garbage {
                after_bytes: fault_after_bytes,
            }),
            Some("hang") => Some(Fault::Hang {
                after_bytes: fault_after_bytes,
            }),
            Some("unplug") => Some(Fault::Unplug {
                after_bytes: fault_after_bytes,
            }),
            Some(other) => {
                return Err(PyValueError::new_err(format!(
                    "invalid fault {other:?}: expected None, \"garbage\", \"hang\" or \"unplug\""
                )))
            }
        };
        if !(write_interval.is_finite() && (0.0..=1.0).contains(&write_interval)) {
            return Err(PyValueError::new_err(format!(
                "invalid write_interval {write_interval}: expected seconds between 0 and 1"
            )));
        }
        let mut config = EmulatorConfig::new(stream);
        config.bytes_per_write = bytes_per_write.max(1);
        config.write_interval = Duration::from_secs_f64(write_interval);
        config.fault = fault;
        config.overflow = overflow;
        if let Some(idn) = identification {
            config.identification = idn;
        }
        let emulator = CoreEmulator::start(config).map_err(source_error)?;
        let path = emulator.path().to_string();
        Ok(Tdc1Emulator {
            inner: Mutex::new(emulator),
            path,
        })
    }

    /// Device path to open (a /dev/pts/N).
    #[getter]
    fn path(&self) -> &str {
        &self.path
    }

    /// Commands received so far, in order.
    fn commands(&self) -> PyResult<Vec<String>> {
        let guard = self
            .inner
            .lock()
            .map_err(|_| QkdError::new_err("emulator state poisoned"))?;
        Ok(guard.commands())
    }

    /// Stop serving and close the pseudo-terminal.
    fn stop(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| {
            self.inner
                .lock()
                .map_err(|_| QkdError::new_err("emulator state poisoned"))?
                .stop();
            Ok(())
        })
    }
}
