//! Python bindings of the reconciliation stage (crate qkd-reconcile).
//!
//! - `Reconciler`: one peer's protocol engine; bytes in, bytes out, no socket.
//! - `BlockOutcome`: how a block ended: a verified final key or a discard reason.
//! - `reconcile_pair`: runs one block between two in-process peers (tests, simulations).
//! - `simulated_raw_key_pair`: random raw keys with a given QBER (tests, benchmarks).
//! - `write_final_key` / `read_final_key`: type-7 final-key files, written atomically.
//!
//! Keys cross the boundary as bytes packed most significant bit first (numpy `packbits`
//! order) with the bit count alongside, or as uint8 arrays with one bit per element.

use std::path::PathBuf;
use std::sync::Mutex;

use numpy::{IntoPyArray, PyArray1, PyReadonlyArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use qkd_formats::type7::{self, Type7File};
use qkd_reconcile::bits::BitVec;
use qkd_reconcile::finite_key::SecurityParams;
use qkd_reconcile::protocol::{run_pair, Step, MAX_BLOCK_BITS};
use qkd_reconcile::rng::{simulated_key_pair, OsRandom, RandomSource, SeededRandom};
use qkd_reconcile::{
    BlockOutcome as CoreOutcome, BlockResult, Config, ReconcileError as CoreError,
    Reconciler as CoreReconciler, Role,
};

use crate::error::{format_error, ReconcileError};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Reconciler>()?;
    m.add_class::<BlockOutcome>()?;
    m.add_function(wrap_pyfunction!(reconcile_pair, m)?)?;
    m.add_function(wrap_pyfunction!(simulated_raw_key_pair, m)?)?;
    m.add_function(wrap_pyfunction!(write_final_key, m)?)?;
    m.add_function(wrap_pyfunction!(read_final_key, m)?)?;
    Ok(())
}

fn reconcile_error(err: CoreError) -> PyErr {
    match err {
        CoreError::Config(_) | CoreError::BlockSize { .. } => {
            PyValueError::new_err(err.to_string())
        }
        other => ReconcileError::new_err(other.to_string()),
    }
}

/// Reads raw key bits: a 1-D uint8 array (one bit per element, 0 or 1), or bytes packed
/// MSB first together with `nbits`.
fn raw_bits(value: &Bound<'_, PyAny>, nbits: Option<usize>, name: &str) -> PyResult<BitVec> {
    if let Ok(bytes) = value.cast::<PyBytes>() {
        let data = bytes.as_bytes();
        let n = nbits.unwrap_or(data.len() * 8);
        return BitVec::from_msb_bytes(data, n).ok_or_else(|| {
            PyValueError::new_err(format!(
                "{name}: {n} bits need {} bytes, got {}",
                n.div_ceil(8),
                data.len()
            ))
        });
    }
    let array: PyReadonlyArray1<'_, u8> = value.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a 1-D numpy array of dtype uint8 (one bit per element) or packed bytes, got {}",
            value.get_type()
        ))
    })?;
    let bits = array.as_slice()?;
    if nbits.is_some_and(|n| n != bits.len()) {
        return Err(PyValueError::new_err(format!(
            "{name}: nbits={} differs from the array length {}; omit nbits for arrays",
            nbits.unwrap_or(0),
            bits.len()
        )));
    }
    if let Some(i) = bits.iter().position(|&b| b > 1) {
        return Err(PyValueError::new_err(format!(
            "{name}[{i}] = {} is not a bit; raw key arrays hold 0 or 1",
            bits[i]
        )));
    }
    Ok(BitVec::from_bits(bits))
}

