"""ED (Emphasize Differences) as settings of FOD: each changed part, the preset, training and export.

ED's three changes (concat+MLP fusion, learnable temperature with optional relative-position
bias, depth-wise-conv feed-forward with a median term) are checked against straightforward
computations written out here; ``Ed`` with FOD's settings must be FOD exactly; a tiny ``Ed``
trains with anomalib's ``Engine`` and its OpenVINO export matches Lightning.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning.pytorch import seed_everything
from torch.nn import functional as F  # noqa: N812

import anomalib_fod
from anomalib_fod import Ed, Fod
from anomalib_fod.models.fod.settings import FodSettings
from anomalib_fod.models.fod.transformer import (
    grid_geometry,
    ConvFeedForward,
    CorrelationAttention,
    I2CorrelationLayer,
    RelativePositionBias,
    grid_coordinates,
    lower_median,
    sorted_lower_median,
    relative_offsets,
)

from fod_helpers import PAPER_SCORE, TINY, set_random_references

DATA_ROOT = Path(anomalib_fod.__file__).parent / "data"


def test_ed_is_a_preset_of_fod() -> None:
    model = Ed(pre_trained=False, image_size=64, visualizer=False, **TINY)
    assert isinstance(model, Fod)
    assert (model.hparams["fusion"], model.hparams["ffn"]) == ("concat_mlp", "dwconv_median")
    assert model.hparams["learnable_temperature"] is True
    assert model.hparams["relative_position_bias"] is False
    assert Ed(pre_trained=False).hparams["num_layers"] == 3  # the papers' depth, whatever Fod's default
    layer = model.model.levels[0].layers[0]
    assert layer.fusion is not None and isinstance(layer.ffn, ConvFeedForward)
    assert layer.self_attention.log_temperature is not None and layer.self_attention.position_bias is None


def test_ed_with_fod_settings_is_fod() -> None:
    """Switching ED's three parts back gives FOD's parameters and FOD's outputs exactly."""
    fod_settings = {"fusion": "subtract", "ffn": "mlp", "learnable_temperature": False}
    torch.manual_seed(0)
    ed = Ed(pre_trained=False, image_size=64, visualizer=False, **fod_settings, **TINY).model
    # Ed keeps the papers' score, Fod's default is the whitened residual: compare on the same score.
    fod = Fod(pre_trained=False, image_size=64, visualizer=False, **PAPER_SCORE, **TINY).model
    assert ed.state_dict().keys() == fod.state_dict().keys()
    set_random_references(ed, 64, 64)
    fod.load_state_dict(ed.state_dict())
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ed.eval()
    fod.eval()
    with torch.no_grad():
        want, got = fod(images), ed(images)
    torch.testing.assert_close(got.anomaly_map, want.anomaly_map, rtol=0, atol=0)


def test_concat_fusion_layer_matches_reference_computation() -> None:
    torch.manual_seed(0)
    d_model, heads, (h, w) = 16, 2, (3, 4)
    layer = I2CorrelationLayer(d_model, FodSettings(num_heads=heads, ffn_ratio=2, fusion="concat_mlp")).eval()
    x = torch.randn(2, h * w, d_model)
    reference = torch.randn(1, h * w, d_model)
    got, _, _ = layer(x, reference, None, None, grid=(h, w))

    intra, _ = layer.self_attention(x, x)
    inter, _ = layer.cross_attention(x, reference)
    mlp = layer.fusion.mlp
    hidden = F.relu(F.linear(torch.cat((x + intra, x + inter), -1), mlp[0].weight, mlp[0].bias))
    fused = F.linear(hidden, mlp[2].weight, mlp[2].bias)
    y = layer.norm1(fused)
    want = layer.norm2(y + layer.ffn(y, h, w))
    torch.testing.assert_close(got, want)
    # Unlike subtraction, the fusion is not antisymmetric in the branches.
    assert not torch.allclose(layer.fusion(x + intra, x + inter), -layer.fusion(x + inter, x + intra))


