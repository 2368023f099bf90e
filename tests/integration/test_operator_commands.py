"""``stamen server`` and ``stamen node`` as an operator runs them: processes, a TOML file,
the progress they print (plain, JSON, the live view on a pseudo-terminal), and the exit
code of each way a run can end."""

from __future__ import annotations

import http.server
import json
import os
import pty
import queue
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from stamen.server.history import History
from stamen.testing.certs import generate_certificates

APPS = Path(__file__).with_name("apps")
WAIT = 60.0

pytestmark = pytest.mark.slow


def _stamen(*args: str) -> list[str]:
    return [sys.executable, "-m", "stamen", *args]


class Server:
    """A ``stamen server`` process whose stderr is read line by line."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.proc = subprocess.Popen(
            _stamen("server", *args),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(APPS)},
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        assert self.proc.stderr is not None
        stderr = self.proc.stderr

        def read() -> None:
            for line in stderr:
                self.err.append(line.rstrip("\n"))
                self.lines.put(line)

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()

    def port(self) -> int:
        while True:
            line = self.lines.get(timeout=WAIT)
            if match := re.search(r"serving grpc-bidi and grpc-rere on .* \(port (\d+)\)", line):
                return int(match.group(1))

    def finish(self) -> tuple[int, str]:
        out, _ = self.proc.communicate(timeout=WAIT)
        self.reader.join(10)
        return self.proc.returncode, out


def _node(*args: str, cwd: Path = APPS) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _stamen("node", *args),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _normalized(line: str) -> str:
    line = re.sub(r"\d+\.\d+ s", "T s", line)
    return re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", line)


TOML = """
address = "127.0.0.1:0"
rounds = 2
strategy = "FedAvg"
wait-timeout = 30
history = "history.json"
tensorboard-dir = "tb"
log-format = "plain"
[strategy-args]
min_fit_clients = 2
min_evaluate_clients = 2
min_available_clients = 2
"""


def test_server_from_a_toml_file_and_two_nodes(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    """A server configured by stamen.toml (a strategy by name, no ServerApp) and two nodes
    (grpc-bidi with plain lines, grpc-rere with JSON lines): all exit 0; the server's and
    the nodes' progress lines are the golden ones; the History and the TensorBoard files
    are written."""
    (tmp_path / "stamen.toml").write_text(TOML)
    server = Server("--config", "stamen.toml", cwd=tmp_path)
    procs.append(server.proc)
    port = server.port()
    common = ("--client", "ops_app:client_fn", "--server", f"127.0.0.1:{port}", "--insecure")
    plain = _node(*common, "--node-config", "k=1")
    as_json = _node(
        *common, "--node-config", "k=3", "--transport", "grpc-rere", "--log-format", "json"
    )
    procs.extend([plain, as_json])
    (plain_out, plain_err), (json_out, json_err) = (
        plain.communicate(timeout=WAIT),
        as_json.communicate(timeout=WAIT),
    )
    code, out = server.finish()
    assert code == 0, "\n".join(server.err)
    assert plain.returncode == 0, plain_err
    assert as_json.returncode == 0, json_err
    assert "stamen node: run completed" in plain_out and "run completed" in json_out

    progress = [
        _normalized(line)
        for line in server.err
        if re.match(r"INFO stamen.server: (run|round) ", line)
    ]
    assert progress == [
        "INFO stamen.server: run started: 2 round(s) of FedAvg",
        "INFO stamen.server: round 1/2: fit sent to 2 node(s)",
        "INFO stamen.server: round 1/2: fit done in T s: 2 result(s), 0 failure(s)",
        "INFO stamen.server: round 1/2: evaluate sent to 2 node(s)",
        "INFO stamen.server: round 1/2: evaluate done in T s: 2 result(s), 0 failure(s) loss=0",
        "INFO stamen.server: round 2/2: fit sent to 2 node(s)",
        "INFO stamen.server: round 2/2: fit done in T s: 2 result(s), 0 failure(s)",
        "INFO stamen.server: round 2/2: evaluate sent to 2 node(s)",
        "INFO stamen.server: round 2/2: evaluate done in T s: 2 result(s), 0 failure(s) loss=6",
        "INFO stamen.server: run completed: 2 round(s) in T s",
    ]
    node_lines = [
        _normalized(line)
        for line in plain_err.splitlines()
        if "GetParameters" not in line  # one of the two nodes is asked for them
    ]
    assert node_lines[0] == "INFO stamen.client: connected to 127.0.0.1:PORT over grpc-bidi"
    assert (
        node_lines[1:9]
        == [
            "INFO stamen.client: received FitIns",
            "INFO stamen.client: answered FitIns with FitRes in T s",
            "INFO stamen.client: received EvaluateIns",
            "INFO stamen.client: answered EvaluateIns with EvaluateRes in T s",
        ]
        * 2
    )
    assert re.fullmatch(
        r"INFO stamen.client: run completed: the server ended the session after [45] "
        r"instruction\(s\); node shuts down",
        node_lines[-1],
    )
    records = [json.loads(line) for line in json_err.splitlines()]
    assert {r["logger"] for r in records} <= {"stamen.client"}
    assert [r["message"] for r in records if r["message"].startswith("received Fit")] == [
        "received FitIns",
        "received FitIns",
    ]
    history = History.from_dict(json.loads((tmp_path / "history.json").read_text()))
    assert history.losses_distributed == [(1, 0.0), (2, 6.0)]
    assert "History (loss, distributed):\n\tround 1: 0.0\n\tround 2: 6.0" in out
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


ONE_NODE = tuple(
    f"--strategy-arg=min_{what}_clients=1" for what in ("fit", "evaluate", "available")
)


@pytest.mark.parametrize(
    ("client", "server_args", "reason"),
    [
        (
            "ops_app:broken",
            ("--rounds", "1", *ONE_NODE),
            "none of its 1 fit round(s) aggregated anything",
        ),
        (
            "ops_app:client_fn",
            ("--wait-timeout", "1", "--strategy-arg", "min_available_clients=2"),
            "NotEnoughClients",
        ),
    ],
)
def test_a_failed_run_ends_every_process_with_1_and_the_nodes_learn_why(
    tmp_path: Path,
    procs: list[subprocess.Popen[str]],
    client: str,
    server_args: tuple[str, ...],
    reason: str,
) -> None:
    """No round aggregated (every fit raises), or too few nodes: the server exits 1, and
    its node exits 1 saying the server's reason."""
    server = Server("--address", "127.0.0.1:0", "--log-format", "plain", *server_args, cwd=APPS)
    procs.append(server.proc)
    port = server.port()
    node = _node("--client", client, "--server", f"127.0.0.1:{port}", "--insecure")
    procs.append(node)
    _, err = node.communicate(timeout=WAIT)
    code, _ = server.finish()
    assert code == 1, "\n".join(server.err)
    assert node.returncode == 1, err
    assert "stamen node: the run failed: the server ended the run as failed" in err
    assert reason in err
    assert "ERROR stamen.client: run failed on the server: " in err


