"""The Ray backend: virtual client calls on Ray actors, on one machine or a cluster.

Ray is imported when the backend starts, never at ``import stamen``; without it the
error names the extra to install (``pip install 'stamen[ray]'``).

The backend keeps a pool of Ray actors, each holding the ``client_resources`` of one call
(``num_cpus``, ``num_gpus``, custom resources), as many as the cluster's nodes can hold;
Ray places them on any node that has the resources, so a simulation spans machines. Each
call runs :func:`~stamen.simulation.proxy.run_virtual_call` on an idle actor, so it starts
when it is submitted, and the instruction timeout counts from there. An actor serves one
call at a time and keeps nothing of it; the node's state travels with the call and comes
back with the reply. ``client_fn`` is put in the object store once, and an instruction
sent to many nodes once per round.

A call that outlives its timeout fails with :class:`~stamen.errors.Timeout`; its actor is
killed (which frees its resources) and replaced, and so is an actor whose process died. A
new actor takes calls once it is up, so a call's timeout never counts the start of a
worker process. While calls wait for an actor, the cluster's resources are recounted
every ``_RECOUNT_SECONDS`` and actors are added for nodes that joined; if no actor can
start within ``_READY_SECONDS``, the waiting calls fail with ConnectionLost.
"""

from __future__ import annotations

import collections
import functools
import importlib
import logging
import math
import threading
import time
from concurrent.futures import Future
from typing import Any

from ..errors import ConfigError, ConnectionLost, StamenError
from ..messages import Instruction
from ._deadlines import Deadline, Deadlines
from .backends import Backend, timeout_error
from .proxy import CallResult, VirtualCall, named_error, run_virtual_call

__all__ = ["RAY_MISSING", "RayBackend", "import_ray"]

logger = logging.getLogger("stamen.simulation")

RAY_MISSING = (
    "backend='ray' needs Ray, which is not installed: pip install 'stamen[ray]' "
    "(or use the default backend='threads')"
)

_DEFAULT_INIT_ARGS: dict[str, Any] = {
    "ignore_reinit_error": True,
    "include_dashboard": False,
    "_node_ip_address": "127.0.0.1",  # a local instance listens on loopback only
}
_RECOUNT_SECONDS = 10.0
_READY_SECONDS = 60.0
_PUT_CACHE_SIZE = 4


def import_ray() -> Any:
    """Import Ray.

    Raises:
        ImportError: Ray is not installed; the message names the extra to install.
    """
    try:
        return importlib.import_module("ray")
    except ImportError as exc:
        raise ImportError(RAY_MISSING) from exc


def _actor_options(client_resources: dict[str, float]) -> dict[str, Any]:
    resources = dict(client_resources)
    options: dict[str, Any] = {
        "num_cpus": resources.pop("num_cpus", 1),
        "num_gpus": resources.pop("num_gpus", 0),
        # A failed call is a failure of its round, as over the network: never re-run it.
        "max_restarts": 0,
        "max_task_retries": 0,
    }
    if resources:
        options["resources"] = resources
    return options


def _capacity(nodes: list[dict[str, Any]], client_resources: dict[str, float]) -> int:
    """How many calls with ``client_resources`` the live nodes can run at once."""
    needs = {"CPU": client_resources.get("num_cpus", 1), "GPU": client_resources.get("num_gpus", 0)}
    needs.update({k: v for k, v in client_resources.items() if k not in ("num_cpus", "num_gpus")})
    total = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources") or {}
        fits = [math.floor(have.get(key, 0.0) / need + 1e-9) for key, need in needs.items() if need]
        total += min(fits) if fits else max(1, math.floor(have.get("CPU", 1.0)))
    return total


class _Runner:
    """The Ray actor: runs virtual client calls, one at a time, keeping nothing."""

    def ready(self) -> bool:
        """Answer once the actor is up."""
        return True

    def run(self, client_fn: Any, context: Any, instruction: Instruction | bytes) -> CallResult:
        """Run one call (see :func:`~stamen.simulation.proxy.run_virtual_call`)."""
        return run_virtual_call(client_fn, context, instruction)


