"""Fit results that wait on disk: spill files, their pages, and the rules that read them."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import textwrap
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stamen as fl
from stamen.client import NumPyClient
from stamen.client.dispatch import handle
from stamen.context import Context, RecordSet
from stamen.messages import Code, FitRes, Instruction, Parameters, Reply, Status
from stamen.ndarrays import ndarrays_to_parameters, parameters_to_ndarrays, parameters_to_views
from stamen.server import ClientProxy, Server, SimpleClientManager
from stamen.server.spill import (
    SpillStore,
    close_segments,
    is_spilled,
    receive_buffer,
    release,
    spill_parameters,
    spilled_bytes_mapped,
    spilled_like,
)
from stamen.server.strategy import FedAvg, aggregate

OK = Status(code=Code.OK, message="")
# the module (the package exports its function ``aggregate`` under the same name)
aggregate_module = importlib.import_module("stamen.server.strategy.aggregate")
spill_module = importlib.import_module("stamen.server.spill")


class Shift(NumPyClient):
    """Trains by adding ``delta`` to a model of two 10.0s; holds ``n`` examples."""

    def __init__(self, delta: float, n: int) -> None:
        self.delta, self.n = delta, n

    def get_parameters(self, config: Any) -> list[np.ndarray]:
        return [np.full(2, 10.0)]

    def fit(self, parameters: Any, config: Any) -> Any:
        return [p + self.delta for p in parameters], self.n, {}

    def evaluate(self, parameters: Any, config: Any) -> Any:
        return 0.0, self.n, {}


class LocalProxy(ClientProxy):
    """A ClientProxy whose submit() runs its client in-process (a done Future)."""

    def __init__(self, cid: str, client: NumPyClient) -> None:
        super().__init__(cid)
        self.client = client.to_client()
        self.context = Context(node_id=-1, node_config={}, state=RecordSet(), run_config={})

    def submit(self, ins: Instruction, timeout: float | None) -> Future[Reply]:
        future: Future[Reply] = Future()
        future.set_result(handle(lambda context: self.client, self.context, ins))
        return future


def _manager(*proxies: ClientProxy) -> SimpleClientManager:
    manager = SimpleClientManager(wait_timeout=0.05, seed=0)
    for proxy in proxies:
        assert manager.register(proxy)
    return manager


def _rss() -> int:
    """This process's resident set, bytes (file-backed pages mapped in it included)."""
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) * 1024


def test_spilled_parameters_are_the_same_bytes_in_a_file_with_no_name(tmp_path: Path) -> None:
    """Spilled tensors hold the same bytes, decode as before (Flower's way too), and the
    spill directory shows no file: nothing can be left behind, even by a killed process."""
    arrays = [np.arange(100_000, dtype=np.float32), np.array(3, dtype=np.int64), np.zeros(0)]
    parameters = ndarrays_to_parameters(arrays)
    spilled = spill_parameters(parameters, str(tmp_path))
    assert [bytes(t) for t in spilled.tensors] == [bytes(t) for t in parameters.tensors]
    assert all(isinstance(t, memoryview) and t.readonly for t in spilled.tensors)
    for got, want in zip(parameters_to_ndarrays(spilled), arrays, strict=True):
        np.testing.assert_array_equal(got, want)
    assert os.listdir(tmp_path) == []
    assert spilled_bytes_mapped() >= arrays[0].nbytes


def test_release_lets_the_pages_go_and_keeps_the_data() -> None:
    values = np.random.default_rng(0).random(4_000_000).astype(np.float32)  # 16 MB
    [tensor] = spill_parameters(ndarrays_to_parameters([values])).tensors
    [view] = parameters_to_views(Parameters(tensors=[tensor], tensor_type="numpy.ndarray"))
    assert float(view.sum(dtype=np.float64)) == pytest.approx(float(values.sum(dtype=np.float64)))
    before = _rss()
    release(view)
    assert before - _rss() > 15_000_000  # its pages let go ...
    np.testing.assert_array_equal(view, values)  # ... and read again from the file


def test_release_leaves_memory_that_is_not_spilled_alone() -> None:
    """madvise(DONTNEED) on ordinary memory would zero it: release must not touch it."""
    values = np.arange(2_000_000, dtype=np.float64)
    before = _rss()
    release(values)
    release(memoryview(values))
    np.testing.assert_array_equal(values, np.arange(2_000_000, dtype=np.float64))
    assert _rss() >= before - 1_000_000


def _result(value: float, size: int) -> FitRes:
    parameters = ndarrays_to_parameters([np.full(size, value, dtype=np.float32)])
    return FitRes(OK, parameters, 1, {})


