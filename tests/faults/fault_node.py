"""A client node in a process of its own, for the fault-injection tests.

Usage: ``python fault_node.py ADDRESS TRANSPORT K [--hang-in-fit N] [--hold-in-fit N]``

The node trains like :class:`stamen.testing.conformance.AddClient` (fit adds ``K`` to
every array and reports ``num_examples=K`` and the metric ``k=K``; it is copied here
because importing ``stamen.testing`` would double the process's start-up time). It tells
the test what it is doing with one line per event on stdout (flushed at once):

* ``START`` once it is about to connect;
* ``FIT <n>`` when its n-th fit starts;
* ``HANG <n>`` when, with ``--hang-in-fit N``, its N-th fit blocks for good (the test then
  kills the process);
* ``HOLD <n>`` when, with ``--hold-in-fit N``, its N-th fit waits for a line on stdin
  before it answers (a slow node the test releases);
* ``EXIT ok`` when ``start_client`` returned, ``EXIT error <type>: <message>`` when it
  raised (exit status 1).
"""

from __future__ import annotations

import argparse
import sys
import threading

import numpy as np

import stamen as fl
from stamen.typing import Config, NDArrays, Scalar


def say(line: str) -> None:
    """One event line for the test."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class FaultClient(fl.client.NumPyClient):
    """AddClient that reports its fits and can hang or wait inside one."""

    def __init__(self, k: int, hang_in_fit: int, hold_in_fit: int) -> None:
        self.k = k
        self.fits = 0
        self.hang_in_fit = hang_in_fit
        self.hold_in_fit = hold_in_fit

    def get_parameters(self, config: Config) -> NDArrays:
        return [np.zeros((2, 2), dtype=np.float32), np.zeros(3, dtype=np.float32)]

    def fit(self, parameters: NDArrays, config: Config) -> tuple[NDArrays, int, dict[str, Scalar]]:
        self.fits += 1
        number = self.fits
        say(f"FIT {number}")
        if number == self.hang_in_fit:
            say(f"HANG {number}")
            threading.Event().wait()  # until the test kills this process
        if number == self.hold_in_fit:
            say(f"HOLD {number}")
            sys.stdin.readline()  # the test writes a line (or closes stdin) to release us
        return [p + np.float32(self.k) for p in parameters], self.k, {"k": self.k}

    def evaluate(
        self, parameters: NDArrays, config: Config
    ) -> tuple[float, int, dict[str, Scalar]]:
        return float(parameters[1].sum()), self.k, {"k": self.k}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("transport")
    parser.add_argument("k", type=int)
    parser.add_argument("--hang-in-fit", type=int, default=0)
    parser.add_argument("--hold-in-fit", type=int, default=0)
    parser.add_argument("--max-retries", type=int, default=None)
    args = parser.parse_args()
    client = FaultClient(args.k, args.hang_in_fit, args.hold_in_fit)
    say("START")
    try:
        fl.client.start_client(
            server_address=args.address,
            client=client.to_client(),
            transport=args.transport,
            max_retries=args.max_retries,
        )
    except Exception as exc:
        say(f"EXIT error {type(exc).__name__}: {exc}")
        return 1
    say("EXIT ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
