"""Hostile input to the public qkd_core API: random bytes, damaged epoch files, wrong
dtypes, non-contiguous and empty arrays and absurd options.

Every call must either succeed or raise a clear Python exception (QkdError and its
subclasses, ValueError, TypeError, OverflowError, OSError). A PanicException (a Rust panic
that reached Python), a hang or a crash of the interpreter fails the run.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qkd_core

from conftest import golden_case

# OverflowError: pyo3 raises it for a Python int that does not fit the Rust integer.
CLEAR_ERRORS = (qkd_core.QkdError, ValueError, TypeError, OverflowError, OSError)

FUZZ = settings(max_examples=200, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def call(function, *args, **kwargs):
    """Call and return the result, or None after a clear error. Other exceptions propagate."""
    try:
        return function(*args, **kwargs)
    except CLEAR_ERRORS:
        return None


EPOCH_READERS = (
    qkd_core.read_type1,
    qkd_core.read_type1_words,
    qkd_core.read_type2,
    qkd_core.read_type3,
    qkd_core.read_final_key,
    qkd_core.type2_listing,
)


def read_every_way(path, data: bytes) -> None:
    path.write_bytes(data)
    for reader in EPOCH_READERS:
        call(reader, path)
    call(qkd_core.read_timestamp7, path, "a1")
    call(qkd_core.read_tdc1, path)
    call(qkd_core.decode_raw_events, data)
    call(qkd_core.decode_raw_events, data, "native")
    for layout in ("a0", "a1", "a1X", "a2"):
        call(qkd_core.decode_timestamp7, data, layout)
    call(qkd_core.decode_tdc1, data, 2**64 - 1, [2**63 - 1, -(2**63), -1, 1], True)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_give_clear_errors(tmp_path, data):
    read_every_way(tmp_path / "00004f87", data)


def test_damaged_golden_epoch_files_give_clear_errors(tmp_path):
    case = golden_case("tiny")
    target = tmp_path / "00004f87"
    for sub in ("t1", "t2", "t3", "t4", "rawkey.lec"):
        source = sorted((case / sub).iterdir())[0]
        data = source.read_bytes()
        for cut in range(0, min(len(data), 40)):
            read_every_way(target, data[:cut])
        for bit in range(8 * min(len(data), 28)):
            flipped = bytearray(data)
            flipped[bit // 8] ^= 1 << (bit % 8)
            read_every_way(target, bytes(flipped))


@pytest.mark.parametrize("words", [
    [1, 0x4F87, 2**32 - 1, 49, 4, 0, 0],
    [2, 0x4F87, 2**32 - 1, 17, 4, 1, 0x8000],
    [3, 0x4F87, 2**32 - 1, 8, 0],
    [7, 0x4F87, 2**32 - 1, 2**31 - 1, 0],
])
def test_huge_header_lengths_fail_fast(tmp_path, words):
    data = np.array(words, dtype="<u4").tobytes()
    read_every_way(tmp_path / "00004f87", data)


BAD_ARRAYS = [
    np.zeros(4, dtype=np.int64),
    np.zeros(4, dtype=np.float64),
    np.zeros(8, dtype=np.uint64)[::2],
    np.zeros((2, 2), dtype=np.uint64),
    np.zeros(0, dtype=np.uint64),
    [1, 2, 3],
    None,
    b"\x00" * 8,
]
BAD_PATTERNS = [
    np.zeros(4, dtype=np.int8),
    np.zeros(8, dtype=np.uint8)[::2],
    np.zeros(0, dtype=np.uint8),
    np.full(4, 255, dtype=np.uint8),
    np.zeros(5, dtype=np.uint8),
]


@pytest.mark.parametrize("times", BAD_ARRAYS, ids=range(len(BAD_ARRAYS)))
@pytest.mark.parametrize("patterns", BAD_PATTERNS, ids=range(len(BAD_PATTERNS)))
def test_event_arrays_of_wrong_kind(tmp_path, times, patterns):
    call(qkd_core.encode_raw_events, times, patterns)
    call(qkd_core.encode_timestamp7, times, patterns)
    call(qkd_core.encode_tdc1, times, patterns)
    call(qkd_core.apply_detector_skew, times, patterns, [2**63 - 1, -(2**63), 0, 1])
    for sub in ("t1", "t2", "t3"):
        (tmp_path / sub).mkdir(exist_ok=True)
    chopper = qkd_core.Chopper(tmp_path / "t2", tmp_path / "t3", now=0)
    call(chopper.feed, times, patterns)
    call(chopper.feed_words, times)
    call(chopper.flush)
    chopper2 = qkd_core.Chopper2(tmp_path / "t1", now=0)
    call(chopper2.feed, times, patterns)
    call(chopper2.feed_words, times)
    call(chopper2.flush)
    call(qkd_core.write_type1, tmp_path / "w1", 0x4F87, times)
    call(qkd_core.write_type2, tmp_path / "w2", 0x4F87, times, patterns)
    call(qkd_core.write_type3, tmp_path / "w3", 0x4F87, patterns, 4)


HUGE = [-1, 0, 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1, 2**64]


@pytest.mark.parametrize("value", HUGE)
def test_absurd_integer_options(tmp_path, value):
    times = np.arange(0, 4000, 10, dtype=np.uint64)
    patterns = np.ones(times.size, dtype=np.uint8)
    call(qkd_core.Chopper, tmp_path / "a", tmp_path / "b", protocol=value)
    call(qkd_core.Chopper, tmp_path / "a", tmp_path / "b", time_order=value)
    call(qkd_core.Chopper, tmp_path / "a", tmp_path / "b", servo_filter=value)
    call(qkd_core.Chopper, tmp_path / "a", tmp_path / "b", max_gap_us=value, now=value)
    call(qkd_core.Chopper2, tmp_path / "c", max_gap_us=value, now=value)
    call(qkd_core.write_type3, tmp_path / "w3", 1, patterns & 1, value)
    call(qkd_core.write_type2, tmp_path / "w2", 1, times, patterns & 1, time_order=value)
    call(qkd_core.write_type2, tmp_path / "w2", 1, times, patterns & 1, protocol=value)
    call(qkd_core.decode_tdc1, b"\x00" * 64, start_ticks=value)
    call(qkd_core.OffsetFinder, buffer_order=value)
    call(qkd_core.OffsetFinder, fine_resolution_ns=value)
    call(qkd_core.OffsetFinder, coarse_resolution_ns=value)
    call(qkd_core.Reconciler, "initiator", sample_bits=value)
    call(qkd_core.Reconciler, "initiator", passes=value)
    call(qkd_core.write_final_key, tmp_path, value, value, b"\xff", value)


@pytest.mark.parametrize("value", [-1.0, 0.0, 1e-300, float("nan"), float("inf"), 1e300])
def test_absurd_float_options(value):
    call(qkd_core.Reconciler, "responder", qber_limit=value)
    call(qkd_core.Reconciler, "responder", eps_sec=value, eps_cor=value)
    call(qkd_core.Reconciler, "responder", initial_qber=value)
    call(qkd_core.simulated_raw_key_pair, 64, value)
    for name in ("coarse_resolution_ns", "fine_resolution_ns", "separation", "threshold",
                 "convergence_rate"):
        call(qkd_core.FrequencyFinder, buffer_order=10, **{name: value})


def test_reconciler_rejects_garbage_messages():
    bits_a, bits_b = qkd_core.simulated_raw_key_pair(4096, 0.02, seed=1)
    initiator = qkd_core.Reconciler("initiator", seed=2)
    responder = qkd_core.Reconciler("responder", seed=3)
    (start,), _ = initiator.start_block(7, bits_a)
    responder.start_block(7, bits_b)
    # Damage the first message of the block in every way at once: cut, flipped, extended.
    for bad in (b"", start[:1], start[:-1], start + b"\x00", bytes(b ^ 0xFF for b in start)):
        fresh = qkd_core.Reconciler("responder", seed=4)
        fresh.start_block(7, bits_b)
        call(fresh.handle_message, bad)
    for index in range(len(start)):
        fresh = qkd_core.Reconciler("responder", seed=4)
        fresh.start_block(7, bits_b)
        flipped = bytearray(start)
        flipped[index] ^= 0x5A
        call(fresh.handle_message, bytes(flipped))


@FUZZ
@given(data=st.binary(max_size=200))
def test_reconciler_random_messages(data):
    responder = qkd_core.Reconciler("responder", seed=3)
    responder.start_block(1, b"\x55" * 64)
    call(responder.handle_message, data)
    initiator = qkd_core.Reconciler("initiator", seed=3)
    initiator.start_block(1, b"\x55" * 64)
    call(initiator.handle_message, data)


def test_certs_folder_is_a_file(tmp_path, capsys):
    from S15qkd.cli.main import main

    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert main(["certs", "high", "--folder", str(not_a_folder)]) == 1
    assert f"{not_a_folder} is not a folder; give a folder for the key" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.key"))


def test_certs_bad_name_or_validity(tmp_path):
    from S15qkd.channel import create_node_certificate
    from S15qkd.cli.main import main

    for name in ("", ".", "..", "../outside", "a/b"):
        with pytest.raises(ValueError, match="node name"):
            create_node_certificate(tmp_path / "certs", name)
    for days in (-5, 0, 10**12):
        with pytest.raises(ValueError, match="validity"):
            create_node_certificate(tmp_path / "certs", "high", days=days)
        assert main(["certs", "high", "--folder", str(tmp_path / "certs"),
                     "--days", str(days)]) == 1
    assert not (tmp_path / "outside.key").exists()
    assert not list(tmp_path.rglob("*.key"))
    assert not list(tmp_path.rglob("*.crt"))


@pytest.mark.parametrize("nbits", [2**26 + 1, 2**62, 2**64 - 1])
def test_simulated_key_pair_too_long(nbits):
    with pytest.raises(ValueError, match="nbits"):
        qkd_core.simulated_raw_key_pair(nbits, 0.01)


def run_qkd_sim(*args, cwd, file_size_limit=None):
    """Run qkd-sim; with file_size_limit, writes beyond that many bytes fail (EFBIG)."""
    import resource
    import signal
    import subprocess
    import sys

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "S15qkd.cli.sim", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=limit_file_size if file_size_limit else None)


def test_qkd_sim_failed_write_leaves_no_file(tmp_path):
    # 10^5 pairs need about 800 kB per node; the limit stops the writes at 64 kB.
    result = run_qkd_sim("-n", "100000", "-F", "high", "-f", "low", cwd=tmp_path,
                         file_size_limit=65536)
    assert result.returncode == 2
    assert "output high" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value", [
    ("--batch", "1e-300"), ("--offset", "1e300"), ("--offset", "nan"),
    ("--seed", "-1"), ("--seed", "99999999999999999999999"), ("--pairs", "inf"),
    ("--pairs", "1e300"), ("--pairs", "nan"), ("--pairs", "-5"), ("--duration", "nan"),
    ("--duration", "-1"), ("--high-loss", "2"), ("--low-loss", "-0.5"),
    ("--dark-count-rate", "1e300"), ("--dark-count-rate", "2147483648"),
    ("--background-rate", "99999999999999999999999"), ("--background-rate", "nan"),
])
def test_qkd_sim_absurd_option_rejected(tmp_path, option, value):
    result = run_qkd_sim("-n", "1000", "-F", "high", "-f", "low", option, value, cwd=tmp_path)
    assert result.returncode == 2
    assert f"invalid {option}" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_qkd_sim_missing_output_folder(tmp_path):
    result = run_qkd_sim("-n", "1000", "-F", "absent/high", "-f", "low", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot create output absent/high" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_malformed_payload_dropped_not_resent(tmp_path):
    # A handler that rejects a payload as malformed, as the node does for CONTROL frames
    # that are not JSON: the frame is dropped and acknowledged, so the frames behind it
    # still arrive and the connection stays up.
    import threading

    from S15qkd.channel import FrameType, create_node_certificate
    from S15qkd.channel.frames import decode_json
    from test_channel import free_port, make_link

    certs = {name: create_node_certificate(tmp_path, name) for name in ("high", "low")}
    received: list[bytes] = []
    good_arrived = threading.Event()

    def handler(frame_type, payload):
        received.append(payload)
        decode_json(payload, "CONTROL")
        good_arrived.set()

    port = free_port()
    high = make_link(certs, "high", port, handler)
    low = make_link(certs, "low", port, lambda frame_type, payload: None)
    high.start()
    low.start()
    try:
        assert low.wait_connected(10)
        low.send(FrameType.CONTROL, b"not json")
        low.send(FrameType.CONTROL, b'{"msg": "ok"}')
        assert good_arrived.wait(10)
        assert received.count(b"not json") == 1
        assert high.stats.malformed_dropped == 1
        assert high.stats.connections == 1
        assert "CONTROL frame 1 dropped: malformed CONTROL payload" in high.stats.last_error
    finally:
        low.stop()
        high.stop()


@pytest.mark.parametrize("header", [
    b'{"block": 1, "kind": "start", "epochs": ["x"], "bits": 10}',
    b'{"block": 1, "kind": "start", "epochs": 5, "bits": 10}',
    b'{"block": 1, "kind": "start", "epochs": [], "bits": 10}',
    b'{"block": 1, "kind": "start", "epochs": [-1], "bits": 10}',
    b'{"block": 1, "kind": "start", "epochs": [4294967296], "bits": 10}',
    b'{"block": 1, "kind": "start", "epochs": [1], "bits": "10"}',
    b'{"block": 1, "kind": "start", "epochs": [1]}',
    b'{"block": 1, "kind": "abort", "reason": ["x"]}',
    b'{"block": 1, "kind": "other"}',
    b'{"block": 1}',
    b'{"block": true, "kind": "msg"}',
    b'{"block": -1, "kind": "msg"}',
])
def test_reconcile_header_malformed(header):
    from S15qkd.blocks import decode_reconcile
    from S15qkd.channel import FrameError

    with pytest.raises(FrameError, match="malformed RECONCILE"):
        decode_reconcile(header + b"\n")


def test_reconcile_header_round_trip():
    from S15qkd.blocks import decode_reconcile, encode_reconcile

    for header in ({"run": 3, "block": 7, "kind": "start", "epochs": [7, 8], "bits": 900},
                   {"run": 3, "block": 7, "kind": "msg"},
                   {"run": 3, "block": 7, "kind": "abort", "reason": "raw key missing"}):
        assert decode_reconcile(encode_reconcile(header, b"\x00\n\x01")) == (header, b"\x00\n\x01")


@pytest.mark.parametrize("step, maximum", [
    (1e-9, 1.0), (1e-300, 1e300), (float("nan"), 1e-6), (1e-7, float("inf")), (-1e-7, 1e-6),
])
def test_frequency_finder_precompensation_rejected(step, maximum):
    with pytest.raises(ValueError, match="precompensation"):
        qkd_core.FrequencyFinder(buffer_order=12, precompensation_step=step,
                                 precompensation_max=maximum)


def test_qkd_sim_terminated_leaves_no_file(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    process = subprocess.Popen([sys.executable, "-m", "S15qkd.cli.sim", "-d", "1000", "-e", "1e6",
                                "-F", "high", "-f", "low"], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Wait for written events, so that the run is past its start-up imports.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if any(path.stat().st_size for path in tmp_path.iterdir()):
                break
            time.sleep(0.05)
        assert any(tmp_path.iterdir()), "qkd-sim wrote no temporary file within 20 s"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()
    assert list(tmp_path.iterdir()) == []


def test_import_loads_numpy_api():
    # qkd_core loads numpy when it is imported, not on the first array, so that an
    # exception raised during that load (e.g. by a signal handler) cannot panic later.
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import sys, qkd_core; "
                             "print('numpy' in sys.modules)"],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "True", result.stderr


@pytest.mark.parametrize("tool, option, value", [
    ("chopper", "-V", "2147483648"),
    ("chopper", "-Q", "99999999999999999999999"),
    ("chopper2", "-m", "-9223372036854775809"),
    ("costream", "-w", "4294967296"),
    ("costream", "-u", "4294967296"),
    ("costream", "-S", "1,2,3,4294967296"),
    ("splicer", "-q", "-2147483649"),
    ("costream", "-t", "99999999999999999999999"),
    ("costream", "-e", "-9223372036854775809"),
    ("splicer", "-e", "0x10000000000000000"),
])
def test_reference_option_beyond_c_int(tmp_path, tool, option, value):
    # sscanf("%d") and "%lli" cannot hold these, so the tools reject them instead of
    # passing them on.
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", f"S15qkd.cli.{tool}", option, value],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    shown = value.split(",")[-1]
    assert (f"option {option}: '{shown}' is out of range" in result.stderr
            or f"invalid value '{shown}' for option {option}" in result.stderr)
    # costream always opens its debug log costream_tlog in the working folder, as the
    # reference does; nothing else may be written.
    assert [path.name for path in tmp_path.iterdir() if path.name != "costream_tlog"] == []


GOOD_STATS = {"msg": "epoch_stats", "counts_epoch": 0x4F87, "detector_counts": [5, 6, 7, 8],
              "service_qber": 0.03, "servoed_qber": None}

HOSTILE_STATS = [
    {"counts_epoch": 1, "detector_counts": [-1, 2, 3, 4]},
    {"counts_epoch": 1, "detector_counts": [2**63, 2, 3, 4]},
    {"counts_epoch": 1, "detector_counts": ["7", True, 1.5, 4]},
    {"counts_epoch": 1, "detector_counts": list(range(100_000))},
    {"counts_epoch": 1, "detector_counts": {"a": 1}},
    {"counts_epoch": "zz", "detector_counts": [1, 2, 3, 4]},
    {"counts_epoch": -4, "detector_counts": [1, 2, 3, 4]},
    {"service_qber": "nan", "servoed_qber": None},
    {"service_qber": 0.02, "servoed_qber": 1e309},
    {"service_qber": -0.1, "servoed_qber": None},
    {"histogram": list(range(100)), "coincidences": -5, "accidentals": 0,
     "tracked_offset_ticks": 0, "epoch": 1, "basis_qber": {}},
    {"histogram": [1, 2], "coincidences": 5, "accidentals": 0, "tracked_offset_ticks": 10**40,
     "epoch": 1, "basis_qber": {}},
    {"histogram": [1, 2], "coincidences": 5, "accidentals": 0, "tracked_offset_ticks": 0,
     "epoch": 1, "basis_qber": {"H/V": "nan"}},
    {"histogram": [1, 2], "coincidences": 5, "accidentals": 0, "tracked_offset_ticks": 0,
     "epoch": 1, "basis_qber": {"x" * 1000: 0.1}},
    {"histogram": [0] * 5000, "coincidences": 5, "accidentals": 0, "tracked_offset_ticks": 0,
     "epoch": 1, "basis_qber": {}},
    {"skipped_epochs": -1},
    {"skipped_epochs": "3"},
    {"skipped_epochs": 2**63},
]


class FakeLowPeer:
    """A low-count side made of the channel alone, so a test can send it any frame."""

    def __init__(self, config):
        import threading

        from S15qkd.channel import Link, LinkSettings, make_context

        context = make_context(False, config["local_cert"], config["local_key"],
                               config["remote_cert"])
        settings = LinkSettings(role="low", host="127.0.0.1", port=config["port_authd"],
                                client_context=context, remote_cert=config["remote_cert"],
                                identity="fake-low", reconnect_min_s=0.05, reconnect_max_s=0.5)
        self.run = None
        self.joined = threading.Event()
        self.link = Link(settings, self.on_frame)

    def on_frame(self, frame_type, payload):
        import json

        from S15qkd.channel import FrameType

        if frame_type is FrameType.CONTROL:
            message = json.loads(payload)
            if message.get("msg") == "st2":
                self.run = message["run"]
                self.send({"msg": "st3"})
                self.joined.set()

    def send(self, message):
        from S15qkd.channel import FrameType
        from S15qkd.channel.frames import encode_json

        self.link.send(FrameType.CONTROL, encode_json({"run": self.run, **message}))


@pytest.fixture
def high_node_and_fake_peer(tmp_path):
    import argparse

    from S15qkd.node import Node
    from S15qkd.simulate import node_configs

    args = argparse.Namespace(events_high=None, events_low=None, epochs=3, pair_rate=2e4,
                              qber=0.03, seed=1, real_time=False, block_bits=8000)
    high_config, low_config = node_configs(tmp_path, args)
    node = Node(high_config, auto_start=True)
    peer = FakeLowPeer(low_config)
    node.start()
    peer.link.start()
    try:
        assert peer.joined.wait(30), "the high-count node sent no st2 within 30 s"
        yield node, peer
    finally:
        peer.link.stop()
        node.close()


def wait_for(condition, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met within the time limit"
        time.sleep(0.02)


def test_hostile_epoch_stats_change_nothing(high_node_and_fake_peer):
    node, peer = high_node_and_fake_peer
    for fields in HOSTILE_STATS:
        peer.send({"msg": "epoch_stats", **fields})
    peer.send(GOOD_STATS)
    wait_for(lambda: node.stats.peer_detector_counts == (5, 6, 7, 8))
    stats = node.stats
    assert stats.peer_counts_epoch == 0x4F87
    assert stats.service_qber == 0.03
    assert stats.peer_servoed_qber is None
    assert stats.histogram is None
    assert stats.coincidences is None or stats.coincidences >= 0
    assert stats.basis_qber == {}
    assert stats.skipped_epochs == 0
    # Each malformed message was dropped and acknowledged on the one connection.
    assert peer.link.stats.connections == 1
    wait_for(lambda: not peer.link.queued_frames)


def test_st2_on_high_side_and_bad_run_dropped(high_node_and_fake_peer):
    from S15qkd.pipeline import HighPipeline

    node, peer = high_node_and_fake_peer
    run = node.run
    for bad_run in (77, "abc", None, 0, 2**40):
        peer.link.send(*control_frame({"msg": "st2", "run": bad_run}))
    peer.send(GOOD_STATS)
    wait_for(lambda: node.stats.peer_detector_counts == (5, 6, 7, 8))
    import time

    time.sleep(0.5)  # The node joins a run from st2 in a thread of its own.
    assert node.run == run
    assert isinstance(node.pipeline, HighPipeline)
    assert peer.link.stats.connections == 1


def test_peer_mode_outside_service_and_key_generation(high_node_and_fake_peer):
    from S15qkd.status import EngineState

    node, peer = high_node_and_fake_peer
    wait_for(lambda: node.engine.state is EngineState.PEAK_FINDING)
    for state in ("OFF", "ONLY_COMMUNICATION", "INITIATING"):
        peer.send({"msg": "mode", "state": state, "reason": "hostile"})
    peer.send(GOOD_STATS)
    wait_for(lambda: node.stats.peer_detector_counts == (5, 6, 7, 8))
    assert node.engine.state is EngineState.PEAK_FINDING


def test_deeply_nested_reconcile_dropped_not_resent(high_node_and_fake_peer):
    from S15qkd.channel import FrameType

    node, peer = high_node_and_fake_peer
    peer.link.send(FrameType.RECONCILE, b"[" * 100_000 + b"]" * 100_000 + b"\n")
    peer.send(GOOD_STATS)
    wait_for(lambda: node.stats.peer_detector_counts == (5, 6, 7, 8))
    assert "JSON nested too deeply" in node.link.stats.last_error
    assert peer.link.stats.connections == 1


def test_deeply_nested_control_dropped_not_resent(high_node_and_fake_peer):
    from S15qkd.channel import FrameType

    node, peer = high_node_and_fake_peer
    peer.link.send(FrameType.CONTROL, b"[" * 100_000 + b"]" * 100_000)
    peer.send(GOOD_STATS)
    wait_for(lambda: node.stats.peer_detector_counts == (5, 6, 7, 8))
    assert node.link.stats.malformed_dropped == 1
    assert "JSON nested too deeply" in node.link.stats.last_error
    assert peer.link.stats.connections == 1


def test_unwritable_peer_file_stops_run_once(high_node_and_fake_peer):
    # A type-2 folder that cannot take files, as on a full data_root.
    import shutil

    from S15qkd.channel import FrameType
    from S15qkd.channel.frames import encode_file
    from S15qkd.status import EngineState

    node, peer = high_node_and_fake_peer
    t2 = node.pipeline.folders["t2"]
    shutil.rmtree(t2)
    t2.write_bytes(b"")
    for epoch in (0x4F87, 0x4F88, 0x4F89):
        peer.link.send(FrameType.FILE, encode_file(2, epoch, peer.run, b"type-2 content"))
    wait_for(lambda: node.engine.state is EngineState.ONLY_COMMUNICATION)
    assert "cannot store the peer's type-2 file of epoch 00004f87" in node.stop_reason
    assert "free space in data_root" in node.stop_reason
    assert peer.link.stats.connections == 1


def test_wrong_file_type_dropped_not_resent(high_node_and_fake_peer):
    from S15qkd.channel import FrameType
    from S15qkd.channel.frames import encode_file

    node, peer = high_node_and_fake_peer
    peer.link.send(FrameType.FILE, encode_file(4, 0x4F87, peer.run, b"type 4 for the low side"))
    peer.send(GOOD_STATS)
    wait_for(lambda: node.stats.peer_detector_counts == (5, 6, 7, 8))
    assert node.link.stats.malformed_dropped == 1
    assert "expects type 2" in node.link.stats.last_error
    assert peer.link.stats.connections == 1


def control_frame(message):
    from S15qkd.channel import FrameType
    from S15qkd.channel.frames import encode_json

    return FrameType.CONTROL, encode_json(message)


def test_chopper_worker_recovers_after_failed_write(tmp_path):
    # The type-1 folder is replaced by a file, so that writing the next epoch fails, and
    # put back after the first failure: the restarted worker must chop again.
    import argparse
    import shutil

    from S15qkd.node import Node
    from S15qkd.simulate import node_configs

    args = argparse.Namespace(events_high=None, events_low=None, epochs=40, pair_rate=2e4,
                              qber=0.03, seed=1, real_time=True, block_bits=8000)
    high_config, low_config = node_configs(tmp_path, args)
    node = Node(high_config, auto_start=True)
    peer = FakeLowPeer(low_config)
    node.start()
    peer.link.start()
    try:
        assert peer.joined.wait(30), "the high-count node sent no st2 within 30 s"
        wait_for(lambda: node.stats.last_local_epoch is not None)
        worker = node.pipeline.chopper_worker
        t1 = node.pipeline.folders["t1"]
        shutil.rmtree(t1)
        t1.write_bytes(b"")
        wait_for(lambda: worker.restarts >= 1 or worker.last_error)
        failed_at = node.stats.last_local_epoch
        t1.unlink()
        t1.mkdir()
        wait_for(lambda: node.stats.last_local_epoch > failed_at + 1)
        assert worker.restarts < 5
    finally:
        peer.link.stop()
        node.close()


@pytest.mark.parametrize("port", ["70000", "0", "-1", "http"])
def test_node_web_port_out_of_range(tmp_path, capsys, port):
    from S15qkd.cli.main import main

    with pytest.raises(SystemExit) as stop:
        main(["node", "--config", str(tmp_path / "absent.yaml"), "--web-port", port])
    assert stop.value.code == 2
    assert (f"argument --web-port: invalid port '{port}': expected a TCP port number from 1 "
            "to 65535") in capsys.readouterr().err


class FakeHighPeer(FakeLowPeer):
    """A high-count side made of the channel alone; it starts run 7 once connected."""

    def __init__(self, config):
        import threading

        from S15qkd.channel import Link, LinkSettings, make_context

        context = make_context(True, config["local_cert"], config["local_key"],
                               config["remote_cert"])
        settings = LinkSettings(role="high", host="127.0.0.1", port=config["port_authd"],
                                server_context=context, remote_cert=config["remote_cert"],
                                identity="fake-high")
        self.run = 7
        self.joined = threading.Event()
        self.link = Link(settings, self.on_frame)

    def on_frame(self, frame_type, payload):
        import json

        from S15qkd.channel import FrameType

        if frame_type is FrameType.CONTROL and json.loads(payload).get("msg") == "st3":
            self.joined.set()


@pytest.mark.parametrize("fields", [
    {"offset_ticks": "34560"},
    {"offset_ticks": 2**70},
    {"offset_ticks": 34560, "snr_fine": "high"},
    {"offset_ticks": 34560, "snr_coarse": float("nan")},
    {"offset_ticks": 34560, "frequency_offset": float("inf")},
    {"offset_ticks": 34560, "frequency_offset": 0.5},
], ids=range(6))
def test_hostile_peak_found_changes_nothing(tmp_path, fields):
    import argparse

    from S15qkd.channel import FrameType
    from S15qkd.channel.frames import encode_json
    from S15qkd.node import Node
    from S15qkd.simulate import node_configs
    from S15qkd.status import EngineState

    args = argparse.Namespace(events_high=None, events_low=None, epochs=3, pair_rate=2e4,
                              qber=0.03, seed=1, real_time=False, block_bits=8000)
    high_config, low_config = node_configs(tmp_path, args)
    peer = FakeHighPeer(high_config)
    node = Node(low_config)
    peer.link.start()
    node.start()
    try:
        assert peer.link.wait_connected(30)
        peer.link.send(FrameType.CONTROL, encode_json({"msg": "st2", "run": 7}))
        assert peer.joined.wait(30), "the low-count node sent no st3 within 30 s"
        peer.send({"msg": "peak_found", **fields})
        peer.send(GOOD_STATS)
        wait_for(lambda: node.stats.peer_detector_counts == (5, 6, 7, 8))
        assert node.stats.initial_offset_ticks is None
        assert node.stats.snr_fine is None
        assert node.stats.snr_coarse is None
        assert node.stats.frequency_offset is None
        assert node.engine.state is not EngineState.SERVICE_MODE
        node.status()
    finally:
        node.close()
        peer.link.stop()


def test_hostile_release_messages_dropped(high_node_and_fake_peer):
    import numpy as np

    from S15qkd.keystore import FinalKey, pack_key_bits

    node, peer = high_node_and_fake_peer
    bits = np.random.default_rng(3).integers(0, 2, 64, dtype=np.uint8)
    node.keystore.stage(FinalKey(0x500, 2, 64, pack_key_bits(bits)))
    node.keystore.stage(FinalKey(0x600, 2, 64, pack_key_bits(bits)))
    for block in ("0x500", None, -1, 2**32, True, 5.0):
        peer.send({"msg": "key_release", "block": block})
        peer.send({"msg": "key_drop", "block": block})
    # Messages of the low-count side's role only, sent to it by a confused peer.
    peer.send({"msg": "key_settle", "staged": list(range(10))})
    peer.send({"msg": "key_released", "block": 0x600})
    peer.send({"msg": "key_release", "block": 0x500})
    peer.send({"msg": "key_drop", "block": 0x600, "reason": "test"})
    wait_for(lambda: not node.keystore.staged_keys())
    assert list(node.keystore.keys()) == ["00000500"]
    assert peer.link.stats.connections == 1