fn parse_role(role: &str) -> PyResult<Role> {
    match role {
        "initiator" => Ok(Role::Initiator),
        "responder" => Ok(Role::Responder),
        other => Err(PyValueError::new_err(format!(
            "invalid role {other:?}: expected \"initiator\" (holds the reference key, starts blocks) or \"responder\" (corrects its key)"
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn make_config(
    qber_limit: f64,
    eps_sec: f64,
    eps_cor: f64,
    initial_qber: Option<f64>,
    sample_bits: usize,
    passes: usize,
) -> PyResult<Config> {
    let config = Config {
        security: SecurityParams { eps_sec, eps_cor },
        qber_limit,
        initial_qber,
        sample_bits,
        passes,
    };
    config.validate().map_err(reconcile_error)?;
    Ok(config)
}

fn make_rng(seed: Option<u64>) -> Box<dyn RandomSource> {
    match seed {
        Some(s) => Box::new(SeededRandom::new(s)),
        None => Box::new(OsRandom),
    }
}

/// How one block ended on one peer.
///
/// `verified` is true when both peers checked the corrected keys equal; then `key` holds the
/// final key (`key_bits` bits packed MSB first). Otherwise `key` is None and `reason` is one
/// of "qber_above_limit", "no_secret_key", "verification_failed", "protocol_error",
/// "config_mismatch", "length_mismatch", "aborted", with `detail` in words and `by_peer`
/// telling whether the peer ended the block. The counters describe the block either way.
#[pyclass(frozen, module = "qkd_core")]
pub struct BlockOutcome {
    #[pyo3(get)]
    block_id: u64,
    #[pyo3(get)]
    verified: bool,
    key: Option<Vec<u8>>,
    #[pyo3(get)]
    key_bits: u64,
    #[pyo3(get)]
    reason: Option<&'static str>,
    #[pyo3(get)]
    detail: Option<String>,
    #[pyo3(get)]
    by_peer: bool,
    /// Raw key bits the block started with.
    #[pyo3(get)]
    raw_bits: u64,
    /// Bits disclosed for the QBER sample and removed from the key.
    #[pyo3(get)]
    sample_bits: u64,
    /// Bits reconciled (raw bits minus sample).
    #[pyo3(get)]
    reconciled_bits: u64,
    /// Errors corrected.
    #[pyo3(get)]
    errors: u64,
    /// QBER of the reconciled bits, errors / reconciled_bits.
    #[pyo3(get)]
    qber: f64,
    /// Parity bits disclosed by Cascade.
    #[pyo3(get)]
    leaked_bits: u64,
    /// Verification-tag bits disclosed.
    #[pyo3(get)]
    tag_bits: u64,
    #[pyo3(get)]
    messages_sent: u64,
    #[pyo3(get)]
    messages_received: u64,
}

#[pymethods]
impl BlockOutcome {
    /// The final key as bytes packed MSB first, or None when the block was discarded.
    #[getter]
    fn key<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.key.as_ref().map(|k| PyBytes::new(py, k))
    }

    fn __repr__(&self) -> String {
        // Never include key material.
        match self.reason {
            None => format!(
                "BlockOutcome(block_id={:#x}, verified=True, key_bits={}, qber={:.4})",
                self.block_id, self.key_bits, self.qber
            ),
            Some(r) => format!(
                "BlockOutcome(block_id={:#x}, verified=False, reason={r:?}, by_peer={})",
                self.block_id,
                if self.by_peer { "True" } else { "False" }
            ),
        }
    }
}

impl From<CoreOutcome> for BlockOutcome {
    fn from(o: CoreOutcome) -> Self {
        let s = &o.stats;
        let (verified, key, key_bits, reason, detail, by_peer) = match o.result {
            BlockResult::Verified { key } => (
                true,
                Some(key.to_msb_bytes()),
                key.len() as u64,
                None,
                None,
                false,
            ),
            BlockResult::Discarded {
                reason,
                detail,
                by_peer,
            } => (false, None, 0, Some(reason.as_str()), Some(detail), by_peer),
        };
        BlockOutcome {
            block_id: o.block_id,
            verified,
            key,
            key_bits,
            reason,
            detail,
            by_peer,
            raw_bits: s.raw_bits,
            sample_bits: s.sample_bits,
            reconciled_bits: s.key_bits,
            errors: s.errors,
            qber: s.qber(),
            leaked_bits: s.leak_ec,
            tag_bits: s.tag_bits,
            messages_sent: s.messages_sent,
            messages_received: s.messages_received,
        }
    }
}

type StepResult<'py> = (Vec<Bound<'py, PyBytes>>, Option<BlockOutcome>);

fn step_to_py(py: Python<'_>, step: Step) -> StepResult<'_> {
    let messages = step.messages.iter().map(|m| PyBytes::new(py, m)).collect();
    (messages, step.outcome.map(BlockOutcome::from))
}

/// One peer of the reconciliation protocol, for any number of concurrent blocks.
///
/// `Reconciler(role, *, qber_limit=0.11, eps_sec=1e-10, eps_cor=1e-10, initial_qber=None,
/// sample_bits=1024, passes=64, seed=None)`
///
/// role: "initiator" (reference key; starts every block) or "responder" (corrects its key).
/// qber_limit, eps_sec, eps_cor must be equal on both peers (a mismatch discards the block).
/// initial_qber: QBER assumed for the first block; None discloses `sample_bits` bits of it
/// (at most a tenth) to estimate the QBER. Later blocks use the last verified QBER.
/// seed: None uses the OS CSPRNG for every seed this peer chooses; an int makes runs
/// repeatable and is for tests only.
///
/// Every method returns `(messages, outcome)`: the messages (bytes) to send to the peer in
/// order, and a `BlockOutcome` when a block ended on this side, else None.
#[pyclass(module = "qkd_core")]
pub struct Reconciler {
    inner: Mutex<CoreReconciler>,
    role: &'static str,
}

impl Reconciler {
    fn run<'py, F>(&self, py: Python<'py>, f: F) -> PyResult<StepResult<'py>>
    where
        F: FnOnce(&mut CoreReconciler) -> Result<Step, CoreError> + Send,
    {
        let step = py
            .detach(|| {
                let mut guard = self
                    .inner
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                f(&mut guard)
            })
            .map_err(reconcile_error)?;
        Ok(step_to_py(py, step))
    }
}

#[pymethods]
impl Reconciler {
    #[new]
    #[pyo3(signature = (role, *, qber_limit = 0.11, eps_sec = 1e-10, eps_cor = 1e-10, initial_qber = None, sample_bits = 1024, passes = 64, seed = None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        role: &str,
        qber_limit: f64,
        eps_sec: f64,
        eps_cor: f64,
        initial_qber: Option<f64>,
        sample_bits: usize,
        passes: usize,
        seed: Option<u64>,
    ) -> PyResult<Self> {
        let core_role = parse_role(role)?;
        let config = make_config(
            qber_limit,
            eps_sec,
            eps_cor,
            initial_qber,
            sample_bits,
            passes,
        )?;
        let inner =
            CoreReconciler::new(core_role, config, make_rng(seed)).map_err(reconcile_error)?;
        Ok(Reconciler {
            inner: Mutex::new(inner),
            role: if core_role == Role::Initiator {
                "initiator"
            } else {
                "responder"
            },
        })
    }

    /// "initiator" or "responder".
    #[getter]
    fn role(&self) -> &'static str {
        self.role
    }

    /// QBER that sizes the next block's Cascade passes, or None before the first block.
    #[getter]
    fn qber_estimate(&self) -> Option<f64> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .qber_estimate()
    }

    /// Ids of the blocks in progress, sorted.
    #[getter]
    fn active_blocks(&self) -> Vec<u64> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .active_blocks()
    }

    /// start_block(block_id: int, bits: numpy uint8 array | bytes, nbits: int | None = None)
    ///     -> (list[bytes], BlockOutcome | None)
    ///
    /// Starts a block from this node's raw key (both peers must pass the same number of
    /// bits, assembled from the same epochs; the start epoch makes a good block id). The
    /// initiator returns its START message; the responder usually returns nothing.
    #[pyo3(signature = (block_id, bits, nbits = None))]
    fn start_block<'py>(
        &self,
        py: Python<'py>,
        block_id: u64,
        bits: &Bound<'py, PyAny>,
        nbits: Option<usize>,
    ) -> PyResult<StepResult<'py>> {
        let raw = raw_bits(bits, nbits, "bits")?;
        self.run(py, move |r| r.start_block(block_id, raw))
    }

    /// handle_message(data: bytes) -> (list[bytes], BlockOutcome | None)
    ///
    /// Handles one message from the peer. A damaged, replayed, reordered or unexpected
    /// message of a block in progress ends that block (outcome with reason
    /// "protocol_error" and an abort message for the peer). Raises ReconcileError, changing
    /// nothing, for a message that belongs to no block in progress.
    fn handle_message<'py>(&self, py: Python<'py>, data: &[u8]) -> PyResult<StepResult<'py>> {
        let data = data.to_vec();
        self.run(py, move |r| r.handle_message(&data))
    }

    /// abort_block(block_id: int, detail: str) -> (list[bytes], BlockOutcome | None)
    ///
    /// Ends a block on this side, e.g. after a timeout, and returns the abort message for
    /// the peer. Raises ReconcileError for a block that is not in progress.
    fn abort_block<'py>(
        &self,
        py: Python<'py>,
        block_id: u64,
        detail: &str,
    ) -> PyResult<StepResult<'py>> {
        let detail = detail.to_string();
        self.run(py, move |r| r.abort_block(block_id, &detail))
    }

    fn __repr__(&self) -> String {
        format!(
            "Reconciler(role={:?}, active_blocks={:?})",
            self.role,
            self.active_blocks()
        )
    }
}

