"""Which gRPC connections the server closes to make room (``grpc_guard.victims``) and
for the per-address limit (``grpc_guard.unused_over_limit``), and how it reads the
kernel's table of sockets."""

from __future__ import annotations

import socket

from stamen.server.fleet.grpc_guard import (
    CallLedger,
    Link,
    address_of,
    links_on,
    unused_over_limit,
    victims,
)
from stamen.server.fleet.handler import FleetTiming


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


def _from(address: str, count: int, first_port: int = 1000) -> list[str]:
    return [f"ipv4:{address}:{first_port + i}" for i in range(count)]


def _addresses(links: list[Link]) -> list[str]:
    return [address_of(link.peer) for link in links]


def test_under_pressure_the_address_holding_most_connections_gives_way_first() -> None:
    # A flood from .2 made a call on each connection, then idles; a node from .3 made its
    # last call longer ago (a grpc-rere node training). By idle time alone the node
    # would go first; by address, the flood does.
    ledger = CallLedger()
    flood = _from("127.0.0.2", 6)
    for i, peer in enumerate(flood):
        ledger.begin(peer)
        ledger.end(peer, now=5.0 + i)
    (node,) = _from("127.0.0.3", 1)
    ledger.begin(node)
    ledger.end(node, now=1.0)
    chosen = victims(_links(node, *flood), ledger, {}, 20.0, keep=4, min_age=0.5)
    assert [link.peer for link in chosen] == flood[:3]  # idle longest first, within .2


def test_under_pressure_addresses_are_brought_down_to_an_equal_share() -> None:
    ledger = CallLedger()
    a, b, c = _from("10.0.0.1", 5), _from("10.0.0.2", 3), _from("10.0.0.3", 1)
    first_seen = {peer: 1.0 for peer in a} | {peer: 0.0 for peer in b + c}
    # .1 holds 5, .2 holds 3: .1 gives two; then they hold as many and give in turn,
    # .2 first (known longer); .3 keeps its one.
    chosen = victims(_links(*a, *b, *c), ledger, first_seen, 10.0, keep=4, min_age=0.5)
    assert [address[-1] for address in _addresses(chosen)] == list("11212")


def test_under_pressure_a_call_in_flight_is_kept_however_many_its_address_holds() -> None:
    ledger = CallLedger()
    busy = _from("10.0.0.1", 5)
    for peer in busy[:4]:
        ledger.begin(peer)
    other = _from("10.0.0.2", 2)
    first_seen = {peer: 0.0 for peer in other} | {busy[4]: 5.0}
    chosen = victims(_links(*busy, *other), ledger, first_seen, 10.0, keep=1, min_age=0.5)
    # .1's idle one first (its address holds 5), though the others are known longer.
    assert [link.peer for link in chosen] == [busy[4], *other]


def test_an_address_over_its_limit_of_connections_without_a_call_loses_the_oldest() -> None:
    ledger = CallLedger()
    flood = _from("127.0.0.2", 6)
    calling = _from("127.0.0.1", 5)  # nodes sharing an address: calls do not count
    for i, peer in enumerate(calling):
        ledger.begin(peer)
        if i % 2:
            ledger.end(peer, now=1.0)  # idle between calls: still not counted
    connecting = _from("127.0.0.1", 2, first_port=2000)
    young = _from("127.0.0.3", 3)
    first_seen = {peer: float(i) for i, peer in enumerate(flood)}
    first_seen |= {peer: 0.0 for peer in calling + connecting}
    first_seen |= {young[0]: 0.0, young[1]: 9.5, young[2]: 9.5}
    links = _links(*flood, *calling, *connecting, *young)
    chosen = unused_over_limit(links, ledger, first_seen, 10.0, limit=2, min_age=2.0)
    # .2: 6 without a call, 4 over, the longest-known go; .3: 1 over, only one old
    # enough; .1: 2 without a call, within the limit.
    assert [link.peer for link in chosen] == [*flood[:4], young[0]]
    assert unused_over_limit(links, ledger, first_seen, 10.0, limit=6, min_age=2.0) == []


def test_the_per_address_limit_defaults_to_a_quarter_of_the_cap() -> None:
    assert FleetTiming().grpc_connection_limits(1024, rest=True) == (384, 96)
    assert FleetTiming().grpc_connection_limits(1024, rest=False) == (896, 224)
    assert FleetTiming(max_grpc_connections=40).grpc_connection_limits(1024, rest=True) == (
        40,
        16,
    )
    timing = FleetTiming(max_grpc_unused_per_peer=3)
    assert timing.grpc_connection_limits(1024, rest=True) == (384, 3)


def test_address_of_drops_the_port() -> None:
    assert address_of("ipv4:10.0.0.1:5000") == "ipv4:10.0.0.1"
    assert address_of("ipv6:[::1]:5000") == "ipv6:[::1]"


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
