"""The few collectives LAWA runs itself, over the processes that hold the EMA and on a device their backend takes.

A sharded EMA (FSDP2 / DTensor) lives on a device mesh that need not span the world (pipeline stages, one
mesh of several): its collectives run over the mesh's own groups, one per mesh dimension, so processes
outside it are never waited for. The tensors go through the device the group's backend communicates from:
NCCL takes CUDA tensors only, so flags of shards offloaded to the CPU travel through the current GPU.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist


def group_device_types(group: Any = None) -> List[str]:
    """The device types the backend(s) of ``group`` (default: the world) take tensors from."""
    group = group if group is not None else dist.group.WORLD
    devices = getattr(group, "_device_types", None)
    if devices:
        return [torch.device(d).type for d in devices]
    backend = str(dist.get_backend(group)).lower()
    if ":" in backend:  # "cpu:gloo,cuda:nccl"
        return [pair.split(":", 1)[0] for pair in backend.split(",")]
    return list(dist.Backend.backend_capability.get(backend, ["cpu"]))


def comm_device(group: Any, near: torch.device) -> torch.device:
    """Where to put a tensor for a collective over ``group``: ``near`` (the EMA's device) when the backend
    takes that device, else the CPU when it takes the CPU, else the current device of its accelerator."""
    near = torch.device(near)
    types = group_device_types(group)
    if near.type in types:
        return near
    if "cpu" in types:
        return torch.device("cpu")
    kind = types[0]
    return torch.device(kind, getattr(torch, kind).current_device())


def mesh_groups(tensors: Sequence[torch.Tensor]) -> List[Any]:
    """The process groups of the meshes ``tensors`` (DTensors) live on, one per mesh dimension, in the same
    order on every process of a mesh; ``[None]`` (the world) when none is a DTensor."""
    meshes: list = []
    for t in tensors:
        mesh = getattr(t, "device_mesh", None)
        if mesh is not None and not any(mesh is m or mesh == m for m in meshes):
            meshes.append(mesh)
    groups = [mesh.get_group(dim) for mesh in meshes for dim in range(mesh.ndim)]
    return groups or [None]


def any_over(flags: Sequence[bool], groups: Sequence[Any], near: torch.device) -> List[bool]:
    """Each flag OR-ed over every process of ``groups`` (a MAX all-reduce per group: over all the dimensions
    of a mesh it reaches every process of the mesh)."""
    result = [bool(f) for f in flags]
    for group in groups:
        values = torch.tensor([float(f) for f in result], device=comm_device(group, near))
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
        result = [bool(v) for v in values.tolist()]
    return result


def wait_for_all(groups: Sequence[Any], near: torch.device) -> None:
    """Return once every process of ``groups`` has called it (an all-reduce on an explicit device per group:
    a backend's own barrier may guess a GPU)."""
    any_over([False], groups, near)


def broadcast_(tensor: torch.Tensor, src: int = 0, group: Any = None) -> torch.Tensor:
    """``tensor`` sent from global rank ``src`` to every process of ``group``, in place, through the device the
    backend takes when it does not take the tensor's own."""
    device = comm_device(group, tensor.device)
    if device == tensor.device:
        dist.broadcast(tensor, src=src, group=group)
        return tensor
    moved = tensor.to(device)
    dist.broadcast(moved, src=src, group=group)
    return tensor.copy_(moved)


def mesh_leader(tensors: Sequence[torch.Tensor]) -> bool:
    """True on the first process of the mesh of the first DTensor (its coordinate is all zeros): the one that
    writes what the mesh computed. Without a DTensor: the world's rank 0."""
    mesh: Optional[Any] = next((t.device_mesh for t in tensors if getattr(t, "device_mesh", None) is not None), None)
    if mesh is None:
        return dist.get_rank() == 0
    coordinate = mesh.get_coordinate()
    return coordinate is not None and all(c == 0 for c in coordinate)
