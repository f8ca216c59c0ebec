"""The CPU allocator setting keeps freed maps for reuse, but never lends them to forked workers."""

from __future__ import annotations

import multiprocessing
import sys
from multiprocessing.connection import Connection

import pytest
import torch

from anomalib_fod.utils import keep_freed_memory_on_cpu

POOL_MB = 512
PAGE = 4096


def _resident_mb() -> float:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * PAGE / 2**20


def _report_rss(pipe: Connection) -> None:
    pipe.send(_resident_mb())
    pipe.close()


def _forked_worker_mb() -> float:
    """Resident memory of a freshly forked process (as a data-loader worker starts)."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    worker = context.Process(target=_report_rss, args=(sender,))
    worker.start()
    resident = receiver.recv()
    worker.join()
    return resident


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_memory_is_kept_but_not_shared_with_forked_workers() -> None:
    if not keep_freed_memory_on_cpu():
        pytest.skip("not glibc")
    worker_before = _forked_worker_mb()
    base = _resident_mb()
    block = torch.ones(POOL_MB * 2**20 // 4)  # one large map, as a FOD step makes
    del block
    kept = _resident_mb()
    assert kept > base + POOL_MB * 3 / 4  # freed, but kept by the process for the next step
    # A worker forked now must not map the parent's freed pool (it would pin it copy-on-write).
    worker_after = _forked_worker_mb()
    assert worker_after < worker_before + POOL_MB / 4, (worker_before, worker_after)
