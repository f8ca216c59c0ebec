"""Typed functions as command-line commands, parsed by jsonargparse (as anomalib's own CLI is).

Each of the plugin's commands is a function with typed, documented arguments; jsonargparse turns
it into a parser, so ``--help``, type checks and error messages come from the signature and the
docstring. The commands keep the argparse spelling they always had: ``--image-size 64 96`` and a
bare ``--force`` are rewritten to jsonargparse's ``--image_size=[64, 96]`` / ``--force=true`` by
:func:`to_jsonargparse_argv`, which reads the types from the same signature.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ArgumentParser

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def _unwrapped(hint: Any) -> Any:  # noqa: ANN401
    """``X | None`` -> ``X``."""
    arguments = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(arguments) == 1:
        return arguments[0]
    return hint


def _is_flag(hint: Any) -> bool:  # noqa: ANN401
    return _unwrapped(hint) is bool


def _is_sequence(hint: Any) -> bool:  # noqa: ANN401
    return typing.get_origin(_unwrapped(hint)) in (list, tuple, Sequence, typing.Sequence)


def _flow_item(value: str) -> str:
    return value if _NUMBER.match(value) else json.dumps(value)


def to_jsonargparse_argv(argv: Sequence[str], function: Callable[..., Any]) -> list[str]:
    """Rewrite argparse-style options of ``function``'s command into jsonargparse's spelling.

    ``--some-name`` becomes ``--some_name``; the values after an option of a list or tuple type
    become one list (``--models Fod Padim`` -> ``--models=["Fod", "Padim"]``); a bool option given
    without a value means ``true``. Anything already in jsonargparse's spelling passes unchanged.
    """
    hints = typing.get_type_hints(function)
    converted: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        name = token[2:].replace("-", "_")
        if not token.startswith("--") or "=" in token or name not in hints:
            converted.append(token)
            index += 1
            continue
        end = index + 1
        while end < len(argv) and not argv[end].startswith("--"):
            end += 1
        values, hint = list(argv[index + 1 : end]), hints[name]
        if _is_flag(hint) and not values:
            converted.append(f"--{name}=true")
        elif _is_sequence(hint) and values and not (len(values) == 1 and values[0].lstrip().startswith("[")):
            converted.append(f"--{name}=[{', '.join(_flow_item(v) for v in values)}]")
        else:
            converted += [f"--{name}", *values]
        index = end
    return converted


def function_parser(function: Callable[..., Any], prog: str) -> ArgumentParser:
    """A jsonargparse parser of ``function``'s arguments, every one an ``--option``."""
    summary = (inspect.getdoc(function) or "").split("\n\n")[0]
    parser = ArgumentParser(prog=prog, description=summary)
    parser.add_function_arguments(function, as_positional=False)
    return parser


def run_function(function: Callable[..., Any], argv: Sequence[str] | None, prog: str) -> int:
    """Parse ``argv`` (``None``: the process's arguments) for ``function``, call it, return an exit status.

    The status is the function's own if it returns an int, else 0.
    """
    parser = function_parser(function, prog)
    args = sys.argv[1:] if argv is None else list(argv)
    config = parser.parse_args(to_jsonargparse_argv(args, function))
    result = function(**parser.instantiate_classes(config).as_dict())
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
