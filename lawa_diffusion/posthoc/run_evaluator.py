"""The evaluator of a finished run: its own eval settings, reference statistics and sampling seed, so that
every average scored after training is comparable with the run's online rows.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional

from lawa_diffusion.config.base import check
from lawa_diffusion.runs import folder as runfolder


def _noise_scheduler_config(config: dict) -> Optional[dict]:
    """The training noise scheduler's config (DDPMScheduler from the run's ``noise`` section), as the
    trainer hands it to its evaluations; None when the run config has no such section."""
    noise = config.get("noise")
    if not isinstance(noise, dict):
        return None
    from diffusers import DDPMScheduler

    accepted = inspect.signature(DDPMScheduler.__init__).parameters
    scheduler = DDPMScheduler(**{k: v for k, v in noise.items() if k in accepted})
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def fid_evaluator(run_dir: str, *, image_size: Optional[int] = None, reference: Optional[str] = None,
                  num_samples: Optional[int] = None, batch_size: Optional[int] = None,
                  num_inference_steps: Optional[int] = None, weights: Optional[str] = None, device=None,
                  progress: bool = True, command: str = "sweep", accelerator=None):
    """``evaluate(variants)``: FID/KID with the run's evaluation settings (config.yaml ``eval``, overridden by
    the arguments), against reference stats that ``fid.reference_stats`` takes from its cache when present.
    With ``accelerator`` (several processes) the samples are split across the processes; every process gets the
    same result."""
    import functools

    from lawa_diffusion.config.base import from_mapping
    from lawa_diffusion.config.fid import FIDConfig
    from lawa_diffusion.evaluation import fid, sampling

    config = runfolder.read_config(run_dir)
    ev = dict(config.get("eval") or {})
    check(bool(reference or ev.get("reference")), f"{command} needs the FID reference and {run_dir!r} has no "
                                                  "config.yaml with eval.reference; pass --reference")
    given = {"reference": reference, "num_samples": num_samples, "batch_size": batch_size,
             "num_inference_steps": num_inference_steps}
    ev.update({k: v for k, v in given.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(FIDConfig)}
    e = from_mapping(FIDConfig, {k: v for k, v in ev.items() if k in fields}, f"{command} eval settings")
    weights = weights or ev.get("inception_weights")
    stats = fid.reference_stats(e.reference, image_size=image_size, num_images=ev.get("reference_num_images"),
                                device=device, weights=weights, progress=progress, cfg=e, accelerator=accelerator)
    return functools.partial(sampling.evaluate_variants, reference=stats, cfg=e, weights=weights, device=device,
                             scheduler_config=_noise_scheduler_config(config), progress=progress,
                             accelerator=accelerator)
