"""Stamen's server with real Flower 1.12 nodes on its Fleet API (grpc-rere, rest).

The federation is ``peers/mixed.py``: six deterministic clients whose FedAvg results are
exact in float32. One run mixes every kind of node the server takes — Flower 1.12
``start_client`` on grpc-rere, rest and grpc-bidi (subprocesses, Flower venv) and a Stamen
node on each transport — and must end exactly like the same clients run as Stamen nodes
only; every process exits 0 on the server's end of the run. With node authentication on,
a Flower node whose key is authorized trains beside a Stamen node, one with an unknown key
is refused. Every server listens on 127.0.0.1 port 0.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import stamen as fl
from stamen.common import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.errors import RunError
from stamen.server import History, SimpleClientManager
from stamen.testing import RunningServer, running_server

from ._harness import (
    CLIENT_WAIT_TIMEOUT,
    EXIT_TIMEOUT,
    PEERS,
    ROUND_TIMEOUT,
    RUN_TIMEOUT,
    Peer,
    RecordingFedAvg,
    events_from_stdout,
    flower_python,
    remaining,
)
from .peers import mixed

pytestmark = pytest.mark.interop

TRAINING_EVENTS = ["fit 1", "evaluate 1", "fit 2", "evaluate 2"]
# Each round adds (1 + ... + 6) / 6 = 3.5 to every weight of scenario's initial model.
EXPECTED_FINAL = [
    np.array([[7.5, 6.0, 9.25], [7.0, 10.5, 6.25]], dtype=np.float32),
    np.array([7.125, 7.25, 7.375, 7.5], dtype=np.float32),
]


def mixed_strategy(n: int) -> RecordingFedAvg:
    """FedAvg over ``n`` nodes of ``mixed``, keeping each round's model."""
    return RecordingFedAvg(
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters(mixed.initial_ndarrays()),
        on_fit_config_fn=mixed.fit_config,
        on_evaluate_config_fn=mixed.evaluate_config,
    )


class MixedClient(fl.client.NumPyClient):
    """``mixed``'s client ``client_id`` as a Stamen NumPyClient; logs each call."""

    def __init__(self, client_id: int, events: list[str]) -> None:
        self.client_id = client_id
        self.events = events

    def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
        self.events.append("get_parameters")
        return mixed.initial_ndarrays()

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        self.events.append(f"fit {config.get('round')}")
        return mixed.fit(self.client_id, parameters, config)

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]) -> Any:
        self.events.append(f"evaluate {config.get('round')}")
        return mixed.evaluate(self.client_id, parameters, config)


class StamenNode:
    """``stamen.client.start_client`` running ``mixed``'s client in a thread
    (``max_retries=0``: it gives up at once if the server goes away, so it always ends)."""

    def __init__(self, client_id: int, address: str, transport: str, **kwargs: Any) -> None:
        self.client_id = client_id
        self.events: list[str] = []
        self.error: BaseException | None = None
        self._kwargs = {"server_address": address, "transport": transport, **kwargs}
        self.thread = threading.Thread(target=self._run, name=f"node-{client_id}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            fl.client.start_client(
                client_fn=lambda _c: MixedClient(self.client_id, self.events).to_client(),
                insecure=True,
                max_retries=0,
                **self._kwargs,
            )
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float) -> None:
        """Wait for ``start_client`` to return; fail if it raised or still runs."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"Stamen node {self.client_id} still running"
        assert self.error is None, f"Stamen node {self.client_id}: {self.error!r}"


def flower_node(
    python: Path,
    tmp_path: Path,
    client_id: int,
    address: str,
    transport: str,
    *extra: str,
) -> Peer:
    """A Flower 1.12 ``start_client`` node (``peers/flower_fleet_client.py``)."""
    argv = [
        str(python),
        str(PEERS / "flower_fleet_client.py"),
        "--address",
        address,
        "--client-id",
        str(client_id),
        "--transport",
        transport,
        *extra,
    ]
    return Peer(f"flower-{transport}-{client_id}", argv, tmp_path)


def server(n: int, **kwargs: Any) -> Any:
    """A Stamen server for ``n`` nodes of ``mixed`` (REST port too), 2 rounds."""
    strategy = mixed_strategy(n)
    return strategy, running_server(
        config=fl.server.ServerConfig(num_rounds=mixed.NUM_ROUNDS, round_timeout=ROUND_TIMEOUT),
        strategy=strategy,
        client_manager=SimpleClientManager(wait_timeout=CLIENT_WAIT_TIMEOUT),
        rest=True,
        **kwargs,
    )


def run_result(handle: RunningServer, peers: list[Peer], nodes: list[StamenNode]) -> History:
    """The run's History; on failure, every peer's and node's state."""
    try:
        return handle.result(RUN_TIMEOUT)
    except Exception as exc:
        details = "\n".join(p.describe() for p in peers)
        states = [(n.client_id, n.thread.is_alive(), n.error, n.events) for n in nodes]
        raise AssertionError(f"run failed: {exc!r}\n{details}\n{states}") from exc


