//! Python bindings of the event sources (crate qkd-sources): the link simulator.

use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use qkd_formats::raw;
use qkd_sources::simulator::{
    LinkConfig, LinkSimulator as CoreSimulator, NodeConfig, NodeStats, DEFAULT_START_TICKS,
};

use crate::error::source_error;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LinkSimulator>()?;
    m.add("DEFAULT_START_TICKS", DEFAULT_START_TICKS)?;
    Ok(())
}

/// Ticks of 1/8 ns per second.
const TICKS_PER_SECOND: f64 = 8e9;

/// A per-node value: one number for both nodes, or a pair (high, low).
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

/// A per-detector value of one node: one number for all four detectors, or four numbers.
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

/// A per-node, per-detector value: a number, 4 numbers, or a pair (high, low) of either.
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
///               jitter_ps=0.0, dead_time_ps=0.0)
///
/// - pair_rate: pairs/s emitted; qber: error probability in matching bases (0..0.5);
/// - offset_ticks: L's clock minus H's at the start, in ticks of 1/8 ns; drift: relative
///   frequency difference of L's clock (positive: L fast), at most 1e-3 in magnitude;
/// - start_ticks: H's clock at the start (only the low 49 bits reach the events);
/// - pair_limit: stop after that many pairs (None: never);
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
}

#[pymethods]
impl LinkSimulator {
    #[new]
    #[pyo3(signature = (
        seed = 0, pair_rate = 1e5, qber = 0.0, offset_ticks = 0, drift = 0.0,
        start_ticks = DEFAULT_START_TICKS, pair_limit = None, transmission = None,
        efficiency = None, dark_count_rate = None, background_rate = None, jitter_ps = None,
        dead_time_ps = None
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
            high,
            low,
        };
        let inner = CoreSimulator::new(config).map_err(source_error)?;
        Ok(LinkSimulator { inner })
    }

    /// Simulate the next `duration` seconds and return
    /// (high_times, high_patterns, low_times, low_patterns): times as uint64 ticks of 1/8 ns
    /// (49 bits, wrapping like the device counter), patterns as uint8, each node time ordered.
    ///
    /// Events near the batch end are held back for the next call; after the pair limit the
    /// last call returns the rest and later calls return empty arrays.
    fn next_batch<'py>(&mut self, py: Python<'py>, duration: f64) -> PyResult<Batch<'py>> {
        let ticks = duration_ticks(duration)?;
        let inner = &mut self.inner;
        let (high, low) = py.detach(|| {
            let (mut high, mut low) = (Vec::new(), Vec::new());
            inner.next_batch_into(ticks, &mut high, &mut low);
            (split_words(&high), split_words(&low))
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

    /// True once the pair limit is reached and every event has been returned.
    #[getter]
    fn finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// Simulated source time so far, in ticks of 1/8 ns.
    #[getter]
    fn elapsed_ticks(&self) -> u64 {
        self.inner.elapsed_ticks()
    }

    /// Counts since the start: pairs, both_detected, matching_basis, errors, and per node
    /// ("high", "low") pair_detections, noise_counts, dead_time_losses, events.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("pairs", s.pairs)?;
        d.set_item("both_detected", s.both_detected)?;
        d.set_item("matching_basis", s.matching_basis)?;
        d.set_item("errors", s.errors)?;
        d.set_item("high", node_stats(py, &s.high)?)?;
        d.set_item("low", node_stats(py, &s.low)?)?;
        Ok(d)
    }
}
