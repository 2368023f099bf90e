"""Medians, Stamen/Flower ratios, the issue's targets and the markdown tables of a bench run."""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import Any

from floors import round_floor
from workload import Workload, human_bytes

BEGIN = "<!-- BEGIN flower_vs_stamen (written by bench/flower_vs_stamen/run.py --readme) -->"
END = "<!-- END flower_vs_stamen -->"
METRICS = ("round_seconds", "server_peak_rss_bytes", "client_peak_rss_bytes", "wire_bytes")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the successful runs of one framework on one workload.

    Round time and wire bytes: the median over every round of every run. Server peak RSS:
    the median over runs. Client peak RSS: the median over runs of the largest client
    process.
    """
    good = [r for r in runs if r["ok"]]
    errors = [r.get("error") or "failed" for r in runs if not r["ok"]]
    return {
        "runs": len(runs),
        "runs_ok": len(good),
        "errors": errors,
        "round_seconds": _median([t for r in good for t in r["round_seconds"]]),
        "server_peak_rss_bytes": _median([r["server_peak_rss_bytes"] for r in good]),
        "client_peak_rss_bytes": _median([max(r["client_peak_rss_bytes"]) for r in good]),
        "wire_bytes": _median([b for r in good if r["wire_bytes"] for b in r["wire_bytes"]]),
    }


def summarize(results: dict[str, Any]) -> None:
    """Add ``summary`` (per framework, and Stamen/Flower ratios) and ``targets``."""
    for entry in results["workloads"].values():
        summary = {f: summarize_runs(runs) for f, runs in entry["runs"].items()}
        stamen, flower = summary.get("stamen"), summary.get("flower")
        if stamen and flower:
            summary["ratio"] = {
                m: stamen[m] / flower[m] if stamen[m] and flower[m] else None for m in METRICS
            }
        entry["summary"] = summary
        entry["floor"] = floor_of(entry, results.get("floors"))
    results["targets"] = targets(results)


def floor_of(entry: dict[str, Any], floors: dict[str, Any] | None) -> dict[str, Any] | None:
    """A workload's floor (``floors.round_floor``), each framework's median round time as a
    multiple of it and its server's median peak RSS as a multiple of the model size.
    None without measured floors (a JSON written before they were)."""
    if floors is None:
        return None
    spec = entry["spec"]
    floor: dict[str, Any] = round_floor(spec["clients"], spec["model_bytes"], floors)
    for framework in ("stamen", "flower"):
        s = entry["summary"].get(framework)
        ok = s is not None and s["runs_ok"]
        floor[framework] = {
            "round_x_floor": s["round_seconds"] / floor["seconds"] if ok else None,
            "server_peak_rss_x_model": s["server_peak_rss_bytes"] / spec["model_bytes"]
            if ok
            else None,
        }
    return floor


def _stamen(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    entry = results["workloads"].get(name)
    return None if entry is None else entry["summary"].get("stamen")


def _ratio_target(
    results: dict[str, Any], name: str, bound: float | None, text: str | None = None
) -> dict[str, Any]:
    """The Stamen/Flower round-time ratio of workload ``name`` against ``bound`` (None: a
    figure shown beside a target, not a target)."""
    if text is None:
        text = f"{name} round time <= {bound:g} x Flower"
    entry = results["workloads"].get(name)
    if entry is None:
        return {"target": text, "measured": "not run", "met": None}
    ratio = entry["summary"].get("ratio", {}).get("round_seconds")
    if ratio is None:
        why = "; ".join(
            f"{f}: {reason(s['errors'][0]) if s['errors'] else 'no result'}"
            for f, s in entry["summary"].items()
            if f != "ratio" and not s["runs_ok"]
        )
        return {"target": text, "measured": f"no ratio ({why or 'not run'})", "met": None}
    met = None if bound is None else ratio <= bound
    return {"target": text, "measured": f"{ratio:.3f} x", "met": met}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue #7, each with what was measured and whether it is met."""
    found = [_ratio_target(results, "B", 0.15)]
    b = _stamen(results, "B")
    entry = results["workloads"].get("B")
    text = "B server peak RSS <= 5 x model size"
    if b and b["server_peak_rss_bytes"] and entry:
        times = b["server_peak_rss_bytes"] / entry["spec"]["model_bytes"]
        found.append({"target": text, "measured": f"{times:.2f} x", "met": times <= 5})
    else:
        found.append({"target": text, "measured": "not measured", "met": None})
    found.append(
        _ratio_target(
            results,
            "Ethreads",
            0.05,
            "E round time <= 0.05 x Flower (1,000 nodes: each framework's own start_client, "
            "as threads of 4 processes)",
        )
    )
    found.append(
        _ratio_target(
            results,
            "E",
            None,
            "E with the same asyncio nodes (swarm.py) driving either server: the servers alone",
        )
    )
    scale = _stamen(results, "E10k")
    spec = results["workloads"].get("E10k", {}).get("spec", {})
    text = "a round with 10,000 grpc-bidi clients completes"
    if scale is None:
        found.append({"target": text, "measured": "not run", "met": None})
    elif scale["runs_ok"]:
        runs = results["workloads"]["E10k"]["runs"]["stamen"]
        retries = sum(r.get("client_retries") or 0 for r in runs if r["ok"])
        measured = (
            f"{spec.get('clients', 0):,} clients: {scale['round_seconds']:.2f} s, server "
            f"{scale['server_peak_rss_bytes'] / 1e6:.0f} MB peak RSS; {retries:,} streams "
            "reopened by their nodes"
        )
        found.append({"target": text, "measured": measured, "met": spec.get("clients") == 10_000})
    else:
        found.append({"target": text, "measured": reason(scale["errors"][0]), "met": False})
    micro = results.get("micro", {}).get("stamen")
    for key, bound, text in (
        (
            "message_codec_fraction_of_memcpy",
            1 / 3,
            "encode + decode 100 MB FitIns (message <-> wire bytes) >= 1/3 memcpy speed",
        ),
        (
            "codec_fraction_of_memcpy",
            None,
            "arrays -> FitIns -> wire bytes -> arrays, 100 MB, vs memcpy (not a target: "
            "Flower's API copies the arrays into bytes and back into writable arrays, and the "
            "wire bytes are a third copy, so 1/3 is this path's ceiling)",
        ),
        ("fedavg_fraction_of_memcpy_bound", 1 / 2, "FedAvg 10 x 100 MB >= 1/2 memcpy bound"),
    ):
        if micro and micro["ok"]:
            met = None if bound is None else micro[key] >= bound
            found.append({"target": text, "measured": f"{micro[key]:.3f}", "met": met})
        else:
            found.append({"target": text, "measured": "not measured", "met": None})
    found.append(_ratio_target(results, "A", 0.5))
    found.append(_ratio_target(results, "C", 0.5))
    for item in found:
        item["issue"] = 7
    return found + targets_19(results) + auth_targets(results)


