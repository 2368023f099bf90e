"""The rest node's HTTP client honours the proxy environment variables, as httpx (which it
used before) and Flower's ``requests`` do: ``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from stamen.errors import ConnectError
from stamen.net.limits import GRPC_MAX_MESSAGE_LENGTH
from stamen.protocol.fleet import CreateNodeRequest
from stamen.testing import RunningServer, running_server
from stamen.transport.base import TransportSettings
from stamen.transport.rest import RestRequester, env_proxy
from stamen.wire import Verb
from stamen.wire import fleet_codec as fc

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The environment without any proxy variable (whatever the machine has set)."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    with running_server(run=False, rest=True) as s:
        yield s


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections (bound, not listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _register(port: int) -> bytes:
    settings = TransportSettings(
        f"http://127.0.0.1:{port}", GRPC_MAX_MESSAGE_LENGTH, connect_timeout=5.0
    )
    requester = RestRequester(settings)
    requester.open()
    try:
        body = fc.encode_create_node_request(CreateNodeRequest())
        return requester.call(Verb.CREATE_NODE, body, 10.0)
    finally:
        requester.close()


def test_env_proxy_names_the_proxy_for_the_scheme(no_proxy_env: pytest.MonkeyPatch) -> None:
    """HTTP_PROXY for http URLs, HTTPS_PROXY for https ones, ALL_PROXY for both; a proxy
    without a scheme is an http one; without any, None."""
    assert env_proxy("http://10.1.2.3:9093") is None
    no_proxy_env.setenv("HTTP_PROXY", "http://proxy.example:3128")
    no_proxy_env.setenv("HTTPS_PROXY", "secure.example:3129")
    assert env_proxy("http://10.1.2.3:9093") == "http://proxy.example:3128"
    assert env_proxy("https://10.1.2.3:9093") == "http://secure.example:3129"
    no_proxy_env.delenv("HTTP_PROXY")
    no_proxy_env.setenv("ALL_PROXY", "http://all.example:1080")
    assert env_proxy("http://10.1.2.3:9093") == "http://all.example:1080"


def test_no_proxy_covers_hosts(no_proxy_env: pytest.MonkeyPatch) -> None:
    """A host NO_PROXY lists is reached directly."""
    no_proxy_env.setenv("HTTP_PROXY", "http://proxy.example:3128")
    no_proxy_env.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert env_proxy("http://127.0.0.1:9093") is None
    assert env_proxy("http://10.1.2.3:9093") == "http://proxy.example:3128"


def test_requests_go_through_the_proxy_the_environment_names(
    no_proxy_env: pytest.MonkeyPatch, srv: RunningServer, dead_port: int
) -> None:
    """With HTTP_PROXY naming a port that refuses connections, the node cannot reach a
    server it reaches directly otherwise, or when NO_PROXY names the server's host."""
    assert srv.rest_port is not None
    assert fc.decode_create_node_response(_register(srv.rest_port)).node_id != 0
    no_proxy_env.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead_port}")
    with pytest.raises(ConnectError):
        _register(srv.rest_port)
    no_proxy_env.setenv("NO_PROXY", "127.0.0.1")
    assert fc.decode_create_node_response(_register(srv.rest_port)).node_id != 0
