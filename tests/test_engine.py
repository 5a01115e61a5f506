"""Engine state machine, QBER servo, stage workers and the watchdog."""

from __future__ import annotations

import threading
import time

import pytest

from S15qkd.controller import Engine, QberServo, TransitionError
from S15qkd.status import EngineState, WorkerState
from S15qkd.watchdog import StageWorker, Watchdog

S = EngineState


def test_engine_follows_allowed_transitions():
    changes = []
    engine = Engine(on_change=lambda old, new, reason: changes.append((old, new, reason)))
    assert engine.state is S.OFF
    engine.move(S.ONLY_COMMUNICATION, "connected")
    engine.move(S.INITIATING, "start")
    engine.move(S.PEAK_FINDING, "waiting for epochs")
    engine.move(S.SERVICE_MODE, "offset found")
    engine.move(S.KEY_GENERATION, "QBER low")
    engine.move(S.SERVICE_MODE, "QBER high")
    engine.move(S.ONLY_COMMUNICATION, "stop")
    assert [new for _, new, _ in changes][-1] is S.ONLY_COMMUNICATION
    assert engine.reason == "stop"
    assert len(engine.history) == 7


@pytest.mark.parametrize("path", [
    [S.KEY_GENERATION],
    [S.ONLY_COMMUNICATION, S.KEY_GENERATION],
    [S.ONLY_COMMUNICATION, S.SERVICE_MODE],
])
def test_engine_rejects_skipped_states(path):
    engine = Engine()
    with pytest.raises(TransitionError):
        for state in path:
            engine.move(state, "test")


def test_engine_note_keeps_state():
    engine = Engine()
    engine.move(S.ONLY_COMMUNICATION, "connected")
    engine.note("service QBER 0.15 above QBER_threshold 0.085")
    assert engine.state is S.ONLY_COMMUNICATION
    assert "above QBER_threshold" in engine.reason
    assert engine.move(S.ONLY_COMMUNICATION, "again") is False


def running_engine() -> Engine:
    engine = Engine()
    for state in (S.ONLY_COMMUNICATION, S.INITIATING, S.PEAK_FINDING, S.SERVICE_MODE):
        engine.move(state, "setup")
    return engine


def test_engine_pause_and_resume():
    engine = running_engine()
    assert engine.suspend("channel to the peer lost (timed out)")
    assert engine.state is S.OFF
    assert "peer lost" in engine.reason
    # A worker's change while paused is kept for the paused run, not shown.
    assert engine.move(S.KEY_GENERATION, "service QBER low")
    assert engine.state is S.OFF
    assert engine.mode is S.KEY_GENERATION
    assert engine.resume("channel reconnected")
    assert engine.state is S.KEY_GENERATION
    assert engine.suspended is None
    assert engine.resume("again") is False


def test_engine_stop_ends_pause(caplog):
    engine = running_engine()
    engine.suspend("channel to the peer lost")
    caplog.clear()
    caplog.set_level("INFO", logger="S15qkd.controller")
    assert engine.move(S.OFF, "new link session")
    assert "engine stays in OFF: new link session" in caplog.text
    assert "OFF -> OFF" not in caplog.text
    assert engine.suspended is None
    assert engine.state is S.OFF
    assert engine.reason == "new link session"
    assert engine.resume("channel reconnected") is False


def test_engine_pause_checks_transitions():
    engine = running_engine()
    engine.move(S.PEAK_FINDING, "lock lost")
    engine.suspend("channel to the peer lost")
    with pytest.raises(TransitionError):
        engine.move(S.KEY_GENERATION, "skips service mode")
    assert engine.mode is S.PEAK_FINDING


def test_servo_single_block_bound():
    servo = QberServo(limit=0.1, blocks=3, default=0.06)
    assert servo.servoed == 0.06
    assert servo.add(0.03) == ""
    assert "above 0.15" in servo.add(0.16)
    assert servo.values == []


def test_servo_mean_above_limit():
    servo = QberServo(limit=0.05, blocks=3, default=0.06)
    assert servo.add(0.06) == ""
    assert servo.add(0.06) == ""
    assert "QBER_limit 0.05" in servo.add(0.06)


def test_servo_clamps_low_mean():
    servo = QberServo(limit=0.1, blocks=5, default=0.06)
    servo.add(0.0)
    assert servo.servoed == 0.005


def test_worker_processes_queue_in_order(tmp_path):
    done = []
    watchdog = Watchdog(tmp_path / "watchdog.log", on_give_up=lambda name, message: None)
    worker = watchdog.adopt(StageWorker("chopper", done.append))
    watchdog.start_worker(worker)
    for index in range(100):
        worker.put(index)
    watchdog.stop_worker(worker)
    assert done == list(range(100))
    assert worker.state is WorkerState.STOPPED
    log_text = (tmp_path / "watchdog.log").read_text()
    assert "worker chopper started" in log_text
    assert "worker chopper stopped" in log_text


def test_watchdog_restarts_failed_worker(tmp_path):
    done = []

    def process(item):
        if item == "bad":
            raise ValueError("corrupt epoch 00004f87")
        done.append(item)

    watchdog = Watchdog(tmp_path / "watchdog.log", on_give_up=lambda name, message: None,
                        first_delay_s=0.01)
    worker = watchdog.adopt(StageWorker("costream", process))
    watchdog.start_worker(worker)
    worker.put("a")
    worker.put("bad")
    worker.put("b")
    log_path = tmp_path / "watchdog.log"
    # The restarted thread may finish "b" before the restart timer writes its log line, so
    # wait for both; the limit only matters on a very slow machine.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if done == ["a", "b"] and "restarted (restart 1)" in log_path.read_text():
            break
        time.sleep(0.01)
    assert done == ["a", "b"]
    assert worker.restarts == 1
    assert worker.state is WorkerState.RUNNING
    log_text = log_path.read_text()
    assert "worker costream failed: ValueError: corrupt epoch 00004f87" in log_text
    assert "worker costream restarted (restart 1)" in log_text
    watchdog.stop_worker(worker)


def test_watchdog_gives_up_after_repeated_failures(tmp_path):
    gave_up = threading.Event()
    reasons = []

    def give_up(name, message):
        reasons.append(message)
        gave_up.set()

    def always_fail(item):
        raise RuntimeError("device unplugged")

    watchdog = Watchdog(tmp_path / "watchdog.log", on_give_up=give_up, max_restarts=2,
                        first_delay_s=0.01)
    worker = watchdog.adopt(StageWorker("readevents", always_fail))
    watchdog.start_worker(worker)
    for _ in range(5):
        worker.put("batch")
    assert gave_up.wait(30)
    assert "worker readevents failed 3 times" in reasons[0]
    assert worker.state is WorkerState.FAILED
    assert worker.badge().last_error == "RuntimeError: device unplugged"
