"""Typed functions as command-line commands, parsed by jsonargparse as anomalib's own CLI is.

Each of the plugin's commands is a function with typed, documented arguments; jsonargparse turns
it into a parser, so ``--help``, type checks and error messages come from the signature and the
docstring, and the options are spelt as in ``anomalib train``: ``--image_size "[64, 96]"``,
``--models "[Fod, Padim]"`` (or ``--models+=Fod --models+=Padim``), ``--force true``.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ArgumentParser


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
    config = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    result = function(**parser.instantiate_classes(config).as_dict())
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
