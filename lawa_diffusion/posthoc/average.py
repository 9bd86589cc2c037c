"""LAWA after training: average saved EMA checkpoints into a diffusers model folder (``average``).

Sources of EMA weights: diffusers model folders (``checkpoint-<step>/unet_ema``, found in a run folder
or given one by one) and EMA snapshot files (``ema_snapshots/step-<step>.safetensors`` with the
model config in their metadata). Averages are fp32-accumulated and stream one source at a time.
The k × ν ablation over a run's snapshots is :mod:`lawa_diffusion.posthoc.sweep`.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.config.commands import PosthocConfig
from lawa_diffusion.engine.lawa import record_in_config
from lawa_diffusion.maths.averaging import average_tensor_lists, check_finite
from lawa_diffusion.posthoc.saved_weights import (
    Source,
    _weight_lists,
    find_sources,
    load_into,
    select_latest,
    shared_model,
)
from lawa_diffusion.runs.folder import (
    BASE_TRACK,
)
from lawa_diffusion.utils.files import atomic_dir


def average_sources(sources: Sequence[Source]) -> Tuple[type, dict, Dict[str, torch.Tensor]]:
    """Model class, architecture and fp32 mean state dict of ``sources`` (one source in memory at a time)."""
    check(len(sources) >= 1, "nothing to average: no checkpoint was selected")
    cls, arch = shared_model(sources)
    names: List[str] = []
    others: Dict[str, torch.Tensor] = {}
    mean = average_tensor_lists(_weight_lists(sources, names, others))
    return cls, arch, {**dict(zip(names, mean)), **others}


def write_average(paths: Sequence[str | os.PathLike], out: str | os.PathLike, k: int = PosthocConfig.k,
                  every: int = PosthocConfig.every, subfolder: Optional[str] = None,
                  overwrite: bool = False, track: str = BASE_TRACK) -> dict:
    """LAWA of the latest ``k`` EMA checkpoints under ``paths`` as a diffusers model folder ``out``.

    config.json records the average under ``_lawa`` (k, every, snapshot_steps, sources; ``lawa.read_record``).
    Returns that record.
    """
    sources = select_latest(find_sources(paths, subfolder, track), k, every)
    steps = [s.step for s in sources]
    gaps = {b - a for a, b in zip(steps, steps[1:])} if None not in steps else set()
    meta = {"method": "posthoc", "track": track, "k": k, "every": every, "snapshot_steps": steps,
            "every_n_steps": gaps.pop() if len(gaps) == 1 else None,
            "sources": [os.path.abspath(s.path) for s in sources]}
    with atomic_dir(out, overwrite=overwrite, kind="average") as tmp:
        cls, arch, state = average_sources(sources)
        check_finite(state, "the averaged weights", "a checkpoint it reads holds them (did the run diverge?): "
                                                    "average earlier checkpoints (fewer --k)")
        model = cls.from_config(arch)
        load_into(model, state, sources[-1].path)
        record_in_config(model, meta)
        model.save_pretrained(tmp)
    return meta
