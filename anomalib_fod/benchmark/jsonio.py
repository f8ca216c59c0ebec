"""Strict, atomic JSON files (cell results, error records, the aggregated report)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


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
