"""The ``meddl`` command line.

Each sub-command lives in its own module of this package and exposes ``register(subparsers)``, which
adds its parser and sets ``func`` (called with the parsed arguments, returns an exit code). ``main``
turns every :class:`~meddl.errors.MedDLError` into one line on stderr and its exit code; an unexpected
exception is one line too (the traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import sys
import time
import traceback
from typing import List, Optional

from meddl import __version__
from meddl.errors import EXIT_CANCELLED, EXIT_INTERNAL, MedDLError, ModalityError

__all__ = ["main", "command", "build_parser", "emit", "error_line"]

# Modules that provide sub-commands, in the order `meddl --help` lists them.
COMMAND_MODULES = [
    "meddl.cli.info",
    "meddl.cli.segment",
    "meddl.cli.train",
    "meddl.cli.evaluate",
    "meddl.cli.models",
    "meddl.cli.correct",
    "meddl.cli.update",
    "meddl.cli.audit",
    "meddl.cli.classify",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meddl",
        description="Segment and classify medical volumes with packaged MONAI models, and learn from corrections.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage, 3 bad input, 4 bad model, 5 batch with failures, "
        "130 cancelled.",
    )
    parser.add_argument("--version", action="version", version=f"meddl {__version__}")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def emit(args: argparse.Namespace, result: dict, text: str) -> None:
    """Print ``result`` as JSON with ``--json``, else the human-readable ``text``."""
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    elif text:
        print(text)


def error_line(error: dict) -> str:
    """The line the command line prints for an error (``MedDLError.to_dict()``): its message, and for a modality
    refusal the switch that overrides it (the worker's clients offer their own way)."""
    message = str(error.get("message", ""))
    return f"{message} (use --force-modality to run it anyway)" if error.get("kind") == ModalityError.kind else message


def main(argv: Optional[List[str]] = None) -> int:
    started = time.perf_counter()  # before torch and MONAI load: a command can report what its start cost
    parser = build_parser()
    args = parser.parse_args(argv)
    args.started = started
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MedDLError as error:
        if args.debug:
            traceback.print_exc()
        print(f"meddl {args.command}: {error_line(error.to_dict())}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"meddl {args.command}: cancelled", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as error:  # noqa: BLE001 - the one place that turns surprises into one line
        if args.debug:
            traceback.print_exc()
        message = " ".join(f"{type(error).__name__}: {error}".split())
        print(f"meddl {args.command}: internal error: {message} (run with --debug for details)", file=sys.stderr)
        return EXIT_INTERNAL


def command() -> None:
    """The ``meddl`` program (and ``python -m meddl``): :func:`main` on the process's arguments, then exit.

    torch and MONAI leave some 600,000 objects behind them, and the interpreter's last garbage collections walk them
    all on the way out: 1.8-2.1 s after ``meddl segment`` had printed its line, on 2 cores, against 0.4-0.5 s with
    them frozen out of those collections (:func:`gc.freeze`). The process is ending and the OS takes its memory back;
    exit handlers still run.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    command()