def test_an_unknown_config_key_exits_2_naming_the_nearest(tmp_path: Path) -> None:
    (tmp_path / "stamen.toml").write_text('adress = "127.0.0.1:0"\n')
    done = subprocess.run(
        _stamen("server", "--config", "stamen.toml"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown key 'adress'; did you mean 'address'?" in done.stderr


# --- wrong peers -----------------------------------------------------------------------------


def _run_node_against(port: int, *extra: str) -> tuple[subprocess.CompletedProcess[str], float]:
    began = time.monotonic()
    done = subprocess.run(
        _stamen(
            "node",
            "--client",
            "ops_app:client_fn",
            "--server",
            f"127.0.0.1:{port}",
            "--insecure",
            *extra,
        ),
        cwd=APPS,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    return done, time.monotonic() - began


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere"])
def test_a_plain_http_server_is_named_at_once(transport: str) -> None:
    """An HTTP/1 server on the port: exit 5 within seconds, naming it; not retried."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        done, seconds = _run_node_against(httpd.server_address[1], "--transport", transport)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert done.returncode == 5, done.stderr
    assert "is an HTTP/1 server, not a gRPC server" in done.stderr
    assert "retrying" not in done.stderr and "reconnecting" not in done.stderr
    assert seconds < 15


def test_a_tls_server_reached_in_plaintext_is_refused_at_once(tmp_path: Path) -> None:
    """A TLS server when plaintext was asked: exit 4 (refused: TLS), saying so."""
    certs = generate_certificates(("127.0.0.1",))
    (tmp_path / "server.crt").write_bytes(certs.server_cert)
    (tmp_path / "server.key").write_bytes(certs.server_key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    context.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1024)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        done, seconds = _run_node_against(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert done.returncode == 4, done.stderr
    assert "speaks TLS but the node connects in plaintext" in done.stderr
    assert seconds < 15


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere"])
def test_a_grpc_server_without_stamens_service_is_named_at_once(transport: str) -> None:
    """A gRPC server that serves neither Stamen's nor Flower's methods: exit 5."""
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = other.add_insecure_port("127.0.0.1:0")
    other.start()
    try:
        done, seconds = _run_node_against(port, "--transport", transport)
    finally:
        other.stop(0)
    assert done.returncode == 5, done.stderr
    assert "UNIMPLEMENTED" in done.stderr
    assert "not a Stamen or Flower server" in done.stderr
    assert seconds < 15


# --- the live view -----------------------------------------------------------------------------


def _plain(data: bytes) -> str:
    """Terminal output without its escape sequences (colours, cursor moves)."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data.decode("utf-8", "replace"))


def test_the_live_view_on_a_terminal(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    """On a pseudo-terminal, ``stamen server`` draws the rich panel (round k/N, replies,
    nodes, time, latest metrics) instead of plain progress lines."""
    pytest.importorskip("rich", reason="rich (stamen[rich]) is not installed")
    (tmp_path / "stamen.toml").write_text(TOML.replace('log-format = "plain"\n', ""))
    master, slave = pty.openpty()
    server = subprocess.Popen(
        _stamen("server", "--config", "stamen.toml", "--plot", ""),
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "COLUMNS": "200", "TERM": "xterm"},
    )
    os.close(slave)
    procs.append(server)  # type: ignore[arg-type]
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the terminal closed (EIO)
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    port = None
    deadline = time.monotonic() + WAIT
    while port is None and time.monotonic() < deadline:
        text = _plain(b"".join(chunks))
        if match := re.search(r"port (\d+)\)", text):
            port = int(match.group(1))
        time.sleep(0.05)
    assert port is not None, b"".join(chunks)
    common = ("--client", "ops_app:client_fn", "--server", f"127.0.0.1:{port}", "--insecure")
    nodes = [_node(*common, "--node-config", f"k={k}") for k in (1, 3)]
    procs.extend(nodes)
    for node in nodes:
        node.communicate(timeout=WAIT)
    assert server.wait(WAIT) == 0
    reader.join(10)
    os.close(master)
    screen = _plain(b"".join(chunks))
    assert "stamen server" in screen
    assert "round" in screen and "2/2" in screen
    assert "2/2 replies" in screen
    assert "2 connected" in screen
    assert "ETA" in screen
    assert "evaluate/loss=6" in screen
    assert "run completed: 2 round(s)" in screen
    assert "INFO stamen.server: round 1/2" not in screen  # the panel replaces those lines
