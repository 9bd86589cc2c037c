"""Errors of the operating system as one sentence: which path, which option gave it, and what to do.

``as_os_error`` recognises the input/output failures that libraries wrap in errors of their own (safetensors'
``SafetensorError`` "... (os error 28)", torch's failed stream write); ``describe`` writes the sentence. The CLI
uses it for every command (``cli.entry``) and the launch plugin for the errors raised in this package.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from typing import Optional

_OS_CODE = re.compile(r"os error (\d+)")
_TEMP_NAME = re.compile(r"^\.(?P<name>.+?)(\.[A-Za-z0-9_]{8}|\.\d+|\.old\.[^/]+)?\.tmp$")
TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "file write failed", "inline_container.cc")
FULL_BELOW_BYTES = 1 << 20  # a torch write that failed on a device with less free space than this: a full disk
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def as_os_error(error: BaseException, path: Optional[str] = None) -> Optional[OSError]:
    """``error`` as an ``OSError`` with a file name (``path`` when it has none), or None when it is no I/O failure."""
    if isinstance(error, OSError):
        name = error.filename if isinstance(error.filename, str) else None
        shown = visible_path(name) if name else path  # the real target, never a hidden temp name
        if error.errno is not None and shown and shown != name:
            named = type(error)(error.errno, error.strerror or os.strerror(error.errno), shown)
            named.bytes_needed = getattr(error, "bytes_needed", None)
            return named
        return error
    text = str(error)
    code = _OS_CODE.search(text)
    if code is not None and type(error).__name__ == "SafetensorError":
        number = int(code.group(1))
        return OSError(number, os.strerror(number), path)
    if isinstance(error, RuntimeError) and any(m in text for m in TORCH_WRITE_FAILED) and path:
        number = errno.ENOSPC if free_bytes(path) < FULL_BELOW_BYTES else errno.EIO
        return OSError(number, os.strerror(number), path)
    return None


def visible_path(path: str) -> str:
    """The path a hidden temp file or folder of an atomic write stands for: every part named like
    ``.name.x8y2k3lq.tmp`` becomes ``name`` (``RUN/.checkpoint-4.tmp/unet_ema`` -> ``RUN/checkpoint-4/unet_ema``)."""
    parts = os.fspath(path).split(os.sep)
    return os.sep.join(m.group("name") if (m := _TEMP_NAME.match(part)) else part for part in parts)


def free_bytes(path: str) -> int:
    """Free bytes on the device that holds ``path`` (or its nearest existing parent); -1 when unknown."""
    folder = os.path.abspath(path)
    while folder and not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return -1


def size_text(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} bytes"


def describe(error: OSError, option: Optional[str] = None, fix: Optional[str] = None) -> str:
    """One sentence: what went wrong at which path (from ``option`` when given) and what to do."""
    path = visible_path(error.filename) if error.filename else None
    where = f"{path!r}" if path else "a file"
    given = f" (from {option})" if option else ""
    code = error.errno
    if code in NO_SPACE:
        needed = getattr(error, "bytes_needed", None)
        free = free_bytes(path) if path else -1
        amounts = []
        if needed:
            amounts.append(f"it needs about {size_text(needed)}")
        if free >= 0:
            amounts.append(f"{size_text(free)} are free there")
        amount = f": {' and '.join(amounts)}" if amounts else ""
        what = "no space is left" if code == errno.ENOSPC else "the disk quota is used up"
        default = f"free space there or use another {option or 'path'}"
        return f"{what} on the disk to write {where}{given}{amount}; {fix or default}"
    if code in (errno.EACCES, errno.EPERM):
        default = f"change its permissions or use another {option or 'path'}"
        return f"permission denied for {where}{given}; {fix or default}"
    target = option or "it"
    if code == errno.EROFS:
        return f"{where}{given} lies on a read-only file system; {fix or f'choose a writable place for {target}'}"
    if code == errno.ENOTDIR:
        return (f"{where}{given} lies under a file, not a folder; "
                f"{fix or f'choose a path whose parents are folders for {target}'}")
    if code == errno.EISDIR:
        return f"{where}{given} is a folder where a file was expected; {fix or 'pass the path of a file'}"
    if code == errno.ENOENT:
        return f"{where}{given} does not exist or cannot be made there; {fix or 'check the path'}"
    if code == errno.EEXIST:
        return f"{where}{given} already exists (perhaps as a file); {fix or 'choose another path'}"
    reason = error.strerror or str(error)
    return f"{reason} for {where}{given}; {fix or 'check that path and try again'}"
