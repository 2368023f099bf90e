"""The live dashboard in a real browser: headless Chromium looks at a run of three nodes.

``start_server(dashboard_address=...)`` runs 4 rounds over three in-process nodes, one of
which fails every fit. Each node's fit waits at a gate the test opens round by round, so
the page is looked at while each round is under way: the node count, the round number
advancing, the failed node shown as failed, and a loss chart with one point per finished
round. Screenshots are saved in the test's tmp_path (``dashboard-running.png`` mid-run,
``dashboard-done.png`` at the end).

Needs Debian's ``chromium`` and ``chromium-driver`` (``make pytest`` installs them when
run as root) and Selenium (the dev extra); skipped, with the reason, where they are not.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stamen.client import NumPyClient
from stamen.server import ServerConfig, start_server
from stamen.server.strategy import FedAvg
from stamen.testing import NodeThread, node_threads

pytestmark = pytest.mark.slow

ROUNDS = 4
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatedClient(NumPyClient):
    """Trains only when the test opens its round's gate; ``fails`` raises in every fit."""

    def __init__(self, gates: dict[int, threading.Event], fails: bool) -> None:
        self.gates = gates
        self.fails = fails

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        return [np.zeros(3, dtype=np.float32)]

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        if self.fails:
            raise RuntimeError("simulated out-of-memory in fit")
        assert self.gates[int(config["round"])].wait(60), "the test never opened the round"
        return [parameters[0] + 1], 10, {}

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        server_round = int(config["round"])
        return 1.0 / server_round, 10, {"accuracy": 1.0 - 0.5 / server_round}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium, driven by the Debian chromedriver."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(
            "Chromium and chromedriver are not installed (Debian: apt-get install chromium "
            "chromium-driver; `make pytest` does it when run as root)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (dev extra) missing")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1360,1100",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, what: str, check: Any, timeout: float = 30.0) -> Any:
    """Poll ``check(driver)`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check(driver)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"the page never showed {what}")
        time.sleep(0.05)


def _text(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.ID, element_id).text)


def test_dashboard_shows_a_live_run_in_chromium(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    gates = {r: threading.Event() for r in range(1, ROUNDS + 1)}
    fleet_address = f"127.0.0.1:{_free_port()}"
    dashboard_port = _free_port()

    def round_config(server_round: int) -> dict[str, Any]:
        return {"round": server_round}

    strategy = FedAvg(
        min_fit_clients=3,
        min_evaluate_clients=3,
        min_available_clients=3,
        on_fit_config_fn=round_config,
        on_evaluate_config_fn=round_config,
        evaluate_metrics_aggregation_fn=lambda pairs: {
            "accuracy": sum(n * m["accuracy"] for n, m in pairs) / sum(n for n, _ in pairs)
        },
    )
    outcome: list[Any] = []

    def serve() -> None:
        try:
            outcome.append(
                start_server(
                    server_address=fleet_address,
                    strategy=strategy,
                    config=ServerConfig(num_rounds=ROUNDS, round_timeout=60),
                    dashboard_address=f"127.0.0.1:{dashboard_port}",
                )
            )
        except BaseException as exc:
            outcome.append(exc)

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    url = f"http://127.0.0.1:{dashboard_port}/"
    try:
        with node_threads() as nodes:
            # The page, open before any node connects.
            _wait(browser, "the dashboard", lambda d: _reachable(dashboard_port))
            browser.get(url)
            _wait(browser, "the page's first state", lambda d: _text(d, "run-status") != "")
            assert _text(browser, "node-count") == "0"

            for i in range(3):
                client = GatedClient(gates, fails=i == 2).to_client()
                nodes.append(NodeThread({"server_address": fleet_address, "client": client}))
                nodes[-1].start()
            _wait(browser, "3 nodes connected", lambda d: _text(d, "node-count") == "3")
            rows = browser.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")
            assert len(rows) == 3
            assert {r.get_attribute("data-status") for r in rows} == {"connected"}

            for server_round in range(1, ROUNDS + 1):
                # The round under way, waiting at its gate: one failure, two to come.
                _wait(
                    browser,
                    f"round {server_round} under way",
                    lambda d, r=server_round: (
                        _text(d, "round") == str(r) and _text(d, "round-failures") == "1"
                    ),
                )
                assert _text(browser, "round-total") == str(ROUNDS)
                assert _text(browser, "expected") == "3"
                failures = _text(browser, "failures")
                assert "simulated out-of-memory in fit" in failures
                points = server_round - 1  # one per finished round
                if points:
                    _wait(browser, f"{points} points", lambda d, p=points: _points(d) == p)
                failed = _wait(
                    browser,
                    "the failing node marked as failed",
                    lambda d: d.find_elements(By.CSS_SELECTOR, "#nodes tr[data-outcome=failed]"),
                )
                assert len(failed) == 1
                assert f"failed in round {server_round}" in failed[0].text
                if server_round == 3:
                    _wait(browser, "the failures panel", lambda d: _text(d, "failures") != "")
                    browser.save_screenshot(str(tmp_path / "dashboard-running.png"))
                gates[server_round].set()

            _wait(browser, "the run completed", lambda d: _text(d, "run-status") == "COMPLETED")
            server_thread.join(30)
            assert not server_thread.is_alive()
            assert len(outcome) == 1 and not isinstance(outcome[0], BaseException), outcome
            _wait(browser, f"{ROUNDS} points", lambda d: _points(d) == ROUNDS)
            assert _text(browser, "round") == str(ROUNDS)
            # The failing node is still shown as failed (in the last round's fit).
            failed = browser.find_elements(By.CSS_SELECTOR, "#nodes tr[data-outcome=failed]")
            assert len(failed) == 1 and f"failed in round {ROUNDS}" in failed[0].text
            # The loss chart is drawn (a canvas with pixels) and a metric has its chart.
            assert browser.find_elements(By.CSS_SELECTOR, "[data-chart=loss] canvas")
            metric = browser.find_element(By.CSS_SELECTOR, "[data-chart='m:accuracy']")
            assert metric.get_attribute("data-points") == str(ROUNDS)
            _wait(browser, "the end of live updates", lambda d: "stopped" in _text(d, "live"))
            browser.save_screenshot(str(tmp_path / "dashboard-done.png"))
            errors = [
                entry
                for entry in browser.get_log("browser")
                if entry.get("level") == "SEVERE" and "favicon" not in entry.get("message", "")
            ]
            assert errors == [], errors
    finally:
        for gate in gates.values():
            gate.set()
        server_thread.join(30)
    assert (tmp_path / "dashboard-running.png").stat().st_size > 10_000


def _points(driver: Any) -> int:
    from selenium.webdriver.common.by import By

    charts = driver.find_elements(By.CSS_SELECTOR, "[data-chart=loss]")
    return int(charts[0].get_attribute("data-points") or 0) if charts else 0


def _reachable(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
