"""Micro-benchmarks of one framework's data path, against ``np.copyto`` of the same bytes.

Usage: ``micro.py --framework {stamen,flower} [--model-bytes 100000000] [--models 10]
[--repeat 5]`` (Stamen with the Stamen venv's python, Flower with Flower's). Prints one
JSON object on stdout.

* ``codec``: a FitIns carrying a ``model_bytes`` float32 model is encoded to the bytes of a
  grpc-bidi ``ServerMessage`` (arrays -> ``.npy`` Parameters -> protobuf) and decoded back
  to arrays; the decoded arrays are checked.
* ``message codec``: the FitIns alone (its Parameters already ``.npy``) encoded to wire
  bytes and decoded back to a FitIns — the protocol's own cost, without the array
  conversions (Stamen's decoded tensors are views into the received bytes).
* ``fedavg``: the weighted mean of ``models`` decoded models of ``model_bytes`` each
  (``aggregate`` of the framework's ``strategy.aggregate`` module); the result is checked.
* ``aggregate_fit``: the framework's ``FedAvg().aggregate_fit`` on ``models`` FitRes
  carrying ``.npy`` bytes — what a server does with a round's replies (decode + mean +
  encode).
* ``accumulate`` (Stamen only): the same replies through ``FedAvg.fit_accumulator``, the
  streaming path (each reply checked and folded into a float64 sum as it arrives, then
  the mean encoded); it must read and write the float64 sum once per reply, so its bound
  is lower than ``aggregate``'s.
* ``memcpy``: ``np.copyto`` of ``model_bytes`` between two preallocated arrays, the
  physical reference: encode + decode must move the bytes about twice, FedAvg must read
  ``models * model_bytes`` at least.

Times are medians of ``repeat`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import workload


def timed(function: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of ``repeat`` calls (after a warm-up call) and the last result."""
    result = function()
    times = []
    for _ in range(repeat):
        del result
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def stamen_paths() -> dict[str, Callable[..., Any]]:
    """Stamen's encode, decode, aggregate and aggregate_fit."""
    from stamen.common import ndarrays_to_parameters, parameters_to_ndarrays
    from stamen.memory import tune_allocator
    from stamen.messages import Code, FitIns, FitRes, Status
    from stamen.server.strategy import FedAvg
    from stamen.server.strategy.aggregate import aggregate
    from stamen.wire import decode_instruction, encode_instruction

    tune_allocator()  # as start_client / start_server / start_simulation do

    def make_ins(arrays: list[np.ndarray]) -> Any:
        return FitIns(ndarrays_to_parameters(arrays), {})

    def ins_arrays(ins: Any) -> list[np.ndarray]:
        return parameters_to_ndarrays(ins.parameters)

    def encode(arrays: list[np.ndarray]) -> bytes:
        return encode_instruction(FitIns(ndarrays_to_parameters(arrays), {}))

    def decode(data: bytes) -> list[np.ndarray]:
        return parameters_to_ndarrays(decode_instruction(data).parameters)

    def fit_res(arrays: list[np.ndarray]) -> Any:
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})

    def aggregate_fit(results: list[Any]) -> list[np.ndarray]:
        proxies = [SimpleNamespace(cid=str(i), node_id=i) for i in range(len(results))]
        parameters, _ = FedAvg().aggregate_fit(1, list(zip(proxies, results, strict=True)), [])
        return parameters_to_ndarrays(parameters)

    def accumulate(results: list[Any]) -> list[np.ndarray]:
        # The global model only gives the layout the replies are checked against.
        accumulator = FedAvg(initial_parameters=results[0].parameters).fit_accumulator(1)
        assert accumulator is not None
        for i, result in enumerate(results):
            accumulator.add(SimpleNamespace(cid=str(i), node_id=i), result)
        parameters, _ = accumulator.finish([])
        return parameters_to_ndarrays(parameters)

    return {
        "encode": encode,
        "decode": decode,
        "make_ins": make_ins,
        "ins_arrays": ins_arrays,
        "encode_message": encode_instruction,
        "decode_message": decode_instruction,
        "aggregate": aggregate,
        "fit_res": fit_res,
        "aggregate_fit": aggregate_fit,
        "accumulate": accumulate,
    }


def flower_paths() -> dict[str, Callable[..., Any]]:
    """Flower's: the same conversions with Flower 1.12's functions."""
    from flwr.common import (
        Code,
        FitIns,
        FitRes,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
        serde,
    )
    from flwr.proto.transport_pb2 import ServerMessage
    from flwr.server.strategy import FedAvg
    from flwr.server.strategy.aggregate import aggregate

    def make_ins(arrays: list[np.ndarray]) -> Any:
        return FitIns(ndarrays_to_parameters(arrays), {})

    def ins_arrays(ins: Any) -> list[np.ndarray]:
        return parameters_to_ndarrays(ins.parameters)

    def encode_message(ins: Any) -> bytes:
        return ServerMessage(fit_ins=serde.fit_ins_to_proto(ins)).SerializeToString()

    def decode_message(data: bytes) -> Any:
        return serde.fit_ins_from_proto(ServerMessage.FromString(data).fit_ins)

    def encode(arrays: list[np.ndarray]) -> bytes:
        ins = FitIns(ndarrays_to_parameters(arrays), {})
        return ServerMessage(fit_ins=serde.fit_ins_to_proto(ins)).SerializeToString()

    def decode(data: bytes) -> list[np.ndarray]:
        message = ServerMessage.FromString(data)
        return parameters_to_ndarrays(serde.fit_ins_from_proto(message.fit_ins).parameters)

    def fit_res(arrays: list[np.ndarray]) -> Any:
        return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})

    def aggregate_fit(results: list[Any]) -> list[np.ndarray]:
        parameters, _ = FedAvg().aggregate_fit(1, [(None, r) for r in results], [])
        return parameters_to_ndarrays(parameters)

    return {
        "encode": encode,
        "decode": decode,
        "make_ins": make_ins,
        "ins_arrays": ins_arrays,
        "encode_message": encode_message,
        "decode_message": decode_message,
        "aggregate": aggregate,
        "fit_res": fit_res,
        "aggregate_fit": aggregate_fit,
    }