def test_learnable_temperature_starts_at_the_fixed_scale_and_learns() -> None:
    torch.manual_seed(0)
    fixed = CorrelationAttention(16, FodSettings(num_heads=4))
    learned = CorrelationAttention(16, FodSettings(num_heads=4, learnable_temperature=True))
    learned.load_state_dict(fixed.state_dict(), strict=False)
    assert math.isclose(learned.log_temperature.exp().item(), 1 / math.sqrt(4), rel_tol=1e-6)
    x = torch.randn(2, 6, 16)
    geometry = grid_geometry(grid_coordinates(2, 3), 2, 3)

    def run(attention: CorrelationAttention) -> tuple[torch.Tensor, torch.Tensor]:
        out, stats = attention(x, x, geometry, keep_maps=True)
        return out, stats.maps[0]

    out_fixed, att_fixed = run(fixed)
    out_learned, att_learned = run(learned)
    torch.testing.assert_close(att_learned, att_fixed)
    out_learned.square().sum().backward()
    assert learned.log_temperature.grad is not None and learned.log_temperature.grad.abs() > 0
    with torch.no_grad():
        learned.log_temperature.add_(1.0)  # hotter logits: sharper attention
        _, sharper = run(learned)
    entropy = lambda p: -(p * p.clamp_min(1e-12).log()).sum(-1).mean()  # noqa: E731
    assert entropy(sharper) < entropy(att_fixed)


def test_relative_offsets_index_the_right_table_rows() -> None:
    h, w = 3, 4
    coords = grid_coordinates(h, w)
    keys = coords[torch.tensor([0, 5, 11])]
    offsets = relative_offsets(coords, keys, h, w)
    assert offsets.table.shape == ((2 * h - 1) * (2 * w - 1), 2)
    for q in range(h * w):
        for k in range(keys.shape[0]):
            torch.testing.assert_close(offsets.table[offsets.index[q, k]], keys[k] - coords[q])


def test_relative_position_bias_depends_only_on_the_offset() -> None:
    torch.manual_seed(0)
    bias_module = RelativePositionBias(num_heads=3)
    h, w = 4, 5
    coords = grid_coordinates(h, w)
    offsets = relative_offsets(coords, coords, h, w)
    assert bias_module(offsets).abs().max() == 0, "the bias must start switched off"
    torch.nn.init.normal_(bias_module.mlp[-1].weight)
    bias = bias_module(offsets)  # (H, L, L)
    assert bias.shape == (3, h * w, h * w)
    index = lambda r, c: r * w + c  # noqa: E731
    # Moving query and key by the same step leaves the bias unchanged; another offset changes it.
    torch.testing.assert_close(bias[:, index(0, 0), index(1, 2)], bias[:, index(2, 1), index(3, 3)])
    assert not torch.allclose(bias[:, index(0, 0), index(1, 2)], bias[:, index(0, 0), index(2, 1)])
    attention = CorrelationAttention(8, FodSettings(num_heads=2, relative_position_bias=True), with_target=False)
    with pytest.raises(ValueError, match="offsets"):
        attention(torch.randn(1, h * w, 8), torch.randn(1, h * w, 8))


