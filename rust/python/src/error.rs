//! Exception classes of `qkd_core` and the mapping from the core crates' errors.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyValueError};
use pyo3::prelude::*;

create_exception!(
    qkd_core,
    QkdError,
    PyException,
    "Base class of every error raised by qkd_core."
);
create_exception!(
    qkd_core,
    FormatError,
    QkdError,
    "Invalid, truncated or inconsistent file or stream content."
);
create_exception!(
    qkd_core,
    DeviceError,
    QkdError,
    "A timestamp device that is missing, inaccessible, unplugged, silent or sends garbage."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("QkdError", py.get_type::<QkdError>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    Ok(())
}

/// Maps a format error: I/O problems become `OSError`, everything else `FormatError`.
pub fn format_error(err: qkd_formats::FormatError) -> PyErr {
    match err {
        qkd_formats::FormatError::Io { .. } => PyOSError::new_err(err.to_string()),
        other => FormatError::new_err(other.to_string()),
    }
}

/// Maps a source error: bad configuration becomes `ValueError`, file and pipe I/O
/// `OSError`, stream content `FormatError`, device trouble `DeviceError`.
pub fn source_error(err: qkd_sources::SourceError) -> PyErr {
    use qkd_sources::SourceError as E;
    match err {
        E::InvalidConfig { .. } => PyValueError::new_err(err.to_string()),
        E::Format(inner) => format_error(inner),
        E::Io { .. } => PyOSError::new_err(err.to_string()),
        E::Device { .. } | E::Timeout { .. } => DeviceError::new_err(err.to_string()),
    }
}
