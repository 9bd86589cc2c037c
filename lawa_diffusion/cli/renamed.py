"""Old spellings of options that were renamed: they keep working for one release, hidden from --help, and
each use prints one warning line naming the new spelling (CHANGELOG.md lists every rename)."""
from __future__ import annotations

import argparse
import warnings


class _OldSpelling(argparse.Action):
    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        warnings.warn(f"{option_string} is now {self.new}; the old spelling goes in the next release", FutureWarning,
                      stacklevel=2)
        setattr(namespace, self.dest, values)


def add_old_spelling(parser: argparse.ArgumentParser, old: str, new: str, dest: str, type=None) -> None:
    """Accept ``old`` as a hidden, warning alias of the option ``new`` (which stores into ``dest``)."""
    parser.add_argument(old, dest=dest, type=type, action=_OldSpelling, new=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
