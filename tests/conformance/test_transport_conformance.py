"""Every transport behaves the same: the conformance suite of stamen.testing, per transport."""

from __future__ import annotations

import numpy as np
import pytest

from stamen.testing import conformance
from stamen.testing.conformance import TRANSPORTS


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_fedavg_gives_the_same_parameters(transport: str) -> None:
    """3 FedAvg rounds with 3 nodes give the exact weighted mean; nodes exit normally."""
    conformance.check_fedavg_identical([transport])


def test_mixed_federation_matches_single_transport_runs() -> None:
    """One node per transport in one run: the same parameters as single-transport runs."""
    mixed = conformance.check_fedavg_identical(list(TRANSPORTS))
    alone = conformance.check_fedavg_identical(["grpc-bidi"])
    for a, b in zip(mixed, alone, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_client_exception_is_a_failure(transport: str) -> None:
    """A client exception is a CLIENT_ERROR failure and the node keeps serving."""
    conformance.check_client_exception_is_failure(transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_round_timeout_drops_a_slow_client(transport: str) -> None:
    """round_timeout counts a slow node as a failure; the round completes."""
    conformance.check_round_timeout(transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_message_limits_hold_on_both_sides(transport: str) -> None:
    """grpc_max_message_length is enforced with clear errors by server and node."""
    conformance.check_message_limits(transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_reconnect_later(transport: str) -> None:
    """ReconnectIns(seconds=n) makes the node leave and come back; 0 ends it."""
    conformance.check_reconnect_later(transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_end_of_run_stops_the_node(transport: str) -> None:
    """start_client returns when the run ends, on every transport."""
    conformance.check_end_of_run(transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_max_retries_counts_attempts(transport: str) -> None:
    """max_retries=2 makes exactly 3 attempts, then ConnectError."""
    conformance.check_max_retries(transport)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_server_restart_mid_run(transport: str) -> None:
    """Nodes survive a server restart on the same port and finish the new run."""
    conformance.check_server_restart(transport)


@pytest.mark.parametrize("transport", ["grpc-rere", "rest"])
def test_liveness_of_pull_based_nodes(transport: str) -> None:
    """Heartbeats keep a busy node; a vanished node's instruction fails at once."""
    conformance.check_liveness(transport)
