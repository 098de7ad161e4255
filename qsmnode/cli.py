"""Command line: ``qsmnode serve | process | simulate | echo | send | jobs | retry | check-config``.

Each command's work lives in its module; this file only parses arguments and turns
:class:`qsmnode.errors.QsmNodeError` (and missing files) into one-line errors.
"""

from __future__ import annotations

import argparse
import os
import sys

from qsmnode import __version__
from qsmnode.errors import QsmNodeError


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """Wrong options give one line (and where to look), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qsmnode",
        description="A DICOM node that turns multi-echo GRE scans into QSM, SWI, minIP, R2* and a "
        "structured report, and sends them back to PACS.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"qsmnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    from qsmnode.commands import register_file_commands
    from qsmnode.node.commands import register as register_node_commands

    register_file_commands(sub, _Formatter)
    register_node_commands(sub, _Formatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except QsmNodeError as err:
        print(f"qsmnode {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"qsmnode {args.command}: error: file not found: {err.filename or err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # a bug, not a user error: one line, the traceback on request
        if os.environ.get("QSMNODE_DEBUG"):
            raise
        print(f"qsmnode {args.command}: internal error: {type(err).__name__}: {err} "
              "(set QSMNODE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
