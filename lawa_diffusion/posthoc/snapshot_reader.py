"""Stored snapshots read a block at a time: what the one-pass synthesis (:mod:`one_pass`) asks of a snapshot store.

The synthesis sees each stored snapshot as one flat vector: its float tensors in one shared order, each flattened.
It asks every snapshot for the same element range at a time (a block: pieces of one or more tensors, ``spans``),
and a reader puts those elements' stored bytes into a buffer and says where each dtype's run of them lies
(:class:`Piece`). A reader has three members: ``tensors()`` (name -> dtype and shape, in storage order),
``read(spans, buffer)`` and ``close()``.

:class:`SafetensorsSnapshot` reads one ``step-<step>.safetensors`` file with positioned reads (``os.preadv`` into the
buffer, no other copy; neighbouring spans stored one after the other in one dtype are read in one call).
:class:`ShardedSnapshot` reads the folder of a snapshot stored in shards by several processes (FSDP2, ZeRO-3) on
one process: each span's elements come from the shard files holding them. :func:`open_snapshot` chooses the reader
of a stored snapshot; :func:`snapshot_metadata` and :func:`load_tensors` serve both kinds.
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
    """A snapshot stored as one safetensors file. ``bytes_read``: the tensor bytes read so far. ``verify``: its
    checksum is summed from the bytes the pass reads (:meth:`finish` says whether they are what was written)."""

    def __init__(self, path: str, verify: bool = False, fix: str = SNAPSHOT_FIX):
        self.path = os.fspath(path)
        self.layout = tensor_layout(self.path)
        self.bytes_read = 0
        self._fd: Optional[int] = None
        self._checksum = StreamedChecksum(self.path, fix) if verify else None

    def tensors(self) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
        return {name: (e.dtype, e.shape) for name, e in self.layout.items()}

    def read(self, spans: Sequence[Span], buffer: torch.Tensor) -> List[Piece]:
        """Read the elements of ``spans`` (consecutive in the block, from block element 0) into the uint8 tensor
        ``buffer``, one positioned read per run of spans stored one after the other in one dtype."""
        runs: List[list] = []  # [file offset, byte count, dtype, block start, numel, [(name, byte offset, bytes)]]
        start = 0
        for name, lo, hi in spans:
            entry = self.layout[name]
            size = entry.dtype.itemsize
            offset, count = entry.offset + lo * size, (hi - lo) * size
            last = runs[-1] if runs else None
            if last is not None and last[2] == entry.dtype and last[0] + last[1] == offset:
                last[1] += count
                last[4] += hi - lo
                last[5].append((name, lo * size, count))
            else:
                runs.append([offset, count, entry.dtype, start, hi - lo, [(name, lo * size, count)]])
            start += hi - lo
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        pieces, cursor = [], 0
        view = memoryview(buffer.numpy()) if buffer.numel() else memoryview(b"")
        for offset, count, dtype, first, numel, parts in runs:
            cursor = -(-cursor // 8) * 8  # every run starts 8-byte aligned in the buffer
            check(cursor + count <= len(view), f"snapshot {self.path!r}: a block needs {cursor + count} bytes, the "
                                               f"buffer holds {len(view)}")
            _read_exactly(self._fd, view[cursor:cursor + count], offset, self.path)
            _feed(self._checksum, parts, view, cursor)
            pieces.append(Piece(cursor, dtype, first, numel))
            cursor += count
        self.bytes_read += sum(run[1] for run in runs)
        return pieces

    def finish(self) -> None:
        """After the pass: ``DamagedFileError`` unless the file is what was written (when ``verify``)."""
        if self._checksum is not None:
            self._checksum.finish()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _feed(checksum: Optional[StreamedChecksum], parts: Sequence[tuple], view: memoryview, at: int) -> None:
    """Hand the bytes of each tensor piece read at ``at`` of ``view`` to the file's running checksum."""
    if checksum is None:
        return
    for name, offset, count in parts:
        checksum.feed(name, offset, view[at:at + count])
        at += count


def _read_exactly(fd: int, view: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        check(got > 0, f"snapshot {path!r} ends before its tensors do; the file is truncated")
        done += got


class ShardedSnapshot:
    """A snapshot stored in shards by several processes (``engine.sharded_snapshots``), read on one process with no
    process group: the folder's record (names, shapes) and DCP's shard files (each tensor's part, a flat range at the
    offset DCP's sharding metadata gives). Every file's checksum is checked first, or, with ``verify``, summed from
    the bytes the pass reads (:meth:`finish`). ``bytes_read``: as for files."""

    def __init__(self, path: str, verify: bool = False, fix: str = SNAPSHOT_FIX):
        self.path = os.fspath(path)
        self.record = read_sharded_record(self.path, fix, hash_files=not verify)
        self.shapes = {name: tuple(shape) for name, shape in self.record["tensors"]}
        self.chunks: Dict[str, List[Tuple[int, int, int, int, torch.dtype]]] = {n: [] for n in self.shapes}
        self.files = sorted(self.record["files"])
        self._checksums = [StreamedChecksum(os.path.join(self.path, f), fix, outside=self.record["files"][f])
                           for f in self.files] if verify else None
        for index, file in enumerate(self.files):
            full = os.path.join(self.path, file)
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
        self.bytes_read = 0
        self._fds: Dict[int, int] = {}

    def tensors(self) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
        """In name order, as the shard files store them (so that a pass reads each file from its start to its end)."""
        return {name: (self.chunks[name][0][4] if self.chunks[name] else torch.float32, self.shapes[name])
                for name in sorted(self.shapes)}

    def read(self, spans: Sequence[Span], buffer: torch.Tensor) -> List[Piece]:
        """As :meth:`SafetensorsSnapshot.read`, each span's elements gathered from the files holding them."""
        runs: List[list] = []  # [file index, file offset, byte count, dtype, block start, numel, [pieces]]
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
            cursor = -(-cursor // dtype.itemsize) * dtype.itemsize  # one dtype per snapshot: no gap in practice
            check(cursor + count <= len(view), f"snapshot {self.path!r}: a block needs {cursor + count} bytes, the "
                                               f"buffer holds {len(view)}")
            if index not in self._fds:
                self._fds[index] = os.open(os.path.join(self.path, self.files[index]), os.O_RDONLY)
            _read_exactly(self._fds[index], view[cursor:cursor + count], offset, self.path)
            _feed(self._checksums[index] if self._checksums else None, parts, view, cursor)
            last = pieces[-1] if pieces else None
            if (last is not None and last.dtype == dtype and last.byte_offset + last.numel * dtype.itemsize == cursor
                    and last.start + last.numel == first):  # read from two files, one run in the buffer
                pieces[-1] = Piece(last.byte_offset, dtype, last.start, last.numel + numel)
            else:
                pieces.append(Piece(cursor, dtype, first, numel))
            cursor += count
        self.bytes_read += sum(run[2] for run in runs)
        return pieces

    def finish(self) -> None:
        for checksum in self._checksums or ():
            checksum.finish()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


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