def test_store_keeps_results_in_memory_up_to_its_budget_then_spills() -> None:
    store = SpillStore(budget=10_000)
    store.begin()
    small = _result(1.0, 1_000)  # ~4 KB
    assert store.take(None, small) is small
    spilled = store.take(None, _result(2.0, 10_000))  # ~40 KB: over the budget
    assert isinstance(spilled.parameters.tensors[0], memoryview)
    np.testing.assert_array_equal(parameters_to_ndarrays(spilled.parameters)[0], 2.0)
    report = store.end(1)
    assert (report.kept, report.spilled) == (1, 1)
    assert report.spilled_bytes == len(spilled.parameters.tensors[0])
    store.begin()
    assert store.end(2).spilled == 0


def test_store_refuses_a_negative_budget() -> None:
    with pytest.raises(ValueError, match="expected budget >= 0 bytes, received -1"):
        SpillStore(budget=-1)


class SavesEveryRound(FedAvg):
    """The pattern Flower's docs teach: override aggregate_fit, call super(), save."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saved: list[list[np.ndarray]] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        parameters, metrics = super().aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.saved.append(fl.common.parameters_to_ndarrays(parameters))
        return parameters, metrics


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_a_subclass_trains_the_same_with_results_on_disk(budget: int) -> None:
    proxies = [LocalProxy(str(k), Shift(float(k), k + 1)) for k in range(4)]
    strategy = SavesEveryRound(fraction_evaluate=0.0)
    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    server.spill = SpillStore(budget=budget)
    server.fit(num_rounds=2, timeout=None)
    # each round adds sum_k (k+1) * k / sum_k (k+1) = 20 / 10 = 2 to 10
    np.testing.assert_allclose(strategy.saved[-1][0], np.full(2, 14.0))
    assert len(strategy.saved) == 2


def test_coordinate_wise_rules_give_the_same_values_in_parts(monkeypatch: Any) -> None:
    rng = np.random.default_rng(1)
    models = [[rng.normal(size=(37, 11)).astype(np.float32), rng.normal(size=5)] for _ in range(7)]
    results = [(m, 1) for m in models]
    whole = {
        "median": aggregate_module.aggregate_median(results),
        "trimmed": aggregate_module.aggregate_trimmed_avg(results, 0.2),
        "distances": [aggregate_module.pairwise_squared_distances(models)],
    }
    monkeypatch.setattr(aggregate_module, "PART_VALUES", 7 * 13)  # 13 values per part
    parts = {
        "median": aggregate_module.aggregate_median(results),
        "trimmed": aggregate_module.aggregate_trimmed_avg(results, 0.2),
        "distances": [aggregate_module.pairwise_squared_distances(models)],
    }
    stacked = np.stack([m[0] for m in models]).astype(np.float64)
    np.testing.assert_array_equal(parts["median"][0], np.median(stacked, axis=0).astype(np.float32))
    for name in ("median", "trimmed"):
        for got, want in zip(parts[name], whole[name], strict=True):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(parts["distances"][0], whole["distances"][0], rtol=1e-12)


_PEAK = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import stamen as fl
    from stamen.messages import Code, FitRes, Status
    from stamen.ndarrays import parameters_to_views
    from stamen.server.spill import spill_parameters
    from stamen.server import strategy as s

    def status(key):
        text = open("/proc/self/status").read()
        return int(text.split(key + ":")[1].split()[0]) * 1024

    name, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    results = []
    for k in range(count):
        model = [np.full(size, k, np.float32), np.full(3, k, np.float32)]
        parameters = spill_parameters(fl.common.ndarrays_to_parameters(model))
        results.append((None, FitRes(Status(Code.OK, ""), parameters, 1, {})))
        del model, parameters
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM back to VmRSS
    class OwnStrategy:
        # A strategy of one's own, written the way Flower's FedAvg is: every result
        # decoded with parameters_to_ndarrays, then averaged with aggregate.

        def __init__(self, **kwargs):
            pass

        def aggregate_fit(self, server_round, results, failures):
            from stamen.server.strategy.aggregate import aggregate

            weights = [
                (fl.common.parameters_to_ndarrays(r.parameters), r.num_examples)
                for _, r in results
            ]
            return fl.common.ndarrays_to_parameters(aggregate(weights)), {}

    rule = {
        "fedavg": s.FedAvg,
        "median": s.FedMedian,
        "trimmed": s.FedTrimmedAvg,
        "krum": lambda **kw: s.Krum(num_malicious_clients=1, **kw),
        "own": OwnStrategy,
    }[name](fraction_evaluate=0.0)
    parameters, _ = rule.aggregate_fit(1, results, [])
    grew = status("VmHWM") - base
    out = parameters_to_views(parameters)  # views: reading the value allocates nothing
    print(json.dumps({"grew": grew, "value": float(out[0][0])}))
    """
)