/// reconcile_pair(bits_initiator, bits_responder, block_id=0, *, nbits=None,
///     qber_limit=0.11, eps_sec=1e-10, eps_cor=1e-10, initial_qber=None, sample_bits=1024,
///     passes=64, seed=0) -> (BlockOutcome, BlockOutcome, int)
///
/// Runs one block between two in-process peers and returns both outcomes (initiator,
/// responder) and the number of messages exchanged. `seed` seeds both peers' generators
/// (tests and simulations only).
#[pyfunction]
#[pyo3(signature = (bits_initiator, bits_responder, block_id = 0, *, nbits = None, qber_limit = 0.11, eps_sec = 1e-10, eps_cor = 1e-10, initial_qber = None, sample_bits = 1024, passes = 64, seed = 0))]
#[allow(clippy::too_many_arguments)]
fn reconcile_pair(
    py: Python<'_>,
    bits_initiator: &Bound<'_, PyAny>,
    bits_responder: &Bound<'_, PyAny>,
    block_id: u64,
    nbits: Option<usize>,
    qber_limit: f64,
    eps_sec: f64,
    eps_cor: f64,
    initial_qber: Option<f64>,
    sample_bits: usize,
    passes: usize,
    seed: u64,
) -> PyResult<(BlockOutcome, BlockOutcome, usize)> {
    let a = raw_bits(bits_initiator, nbits, "bits_initiator")?;
    let b = raw_bits(bits_responder, nbits, "bits_responder")?;
    let config = make_config(
        qber_limit,
        eps_sec,
        eps_cor,
        initial_qber,
        sample_bits,
        passes,
    )?;
    let run = py
        .detach(|| {
            let mut initiator =
                CoreReconciler::new(Role::Initiator, config.clone(), make_rng(Some(seed)))?;
            let mut responder =
                CoreReconciler::new(Role::Responder, config, make_rng(Some(seed ^ 0x9e37_79b9)))?;
            run_pair(&mut initiator, &mut responder, block_id, a, b, |_, _, m| {
                Some(m)
            })
        })
        .map_err(reconcile_error)?;
    Ok((run.initiator.into(), run.responder.into(), run.messages))
}

