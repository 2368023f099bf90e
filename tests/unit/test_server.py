"""Server side without a network: client manager, FedAvg, aggregation, History, round loop."""

from __future__ import annotations

import gc
import inspect
import json
import logging
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from stamen import memory
from stamen.client import Client, NumPyClient
from stamen.client.dispatch import handle
from stamen.context import Context, RecordSet
from stamen.errors import (
    ConfigError,
    ConnectionLost,
    DecodeError,
    NotEnoughClients,
    RunError,
)
from stamen.messages import (
    Code,
    DisconnectRes,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Instruction,
    Parameters,
    ReconnectIns,
    Reply,
    Status,
)
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.server import ClientProxy, History, Server, ServerConfig, SimpleClientManager
from stamen.server.client_manager import Criterion
from stamen.server.server import run_instructions
from stamen.server.strategy import FedAvg, aggregate, weighted_loss_avg

OK = Status(code=Code.OK, message="")


class FakeProxy(ClientProxy):
    """A ClientProxy whose submit() runs the client in-process and returns a done Future."""

    def __init__(
        self, cid: str, client: Client | None = None, error: BaseException | None = None
    ) -> None:
        super().__init__(cid)
        self.client = client
        self.error = error
        self.received: list[Instruction] = []
        self.context = Context(node_id=-1, node_config={}, state=RecordSet(), run_config={})

    def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        self.received.append(ins)
        future: Future[Reply] = Future()
        if self.error is not None:
            future.set_exception(self.error)
        elif isinstance(ins, ReconnectIns):
            future.set_result(DisconnectRes(reason="ACK"))
        else:
            client = self.client
            assert client is not None
            future.set_result(handle(lambda context: client, self.context, ins))
        return future


class Shift(NumPyClient):
    """Trains by adding ``delta``; evaluates to ``loss``; holds ``n`` examples."""

    def __init__(self, delta: float, n: int, loss: float, fail: bool = False) -> None:
        self.delta, self.n, self.loss, self.fail = delta, n, loss, fail

    def get_parameters(self, config: Any) -> list[np.ndarray]:
        return [np.full(2, 10.0)]

    def fit(self, parameters: Any, config: Any) -> Any:
        if self.fail:
            raise RuntimeError("fit failed on purpose")
        return [p + self.delta for p in parameters], self.n, {"n": self.n}

    def evaluate(self, parameters: Any, config: Any) -> Any:
        if self.fail:
            raise RuntimeError("evaluate failed on purpose")
        return self.loss, self.n, {"acc": self.loss}


def _manager(*proxies: ClientProxy, seed: int = 0) -> SimpleClientManager:
    manager = SimpleClientManager(wait_timeout=0.05, seed=seed)
    for proxy in proxies:
        assert manager.register(proxy)
    return manager


# --- SimpleClientManager -------------------------------------------------------------------


def test_register_unregister_all() -> None:
    """register adds once per cid; unregister removes (absent is fine); all() is a snapshot."""
    a, b = FakeProxy("a"), FakeProxy("b")
    manager = SimpleClientManager(wait_timeout=0.05)
    assert manager.register(a) is True
    assert manager.register(b) is True
    assert manager.register(FakeProxy("a")) is False
    assert manager.num_available() == len(manager) == 2
    snapshot = manager.all()
    assert snapshot == {"a": a, "b": b}
    manager.unregister(a)
    manager.unregister(a)
    assert manager.all() == {"b": b}
    assert snapshot == {"a": a, "b": b}  # the snapshot did not change


def test_unregister_of_a_replaced_proxy_keeps_the_new_one() -> None:
    """Unregistering a stale proxy object does not remove a different one with its cid."""
    manager = SimpleClientManager(wait_timeout=0.05)
    old = FakeProxy("x")
    manager.register(old)
    manager.unregister(old)
    new = FakeProxy("x")
    manager.register(new)
    manager.unregister(old)
    assert manager.all() == {"x": new}


def test_sample_is_reproducible_with_a_seed_and_distinct() -> None:
    """sample() with a seeded manager picks the same distinct clients every time."""
    proxies = [FakeProxy(f"c{i}") for i in range(10)]
    picks = [[p.cid for p in _manager(*proxies, seed=5).sample(4)] for _ in range(2)]
    assert picks[0] == picks[1]
    assert len(set(picks[0])) == 4
    other = {tuple(p.cid for p in _manager(*proxies, seed=s).sample(4)) for s in range(10)}
    assert len(other) > 1  # the seed matters