def test_lower_median_eager_and_export_paths_agree() -> None:
    """The eager median and the sort the exported graph uses: same values, same gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5)
    for length in (6, 7):
        part = x[:, :length]
        expected = torch.sort(part, dim=1).values[:, (length - 1) // 2]
        torch.testing.assert_close(lower_median(part, dim=1)[:, 0], expected, rtol=0, atol=0)
        torch.testing.assert_close(sorted_lower_median(part, dim=1)[:, 0], expected, rtol=0, atol=0)
        weights = torch.randn(3, 1, 5)
        grads = []
        for median in (lower_median, sorted_lower_median):
            leaf = part.clone().requires_grad_(True)
            (median(leaf, dim=1) * weights).sum().backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
        assert (grads[0] != 0).sum() == 3 * 5  # one token per (image, channel) gets the gradient


def test_conv_feed_forward_is_local_plus_median() -> None:
    torch.manual_seed(0)
    h, w, d = 5, 6, 8
    ffn = ConvFeedForward(d, 16)
    x = torch.randn(1, h * w, d)
    far = x.clone()
    far[0, (h - 1) * w + (w - 1)] += 10.0  # bottom-right token, far from token 0
    torch.testing.assert_close(ffn(far, h, w)[0, 0], ffn(x, h, w)[0, 0], msg="3x3 depth-wise: only neighbours count")
    with torch.no_grad():
        ffn.median_scale.normal_()
    hidden = F.gelu(ffn.conv(ffn.fc1(x).transpose(1, 2).reshape(1, 16, h, w))).flatten(2).transpose(1, 2)
    want = ffn.fc2(hidden + ffn.median_scale * hidden.median(dim=1, keepdim=True).values)
    torch.testing.assert_close(ffn(x, h, w), want)


def test_ed_checkpoint_refused_by_fod(tmp_path: Path) -> None:
    ed = Ed(pre_trained=False, image_size=64, visualizer=False, **TINY)
    set_random_references(ed.model, 64, 64)
    checkpoint = {"state_dict": ed.state_dict(), "hyper_parameters": dict(ed.hparams)}
    fod = Fod(pre_trained=False, image_size=64, visualizer=False, **TINY)
    with pytest.raises(ValueError, match="fusion"):
        fod.on_load_checkpoint(checkpoint)


@pytest.mark.slow
def test_ed_trains_and_exports_to_openvino_with_parity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny Ed (relative-position bias on, to export every ED part) trains, reloads and exports.

    On 16 battery_weld test images, pre-resized to the input size, OpenVINO's scores match
    ``Engine.predict`` within 1e-4 relative and its maps within 1e-3 of the map range.
    """
    from PIL import Image  # noqa: PLC0415

    from anomalib_fod.inference import OpenVINOInferencer  # noqa: PLC0415 - float32 on every CPU

    pytest.importorskip("openvino")
    seed_everything(0)
    size = (64, 64)
    model = Ed(image_size=size, visualizer=False, relative_position_bias=True, **TINY)
    engine = Engine(max_epochs=1, logger=False, default_root_dir=tmp_path, enable_progress_bar=False)
    engine.fit(model, datamodule=MVTecAD(root=DATA_ROOT, category="battery_weld", num_workers=0))
    reloaded = Ed.load_from_checkpoint(engine.trainer.checkpoint_callback.best_model_path)
    assert reloaded.hparams["relative_position_bias"] is True

    folder = tmp_path / "images"
    folder.mkdir()
    for source in sorted((DATA_ROOT / "battery_weld" / "test").glob("*/*.png"))[::8]:
        with Image.open(source) as image:
            image.convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR).save(folder / f"{source.parent.name}_{source.name}")
    want = {}
    for batch in engine.predict(reloaded, data_path=folder, return_predictions=True):
        for i, path in enumerate(batch.image_path):
            want[Path(path).name] = (float(batch.pred_score[i]), batch.anomaly_map[i].numpy().reshape(size))
    xml = engine.export(reloaded, ExportType.OPENVINO, export_root=tmp_path / "export")
    monkeypatch.chdir(tmp_path)  # the inferencer writes ./openvino_cache
    inferencer = OpenVINOInferencer(path=xml, device="CPU")
    assert len(want) == 16
    for name, (score, anomaly_map) in want.items():
        result = inferencer.predict(folder / name)
        np.testing.assert_allclose(float(np.asarray(result.pred_score).reshape(-1)[0]), score, rtol=1e-4, atol=1e-6)
        got_map = np.asarray(result.anomaly_map, dtype=np.float64).reshape(size)
        assert np.abs(got_map - anomaly_map).max() <= 1e-3 * max(float(anomaly_map.max() - anomaly_map.min()), 1e-6)
