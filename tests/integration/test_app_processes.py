"""``stamen server`` and ``stamen node`` run a Flower 1.12 ServerApp/ClientApp as processes."""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import stamen as fl
from stamen.server.history import History

APPS = Path(__file__).with_name("apps")
WAIT = 60.0


def _stamen(*args: str) -> list[str]:
    return [sys.executable, "-m", "stamen", *args]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_server_and_two_nodes_run_the_app_like_run_simulation(tmp_path: Path) -> None:
    """A server process and 2 node processes (grpc-bidi and rest) run the app module; all
    exit 0, and the History equals run_simulation's of the same apps (mods included)."""
    history_path = tmp_path / "history.json"
    server = subprocess.Popen(
        _stamen(
            "-v",
            "server",
            "flower_app_api:server_app",
            "--address",
            "127.0.0.1:0",
            "--rest-address",
            "127.0.0.1:0",
            "--history",
            str(history_path),
        ),
        cwd=APPS,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert server.stderr is not None
    stderr = server.stderr
    reader = threading.Thread(target=lambda: [lines.put(x) for x in stderr], daemon=True)
    reader.start()
    nodes: list[subprocess.Popen[str]] = []
    try:
        grpc_port = rest_port = None
        while grpc_port is None or rest_port is None:
            line = lines.get(timeout=WAIT)
            if match := re.search(r"serving grpc-bidi and grpc-rere on .* \(port (\d+)\)", line):
                grpc_port = int(match.group(1))
            if match := re.search(r"serving rest on .* \(port (\d+)\)", line):
                rest_port = int(match.group(1))
        for pid, (transport, address) in enumerate(
            [("grpc-bidi", f"127.0.0.1:{grpc_port}"), ("rest", f"http://127.0.0.1:{rest_port}")]
        ):
            nodes.append(
                subprocess.Popen(
                    _stamen(
                        "node",
                        "flower_app_api:app",
                        "--server",
                        address,
                        "--transport",
                        transport,
                        "--insecure",
                        "--node-config",
                        f"partition-id={pid} num-partitions=2",
                    ),
                    cwd=APPS,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        outputs = [node.communicate(timeout=WAIT) for node in nodes]
        server_out, _ = server.communicate(timeout=WAIT)
    finally:
        for proc in (server, *nodes):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        reader.join(10)
    assert server.returncode == 0, server_out
    assert "stamen server: run completed" in server_out
    for node, (out, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err
        assert "stamen node: run completed" in out
    deployed = History.from_dict(json.loads(history_path.read_text()))

    sys.path.insert(0, str(APPS))
    try:
        import flower_app_api  # type: ignore[import-not-found]

        simulated = fl.simulation.run_simulation(
            server_app=flower_app_api.server_app,
            client_app=flower_app_api.app,
            num_supernodes=2,
            backend_name="sequential",
        )
    finally:
        sys.path.remove(str(APPS))
        sys.modules.pop("flower_app_api", None)
    assert deployed == simulated
    # Each round moves the model by 2 * (1*1 + 2*2) / 3 = 10/3; the mod caps it at 10.
    assert [r for r, _ in deployed.losses_distributed] == [1, 2, 3, 4]
    assert deployed.losses_distributed[-1][1] == 30.0
    # State persisted per node: the 4th fit of each node reports n = 4.
    assert deployed.metrics_distributed_fit["fits"][-1] == (4, 4)


def test_node_that_gives_up_connecting_exits_3() -> None:
    """No server on the port, --max-retries 0: exit 3 and a message saying it gave up."""
    node = subprocess.run(
        _stamen(
            "node",
            "flower_app_api:app",
            "--server",
            f"127.0.0.1:{_closed_port()}",
            "--insecure",
            "--max-retries",
            "0",
        ),
        cwd=APPS,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert node.returncode == 3, node.stderr
    assert "gave up connecting" in node.stderr


def test_bad_app_reference_exits_2_as_a_process() -> None:
    """``stamen server flower_app_api:app`` (a ClientApp): exit 2, says what was found."""
    server = subprocess.run(
        _stamen("server", "flower_app_api:app", "--address", "127.0.0.1:0"),
        cwd=APPS,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert server.returncode == 2
    assert "expected 'flower_app_api:app' to be a ServerApp, found a ClientApp" in server.stderr