def test_sample_with_a_criterion() -> None:
    """Only clients the criterion accepts are sampled."""

    class EvenOnly(Criterion):
        def select(self, client: ClientProxy) -> bool:
            return int(client.cid[1:]) % 2 == 0

    manager = _manager(*[FakeProxy(f"c{i}") for i in range(10)])
    picked = manager.sample(3, criterion=EvenOnly())
    assert len(picked) == 3
    assert all(int(p.cid[1:]) % 2 == 0 for p in picked)


def test_wait_for_is_bounded() -> None:
    """wait_for returns True at once when enough are connected, False after the timeout."""
    manager = _manager(FakeProxy("a"))
    assert manager.wait_for(1, timeout=0.05) is True
    assert manager.wait_for(3, timeout=0.05) is False


def test_sample_raises_not_enough_clients_after_wait_timeout() -> None:
    """Too few clients within wait_timeout: NotEnoughClients naming needed and had."""
    manager = _manager(FakeProxy("a"), FakeProxy("b"))
    with pytest.raises(NotEnoughClients) as info:
        manager.sample(5)
    assert isinstance(info.value, RunError)
    assert isinstance(info.value, TimeoutError)
    assert "5" in str(info.value)
    assert "2" in str(info.value)
    with pytest.raises(NotEnoughClients):
        manager.sample(1, min_num_clients=3)


@pytest.mark.parametrize("wait_timeout", [0, -1, "5", True, float("nan")])
def test_wait_timeout_is_validated(wait_timeout: Any) -> None:
    """wait_timeout must be a number > 0."""
    with pytest.raises(ConfigError, match="wait_timeout"):
        SimpleClientManager(wait_timeout=wait_timeout)


# --- FedAvg --------------------------------------------------------------------------------

FLOWER_FEDAVG_DEFAULTS = {
    "fraction_fit": 1.0,
    "fraction_evaluate": 1.0,
    "min_fit_clients": 2,
    "min_evaluate_clients": 2,
    "min_available_clients": 2,
    "evaluate_fn": None,
    "on_fit_config_fn": None,
    "on_evaluate_config_fn": None,
    "accept_failures": True,
    "initial_parameters": None,
    "fit_metrics_aggregation_fn": None,
    "evaluate_metrics_aggregation_fn": None,
    "inplace": True,
}


def test_fedavg_defaults_equal_flowers() -> None:
    """FedAvg's keyword-only parameters and defaults are Flower 1.12's, and are kept."""
    params = dict(inspect.signature(FedAvg.__init__).parameters)
    params.pop("self")
    assert {n: p.default for n, p in params.items()} == FLOWER_FEDAVG_DEFAULTS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    strategy = FedAvg()
    for name, value in FLOWER_FEDAVG_DEFAULTS.items():
        assert getattr(strategy, name) == value, name


@pytest.mark.parametrize(
    ("available", "fraction", "minimum", "expected"),
    [
        (10, 1.0, 2, 10),
        (10, 0.1, 2, 2),
        (10, 0.35, 2, 3),
        (0, 1.0, 2, 2),
        (7, 0.5, 0, 3),
        (3, 0.0, 1, 1),
    ],
)
def test_sample_sizes(available: int, fraction: float, minimum: int, expected: int) -> None:
    """Sample size is max(int(available * fraction), min_clients), as in Flower."""
    fit = FedAvg(fraction_fit=fraction, min_fit_clients=minimum, min_available_clients=5)
    assert fit.num_fit_clients(available) == (expected, 5)
    ev = FedAvg(fraction_evaluate=fraction, min_evaluate_clients=minimum, min_available_clients=5)
    assert ev.num_evaluation_clients(available) == (expected, 5)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"fraction_fit": 1.5}, "fraction_fit"),
        ({"fraction_evaluate": -0.1}, "fraction_evaluate"),
        ({"min_fit_clients": -1}, "min_fit_clients"),
        ({"min_available_clients": 2.0}, "min_available_clients"),
        ({"initial_parameters": [np.ones(2)]}, "initial_parameters"),
    ],
    ids=repr,
)
def test_fedavg_validates_arguments(kwargs: dict[str, Any], field: str) -> None:
    """Bad FedAvg arguments raise ConfigError naming the argument."""
    with pytest.raises(ConfigError, match=field):
        FedAvg(**kwargs)


