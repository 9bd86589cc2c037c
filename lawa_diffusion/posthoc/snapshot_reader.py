"""Stored snapshots read a block at a time: what the one-pass synthesis (:mod:`one_pass`) asks of a snapshot store.

The synthesis sees each stored snapshot as one flat vector: its float tensors in one shared order, each flattened.
It asks every snapshot for the same element range at a time (a block: pieces of one or more tensors, ``spans``),
and a reader puts those elements' stored bytes into a buffer and says where each dtype's run of them lies
(:class:`Piece`). A reader has ``tensors()`` (name -> dtype and shape, in storage order), ``read(spans, buffer)``,
``finish()`` (after the pass: checks what was read) and ``close()``.

Both readers see a snapshot as chunks of its tensors in files and read them the same way (positioned reads with
``os.preadv`` into the buffer, no other copy; pieces stored one after the other are read in one call):
:class:`SafetensorsSnapshot` one ``step-<step>.safetensors`` file, one chunk per tensor; :class:`ShardedSnapshot`
the folder of a snapshot stored in shards by several processes (FSDP2, ZeRO-3), read on one process, each tensor's
chunks in the shard files holding them. :func:`open_snapshot` chooses the reader
of a stored snapshot; :func:`snapshot_metadata` and :func:`load_tensors` serve both kinds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.runs.folder import SHARDED_SNAPSHOT_RECORD
from lawa_diffusion.utils.checksums import (
    DamagedFileError,
    StreamedChecksum,
    read_header,
    verified_metadata,
    verify_outside_checksum,
)

SNAPSHOT_FIX = "delete it and synthesise from the other snapshots, or restore it from a copy"
DCP_SHARDING_KEY = "DCP_SHARDING_INFO"  # DCP's safetensors metadata: each tensor's offsets in the whole
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


def tensor_layout(path: str, fix: str = SNAPSHOT_FIX) -> Dict[str, TensorEntry]:
    """name -> :class:`TensorEntry` of a safetensors file's float tensors, in file order, from its header alone."""
    header, _, data = read_header(path, fix)
    layout = {}
    for name, info in header.items():
        kind = DTYPES.get(info.get("dtype"))
        check(kind is not None, f"snapshot {path!r} tensor {name!r} has dtype {info.get('dtype')!r}, not a float; "
                                "synthesise from EMA snapshot files only")
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        check(end - begin == math.prod(shape) * kind.itemsize,
              f"snapshot {path!r} tensor {name!r} has {end - begin} bytes for shape {shape}; the file is damaged")
        layout[name] = TensorEntry(kind, shape, data + begin, end - begin)
    return dict(sorted(layout.items(), key=lambda item: item[1].offset))


Chunk = Tuple[int, int, int, int, torch.dtype]  # first element, element count, file index, byte offset, dtype


