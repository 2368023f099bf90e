"""Stamen nodes join a real Flower 1.12 SuperLink (grpc-rere and rest) running a ServerApp.

Processes: ``flower-superlink`` (Flower venv), ``flower-server-app`` with
``peers/flower_serverapp.py`` (Flower's legacy workflow, FedAvg, the scenario's initial
model), and two Stamen nodes (``peers/stamen_superlink_node.py``, this venv) started with
``stamen.client.start_client(transport=...)`` and no other hint: they find out that the
server speaks Flower's Fleet API. The ServerApp's per-round aggregates must equal a
pure-Stamen run of the same clients, bit for bit.

How each process ends: the ServerApp returns (exit 0) after its last round. A Flower
SuperLink tells nodes nothing at the end of a run, so the Stamen nodes, like Flower
SuperNodes, serve until they are stopped: SIGTERM makes ``start_client`` unregister
(DeleteNode) and the node script exit 0. Flower's grpc-rere SuperLink exits 0 on
SIGTERM; its REST SuperLink (uvicorn) does not stop on SIGTERM and is killed.

Flower 1.12 needs TLS for node authentication: that test runs the SuperLink with a
development CA, two authorized node keys and a third node whose key it does not know.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stamen.testing.certs import generate_certificates

from ._harness import (
    EXIT_TIMEOUT,
    PEERS,
    PORT_TIMEOUT,
    RUN_TIMEOUT,
    Peer,
    describe_nodes,
    flower_python,
    join_nodes,
    remaining,
    stamen_server,
    start_stamen_nodes,
)
from .peers import scenario

pytestmark = pytest.mark.interop

SERVERAPP_TIMEOUT = 60.0
PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "stamen-superlink-interop"
version = "1.0.0"
description = "Flower ServerApp of Stamen's interop tests"
license = "Apache-2.0"
authors = [{ name = "Stamen" }]
dependencies = []

[tool.flwr.app]
publisher = "stamen"

[tool.flwr.app.components]
serverapp = "flower_serverapp:app"
clientapp = "flower_serverapp:app"
"""


