//! `qkd_core`: the Python extension module of QKDServer.
//!
//! This is the only crate that uses pyo3. It checks arguments, converts between numpy
//! arrays and Rust slices, releases the GIL around heavy calls and maps the core crates'
//! errors to the exception classes of `error.rs`. The algorithms live in the core crates.

use pyo3::prelude::*;

mod chopping;
mod coincidences;
mod error;
mod formats;
mod reconcile;
mod sources;
mod sync;

#[pymodule]
fn qkd_core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Route the `log` crate into Python's `logging`; loggers are named after the Rust
    // module path, e.g. `qkd_chopping::chopper`.
    let _ = pyo3_log::try_init();
    // Load numpy and its C API now. Loaded lazily on the first array, a Python exception
    // raised meanwhile (a signal handler's SystemExit, say) made the numpy crate panic.
    m.py().import("numpy")?;
    let _ = numpy::PyArray1::<u8>::zeros(m.py(), 0, false);
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    error::register(m)?;
    formats::register(m)?;
    sources::register(m)?;
    chopping::register(m)?;
    sync::register(m)?;
    coincidences::register(m)?;
    reconcile::register(m)?;
    Ok(())
}