def test_aggregate_is_the_exact_weighted_mean() -> None:
    """aggregate: sum(n_k * w_k) / sum(n_k), layer by layer (hand-computed)."""
    results = [
        ([np.array([1.0, 2.0]), np.array([[0.0]])], 1),
        ([np.array([3.0, 4.0]), np.array([[4.0]])], 3),
    ]
    out = aggregate(results)
    assert [a.tolist() for a in out] == [[2.5, 3.5], [[3.0]]]


def test_aggregate_accepts_a_generator() -> None:
    """aggregate streams: any iterable of (arrays, n) works, e.g. a generator."""
    out = aggregate(([np.full(3, float(k))], k) for k in range(1, 4))
    assert out[0].tolist() == pytest.approx([14 / 6] * 3)


def test_aggregate_preserves_layer_dtypes() -> None:
    """Each layer keeps its dtype: float32 stays float32, integers are rounded to nearest."""
    out = aggregate(
        [
            ([np.array([1.0], dtype=np.float32), np.array([1], dtype=np.int32)], 1),
            ([np.array([2.0], dtype=np.float32), np.array([2], dtype=np.int32)], 3),
        ]
    )
    assert out[0].dtype == np.float32
    assert out[0].tolist() == [1.75]
    assert out[1].dtype == np.int32
    assert out[1].tolist() == [2]  # 1.75 rounded


@pytest.mark.parametrize(
    "second",
    [[np.zeros(3), np.zeros((1, 1))], [np.zeros(2)], [np.zeros(2), np.zeros((1, 1)), np.zeros(1)]],
    ids=["shape", "fewer layers", "more layers"],
)
def test_aggregate_layout_mismatch_is_a_run_error(second: list[np.ndarray]) -> None:
    """Results with different layer counts or shapes raise RunError naming the result."""
    with pytest.raises(RunError, match="result 1"):
        aggregate([([np.zeros(2), np.zeros((1, 1))], 1), (second, 1)])


def test_aggregate_zero_or_no_examples_is_a_run_error() -> None:
    """A total of 0 examples, or no results at all, raises RunError (Flower divides by 0)."""
    with pytest.raises(RunError, match="0 examples"):
        aggregate([([np.ones(2)], 0), ([np.ones(2)], 0)])
    with pytest.raises(RunError):
        aggregate([])


def test_weighted_loss_avg() -> None:
    """weighted_loss_avg = sum(n * loss) / sum(n); empty or zero total raises RunError."""
    assert weighted_loss_avg([(1, 1.0), (3, 2.0)]) == 1.75
    assert weighted_loss_avg([(2, 0.5)]) == 0.5
    with pytest.raises(RunError):
        weighted_loss_avg([])
    with pytest.raises(RunError):
        weighted_loss_avg([(0, 1.0)])


def _fit_res(values: list[float], n: int, metrics: dict[str, Any] | None = None) -> FitRes:
    return FitRes(
        status=OK,
        parameters=ndarrays_to_parameters([np.array(values)]),
        num_examples=n,
        metrics=metrics or {},
    )


