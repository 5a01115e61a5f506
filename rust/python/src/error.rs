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

create_exception!(
    qkd_core,
    ChopError,
    QkdError,
    "The chopping stage stopped: events jumped across epochs, or it failed earlier."
);

create_exception!(
    qkd_core,
    SyncError,
    QkdError,
    "No time or frequency offset could be found, for example for lack of events."
);

create_exception!(
    qkd_core,
    ReconcileError,
    QkdError,
    "A reconciliation message that belongs to no block in progress, or an invalid call."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("ReconcileError", py.get_type::<ReconcileError>())?;
    m.add("SyncError", py.get_type::<SyncError>())?;
    m.add("QkdError", py.get_type::<QkdError>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add("DeviceError", py.get_type::<DeviceError>())?;
    m.add("ChopError", py.get_type::<ChopError>())?;
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

/// Maps a sync error: bad options become `ValueError`, missing or undeletable files
/// `FileNotFoundError`/`OSError`, bad file content `FormatError`, a failed search
/// `SyncError`. Every exception carries `pfind_code`: the reference pfind's error code for
/// the same failure (exit status `256 - code`), or None.
pub fn sync_error(py: Python<'_>, err: qkd_sync::SyncError) -> PyErr {
    use pyo3::exceptions::PyFileNotFoundError;
    use qkd_sync::SyncError as E;
    let code = err.pfind_code();
    let message = err.to_string();
    let py_err = match err {
        E::InvalidParameter { .. } => PyValueError::new_err(message),
        E::MissingFile { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(message)
        }
        E::MissingFile { .. } | E::DeleteFailed { .. } => PyOSError::new_err(message),
        E::EmptyFile { .. }
        | E::ShortHeader { .. }
        | E::WrongTag { .. }
        | E::Inconsistent { .. }
        | E::EpochMismatch { .. } => FormatError::new_err(message),
        E::NoEvents { .. } | E::NoPeak { .. } => SyncError::new_err(message),
    };
    // Attaching an attribute to a fresh exception object cannot fail in practice; if it
    // does, the exception is still raised without it.
    let _ = py_err.value(py).setattr("pfind_code", code);
    py_err
}
