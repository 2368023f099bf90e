"""TLS, mutual TLS and node authentication, on every transport."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from stamen.errors import AuthError, TLSError
from stamen.messages import FitIns, ReconnectIns
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.protocol.auth import HEADER_SESSION, RequestSigner, StreamSession
from stamen.protocol.fleet import CreateNodeRequest
from stamen.server.client_manager import SimpleClientManager
from stamen.server.server import ServerConfig
from stamen.server.strategy import FedAvg
from stamen.testing import (
    DevCertificates,
    NodeThread,
    RunningServer,
    generate_certificates,
    generate_node_keys,
    node_threads,
    running_server,
)
from stamen.testing.conformance import TRANSPORTS, AddClient
from stamen.wire import BIDI_JOIN_METHOD, REST_CONTENT_TYPE, Verb, fleet_codec

MODES = ("insecure", "tls", "mtls", "tls+auth")


@pytest.fixture(scope="module")
def certs() -> DevCertificates:
    return generate_certificates()


def _server(mode: str, certs: DevCertificates, keys: list[Any], **kwargs: Any) -> Any:
    return running_server(
        rest=True,
        certificates=None if mode == "insecure" else certs.server_tuple,
        require_client_certificate=mode == "mtls",
        authorized_keys=keys if mode == "tls+auth" else None,
        **kwargs,
    )


def _node_kwargs(
    srv: RunningServer, transport: str, mode: str, certs: DevCertificates, keys: Any
) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"server_address": srv.address_for(transport), "transport": transport}
    if mode != "insecure":
        kwargs["root_certificates"] = certs.ca_cert
    if mode == "mtls":
        kwargs["client_certificates"] = certs.client_pair
    if mode == "tls+auth":
        kwargs["authentication_keys"] = keys
    return kwargs


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_run_trains(transport: str, mode: str, certs: DevCertificates) -> None:
    """Two nodes train one FedAvg round, then exit normally, under each security mode."""
    pairs = [generate_node_keys(), generate_node_keys()]
    init = ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])
    strategy = FedAvg(initial_parameters=init, fraction_evaluate=0.0)
    with (
        _server(
            mode, certs, [p for _, p in pairs], config=ServerConfig(1), strategy=strategy
        ) as srv,
        node_threads() as nodes,
    ):
        for k, pair in zip((1, 3), pairs, strict=True):
            kwargs = _node_kwargs(srv, transport, mode, certs, pair)
            nodes.append(NodeThread({**kwargs, "client": AddClient(k).to_client()}).start())
        srv.result(30)
        assert [n.join(30) for n in nodes] == [None, None]
    final = parameters_to_ndarrays(srv.server.parameters)[0]
    np.testing.assert_array_equal(final, np.full(2, 2.5, np.float32))


def _start_and_fail(**kwargs: Any) -> BaseException | None:
    node = NodeThread({**kwargs, "client": AddClient(1).to_client(), "max_retries": 5}).start()
    return node.join(30)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_untrusted_ca_fails_fast_with_tls_error(transport: str, certs: DevCertificates) -> None:
    """A node that does not trust the server's CA raises TLSError at once (no retries,
    although max_retries allows 5) naming the certificate problem."""
    other = generate_certificates()
    with _server("tls", certs, [], run=False) as srv:
        started = time.monotonic()
        error = _start_and_fail(
            server_address=srv.address_for(transport),
            transport=transport,
            root_certificates=other.ca_cert,
        )
        assert isinstance(error, TLSError), error
        assert "certificate is not accepted" in str(error)
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_wrong_hostname_fails_with_tls_error(transport: str) -> None:
    """A server certificate for another host name is refused with TLSError."""
    elsewhere = generate_certificates(hosts=("example.org",))
    with _server("tls", elsewhere, [], run=False) as srv:
        error = _start_and_fail(
            server_address=srv.address_for(transport),
            transport=transport,
            root_certificates=elsewhere.ca_cert,
        )
    assert isinstance(error, TLSError), error
    assert "mismatch" in str(error).lower() or "not accepted" in str(error)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_tls_node_against_plaintext_server(transport: str, certs: DevCertificates) -> None:
    """A TLS node facing a plaintext server gets TLSError saying the server speaks no TLS."""
    with _server("insecure", certs, [], run=False) as srv:
        address = srv.address_for(transport).replace("http://", "https://")
        error = _start_and_fail(
            server_address=address, transport=transport, root_certificates=certs.ca_cert
        )
    assert isinstance(error, TLSError), error
    assert "does not speak TLS" in str(error)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mtls_refuses_a_node_without_client_certificate(
    transport: str, certs: DevCertificates
) -> None:
    """Under mutual TLS a node without a client certificate is refused with TLSError
    asking for one; the server registers no node."""
    manager = SimpleClientManager(wait_timeout=30)
    with _server("mtls", certs, [], run=False, client_manager=manager) as srv:
        error = _start_and_fail(
            server_address=srv.address_for(transport),
            transport=transport,
            root_certificates=certs.ca_cert,
        )
        assert isinstance(error, TLSError), error
        assert "client certificate" in str(error)
        assert manager.num_available() == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_key_raises_auth_error_at_once(transport: str, certs: DevCertificates) -> None:
    """A node whose key is not authorized raises AuthError at once, without retrying."""
    with _server("tls+auth", certs, [generate_node_keys()[1]], run=False) as srv:
        started = time.monotonic()
        error = _start_and_fail(
            server_address=srv.address_for(transport),
            transport=transport,
            root_certificates=certs.ca_cert,
            authentication_keys=generate_node_keys(),
        )
        assert isinstance(error, AuthError), error
        assert "unknown node key" in str(error)
        assert time.monotonic() - started < 10


# --- attacks on a running, authenticated federation --------------------------------------


class Attacker:
    """Sends hand-made requests to the server with chosen authentication headers."""

    def __init__(self, srv: RunningServer, certs: DevCertificates) -> None:
        self.srv = srv
        self.channel = grpc.secure_channel(
            srv.address, grpc.ssl_channel_credentials(root_certificates=certs.ca_cert)
        )
        self.http = httpx.Client(
            base_url=srv.rest_url,
            verify=_ssl_context(certs.ca_cert),
            headers={"content-type": REST_CONTENT_TYPE},
        )

    def close(self) -> None:
        self.channel.close()
        self.http.close()

    def rere(self, verb: Verb, body: bytes, headers: dict[str, str]) -> grpc.StatusCode:
        try:
            self.channel.unary_unary(verb.grpc_method)(
                body, metadata=tuple(headers.items()), timeout=10
            )
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK

    def rest(self, verb: Verb, body: bytes, headers: dict[str, str]) -> int:
        return self.http.post(verb.rest_path, content=body, headers=headers).status_code

    def bidi(self, headers: dict[str, str]) -> grpc.StatusCode:
        """Open a Join stream with ``headers`` and return how it ends."""
        call = self.channel.stream_stream(BIDI_JOIN_METHOD)(
            iter(()), metadata=tuple(headers.items()), timeout=2
        )
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
        return grpc.StatusCode.OK


def _ssl_context(ca: bytes) -> Any:
    import ssl

    return ssl.create_default_context(cadata=ca.decode())


@pytest.fixture
def authenticated(certs: DevCertificates) -> Iterator[tuple[RunningServer, Attacker, Any]]:
    """A TLS + auth server whose authorized keys include ``keys`` (yielded for attacks)."""
    keys = generate_node_keys()
    manager = SimpleClientManager(wait_timeout=30)
    with _server("tls+auth", certs, [keys[1]], run=False, client_manager=manager) as srv:
        attacker = Attacker(srv, certs)
        try:
            yield srv, attacker, keys
        finally:
            attacker.close()


CREATE = fleet_codec.encode_create_node_request(CreateNodeRequest())


def test_replayed_tampered_and_stale_requests_are_refused(
    authenticated: tuple[RunningServer, Attacker, Any], certs: DevCertificates
) -> None:
    """With an authorized key: a fresh signed request is accepted; the same captured
    request sent again, a request whose body was altered after signing, and one signed
    2 minutes ago are refused (UNAUTHENTICATED / 401) — on grpc-rere, rest and the
    grpc-bidi handshake — while an honest node keeps training."""
    srv, attacker, keys = authenticated
    signer = RequestSigner(*keys)
    manager = srv.server.client_manager()
    with node_threads() as nodes:
        honest = NodeThread(
            {
                "server_address": srv.address,
                "transport": "grpc-rere",
                "root_certificates": certs.ca_cert,
                "authentication_keys": keys,
                "client": AddClient(2).to_client(),
            }
        ).start()
        nodes.append(honest)
        assert manager.wait_for(1, timeout=30)
        params = ndarrays_to_parameters([np.zeros(2, dtype=np.float32)])

        # grpc-rere: fresh, replayed, tampered, stale.
        method = Verb.CREATE_NODE.grpc_method
        captured = signer.headers(method, CREATE, time.time())
        assert attacker.rere(Verb.CREATE_NODE, CREATE, captured) == grpc.StatusCode.OK
        unauth = grpc.StatusCode.UNAUTHENTICATED
        assert attacker.rere(Verb.CREATE_NODE, CREATE, captured) == unauth
        tampered = signer.headers(method, CREATE, time.time())
        assert attacker.rere(Verb.CREATE_NODE, CREATE + b"\x08\x01", tampered) == unauth
        stale = signer.headers(method, CREATE, time.time() - 120)
        assert attacker.rere(Verb.CREATE_NODE, CREATE, stale) == unauth
        assert attacker.rere(Verb.CREATE_NODE, CREATE, {}) == unauth

        # rest: the same.
        method = f"POST {Verb.CREATE_NODE.rest_path}"
        captured = signer.headers(method, CREATE, time.time())
        assert attacker.rest(Verb.CREATE_NODE, CREATE, captured) == 200
        assert attacker.rest(Verb.CREATE_NODE, CREATE, captured) == 401
        tampered = signer.headers(method, CREATE, time.time())
        assert attacker.rest(Verb.CREATE_NODE, CREATE + b"\x08\x01", tampered) == 401
        stale = signer.headers(method, CREATE, time.time() - 120)
        assert attacker.rest(Verb.CREATE_NODE, CREATE, stale) == 401
        # A signature made for grpc-rere's method does not open a REST request.
        other = signer.headers(Verb.CREATE_NODE.grpc_method, CREATE, time.time())
        assert attacker.rest(Verb.CREATE_NODE, CREATE, other) == 401

        # grpc-bidi handshake: replayed and stale are refused before a node is opened. The
        # signed body of the opening is the node's ephemeral session key.
        session = StreamSession.for_node()
        offer = {HEADER_SESSION: session.header_value}
        captured = {**signer.headers(BIDI_JOIN_METHOD, session.public, time.time()), **offer}
        first = attacker.bidi(captured)  # accepted: the stream opens (then times out here)
        assert first != unauth
        assert attacker.bidi(captured) == unauth
        stale = signer.headers(BIDI_JOIN_METHOD, session.public, time.time() - 120)
        assert attacker.bidi({**stale, **offer}) == unauth
        # Another session key under the signature, or none at all: refused.
        other = StreamSession.for_node().header_value
        fresh = signer.headers(BIDI_JOIN_METHOD, session.public, time.time())
        assert attacker.bidi({**fresh, HEADER_SESSION: other}) == unauth
        assert attacker.bidi(signer.headers(BIDI_JOIN_METHOD, b"", time.time())) == unauth

        # The honest node is unaffected: it trains (the nodes the accepted attack requests
        # registered never answer), then leaves at the end of the run.
        assert _fit_all(manager, params) == 1
        for proxy in list(manager.all().values()):
            proxy.submit(ReconnectIns(0), timeout=5)
        assert honest.join(30) is None


def _fit_all(manager: SimpleClientManager, params: Any) -> int:
    """Fit on every registered node; count the OK replies (attack-made nodes never answer)."""
    futures = [p.submit(FitIns(params, {}), timeout=2) for p in manager.all().values()]
    ok = 0
    for future in futures:
        error = future.exception(timeout=10)
        if error is None:
            ok += 1
    return ok
