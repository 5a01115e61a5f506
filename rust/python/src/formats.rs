//! Raw timestamp events between numpy arrays and files or buffers.

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};
use qkd_formats::raw::{self, Serialisation};
use qkd_formats::skew::DetectorSkew;
use qkd_formats::type1::{self, Type1Header};
use qkd_formats::{tdc1, timestamp7, type2, type3};
use std::path::PathBuf;

use crate::chopping::typed_array;
use crate::error::format_error;

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(decode_raw_events, m)?)?;
    m.add_function(wrap_pyfunction!(encode_raw_events, m)?)?;
    m.add_function(wrap_pyfunction!(decode_timestamp7, m)?)?;
    m.add_function(wrap_pyfunction!(read_timestamp7, m)?)?;
    m.add_function(wrap_pyfunction!(encode_timestamp7, m)?)?;
    m.add_function(wrap_pyfunction!(timestamp7_to_raw, m)?)?;
    m.add_function(wrap_pyfunction!(decode_tdc1, m)?)?;
    m.add_function(wrap_pyfunction!(read_tdc1, m)?)?;
    m.add_function(wrap_pyfunction!(encode_tdc1, m)?)?;
    m.add_function(wrap_pyfunction!(apply_detector_skew, m)?)?;
    register_epoch_files(m)?;
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

type EventArrays<'py> = (Bound<'py, PyArray1<u64>>, Bound<'py, PyArray1<u8>>);

fn split_words(words: &[u64]) -> (Vec<u64>, Vec<u8>) {
    let times = words.iter().map(|&w| raw::time_ticks(w)).collect();
    let patterns = words.iter().map(|&w| raw::pattern(w)).collect();
    (times, patterns)
}

fn to_arrays<'py>(py: Python<'py>, (times, patterns): (Vec<u64>, Vec<u8>)) -> EventArrays<'py> {
    (times.into_pyarray(py), patterns.into_pyarray(py))
}

fn parse_layout(name: &str) -> PyResult<timestamp7::Layout> {
    timestamp7::Layout::parse(name).map_err(|e| PyValueError::new_err(e.to_string()))
}

fn read_path(path: &std::path::Path) -> PyResult<Vec<u8>> {
    std::fs::read(path).map_err(|e| format_error(qkd_formats::FormatError::io(path, e)))
}

/// Checks that times and patterns are equally long contiguous arrays and returns slices.
fn event_slices<'a>(
    times: &'a PyReadonlyArray1<'_, u64>,
    patterns: &'a PyReadonlyArray1<'_, u8>,
) -> PyResult<(&'a [u64], &'a [u8])> {
    let (t, p) = (times.as_slice()?, patterns.as_slice()?);
    if t.len() != p.len() {
        return Err(PyValueError::new_err(format!(
            "times and patterns differ in length: {} and {}",
            t.len(),
            p.len()
        )));
    }
    Ok((t, p))
}

/// Builds the detector skew table from 4 values, or none.
fn skew_table(skew: Option<[i64; 4]>, fine: bool) -> DetectorSkew {
    match (skew, fine) {
        (None, _) => DetectorSkew::NONE,
        (Some(s), false) => DetectorSkew::from_ticks(s),
        (Some(s), true) => DetectorSkew::from_fine_ticks(s),
    }
}

fn timestamp7_events(
    data: &[u8],
    layout: &str,
    skew_fine_ticks: Option<[i64; 4]>,
) -> PyResult<Vec<u64>> {
    let layout = parse_layout(layout)?;
    let skew = skew_table(skew_fine_ticks, true);
    let mut words = Vec::new();
    timestamp7::decode_into(data, layout, &mut words).map_err(format_error)?;
    for w in &mut words {
        *w = skew.apply(timestamp7::to_raw(*w));
    }
    Ok(words)
}

/// Decode a timestamp7 recording into (times as uint64 ticks of 1/8 ns, patterns as uint8).
///
/// `layout` is fpfind's name: "a0" (text words, low first), "a1" (binary little-endian
/// u64), "a1X" (binary, legacy word order) or "a2" (16 hex digits per line). Times are cut
/// to whole ticks as readevents7's short mode does; `skew_fine_ticks` gives the skews of
/// detectors 1..4 in 1/256 ns (readevents7 -D), added after that cut.
#[pyfunction]
#[pyo3(signature = (data, layout = "a1", skew_fine_ticks = None))]
fn decode_timestamp7<'py>(
    py: Python<'py>,
    data: &[u8],
    layout: &str,
    skew_fine_ticks: Option<[i64; 4]>,
) -> PyResult<EventArrays<'py>> {
    let arrays =
        py.detach(|| timestamp7_events(data, layout, skew_fine_ticks).map(|w| split_words(&w)))?;
    Ok(to_arrays(py, arrays))
}

