"""Config of FID/KID evaluation: ``FIDConfig`` (``lawa-diffusion fid``, ``ref-stats``) and ``EvalConfig`` (the
trainer's evaluation schedule on top of it).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

from lawa_diffusion.config.base import check, check_int

FID_SCHEDULERS = ("ddim", "ddpm", "dpm", "euler")
FID_RESIZE_MODES = ("pad", "resize")


@dataclasses.dataclass
class FIDConfig:
    """FID/KID evaluation (``lawa-diffusion fid``, ``ref-stats`` and ``lawa_diffusion.evaluation.fid``).

    reference: what generated images are compared with: "fashion-mnist[:train|:test]", an image
        folder, a .npy/.npz image array or a stats .npz written by ``ref-stats``. For a conditional model whose
        prompts come with images (a captioned folder or dataset) those images are the reference instead.
    num_samples: generated images per weight variant (FID is biased below 2048; KID is the better
        guide there).
    batch_size: images per sampling and feature-extraction batch.
    scheduler: sampler used for evaluation: "ddim", "ddpm", "dpm" (DPM-Solver++) or "euler".
    num_inference_steps: sampler steps per image.
    eta: DDIM eta (0: deterministic DDIM).
    seed: base seed; sample i always starts from the same noise, whatever the batch or process split.
    kid: also compute KID (torch-fidelity, polynomial kernel).
    kid_subsets / kid_subset_size: KID subsets and their size (capped at the number of images).
    reference_features_max: reference features kept for KID (seeded random subset beyond this).
    resize_mode: how reference images reach the model resolution: "pad" (zero-pad/centre-crop) or
        "resize" (resize the shorter side, then centre-crop).
    warn_below: warn when num_samples is below this.

    Conditional models (text-to-image pipelines, class-conditional UNets) also take:
    prompts: where the conditions come from: a text file (one prompt per line), an image folder with
        metadata.jsonl (its held-out rows: prompts and reference images, paired) or a saved dataset.
    class_labels: for a class-conditional UNet: "all" (every class, cycled) or a comma list of labels.
    guidance_scale: classifier-free guidance (null: the pipeline's own default; 1.0: no guidance).
    num_reference: rows of a captioned folder or dataset held out as prompts + reference (null: all rows).
    caption_column: the caption column of metadata.jsonl or of the dataset.
    pipeline: the diffusers pipeline folder whose VAE, text encoder(s), tokenizer(s) and scheduler sample a
        conditional UNet given apart from it (a ``unet_ema`` / ``unet_lawa`` / synthesised folder).
    """

    reference: str = "fashion-mnist"
    num_samples: int = 2048
    batch_size: int = 64
    scheduler: str = "ddim"
    num_inference_steps: int = 50
    eta: float = 0.0
    seed: int = 0
    kid: bool = True
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    reference_features_max: int = 10000
    resize_mode: str = "pad"
    warn_below: int = 2048
    prompts: Optional[str] = None
    class_labels: Optional[str] = None
    guidance_scale: Optional[float] = None
    num_reference: Optional[int] = None
    caption_column: str = "text"
    pipeline: Optional[str] = None

    @property
    def conditional(self) -> bool:
        """Whether these settings sample a conditional model (prompts or class labels given)."""
        return self.prompts is not None or self.class_labels is not None

    def __post_init__(self) -> None:
        check(isinstance(self.num_samples, int) and self.num_samples >= 2,
              f"num_samples must be an integer >= 2 (FID needs a covariance), got {self.num_samples!r}")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        check(self.scheduler in FID_SCHEDULERS,
              f"scheduler must be one of {', '.join(FID_SCHEDULERS)}, got {self.scheduler!r}")
        check(isinstance(self.num_inference_steps, int) and self.num_inference_steps >= 1,
              f"num_inference_steps (--steps) must be >= 1, got {self.num_inference_steps!r}")
        check(isinstance(self.seed, int) and 0 <= self.seed < 2**31, f"seed must be in [0, 2**31), got {self.seed!r}")
        check(self.kid_subsets >= 1 and self.kid_subset_size >= 2,
              f"kid_subsets must be >= 1 and kid_subset_size >= 2, got {self.kid_subsets} and {self.kid_subset_size}")
        check(self.reference_features_max >= 2, f"reference_features_max must be >= 2, got {self.reference_features_max}")
        check(self.resize_mode in FID_RESIZE_MODES,
              f"resize_mode must be one of {', '.join(FID_RESIZE_MODES)}, got {self.resize_mode!r}")
        check(self.guidance_scale is None or (isinstance(self.guidance_scale, (int, float))
                                              and not isinstance(self.guidance_scale, bool) and self.guidance_scale >= 1),
              f"guidance_scale must be a number >= 1 (1: no guidance) or null, got {self.guidance_scale!r}")
        check_int("eval", "num_reference", self.num_reference, 2, allow_none=True)
        check(self.prompts is None or self.class_labels is None, "give prompts or class_labels, not both (prompts "
              "condition a text-to-image pipeline, class labels a class-conditional UNet)")


@dataclasses.dataclass
class EvalConfig(FIDConfig):
    """FID/KID tracking during training: the ``FIDConfig`` options plus when and what to evaluate.

    Every variant is sampled from the same noise (``seed``) at every evaluation.
    every_n_steps: evaluate every N optimizer steps (0: not during training).
    at_end: also evaluate after the last step.
    variants: the weights to evaluate: raw, ema, lawa, the names of ``ema_tracks`` and ``lawa_windows``, and
        "<window>@delayed" (the pure-delay baseline: the window's own snapshot of its track nearest step − ΔL,
        ΔL being the lag the window adds to its track; with an even number of snapshots held, the earlier of the
        two middle ones, ΔL + ν/2 back); a window and its baseline once it holds min_snapshots. null: every
        variant but raw.
    reference_num_images: use only this many reference images for the statistics (null: all).
    inception_weights: FID Inception weights file (null: the resolved default, see ``lawa-diffusion inception info``).
    background_metrics: run the FID/KID maths (CPU) in a background thread while training goes on; the
        rows are written in step order, and all of them before each checkpoint. Same numbers either way.
        null: on when training runs on a GPU, off on CPU-only training (there the maths compete with
        training for the same cores: 1.1x slower in benchmarks/bench_eval.py on 2 cores).
    """

    every_n_steps: int = 1000
    at_end: bool = True
    variants: Optional[list] = None
    reference_num_images: Optional[int] = None
    inception_weights: Optional[str] = None
    background_metrics: Optional[bool] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("eval", "every_n_steps", self.every_n_steps, 0)
        check(self.background_metrics is None or isinstance(self.background_metrics, bool),
              f"eval background_metrics must be true, false or null, got {self.background_metrics!r}")
        check_int("eval", "reference_num_images", self.reference_num_images, 2, allow_none=True)
        check(isinstance(self.at_end, bool), f"eval at_end must be true or false, got {self.at_end!r}")
        check(self.variants is None or (isinstance(self.variants, (list, tuple)) and bool(self.variants)
                                        and all(isinstance(v, str) for v in self.variants)),
              f"eval variants must be null (all) or a non-empty list of variant names, got {self.variants!r}")
        if self.variants is not None:
            self.variants = list(self.variants)

    def select_variants(self, known: Sequence[str]) -> None:
        """Resolve ``variants`` against the run's ``known`` names (in that order); null means all but raw."""
        if self.variants is None:
            self.variants = [v for v in known if v != "raw"]
        unknown = [v for v in self.variants if v not in known]
        check(not unknown, f"eval variants names unknown variant(s) {', '.join(map(repr, unknown))}; this run has "
                           f"{', '.join(known)}")
        self.variants = [v for v in known if v in self.variants]
