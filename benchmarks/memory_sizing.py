"""Memory per image of FOD (default settings) for training and inference, and GPU batch sizes.

Three ways, from exact to empirical (numbers in docs/speed_and_memory.md, "Memory and GPU sizing"):

- ``analytic``: the ``(B, H, L, S)`` correlation maps dominate. Training keeps 4 maps per branch,
  layer and level for the backward pass (softmax output = attention, Gaussian target, and the
  fused statistics' ``log(a + eps)`` and ``log(a + eps) - log(t + eps)``), i.e.
  ``4 * 2 branches * num_layers`` maps of ``num_heads * L * L * 4`` bytes per level.
- ``saved``: the bytes autograd actually keeps for backward in one training forward (unique
  storages of all saved tensors, parameters excluded), counted with ``saved_tensors_hooks``.
  ``--device meta`` runs it for any size without allocating memory (shapes only).
- ``rss``: peak resident memory (``ru_maxrss``) of a fresh process after one training step
  (forward + backward + Adam) or one inference forward, at batch sizes 1 and 2: the difference is
  the memory per image (on CPU; a GPU adds its context but the per-image tensors are the same).

Usage::

    python benchmarks/memory_sizing.py analytic
    python benchmarks/memory_sizing.py saved --size 256            # real tensors
    python benchmarks/memory_sizing.py saved --size 512 --device meta
    python benchmarks/memory_sizing.py rss --phase train --size 256 --batch 2
    python benchmarks/memory_sizing.py table --sizes 128 192 256   # rss for batch 1 and 2, every size
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import warnings

MIB = 2**20
GIB = 2**30
# The defaults of Fod / FodModel.
D_MODELS = (256, 512)
NUM_HEADS = 8
NUM_LAYERS = 3
STRIDES = (8, 16)
MAPS_PER_BRANCH_LAYER = 4  # attention, target, log(a + eps), log(a + eps) - log(t + eps)
BRANCHES = 2


def analytic(size: int) -> dict[str, float]:
    """Bytes per image of the correlation maps kept for backward (training), from the shapes."""
    per_level = []
    for stride in STRIDES:
        tokens = (size // stride) ** 2
        map_bytes = NUM_HEADS * tokens * tokens * 4
        per_level.append({"tokens": tokens, "map_mib": map_bytes / MIB})
    kept = sum(MAPS_PER_BRANCH_LAYER * BRANCHES * NUM_LAYERS * lvl["map_mib"] for lvl in per_level)
    return {"size": size, "levels": per_level, "train_saved_maps_mib": kept}


def _model(size: int, device: str):
    import torch

    from anomalib_fod.models.fod.settings import FodSettings
    from anomalib_fod.models.fod.torch_model import FodModel
    from anomalib_fod.models.fod.transformer import FodTransformer

    if device == "meta":  # the reference grid check reads buffer values, which meta tensors lack
        FodTransformer._check_reference = lambda self, height, width, channels: None  # noqa: SLF001, ARG005
    model = FodModel(FodSettings(pre_trained=False)).to(device)
    with torch.no_grad():
        features = model.extract_features(torch.zeros(1, 3, size, size, device=device))
    model.set_mean_reference([f[0] for f in features])
    return model


def saved_bytes(size: int, device: str = "cpu", batch: int = 1) -> dict[str, float]:
    """Unique bytes autograd saves in one training forward + loss (parameters excluded)."""
    import torch

    from anomalib_fod.models.fod.loss import FodLoss

    model = _model(size, device)
    params = {p.untyped_storage()._cdata for p in model.parameters()}  # noqa: SLF001
    images = torch.zeros(batch, 3, size, size, device=device)
    features = model.extract_features(images)
    model.train()
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata  # noqa: SLF001
        if key not in params:
            seen[key] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model.forward_features(features)
        FodLoss()(output.tokens, output.levels)
    sizes = sorted(seen.values(), reverse=True)
    level0_map = NUM_HEADS * (size // STRIDES[0]) ** 4 * 4 * batch
    return {
        "size": size,
        "batch": batch,
        "saved_mib": sum(sizes) / MIB,
        "level0_maps_saved": sum(1 for s in sizes if s == level0_map),
    }


def peak_rss(phase: str, size: int, batch: int) -> dict[str, float]:
    """Peak RSS after one training step or one inference forward in this (fresh) process."""
    import torch

    from anomalib_fod.models.fod.loss import FodLoss

    torch.manual_seed(0)
    model = _model(size, "cpu")
    images = torch.randn(batch, 3, size, size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if phase == "train":
        model.train()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        output = model.forward_features(model.extract_features(images))
        loss, _ = FodLoss()(output.tokens, output.levels)
        loss.backward()
        optimizer.step()
    else:
        model.eval()
        with torch.inference_mode():
            model(images)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"phase": phase, "size": size, "batch": batch, "baseline_mib": before / MIB, "peak_mib": peak / MIB}


def table(sizes: list[int], phases: list[str]) -> list[dict[str, float]]:
    """Per-image memory = peak(batch 2) - peak(batch 1), each in a fresh subprocess."""
    rows = []
    for phase in phases:
        for size in sizes:
            peaks = {}
            for batch in (1, 2):
                command = [sys.executable, __file__, "rss", "--phase", phase, "--size", str(size), "--batch", str(batch)]
                result = subprocess.run(command, capture_output=True, text=True, check=True)  # noqa: S603
                peaks[batch] = json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]
            row = {"phase": phase, "size": size, "peak_b1_mib": peaks[1], "peak_b2_mib": peaks[2]}
            row["per_image_mib"] = peaks[2] - peaks[1]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["analytic", "saved", "rss", "table"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256])
    parser.add_argument("--phases", nargs="+", default=["train", "eval"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--phase", choices=["train", "eval"], default="train")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.mode == "analytic":
        for size in args.sizes:
            print(json.dumps(analytic(size)))
    elif args.mode == "saved":
        print(json.dumps(saved_bytes(args.size, args.device, args.batch)))
    elif args.mode == "rss":
        print(json.dumps(peak_rss(args.phase, args.size, args.batch)))
    else:
        table(args.sizes, args.phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
