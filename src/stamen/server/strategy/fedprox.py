"""FedProx: FedAvg whose clients add a proximal term to their loss."""

from __future__ import annotations

from collections.abc import Callable

from ...messages import FitIns, Parameters
from ...typing import Config, MetricsAggregationFn
from ..client_manager import ClientManager
from ..client_proxy import ClientProxy
from ._checks import check_number
from .fedavg import EvaluateFn, FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    r"""FedProx: FedAvg, plus ``proximal_mu`` in every fit config for the clients' loss.

    The server aggregates as FedAvg (``w_{t+1} = sum_k n_k w_k / sum_k n_k``). Each client
    minimizes its loss plus a proximal term that keeps it near the global model ``w_t``::

        h_k(w) = F_k(w) + (mu / 2) * ||w - w_t||^2

    The strategy sends ``mu`` as ``config["proximal_mu"]``; the client's training code adds
    the term (e.g. in PyTorch, ``loss += mu / 2 * sum((p - g).norm(2) ** 2)`` over the
    local and the received global parameters). ``mu = 0`` is FedAvg.

    Paper: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020
    (arXiv:1812.06127).

    Keywords and defaults are Flower 1.12's.

    Args:
        proximal_mu: Weight ``mu >= 0`` of the proximal term (required).
        fraction_fit: See :class:`FedAvg` for this and the other keywords.
    """

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 2,
        min_evaluate_clients: int = 2,
        min_available_clients: int = 2,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: Callable[[int], Config] | None = None,
        on_evaluate_config_fn: Callable[[int], Config] | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
        fit_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        evaluate_metrics_aggregation_fn: MetricsAggregationFn | None = None,
        proximal_mu: float,
    ) -> None:
        super().__init__(
            fraction_fit=fraction_fit,
            fraction_evaluate=fraction_evaluate,
            min_fit_clients=min_fit_clients,
            min_evaluate_clients=min_evaluate_clients,
            min_available_clients=min_available_clients,
            evaluate_fn=evaluate_fn,
            on_fit_config_fn=on_fit_config_fn,
            on_evaluate_config_fn=on_evaluate_config_fn,
            accept_failures=accept_failures,
            initial_parameters=initial_parameters,
            fit_metrics_aggregation_fn=fit_metrics_aggregation_fn,
            evaluate_metrics_aggregation_fn=evaluate_metrics_aggregation_fn,
        )
        check_number("proximal_mu", proximal_mu, minimum=0.0)
        self.proximal_mu = proximal_mu

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """FedAvg's instructions with ``"proximal_mu"`` added to the config."""
        return with_config(
            super().configure_fit(server_round, parameters, client_manager),
            {"proximal_mu": self.proximal_mu},
        )


def with_config(
    instructions: list[tuple[ClientProxy, FitIns]], extra: Config
) -> list[tuple[ClientProxy, FitIns]]:
    """The instructions with ``extra`` merged into each config.

    Clients that shared one FitIns still share one (so it is encoded once).
    """
    replaced: dict[int, FitIns] = {}
    out: list[tuple[ClientProxy, FitIns]] = []
    for proxy, fit_ins in instructions:
        new = replaced.get(id(fit_ins))
        if new is None:
            new = FitIns(fit_ins.parameters, {**fit_ins.config, **extra})
            replaced[id(fit_ins)] = new
        out.append((proxy, new))
    return out
