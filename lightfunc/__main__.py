"""The `lightfunc` command (also `python -m lightfunc`).

lightfunc run --nproc-per-node 2 train.py --lr 1e-3
lightfunc run --help
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The `lightfunc` argument parser, with one sub-parser per command."""
    from .distributed._launch import add_run_parser

    parser = argparse.ArgumentParser(
        prog="lightfunc",
        description="lightfunc: functional-style training for PyTorch.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    add_run_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `lightfunc` command line; returns the process exit code.

    Argument errors exit with code 2 and a usage message (argparse's convention).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