def free_port() -> int:
    """A port free on 127.0.0.1 now (Flower's SuperLink takes addresses, not port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, peer: Peer, timeout: float) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if peer.proc.poll() is not None:
            raise AssertionError(f"{peer.name} exited before listening\n" + peer.describe())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if remaining(deadline) <= 0:
                raise AssertionError(
                    f"{peer.name}: port {port} not listening within {timeout:g} s\n"
                    + peer.describe()
                ) from None
            time.sleep(0.05)


@contextmanager
def peers() -> Iterator[list[Peer]]:
    """A list of peers, every one stopped (killed if still running) on exit."""
    started: list[Peer] = []
    try:
        yield started
    finally:
        for peer in reversed(started):
            peer.stop()


def flower_bin(name: str) -> str:
    return str(flower_python().parent / name)


def start_superlink(
    started: list[Peer], tmp_path: Path, fleet_api: str, tls: list[str] | None = None
) -> tuple[int, int]:
    """A SuperLink with its Fleet API on ``fleet_api``; returns (fleet port, driver port)."""
    fleet, driver = free_port(), free_port()
    argv = [
        flower_bin("flower-superlink"),
        *(tls if tls is not None else ["--insecure"]),
        "--fleet-api-type",
        fleet_api,
        "--fleet-api-address",
        f"127.0.0.1:{fleet}",
        "--driver-api-address",
        f"127.0.0.1:{driver}",
    ]
    superlink = Peer("flower-superlink", argv, tmp_path)
    started.append(superlink)
    wait_listening(driver, superlink, PORT_TIMEOUT)
    wait_listening(fleet, superlink, PORT_TIMEOUT)
    return fleet, driver


def start_node(
    started: list[Peer],
    tmp_path: Path,
    address: str,
    client_id: int,
    transport: str,
    extra: tuple[str, ...] = (),
    name: str | None = None,
) -> Peer:
    argv = [
        sys.executable,
        str(PEERS / "stamen_superlink_node.py"),
        "--address",
        address,
        "--client-id",
        str(client_id),
        "--transport",
        transport,
        *extra,
    ]
    node = Peer(name or f"stamen-node-{client_id}", argv, tmp_path)
    started.append(node)
    node.wait_for_line("READY", PORT_TIMEOUT)
    return node


def start_serverapp(
    started: list[Peer], tmp_path: Path, driver: int, ca: Path | None = None
) -> tuple[Peer, Path]:
    app = tmp_path / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(PYPROJECT, encoding="utf-8")
    out = tmp_path / "serverapp-result.json"
    argv = [
        "/usr/bin/env",
        f"PYTHONPATH={PEERS}",
        f"STAMEN_INTEROP_OUT={out}",
        f"STAMEN_INTEROP_ROUND_TIMEOUT={RUN_TIMEOUT}",
        flower_bin("flower-server-app"),
        str(app),
        "--superlink",
        f"127.0.0.1:{driver}",
        *(["--root-certificates", str(ca)] if ca is not None else ["--insecure"]),
    ]
    serverapp = Peer("flower-server-app", argv, tmp_path)
    started.append(serverapp)
    return serverapp, out


def stop_node(node: Peer) -> list[str]:
    """SIGTERM the node; it must unregister and exit 0. Returns its EVENT lines."""
    node.proc.send_signal(signal.SIGTERM)
    status = node.finish(EXIT_TIMEOUT)
    assert status == 0, f"{node.name} exited {status}\n" + node.describe()
    assert "STOPPED" in node.stdout_lines, node.describe()
    return [line.removeprefix("EVENT ") for line in node.stdout_lines if line.startswith("EVENT")]


def stamen_reference() -> dict[str, object]:
    """The scenario run by a Stamen server and Stamen nodes (threads)."""
    nodes = []
    try:
        with stamen_server("given") as (handle, strategy):
            nodes = start_stamen_nodes(handle.address)
            try:
                history = handle.result(RUN_TIMEOUT)
            except Exception as exc:
                raise AssertionError(
                    f"Stamen run failed: {exc!r}\n{describe_nodes(nodes)}"
                ) from exc
    finally:
        leftover = join_nodes(nodes, EXIT_TIMEOUT)
    assert not leftover
    return {
        "rounds": strategy.rounds,
        "fit_failures": strategy.fit_failures,
        "evaluate_failures": strategy.evaluate_failures,
        "losses_distributed": list(history.losses_distributed),
    }


def read_serverapp(out: Path) -> dict[str, object]:
    data = json.loads(out.read_text(encoding="utf-8"))
    return {
        "rounds": [
            (r["round"], [scenario.decode_ndarray(a) for a in r["params"]]) for r in data["rounds"]
        ],
        "fit_failures": data["fit_failures"],
        "evaluate_failures": data["evaluate_failures"],
        "losses_distributed": [(r, loss) for r, loss in data["losses_distributed"]],
    }


def assert_same(flower: dict[str, object], stamen: dict[str, object]) -> None:
    got, want = flower["rounds"], stamen["rounds"]
    assert isinstance(got, list) and isinstance(want, list)
    assert [r for r, _ in got] == [r for r, _ in want] == list(range(1, scenario.NUM_ROUNDS + 1))
    for (server_round, a_layers), (_, b_layers) in zip(got, want, strict=True):
        for a, b in zip(a_layers, b_layers, strict=True):
            assert (a.dtype, a.shape) == (b.dtype, b.shape)
            np.testing.assert_array_equal(a, b, err_msg=f"round {server_round}")
    for key in ("fit_failures", "evaluate_failures", "losses_distributed"):
        assert flower[key] == stamen[key], key


def run_federation(
    tmp_path: Path,
    fleet_api: str,
    transport: str,
    tls: list[str] | None = None,
    node_extra: dict[int, tuple[str, ...]] | None = None,
    ca: Path | None = None,
) -> tuple[dict[str, object], dict[int, list[str]], list[Peer]]:
    with peers() as started:
        fleet, driver = start_superlink(started, tmp_path, fleet_api, tls)
        nodes = {
            k: start_node(
                started, tmp_path, f"127.0.0.1:{fleet}", k, transport, (node_extra or {}).get(k, ())
            )
            for k in scenario.CLIENT_IDS
        }
        serverapp, out = start_serverapp(started, tmp_path, driver, ca)
        status = serverapp.finish(SERVERAPP_TIMEOUT)
        details = "\n".join(p.describe() for p in started)
        assert status == 0, f"ServerApp exited {status}\n{details}"
        events = {k: stop_node(node) for k, node in nodes.items()}
        superlink = started[0]
        superlink.proc.send_signal(signal.SIGTERM)
        if fleet_api == "grpc-rere":
            assert superlink.finish(EXIT_TIMEOUT) == 0, superlink.describe()
        return read_serverapp(out), events, list(nodes.values())


EXPECTED_EVENTS = ["fit 1", "evaluate 1", "fit 2", "evaluate 2"]


@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_stamen_nodes_train_with_a_flower_superlink(tmp_path: Path, transport: str) -> None:
    flower_python()
    outcome, events, nodes = run_federation(tmp_path, transport, transport)
    assert_same(outcome, stamen_reference())
    for client_id, calls in events.items():
        assert calls == EXPECTED_EVENTS, f"client {client_id}: {calls}"
    for node in nodes:
        log = (tmp_path / f"{node.name}.stderr.log").read_text(encoding="utf-8")
        assert "speaking Flower 1.12's Fleet API" in log, log[-2000:]


def _write_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key


def _openssh_public(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def test_node_authentication_with_a_flower_superlink(tmp_path: Path) -> None:
    flower_python()
    certs = generate_certificates()
    ca, cert, key = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca.write_bytes(certs.ca_cert)
    cert.write_bytes(certs.server_cert)
    key.write_bytes(certs.server_key)
    superlink_key = ec.generate_private_key(ec.SECP384R1())
    (tmp_path / "superlink").write_bytes(
        superlink_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "superlink.pub").write_bytes(_openssh_public(superlink_key))
    node_keys = {k: _write_key(tmp_path / f"node{k}.pem") for k in scenario.CLIENT_IDS}
    _write_key(tmp_path / "stranger.pem")
    (tmp_path / "keys.csv").write_bytes(
        b",".join(_openssh_public(k) for k in node_keys.values()) + b"\n"
    )
    tls = [
        "--ssl-ca-certfile",
        str(ca),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--auth-list-public-keys",
        str(tmp_path / "keys.csv"),
        "--auth-superlink-private-key",
        str(tmp_path / "superlink"),
        "--auth-superlink-public-key",
        str(tmp_path / "superlink.pub"),
    ]
    with peers() as started:
        fleet, _ = start_superlink(started, tmp_path, "grpc-rere", tls)
        stranger = start_node(
            started,
            tmp_path,
            f"127.0.0.1:{fleet}",
            1,
            "grpc-rere",
            ("--root-certificates", str(ca), "--key", str(tmp_path / "stranger.pem")),
            name="stamen-stranger",
        )
        assert stranger.finish(EXIT_TIMEOUT) == 1, stranger.describe()
        error = [line for line in stranger.stdout_lines if line.startswith("ERROR")]
        assert error and "AuthError" in error[0] and "Access denied" in error[0], error
    extra = {
        k: ("--root-certificates", str(ca), "--key", str(tmp_path / f"node{k}.pem"))
        for k in scenario.CLIENT_IDS
    }
    outcome, events, nodes = run_federation(tmp_path, "grpc-rere", "grpc-rere", tls, extra, ca)
    assert_same(outcome, stamen_reference())
    for client_id, calls in events.items():
        assert calls == EXPECTED_EVENTS, f"client {client_id}: {calls}"
    for node in nodes:
        log = (tmp_path / f"{node.name}.stderr.log").read_text(encoding="utf-8")
        assert "weaker than Stamen's" in log, log[-2000:]