class _Job:
    __slots__ = ("actor", "call", "deadline", "future", "ref", "settled", "timeout")

    def __init__(self, call: VirtualCall, timeout: float | None) -> None:
        self.call = call
        self.timeout = timeout
        self.future: Future[CallResult] = Future()
        self.future.set_running_or_notify_cancel()
        self.actor: Any = None
        self.ref: Any = None
        self.deadline: Deadline | None = None
        self.settled = False  # the future's outcome is decided (under the backend's lock)


class RayBackend(Backend):
    """Runs every call on a pool of Ray actors that each hold ``client_resources``.

    Args:
        client_resources: Resources of one call: ``num_cpus`` (default 1), ``num_gpus``
            (default 0) and any custom Ray resource.
        ray_init_args: Arguments of ``ray.init``; None or ``{}`` means
            ``{"ignore_reinit_error": True, "include_dashboard": False}`` (as in Flower), on
            127.0.0.1 only.
            ``{"address": "auto"}`` joins the Ray cluster this machine belongs to.
        keep_initialised: If Ray is already initialised in this process, use it as it is
            (``ray_init_args`` are then ignored) and leave it running at the end.
            Otherwise Ray is (re)initialised with ``ray_init_args`` and shut down when
            the backend closes.
        scheduling_strategy: Ray scheduling strategy of the actors (``"DEFAULT"``,
            ``"SPREAD"``, or a Ray strategy object).
    """

    name = "ray"

    def __init__(
        self,
        client_resources: dict[str, float] | None = None,
        *,
        ray_init_args: dict[str, Any] | None = None,
        keep_initialised: bool = False,
        scheduling_strategy: Any = "DEFAULT",
    ) -> None:
        self._resources = {"num_cpus": 1.0} if client_resources is None else dict(client_resources)
        self._init_args = dict(ray_init_args) if ray_init_args else dict(_DEFAULT_INIT_ARGS)
        self._keep = keep_initialised
        self._scheduling = scheduling_strategy
        self._ray: Any = None
        self._actor_class: Any = None
        self._owns_ray = False
        self._capacity = 0
        self._counted_at = 0.0
        self._actors: set[Any] = set()  # alive: starting, idle or busy
        self._starting: dict[Any, float] = {}  # actor -> when it was created
        self._idle: collections.deque[Any] = collections.deque()
        self._replace = False  # an actor was lost: start a replacement
        self._queue: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self._dispatcher: threading.Thread | None = None
        self._puts: list[tuple[object, Any]] = []
        self._deadlines = Deadlines("stamen-sim-ray-deadlines")

    @property
    def concurrency(self) -> int:
        """Calls the cluster runs at once (as last counted)."""
        return self._capacity

    def start(self) -> None:
        """Initialise (or join) Ray, start one actor per call the cluster can hold.

        Waits (at most a minute) for the actors to be up.

        Raises:
            ImportError: Ray is not installed.
            ConfigError: no node of the cluster has the resources of one call.
        """
        if self._ray is not None:
            return
        ray = import_ray()
        if ray.is_initialized() and not self._keep:
            ray.shutdown()
        if not ray.is_initialized():
            ray.init(**self._init_args)
            self._owns_ray = True
        self._ray = ray
        self._recount()
        if self._capacity < 1:
            self.close()
            raise ConfigError(
                f"client_resources={self._resources}: no node of the Ray cluster can run one "
                f"virtual client (cluster resources: {ray.cluster_resources()})"
            )
        options = _actor_options(self._resources)
        options["scheduling_strategy"] = self._scheduling
        self._actor_class = ray.remote(_Runner).options(**options)
        self._grow()
        with self._cv:
            self._cv.wait_for(lambda: not self._starting, timeout=_READY_SECONDS)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="stamen-sim-ray-dispatch", daemon=True
        )
        self._dispatcher.start()
        logger.info(
            "Ray backend: %d concurrent virtual client(s) of %s on %s",
            self._capacity,
            self._resources,
            ray.cluster_resources(),
        )

    def submit(self, call: VirtualCall, timeout: float | None) -> Future[CallResult]:
        """Queue ``call``; it runs as soon as an actor is idle."""
        job = _Job(call, timeout)
        with self._cv:
            if self._closed or self._ray is None:
                raise RuntimeError("the Ray backend is not running")
            self._queue.append(job)
            self._cv.notify_all()
        return job.future

    def close(self, timeout: float = 10.0) -> None:
        """Fail queued calls, stop the actors; shut Ray down if this backend started it."""
        with self._cv:
            self._closed = True
            queued = list(self._queue)
            self._queue.clear()
            self._puts.clear()
            actors = list(self._actors)
            self._actors.clear()
            self._starting.clear()
            self._idle.clear()
            self._cv.notify_all()
        for job in queued:
            job.future.set_exception(
                ConnectionLost(
                    f"virtual client {job.call.cid}: the simulation ended before "
                    f"{job.call.stage} ran"
                )
            )
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        self._deadlines.close()
        if self._ray is None:
            return
        for actor in actors:
            self._kill(actor)
        if self._owns_ray and not self._keep:
            self._ray.shutdown()
            self._owns_ray = False

    # --- the actor pool ----------------------------------------------------------------------

    def _recount(self) -> None:
        self._capacity = _capacity(self._ray.nodes(), self._resources)
        self._counted_at = time.monotonic()

    def _grow(self) -> None:
        """Start actors until there is one per call the cluster can hold.

        A new actor takes calls once it answers ``ready``: a call's timeout never counts
        the start of a worker process.
        """
        with self._cv:
            missing = 0 if self._closed else self._capacity - len(self._actors)
        for _ in range(missing):
            actor = self._actor_class.remote()
            with self._cv:
                self._actors.add(actor)
                self._starting[actor] = time.monotonic()
            actor.ready.remote().future().add_done_callback(functools.partial(self._ready, actor))

    def _ready(self, actor: Any, answered: Future[bool]) -> None:
        """On a Ray thread: a new actor is up (or died starting)."""
        failed = answered.exception() is not None
        with self._cv:
            started = self._starting.pop(actor, None) is not None
            if started and not failed and actor in self._actors:
                self._idle.append(actor)
            else:
                self._actors.discard(actor)
            self._cv.notify_all()
        if failed:
            logger.warning("Ray backend: an actor failed to start: %s", answered.exception())

    def _kill(self, actor: Any) -> None:
        try:
            self._ray.kill(actor)
        except Exception:  # already dead: nothing to free
            logger.debug("Ray backend: killing an actor failed", exc_info=True)

    def _must_replenish(self) -> bool:  # with self._cv held
        if self._replace:
            return True
        if not self._queue:
            return False
        now = time.monotonic()
        if now - self._counted_at > _RECOUNT_SECONDS:
            return True  # calls wait for an actor: see whether the cluster grew
        return any(now - t > _READY_SECONDS for t in self._starting.values())

    def _dispatch(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._closed:
                        return
                    if self._queue and self._idle:
                        job: _Job | None = self._queue.popleft()
                        actor = self._idle.popleft()
                        break
                    if self._must_replenish():
                        job = None
                        break
                    self._cv.wait(_RECOUNT_SECONDS if self._queue else None)
            if job is None:
                self._replenish()
                continue
            try:
                self._launch(job, actor)
            except Exception as exc:  # Ray refused the call: it fails, others go on
                with self._cv:
                    job.settled = True
                    self._idle.append(actor)
                job.future.set_exception(
                    ConnectionLost(
                        f"virtual client {job.call.cid}, {job.call.stage}: Ray could not "
                        f"run the call: {type(exc).__name__}: {exc}"
                    )
                )

    def _replenish(self) -> None:
        """Recount the cluster, replace lost actors, give up on actors that never start."""
        with self._cv:
            self._replace = False
            now = time.monotonic()
            stale = [a for a, t in self._starting.items() if now - t > _READY_SECONDS]
            for actor in stale:
                del self._starting[actor]
                self._actors.discard(actor)
            working = len(self._actors) - len(self._starting)
            stranded = list(self._queue) if stale and working == 0 else []
            if stranded:
                self._queue.clear()
        for actor in stale:
            self._kill(actor)
        for job in stranded:
            job.settled = True
            job.future.set_exception(
                ConnectionLost(
                    f"virtual client {job.call.cid}, {job.call.stage}: no Ray actor with "
                    f"{self._resources} could start within {_READY_SECONDS:g} s"
                )
            )
        try:
            self._recount()
            self._grow()
        except Exception:  # keep the pool as it is; the next wait retries
            logger.exception("Ray backend: could not count the cluster's resources")
            self._counted_at = time.monotonic()

    def _put(self, value: object) -> Any:
        """``ray.put(value)``, once per object for the last few objects (by identity)."""
        for cached, ref in self._puts:
            if cached is value:
                return ref
        ref = self._ray.put(value)
        self._puts.insert(0, (value, ref))
        del self._puts[_PUT_CACHE_SIZE:]
        return ref

    def _launch(self, job: _Job, actor: Any) -> None:
        call = job.call
        job.actor = actor
        job.ref = actor.run.remote(
            self._put(call.client_fn), call.context, self._put(call.instruction)
        )
        if job.timeout is not None:
            job.deadline = self._deadlines.schedule(
                job.timeout, functools.partial(self._expire, job)
            )
        job.ref.future().add_done_callback(functools.partial(self._finished, job))

    def _expire(self, job: _Job) -> None:
        """On the deadline thread: fail the call, kill its actor (freeing its resources)."""
        with self._cv:
            if job.settled:
                return
            job.settled = True
        assert job.timeout is not None
        job.future.set_exception(timeout_error(job.call, job.timeout))
        self._kill(job.actor)

    def _finished(self, job: _Job, done: Future[CallResult]) -> None:
        """On a Ray thread: the call ended; free or replace its actor, report the outcome."""
        error = done.exception()
        actor_lost = error is not None and isinstance(error, self._ray.exceptions.RayActorError)
        with self._cv:
            settled, job.settled = job.settled, True
            if actor_lost:
                self._actors.discard(job.actor)
                self._replace = True  # the dispatcher starts a replacement
            elif job.actor in self._actors:
                self._idle.append(job.actor)
            self._cv.notify_all()
        if job.deadline is not None:
            job.deadline.cancel()
        if settled:  # timed out: the reply is dropped
            return
        if error is not None:
            job.future.set_exception(self._map_error(job.call, error))
        else:
            job.future.set_result(done.result())

    def _map_error(self, call: VirtualCall, exc: BaseException) -> BaseException:
        exceptions = self._ray.exceptions
        if isinstance(exc, exceptions.RayTaskError):
            cause = getattr(exc, "cause", None)
            if isinstance(cause, StamenError):
                return named_error(call.cid, call.stage, cause)
            text = str(cause if cause is not None else exc).strip()
            first_line = text.splitlines()[0] if text else ""  # Ray appends a traceback
            detail = f"{type(cause or exc).__name__}: {first_line}"
            lost = ConnectionLost(
                f"virtual client {call.cid}, {call.stage}: the Ray call failed: {detail} "
                "(is the client code importable on the Ray workers? see docs/simulation.md)"
            )
        else:
            lost = ConnectionLost(
                f"virtual client {call.cid}, {call.stage}: the Ray actor was lost: "
                f"{type(exc).__name__}: {exc}"
            )
        lost.__cause__ = exc
        return lost
