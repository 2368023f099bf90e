"""Federated Averaging (FedAvg), and the round skeleton the FedAvg family shares."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ...errors import ConfigError, RunError
from ...messages import EvaluateIns, FitIns, FitRes, Parameters
from ...ndarrays import (
    TENSOR_TYPE,
    Lease,
    ndarray_to_tensor,
    parameters_to_ndarrays,
)
from ...typing import Config, Metrics, MetricsAggregationFn, NDArrays, Scalar
from ..client_manager import ClientManager
from ..client_proxy import ClientProxy
from ._checks import check_count, check_fraction
from .aggregate import WeightedSum, aggregate, weighted_loss_avg
from .strategy import (
    EvaluateFailures,
    EvaluateResults,
    FitAccumulator,
    FitFailures,
    FitPrefold,
    FitResults,
    Strategy,
)
from .validate import (
    CheckedFitResults,
    ModelLayout,
    Verdict,
    validate_evaluate_results,
    verdict,
)

__all__ = ["EvaluateFn", "FedAvg", "fit_results_of", "no_valid_result"]

logger = logging.getLogger("stamen.server")

EvaluateFn = Callable[[int, NDArrays, Config], tuple[float, dict[str, Scalar]] | None]
"""``evaluate_fn(server_round, ndarrays, config) -> (loss, metrics) | None``."""


class FedAvg(Strategy):
    """Federated Averaging: the mean of the client models, weighted by their examples.

    ``w_{t+1} = sum_k n_k w_k / sum_k n_k`` over the clients ``k`` of round ``t``, where
    ``n_k`` is the number of examples client ``k`` trained on.

    Paper: McMahan et al., "Communication-Efficient Learning of Deep Networks from
    Decentralized Data", AISTATS 2017 (arXiv:1602.05629).

    Keywords and defaults are Flower 1.12's. Each round samples
    ``max(int(available * fraction), min_clients)`` clients.

    Beyond Flower:

    * Results are checked before aggregation (:mod:`~stamen.server.strategy.validate`): a
      result whose arrays do not match the global model, hold NaN/Inf, or that reports
      ``num_examples <= 0`` is refused and logged, and counts as a failure.
    * Memory and speed: the results are read in place (read-only views over their bytes)
      and averaged block by block in the CPU cache, float32 layers summed in float32 as
      Flower's ``aggregate`` sums them, others in float64; each layer keeps its dtype,
      or takes NumPy's promotion of the results' dtypes when they differ from it (as
      Flower's ``aggregate``: float32 results of a float64 model give float32).
      :meth:`fit_accumulator` lets the server fold each result in as it arrives, so that
      it never holds all the clients' models at once; a subclass that overrides
      :meth:`aggregate_fit` and calls ``super()`` is folded early too
      (:meth:`fit_prefold`).
    * If no result can be aggregated (all refused, e.g. all report 0 examples), the round
      logs why and keeps the old model instead of dividing by zero.

    Args:
        fraction_fit: Fraction of available clients sampled for training.
        fraction_evaluate: Fraction sampled for evaluation (0 disables it).
        min_fit_clients: Minimum number of clients sampled for training.
        min_evaluate_clients: Minimum number sampled for evaluation.
        min_available_clients: Clients that must be connected before a round starts.
        evaluate_fn: ``evaluate_fn(server_round, ndarrays, config) -> (loss, metrics)`` for
            centralized evaluation.
        on_fit_config_fn: ``fn(server_round) -> config`` sent with each FitIns.
        on_evaluate_config_fn: ``fn(server_round) -> config`` sent with each EvaluateIns.
        accept_failures: If False, a round with any failure — including a result refused
            by the checks — is not aggregated.
        initial_parameters: Initial global model (None: the server asks one client).
        fit_metrics_aggregation_fn: Aggregates ``[(num_examples, metrics)]`` of the
            accepted fit results (see :func:`~stamen.server.strategy.weighted_average`).
        evaluate_metrics_aggregation_fn: The same for evaluations.
        inplace: Accepted for compatibility; aggregation always uses one running sum.
    """

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 2,
        min_evaluate_clients: int = 2,
        min_available_clients: int = 2,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: Callable[[int], Config] | None = None,
        on_evaluate_config_fn: Callable[[int], Config] | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        inplace: bool = True,
    ) -> None:
        check_fraction("fraction_fit", fraction_fit)
        check_fraction("fraction_evaluate", fraction_evaluate)
        check_count("min_fit_clients", min_fit_clients)
        check_count("min_evaluate_clients", min_evaluate_clients)
        check_count("min_available_clients", min_available_clients)
        if initial_parameters is not None and not isinstance(initial_parameters, Parameters):
            raise ConfigError(
                "initial_parameters: expected Parameters (see ndarrays_to_parameters), "
                f"received {type(initial_parameters).__name__}"
            )
        if min_fit_clients > min_available_clients or min_evaluate_clients > min_available_clients:
            logger.warning(
                "min_fit_clients (%s) or min_evaluate_clients (%s) exceeds "
                "min_available_clients (%s): rounds may wait for more clients than needed",
                min_fit_clients,
                min_evaluate_clients,
                min_available_clients,
            )
        self.fraction_fit = fraction_fit
        self.fraction_evaluate = fraction_evaluate
        self.min_fit_clients = min_fit_clients
        self.min_evaluate_clients = min_evaluate_clients
        self.min_available_clients = min_available_clients
        self.evaluate_fn = evaluate_fn
        self.on_fit_config_fn = on_fit_config_fn
        self.on_evaluate_config_fn = on_evaluate_config_fn
        self.accept_failures = accept_failures
        self.initial_parameters = initial_parameters
        self.fit_metrics_aggregation_fn = fit_metrics_aggregation_fn
        self.evaluate_metrics_aggregation_fn = evaluate_metrics_aggregation_fn
        self.inplace = inplace
        # The layout of the current round's global model (results are checked against it).
        self._layout: ModelLayout | None = (
            None if initial_parameters is None else ModelLayout.of_parameters(initial_parameters)
        )
        # The prefold of the round being collected, alive while the server holds it.
        self._prefold: weakref.ref[_FedAvgPrefold] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(accept_failures={self.accept_failures})"

    # --- sampling and instructions --------------------------------------------------------

    def num_fit_clients(self, num_available_clients: int) -> tuple[int, int]:
        """Return (sample size, minimum number of available clients) for training."""
        num_clients = int(num_available_clients * self.fraction_fit)
        return max(num_clients, self.min_fit_clients), self.min_available_clients

    def num_evaluation_clients(self, num_available_clients: int) -> tuple[int, int]:
        """Return (sample size, minimum number of available clients) for evaluation."""
        num_clients = int(num_available_clients * self.fraction_evaluate)
        return max(num_clients, self.min_evaluate_clients), self.min_available_clients

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Hand out ``initial_parameters`` once (then drop them to free memory)."""
        initial = self.initial_parameters
        self.initial_parameters = None
        return initial

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """Run ``evaluate_fn`` on the global parameters, if one is set."""
        if self.evaluate_fn is None:
            return None
        return self.evaluate_fn(server_round, parameters_to_ndarrays(parameters), {})

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample clients; every one gets the same FitIns (encoded once).

        The global model is remembered: the results of the round are checked against its
        layout.
        """
        self.observe_global_model(parameters)
        config = self.on_fit_config_fn(server_round) if self.on_fit_config_fn else {}
        fit_ins = FitIns(parameters, config)
        sample_size, min_num = self.num_fit_clients(client_manager.num_available())
        clients = client_manager.sample(num_clients=sample_size, min_num_clients=min_num)
        return [(client, fit_ins) for client in clients]

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Sample clients for evaluation (none when ``fraction_evaluate == 0``)."""
        if self.fraction_evaluate == 0.0:
            return []
        config = self.on_evaluate_config_fn(server_round) if self.on_evaluate_config_fn else {}
        evaluate_ins = EvaluateIns(parameters, config)
        sample_size, min_num = self.num_evaluation_clients(client_manager.num_available())
        clients = client_manager.sample(num_clients=sample_size, min_num_clients=min_num)
        return [(client, evaluate_ins) for client in clients]

    # --- the global model's layout ---------------------------------------------------------

    def observe_global_model(self, parameters: Parameters) -> None:
        """Remember the layout of the global model sent this round (its tensors' ``.npy``
        headers: no values are read); results are checked against it. No reference to the
        model is kept: the server lets it go while the round's results are aggregated
        (``SpillStore.park``)."""
        self._layout = ModelLayout.of_parameters(parameters)

    def reference_layout(self) -> ModelLayout | None:
        """The layout of the current global model; None if unknown, empty or not NumPy."""
        return self._layout

    # --- aggregation -----------------------------------------------------------------------

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Check the results, aggregate the valid ones, aggregate their metrics.

        Returns ``(None, {})`` — keep the current model — when there are no results, when
        ``accept_failures=False`` and there is a failure (or a refused result), or when no
        result is valid (the reason is logged).
        """
        if not results or self.failures_refuse_round(server_round, failures):
            return None, {}
        reference = self.reference_layout()
        prefold = self._prefold_of(server_round)
        # The prefold's verdicts hold for the layout it checked against.
        known = None if prefold is None or prefold.reference != reference else prefold.verdict_of
        checked = CheckedFitResults(
            server_round,
            results,
            failures,
            reference,
            stop_on_refusal=not self.accept_failures,
            known=known,
        )
        aggregated: NDArrays | None = None
        error: RunError | None = None
        try:
            aggregated = self.aggregate_checked(server_round, checked)
        except RunError as exc:
            error = exc

        def outcome() -> NDArrays | None:
            if error is not None:
                raise error
            return aggregated

        return self._conclude_fit(server_round, checked, outcome)

    def _conclude_fit(
        self,
        server_round: int,
        checked: CheckedFitResults,
        aggregate_checked: Callable[[], NDArrays | None],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The end of a checked round: refusal rules, the aggregate, the server step, metrics.

        ``aggregate_checked()`` gives the aggregate (or raises RunError); it is called only
        if the round is not refused.
        """
        refusal = self.refuse_round(checked)
        if refusal is not None:
            logger.warning("round %s: not aggregating: %s", server_round, refusal)
            return None, {}
        try:
            aggregated = aggregate_checked()
        except RunError as exc:
            logger.error("round %s: not aggregating: %s", server_round, exc)
            return None, {}
        if aggregated is None:
            return None, {}
        try:
            updated = self.server_update(server_round, aggregated)
        except RunError as exc:
            logger.error("round %s: not aggregating: %s", server_round, exc)
            return None, {}
        # Encode layer by layer, letting go of each array once encoded (unless the
        # strategy keeps it), so the model is not held twice over at the end of a round.
        # A running mean kept where its first result was received is already in its .npy
        # place: it becomes the tensor without a copy (and read-only).
        pending = list(updated)
        del aggregated, updated
        tensors: list[bytes | memoryview] = []
        while pending:
            tensors.append(ndarray_to_tensor(pending.pop(0)))
        parameters = Parameters(tensors=tensors, tensor_type=TENSOR_TYPE)
        return parameters, self.aggregate_fit_metrics(checked.accepted)

    def fit_accumulator(self, server_round: int) -> FitAccumulator | None:
        """A :class:`~stamen.server.strategy.FitAccumulator` for the round, or None.

        The accumulator checks each result as :meth:`aggregate_fit` does, folds it into a
        compact running sum right away and keeps only its ``(num_examples, metrics)``;
        :meth:`finish <stamen.server.strategy.FitAccumulator.finish>` applies
        :meth:`refuse_round`, :meth:`server_update` and :meth:`aggregate_fit_metrics` (the
        accepted ``FitRes`` it passes carry no tensors). Its result equals
        :meth:`aggregate_fit`'s on the same results and failures in the same order, to
        the bit when each layer keeps one dtype and none is float16. One difference in
        the log: with ``accept_failures=False``, results that arrive before a failure are
        still checked (and refusals logged), where :meth:`aggregate_fit` would not look
        at them.

        None — the server collects the results and calls :meth:`aggregate_fit` — when the
        class (or the instance) overrides :meth:`aggregate_fit` or
        :meth:`aggregate_checked`, whose rules may need all the results, or when the global
        model's layout is unknown (no :meth:`configure_fit` for the round, or an empty or
        non-NumPy model): the results are then checked against each other.
        """
        own_rule = (
            getattr(self.aggregate_fit, "__func__", None) is FedAvg.aggregate_fit
            and getattr(self.aggregate_checked, "__func__", None) is FedAvg.aggregate_checked
        )
        if not own_rule:
            return None
        reference = self.reference_layout()
        if reference is None:
            return None
        return _FedAvgAccumulator(self, server_round, reference)

    def fit_prefold(self, server_round: int) -> FitPrefold | None:
        """A prefold that checks each result and folds the mean as the results arrive,
        when a subclass overrides :meth:`aggregate_fit` (to save the model, say) but keeps
        the rule (:meth:`aggregate_checked`), or None.

        If the override calls ``super().aggregate_fit`` with the results as the server
        gave them (the same objects, unchanged, in the same order), the mean folded is the
        aggregate, to the bit what the list of results gives at the end (float32 layers
        summed in float32 by both); otherwise it is not used, and the aggregate is
        computed from the list. The checks' verdicts are used for any result the prefold
        saw, unchanged: a refusal is logged when ``aggregate_fit`` comes to it, as
        without a prefold.
        """
        own_rule = getattr(self.aggregate_checked, "__func__", None) is FedAvg.aggregate_checked
        reference = self.reference_layout()
        if not own_rule or reference is None:
            return None
        prefold = _FedAvgPrefold(server_round, reference)
        self._prefold = weakref.ref(prefold)
        return prefold

    def _prefold_of(self, server_round: int) -> _FedAvgPrefold | None:
        """The prefold of ``server_round``, if the server still holds it."""
        prefold = None if self._prefold is None else self._prefold()
        if prefold is None or prefold.server_round != server_round:
            return None
        return prefold

    def refuse_round(self, checked: CheckedFitResults) -> str | None:
        """Why the round must not be aggregated after the checks, or None."""
        if checked.stopped:
            return "a result was refused and accept_failures=False"
        return None

    def aggregate_checked(self, server_round: int, checked: CheckedFitResults) -> NDArrays | None:
        """The aggregation rule: here the weighted mean of the valid results.

        Subclasses change the rule here; ``checked`` yields the valid results, decoded as
        read-only views over their bytes (so holding them all costs no memory). It must
        not change the strategy's state: the round may still be refused after it (see
        :meth:`refuse_round`); state changes belong in :meth:`server_update`. A subclass
        that overrides it gets no :meth:`fit_accumulator`.

        Raises:
            RunError: nothing can be aggregated (the reason is logged).
        """
        models = fit_results_of(checked)
        prefold = self._prefold_of(server_round)
        folded = None if prefold is None else prefold.mean_of(models)
        return folded if folded is not None else aggregate(models)

    def server_update(self, server_round: int, aggregated: NDArrays) -> NDArrays:
        """The server-side step from the aggregate to the new global model (here: none).

        Called only for a round that is aggregated, so the state it updates (momentum,
        optimizer moments) never sees a refused round. FedAvgM and FedOpt override it.

        Raises:
            RunError: the step cannot be taken (the reason is logged).
        """
        return aggregated

    def failures_refuse_round(self, server_round: int, failures: FitFailures) -> bool:
        """True (and logged) when ``accept_failures=False`` and the round has failures."""
        if self.accept_failures or not failures:
            return False
        logger.warning(
            "round %s: %d failure(s) and accept_failures=False: not aggregating",
            server_round,
            len(failures),
        )
        return True

    def aggregate_fit_metrics(self, accepted: FitResults) -> Metrics:
        """``fit_metrics_aggregation_fn`` over the accepted results, or ``{}``."""
        if self.fit_metrics_aggregation_fn is None:
            return {}
        return self.fit_metrics_aggregation_fn([(r.num_examples, r.metrics) for _, r in accepted])

    def aggregate_evaluate(
        self, server_round: int, results: EvaluateResults, failures: EvaluateFailures
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Loss averaged by examples over the valid results; metrics through the hook."""
        if not results:
            return None, {}
        if not self.accept_failures and failures:
            return None, {}
        valid, all_failures = validate_evaluate_results(server_round, results, failures)
        if not self.accept_failures and len(all_failures) > len(failures):
            logger.warning(
                "round %s: an evaluate result was refused and accept_failures=False: "
                "not aggregating",
                server_round,
            )
            return None, {}
        refusal = self.refuse_evaluate_round(len(valid), len(all_failures))
        if refusal is not None:
            logger.warning("round %s: not aggregating the evaluation: %s", server_round, refusal)
            return None, {}
        try:
            loss = weighted_loss_avg([(r.num_examples, r.loss) for _, r in valid])
        except RunError as exc:
            logger.error("round %s: cannot average losses: %s", server_round, exc)
            return None, {}
        metrics: dict[str, Scalar] = {}
        if self.evaluate_metrics_aggregation_fn is not None:
            metrics = self.evaluate_metrics_aggregation_fn(
                [(r.num_examples, r.metrics) for _, r in valid]
            )
        return loss, metrics

    def refuse_evaluate_round(self, num_valid: int, num_failures: int) -> str | None:
        """Why the evaluation round must not be aggregated, or None."""
        return None


class _FedAvgAccumulator:
    """The :class:`FitAccumulator` of FedAvg (see :meth:`FedAvg.fit_accumulator`).

    Safe to feed from several threads: :meth:`add` folds one result at a time.
    """

    def __init__(self, strategy: FedAvg, server_round: int, reference: ModelLayout) -> None:
        self._strategy = strategy
        self._round = server_round
        self._checked = CheckedFitResults(
            server_round,
            [],
            [],
            reference,
            stop_on_refusal=not strategy.accept_failures,
            keep_tensors=False,
        )
        # Compact: float32 layers as a running mean (one model's worth of memory, not two).
        self._sum: WeightedSum | None = WeightedSum(compact=True)
        self._received = 0
        self._lock = threading.Lock()

    def add(self, client: ClientProxy, res: FitRes) -> None:
        """Check ``res`` and fold its arrays into the sum; a refused result is a failure.

        Raises:
            RuntimeError: called after :meth:`finish`.
        """
        with self._lock:
            if self._sum is None:
                raise RuntimeError("FitAccumulator.add: the round is finished")
            self._received += 1
            if self._checked.stopped:  # aggregate_fit stops at the first refusal too
                return
            arrays = self._checked.check(client, res)
            if arrays is not None:
                # The server hands ``res`` over (FitAccumulator.add): this accumulator is
                # its receiver now, and holds the lease on the memory it lies in.
                lease = Lease.over(res.parameters.tensors)
                self._sum.add(arrays, res.num_examples, lease=lease)

    def finish(self, failures: FitFailures) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The round's aggregate, as :meth:`FedAvg.aggregate_fit` would give it.

        Raises:
            RuntimeError: called twice.
        """
        with self._lock:
            acc, self._sum = self._sum, None  # the sum is freed when this returns
        if acc is None:
            raise RuntimeError("FitAccumulator.finish: the round is already finished")
        strategy, server_round, checked = self._strategy, self._round, self._checked
        if self._received == 0 or strategy.failures_refuse_round(server_round, failures):
            return None, {}
        checked.failures = [*failures, *checked.failures]

        def mean() -> NDArrays:
            if acc.count == 0:
                raise RunError(no_valid_result(checked))
            return acc.mean(consume=True)

        return strategy._conclude_fit(server_round, checked, mean)


class _FedAvgPrefold:
    """The :class:`FitPrefold` of FedAvg (see :meth:`FedAvg.fit_prefold`): each result
    checked quietly and its arrays folded into a compact :class:`WeightedSum` as it
    arrives; at the end the mean, for :meth:`FedAvg.aggregate_checked` to take if it is
    given the very models folded, in their order."""

    def __init__(self, server_round: int, reference: ModelLayout) -> None:
        self.server_round = server_round
        self.reference = reference
        self._sum: WeightedSum | None = WeightedSum(compact=True)
        self._dtypes: list[np.dtype[Any]] | None = None
        # Each result seen, by id: (its FitRes, its Parameters, their tensors then, the
        # verdict). Holding them keeps the objects alive, so identity stays a fair test.
        self._seen: dict[int, tuple[FitRes, Parameters, tuple[object, ...], str, Verdict]] = {}
        self._folded: list[tuple[NDArrays, int]] = []

    def add(self, client: ClientProxy, res: FitRes) -> None:
        """Check ``res`` (nothing logged) and fold its arrays if it is valid."""
        parameters = res.parameters
        judged = verdict(res, self.reference)
        tensors = tuple(parameters.tensors)
        self._seen[id(res)] = (res, parameters, tensors, parameters.tensor_type, judged)
        arrays = judged[0]
        if arrays is None or self._sum is None:
            return
        dtypes = [a.dtype for a in arrays]
        if self._dtypes is None:
            self._dtypes = dtypes
        # The list path computes the same bits only for layers of one dtype throughout
        # and not float16 (a compact sum keeps those as a running mean): give up there.
        if dtypes != self._dtypes or any(d == np.float16 for d in dtypes):
            self._sum = None
            return
        self._sum.add(arrays, res.num_examples)
        self._folded.append((arrays, res.num_examples))

    def verdict_of(self, res: FitRes) -> Verdict | None:
        """The verdict given to ``res`` as it arrived, if it is unchanged since."""
        entry = self._seen.get(id(res))
        if entry is None or entry[0] is not res:
            return None
        _, parameters, tensors, tensor_type, judged = entry
        unchanged = (
            res.parameters is parameters
            and parameters.tensor_type == tensor_type
            and len(parameters.tensors) == len(tensors)
            and all(a is b for a, b in zip(parameters.tensors, tensors, strict=True))
        )
        return judged if unchanged else None

    def mean_of(self, models: Sequence[tuple[NDArrays, int]]) -> NDArrays | None:
        """The folded mean, if ``models`` are the models folded (the same arrays, in the
        same order, with the same weights); else None. Asked once: the sum is let go
        either way (not held while the list path computes the aggregate)."""
        folded, acc = self._folded, self._sum
        self._sum = None
        same = len(models) == len(folded) and all(
            arrays is arrays_folded and weight == weight_folded
            for (arrays, weight), (arrays_folded, weight_folded) in zip(models, folded, strict=True)
        )
        if acc is None or not same or acc.count == 0:
            return None
        return acc.mean(consume=True)


def no_valid_result(checked: CheckedFitResults) -> str:
    """The error message of a round in which no result can be aggregated."""
    total = len(checked.accepted) + len(checked.refused)
    message = (
        f"no valid result to aggregate: {len(checked.refused)} of {total} result(s) "
        "were refused (the reasons are logged above)"
    )
    return message


def fit_results_of(checked: CheckedFitResults) -> list[tuple[NDArrays, int]]:
    """All valid results as ``(ndarrays, num_examples)``, for rules that need them all.

    Raises:
        RunError: there is no valid result.
    """
    models = [(arrays, fit_res.num_examples) for _, fit_res, arrays in checked]
    if not models:
        raise RunError(no_valid_result(checked))
    return models