MEMORY_POINTS = ("B", "Bsub", "Bmed", "Bown", "B50", "B50sub", "B50med", "B50own")
"""The points whose server peak RSS issue #19 bounds: 3 x the model plus a fixed overhead."""
AUTH_POINTS = ("A", "B", "C")
"""The points run by authenticated nodes too (``run.py``'s ``A-auth``...)."""


def _memory_target(results: dict[str, Any], name: str) -> dict[str, Any]:
    """Server peak RSS of ``name`` minus the fixed overhead (the server's RSS once set up,
    less the initial model it holds then), in models: <= 3."""
    text = f"{name} server peak RSS <= 3 x model + fixed overhead"
    entry = results["workloads"].get(name)
    s = _stamen(results, name)
    if entry is None or s is None or not s["runs_ok"]:
        return {"target": text, "measured": "not run", "met": None, "issue": 19}
    model = entry["spec"]["model_bytes"]
    runs = [r for r in entry["runs"]["stamen"] if r["ok"]]
    setups = [r.get("server_rss_after_setup_bytes") or 0 for r in runs]
    overhead = max(0, min(setups) - model) if setups else 0
    times = (s["server_peak_rss_bytes"] - overhead) / model
    peak = s["server_peak_rss_bytes"] / 1e6
    measured = f"{times:.2f} x (peak {peak:,.0f} MB, fixed {overhead / 1e6:,.0f} MB)"
    return {"target": text, "measured": measured, "met": times <= 3, "issue": 19}


