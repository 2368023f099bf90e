"""A transport written outside Stamen passes the conformance suite after one registration.

``stdlib-rest`` speaks the Fleet protocol over HTTP/1.1 with the standard library's
``http.client`` (one connection per request) instead of httpx: a real, minimal transport
of the kind a third party would add. It reaches user code the same way as the built-in
ones: as a factory handed to the suite, and by name through ``start_client`` once
registered with :func:`stamen.transport.register_transport`.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import numpy as np
import pytest

from stamen.errors import ConnectError, ConnectionLost, MessageTooLarge, ProtocolError, Timeout
from stamen.net.address import parse_address, strip_scheme
from stamen.protocol.fleet import ERRORS
from stamen.testing import conformance
from stamen.testing.conformance import TransportUnderTest
from stamen.transport import (
    ClientTransport,
    TransportSettings,
    register_transport,
    transport_names,
    unregister_transport,
)
from stamen.transport.fleet import FleetClientTransport
from stamen.wire import REST_CONTENT_TYPE, Verb

_BY_HTTP_STATUS = {spec.http_status: spec.exception for spec in ERRORS.values()}


class StdlibRestRequester:
    """Fleet requests as ``POST /api/v0/fleet/<verb>``, one ``http.client`` connection each."""

    def __init__(self, settings: TransportSettings) -> None:
        self._host, self._port = parse_address(strip_scheme(settings.address)[1])
        self._limit = settings.max_message_length
        self._open = False

    def open(self) -> None:
        """Nothing to do: each request opens its own connection."""
        self._open = True

    def call(self, verb: Verb, body: bytes, timeout: float) -> bytes:
        """One POST; socket and HTTP errors map to Stamen errors."""
        if not self._open:
            raise ConnectionLost(f"stdlib-rest: {verb.name} on a closed requester")
        where = f"stdlib-rest {verb.rest_path} at {self._host}:{self._port}"
        connection = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        try:
            connection.request(
                "POST",
                verb.rest_path,
                body=body,
                headers={"content-type": REST_CONTENT_TYPE, "accept": REST_CONTENT_TYPE},
            )
            response = connection.getresponse()
            content = response.read(self._limit + 1)
        except ConnectionRefusedError as exc:
            raise ConnectError(f"{where}: cannot connect: {exc}") from exc
        except TimeoutError as exc:
            raise Timeout(f"{where}: no response within {timeout:g} s") from exc
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectionLost(f"{where}: {type(exc).__name__}: {exc}") from exc
        finally:
            connection.close()
        if len(content) > self._limit:
            raise MessageTooLarge(f"{where}: response over {self._limit} bytes")
        if response.status == 200:
            return content
        text = f"{where}: HTTP {response.status}: {content[:300]!r}"
        mapped = _BY_HTTP_STATUS.get(response.status)
        if mapped is not None:
            raise mapped(text)
        raise ConnectionLost(text) if response.status >= 500 else ProtocolError(text)

    def close(self) -> None:
        """Refuse further requests."""
        self._open = False


def stdlib_rest_transport(settings: TransportSettings) -> ClientTransport:
    """The stdlib-rest transport: the Fleet protocol's node state machine over the requester."""
    return FleetClientTransport(
        StdlibRestRequester(settings), max_message_length=settings.max_message_length
    )


STDLIB_REST = TransportUnderTest(stdlib_rest_transport, listener="rest", name="stdlib-rest")
"""The transport as a factory: the suite builds its nodes' transports with it directly."""


@pytest.fixture
def registered() -> Iterator[str]:
    """``stdlib-rest`` registered (its addresses may be ``http://`` URLs), then removed."""
    register_transport("stdlib-rest", stdlib_rest_transport, url_schemes=("http",))
    try:
        yield "stdlib-rest"
    finally:
        unregister_transport("stdlib-rest")
    assert "stdlib-rest" not in transport_names()


def test_fedavg_gives_the_same_parameters() -> None:
    """3 FedAvg rounds over stdlib-rest nodes give the weighted mean the built-in ones do."""
    ours = conformance.check_fedavg_identical([STDLIB_REST])
    theirs = conformance.check_fedavg_identical(["rest"])
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_mixed_with_built_in_transports() -> None:
    """One stdlib-rest node beside a grpc-bidi and a grpc-rere node in one run."""
    conformance.check_fedavg_identical([STDLIB_REST, "grpc-bidi", "grpc-rere"])


def test_client_exception_is_a_failure() -> None:
    """A client exception is a CLIENT_ERROR failure and the node keeps serving."""
    conformance.check_client_exception_is_failure(STDLIB_REST)


def test_round_timeout_drops_a_slow_client() -> None:
    """round_timeout counts a slow node as a failure; the round completes."""
    conformance.check_round_timeout(STDLIB_REST)


def test_message_limits_hold_on_both_sides() -> None:
    """Messages many times grpc_max_message_length travel in frames, both ways."""
    conformance.check_message_limits(STDLIB_REST)


def test_reconnect_later() -> None:
    """ReconnectIns(seconds=n) makes the node leave and come back; 0 ends it."""
    conformance.check_reconnect_later(STDLIB_REST)


def test_end_of_run_stops_the_node() -> None:
    """The node's run ends when the server's run does; its transport is the factory's."""
    built: list[ClientTransport] = []

    def counting(settings: TransportSettings) -> ClientTransport:
        built.append(stdlib_rest_transport(settings))
        assert isinstance(built[-1], FleetClientTransport)
        assert isinstance(built[-1]._requester, StdlibRestRequester)
        return built[-1]

    conformance.check_end_of_run(TransportUnderTest(counting, listener="rest"))
    assert len(built) == 1


def test_max_retries_counts_attempts() -> None:
    """max_retries=2 makes exactly 3 attempts, then ConnectError."""
    conformance.check_max_retries(STDLIB_REST)


def test_server_restart_mid_run() -> None:
    """Nodes survive a server restart on the same port and finish the new run."""
    conformance.check_server_restart(STDLIB_REST)


def test_liveness_of_a_pull_based_node() -> None:
    """Heartbeats keep a busy node; a vanished node's instruction fails at once."""
    conformance.check_liveness(STDLIB_REST)


def test_registered_name_reaches_start_client(registered: str) -> None:
    """Once registered, start_client(transport="stdlib-rest") runs nodes on it, with an
    http:// server address, and the suite takes the name as it takes a built-in one."""
    assert registered in transport_names()
    conformance.check_fedavg_identical([registered])
    conformance.check_end_of_run(registered)
    conformance.check_max_retries(registered)
