"""The glibc allocator setting is opt-in: the models leave it alone; asked for, it keeps freed memory.

Each check runs in a fresh interpreter: the setting is process-wide, so applying it inside the test
session would change every later test (and would hide a model that applies it by itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

POOL_MB = 512

_MEASURE = """
import json, multiprocessing, torch

POOL_MB = {pool_mb}

def resident_mb():
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20

def report(pipe):
    pipe.send(resident_mb())
    pipe.close()

def forked_worker_mb():
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=report, args=(sender,))
    worker.start()
    resident = receiver.recv()
    worker.join()
    return resident

{prepare}
worker_before = forked_worker_mb()
base = resident_mb()
block = torch.ones(POOL_MB * 2**20 // 4)  # one large map, as a FOD step makes
del block
kept = resident_mb()
print(json.dumps({{"base": base, "kept": kept, "worker_before": worker_before, "worker_after": forked_worker_mb()}}))
"""


def _measure(prepare: str) -> dict[str, float]:
    script = _MEASURE.format(pool_mb=POOL_MB, prepare=textwrap.dedent(prepare))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD"):
        env.pop(name, None)
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")


def test_models_leave_the_process_allocator_alone() -> None:
    """Building and setting up FOD and CDO for every stage on a CPU must not keep freed memory."""
    memory = _measure(
        """
        from anomalib_fod import Cdo, Fod
        for model in (Fod(pre_trained=False, d_models=(32, 64), num_heads=2, num_layers=1), Cdo(pre_trained=False)):
            for stage in ("fit", "validate", "test", "predict"):
                model.setup(stage)
        """
    )
    assert memory["kept"] < memory["base"] + POOL_MB / 4, memory  # glibc handed the freed block back


def test_opt_in_keeps_freed_memory_but_not_for_forked_workers() -> None:
    memory = _measure(
        """
        from anomalib_fod.allocator import keep_freed_memory_on_cpu
        assert keep_freed_memory_on_cpu(), "glibc's mallopt refused the thresholds"
        """
    )
    assert memory["kept"] > memory["base"] + POOL_MB * 3 / 4, memory  # freed, but kept for the next step
    # A worker forked now must not map the parent's freed pool (it would pin it copy-on-write).
    assert memory["worker_after"] < memory["worker_before"] + POOL_MB / 4, memory
