"""Service QBER, reconciliation blocks and the release of final keys (error_correction worker).

The low-count side is the block initiator. For every raw key epoch it either discloses
the epoch (service mode) or adds it to the block being collected (key generation).
A block is a run of consecutive epochs; its epochs are marked used in the keystore on
both sides before any parity is exchanged, so they can never be used again, whatever
the block's outcome.

A collected block starts once it contains ``minimal_block_size`` bits, unless
``max_blocks_in_flight`` blocks are in flight: started and not yet released or discarded.
Then it is held back and takes in the following epochs until one of them ends or it
reaches ``maximal_block_size`` bits or :data:`MAX_HELD_EPOCHS` epochs, when it starts
anyway. Each block costs about the same number of messages whatever its size, so blocks
grow while reconciliation lags behind the raw key and stay small, for a short key
latency, while it keeps up. Collected epochs that did not start a block when the engine
leaves key generation are dropped, and so are those of a stopped run.

Release of a final key, once both reconciliation sessions report a verified key:

1. each side stages the type-7 file (:meth:`KeyStore.stage`); the high-count side sends
   ``key_staged`` with ``ok`` true, or false and the reason (for example a full keys
   folder);
2. the low-count side decides: release when both keys are staged, drop otherwise, and
   :mod:`S15qkd.release` carries the decision out on both sides. A failed stage also
   stops key generation.

A block that receives nothing from the peer for ``block_timeout_s`` seconds is discarded
on both sides: an ``abort`` message ends it at the peer, and a key that the low-count
side staged already is dropped.

Peer messages of reconciliation travel in RECONCILE frames: one line of JSON (run id,
block id = first epoch, kind) and the reconciliation message bytes after it. Kind
``start`` (low to high) names the block's epochs and raw key length, so the high-count
side can join with its own raw key; ``msg`` carries a message of the reconciliation
protocol (``qkd_core.Reconciler``); ``abort`` ends a block that one side cannot run.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from . import stages
from .channel import FrameError
from .channel.frames import decode_json
from .keystore import FinalKey, KeyStoreError, pack_key_bits
from .status import BlockRecord, EngineState

if TYPE_CHECKING:
    from .node import Node
    from .pipeline import Pipeline

log = logging.getLogger(__name__)

S = EngineState


# Most epochs one reconciliation block may name: 2**20 epochs of 0.537 s are about 6
# days, and the bound keeps a start message cheap to check.
MAX_BLOCK_EPOCHS = 1 << 20
# Maximum number of epochs a held-back block takes in before it starts anyway. The
# high-count side keeps its raw key for this many epochs more than the low-count side's
# reader may lead (pipeline.raw_key_retention_epochs), so a larger value needs a larger
# retention there.
MAX_HELD_EPOCHS = 128
# Minimum compared bits behind a service QBER that may start key generation. An unlocked
# stream can show no error on a handful of bits. At 500 bits, a QBER near the default
# threshold of 0.085 has a standard error of about 0.012, so a QBER of 0.5 cannot pass.
SERVICE_MIN_BITS = 500


def encode_reconcile(header: dict, body: bytes = b"") -> bytes:
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + body


def decode_reconcile(payload: bytes) -> tuple[dict, bytes]:
    line, separator, body = payload.partition(b"\n")
    if not separator:
        raise FrameError("malformed RECONCILE payload: no header line")
    header = decode_json(line, "RECONCILE header")
    if not _is_u32(header.get("block")):
        raise FrameError(f"malformed RECONCILE header: {line[:200]!r}")
    # The fields are checked here, on the channel thread, because a bad value raised in
    # the error-correction worker would stop that worker instead of this one message.
    kind = header.get("kind")
    if kind == "start":
        epochs, bits = header.get("epochs"), header.get("bits")
        if (not isinstance(epochs, list) or not 0 < len(epochs) <= MAX_BLOCK_EPOCHS
                or not all(_is_u32(e) for e in epochs)):
            raise FrameError(f"malformed RECONCILE start of block {header['block']}: epochs "
                             f"must be a list of 1 to {MAX_BLOCK_EPOCHS} epoch numbers")
        if not isinstance(bits, int) or isinstance(bits, bool) or bits < 1:
            raise FrameError(f"malformed RECONCILE start of block {header['block']}: bits "
                             f"{bits!r} must be a positive integer")
    elif kind == "abort":
        if not isinstance(header.get("reason", ""), str):
            raise FrameError(f"malformed RECONCILE abort of block {header['block']}: reason "
                             "must be a string")
    elif kind != "msg":
        raise FrameError(f"malformed RECONCILE header: unknown kind {kind!r}; expected "
                         "'start', 'msg' or 'abort'")
    return header, body


def _is_u32(value) -> bool:
    """Tell whether value is an epoch number or block id: an int from 0 to 2**32 - 1."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


