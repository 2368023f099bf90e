"""How a node learns that its run ended: completed, or failed and why (the reason of
``ReconnectIns``, a Stamen field Flower's protobuf skips); its progress lines; the
wrong-peer probe; JSON log lines."""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from stamen.client import NumPyClient
from stamen.client.app import make_node_config, run_node
from stamen.errors import ConnectError, ProtocolError, RunError, TLSError
from stamen.logger import JsonFormatter
from stamen.messages import DisconnectRes, FitIns, Instruction, ReconnectIns, Reply
from stamen.ndarrays import ndarrays_to_parameters
from stamen.server.events import RoundStarted
from stamen.server.progress import ProgressLog
from stamen.testing import FakeClock
from stamen.transport.probe import identify_peer
from stamen.wire import decode_instruction, encode_instruction
from stamen.wire._pb import stamen_transport_pb2 as pb

FIT = FitIns(parameters=ndarrays_to_parameters([np.ones(2)]), config={})


class Answering(NumPyClient):
    def fit(self, parameters: Any, config: Any) -> Any:
        return parameters, 3, {}


class Scripted:
    """A transport that delivers ``inbox`` and records the replies."""

    def __init__(self, inbox: list[Instruction]) -> None:
        self.inbox = list(inbox)
        self.sent: list[Reply] = []

    node_id = -1

    def connect(self) -> None:
        pass

    def receive(self) -> Instruction:
        return self.inbox.pop(0)

    def send(self, reply: Reply) -> None:
        self.sent.append(reply)

    def close(self, *, graceful: bool) -> None:
        pass


def _run(inbox: list[Instruction]) -> Scripted:
    transport = Scripted(inbox)
    config = make_node_config(
        server_address="127.0.0.1:1", client_fn=lambda _c: Answering().to_client()
    )
    run_node(config, clock=FakeClock(), rng=lambda: 0.5, transport_factory=lambda _c: transport)
    return transport


def test_reason_round_trips_and_flower_protobuf_skips_it() -> None:
    """ReconnectIns(reason) decodes with its reason; Flower's message (the same field
    numbers, without field 15) parses it as a plain ReconnectIns."""
    data = encode_instruction(ReconnectIns(seconds=None, reason="RunError: no round aggregated"))
    assert decode_instruction(data) == ReconnectIns(0, "RunError: no round aggregated")
    flower_view = pb.ServerMessage.FromString(data)
    assert flower_view.WhichOneof("msg") == "reconnect_ins"
    assert flower_view.reconnect_ins.seconds == 0
    assert decode_instruction(encode_instruction(ReconnectIns(0))) == ReconnectIns(0, None)
    # Without a reason the bytes are exactly what Flower sends.
    assert (
        encode_instruction(ReconnectIns(0))
        == pb.ServerMessage(reconnect_ins=pb.ReconnectIns(seconds=0)).SerializeToString()
    )


def test_node_logs_each_instruction_and_a_completed_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Progress lines: connected, received, answered with the duration, run completed."""
    with caplog.at_level(logging.INFO, logger="stamen.client"):
        transport = _run([FIT, ReconnectIns(0)])
    assert transport.sent[-1] == DisconnectRes(reason="RECONNECT")
    lines = [r.getMessage() for r in caplog.records if r.name == "stamen.client"]
    assert lines[0] == "connected to 127.0.0.1:1 over grpc-bidi"
    assert lines[1] == "received FitIns"
    assert lines[2].startswith("answered FitIns with FitRes in ")
    assert lines[3] == (
        "run completed: the server ended the session after 1 instruction(s); node shuts down"
    )


def test_a_failed_run_raises_run_error_with_the_servers_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """ReconnectIns with a reason: acknowledged as usual, logged at ERROR, RunError."""
    with (
        caplog.at_level(logging.INFO, logger="stamen.client"),
        pytest.raises(RunError, match="ended the run as failed: NotEnoughClients: 1/2"),
    ):
        _run([FIT, ReconnectIns(None, "NotEnoughClients: 1/2")])
    assert caplog.records[-1].levelno == logging.ERROR
    assert "run failed on the server: NotEnoughClients: 1/2" in caplog.records[-1].getMessage()


@pytest.fixture
def answering_server() -> Iterator[tuple[socket.socket, list[bytes]]]:
    """A TCP server on 127.0.0.1 that answers each connection with the bytes queued."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    answers: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            with conn:
                conn.recv(1024)
                if answers:
                    conn.sendall(answers.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server, answers
    stop.set()
    thread.join(5)
    server.close()


@pytest.mark.parametrize(
    ("answer", "error", "text"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", ProtocolError, "HTTP/1 server.*400 Bad Request"),
        (b"<!DOCTYPE HTML>\n<html>", ProtocolError, "HTTP/1 server"),
        (b"\x15\x03\x03\x00\x02\x02\x46", TLSError, "speaks TLS but the node connects in plain"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", ProtocolError, "does not speak gRPC.*SSH-2.0"),
    ],
)
def test_identify_peer_names_what_answers(
    answering_server: tuple[socket.socket, list[bytes]],
    answer: bytes,
    error: type[Exception],
    text: str,
) -> None:
    server, answers = answering_server
    answers.append(answer)
    found = identify_peer(f"127.0.0.1:{server.getsockname()[1]}")
    assert isinstance(found, error)
    assert re.search(text, str(found)), found


def test_identify_peer_finds_nothing_at_an_http2_server_or_a_closed_port(
    answering_server: tuple[socket.socket, list[bytes]],
) -> None:
    server, answers = answering_server
    answers.append(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")  # an HTTP/2 SETTINGS frame
    assert identify_peer(f"127.0.0.1:{server.getsockname()[1]}") is None
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert identify_peer(f"127.0.0.1:{port}") is None


def test_a_node_at_a_wrong_peer_fails_at_once(
    answering_server: tuple[socket.socket, list[bytes]],
) -> None:
    """start_client's loop: the failed connection is probed, and the finding is raised
    instead of a retry (ConnectError would be retried)."""
    server, answers = answering_server
    answers.extend([b"HTTP/1.1 400 Bad Request\r\n\r\n"] * 4)
    config = make_node_config(
        server_address=f"127.0.0.1:{server.getsockname()[1]}",
        client_fn=lambda _c: Answering().to_client(),
        insecure=True,
    )
    with pytest.raises(ProtocolError, match="HTTP/1 server") as raised:
        run_node(config, clock=FakeClock(), rng=lambda: 0.5)
    assert isinstance(raised.value.__cause__, ConnectError)


def test_json_formatter_writes_the_event_fields() -> None:
    """One JSON object per record; a progress line carries its event's type and fields."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("stamen.test.json")
    logger.propagate = False
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)
    ProgressLog(logger)(RoundStarted(2, "fit", 5))
    line = JsonFormatter().format(records[0])
    data = json.loads(line)
    assert "\n" not in line
    assert data["level"] == "INFO"
    assert data["logger"] == "stamen.test.json"
    assert data["message"] == "round 2/0: fit sent to 5 node(s)"
    assert (data["event"], data["server_round"], data["phase"], data["sampled"]) == (
        "RoundStarted",
        2,
        "fit",
        5,
    )
