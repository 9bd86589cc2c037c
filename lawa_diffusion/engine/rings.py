"""Snapshot rings: where LAWA keeps its k flat snapshots.

Every ring stores rows of P elements (the source tensors concatenated, in the storage dtype) and
answers the engine through one interface:

- ``write(slot, step, tensors)``: copy the source tensors into a slot (asynchronous on CUDA);
- ``finite_check(slot)``: a :class:`FiniteCheck` of what the slot holds, computed without a host sync;
  ``row_is_finite(slot)`` is the exact, synchronous answer that confirms a failed check;
- ``release(slot)``: forget a slot (disk: delete its file after it is written);
- ``mean_into(out, slots)``: the fp32 mean of the slots into the flat ``out`` on the compute device;
  host and disk rows are streamed in chunks, their uploads overlapped with the reduction;
- ``read(slot)``, ``export(order)``, ``restore(state, steps, slots)``: rows and state dicts;
- ``wait_source_read()``: make the current CUDA stream wait (on the GPU) for pending copies that
  still read the source tensors, before their next in-place update;
- ``follow(device)``, ``sync()``, ``close()``.

"device": one preallocated ``[k, P]`` tensor on the EMA's device; the mean is a single reduction.
"cpu": a ``[k, P]`` host tensor, pinned when the EMA is on CUDA, filled on a side stream through a
bounded device staging buffer (one device-to-host copy per ~64 MB).
"disk": one safetensors file per snapshot, written atomically by a background thread from one of
two staging rows (pinned on CUDA; the thread waits for the copy's event); the oldest file beyond
the window is deleted once its successor is safely on disk.

Pinned rows are whole pages of anonymous memory registered with CUDA under the source's GPU
(:func:`host_empty`): the bytes asked for, rounded up to a page, where torch's caching host allocator
(``pin_memory=True``) would round each block up to a power of two; a forked child (a DataLoader worker)
does not inherit them, and they are unregistered only after the copies that use them have run. Source tensors read on the side stream are marked with ``record_stream``, so the ring holds no
reference to them: a source that is replaced (``EMAModel.to``) is freed as soon as its copy has run.
"""
from __future__ import annotations

import contextlib
import glob
import math
import mmap
import os
import queue
import re
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.maths.averaging import all_finite, flat_views, foreach_copy, mean_of_rows, nonfinite_flag
from lawa_diffusion.utils.files import BackgroundWriter, atomic_save_safetensors, link_or_copy_atomic
from lawa_diffusion.utils.output import warn

# Host/disk rows are streamed to the compute device, and device rows staged to the host, in chunks of
# about this many bytes.
CHUNK_BYTES = 64 * 2**20


def _chunk_elems(dtype: torch.dtype, rows: int) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, CHUNK_BYTES // (itemsize * max(1, rows)))


