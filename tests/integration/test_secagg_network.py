"""SecAgg+ over the network: 5 Stamen nodes on each transport, with TLS and node
authentication; the stages travel as ordinary instructions."""

from __future__ import annotations

import numpy as np
import pytest

import stamen as fl
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays
from stamen.protocol import secagg_math as sm
from stamen.server.server import ServerConfig
from stamen.server.strategy import FedAvg, SecAggPlus
from stamen.testing import (
    DevCertificates,
    NodeThread,
    generate_certificates,
    generate_node_keys,
    node_threads,
    running_server,
)
from stamen.testing.conformance import TRANSPORTS
from stamen.typing import Config, NDArrays, Scalar

N = 5


class Adder(fl.client.NumPyClient):
    """Adds k to every parameter; trained on 10 k examples."""

    def __init__(self, k: int) -> None:
        self.k = k

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return [p + self.k for p in parameters], 10 * self.k, {}


@pytest.fixture(scope="module")
def certs() -> DevCertificates:
    return generate_certificates()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_secagg_rounds_over_tls_with_authenticated_nodes(
    transport: str, certs: DevCertificates
) -> None:
    pairs = [generate_node_keys() for _ in range(N)]
    init = ndarrays_to_parameters([np.zeros((4, 3), np.float32), np.zeros(5, np.float32)])
    inner = FedAvg(
        min_fit_clients=N, min_available_clients=N, fraction_evaluate=0.0, initial_parameters=init
    )
    strategy = SecAggPlus(inner, num_shares=N, reconstruction_threshold=3, timeout=30.0)
    with (
        running_server(
            config=ServerConfig(num_rounds=2),
            strategy=strategy,
            rest=True,
            certificates=certs.server_tuple,
            authorized_keys=[p for _, p in pairs],
        ) as srv,
        node_threads() as nodes,
    ):
        for k, pair in enumerate(pairs, start=1):
            kwargs = {
                "server_address": srv.address_for(transport),
                "transport": transport,
                "root_certificates": certs.ca_cert,
                "authentication_keys": pair,
                "client": Adder(k).to_client(),
            }
            nodes.append(NodeThread(kwargs).start())
        srv.result(60)
        assert [n.join(30) for n in nodes] == [None] * N
    # Each round adds sum(10 k * k) / sum(10 k) = 55 / 15 to every parameter.
    want = 2 * 55 / 15
    bound = 2 * sm.error_bound(
        [sm.weight_factor(10 * k, 1000.0, 2**22) for k in range(1, N + 1)],
        clipping_range=8.0,
        quantization_range=2**22,
    )
    for layer in parameters_to_ndarrays(srv.server.parameters):
        assert np.abs(layer - want).max() <= bound + 1e-5
