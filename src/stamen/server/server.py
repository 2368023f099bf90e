"""``Server``: the round loop, and ``ServerConfig``."""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import ConfigError, InvalidResult, ProtocolError, RunError
from ..memory import scale_collector
from ..messages import (
    Code,
    DisconnectRes,
    EvaluateRes,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    Instruction,
    Parameters,
    ReconnectIns,
    Reply,
    Status,
)
from ..ndarrays import RECEIVE_POOL, pooled_parameters
from ..protocol.mailbox import ReplyUse
from ..typing import Scalar
from .checkpoint import Checkpoint, Checkpointer
from .client_manager import ClientManager
from .client_proxy import (
    ClientProxy,
    Deliveries,
    batched_posts,
    forget_encodings,
    tracking,
)
from .events import (
    ReplyArrived,
    ResultRefused,
    RoundEnded,
    RoundStarted,
    RunEnded,
    RunEvents,
    RunStarted,
)
from .history import History
from .progress import ProgressLog
from .spill import SpillStore, is_spilled
from .strategy import FedAvg, Strategy
from .strategy.strategy import FitAccumulator, FitPrefold
from .strategy.validate import collect_refusals

__all__ = ["Server", "ServerConfig"]

logger = logging.getLogger("stamen.server")

_DISCONNECT_TIMEOUT = 10.0


@dataclass
class ServerConfig:
    """How many rounds to run, and how long a round may wait for its clients.

    Attributes:
        num_rounds: Number of rounds (fit, then evaluate).
        round_timeout: Seconds a client has to answer an instruction; a client that does not
            counts as a failure of that round. None waits as long as the client is connected.
    """

    num_rounds: int = 1
    round_timeout: float | None = None

    def __post_init__(self) -> None:
        if (
            isinstance(self.num_rounds, bool)
            or not isinstance(self.num_rounds, int)
            or self.num_rounds < 0
        ):
            raise ConfigError(
                f"ServerConfig.num_rounds: expected an int >= 0, received {self.num_rounds!r}"
            )
        if self.round_timeout is not None and (
            isinstance(self.round_timeout, bool)
            or not isinstance(self.round_timeout, int | float)
            or not self.round_timeout > 0
        ):
            raise ConfigError(
                "ServerConfig.round_timeout: expected None or a number > 0, "
                f"received {self.round_timeout!r}"
            )


R = TypeVar("R", bound=Reply)
"""The kind of reply a call of :func:`run_instructions` expects."""

Results = list[tuple[ClientProxy, R]]
"""The OK replies of a round, with the proxy that answered each."""

Failures = list[tuple[ClientProxy, R] | BaseException]
"""A round's failures: replies whose status is not OK, and errors."""


_DONE: Future[Reply] = Future()


def _outcome(
    proxy: ClientProxy,
    future: Future[Reply],
    expect: type[R],
    filed: tuple[Results[R], Failures[R]],
    level: int,
) -> R | None:
    """File one finished call under results or failures; the reply if it is a result."""
    error = future.exception()
    if error is None:
        reply = future.result()
        if isinstance(reply, expect):
            return _file(proxy, reply, filed)
        error = ProtocolError(
            f"client {proxy.cid}: expected {expect.__name__}, received {type(reply).__name__}"
        )
    logger.log(level, "client %s failed: %s", proxy.cid, error)
    filed[1].append(error)
    return None


def _file(proxy: ClientProxy, reply: R, filed: tuple[Results[R], Failures[R]]) -> R | None:
    """File a reply: a result if its status is OK (or it has none), else a failure."""
    status: Status | None = getattr(reply, "status", None)  # DisconnectRes has none
    if status is not None and status.code != Code.OK:
        logger.warning("client %s answered %s: %s", proxy.cid, status.code.name, status.message)
        filed[1].append((proxy, reply))
        return None
    filed[0].append((proxy, reply))
    return reply


def _observer(
    observe: Callable[[ClientProxy, Future[Reply]], None], proxy: ClientProxy
) -> Callable[[Future[Reply]], None]:
    """A done-callback that tells ``observe`` which proxy's future ended."""
    return lambda future: observe(proxy, future)