@pytest.mark.parametrize(
    ("rule", "value"),
    [("fedavg", 5.5), ("median", 5.5), ("trimmed", 5.5), ("krum", 4.0), ("own", 5.5)],
)
def test_rules_over_spilled_results_hold_a_few_models_not_all(rule: str, value: float) -> None:
    """Twelve 24 MB results on disk (288 MB): each rule's peak stays within one model (the
    new model, in its encoded place) and a fixed 128 MB (the parts it stacks, 2 x 32 MB;
    pages in flight; the aggregation threads' scratch), not all twelve; what it computes
    is right (Krum: models 4 to 7 tie, the first wins). A strategy of one's own that
    decodes every result with ``parameters_to_ndarrays`` gets copy-on-write arrays of the
    files, not copies (600 MB at its peak when they were copies)."""
    size, count = 6_000_000, 12  # float32: 24 MB per model
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, rule, str(count), str(size)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["value"] == value
    bound = size * 4 + (128 << 20)
    assert report["grew"] < bound, f"{rule}: peak grew by {report['grew'] / 1e6:.0f} MB"


def test_aggregate_of_spilled_results_equals_aggregate_in_memory() -> None:
    rng = np.random.default_rng(2)
    models = [[rng.normal(size=1000).astype(np.float32)] for _ in range(5)]
    spilled = [parameters_to_ndarrays(spill_parameters(ndarrays_to_parameters(m))) for m in models]
    want = aggregate([(m, k + 1) for k, m in enumerate(models)])
    got = aggregate([(m, k + 1) for k, m in enumerate(spilled)])
    np.testing.assert_array_equal(got[0], want[0])


def test_a_result_derived_from_a_spilled_one_is_spilled_too() -> None:
    """A DP wrapper's clipped update of a spilled result waits on disk as well."""
    source = spill_parameters(ndarrays_to_parameters([np.ones(1000, dtype=np.float32)]))
    derived = ndarrays_to_parameters([np.zeros(1000, dtype=np.float32)])
    spilled = spilled_like(source, derived)
    assert isinstance(spilled.tensors[0], memoryview)
    assert bytes(spilled.tensors[0]) == bytes(derived.tensors[0])
    in_memory = ndarrays_to_parameters([np.ones(1000, dtype=np.float32)])
    assert spilled_like(in_memory, derived) is derived


_HOLDS_SPILLED = textwrap.dedent(
    """
    import sys
    import numpy as np
    import stamen as fl
    from stamen.server.spill import spill_parameters

    model = [np.ones(2_000_000, np.float32)]
    parameters = fl.common.ndarrays_to_parameters(model)
    kept = [spill_parameters(parameters, sys.argv[1]) for _ in range(3)]
    print("SPILLED", flush=True)
    sys.stdin.readline()  # hold the files until killed
    """
)


def test_a_killed_server_leaves_no_spill_file_behind(tmp_path: Path) -> None:
    """The files have no name from the start: neither a live process nor a SIGKILLed one
    shows any in the spill directory, and the disk comes back with the process."""
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDS_SPILLED, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "SPILLED"
            assert os.listdir(tmp_path) == []
            with open(f"/proc/{proc.pid}/maps") as maps:
                mapped = [line for line in maps if str(tmp_path) in line]
            # three results, one file (they share it), which has no name (its mapping
            # may show in pieces: readahead is advised per result)
            files = {line.split()[4] for line in mapped}
            assert len(files) == 1 and all("(deleted)" in line for line in mapped), mapped
        finally:
            proc.kill()
            proc.wait(timeout=30)
    assert os.listdir(tmp_path) == []