def finish_all(peers: list[Peer], nodes: list[StamenNode]) -> None:
    """Every Flower process exits 0 having printed DONE; every Stamen node returns."""
    deadline = time.monotonic() + EXIT_TIMEOUT
    for peer in peers:
        status = peer.finish(remaining(deadline))
        assert status == 0, peer.describe()
        assert "DONE" in peer.stdout_lines, peer.describe()
    for node in nodes:
        node.finish(remaining(deadline))


@pytest.fixture(scope="module")
def stamen_reference() -> tuple[list[tuple[int, list[np.ndarray]]], History]:
    """The six clients as Stamen nodes only (two on each transport)."""
    strategy, serving = server(6)
    nodes: list[StamenNode] = []
    with serving as handle:
        transports = ("grpc-rere", "rest", "grpc-bidi") * 2
        nodes = [
            StamenNode(k, handle.address_for(t), t)
            for k, t in zip(mixed.CLIENT_IDS, transports, strict=True)
        ]
        history = run_result(handle, [], nodes)
        finish_all([], nodes)
    for node in nodes:
        assert node.events == TRAINING_EVENTS, (node.client_id, node.events)
    return list(strategy.rounds), history


@pytest.mark.parametrize(
    ("rere_style", "rest_style"),
    [("numpy", "client"), ("client", "numpy")],
    ids=["rere-client_fn-rest-client", "rere-client-rest-client_fn"],
)
def test_flower_nodes_on_every_transport_train_beside_a_stamen_node(
    rere_style: str, rest_style: str, stamen_reference: Any, tmp_path: Path
) -> None:
    """One Stamen server, one run, six nodes: Flower 1.12 ``start_client`` over
    grpc-rere and over rest (``client_fn=`` returning a NumPyClient, or ``client=`` a
    Client) and over grpc-bidi, and a Stamen node on each of the three transports. Every
    node trains and evaluates in both rounds, every Flower process exits 0 once the run
    ends (the reconnect TaskIns), and every round's model and the distributed losses
    equal the run of the same six clients as Stamen nodes, bit for bit."""
    python = flower_python()
    reference_rounds, reference_history = stamen_reference
    strategy, serving = server(6)
    peers: list[Peer] = []
    nodes: list[StamenNode] = []
    try:
        with serving as handle:
            peers = [
                flower_node(
                    python, tmp_path, 1, handle.address, "grpc-rere", "--style", rere_style
                ),
                flower_node(python, tmp_path, 2, handle.rest_url, "rest", "--style", rest_style),
                flower_node(python, tmp_path, 3, handle.address, "grpc-bidi"),
            ]
            nodes = [
                StamenNode(k, handle.address_for(t), t)
                for k, t in ((4, "grpc-rere"), (5, "rest"), (6, "grpc-bidi"))
            ]
            history = run_result(handle, peers, nodes)
            finish_all(peers, nodes)
            final = parameters_to_ndarrays(handle.server.parameters)
    finally:
        for peer in peers:
            peer.stop()
    for peer in peers:
        assert events_from_stdout(peer.stdout_lines) == TRAINING_EVENTS, peer.describe()
    for node in nodes:
        assert node.events == TRAINING_EVENTS, (node.client_id, node.events)
    assert [r for r, _ in strategy.rounds] == [r for r, _ in reference_rounds] == [1, 2]
    for (rnd, got), (_, want) in zip(strategy.rounds, reference_rounds, strict=True):
        for a, b in zip(got, want, strict=True):
            assert (a.dtype, a.shape) == (b.dtype, b.shape)
            np.testing.assert_array_equal(a, b, err_msg=f"round {rnd}")
    for a, b in zip(final, EXPECTED_FINAL, strict=True):
        np.testing.assert_array_equal(a, b)
    assert history.losses_distributed == reference_history.losses_distributed


# --- node authentication ---------------------------------------------------------------------


