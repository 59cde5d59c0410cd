"""`tmem-testbed`: one command, subcommands contributed by modules.

A module joins by defining `add_subcommands(subcommands)`, which adds its parsers
with `set_defaults(handler=FUNCTION)`; FUNCTION takes the parsed arguments and
returns the exit code. List the module in SUBCOMMAND_MODULES.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMAND_MODULES = (
    "tmem_host.vm.doctor",
    "tmem_host.testbed.commands",  # run, compare, report, list
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tmem-testbed", description="Transcendent memory for QEMU guests: the testbed.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue  # that part of the project is not installed (yet)
        module.add_subcommands(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    code: int = arguments.handler(arguments)
    return code


if __name__ == "__main__":
    sys.exit(main())
