"""``stamen demo``: a real server and client nodes on 127.0.0.1 train the digits model."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from stamen import cli
from stamen.demo import (
    RoundProgress,
    evaluate_model,
    initial_parameters,
    load_digits_split,
    run_demo,
    train_model,
    weighted_average,
)
from stamen.errors import ConfigError, ConnectError, RunError
from stamen.server.history import History

TIMEOUT = 60.0
NUM_DIGITS = 10


def demo_threads() -> list[str]:
    """Names of live threads the demo starts (client nodes, the server's event loop)."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("stamen-demo-client") or t.name == "stamen-fleet"
    ]


@pytest.mark.slow
def test_demo_reaches_90_percent_and_writes_its_history(tmp_path: Path) -> None:
    """10 clients, 10 rounds: accuracy >= 0.90 and above round 0's; history JSON round-trips."""
    path = tmp_path / "history.json"
    rounds: list[RoundProgress] = []
    result = run_demo(
        num_clients=10,
        num_rounds=10,
        seed=0,
        history_path=path,
        on_round=rounds.append,
        timeout=TIMEOUT,
    )
    history = result.history
    accuracy = dict(history.metrics_centralized["accuracy"])
    assert result.final_accuracy >= 0.90
    assert result.final_accuracy == accuracy[10]
    assert accuracy[10] > accuracy[0] + 0.5
    assert [r for r, _ in history.losses_distributed] == list(range(1, 11))
    assert [r for r, _ in history.losses_centralized] == list(range(11))
    assert [r for r, _ in history.metrics_distributed_fit["train_loss"]] == list(range(1, 11))
    assert history.losses_centralized[-1][1] < history.losses_centralized[0][1]
    assert [p.server_round for p in rounds] == list(range(11))
    assert rounds[-1].centralized_accuracy == result.final_accuracy
    assert result.history_path == path
    assert History.from_dict(json.loads(path.read_text(encoding="utf-8"))) == history
    assert demo_threads() == []


def test_same_seed_same_history_other_seed_other_history() -> None:
    """The run is deterministic given the seed, whatever order the clients answer in."""
    first, second, other = (
        run_demo(num_clients=3, num_rounds=2, seed=seed, history_path=None, timeout=TIMEOUT)
        for seed in (4, 4, 5)
    )
    assert first.history.to_dict() == second.history.to_dict()
    assert first.history.to_dict() != other.history.to_dict()
    assert demo_threads() == []


def test_zero_rounds_evaluates_the_initial_model_only() -> None:
    """``num_rounds=0``: every node connects and is released; only round 0 is measured."""
    result = run_demo(num_clients=4, num_rounds=0, history_path=None, timeout=TIMEOUT)
    assert result.history.losses_distributed == []
    assert result.history.metrics_centralized["accuracy"] == [(0, result.final_accuracy)]
    assert demo_threads() == []


def test_cli_demo_prints_each_round_and_writes_the_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``stamen demo`` prints a line per round and the final accuracy, and returns 0."""
    path = tmp_path / "out.json"
    argv = ["demo", "--clients", "3", "--rounds", "2", "--seed", "1", "--history", str(path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    rounds = [line.split()[0] for line in out.splitlines() if line[:5].strip().isdigit()]
    assert rounds == ["0", "1", "2"]
    assert "Final centralized test accuracy: 0." in out
    assert f"History written to {path}" in out
    assert len(History.from_dict(json.loads(path.read_text(encoding="utf-8"))).losses_distributed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clients": 0}, "num_clients: expected an int >= 1, received 0"),
        ({"num_clients": 101}, "num_clients: expected at most 100, received 101"),
        ({"num_rounds": -1}, "num_rounds: expected an int >= 0, received -1"),
        ({"seed": -1}, "seed: expected an int >= 0, received -1"),
        ({"alpha": 0.0}, "alpha: expected a number > 0, received 0.0"),
        ({"timeout": 0}, "timeout: expected a number > 0, received 0"),
    ],
)
def test_invalid_arguments_raise_config_error_before_serving(
    kwargs: dict[str, int | float], message: str
) -> None:
    """A bad argument raises ConfigError naming it, and nothing is started."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        run_demo(history_path=None, **kwargs)  # type: ignore[arg-type]
    assert demo_threads() == []


def test_history_in_a_missing_directory_is_refused_before_training(tmp_path: Path) -> None:
    """``history_path`` in a directory that does not exist fails before any round runs."""
    with pytest.raises(ConfigError, match=r"history_path: directory .* does not exist"):
        run_demo(history_path=tmp_path / "missing" / "h.json")
    assert demo_threads() == []


def test_split_is_non_iid_and_uses_every_example_once() -> None:
    """Partitions plus test set hold all 1797 digits; clients are dominated by few classes."""
    split = load_digits_split(10, seed=0)
    sizes = [len(p.y_train) + len(p.y_val) for p in split.partitions]
    assert sum(sizes) + len(split.y_test) == 1797
    assert min(sizes) >= 10
    assert all(len(p.y_val) >= 1 for p in split.partitions)
    # Stratified test set: every class about 20 % of its examples.
    assert np.bincount(split.y_test, minlength=NUM_DIGITS).min() >= 34
    top_share = [
        np.bincount(np.concatenate([p.y_train, p.y_val]), minlength=NUM_DIGITS).max() / n
        for p, n in zip(split.partitions, sizes, strict=True)
    ]
    assert np.mean(top_share) > 0.25  # IID would be about 0.1
    assert float(split.x_test.min()) >= 0.0
    assert float(split.x_test.max()) <= 1.0


def test_local_training_lowers_the_loss() -> None:
    """A few epochs of gradient descent from zeros lower the cross-entropy below log(10)."""
    split = load_digits_split(1, seed=0)
    data = split.partitions[0]
    start = initial_parameters()
    rng = np.random.default_rng(0)
    trained = train_model(
        start, data.x_train, data.y_train, epochs=3, lr=1.0, batch_size=16, rng=rng
    )
    before, _ = evaluate_model(start, data.x_train, data.y_train)
    after, accuracy = evaluate_model(trained, data.x_train, data.y_train)
    assert before == pytest.approx(np.log(NUM_DIGITS))
    assert after < 0.5
    assert accuracy > 0.9
    assert np.all(start[0] == 0.0)  # the input is not modified


def test_weighted_average_weights_by_examples_and_skips_non_numbers() -> None:
    """Metrics are averaged by example counts; keys not numeric in every result are dropped."""
    metrics = weighted_average(
        [
            (1, {"accuracy": 1.0, "name": "a", "ok": True}),
            (3, {"accuracy": 0.5, "name": "b", "ok": False, "extra": 1.0}),
        ]
    )
    assert metrics == {"accuracy": pytest.approx(0.625)}
    assert weighted_average([]) == {}


@pytest.mark.timeout(30)
def test_a_failing_node_fails_the_demo_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node whose start_client raises ends the demo with its error, not after `timeout`."""
    import stamen.demo

    def broken_start_client(**kwargs: object) -> None:
        raise ConnectError(f"cannot reach {kwargs['server_address']}")

    monkeypatch.setattr(stamen.demo, "start_client", broken_start_client)
    with pytest.raises(RunError, match="stamen-demo-client-0: ConnectError: cannot reach"):
        run_demo(num_clients=2, num_rounds=1, history_path=None, timeout=600)
    assert demo_threads() == []
