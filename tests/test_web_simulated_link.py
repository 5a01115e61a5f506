"""The web page of a real node on the simulated two-node link, in headless Chromium.

Both nodes run in this process, joined by mutual TLS on loopback and fed by the link
simulator in real time. The page of the high-count node is served by ``WebServer``.
The test loads Status, clicks Start, waits for key generation and for the QBER and key
graphs to fill, then changes a setting and checks that the engine uses it.
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

REQUIRED_STAGES = ("Chopper", "Chopper2", "OffsetFinder", "Costream", "Splicer", "Reconciler", "LinkSimulator")
missing = [name for name in REQUIRED_STAGES if not hasattr(qkd_core, name)]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"qkd_core lacks {missing}; the simulated link needs them")

# Key generation on the simulated link takes a few epochs of 0.537 s to start.
LINK_WAIT_S = 90


@pytest.fixture
def simulated_link(tmp_path):
    from S15qkd.node import Node
    from S15qkd.simulate import node_configs, shared_simulator_factory

    args = argparse.Namespace(
        events_high=None, events_low=None, epochs=400, pair_rate=2e5, qber=0.03, seed=11,
        real_time=True, block_bits=8000, workdir=str(tmp_path), timeout=300.0, quiet=True,
    )
    high_config, low_config = node_configs(tmp_path, args)
    factory = shared_simulator_factory(high_config)
    high = Node(high_config, source_factory=factory)
    low = Node(low_config, source_factory=factory)
    high.start()
    low.start()
    try:
        with WebServer(high, TOKEN, host="127.0.0.1", port=0) as server:
            yield high, server
    finally:
        high.close()
        low.close()


def test_simulated_link_on_web_page(browser, simulated_link, screenshot_dir):
    node, server = simulated_link
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
    assert "High count side" in text_of(browser, "raw-key-card")
    browser.save_screenshot(str(screenshot_dir / "status-page.png"))

    click(browser, "nav-detectors")
    wait_for(browser, lambda d: "sim-high" in text_of(d, "counts-table"), "counts table not filled")
    time.sleep(1.5)  # one more refresh so the screenshot shows settled graphs
    browser.save_screenshot(str(screenshot_dir / "detectors-page.png"))

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
