"""Snapshot rings: where LAWA keeps its k flat snapshots.

Every ring stores snapshot rows of P elements (the source tensors concatenated) and can

- ``write(slot, step, tensors)``: copy the source tensors into a slot,
- ``mean_into(out, slots)``: the fp32 mean of the given slots into the flat ``out`` (on the compute
  device), streaming host/disk rows in bounded chunks,
- ``read(slot)`` / ``load(slot, step, row)``: one row out / in (state dicts, O(P) running average).

"device": one preallocated ``[k, P]`` tensor on the EMA's device; the mean is a single reduction.
"cpu": a ``[k, P]`` host tensor, pinned when the EMA is on CUDA, filled by non-blocking copies on a
side stream (synchronised before any read).
"disk": one safetensors file per snapshot, written atomically by a background thread; the oldest
file beyond the window is deleted once its successor is safely on disk.
"""
from __future__ import annotations

import glob
import os
import queue
import re
import threading
from typing import Dict, List, Optional, Sequence

import torch

from lawa_diffusion.averaging import accumulation_dtype, flat_views, foreach_copy, mean_of_rows
from lawa_diffusion.files import atomic_save_safetensors

# Host/disk rows are streamed to the compute device in chunks of this many bytes per row.
CHUNK_BYTES = 64 * 2**20


def _chunk_elems(dtype: torch.dtype, rows: int) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, CHUNK_BYTES // (itemsize * max(1, rows)))


class Ring:
    def __init__(self, k: int, numel: int, dtype: torch.dtype, shapes: Sequence[torch.Size]):
        self.k, self.numel, self.dtype, self.shapes = k, numel, dtype, [torch.Size(s) for s in shapes]

    def views(self, flat: torch.Tensor) -> List[torch.Tensor]:
        return flat_views(flat, [torch.empty(s, device="meta") for s in self.shapes])

    def slot_views(self, slot: int) -> List[torch.Tensor]:
        """Views of ``buffer[slot]`` shaped like the source tensors (built once per buffer)."""
        buffer = self.buffer
        cache = getattr(self, "_views", None)
        if cache is None or cache[0] is not buffer:
            cache = (buffer, [self.views(buffer[s]) for s in range(self.k)])
            self._views = cache
        return cache[1][slot]

    def sync(self) -> None:
        """Wait for pending asynchronous writes."""

    def close(self) -> None:
        self.sync()

    def release(self, slot: int) -> None:
        """Forget a slot (disk: delete its file)."""


