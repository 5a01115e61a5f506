"""Node control over a real TLS channel: start handshake, stop, status snapshot."""

from __future__ import annotations

import argparse
import time

import pytest

from S15qkd.node import Node
from S15qkd.simulate import node_configs
from S15qkd.status import ControlError, EngineState, NodeControl, Role

S = EngineState


@pytest.fixture
def nodes(tmp_path):
    args = argparse.Namespace(events_high=None, events_low=None, epochs=0, pair_rate=1e5,
                              qber=0.03, seed=3, real_time=True, block_bits=8000)
    high_config, low_config = node_configs(tmp_path, args)
    high, low = Node(high_config), Node(low_config)
    high.start()
    low.start()
    yield high, low
    high.close()
    low.close()


def wait_state(node: Node, states, timeout: float = 10.0) -> bool:
    return node.engine.wait_for(lambda state: state in states, timeout)


def start_run(high: Node, low: Node) -> int:
    """Start a run from the low-count side and return its id once both nodes are in it."""
    running = {S.INITIATING, S.PEAK_FINDING, S.SERVICE_MODE, S.KEY_GENERATION}
    low.start_keygen()
    assert wait_state(high, running)
    assert wait_state(low, running)
    deadline = time.monotonic() + 30
    while (low.run != high.run or low.pipeline is None) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert low.run == high.run != 0
    return low.run


def test_nodes_connect_to_only_communication(nodes):
    high, low = nodes
    assert wait_state(high, {S.ONLY_COMMUNICATION})
    assert wait_state(low, {S.ONLY_COMMUNICATION})
    assert isinstance(high, NodeControl)
    snapshot = high.status()
    assert snapshot.connected is True
    assert snapshot.raw_key.role is Role.HIGH_COUNT
    assert snapshot.raw_key.peer == "sim-low"
    assert snapshot.worker("transferd").state.value == "running"


def test_start_from_low_side_and_stop(nodes):
    high, low = nodes
    assert wait_state(low, {S.ONLY_COMMUNICATION})
    start_run(high, low)
    assert low.status().worker("splicer") is not None
    high.stop_keygen("operator stop")
    assert wait_state(high, {S.ONLY_COMMUNICATION})
    assert wait_state(low, {S.ONLY_COMMUNICATION})
    assert low.engine.reason == "peer stopped key generation: operator stop"
    log_text = (high.data_root / "watchdog.log").read_text()
    assert f"run {high.run} started" in log_text
    assert "engine KEY_GENERATION" in log_text or "engine INITIATING" in log_text


def test_start_without_peer_is_refused(tmp_path):
    args = argparse.Namespace(events_high=None, events_low=None, epochs=0, pair_rate=1e5,
                              qber=0.03, seed=3, real_time=True, block_bits=8000)
    high_config, _ = node_configs(tmp_path, args)
    high = Node(high_config)
    high.start()
    try:
        with pytest.raises(ControlError, match="not connected"):
            high.start_keygen()
        assert high.engine.state is S.OFF
    finally:
        high.close()


def test_save_config_applies_live_keys(nodes, tmp_path):
    high, _ = nodes
    config = high.get_config()
    config["QBER_limit"] = 0.08
    config["FFT_buffer_order"] = 20
    result = high.save_config(config)
    assert result.applied_keys == ("QBER_limit",)
    assert result.restart_needed_keys == ("FFT_buffer_order",)
    assert high.config["QBER_limit"] == 0.08
    config["QBER_limit"] = "high"
    problems = high.validate_config(config)
    assert problems[0].key == "QBER_limit"


def test_stale_stop_dropped(nodes, caplog):
    high, low = nodes
    assert wait_state(low, {S.ONLY_COMMUNICATION})
    first = start_run(high, low)
    high.stop_keygen("operator stop")
    assert wait_state(low, {S.ONLY_COMMUNICATION})
    second = start_run(high, low)
    assert second != first

    # The peer's channel delivers the stop of the first run again.
    caplog.set_level("INFO", logger="S15qkd.node")
    high.send_control({"msg": "stop", "reason": "replayed", "run": first})
    expected = f"stop of run {first} from the peer dropped: current run is {second}"
    deadline = time.monotonic() + 10
    while expected not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert expected in caplog.text
    time.sleep(0.5)
    assert low.run == second
    assert low.pipeline is not None
    assert low.engine.state is not S.ONLY_COMMUNICATION
    assert low.engine.reason != "peer stopped key generation: replayed"


def test_set_conn_before_start_rejected(tmp_path):
    # The web page is served before Node.start(), so a request may reach set_conn first.
    args = argparse.Namespace(events_high=None, events_low=None, epochs=0, pair_rate=1e5,
                              qber=0.03, seed=3, real_time=True, block_bits=8000)
    high_config, _ = node_configs(tmp_path, args)
    high_config.update({"connections": {"OTHER": {"port_authd": high_config["port_authd"] + 1}}})
    high = Node(high_config)
    try:
        with pytest.raises(ControlError, match="has not started its channel yet"):
            high.set_conn("OTHER")
        assert high.link.state.name == "STOPPED"
        high.start()
        assert high.config["remote_connection_id"] != "OTHER"
    finally:
        high.close()