/// Read a timestamp7 recording file; see decode_timestamp7 for the arguments.
#[pyfunction]
#[pyo3(signature = (path, layout = "a1", skew_fine_ticks = None))]
fn read_timestamp7<'py>(
    py: Python<'py>,
    path: std::path::PathBuf,
    layout: &str,
    skew_fine_ticks: Option<[i64; 4]>,
) -> PyResult<EventArrays<'py>> {
    let arrays = py.detach(|| {
        let data = read_path(&path)?;
        timestamp7_events(&data, layout, skew_fine_ticks).map(|w| split_words(&w))
    })?;
    Ok(to_arrays(py, arrays))
}

/// Encode times (uint64 ticks of 1/8 ns) and patterns (uint8) as a timestamp7 recording in
/// `layout`, the way fpfind writes it (bits 9..4 zero).
#[pyfunction]
#[pyo3(signature = (times, patterns, layout = "a1"))]
fn encode_timestamp7<'py>(
    py: Python<'py>,
    times: PyReadonlyArray1<'py, u64>,
    patterns: PyReadonlyArray1<'py, u8>,
    layout: &str,
) -> PyResult<Bound<'py, PyBytes>> {
    let layout = parse_layout(layout)?;
    let (times, patterns) = event_slices(&times, &patterns)?;
    let bytes = py.detach(|| {
        let words: Vec<u64> = times
            .iter()
            .zip(patterns)
            .map(|(&t, &p)| timestamp7::from_ticks(t, p))
            .collect();
        let mut out = Vec::new();
        timestamp7::encode_into(&words, layout, &mut out);
        out
    });
    Ok(PyBytes::new(py, &bytes))
}

/// Convert a timestamp7 recording to raw events as bytes, word for word: short mode (bits
/// 14..10 cleared), then the skews (1/256 ns), flag bits kept; `serialisation` is "legacy"
/// (what chopper reads) or "native".
#[pyfunction]
#[pyo3(signature = (data, layout = "a1", serialisation = "legacy", skew_fine_ticks = None))]
fn timestamp7_to_raw<'py>(
    py: Python<'py>,
    data: &[u8],
    layout: &str,
    serialisation: &str,
    skew_fine_ticks: Option<[i64; 4]>,
) -> PyResult<Bound<'py, PyBytes>> {
    let order = parse_serialisation(serialisation)?;
    let bytes = py.detach(|| {
        let words = timestamp7_events(data, layout, skew_fine_ticks)?;
        let mut out = Vec::new();
        raw::encode_into(&words, order, &mut out);
        Ok::<_, PyErr>(out)
    })?;
    Ok(PyBytes::new(py, &bytes))
}

fn tdc1_events(
    data: &[u8],
    start_ticks: u64,
    skew_ticks: Option<[i64; 4]>,
    keep_dummies: bool,
) -> PyResult<(Vec<u64>, Vec<u8>)> {
    let words = tdc1::decode(
        data,
        start_ticks,
        skew_table(skew_ticks, false),
        keep_dummies,
    )
    .map_err(format_error)?;
    Ok(split_words(&words))
}

/// Decode a TDC1 stream (little-endian 32-bit words, 2 ns units) into (times as uint64
/// ticks of 1/8 ns, patterns as uint8), counting counter rollovers.
///
/// `start_ticks` is added to every time; `skew_ticks` gives the skews of detectors 1..4 in
/// ticks (readevents -d); dummy words are dropped unless `keep_dummies`.
#[pyfunction]
#[pyo3(signature = (data, start_ticks = 0, skew_ticks = None, keep_dummies = false))]
fn decode_tdc1<'py>(
    py: Python<'py>,
    data: &[u8],
    start_ticks: u64,
    skew_ticks: Option<[i64; 4]>,
    keep_dummies: bool,
) -> PyResult<EventArrays<'py>> {
    let arrays = py.detach(|| tdc1_events(data, start_ticks, skew_ticks, keep_dummies))?;
    Ok(to_arrays(py, arrays))
}

/// Read a TDC1 recording file; see decode_tdc1 for the arguments.
#[pyfunction]
#[pyo3(signature = (path, start_ticks = 0, skew_ticks = None, keep_dummies = false))]
fn read_tdc1<'py>(
    py: Python<'py>,
    path: std::path::PathBuf,
    start_ticks: u64,
    skew_ticks: Option<[i64; 4]>,
    keep_dummies: bool,
) -> PyResult<EventArrays<'py>> {
    let arrays = py.detach(|| {
        let data = read_path(&path)?;
        tdc1_events(&data, start_ticks, skew_ticks, keep_dummies)
    })?;
    Ok(to_arrays(py, arrays))
}

