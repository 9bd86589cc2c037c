"""Adapters exposing "the tensors to snapshot" from the objects LAWA can sit on.

Tensors are fetched on every call (never cached): diffusers' EMAModel replaces its
``shadow_params`` list on ``to()`` and ``load_state_dict()``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch import nn


class TensorSource:
    """A list of same-order tensors plus, where the source keeps one, its optimizer-step counter."""

    kind = "tensors"

    def __init__(self, obj: Any):
        self.obj = obj

    def tensors(self) -> List[torch.Tensor]:
        return list(self.obj)

    def current_step(self) -> Optional[int]:
        return None

    def model_template(self) -> tuple[Any, Any]:
        """(model_cls, model_config) for writing a diffusers folder, or (None, None)."""
        return None, None

    def targets_of(self, module_or_params: Any) -> List[torch.Tensor]:
        """The tensors of ``module_or_params`` that correspond, in order, to ``tensors()``."""
        if isinstance(module_or_params, nn.Module):
            return [p.data for p in module_or_params.parameters()]
        return [p.data if isinstance(p, nn.Parameter) else p for p in module_or_params]


class EMAModelSource(TensorSource):
    kind = "diffusers.EMAModel"

    def tensors(self) -> List[torch.Tensor]:
        return list(self.obj.shadow_params)

    def current_step(self) -> Optional[int]:
        return int(self.obj.optimization_step)

    def model_template(self) -> tuple[Any, Any]:
        return getattr(self.obj, "model_cls", None), getattr(self.obj, "model_config", None)


class AveragedModelSource(TensorSource):
    kind = "torch.optim.swa_utils.AveragedModel"

    def _uses_buffers(self) -> bool:
        return bool(getattr(self.obj, "use_buffers", False))

    def tensors(self) -> List[torch.Tensor]:
        return self.targets_of(self.obj.module)

    def current_step(self) -> Optional[int]:
        return int(self.obj.n_averaged.item())

    def targets_of(self, module_or_params: Any) -> List[torch.Tensor]:
        if isinstance(module_or_params, nn.Module):
            module = getattr(module_or_params, "module", module_or_params) if module_or_params is self.obj else module_or_params
            out = [p.data for p in module.parameters()]
            if self._uses_buffers():
                out += [b for b in module.buffers() if b.is_floating_point()]
            return out
        return super().targets_of(module_or_params)

    def model_template(self) -> tuple[Any, Any]:
        module = self.obj.module
        config = getattr(module, "config", None)
        return (type(module), config) if config is not None else (None, None)


class ModuleSource(TensorSource):
    kind = "nn.Module"

    def tensors(self) -> List[torch.Tensor]:
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