def test_aggregate_fit_weighted_mean_and_metrics_hook() -> None:
    """aggregate_fit averages by num_examples and passes [(n, metrics)] to the hook."""
    seen: list[Any] = []

    def fit_metrics(pairs: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
        seen.append(pairs)
        return {"total": sum(n for n, _ in pairs)}

    strategy = FedAvg(fit_metrics_aggregation_fn=fit_metrics)
    results = [
        (FakeProxy("a"), _fit_res([0.0, 4.0], 1, {"m": 1})),
        (FakeProxy("b"), _fit_res([4.0, 0.0], 3, {"m": 2})),
    ]
    parameters, metrics = strategy.aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert parameters is not None
    assert parameters_to_ndarrays(parameters)[0].tolist() == [3.0, 1.0]
    assert metrics == {"total": 4}
    assert seen == [[(1, {"m": 1}), (3, {"m": 2})]]


def test_aggregate_fit_refuses_failures_when_not_accepted() -> None:
    """accept_failures=False and any failure: (None, {}), nothing aggregated."""
    strategy = FedAvg(accept_failures=False)
    results = [(FakeProxy("a"), _fit_res([1.0], 1))]
    failures: list[Any] = [ConnectionLost("gone")]
    assert strategy.aggregate_fit(1, results, failures) == (None, {})  # type: ignore[arg-type]
    assert FedAvg().aggregate_fit(1, results, failures)[0] is not None  # type: ignore[arg-type]


def test_aggregate_fit_without_results() -> None:
    """No results: (None, {})."""
    assert FedAvg().aggregate_fit(1, [], [ConnectionLost("x")]) == (None, {})


def _npy_with_nul_in_header() -> bytes:
    data = ndarrays_to_parameters([np.arange(3.0)]).tensors[0]
    return data[:10] + b"\x00" + data[11:]  # the header's "{" becomes NUL


@pytest.mark.parametrize(
    "tensor", [b"junk", _npy_with_nul_in_header()], ids=["junk", "NUL in .npy header"]
)
def test_aggregate_fit_skips_undecodable_results(tensor: bytes) -> None:
    """A result whose tensors are not valid .npy is dropped, the others are aggregated.

    A client must not be able to crash the server's round with one corrupted tensor.
    """
    bad = FitRes(OK, Parameters(tensors=[tensor], tensor_type="numpy.ndarray"), 5, {})
    results = [(FakeProxy("a"), _fit_res([2.0], 1)), (FakeProxy("b"), bad)]
    parameters, _ = FedAvg().aggregate_fit(1, results, [])  # type: ignore[arg-type]
    assert parameters is not None
    assert parameters_to_ndarrays(parameters)[0].tolist() == [2.0]


def test_aggregate_evaluate_weighted_loss() -> None:
    """aggregate_evaluate returns the loss weighted by num_examples."""
    results = [
        (FakeProxy("a"), EvaluateRes(OK, 1.0, 1, {})),
        (FakeProxy("b"), EvaluateRes(OK, 3.0, 3, {})),
    ]
    loss, metrics = FedAvg().aggregate_evaluate(1, results, [])  # type: ignore[arg-type]
    assert loss == 2.5
    assert metrics == {}
    refused = FedAvg(accept_failures=False).aggregate_evaluate(1, results, [ConnectionLost("x")])  # type: ignore[arg-type]
    assert refused == (None, {})


def test_configure_fit_sends_one_fit_ins_with_the_config() -> None:
    """configure_fit samples clients and gives each the same FitIns with on_fit_config_fn."""
    manager = _manager(*[FakeProxy(f"c{i}") for i in range(4)])
    strategy = FedAvg(fraction_fit=0.5, on_fit_config_fn=lambda r: {"round": r})
    parameters = ndarrays_to_parameters([np.ones(1)])
    pairs = strategy.configure_fit(3, parameters, manager)
    assert len(pairs) == 2
    assert len({id(ins) for _, ins in pairs}) == 1
    ins = pairs[0][1]
    assert ins == FitIns(parameters=parameters, config={"round": 3})


def test_configure_evaluate_disabled_by_fraction_zero() -> None:
    """fraction_evaluate=0 disables federated evaluation."""
    manager = _manager(*[FakeProxy(f"c{i}") for i in range(4)])
    strategy = FedAvg(fraction_evaluate=0.0)
    assert strategy.configure_evaluate(1, ndarrays_to_parameters([]), manager) == []


# --- History -------------------------------------------------------------------------------


def test_history_json_round_trip_including_bytes() -> None:
    """History -> to_json -> from_dict gives an equal History, bytes metrics included."""
    history = History()
    history.add_loss_distributed(1, 0.5)
    history.add_loss_distributed(2, 0.25)
    history.add_loss_centralized(0, 1.0)
    history.add_metrics_distributed_fit(1, {"n": 3, "flag": True, "blob": b"\x00\xff"})
    history.add_metrics_distributed(1, {"acc": 0.75, "name": "x"})
    history.add_metrics_distributed(2, {"acc": 0.8})
    history.add_metrics_centralized(0, {"raw": b"abc"})
    restored = History.from_dict(json.loads(history.to_json()))
    assert restored == history
    assert restored.metrics_distributed_fit["blob"] == [(1, b"\x00\xff")]
    assert type(restored.metrics_distributed_fit["flag"][0][1]) is bool
    assert restored.metrics_distributed["acc"] == [(1, 0.75), (2, 0.8)]


def test_empty_history_round_trip() -> None:
    """An empty History round-trips too."""
    assert History.from_dict(json.loads(History().to_json())) == History()


@pytest.mark.parametrize(
    "data",
    [{}, {"losses_distributed": "x"}, [], None],
    ids=["missing keys", "wrong type", "list", "None"],
)
def test_history_from_malformed_data_is_a_decode_error(data: Any) -> None:
    """Malformed History data raises DecodeError."""
    with pytest.raises(DecodeError):
        History.from_dict(data)


# --- ServerConfig --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_rounds": -1},
        {"num_rounds": "3"},
        {"num_rounds": True},
        {"num_rounds": 2.0},
        {"round_timeout": 0},
        {"round_timeout": -1.0},
        {"round_timeout": "10"},
        {"round_timeout": float("nan")},
    ],
    ids=repr,
)
def test_server_config_validation(kwargs: dict[str, Any]) -> None:
    """ServerConfig refuses a bad num_rounds or round_timeout, naming it."""
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        ServerConfig(**kwargs)


