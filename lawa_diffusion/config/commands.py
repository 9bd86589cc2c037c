"""Defaults of the commands that read finished runs: the report, and the averages of saved checkpoints and
snapshots (``average``, ``sweep``).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Defaults of ``lawa-diffusion report``: the metric read from metrics.jsonl and the CI level."""

    metric: str = "fid"
    confidence: float = 0.95


@dataclasses.dataclass(frozen=True)
class PosthocConfig:
    """Defaults of ``lawa-diffusion average`` and ``sweep``.

    k / every: latest k checkpoints, every N-th counted back from the newest (average).
    subfolder: model folder inside each checkpoint-<step>/ (the EMA weights).
    sweep_k / sweep_every: the grid of window sizes and ν multiples (sweep).
    sweep_steps: "eval" (the steps in metrics.jsonl), "final" (the last snapshot) or a comma list.
    """

    k: int = 5
    every: int = 1
    subfolder: str = "unet_ema"
    sweep_k: tuple = (1, 2, 4, 8)
    sweep_every: tuple = (1, 2, 4)
    sweep_steps: str = "eval"