class DeviceRing(Ring):
    """Ring on the compute device (the EMA's device)."""

    def __init__(self, k, numel, dtype, shapes, device):
        super().__init__(k, numel, dtype, shapes)
        self.buffer = torch.empty((k, numel), dtype=dtype, device=device)

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def write(self, slot: int, step: int, tensors: Sequence[torch.Tensor]) -> None:
        foreach_copy(self.slot_views(slot), tensors)

    def read(self, slot: int) -> torch.Tensor:
        return self.buffer[slot]

    def load(self, slot: int, step: int, row: torch.Tensor) -> None:
        self.buffer[slot].copy_(row)

    def mean_into(self, out: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        slots = list(slots)
        if slots == list(range(len(slots))):
            rows = self.buffer[: len(slots)]
        else:
            rows = self.buffer.index_select(0, torch.tensor(slots, device=self.buffer.device))
        return mean_of_rows(rows, out)


class HostRing(Ring):
    """Ring in host memory; pinned with asynchronous side-stream copies when the EMA is on CUDA."""

    def __init__(self, k, numel, dtype, shapes, source_device: torch.device):
        super().__init__(k, numel, dtype, shapes)
        self.cuda = source_device.type == "cuda" and torch.cuda.is_available()
        self.buffer = torch.empty((k, numel), dtype=dtype, pin_memory=self.cuda)
        self.stream = torch.cuda.Stream(device=source_device) if self.cuda else None
        self.event: Optional[torch.cuda.Event] = None
        self.source_device = source_device

    def write(self, slot: int, step: int, tensors: Sequence[torch.Tensor]) -> None:
        self.sync()  # the slot may still be read by a pending copy of the previous cycle
        dst = self.slot_views(slot)
        if not self.cuda:
            foreach_copy(dst, [t.detach().cpu() if t.device.type != "cpu" else t for t in tensors])
            return
        current = torch.cuda.current_stream(self.source_device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            src = [t if t.dtype == self.dtype else t.to(self.dtype) for t in tensors]
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(self.stream)
        for t in src:  # keep the source memory alive until the copy has run
            t.record_stream(self.stream)

    def wait_on(self, stream: "torch.cuda.Stream") -> None:
        """Make ``stream`` (not the host) wait until the pending copy has read the source tensors."""
        if self.event is not None:
            stream.wait_event(self.event)

    def sync(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def read(self, slot: int) -> torch.Tensor:
        self.sync()
        return self.buffer[slot]

    def load(self, slot: int, step: int, row: torch.Tensor) -> None:
        self.sync()
        self.buffer[slot].copy_(row)

    def mean_into(self, out: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        self.sync()
        slots = list(slots)
        if out.device.type == "cpu":
            return mean_of_rows(self.buffer[slots] if slots != list(range(len(slots))) else self.buffer[: len(slots)], out)
        chunk = _chunk_elems(self.dtype, len(slots))
        staging = torch.empty((len(slots), min(chunk, self.numel)), dtype=self.dtype, device=out.device)
        for start in range(0, self.numel, chunk):
            stop = min(start + chunk, self.numel)
            for i, slot in enumerate(slots):
                staging[i, : stop - start].copy_(self.buffer[slot, start:stop], non_blocking=True)
            mean_of_rows(staging[:, : stop - start], out[start:stop])
        return out


_DISK_NAME = re.compile(r"^(?P<name>.+)-step(?P<step>\d{9,})\.safetensors$")


def disk_file(folder: str, name: str, step: int) -> str:
    return os.path.join(folder, f"{name}-step{step:09d}.safetensors")


def disk_files(folder: str, name: str) -> Dict[int, str]:
    """Complete snapshot files of engine ``name`` in ``folder``, by step (temp files are ignored)."""
    found = {}
    for path in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(name)}-step*.safetensors")):
        m = _DISK_NAME.match(os.path.basename(path))
        if m and m.group("name") == name:
            found[int(m.group("step"))] = path
    return found


class DiskRing(Ring):
    """One safetensors file per snapshot, written by a background thread."""

    def __init__(self, k, numel, dtype, shapes, folder: str, name: str):
        super().__init__(k, numel, dtype, shapes)
        self.folder, self.name = folder, name
        self.slot_step: Dict[int, int] = {}
        self.queue: "queue.Queue" = queue.Queue(maxsize=1)
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name=f"lawa-disk-writer-{name}", daemon=True)
        self.thread.start()
        self._remove_temp_files()

    def _remove_temp_files(self) -> None:
        for path in glob.glob(os.path.join(glob.escape(self.folder), f".{glob.escape(self.name)}-step*.tmp")):
            try:
                os.unlink(path)
            except OSError:
                pass

    def path(self, step: int) -> str:
        return disk_file(self.folder, self.name, step)

    def _save(self, step: int, row: torch.Tensor) -> None:
        meta = {"step": str(step), "numel": str(self.numel), "dtype": str(self.dtype).replace("torch.", "")}
        atomic_save_safetensors(self.path(step), {"snapshot": row}, metadata=meta)

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            try:
                if job is None:
                    return
                kind, payload = job
                if kind == "write":
                    self._save(*payload)
                elif kind == "delete" and os.path.exists(payload):
                    os.unlink(payload)
            except BaseException as e:  # surfaced on the next sync()
                self.error = e
            finally:
                self.queue.task_done()

    def _check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise OSError(f"lawa disk snapshot writer failed in {self.folder!r}: {err}") from err

    def write(self, slot: int, step: int, tensors: Sequence[torch.Tensor]) -> None:
        self._check()
        row = torch.empty(self.numel, dtype=self.dtype)
        foreach_copy(self.views(row), [t.detach().cpu() for t in tensors])
        old = self.slot_step.get(slot)
        self.slot_step[slot] = step
        self.queue.put(("write", (step, row)))
        if old is not None and old != step:  # evicted: delete after the new file is on disk
            self.queue.put(("delete", self.path(old)))

    def release(self, slot: int) -> None:
        old = self.slot_step.pop(slot, None)
        if old is not None:
            self.queue.put(("delete", self.path(old)))

    def sync(self) -> None:
        self.queue.join()
        self._check()

    def close(self) -> None:
        self.sync()
        if self.thread.is_alive():
            self.queue.put(None)
            self.thread.join()

    def read(self, slot: int) -> torch.Tensor:
        from safetensors.torch import load_file

        self.sync()
        return load_file(self.path(self.slot_step[slot]))["snapshot"]

    def load(self, slot: int, step: int, row: torch.Tensor) -> None:
        self.sync()
        self.slot_step[slot] = step
        if not os.path.exists(self.path(step)):
            self._save(step, row.to(self.dtype).cpu())

    def adopt(self, slot: int, step: int) -> None:
        """Take a snapshot file that is already in the folder into ``slot``."""
        self.slot_step[slot] = step

    def mean_into(self, out: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        from safetensors import safe_open

        self.sync()
        acc = out if out.dtype == accumulation_dtype(self.dtype) else torch.zeros_like(out, dtype=accumulation_dtype(self.dtype))
        acc.zero_()
        chunk = _chunk_elems(self.dtype, 1)
        for slot in slots:
            with safe_open(self.path(self.slot_step[slot]), framework="pt") as f:
                row = f.get_slice("snapshot")
                for start in range(0, self.numel, chunk):
                    stop = min(start + chunk, self.numel)
                    acc[start:stop].add_(row[start:stop].to(device=acc.device, dtype=acc.dtype, non_blocking=True))
        acc.div_(len(slots))
        if acc is not out:
            out.copy_(acc)
        return out


def make_ring(storage: str, k: int, numel: int, dtype: torch.dtype, shapes, device: torch.device,
              folder: Optional[str] = None, name: str = "lawa") -> Ring:
    if storage == "device":
        return DeviceRing(k, numel, dtype, shapes, device)
    if storage == "cpu":
        return HostRing(k, numel, dtype, shapes, device)
    return DiskRing(k, numel, dtype, shapes, folder, name)
