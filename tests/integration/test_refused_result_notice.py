"""A node whose fit result the server refused learns why: the notice travels with the
server's next message to it and with the end of the run (Stamen peers only)."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from stamen.server.events import ResultRefused, RunEvent
from stamen.server.server import ServerConfig
from stamen.server.strategy import FedAvg
from stamen.testing.conformance import AddClient
from stamen.testing.nodes import NodeThread, node_threads
from stamen.testing.server import running_server
from stamen.typing import Config, NDArrays, Scalar

_WAIT = 30.0


class NaNOnFirstFit(AddClient):
    """Returns NaN from its first fit, good arrays afterwards."""

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        arrays, n, metrics = super().fit(parameters, config)
        if self.fits == 1:
            arrays = [np.full_like(a, np.nan) for a in arrays]
        return arrays, n, metrics


class _ByThread(logging.Handler):
    """Keeps the stamen.client records, by the thread that logged them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: dict[int | None, list[logging.LogRecord]] = {}
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock:
            self.records.setdefault(record.thread, []).append(record)

    def warnings_of(self, node: NodeThread) -> list[str]:
        assert node.thread is not None
        return [
            r.getMessage()
            for r in self.records.get(node.thread.ident, [])
            if r.levelno == logging.WARNING
        ]


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere", "rest"])
def test_a_refused_node_learns_why_and_the_other_hears_nothing(transport: str) -> None:
    handler = _ByThread()
    client_logger = logging.getLogger("stamen.client")
    client_logger.addHandler(handler)
    level = client_logger.level
    client_logger.setLevel(logging.INFO)
    events: list[RunEvent] = []
    strategy = FedAvg(min_fit_clients=2, min_evaluate_clients=2, min_available_clients=2)
    try:
        with (
            running_server(
                config=ServerConfig(num_rounds=2), strategy=strategy, rest=transport == "rest"
            ) as srv,
            node_threads() as nodes,
        ):
            srv.server.events.subscribe(events.append)
            for client in (AddClient(1), NaNOnFirstFit(2)):
                node = NodeThread(
                    {
                        "server_address": srv.address_for(transport),
                        "transport": transport,
                        "client": client.to_client(),
                    }
                ).start()
                nodes.append(node)
            srv.result(_WAIT)
            good, refused = nodes
            assert good.join(_WAIT) is None
            assert refused.join(_WAIT) is None
    finally:
        client_logger.removeHandler(handler)
        client_logger.setLevel(level)

    notices = [e for e in events if isinstance(e, ResultRefused)]
    assert len(notices) == 1 and notices[0].server_round == 1
    assert "NaN" in notices[0].reason
    expected = f"the server refused this node's result of round 1: {notices[0].reason}"
    # With the next instruction (round 1's evaluation), and with the end of the run.
    told = [m for m in handler.warnings_of(refused) if m.startswith("the server refused")]
    assert told == [expected, expected]
    assert not [m for m in handler.warnings_of(good) if "refused" in m]
