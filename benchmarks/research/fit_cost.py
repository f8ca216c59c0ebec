"""What a scoring setting adds to the fit after training: ``Fod.fit_residual_statistics`` on one harness checkpoint
with and without it, alternated in one process (this machine is shared: only the ratio within a round means much).

    python benchmarks/research/fit_cost.py --harness benchmarks/shared_datasets_256.yaml --model FodAuto \
        --run results/benchmarks/auto_256 --dataset bottle --variant '{"fine_map_weight": 0.25}'

One JSON line per fit goes to ``--out`` (default ``<run>/fit_cost.jsonl``) and to the console.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))


def main(
    harness: Path = Path("benchmarks/shared_datasets_256.yaml"),
    variant: dict[str, Any] | None = None,
    baseline: dict[str, Any] | None = None,
    model: str = "FodAuto",
    run: Path | None = None,
    dataset: str = "bottle",
    seed: int = 0,
    rounds: int = 2,
    out: Path | None = None,
    threads: int = 1,
) -> None:
    """Fit the checkpoint's statistics ``rounds`` times as saved (or with ``baseline``) and with ``variant`` (keyword
    arguments of ``Fod.load_from_checkpoint``), alternately, and print each fit's seconds and their ratio per round."""
    import torch  # noqa: PLC0415

    from rescore import load_seeded, one_cell  # noqa: PLC0415

    variant = variant or {"fine_map_weight": 0.25}
    torch.set_num_threads(threads)
    checkpoint, datamodule, out = one_cell(harness, run, out, "fit_cost.jsonl", model, dataset, seed)
    for index in range(rounds):
        seconds = {}
        for name, settings in (("as saved", baseline or {}), ("variant", variant)):
            fod = load_seeded(checkpoint, seed, **settings)
            start = time.perf_counter()
            fod.fit_residual_statistics(datamodule)
            seconds[name] = time.perf_counter() - start
        row = {"dataset": dataset, "seed": seed, "round": index, "variant": variant, "baseline": baseline or {},
               "threads": threads,
               "seconds": seconds, "ratio": seconds["variant"] / seconds["as saved"]}
        print(json.dumps(row), flush=True)
        with out.open("a") as file:
            file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main)
