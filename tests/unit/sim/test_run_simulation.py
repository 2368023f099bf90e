"""run_simulation: Flower 1.12's ServerApp/ClientApp call on Stamen's simulation backends."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

import stamen as fl
from stamen.common import Context, Message, MessageType, ndarrays_to_parameters
from stamen.common.recordset_compat import recordset_to_fitres
from stamen.errors import ConfigError, NotEnoughClients
from stamen.server import ServerAppComponents, ServerConfig
from stamen.server.strategy import FedAvg
from stamen.simulation import apps, start_simulation


class Toy(fl.client.NumPyClient):
    """Adds (partition id + 1) to the model; evaluate's loss is the model's sum."""

    def __init__(self, k: float) -> None:
        self.k = k

    def fit(self, parameters: Any, config: Any) -> Any:
        return [p + self.k for p in parameters], int(self.k), {}

    def evaluate(self, parameters: Any, config: Any) -> Any:
        return float(parameters[0].sum()), int(self.k), {}


contexts: list[Context] = []


def client_fn(context: Context) -> fl.client.Client:
    contexts.append(context)
    return Toy(float(context.node_config["partition-id"]) + 1).to_client()


def server_fn(context: Context) -> ServerAppComponents:
    strategy = FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(2, dtype=np.float32)]))
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=2))


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray may be installed; these tests run on the in-process backend (Ray "missing")."""
    real = apps.importlib.util.find_spec
    monkeypatch.setattr(
        apps.importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )


def test_run_simulation_gives_flowers_contexts_and_the_start_simulation_result() -> None:
    """Nodes get int partition-id / num-partitions (Flower's run_simulation), run_config
    {}; server_fn gets node 0; the History equals start_simulation's for the same run."""
    contexts.clear()
    server_contexts: list[Context] = []

    def recording_server_fn(context: Context) -> ServerAppComponents:
        server_contexts.append(context)
        return server_fn(context)

    history = fl.simulation.run_simulation(
        server_app=fl.server.ServerApp(server_fn=recording_server_fn),
        client_app=fl.client.ClientApp(client_fn=client_fn),
        num_supernodes=3,
    )
    configs = {tuple(sorted(c.node_config.items())) for c in contexts}
    assert configs == {(("num-partitions", 3), ("partition-id", i)) for i in range(3)}
    for context in contexts:
        assert type(context.node_config["partition-id"]) is int
        assert context.run_config == {}
    assert [(c.node_id, c.node_config, c.run_config) for c in server_contexts] == [(0, {}, {})]
    components = server_fn(server_contexts[0])
    expected = start_simulation(
        client_fn=client_fn, num_clients=3, strategy=components.strategy, config=components.config
    )
    assert history.losses_distributed == expected.losses_distributed
    # Weighted mean of +1, +2, +3 by 1, 2, 3: +14/6 per round; the loss sums 2 entries.
    assert history.losses_distributed[-1][1] == pytest.approx(2 * 2 * 14 / 6, rel=1e-6)


def test_server_app_with_components_and_a_mod_that_clips() -> None:
    """ServerApp(config=, strategy=) and a ClientApp mod clipping fit results to [0, 1]:
    the aggregated model is the clipped one."""

    def clip_mod(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN:
            record = reply.content.parameters_records["fitres.parameters"]
            for name, array in list(record.items()):
                record[name] = fl.common.array_from_numpy(np.clip(array.numpy(), 0.0, 1.0))
            assert recordset_to_fitres(reply.content, keep_input=True).num_examples > 0
        return reply

    strategy = FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(2, dtype=np.float32)]))
    history = fl.simulation.run_simulation(
        server_app=fl.server.ServerApp(config=ServerConfig(num_rounds=2), strategy=strategy),
        client_app=fl.client.ClientApp(client_fn=client_fn, mods=[clip_mod]),
        num_supernodes=2,
        backend_name="sequential",
    )
    # Every client's update clipped to 1: the model is [1, 1] after each round.
    assert [loss for _, loss in history.losses_distributed] == [2.0, 2.0]


def test_stateful_client_keeps_state_per_node_across_rounds() -> None:
    """Flower's stateful-client pattern in a simulation: a MetricsRecord counter per node."""
    counts: list[tuple[int, int]] = []

    class Counting(fl.client.NumPyClient):
        def __init__(self, context: Context) -> None:
            self.state = context.state
            self.pid = int(context.node_config["partition-id"])

        def fit(self, parameters: Any, config: Any) -> Any:
            if "counter" not in self.state.metrics_records:
                self.state.metrics_records["counter"] = fl.common.MetricsRecord({"n": 0})
            record = self.state.metrics_records["counter"]
            record["n"] = int(record["n"]) + 1
            counts.append((self.pid, int(record["n"])))
            return parameters, 1, {}

    fl.simulation.run_simulation(
        server_app=fl.server.ServerApp(server_fn=server_fn),
        client_app=fl.client.ClientApp(client_fn=lambda c: Counting(c).to_client()),
        num_supernodes=2,
        backend_name="threads",
    )
    assert sorted(counts) == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_backend_names_map_to_stamen_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "ray" is Stamen's Ray backend when Ray is installed, else the default backend;
    Stamen's own names pass through; anything else is a ConfigError."""
    assert apps.backend_for("ray") == apps.DEFAULT_BACKEND
    assert apps.backend_for("sequential") == "sequential"
    assert apps.backend_for("threads") == "threads"
    monkeypatch.setattr(apps.importlib.util, "find_spec", lambda name, *a: object())
    assert apps.backend_for("ray") == "ray"
    with pytest.raises(ConfigError, match=r"backend_name: expected one of .* received 'gpu'"):
        apps.backend_for("gpu")


def test_backend_config_is_split_into_resources_and_init_args() -> None:
    """client_resources (default Flower's num_cpus 2) and init_args; a non-dict fails."""
    assert apps._split_backend_config(None) == ({"num_cpus": 2, "num_gpus": 0.0}, None)
    resources, init_args = apps._split_backend_config(
        {"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 4}, "actor": {}}
    )
    assert (resources, init_args) == ({"num_cpus": 1}, {"num_cpus": 4})
    with pytest.raises(ConfigError, match="backend_config: expected a dict"):
        apps._split_backend_config([1])


def test_run_simulation_checks_its_apps() -> None:
    """Wrong app types are ConfigErrors naming what was received; too few nodes fail."""
    client_app = fl.client.ClientApp(client_fn=client_fn)
    server_app = fl.server.ServerApp(server_fn=server_fn)
    with pytest.raises(ConfigError, match="server_app: expected a ServerApp, received FedAvg"):
        fl.simulation.run_simulation(FedAvg(), client_app, 2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="wrap it"):
        fl.simulation.run_simulation(server_app, Toy(1.0), 2)  # type: ignore[arg-type]
    with pytest.raises(NotEnoughClients):
        fl.simulation.run_simulation(server_app, client_app, 1)


def test_verbose_logging_is_debug_during_the_run_only(caplog: pytest.LogCaptureFixture) -> None:
    """verbose_logging=True: Stamen's DEBUG records during the run; the level is restored."""
    logger = logging.getLogger("stamen")
    before = logger.level
    with caplog.at_level(logging.DEBUG):
        logger.setLevel(logging.WARNING)
        fl.simulation.run_simulation(
            fl.server.ServerApp(server_fn=server_fn),
            fl.client.ClientApp(client_fn=client_fn),
            2,
            verbose_logging=True,
        )
        assert logger.level == logging.WARNING
    logger.setLevel(before)
    assert any(r.levelno == logging.INFO and r.name.startswith("stamen") for r in caplog.records)