@dataclass
class Block:
    block_id: int                 # first epoch
    epochs: list[int]
    raw_bits: int
    started: float
    last_activity: float = field(default_factory=time.monotonic)   # monotonic seconds
    final: Optional[FinalKey] = None
    own_ok: Optional[bool] = None
    peer_ok: Optional[bool] = None
    record: Optional[BlockRecord] = None


class BlockManager:
    """Service QBER and reconciliation blocks of one key generation run."""

    def __init__(self, node: "Node", pipeline: "Pipeline"):
        self.node = node
        self.pipeline = pipeline
        self.config = node.config
        self.initiator = pipeline.role == "low"
        self.blocks: dict[int, Block] = {}
        self.collected: list[tuple[int, np.ndarray]] = []   # raw key epochs for the next block
        self.collected_bits = 0                             # raw key bits in collected
        self.held_since: Optional[float] = None             # monotonic s; None: not held back
        self.service: list[tuple[int, int]] = []            # (errors, bits) per disclosed epoch
        self.awaiting: set[int] = set()                     # disclosed, result not back yet
        self.window_disclosed = 0                           # epochs disclosed in this window
        self.window_epochs: list[int] = []
        self.held: list[tuple[int, np.ndarray]] = []        # raw key waiting for a decision
        self._reconciler: "stages.Reconciler | None" = None
        self._timer: Optional[threading.Thread] = None
        self.replay_logged = False                          # skip_replayed logged this run

    # ---- dispatch -----------------------------------------------------------------------

    def process(self, item) -> None:
        kind = item[0]
        if kind == "raw_key":
            self.on_raw_key(item[1], item[2])
        elif kind == "service_bits":
            self.on_service_bits(item[1])
        elif kind == "service_result":
            self.on_service_result(item[1])
        elif kind == "reconcile":
            self.on_reconcile(item[1], item[2])
        elif kind == "key_staged":
            self.on_key_staged(item[1])
        elif kind == "check_timeouts":
            self.check_timeouts()
        else:
            raise ValueError(f"unknown error-correction work item {kind!r}")
        # Any item may have ended a block, changed the mode or the configuration.
        self.advance_collected()

    # ---- service mode -------------------------------------------------------------------

    def on_raw_key(self, epoch: int, bits: np.ndarray) -> None:
        if epoch < self.node.keystore.next_unused_epoch:
            self.skip_replayed(epoch)
            return
        state = self.node.engine.mode
        if state is S.KEY_GENERATION:
            if self.config["error_correction"]:
                self.collect(epoch, bits)
            else:
                log.debug("raw key of epoch %08x left unused: error_correction is off", epoch)
        elif state is S.SERVICE_MODE:
            # Disclose at most one window of epochs at a time and hold the rest until
            # the window's QBER is known: with a fast source, every epoch would
            # otherwise be disclosed before the first result comes back.
            self.held.append((epoch, bits))
            self.disclose_held()

    def skip_replayed(self, epoch: int) -> None:
        """Skip a raw key epoch that an earlier run used, logging once per run.

        A source that restarts from its beginning (a simulator without
        source.start_time, a replayed event file) delivers epochs used before.
        """
        if not self.replay_logged:
            self.replay_logged = True
            log.warning("raw key epoch %08x and later ones up to %08x were used by an earlier run "
                        "(the event source replays its epochs); skipping them", epoch,
                        self.node.keystore.next_unused_epoch - 1)

    def disclose_held(self) -> None:
        """Disclose held epochs until the current window is full."""
        while self.held and self.window_disclosed < self.config["service_epochs"]:
            epoch, bits = self.held.pop(0)
            self.disclose(epoch, bits)

    def disclose(self, epoch: int, bits: np.ndarray) -> None:
        from .pipeline import encode_bits

        try:
            self.node.keystore.consume_epochs(epoch, 1)
        except KeyStoreError as error:
            log.warning("service epoch %08x skipped: %s", epoch, error)
            return
        self.awaiting.add(epoch)
        self.window_disclosed += 1
        self.window_epochs.append(epoch)
        self.node.send_control({"msg": "service_bits", "epoch": epoch, "count": int(len(bits)),
                                "bits": encode_bits(bits)})

    def on_service_bits(self, message: dict) -> None:
        """High-count side: count the errors of a disclosed epoch against the own raw key."""
        from .pipeline import decode_bits

        epoch, count = int(message["epoch"]), int(message["count"])
        own = self.pipeline.take_raw_key(epoch)
        try:
            self.node.keystore.consume_epochs(epoch, 1)
        except KeyStoreError as error:
            log.error("peer disclosed epoch %08x, which this side used before: %s", epoch, error)
            own = None
        if own is None or len(own) != count:
            errors, compared = 0, 0
        else:
            errors = int(np.count_nonzero(own != decode_bits(message["bits"], count)))
            compared = count
        self.node.send_control({"msg": "service_result", "epoch": epoch, "errors": errors,
                                "bits": compared})

    def on_service_result(self, message: dict) -> None:
        """Low-count side: update the service QBER and decide on key generation."""
        epoch, errors, bits = int(message["epoch"]), int(message["errors"]), int(message["bits"])
        self.awaiting.discard(epoch)
        if bits > 0:
            self.service.append((errors, bits))
        if self.awaiting:
            return
        # The window is complete: every disclosed epoch has its result.
        self.window_disclosed = 0
        window, self.window_epochs = self.window_epochs, []
        if not self.service:
            self.disclose_held()
            return
        total_errors = sum(e for e, _ in self.service)
        total_bits = sum(b for _, b in self.service)
        if total_bits < SERVICE_MIN_BITS:
            # Too few bits to judge the link: keep them and add the next window's.
            self.node.engine.note(f"service QBER waits for {SERVICE_MIN_BITS} compared bits; "
                                  f"{total_bits} so far (epochs up to {window[-1]:08x})")
            self.disclose_held()
            return
        self.service.clear()
        qber = total_errors / total_bits
        self.node.stats.service_qber = qber
        self.pipeline.send_epoch_stats()
        self.node.progress("service", epochs=window, qber=qber, bits=total_bits)
        threshold = self.config["QBER_threshold"]
        if self.node.engine.mode is S.SERVICE_MODE and qber <= threshold:
            self.node.set_mode(S.KEY_GENERATION, f"service QBER {qber:.4f} at or below "
                                                 f"QBER_threshold {threshold}")
            held, self.held = self.held, []
            for held_epoch, held_bits in held:
                self.on_raw_key(held_epoch, held_bits)
            return
        if qber > threshold:
            self.node.engine.note(f"service QBER {qber:.4f} above QBER_threshold {threshold}; "
                                  "no key generation")
        self.disclose_held()

    # ---- blocks -------------------------------------------------------------------------

    def collect(self, epoch: int, bits: np.ndarray) -> None:
        if self.collected and epoch != self.collected[-1][0] + 1:
            self.drop_collected(f"epoch {epoch:08x} does not follow them")
        self.collected.append((epoch, bits))
        self.collected_bits += len(bits)
        self.advance_collected()

    def drop_collected(self, reason: str) -> None:
        """Forget the collected epochs. They were never marked used, so no block contains them."""
        if not self.collected:
            return
        log.info("raw key epochs %08x..%08x (%d bits) dropped: %s", self.collected[0][0],
                 self.collected[-1][0], self.collected_bits, reason)
        self.collected.clear()
        self.collected_bits = 0
        self.held_since = None

    @property
    def blocks_in_flight(self) -> int:
        """Number of blocks started or joined and not yet released or discarded."""
        return len(self.blocks)

    def advance_collected(self) -> None:
        """Start the collected epochs as a block when they are ready, hold them back
        while max_blocks_in_flight blocks are in flight, or drop them outside key generation."""
        if not self.collected:
            return
        mode = self.node.engine.mode
        if mode is not S.KEY_GENERATION:
            # Key generation resumes only after service mode disclosed later epochs, so
            # no epoch after the change of mode follows these. They are dropped now
            # instead of when the next collected epoch does not follow them.
            self.drop_collected(f"the engine left key generation for {mode.value}")
            return
        if self.collected_bits < self.config["minimal_block_size"]:
            return

        running, limit = self.blocks_in_flight, self.config["max_blocks_in_flight"]
        maximal = self.config["maximal_block_size"]
        full = self.collected_bits >= maximal or len(self.collected) >= MAX_HELD_EPOCHS
        if running >= limit and not full:
            if self.held_since is None:
                self.held_since = time.monotonic()
                log.info("block %08x held back: %d blocks in flight, max_blocks_in_flight %d, so "
                         "it takes in the next epochs until one of them ends or it reaches %d "
                         "bits or %d epochs", self.collected[0][0], running, limit, maximal,
                         MAX_HELD_EPOCHS)
            return

        note = ""
        if self.held_since is not None:
            note += f", held back for {time.monotonic() - self.held_since:.1f} s"
        if running >= limit:
            note += (f", with {running} blocks in flight because it reached maximal_block_size "
                     f"{maximal} or {MAX_HELD_EPOCHS} epochs")
        epochs = [e for e, _ in self.collected]
        key = np.concatenate([b for _, b in self.collected])
        self.collected.clear()
        self.collected_bits = 0
        self.held_since = None
        self.start_block(epochs, key, note)

    @property
    def reconciler(self) -> "stages.Reconciler":
        if self._reconciler is None:
            self._reconciler = stages.Reconciler(self.initiator, self.config)
        return self._reconciler

    def start_block(self, epochs: list[int], key: np.ndarray, note: str = "") -> None:
        """Low-count side: open a block over these epochs with the own raw key.

        note, when given, ends the log line, for example how long the block was held back.
        """
        block_id = epochs[0]
        try:
            self.node.keystore.consume_epochs(block_id, len(epochs))
        except KeyStoreError as error:
            log.error("block %08x not started: %s", block_id, error)
            return
        self.blocks[block_id] = Block(block_id, epochs, int(len(key)), time.time())
        self.start_timer()
        log.info("block %08x started: %d epochs, %d raw bits%s", block_id, len(epochs), len(key),
                 note)
        self.send(block_id, "start", epochs=epochs, bits=int(len(key)))
        self.handle_step(self.reconciler.start_block(block_id, key))

    def on_reconcile(self, header: dict, body: bytes) -> None:
        block_id, kind = header["block"], header.get("kind")
        block = self.blocks.get(block_id)
        if block is not None:
            block.last_activity = time.monotonic()
        if kind == "start":
            self.accept_block(block_id, header)
        elif kind == "abort":
            self.on_abort(block_id, header.get("reason", ""))
        else:
            try:
                step = self.reconciler.handle_message(block_id, body)
            except stages.ReconcileError as error:
                # A late message of a block that already ended here, for example after
                # an abort or a timeout: nothing to do with it.
                log.warning("reconciliation message of block %08x dropped: %s", block_id, error)
                return
            self.handle_step(step)

    def on_abort(self, block_id: int, reason: str) -> None:
        """Handle the peer's refusal of a block: it could not join it or gave up on it."""
        log.error("block %08x aborted by the peer: %s", block_id, reason)
        block = self.blocks.get(block_id)
        if block is None:
            return
        if block.final is not None:
            self.blocks.pop(block_id)
            self.node.release.drop(block_id, f"aborted by the peer: {reason}")
            return
        self.handle_step(self.reconciler.abort_block(block_id, reason))

    def accept_block(self, block_id: int, header: dict) -> None:
        """High-count side: join a block the peer opened, with the own raw key of its epochs."""
        epochs = [int(e) for e in header.get("epochs", [])]
        parts = [self.pipeline.take_raw_key(e) for e in epochs]
        reason = ""
        if not epochs or any(p is None for p in parts):
            reason = "raw key of some epochs is missing on the high-count side"
        else:
            try:
                self.node.keystore.consume_epochs(epochs[0], len(epochs))
            except KeyStoreError as error:
                reason = str(error)
        if not reason:
            key = np.concatenate(parts)
            if len(key) != header.get("bits"):
                reason = (f"raw key lengths differ: {len(key)} bits here, "
                          f"{header.get('bits')} at the peer")
        if reason:
            log.error("block %08x rejected: %s", block_id, reason)
            self.send(block_id, "abort", reason=reason)
            return
        self.blocks[block_id] = Block(block_id, epochs, int(len(key)), time.time())
        self.start_timer()
        self.handle_step(self.reconciler.start_block(block_id, key))

    def send(self, block_id: int, kind: str, body: bytes = b"", **fields) -> None:
        header = {"run": self.pipeline.run, "block": block_id, "kind": kind, **fields}
        self.node.send_reconcile(encode_reconcile(header, body))

    def handle_step(self, step: "stages.ReconcileStep") -> None:
        for message in step.messages:
            self.send(step.block_id, "msg", message)
        if step.outcome is not None:
            self.finish(step.outcome)

    def finish(self, outcome: "stages.BlockResult") -> None:
        block = self.blocks.get(outcome.block_id)
        if block is None:
            log.warning("outcome of unknown block %08x dropped", outcome.block_id)
            return
        if outcome.final_bits is None:
            self.finish_failed(block, outcome)
            return
        final = FinalKey(block.block_id, block.epochs[-1] - block.epochs[0] + 1,
                         int(len(outcome.final_bits)), pack_key_bits(outcome.final_bits))
        block.final = final
        block.last_activity = time.monotonic()
        seconds = final.epochs * stages.EPOCH_SECONDS
        block.record = BlockRecord(block.block_id, final.epochs, block.raw_bits, outcome.qber,
                                   outcome.leaked_bits, outcome.efficiency, final.bits,
                                   final.bits / seconds, time.time())
        store_error = ""
        try:
            self.node.keystore.stage(final)
        except KeyStoreError as error:
            store_error = str(error)
            log.error("block %08x: %s", block.block_id, store_error)
        staged = not store_error and self.node.release.staged(block.block_id, block.record)
        reason = store_error or ("" if staged else "the block was dropped before")
        if self.initiator:
            block.own_ok = staged
            if staged:
                self.settle(block)
            else:
                self.blocks.pop(block.block_id)
                self.node.release.drop(block.block_id, reason)
        else:
            # From here on the low-count side decides; this side waits for its decision.
            self.blocks.pop(block.block_id)
            self.node.send_control({"msg": "key_staged", "block": block.block_id,
                                    "ok": staged, "reason": reason})
        if store_error:
            self.node.fatal(f"final key {block.block_id:08x} not stored: {store_error}")

    def on_key_staged(self, message: dict) -> None:
        """Low-count side: the peer staged its key of a block, or could not."""
        block_id = int(message["block"])
        block = self.blocks.get(block_id)
        if not message["ok"]:
            log.error("block %08x: peer could not store its final key: %s", block_id,
                      message.get("reason", ""))
        if block is None:
            # The block ended here already (timeout or failure) and was dropped.
            log.warning("key_staged for block %08x, which is no longer open here", block_id)
            self.node.release.drop(block_id, "the block ended on this side before the peer "
                                             "staged its key")
            return
        block.peer_ok = bool(message["ok"])
        block.last_activity = time.monotonic()
        if not block.peer_ok:
            self.blocks.pop(block_id)
            self.node.release.drop(block_id, "the peer could not store its final key")
            return
        self.settle(block)

    def settle(self, block: Block) -> None:
        """Low-count side: release a block once both sides staged its key."""
        if not (block.own_ok and block.peer_ok):
            return
        del self.blocks[block.block_id]
        if self.node.release.release(block.block_id):
            self.after_block(block.record.qber)

    def finish_failed(self, block: Block, outcome: "stages.BlockResult") -> None:
        self.blocks.pop(block.block_id, None)
        log.error("block %08x discarded: %s", block.block_id, outcome.reason)
        self.node.progress("block_failed", block=block.block_id, reason=outcome.reason)
        if outcome.qber is not None:
            self.after_block(outcome.qber)

    def after_block(self, qber: float) -> None:
        if not self.initiator:
            return
        reason = self.pipeline.servo.add(qber)
        if reason and self.node.engine.mode is S.KEY_GENERATION:
            self.node.set_mode(S.SERVICE_MODE, reason)

    # ---- timeouts -----------------------------------------------------------------------

    def start_timer(self) -> None:
        """Start the thread that queues a timeout check on the worker (once per run)."""
        if self._timer is not None:
            return
        limit = self.config["block_timeout_s"]
        stopping, worker = self.pipeline.stopping, self.pipeline.ec_worker

        def tick() -> None:
            # The check runs on the error-correction worker, which owns the blocks.
            while not stopping.wait(min(limit / 4, 1.0)):
                worker.put(("check_timeouts",))

        self._timer = threading.Thread(target=tick, name="block-timeouts", daemon=True)
        self._timer.start()

    def check_timeouts(self) -> None:
        """Discard every block that heard nothing from the peer for block_timeout_s."""
        limit = self.config["block_timeout_s"]
        now = time.monotonic()
        for block in [b for b in self.blocks.values() if now - b.last_activity > limit]:
            reason = f"timed out: no reply from the peer for {limit:g} s (block_timeout_s)"
            self.blocks.pop(block.block_id)
            log.error("block %08x discarded: %s", block.block_id, reason)
            self.node.progress("block_failed", block=block.block_id, reason=reason)
            # The abort header ends the block at the peer, or drops its staged key there.
            self.send(block.block_id, "abort", reason=reason)
            if block.final is not None:
                # Only the low-count side keeps a block after its key is staged.
                self.node.release.drop(block.block_id, reason)
                continue
            try:
                self.reconciler.abort_block(block.block_id, reason)
            except stages.ReconcileError as error:
                log.warning("block %08x: %s", block.block_id, error)
