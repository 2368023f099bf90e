"""``run_simulation``: run a ServerApp and a ClientApp over virtual nodes (Flower 1.12's API).

The run is :func:`~stamen.simulation.start_simulation`'s: the ServerApp's components
(``server_fn(context)`` or those given) drive the same Server and strategy, and the
ClientApp's ``client_fn`` (through its mods, if any) runs on the same backends.

Backends: Flower 1.12 knows one backend, ``"ray"`` (its default). Here ``backend_name``
goes through :func:`backend_for`:

* ``"ray"``: Stamen's Ray backend if Ray is installed (``stamen[ray]``), else Stamen's
  default backend (:data:`DEFAULT_BACKEND`), with an INFO log;
* ``"threads"``, ``"sequential"``: Stamen's backends of those names.

The contexts are those Flower 1.12's ``run_simulation`` gives: a node's ``node_config``
is ``{"partition-id": i, "num-partitions": n}`` with **int** values (``start_simulation``
gives strings), ``run_config`` is ``{}``; the ServerApp's context is node 0 with empty
configs and state.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from ..client.client_app import ClientApp
from ..client.dispatch import ClientFn
from ..client.numpy_client import NumPyClient
from ..context import Context
from ..errors import ConfigError
from ..server.history import History
from ..server.server_app import ServerApp, server_context
from .app import BACKENDS, NUM_PARTITIONS_KEY, PARTITION_ID_KEY, start_simulation

__all__ = [
    "DEFAULT_BACKEND",
    "DEFAULT_CLIENT_RESOURCES",
    "backend_for",
    "run_simulation",
]

_logger = logging.getLogger("stamen.simulation")

DEFAULT_BACKEND = "threads"
"""The backend ``run_simulation`` uses when ``"ray"`` is asked for without Ray installed."""

DEFAULT_CLIENT_RESOURCES: dict[str, float] = {"num_cpus": 2, "num_gpus": 0.0}
"""What one client call needs when ``backend_config`` names nothing (Flower 1.12's value)."""

_CONFIG_KEYS = ("client_resources", "init_args", "actor")


def backend_for(backend_name: str) -> str:
    """The Stamen backend that runs ``run_simulation(backend_name=...)``.

    Raises:
        ConfigError: an unknown backend name.
    """
    if backend_name == "ray":
        if importlib.util.find_spec("ray") is not None:
            return "ray"
        _logger.info(
            "run_simulation: Ray is not installed (pip install 'stamen[ray]'); running on "
            "the %r backend",
            DEFAULT_BACKEND,
        )
        return DEFAULT_BACKEND
    if backend_name in BACKENDS:
        return backend_name
    raise ConfigError(
        f"backend_name: expected one of {sorted({'ray', *BACKENDS})}, received {backend_name!r}"
    )


class _IntPartitions:
    """Gives ``client_fn`` the node config Flower's ``run_simulation`` gives: int values."""

    def __init__(self, client_fn: ClientFn) -> None:
        self.client_fn = client_fn

    def __call__(self, context: Context) -> Any:
        config = context.node_config
        for key in (PARTITION_ID_KEY, NUM_PARTITIONS_KEY):
            value = config.get(key)
            if isinstance(value, str):
                config[key] = int(value)
        return self.client_fn(context)


def _split_backend_config(
    backend_config: object,
) -> tuple[dict[str, float], dict[str, Any] | None]:
    if backend_config is None:
        return dict(DEFAULT_CLIENT_RESOURCES), None
    if not isinstance(backend_config, dict):
        raise ConfigError(
            "backend_config: expected a dict such as {'client_resources': {'num_cpus': 1}}, "
            f"received {type(backend_config).__name__}"
        )
    unknown = sorted(set(backend_config) - set(_CONFIG_KEYS))
    if unknown:
        _logger.warning("backend_config: ignoring %s (known keys: %s)", unknown, list(_CONFIG_KEYS))
    resources = backend_config.get("client_resources") or dict(DEFAULT_CLIENT_RESOURCES)
    init_args = backend_config.get("init_args")
    if init_args is not None and not isinstance(init_args, dict):
        raise ConfigError(
            f"backend_config['init_args']: expected a dict of ray.init arguments, received "
            f"{type(init_args).__name__}"
        )
    return resources, init_args


def _enable_tf_gpu_growth() -> None:
    """Let TensorFlow allocate GPU memory as needed (only if TensorFlow is installed)."""
    if importlib.util.find_spec("tensorflow") is None:
        _logger.warning("enable_tf_gpu_growth: TensorFlow is not installed; nothing to do")
        return
    tf: Any = importlib.import_module("tensorflow")
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)


def run_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    num_supernodes: int,
    backend_name: str = "ray",
    backend_config: dict[str, Any] | None = None,
    enable_tf_gpu_growth: bool = False,
    verbose_logging: bool = False,
) -> History:
    """Run ``server_app`` with ``num_supernodes`` virtual nodes running ``client_app``.

    Flower 1.12's signature and defaults. Node ``i`` has ``node_id=i`` (Flower draws
    random ids: read ``context.node_config["partition-id"]``) and
    ``node_config={"partition-id": i, "num-partitions": num_supernodes}`` (ints, as in
    Flower's ``run_simulation``); its ``context.state`` persists across the run.

    Args:
        server_app: The ServerApp; a ``server_fn`` gets :func:`server_context`.
        client_app: The ClientApp (with its mods, if any).
        num_supernodes: Number of virtual nodes (>= 1).
        backend_name: ``"ray"`` (default; Stamen's default backend if Ray is not
            installed), ``"threads"`` or ``"sequential"``; see :func:`backend_for`.
        backend_config: ``{"client_resources": {...}, "init_args": {...}}``:
            what one call needs (default ``{"num_cpus": 2, "num_gpus": 0.0}``, as in
            Flower) and the ``ray.init`` arguments. ``"actor"`` is accepted and ignored.
        enable_tf_gpu_growth: Let TensorFlow grow its GPU memory (in this process).
        verbose_logging: Log Stamen's DEBUG messages during the run.

    Returns:
        The run's History (Flower returns None).

    Raises:
        ConfigError: an invalid argument or app.
        NotEnoughClients: the strategy needs more nodes than ``num_supernodes``.
    """
    if not isinstance(server_app, ServerApp):
        raise ConfigError(f"server_app: expected a ServerApp, received {type(server_app).__name__}")
    if not isinstance(client_app, ClientApp):
        hint = " (wrap it: ClientApp(client_fn=...))" if isinstance(client_app, NumPyClient) else ""
        raise ConfigError(
            f"client_app: expected a ClientApp, received {type(client_app).__name__}{hint}"
        )
    backend = backend_for(backend_name)
    resources, init_args = _split_backend_config(backend_config)
    if enable_tf_gpu_growth:
        _enable_tf_gpu_growth()
    stamen_logger = logging.getLogger("stamen")
    level = stamen_logger.level
    if verbose_logging:
        stamen_logger.setLevel(logging.DEBUG)
    try:
        components = server_app.components(server_context())
        return start_simulation(
            client_fn=_IntPartitions(client_app.to_client_fn()),
            num_clients=num_supernodes,
            client_resources=resources,
            server=components.server,
            config=components.config,
            strategy=components.strategy,
            client_manager=components.client_manager,
            ray_init_args=init_args,
            backend=backend,
        )
    finally:
        stamen_logger.setLevel(level)
