"""The demo behind ``stamen demo``: federated softmax regression on scikit-learn's digits.

One process runs a real server on ``127.0.0.1`` (a free port) and ``num_clients`` client
nodes as threads, each connected over grpc-bidi with :func:`stamen.client.start_client`.
The 8x8 digits (:func:`sklearn.datasets.load_digits`, bundled with scikit-learn, no
download) are split into a stratified centralized test set (20 %) and training data that
is spread over the clients non-IID: for every class, the shares of the clients are drawn
from a Dirichlet distribution (``alpha=0.5``), so each client sees a few classes often and
others rarely or never. Each client keeps 20 % of its share for local evaluation.

The model is multinomial logistic (softmax) regression written in NumPy: weights
``W`` (64x10) and bias ``b`` (10), trained locally by mini-batch gradient descent on the
cross-entropy loss and averaged by FedAvg. The run is deterministic given ``seed``.

This module prints nothing and exits nowhere: :func:`run_demo` reports through callbacks
and returns a :class:`DemoResult`; :mod:`stamen.cli` does the talking.

It is longer than the usual 400 lines on purpose: data, model, client and run of one
federated program, readable top to bottom in one file, like an example.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .client import Client, NumPyClient, start_client
from .context import Context
from .errors import ConfigError, NotEnoughClients, RunError
from .messages import Parameters
from .ndarrays import ndarrays_to_parameters
from .net.limits import GRPC_MAX_MESSAGE_LENGTH
from .server.app import run_server
from .server.client_manager import SimpleClientManager
from .server.client_proxy import ClientProxy
from .server.fleet.service import FleetService
from .server.history import History
from .server.server import Server, ServerConfig
from .server.strategy import FedAvg
from .server.strategy.strategy import (
    EvaluateFailures,
    EvaluateResults,
    FitFailures,
    FitResults,
)
from .typing import Config, Metrics, NDArrays, Scalar

__all__ = [
    "CLIENT_LIMIT",
    "DemoResult",
    "DemoStarted",
    "DigitsClient",
    "DigitsSplit",
    "Partition",
    "RoundProgress",
    "evaluate_model",
    "initial_parameters",
    "load_digits_split",
    "run_demo",
    "train_model",
    "weighted_average",
]

_NUM_FEATURES = 64
_NUM_CLASSES = 10
CLIENT_LIMIT = 100
_MIN_CLIENT_EXAMPLES = 10
_TEST_FRACTION = 0.2
_LOCAL_VAL_FRACTION = 0.2
_FIT_CONFIG: Config = {"local_epochs": 5, "lr": 1.0, "batch_size": 16}
"""Sent to every client with each FitIns (plus ``server_round``)."""

_FloatArray = npt.NDArray[np.float64]
_IntArray = npt.NDArray[np.intp]


# --- data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Partition:
    """The data of one client node: local training and local validation examples."""

    x_train: _FloatArray
    y_train: _IntArray
    x_val: _FloatArray
    y_val: _IntArray


@dataclass(frozen=True)
class DigitsSplit:
    """The digits, split into one :class:`Partition` per client and a centralized test set."""

    partitions: list[Partition]
    x_test: _FloatArray
    y_test: _IntArray


def _stratified_split(
    labels: _IntArray, fraction: float, rng: np.random.Generator
) -> tuple[_IntArray, _IntArray]:
    """Indices ``(rest, held_out)`` with ``fraction`` of every class held out."""
    held_out = [
        rng.permutation(np.flatnonzero(labels == cls))[: round(np.sum(labels == cls) * fraction)]
        for cls in np.unique(labels)
    ]
    held = np.sort(np.concatenate(held_out)).astype(np.intp)
    keep = np.ones(len(labels), dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep).astype(np.intp), held


def _dirichlet_partition(
    labels: _IntArray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[_IntArray]:
    """Spread indices over clients, each class by Dirichlet(``alpha``) shares.

    A client left with fewer than ``_MIN_CLIENT_EXAMPLES`` takes examples from the largest
    one, so every client can train and evaluate.
    """
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.intp)
        for shard, chunk in zip(shards, np.split(members, cuts), strict=True):
            shard.extend(int(i) for i in chunk)
    for shard in shards:
        while len(shard) < _MIN_CLIENT_EXAMPLES:
            donor = max(shards, key=len)  # holds more than the minimum while one is short
            shard.append(donor.pop())
    return [np.sort(np.array(shard, dtype=np.intp)) for shard in shards]


def load_digits_split(num_clients: int, *, seed: int, alpha: float = 0.5) -> DigitsSplit:
    """Load the digits, scale features to [0, 1] and split them non-IID over clients.

    Args:
        num_clients: Number of client partitions (1..``CLIENT_LIMIT``).
        seed: Seed of every random choice (test split, partition, local split).
        alpha: Dirichlet concentration; smaller is more skewed.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ImportError(
            "the demo needs scikit-learn: pip install 'stamen[demo]' (or scikit-learn)"
        ) from exc
    images, targets = load_digits(return_X_y=True)
    features: _FloatArray = np.asarray(images, dtype=np.float64) / 16.0
    labels: _IntArray = np.asarray(targets, dtype=np.intp)
    rng = np.random.default_rng(seed)
    train, test = _stratified_split(labels, _TEST_FRACTION, rng)
    partitions = []
    for shard in _dirichlet_partition(labels[train], num_clients, alpha, rng):
        indices = train[rng.permutation(shard)]
        num_val = max(1, round(len(indices) * _LOCAL_VAL_FRACTION))
        val, fit = np.sort(indices[:num_val]), np.sort(indices[num_val:])
        partitions.append(Partition(features[fit], labels[fit], features[val], labels[val]))
    return DigitsSplit(partitions, features[test], labels[test])


