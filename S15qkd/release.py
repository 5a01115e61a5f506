"""Two-phase release of final keys: both nodes release a block's key, or neither does.

Each node stages the verified final key of a block (:meth:`KeyStore.stage`). The
low-count side, which opens every block, is the coordinator: it alone decides whether a
staged key is released or dropped, and the high-count side (the participant) follows.
The messages are CONTROL frames that belong to no key generation run, because a staged
key outlives the run, the connection and the process that staged it:

============  ===========  ==================================================================
msg           direction    meaning
============  ===========  ==================================================================
key_release   low -> high  release the staged key of ``block``
key_drop      low -> high  discard the staged key of ``block`` (``reason``)
key_released  high -> low  the key of ``block`` is released here
key_settle    high -> low  the staged keys ``staged`` wait for a decision
settle_req    low -> high  send a ``key_settle`` now (at close)
============  ===========  ==================================================================

Coordinator. It decides to release a block only after its own key and the peer's (its
``key_staged`` message, handled in :mod:`S15qkd.blocks`) are staged. The decision goes
to disk first, as an entry of ``releasing`` in the keystore state. Then the own key is
released and ``key_release`` sent, and ``key_released`` removes the entry. Every
staged key without that entry is dropped when its run stops, when a new link session
starts and at start-up, and the peer is told with ``key_drop``. A dropped block is
never released later: block ids are first epochs, never used twice.

Participant. Its staged keys wait for a decision, also across restarts. It lists them
in ``key_settle`` on every new link session, when its run stops and at close, and the
coordinator replies with ``key_release`` or ``key_drop`` for each.

So a node killed at any point leaves a state that the next session completes: a key
staged on both sides is released on both or dropped on both. A graceful close runs
the settlement while the channel is up and waits for it, up to a time limit.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Optional

from .keystore import KeyStore, KeyStoreError
from .status import BlockRecord

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

#: Control messages of the release protocol.
RELEASE_MESSAGES = frozenset({"key_release", "key_drop", "key_released", "key_settle", "settle_req"})

#: Most staged keys one key_settle message may list: far more than a node stages between
#: two settlements, and small enough to check at once.
MAX_SETTLE_BLOCKS = 1 << 16


class KeyRelease:
    """Release decisions of one node (coordinator on the low-count side)."""

    def __init__(self, node: "Node", keystore: KeyStore, coordinator: bool):
        self.node = node
        self.keystore = keystore
        self.coordinator = coordinator
        self._lock = threading.Condition()
        self._records: dict[int, BlockRecord] = {}   # staged here, for the status page
        self._dropped: set[int] = set()
        self._settles = 0                            # key_settle messages handled
        self._recover()

    # ---- start-up -----------------------------------------------------------------------

    def _recover(self) -> None:
        staged = self.keystore.staged_keys()
        if not self.coordinator:
            if staged:
                log.info("%d staged final keys (first %08x) wait for the peer's decision",
                         len(staged), staged[0])
            return
        releasing = set(self.keystore.releasing)
        for block in staged:
            if block in releasing:
                # The release was decided before the node stopped, so finish it here.
                # The peer gets key_release again on the next link session.
                log.info("releasing final key %08x: its release was decided before the node "
                         "stopped", block)
                self._commit(block)
            else:
                self._dropped.add(block)
                self.keystore.discard(block)
                log.warning("staged final key %08x dropped at start-up: its release was not "
                            "decided before the node stopped", block)

    # ---- called by the block manager ----------------------------------------------------

    def staged(self, block: int, record: Optional[BlockRecord]) -> bool:
        """Register a key staged here; discard it and return False if the block was dropped."""
        with self._lock:
            dropped = block in self._dropped
            if not dropped and record is not None:
                self._records[block] = record
        if dropped:
            self.keystore.discard(block)
            log.warning("staged final key %08x discarded: block %08x was dropped before",
                        block, block)
        return not dropped

    def release(self, block: int) -> bool:
        """Coordinator: release a block on both sides; return False if it was dropped."""
        with self._lock:
            if block in self._dropped:
                log.warning("block %08x not released: it was dropped before", block)
                return False
            self.keystore.mark_releasing(block)
        self._commit(block)
        self._send({"msg": "key_release", "block": block})
        return True

    def drop(self, block: int, reason: str) -> None:
        """Coordinator: drop a block on both sides, unless its release was decided."""
        decision = self._decide_drop(block)
        if decision == "released":
            self._send({"msg": "key_release", "block": block})
            return
        self.keystore.discard(block)
        if decision == "dropped":
            log.error("block %08x dropped on both sides: %s", block, reason)
        self._send({"msg": "key_drop", "block": block, "reason": reason})

    def _decide_drop(self, block: int) -> str:
        """Return "released", "dropped" (now) or "dropped before" for block."""
        with self._lock:
            if block in self.keystore.releasing:
                return "released"
            if block in self._dropped:
                return "dropped before"
            self._dropped.add(block)
            self._records.pop(block, None)
            self._lock.notify_all()
        return "dropped"

    def drop_undecided(self, reason: str) -> None:
        """Coordinator: drop every staged key whose release was not decided."""
        releasing = set(self.keystore.releasing)
        for block in self.keystore.staged_keys():
            if block not in releasing:
                self.drop(block, reason)

    # ---- life cycle hooks of the node ---------------------------------------------------

    def on_new_session(self) -> None:
        """Settle with a peer that restarted or connected for the first time."""
        if self.coordinator:
            self.drop_undecided("the link session ended before the release was decided")
            for block in self.keystore.releasing:
                self._send({"msg": "key_release", "block": block})
        else:
            self._request_settlement()

    def after_run_stopped(self) -> None:
        """Settle the keys of a key generation run that stopped."""
        if self.coordinator:
            self.drop_undecided("key generation stopped before the release was decided")
        elif self.keystore.staged_keys():
            self._request_settlement()

    def settle_at_close(self, timeout: float) -> None:
        """Wait until the staged keys are settled with the peer, at most timeout seconds."""
        deadline = time.monotonic() + timeout
        if self.coordinator:
            self.drop_undecided("node shut down before the release was decided")
            with self._lock:
                expected = self._settles + 1
            self._send({"msg": "settle_req"})
            settled = self._wait(lambda: self._settles >= expected and not self.keystore.releasing,
                                 deadline)
        else:
            self._request_settlement()
            settled = self._wait(lambda: not self.keystore.staged_keys(), deadline)
        # The last decisions and confirmations must reach the peer before the link stops.
        while self.node.link.queued_frames and self._connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        if settled and not self.node.link.queued_frames:
            return
        staged, releasing = self.keystore.staged_keys(), self.keystore.releasing
        if staged or releasing:
            log.warning("closing before the peer settled every staged final key (staged %s, "
                        "releasing %s); the next link session settles them",
                        [f"{b:08x}" for b in staged], [f"{b:08x}" for b in releasing])
        else:
            # Nothing waits for a decision here. A key that the peer still has staged is
            # settled in its next link session, as after any lost connection.
            log.info("closing before the peer confirmed the settlement, with no final key "
                     "staged or waiting for release on this side")

    def _wait(self, predicate, deadline: float) -> bool:
        with self._lock:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._connected():
                    return False
                # Wake up now and then to notice a lost connection.
                self._lock.wait(min(remaining, 0.1))
        return True

    def _connected(self) -> bool:
        from .channel import LinkState

        return self.node.link.state is LinkState.CONNECTED

    # ---- messages from the peer (channel thread) ----------------------------------------

    def on_message(self, message: dict) -> None:
        kind = message["msg"]
        if kind in ("key_release", "key_drop", "settle_req") and self.coordinator:
            log.error("%s received on the low-count side; both nodes claim the same role", kind)
        elif kind in ("key_released", "key_settle") and not self.coordinator:
            log.error("%s received on the high-count side; both nodes claim the same role", kind)
        elif kind == "key_release":
            self._on_release(_block_id(message))
        elif kind == "key_drop":
            self._on_drop(_block_id(message), str(message.get("reason", "")))
        elif kind == "settle_req":
            self._request_settlement()
        elif kind == "key_released":
            self.keystore.mark_released(_block_id(message))
            with self._lock:
                self._lock.notify_all()
        elif kind == "key_settle":
            self._on_settle(message["staged"])

    def _on_release(self, block: int) -> None:
        if self.keystore.is_staged(block):
            self._commit(block)
        else:
            # Released here before this node stopped, so only the confirmation was lost.
            log.info("peer released final key %08x, which was released here before", block)
        self._send({"msg": "key_released", "block": block})
        with self._lock:
            self._lock.notify_all()

    def _on_drop(self, block: int, reason: str) -> None:
        with self._lock:
            self._dropped.add(block)
            self._records.pop(block, None)
        if self.keystore.discard(block):
            log.error("staged final key %08x discarded: the peer dropped the block (%s)", block,
                      reason)
        with self._lock:
            self._lock.notify_all()

    def _on_settle(self, staged) -> None:
        if not isinstance(staged, list) or len(staged) > MAX_SETTLE_BLOCKS:
            raise ValueError(f"invalid staged: expected a list of at most {MAX_SETTLE_BLOCKS} "
                             f"block ids, got {str(staged)[:40]}")
        releasing = set(self.keystore.releasing)
        for block in staged:
            block = _check_block(block)
            if block in releasing:
                self._send({"msg": "key_release", "block": block})
            else:
                self.drop(block, "the peer asked to settle it and its release was not decided")
        with self._lock:
            self._settles += 1
            self._lock.notify_all()

    # ---- helpers ------------------------------------------------------------------------

    def _request_settlement(self) -> None:
        self._send({"msg": "key_settle", "staged": self.keystore.staged_keys()})

    def _commit(self, block: int) -> None:
        try:
            self.keystore.commit(block)
        except KeyStoreError as error:
            log.error("final key %08x not released on this side: %s", block, error)
            return
        with self._lock:
            record = self._records.pop(block, None)
        if record is not None:
            self.node.record_block(record)

    def _send(self, message: dict) -> None:
        self.node.send_control(message)


def _block_id(message: dict) -> int:
    return _check_block(message["block"])


def _check_block(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise ValueError(f"block id {value!r} is not an epoch number from 0 to 2**32 - 1")
    return value
