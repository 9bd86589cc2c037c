"""Adapters exposing "the tensors to snapshot" from the objects LAWA can sit on.

Tensors are fetched on every call (never cached): diffusers' EMAModel replaces its
``shadow_params`` list on ``to()`` and ``load_state_dict()``. Sharded tensors (FSDP2 / DTensor)
are exposed as this process's local shard: LAWA keeps and averages each process's own shard.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence

import torch
from torch import nn

from lawa_diffusion.config.base import check
from lawa_diffusion.engine import zero3


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2's sharded parameters and the EMA copies made of them)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor shards nothing
        return False
    return isinstance(tensor, DTensor)


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (writes go through to it), else the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def shard_like(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """``tensors`` (full tensors, the same on every process) with each one whose counterpart in ``like`` is a
    DTensor made a DTensor of the same device mesh and placements that holds this process's own chunk (a copy,
    on the counterpart's device); the rest as they are. No communication: exact because every process holds the
    same full tensor. ``ValueError`` when the two lists differ in length or global shapes, or for a placement
    other than Shard and Replicate."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    tensors, like = list(tensors), list(like)
    check(len(tensors) == len(like),
          f"EMAModel.step got {len(like)} parameters but the EMA holds {len(tensors)} weights, so it cannot shard "
          "them like the FSDP model's; pass the parameters of the model the EMAModel was made from")
    out = []
    for i, (full, target) in enumerate(zip(tensors, like)):
        if not is_sharded(target) or is_sharded(full):
            out.append(full)
            continue
        check(tuple(full.shape) == tuple(target.shape),
              f"EMAModel.step got parameter {i} of shape {tuple(target.shape)} where the EMA holds shape "
              f"{tuple(full.shape)}, so it cannot shard its weights like the FSDP model's; pass the parameters "
              "of the model the EMAModel was made from")
        for placement in target.placements:
            check(isinstance(placement, (Shard, Replicate)),
                  f"EMAModel.step got parameter {i} with placement {placement}, which an EMA cannot follow; "
                  "shard the model with Shard or Replicate placements (fully_shard does)")
        local = target.to_local()
        try:
            chunk = distribute_tensor(full.detach().to(local.device), target.device_mesh, target.placements,
                                      src_data_rank=None).to_local()
        except TypeError:  # torch before 2.6: no src_data_rank
            raise ValueError(f"sharding an EMA like an FSDP model needs torch>=2.6 (distribute_tensor with "
                             f"src_data_rank), this is torch {torch.__version__}; upgrade torch") from None
        out.append(DTensor.from_local(chunk.clone(), target.device_mesh, target.placements, run_check=False,
                                      shape=full.shape, stride=full.stride()))
    return out


def needs_sharding(tensors: Sequence[torch.Tensor], like: Sequence[torch.Tensor]) -> bool:
    """Whether some tensor of ``tensors`` is full where its counterpart in ``like`` is a DTensor (or, the lists
    differing in length, whether full tensors meet DTensors at all: ``shard_like`` then says what differs)."""
    if len(tensors) != len(like):
        return any(is_sharded(t) for t in like) and not all(is_sharded(s) for s in tensors)
    return any(is_sharded(t) and not is_sharded(s) for s, t in zip(tensors, like))


def iter_whole(tensors: Sequence[torch.Tensor],
               locals_: Optional[Sequence[torch.Tensor]] = None) -> Iterator[torch.Tensor]:
    """Each of ``tensors`` whole, one at a time: DTensors gathered over their mesh, the rest as they are;
    ``locals_``: other local shards to gather in their place (e.g. an average of the shards). A collective."""
    from torch.distributed.tensor import DTensor

    from lawa_diffusion.engine import collectives

    groups = collectives.mesh_groups(tensors)
    for i, t in enumerate(tensors):
        local = locals_[i] if locals_ is not None else (t.to_local() if is_sharded(t) else t)
        if is_sharded(t):
            device = collectives.comm_device(groups[0], local.device)  # (shards offloaded to the CPU under NCCL)
            yield DTensor.from_local(local.to(device), t.device_mesh, t.placements, run_check=False,
                                     shape=t.shape, stride=t.stride()).full_tensor()
        else:
            yield local


def gather_full(tensors: Sequence[torch.Tensor], keep: bool) -> Optional[List[torch.Tensor]]:
    """The full tensors of ``tensors`` (DTensors gathered over their mesh, one at a time; the rest as they are),
    detached on the CPU where ``keep``, else None. A collective: every process of the meshes must call it."""
    out: List[torch.Tensor] = []
    for t in iter_whole(tensors):
        if keep:
            out.append(t.detach().to("cpu", copy=True))
    return out if keep else None


@torch.no_grad()
def copy_whole(sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
               locals_: Optional[Sequence[torch.Tensor]] = None) -> None:
    """Copy each source into the unsharded target of the same shape; a sharded (DTensor) source is gathered first
    (a collective: every process of its mesh must call this). ``locals_``: as for :func:`iter_whole`."""
    check(len(sources) == len(targets), f"copy_whole got {len(sources)} sources for {len(targets)} targets")
    for target, whole in zip(targets, iter_whole(sources, locals_)):
        target.copy_(whole)


