"""The web page of a real node on the simulated two-node link, in headless Chromium.

Both nodes run in this process, joined by mutual TLS on loopback and fed by the link
simulator in real time. The simulated clocks differ in rate by 1 ppm, and the nodes
search and correct that frequency offset. Each node's page is served by ``WebServer``.
The test loads Status, clicks Start, waits for key generation and for the QBER and key
graphs to fill, checks the Detectors page of both nodes, then changes a setting and
checks that the engine uses it.
"""

from __future__ import annotations

import argparse
import time

import pytest

pytest.importorskip("dash", reason="the web extra is not installed: pip install '.[web]'")
pytest.importorskip("selenium", reason="selenium is not installed: pip install '.[test]'")
qkd_core = pytest.importorskip("qkd_core")

from selenium.webdriver.common.by import By  # noqa: E402

from chromium_page import (  # noqa: E402,F401  (pytest finds the fixtures by name)
    TOKEN,
    browser,
    click,
    graph_points,
    log_in,
    screenshot_dir,
    setting_input,
    text_of,
    wait_for,
)
from S15qkd.web import WebServer  # noqa: E402

REQUIRED_STAGES = ("Chopper", "Chopper2", "FrequencyFinder", "Costream", "Splicer", "Reconciler",
                   "LinkSimulator")
missing = [name for name in REQUIRED_STAGES if not hasattr(qkd_core, name)]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"qkd_core lacks {missing}; the simulated link needs them")

# Key generation on the simulated link takes a few epochs of 0.537 s to start.
LINK_WAIT_S = 90

#: Relative frequency of the simulated low-count side's clock against the high-count side's.
DRIFT = 1e-6

#: Simulated detector timing and background, so that the coincidence histogram has a
#: width and the accidentals a rate.
SIMULATED_NOISE = {"drift": DRIFT, "jitter_ps": 150.0, "background_rate": 50_000.0}


@pytest.fixture
def simulated_link(tmp_path):
    from S15qkd.node import Node
    from S15qkd.simulate import node_configs, shared_simulator_factory

    args = argparse.Namespace(
        events_high=None, events_low=None, epochs=400, pair_rate=2e5, qber=0.03, seed=11,
        real_time=True, block_bits=8000, workdir=str(tmp_path), timeout=300.0, quiet=True,
    )
    high_config, low_config = node_configs(tmp_path, args)
    for config in (high_config, low_config):
        config.update({"source": SIMULATED_NOISE, "qcrypto": {"pfind": {"frequency_search": True}}})
    factory = shared_simulator_factory(high_config)
    high = Node(high_config, source_factory=factory)
    low = Node(low_config, source_factory=factory)
    high.start()
    low.start()
    try:
        with WebServer(high, TOKEN, host="127.0.0.1", port=0) as server, \
                WebServer(low, TOKEN, host="127.0.0.1", port=0) as low_server:
            yield high, server, low_server
    finally:
        high.close()
        low.close()


def histogram_total(driver) -> int:
    return sum(graph_points(driver, "histogram-graph"))


def test_simulated_link_on_web_page(browser, simulated_link, screenshot_dir):
    node, server, low_server = simulated_link
    log_in(browser, server.url)
    wait_for(browser, lambda d: text_of(d, "engine-state") == "ONLY_COMMUNICATION",
             "the nodes did not connect", timeout=LINK_WAIT_S)

    click(browser, "start-keygen")
    wait_for(browser, lambda d: text_of(d, "engine-state") == "KEY_GENERATION",
             f"key generation not reached: {node.engine.reason}", timeout=LINK_WAIT_S)
    wait_for(browser, lambda d: len(graph_points(d, "qber-graph")) >= 3,
             f"QBER graph did not fill: {node.engine.reason}", timeout=LINK_WAIT_S)
    wait_for(browser, lambda d: len(graph_points(d, "key-graph")) >= 3, "key graph did not fill")

    qber_percent = graph_points(browser, "qber-graph")
    assert all(0.5 < value < 8.0 for value in qber_percent), qber_percent
    assert all(bits > 0 for bits in graph_points(browser, "key-graph"))
    assert "running" in text_of(browser, "worker-badges")
    raw_key_card = text_of(browser, "raw-key-card")
    assert "High count side" in raw_key_card
    frequency = raw_key_card.split("Frequency offset (corrected)")[1].split()[0]
    assert abs(float(frequency) - DRIFT) < 1e-8, raw_key_card
    browser.save_screenshot(str(screenshot_dir / "status-page.png"))

    click(browser, "nav-detectors")
    wait_for(browser, lambda d: "sim-low" in text_of(d, "counts-table"), "peer's counts not shown")
    assert "sim-high" in text_of(browser, "counts-table")
    wait_for(browser, lambda d: histogram_total(d) > 1000, "histogram not filled")
    assert "Computed by" not in text_of(browser, "histogram-caption")
    wait_for(browser, lambda d: "H/V basis" in text_of(d, "basis-qber-table"), "QBER per basis not shown")
    time.sleep(1.5)  # one more refresh so the screenshot shows settled graphs
    browser.save_screenshot(str(screenshot_dir / "detectors-page.png"))

    # The low-count side shows the histogram the high-count side sent, and its caption
    # names the sender.
    browser.get(f"{low_server.url}/apps/detector_settings")
    wait_for(browser, lambda d: histogram_total(d) > 1000, "histogram not shown on the low-count side")
    caption = text_of(browser, "histogram-caption")
    assert "Computed by the high-count side sim-high" in caption, caption
    assert "sim-high" in text_of(browser, "counts-table")
    assert "H/V basis" in text_of(browser, "basis-qber-table")
    browser.save_screenshot(str(screenshot_dir / "detectors-page-low.png"))
    # Both servers run on 127.0.0.1, where the browser shares cookies across ports.
    log_in(browser, server.url)

    click(browser, "nav-settings")
    field = wait_for(browser, lambda d: setting_input(d, "QBER_limit"), "QBER limit field not shown")
    browser.save_screenshot(str(screenshot_dir / "settings-page.png"))
    field.clear()
    field.send_keys("0.09")
    click(browser, "save-settings")
    wait_for(browser, lambda d: "Applied to the running engine" in text_of(d, "settings-message"),
             "save not reported")
    assert "QBER_limit" in text_of(browser, "settings-applied")
    assert node.get_config()["QBER_limit"] == 0.09

    click(browser, "nav-status")
    wait_for(browser, lambda d: set(graph_points(d, "qber-graph", trace=1)) == {9.0}, "new QBER limit not drawn")

    click(browser, "stop-keygen")
    wait_for(browser, lambda d: text_of(d, "engine-state") == "ONLY_COMMUNICATION", "stop did not take effect",
             timeout=LINK_WAIT_S)
    assert not browser.find_element(By.ID, "blinded-banner").is_displayed()
