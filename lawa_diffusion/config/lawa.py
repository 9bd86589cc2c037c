"""Config of the LAWA window (``LAWAConfig``: k, ν, start, storage, dtype, ...) and its choices.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

from lawa_diffusion.config.base import check, from_mapping, read_yaml

STORAGE_MODES = ("device", "cpu", "disk")
DTYPES = ("float32", "bfloat16", "float16", "float64")
NONFINITE_POLICIES = ("raise", "skip")
SNAPSHOT_RANKS = ("main", "all")


@dataclasses.dataclass
class LAWAConfig:
    """Latest Weight Averaging: the uniform mean of the latest ``k`` snapshots taken every ``every_n_steps``.

    k: how many snapshots the window holds.
    every_n_steps: ν, optimizer steps between snapshots.
    start_step: snapshots at start_step + j·ν, j ≥ 0, never at step 0 (the EMA counts steps from 1: with
        start_step 0 the first snapshot is at ν).
    min_snapshots: how many snapshots must be held before an average is offered.
    storage: "device" (ring on the EMA's device), "cpu" (pinned host ring, async copies on GPU) or
        "disk" (one safetensors file per snapshot in ``snapshot_dir``, written by a background thread).
    dtype: storage dtype; None keeps the EMA tensors' dtype. The mean is always accumulated in fp32
        (or the source dtype if wider).
    snapshot_dir: folder for "disk" storage.
    on_nonfinite: "raise" or "skip" when an EMA snapshot holds NaN/Inf.
    keep_average: keep the mean materialised on the device, updated in O(P) at each snapshot and
        recomputed exactly every k snapshots; with "disk" storage, computed when first asked for and
        kept until the next snapshot (no file is read on the training thread).
    snapshot_ranks: "main" (only the main process holds snapshots; DDP EMAs are identical) or "all".
    """

    k: int = 5
    every_n_steps: int = 500
    start_step: int = 0
    min_snapshots: int = 1
    storage: str = "cpu"
    dtype: Optional[str] = None
    snapshot_dir: Optional[str] = None
    on_nonfinite: str = "raise"
    keep_average: bool = False
    snapshot_ranks: str = "main"

    def __post_init__(self) -> None:
        for name in ("k", "every_n_steps", "start_step", "min_snapshots"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool),
                  f"lawa {name} must be an integer, got {value!r}")
        check(self.k >= 1, f"lawa k must be >= 1, got {self.k}; use k=1 for the latest snapshot alone")
        check(self.every_n_steps >= 1,
              f"lawa every_n_steps must be >= 1, got {self.every_n_steps}; it is the number of optimizer steps between snapshots")
        check(self.start_step >= 0, f"lawa start_step must be >= 0, got {self.start_step}")
        check(1 <= self.min_snapshots <= self.k,
              f"lawa min_snapshots must be between 1 and k={self.k}, got {self.min_snapshots}")
        check(self.storage in STORAGE_MODES,
              f"lawa storage must be one of {', '.join(STORAGE_MODES)}, got {self.storage!r}")
        check(self.dtype is None or self.dtype in DTYPES,
              f"lawa dtype must be null (same as the EMA) or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.on_nonfinite in NONFINITE_POLICIES,
              f"lawa on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}")
        check(self.snapshot_ranks in SNAPSHOT_RANKS,
              f"lawa snapshot_ranks must be one of {', '.join(SNAPSHOT_RANKS)}, got {self.snapshot_ranks!r}")
        check(isinstance(self.keep_average, bool), f"lawa keep_average must be true or false, got {self.keep_average!r}")
        if self.storage == "disk":
            check(bool(self.snapshot_dir),
                  "lawa storage 'disk' needs snapshot_dir; set snapshot_dir to a writable folder or use storage 'cpu'")
        if self.snapshot_dir is not None:
            self.snapshot_dir = os.fspath(self.snapshot_dir)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LAWAConfig":
        return from_mapping(cls, values, "lawa config")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "LAWAConfig":
        data = read_yaml(path)
        # Accept either a bare mapping or one nested under "lawa:".
        if set(data) == {"lawa"} and isinstance(data["lawa"], dict):
            data = data["lawa"]
        return from_mapping(cls, data, f"lawa config {os.fspath(path)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