class TensorSource:
    """A list of same-order tensors plus, where the source keeps one, its optimizer-step counter."""

    kind = "tensors"

    def __init__(self, obj: Any):
        self.obj = obj

    def raw_tensors(self) -> List[torch.Tensor]:
        """The tensors as the source holds them (DTensors when sharded)."""
        return list(self.obj)

    def tensors(self) -> List[torch.Tensor]:
        """The tensors to snapshot: the local shard of each sharded one."""
        return [local_shard(t) for t in self.raw_tensors()]

    def sharded(self) -> bool:
        return any(is_sharded(t) for t in self.raw_tensors())

    def current_step(self) -> Optional[int]:
        return None

    def forget_step(self) -> None:
        """Read the step counter afresh next time (its owner's state was loaded)."""

    def model_template(self) -> tuple[Any, Any]:
        """(model_cls, model_config) for writing a diffusers folder, or (None, None)."""
        return None, None

    def targets_of(self, module_or_params: Any) -> List[torch.Tensor]:
        """The tensors of ``module_or_params`` that correspond, in order, to ``tensors()`` (local shards).
        ZeRO-3 partitions must be gathered (they are empty outside a gather)."""
        if not isinstance(module_or_params, nn.Module):
            module_or_params = list(module_or_params)
        zero3.check_gathered(module_or_params.parameters() if isinstance(module_or_params, nn.Module) else module_or_params)
        return [local_shard(t) for t in self.raw_targets_of(module_or_params)]

    def raw_targets_of(self, module_or_params: Any) -> List[torch.Tensor]:
        if isinstance(module_or_params, nn.Module):
            return [p.data for p in module_or_params.parameters()]
        return [p.data if isinstance(p, nn.Parameter) else p for p in module_or_params]


class EMAModelSource(TensorSource):
    kind = "diffusers.EMAModel"

    def raw_tensors(self) -> List[torch.Tensor]:
        return list(self.obj.shadow_params)

    def current_step(self) -> Optional[int]:
        return int(self.obj.optimization_step)

    def model_template(self) -> tuple[Any, Any]:
        return getattr(self.obj, "model_cls", None), getattr(self.obj, "model_config", None)


class AveragedModelSource(TensorSource):
    kind = "torch.optim.swa_utils.AveragedModel"

    def _uses_buffers(self) -> bool:
        return bool(getattr(self.obj, "use_buffers", False))

    def raw_tensors(self) -> List[torch.Tensor]:
        return self.raw_targets_of(self.obj.module)

    def __init__(self, obj: Any):
        super().__init__(obj)
        self._counted: Optional[int] = None

    def current_step(self) -> Optional[int]:
        """``n_averaged``, read from the device once (a host sync), then counted: one call per
        ``update_parameters``."""
        if self._counted is None:
            self._counted = int(self.obj.n_averaged.item())
        else:
            self._counted += 1
        return self._counted

    def forget_step(self) -> None:
        self._counted = None

    def raw_targets_of(self, module_or_params: Any) -> List[torch.Tensor]:
        if isinstance(module_or_params, nn.Module):
            module = getattr(module_or_params, "module", module_or_params) if module_or_params is self.obj else module_or_params
            out = [p.data for p in module.parameters()]
            if self._uses_buffers():
                out += [b for b in module.buffers() if b.is_floating_point()]
            return out
        return super().raw_targets_of(module_or_params)

    def model_template(self) -> tuple[Any, Any]:
        module = self.obj.module
        config = getattr(module, "config", None)
        return (type(module), config) if config is not None else (None, None)


class ModuleSource(TensorSource):
    kind = "nn.Module"

    def raw_tensors(self) -> List[torch.Tensor]:
        return [p.data for p in self.obj.parameters()]

    def model_template(self) -> tuple[Any, Any]:
        config = getattr(self.obj, "config", None)
        return (type(self.obj), config) if config is not None else (None, None)


def as_source(obj: Any) -> TensorSource:
    """Wrap ``obj`` (EMAModel, AveragedModel, nn.Module or a sequence of tensors)."""
    if isinstance(obj, TensorSource):
        return obj
    if hasattr(obj, "shadow_params") and hasattr(obj, "optimization_step"):
        return EMAModelSource(obj)
    if isinstance(obj, torch.optim.swa_utils.AveragedModel):
        return AveragedModelSource(obj)
    if isinstance(obj, nn.Module):
        return ModuleSource(obj)
    if isinstance(obj, Sequence) and all(isinstance(t, torch.Tensor) for t in obj):
        return TensorSource(list(obj))
    raise ValueError(
        f"LAWA source must be a diffusers EMAModel, a torch AveragedModel, an nn.Module or a list of "
        f"tensors, got {type(obj).__name__}; pass the EMA object your training script updates"
    )