class _FileChunks:
    """Reading shared by both kinds of stored snapshot: each tensor is one or more chunks (a range of its flattened
    elements stored at a byte offset of one of ``files``), read with positioned reads (``os.preadv`` into the
    buffer, no other copy; pieces stored one after the other in one file and dtype are read in one call), each
    file's bytes handed to its running checksum when the snapshot is read with ``verify``."""

    path: str
    files: List[str]
    chunks: Dict[str, List[Chunk]]
    _checksums: Optional[List[StreamedChecksum]]

    def _open_files(self) -> None:
        self.bytes_read = 0
        self._fds: Dict[int, int] = {}

    def read(self, spans: Sequence[Span], buffer: torch.Tensor) -> List[Piece]:
        """Read the elements of ``spans`` (consecutive in the block, from block element 0) into the uint8 tensor
        ``buffer``; returns where each dtype's run of them lies."""
        runs: List[list] = []  # [file index, file offset, byte count, dtype, block start, numel, [checksum parts]]
        start = 0
        for name, lo, hi in spans:
            for first, count, index, offset, dtype in self.chunks[name]:
                a, b = max(lo, first), min(hi, first + count)
                if a >= b:
                    continue
                size = dtype.itemsize
                at, block = offset + (a - first) * size, start + a - lo
                part = (name, (a - first) * size, (b - a) * size)  # for the file's checksum
                last = runs[-1] if runs else None
                if (last is not None and last[0] == index and last[3] == dtype and last[1] + last[2] == at
                        and last[4] + last[5] == block):
                    last[2] += (b - a) * size
                    last[5] += b - a
                    last[6].append(part)
                else:
                    runs.append([index, at, (b - a) * size, dtype, block, b - a, [part]])
            start += hi - lo
        pieces, cursor = [], 0
        view = memoryview(buffer.numpy()) if buffer.numel() else memoryview(b"")
        for index, offset, count, dtype, first, numel, parts in runs:
            cursor = -(-cursor // dtype.itemsize) * dtype.itemsize  # each run aligned for its dtype's view
            check(cursor + count <= len(view), f"snapshot {self.path!r}: a block needs {cursor + count} bytes, the "
                                               f"buffer holds {len(view)}")
            if index not in self._fds:
                self._fds[index] = os.open(self.files[index], os.O_RDONLY)
            _read_exactly(self._fds[index], view[cursor:cursor + count], offset, self.path)
            if self._checksums is not None:
                at = cursor
                for name, part_offset, part_count in parts:
                    self._checksums[index].feed(name, part_offset, view[at:at + part_count])
                    at += part_count
            last = pieces[-1] if pieces else None
            if (last is not None and last.dtype == dtype and last.byte_offset + last.numel * dtype.itemsize == cursor
                    and last.start + last.numel == first):  # read in two calls, one run in the buffer
                pieces[-1] = Piece(last.byte_offset, dtype, last.start, last.numel + numel)
            else:
                pieces.append(Piece(cursor, dtype, first, numel))
            cursor += count
        self.bytes_read += sum(run[2] for run in runs)
        return pieces

    def finish(self) -> None:
        """After the pass: ``DamagedFileError`` unless every file is what was written (when read with ``verify``)."""
        for checksum in self._checksums or ():
            checksum.finish()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


class SafetensorsSnapshot(_FileChunks):
    """A snapshot stored as one safetensors file. ``bytes_read``: the tensor bytes read so far. ``verify``: its
    checksum is summed from the bytes the pass reads (:meth:`finish` says whether they are what was written)."""

    def __init__(self, path: str, verify: bool = False, fix: str = SNAPSHOT_FIX):
        self.path = os.fspath(path)
        self.layout = tensor_layout(self.path, fix)
        self.files = [self.path]
        self.chunks = {name: [(0, e.numel, 0, e.offset, e.dtype)] for name, e in self.layout.items()}
        self._checksums = [StreamedChecksum(self.path, fix)] if verify else None
        self._open_files()

    def tensors(self) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
        return {name: (e.dtype, e.shape) for name, e in self.layout.items()}


def _read_exactly(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        check(got > 0, f"snapshot {path!r} ends before its tensors do; the file is truncated")
        done += got


class ShardedSnapshot(_FileChunks):
    """A snapshot stored in shards by several processes (``engine.sharded_snapshots``), read on one process with no
    process group: the folder's record (names, shapes) and DCP's shard files (each tensor's part, a flat range at the
    offset DCP's sharding metadata gives). Every file's checksum is checked first, or, with ``verify``, summed from
    the bytes the pass reads (:meth:`finish`). ``bytes_read``: as for files."""

    def __init__(self, path: str, verify: bool = False, fix: str = SNAPSHOT_FIX):
        self.path = os.fspath(path)
        self.record = read_sharded_record(self.path, fix, hash_files=not verify)
        self.shapes = {name: tuple(shape) for name, shape in self.record["tensors"]}
        self.chunks = {n: [] for n in self.shapes}
        names = sorted(self.record["files"])
        self.files = [os.path.join(self.path, f) for f in names]
        self._checksums = [StreamedChecksum(full, fix, outside=self.record["files"][f])
                           for f, full in zip(names, self.files)] if verify else None
        for index, (file, full) in enumerate(zip(names, self.files)):
            header, metadata, data = read_header(full, fix)
            offsets = json.loads(metadata.get(DCP_SHARDING_KEY, "{}"))
            for name, info in header.items():
                kind = DTYPES.get(info.get("dtype"))
                check(name in self.chunks and kind is not None and name in offsets,
                      f"sharded snapshot {self.path!r}: {file} holds {name!r} that its record does not list; {fix}")
                begin, end = (int(v) for v in info["data_offsets"])
                lo = int(offsets[name]["saved_offsets"][0])
                self.chunks[name].append((lo, (end - begin) // kind.itemsize, index, data + begin, kind))
        for name, shape in self.shapes.items():
            pieces = sorted(self.chunks[name])
            covered = 0
            for lo, count, *_ in pieces:
                check(lo == covered, f"sharded snapshot {self.path!r} is missing elements {covered}..{lo} of {name!r} "
                                     f"(a shard file is absent or damaged); {fix}")
                covered += count
            check(covered == math.prod(shape), f"sharded snapshot {self.path!r} holds {covered} of the "
                                               f"{math.prod(shape)} elements of {name!r}; {fix}")
            self.chunks[name] = pieces
        self._open_files()

    def tensors(self) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
        """In name order, as the shard files store them (so that a pass reads each file from its start to its end)."""
        return {name: (self.chunks[name][0][4] if self.chunks[name] else torch.float32, self.shapes[name])
                for name in sorted(self.shapes)}


def read_sharded_record(path: str, fix: str, hash_files: bool = True) -> dict:
    """A sharded snapshot's record, after every shard file it lists is found intact (header and size; and checksum
    unless not ``hash_files``)."""
    record_path = os.path.join(path, SHARDED_SNAPSHOT_RECORD)
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        raise DamagedFileError(f"sharded snapshot {path!r} has no readable {SHARDED_SNAPSHOT_RECORD}; {fix}") from None
    check(isinstance(record, dict) and isinstance(record.get("files"), dict)
          and isinstance(record.get("tensors"), list),
          f"sharded snapshot {path!r}: {SHARDED_SNAPSHOT_RECORD} lacks its files or tensors; {fix}")
    for file, checksum in sorted(record["files"].items()):
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            raise DamagedFileError(f"sharded snapshot {path!r} lacks its shard file {file!r}; {fix}")
        if hash_files:
            verify_outside_checksum(full, checksum, fix)
        else:
            read_header(full, fix)
    return record


def snapshot_metadata(path: str, fix: str, hashed: bool = True) -> Dict[str, str]:
    """What a stored snapshot says of itself (step, track, model_config, track_def), once found intact: a file's
    safetensors metadata, or a sharded snapshot's record. Not ``hashed``: header and size only, for a caller whose
    pass over the tensors checks the checksum (``open_snapshot(path, verify=True)``)."""
    if os.path.isdir(path):
        record = read_sharded_record(path, fix, hash_files=hashed)
        return {k: record[k] for k in ("step", "track", "model_config", "track_def") if k in record}
    return verified_metadata(path, fix) if hashed else read_header(path, fix)[1]


def open_snapshot(path: str, verify: bool = False, fix: str = SNAPSHOT_FIX):
    """The reader of a stored snapshot: a safetensors file, or the folder of a sharded one. ``verify``: the checksum
    is summed from what the pass reads and checked by the reader's ``finish()``."""
    kind = ShardedSnapshot if os.path.isdir(path) else SafetensorsSnapshot
    return kind(path, verify=verify, fix=fix)


def load_tensors(path: str) -> Dict[str, torch.Tensor]:
    """Every tensor of a stored snapshot, whole, on the CPU (a sharded one assembled from its shard files)."""
    reader = open_snapshot(path)
    try:
        out = {}
        for name, (dtype, shape) in reader.tensors().items():
            numel = math.prod(shape)
            buffer = torch.empty(numel * dtype.itemsize + 8, dtype=torch.uint8)
            tensor = torch.empty(numel, dtype=dtype)
            for piece in reader.read([(name, 0, numel)], buffer):
                data = buffer[piece.byte_offset:piece.byte_offset + piece.numel * piece.dtype.itemsize]
                tensor[piece.start:piece.start + piece.numel] = data.view(piece.dtype)
            out[name] = tensor.view(shape)
        return out
    finally:
        reader.close()
