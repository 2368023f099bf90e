"""The ``Strategy`` interface: how a server configures and aggregates rounds."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from ...messages import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters
from ...typing import Scalar
from ..client_manager import ClientManager
from ..client_proxy import ClientProxy
from .state import StrategyState

__all__ = ["FitAccumulator", "FitPrefold", "Strategy"]

FitResults = list[tuple[ClientProxy, FitRes]]
FitFailures = list[tuple[ClientProxy, FitRes] | BaseException]
EvaluateResults = list[tuple[ClientProxy, EvaluateRes]]
EvaluateFailures = list[tuple[ClientProxy, EvaluateRes] | BaseException]


class FitAccumulator(Protocol):
    """Aggregates one fit round's results as they arrive, instead of all at the end.

    Given by :meth:`Strategy.fit_accumulator`. The server calls :meth:`add` for each OK
    result as soon as it arrives (and may drop the result then), and :meth:`finish` once
    with the round's failures. An accumulator folds each result into its aggregate right
    away, so the server never holds all the clients' models at once.
    """

    def add(self, client: ClientProxy, res: FitRes) -> None:
        """Validate and fold one OK fit result (status already checked OK by the server).

        A refused result (bad shape/dtype/NaN/num_examples) is recorded as a failure
        inside the accumulator, never raised. ``res`` is handed over: the server does not
        read its tensors afterwards, so the accumulator may keep their memory (FedAvg's
        keeps the first result's float32 layers as its running mean).
        """

    def finish(
        self, failures: list[tuple[ClientProxy, FitRes] | BaseException]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The round's aggregate.

        The same return value and the same rules as ``aggregate_fit`` would give for the
        same results and failures (accept_failures, min results / refuse_round rules,
        fit_metrics_aggregation_fn over ``(num_examples, metrics)`` of accepted results,
        logging).
        """


class FitPrefold(Protocol):
    """Sees a round's results as they arrive, when the server collects them for
    ``aggregate_fit``.

    Given by :meth:`Strategy.fit_prefold`. The server calls :meth:`add` for each OK result
    as soon as it arrives, in the order of the round's instructions, keeps the result
    as it is and calls ``aggregate_fit`` with all of them at the end. A prefold may start
    the aggregation then (FedAvg's folds the mean), for ``aggregate_fit`` to use if it is
    given the very results folded: what ``aggregate_fit`` returns is the same either way.
    """

    def add(self, client: ClientProxy, res: FitRes) -> None:
        """Look at one OK fit result; ``res`` stays the server's (read it, do not keep
        its memory)."""


class Strategy(ABC):
    """Decides which clients do what in each round, and how results are combined.

    Besides Flower's six abstract methods, every strategy has :meth:`state_dict` and
    :meth:`load_state_dict`: what it must remember across rounds (momentum, optimizer
    moments, a clipping norm, ...) as a :class:`StrategyState`, so that a checkpoint can
    save it and a restarted server resume exactly. A strategy that keeps no state between
    rounds keeps the defaults (an empty state).
    """

    def state_dict(self) -> StrategyState:
        """The state to save: arrays (saved as ``.npy``) and JSON values. Empty by default."""
        return StrategyState()

    def load_state_dict(self, state: StrategyState) -> None:
        """Restore what :meth:`state_dict` returned.

        The default accepts only an empty state.

        Raises:
            ConfigError: the state holds entries this strategy does not know.
        """
        state.check_keys(type(self).__name__, arrays=set(), values=set())

    def fit_accumulator(self, server_round: int) -> FitAccumulator | None:
        """None (default): the server collects every result and calls aggregate_fit.

        A strategy that can aggregate results one at a time returns a fresh
        :class:`FitAccumulator` for round ``server_round`` (asked after
        :meth:`configure_fit` of that round); the server then feeds it the results as they
        arrive and takes the round's aggregate from its ``finish`` instead of calling
        :meth:`aggregate_fit`.
        """
        return None

    def fit_prefold(self, server_round: int) -> FitPrefold | None:
        """None (default): nothing is done with a collected round's results before
        aggregate_fit.

        Asked when :meth:`fit_accumulator` gave None. A strategy that can start aggregating
        the results that aggregate_fit will likely receive returns a fresh
        :class:`FitPrefold` for round ``server_round``; the server shows it each result
        as it arrives, and drops it once aggregate_fit has returned.
        """
        return None

    @abstractmethod
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Return the initial global parameters, or None to ask one client for them."""

    @abstractmethod
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Pick the clients of a training round and their instructions."""

    @abstractmethod
    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Combine training results into new global parameters (None: keep the old ones)."""

    @abstractmethod
    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Pick the clients of an evaluation round and their instructions."""

    @abstractmethod
    def aggregate_evaluate(
        self, server_round: int, results: EvaluateResults, failures: EvaluateFailures
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Combine evaluation results into a loss and metrics."""

    @abstractmethod
    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Evaluate the global parameters on the server (None: no central evaluation)."""
