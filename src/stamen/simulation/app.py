"""``start_simulation``: run a strategy over many virtual client nodes on one machine or more.

The run is the one a real deployment has: :func:`~stamen.server.app.init_defaults` builds
the same :class:`~stamen.server.Server`, strategy and client manager, and
:func:`~stamen.server.app.run_server` runs the same rounds. Only the client proxies differ:
each registered node is a :class:`~stamen.simulation.VirtualClientProxy` whose calls run
on a backend (see :mod:`stamen.simulation.backends`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

from ..client.dispatch import ClientFn, normalize_client_fn
from ..errors import ConfigError
from ..logger import shown_progress
from ..memory import tune_allocator
from ..server.app import init_defaults, run_server
from ..server.client_manager import ClientManager, SimpleClientManager
from ..server.history import History
from ..server.server import Server, ServerConfig
from ..server.strategy import Strategy
from ._ray import RayBackend
from .backends import (
    Backend,
    ProcessesBackend,
    SequentialBackend,
    ThreadsBackend,
    fork_available,
)
from .proxy import (
    NUM_PARTITIONS_KEY,
    PARTITION_ID_KEY,
    EncodeCache,
    PartitionConfig,
    VirtualClientProxy,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "NUM_PARTITIONS_KEY",
    "PARTITION_ID_KEY",
    "make_backend",
    "start_simulation",
    "threads_for",
    "virtual_clients",
]

logger = logging.getLogger("stamen.simulation")

BACKENDS = ("processes", "threads", "sequential", "ray")
"""Names accepted by ``start_simulation(backend=...)``."""

DEFAULT_BACKEND = "processes"
"""The backend of a simulation that names none: worker processes, one client at a time
each, reused across rounds -- the isolation Flower's users get from Ray's actors (a model
kept in a module global is never shared by two clients at once). Where processes cannot
be forked (Windows), the threads backend stands in, with a WARNING."""

_SCHEDULING = ("DEFAULT", "SPREAD")
_WAIT_FOR_CLIENTS = 1.0


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_for(client_resources: dict[str, float], total_cpus: float | None = None) -> int:
    """Threads of the threads backend: how many clients of ``num_cpus`` fit the CPUs.

    Args:
        client_resources: Resources of one client; only ``num_cpus`` counts here.
        total_cpus: CPUs to share (default: those this process may run on).
    """
    cpus = float(_cpu_count() if total_cpus is None else total_cpus)
    per_client = float(client_resources.get("num_cpus", 1))
    if per_client <= 0:
        return max(1, math.floor(cpus))
    return max(1, math.floor(cpus / per_client + 1e-9))


def _check_resources(client_resources: object) -> dict[str, float]:
    if client_resources is None:
        return {"num_cpus": 1, "num_gpus": 0.0}
    if not isinstance(client_resources, dict):
        raise ConfigError(
            "client_resources: expected a dict such as {'num_cpus': 1, 'num_gpus': 0.0}, "
            f"received {type(client_resources).__name__}"
        )
    for key, value in client_resources.items():
        if not isinstance(key, str):
            raise ConfigError(f"client_resources: expected str keys, received {key!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(
                f"client_resources[{key!r}]: expected a number >= 0, received {value!r}"
            )
    resources = dict(client_resources)
    resources.setdefault("num_cpus", 1)  # Flower warns and uses 1
    return resources


def _check_arguments(
    num_clients: object,
    clients_ids: object,
    actor_type: object,
    actor_kwargs: object,
    actor_scheduling: object,
    serialize: object,
) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"num_clients: expected an int >= 1, received {num_clients!r}")
    if clients_ids is not None:
        raise ConfigError(
            "clients_ids: not supported (as in Flower 1.12, where it ends the program): pass "
            "num_clients; client_fn reads context.node_config['partition-id']"
        )
    for name, value in (("actor_type", actor_type), ("actor_kwargs", actor_kwargs)):
        if value is not None:
            raise ConfigError(
                f"{name}: not supported: Stamen runs virtual client calls on actors of its own, "
                "not in a Flower actor; pass client_resources for what one call needs"
            )
    if isinstance(actor_scheduling, str) and actor_scheduling not in _SCHEDULING:
        raise ConfigError(
            f"actor_scheduling: expected one of {list(_SCHEDULING)} or a Ray scheduling "
            f"strategy, received {actor_scheduling!r}"
        )
    if not isinstance(serialize, bool):
        raise ConfigError(f"serialize: expected a bool, received {serialize!r}")
    return num_clients


def make_backend(
    backend: str | Backend = DEFAULT_BACKEND,
    resources: dict[str, float] | None = None,
    ray_init_args: dict[str, Any] | None = None,
    keep_initialised: bool = False,
    actor_scheduling: Any = "DEFAULT",
) -> Backend:
    """The backend ``start_simulation(backend=...)`` runs on (not started yet).

    Args:
        backend: A name of :data:`BACKENDS` (default :data:`DEFAULT_BACKEND`) or a
            :class:`Backend`, returned as it is.
        resources: What one client call needs (default ``{"num_cpus": 1}``).
        ray_init_args: Ray's arguments; for the other backends only ``num_cpus`` counts.
        keep_initialised: Ray backend only.
        actor_scheduling: Ray backend only.

    Raises:
        ConfigError: an unknown name.
    """
    resources = {"num_cpus": 1} if resources is None else resources
    if isinstance(backend, Backend):
        return backend
    if backend == "ray":
        return RayBackend(
            resources,
            ray_init_args=ray_init_args,
            keep_initialised=keep_initialised,
            scheduling_strategy=actor_scheduling,
        )
    if backend not in BACKENDS:
        raise ConfigError(
            f"backend: expected one of {list(BACKENDS)} or a Backend, received {backend!r}"
        )
    if ray_init_args and "address" in ray_init_args:
        logger.warning(
            "ray_init_args=%r asks for a Ray cluster, but backend=%r runs every client in "
            "this process; pass backend='ray' to use the cluster",
            ray_init_args,
            backend,
        )
    if backend == "sequential":
        return SequentialBackend()
    total = ray_init_args.get("num_cpus") if ray_init_args else None
    if isinstance(total, bool) or not isinstance(total, int | float) or total <= 0:
        total = None
    workers = threads_for(resources, total)
    if backend == "processes":
        if fork_available():
            return ProcessesBackend(workers)
        logger.warning(
            "backend='processes' needs the fork start method, which this platform lacks: "
            "running on threads, where virtual clients share this process's module globals"
        )
    return ThreadsBackend(workers)


def virtual_clients(
    count: int,
    *,
    client_fn: ClientFn,
    backend: Backend,
    serialize: bool = False,
    encode_cache: EncodeCache | None = None,
) -> Iterator[VirtualClientProxy]:
    """The proxies of :func:`start_simulation`'s nodes ``0 .. count - 1``: cid ``str(i)``,
    node id ``i``, ``node_config`` ``{"partition-id": str(i), "num-partitions":
    str(count)}`` (a :class:`PartitionConfig`, built when a context is made). A proxy costs
    a few hundred bytes until its node is first sampled."""
    for i in range(count):
        yield VirtualClientProxy(
            str(i),
            client_fn=client_fn,
            backend=backend,
            node_id=i,
            node_config=PartitionConfig(i, count),
            serialize=serialize,
            encode_cache=encode_cache,
        )


def start_simulation(
    *,
    client_fn: Callable[..., Any],
    num_clients: int,
    clients_ids: list[str] | None = None,
    client_resources: dict[str, float] | None = None,
    server: Server | None = None,
    config: ServerConfig | None = None,
    strategy: Strategy | None = None,
    client_manager: ClientManager | None = None,
    ray_init_args: dict[str, Any] | None = None,
    keep_initialised: bool = False,
    actor_type: Any = None,
    actor_kwargs: dict[str, Any] | None = None,
    actor_scheduling: Any = "DEFAULT",
    backend: str | Backend = DEFAULT_BACKEND,
    serialize: bool = False,
) -> History:
    """Run a strategy over ``num_clients`` virtual client nodes.

    Keywords and defaults are Flower 1.12's, plus ``backend`` and ``serialize``. Each
    virtual node ``i`` is registered before the run with cid ``str(i)``; its client is
    built by ``client_fn(context)`` for every instruction and dropped afterwards, so memory
    does not grow with ``num_clients``. ``context.node_config`` holds ``"partition-id"``
    (``str(i)``) and ``"num-partitions"`` (``str(num_clients)``) -- strings, exactly as in
    Flower 1.12's ``start_simulation``; ``context.node_id`` is ``i``; ``context.state``
    persists per node across rounds. A legacy ``client_fn(cid: str)`` receives
    ``"i"`` with a DeprecationWarning.

    An exception in the client, or a call that runs longer than
    ``config.round_timeout``, is a failure of the round exactly as over the network.

    Args:
        client_fn: ``client_fn(context: Context) -> Client`` (or the legacy
            ``client_fn(cid: str)``).
        num_clients: Number of virtual client nodes (>= 1).
        clients_ids: Unsupported, as in Flower 1.12 (raises ConfigError; Flower exits).
        client_resources: What one client call needs (default
            ``{"num_cpus": 1, "num_gpus": 0.0}``). Ray honours every key; the processes
            and threads backends run ``total CPUs // num_cpus`` calls at once.
        server: A Server (default: one with ``strategy`` and ``client_manager``).
        config: Rounds and round timeout (default ``ServerConfig()``, 1 round).
        strategy: The strategy (default FedAvg).
        client_manager: Default ``SimpleClientManager(wait_timeout=1.0)``: the virtual
            clients are all registered before the first round, so a strategy that needs
            more than ``num_clients`` fails at once with NotEnoughClients (Flower waits
            24 hours).
        ray_init_args: Arguments of ``ray.init`` (ray backend); None or ``{}``:
            ``{"ignore_reinit_error": True, "include_dashboard": False}``.
            ``{"address": "auto"}`` joins an existing Ray cluster. With the processes
            and threads backends only ``num_cpus`` is used (the CPUs to share).
        keep_initialised: Ray backend: reuse a Ray already initialised in this process and
            leave it running (otherwise Ray is re-initialised, and shut down at the end).
        actor_type: Flower's actor class: unsupported (raises ConfigError if given).
        actor_kwargs: Unsupported, as ``actor_type``.
        actor_scheduling: Ray backend: ``"DEFAULT"``, ``"SPREAD"`` or a Ray scheduling
            strategy for the tasks.
        backend: ``"processes"`` (default, :data:`DEFAULT_BACKEND`: worker processes
            forked from this one, one client at a time each, reused across rounds, so
            clients never share module globals), ``"threads"`` (a bounded pool in this
            process: faster to start, but the clients share module-level models and
            data), ``"sequential"`` (one call at a time in this thread, for debugging),
            ``"ray"`` (``pip install 'stamen[ray]'``), or a :class:`Backend` instance.
        serialize: Round-trip every instruction and reply through the wire codec, to
            catch what would not survive the network.

    Returns:
        The run's :class:`~stamen.server.History`.

    Raises:
        ConfigError: an invalid argument.
        ImportError: ``backend="ray"`` without Ray installed (names the extra to install).
        NotEnoughClients: the strategy needs more clients than ``num_clients``.
    """
    tune_allocator()
    fn = normalize_client_fn(client_fn)
    count = _check_arguments(
        num_clients, clients_ids, actor_type, actor_kwargs, actor_scheduling, serialize
    )
    resources = _check_resources(client_resources)
    if server is None and client_manager is None:
        # Every virtual client is registered before round 1: waiting for more is pointless.
        client_manager = SimpleClientManager(wait_timeout=_WAIT_FOR_CLIENTS)
    server, config = init_defaults(server, config, strategy, client_manager)
    engine = make_backend(backend, resources, ray_init_args, keep_initialised, actor_scheduling)
    engine.start()
    manager = server.client_manager()
    cache = EncodeCache() if serialize else None
    proxies: list[VirtualClientProxy] = []
    try:
        for proxy in virtual_clients(
            count, client_fn=fn, backend=engine, serialize=serialize, encode_cache=cache
        ):
            if not manager.register(proxy):
                raise ConfigError(
                    f"client_manager: a client with cid {proxy.cid!r} is already registered"
                )
            proxies.append(proxy)
        with shown_progress():  # INFO progress on stderr when the program set up no logging
            logger.info(
                "simulation: %d virtual client(s) on the %s backend, %d call(s) at a time, %s",
                count,
                engine.name or type(engine).__name__,
                engine.concurrency,
                config,
            )
            return run_server(server, config)
    finally:
        for proxy in proxies:
            manager.unregister(proxy)
        engine.close()
        if cache is not None:
            cache.clear()
