"""``anomalib-fod``: anomalib's CLI with the plugin's models registered, plus the plugin's own commands.

- ``anomalib-fod train|test|export|predict|fit|validate ... --model Fod`` behaves exactly like
  ``anomalib ... --model anomalib_fod.Fod`` (anomalib's own CLI after registering the plugin).
  ``--config`` also takes the name of a config shipped with the package, e.g. ``--config mvtec_ad``
  (:mod:`anomalib_fod.configs`).
- ``demo``, ``benchmark``, ``predict-folder`` and ``explain`` are typed functions (see
  :data:`PLUGIN_COMMANDS`) parsed by jsonargparse: ``anomalib-fod demo --help``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from anomalib_fod.typed_cli import function_parser, run_function


@dataclass(frozen=True)
class Command:
    """A plugin command: the typed function it runs.

    Attributes:
        target: ``"module:function"``.
    """

    target: str

    def function(self) -> Callable[..., Any]:
        """Import and return the command's function."""
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


PLUGIN_COMMANDS: dict[str, Command] = {
    "demo": Command("anomalib_fod.demo:demo"),
    "benchmark": Command("anomalib_fod.benchmark.__main__:benchmark"),
    "predict-folder": Command("anomalib_fod.deploy:predict_folder"),
    "explain": Command("anomalib_fod.explain:explain"),
}


def run_command(name: str, argv: Sequence[str] | None = None) -> int:
    """Run plugin command ``name`` with command-line ``argv``; return its exit status."""
    command = PLUGIN_COMMANDS[name]
    return run_function(command.function(), argv, prog=f"anomalib-fod {name}")


def plugin_help() -> str:
    """``anomalib-fod --help``: the plugin's commands (a jsonargparse parser with one subcommand each)."""
    from jsonargparse import ArgumentParser  # noqa: PLC0415

    parser = ArgumentParser(
        prog="anomalib-fod",
        description="FOD, ED and CDO for anomalib. Besides the commands below, every command of anomalib's CLI "
        "(train, test, export, predict, fit, validate, ...) works with the plugin's models registered: "
        "anomalib-fod train --help.",
    )
    subcommands = parser.add_subcommands(required=False)
    for name, command in PLUGIN_COMMANDS.items():
        sub = function_parser(command.function(), prog=f"anomalib-fod {name}")
        subcommands.add_subcommand(name, sub, help=sub.description)
    return parser.format_help()


def main(argv: Sequence[str] | None = None) -> None:
    """Run a plugin command, or register the plugin and hand over to anomalib's CLI."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in PLUGIN_COMMANDS:
        sys.exit(run_command(args[0], args[1:]))
    if args in (["-h"], ["--help"]):
        print(plugin_help())
        sys.exit(0)

    from anomalib.cli.cli import main as anomalib_main  # noqa: PLC0415

    from anomalib_fod.configs import resolve_config_argument  # noqa: PLC0415
    from anomalib_fod.registry import register_with_anomalib  # noqa: PLC0415

    register_with_anomalib()

    sys.argv = [sys.argv[0], *resolve_config_argument(args)]
    anomalib_main()


if __name__ == "__main__":
    main()
