"""Strategies: how a server runs rounds. Flower 1.12's class names, keywords and defaults.

Pick one by name (``stamen.server.strategy.FedAdam(...)``); ``docs/strategies.md`` has a
table of them all and a guide to choosing. Every strategy refuses bad client results the
same way (:mod:`.validate`) and keeps its state in :meth:`Strategy.state_dict`.
"""

from __future__ import annotations

from .aggregate import aggregate, weighted_loss_avg
from .bulyan import Bulyan
from .dp_adaptive_clipping import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
)
from .dp_fixed_clipping import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)
from .fault_tolerant_fedavg import FaultTolerantFedAvg
from .fedadagrad import FedAdagrad
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedmedian import FedMedian
from .fedopt import FedOpt
from .fedprox import FedProx
from .fedtrimmedavg import FedTrimmedAvg
from .fedxgb_bagging import FedXgbBagging
from .fedyogi import FedYogi
from .krum import Krum
from .metrics import weighted_average
from .qfedavg import QFedAvg
from .secagg import SecAggPlus
from .state import StrategyState
from .strategy import FitAccumulator, FitPrefold, Strategy
from .validate import InvalidResult

__all__ = [
    "Bulyan",
    "DifferentialPrivacyClientSideAdaptiveClipping",
    "DifferentialPrivacyClientSideFixedClipping",
    "DifferentialPrivacyServerSideAdaptiveClipping",
    "DifferentialPrivacyServerSideFixedClipping",
    "FaultTolerantFedAvg",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedMedian",
    "FedOpt",
    "FedProx",
    "FedTrimmedAvg",
    "FedXgbBagging",
    "FedYogi",
    "FitAccumulator",
    "FitPrefold",
    "InvalidResult",
    "Krum",
    "QFedAvg",
    "SecAggPlus",
    "Strategy",
    "StrategyState",
    "aggregate",
    "weighted_average",
    "weighted_loss_avg",
]
