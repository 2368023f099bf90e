"""start_simulation: Flower 1.12's call, the same Server and strategies, virtual clients."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from stamen.client import Client, NumPyClient
from stamen.context import Context, MetricsRecord, RecordSet
from stamen.errors import ConfigError, NotEnoughClients, Timeout
from stamen.messages import Code, FitRes, Parameters
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.server import ServerConfig, SimpleClientManager
from stamen.server.client_manager import ClientManager
from stamen.server.strategy import FedAvg
from stamen.simulation import SequentialBackend, ThreadsBackend, start_simulation

WAIT = 10.0


class Toy(NumPyClient):
    """Moves the model towards its partition id; fails or blocks on request."""

    gate: threading.Event | None = None

    def __init__(self, context: Context) -> None:
        self.context_ = context
        self.pid = int(context.node_config["partition-id"])

    def get_parameters(self, config: dict[str, Any]) -> list[Any]:
        return [np.zeros(2)]

    def fit(self, parameters: list[Any], config: dict[str, Any]) -> tuple[list[Any], int, dict]:
        if self.pid == config.get("fail_pid"):
            raise ValueError(f"client {self.pid} fails on purpose")
        if self.pid == config.get("block_pid") and self.gate is not None:
            assert self.gate.wait(WAIT), "the test never opened the gate"
        record = self.context_.state.metrics_records.setdefault("r", MetricsRecord())
        record["fits"] = int(record.get("fits", 0)) + 1
        return [parameters[0] + self.pid], self.pid + 1, {"fits": record["fits"]}

    def evaluate(self, parameters: list[Any], config: dict[str, Any]) -> tuple[float, int, dict]:
        return float(parameters[0].sum()), 1, {}


def toy_fn(context: Context) -> Client:
    return Toy(context).to_client()


class Recording(FedAvg):
    """FedAvg that records every round's fit results and failures."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds: list[tuple[list[Any], list[Any]]] = []
        self.available: list[int] = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[Any]:
        self.available.append(client_manager.num_available())
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Any]]:
        self.rounds.append((results, failures))
        return super().aggregate_fit(server_round, results, failures)


def run(strategy: FedAvg | None = None, **kwargs: Any) -> Any:
    arguments: dict[str, Any] = {
        "client_fn": toy_fn,
        "num_clients": 4,
        "config": ServerConfig(num_rounds=2),
        "client_manager": SimpleClientManager(seed=1),
        "strategy": strategy or FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(2)])),
    }
    arguments.update(kwargs)
    return start_simulation(**arguments)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """A gate blocking clients wait on; opened at teardown."""
    Toy.gate = threading.Event()
    yield Toy.gate
    Toy.gate.set()
    Toy.gate = None


@pytest.mark.parametrize("backend", ["threads", "sequential"])
def test_a_flower_style_call_runs_every_round(backend: str) -> None:
    """Flower's keywords run FedAvg over all 4 clients for 2 rounds, on each local backend.

    Round 1 averages 0..3 weighted by pid+1: 20/10 = 2, so the evaluated sum is 4; round 2
    adds another 2 per element."""
    history = run(backend=backend, client_resources={"num_cpus": 1})
    assert history.losses_distributed == [(1, 4.0), (2, 8.0)]


def test_threads_and_sequential_give_identical_histories() -> None:
    """With a seeded client manager the backends sample and aggregate alike."""

    def one(backend: str) -> Any:
        return run(
            backend=backend,
            num_clients=20,
            config=ServerConfig(num_rounds=3),
            strategy=FedAvg(fraction_fit=0.3, fraction_evaluate=0.3),
            client_manager=SimpleClientManager(seed=5),
        )

    assert one("threads") == one("sequential")


def test_every_virtual_client_is_registered_before_the_run_and_removed_after() -> None:
    """The strategy sees all num_clients from round 1; the client manager is empty after."""
    strategy = Recording(initial_parameters=ndarrays_to_parameters([np.zeros(2)]))
    manager = SimpleClientManager()
    run(strategy, num_clients=30, client_manager=manager)
    assert strategy.available == [30, 30]
    assert manager.num_available() == 0


