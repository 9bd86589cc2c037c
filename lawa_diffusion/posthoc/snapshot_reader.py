"""Stored snapshots read a block at a time: what the one-pass synthesis (:mod:`one_pass`) asks of a snapshot store.

The synthesis sees each stored snapshot as one flat vector: its float tensors in one shared order, each flattened.
It asks every snapshot for the same element range at a time (a block: pieces of one or more tensors, ``spans``),
and a reader puts those elements' stored bytes into a buffer and says where each dtype's run of them lies
(:class:`Piece`). A reader has three members: ``tensors()`` (name -> dtype and shape, in storage order),
``read(spans, buffer)`` and ``close()``.

:class:`SafetensorsSnapshot` reads one ``step-<step>.safetensors`` file with positioned reads (``os.preadv`` into the
buffer, no other copy; neighbouring spans stored one after the other in one dtype are read in one call).
:func:`open_snapshot` chooses the reader of a stored snapshot; a store of another shape (e.g. the shards of a
distributed checkpoint, each holding part of every tensor) plugs in there as another reader class.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lawa_diffusion.config.base import check

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
Span = Tuple[str, int, int]  # a tensor's name and a range [lo, hi) of its flattened elements


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where a tensor's data lies in a snapshot file: dtype, shape, byte offset in the file and byte count."""

    dtype: torch.dtype
    shape: Tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Piece:
    """``numel`` stored elements of ``dtype`` at byte ``byte_offset`` of a read buffer: the block's elements
    ``start .. start + numel``."""

    byte_offset: int
    dtype: torch.dtype
    start: int
    numel: int


def tensor_layout(path: str) -> Dict[str, TensorEntry]:
    """name -> :class:`TensorEntry` of a safetensors file's float tensors, in file order, from its header alone
    (8-byte little-endian header size, then the JSON header, then the data)."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            header = json.loads(f.read(size)) if 0 < size < 1 << 27 else None
        except ValueError:
            header = None
    check(isinstance(header, dict), f"snapshot {path!r} is not a safetensors file; remove it from the run")
    header.pop("__metadata__", None)
    layout = {}
    for name, info in header.items():
        kind = DTYPES.get(info.get("dtype"))
        check(kind is not None, f"snapshot {path!r} tensor {name!r} has dtype {info.get('dtype')!r}, not a float; "
                                "synthesise from EMA snapshot files only")
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        check(end - begin == math.prod(shape) * kind.itemsize,
              f"snapshot {path!r} tensor {name!r} has {end - begin} bytes for shape {shape}; the file is damaged")
        layout[name] = TensorEntry(kind, shape, 8 + size + begin, end - begin)
    return dict(sorted(layout.items(), key=lambda item: item[1].offset))


class SafetensorsSnapshot:
    """A snapshot stored as one safetensors file. ``bytes_read``: the tensor bytes read so far."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self.layout = tensor_layout(self.path)
        self.bytes_read = 0
        self._fd: Optional[int] = None

    def tensors(self) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
        return {name: (e.dtype, e.shape) for name, e in self.layout.items()}

    def read(self, spans: Sequence[Span], buffer: torch.Tensor) -> List[Piece]:
        """Read the elements of ``spans`` (consecutive in the block, from block element 0) into the uint8 tensor
        ``buffer``, one positioned read per run of spans stored one after the other in one dtype."""
        runs: List[list] = []  # [file offset, byte count, dtype, block start, numel]
        start = 0
        for name, lo, hi in spans:
            entry = self.layout[name]
            size = entry.dtype.itemsize
            offset, count = entry.offset + lo * size, (hi - lo) * size
            last = runs[-1] if runs else None
            if last is not None and last[2] == entry.dtype and last[0] + last[1] == offset:
                last[1] += count
                last[4] += hi - lo
            else:
                runs.append([offset, count, entry.dtype, start, hi - lo])
            start += hi - lo
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        pieces, cursor = [], 0
        view = memoryview(buffer.numpy()) if buffer.numel() else memoryview(b"")
        for offset, count, dtype, first, numel in runs:
            cursor = -(-cursor // 8) * 8  # every run starts 8-byte aligned in the buffer
            check(cursor + count <= len(view), f"snapshot {self.path!r}: a block needs {cursor + count} bytes, the "
                                               f"buffer holds {len(view)}")
            _read_exactly(self._fd, view[cursor:cursor + count], offset, self.path)
            pieces.append(Piece(cursor, dtype, first, numel))
            cursor += count
        self.bytes_read += sum(run[1] for run in runs)
        return pieces

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_exactly(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        check(got > 0, f"snapshot {path!r} ends before its tensors do; the file is truncated")
        done += got


def open_snapshot(path: str):
    """The reader of a stored snapshot (today: a safetensors file)."""
    return SafetensorsSnapshot(path)