def test_server_config_defaults() -> None:
    """ServerConfig() is one round with no timeout, as in Flower."""
    assert ServerConfig() == ServerConfig(num_rounds=1, round_timeout=None)


# --- Server round loop ---------------------------------------------------------------------


def _three_clients() -> tuple[FakeProxy, FakeProxy, FakeProxy]:
    return (
        FakeProxy("a", Shift(delta=1.0, n=1, loss=1.0).to_client()),
        FakeProxy("b", Shift(delta=3.0, n=3, loss=3.0).to_client()),
        FakeProxy("bad", Shift(delta=100.0, n=100, loss=100.0, fail=True).to_client()),
    )


def test_server_fit_runs_rounds_and_fills_history() -> None:
    """Two rounds over fake proxies: weighted updates, distributed losses, failure ignored."""
    proxies = _three_clients()
    strategy = FedAvg(
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]),
        fit_metrics_aggregation_fn=lambda pairs: {"clients": len(pairs)},
    )
    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    history, elapsed = server.fit(num_rounds=2, timeout=None)
    assert elapsed >= 0
    # each round moves the model by (1*1 + 3*3) / 4 = 2.5; the failing client is left out
    assert parameters_to_ndarrays(server.parameters)[0].tolist() == [5.0, 5.0]
    assert history.losses_distributed == [(1, 2.5), (2, 2.5)]
    assert history.metrics_distributed_fit == {"clients": [(1, 2), (2, 2)]}
    for proxy in proxies:
        assert [type(i) for i in proxy.received] == [FitIns, EvaluateIns] * 2


def test_fit_round_counts_a_failing_client_as_failure() -> None:
    """A CLIENT_ERROR reply and a failed future are failures, not results, and no crash."""
    a, b, bad = _three_clients()
    gone = FakeProxy("gone", error=ConnectionLost("node left"))
    server = Server(
        client_manager=_manager(a, b, bad, gone),
        strategy=FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(1)])),
    )
    server.parameters = ndarrays_to_parameters([np.zeros(1)])
    fitted = server.fit_round(1, timeout=None)
    assert fitted is not None
    parameters, _, (results, failures) = fitted
    assert sorted(p.cid for p, _ in results) == ["a", "b"]
    assert len(failures) == 2
    reply_failure = next(f for f in failures if isinstance(f, tuple))
    assert reply_failure[0] is bad
    assert reply_failure[1].status.code == Code.CLIENT_ERROR  # type: ignore[union-attr]
    assert any(isinstance(f, ConnectionLost) for f in failures)
    assert parameters is not None
    assert parameters_to_ndarrays(parameters)[0].tolist() == [2.5]


def test_a_round_scales_a_tuned_collector_with_its_nodes(collector: int, monkeypatch: Any) -> None:
    """With the server's entry point's collector tuning in effect, a fit round sets the
    garbage collector's young-generation threshold for the nodes it instructs."""
    _, second, third = gc.get_threshold()
    monkeypatch.setattr(memory, "GC_ALLOCATIONS_PER_NODE", 10_000)
    a, b, bad = _three_clients()
    server = Server(
        client_manager=_manager(a, b, bad),
        strategy=FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(1)])),
    )
    server.parameters = ndarrays_to_parameters([np.zeros(1)])
    server.fit_round(1, timeout=None)
    assert gc.get_threshold() == (collector, second, third)  # not tuned: left alone
    memory.tune_collector()
    server.fit_round(2, timeout=None)
    assert gc.get_threshold() == (3 * 10_000, second, third)


