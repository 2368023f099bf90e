"""Transports register in one place, stamen.transport; start_client validates against it."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from stamen.client.app import make_node_config, make_transport
from stamen.errors import ConfigError
from stamen.messages import DisconnectRes, Instruction, ReconnectIns, Reply
from stamen.transport import (
    BUILT_IN_TRANSPORTS,
    TransportSettings,
    register_transport,
    transport_factory,
    transport_names,
    transport_url_schemes,
    unregister_transport,
)


class Scripted:
    """A transport that never opens a socket: it hands out the instructions it was given."""

    def __init__(self, settings: TransportSettings) -> None:
        self.settings = settings
        self.instructions: list[Instruction] = [ReconnectIns(seconds=0)]
        self.sent: list[Reply] = []

    @property
    def node_id(self) -> int:
        return 7

    def connect(self) -> None:
        pass

    def receive(self) -> Instruction:
        return self.instructions.pop(0)

    def send(self, reply: Reply) -> None:
        self.sent.append(reply)

    def close(self, *, graceful: bool) -> None:
        pass


@pytest.fixture
def scripted() -> Iterator[str]:
    register_transport("scripted", Scripted)
    try:
        yield "scripted"
    finally:
        unregister_transport("scripted")


def _config(**kwargs: Any) -> Any:
    from stamen.client import NumPyClient

    return make_node_config(client=NumPyClient().to_client(), **kwargs)


def test_built_in_transports_are_registered_first() -> None:
    """grpc-bidi, grpc-rere and rest are registered, in that order; rest takes URLs."""
    assert transport_names()[:3] == BUILT_IN_TRANSPORTS
    assert transport_url_schemes("rest") == ("http", "https")
    assert transport_url_schemes("grpc-bidi") == ()


def test_importing_the_registry_loads_no_network_library() -> None:
    """Importing stamen.transport (and validating a node's arguments) loads no grpc and no
    HTTP client library."""
    code = (
        "import sys, stamen.transport, stamen.client.app as a\n"
        "from stamen.client import NumPyClient\n"
        "a.make_node_config(server_address='h:1', client=NumPyClient().to_client(),"
        " transport='rest')\n"
        "libraries = ('grpc', 'httpx', 'httpcore')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in libraries))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_a_registered_transport_is_what_the_node_runs_on(scripted: str) -> None:
    """start_client's config accepts the new name and builds the registered transport."""
    config = _config(server_address="example.org:9", transport=scripted)
    transport = make_transport(config)
    assert isinstance(transport, Scripted)
    assert transport.settings.address == "example.org:9"


def test_start_client_runs_a_registered_transport(scripted: str) -> None:
    """start_client(transport=name) returns when the registered transport ends the run."""
    from stamen.client import NumPyClient, start_client

    start_client(server_address="h:1", client=NumPyClient().to_client(), transport=scripted)


def test_unknown_transport_lists_the_registered_names(scripted: str) -> None:
    """An unknown name is a ConfigError listing every registered transport, new ones too."""
    with pytest.raises(ConfigError, match=r"transport: expected one of \[.*'scripted'\]"):
        _config(server_address="h:1", transport="carrier-pigeon")
    with pytest.raises(ConfigError, match="'grpc-bidi', 'grpc-rere', 'rest'"):
        transport_factory("carrier-pigeon")


def test_url_schemes_follow_the_registration() -> None:
    """A transport registered with url_schemes takes those URLs and no others."""
    register_transport("web", Scripted, url_schemes=("http",))
    try:
        assert _config(server_address="http://h:1", transport="web").transport == "web"
        with pytest.raises(ConfigError, match="expected http:// or no scheme for web"):
            _config(server_address="https://h:1", transport="web")
        with pytest.raises(ConfigError, match="server_address"):
            _config(server_address="http://h:1", transport="grpc-bidi")
    finally:
        unregister_transport("web")


def test_a_transport_registered_by_path_loads_on_first_use() -> None:
    """``module:attribute`` is imported when the factory is first asked for."""
    register_transport("by-path", f"{__name__}:Scripted")
    register_transport("missing", "stamen_no_such_module:factory")  # not imported yet
    try:
        assert transport_factory("by-path") is Scripted
        with pytest.raises(ConfigError, match="transport 'missing': cannot load its factory"):
            transport_factory("missing")
    finally:
        unregister_transport("by-path")
        unregister_transport("missing")


@pytest.mark.parametrize(
    ("name", "factory", "match"),
    [
        ("", Scripted, "name: expected a non-empty str"),
        ("x", "no_colon", "factory: expected a callable or 'package.module:attribute'"),
        ("x", 42, "factory: expected a callable or 'package.module:attribute'"),
        ("rest", Scripted, "already registered"),
    ],
)
def test_bad_registrations_are_refused(name: str, factory: Any, match: str) -> None:
    """Empty names, factories that are neither callables nor paths, and taken names."""
    with pytest.raises(ConfigError, match=match):
        register_transport(name, factory)
    assert transport_names()[:3] == BUILT_IN_TRANSPORTS


def test_replace_and_unregister(scripted: str) -> None:
    """replace=True swaps a factory; unregistering an unknown name is a ConfigError."""
    register_transport(scripted, DisconnectRes, replace=True)
    assert transport_factory(scripted) is DisconnectRes
    with pytest.raises(ConfigError, match="received 'nothing'"):
        unregister_transport("nothing")


def test_a_factory_needs_no_registration() -> None:
    """make_node_config(transport_factory=...) builds an unregistered transport."""
    config = _config(server_address="h:1", transport_factory=Scripted)
    assert config.transport == "custom"
    assert isinstance(make_transport(config), Scripted)
    with pytest.raises(ConfigError, match="transport_factory: expected a callable"):
        _config(server_address="h:1", transport_factory=3)