def _reply_event(
    server_round: int, phase: str, proxy: ClientProxy, future: Future[Reply]
) -> ReplyArrived:
    """What one ended call says about its node: a result, or a failure and why."""
    error = future.exception()
    if error is not None:
        return ReplyArrived(
            server_round, phase, proxy.cid, False, f"{type(error).__name__}: {error}"
        )
    status: Status | None = getattr(future.result(), "status", None)
    if status is not None and status.code != Code.OK:
        return ReplyArrived(
            server_round, phase, proxy.cid, False, f"{status.code.name}: {status.message}"
        )
    return ReplyArrived(server_round, phase, proxy.cid, True)


def _signal(done: queue.SimpleQueue[int], index: int) -> Callable[[Future[Any]], None]:
    """A done-callback that puts ``index`` in ``done``."""
    return lambda _future: done.put(index)


PARK_STREAMING_FROM = 3
"""Replies still to come, once every node has its instruction, from which a streaming
round parks the old global model on disk (a round that collects its results always
does). A streaming round folds each reply as it lands, so parking saves one model of
memory while the remaining replies are received, for the price of writing the model
out (0.1-0.2 s per 400 MB once its spill file is warm, seconds while the page cache
grows). With two nodes that is one reply's reception. On 2 x 400 MB (bench ``D``) every
run that parked had a slow second round (6.8-8.0 s, four runs), against one run in three
without (7.0 s; 1.8-1.9 s otherwise), for 390 MB less at the peak: two-node rounds keep
the model in memory (bench/HISTORY.md)."""

_DELIVERED = -1
"""What :func:`run_instructions` finds in its queue once every node has its instruction."""


def run_instructions(
    instructions: Sequence[tuple[ClientProxy, Instruction]],
    timeout: float | None,
    *,
    expect: type[R],
    log_level: int = logging.WARNING,
    on_result: Callable[[ClientProxy, R], R] | None = None,
    observe: Callable[[ClientProxy, Future[Reply]], None] | None = None,
    replies: ReplyUse | None = None,
    on_delivered: Callable[[int], None] | None = None,
    hold: int | None = None,
) -> tuple[Results[R], Failures[R]]:
    """Send every instruction at once and wait for all replies.

    A reply whose status is not OK is a failure ``(proxy, reply)``; an error (timeout,
    disconnect, protocol, a reply that is not an ``expect``) is a failure too. Without
    ``on_result``, results keep the order of ``instructions``. With it, each result is
    handed to ``on_result`` on this thread as soon as it and every result before it have
    arrived (so in the order of ``instructions``: aggregation is reproducible whatever
    the arrival order), and what it returns is kept in its place: a reply stripped of its
    parameters lets them be freed. The proxies are told so
    (:attr:`~stamen.protocol.mailbox.ReplyUse.FOLDED`), and give a large reply's receive slot
    back only once its memory is freed.

    Args:
        instructions: ``(proxy, instruction)`` pairs; every instruction is answered by
            an ``expect``.
        timeout: Seconds each client has to answer; None: as long as it is connected.
        expect: The reply class that answers the instructions (``FitRes`` for ``FitIns``).
        log_level: The level at which errors are logged.
        on_result: Folds each result as it arrives (streaming aggregation).
        observe: Told of each reply's future as soon as it ends, in arrival order, on
            whichever thread ends it (progress views); must not block.
        replies: What is done with the replies (default: ``KEPT`` without ``on_result``,
            ``FOLDED`` with it); ``SPILLED``: ``on_result`` keeps them in spill files.
        on_delivered: With ``on_result``: called on this thread, between two results,
            once every node has its whole instruction (or its instruction has ended), if
            the proxies can tell (Stamen's network nodes: :class:`Deliveries`), with
            the number of replies not in yet.
        hold: With ``on_result`` and ``on_delivered``: at most this many large
            replies are received before ``on_delivered`` has run (the proxies'
            receive slots are held: :class:`Deliveries`); None: no hold.
    """
    use = replies or (ReplyUse.KEPT if on_result is None else ReplyUse.FOLDED)
    done: queue.SimpleQueue[int] = queue.SimpleQueue()
    held = None if on_result is None or on_delivered is None else hold
    deliveries = Deliveries(lambda: done.put(_DELIVERED), held)
    with batched_posts(), tracking(deliveries):  # one wake-up of the fleet's loop
        futures = [(proxy, proxy.send(ins, timeout, use)) for proxy, ins in instructions]
    if observe is not None:
        for proxy, future in futures:
            future.add_done_callback(_observer(observe, proxy))
    filed: tuple[Results[R], Failures[R]] = ([], [])
    if on_result is None:
        concurrent.futures.wait([f for _, f in futures])
        for proxy, future in futures:
            _outcome(proxy, future, expect, filed, log_level)
        return filed
    for index, (_, future) in enumerate(futures):
        future.add_done_callback(_signal(done, index))
    deliveries.seal(len(futures))
    arrived: set[int] = set()
    results = filed[0]
    try:
        for position in range(len(futures)):
            while position not in arrived:
                index = done.get()  # every future ends: replies, timeouts, disconnects
                if index == _DELIVERED:
                    if on_delivered is not None:
                        on_delivered(len(futures) - len(arrived))
                    deliveries.release_hold()
                    continue
                arrived.add(index)
            proxy, future = futures[position]
            futures[position] = (proxy, _DONE)  # drop our reference to the reply
            reply = _outcome(proxy, future, expect, filed, log_level)
            if reply is not None:
                results[-1] = (proxy, on_result(proxy, reply))
            del future, reply
    finally:
        deliveries.release_hold()  # every instruction ended without it, or an error
    return filed


