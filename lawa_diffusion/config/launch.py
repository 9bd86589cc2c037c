"""Config of the launch plugin besides the LAWA window (``--lawa_<name>`` / ``LAWA_<NAME>``): FID monitoring and
post-hoc snapshot storage beside an unmodified diffusers script.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from lawa_diffusion.config.base import check, check_int
from lawa_diffusion.config.tracks import POSTHOC_DTYPES, SIGMA_REL_MAX


@dataclasses.dataclass
class LaunchConfig:
    """Options of the launch plugin besides ``LAWAConfig`` (``--lawa_<name>`` / ``LAWA_<NAME>``).

    fid_every_n_steps: evaluate FID of the first EMA's EMA and LAWA weights every this many
        optimizer steps (0: never); unconditional UNets only.
    fid_reference: what FID compares against (as for ``lawa-diffusion fid``); needed when
        fid_every_n_steps > 0.
    fid_num_samples / fid_batch_size / fid_num_inference_steps: images per variant, batch size and
        sampler steps (null: the ``FIDConfig`` defaults).
    fid_inception_weights: FID Inception weights file (null: the resolved default).
    metrics_file: JSON-lines file for the FID rows; null: metrics.jsonl in the script's --output_dir
        (or the working folder).
    posthoc_sigma_rels: power-function EMAs (EDM2) kept beside the script's first EMA, as a comma list of
        σ_rel values ("0.05,0.10"); null: 0.05,0.10 when posthoc_every_n_steps > 0.
    posthoc_every_n_steps: store their snapshots every N optimizer steps (0: keep none) under the script's
        --output_dir, in ema_snapshots/sigma_rel_<σ>/step-<step>.safetensors.
    posthoc_dtype: the snapshot files' dtype (float32, bfloat16 or float16).
    """

    fid_every_n_steps: int = 0
    fid_reference: Optional[str] = None
    fid_num_samples: Optional[int] = None
    fid_batch_size: Optional[int] = None
    fid_num_inference_steps: Optional[int] = None
    fid_inception_weights: Optional[str] = None
    metrics_file: Optional[str] = None
    posthoc_sigma_rels: Optional[str] = None
    posthoc_every_n_steps: int = 0
    posthoc_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name, low in (("fid_every_n_steps", 0), ("fid_num_samples", 2), ("fid_batch_size", 1),
                          ("fid_num_inference_steps", 1)):
            value = getattr(self, name)
            if value is None and name != "fid_every_n_steps":
                continue
            check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                  f"lawa {name} must be an integer >= {low}, got {value!r}")
        check(self.fid_every_n_steps == 0 or bool(self.fid_reference),
              "lawa fid_every_n_steps > 0 needs fid_reference; pass --lawa_fid_reference with the FID reference")
        check_int("lawa", "posthoc_every_n_steps", self.posthoc_every_n_steps, 0)
        check(self.posthoc_dtype in POSTHOC_DTYPES,
              f"lawa posthoc_dtype must be one of {', '.join(POSTHOC_DTYPES)}, got {self.posthoc_dtype!r}")
        values = self.sigma_rels
        check(not values or self.posthoc_every_n_steps > 0,
              f"lawa posthoc_sigma_rels {self.posthoc_sigma_rels!r} needs posthoc_every_n_steps > 0; pass "
              "--lawa_posthoc_every_n_steps N (store the power EMAs every N optimizer steps)")
        for value in values:
            check(0.0 < value < SIGMA_REL_MAX, f"lawa posthoc_sigma_rels must hold values > 0 and < {SIGMA_REL_MAX:.4f}, "
                                               f"got {value!r}; use e.g. 0.05,0.10")
        check(len(set(values)) == len(values), f"lawa posthoc_sigma_rels names a value twice: {self.posthoc_sigma_rels!r}")

    @property
    def sigma_rels(self) -> tuple:
        """The σ_rel values of ``posthoc_sigma_rels`` (0.05, 0.10 when only posthoc_every_n_steps is set)."""
        given = self.posthoc_sigma_rels
        if given is None or given == "":
            return (0.05, 0.10) if self.posthoc_every_n_steps else ()
        items = given if isinstance(given, (list, tuple)) else str(given).split(",")
        values = []
        for item in items:
            try:
                values.append(float(item))
            except (TypeError, ValueError):
                raise ValueError(f"lawa posthoc_sigma_rels must be a comma list of numbers such as 0.05,0.10, "
                                 f"got {given!r}") from None
        return tuple(values)