TRANSPORT_BOUND = 1.3
"""grpc-rere's and rest's round time, at most this many times grpc-bidi's (issue #19)."""


def _round_ratio(results: dict[str, Any], name: str, point: str) -> tuple[float, str] | None:
    """Stamen's median round of ``name`` over that of ``point`` in the same invocation,
    and how the table shows it; None if either did not run."""
    other, base = _stamen(results, name), _stamen(results, point)
    if not other or not base or not other["round_seconds"] or not base["round_seconds"]:
        return None
    ratio = other["round_seconds"] / base["round_seconds"]
    seconds = f"{_seconds(other['round_seconds'])} / {_seconds(base['round_seconds'])}"
    return ratio, f"{ratio:.2f} x ({seconds})"


def _transport_target(results: dict[str, Any], point: str, suffix: str) -> dict[str, Any]:
    """Stamen's median round of ``point`` on another transport (``A-rere``) against its
    grpc-bidi one (``A``), in the same invocation."""
    name = f"{point}-{suffix}"
    text = f"{name} round time <= {TRANSPORT_BOUND:g} x {point} (grpc-bidi)"
    found = _round_ratio(results, name, point)
    if found is None:
        return {"target": text, "measured": "not run", "met": None, "issue": 19}
    ratio, measured = found
    if suffix == "rere":
        measured += _grpc_alone_rere(results, point, TRANSPORT_BOUND)
    return {"target": text, "measured": measured, "met": ratio <= TRANSPORT_BOUND, "issue": 19}


def _auth_target(results: dict[str, Any], point: str) -> dict[str, Any]:
    """Stamen's median round of ``point`` with authenticated nodes (``A-auth``) against
    ``point`` without, in the same invocation: what node authentication costs (every
    grpc-bidi message MACed both ways). Reported, not bounded."""
    name = f"{point}-auth"
    text = f"{name} round time / {point} (what node authentication costs)"
    found = _round_ratio(results, name, point)
    measured = "not run" if found is None else found[1]
    return {"target": text, "measured": measured, "met": None, "issue": None}


def auth_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The cost of node authentication on each point that measures it."""
    return [_auth_target(results, point) for point in AUTH_POINTS]


def targets_19(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets of issue #19: round-time ratios, grpc-rere and rest against grpc-bidi,
    and server memory per strategy form."""
    bounds = {"B": 0.10, "Bsub": 0.10, "D": 0.10, "A": 0.25, "C": 0.25, "E500": 0.25}
    found = [_ratio_target(results, name, bound) for name, bound in bounds.items()]
    for item, (name, bound) in zip(found, bounds.items(), strict=True):
        item["issue"] = 19
        if item["met"] is not None:
            item["measured"] += _grpc_alone(results, name, bound)
    transports = [
        _transport_target(results, point, suffix)
        for point in ("A", "B", "C", "D")
        for suffix in ("rere", "rest")
    ]
    return found + transports + [_memory_target(results, name) for name in MEMORY_POINTS]


# --- text ---------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e6:,.0f} MB"


def _wire(value: float | None) -> str:
    return "—" if value is None else f"{value / 1e6:,.1f} MB"


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"**{value:.2f}**" if value < 0.995 else f"{value:.2f}"


def run_line(load: Workload, run: dict[str, Any]) -> str:
    """One line of progress for one run."""
    head = f"{load.title:22} {run['framework']:6} run {run.get('run', 0)}:"
    if not run["ok"]:
        return f"{head} FAILED ({run['wall_seconds']:.0f} s): {run.get('error')}"
    wire = run["wire_bytes"] and statistics.median(run["wire_bytes"])
    return (
        f"{head} round {_seconds(statistics.median(run['round_seconds']))} "
        f"(aggregate_fit {_seconds(statistics.median(run['aggregate_seconds']))})  "
        f"server {_mb(run['server_peak_rss_bytes'])}  "
        f"clients {_mb(max(run['client_peak_rss_bytes']))}/process  "
        f"wire {_wire(wire or None)}/round  ({run['wall_seconds']:.0f} s)"
    )


