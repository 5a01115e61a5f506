"""The status snapshot and control contract between a node and its web page."""

from __future__ import annotations

import dataclasses
import json

import pytest

from S15qkd.status import (
    HISTORY_LENGTH,
    BlockRecord,
    ConfigRejected,
    EngineState,
    InMemoryNode,
    NodeControl,
    StatusSnapshot,
    UnknownConnectionError,
    WorkerState,
    flatten_config,
    set_config_path,
)


def block(first_epoch: int, qber: float = 0.03, final_bits: int = 1000) -> BlockRecord:
    return BlockRecord(
        first_epoch=first_epoch, num_epochs=5, raw_bits=4000, qber=qber, leaked_bits=900,
        efficiency=1.15, final_bits=final_bits, key_rate_bps=final_bits / (5 * 0.537),
    )


def test_memory_node_implements_protocol():
    assert isinstance(InMemoryNode(), NodeControl)


def test_snapshot_is_immutable():
    snapshot = InMemoryNode().status()
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshot.engine_state = EngineState.OFF  # type: ignore[misc]
    assert isinstance(snapshot.workers, tuple)


def test_snapshot_to_dict_is_json():
    node = InMemoryNode()
    node.add_block(block(0x1000))
    data = json.loads(json.dumps(node.status().to_dict()))
    assert data["engine_state"] == "ONLY_COMMUNICATION"
    assert data["raw_key"]["role"] == "high_count"
    assert data["raw_key"]["protocol"] == 0
    assert data["error_correction"]["recent_blocks"][0]["first_epoch"] == 0x1000
    assert {w["name"] for w in data["workers"]} >= {"transferd", "costream"}


def test_controls_move_engine_state():
    node = InMemoryNode()
    node.start_keygen()
    assert node.status().engine_state is EngineState.KEY_GENERATION
    assert node.status().is_running("error_correction")
    node.stop_keygen()
    assert node.status().engine_state is EngineState.ONLY_COMMUNICATION
    assert node.status().worker("costream").state is WorkerState.STOPPED
    assert node.calls == [("start_keygen",), ("stop_keygen",)]


def test_history_keeps_last_blocks():
    node = InMemoryNode()
    for epoch in range(HISTORY_LENGTH + 7):
        node.add_block(block(epoch, final_bits=10))
    ec = node.status().error_correction
    assert len(ec.recent_blocks) == HISTORY_LENGTH
    assert ec.recent_blocks[0].first_epoch == 7
    assert ec.last_block.first_epoch == HISTORY_LENGTH + 6
    assert ec.blocks == HISTORY_LENGTH + 7
    assert ec.total_final_bits == 10 * (HISTORY_LENGTH + 7)


def test_set_conn_rejects_unknown_id():
    node = InMemoryNode(config={"QBER_limit": 0.1, "connections": {"QKDE0001": {}}})
    node.set_conn("QKDE0001")
    assert node.status().active_connection == "QKDE0001"
    with pytest.raises(UnknownConnectionError, match="QKDE0009.*QKDE0001"):
        node.set_conn("QKDE0009")


def test_save_config_reports_restart_needed():
    node = InMemoryNode(config={"QBER_limit": 0.1, "tracking_window": 30})
    config = node.get_config()
    config["QBER_limit"] = 0.08
    config["tracking_window"] = 40
    result = node.save_config(config)
    assert result.changed_keys == ("QBER_limit", "tracking_window")
    assert result.applied_keys == ("QBER_limit",)
    assert result.restart_needed_keys == ("tracking_window",)
    assert "tracking_window" in result.note
    assert node.status().error_correction.qber_limit == 0.08


def test_save_config_rejects_invalid_values():
    node = InMemoryNode(config={"QBER_limit": 0.1, "tracking_window": 30})
    config = node.get_config()
    config["tracking_window"] = "wide"
    config["QBER_limit"] = 0.7
    with pytest.raises(ConfigRejected) as caught:
        node.save_config(config)
    assert {p.key for p in caught.value.problems} == {"tracking_window", "QBER_limit"}
    assert node.get_config()["tracking_window"] == 30


def test_get_config_returns_copy():
    node = InMemoryNode(config={"a": {"b": 1}})
    node.get_config()["a"]["b"] = 2
    assert node.get_config()["a"]["b"] == 1


def test_flatten_and_set_config_path():
    config = {"a": {"b": 1, "c": {"d": True}}, "e": "x", "empty": {}}
    assert flatten_config(config) == {"a.b": 1, "a.c.d": True, "e": "x", "empty": {}}
    set_config_path(config, "a.c.d", False)
    set_config_path(config, "new.leaf", 3)
    assert config["a"]["c"]["d"] is False
    assert config["new"] == {"leaf": 3}
    with pytest.raises(ValueError, match="non-mapping"):
        set_config_path(config, "e.f", 1)


def test_default_snapshot_fields():
    snapshot = StatusSnapshot(time=0.0)
    assert snapshot.engine_state is EngineState.OFF
    assert snapshot.error_correction.last_block is None
    assert snapshot.worker("transferd") is None
    assert not snapshot.is_running("transferd")
