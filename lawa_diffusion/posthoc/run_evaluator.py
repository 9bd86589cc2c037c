"""The evaluator of a finished run: its own eval settings, reference statistics and sampling seed, so that
every average scored after training is comparable with the run's online rows.

A run whose eval settings name prompts or class labels, or whose model needs them (a UNet2DConditionModel, a
UNet with class embeddings), is scored by the conditional evaluator
(:func:`lawa_diffusion.evaluation.conditional_evaluator.conditional_evaluation`) with the same prompts, guidance,
seeds and pipeline parts; any other run by the paired unconditional sampler.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
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


def run_model(config: dict, device=None):
    """An (uninitialised) model of the run's config ``model`` section, None when it has none."""
    model = config.get("model")
    if not isinstance(model, dict) or not model:
        return None
    from lawa_diffusion.posthoc.saved_weights import architecture, model_class

    return model_class(model).from_config(architecture(model)).to(device).eval().requires_grad_(False)


def _in_run(path: Optional[str], run_dir: str) -> Optional[str]:
    """A path of the run's settings: as given when it exists, else relative to the run folder when it is there."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    inside = os.path.join(run_dir, path)
    return inside if os.path.exists(inside) else path


def fid_evaluator(run_dir: str, *, image_size: Optional[int] = None, reference: Optional[str] = None,
                  num_samples: Optional[int] = None, batch_size: Optional[int] = None,
                  num_inference_steps: Optional[int] = None, weights: Optional[str] = None, device=None,
                  progress: bool = True, command: str = "sweep", accelerator=None, model=None,
                  prompts: Optional[str] = None, class_labels: Optional[str] = None,
                  guidance_scale: Optional[float] = None, pipeline: Optional[str] = None):
    """``evaluate(variants)``: FID/KID with the run's evaluation settings (config.yaml ``eval``, or the launch
    plugin's lawa_eval.yaml; overridden by the arguments), against reference stats that ``fid.reference_stats``
    takes from its cache when present. With ``accelerator`` (several processes) the samples are split across the
    processes; every process gets the same result.

    model: the template the variants are loaded into (default: built from the run config's ``model``); a
    conditional one, or prompts / class labels in the settings, make the evaluator conditional (``pipeline``: the
    pipeline folder of a text-to-image run, default eval.pipeline, else the run folder when it is one)."""
    import functools

    from lawa_diffusion.config.base import from_mapping
    from lawa_diffusion.config.fid import FIDConfig
    from lawa_diffusion.evaluation import fid, sampling

    config = runfolder.read_config(run_dir)
    ev = dict(config.get("eval") or {})
    given = {"num_samples": num_samples, "batch_size": batch_size, "num_inference_steps": num_inference_steps,
             "prompts": prompts, "class_labels": class_labels, "guidance_scale": guidance_scale, "pipeline": pipeline}
    ev.update({k: v for k, v in given.items() if v is not None})
    fields = {f.name for f in dataclasses.fields(FIDConfig)}
    settings = {k: v for k, v in ev.items() if k in fields}
    if reference:
        settings["reference"] = reference
    e = from_mapping(FIDConfig, settings, f"{command} eval settings")
    weights = weights or ev.get("inception_weights")
    if model is None and (e.conditional or _conditional_config(config.get("model"))):
        model = run_model(config, fid.resolve_device(device, accelerator))
    if e.conditional or _needs_conditions(model):
        return _conditional(run_dir, config, ev, e, model, reference, weights, device, progress, command, accelerator)
    check(bool(reference or ev.get("reference")), f"{command} needs the FID reference and {run_dir!r} has no "
                                                  "config.yaml with eval.reference; pass --reference")
    stats = fid.reference_stats(e.reference, image_size=image_size, num_images=ev.get("reference_num_images"),
                                device=device, weights=weights, progress=progress, cfg=e, accelerator=accelerator)
    return functools.partial(sampling.evaluate_variants, reference=stats, cfg=e, weights=weights, device=device,
                             scheduler_config=_noise_scheduler_config(config), progress=progress,
                             accelerator=accelerator)


def _conditional_config(model: Optional[dict]) -> bool:
    """Whether a model config (the run config's ``model`` section) describes a model that needs conditions."""
    if not isinstance(model, dict) or not model:
        return False
    from lawa_diffusion.posthoc.saved_weights import model_class

    return (model_class(model).__name__ != "UNet2DModel" or model.get("num_class_embeds") is not None
            or model.get("class_embed_type") is not None)


def _needs_conditions(model) -> bool:
    if model is None:
        return False
    from lawa_diffusion.evaluation.conditional import needs_conditioning

    return needs_conditioning(model)


def _conditional(run_dir: str, config: dict, ev: dict, e, model, reference, weights, device, progress: bool,
                 command: str, accelerator):
    """The conditional evaluator of a run: its prompts (or class labels), guidance, seed and pipeline parts."""
    from lawa_diffusion.evaluation.conditional_evaluator import conditional_evaluation, conditions_of

    check(model is not None, f"{command} needs the model class of {run_dir!r} to sample it with conditions, and its "
          f"snapshots were not given and {runfolder.CONFIG_NAME} / {runfolder.PLUGIN_EVAL_NAME} has no model section; "
          "keep the run's config beside its snapshots")
    e = dataclasses.replace(e, prompts=_in_run(e.prompts, run_dir), pipeline=_in_run(e.pipeline, run_dir))
    if e.pipeline is None and os.path.isfile(os.path.join(run_dir, "model_index.json")):
        e = dataclasses.replace(e, pipeline=run_dir)  # a diffusers script saves its final pipeline in the run
    prompt_set = conditions_of(e, model, f"the model of run {run_dir!r}")
    check(bool(reference or ev.get("reference")) or prompt_set.reference is not None,
          f"{command} needs the FID reference of {run_dir!r}: its prompts come without images and its eval settings "
          "name no reference; pass --reference")
    evaluation = conditional_evaluation(
        e, unet=model, prompt_set=prompt_set, reference=reference, weights=weights, device=device,
        accelerator=accelerator, progress=progress, reference_num_images=ev.get("reference_num_images"),
        scheduler_config=None if e.pipeline is not None else _noise_scheduler_config(config))
    return evaluation.evaluate
