"""Which gRPC connections the server closes to make room (``grpc_guard.victims``), and
how it reads the kernel's table of sockets."""

from __future__ import annotations

import socket

from stamen.server.fleet.grpc_guard import CallLedger, Link, links_on, victims


def _links(*peers: str) -> list[Link]:
    return [Link(peer, i + 1) for i, peer in enumerate(peers)]


def test_connections_that_never_called_go_first_oldest_first_and_calls_are_kept() -> None:
    ledger = CallLedger()
    ledger.begin("a")  # a call in flight: never closed
    ledger.begin("b")
    ledger.end("b", now=5.0)  # called, idle since 5
    first_seen = {"a": 0.0, "b": 0.0, "c": 1.0, "d": 2.0, "e": 9.9}
    links = _links("a", "b", "c", "d", "e")
    chosen = victims(links, ledger, first_seen, 10.0, keep=2, min_age=0.5)
    assert [link.peer for link in chosen] == ["c", "d", "b"]  # e is too new to judge


def test_nothing_is_closed_under_the_mark_or_when_everything_calls() -> None:
    ledger = CallLedger()
    assert victims(_links("a", "b"), ledger, {}, 10.0, keep=2, min_age=0.5) == []
    for peer in "abc":
        ledger.begin(peer)
    assert victims(_links("a", "b", "c"), ledger, {}, 10.0, keep=1, min_age=0.5) == []


def test_the_ledger_forgets_connections_that_are_gone() -> None:
    ledger = CallLedger()
    ledger.begin("a")
    ledger.end("a", now=1.0)
    ledger.begin("b")
    ledger.forget_all_but(["c"])
    assert ledger.last_call == {} and ledger.in_flight == {"b": 1}


def test_links_on_lists_accepted_connections_with_grpc_peer_names() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            with accepted:
                found = links_on(port)
                host, client_port = client.getsockname()
                assert [link.peer for link in found] == [f"ipv4:{host}:{client_port}"]