_REASONS_SHOWN = 3
"""Failures described one by one in the warning of a round that aggregated nothing."""


def _describe_failure(failure: tuple[ClientProxy, Reply] | BaseException) -> str:
    if isinstance(failure, BaseException):
        return f"{type(failure).__name__}: {failure}"
    proxy, reply = failure
    status: Status | None = getattr(reply, "status", None)
    if status is None:
        return f"client {proxy.cid}: {type(reply).__name__}"
    return f"client {proxy.cid} answered {status.code.name}: {status.message}"


def _nothing_aggregated(
    results: Sequence[tuple[ClientProxy, Reply]], failures: Sequence[Any]
) -> str:
    """Why a fit round aggregated nothing, from its results and failures."""
    if not results and not failures:
        return "no results"
    parts = []
    if results:
        parts.append(
            f"{len(results)} result(s) not aggregated by the strategy (its reasons are logged)"
        )
    if failures:
        shown = "; ".join(_describe_failure(f) for f in failures[:_REASONS_SHOWN])
        more = (
            f"; and {len(failures) - _REASONS_SHOWN} more" if len(failures) > _REASONS_SHOWN else ""
        )
        parts.append(f"{len(failures)} failure(s): {shown}{more}")
    return ", ".join(parts)


def _folder(accumulator: FitAccumulator) -> Callable[[ClientProxy, FitRes], FitRes]:
    """Streaming aggregation: fold each fit result as it arrives, keep it without its
    parameters (so no client's model outlives its arrival)."""

    def fold(proxy: ClientProxy, reply: FitRes) -> FitRes:
        accumulator.add(proxy, reply)
        empty = Parameters(tensors=[], tensor_type=reply.parameters.tensor_type)
        return FitRes(reply.status, empty, reply.num_examples, reply.metrics)

    return fold


def _kept(
    take: Callable[[ClientProxy, FitRes], FitRes], prefold: FitPrefold | None
) -> Callable[[ClientProxy, FitRes], FitRes]:
    """Collection: each fit result kept as ``take`` keeps it (in spill files beyond
    the budget), and shown to ``prefold`` (if any) as it is kept."""
    if prefold is None:
        return take

    def keep(proxy: ClientProxy, reply: FitRes) -> FitRes:
        kept = take(proxy, reply)
        prefold.add(proxy, kept)
        return kept

    return keep