def write_key_pair(folder: Path, private: ec.EllipticCurvePrivateKey) -> Path:
    """``node.pem`` / ``node.pub.pem`` in ``folder``, for ``flower_fleet_client.py``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "node.pem").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (folder / "node.pub.pem").write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return folder


@pytest.mark.parametrize("server_keys", ["generated", "given"])
def test_flower_node_authentication_on_grpc_rere(server_keys: str, tmp_path: Path) -> None:
    """Node authentication on both sides: the server's ``authorized_keys`` hold a Flower
    node's key and a Stamen node's key. The Flower 1.12 node authenticating the Flower way
    (``start_client(authentication_keys=...)``, grpc-rere) trains beside the Stamen node
    (signed requests) and exits 0; a Flower node with a key not in ``authorized_keys`` is
    refused (UNAUTHENTICATED: it never trains, and its log names the refusal). The server's
    own key pair is generated at start, or given with ``server_keys=``."""
    python = flower_python()
    flower_key = ec.generate_private_key(ec.SECP384R1())
    stranger_key = ec.generate_private_key(ec.SECP384R1())
    stamen_key = ec.generate_private_key(ec.SECP384R1())
    authorized = [flower_key.public_key(), stamen_key.public_key()]
    extra: dict[str, Any] = {"authorized_keys": authorized}
    if server_keys == "given":
        own = ec.generate_private_key(ec.SECP384R1())
        extra["server_keys"] = (own, own.public_key())
    good_dir = write_key_pair(tmp_path / "good", flower_key)
    stranger_dir = write_key_pair(tmp_path / "stranger", stranger_key)
    strategy, serving = server(2, **extra)
    peers: list[Peer] = []
    nodes: list[StamenNode] = []
    stranger: Peer | None = None
    try:
        with serving as handle:
            stranger = flower_node(
                python, tmp_path, 3, handle.address, "grpc-rere",
                "--key-dir", str(stranger_dir), "--max-retries", "0",
            )  # fmt: skip
            peers = [
                flower_node(
                    python, tmp_path, 1, handle.address, "grpc-rere", "--key-dir", str(good_dir)
                )
            ]
            nodes = [
                StamenNode(
                    2,
                    handle.address,
                    "grpc-rere",
                    authentication_keys=(stamen_key, stamen_key.public_key()),
                )
            ]
            # Flower's start_client returns once its retries are spent (DONE); the
            # process may then hang at exit in grpc's channel cleanup (Flower leaves the
            # channel of a failed CreateNode open), so it is not waited for.
            stranger.wait_for_line("DONE", RUN_TIMEOUT)
            history = run_result(handle, [*peers, stranger], nodes)
            finish_all(peers, nodes)
    finally:
        for peer in [*peers, *([stranger] if stranger is not None else [])]:
            peer.stop()
    assert events_from_stdout(peers[0].stdout_lines) == TRAINING_EVENTS, peers[0].describe()
    for node in nodes:
        assert node.events == TRAINING_EVENTS, (node.client_id, node.events)
    # The stranger gave up untrained.
    assert stranger is not None
    assert events_from_stdout(stranger.stdout_lines) == [], stranger.describe()
    log = (tmp_path / f"{stranger.name}.stderr.log").read_text(encoding="utf-8", errors="replace")
    assert "UNAUTHENTICATED" in log and "is not authorized" in log, stranger.describe()
    # Only the two authorized nodes took part: 1 + 2 = 3, so each round adds 1.5.
    assert [r for r, _ in strategy.rounds] == [1, 2]
    final = strategy.rounds[-1][1]
    for got, start in zip(final, mixed.initial_ndarrays(), strict=True):
        np.testing.assert_array_equal(got, start + np.float32(3.0))
    assert len(history.losses_distributed) == 2


# --- flower-supernode ------------------------------------------------------------------------


class FailureRecorder(RecordingFedAvg):
    """RecordingFedAvg that keeps each fit failure's text."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failure_texts: list[str] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.failure_texts += [str(f if isinstance(f, BaseException) else f[1]) for f in failures]
        return super().aggregate_fit(server_round, results, failures)


@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_flower_supernode_registers_reports_it_has_no_app_and_exits_0(
    transport: str, tmp_path: Path
) -> None:
    """Flower 1.12's ``flower-supernode`` (grpc-rere or rest) registers with a Stamen
    server like any node. A Stamen server runs a legacy run (GetRun names no app bundle),
    for which the SuperNode cannot load a ClientApp: it answers each task with Flower's
    error (LOAD_CLIENT_APP_EXCEPTION), which the round counts as a failure naming it; as
    no round aggregated anything, the run ends as a failed run saying why. When the run
    ends the SuperNode unregisters and exits 0."""
    python = flower_python()
    supernode = python.parent / "flower-supernode"
    strategy = FailureRecorder(
        min_fit_clients=1,
        min_evaluate_clients=1,
        min_available_clients=1,
        initial_parameters=ndarrays_to_parameters(mixed.initial_ndarrays()),
    )
    peer: Peer | None = None
    with running_server(
        config=fl.server.ServerConfig(num_rounds=1, round_timeout=ROUND_TIMEOUT),
        strategy=strategy,
        client_manager=SimpleClientManager(wait_timeout=CLIENT_WAIT_TIMEOUT),
        rest=True,
    ) as handle:
        argv = [
            str(supernode),
            "--insecure",
            f"--{transport}",
            "--superlink",
            handle.address_for(transport),
            "--flwr-dir",
            str(tmp_path / "flwr"),
        ]
        try:
            peer = Peer(f"flower-supernode-{transport}", argv, tmp_path)
            with pytest.raises(RunError, match="none of its 1 fit round"):
                handle.result(RUN_TIMEOUT)
            assert peer.finish(EXIT_TIMEOUT) == 0, peer.describe()
        finally:
            if peer is not None:
                peer.stop()
    assert strategy.fit_failures == [1]
    assert strategy.failure_texts, strategy.failure_texts
    assert all("error code 1" in t and "ClientApp" in t for t in strategy.failure_texts)
