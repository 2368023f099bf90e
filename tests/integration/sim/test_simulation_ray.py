"""The Ray backend: 1,000 virtual clients on a local Ray instance, same result as threads;
timeouts, client errors and lost workers are failures of the round, as over the network."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import sim_digits

import stamen as fl
from stamen.errors import ConnectionLost, Timeout
from stamen.simulation import start_simulation

# Ray starts a local cluster (about 15 s on a new 2-core machine) before any work.
pytestmark = pytest.mark.timeout(400)

RAY_ARGS = {"ray_init_args": sim_digits.ray_init_args(), "keep_initialised": True}


@pytest.fixture(scope="module", autouse=True)
def _one_ray_instance() -> Iterator[None]:
    """The tests share one local Ray (keep_initialised=True); it is shut down at the end."""
    yield
    import ray

    ray.shutdown()


def _run(**kwargs: Any) -> tuple[fl.server.History, sim_digits.FinalParameters]:
    final = sim_digits.FinalParameters()
    history = start_simulation(
        client_fn=sim_digits.client_fn,
        num_clients=1000,
        config=fl.server.ServerConfig(num_rounds=10),
        strategy=sim_digits.strategy(final, fraction=0.1),
        client_manager=fl.server.SimpleClientManager(seed=3),
        client_resources={"num_cpus": 1},
        **kwargs,
    )
    return history, final


def test_ray_backend_trains_a_thousand_clients_to_the_threads_backends_parameters(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """1,000 clients, 10 rounds, 10 % sampled, each call on a Ray actor holding num_cpus=1
    in a Ray worker process: the final model is bit for bit the threads backend's, and so
    is every round's metrics -- including the per-node state (fit counts) kept across
    rounds."""
    threads_history, threads_final = _run(backend="threads")
    with caplog.at_level(logging.INFO, logger="stamen.simulation"):
        ray_history, ray_final = _run(backend="ray", **RAY_ARGS)
    for got, want in zip(ray_final.parameters, threads_final.parameters, strict=True):
        np.testing.assert_array_equal(got, want)
    assert ray_final.accuracy == threads_final.accuracy
    assert ray_final.accuracy[10] > 0.8
    fits = threads_history.metrics_distributed_fit
    assert ray_history.metrics_distributed_fit["max_fits"] == fits["max_fits"]
    assert ray_history.metrics_distributed_fit["clients"] == [(r, 100) for r in range(1, 11)]
    assert max(v for _, v in fits["max_fits"]) >= 2  # a node's state outlived its rounds
    assert fits["in_driver"] == [(r, 100) for r in range(1, 11)]
    assert ray_history.metrics_distributed_fit["in_driver"] == [(r, 0) for r in range(1, 11)]
    assert ray_history.losses_distributed == threads_history.losses_distributed
    assert "Ray backend: 2 concurrent virtual client(s)" in caplog.text


class _Failures(fl.server.strategy.FedAvg):
    """FedAvg that records every round's failures."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.failures: list[list[Any]] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.failures.append(failures)
        return super().aggregate_fit(server_round, results, failures)


def test_ray_backend_counts_timeouts_errors_and_lost_actors_as_failures() -> None:
    """A hung client times out (its actor is killed and replaced), a raising client is a
    CLIENT_ERROR, a client that exits its process is a lost node; the other clients train
    in every round."""
    strategy = _Failures(
        min_fit_clients=5,
        min_available_clients=5,
        fraction_evaluate=0.0,
        initial_parameters=fl.common.ndarrays_to_parameters([np.zeros(2)]),
    )
    final: list[Any] = []
    strategy.evaluate_fn = lambda server_round, parameters, config: final.append(parameters)  # type: ignore[assignment]
    start_simulation(
        client_fn=sim_digits.faulty_client_fn,
        num_clients=5,
        config=fl.server.ServerConfig(num_rounds=2, round_timeout=2.0),
        strategy=strategy,
        backend="ray",
        **RAY_ARGS,
    )
    for failures in strategy.failures:
        timeouts = [f for f in failures if isinstance(f, Timeout)]
        lost = [f for f in failures if isinstance(f, ConnectionLost)]
        errors = [f for f in failures if isinstance(f, tuple)]
        assert len(failures) == 3
        assert len(timeouts) == 1 and "virtual client 1: fit ran longer than 2 s" in str(
            timeouts[0]
        )
        assert len(lost) == 1 and "virtual client 3, fit: the Ray actor was lost" in str(lost[0])
        assert len(errors) == 1 and errors[0][0].cid == "2"
        assert "fit raised ValueError" in errors[0][1].status.message
    np.testing.assert_array_equal(final[-1][0], [2.0, 2.0])  # clients 0 and 4, twice