class Server:
    """Runs a strategy's rounds over the clients of a client manager.

    When the strategy offers a :class:`~stamen.server.strategy.FitAccumulator` (FedAvg
    does), fit results are aggregated as they arrive and dropped, so the server holds
    one model's worth of running sums instead of every client's model; the ``results``
    that :meth:`fit_round` returns then carry no parameters.
    """

    def __init__(
        self,
        *,
        client_manager: ClientManager,
        strategy: Strategy | None = None,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self.checkpointer = checkpointer
        self._client_manager = client_manager
        self.strategy: Strategy = strategy if strategy is not None else FedAvg()
        self.parameters = Parameters(tensors=[], tensor_type="numpy.ndarray")
        self.max_workers: int | None = None
        self.spill = SpillStore(None if checkpointer is None else checkpointer.directory)
        """Where the results of a round without streaming aggregation wait beyond a RAM
        budget (:class:`~stamen.server.spill.SpillStore`)."""
        self.events = RunEvents()
        """What happens in the run, as :mod:`~stamen.server.events` (progress views
        subscribe here); a :class:`~stamen.server.progress.ProgressLog` logs it."""
        self.events.subscribe(ProgressLog())
        if client_manager.events is None:
            client_manager.events = self.events  # waits for clients are part of the run

    def set_max_workers(self, max_workers: int | None) -> None:
        """Accepted for compatibility: client calls need no worker threads here."""
        self.max_workers = max_workers

    def set_strategy(self, strategy: Strategy) -> None:
        """Replace the strategy."""
        self.strategy = strategy

    def client_manager(self) -> ClientManager:
        """The client manager."""
        return self._client_manager

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        """Run ``num_rounds`` rounds; return the History and the elapsed seconds.

        A fit round in which nothing is aggregated keeps the current model and logs a
        WARNING with the reason (which clients failed and how, or no results). A run in
        which no fit round aggregated anything fails: it raises :class:`RunError` with
        the reasons, after its last round (Flower ends such a run as if it had trained).

        With a checkpointer, the run resumes after the newest good checkpoint (global
        parameters, History and strategy state as they were), and a checkpoint is written
        after every round.
        """
        start = time.monotonic()
        try:
            history = self._fit(num_rounds, timeout, start)
        except BaseException as exc:
            self.events.publish(
                RunEnded(
                    False, num_rounds, time.monotonic() - start, f"{type(exc).__name__}: {exc}"
                )
            )
            raise
        finally:
            self.spill.close()
        elapsed = time.monotonic() - start
        self.events.publish(RunEnded(True, num_rounds, elapsed))
        return history, elapsed

    def _fit(self, num_rounds: int, timeout: float | None, start: float) -> History:
        history, first_round = self._start_or_resume(timeout)
        self.events.publish(RunStarted(num_rounds, type(self.strategy).__name__, first_round))
        not_aggregated: list[str] = []  # why, for each fit round that aggregated nothing
        fit_rounds = 0
        for server_round in range(first_round, num_rounds + 1):
            # No local keeps a round's results or models into the next round (the old
            # model is let go while a round's results are aggregated).
            why = self._take_fit(server_round, self.fit_round(server_round, timeout), history)
            if why is not None:
                fit_rounds += 1
                if why:
                    not_aggregated.append(f"round {server_round}: {why}")
            self._evaluate_centralized(server_round, history)
            evaluated = self.evaluate_round(server_round, timeout)
            if evaluated is not None:
                loss, eval_metrics, _ = evaluated
                if loss is not None:
                    history.add_loss_distributed(server_round, loss)
                    history.add_metrics_distributed(server_round, eval_metrics)
            if self.checkpointer is not None:
                state = self.strategy.state_dict()
                self.checkpointer.save(Checkpoint(server_round, self.parameters, history, state))
        if fit_rounds and len(not_aggregated) == fit_rounds:
            raise RunError(
                f"the run failed: none of its {fit_rounds} fit round(s) aggregated anything, "
                "so the model never trained; " + " | ".join(not_aggregated)
            )
        return history

    def _take_fit(
        self,
        server_round: int,
        fitted: (
            tuple[Parameters | None, dict[str, Scalar], tuple[Results[FitRes], Failures[FitRes]]]
            | None
        ),
        history: History,
    ) -> str | None:
        """Keep what a fit round gave: None if it did not run, else why it aggregated
        nothing ("" if it did)."""
        if fitted is None:
            return None
        parameters, fit_metrics, (results, failures) = fitted
        history.add_metrics_distributed_fit(server_round, fit_metrics)
        if parameters is None:
            return _nothing_aggregated(results, failures)
        # An object of the server's own: parking it (SpillStore.park) swaps its tensors
        # in place, which must not change an object the strategy may have kept.
        self.parameters = Parameters(list(parameters.tensors), parameters.tensor_type)
        return ""

    def _start_or_resume(self, timeout: float | None) -> tuple[History, int]:
        resumed = None if self.checkpointer is None else self.checkpointer.load_latest()
        if resumed is None:
            history = History()
            # In pooled memory: once a round replaces it, it serves the next messages.
            self.parameters = pooled_parameters(self._get_initial_parameters(timeout))
            self._evaluate_centralized(0, history)
            return history, 1
        self.strategy.load_state_dict(resumed.strategy_state)
        self.parameters = pooled_parameters(resumed.parameters)
        logger.info("resuming after round %d from a checkpoint", resumed.server_round)
        return resumed.history, resumed.server_round + 1

    def _evaluate_centralized(self, server_round: int, history: History) -> None:
        result = self.strategy.evaluate(server_round, parameters=self.parameters)
        if result is None:
            return
        loss, metrics = result
        history.add_loss_centralized(server_round, loss)
        history.add_metrics_centralized(server_round, metrics)
        logger.info("round %d: centralized loss %.4f %s", server_round, loss, metrics)

    def fit_round(
        self, server_round: int, timeout: float | None
    ) -> (
        tuple[Parameters | None, dict[str, Scalar], tuple[Results[FitRes], Failures[FitRes]]] | None
    ):
        """One training round; None if the strategy picked no clients."""
        instructions = self.strategy.configure_fit(
            server_round, self.parameters, self._client_manager
        )
        if not instructions:
            logger.info("round %d: no clients selected for fit", server_round)
            return None
        scale_collector(len(instructions))  # if the entry point tuned it (stamen.memory)
        accumulator = self.strategy.fit_accumulator(server_round)
        # Without an accumulator every result is kept to the end: beyond the RAM budget,
        # in spill files that the aggregation reads a part at a time; a prefold sees
        # each one as it arrives.
        prefold = None if accumulator is not None else self.strategy.fit_prefold(server_round)
        fold = _folder(accumulator) if accumulator is not None else _kept(self.spill.take, prefold)
        self.spill.begin()
        began = time.monotonic()
        self.events.publish(RoundStarted(server_round, "fit", len(instructions)))

        def park(outstanding: int) -> None:
            # Every node has its instruction: the old model waits on disk while the
            # results are received and aggregated, and its memory takes theirs. A
            # streaming round parks it only with replies from PARK_STREAMING_FROM nodes
            # or more still to come (see there).
            if accumulator is None or outstanding >= PARK_STREAMING_FROM:
                forget_encodings()
                self.spill.park(self.parameters)  # nothing if parked already

        # Until the old model is parked, one reply at most is received (the first, which
        # a streaming round keeps as its running sum): the next would be one model more
        # in memory, where once parked it takes the old model's. (A streaming round then
        # parks with one reply fewer to come than it has nodes.)
        parks = accumulator is None or len(instructions) - 1 >= PARK_STREAMING_FROM
        with collect_refusals() as refused:
            results, failures = run_instructions(
                instructions,
                timeout,
                expect=FitRes,
                on_result=fold,
                observe=self._observer(server_round, "fit"),
                replies=ReplyUse.SPILLED if accumulator is None else ReplyUse.FOLDED,
                on_delivered=park,
                hold=1 if parks and self.spill.parks(self.parameters) else None,
            )
            if accumulator is None:
                park(0)
                # Every reply is in: the receive buffers cached for the next round need
                # not stay resident while the round is aggregated. (A streaming round
                # has aggregated already: its buffers stay, warm for the next round.)
                RECEIVE_POOL.trim()
                # A list of its own: the strategy may reorder or trim it.
                parameters, metrics = self.strategy.aggregate_fit(
                    server_round, list(results), failures
                )
            else:
                parameters, metrics = accumulator.finish(failures)
            del prefold, fold  # its fold is not kept past aggregate_fit
            if parameters is None and is_spilled(self.parameters):
                self.parameters = pooled_parameters(self.parameters)  # it stays: back in RAM
        self._tell_refused(server_round, refused)
        self.spill.end(server_round)
        self.events.publish(
            RoundEnded(
                server_round,
                "fit",
                len(results),
                len(failures),
                time.monotonic() - began,
                aggregated=parameters is not None,
                metrics=dict(metrics),
                reasons=() if parameters is not None else (_nothing_aggregated(results, failures),),
            )
        )
        return parameters, metrics, (results, failures)

    def _tell_refused(self, server_round: int, refused: Sequence[InvalidResult]) -> None:
        """Publish each refused fit result, and have its node's proxy tell the node."""
        for refusal in refused:
            proxy = refusal.proxy
            if not isinstance(refusal.result, FitRes) or not isinstance(proxy, ClientProxy):
                continue
            self.events.publish(ResultRefused(server_round, proxy.cid, refusal.reason))
            proxy.result_refused(server_round, refusal.reason)

    def _observer(
        self, server_round: int, phase: str
    ) -> Callable[[ClientProxy, Future[Reply]], None]:
        """Publishes each reply of a round as it arrives."""
        return lambda proxy, future: self.events.publish(
            _reply_event(server_round, phase, proxy, future)
        )

    def evaluate_round(
        self, server_round: int, timeout: float | None
    ) -> (
        tuple[float | None, dict[str, Scalar], tuple[Results[EvaluateRes], Failures[EvaluateRes]]]
        | None
    ):
        """One federated evaluation round; None if the strategy picked no clients."""
        instructions = self.strategy.configure_evaluate(
            server_round, self.parameters, self._client_manager
        )
        if not instructions:
            return None
        began = time.monotonic()
        self.events.publish(RoundStarted(server_round, "evaluate", len(instructions)))
        results, failures = run_instructions(
            instructions,
            timeout,
            expect=EvaluateRes,
            observe=self._observer(server_round, "evaluate"),
        )
        loss, metrics = self.strategy.aggregate_evaluate(server_round, list(results), failures)
        self.events.publish(
            RoundEnded(
                server_round,
                "evaluate",
                len(results),
                len(failures),
                time.monotonic() - began,
                aggregated=loss is not None,
                loss=loss,
                metrics=dict(metrics),
                reasons=() if loss is not None else (_nothing_aggregated(results, failures),),
            )
        )
        return loss, metrics, (results, failures)

    def _get_initial_parameters(self, timeout: float | None) -> Parameters:
        parameters = self.strategy.initialize_parameters(client_manager=self._client_manager)
        if parameters is not None:
            logger.info("using the strategy's initial parameters")
            return parameters
        logger.info("asking one random client for initial parameters")
        client = self._client_manager.sample(1)[0]
        try:
            reply = client.submit(GetParametersIns(config={}), timeout).result()
        except Exception as exc:  # no answer at all: as in Flower, the run cannot start
            raise RunError(
                f"client {client.cid} could not give initial parameters: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(reply, GetParametersRes):
            raise RunError(
                f"client {client.cid} could not give initial parameters: expected "
                f"GetParametersRes, received {type(reply).__name__}"
            )
        if reply.status.code != Code.OK:
            # Flower 1.12 goes on with the (empty) parameters of the reply; so do we.
            logger.warning(
                "client %s could not give initial parameters (%s: %s): empty initial "
                "parameters will be used",
                client.cid,
                reply.status.code.name,
                reply.status.message,
            )
        return reply.parameters

    def disconnect_all_clients(self, timeout: float | None = _DISCONNECT_TIMEOUT) -> None:
        """Tell every connected client that the run is over (``ReconnectIns(0)``)."""
        clients = list(self._client_manager.all().values())
        instructions: list[tuple[ClientProxy, Instruction]] = [
            (c, ReconnectIns(seconds=None)) for c in clients
        ]
        # A node that hangs up instead of acknowledging (Flower nodes do) has still left.
        _, failures = run_instructions(
            instructions, timeout, expect=DisconnectRes, log_level=logging.DEBUG
        )
        if failures:
            logger.info("%d client(s) left without acknowledging the end of the run", len(failures))