# --- model -------------------------------------------------------------------------------


def initial_parameters() -> NDArrays:
    """``[W, b]`` of zeros: the loss is convex, so no random start is needed."""
    return [np.zeros((_NUM_FEATURES, _NUM_CLASSES)), np.zeros(_NUM_CLASSES)]


def _unpack(parameters: NDArrays) -> tuple[_FloatArray, _FloatArray]:
    shapes = [np.shape(p) for p in parameters]
    if shapes != [(_NUM_FEATURES, _NUM_CLASSES), (_NUM_CLASSES,)]:
        raise ValueError(
            f"parameters: expected shapes [({_NUM_FEATURES}, {_NUM_CLASSES}), ({_NUM_CLASSES},)], "
            f"received {shapes}"
        )
    return np.array(parameters[0], dtype=np.float64), np.array(parameters[1], dtype=np.float64)


def _log_softmax(logits: _FloatArray) -> _FloatArray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    result: _FloatArray = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return result


def evaluate_model(parameters: NDArrays, x: _FloatArray, y: _IntArray) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``parameters`` on ``(x, y)``."""
    weights, bias = _unpack(parameters)
    log_p = _log_softmax(x @ weights + bias)
    loss = float(-log_p[np.arange(len(y)), y].mean())
    accuracy = float(np.mean(log_p.argmax(axis=1) == y))
    return loss, accuracy


def train_model(
    parameters: NDArrays,
    x: _FloatArray,
    y: _IntArray,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    rng: np.random.Generator,
) -> NDArrays:
    """Mini-batch gradient descent on the cross-entropy loss; returns new ``[W, b]``.

    The gradient of the mean loss over a batch is ``X^T (P - Y) / m`` for ``W`` and the
    column means of ``P - Y`` for ``b`` (``P`` the softmax, ``Y`` the one-hot labels).
    """
    weights, bias = _unpack(parameters)
    one_hot = np.eye(_NUM_CLASSES)[y]
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            error = np.exp(_log_softmax(x[batch] @ weights + bias)) - one_hot[batch]
            error /= len(batch)
            weights -= lr * (x[batch].T @ error)
            bias -= lr * error.sum(axis=0)
    return [weights, bias]


# --- client ------------------------------------------------------------------------------


def _positive(config: Config, key: str) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"fit config {key!r}: expected a number > 0, received {value!r}")
    return float(value)


class DigitsClient(NumPyClient):
    """A client node holding one :class:`Partition` of the digits.

    Args:
        partition: The node's data.
        partition_id: Index of the partition; seeds the node's mini-batch order.
        seed: Seed of the run.
    """

    def __init__(self, partition: Partition, *, partition_id: int, seed: int) -> None:
        self.partition = partition
        self.partition_id = partition_id
        self.seed = seed

    def get_parameters(self, config: Config) -> NDArrays:
        """The initial model (the node keeps no model between rounds)."""
        return initial_parameters()

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train on the local data with ``local_epochs``, ``lr`` and ``batch_size``."""
        server_round = int(_positive(config, "server_round"))
        rng = np.random.default_rng([self.seed, self.partition_id, server_round])
        data = self.partition
        trained = train_model(
            parameters,
            data.x_train,
            data.y_train,
            epochs=int(_positive(config, "local_epochs")),
            lr=_positive(config, "lr"),
            batch_size=int(_positive(config, "batch_size")),
            rng=rng,
        )
        train_loss, _ = evaluate_model(trained, data.x_train, data.y_train)
        return trained, len(data.y_train), {"train_loss": train_loss}

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Loss and accuracy on the local validation data."""
        loss, accuracy = evaluate_model(parameters, self.partition.x_val, self.partition.y_val)
        return loss, len(self.partition.y_val), {"accuracy": accuracy}


def weighted_average(metrics: list[tuple[int, Metrics]]) -> Metrics:
    """Average every numeric metric that all clients report, weighted by examples.

    Summed with :func:`math.fsum`, so the result does not depend on the clients' order.
    """
    total = sum(n for n, _ in metrics)
    if not metrics or total <= 0:
        return {}
    keys = set.intersection(*(set(m) for _, m in metrics))
    averaged: Metrics = {}
    for key in sorted(keys):
        weighted: list[float] = []
        for n, m in metrics:
            value = m[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                break
            weighted.append(n * float(value))
        else:
            averaged[key] = math.fsum(weighted) / total
    return averaged


# --- run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoStarted:
    """Reported once the server listens, before the client nodes start."""

    address: str
    num_clients: int
    num_rounds: int
    alpha: float
    train_sizes: list[int]
    test_size: int


@dataclass(frozen=True)
class RoundProgress:
    """Measurements of one finished round (round 0: the initial model, centralized only)."""

    server_round: int
    num_rounds: int
    train_loss: float | None
    distributed_loss: float | None
    distributed_accuracy: float | None
    centralized_loss: float | None
    centralized_accuracy: float | None


@dataclass(frozen=True)
class DemoResult:
    """The outcome of :func:`run_demo`."""

    history: History
    final_accuracy: float
    elapsed: float
    history_path: Path | None


def _number(metrics: dict[str, Scalar], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _final_accuracy(history: History, num_rounds: int) -> float:
    for server_round, value in history.metrics_centralized.get("accuracy", []):
        if server_round == num_rounds and isinstance(value, int | float):
            return float(value)
    raise RunError(f"the history has no centralized accuracy of round {num_rounds}")


class _DemoFedAvg(FedAvg):
    """FedAvg that aggregates results in a fixed order and reports every round.

    The server hands results over in the order they arrive, which varies from run to run;
    sorting them first makes the floating-point sums, and so the run, reproducible.
    """

    def __init__(
        self,
        *,
        num_rounds: int,
        on_round: Callable[[RoundProgress], None] | None,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self._on_round = on_round
        self._num_rounds = num_rounds
        self._train_loss: dict[int, float | None] = {}
        self._centralized: dict[int, tuple[float, dict[str, Scalar]]] = {}

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """FedAvg's aggregation over the results sorted by content."""
        ordered = sorted(
            results, key=lambda r: (r[1].num_examples, [bytes(t) for t in r[1].parameters.tensors])
        )
        parameters, metrics = super().aggregate_fit(server_round, ordered, failures)
        self._train_loss[server_round] = _number(metrics, "train_loss")
        return parameters, metrics

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Centralized evaluation; round 0 is reported at once."""
        result = super().evaluate(server_round, parameters)
        if result is not None:
            self._centralized[server_round] = result
        if server_round == 0:
            self._report(0, None, {})
        return result

    def aggregate_evaluate(
        self, server_round: int, results: EvaluateResults, failures: EvaluateFailures
    ) -> tuple[float | None, dict[str, Scalar]]:
        """FedAvg's aggregation over the results sorted by content; reports the round."""
        ordered = sorted(results, key=lambda r: (r[1].num_examples, r[1].loss))
        loss, metrics = super().aggregate_evaluate(server_round, ordered, failures)
        self._report(server_round, loss, metrics)
        return loss, metrics

    def _report(self, server_round: int, loss: float | None, metrics: dict[str, Scalar]) -> None:
        if self._on_round is None:
            return
        central_loss, central_metrics = self._centralized.get(server_round, (None, {}))
        self._on_round(
            RoundProgress(
                server_round=server_round,
                num_rounds=self._num_rounds,
                train_loss=self._train_loss.get(server_round),
                distributed_loss=loss,
                distributed_accuracy=_number(metrics, "accuracy"),
                centralized_loss=central_loss,
                centralized_accuracy=_number(central_metrics, "accuracy"),
            )
        )