def test_run_instructions_keeps_order_and_splits_failures() -> None:
    """run_instructions returns results in instruction order and collects every failure."""
    a, b, bad = _three_clients()
    ins = FitIns(ndarrays_to_parameters([np.zeros(1)]), {})
    results, failures = run_instructions(
        [(b, ins), (bad, ins), (a, ins)], timeout=None, expect=FitRes
    )
    assert [p.cid for p, _ in results] == ["b", "a"]
    assert len(failures) == 1


def test_server_asks_a_client_for_initial_parameters() -> None:
    """Without initial_parameters the server takes them from one client's get_parameters."""
    a, b, _ = _three_clients()
    server = Server(client_manager=_manager(a, b), strategy=FedAvg(fraction_evaluate=0.0))
    history, _ = server.fit(num_rounds=1, timeout=None)
    # start from the client's [10, 10]; + 2.5
    assert parameters_to_ndarrays(server.parameters)[0].tolist() == [12.5, 12.5]
    assert history.losses_distributed == []


def test_a_client_without_get_parameters_gives_empty_initial_parameters(caplog: Any) -> None:
    """No initial_parameters, and the client asked does not implement get_parameters: as in
    Flower 1.12, a WARNING says empty initial parameters will be used, and the run trains
    (a client that starts from its own model when it receives an empty one)."""

    class OwnStart(NumPyClient):
        def fit(self, parameters: Any, config: Any) -> Any:
            start = parameters if parameters else [np.zeros(2)]
            return [p + 1.0 for p in start], 1, {}

    proxies = [FakeProxy(c, OwnStart().to_client()) for c in ("a", "b")]
    server = Server(client_manager=_manager(*proxies), strategy=FedAvg(fraction_evaluate=0.0))
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        server.fit(num_rounds=2, timeout=None)
    assert "empty initial parameters will be used" in caplog.text
    assert parameters_to_ndarrays(server.parameters)[0].tolist() == [2.0, 2.0]


def test_initial_parameters_from_an_unreachable_client_is_a_run_error() -> None:
    """If the client asked for initial parameters cannot be reached, the run stops with
    RunError (Flower raises too)."""
    server = Server(
        client_manager=_manager(FakeProxy("x", error=ConnectionLost("gone"))), strategy=FedAvg()
    )
    with pytest.raises(RunError, match="initial parameters"):
        server.fit(num_rounds=1, timeout=None)


def test_a_round_that_aggregates_nothing_is_a_warning_with_the_reason(caplog: Any) -> None:
    """One round of two fails in every client: a WARNING names the failures; the run goes
    on and the other round trains."""
    flaky = Shift(delta=1.0, n=1, loss=1.0)
    proxies = [FakeProxy(c, flaky.to_client()) for c in ("a", "b")]
    strategy = FedAvg(
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]),
        fraction_evaluate=0.0,
        on_fit_config_fn=lambda r: {"round": r},
    )
    original = Shift.fit

    def fit(self: Shift, parameters: Any, config: Any) -> Any:
        if config["round"] == 1:
            raise RuntimeError("no data yet")
        return original(self, parameters, config)

    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    with caplog.at_level(logging.WARNING, logger="stamen.server"):
        Shift.fit = fit  # type: ignore[method-assign]
        try:
            server.fit(num_rounds=2, timeout=None)
        finally:
            Shift.fit = original  # type: ignore[method-assign]
    warnings = [r.getMessage() for r in caplog.records if "nothing aggregated" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("round 1: nothing aggregated: 2 failure(s): client ")
    assert "CLIENT_ERROR" in warnings[0]
    assert parameters_to_ndarrays(server.parameters)[0].tolist() == [1.0, 1.0]


def test_a_run_in_which_no_round_aggregated_is_a_run_error() -> None:
    """Every fit fails in every round: the run ends with RunError naming each round's
    failures, instead of returning as if it had trained."""
    proxies = [FakeProxy(c, Shift(1.0, 1, 1.0, fail=True).to_client()) for c in ("a", "b")]
    strategy = FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(2)]))
    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    with pytest.raises(RunError, match="none of its 3 fit round") as info:
        server.fit(num_rounds=3, timeout=None)
    assert "round 1: 2 failure(s)" in str(info.value)
    assert "fit failed on purpose" in str(info.value)
    assert "round 3:" in str(info.value)


