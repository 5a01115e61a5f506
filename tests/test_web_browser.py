"""The web page in headless Chromium against a stand-in node: controls, graphs, settings.

The stand-in feeds made-up blocks through the real status contract, so these tests
check the page itself. tests/test_web_simulated_link.py runs the same steps against
the node's simulated two-node link and takes the screenshots for the README.
"""

from __future__ import annotations

import math
import random
import threading
import time

import pytest

pytest.importorskip("dash", reason="the web extra is not installed: pip install '.[web]'")
pytest.importorskip("selenium", reason="selenium is not installed: pip install '.[test]'")

from selenium.webdriver.common.by import By  # noqa: E402

from S15qkd.status import (  # noqa: E402
    EPOCH_SECONDS,
    BlockRecord,
    CoincidenceHistogram,
    DetectorStatus,
    EngineState,
    InMemoryNode,
    KeyProtocol,
    NodeCounts,
    RawKeyStatus,
    Role,
)
from S15qkd.web import WebServer  # noqa: E402
from chromium_page import (  # noqa: E402,F401  (pytest finds the fixtures by name)
    TOKEN,
    browser,
    click,
    graph_points,
    log_in,
    setting_input,
    text_of,
    wait_for,
)


class StandInLink(InMemoryNode):
    """Stand-in for a running link: after start it produces one block every 0.3 s.

    """

    def __init__(self):
        super().__init__(
            config={
                "identity": "alice",
                "target_hostname": "bob.qkd.internal",
                "QBER_limit": 0.1,
                "tracking_window": 30,
                "remote_coincidence_window": 6,
                "error_correction": True,
                "local_detector_skew_correction": {"det1corr": 0, "det2corr": 3, "det3corr": -2, "det4corr": 1},
                "connections": {"QKDE0002": {"target_hostname": "bob.qkd.internal"}},
            },
            identity="alice",
            live_keys=("QBER_limit",),
        )
        self._random = random.Random(7)
        self._stop = threading.Event()
        self._feeder: threading.Thread | None = None
        self._epoch = 0x2A3F0

    def start_keygen(self) -> None:
        super().start_keygen()
        self.override_status(engine_state=EngineState.SERVICE_MODE)
        self._stop.clear()
        self._feeder = threading.Thread(target=self._feed, daemon=True)
        self._feeder.start()

    def stop_keygen(self) -> None:
        self._stop.set()
        super().stop_keygen()
        self.override_status(engine_state=EngineState.ONLY_COMMUNICATION)

    def close(self) -> None:
        self._stop.set()
        if self._feeder is not None:
            self._feeder.join(timeout=5)

    def _feed(self) -> None:
        self.override_status(raw_key=self._raw_key(KeyProtocol.SERVICE), detectors=self._detectors(),
                             error_correction=self.status().error_correction)
        self._stop.wait(1.0)
        self.override_status(engine_state=EngineState.KEY_GENERATION)
        overrides_removed = False
        while not self._stop.wait(0.3):
            self._epoch += 5
            qber = 0.03 + 0.01 * self._random.random()
            raw_bits = 20000 + self._random.randrange(2000)
            leaked = int(1.12 * raw_bits * _binary_entropy(qber))
            final_bits = int(raw_bits * (1 - _binary_entropy(qber)) - leaked - 200)
            self.add_block(BlockRecord(
                first_epoch=self._epoch, num_epochs=5, raw_bits=raw_bits, qber=qber, leaked_bits=leaked,
                efficiency=1.12, final_bits=final_bits, key_rate_bps=final_bits / (5 * EPOCH_SECONDS),
                finished_at=time.time(),
            ))
            if not overrides_removed:
                # Let the engine state and the blocks come from InMemoryNode from now on.
                with self._lock:
                    self._overrides.pop("error_correction", None)
                overrides_removed = True
            self.override_status(raw_key=self._raw_key(KeyProtocol.BBM92), detectors=self._detectors())

    def _raw_key(self, protocol: KeyProtocol) -> RawKeyStatus:
        return RawKeyStatus(
            peer="bob.qkd.internal", role=Role.HIGH_COUNT, protocol=protocol,
            initial_time_offset_ticks=-8_123_456, tracked_time_offset_ticks=-8_123_449 + self._random.randrange(5),
            offset_search_snr=41.7, offset_search_snr_fine=12.3,
            coincidences_per_epoch=5200 + self._random.randrange(300), accidentals_per_epoch=130,
            last_received_epoch=self._epoch + 4,
        )

    def _detectors(self) -> DetectorStatus:
        local = tuple(95_000 + self._random.randrange(4000) for _ in range(4))
        remote = tuple(21_000 + self._random.randrange(1500) for _ in range(4))
        centre = 16
        counts = tuple(int(40 + 5000 * math.exp(-((i - centre) ** 2) / 4.0)) for i in range(33))
        return DetectorStatus(
            counts=(NodeCounts("alice", self._epoch, local), NodeCounts("bob", self._epoch, remote)),
            skew_corrections_ticks=(0, 3, -2, 1),
            histogram=CoincidenceHistogram(tracked_offset_ticks=-8_123_449, first_bin_ticks=-33,
                                           bin_width_ticks=2, counts=counts),
            basis_qber={"HV": 0.031, "DA": 0.037},
        )


