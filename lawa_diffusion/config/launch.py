"""Config of the launch plugin besides the LAWA window (``--lawa_<name>`` / ``LAWA_<NAME>``): FID monitoring and
post-hoc snapshot storage beside an unmodified diffusers script.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from lawa_diffusion.config.base import check, check_int
from lawa_diffusion.config.tracks import POSTHOC_DTYPES, SIGMA_REL_MAX


@dataclasses.dataclass
class LaunchConfig:
    """Options of the launch plugin besides ``LAWAConfig`` (``--lawa_<name>`` / ``LAWA_<NAME>``).

    fid_every_n_steps: evaluate FID of the first EMA's EMA and LAWA weights every this many
        optimizer steps (0: never); a text-conditioned UNet is sampled with the VAE, text encoder,
        tokenizer and scheduler of the script's --pretrained_model_name_or_path (and --revision, --variant).
    fid_reference: what FID compares against (as for ``lawa-diffusion fid``); needed when
        fid_every_n_steps > 0, unless fid_prompts is a captioned image folder (its held-out images).
    fid_prompts: prompts of a text-conditioned model: a text file (one prompt per line), an image folder
        with metadata.jsonl (held-out rows: prompts and reference images) or a saved dataset; null: the
        script's own --validation_prompts.
    fid_class_labels: class labels of a class-conditional UNet: "all" or a comma list such as 0,3,7.
    fid_guidance_scale: classifier-free guidance of text prompts (null: the pipeline's default; 1: none).
    fid_num_reference: rows of a captioned fid_prompts folder held out as prompts and reference (null: all).
    fid_caption_column: the caption column of a captioned fid_prompts folder or dataset.
    fid_pipeline: the diffusers pipeline (folder or Hub id in the local cache) whose VAE, text encoder,
        tokenizer and scheduler sample a text-conditioned model; null: the script's --pretrained_model_name_or_path.
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
    fid_prompts: Optional[str] = None
    fid_class_labels: Optional[str] = None
    fid_guidance_scale: Optional[float] = None
    fid_num_reference: Optional[int] = None
    fid_caption_column: str = "text"
    fid_pipeline: Optional[str] = None
    metrics_file: Optional[str] = None
    posthoc_sigma_rels: Optional[str] = None
    posthoc_every_n_steps: int = 0
    posthoc_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name, low in (("fid_every_n_steps", 0), ("fid_num_samples", 2), ("fid_batch_size", 1),
                          ("fid_num_inference_steps", 1), ("fid_num_reference", 2)):
            value = getattr(self, name)
            if value is None and name != "fid_every_n_steps":
                continue
            check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                  f"lawa {name} must be an integer >= {low}, got {value!r}")
        captioned = bool(self.fid_prompts) and os.path.isdir(str(self.fid_prompts))
        check(self.fid_every_n_steps == 0 or bool(self.fid_reference) or captioned,
              "lawa fid_every_n_steps > 0 needs fid_reference; pass --lawa_fid_reference with the FID reference (or "
              "--lawa_fid_prompts with a captioned image folder, whose held-out images are the reference)")
        check(self.fid_prompts is None or self.fid_class_labels is None, "give --lawa_fid_prompts or "
              "--lawa_fid_class_labels, not both (prompts condition a text-to-image model, class labels a "
              "class-conditional UNet)")
        check(self.fid_guidance_scale is None or (isinstance(self.fid_guidance_scale, (int, float))
                                                  and not isinstance(self.fid_guidance_scale, bool)
                                                  and self.fid_guidance_scale >= 1),
              f"lawa fid_guidance_scale must be a number >= 1 (1: no guidance), got {self.fid_guidance_scale!r}")
        check(isinstance(self.fid_caption_column, str) and bool(self.fid_caption_column),
              f"lawa fid_caption_column must name a column, got {self.fid_caption_column!r}")
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
