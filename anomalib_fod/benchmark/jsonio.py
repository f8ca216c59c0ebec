"""Strict, atomic JSON files (cell results, error records, the aggregated report)."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .config import CellSpec


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a crash never leaves a half-written "done" marker)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def _finite(value: object) -> object:
    """NaN/inf -> ``None`` (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic) or hasattr(value, "item"):
        return value.item()
    return str(value)


def failure_record(spec: CellSpec, message: str, rss_scope: str, **details: str) -> dict[str, Any]:
    """Write and return the error record of a failed cell (``details``: more fields, e.g. the traceback)."""
    result = {
        "cell_id": spec.cell_id,
        "dataset": spec.dataset.name,
        "model": spec.model.name,
        "seed": spec.seed,
        "status": "failed",
        "fingerprint": spec.fingerprint(),
        "error": message,
        **details,
        "rss_scope": rss_scope,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json(spec.error_path, result)
    return result