def _on_cuda(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


# ------------------------------------------------------------------------------------- pinned host rows
# Registered memory is whole pages of the OS (64 KiB on some aarch64 kernels), never shared with another buffer.
PAGE_BYTES = mmap.PAGESIZE
_registered_bytes = 0  # bytes registered by host_empty and not yet released


def _cuda_host_register(ptr: int, nbytes: int, device: Optional[torch.device]) -> None:
    with torch.cuda.device(device):  # the source's GPU: a rank on cuda:k must not open a context on GPU 0
        code = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
    if code != 0:
        _clear_cuda_error()
        raise RuntimeError(f"lawa could not pin {nbytes} bytes of host memory (cudaHostRegister error {code}); "
                           "lower k, use dtype bfloat16 or storage 'disk'")


def _cuda_host_unregister(ptr: int, device: Optional[torch.device]) -> int:
    with torch.cuda.device(device):
        code = int(torch.cuda.cudart().cudaHostUnregister(ptr))
    if code != 0:
        _clear_cuda_error()
    return code


_CUDART: list = []  # the process's CUDA runtime library (ctypes), once found; None when it cannot be


def _clear_cuda_error() -> None:
    """Reset this thread's last CUDA runtime error after a failed call: torch's next kernel-launch check reads it and
    would raise it there. torch's bindings do not expose ``cudaGetLastError``, so it is called in the runtime
    library torch loaded (found in /proc/self/maps)."""
    if not _CUDART:
        lib = None
        try:
            with open("/proc/self/maps") as f:
                paths = {line.split()[-1] for line in f if "libcudart.so" in line}
            if paths:
                import ctypes

                lib = ctypes.CDLL(sorted(paths)[0])
        except OSError:
            lib = None
        _CUDART.append(lib)
    if _CUDART[0] is not None:
        _CUDART[0].cudaGetLastError()


# replaced in tests (no CUDA there): (register(ptr, nbytes, device), unregister(ptr, device) -> error code)
_HOST_REGISTER: List[Callable] = [_cuda_host_register, _cuda_host_unregister]


class _Pinned:
    """One registered allocation: its pages, the GPU whose context registered them, the process that did, and
    the events of the copies that last used them (from any stream)."""

    __slots__ = ("ptr", "nbytes", "device", "pid", "events")

    def __init__(self, ptr: int, nbytes: int, device: Optional[torch.device]):
        self.ptr, self.nbytes, self.device, self.pid = ptr, nbytes, device, os.getpid()
        self.events: list = []


_PINNED: Dict[int, _Pinned] = {}  # start address -> allocation


def note_use(tensor: torch.Tensor, event: Any) -> None:
    """An asynchronous copy into or out of ``tensor`` (memory of :func:`host_empty`) is queued before ``event``:
    the memory is unregistered and freed only once the event has passed."""
    ptr = tensor.data_ptr()
    for pinned in _PINNED.values():
        if pinned.ptr <= ptr < pinned.ptr + pinned.nbytes:
            pinned.events = [e for e in pinned.events if not e.query()] + [event]
            return


def _release(pinned: _Pinned) -> None:
    """Runs when the last tensor viewing the memory is freed, before the pages are unmapped."""
    global _registered_bytes
    _PINNED.pop(pinned.ptr, None)
    if pinned.pid != os.getpid():  # a forked child inherited neither the pages nor their registration
        return
    try:
        for event in pinned.events:
            event.synchronize()  # a copy still writing (or reading) these pages has run
        code = _HOST_REGISTER[1](pinned.ptr, pinned.device)
        if code:
            warn(f"lawa could not unpin {pinned.nbytes} bytes of host memory (cudaHostUnregister error {code}); "
                 "they stay locked until the process ends")
    finally:
        _registered_bytes -= pinned.nbytes


def registered_bytes() -> int:
    """Host bytes pinned by :func:`host_empty` and still in use."""
    return _registered_bytes


def _private_pages(nbytes: int) -> "mmap.mmap":
    """Anonymous whole pages that a forked child does not get: a pinned page would otherwise be copied into
    every child at fork time (Linux ≥ 5.9), and DataLoader workers fork every epoch."""
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if hasattr(mmap, "MADV_DONTFORK"):
        memory.madvise(mmap.MADV_DONTFORK)
    return memory


def host_empty(shape: Sequence[int], dtype: torch.dtype, pin: bool, device: Any = None) -> torch.Tensor:
    """An uninitialised host tensor; with ``pin``, page-locked for asynchronous copies with ``device`` (the
    source's GPU; default: the current one).

    The memory is whole pages of an anonymous mapping registered with CUDA, so pinning costs what is asked
    (rounded up to a page): ``torch.empty(..., pin_memory=True)`` goes through the caching host allocator,
    which rounds every block up to the next power of two (a 17.2 GB ring would pin 34.4 GB). A forked child
    does not inherit the pages. The registration is undone when the last tensor viewing the memory is freed,
    after the copies noted with :func:`note_use` have run.
    """
    shape = tuple(int(n) for n in shape)
    if not pin:
        return torch.empty(shape, dtype=dtype)
    global _registered_bytes
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    size = -(-nbytes // PAGE_BYTES) * PAGE_BYTES
    owner = np.frombuffer(_private_pages(size), dtype=np.uint8, count=nbytes)  # keeps the mapping alive
    pinned = _Pinned(owner.ctypes.data, size, torch.device(device) if device is not None else None)
    _HOST_REGISTER[0](pinned.ptr, size, pinned.device)
    _PINNED[pinned.ptr] = pinned
    _registered_bytes += size
    weakref.finalize(owner, _release, pinned)  # numpy calls it before it lets go of the mapping
    return torch.from_numpy(owner).view(dtype).view(shape)


class FiniteCheck:
    """The NaN/Inf status of one snapshot: a device flag copied to pinned host memory behind a CUDA
    event, so that computing it never blocks and reading it later waits for nothing else."""

    def __init__(self, flag: torch.Tensor):
        self.flag = flag
        self.event: Optional[torch.cuda.Event] = None
        if flag.device.type == "cuda":
            self.value = torch.empty((), dtype=flag.dtype, pin_memory=True)
            self.value.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(flag.device))
        else:
            self.value = flag

    def passed(self) -> bool:
        """True when the flag is finite (then every element is); waits for the flag's copy only."""
        if self.event is not None:
            self.event.synchronize()
        return math.isfinite(float(self.value))


class DeviceToHost:
    """Copies source tensors into a host row on a side stream, through a bounded device staging buffer.

    Tensors are grouped into ~CHUNK_BYTES pieces of the flat row: one fused device copy (with the cast
    to the storage dtype) and one device-to-host copy per piece, so the host issues a few calls
    whatever the number of tensors. The NaN/Inf flag is summed from the staged pieces.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, shapes: Sequence[torch.Size]):
        self.device, self.dtype = device, dtype
        self.stream = torch.cuda.Stream(device=device)
        self.groups = _groups(shapes, _chunk_elems(dtype, 1))
        capacity = max(stop - start for _, _, start, stop in self.groups)
        with torch.cuda.stream(self.stream):
            self.staging = torch.empty(capacity, dtype=dtype, device=device)
        metas = [torch.empty(s, device="meta") for s in shapes]
        self.views = [flat_views(self.staging[: stop - start], metas[i0:i1]) for i0, i1, start, stop in self.groups]
        self.event: Optional[torch.cuda.Event] = None
        self._marked: Dict[Tuple[int, int], "weakref.ref"] = {}  # (id, data_ptr) -> the sources marked last time

    def _mark_read(self, tensors: Sequence[torch.Tensor]) -> None:
        """Tell the caching allocator that ``self.stream`` reads ``tensors``: freeing one (its owner replaced
        it) then waits for this stream's work before the memory is reused. Once per tensor: the mark lasts
        until the tensor is freed."""
        marked, self._marked = self._marked, {}
        for t in tensors:
            ptr = t.data_ptr()  # (the same tensor object may have been given other memory)
            ref = marked.get((id(t), ptr))
            if ref is None or ref() is not t:
                t.record_stream(self.stream)
                ref = weakref.ref(t)
            self._marked[(id(t), ptr)] = ref

    def copy(self, row: torch.Tensor, tensors: Sequence[torch.Tensor]) -> FiniteCheck:
        if self.event is not None and not self.event.query():
            self.event.synchronize()  # the previous copy (ν steps ago) has surely run
        tensors = list(tensors)
        self._mark_read(tensors)  # no reference is kept: a replaced source is freed once the copy has read it
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            flag = torch.zeros((), dtype=torch.float32, device=self.device)
            for (i0, i1, start, stop), views in zip(self.groups, self.views):
                torch._foreach_copy_(views, tensors[i0:i1])
                piece = self.staging[: stop - start]
                flag.add_(nonfinite_flag([piece]))
                row[start:stop].copy_(piece, non_blocking=True)
            result = FiniteCheck(flag)
            self.event = torch.cuda.Event()
            self.event.record(self.stream)
        note_use(row, self.event)  # the row's pages outlive this copy even if the ring is dropped now
        return result

    def wait_source_read(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)

    def sync(self) -> None:
        if self.event is not None:
            self.event.synchronize()


def _groups(shapes: Sequence[torch.Size], chunk: int) -> List[Tuple[int, int, int, int]]:
    """Consecutive tensors grouped into pieces of about ``chunk`` elements: (first, end, start, stop)."""
    groups, first, start, offset = [], 0, 0, 0
    for i, shape in enumerate(shapes):
        offset += math.prod(shape)
        if offset - start >= chunk or i == len(shapes) - 1:
            groups.append((first, i + 1, start, offset))
            first, start = i + 1, offset
    return groups


def streamed_mean(out: torch.Tensor, readers: Sequence[Callable[[int, int], torch.Tensor]], numel: int,
                  dtype: torch.dtype, stream: Optional["torch.cuda.Stream"] = None, pinned: bool = False) -> torch.Tensor:
    """fp32 mean of host rows into ``out``, in column chunks; ``readers[i](start, stop)`` gives row i's piece.

    On CUDA, chunk j+1 is uploaded on ``stream`` while chunk j is reduced on the current stream (two
    device staging buffers); rows not in pinned memory go through two pinned host staging buffers.
    """
    n = len(readers)
    if numel == 0:  # a process whose whole shard is empty holds nothing to average
        return out
    chunk = min(_chunk_elems(dtype, n), numel)
    spans = [(a, min(a + chunk, numel)) for a in range(0, numel, chunk)]
    if out.device.type != "cuda":
        staging = torch.empty((n, chunk), dtype=dtype)
        for a, b in spans:
            for i, read in enumerate(readers):
                staging[i, : b - a].copy_(read(a, b))
            mean_of_rows(staging[:, : b - a], out[a:b])
        return out
    compute = torch.cuda.current_stream(out.device)
    stream = stream if stream is not None else torch.cuda.Stream(device=out.device)
    device_staging = [torch.empty((n, chunk), dtype=dtype, device=out.device) for _ in range(2)]
    host_staging = None if pinned else [torch.empty((n, chunk), dtype=dtype, pin_memory=True) for _ in range(2)]
    stream.wait_stream(compute)  # out and the staging buffers may reuse memory the compute stream just freed
    uploaded = [torch.cuda.Event(), torch.cuda.Event()]
    reduced = [torch.cuda.Event(), torch.cuda.Event()]
    for j, (a, b) in enumerate(spans):
        s, width = j % 2, b - a
        if host_staging is not None and j >= 2:
            uploaded[s].synchronize()  # this host staging buffer is free once its last upload ran
        with torch.cuda.stream(stream):
            if j >= 2:
                stream.wait_event(reduced[s])
            for i, read in enumerate(readers):
                piece = read(a, b)
                if host_staging is not None:
                    host_staging[s][i, :width].copy_(piece)
                    piece = host_staging[s][i, :width]
                device_staging[s][i, :width].copy_(piece, non_blocking=True)
            uploaded[s].record(stream)
        compute.wait_event(uploaded[s])
        mean_of_rows(device_staging[s][:, :width], out[a:b])
        reduced[s].record(compute)
    return out


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

    # in-memory rings: the row is ``buffer[slot]``
    def finite_check(self, slot: int) -> FiniteCheck:
        return FiniteCheck(nonfinite_flag([self.read(slot)]))

    def row_is_finite(self, slot: int) -> bool:
        return all_finite([self.read(slot)])

    def release(self, slot: int) -> None:
        """Forget a slot (disk: delete its file)."""

    def export(self, order: Sequence[Tuple[int, int]]) -> dict:
        """The rows of ``order`` [(step, slot)] for a state dict, on the CPU."""
        rows = [self.read(slot).detach().cpu() for _, slot in order]
        return {"snapshots": torch.stack(rows) if rows else torch.empty(0)}

    def restore(self, state: dict, steps: Sequence[int], slots: Sequence[int]) -> None:
        rows = state["snapshots"][-len(steps):] if steps else []
        for slot, row in zip(slots, rows):
            self.load(slot, row)

    def row_copy(self, slot: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A copy of the slot's row on ``device`` in ``dtype``, queued on the current stream (a later write into
        the slot is ordered after it)."""
        return self.read(slot).to(device, dtype, copy=True, non_blocking=True)

    def load(self, slot: int, row: torch.Tensor) -> None:
        self.sync()
        self.buffer[slot].copy_(row)

    def wait_source_read(self) -> None:
        """Order the next in-place update of the source after pending copies (GPU-side; no-op when synchronous)."""

    def follow(self, device: torch.device) -> None:
        """The source moved to ``device``."""

    def sync(self) -> None:
        """Wait for pending asynchronous writes."""

    def close(self) -> None:
        self.sync()


class DeviceRing(Ring):
    """Ring on the compute device (the EMA's device)."""

    def __init__(self, k, numel, dtype, shapes, device):
        super().__init__(k, numel, dtype, shapes)
        self.buffer = torch.empty((k, numel), dtype=dtype, device=device)

    def write(self, slot: int, step: int, tensors: Sequence[torch.Tensor]) -> None:
        foreach_copy(self.slot_views(slot), tensors)

    def read(self, slot: int) -> torch.Tensor:
        return self.buffer[slot]

    def follow(self, device: torch.device) -> None:
        if self.buffer.device != device:
            self.buffer = self.buffer.to(device)

    def mean_into(self, out: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        slots = list(slots)
        if slots == list(range(len(slots))):
            rows = self.buffer[: len(slots)]
        else:
            rows = self.buffer.index_select(0, torch.tensor(slots, device=self.buffer.device))
        if out.device != rows.device:  # the source moved (offloaded) since the last snapshot: mean here, then copy
            out.copy_(mean_of_rows(rows))
            return out
        return mean_of_rows(rows, out)


class HostRing(Ring):
    """Ring in host memory; pinned and filled on a side stream when the EMA is on CUDA."""

    def __init__(self, k, numel, dtype, shapes, source_device: torch.device):
        super().__init__(k, numel, dtype, shapes)
        self.cuda = _on_cuda(source_device)
        self.buffer = host_empty((k, numel), dtype, pin=self.cuda, device=source_device)
        self.copier = DeviceToHost(source_device, dtype, self.shapes) if self.cuda else None
        self._checks: Dict[int, FiniteCheck] = {}
        self._uploaded: Optional[torch.cuda.Event] = None  # the uploads of the last streamed mean

    def write(self, slot: int, step: int, tensors: Sequence[torch.Tensor]) -> None:
        if self.copier is not None and tensors[0].is_cuda:
            self._checks[slot] = self.copier.copy(self.buffer[slot], tensors)
            return
        self._checks.pop(slot, None)
        self.sync()
        foreach_copy(self.slot_views(slot), tensors)

    def finite_check(self, slot: int) -> FiniteCheck:
        return self._checks.pop(slot) if slot in self._checks else super().finite_check(slot)

    def row_copy(self, slot: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Non-blocking from the pinned row: the copier's next write into the slot waits for the current stream."""
        row = self.read(slot)
        out = row.to(device, dtype, copy=True, non_blocking=True)
        if self.cuda and out.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(out.device))
            note_use(row, event)
        return out

    def wait_source_read(self) -> None:
        if self.copier is not None:
            self.copier.wait_source_read()

    def sync(self) -> None:
        """Wait for the pending snapshot copy and for the uploads of the last streamed mean (the host rows
        may be written after this)."""
        if self.copier is not None:
            self.copier.sync()
        if self._uploaded is not None:
            self._uploaded.synchronize()
            self._uploaded = None

    def read(self, slot: int) -> torch.Tensor:
        self.sync()
        return self.buffer[slot]

    def mean_into(self, out: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        slots = list(slots)
        if out.device.type != "cuda":
            self.sync()
            contiguous = slots == list(range(len(slots)))
            return mean_of_rows(self.buffer[: len(slots)] if contiguous else self.buffer[slots], out)
        # uploads run on the copier's stream, after any pending snapshot copy: no host wait
        readers = [lambda a, b, s=slot: self.buffer[s, a:b] for slot in slots]
        stream = self.copier.stream if self.copier is not None else torch.cuda.Stream(device=out.device)
        streamed_mean(out, readers, self.numel, self.dtype, stream, pinned=self.cuda)
        self._uploaded = torch.cuda.Event()
        self._uploaded.record(stream)  # (the uploads are the last work queued there)
        if self.cuda:
            note_use(self.buffer, self._uploaded)
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
    """One safetensors file per snapshot, written by a background thread from a staging row."""

    STAGING_ROWS = 2  # at most two snapshots in flight; a third write waits for the oldest file

    def __init__(self, k, numel, dtype, shapes, folder: str, name: str, source_device: torch.device):
        super().__init__(k, numel, dtype, shapes)
        self.folder, self.name = folder, name
        self.slot_step: Dict[int, int] = {}
        cuda = _on_cuda(source_device)
        self.copier = DeviceToHost(source_device, dtype, self.shapes) if cuda else None
        # the writer thread's CUDA device: a new thread starts on device 0 and would open a context there
        self.thread_device = torch.device(source_device) if cuda else None
        self.free: "queue.Queue" = queue.Queue()
        self._row_views: Dict[int, List[torch.Tensor]] = {}  # staging row id -> views shaped like the source
        for _ in range(self.STAGING_ROWS):
            row = host_empty((numel,), dtype, pin=cuda, device=source_device)
            self._row_views[id(row)] = self.views(row)
            self.free.put(row)
        self._checks: Dict[int, FiniteCheck] = {}
        self.writer = BackgroundWriter(f"lawa-disk-writer-{name}", f"lawa disk snapshot writer in {folder!r}")
        if self.thread_device is not None:  # the thread's first job; a failure surfaces at the next write or sync()
            self.writer.submit(lambda: torch.cuda.set_device(self.thread_device))
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

    def _write_file(self, step: int, row: torch.Tensor, event: Optional[torch.cuda.Event]) -> None:
        try:
            if event is not None:
                event.synchronize()  # the device-to-host copy into the staging row has run
            self._save(step, row)
        finally:
            self.free.put(row)

    def write(self, slot: int, step: int, tensors: Sequence[torch.Tensor]) -> None:
        self.writer.check()
        row = self.free.get()  # waits only when two earlier snapshots are still being written
        if self.copier is not None and tensors[0].is_cuda:
            self._checks[slot] = self.copier.copy(row, tensors)
            event = self.copier.event
        else:
            foreach_copy(self._row_views[id(row)], tensors)
            self._checks[slot] = FiniteCheck(nonfinite_flag([row]))
            event = None
        old = self.slot_step.get(slot)
        self.slot_step[slot] = step
        self.writer.submit(lambda: self._write_file(step, row, event))
        if old is not None and old != step:  # evicted: delete after the new file is on disk
            self._delete_later(self.path(old))

    def finite_check(self, slot: int) -> FiniteCheck:
        return self._checks.pop(slot)

    def release(self, slot: int) -> None:
        self._checks.pop(slot, None)
        old = self.slot_step.pop(slot, None)
        if old is not None:
            self._delete_later(self.path(old))

    def _delete_later(self, path: str) -> None:
        self.writer.submit(lambda: os.path.exists(path) and os.unlink(path))

    def wait_source_read(self) -> None:
        if self.copier is not None:
            self.copier.wait_source_read()

    def sync(self) -> None:
        self.writer.sync()

    def close(self) -> None:
        self.writer.close()

    def read(self, slot: int) -> torch.Tensor:
        from safetensors.torch import load_file

        self.sync()
        return load_file(self.path(self.slot_step[slot]))["snapshot"]

    def export(self, order: Sequence[Tuple[int, int]]) -> dict:
        self.sync()
        return {"files": [self.path(step) for step, _ in order]}

    def restore(self, state: dict, steps: Sequence[int], slots: Sequence[int]) -> None:
        """Take the state's snapshot files into the folder (hard links) and drop files written after it."""
        self.sync()
        files = list(state["files"])[-len(steps):] if steps else []
        for slot, step, src in zip(slots, steps, files):
            check(os.path.isfile(src), f"lawa snapshot file {src!r} named by the saved state is missing; "
                                        "resume from a complete checkpoint")
            dst = self.path(step)
            if not (os.path.exists(dst) and os.path.samefile(src, dst)):
                link_or_copy_atomic(src, dst)
            self.slot_step[slot] = step
        keep = set(steps)
        for step, path in disk_files(self.folder, self.name).items():
            if step not in keep:  # written after the checkpoint we resume from
                os.unlink(path)

    def mean_into(self, out: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
        from safetensors import safe_open

        self.sync()
        with contextlib.ExitStack() as files:
            rows = [files.enter_context(safe_open(self.path(self.slot_step[slot]), framework="pt")).get_slice("snapshot")
                    for slot in slots]
            readers = [lambda a, b, row=row: row[a:b] for row in rows]
            stream = self.copier.stream if self.copier is not None else None
            return streamed_mean(out, readers, self.numel, self.dtype, stream)


def make_ring(storage: str, k: int, numel: int, dtype: torch.dtype, shapes, device: torch.device,
              folder: Optional[str] = None, name: str = "lawa") -> Ring:
    if storage == "device":
        return DeviceRing(k, numel, dtype, shapes, device)
    if storage == "cpu":
        return HostRing(k, numel, dtype, shapes, device)
    return DiskRing(k, numel, dtype, shapes, folder, name, device)
