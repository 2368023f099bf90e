"""start_client validates every argument before any I/O, with Flower's messages."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

import stamen.client.app as app
from stamen.client import Client, NumPyClient, start_client
from stamen.context import Context
from stamen.errors import ConfigError
from stamen.testing import generate_node_keys

SPEC = Path("/work/shared/spec/start_client.txt")


def client_fn(context: Context) -> Client:
    return Client()


class _NoIO(Exception):
    """Raised by the stand-in for the network part: validation let the call through."""


@pytest.fixture(autouse=True)
def no_io(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Replace run_node/make_transport so that no test can ever open a connection."""
    calls: list[Any] = []

    def fake_run_node(config: Any, **kwargs: Any) -> None:
        calls.append(config)
        raise _NoIO("validation passed; run_node would connect now")

    def fake_make_transport(config: Any) -> Any:
        raise AssertionError("a transport was built during validation")

    monkeypatch.setattr(app, "run_node", fake_run_node)
    monkeypatch.setattr(app, "make_transport", fake_make_transport)
    return calls


def _start(**overrides: Any) -> None:
    kwargs: dict[str, Any] = {"server_address": "127.0.0.1:8080", "client_fn": client_fn}
    kwargs.update(overrides)
    start_client(**kwargs)


def test_valid_arguments_reach_the_session_loop(no_io: list[Any]) -> None:
    """Sanity check of the fixture: valid arguments pass validation and reach run_node."""
    with pytest.raises(_NoIO):
        _start()
    (config,) = no_io
    assert config.address == "127.0.0.1:8080"
    assert config.transport == "grpc-bidi"
    assert config.settings.max_message_length == 536_870_912
    assert config.settings.secure is False
    assert config.settings.root_certificates is None


def test_neither_client_nor_client_fn() -> None:
    """No client and no client_fn: ValueError with Flower's message."""
    with pytest.raises(
        ValueError, match=re.escape("Both `client_fn` and `client` are `None`, but one is required")
    ):
        start_client(server_address="127.0.0.1:8080")


def test_both_client_and_client_fn() -> None:
    """Both client and client_fn: ValueError with Flower's message."""
    with pytest.raises(
        ValueError,
        match=re.escape("Both `client_fn` and `client` are provided, but only one is allowed"),
    ):
        _start(client=Client())


def test_a_client_instance_is_accepted(no_io: list[Any]) -> None:
    """client=Client() (deprecated in Flower, still supported) passes validation."""
    with pytest.raises(_NoIO):
        start_client(server_address="127.0.0.1:8080", client=Client())


def test_a_numpy_client_instance_is_converted(no_io: list[Any]) -> None:
    """client=NumPyClient() is converted with to_client(), as Flower does (with a log)."""

    class Numpy(NumPyClient):
        pass

    with pytest.raises(_NoIO):
        start_client(server_address="127.0.0.1:8080", client=Numpy())
    built = no_io[0].client_fn(None)
    assert isinstance(built, Client)


def test_client_of_a_wrong_type_is_refused() -> None:
    """client=<not a Client> raises ConfigError naming the received type."""
    with pytest.raises(ConfigError, match="str"):
        start_client(server_address="127.0.0.1:8080", client="a client")  # type: ignore[arg-type]


def test_unknown_transport_lists_the_valid_ones() -> None:
    """transport='udp' raises ValueError naming grpc-bidi, grpc-rere, rest and 'udp'."""
    with pytest.raises(ValueError) as info:
        _start(transport="udp")
    text = str(info.value)
    for name in ("grpc-bidi", "grpc-rere", "rest", "udp"):
        assert name in text
    assert "vce" not in text  # Flower lists it yet rejects it


@pytest.mark.parametrize("transport", ["grpc-bidi", "grpc-rere", "rest"])
def test_each_transport_passes_validation(transport: str, no_io: list[Any]) -> None:
    """The three transports of the spec are accepted and recorded in the node's config."""
    with pytest.raises(_NoIO):
        _start(transport=transport)
    assert no_io[0].transport == transport


