"""stamen.memory: large buffers freed by node threads are reused, not mapped afresh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# In a fresh interpreter: import Stamen's client package, then run 3 node-like threads
# that each allocate a little, apply the settings (as start_client in a thread does), and
# allocate, fill and free 80 MB buffers (over glibc's 64 MiB per-thread heap) four times;
# report the page faults of the rounds after the first.
_PROBE = textwrap.dedent(
    """
    import json, resource, threading
    import numpy as np
    import stamen.client  # limits malloc to one arena at import
    from stamen.memory import tune_allocator

    SIZE = 80 * 2**20
    marks = []  # page faults so far, each time every thread has finished a round
    barrier = threading.Barrier(
        3, action=lambda: marks.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    )

    def node():
        scratch = [bytearray(1000) for _ in range(100)]  # the thread's own first allocations
        tune_allocator()  # as start_client does, in the node's thread
        barrier.wait()
        for _ in range(4):
            buffer = np.empty(SIZE, dtype=np.uint8)
            buffer[:] = 1
            reply = b"".join([b"x", buffer.data])
            del buffer, reply
            barrier.wait()

    threads = [threading.Thread(target=node) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    # Rounds 2 to 4, all threads: what a warm process pays.
    print(json.dumps({"faults": marks[-1] - marks[1], "pages": 3 * 3 * 2 * SIZE // 4096}))
    """
)


def _later_round_faults(tuning: str) -> tuple[int, int]:
    env = {**os.environ, "STAMEN_MALLOC_TUNING": tuning}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    return report["faults"], report["pages"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_node_threads_reuse_freed_buffers() -> None:
    """The 160 MB a thread touches per round (a NumPy buffer and a bytes) are faulted in
    mostly once, in the first round; without the settings every round maps and zeroes them
    afresh (``pages``: the 4 KiB pages of rounds 2-4; NumPy's buffers fault in 2 MiB
    huge pages where the kernel has them, so the bytes alone are half of ``pages``)."""
    tuned, pages = _later_round_faults("1")
    untuned, _ = _later_round_faults("0")
    assert untuned > pages // 3, (untuned, pages)  # the probe shows the problem at all
    # Measured here: 187,764 untuned, 20,480-40,960 tuned (one bytes buffer re-faulted
    # where the three threads' buffers interleave differently from round to round).
    assert tuned * 3 < untuned, (tuned, untuned)