def test_state_persists_per_virtual_node_across_rounds() -> None:
    """A node's context.state survives the client objects: its fit count goes 1, 2, 3."""
    strategy = Recording(initial_parameters=ndarrays_to_parameters([np.zeros(2)]))
    run(strategy, num_clients=2, config=ServerConfig(num_rounds=3))
    counts = [sorted(r.metrics["fits"] for _, r in results) for results, _ in strategy.rounds]
    assert counts == [[1, 1], [2, 2], [3, 3]]


def test_a_client_exception_is_a_failure_of_the_round() -> None:
    """Client 2 raising in fit shows up as a CLIENT_ERROR failure; the others aggregate."""
    strategy = Recording(
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]),
        on_fit_config_fn=lambda server_round: {"fail_pid": 2},
    )
    run(strategy, num_clients=4, config=ServerConfig(num_rounds=1))
    [(results, failures)] = strategy.rounds
    assert len(results) == 3
    [(proxy, reply)] = failures
    assert proxy.cid == "2"
    assert isinstance(reply, FitRes) and reply.status.code == Code.CLIENT_ERROR
    assert "fit raised ValueError: client 2 fails on purpose" in reply.status.message


def test_a_timeout_is_a_failure_of_the_round(gate: threading.Event) -> None:
    """A client blocked past round_timeout is a Timeout failure naming it; the run goes on."""
    strategy = Recording(
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]),
        on_fit_config_fn=lambda server_round: {"block_pid": 1},
    )
    history = run(strategy, config=ServerConfig(num_rounds=1, round_timeout=0.2))
    [(results, failures)] = strategy.rounds
    assert len(results) == 3
    [timeout] = failures
    assert isinstance(timeout, Timeout)
    assert "virtual client 1: fit ran longer than 0.2 s" in str(timeout)
    assert len(history.losses_distributed) == 1


def test_serialize_sends_every_message_through_the_wire_codec() -> None:
    """serialize=True gives the wire's float32 losses; the model itself is unchanged."""

    class Loss(Toy):
        def evaluate(self, parameters: list[Any], config: dict[str, Any]) -> Any:
            return 0.1, 1, {}

    def loss_fn(context: Context) -> Client:
        return Loss(context).to_client()

    plain = run(client_fn=loss_fn)
    wired = run(client_fn=loss_fn, serialize=True)
    assert plain.losses_distributed == [(1, 0.1), (2, 0.1)]
    assert wired.losses_distributed == [(r, float(np.float32(0.1))) for r in (1, 2)]


def test_legacy_client_fn_gets_the_partition_id_as_cid() -> None:
    """A Flower client_fn(cid: str) receives "0".."n-1", with a DeprecationWarning."""
    seen: list[str] = []

    def legacy(cid: str) -> Client:
        seen.append(cid)
        return Toy(
            Context(node_id=0, node_config={"partition-id": cid}, state=RecordSet(), run_config={})
        ).to_client()

    with pytest.warns(DeprecationWarning, match=r"client_fn\(cid: str\) is deprecated"):
        run(client_fn=legacy, backend="sequential", config=ServerConfig(num_rounds=1))
    assert sorted(seen) == ["0", "0", "1", "1", "2", "2", "3", "3"]  # fit and evaluate


def test_initial_parameters_come_from_a_virtual_client() -> None:
    """Without initial parameters the server asks one virtual client, as over the network."""
    history = run(strategy=FedAvg(), config=ServerConfig(num_rounds=1))
    assert history.losses_distributed == [(1, 4.0)]