def check_equal(arrays: list[np.ndarray], value: float) -> None:
    """Every value of ``arrays`` is ``value`` (a chunk at a time)."""
    for array in arrays:
        flat = array.reshape(-1)
        for start in range(0, flat.size, workload.CHECK_CHUNK):
            chunk = flat[start : start + workload.CHECK_CHUNK]
            if not np.allclose(chunk, value, rtol=1e-5, atol=0):
                raise AssertionError(f"expected {value}, found {chunk[:3]}")


def measure_memcpy(shapes: list[int], repeat: int) -> float:
    """Seconds to ``np.copyto`` a model between two preallocated models."""
    source = [np.full(n, 1.5, dtype=np.float32) for n in shapes]
    target = [np.empty_like(a) for a in source]

    def copy() -> None:
        for dst, src in zip(target, source, strict=True):
            np.copyto(dst, src)

    return timed(copy, repeat)[0]


def measure_codec(paths: dict[str, Any], shapes: list[int], repeat: int) -> dict[str, Any]:
    """Seconds to encode a FitIns and to decode it back to arrays (checked)."""
    source = [np.full(n, 1.5, dtype=np.float32) for n in shapes]
    encode, data = timed(lambda: paths["encode"](source), repeat)
    decode, decoded = timed(lambda: paths["decode"](data), repeat)
    check_equal(decoded, 1.5)
    del decoded
    # The message alone: a FitIns (Parameters already .npy) to wire bytes and back.
    ins = paths["make_ins"](source)
    encode_message, data = timed(lambda: paths["encode_message"](ins), repeat)
    decode_message, back = timed(lambda: paths["decode_message"](data), repeat)
    check_equal(paths["ins_arrays"](back), 1.5)
    return {
        "encode_seconds": encode,
        "decode_seconds": decode,
        "fit_ins_wire_bytes": len(data),
        "encode_message_seconds": encode_message,
        "decode_message_seconds": decode_message,
    }


def measure_fedavg(
    paths: dict[str, Any], shapes: list[int], models: int, repeat: int
) -> dict[str, Any]:
    """Seconds of ``aggregate`` on decoded models and of ``aggregate_fit`` on FitRes."""
    inputs = [[np.full(n, float(k), dtype=np.float32) for n in shapes] for k in range(models)]
    mean = (models - 1) / 2
    fedavg, result = timed(lambda: paths["aggregate"]([(m, 1) for m in inputs]), repeat)
    check_equal(result, mean)
    del result
    replies = [paths["fit_res"](inputs.pop()) for _ in range(models)]
    aggregate_fit, result = timed(lambda: paths["aggregate_fit"](replies), repeat)
    check_equal(result, mean)
    del result
    seconds = {"fedavg_seconds": fedavg, "aggregate_fit_seconds": aggregate_fit}
    if "accumulate" in paths:
        seconds["accumulate_seconds"], result = timed(lambda: paths["accumulate"](replies), repeat)
        check_equal(result, mean)
    return seconds


def run(framework: str, model_bytes: int, models: int, repeat: int) -> dict[str, Any]:
    """All four measurements for one framework."""
    paths = stamen_paths() if framework == "stamen" else flower_paths()
    shapes = workload.model_shapes(model_bytes)
    memcpy = measure_memcpy(shapes, repeat)
    codec = measure_codec(paths, shapes, repeat)
    fedavg = measure_fedavg(paths, shapes, models, repeat)
    codec_seconds = codec["encode_seconds"] + codec["decode_seconds"]
    message_seconds = codec["encode_message_seconds"] + codec["decode_message_seconds"]
    return {
        "framework": framework,
        "model_bytes": model_bytes,
        "models": models,
        "repeat": repeat,
        "memcpy_seconds": memcpy,
        "memcpy_gb_per_s": model_bytes / memcpy / 1e9,
        **codec,
        "codec_seconds": codec_seconds,
        "codec_fraction_of_memcpy": memcpy / codec_seconds,
        "message_codec_seconds": message_seconds,
        "message_codec_fraction_of_memcpy": memcpy / message_seconds,
        **fedavg,
        "fedavg_memcpy_bound_seconds": models * memcpy,
        "fedavg_fraction_of_memcpy_bound": models * memcpy / fedavg["fedavg_seconds"],
        "aggregate_fit_fraction_of_memcpy_bound": models * memcpy / fedavg["aggregate_fit_seconds"],
        **(
            {"accumulate_fraction_of_memcpy_bound": models * memcpy / fedavg["accumulate_seconds"]}
            if "accumulate_seconds" in fedavg
            else {}
        ),
        "peak_rss_bytes": workload.peak_rss_bytes(),
    }


def main() -> int:
    """Measure and print the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("stamen", "flower"), required=True)
    parser.add_argument("--model-bytes", type=int, default=100_000_000)
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run(args.framework, args.model_bytes, args.models, args.repeat)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
