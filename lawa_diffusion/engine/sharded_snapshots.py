"""Post-hoc EMAs kept in shards, as the model's parameters are, and stored by every process through
``torch.distributed.checkpoint`` (DCP).

Every tensor is seen flattened. A process's part of a parameter is one range ``[lo, hi)`` of its flattened
elements (empty on a process that holds none of it):

- FSDP2 / DTensor sharded on dim 0 (``Replicate`` on other mesh dims): the rows of its local shard;
- DeepSpeed ZeRO-3: its partition (``ds_tensor``) without the padding past ``ds_numel``.

:class:`PartLayout` holds those ranges and gives, at each step, this process's part of every parameter as a flat
view (no copy, nothing gathered). :func:`save_parts` writes host copies of the parts as one DCP checkpoint: DCP's
safetensors storage (``HuggingFaceStorageWriter``, one ``shard-*.safetensors`` file per process that holds a part,
each tensor a 1-D tensor of the parameter's element count with its part's offset in DCP's sharding metadata); the
caller adds the snapshot's own record (:data:`runs.folder.SHARDED_SNAPSHOT_RECORD`). Such a folder is read back on
one process, without a process group (``posthoc.snapshot_reader.ShardedSnapshot``, or DCP's own reader).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.engine.sources import is_sharded
from lawa_diffusion.engine.zero3 import is_partitioned


@dataclasses.dataclass(frozen=True)
class Part:
    """This process's elements ``[lo, hi)`` of a parameter of ``shape`` (flattened)."""

    shape: tuple
    lo: int
    hi: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def size(self) -> int:
        return self.hi - self.lo


def _dtensor_part(tensor: Any, name: str) -> Part:
    chunks = tensor.__create_chunk_list__()  # DCP's own view of the local shard: its offsets and sizes
    shape = tuple(int(d) for d in tensor.shape)
    check(len(chunks) == 1, f"post-hoc EMA of {name!r}: a DTensor with {len(chunks)} local chunks cannot be kept in "
                            "parts; shard the model with FSDP2 (fully_shard), which gives one chunk per process")
    offsets, sizes = tuple(chunks[0].offsets), tuple(chunks[0].sizes)
    if not shape:
        return Part(shape, 0, 1)
    row = math.prod(shape[1:])
    check(all(o == 0 for o in offsets[1:]) and tuple(sizes[1:]) == shape[1:],
          f"post-hoc EMA of {name!r}: its DTensor shard (offsets {list(offsets)}, sizes {list(sizes)} of "
          f"{list(shape)}) is not a range of rows; keep the post-hoc EMAs of a model sharded on dim 0 (FSDP2)")
    return Part(shape, offsets[0] * row, (offsets[0] + sizes[0]) * row)


def _zero3_part(param: Any) -> Part:
    import torch.distributed as dist

    size = int(param.ds_tensor.ds_numel)  # one partition's elements (the last one padded)
    rank = dist.get_rank(group=getattr(param, "ds_process_group", None))
    numel = int(param.ds_numel)
    lo = min(rank * size, numel)
    return Part(tuple(int(d) for d in param.ds_shape), lo, min(lo + size, numel))


def kind_of(tensors: Sequence[Any]) -> Optional[str]:
    """"dtensor" (FSDP2), "zero3" (DeepSpeed partitions) or None (whole tensors)."""
    if any(is_sharded(t) for t in tensors):
        return "dtensor"
    if any(is_partitioned(t) for t in tensors):
        return "zero3"
    return None