/// Encode time-ordered events (uint64 ticks, uint8 patterns) as the TDC1 stream: times cut
/// to 2 ns, a dummy word at every half counter period without events.
#[pyfunction]
fn encode_tdc1<'py>(
    py: Python<'py>,
    times: PyReadonlyArray1<'py, u64>,
    patterns: PyReadonlyArray1<'py, u8>,
) -> PyResult<Bound<'py, PyBytes>> {
    let (times, patterns) = event_slices(&times, &patterns)?;
    let bytes = py
        .detach(|| tdc1::encode(times, patterns))
        .map_err(format_error)?;
    Ok(PyBytes::new(py, &bytes))
}

/// Return the times (uint64 ticks) corrected by per-detector skews in ticks, as readevents
/// applies them: events of a single detector (pattern 1, 2, 4 or 8) move by that
/// detector's skew, modulo 2^49; other patterns stay. The result may be out of order.
#[pyfunction]
fn apply_detector_skew<'py>(
    py: Python<'py>,
    times: PyReadonlyArray1<'py, u64>,
    patterns: PyReadonlyArray1<'py, u8>,
    skew_ticks: [i64; 4],
) -> PyResult<Bound<'py, PyArray1<u64>>> {
    let (times, patterns) = event_slices(&times, &patterns)?;
    let skew = DetectorSkew::from_ticks(skew_ticks);
    let corrected: Vec<u64> = py.detach(|| {
        times
            .iter()
            .zip(patterns)
            .map(|(&t, &p)| raw::time_ticks(skew.apply(raw::make_word(t, u16::from(p)))))
            .collect()
    });
    Ok(corrected.into_pyarray(py))
}

// Epoch files of types 1, 2 and 3. Headers are returned as dicts with the keys "tag",
// "extended", "epoch", "length" and the type's own fields.

/// Registers the epoch-file functions.
pub fn register_epoch_files(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_type1, m)?)?;
    m.add_function(wrap_pyfunction!(read_type1_words, m)?)?;
    m.add_function(wrap_pyfunction!(write_type1, m)?)?;
    m.add_function(wrap_pyfunction!(read_type2, m)?)?;
    m.add_function(wrap_pyfunction!(write_type2, m)?)?;
    m.add_function(wrap_pyfunction!(read_type3, m)?)?;
    m.add_function(wrap_pyfunction!(write_type3, m)?)?;
    m.add_function(wrap_pyfunction!(type2_listing, m)?)?;
    Ok(())
}

fn header_dict<'py>(
    py: Python<'py>,
    tag: i32,
    extended: bool,
    epoch: u32,
    length: u32,
) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("tag", tag)?;
    d.set_item("extended", extended)?;
    d.set_item("epoch", epoch)?;
    d.set_item("length", length)?;
    Ok(d)
}

fn type1_header<'py>(py: Python<'py>, h: &Type1Header) -> PyResult<Bound<'py, PyDict>> {
    let d = header_dict(py, h.tag(), h.extended, h.epoch, h.length)?;
    d.set_item("bits_per_entry", type1::BITS_PER_ENTRY)?;
    d.set_item("base_bits", type1::BASE_BITS)?;
    Ok(d)
}

/// Read a type-1 file into (header dict, times as uint64 ticks of 1/8 ns including the
/// header epoch's upper bits, detector patterns as uint8).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn read_type1<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(
    Bound<'py, PyDict>,
    Bound<'py, PyArray1<u64>>,
    Bound<'py, PyArray1<u8>>,
)> {
    let (header, times, patterns) = py
        .detach(|| {
            let file = type1::read(&path)?;
            Ok::<_, qkd_formats::FormatError>((file.header, file.times(), file.patterns()))
        })
        .map_err(format_error)?;
    Ok((
        type1_header(py, &header)?,
        times.into_pyarray(py),
        patterns.into_pyarray(py),
    ))
}

/// Read a type-1 file into (header dict, raw event words as uint64, flags included).
#[pyfunction]
fn read_type1_words<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyArray1<u64>>)> {
    let file = py.detach(|| type1::read(&path)).map_err(format_error)?;
    Ok((
        type1_header(py, &file.header)?,
        file.events.into_pyarray(py),
    ))
}

/// Write raw event words (uint64) as a type-1 file, atomically.
#[pyfunction]
#[pyo3(signature = (path, epoch, words, extended = false))]
fn write_type1(
    py: Python<'_>,
    path: PathBuf,
    epoch: u32,
    words: &Bound<'_, PyAny>,
    extended: bool,
) -> PyResult<()> {
    let words = typed_array::<u64>(words, "words", "uint64")?;
    let words = words.as_slice()?;
    py.detach(|| type1::write(&path, epoch, extended, words))
        .map_err(format_error)
}