def floors_line(floors: dict[str, Any]) -> str:
    """One line of progress for the floors."""
    return (
        f"floors: loopback {floors['loopback_bytes_per_s'] / 1e9:.2f} GB/s, memcpy "
        f"{floors['memcpy_bytes_per_s'] / 1e9:.2f} GB/s (best of {len(floors['loopback_seconds'])})"
    )


def grpc_floor_line(name: str, floor: dict[str, Any]) -> str:
    """One line of progress for grpcio alone on ``name``'s exchange."""
    bidi, rere = floor["bidi"]["median_round_seconds"], floor["rere"]["median_round_seconds"]
    return (
        f"grpcio alone, {name}'s exchange: a stream message each way {_short(bidi)}, "
        f"pull + push calls {_short(rere)} ({rere / bidi:.2f} x)"
    )


def micro_line(micro: dict[str, Any]) -> str:
    """One line of progress for the micro-benchmarks."""
    parts = []
    for framework, m in micro.items():
        if not m["ok"]:
            parts.append(f"{framework} FAILED: {m['error']}")
            continue
        parts.append(
            f"{framework}: codec {_seconds(m['codec_seconds'])}, fedavg "
            f"{_seconds(m['fedavg_seconds'])}, memcpy {m['memcpy_gb_per_s']:.1f} GB/s"
        )
    return "; ".join(parts)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXIT = re.compile(r"^(.*?\(?exit(?:ed)? \(?(-?\d+)\)?)")


