"""dispatch.handle with the node's Lease: Stamen's NumPyClient adapter trains in the
received memory; any other client, and any method a subclass overrides, gets copies."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from stamen.client.client import Client
from stamen.client.dispatch import handle, received
from stamen.client.numpy_client import NumPyClient, NumPyClientAdapter, TakesLease
from stamen.context import Context, RecordSet
from stamen.messages import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetPropertiesIns,
    Instruction,
    Status,
)
from stamen.ndarrays import (
    Lease,
    ReceivedBuffer,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
    received_buffer_of,
)
from stamen.typing import Config, NDArrays, Scalar
from stamen.wire import decode_instruction, encode_instruction

MODEL = [np.arange(6, dtype=np.float32)]


def _context() -> Context:
    return Context(node_id=1, node_config={}, state=RecordSet(), run_config={})


def _received(instruction: Instruction) -> Instruction:
    """``instruction`` as the node's transport delivers it: decoded from a ReceivedBuffer."""
    message = encode_instruction(instruction)
    buffer = ReceivedBuffer.allocate(len(message))
    buffer[:] = np.frombuffer(message, dtype=np.uint8)
    return decode_instruction(buffer.data.toreadonly())


class AddOne(NumPyClient):
    """Adds one in place; records whether it was given the received memory."""

    def __init__(self) -> None:
        self.in_received: list[bool] = []

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        self.in_received.append(all(received_buffer_of(p) is not None for p in parameters))
        for p in parameters:
            p += 1
        return parameters, 1, {}

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        self.in_received.append(all(received_buffer_of(p) is not None for p in parameters))
        return 0.0, 1, {}


class Subclassed(NumPyClientAdapter):
    """Overrides fit and reads the instruction after the NumPyClient ran."""

    def fit(self, ins: FitIns) -> FitRes:
        reply = super().fit(ins)
        self.after = parameters_to_ndarrays(ins.parameters)
        return reply


class Untouched(NumPyClientAdapter):
    """Overrides nothing the instruction reaches."""

    def get_properties(self, ins: GetPropertiesIns) -> Any:
        return super().get_properties(ins)


def test_the_node_lease_names_the_received_buffer() -> None:
    fit = _received(FitIns(ndarrays_to_parameters(MODEL), {}))
    assert isinstance(fit, FitIns)
    lease = received(fit)
    [buffer] = lease.buffers
    assert received_buffer_of(np.frombuffer(fit.parameters.tensors[0], np.uint8)) is buffer
    assert received(GetParametersIns({})).buffers == ()
    assert received(FitIns(ndarrays_to_parameters(MODEL), {})).buffers == ()  # bytes


@pytest.mark.parametrize("kind", [FitIns, EvaluateIns])
def test_the_adapter_is_handed_the_received_memory(kind: type[FitIns | EvaluateIns]) -> None:
    numpy_client = AddOne()
    adapter = numpy_client.to_client()
    assert isinstance(adapter, TakesLease)
    instruction = _received(kind(ndarrays_to_parameters(MODEL), {}))
    lease = received(instruction)
    reply = handle(lambda context: adapter, _context(), instruction, lease)
    assert isinstance(reply, FitRes | EvaluateRes) and reply.status.code == Code.OK
    assert numpy_client.in_received == [True]
    assert not lease.held  # ended when the client returned


def test_without_a_lease_the_adapter_gets_copies() -> None:
    numpy_client = AddOne()
    instruction = _received(FitIns(ndarrays_to_parameters(MODEL), {}))
    handle(lambda context: numpy_client.to_client(), _context(), instruction)
    assert numpy_client.in_received == [False]
    assert isinstance(instruction, FitIns)
    np.testing.assert_array_equal(parameters_to_ndarrays(instruction.parameters)[0], MODEL[0])


def test_a_subclass_that_overrides_the_method_gets_a_plain_call_and_copies() -> None:
    numpy_client = AddOne()
    adapter = Subclassed(numpy_client)
    instruction = _received(FitIns(ndarrays_to_parameters(MODEL), {}))
    handle(lambda context: adapter, _context(), instruction, received(instruction))
    assert numpy_client.in_received == [False]
    np.testing.assert_array_equal(adapter.after[0], MODEL[0])  # the instruction is intact


def test_a_subclass_that_keeps_the_adapters_method_is_handed_the_memory() -> None:
    numpy_client = AddOne()
    instruction = _received(FitIns(ndarrays_to_parameters(MODEL), {}))
    lease = received(instruction)
    handle(lambda context: Untouched(numpy_client), _context(), instruction, lease)
    assert numpy_client.in_received == [True]


def test_a_users_client_gets_a_plain_call_and_the_lease_ends() -> None:
    class Reader(Client):
        def fit(self, ins: FitIns) -> FitRes:
            arrays = parameters_to_ndarrays(ins.parameters)
            self.seen = received_buffer_of(arrays[0])
            return FitRes(Status(Code.OK, ""), ins.parameters, 1, {})

    client = Reader()
    assert not isinstance(client, TakesLease)
    instruction = _received(FitIns(ndarrays_to_parameters(MODEL), {}))
    lease = received(instruction)
    handle(lambda context: client, _context(), instruction, lease)
    assert client.seen is None and not lease.held


def test_an_ended_lease_refuses_aliases() -> None:
    instruction = _received(FitIns(ndarrays_to_parameters(MODEL), {}))
    assert isinstance(instruction, FitIns)
    lease = Lease.over(instruction.parameters.tensors)
    lease.end()
    with pytest.raises(RuntimeError, match="handed on or ended"):
        parameters_to_ndarrays(instruction.parameters, lease=lease)
