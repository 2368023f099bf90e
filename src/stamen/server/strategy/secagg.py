"""``SecAggPlus``: secure aggregation around a strategy; the server learns only the sum.

The protocol is :mod:`stamen.protocol.secagg` (SecAgg+, Bell et al., CCS 2020); this
module drives it over the round loop's ordinary instructions, with no hook in the
server:

* :meth:`SecAggPlus.configure_fit` lets the wrapped strategy sample the nodes and build
  their ``FitIns``, then runs SETUP and SHARE_KEYS itself, as ``GetPropertiesIns``
  round trips through the nodes' proxies; it returns the survivors' ``FitIns``, each with
  the protocol's config (the shares addressed to that node) added.
* The server sends them (COLLECT_MASKED) and hands each reply, as it arrives, to the
  round's :class:`~stamen.server.strategy.FitAccumulator`, which folds the masked vector
  into one running sum modulo ``modulus_range`` and drops it: the server holds one
  model's worth of integers, never a node's update.
* The accumulator's ``finish`` runs UNMASK (``GetPropertiesIns`` again), removes the
  masks, dequantizes, and gives the wrapped strategy's ``aggregate_fit`` the survivors'
  ``FitRes``, each carrying the aggregate (as Flower's SecAgg+ workflow does), so FedAvg
  and the FedAvg family aggregate as usual.
"""

from __future__ import annotations

import concurrent.futures
import logging
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from ...errors import ConfigError, ProtocolError
from ...messages import (
    Code,
    EvaluateIns,
    FitIns,
    FitRes,
    GetPropertiesIns,
    GetPropertiesRes,
    Instruction,
    Parameters,
    Reply,
    Status,
)
from ...ndarrays import ndarrays_to_parameters, parameters_to_views
from ...protocol import secagg_math
from ...protocol.mailbox import ReplyUse
from ...protocol.secagg import SecAggParams, SecAggServer, resolve_shares
from ...typing import Scalar
from ..client_manager import ClientManager
from ..client_proxy import ClientProxy
from .state import StrategyState
from .strategy import (
    EvaluateFailures,
    EvaluateResults,
    FitAccumulator,
    FitFailures,
    FitResults,
    Strategy,
)
from .validate import ModelLayout

__all__ = ["SecAggPlus"]

logger = logging.getLogger("stamen.server")

_OK = Status(code=Code.OK, message="Success")


