"""The ``sensitivity`` command: one subcommand per pipeline stage, plus ``demo``.

Each subcommand lives in ``sensitivity/commands/<name>.py`` and exposes ``register(subparsers)``,
which adds its parser and sets ``func(args) -> int``. Modules are imported only when needed, so
``sensitivity --help`` stays fast. User errors (:class:`~sensitivity.errors.SensitivityError`) print
one line, ``error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

from .errors import SensitivityError
from .registry import Registry

#: subcommand name -> the module that adds its parser (``register(subparsers)``), imported only when needed
COMMANDS: Registry[str] = Registry("command")
for _name in ("models", "layers", "multiquantize", "info", "infer", "demo", "sample", "evaluate", "cache", "graph",
              "train", "predict", "search", "insights", "components", "calibrate-data", "calibrate", "export", "finetune"):
    COMMANDS.register(_name, f"sensitivity.commands.{_name.replace('-', '_')}")


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sensitivity",
        description="Find which weight layers of a diffusion denoiser can be quantized to 3 or 4 bits.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS.names():
        if only is not None and name != only:
            continue
        module = COMMANDS.get(name)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue  # subcommand not installed in this build
            raise
        mod.register(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except SensitivityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished results are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `sensitivity info x --json | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
