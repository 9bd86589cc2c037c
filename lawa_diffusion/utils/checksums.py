"""Checksums of the safetensors files the package writes and reads back (EMA snapshots, LAWA and post-hoc
state in checkpoints): written by ``files.atomic_save_safetensors``, checked by :func:`verified_metadata` and
:func:`load_safetensors`.

The checksum is the sha256 of the file's metadata (all but the checksum itself, as sorted JSON) and of every
tensor, in name order: its name, dtype and shape (JSON), then its bytes. It goes into the metadata under
:data:`CHECKSUM_KEY`. A file without one (written before checksums were stored, or by another program) is
still read: its header and size are checked, and a note says once that it was not verified.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import Dict, Optional, Tuple

import torch

CHECKSUM_KEY = "sha256"
MAX_HEADER_BYTES = 1 << 27
READ_CHUNK = 1 << 24
DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
               torch.bool: "BOOL"}
DEFAULT_FIX = "delete it and write it again, or restore it from a copy"
_verified: Dict[str, Tuple[int, int, int]] = {}  # path -> (inode, size, mtime_ns) of a file found intact
_noted = {"unchecked": False}


class DamagedFileError(ValueError):
    """A stored file is not what was written: one sentence naming it and what to do."""


def _start(metadata: dict) -> "hashlib._Hash":
    digest = hashlib.sha256()
    rest = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    digest.update(json.dumps(rest, sort_keys=True).encode("utf-8"))
    return digest


def _tensor_head(name: str, dtype: str, shape) -> bytes:
    return json.dumps([name, dtype, [int(d) for d in shape]]).encode("utf-8")


def tensors_checksum(tensors: Dict[str, torch.Tensor], metadata: dict) -> Optional[str]:
    """The checksum of a file about to hold ``tensors`` and ``metadata`` (None for a dtype it does not know)."""
    if any(t.dtype not in DTYPE_NAMES for t in tensors.values()):
        return None
    digest = _start(metadata)
    for name in sorted(tensors):
        t = tensors[name].detach()
        digest.update(_tensor_head(name, DTYPE_NAMES[t.dtype], t.shape))
        if t.numel():
            digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_header(path: str, fix: str = DEFAULT_FIX) -> Tuple[dict, dict, int]:
    """(tensor entries, metadata, byte offset of the data) of a safetensors file; one sentence when the header is
    damaged or the file is shorter than its header says."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(length) if 0 < length <= MAX_HEADER_BYTES else b""
    if len(raw) < length and raw.startswith(b"{"):  # a header cut short: the file ends inside it
        raise DamagedFileError(f"{path!r} is truncated: it holds {size} bytes but its header alone takes {length + 8}; "
                               f"{fix}")
    try:
        header = json.loads(raw.decode("utf-8")) if raw else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise DamagedFileError(f"{path!r} is not a readable safetensors file (its header is damaged or missing); {fix}")
    metadata = header.pop("__metadata__", None) or {}
    try:
        end = max((int(info["data_offsets"][1]) for info in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise DamagedFileError(f"{path!r} has a damaged safetensors header (a tensor entry without data offsets); "
                               f"{fix}") from None
    data = 8 + length
    if size < data + end:
        raise DamagedFileError(f"{path!r} is truncated: it holds {size} bytes but its header describes {data + end}; "
                               f"{fix}")
    return header, metadata, data


def _file_checksum(path: str, header: dict, metadata: dict, data: int) -> str:
    digest = _start(metadata)
    with open(path, "rb") as f:
        for name in sorted(header):
            info = header[name]
            begin, end = (int(v) for v in info["data_offsets"])
            digest.update(_tensor_head(name, str(info.get("dtype")), info.get("shape") or []))
            f.seek(data + begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(left, READ_CHUNK))
                if not chunk:
                    break
                digest.update(chunk)
                left -= len(chunk)
    return digest.hexdigest()


def _file_key(path: str) -> Tuple[int, int, int]:
    """What says a file is unchanged since it was found intact: (inode, size, mtime_ns)."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _changed(path: str, fix: str) -> DamagedFileError:
    return DamagedFileError(f"{path!r} does not match the checksum written with it: its bytes changed after it was "
                            f"written; {fix}")


def verified_metadata(path: str | os.PathLike, fix: str = DEFAULT_FIX, note_unchecked: bool = True) -> dict:
    """The metadata of a safetensors file, once its header, size and checksum are found intact (each file is
    checked once per process while it is unchanged); ``DamagedFileError`` (a ``ValueError``) naming the file and
    ending with ``fix`` otherwise. A file without a checksum is read unverified (``note_unchecked``: say so once)."""
    path = os.fspath(path)
    header, metadata, data = read_header(path, fix)
    key = _file_key(path)
    if _verified.get(path) == key:
        return metadata
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None:
        if note_unchecked and not _noted["unchecked"]:
            from lawa_diffusion.utils.output import say

            _noted["unchecked"] = True
            say(f"{path} carries no checksum (written before checksums were stored); it and any other such file "
                "are read without verification", "note")
    elif _file_checksum(path, header, metadata, data) != expected:
        raise _changed(path, fix)
    _verified[path] = key
    return metadata


def outside_checksum(path: str | os.PathLike, fix: str = DEFAULT_FIX) -> str:
    """The checksum of a safetensors file's tensors alone (its metadata left out): what the record of a sharded
    snapshot keeps for each of its shard files, whose metadata another library writes."""
    header, _, data = read_header(os.fspath(path), fix)
    return _file_checksum(os.fspath(path), header, {}, data)


def verify_outside_checksum(path: str | os.PathLike, expected: str, fix: str = DEFAULT_FIX) -> None:
    """Check a safetensors file whose checksum is kept outside it (a shard file of a sharded snapshot, whose record
    holds :func:`tensors_checksum` of its tensors with no metadata): ``DamagedFileError`` when its header, size or
    tensor bytes are not what was written (checked once per process while the file is unchanged)."""
    path = os.fspath(path)
    header, _, data = read_header(path, fix)
    key = _file_key(path)
    if _verified.get(path) == key:
        return
    if _file_checksum(path, header, {}, data) != expected:
        raise _changed(path, fix)
    _verified[path] = key


class StreamedChecksum:
    """The checksum of one file fed with its tensors' bytes as a single pass reads them, so that verifying costs no
    read of its own. ``feed(name, offset, data)``: ``data`` are the bytes of tensor ``name`` from byte ``offset``
    on. Fed in the checksum's order (tensor by tensor in name order, each from its first byte: how safetensors
    stores the tensors of one dtype), the sum is made on the way; fed otherwise, :meth:`finish` reads the file once
    more. ``outside``: a checksum kept outside the file (a shard file's: tensors only). A file already verified in
    this process while unchanged is not hashed again."""

    def __init__(self, path: str | os.PathLike, fix: str = DEFAULT_FIX, outside: Optional[str] = None):
        self.path, self.fix, self.outside = os.fspath(path), fix, outside
        header, metadata, _ = read_header(self.path, fix)
        self.key = _file_key(self.path)
        self.expected = outside if outside is not None else metadata.get(CHECKSUM_KEY)
        if _verified.get(self.path) == self.key:
            self.expected = None
        self.digest = _start({} if outside is not None else metadata)
        self.order = sorted(header)
        self.sizes = {n: int(header[n]["data_offsets"][1]) - int(header[n]["data_offsets"][0]) for n in header}
        self.heads = {n: _tensor_head(n, str(header[n].get("dtype")), header[n].get("shape") or []) for n in header}
        self.next, self.current, self.fed, self.in_order = 0, None, 0, True

    def _start_tensor(self, name: str) -> bool:
        """Begin ``name`` after the current tensor, passing over empty ones (never read, but summed)."""
        if self.current is not None and self.fed != self.sizes[self.current]:
            return False
        self._pass_empty(name)
        if self.next >= len(self.order) or self.order[self.next] != name:
            return False
        self.digest.update(self.heads[name])
        self.current, self.fed, self.next = name, 0, self.next + 1
        return True

    def _pass_empty(self, until: Optional[str] = None) -> None:
        while self.next < len(self.order) and self.order[self.next] != until and self.sizes[self.order[self.next]] == 0:
            self.digest.update(self.heads[self.order[self.next]])
            self.next += 1

    def feed(self, name: str, offset: int, data) -> None:
        if self.expected is None or not self.in_order:
            return
        if offset == 0 and name != self.current and not self._start_tensor(name):
            self.in_order = False
            return
        if name != self.current or offset != self.fed:
            self.in_order = False
            return
        self.digest.update(data)
        self.fed += len(data)

    def finish(self) -> None:
        """``DamagedFileError`` unless the file is what was written (reading it again when it was not fed whole in
        order)."""
        if self.expected is None:
            return
        complete = self.in_order and (self.current is None or self.fed == self.sizes[self.current])
        if complete:
            self._pass_empty()
            complete = self.next >= len(self.order)
        if not complete:
            if self.outside is not None:
                verify_outside_checksum(self.path, self.outside, self.fix)
            else:
                verified_metadata(self.path, self.fix)
            return
        if self.digest.hexdigest() != self.expected or _file_key(self.path) != self.key:
            raise _changed(self.path, self.fix)
        _verified[self.path] = self.key


def load_safetensors(path: str | os.PathLike, fix: str = DEFAULT_FIX, note_unchecked: bool = True) -> Dict[str, torch.Tensor]:
    """``safetensors.torch.load_file(path)`` after :func:`verified_metadata`; a file safetensors still cannot read
    is one sentence naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    verified_metadata(path, fix, note_unchecked)
    try:
        return load_file(path)
    except SafetensorError as e:
        raise DamagedFileError(f"{path!r} cannot be read as safetensors ({e}); {fix}") from None