/// Read and decode a type-2 file into (header dict, times as uint64 ticks of 1/8 ns,
/// values as uint8). Header keys add "time_order", "base_bits" and "protocol".
#[pyfunction]
#[allow(clippy::type_complexity)]
fn read_type2<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(
    Bound<'py, PyDict>,
    Bound<'py, PyArray1<u64>>,
    Bound<'py, PyArray1<u8>>,
)> {
    let (h, events) = py
        .detach(|| type2::read_events(&path))
        .map_err(format_error)?;
    let d = header_dict(py, h.tag(), h.extended, h.epoch, h.length)?;
    d.set_item("time_order", h.time_order)?;
    d.set_item("base_bits", h.base_bits)?;
    d.set_item("protocol", h.protocol)?;
    Ok((
        d,
        events.times.into_pyarray(py),
        events.values.into_pyarray(py),
    ))
}

/// Write events of one epoch as a type-2 file, atomically. `times` (uint64 ticks) must
/// lie in `epoch` and increase by at least 2; `values` (uint8) must fit the protocol's
/// type-2 width.
#[pyfunction]
#[pyo3(signature = (path, epoch, times, values, time_order = 17, protocol = 1, extended = false))]
#[allow(clippy::too_many_arguments)]
fn write_type2(
    py: Python<'_>,
    path: PathBuf,
    epoch: u32,
    times: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    time_order: u32,
    protocol: u8,
    extended: bool,
) -> PyResult<()> {
    let times = typed_array::<u64>(times, "times", "uint64")?;
    let values = typed_array::<u8>(values, "values", "uint8")?;
    let (times, values) = (times.as_slice()?, values.as_slice()?);
    py.detach(|| {
        let bytes = type2::encode(epoch, extended, time_order, protocol, times, values)?;
        qkd_formats::epoch::write_atomic(&path, &bytes)
    })
    .map_err(format_error)
}

/// Read a type-3 file into (header dict with "bits_per_entry", values as uint8).
#[pyfunction]
fn read_type3<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(Bound<'py, PyDict>, Bound<'py, PyArray1<u8>>)> {
    let file = py.detach(|| type3::read(&path)).map_err(format_error)?;
    let h = &file.header;
    let d = header_dict(py, h.tag(), h.extended, h.epoch, h.length)?;
    d.set_item("bits_per_entry", h.bits_per_entry)?;
    Ok((d, file.values.into_pyarray(py)))
}

/// Write values (uint8, each below 2**bits_per_entry) as a type-3 file, atomically.
#[pyfunction]
#[pyo3(signature = (path, epoch, values, bits_per_entry, extended = false))]
fn write_type3(
    py: Python<'_>,
    path: PathBuf,
    epoch: u32,
    values: &Bound<'_, PyAny>,
    bits_per_entry: u32,
    extended: bool,
) -> PyResult<()> {
    let values = typed_array::<u8>(values, "values", "uint8")?;
    let values = values.as_slice()?;
    py.detach(|| {
        let bytes = type3::encode(epoch, extended, bits_per_entry, values)?;
        qkd_formats::epoch::write_atomic(&path, &bytes)
    })
    .map_err(format_error)
}

/// Return the event listing of the qcrypto `decompress` tool for a type-2 file: the
/// lines `retval from getstream: 0, realsize:<bytes>`, `entries: <n>, bitwidth: <T>`,
/// `original buffer: (nil),pointer2: (nil)`, then per event
/// `k=<i>: diff=<hex>, result: <offset mod 2**32 as 8 hex digits>, pattern :<hex>`.
#[pyfunction]
fn type2_listing(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.detach(|| {
        let bytes = qkd_formats::epoch::read_file(&path)?;
        let file = type2::Type2File::parse(&bytes)?;
        let events = file.decode()?;
        let mut out = format!(
            "retval from getstream: 0, realsize:{}\nentries: {}, bitwidth: {}\noriginal buffer: (nil),pointer2: (nil)\n",
            bytes.len(),
            file.header.length,
            file.header.time_order
        );
        for (k, ((diff, time), value)) in events
            .differences
            .iter()
            .zip(&events.times)
            .zip(&events.values)
            .enumerate()
        {
            out.push_str(&format!(
                "k={k}: diff={diff:x}, result: {:08x}, pattern :{value:x}\n",
                *time as u32
            ));
        }
        Ok::<_, qkd_formats::FormatError>(out)
    })
    .map_err(format_error)
}