def test_too_few_virtual_clients_is_not_enough_clients() -> None:
    """A strategy needing more clients than num_clients fails fast, not after 24 hours."""
    strategy = FedAvg(
        min_fit_clients=5,
        min_available_clients=5,
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]),
    )
    with pytest.raises(NotEnoughClients):
        run(strategy, client_manager=SimpleClientManager(wait_timeout=0.01))


def test_a_backend_instance_is_used_started_and_closed() -> None:
    """backend= takes a Backend instance; the run closes it."""
    backend = ThreadsBackend(2)
    assert run(backend=backend).losses_distributed == [(1, 4.0), (2, 8.0)]
    with pytest.raises(RuntimeError, match="closed"):
        backend.submit(None, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_clients": 0}, "num_clients: expected an int >= 1"),
        ({"num_clients": True}, "num_clients: expected an int >= 1"),
        ({"clients_ids": ["a", "b"]}, "clients_ids: not supported"),
        ({"backend": "gpu"}, "backend: expected one of"),
        ({"client_resources": {"num_cpus": -1}}, r"client_resources\['num_cpus'\]"),
        ({"client_resources": [1]}, "client_resources: expected a dict"),
        ({"actor_type": object}, "actor_type: not supported"),
        ({"actor_kwargs": {"x": 1}}, "actor_kwargs: not supported"),
        ({"actor_scheduling": "RANDOM"}, "actor_scheduling: expected one of"),
        ({"serialize": "yes"}, "serialize: expected a bool"),
        ({"client_fn": lambda a, b: None}, "client_fn: expected a function of one argument"),
        ({"config": {"num_rounds": 3}}, "config: expected a ServerConfig"),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs: dict[str, Any], match: str) -> None:
    """Each invalid argument raises ConfigError naming it, before any client runs."""
    with pytest.raises(ConfigError, match=match):
        run(**kwargs)


def test_ray_init_args_with_an_address_warn_on_a_local_backend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Asking for a Ray cluster with backend='threads' runs locally and logs a warning."""
    with caplog.at_level(logging.WARNING, logger="stamen.simulation"):
        run(ray_init_args={"address": "auto"}, config=ServerConfig(num_rounds=0))
    assert "pass backend='ray'" in caplog.text


def test_the_model_moves_as_fedavg_says() -> None:
    """The final parameters are FedAvg's weighted mean, round after round (sequential)."""
    final: list[Any] = []

    def keep(server_round: int, parameters: list[Any], config: dict[str, Any]) -> None:
        final[:] = parameters

    strategy = FedAvg(
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]),
        evaluate_fn=keep,
    )
    run(strategy, backend=SequentialBackend(), config=ServerConfig(num_rounds=3))
    np.testing.assert_allclose(final[0], [6.0, 6.0])
    assert parameters_to_ndarrays(ndarrays_to_parameters(final))[0].shape == (2,)


def test_sequential_backend_names_the_failing_client_and_stage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On the sequential backend a client's exception is logged with its traceback, then a
    line naming the virtual client and the stage; the round still counts a failure."""
    strategy = Recording(
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]),
        on_fit_config_fn=lambda server_round: {"fail_pid": 2},
    )
    with caplog.at_level(logging.ERROR):
        run(strategy, backend="sequential", config=ServerConfig(num_rounds=1), serialize=True)
    messages = [r.getMessage() for r in caplog.records]
    index = messages.index(
        "virtual client 2 failed in fit: fit raised ValueError: client 2 fails on purpose"
    )
    assert caplog.records[index - 1].exc_info is not None  # dispatch's traceback, just before
    [(_, failures)] = strategy.rounds
    assert len(failures) == 1


def test_a_strategy_needing_more_clients_than_simulated_fails_at_once() -> None:
    """With the default client manager, asking for more clients than num_clients raises
    NotEnoughClients after a short bound, since no virtual client can join later."""
    strategy = FedAvg(min_fit_clients=5, min_available_clients=5)
    with pytest.raises(NotEnoughClients, match="needed 5 connected client"):
        start_simulation(client_fn=toy_fn, num_clients=4, strategy=strategy)
