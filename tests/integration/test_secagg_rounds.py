"""SecAgg+ rounds through the real round loop (Server + SecAggPlus + dispatch), in process.

The nodes are :class:`InProcessProxy` objects that run ``dispatch.handle`` on a thread
pool, as a network node would, and can be killed at any stage. Each records what the
server received from it (the test-only hook of the privacy test).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

import stamen as fl
from stamen.client.dispatch import handle
from stamen.context import Context
from stamen.errors import ConnectionLost
from stamen.messages import (
    FitIns,
    FitRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Instruction,
    Reply,
)
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.protocol import secagg_math as sm
from stamen.records import RecordSet
from stamen.server import Server, SimpleClientManager
from stamen.server.client_proxy import ClientProxy
from stamen.server.strategy import FedAvg, SecAggPlus
from stamen.typing import Config, NDArrays, Scalar

SHAPES = [(30, 20), (50,)]


class Trainer(fl.client.NumPyClient):
    """Moves the model towards its own target; a plain NumPyClient, unaware of SecAgg+."""

    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        assert not any(key.startswith("stamen.secagg") for key in config)
        gen = np.random.default_rng(self.k)
        trained = [p + gen.uniform(-1, 1, p.shape).astype(p.dtype) for p in parameters]
        return trained, 10 * (self.k + 1), {"k": self.k}

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        return 0.0, 1, {}


def client_fn(context: Context) -> fl.client.Client:
    return Trainer(int(context.node_config["partition-id"])).to_client()


def _stage(ins: Instruction) -> str | None:
    if isinstance(ins, GetPropertiesIns | FitIns):
        stage = ins.config.get("stamen.secagg.stage")
        return stage if isinstance(stage, str) else None
    return None


class InProcessProxy(ClientProxy):
    """A node in this process: ``dispatch.handle`` on a pool; dies at ``die_at``."""

    def __init__(self, cid: str, pool: ThreadPoolExecutor, die_at: str | None = None) -> None:
        super().__init__(cid)
        self.pool = pool
        self.die_at = die_at
        self.context = Context(int(cid), {"partition-id": cid}, RecordSet(), {})
        self.received: list[Reply] = []
        self.flower_like = False

    def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        stage = _stage(ins)
        if self.die_at is not None and stage == self.die_at:
            future: Future[Reply] = Future()
            future.set_exception(ConnectionLost(f"node {self.cid} died at {stage}"))
            return future
        if self.flower_like and isinstance(ins, GetPropertiesIns):
            # what a node without SecAgg+ answers: its client's own properties
            return self.pool.submit(
                lambda: GetPropertiesRes(fl.common.Status(fl.common.Code.OK, "Success"), {})
            )

        def run() -> Reply:
            reply = handle(client_fn, self.context, ins)
            self.received.append(reply)
            return reply

        return self.pool.submit(run)


def _initial() -> fl.common.Parameters:
    gen = np.random.default_rng(99)
    return ndarrays_to_parameters([gen.uniform(-1, 1, s).astype(np.float32) for s in SHAPES])


def _run(
    strategy: fl.server.strategy.Strategy,
    n: int,
    die: dict[str, str] | None = None,
    flower_like: set[str] | None = None,
):
    manager = SimpleClientManager()
    with ThreadPoolExecutor(max_workers=8) as pool:
        proxies = {}
        for i in range(n):
            proxy = InProcessProxy(str(i), pool, (die or {}).get(str(i)))
            proxy.flower_like = str(i) in (flower_like or set())
            manager.register(proxy)
            proxies[str(i)] = proxy
        server = Server(client_manager=manager, strategy=strategy)
        fitted = None
        server.parameters = _initial()
        fitted = server.fit_round(1, None)
    return server, fitted, proxies


def _fedavg(n: int) -> FedAvg:
    return FedAvg(min_fit_clients=n, min_available_clients=n, fraction_evaluate=0.0)


def _secagg(n: int, shares: int | float = 5, threshold: int | float = 3) -> SecAggPlus:
    return SecAggPlus(_fedavg(n), num_shares=shares, reconstruction_threshold=threshold)


def _bound(ks: list[int]) -> float:
    q = [sm.weight_factor(10 * (k + 1), 1000.0, 2**22) for k in ks]
    return sm.error_bound(q, clipping_range=8.0, quantization_range=2**22) + 1e-6


def _expected(ks: list[int]) -> list[np.ndarray]:
    base = parameters_to_ndarrays(_initial())
    total = [np.zeros(s) for s in SHAPES]
    weights = 0.0
    for k in ks:
        gen = np.random.default_rng(k)
        w = 10 * (k + 1)
        for t, b in zip(total, base, strict=True):
            t += w * (b + gen.uniform(-1, 1, b.shape).astype(np.float32)).astype(np.float64)
        weights += w
    return [t / weights for t in total]


def test_secagg_equals_fedavg_within_the_bound():
    _, plain, _ = _run(_fedavg(6), 6)
    _, secure, _ = _run(_secagg(6), 6)
    assert plain is not None and secure is not None
    plain_arrays = parameters_to_ndarrays(plain[0])
    secure_arrays = parameters_to_ndarrays(secure[0])
    for a, b, e in zip(plain_arrays, secure_arrays, _expected(list(range(6))), strict=True):
        assert b.dtype == np.float32 and a.shape == b.shape
        assert np.abs(b - a).max() <= _bound(list(range(6)))
        assert np.abs(b - e).max() <= _bound(list(range(6)))
    metrics_ok = secure[2][0]
    assert len(metrics_ok) == 6 and not secure[2][1]


def test_what_the_server_received_shows_no_update():
    _, secure, proxies = _run(_secagg(5, 5, 3), 5)
    assert secure is not None
    for proxy in proxies.values():
        fits = [r for r in proxy.received if isinstance(r, FitRes)]
        assert len(fits) == 1
        (vector,) = parameters_to_ndarrays(fits[0].parameters)
        assert vector.dtype == np.uint32 and vector.size == 1 + 30 * 20 + 50
        # nothing close to the trained model: the values are spread over [0, 2**32)
        assert vector[1:].astype(np.float64).mean() / 2**32 == pytest.approx(0.5, abs=0.05)
        props = [r for r in proxy.received if isinstance(r, GetPropertiesRes)]
        sent = {k for r in props for k in r.properties}
        assert all(k.startswith("stamen.secagg.") for k in sent)


@pytest.mark.parametrize("stage", ["setup", "share_keys", "masked", "unmask"])
def test_nodes_killed_at_each_stage_up_to_the_threshold(
    stage: str, caplog: pytest.LogCaptureFixture
):
    die = {"2": stage, "5": stage}
    _, secure, _ = _run(_secagg(8, 7, 4), 8, die)
    assert secure is not None and secure[0] is not None, caplog.text
    survivors = [k for k in range(8) if stage == "unmask" or str(k) not in die]
    for got, want in zip(parameters_to_ndarrays(secure[0]), _expected(survivors), strict=True):
        assert np.abs(got - want).max() <= _bound(survivors)
    _, failures = secure[2]
    assert len(failures) == (0 if stage == "unmask" else 2)


@pytest.mark.parametrize("stage", ["setup", "share_keys", "masked", "unmask"])
def test_beyond_the_threshold_the_round_fails_cleanly(stage: str, caplog: pytest.LogCaptureFixture):
    die = {str(k): stage for k in range(4)}
    caplog.set_level(logging.WARNING, logger="stamen")
    server, secure, _ = _run(_secagg(6, 5, 4), 6, die)
    assert secure is None or secure[0] is None
    assert server.parameters == _initial()
    assert any(
        "SecAgg+ failed" in r.message and "reconstruction_threshold=4" in r.message
        for r in caplog.records
        if r.levelno == logging.WARNING
    ), caplog.text


def test_a_node_without_secagg_is_refused_never_aggregated_in_the_clear(
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.ERROR, logger="stamen")
    _, secure, proxies = _run(_secagg(6, 5, 3), 6, flower_like={"1"})
    assert secure is not None and secure[0] is not None
    assert any("does not take part in Stamen SecAgg+" in r.message for r in caplog.records)
    assert not [r for r in proxies["1"].received if isinstance(r, FitRes)]
    survivors = [0, 2, 3, 4, 5]
    for got, want in zip(parameters_to_ndarrays(secure[0]), _expected(survivors), strict=True):
        assert np.abs(got - want).max() <= _bound(survivors)
    assert len(secure[2][1]) == 1


def test_start_simulation_threads_backend():
    strategy = SecAggPlus(
        FedAvg(
            min_fit_clients=5,
            min_available_clients=5,
            fraction_evaluate=0.0,
            initial_parameters=_initial(),
        ),
        num_shares=5,
        reconstruction_threshold=3,
    )
    server = Server(client_manager=SimpleClientManager(), strategy=strategy)
    fl.simulation.start_simulation(
        client_fn=client_fn,
        num_clients=5,
        server=server,
        config=fl.server.ServerConfig(num_rounds=2),
        backend="threads",
    )
    plain = Server(
        client_manager=SimpleClientManager(),
        strategy=FedAvg(
            min_fit_clients=5,
            min_available_clients=5,
            fraction_evaluate=0.0,
            initial_parameters=_initial(),
        ),
    )
    fl.simulation.start_simulation(
        client_fn=client_fn,
        num_clients=5,
        server=plain,
        config=fl.server.ServerConfig(num_rounds=2),
        backend="threads",
    )
    for a, b in zip(
        parameters_to_ndarrays(server.parameters),
        parameters_to_ndarrays(plain.parameters),
        strict=True,
    ):
        assert np.abs(a - b).max() <= 2 * _bound(list(range(5)))


def test_server_app_and_client_app_with_mods():
    seen: list[str] = []

    def mod(msg: Any, context: Context, call_next: Any) -> Any:
        seen.append(msg.metadata.message_type)
        return call_next(msg, context)

    client_app = fl.client.ClientApp(client_fn=client_fn, mods=[mod])
    strategy = SecAggPlus(
        FedAvg(
            min_fit_clients=4,
            min_available_clients=4,
            fraction_evaluate=0.0,
            initial_parameters=_initial(),
        ),
        num_shares=3,
        reconstruction_threshold=2,
    )
    server_app = fl.server.ServerApp(config=fl.server.ServerConfig(num_rounds=1), strategy=strategy)
    history = fl.simulation.run_simulation(
        server_app, client_app, num_supernodes=4, backend_name="threads"
    )
    assert history is not None
    # the mods see the user's fit only: the key stages never reach them
    assert seen and all(t == "train" for t in seen)
