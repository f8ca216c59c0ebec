"""The anomalib CLI configs shipped with the package, usable by name: ``anomalib-fod train --config mvtec_ad``.

This folder (``configs/`` in the repository) is installed as the package ``anomalib_fod.configs``
(``pyproject.toml`` maps it), so the YAML files are in the wheel and work without a checkout. A
``--config`` value that is not an existing file but names one of them (with or without ``.yaml``)
is replaced by that file's path; anything else reaches anomalib's CLI unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

CONFIG_OPTIONS = ("--config", "-c")


def available() -> list[str]:
    """Names of the shipped configs, e.g. ``["btad", "cdo_battery_weld", ...]``."""
    return sorted(entry.name.removesuffix(".yaml") for entry in resources.files(__name__).iterdir() if entry.name.endswith(".yaml"))


def config_path(name: str) -> Path | None:
    """The shipped config called ``name`` (``"mvtec_ad"`` or ``"mvtec_ad.yaml"``), or ``None``."""
    stem = name.removesuffix(".yaml")
    if "/" in stem or "\\" in stem or stem not in available():
        return None
    return Path(str(resources.files(__name__) / f"{stem}.yaml"))


def _resolved(value: str) -> str:
    if Path(value).exists():
        return value
    shipped = config_path(value)
    return str(shipped) if shipped is not None else value


def resolve_config_argument(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--config NAME`` / ``--config=NAME`` / ``-c NAME`` of a shipped config made a path."""
    resolved = list(argv)
    for index, token in enumerate(resolved):
        option, equals, value = token.partition("=")
        if option in CONFIG_OPTIONS and equals:
            resolved[index] = f"{option}={_resolved(value)}"
        elif token in CONFIG_OPTIONS and index + 1 < len(resolved):
            resolved[index + 1] = _resolved(resolved[index + 1])
    return resolved
