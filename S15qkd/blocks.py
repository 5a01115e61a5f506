"""Service QBER, reconciliation blocks and the release of final keys (error_correction worker).

The low-count side is the block initiator. For every raw key epoch it either discloses
the epoch (service mode) or adds it to the block being collected (key generation).
A block is a run of consecutive epochs; its epochs are marked used in the keystore on
both sides before any parity is exchanged, so they can never be used again, whatever
the block's outcome.

Release of a final key, once both reconciliation sessions report a verified key:

1. each side stages the type-7 file (:meth:`KeyStore.stage`) and sends ``key_staged``
   with ``ok`` true, or false and the reason (for example a full keys folder);
2. each side releases (:meth:`KeyStore.commit`) only when both report ``ok``, and
   discards its staged file otherwise; a failed stage also stops key generation.

Peer messages of reconciliation travel in RECONCILE frames: one line of JSON (run id,
block id = first epoch, kind) and the reconciliation message bytes after it. Kind
``start`` (low to high) names the block's epochs and raw key length, so the high-count
side can join with its own raw key; ``msg`` carries a message of the reconciliation
protocol (``qkd_core.Reconciler``); ``abort`` ends a block that one side cannot run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
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
        self.service: list[tuple[int, int]] = []            # (errors, bits) per disclosed epoch
        self.awaiting: set[int] = set()                     # disclosed, result not back yet
        self.window_disclosed = 0                           # epochs disclosed in this window
        self.window_epochs: list[int] = []
        self.held: list[tuple[int, np.ndarray]] = []        # raw key waiting for a decision
        self._reconciler: "stages.Reconciler | None" = None

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
        else:
            raise ValueError(f"unknown error-correction work item {kind!r}")

    # ---- service mode -------------------------------------------------------------------

    def on_raw_key(self, epoch: int, bits: np.ndarray) -> None:
        state = self.node.engine.state
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
        if self.node.engine.state is S.SERVICE_MODE and qber <= threshold:
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
            log.info("raw key epochs %08x..%08x dropped: epoch %08x does not follow them",
                     self.collected[0][0], self.collected[-1][0], epoch)
            self.collected.clear()
        self.collected.append((epoch, bits))
        total = sum(len(b) for _, b in self.collected)
        if total >= self.config["minimal_block_size"]:
            epochs = [e for e, _ in self.collected]
            key = np.concatenate([b for _, b in self.collected])
            self.collected.clear()
            self.start_block(epochs, key)

    @property
    def reconciler(self) -> "stages.Reconciler":
        if self._reconciler is None:
            self._reconciler = stages.Reconciler(self.initiator, self.config)
        return self._reconciler

    def start_block(self, epochs: list[int], key: np.ndarray) -> None:
        """Low-count side: open a block over these epochs with the own raw key."""
        block_id = epochs[0]
        try:
            self.node.keystore.consume_epochs(block_id, len(epochs))
        except KeyStoreError as error:
            log.error("block %08x not started: %s", block_id, error)
            return
        self.blocks[block_id] = Block(block_id, epochs, int(len(key)), time.time())
        log.info("block %08x started: %d epochs, %d raw bits", block_id, len(epochs), len(key))
        self.send(block_id, "start", epochs=epochs, bits=int(len(key)))
        self.handle_step(self.reconciler.start_block(block_id, key))

    def on_reconcile(self, header: dict, body: bytes) -> None:
        block_id, kind = header["block"], header.get("kind")
        if kind == "start":
            self.accept_block(block_id, header)
        elif kind == "abort":
            log.error("block %08x aborted by the peer: %s", block_id, header.get("reason", ""))
            if block_id in self.blocks:
                self.handle_step(self.reconciler.abort_block(block_id, header.get("reason", "")))
        else:
            try:
                step = self.reconciler.handle_message(block_id, body)
            except stages.ReconcileError as error:
                # A late message of a block that already ended here, for example after
                # an abort: nothing to do with it.
                log.warning("reconciliation message of block %08x dropped: %s", block_id, error)
                return
            self.handle_step(step)

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
        seconds = final.epochs * stages.EPOCH_SECONDS
        block.record = BlockRecord(block.block_id, final.epochs, block.raw_bits, outcome.qber,
                                   outcome.leaked_bits, outcome.efficiency, final.bits,
                                   final.bits / seconds, time.time())
        try:
            self.node.keystore.stage(final)
            block.own_ok = True
            reason = ""
        except KeyStoreError as error:
            block.own_ok = False
            reason = str(error)
            log.error("block %08x: %s", block.block_id, reason)
        self.node.send_control({"msg": "key_staged", "block": block.block_id,
                                "ok": block.own_ok, "reason": reason})
        self.settle(block)
        if reason:
            self.node.fatal(f"final key {block.block_id:08x} not stored: {reason}")

    def on_key_staged(self, message: dict) -> None:
        block = self.blocks.get(int(message["block"]))
        if block is None:
            log.warning("key_staged for unknown block %08x dropped", int(message["block"]))
            return
        block.peer_ok = bool(message["ok"])
        if not block.peer_ok:
            log.error("block %08x: peer could not store its final key: %s", block.block_id,
                      message.get("reason", ""))
        self.settle(block)

    def settle(self, block: Block) -> None:
        if block.own_ok is None or block.peer_ok is None:
            return
        del self.blocks[block.block_id]
        if block.own_ok and block.peer_ok:
            self.node.keystore.commit(block.block_id)
            self.node.record_block(block.record)
            self.after_block(block.record.qber)
        else:
            self.node.keystore.discard(block.block_id)
            log.error("block %08x discarded on both sides: a final key could not be stored",
                      block.block_id)

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
        if reason and self.node.engine.state is S.KEY_GENERATION:
            self.node.set_mode(S.SERVICE_MODE, reason)
