"""Pure tensor maths for LAWA: flat layouts, foreach copies and the fp32 mean. No state.
"""
from __future__ import annotations

from typing import Iterable, List, Mapping, Optional, Sequence

import torch

from lawa_diffusion.config.base import check

DTYPE_NAMES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def dtype_from_name(name: str | None, default: torch.dtype) -> torch.dtype:
    return default if name is None else DTYPE_NAMES[name]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32, or the given dtype if it is wider (float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def flat_views(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Views of the 1-D ``flat`` shaped like ``like`` (consecutive, no copy), built in one C++ call.

    Every view keeps its tensor's shape, zero-element ones included (an empty local shard such as
    ``(0, C, 3, 3)``): some torch versions' ``_unflatten_dense_tensors`` give those shape ``[0]``.
    """
    like = list(like)
    empty = []
    needed = 0
    for i, t in enumerate(like):
        n = t.numel()
        needed += n
        if n == 0:
            empty.append(i)
    if needed != flat.numel():
        raise ValueError(f"flat buffer holds {flat.numel()} elements but the tensors need {needed}")
    if not like:
        return []
    if len(empty) == len(like):
        return [flat[:0].view(t.shape) for t in like]
    views = list(torch._utils._unflatten_dense_tensors(flat, like))
    for i in empty:
        views[i] = flat[:0].view(like[i].shape)
    return views


def foreach_copy(dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], non_blocking: bool = False) -> None:
    """``dst[i].copy_(src[i])`` for all i, in as few kernels as torch allows."""
    if len(dst) != len(src):
        raise ValueError(f"cannot copy {len(src)} tensors into {len(dst)}")
    if not dst:
        return
    if hasattr(torch, "_foreach_copy_"):  # fused where devices and layouts allow, per tensor (any devices) elsewhere
        torch._foreach_copy_(list(dst), list(src), non_blocking=non_blocking)
    else:
        for d, s in zip(dst, src):
            d.copy_(s, non_blocking=non_blocking)


def nonfinite_flag(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A 0-dim tensor on the tensors' device that is finite when every element is: one fused pass, no host sync.

    One flat tensor is summed (fp32 accumulation); a list goes through one fused norm. Finite values
    can overflow the flag in rare cases, so a non-finite flag is confirmed with :func:`all_finite`.
    """
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    wide = any(t.dtype == torch.float64 for t in tensors)
    acc = torch.float64 if wide else torch.float32
    if len(tensors) == 1:
        return torch.sum(tensors[0], dtype=acc)
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=acc)).sum()


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or Inf, checked element by element (one host sync per tensor)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def first_nonfinite(tensors: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The name of the first floating tensor (in name order) that holds NaN or Inf; None when all are finite."""
    for name in sorted(tensors):
        t = tensors[name]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(tensors: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    """One-sentence ``ValueError`` naming the first tensor of ``what`` that holds NaN or Inf, ending with ``fix``."""
    name = first_nonfinite(tensors)
    check(name is None, f"{what} hold NaN or Inf (tensor {name!r}), so nothing was written; {fix}")


def mean_of_rows(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over dim 0 of a 2-D ``[n, P]`` block, accumulated in fp32 (or fp64), one pass.

    This reads n·P elements and writes P: the bandwidth bound of an average.
    """
    acc = accumulation_dtype(rows.dtype)
    if out is not None and out.dtype == acc and out.is_contiguous():
        return torch.mean(rows, dim=0, dtype=acc, out=out)
    result = torch.mean(rows, dim=0, dtype=acc)
    if out is None:
        return result
    out.copy_(result)
    return out


def average_tensor_lists(
    lists: Iterable[Sequence[torch.Tensor]], out: Sequence[torch.Tensor] | None = None
) -> List[torch.Tensor]:
    """Uniform mean of several same-shaped tensor lists, accumulated in fp32 (fp64 if wider).

    Streams the lists (only the accumulator is held), so it suits snapshots loaded one at a time.
    Results are written into ``out`` when given (cast to its dtype), else returned in the
    accumulation dtype.
    """
    acc: List[torch.Tensor] | None = None
    count = 0
    for tensors in lists:
        tensors = list(tensors)
        if acc is None:
            acc = [t.detach().to(dtype=accumulation_dtype(t.dtype), copy=True) for t in tensors]
        else:
            if len(tensors) != len(acc):
                raise ValueError(f"cannot average a list of {len(tensors)} tensors with lists of {len(acc)}")
            for a, t in zip(acc, tensors):
                if a.shape != t.shape:
                    raise ValueError(f"cannot average tensors of shapes {tuple(a.shape)} and {tuple(t.shape)}")
            torch._foreach_add_(acc, [t.to(device=a.device, dtype=a.dtype) for a, t in zip(acc, tensors)])
        count += 1
    if acc is None:
        raise ValueError("nothing to average: the list of snapshots is empty")
    torch._foreach_div_(acc, float(count))
    if out is None:
        return acc
    out = list(out)
    if len(out) != len(acc):
        raise ValueError(f"cannot write an average of {len(acc)} tensors into {len(out)}")
    foreach_copy(out, [a.to(o.device) for a, o in zip(acc, out)])
    return out
