"""Many weighted sums of the same stored snapshots in one pass over them: ``Y = X S``, a block at a time.

``S`` stacks the snapshots (one row each: its tensors flattened in one shared order), ``X`` holds one row of
coefficients per target. :func:`weighted_sums` reads each snapshot once, block after block (every snapshot's copy
of the same element range; :mod:`snapshot_reader` does the reading), on a background thread while the previous
block is computed; each block is cut into tiles small enough to stay in the CPU's cache and yields ``Y``'s
columns of each tile. :class:`StateBuffers` gathers them into state dicts, one per target.

Precision: a float32 tile computes ``Y = b + X (S − b)`` with ``b`` one of the snapshots (the one the targets
weigh most; the coefficients of a synthesis sum to 1, and any other sum is corrected). Snapshots of one run lie
close together, so the float32 sums run over their small differences, not over the weights: the result is the
float64 sum to about float32 rounding of the result itself, whatever the size of the coefficients (a plain
float32 sum loses ``Σ|x|`` times more). ``accumulate=torch.float64`` computes the same in float64.
"""
from __future__ import annotations

import concurrent.futures
import math
import sys
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lawa_diffusion.config.base import check

READ_ELEMENTS = 1 << 17  # elements of each snapshot per read: 256 KiB of a float16 file
READ_BUDGET = 1 << 25  # bytes of one block over all snapshots (two are in use): fewer elements when many are read
TILE_BYTES = 1 << 20  # bytes of one compute tile over all snapshots: stays in a CPU core's cache
MIN_ELEMENTS = 1 << 10