def _binary_entropy(p: float) -> float:
    return -p * math.log2(p) - (1 - p) * math.log2(1 - p)


@pytest.fixture
def link():
    node = StandInLink()
    with WebServer(node, TOKEN, host="127.0.0.1", port=0) as server:
        yield node, server
    node.close()


def test_start_without_login_is_refused(browser, link):
    node, server = link
    browser.get(f"{server.url}/apps/QKD_status")
    wait_for(browser, lambda d: text_of(d, "engine-state") == "ONLY_COMMUNICATION", "engine state not shown")
    click(browser, "start-keygen")
    wait_for(browser, lambda d: "Log in" in text_of(d, "control-message"), "no login request after Start")
    assert node.calls == []


def test_status_page_follows_key_generation(browser, link, tmp_path):
    node, server = link
    log_in(browser, server.url)
    wait_for(browser, lambda d: text_of(d, "engine-state") == "ONLY_COMMUNICATION", "engine state not shown")
    assert graph_points(browser, "qber-graph") == []

    click(browser, "start-keygen")
    wait_for(browser, lambda d: text_of(d, "engine-state") == "KEY_GENERATION", "key generation not reached")
    wait_for(browser, lambda d: len(graph_points(d, "qber-graph")) >= 5, "QBER graph did not fill")
    wait_for(browser, lambda d: len(graph_points(d, "key-graph")) >= 5, "key graph did not fill")
    assert ("start_keygen",) in node.calls

    qber_percent = graph_points(browser, "qber-graph")
    assert all(2.5 < value < 4.5 for value in qber_percent)
    assert set(graph_points(browser, "qber-graph", trace=1)) == {10.0}
    assert all(bits > 0 for bits in graph_points(browser, "key-graph"))
    assert "costream: running" in text_of(browser, "worker-badges")
    assert "bob.qkd.internal" in text_of(browser, "raw-key-card")
    assert "BBM92 mode" in text_of(browser, "raw-key-card")
    assert "Last block: leaked bits" in text_of(browser, "error-correction-card")
    assert not browser.find_element(By.ID, "blinded-banner").is_displayed()
    browser.save_screenshot(str(tmp_path / "status-page.png"))

    node.override_status(blinded=True)
    wait_for(browser, lambda d: d.find_element(By.ID, "blinded-banner").is_displayed(), "blinded banner not shown")
    node.override_status(blinded=False)

    click(browser, "stop-keygen")
    wait_for(browser, lambda d: text_of(d, "engine-state") == "ONLY_COMMUNICATION", "stop did not take effect")


def test_setting_change_takes_effect(browser, link, tmp_path):
    node, server = link
    log_in(browser, server.url)
    click(browser, "start-keygen")
    wait_for(browser, lambda d: len(graph_points(d, "qber-graph", trace=1)) >= 2, "QBER limit line not drawn")

    click(browser, "nav-settings")
    field = wait_for(browser, lambda d: setting_input(d, "QBER_limit"), "QBER limit field not shown")
    browser.save_screenshot(str(tmp_path / "settings-page.png"))

    field.clear()
    field.send_keys("0.7")
    click(browser, "check-settings")
    wait_for(browser, lambda d: "QBER_limit" in text_of(d, "settings-message"), "invalid value not reported")
    assert "nothing saved" in text_of(browser, "settings-message")
    assert node.get_config()["QBER_limit"] == 0.1

    field.clear()
    field.send_keys("0.08")
    window = setting_input(browser, "tracking_window")
    window.clear()
    window.send_keys("40")
    click(browser, "save-settings")
    wait_for(browser, lambda d: "Applied to the running engine" in text_of(d, "settings-message"), "save not reported")
    assert "QBER_limit" in text_of(browser, "settings-applied")
    assert "tracking_window" in text_of(browser, "settings-restart-needed")
    assert node.get_config()["QBER_limit"] == 0.08
    assert node.get_config()["tracking_window"] == 40

    click(browser, "nav-status")
    wait_for(browser, lambda d: set(graph_points(d, "qber-graph", trace=1)) == {8.0}, "new QBER limit not drawn")
    assert "tracking_window" in text_of(browser, "config-note")


def test_detectors_page_shows_counts(browser, link, tmp_path):
    node, server = link
    log_in(browser, server.url)
    click(browser, "start-keygen")
    wait_for(browser, lambda d: text_of(d, "engine-state") == "KEY_GENERATION", "key generation not reached")

    click(browser, "nav-detectors")
    wait_for(browser, lambda d: "bob" in text_of(d, "counts-table"), "counts table not filled")
    wait_for(browser, lambda d: len(graph_points(d, "histogram-graph")) == 33, "histogram not drawn")
    assert len(graph_points(browser, "counts-graph", trace=1)) == 4
    assert "HV" in text_of(browser, "basis-qber-table")
    assert "3 ticks" in text_of(browser, "skew-table")
    time.sleep(1.5)  # one more refresh so the screenshot shows settled graphs
    browser.save_screenshot(str(tmp_path / "detectors-page.png"))
