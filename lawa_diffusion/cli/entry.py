"""``lawa-diffusion`` command line: a thin argparse front over the library.

Each module of ``lawa_diffusion.cli`` is one command, named as the user types it, and defines ``register_cli(subparsers)``, which adds its subcommand(s) and sets
``func`` (called with the parsed args; returns an exit code or None).
User errors (ValueError, FileNotFoundError, FileExistsError) become one line on stderr and exit 2. So does every
error of the operating system (no space left, permission denied, a read-only file system, a path under a file):
one sentence naming the path, the option it came from and what to do (``utils.os_errors``), here for every
command. A command may set ``args.os_error_paths`` ({option: path} of paths its options do not show, e.g. a
config's output folder) and ``args.os_error_note`` (a callable returning what to add, e.g. the last good
checkpoint of a run) before its work.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

from lawa_diffusion import __version__
from lawa_diffusion.cli import average, fid, hindsight, inception, patch, plan, report, sweep, synthesize, train
from lawa_diffusion.utils.os_errors import describe, visible_path

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


def _given_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> List[Tuple[str, str]]:
    """(option as typed, path) of every path-like value the command was given, and those it added itself."""
    found = list((getattr(args, "os_error_paths", None) or {}).items())
    command = next((a.choices.get(args.command) for a in parser._actions
                    if isinstance(a, argparse._SubParsersAction)), None)
    for action in command._actions if command is not None else []:
        values = getattr(args, action.dest, None)
        values = [values] if isinstance(values, str) else values if isinstance(values, list) else []
        name = "/".join(action.option_strings) or (action.metavar or action.dest)
        found += [(name, v) for v in values if isinstance(v, str) and v]
    return found


def option_of(path: Optional[str], given: Sequence[Tuple[str, str]]) -> Optional[str]:
    """The option whose path is ``path`` or the nearest folder above it (None: none of them)."""
    if not path:
        return None
    real = os.path.realpath(os.path.abspath(visible_path(path)))
    best, length = None, -1
    for option, value in given:
        root = os.path.realpath(os.path.abspath(value))
        if (real == root or real.startswith(root.rstrip(os.sep) + os.sep)) and len(root) > length:
            best, length = option, len(root)
    return best


def os_error_line(error: OSError, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """One sentence for an error of the operating system met by a command."""
    if error.errno is None:  # raised by this package with its own sentence
        return str(error)
    line = describe(error, option_of(error.filename, _given_paths(parser, args)))
    note = getattr(args, "os_error_note", None)
    extra = note() if callable(note) else None
    return f"{line}; {extra}" if extra else line


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
        message = os_error_line(e, parser, args) if isinstance(e, OSError) else str(e)
        print(f"lawa-diffusion {args.command}: error: {message}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"lawa-diffusion {args.command}: error: {os_error_line(e, parser, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lawa-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
