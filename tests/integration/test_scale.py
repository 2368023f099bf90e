"""The grpc-bidi server holds more streams than Flower's ~1000 ceiling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from stamen.messages import GetPropertiesIns, GetPropertiesRes
from stamen.server.client_manager import SimpleClientManager
from stamen.server.server import run_instructions
from stamen.testing import running_server

NODES = 1200
CHANNELS = 12
SCRIPT = Path(__file__).with_name("scale_nodes.py")


def test_server_serves_more_than_a_thousand_bidi_streams() -> None:
    """1,200 grpc-bidi nodes connect at once, all answer one instruction in one round, and
    all are ended cleanly (Flower's thread-per-stream server caps out near 1,000)."""
    manager = SimpleClientManager(wait_timeout=60)
    with running_server(client_manager=manager, run=False) as srv:
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), srv.address, str(NODES), str(CHANNELS)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert manager.wait_for(NODES, timeout=60), manager.num_available()
            proxies = list(manager.all().values())
            results, failures = run_instructions(
                [(p, GetPropertiesIns(config={})) for p in proxies],
                timeout=60,
                expect=GetPropertiesRes,
            )
            assert not failures
            indexes = sorted(r.properties["index"] for _, r in results)
            assert indexes == list(range(NODES))
            srv.server.disconnect_all_clients(timeout=60)
            out, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait(10)
        assert proc.returncode == 0
        assert f"ANSWERED {NODES}" in out
        assert manager.num_available() == 0
