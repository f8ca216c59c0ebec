"""Fit and test a tiny FOD with Lightning DDP on CPU (2 processes, gloo); used by ``test_ddp.py``.

Run as a script: Lightning's ``ddp`` strategy starts the other ranks by re-running this command
line, which is why it is not done inside pytest's process.

    python tests/_ddp_fit.py DATA_ROOT CATEGORY OUT_DIR

Writes ``OUT_DIR/ddp.ckpt`` (weights, references, post-processor state) and, from rank 0,
``OUT_DIR/ddp_metrics.json`` (the test metrics computed across both ranks).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fod_helpers import DUMMY_SIZE, TINY  # noqa: E402

WORLD_SIZE = 2
TRAIN_BATCH = 2
EVAL_BATCH = 1


def datamodule(root: Path, category: str):
    from anomalib.data import MVTecAD

    return MVTecAD(
        root=root,
        category=category,
        train_batch_size=TRAIN_BATCH,
        eval_batch_size=EVAL_BATCH,
        num_workers=0,
    )


def main(argv: list[str]) -> None:
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    from anomalib_fod import Fod

    root, category, out = Path(argv[0]), argv[1], Path(argv[2])
    seed_everything(0, workers=True)
    model = Fod(
        pre_trained=False,
        pre_processor=Fod.configure_pre_processor((DUMMY_SIZE, DUMMY_SIZE)),
        visualizer=False,
        **TINY,
    )
    engine = Engine(
        default_root_dir=out,
        logger=False,
        max_epochs=1,
        accelerator="cpu",
        devices=WORLD_SIZE,
        strategy="ddp",
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = datamodule(root, category)
    engine.fit(model, datamodule=data)
    engine.trainer.save_checkpoint(out / "ddp.ckpt")  # every rank calls it, rank 0 writes
    metrics = engine.test(model, datamodule=data, verbose=False)
    if engine.trainer.is_global_zero:
        (out / "ddp_metrics.json").write_text(json.dumps({k: float(v) for k, v in metrics[0].items()}))


if __name__ == "__main__":
    main(sys.argv[1:])
