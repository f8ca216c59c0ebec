"""What a scoring setting costs at inference: one harness checkpoint exported to OpenVINO as saved and with the
setting (statistics refitted), the two graphs timed alternately in one process (this machine is shared: only their
ratio within the run means much), float32, batch 1, on one test image of the cell's dataset.

    python benchmarks/research/fine_latency.py --harness benchmarks/shared_datasets_256.yaml --model Fod \
        --run results/benchmarks/<run> --dataset bottle --variant '{"fine_map_weight": 0.25}'

One JSON line goes to ``--out`` (default ``<run>/fine_latency.jsonl``) and to the console.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))


def main(
    harness: Path = Path("benchmarks/shared_datasets_256.yaml"),
    variant: dict[str, Any] | None = None,
    baseline: dict[str, Any] | None = None,
    model: str = "Fod",
    run: Path | None = None,
    dataset: str = "bottle",
    seed: int = 0,
    image_size: tuple[int, int] = (256, 256),
    runs: int = 50,
    warmup: int = 5,
    threads: int = 1,
    out: Path | None = None,
) -> None:
    """Export the cell's checkpoint as saved (or with ``baseline``, refitted) and with ``variant`` (keyword arguments
    of ``Fod.load_from_checkpoint``, then ``fit_residual_statistics``), time both OpenVINO graphs alternately and
    print their medians and ratio."""
    import torch  # noqa: PLC0415
    from openvino_latency import export, file_sizes, latency_ms  # noqa: PLC0415
    from rescore import load_seeded, one_cell  # noqa: PLC0415

    from anomalib_fod.deploy import load_rgb, to_model_input  # noqa: PLC0415

    variant = variant or {"fine_map_weight": 0.25}
    torch.set_num_threads(threads)
    checkpoint, datamodule, out = one_cell(harness, run, out, "fine_latency.jsonl", model, dataset, seed)
    saved = load_seeded(checkpoint, seed, **(baseline or {}))
    if baseline:
        saved.fit_residual_statistics(datamodule)
    changed = load_seeded(checkpoint, seed, **variant)
    changed.fit_residual_statistics(datamodule)
    size = tuple(image_size)  # the harness config's image_size: each graph takes a fixed input
    with tempfile.TemporaryDirectory() as workdir:
        graphs = {name: export(fod, Path(workdir), name, size) for name, fod in (("as saved", saved),
                                                                               ("variant", changed))}
        image_path = Path(datamodule.test_data.samples.iloc[0]["image_path"])
        image = to_model_input(load_rgb(image_path), size)
        timed = latency_ms(graphs, image, runs, warmup, "CPU", threads=threads)
        sizes = {name: file_sizes(xml) for name, xml in graphs.items()}
    row = {"dataset": dataset, "seed": seed, "variant": variant, "baseline": baseline or {}, "threads": threads,
           "image": image_path.name,
           "median_ms": {name: round(timed[name]["median_ms"], 1) for name in graphs},
           "ratio": timed["variant"]["median_ms"] / timed["as saved"]["median_ms"], "sizes_mb": sizes}
    print(json.dumps(row), flush=True)
    with out.open("a") as file:
        file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    from jsonargparse import CLI

    CLI(main, as_positional=False)