def test_a_run_whose_results_are_all_refused_is_a_run_error() -> None:
    """Results that are all refused (0 examples): nothing trained, so the run fails."""
    proxies = [FakeProxy(c, Shift(1.0, 0, 1.0).to_client()) for c in ("a", "b")]
    strategy = FedAvg(
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]), fraction_evaluate=0.0
    )
    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    with pytest.raises(RunError, match=r"2 result\(s\) not aggregated by the strategy"):
        server.fit(num_rounds=1, timeout=None)


def test_centralized_evaluation_is_recorded_from_round_zero() -> None:
    """evaluate_fn runs before round 1 and after each round; History records it."""
    calls: list[int] = []

    def evaluate_fn(server_round: int, arrays: Any, config: Any) -> tuple[float, dict[str, Any]]:
        calls.append(server_round)
        return float(arrays[0][0]), {"r": server_round}

    a, b, _ = _three_clients()
    strategy = FedAvg(
        initial_parameters=ndarrays_to_parameters([np.zeros(2)]),
        evaluate_fn=evaluate_fn,
        fraction_evaluate=0.0,
    )
    server = Server(client_manager=_manager(a, b), strategy=strategy)
    history, _ = server.fit(num_rounds=2, timeout=None)
    assert calls == [0, 1, 2]
    assert history.losses_centralized == [(0, 0.0), (1, 2.5), (2, 5.0)]
    assert history.metrics_centralized == {"r": [(0, 0), (1, 1), (2, 2)]}


def test_zero_rounds_runs_nothing() -> None:
    """num_rounds=0 sends no fit or evaluate instruction."""
    a, b, _ = _three_clients()
    strategy = FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(2)]))
    server = Server(client_manager=_manager(a, b), strategy=strategy)
    history, _ = server.fit(num_rounds=0, timeout=None)
    assert history == History()
    assert a.received == []


def test_disconnect_all_clients_sends_reconnect_zero() -> None:
    """At the end of a run every client gets ReconnectIns (seconds None -> 0 on the wire)."""
    a, b, _ = _three_clients()
    gone = FakeProxy("gone", error=ConnectionLost("left"))
    server = Server(client_manager=_manager(a, b, gone))
    server.disconnect_all_clients()
    for proxy in (a, b, gone):
        assert proxy.received == [ReconnectIns(seconds=None)]


def test_server_defaults_to_fedavg() -> None:
    """Server(strategy=None) uses FedAvg."""
    assert isinstance(Server(client_manager=_manager()).strategy, FedAvg)


# --- streaming aggregation ----------------------------------------------------------------


class LateProxy(ClientProxy):
    """A proxy whose futures the test completes by hand, in any order."""

    def __init__(self, cid: str) -> None:
        super().__init__(cid)
        self.future: Future[Reply] = Future()

    def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        return self.future


def test_streamed_results_are_folded_in_instruction_order_and_dropped() -> None:
    """Results reach on_result in the order of the instructions whatever their arrival
    order (so aggregation is reproducible), failures take their turn too, and what
    on_result returns replaces the reply."""
    proxies = [LateProxy(str(i)) for i in range(4)]
    seen: list[str] = []

    def on_result(proxy: ClientProxy, reply: FitRes) -> FitRes:
        seen.append(proxy.cid)
        return FitRes(reply.status, Parameters([], ""), reply.num_examples, {})

    def finish_in_reverse() -> None:
        for proxy in reversed(proxies):
            if proxy.cid == "1":
                proxy.future.set_exception(ConnectionLost("gone"))
            else:
                params = ndarrays_to_parameters([np.full(3, float(proxy.cid))])
                proxy.future.set_result(FitRes(OK, params, 1, {}))

    import threading

    worker = threading.Timer(0.01, finish_in_reverse)
    worker.start()
    ins = FitIns(Parameters([], ""), {})
    results, failures = run_instructions(
        [(p, ins) for p in proxies], None, expect=FitRes, on_result=on_result
    )
    worker.join(10)
    assert seen == ["0", "2", "3"]
    assert [p.cid for p, _ in results] == ["0", "2", "3"]
    assert all(isinstance(r, FitRes) and r.parameters.tensors == [] for _, r in results)
    assert len(failures) == 1 and isinstance(failures[0], ConnectionLost)


