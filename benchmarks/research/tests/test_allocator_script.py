"""``benchmarks/research/research/allocator.py``: every allocator setting timed in its own process."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import RESEARCH


@pytest.mark.slow
def test_allocator_benchmark_times_each_setting_in_its_own_process(tmp_path) -> None:  # noqa: ANN001
    """``benchmarks/research/research/allocator.py`` (the figures in benchmarks/results/memory.md) on a tiny input."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc malloc only")
    spec = importlib.util.spec_from_file_location("allocator_benchmark", RESEARCH / "allocator.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # jsonargparse resolves the annotations through the module
    spec.loader.exec_module(script)
    out = tmp_path / "allocators.json"
    argv = ["--image_size", "64", "--steps", "1", "--rounds", "1", "--settings", "[glibc, env]", "--json_path", str(out)]
    assert script.main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"glibc", "env"}
    assert all(len(rows) == 1 and rows[0]["step_s"] > 0 and rows[0]["peak_rss_mb"] > 0 for rows in results.values())