def reason(error: str) -> str:
    """The gist of an error text: the process that a signal killed, if one did (its log
    says nothing of it), else the last non-empty line (a traceback's exception)."""
    text = _ANSI.sub("", error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    exited = _EXIT.match(lines[0]) if lines else None
    if exited is not None and int(exited.group(2)) < 0:
        gist = f"{exited.group(1)}, killed by signal {-int(exited.group(2))}"
    else:
        gist = lines[-1] if lines else "failed"
    return gist[:100].replace("|", "/")


def _cells(summary: dict[str, Any], metric: str, fmt: Any) -> list[str]:
    cells = []
    for framework in ("stamen", "flower"):
        s = summary.get(framework)
        if s is None:
            cells.append("not run")
        elif not s["runs_ok"]:
            why = reason(s["errors"][0]) if s["errors"] else "?"
            cells.append(f"failed: {why}" if metric == "round_seconds" else "failed")
        else:
            cells.append(fmt(s[metric]))
    cells.append(_ratio(summary.get("ratio", {}).get(metric)))
    return cells


def workload_table(results: dict[str, Any]) -> list[str]:
    """One row per workload: Stamen, Flower and the ratio for each metric."""
    head = ["workload (client processes)"]
    for metric in ("round time", "server peak RSS", "client process peak RSS", "wire / round"):
        head += [f"{metric}: Stamen", "Flower", "S/F"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in results["workloads"].values():
        spec, summary = entry["spec"], entry["summary"]
        cells = [f"{entry['title']} ({spec['processes']} procs)"]
        cells += _cells(summary, "round_seconds", _seconds)
        cells += _cells(summary, "server_peak_rss_bytes", _mb)
        cells += _cells(summary, "client_peak_rss_bytes", _mb)
        cells += _cells(summary, "wire_bytes", _wire)
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def _short(value: float) -> str:
    return f"{value * 1e3:.2f} ms" if value < 0.01 else _seconds(value)


def _x(value: float) -> str:
    return f"{value:.2f} x"


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} x"


def floor_table(results: dict[str, Any]) -> list[str]:
    """One row per workload: its floor, both round times as multiples of it, and both
    servers' peak RSS as multiples of the model."""
    floors = results["floors"]
    rows = [
        f"Floors (`floors.py`, best of {len(floors['loopback_seconds'])} before the runs): "
        f"loopback TCP {floors['loopback_bytes_per_s'] / 1e9:.2f} GB/s, memcpy "
        f"{floors['memcpy_bytes_per_s'] / 1e9:.2f} GB/s. A round's floor is "
        "2 N M / loopback + N M / memcpy (N clients of M bytes: each model down and up the "
        "loopback, each result read once into the aggregate); docs/performance.md says what "
        "it leaves out.",
        "",
        "| workload | loopback + aggregation bytes / round | floor | Stamen round | Stamen x floor "
        "| Flower round | Flower x floor | server peak RSS / model: Stamen | Flower |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in results["workloads"].values():
        floor, summary = entry["floor"], entry["summary"]
        cells = [entry["title"]]
        cells.append(f"{_wire(floor['loopback_bytes'])} + {_wire(floor['memcpy_bytes'])}")
        cells.append(_short(floor["seconds"]))
        for framework in ("stamen", "flower"):
            s = summary.get(framework)
            ok = s is not None and s["runs_ok"]
            cells.append(_seconds(s["round_seconds"]) if ok else "—")
            cells.append(_times(floor[framework]["round_x_floor"]))
        cells += [_times(floor[f]["server_peak_rss_x_model"]) for f in ("stamen", "flower")]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


GRPC_FLOOR_OF = {"A": "A", "B": "B", "Bsub": "B", "C": "C", "E500": "E500"}
"""The point whose grpcio-alone exchange (``grpc_floor.py``) each workload's is."""


def grpc_floor_of(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    """What grpcio alone took for workload ``name``'s exchange, if it was measured."""
    floor = results.get("grpc_floors", {}).get(GRPC_FLOOR_OF.get(name, ""))
    return floor if floor and floor["ok"] else None


def _grpc_alone(results: dict[str, Any], name: str, bound: float) -> str:
    """Beside a round-time target of ``name`` (Stamen / Flower <= ``bound``): grpcio alone's
    round as a multiple of Flower's, and whether the bound lies below it."""
    floor = grpc_floor_of(results, name)
    flower = results["workloads"].get(name, {}).get("summary", {}).get("flower")
    if floor is None or not flower or not flower["round_seconds"]:
        return ""
    alone = floor["bidi"]["median_round_seconds"] / flower["round_seconds"]
    below = ": the bound is below grpcio's own round" if alone > bound else ""
    return f"; grpcio alone {alone:.3f} x{below}"


def _grpc_alone_rere(results: dict[str, Any], point: str, bound: float) -> str:
    """Beside a grpc-rere target of ``point``: grpcio alone's rere / bidi round ratio."""
    floor = grpc_floor_of(results, point)
    if floor is None:
        return ""
    ratio = floor["rere"]["median_round_seconds"] / floor["bidi"]["median_round_seconds"]
    below = ": the bound is below grpcio's own ratio" if ratio > bound else ""
    return f"; grpcio alone {ratio:.2f} x{below}"


def grpc_floor_table(results: dict[str, Any]) -> list[str]:
    """One row per workload whose exchange grpcio alone ran: its round both ways, and both
    frameworks' rounds against it."""
    rows = [
        "grpcio alone (`bench/transports/grpc_floor.py`, before the runs): each point's "
        "nodes, bytes and client processes, handlers that do nothing else; grpc-bidi's "
        "exchange is a stream message each way per node and round (models over 4 MiB in "
        "4 MiB messages), grpc-rere's a pull call answered with the instruction and a push "
        "call with the reply: a lower bound here for a framework that moves the same messages "
        "with grpcio.",
        "",
        "| workload | grpcio alone: stream | Stamen round | Stamen x grpcio | Flower round "
        "| Flower x grpcio | grpcio alone: pull + push | x stream | Stamen grpc-rere x grpcio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    floors = results.get("grpc_floors", {})
    for name in (n for n in results["workloads"] if GRPC_FLOOR_OF.get(n) in floors):
        floor = floors[GRPC_FLOOR_OF[name]]
        if not floor["ok"]:
            rows.append(f"| {name} | failed: {reason(floor['error'])} | | | | | | | |")
            continue
        bidi, rere = floor["bidi"]["median_round_seconds"], floor["rere"]["median_round_seconds"]
        cells = [name, _short(bidi)]
        summary = results["workloads"].get(name, {}).get("summary", {})
        for framework in ("stamen", "flower"):
            s = summary.get(framework)
            ok = s is not None and s["runs_ok"]
            cells += (
                [_short(s["round_seconds"]), _x(s["round_seconds"] / bidi)] if ok else ["—"] * 2
            )
        cells += [_short(rere), _x(rere / bidi)]
        stamen_rere = _stamen(results, f"{name}-rere")
        if stamen_rere and stamen_rere["round_seconds"]:
            cells.append(_x(stamen_rere["round_seconds"] / rere))
        else:
            cells.append("—")
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def micro_table(micro: dict[str, Any]) -> list[str]:
    """The micro-benchmarks, with Stamen's speed as a fraction of memcpy."""
    s, f = micro.get("stamen", {}), micro.get("flower", {})
    size = s.get("model_bytes") or f.get("model_bytes") or 0
    models = s.get("models") or f.get("models") or 0
    rows = [
        f"| micro-benchmark ({human_bytes(size)} float32 model) | Stamen | Flower 1.12 | S/F "
        "| Stamen vs memcpy | target |",
        "|---|---|---|---|---|---|",
    ]
    specs = (
        ("encode + decode FitIns (message <-> wire bytes)", "message_codec_seconds",
         "message_codec_fraction_of_memcpy", ">= 0.33"),
        ("arrays -> FitIns -> wire bytes -> arrays", "codec_seconds",
         "codec_fraction_of_memcpy", "—"),
        (f"FedAvg `aggregate`, {models} models", "fedavg_seconds",
         "fedavg_fraction_of_memcpy_bound", ">= 0.5"),
        (f"`FedAvg.aggregate_fit`, {models} FitRes (decode + mean + encode)",
         "aggregate_fit_seconds", "aggregate_fit_fraction_of_memcpy_bound", "—"),
    )  # fmt: skip
    for label, key, fraction, target in specs:
        cells = [label]
        for m in (s, f):
            cells.append(_seconds(m[key]) if m.get("ok") else "failed" if m else "not run")
        ratio = s[key] / f[key] if s.get("ok") and f.get("ok") else None
        cells.append(_ratio(ratio))
        cells.append(f"{s[fraction]:.3f}" if s.get("ok") else "—")
        cells.append(target)
        rows.append("| " + " | ".join(cells) + " |")
    copy = [
        f"{_seconds(m['memcpy_seconds'])} ({m['memcpy_gb_per_s']:.1f} GB/s)" if m.get("ok") else "—"
        for m in (s, f)
    ]
    rows.append(f"| `np.copyto` of the model (reference) | {copy[0]} | {copy[1]} | | 1 | |")
    return rows


def markdown(results: dict[str, Any]) -> str:
    """All tables of a run."""
    machine = results["machine"]
    lines = [
        f"Measured on {machine['cpus']} cores, Python {machine['python']}, "
        f"{machine['platform']}; Stamen transport {results['transport']}"
        + (" (quick sizes: not a measurement)" if results["quick"] else "")
        + ". Medians; S/F = Stamen / Flower, bold when Stamen is lower. 1-minute load "
        f"average when the runs began: {machine.get('load_average_at_start', float('nan')):.1f}"
        " (anything else running on the machine shows up in these numbers).",
        "",
    ]
    if results["workloads"]:
        lines += [*workload_table(results), ""]
        if results.get("floors"):
            lines += [*floor_table(results), ""]
        if results.get("grpc_floors"):
            lines += [*grpc_floor_table(results), ""]
    if "micro" in results:
        lines += [*micro_table(results["micro"]), ""]
    lines += ["| target (issue) | measured | met |", "|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "—"}[t["met"]]
        issue = t.get("issue", 7)
        owner = "" if issue is None else f" (#{issue})"
        lines.append(f"| {t['target']}{owner} | {t['measured']} | {met} |")
    return "\n".join(lines)


def write_readme(path: Path, text: str) -> None:
    """Replace the text between the markers in ``path`` (append the markers if absent)."""
    readme = path.read_text(encoding="utf-8")
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in readme and END in readme:
        before = readme.split(BEGIN)[0]
        after = readme.split(END, 1)[1]
        readme = before + block + after
    else:
        readme = readme.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(readme, encoding="utf-8")