def test_fedavg_streams_and_gives_the_list_based_result() -> None:
    """A FedAvg round through the streaming path equals aggregate_fit over the same
    results, and the returned results no longer hold the clients' models."""
    clients = [Shift(delta=d, n=n, loss=0.0) for d, n in ((1.0, 1), (2.0, 3), (-4.0, 2))]
    proxies = [FakeProxy(str(i), c.to_client()) for i, c in enumerate(clients)]
    start = ndarrays_to_parameters([np.full(2, 10.0)])
    strategy = FedAvg(initial_parameters=start, min_available_clients=3, min_fit_clients=3)
    assert strategy.fit_accumulator(1) is not None
    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    server.parameters = start
    fitted = server.fit_round(1, timeout=None)
    assert fitted is not None
    parameters, _, (results, failures) = fitted
    assert parameters is not None and not failures
    expected = (11.0 * 1 + 12.0 * 3 + 6.0 * 2) / 6
    np.testing.assert_allclose(parameters_to_ndarrays(parameters)[0], np.full(2, expected))
    assert all(r.parameters.tensors == [] for _, r in results)


def test_a_run_is_published_as_events_and_logged_as_progress(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The round loop publishes the run (start, each round's start, each reply as it
    arrives with the failure's reason, each round's end, the end), and the default
    ProgressLog turns it into INFO lines and a WARNING per failed node."""
    from stamen.server.events import ReplyArrived, RoundEnded, RoundStarted, RunEnded, RunStarted

    proxies = _three_clients()
    strategy = FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(2)]))
    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    events: list[object] = []
    server.events.subscribe(events.append)
    with caplog.at_level(logging.INFO, logger="stamen.server"):
        server.fit(num_rounds=2, timeout=None)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunEnded"
    assert events[0] == RunStarted(2, "FedAvg", 1)
    assert isinstance(events[-1], RunEnded) and events[-1].ok and events[-1].rounds == 2
    starts = [(e.server_round, e.phase, e.sampled) for e in events if isinstance(e, RoundStarted)]
    assert starts == [(1, "fit", 3), (1, "evaluate", 3), (2, "fit", 3), (2, "evaluate", 3)]
    replies = [e for e in events if isinstance(e, ReplyArrived)]
    assert len(replies) == 12
    failed = [e for e in replies if not e.ok]
    assert {(e.cid, e.phase) for e in failed} == {("bad", "fit"), ("bad", "evaluate")}
    assert all(e.reason and e.reason.startswith("CLIENT_ERROR") for e in failed)
    ends = [e for e in events if isinstance(e, RoundEnded)]
    assert [(e.phase, e.results, e.failures, e.aggregated) for e in ends[:2]] == [
        ("fit", 2, 1, True),
        ("evaluate", 2, 1, True),
    ]
    assert ends[1].loss == 2.5
    lines = [r.getMessage() for r in caplog.records if r.name == "stamen.server"]
    assert "run started: 2 round(s) of FedAvg" in lines
    assert "round 1/2: fit sent to 3 node(s)" in lines
    assert any(
        line.startswith("round 2/2: evaluate done in ")
        and line.endswith(": 2 result(s), 1 failure(s) loss=2.5")
        for line in lines
    ), lines
    assert any(line.startswith("round 1: fit failed on node bad: CLIENT_ERROR") for line in lines)
    assert any(line.startswith("run completed: 2 round(s) in ") for line in lines)


def test_a_failing_progress_view_does_not_stop_the_run(caplog: pytest.LogCaptureFixture) -> None:
    """A subscriber that raises is logged; the run completes."""
    proxies = _three_clients()
    strategy = FedAvg(initial_parameters=ndarrays_to_parameters([np.zeros(2)]))
    server = Server(client_manager=_manager(*proxies), strategy=strategy)

    def broken(event: object) -> None:
        raise RuntimeError("view broke")

    server.events.subscribe(broken)
    history, _ = server.fit(num_rounds=1, timeout=None)
    assert history.losses_distributed == [(1, 2.5)]
    assert "run event subscriber" in caplog.text


def test_waiting_for_clients_says_how_many_are_missing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While a wait lacks clients, a line says k/n connected every few seconds."""
    from stamen.server import client_manager as module

    monkeypatch.setattr(module, "_WAIT_REPORT", 0.02)
    manager = SimpleClientManager()
    manager.register(_three_clients()[0])
    with caplog.at_level(logging.INFO, logger="stamen.server"):
        assert manager.wait_for(2, timeout=0.1) is False
    assert "waiting for clients: 1/2 connected" in caplog.text