def _check_arguments(
    num_clients: int, num_rounds: int, seed: int, alpha: float, timeout: float
) -> None:
    for name, value, low in (("num_clients", num_clients, 1), ("num_rounds", num_rounds, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}: expected an int >= {low}, received {value!r}")
    if num_clients > CLIENT_LIMIT:
        raise ConfigError(f"num_clients: expected at most {CLIENT_LIMIT}, received {num_clients}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed: expected an int >= 0, received {seed!r}")
    for name, number in (("alpha", alpha), ("timeout", timeout)):
        if isinstance(number, bool) or not isinstance(number, int | float) or not number > 0:
            raise ConfigError(f"{name}: expected a number > 0, received {number!r}")


def run_demo(
    *,
    num_clients: int = 10,
    num_rounds: int = 10,
    seed: int = 0,
    alpha: float = 0.5,
    history_path: str | Path | None = "demo-history.json",
    on_start: Callable[[DemoStarted], None] | None = None,
    on_round: Callable[[RoundProgress], None] | None = None,
    host: str = "127.0.0.1",
    timeout: float = 60.0,
) -> DemoResult:
    """Serve on ``host`` (a free port), run ``num_clients`` nodes as threads, train FedAvg.

    Args:
        num_clients: Client nodes (1..``CLIENT_LIMIT``), one data partition each.
        num_rounds: Rounds of FedAvg (0 evaluates the initial model only).
        seed: Seed of the data split and of the clients' mini-batch order.
        alpha: Dirichlet concentration of the non-IID split.
        history_path: Where to write the History as JSON; None writes nothing.
        on_start: Called with a :class:`DemoStarted` once the server listens.
        on_round: Called with a :class:`RoundProgress` after round 0 and each round.
        host: Address of the server's listener.
        timeout: Bound, in seconds, of waiting for the clients to connect, of each
            instruction of a round, and of stopping the client nodes.

    Returns:
        The :class:`DemoResult`: History, final centralized accuracy, elapsed seconds.

    Raises:
        ConfigError: an invalid argument, or ``history_path`` is in a missing directory.
        ImportError: scikit-learn is not installed.
        NotEnoughClients: the nodes did not all connect within ``timeout``.
        RunError: a client node failed or did not stop.
        OSError: the history could not be written.
    """
    _check_arguments(num_clients, num_rounds, seed, alpha, timeout)
    path = None if history_path is None else Path(history_path)
    if path is not None and not path.parent.is_dir():
        raise ConfigError(f"history_path: directory {str(path.parent)!r} does not exist")
    started = time.monotonic()
    split = load_digits_split(num_clients, seed=seed, alpha=alpha)

    def evaluate_fn(
        server_round: int, parameters: NDArrays, config: Config
    ) -> tuple[float, dict[str, Scalar]]:
        loss, accuracy = evaluate_model(parameters, split.x_test, split.y_test)
        return loss, {"accuracy": accuracy}

    strategy = _DemoFedAvg(
        num_rounds=num_rounds,
        on_round=on_round,
        min_fit_clients=num_clients,
        min_evaluate_clients=num_clients,
        min_available_clients=num_clients,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda server_round: {**_FIT_CONFIG, "server_round": server_round},
        initial_parameters=ndarrays_to_parameters(initial_parameters()),
        fit_metrics_aggregation_fn=weighted_average,
        evaluate_metrics_aggregation_fn=weighted_average,
    )
    history = _run_federation(
        split,
        strategy,
        ServerConfig(num_rounds=num_rounds, round_timeout=timeout),
        seed=seed,
        host=host,
        timeout=timeout,
        on_start=on_start,
        alpha=alpha,
    )
    if path is not None:
        path.write_text(history.to_json() + "\n", encoding="utf-8")
    return DemoResult(
        history=history,
        final_accuracy=_final_accuracy(history, num_rounds),
        elapsed=time.monotonic() - started,
        history_path=path,
    )


def _run_federation(
    split: DigitsSplit,
    strategy: FedAvg,
    config: ServerConfig,
    *,
    seed: int,
    host: str,
    timeout: float,
    on_start: Callable[[DemoStarted], None] | None,
    alpha: float,
) -> History:
    """Start the listener and one node per partition; run the rounds; stop everything.

    The pieces of :func:`stamen.server.start_server`, but on port 0 and with the nodes
    started once the port is known. Every wait is bounded by ``timeout``.
    """
    num_clients = len(split.partitions)
    client_manager = _WatchedClientManager(wait_timeout=timeout, seed=seed)
    server = Server(client_manager=client_manager, strategy=strategy)
    service = FleetService(
        client_manager, address=f"{host}:0", max_message_length=GRPC_MAX_MESSAGE_LENGTH
    )
    address = f"{host}:{service.start()}"
    nodes = [
        _Node(address, partition, i, seed, on_failure=client_manager.node_failed)
        for i, partition in enumerate(split.partitions)
    ]
    history: History | None = None
    failure: Exception | None = None
    try:
        if on_start is not None:
            on_start(
                DemoStarted(
                    address=address,
                    num_clients=num_clients,
                    num_rounds=config.num_rounds,
                    alpha=alpha,
                    train_sizes=[len(p.y_train) for p in split.partitions],
                    test_size=len(split.y_test),
                )
            )
        for node in nodes:
            node.thread.start()
        # Wait for every node first: with 0 rounds no round would wait for them.
        if not client_manager.wait_for(num_clients, timeout):
            raise NotEnoughClients(
                f"{client_manager.num_available()} of {num_clients} client nodes connected "
                f"within {timeout:g} s"
            )
        history = run_server(server, config)
    except Exception as exc:  # raised below, together with what the nodes report
        failure = exc
    finally:
        service.stop()
        problems = _join_nodes(nodes, time.monotonic() + timeout)
    if problems:
        prefix = "" if failure is None else f"{type(failure).__name__}: {failure}; "
        raise RunError(f"{prefix}client node(s) failed: " + "; ".join(problems)) from failure
    if failure is not None:
        raise failure
    assert history is not None  # no failure means run_server returned
    return history


class _WatchedClientManager(SimpleClientManager):
    """A SimpleClientManager whose waits also end as soon as a client node thread fails.

    Without this, a node that cannot connect would keep the demo waiting ``wait_timeout``
    seconds for a client that will never come.
    """

    def __init__(self, *, wait_timeout: float, seed: int) -> None:
        super().__init__(wait_timeout=wait_timeout, seed=seed)
        self._changed = threading.Condition()
        self._failed = False

    def register(self, client: ClientProxy) -> bool:
        """Register ``client`` and wake the waits."""
        registered = super().register(client)
        with self._changed:
            self._changed.notify_all()
        return registered

    def node_failed(self) -> None:
        """Called by a node thread that ended with an error: waits give up."""
        with self._changed:
            self._failed = True
            self._changed.notify_all()

    def wait_for(self, num_clients: int, timeout: float | None = None) -> bool:
        """Wait until ``num_clients`` are connected; False on timeout or a failed node."""
        bound = self.wait_timeout if timeout is None else timeout
        with self._changed:
            self._changed.wait_for(
                lambda: self._failed or self.num_available() >= num_clients, bound
            )
        return self.num_available() >= num_clients


class _Node:
    """One client node on its own thread; keeps the error that ended it, if any."""

    def __init__(
        self,
        address: str,
        partition: Partition,
        partition_id: int,
        seed: int,
        *,
        on_failure: Callable[[], None],
    ) -> None:
        self.address = address
        self.error: BaseException | None = None
        self._on_failure = on_failure

        def client_fn(context: Context) -> Client:
            return DigitsClient(partition, partition_id=partition_id, seed=seed).to_client()

        self.client_fn = client_fn
        self.thread = threading.Thread(
            target=self._serve, name=f"stamen-demo-client-{partition_id}", daemon=True
        )

    def _serve(self) -> None:
        try:
            # Bounded reconnection: once the server is gone the demo is over.
            start_client(
                server_address=self.address,
                client_fn=self.client_fn,
                insecure=True,
                max_retries=2,
                max_wait_time=5.0,
            )
        except BaseException as exc:  # reported by _run_federation after the join
            self.error = exc
            self._on_failure()


def _join_nodes(nodes: list[_Node], deadline: float) -> list[str]:
    """Join the started nodes by ``deadline``; describe those that failed or still run."""
    problems = []
    for node in nodes:
        if node.thread.ident is None:
            continue  # never started
        node.thread.join(max(0.0, deadline - time.monotonic()))
        if node.thread.is_alive():
            problems.append(f"{node.thread.name} did not stop")
        elif node.error is not None:
            problems.append(f"{node.thread.name}: {type(node.error).__name__}: {node.error}")
    return problems