def test_without_a_usable_spill_directory_results_stay_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A spill directory that cannot take files (missing, full) costs memory, never a
    result: the store keeps it and says why, once."""
    missing = str(tmp_path / "no-such-directory")
    store = SpillStore(missing, budget=0)
    store.begin()
    reply = _result(4.0, 1_000)
    with caplog.at_level("WARNING", logger="stamen.server"):
        assert store.take(None, reply) is reply
        assert store.take(None, _result(5.0, 1_000)).parameters.tensors
    warnings = [r.getMessage() for r in caplog.records if "spill files" in r.getMessage()]
    assert len(warnings) == 1 and missing in warnings[0]
    assert store.end(1).kept == 2
    buffer = receive_buffer(4096, missing)
    assert buffer.nbytes == 4096 and not is_spilled(
        Parameters(tensors=[buffer.data], tensor_type="numpy.ndarray")
    )


def test_many_spilled_results_share_a_few_files(tmp_path: Path) -> None:
    """A descriptor per spilled result would run a server out of them: 300 results hold
    one file between them (two descriptors: its mapping's, and the one results are
    written through while the file takes them), and a new round starts a new file: the
    old one keeps its two while its results live (it is reused once they are let go)."""

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = descriptors()
    kept = [
        spill_parameters(ndarrays_to_parameters([np.full(1000, k, np.float32)]), str(tmp_path))
        for k in range(300)
    ]
    assert descriptors() - before <= 2
    assert [float(parameters_to_views(p)[0][999]) for p in kept] == [float(k) for k in range(300)]
    close_segments(str(tmp_path))
    later = spill_parameters(ndarrays_to_parameters([np.ones(10, np.float32)]), str(tmp_path))
    assert descriptors() - before <= 4 and is_spilled(later)


def _file_of(parameters: Parameters) -> int:
    """The start address of the spill file mapping ``parameters`` lie in."""
    found = spill_module._mapping_at(spill_module._address(parameters.tensors[0]))
    assert found is not None
    return found[0].start


def _round_of_results(directory: str, value: float) -> list[Parameters]:
    """Three results of a round spilled into ``directory`` (one received into its spill
    file as frames land, two written out), the round then ended."""
    message = ndarrays_to_parameters([np.full(10_000, value, np.float32)])
    payload = np.frombuffer(message.tensors[0], np.uint8)
    received = receive_buffer(payload.size, directory)
    received[:] = payload
    first = Parameters(tensors=[received.data.toreadonly()], tensor_type=message.tensor_type)
    rest = [
        spill_parameters(ndarrays_to_parameters([np.full(5_000, value, np.float64)]), directory)
        for _ in range(2)
    ]
    close_segments(directory)
    return [first, *rest]


def test_a_spill_file_takes_the_next_rounds_results_once_its_own_are_let_go(
    tmp_path: Path,
) -> None:
    """Over the same pages (no new page-cache pages every round): the next round's
    results go into the file the last round's left (whose later bytes still hold what
    the last round wrote there), and read as written."""
    directory = str(tmp_path)
    first = _round_of_results(directory, 1.0)
    start = _file_of(first[0])
    assert {_file_of(p) for p in first} == {start}
    second_at = spill_module._address(first[1].tensors[0]) - start
    second_bytes = bytes(first[1].tensors[0])
    del first
    again = receive_buffer(4096, directory)  # the next round's first result
    again[:] = 2
    found = spill_module._mapping_at(spill_module._address(again))
    assert found is not None
    entry, mapping = found
    assert mapping[second_at : second_at + len(second_bytes)] == second_bytes
    assert bytes(again[:3]) == bytes([2, 2, 2])
    later = _round_of_results(directory, 3.0)  # the same round's other results
    assert {_file_of(p) for p in later} == {entry.start}
    assert [float(parameters_to_views(p)[0][-1]) for p in later] == [3.0, 3.0, 3.0]
    del found, entry, mapping, later, again
    SpillStore(directory).close()


def test_a_spill_file_with_a_live_result_is_never_written_again(tmp_path: Path) -> None:
    """One result of the last round still held (by a strategy, say): its file is not
    reused, and the result keeps its values while the next rounds spill."""
    directory = str(tmp_path)
    kept = _round_of_results(directory, 1.0)[1]
    for value in (2.0, 3.0):
        later = _round_of_results(directory, value)
        assert all(_file_of(p) != _file_of(kept) for p in later)
        assert [float(parameters_to_views(p)[0][0]) for p in later] == [value] * 3
        del later
    assert np.all(parameters_to_views(kept)[0] == 1.0)
    SpillStore(directory).close()


def test_a_run_that_ends_lets_its_spare_spill_files_go(tmp_path: Path) -> None:
    """SpillStore.close (the server calls it when a run ends, however it ends): the files
    kept for the next rounds are closed, with their disk; the next run makes new ones."""

    def descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    directory = str(tmp_path)
    before = descriptors()
    first = _round_of_results(directory, 1.0)
    file = _file_of(first[0])
    del first
    assert descriptors() - before == 2  # a spare: its mapping's descriptor and its own
    SpillStore(directory).close()
    assert descriptors() == before
    assert spill_module._spares.get(directory) is None
    later = _round_of_results(directory, 2.0)
    assert float(parameters_to_views(later[0])[0][0]) == 2.0
    del later, file
    SpillStore(directory).close()


class SeesTheOldModel(FedAvg):
    """Records, as each round aggregates, whether the server's model waits on disk."""

    def __init__(self, server: list[Server], fail_round: int | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.server, self.fail_round = server, fail_round
        self.parked: list[bool] = []

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        self.parked.append(is_spilled(self.server[0].parameters))
        if server_round == self.fail_round:
            return None, {}
        return super().aggregate_fit(server_round, results, failures)


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_the_old_model_waits_on_disk_while_results_are_aggregated(budget: int) -> None:
    """A model over the RAM budget is spilled once every node has its instruction, and
    the rounds train exactly as with it in RAM; a round that aggregates nothing keeps it
    (back in memory). A model within the budget stays where it is."""
    proxies = [LocalProxy(str(k), Shift(float(k), k + 1)) for k in range(4)]
    holder: list[Server] = []
    strategy = SeesTheOldModel(holder, fail_round=2, fraction_evaluate=0.0)
    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    holder.append(server)
    server.spill = SpillStore(budget=budget)
    server.fit(num_rounds=3, timeout=None)
    assert strategy.parked == [budget == 0] * 3
    assert not is_spilled(server.parameters)  # the new model of round 3
    # rounds 1 and 3 add 2 each (see above); round 2 kept its model
    np.testing.assert_allclose(parameters_to_ndarrays(server.parameters)[0], np.full(2, 14.0))


def test_the_old_model_is_let_go_while_results_are_aggregated() -> None:
    """No reference the server keeps (its last round's results, the encoded instruction,
    the round's instructions) holds the old model while a round aggregates: the memory
    of round 1's model (where the aggregation computed it) is free in round 2's."""
    import gc
    import weakref

    from stamen.ndarrays import POOLED_FROM, received_buffer_of

    class Big(Shift):  # a model of POOLED_FROM bytes: in pooled memory
        def get_parameters(self, config: Any) -> list[np.ndarray]:
            return [np.full(POOLED_FROM // 8 + 1, 10.0)]

    proxies = [LocalProxy(str(k), Big(float(k), 1)) for k in range(3)]
    holder: list[Server] = []
    watched: list[weakref.ref[Any]] = []
    alive: list[bool] = []

    class Watches(SeesTheOldModel):
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            buffer = received_buffer_of(np.frombuffer(parameters.tensors[0], np.uint8))
            if server_round == 2:
                assert buffer is not None  # computed in its .npy place
                watched.append(weakref.ref(buffer))
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            if watched:
                gc.collect()
                alive.append(watched[0]() is not None)
            return super().aggregate_fit(server_round, results, failures)

    strategy = Watches(holder, fraction_evaluate=0.0)
    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    holder.append(server)
    server.spill = SpillStore(budget=0)
    server.fit(num_rounds=2, timeout=None)
    assert alive == [False]


def _vm_flags_of(directory: Path) -> list[set[str]]:
    """The ``VmFlags`` of each mapping of a spill file in ``directory`` (Linux smaps)."""
    flags: list[set[str]] = []
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
                inside = str(directory) in line
            elif inside and line.startswith("VmFlags:"):
                flags.append(set(line.split()[1:]))
    return flags


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_results_are_written_without_readahead_and_read_back_with_it(tmp_path: Path) -> None:
    """A spill file is written into its holes without readahead (each write fault would
    zero a readahead window first); a whole result is read back with it."""
    close_segments(str(tmp_path))
    buffer = receive_buffer(1 << 20, str(tmp_path))
    assert _vm_flags_of(tmp_path) and all("rr" in f for f in _vm_flags_of(tmp_path))
    buffer[:] = 7
    tensors = [memoryview(buffer).toreadonly()]
    reply = FitRes(OK, Parameters(tensors=tensors, tensor_type="numpy.ndarray"), 1, {})
    store = SpillStore(str(tmp_path), budget=0)
    store.begin()
    kept = store.take(None, reply)
    flags = _vm_flags_of(tmp_path)
    assert any("rr" not in f for f in flags), flags  # the result's pages: readahead on
    assert bytes(kept.parameters.tensors[0][:3]) == b"\x07\x07\x07"
    del kept, reply, tensors, buffer
    store.end(1)


def _resident_kb_of(directory: Path) -> int:
    """Resident kilobytes of every mapping of a spill file in ``directory`` (smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
                inside = str(directory) in line
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_result_read_in_parts_leaves_none_of_its_pages_behind(tmp_path: Path) -> None:
    """A tensor inside a received message starts at no particular page: reading each of
    its parts maps pages before it, of the part released just before: the kernel's
    fault-around window, or the whole page-cache folio (up to 2 MiB: the file is written
    in 4 MiB frames). Releasing a part lets those go too, so spilled results checked in
    256 KB parts hold none of their pages afterwards (each held ~22 MB of 100 MB)."""
    from stamen.server.strategy.validate import _all_finite
    from stamen.wire import FrameReader, Payload, decode_reply, encode_reply

    close_segments(str(tmp_path))
    values = np.ones(25_000_000, np.float32)
    message = encode_reply(FitRes(OK, ndarrays_to_parameters([values]), 1, {}))
    store = SpillStore(str(tmp_path), budget=0)
    store.begin()
    resident: list[int] = []
    kept: list[FitRes] = []
    for _ in range(3):  # a round's results, one after the other in one spill file
        reader = FrameReader()
        reader.bound(None, 0, lambda size: receive_buffer(size, str(tmp_path)))
        wholes = [reader.feed(frame) for frame in Payload([message]).messages(4 << 20)]
        buffer = wholes[-1]
        assert buffer is not None
        received = decode_reply(buffer)
        assert isinstance(received, FitRes)
        reply = store.take(None, received)  # whole: read back with readahead from here on
        kept.append(reply)
        [view] = parameters_to_views(reply.parameters)
        assert _all_finite(view)
        resident.append(_resident_kb_of(tmp_path))
        del view, received, buffer, wholes
    assert all(kb <= 64 for kb in resident), resident
    kept.clear()
    store.end(1)


def test_parking_the_model_never_changes_an_object_the_strategy_kept() -> None:
    """The server parks its own copy of the aggregated Parameters: a strategy that keeps
    what its ``aggregate_fit`` returned (to save it later, say) finds it as it was."""

    class Keeps(FedAvg):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.kept: list[tuple[Parameters, list[Any]]] = []

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            self.kept.append((parameters, list(parameters.tensors)))
            return parameters, metrics

    proxies = [LocalProxy(str(k), Shift(float(k), k + 1)) for k in range(3)]
    strategy = Keeps(fraction_evaluate=0.0)
    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    server.spill = SpillStore(budget=0)
    server.fit(num_rounds=3, timeout=None)
    assert len(strategy.kept) == 3
    for parameters, tensors in strategy.kept[:2]:  # rounds 2 and 3 parked these models
        assert parameters.tensors == tensors
        assert all(a is b for a, b in zip(parameters.tensors, tensors, strict=True))
        assert not is_spilled(parameters)


def test_the_old_model_is_parked_from_its_own_threshold_not_the_results_budget() -> None:
    """With the default RAM budget (64 MiB of results), a 20 MiB global model is parked:
    its threshold is PARK_FROM (16 MiB), one model's worth, not a round's results. A
    model up to it stays, and so does one up to a smaller budget."""
    assert spill_module.PARK_FROM < spill_module.DEFAULT_BUDGET

    def model(size: int) -> Parameters:
        return ndarrays_to_parameters([np.ones(size // 4, np.float32)])

    store = SpillStore()
    big = model(20 << 20)
    before = parameters_to_ndarrays(big)
    assert store.park(big)
    assert is_spilled(big)
    np.testing.assert_array_equal(parameters_to_ndarrays(big)[0], before[0])
    small = model(spill_module.PARK_FROM - 4096)  # with its .npy header: just under
    assert not store.park(small) and not is_spilled(small)
    tight = SpillStore(budget=1 << 20)  # a smaller budget: parked from there
    assert tight.park(model(2 << 20))
    del big, before
    store.close()
    tight.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_frames_land_in_a_spill_file_without_mapping_its_pages(tmp_path: Path) -> None:
    """A large result received into a spill file is written through the file's
    descriptor: while 16 MB of frames land, none of the file's pages is in this
    process's memory; the message then reads back whole, through the mapping."""
    from stamen.wire import FrameReader, Payload

    close_segments(str(tmp_path))
    message = np.random.default_rng(5).integers(0, 255, 16 << 20, np.uint8).tobytes()
    reader = FrameReader()
    reader.bound(None, 0, lambda size: receive_buffer(size, str(tmp_path)))
    resident: list[int] = []
    whole = None
    for frame in Payload([message]).messages(1 << 20):
        whole = reader.feed(frame)
        resident.append(_resident_kb_of(tmp_path))
    assert whole is not None and max(resident) == 0, resident
    assert bytes(whole) == message
    assert is_spilled(Parameters(tensors=[whole], tensor_type="numpy.ndarray"))
    del whole


def test_a_spill_file_that_fills_up_moves_the_message_to_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame the spill file cannot take (the disk is full) moves the message being
    received to memory, the frames already written read back from the file: the result
    arrives whole, and the server says why it holds it in memory."""
    from stamen.wire import FrameReader, Payload

    close_segments(str(tmp_path))
    spill_module._warned.discard(str(tmp_path))
    message = np.random.default_rng(6).integers(0, 255, 4 << 20, np.uint8).tobytes()
    real, writes = spill_module._write, [0]

    def fills_up(fd: int, data: memoryview, offset: int) -> None:
        writes[0] += 1
        if writes[0] > 2:
            raise OSError(28, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(spill_module, "_write", fills_up)
    reader = FrameReader()
    reader.bound(None, 0, lambda size: receive_buffer(size, str(tmp_path)))
    with caplog.at_level("WARNING", logger="stamen.server"):
        wholes = [reader.feed(frame) for frame in Payload([message]).messages(1 << 20)]
    assert writes[0] == 3 and wholes[-1] is not None and bytes(wholes[-1]) == message
    assert not is_spilled(Parameters(tensors=[wholes[-1]], tensor_type="numpy.ndarray"))
    assert any("No space left" in r.getMessage() for r in caplog.records)


def _pages_of(array: np.ndarray) -> tuple[int, int]:
    """The first page of ``array`` and the page after its last."""
    address = int(array.__array_interface__["data"][0])
    return address // 4096, -(-(address + array.nbytes) // 4096)


def _mapped_pages(array: np.ndarray) -> int:
    """Pages of ``array`` mapped into this process now (the kernel's page map)."""
    first, stop = _pages_of(array)
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        entries = os.pread(pagemap.fileno(), 8 * (stop - first), 8 * first)
    return int(((np.frombuffer(entries, np.uint64) >> np.uint64(63)) & np.uint64(1)).sum())


def test_parameters_to_ndarrays_of_a_spilled_result_are_new_arrays_without_a_copy(
    tmp_path: Path,
) -> None:
    """Large layers of a spilled result decode to writable arrays over the spill file,
    copy on write (no copy made, no page of theirs resident); writing to them changes
    them alone: not the result's tensors, not its file, not another decoding. Small
    layers are copied as before; Fortran order and float16 come through as they were."""
    rng = np.random.default_rng(7)
    big = rng.normal(size=(1000, 600)).astype(np.float32)  # 2.4 MB
    fortran = np.asfortranarray(rng.normal(size=(700, 500)))  # 2.8 MB, F order
    half = rng.normal(size=800_000).astype(np.float16)  # 1.6 MB
    small = np.arange(10, dtype=np.int64)
    model = [big, fortran, half, small]
    spilled = spill_parameters(ndarrays_to_parameters(model), str(tmp_path))
    before = [bytes(t) for t in spilled.tensors]

    arrays = parameters_to_ndarrays(spilled)
    for array, original in zip(arrays, model, strict=True):
        assert array.flags.writeable and array.dtype == original.dtype
        assert array.shape == original.shape
        np.testing.assert_array_equal(array, original)
    assert arrays[1].flags.f_contiguous
    views = parameters_to_views(spilled)
    assert not any(np.shares_memory(a, v) for a, v in zip(arrays, views, strict=True))
    mapped = [spill_module._mapping_at(a.__array_interface__["data"][0]) for a in arrays]
    assert [m is not None and m[0].segment is None for m in mapped] == [True] * 3 + [False]
    del mapped

    for array in arrays:
        array[...] = 0
    assert [bytes(t) for t in spilled.tensors] == before
    again = parameters_to_ndarrays(spilled)
    for array, original in zip(again, model, strict=True):
        np.testing.assert_array_equal(array, original)
    del arrays, again, views, spilled
    SpillStore(str(tmp_path)).close()


def test_releasing_a_copy_on_write_array_keeps_what_was_written_to_it(tmp_path: Path) -> None:
    """The aggregation kernels let a spilled array's pages go once read; a copy-on-write
    array's pages that were written to are its own data and stay: the mean of written
    arrays is the mean of what was written, and their unwritten pages go."""
    size = 1 << 20  # float32: 4 MB, 1,024 pages
    results = [
        spill_parameters(ndarrays_to_parameters([np.full(size, k, np.float32)]), str(tmp_path))
        for k in (1.0, 3.0)
    ]
    first, second = (parameters_to_ndarrays(p)[0] for p in results)
    first[: size // 2] = 10.0  # half the pages written to: its own
    np.testing.assert_array_equal(second, 3.0)  # read: every page mapped
    first_page, stop = _pages_of(second)
    assert _mapped_pages(second) == stop - first_page

    release(second)
    assert _mapped_pages(second) == 0  # all the file's: let go
    release(first)
    assert _mapped_pages(first) >= 512  # the written half stays
    (mean,) = aggregate([([first], 1), ([second], 1)])
    np.testing.assert_array_equal(mean[: size // 2], 6.5)
    np.testing.assert_array_equal(mean[size // 2 :], 2.0)
    np.testing.assert_array_equal(first[: size // 2], 10.0)
    np.testing.assert_array_equal(first[size // 2 :], 1.0)
    del first, second, results
    SpillStore(str(tmp_path)).close()


def test_a_copy_on_write_array_keeps_its_spill_file_from_the_next_round(
    tmp_path: Path,
) -> None:
    """A spill file whose results are let go takes the next round's results over the same
    bytes, which a copy-on-write array's unwritten pages would show: an array decoded
    from a result keeps that file out of reuse while it lives."""
    directory = str(tmp_path)
    size = 1 << 19
    spilled = spill_parameters(ndarrays_to_parameters([np.full(size, 1.0, np.float32)]), directory)
    (kept,) = parameters_to_ndarrays(spilled)
    start = _file_of(spilled)
    del spilled
    close_segments(directory)  # the round ends: its file may be reused once let go
    later = spill_parameters(ndarrays_to_parameters([np.full(size, 2.0, np.float32)]), directory)
    assert _file_of(later) != start
    np.testing.assert_array_equal(kept, 1.0)
    del kept, later
    close_segments(directory)
    reused = spill_parameters(ndarrays_to_parameters([np.full(size, 3.0, np.float32)]), directory)
    assert _file_of(reused) == start  # once the array is gone, the file is reused
    del reused
    SpillStore(directory).close()


def test_copy_on_write_views_stop_at_their_limit_and_arrays_are_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each view is a mapping, and a process has a limit of those that its allocator and
    threads draw on too: past ``PRIVATE_VIEWS_LIMIT`` views, arrays are copies (and
    the count goes down as views are let go)."""
    model = [np.full(1 << 19, k, np.float32) for k in range(3)]  # 2 MB layers
    spilled = spill_parameters(ndarrays_to_parameters(model), str(tmp_path))
    monkeypatch.setattr(spill_module, "PRIVATE_VIEWS_LIMIT", spill_module._private_views + 2)
    arrays = parameters_to_ndarrays(spilled)
    assert [a.flags.owndata for a in arrays] == [False, False, True]
    for array, original in zip(arrays, model, strict=True):
        np.testing.assert_array_equal(array, original)
    del arrays
    again = parameters_to_ndarrays(spilled)
    assert [a.flags.owndata for a in again] == [False, False, True]
    del again, spilled
    SpillStore(str(tmp_path)).close()


class Wide(NumPyClient):
    """Trains by adding ``delta`` to a model of one 1.2 MB float32 layer (copied on write
    when spilled) and one small layer (copied); holds ``n`` examples."""

    def __init__(self, delta: float, n: int) -> None:
        self.delta, self.n = np.float32(delta), n

    def get_parameters(self, config: Any) -> list[np.ndarray]:
        return [np.full(300_000, 10.0, np.float32), np.full(3, 10.0, np.float32)]

    def fit(self, parameters: Any, config: Any) -> Any:
        return [p + self.delta for p in parameters], self.n, {}

    def evaluate(self, parameters: Any, config: Any) -> Any:
        return 0.0, self.n, {}


class HalvesEachResult(fl.server.strategy.Strategy):
    """A strategy of one's own, written as Flower's FedAvg is, that works on the decoded
    results in place (halves them) before averaging them with ``aggregate``."""

    def __init__(self) -> None:
        self.owned: list[list[bool]] = []

    def initialize_parameters(self, client_manager: Any) -> Any:
        return None

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        clients = client_manager.sample(num_clients=4, min_num_clients=4)
        return [(client, fl.common.FitIns(parameters, {})) for client in clients]

    def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
        weights = [(parameters_to_ndarrays(r.parameters), r.num_examples) for _, r in results]
        self.owned.append([a.flags.owndata for arrays, _ in weights for a in arrays])
        for arrays, _ in weights:
            for array in arrays:
                array *= np.float32(0.5)
        return ndarrays_to_parameters(aggregate(weights)), {}

    def configure_evaluate(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
        return []

    def aggregate_evaluate(self, server_round: int, results: Any, failures: Any) -> Any:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> Any:
        return None


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_a_strategy_of_ones_own_writes_to_results_on_disk_as_to_results_in_memory(
    budget: int,
) -> None:
    """Results on disk decode to copy-on-write arrays (large layers) that a strategy of
    one's own can work on in place; what it wrote is what ``aggregate`` averages (its
    release of the pages read keeps them), as with results in memory."""
    proxies = [LocalProxy(str(k), Wide(float(k), k + 1)) for k in range(4)]
    strategy = HalvesEachResult()
    server = Server(client_manager=_manager(*proxies), strategy=strategy)
    server.spill = SpillStore(budget=budget)
    server.fit(num_rounds=2, timeout=None)
    # a round: g -> sum_k (k+1) (g + k) / 2 / 10 = g / 2 + 1 (from 10: 6, then 4)
    final = parameters_to_views(server.parameters)
    np.testing.assert_array_equal(final[0], np.full(300_000, 4.0, np.float32))
    np.testing.assert_array_equal(final[1], np.full(3, 4.0, np.float32))
    large_mapped = budget == 0
    assert strategy.owned == [[not large_mapped, True] * 4] * 2
