"""The low-count side's decision to leave service mode, on the QBER of disclosed epochs.

A window of disclosed epochs whose results hold only a few compared bits must not start
key generation: an unlocked stream can show no error on a handful of bits.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from S15qkd.blocks import SERVICE_MIN_BITS, BlockManager
from S15qkd.controller import Engine
from S15qkd.status import EngineState


class FakeKeystore:
    next_unused_epoch = 0   # no epoch used yet, so no raw key epoch counts as replayed

    def consume_epochs(self, epoch: int, count: int) -> None:
        pass


def low_side_in_service_mode():
    engine = Engine()
    for state in (EngineState.ONLY_COMMUNICATION, EngineState.INITIATING,
                  EngineState.PEAK_FINDING, EngineState.SERVICE_MODE):
        engine.move(state, "test setup")
    modes = []
    node = SimpleNamespace(
        config={"service_epochs": 1, "QBER_threshold": 0.085, "error_correction": True},
        engine=engine, keystore=FakeKeystore(), stats=SimpleNamespace(service_qber=None),
        send_control=lambda message: None, progress=lambda *args, **fields: None,
        set_mode=lambda mode, reason: modes.append(mode))
    pipeline = SimpleNamespace(role="low", send_epoch_stats=lambda: None)
    return BlockManager(node, pipeline), node, modes


def disclose_and_answer(manager: BlockManager, epoch: int, bits: int, errors: int) -> None:
    manager.on_raw_key(epoch, np.zeros(bits, dtype=np.uint8))
    manager.on_service_result({"epoch": epoch, "errors": errors, "bits": bits})


def test_service_few_bits_keep_service_mode():
    manager, node, modes = low_side_in_service_mode()
    for epoch in range(0x4F88, 0x4F8C):
        disclose_and_answer(manager, epoch, bits=3, errors=0)
    assert modes == []
    assert node.stats.service_qber is None
    assert f"waits for {SERVICE_MIN_BITS} compared bits; 12 so far" in node.engine.reason


def test_service_bits_add_up_over_windows():
    manager, node, modes = low_side_in_service_mode()
    per_epoch = SERVICE_MIN_BITS // 4 + 1
    for epoch in range(0x4F88, 0x4F8C):
        assert modes == []
        disclose_and_answer(manager, epoch, bits=per_epoch, errors=per_epoch // 50)
    assert modes == [EngineState.KEY_GENERATION]
    assert node.stats.service_qber == 4 * (per_epoch // 50) / (4 * per_epoch)


def test_service_unlocked_stream_stays():
    manager, node, modes = low_side_in_service_mode()
    disclose_and_answer(manager, 0x4F88, bits=SERVICE_MIN_BITS, errors=SERVICE_MIN_BITS // 2)
    assert modes == []
    assert node.stats.service_qber == 0.5
    assert "above QBER_threshold" in node.engine.reason