@pytest.mark.parametrize(
    ("address", "secure"),
    [("http://127.0.0.1:8080", False), ("https://localhost:443", True), ("127.0.0.1:80", False)],
)
def test_rest_accepts_http_and_https_urls(address: str, secure: bool, no_io: list[Any]) -> None:
    """For rest the address may carry http:// or https:// (TLS from the scheme, as Flower)."""
    with pytest.raises(_NoIO):
        _start(transport="rest", server_address=address)
    assert no_io[0].settings.secure is secure


@pytest.mark.parametrize(
    ("transport", "address"),
    [
        ("rest", "ftp://127.0.0.1:8080"),
        ("rest", "http://no-port"),
        ("rest", "https://"),
        ("grpc-bidi", "http://127.0.0.1:8080"),
        ("grpc-rere", "https://127.0.0.1:8080"),
    ],
)
def test_bad_urls_are_value_errors(transport: str, address: str) -> None:
    """Unknown schemes, URLs without a port, and URLs on gRPC transports are refused."""
    with pytest.raises(ValueError, match="server_address"):
        _start(transport=transport, server_address=address)


def test_https_with_insecure_is_refused() -> None:
    """rest with https:// and insecure=True contradict each other: ValueError."""
    with pytest.raises(ValueError, match="insecure"):
        _start(transport="rest", server_address="https://localhost:443", insecure=True)


def test_explicit_grpc_bidi_is_accepted(no_io: list[Any]) -> None:
    """transport='grpc-bidi' is the default and valid."""
    with pytest.raises(_NoIO):
        _start(transport="grpc-bidi")


def test_insecure_with_root_certificates_is_refused() -> None:
    """insecure=True plus root_certificates: ValueError naming both (Flower's message)."""
    with pytest.raises(ValueError) as info:
        _start(insecure=True, root_certificates=b"-----BEGIN CERTIFICATE-----")
    text = str(info.value)
    assert "root_certificates" in text
    assert "insecure" in text


def test_missing_root_certificates_file_names_the_path() -> None:
    """A root_certificates path that does not exist: ConfigError naming it (not OSError)."""
    with pytest.raises(ConfigError, match=re.escape("/nonexistent.pem")) as info:
        _start(root_certificates="/nonexistent.pem")
    assert "root_certificates" in str(info.value)


def test_root_certificates_path_is_read(tmp_path: Path, no_io: list[Any]) -> None:
    """root_certificates given as a path str is read to bytes and turns TLS on."""
    pem = tmp_path / "ca.pem"
    pem.write_bytes(b"-----BEGIN CERTIFICATE-----\nX\n-----END CERTIFICATE-----\n")
    with pytest.raises(_NoIO):
        _start(root_certificates=str(pem))
    assert no_io[0].settings.root_certificates == pem.read_bytes()
    assert no_io[0].settings.secure is True


@pytest.mark.parametrize(("insecure", "secure"), [(None, False), (True, False), (False, True)])
def test_insecure_selects_tls(insecure: bool | None, secure: bool, no_io: list[Any]) -> None:
    """insecure=False asks for TLS with the system CAs; None/True stay plaintext."""
    with pytest.raises(_NoIO):
        _start(insecure=insecure)
    assert no_io[0].settings.secure is secure


@pytest.mark.parametrize(
    "address",
    ["no-port", "host:99999", "", "host:", ":8080", "host:port", "host:-1", "::1:8080"],
)
def test_bad_server_address_is_a_value_error_never_system_exit(address: str) -> None:
    """An unparsable address raises ValueError naming it (Flower: SystemExit)."""
    with pytest.raises(ValueError) as info:
        _start(server_address=address)
    assert "server_address" in str(info.value)


