"""run_simulation with Flower's default backend_name="ray" runs on Stamen's Ray backend
when Ray is installed: same History as the in-process backend, mods and state included."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import sim_digits

import stamen as fl

# Ray starts a local cluster (about 15 s on a new 2-core machine) before any work.
pytestmark = pytest.mark.timeout(400)

APPS = Path(__file__).resolve().parents[1] / "apps"


def test_default_backend_name_ray_runs_the_apps_on_ray(caplog: pytest.LogCaptureFixture) -> None:
    """backend_name defaults to "ray": the Ray backend runs the calls (mods, per-node
    state across Ray workers) and the History equals the sequential backend's."""
    pytest.importorskip("ray")
    init_args = sim_digits.ray_init_args()
    env = init_args["runtime_env"]["env_vars"]
    env["PYTHONPATH"] = f"{APPS}:{env['PYTHONPATH']}"  # workers import the app module
    sys.path.insert(0, str(APPS))
    try:
        import flower_app_api  # type: ignore[import-not-found]

        with caplog.at_level("INFO", logger="stamen"):
            on_ray = fl.simulation.run_simulation(
                server_app=flower_app_api.server_app,
                client_app=flower_app_api.app,
                num_supernodes=2,
                backend_config={
                    "client_resources": {"num_cpus": 1},
                    "init_args": init_args,
                },
            )
        sequential = fl.simulation.run_simulation(
            server_app=flower_app_api.server_app,
            client_app=flower_app_api.app,
            num_supernodes=2,
            backend_name="sequential",
        )
    finally:
        sys.path.remove(str(APPS))
        sys.modules.pop("flower_app_api", None)
    assert any("on the ray backend" in r.getMessage() for r in caplog.records)
    assert on_ray == sequential
    assert on_ray.metrics_distributed_fit["fits"][-1] == (4, 4)