class SecAggPlus(Strategy):
    """Secure aggregation (SecAgg+) around ``strategy``: the server learns the weighted sum
    of the round's updates, never one node's update.

    ``start_server(strategy=SecAggPlus(FedAvg(...), num_shares=..., ...))``, or
    ``ServerApp(strategy=SecAggPlus(...))``. Nodes need no change: Stamen nodes answer the
    protocol's stages before their client is called (:mod:`stamen.client.secagg`). A node
    that does not take part (a Flower node, a Stamen node older than SecAgg+ or of another
    SecAgg+ protocol version) is refused with an ERROR naming it and counted as a failure
    of the round: its update is never aggregated in the clear.

    Each node sends ``[w, w * parameters]`` quantized and masked, with
    ``w = min(num_examples, max_weight) / max_weight``; the server divides the sum by the
    sum of the weights. The aggregate equals FedAvg's weighted by
    ``min(num_examples, max_weight)`` within ``4 k c / (T sum w)`` per parameter, for ``k``
    nodes whose parameters lie within ``[-clipping_range, clipping_range]``
    (:mod:`stamen.protocol.secagg_math`); values outside are clipped.

    A node that fails or refuses at any stage is dropped; the round goes on with the
    survivors' sum while every node whose input counts keeps ``reconstruction_threshold``
    of its neighbours, and otherwise is not aggregated (the model is unchanged, a WARNING
    says why). Metrics and ``num_examples`` travel in the clear, as in Flower.

    Args:
        strategy: The strategy to wrap (FedAvg or one of its family: its
            ``aggregate_fit`` receives the survivors' FitRes, each with the aggregate).
        num_shares: Neighbours (itself included) among which each node shares its
            secrets; a float is a fraction of the round's nodes (Flower 1.12's meaning).
        reconstruction_threshold: Shares needed to rebuild a secret; a float is a
            fraction of ``num_shares``. At least this many of a node's neighbours must
            survive; fewer than this many colluding neighbours learn nothing.
        max_weight: The largest weight (``num_examples``) a node's update can have; more
            is clipped to it.
        clipping_range: Parameters are clipped to ``[-clipping_range, clipping_range]``
            (after weighting) before quantization.
        quantization_range: Parameters are quantized to integers in
            ``[0, quantization_range]``.
        modulus_range: The masks' modulus: a power of 2, at most 2**32, over
            ``quantization_range`` times the round's nodes.
        timeout: Seconds each node has to answer each key stage (None: as long as it is
            connected); the masked-input stage uses the server's round timeout.
        rng: Random bytes for the neighbour ring's order (default ``secrets.token_bytes``).
    """

    def __init__(
        self,
        strategy: Strategy,
        *,
        num_shares: int | float,
        reconstruction_threshold: int | float,
        max_weight: float = 1000.0,
        clipping_range: float = 8.0,
        quantization_range: int = 4194304,
        modulus_range: int = 4294967296,
        timeout: float | None = None,
        rng: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise ConfigError(
                f"SecAggPlus: expected a Strategy, received {type(strategy).__name__}"
            )
        _check_share_counts(num_shares, reconstruction_threshold)
        if not max_weight > 0 or not clipping_range > 0:
            raise ConfigError("SecAggPlus: max_weight and clipping_range must be > 0")
        if isinstance(quantization_range, bool) or not isinstance(quantization_range, int):
            raise ConfigError("SecAggPlus: quantization_range must be an int")
        if quantization_range <= 0:
            raise ConfigError("SecAggPlus: quantization_range must be > 0")
        if (
            isinstance(modulus_range, bool)
            or not isinstance(modulus_range, int)
            or not quantization_range < modulus_range <= 2**32
            or modulus_range & (modulus_range - 1)
        ):
            raise ConfigError(
                "SecAggPlus: modulus_range must be a power of 2 over quantization_range, at "
                f"most 2**32; received {modulus_range!r}"
            )
        if timeout is not None and not timeout > 0:
            raise ConfigError(f"SecAggPlus: timeout must be None or > 0, received {timeout!r}")
        self.strategy = strategy
        self.num_shares = num_shares
        self.reconstruction_threshold = reconstruction_threshold
        self.max_weight = float(max_weight)
        self.clipping_range = float(clipping_range)
        self.quantization_range = quantization_range
        self.modulus_range = modulus_range
        self.timeout = timeout
        self._rng = rng
        self._pending: _Round | None = None

    def __repr__(self) -> str:
        return (
            f"SecAggPlus({self.strategy!r}, num_shares={self.num_shares}, "
            f"reconstruction_threshold={self.reconstruction_threshold})"
        )

    # --- delegated ---------------------------------------------------------------------

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The wrapped strategy's."""
        return self.strategy.initialize_parameters(client_manager)

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """The wrapped strategy's (evaluation is not secured: losses are scalars)."""
        return self.strategy.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self, server_round: int, results: EvaluateResults, failures: EvaluateFailures
    ) -> tuple[float | None, dict[str, Scalar]]:
        """The wrapped strategy's."""
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """The wrapped strategy's."""
        return self.strategy.evaluate(server_round, parameters)

    def state_dict(self) -> StrategyState:
        """The wrapped strategy's (SecAgg+ keeps nothing between rounds)."""
        return self.strategy.state_dict()

    def load_state_dict(self, state: StrategyState) -> None:
        """The wrapped strategy's."""
        self.strategy.load_state_dict(state)

    # --- the secure round -----------------------------------------------------------------

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The wrapped strategy's sample and FitIns; SETUP and SHARE_KEYS run here, and the
        survivors get their FitIns with the stage's config.

        Returns no instruction (a WARNING says why; the model is unchanged) if too few
        nodes are left for the threshold.
        """
        self._pending = None
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        if not instructions:
            return []
        layout = ModelLayout.of_parameters(parameters)
        if layout is None:
            logger.warning(
                "round %s: SecAgg+ needs the global model's NumPy layout, and the model is "
                "empty or not NumPy: not aggregating",
                server_round,
            )
            return []
        proxies = {proxy.cid: (proxy, ins) for proxy, ins in instructions}
        try:
            shares, threshold = resolve_shares(
                self.num_shares, self.reconstruction_threshold, len(proxies)
            )
            params = SecAggParams(
                shares,
                threshold,
                self.clipping_range,
                self.quantization_range,
                self.modulus_range,
                self.max_weight,
            )
            length = 1 + sum(int(size) for size in (_size(shape) for shape in layout.shapes))
            state = SecAggServer(server_round, list(proxies), params, length, self._rng)
        except ConfigError as exc:
            logger.warning("round %s: SecAgg+ cannot run: %s; not aggregating", server_round, exc)
            return []
        logger.info(
            "round %s: SecAgg+ with %s nodes, num_shares=%s, reconstruction_threshold=%s",
            server_round,
            len(proxies),
            shares,
            threshold,
        )
        round_ = _Round(self, server_round, state, proxies, layout)
        for _ in range(2):  # SETUP, then SHARE_KEYS
            if not round_.key_stage():
                return []
        self._pending = round_
        return [
            (proxies[cid][0], FitIns(proxies[cid][1].parameters, {**proxies[cid][1].config, **cfg}))
            for cid, cfg in state.configs().items()
        ]

    def fit_accumulator(self, server_round: int) -> FitAccumulator | None:
        """The round's accumulator: masked vectors folded into one sum as they arrive."""
        pending, self._pending = self._pending, None
        if pending is None or pending.server_round != server_round:
            return None
        return pending

    def aggregate_fit(
        self, server_round: int, results: FitResults, failures: FitFailures
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Not used by the server (the accumulator aggregates); refuses clear results."""
        if results:
            logger.error(
                "round %s: SecAggPlus.aggregate_fit received %d result(s) outside the "
                "protocol: not aggregating updates in the clear",
                server_round,
                len(results),
            )
        return None, {}


def _size(shape: Sequence[int]) -> int:
    size = 1
    for dim in shape:
        size *= dim
    return size


def _check_share_counts(num_shares: object, threshold: object) -> None:
    for name, value in (("num_shares", num_shares), ("reconstruction_threshold", threshold)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"SecAggPlus: {name} must be an int or a float, received {value!r}")
        if isinstance(value, float) and not 0 < value <= 1:
            raise ConfigError(f"SecAggPlus: {name} as a float must lie in (0, 1]")
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"SecAggPlus: {name} must be >= 1")
    if isinstance(num_shares, int) and isinstance(threshold, int) and threshold > num_shares:
        raise ConfigError("SecAggPlus: reconstruction_threshold must not exceed num_shares")


_NOT_SUPPORTED = (
    "does not take part in Stamen SecAgg+ (a Flower node, a Stamen node older than "
    "SecAgg+, or one of another SecAgg+ protocol version): refused; its update is never "
    "aggregated in the clear"
)


class _Round:
    """One SecAgg+ round's driver: the stages' round trips, and the FitAccumulator."""

    def __init__(
        self,
        owner: SecAggPlus,
        server_round: int,
        state: SecAggServer,
        proxies: dict[str, tuple[ClientProxy, FitIns]],
        layout: ModelLayout,
    ) -> None:
        self.owner = owner
        self.server_round = server_round
        self.state = state
        self.proxies = proxies
        self.layout = layout
        self.replies: dict[str, FitRes] = {}
        self.refused: list[BaseException] = []

    def _exchange(self) -> dict[str, Reply | BaseException]:
        configs = self.state.configs()
        futures: dict[str, Future[Reply]] = {}
        for cid, config in configs.items():
            ins: Instruction = GetPropertiesIns(config=config)
            futures[cid] = self.proxies[cid][0].send(ins, self.owner.timeout, ReplyUse.KEPT)
        concurrent.futures.wait(list(futures.values()))
        return {cid: (f.exception() or f.result()) for cid, f in futures.items()}

    def _drop(self, cid: str, reason: str, level: int = logging.WARNING) -> None:
        stage = self.state.stage.value
        logger.log(
            level, "round %s: SecAgg+ %s: client %s %s", self.server_round, stage, cid, reason
        )
        self.state.drop(cid, reason)

    def key_stage(self) -> bool:
        """Run SETUP, SHARE_KEYS or UNMASK (whichever is due); False if the round failed."""
        setup = self.state.stage.value == "setup"
        for cid, reply in self._exchange().items():
            if isinstance(reply, BaseException):
                self._drop(cid, f"failed: {type(reply).__name__}: {reply}")
            elif not isinstance(reply, GetPropertiesRes):
                self._drop(cid, f"answered {type(reply).__name__}")
            elif reply.status.code != Code.OK:
                if setup and reply.status.code == Code.GET_PROPERTIES_NOT_IMPLEMENTED:
                    self._drop(cid, _NOT_SUPPORTED, logging.ERROR)
                else:
                    self._drop(cid, f"refused ({reply.status.code.name}: {reply.status.message})")
            else:
                try:
                    self.state.receive(cid, reply.properties)
                except ProtocolError as exc:
                    if setup:
                        self._drop(cid, _NOT_SUPPORTED, logging.ERROR)
                    else:
                        self._drop(cid, f"answered wrongly: {exc}")
        if self.state.advance():
            return True
        logger.warning(
            "round %s: SecAgg+ failed: %s; the model is unchanged",
            self.server_round,
            self.state.reason,
        )
        return False

    # --- FitAccumulator ---------------------------------------------------------------------

    def add(self, client: ClientProxy, res: FitRes) -> None:
        """Fold one masked input into the sum (a malformed one drops its node)."""
        try:
            arrays = parameters_to_views(res.parameters)
            if len(arrays) != 1:
                raise ProtocolError(f"{len(arrays)} arrays, not one masked vector")
            self.state.add_masked(client.cid, arrays[0])
        except Exception as exc:  # any malformed reply drops the node
            reason = f"sent no valid masked input: {exc}"
            self._drop(client.cid, reason, logging.ERROR)
            self.refused.append(ProtocolError(f"client {client.cid}: SecAgg+ masked: {reason}"))
            return
        self.replies[client.cid] = FitRes(
            res.status, Parameters(tensors=[], tensor_type=""), res.num_examples, res.metrics
        )

    def finish(
        self, failures: list[tuple[ClientProxy, FitRes] | BaseException]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """UNMASK, then the wrapped strategy's aggregate_fit over the survivors.

        The nodes dropped in the key stages are added to ``failures`` (as
        :class:`~stamen.errors.ProtocolError`), so the round counts them.
        """
        for cid, stage, reason in self.state.dropouts:
            if stage in ("setup", "share_keys"):
                failures.append(ProtocolError(f"client {cid}: SecAgg+ {stage}: {reason}"))
        failures.extend(self.refused)
        if not self.state.advance():
            logger.warning(
                "round %s: SecAgg+ failed: %s; the model is unchanged",
                self.server_round,
                self.state.reason,
            )
            return None, {}
        if not self.key_stage():  # UNMASK (it says why it failed)
            return None, {}
        state = self.state
        layers = secagg_math.dequantize(
            state.result(),
            len(state.contributors),
            self.layout.shapes,
            self.layout.dtypes,
            clipping_range=state.params.clipping_range,
            quantization_range=state.params.quantization_range,
        )
        aggregate = ndarrays_to_parameters(layers)
        del layers
        results: FitResults = [
            (
                self.proxies[cid][0],
                FitRes(_OK, aggregate, self.replies[cid].num_examples, self.replies[cid].metrics),
            )
            for cid in state.contributors
        ]
        logger.info(
            "round %s: SecAgg+ aggregated %d node(s); %d dropped",
            self.server_round,
            len(results),
            len(state.dropouts),
        )
        return self.owner.strategy.aggregate_fit(self.server_round, results, failures)
