"""OpenVINO CPU latency of ``Fod(nearest_tokens=K)`` against the same weights without the nearest-token score.

One checkpoint of the option (e.g. a harness cell's) is exported twice: as it is, and with its nearest-token
buffers dropped (the same Transformers and Gaussians: what ``Fod()`` computes). Both graphs are compiled in float32
on the CPU with ``--threads`` threads and timed alternately (``--runs`` rounds of one synchronous 256x256 inference
each), so a shared machine's load affects both alike; the median of each and their ratio are printed.

    python benchmarks/research/nearest_latency.py CHECKPOINT [--runs 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import openvino  # noqa: PLC0415

    from anomalib_fod import Fod  # noqa: PLC0415

    with_bank = Fod.load_from_checkpoint(args.checkpoint).eval()
    hparams = {k: v for k, v in with_bank.hparams.items() if k != "nearest_tokens"}
    without = Fod(**hparams).eval()
    state = {k: v for k, v in with_bank.state_dict().items() if ".nearest." not in k}
    without.load_state_dict(state)
    size = tuple(int(v) for v in with_bank.pre_processor.transform.transforms[0].size)
    image = np.random.default_rng(0).random((1, 3, *size), dtype=np.float32)
    core = openvino.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads}
    compiled = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("nearest", with_bank), ("gaussian", without)):
            path = model.to_onnx(Path(tmp) / name)
            compiled[name] = core.compile_model(core.read_model(path), "CPU", config)
            compiled[name](image)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(args.runs):
        for name, model in compiled.items():
            start = time.perf_counter()
            model(image)
            times[name].append(1000 * (time.perf_counter() - start))
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name}: median {value:.1f} ms over {args.runs} runs ({args.threads} thread(s), input {size})")
    print(f"ratio nearest / gaussian: {medians['nearest'] / medians['gaussian']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
