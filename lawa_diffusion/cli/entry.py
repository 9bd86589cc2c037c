"""``lawa-diffusion`` command line: a thin argparse front over the library.

Each module of ``lawa_diffusion.cli`` is one command, named as the user types it, and defines ``register_cli(subparsers)``, which adds its subcommand(s) and sets
``func`` (called with the parsed args; returns an exit code or None).
User errors (ValueError, FileNotFoundError, FileExistsError) become one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from typing import Iterator, Optional, Sequence

from lawa_diffusion import __version__
from lawa_diffusion.cli import average, fid, hindsight, inception, patch, plan, report, sweep, synthesize, train

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (inception, fid, train, plan, report, average, sweep, synthesize, hindsight, patch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lawa-diffusion",
        description="Latest Weight Averaging over the EMA weights of diffusers training, measured with FID.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register_cli(sub)
    return parser


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """Show warnings as one 'warning: ...' line on stderr (no file and line of the library)."""
    previous = warnings.showwarning
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        warnings.showwarning = previous


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        with plain_warnings():
            code = args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        print(f"lawa-diffusion {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lawa-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
