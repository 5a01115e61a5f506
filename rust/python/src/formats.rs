//! Raw timestamp events between numpy arrays and files or buffers.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use qkd_formats::raw::{self, Serialisation};

use crate::error::format_error;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_raw_events, m)?)?;
    m.add_function(wrap_pyfunction!(encode_raw_events, m)?)?;
    Ok(())
}

fn parse_serialisation(name: &str) -> PyResult<Serialisation> {
    match name {
        "legacy" => Ok(Serialisation::Legacy),
        "native" => Ok(Serialisation::Native),
        other => Err(PyValueError::new_err(format!(
            "invalid serialisation {other:?}: expected \"legacy\" (readevents -X) or \"native\""
        ))),
    }
}

/// Decode raw 64-bit events into (times in ticks of 1/8 ns as uint64, patterns as uint8).
///
/// `data` must hold whole 8-byte records; `serialisation` is "legacy" or "native".
#[pyfunction]
#[pyo3(signature = (data, serialisation = "legacy"))]
#[allow(clippy::type_complexity)]
fn decode_raw_events<'py>(
    py: Python<'py>,
    data: &[u8],
    serialisation: &str,
) -> PyResult<(Bound<'py, PyArray1<u64>>, Bound<'py, PyArray1<u8>>)> {
    let order = parse_serialisation(serialisation)?;
    let (times, patterns) = py
        .detach(|| {
            let mut words = Vec::new();
            raw::decode_into(data, order, &mut words)?;
            let times: Vec<u64> = words.iter().map(|&w| raw::time_ticks(w)).collect();
            let patterns: Vec<u8> = words.iter().map(|&w| raw::pattern(w)).collect();
            Ok::<_, qkd_formats::FormatError>((times, patterns))
        })
        .map_err(format_error)?;
    Ok((times.into_pyarray(py), patterns.into_pyarray(py)))
}

/// Encode times (uint64 ticks of 1/8 ns) and detector patterns (uint8) as raw events.
#[pyfunction]
#[pyo3(signature = (times, patterns, serialisation = "legacy"))]
fn encode_raw_events<'py>(
    py: Python<'py>,
    times: PyReadonlyArray1<'py, u64>,
    patterns: PyReadonlyArray1<'py, u8>,
    serialisation: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let order = parse_serialisation(serialisation)?;
    let times = times.as_slice()?;
    let patterns = patterns.as_slice()?;
    if times.len() != patterns.len() {
        return Err(PyValueError::new_err(format!(
            "times and patterns differ in length: {} and {}",
            times.len(),
            patterns.len()
        )));
    }
    let bytes = py.detach(|| {
        let words: Vec<u64> = times
            .iter()
            .zip(patterns)
            .map(|(&t, &p)| raw::make_word(t, u16::from(p)))
            .collect();
        let mut out = Vec::new();
        raw::encode_into(&words, order, &mut out);
        out
    });
    Ok(PyBytes::new(py, &bytes))
}
