"""On a CUDA device: Fod and Cdo fit, test and predict through the Engine, and the weights they learnt there score
on the CPU what they score on the GPU.

CI has no GPU, so these tests skip there; on a machine with one: ``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fod_helpers import EMBEDDED_DATA_ROOT, TINY, make_datamodule, make_engine
from lightning.pytorch import seed_everything

from anomalib_fod import Cdo, Fod
from anomalib_fod.evaluation import collect_predictions, exact_metrics
from test_engine import check_metrics, raw_predictions

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SIZE = 96


def build(name: str) -> Fod | Cdo:
    if name == "Fod":
        return Fod(pre_processor=Fod.configure_pre_processor((SIZE, SIZE)), visualizer=False, **TINY)
    return Cdo(pre_processor=Cdo.configure_pre_processor((SIZE, SIZE)), visualizer=False)


@pytest.mark.parametrize("name", ["Fod", "Cdo"])
def test_fit_on_cuda_scores_on_the_cpu_as_on_the_gpu(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """battery_weld at 96 px, one epoch on the GPU; then the same weights on the CPU.

    TF32 is off so that the two devices differ by float32 rounding alone: a buffer left on the wrong device, a
    statistic fitted from a partial batch or a device-dependent code path shows up as a difference in the scores.
    """
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    seed_everything(0)
    datamodule = make_datamodule(EMBEDDED_DATA_ROOT, "battery_weld", train_batch_size=5, eval_batch_size=16)
    model = build(name)
    engine = make_engine(tmp_path / "gpu", max_epochs=1, accelerator="gpu")
    engine.fit(model, datamodule=datamodule)
    assert all(tensor.device.type == "cuda" for tensor in model.model.state_dict().values())
    check_metrics(engine.test(model, datamodule=datamodule))
    on_gpu = collect_predictions(raw_predictions(engine, model, datamodule))

    model.cpu()
    on_cpu = collect_predictions(raw_predictions(make_engine(tmp_path / "cpu"), model, datamodule))
    for key in ("scores", "maps"):
        gpu, cpu = torch.as_tensor(on_gpu[key]), torch.as_tensor(on_cpu[key])
        assert torch.isfinite(gpu).all()
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4 * float(cpu.abs().max()))
    metrics = exact_metrics(on_gpu["scores"], on_gpu["labels"], on_gpu["maps"], on_gpu["masks"])
    if name == "Fod":  # one epoch already ranks welds (the CPU test of the same run measured 0.987 / 0.823)
        assert metrics["image_auroc"] >= 0.95 and metrics["pixel_auroc"] >= 0.75, metrics
