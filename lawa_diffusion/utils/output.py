"""Processes and output: which process this is, and the one channel through which the package talks.

Every process may compute; only the main process prints progress and notes. Warnings go through
Python's ``warnings`` (the CLI shows them as one ``warning: ...`` line); progress and notes go
through :func:`say`, to stderr, prefixed with the part of the package that speaks.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Optional

import torch


def process_rank() -> int:
    """This process's rank: torch.distributed's when initialised, else $RANK (0 outside launchers)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def process_count() -> int:
    """How many processes run: torch.distributed's world size when initialised, else $WORLD_SIZE (1 outside launchers)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process(accelerator: Optional[Any] = None) -> bool:
    """True on the process that writes files and prints (the accelerator's main process when given)."""
    if accelerator is not None:
        return bool(accelerator.is_main_process)
    return process_rank() == 0


def say(message: str, who: Optional[str] = "lawa-diffusion", *, all_processes: bool = False) -> None:
    """Print one progress line or note to stderr as ``who: message`` (``message`` alone when ``who`` is None),
    on the main process only by default, above any progress bar on the screen."""
    if all_processes or is_main_process():
        from tqdm import tqdm

        tqdm.write(message if who is None else f"{who}: {message}", file=sys.stderr)
        sys.stderr.flush()


def warn(message: str, stacklevel: int = 2) -> None:
    """A user-facing warning, one sentence (shown by the CLI as ``warning: ...``)."""
    warnings.warn(message, stacklevel=stacklevel + 1)