@pytest.mark.parametrize("address", ["[::]:8080", "[::1]:0", "localhost:65535", "10.0.0.1:1"])
def test_good_server_addresses_are_accepted(address: str, no_io: list[Any]) -> None:
    """host:port and [ipv6]:port with a port in 0..65535 pass validation."""
    with pytest.raises(_NoIO):
        _start(server_address=address)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
        ({"max_retries": True}, "max_retries"),
        ({"max_wait_time": "x"}, "max_wait_time"),
        ({"max_wait_time": -1.0}, "max_wait_time"),
        ({"max_wait_time": float("nan")}, "max_wait_time"),
        ({"grpc_max_message_length": 0}, "grpc_max_message_length"),
        ({"grpc_max_message_length": -5}, "grpc_max_message_length"),
        ({"grpc_max_message_length": "big"}, "grpc_max_message_length"),
        ({"grpc_max_message_length": True}, "grpc_max_message_length"),
        ({"insecure": "yes"}, "insecure"),
        ({"root_certificates": 42}, "root_certificates"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_bad_limits_are_config_errors_naming_the_parameter(
    overrides: dict[str, Any], field: str
) -> None:
    """Bad retry limits, message length, insecure or certificates: ConfigError naming them."""
    with pytest.raises(ConfigError, match=field):
        _start(**overrides)


@pytest.mark.parametrize(
    "overrides",
    [{"max_retries": 0}, {"max_retries": 3}, {"max_wait_time": 0}, {"max_wait_time": 2.5}],
    ids=repr,
)
def test_good_limits_are_accepted(overrides: dict[str, Any], no_io: list[Any]) -> None:
    """max_retries >= 0 and max_wait_time >= 0 are valid limits."""
    with pytest.raises(_NoIO):
        _start(**overrides)
    policy = no_io[0].policy
    for key, value in overrides.items():
        assert getattr(policy, key) == value


def test_authentication_keys_are_checked_before_any_io() -> None:
    """authentication_keys must be an elliptic-curve pair whose halves match."""
    private, public = generate_node_keys()
    other_private, _ = generate_node_keys()
    with pytest.raises(
        ConfigError, match=r"authentication_keys\[0\]: expected an EllipticCurvePrivateKey"
    ):
        _start(authentication_keys=("not a key", public))
    with pytest.raises(ConfigError, match="does not match the private key"):
        _start(authentication_keys=(other_private, public))
    with pytest.raises(ConfigError, match="expected \\(private_key, public_key\\)"):
        _start(authentication_keys=private)


def test_client_certificates_need_tls() -> None:
    """client_certificates (mutual TLS) with insecure=True is refused before any I/O."""
    with pytest.raises(ConfigError, match="mutual TLS needs TLS"):
        _start(insecure=True, client_certificates=(b"cert", b"key"))


def test_signature_matches_the_spec() -> None:
    """start_client is keyword-only with the spec's ten parameters, order and defaults."""
    params = dict(list(inspect.signature(start_client).parameters.items())[:10])
    expected = {
        "server_address": inspect.Parameter.empty,
        "client_fn": None,
        "client": None,
        "grpc_max_message_length": 536_870_912,
        "root_certificates": None,
        "insecure": None,
        "transport": None,
        "authentication_keys": None,
        "max_retries": None,
        "max_wait_time": None,
    }
    assert list(params) == list(expected)
    assert {name: p.default for name, p in params.items()} == expected
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())


@pytest.mark.skipif(not SPEC.exists(), reason="the shared spec is not available")
def test_signature_parameter_names_are_those_of_the_spec_file() -> None:
    """The parameter names, in order, are those written in spec/start_client.txt."""
    text = SPEC.read_text()
    match = re.search(r"start_client\(\*, (.*?)\) None", text, re.S)
    assert match is not None
    parts = re.split(r", (?=\w+:)", match.group(1))
    spec = {
        part.split(":")[0].strip(): part.rsplit("=", 1)[1].strip() if "=" in part else None
        for part in parts
    }
    params = dict(list(inspect.signature(start_client).parameters.items())[: len(spec)])
    assert list(params) == list(spec)
    for name, default in spec.items():
        actual = params[name].default
        assert repr(None if actual is inspect.Parameter.empty else actual) == str(default), name


def test_positional_arguments_are_refused() -> None:
    """start_client takes no positional arguments (Flower's ``*``)."""
    with pytest.raises(TypeError):
        start_client("127.0.0.1:8080", client_fn)  # type: ignore[misc]