type BitArrayPair<'py> = (Bound<'py, PyArray1<u8>>, Bound<'py, PyArray1<u8>>);

/// simulated_raw_key_pair(nbits: int, qber: float, seed: int = 0)
///     -> (numpy uint8 array, numpy uint8 array)
///
/// Returns random raw key bits and a copy with each bit flipped with probability `qber`.
/// `nbits` is at most the largest reconciliation block, 2**26 bits.
#[pyfunction]
#[pyo3(signature = (nbits, qber, seed = 0))]
fn simulated_raw_key_pair(
    py: Python<'_>,
    nbits: usize,
    qber: f64,
    seed: u64,
) -> PyResult<BitArrayPair<'_>> {
    if !(0.0..=1.0).contains(&qber) {
        return Err(PyValueError::new_err(format!(
            "qber = {qber} is invalid: expected 0 <= qber <= 1"
        )));
    }
    // Without this limit a huge nbits aborts the interpreter when the allocation fails.
    if nbits > MAX_BLOCK_BITS {
        return Err(PyValueError::new_err(format!(
            "nbits = {nbits} is invalid: expected at most {MAX_BLOCK_BITS}, the largest reconciliation block"
        )));
    }
    let (a, b) = py.detach(|| {
        let (a, b) = simulated_key_pair(nbits, qber, seed);
        (a.to_bits(), b.to_bits())
    });
    Ok((a.into_pyarray(py), b.into_pyarray(py)))
}

/// write_final_key(folder: str | os.PathLike, start_epoch: int, epochs: int, key: bytes,
///     key_bits: int) -> str
///
/// Writes a type-7 final-key file named after `start_epoch` into `folder`, atomically and
/// with mode 0600, and returns its path. `key` is packed MSB first (BlockOutcome.key).
#[pyfunction]
fn write_final_key(
    py: Python<'_>,
    folder: PathBuf,
    start_epoch: u32,
    epochs: u32,
    key: &[u8],
    key_bits: u32,
) -> PyResult<String> {
    let file = Type7File::new(start_epoch, epochs, key.to_vec(), key_bits).map_err(format_error)?;
    let path = py
        .detach(|| type7::write(&folder, &file))
        .map_err(format_error)?;
    Ok(path.to_string_lossy().into_owned())
}

/// read_final_key(path: str | os.PathLike) -> (start_epoch, epochs, key: bytes, key_bits)
#[pyfunction]
fn read_final_key(py: Python<'_>, path: PathBuf) -> PyResult<(u32, u32, Bound<'_, PyBytes>, u32)> {
    let file = py.detach(|| type7::read(&path)).map_err(format_error)?;
    Ok((
        file.start_epoch,
        file.epochs,
        PyBytes::new(py, &file.key),
        file.bits,
    ))
}