class PartLayout:
    """Which elements of each parameter this process keeps; ``views`` gives them, flat, at any step."""

    def __init__(self, kind: str, names: Sequence[str], parts: Sequence[Part]):
        self.kind, self.names, self.parts = kind, list(names), list(parts)

    @classmethod
    def of(cls, parameters: Sequence[Any], names: Sequence[str]) -> "PartLayout":
        """The layout of sharded (DTensor) or partitioned (ZeRO-3) ``parameters``; a mix is refused."""
        kind = kind_of(parameters)
        check(kind is not None, "PartLayout needs sharded (FSDP2) or partitioned (ZeRO-3) parameters")
        if kind == "dtensor":
            plain = next((n for n, p in zip(names, parameters) if not is_sharded(p)), None)
            check(plain is None, f"post-hoc EMAs over a model with sharded and whole parameters ({plain!r} is whole) "
                                 "cannot be kept in parts; shard every parameter (fully_shard on the whole model)")
            parts = [_dtensor_part(p, n) for n, p in zip(names, parameters)]
        else:
            plain = next((n for n, p in zip(names, parameters) if not is_partitioned(p)), None)
            check(plain is None, f"post-hoc EMAs over a ZeRO-3 model with a parameter outside its partitions "
                                 f"({plain!r}) cannot be kept in parts")
            parts = [_zero3_part(p) for p in parameters]
        return cls(kind, names, parts)

    def views(self, parameters: Sequence[Any]) -> List[torch.Tensor]:
        """This process's part of each parameter, flat (views where the storage allows; read-only use)."""
        check(len(parameters) == len(self.parts),
              f"post-hoc EMAs keep parts of {len(self.parts)} parameters but were given {len(parameters)}")
        if self.kind == "dtensor":
            return [p.to_local().detach().reshape(-1) for p in parameters]
        return [p.ds_tensor.detach().reshape(-1)[:part.size] for p, part in zip(parameters, self.parts)]

    def cut(self, tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """This process's part of each tensor, copied: whole tensors are sliced, DTensors give their local shard."""
        out = []
        for t, part, name in zip(tensors, self.parts, self.names):
            if is_sharded(t):
                local = t.to_local().detach().reshape(-1)
            else:
                check(t.numel() == part.numel, f"post-hoc EMA of {name!r} holds {t.numel()} elements, the parameter "
                                               f"{part.numel}; make the EMAs from the model they follow")
                local = t.detach().reshape(-1)[part.lo:part.hi]
            check(local.numel() == part.size, f"post-hoc EMA of {name!r}: this process's part holds {local.numel()} "
                                              f"elements, its parameter's {part.size}")
            out.append(local.clone())
        return out


def save_parts(folder: str, parts: Dict[str, torch.Tensor], layout: PartLayout, group: Any = None) -> None:
    """Write the host tensors ``parts`` (name -> this process's flat part, on the CPU) as one DCP checkpoint in
    ``folder``: a collective over ``group`` (every process of it calls this, in the same order). A process whose parts
    are all empty writes no file."""
    import torch.distributed.checkpoint as dcp

    state = {}
    for name, part in zip(layout.names, layout.parts):
        if part.size == 0:
            continue
        tensor = parts[name].reshape(-1)
        tensor = tensor.view(tensor.shape)  # a tensor object of its own: DCP reads its shard from these fields
        tensor.global_shape = (part.numel,)
        tensor.global_offsets = ((part.lo,),)
        tensor.local_offsets = ((0,),)
        tensor.local_sizes = ((part.size,),)
        state[name] = tensor
    writer = dcp.HuggingFaceStorageWriter(folder, save_distributed=True)
    dcp.save(state, storage_writer=writer, process_group=group)


def _shard_file(rank: int) -> str:
    """The file DCP's safetensors storage writes for the process of ``rank`` (one file per process)."""
    return f"shard-{rank + 1:05d}-model-00001-of-00001.safetensors"


def _together(group: Any, step: Callable[[], Any]) -> List[Any]:
    """Run ``step`` on this process, then learn every process's outcome (an all-gather): each raises if any failed,
    so that no process is left waiting in a later collective for one that stopped. Returns every process's result."""
    import torch.distributed as dist

    try:
        mine, error = (step(), None)
    except Exception as e:  # noqa: BLE001 - passed to every process, raised below
        mine, error = None, e
    everyone: List[Any] = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(everyone, (mine, None if error is None else f"{type(error).__name__}: {error}"), group=group)
    if error is not None:
        raise error
    failed = next((why for _, why in everyone if why is not None), None)
    if failed is not None:
        raise RuntimeError(f"another process could not store its part of a post-hoc snapshot ({failed}); see its "
                           "error above")
    return [result for result, _ in everyone]


def write_sharded_snapshot(path: str, parts: Dict[str, torch.Tensor], layout: PartLayout, record: Dict[str, Any],
                           group: Any, main: bool) -> str:
    """Store one snapshot from every process of ``group`` as the folder ``path``: each process's ``parts`` (host
    copies) through DCP into a hidden temp folder beside it, then, on the main process, the record (``record`` plus
    the tensors' names and shapes, the world size and each shard file's checksum) and one rename into place. A
    collective: every process of ``group`` calls it for the same snapshot, in the same order; a failure on any
    process raises on all of them."""
    import os
    import shutil

    import torch.distributed as dist

    from lawa_diffusion.runs.folder import SHARDED_SNAPSHOT_RECORD
    from lawa_diffusion.utils.checksums import outside_checksum
    from lawa_diffusion.utils.files import atomic_write_json, fsync_dir, user_mode

    parent, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(parent, f".{name}.tmp")  # one name every process finds

    def prepare() -> None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
            os.makedirs(tmp)

    def shard() -> Any:
        mine = os.path.join(tmp, _shard_file(dist.get_rank(group=group)))
        if not any(part.size for part in layout.parts):
            return None
        if not os.path.isfile(mine):
            raise RuntimeError(f"torch.distributed.checkpoint wrote no {os.path.basename(mine)!r} in {tmp!r}; this "
                               "torch names its shard files otherwise: store post-hoc EMAs with one process")
        return os.path.basename(mine), outside_checksum(mine)  # read back: what landed is hashed

    def finish() -> None:
        if not main:
            return
        files = dict(r for r in reports if r is not None)
        full = dict(record, layout=layout.kind, world_size=len(reports), files=files,
                    tensors=[[n, list(p.shape)] for n, p in zip(layout.names, layout.parts)])
        atomic_write_json(os.path.join(tmp, SHARDED_SNAPSHOT_RECORD), full)
        os.chmod(tmp, user_mode(directory=True))
        fsync_dir(tmp)
        if os.path.lexists(path):  # the same step stored again after a resume from an earlier checkpoint
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_dir(parent)

    _together(group, prepare)
    save_parts(tmp, parts, layout, group)  # DCP raises on every process when one fails
    reports = _together(group, shard)
    _together(group, finish)
    return path
