"""End-to-end fit time of ``Fod()`` with and without the compiled block kernels (issue 18), compilation included.

Trains the default recipe (250 optimizer steps at batch 1) on one dataset once per setting, in the order given,
in this process, and prints fit seconds and exact image / pixel AUROC for each. Run two of these side by side with
the orders swapped, so both settings share the CPU alike:

    OMP_NUM_THREADS=1 python benchmarks/compile_kernels_timing.py --order compiled eager &
    OMP_NUM_THREADS=1 python benchmarks/compile_kernels_timing.py --order eager compiled
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def fit_once(compiled: bool, root: str, category: str, size: int, seed: int) -> dict[str, float]:
    """Fit and test one ``Fod()``; fit seconds and exact AUROCs."""
    from anomalib.data import MVTecAD  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_fod import Fod  # noqa: PLC0415
    from anomalib_fod.evaluation import collect_predictions, image_auroc, pixel_auroc, raw_post_processing  # noqa: PLC0415

    seed_everything(seed, workers=True)
    data = MVTecAD(root=root, category=category, train_batch_size=1, eval_batch_size=16, num_workers=0)
    model = Fod(image_size=(size, size), compile_kernels=compiled, visualizer=False)
    with tempfile.TemporaryDirectory() as work:
        engine = Engine(max_epochs=1000, default_root_dir=work, accelerator="cpu", devices=1, logger=False)
        start = time.perf_counter()
        engine.fit(model=model, datamodule=data)
        fit_s = time.perf_counter() - start
        with raw_post_processing(model):
            raw = collect_predictions(engine.predict(model=model, datamodule=data, return_predictions=True))
    return {
        "fit_s": fit_s,
        "steps": float(engine.trainer.global_step),
        "image_auroc": image_auroc(raw["scores"], raw["labels"]),
        "pixel_auroc": pixel_auroc(raw["maps"], raw["masks"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--order", nargs="+", choices=["compiled", "eager"], default=["compiled", "eager"])
    parser.add_argument("--root", default="anomalib_fod/data")
    parser.add_argument("--category", default="battery_weld")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="append one line per fit")
    args = parser.parse_args()
    for setting in args.order:
        result = {"setting": setting, **fit_once(setting == "compiled", args.root, args.category, args.image_size, args.seed)}
        print("TIMING " + json.dumps(result), flush=True)
        if args.json:
            with args.json.open("a") as stream:
                stream.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