def flat_order(readers: Sequence) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of the tensors every reader holds, in the first reader's storage order (one sentence naming a
    snapshot whose tensors differ)."""
    check(len(readers) >= 1, "a synthesis needs at least one stored snapshot; store snapshots during training")
    first = readers[0].tensors()
    for reader in readers[1:]:
        other = reader.tensors()
        odd = sorted(set(first).symmetric_difference(other)) or sorted(n for n in first if first[n][1] != other[n][1])
        if odd:
            raise ValueError(f"snapshot {reader.path!r} holds other tensors than {readers[0].path!r} (e.g. "
                             f"{odd[0]!r}); synthesise from snapshots of one model only")
    return [(name, shape) for name, (_, shape) in first.items()]


def _spans(order: Sequence[Tuple[str, Tuple[int, ...]]], per_block: int) -> List[List[Tuple[str, int, int]]]:
    """The tensor pieces (name, lo, hi) of each block of ``per_block`` flat elements, in one sweep."""
    blocks: List[List[Tuple[str, int, int]]] = [[]]
    room = per_block
    for name, shape in order:
        size, lo = math.prod(shape), 0
        while lo < size:
            if room == 0:
                blocks.append([])
                room = per_block
            hi = min(size, lo + room)
            blocks[-1].append((name, lo, hi))
            room -= hi - lo
            lo = hi
    return blocks if blocks[0] else []


def block_elements(snapshots: int, itemsize: int) -> int:
    """Elements of each snapshot read at a time when ``snapshots`` are read together (widest dtype ``itemsize``)."""
    return max(MIN_ELEMENTS, min(READ_ELEMENTS, READ_BUDGET // (snapshots * itemsize)))


def weighted_sums(readers: Sequence, coefficients, *, device: str | torch.device = "cpu",
                  accumulate: torch.dtype = torch.float32, progress: bool = False,
                  desc: str = "synthesize") -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(start, Y[:, start:start + w])`` for consecutive ranges of the flat order, ``Y = coefficients ·
    stacked snapshots`` (``coefficients``: targets × readers), computed in ``accumulate`` on ``device``. A yielded
    tile is overwritten by the next one. Every reader's tensor bytes are read exactly once; after the last tile each
    reader's ``finish()`` (where it has one) checks what it read, e.g. against its checksum, and may raise."""
    from tqdm.auto import tqdm

    x = np.asarray(coefficients, dtype=np.float64)
    check(x.ndim == 2 and x.shape[1] == len(readers),
          f"coefficients must be targets × {len(readers)} snapshots, got shape {tuple(x.shape)}")
    check(accumulate in (torch.float32, torch.float64), f"accumulate must be float32 or float64, got {accumulate}")
    device = torch.device(device)
    order = flat_order(readers)
    total = sum(math.prod(shape) for _, shape in order)
    n = len(readers)
    widest = max(dtype.itemsize for reader in readers for dtype, _ in reader.tensors().values())
    per_read = block_elements(n, widest)
    cuda = device.type == "cuda"
    tile = per_read if cuda else max(MIN_ELEMENTS, min(per_read, TILE_BYTES // (n * accumulate.itemsize)))
    blocks = [(s, min(s + per_read, total)) for s in range(0, total, per_read)]
    spans = _spans(order, per_read)
    row_bytes = per_read * widest + 8 * max((len(s) for s in spans), default=0)
    raw = [torch.empty((n, row_bytes), dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
    raw_dev = torch.empty((n, row_bytes), dtype=torch.uint8, device=device) if cuda else None

    ref = int(np.argmax(np.abs(x).sum(axis=0)))  # the snapshot the targets weigh most: the others' differences to it
    x_t = torch.tensor(x, dtype=accumulate, device=device)
    extra = x.sum(axis=1) - 1.0  # coefficients that do not sum to 1 add (Σx − 1) · base
    fix = torch.tensor(extra, dtype=accumulate, device=device) if np.abs(extra).max() > 1e-12 else None
    stacked = torch.empty((n, tile), dtype=accumulate, device=device)
    base = torch.empty(tile, dtype=accumulate, device=device)
    out = torch.empty((x.shape[0], tile), dtype=accumulate, device=device)

    def read(index: int) -> List[list]:
        buffer = raw[index % 2]
        return [reader.read(spans[index], buffer[i]) for i, reader in enumerate(readers)]

    bar = tqdm(total=total * n, desc=desc, unit="el", unit_scale=True, disable=not progress, leave=False,
               file=sys.stderr, dynamic_ncols=True)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="lawa-snapshot-reader")
    try:
        pending = pool.submit(read, 0) if blocks else None
        for index, (start, stop) in enumerate(blocks):
            pieces = pending.result()
            source = raw[index % 2]
            if cuda:
                source = raw_dev.copy_(source, non_blocking=True)
            pending = pool.submit(read, index + 1) if index + 1 < len(blocks) else None
            uniform = _uniform(pieces, stop - start)
            for a in range(0, stop - start, tile):
                b = min(a + tile, stop - start)
                s = stacked[:, :b - a]
                if uniform is not None:
                    s.copy_(source[:, :(stop - start) * uniform.itemsize].view(uniform)[:, a:b])
                else:
                    _decode(source, pieces, a, b, s)
                base_w = base[:b - a].copy_(s[ref])
                s.sub_(base_w)
                y = torch.addmm(base_w.expand(x.shape[0], b - a), x_t, s, out=out[:, :b - a])
                if fix is not None:
                    y.addr_(fix, base_w)
                yield start + a, y
            if cuda:  # the host buffer is read into again two blocks on: its copy must be done
                torch.cuda.current_stream(device).synchronize()
            bar.update((stop - start) * n)
        for reader in readers:  # what was read is what was written (readers that sum their checksum say so now)
            finish = getattr(reader, "finish", None)
            if finish is not None:
                finish()
    finally:
        if pending is not None:
            pending.cancel()
        pool.shutdown(wait=True)
        bar.close()


def _uniform(pieces: Sequence[Sequence], count: int) -> Optional[torch.dtype]:
    """The dtype when every snapshot's block is one run of that dtype from byte 0; else None."""
    kinds = {p[0].dtype for p in pieces if len(p) == 1 and p[0].byte_offset == 0 and p[0].numel == count}
    return kinds.pop() if len(kinds) == 1 and all(len(p) == 1 for p in pieces) else None


def _decode(source: torch.Tensor, pieces: Sequence[Sequence], a: int, b: int, stacked: torch.Tensor) -> None:
    """Fill ``stacked`` (snapshots × (b − a)) with the block's elements ``a .. b`` of every snapshot."""
    for i, row in enumerate(pieces):
        for p in row:
            lo, hi = max(p.start, a), min(p.start + p.numel, b)
            if lo < hi:
                size = p.dtype.itemsize
                data = source[i, p.byte_offset + (lo - p.start) * size: p.byte_offset + (hi - p.start) * size]
                stacked[i, lo - a:hi - a].copy_(data.view(p.dtype))


class StateBuffers:
    """The yielded tiles of :func:`weighted_sums` gathered into one state dict per target, in ``dtype`` on the CPU.

    Each tensor holds every target's copy (targets × elements, one allocation per tensor); target ``t``'s state dict
    holds row ``t`` of each, viewed to the tensor's shape (its tensors share no memory with each other)."""

    def __init__(self, order: Sequence[Tuple[str, Tuple[int, ...]]], targets: int, dtype: torch.dtype = torch.float32):
        self.order = list(order)
        self.buffers = [torch.empty((targets, math.prod(shape)), dtype=dtype) for _, shape in self.order]
        self.starts = np.cumsum([0] + [b.shape[1] for b in self.buffers])
        self._next = 0  # the first tensor a tile may touch: tiles come in order

    def take(self, start: int, tile: torch.Tensor) -> None:
        stop = start + tile.shape[1]
        k = self._next
        while k < len(self.buffers) and self.starts[k] < stop:
            lo, hi = max(start, int(self.starts[k])), min(stop, int(self.starts[k + 1]))
            if lo < hi:
                self.buffers[k][:, lo - self.starts[k]:hi - self.starts[k]].copy_(tile[:, lo - start:hi - start])
            if self.starts[k + 1] <= stop:
                k += 1
            else:
                break
        self._next = k

    def states(self) -> List[Dict[str, torch.Tensor]]:
        count = self.buffers[0].shape[0] if self.buffers else 0
        return [{name: buffer[t].view(shape) for (name, shape), buffer in zip(self.order, self.buffers)}
                for t in range(count)]
