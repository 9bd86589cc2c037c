"""What LAWA needs to know about DeepSpeed ZeRO-3: partitioned parameters and diffusers' gathering EMA step.

Under ZeRO-3 each parameter's ``.data`` is this process's partition, an empty tensor of shape (0,)
outside a ``deepspeed.zero.GatheredParameters`` block (its full shape is ``ds_shape``). An EMA made
from the model before ``accelerator.prepare`` (as diffusers' examples make it) keeps full tensors,
the same on every process; diffusers' ``EMAModel.step`` then gathers the parameters through a
``deepspeed`` name that ``diffusers.training_utils`` imports only when ZeRO-3 was already on when it
was imported. ``let_diffusers_gather`` gives it that name, so such a script steps its EMA.
"""
from __future__ import annotations

import sys
from typing import Any, Iterable

from lawa_diffusion.config.base import check


def is_partitioned(tensor: Any) -> bool:
    """True for a ZeRO-3 parameter (DeepSpeed gives them a ``ds_id``)."""
    return hasattr(tensor, "ds_id")


def enabled() -> bool:
    """True while an accelerate / transformers DeepSpeed config with ZeRO stage 3 is live."""
    if "transformers" not in sys.modules:  # accelerate's DeepSpeed support imports it; nothing to ask otherwise
        return False
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return bool(is_deepspeed_zero3_enabled())


def let_diffusers_gather() -> bool:
    """Put ``deepspeed`` into ``diffusers.training_utils`` once ZeRO-3 is on (diffusers' ``EMAModel.step``
    uses the name then); True once it is there."""
    import diffusers.training_utils as training_utils

    if "deepspeed" in vars(training_utils):
        return True
    if not enabled():
        return False
    import deepspeed

    training_utils.deepspeed = deepspeed
    return True


def _empty_partition(parameters: Iterable[Any]) -> Any:
    return next((p for p in parameters if is_partitioned(p) and p.numel() == 0 and getattr(p, "ds_numel", 0)), None)


def check_ema_source(parameters: Iterable[Any], who: str) -> None:
    """Refuse an EMA made from ZeRO-3 partitions: its shadow weights would be empty tensors."""
    empty = _empty_partition(parameters)
    check(empty is None,
          f"{who} cannot keep LAWA over an EMA made from ZeRO-3 partitioned parameters (shape "
          f"{tuple(empty.shape) if empty is not None else ()} instead of {tuple(getattr(empty, 'ds_shape', ()))}): "
          "its weights would be empty; make the EMAModel from the model before accelerator.prepare, "
          "as diffusers' training examples do")


def check_gathered(parameters: Iterable[Any]) -> None:
    """Refuse to write LAWA weights into ZeRO-3 partitions outside a gather (they are empty there)."""
    empty = _empty_partition(parameters)
    check(empty is None,
          f"lawa cannot copy weights into ZeRO-3 partitioned parameters (shape {tuple(empty.shape) if empty is not None else ()} "
          f"instead of {tuple(getattr(empty, 'ds_shape', ()))}); gather them first, on every process: "
          "with deepspeed.zero.GatheredParameters(params, modifier_rank=0): copy on the main process")
