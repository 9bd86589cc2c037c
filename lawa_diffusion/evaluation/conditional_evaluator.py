"""The evaluator of a conditional model, wired once from ``FIDConfig`` settings: its pipeline parts, its
conditions (prompts or class labels), its sampler, the feature extractor and the reference statistics.

``lawa-diffusion fid``, the after-training commands and an online evaluation all call
:func:`conditional_evaluation` with the same settings, so all of them sample the same images: sample ``i``
from the noise of ``(cfg.seed, i)``, conditioned on entry ``i % len(prompt_set)``, with the same guidance.

Which reference, when none is passed: the images paired with the prompts (a captioned image folder or a
saved dataset), else ``cfg.reference``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Union

from torch import nn

from lawa_diffusion.config.base import check
from lawa_diffusion.config.fid import FIDConfig
from lawa_diffusion.evaluation import fid
from lawa_diffusion.evaluation.conditional import (
    CLI_OPTIONS,
    DEFAULT_RESIZE_MODE,
    ConditionalPipelineParts,
    ConditionalSampler,
    _denoiser_path,
    _num_samples,
    _read_json,
    _unwrapped,
    check_conditions,
    conditioning_kind,
    conditioning_message,
    evaluate_variants_conditional,
    load_denoiser_folder,
    prompt_set_reference_stats,
)
from lawa_diffusion.evaluation.inception import Extractor, load_extractor
from lawa_diffusion.evaluation.prompts import PromptSet, class_label_set, load_prompt_set
from lawa_diffusion.evaluation.sampling import build_scheduler
from lawa_diffusion.utils.output import is_main_process

ALL_LABELS = "all"


def denoiser_template(folder: str | os.PathLike) -> nn.Module:
    """The model of a save_pretrained folder built on the meta device (its config only, no weights read): what
    it is conditioned on can be told before anything heavy is loaded."""
    import diffusers
    from accelerate import init_empty_weights

    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"denoiser folder {folder!r} has no config.json; pass a folder written by "
                                "save_pretrained")
    config = _read_json(config_path, "model config")
    name = config.get("_class_name")
    cls = getattr(diffusers, str(name), None)
    check(isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config"),
          f"denoiser folder {folder!r} holds a {name or 'non-diffusers'} model; pass a folder of a diffusers UNet")
    with init_empty_weights():
        return cls.from_config(config)


def conditions_of(cfg: FIDConfig, unet: Optional[nn.Module] = None, where: str = "the model",
                  options: Mapping[str, str] = CLI_OPTIONS) -> Optional[PromptSet]:
    """The prompt set of ``cfg`` (``prompts`` with ``num_reference`` / ``caption_column``, or ``class_labels``
    of ``unet``'s classes), None when it names neither; checked against what ``unet`` is conditioned on when
    given (one sentence naming the option to add or drop)."""
    if cfg.prompts is not None:
        prompt_set = load_prompt_set(cfg.prompts, num_reference=cfg.num_reference, caption_column=cfg.caption_column)
    elif cfg.class_labels is not None:
        check(unet is not None, "class labels are read against the model's classes; pass the model (unet=)")
        check(conditioning_kind(unet) == "class", conditioning_message(unet, where, options))
        num = getattr(_unwrapped(unet).config, "num_class_embeds", None)
        labels = cfg.class_labels
        every = isinstance(labels, str) and labels.strip().lower() == ALL_LABELS
        check(num is not None or not every, f"{options['class_labels']} all needs the number of classes, and {where} "
              f"has no num_class_embeds; pass the class numbers instead, e.g. {options['class_labels']} 0,1,2")
        prompt_set = class_label_set(labels, num if num is not None else 2**31 - 1)
    else:
        prompt_set = None
    if unet is not None:
        check_conditions(unet, prompt_set, where, options)
    return prompt_set


@dataclasses.dataclass
class ConditionalEvaluation:
    """A conditional model's evaluation, ready: ``evaluate(variants)`` returns {name: FID/KID row} (the rows of
    ``sampling.evaluate_variants``, with the conditions' settings) of every variant on the same noise and
    conditions. variants: name -> anything :meth:`ConditionalPipelineParts.denoiser` takes (a module, a
    zero-arg callable giving a context manager that yields one, a state dict, a folder)."""

    parts: ConditionalPipelineParts
    sampler: ConditionalSampler
    extractor: Extractor
    reference: fid.ReferenceStats
    cfg: FIDConfig
    num_samples: int
    accelerator: Any = None
    progress: bool = True
    isc: bool = False

    @property
    def prompt_set(self) -> PromptSet:
        return self.sampler.prompt_set

    def evaluate(self, variants: Mapping[str, Any]) -> dict:
        return evaluate_variants_conditional(self.parts, variants, None, self.reference, num_samples=self.num_samples,
                                             weights=self.extractor, accelerator=self.accelerator,
                                             progress=self.progress, isc=self.isc, cfg=self.cfg, sampler=self.sampler)

    __call__ = evaluate


def _denoiser_folder(unet: Union[str, os.PathLike, None], pipeline: Optional[str]) -> str:
    if unet is not None:
        return _denoiser_path(pipeline, unet)
    check(pipeline is not None, "a conditional evaluation needs a denoiser (unet=) or a pipeline folder (pipeline=)")
    return os.path.join(pipeline, "unet")


def conditional_evaluation(cfg: FIDConfig, *, unet: Union[str, os.PathLike, nn.Module, None] = None,
                           pipeline: Optional[str] = None, prompt_set: Optional[PromptSet] = None,
                           reference=None, num_samples: Optional[int] = None, weights=None, device=None,
                           dtype=None, accelerator=None, progress: bool = True, isc: bool = False, cache: bool = True,
                           scheduler: Optional[str] = None, scheduler_config: Optional[Mapping] = None,
                           height: Optional[int] = None, width: Optional[int] = None,
                           negative_prompt: Optional[str] = None, resize_mode: Optional[str] = None,
                           reference_num_images: Optional[int] = None) -> ConditionalEvaluation:
    """The :class:`ConditionalEvaluation` of a conditional model under ``cfg`` (seed, steps, eta, guidance_scale,
    prompts / class_labels, num_reference, caption_column, batch_size, KID settings, reference).

    unet: the denoiser: a module, a model folder, a subfolder name of ``pipeline`` (``unet_ema``), or None for
        the pipeline's own ``unet``. pipeline: a diffusers pipeline folder (default ``cfg.pipeline``) whose
        scheduler, VAE, text encoder(s) and tokenizer(s) sample it; without one (class-conditional UNets only)
        ``scheduler`` (default ``cfg.scheduler``) is built from ``scheduler_config`` (diffusers' defaults when
        None). With a pipeline, ``scheduler`` None is the pipeline's own scheduler class.
    prompt_set: the conditions already loaded (default: from ``cfg``, see :func:`conditions_of`).
    reference: the FID reference; None: the prompt set's own images when it has them, else ``cfg.reference``.
        resize_mode: how reference images reach the sample size (None: "resize" for the prompt set's images,
        ``cfg.resize_mode`` for any other reference).
    num_samples: images per variant (None: ``cfg.num_samples``). dtype: of the pipeline's modules ("fp16",
    "bf16", "fp32"; None: as saved). height / width: of the samples (None: the denoiser's sample size).
    """
    pipeline = os.fspath(pipeline) if pipeline is not None else cfg.pipeline
    if isinstance(unet, nn.Module):
        template, folder, where = unet, None, f"the {type(_unwrapped(unet)).__name__}"
    else:
        folder = _denoiser_folder(unet, pipeline)
        template, where = denoiser_template(folder), f"model folder {folder!r}"
    if prompt_set is None:
        prompt_set = conditions_of(cfg, template, where)
    else:
        check_conditions(template, prompt_set, where)
    kind = conditioning_kind(template)
    check(kind is not None, f"{where} is an unconditional {type(_unwrapped(template)).__name__}; score it with "
          "lawa_diffusion.evaluation.sampling.evaluate_variants (lawa-diffusion fid without --prompts, --class-labels "
          "and --pipeline)")
    check(kind != "text" or pipeline is not None, f"{where} is a text-conditioned "
          f"{type(_unwrapped(template)).__name__}, sampled with a pipeline's VAE, text encoder and tokenizer; add "
          "--pipeline DIR, the diffusers pipeline folder it was trained in")
    device = fid.resolve_device(device, accelerator)
    denoiser = unet if isinstance(unet, nn.Module) else folder
    if pipeline is not None:
        parts = ConditionalPipelineParts.from_pretrained(pipeline, unet=denoiser, device=device, dtype=dtype)
        sampler_scheduler = scheduler
    else:
        module = denoiser if isinstance(denoiser, nn.Module) else load_denoiser_folder(denoiser)
        parts = ConditionalPipelineParts(unet=module, scheduler=build_scheduler(scheduler or cfg.scheduler,
                                                                                scheduler_config)).to(device, dtype)
        sampler_scheduler = None
    show = progress and is_main_process(accelerator)
    sampler = ConditionalSampler(parts, prompt_set, guidance_scale=cfg.guidance_scale,
                                 num_inference_steps=cfg.num_inference_steps, height=height, width=width, seed=cfg.seed,
                                 eta=cfg.eta, scheduler=sampler_scheduler, negative_prompt=negative_prompt,
                                 encode_batch_size=cfg.batch_size, progress=show)
    num_samples = _num_samples(cfg.num_samples if num_samples is None else num_samples, prompt_set)
    extractor = load_extractor(weights, device=device, isc=isc)
    size = (sampler.height, sampler.width)
    if reference is None and prompt_set.reference is not None:
        stats = prompt_set_reference_stats(prompt_set, extractor, size=size, resize_mode=resize_mode or
                                           DEFAULT_RESIZE_MODE, batch_size=cfg.batch_size,
                                           features_max=cfg.reference_features_max, accelerator=accelerator,
                                           progress=progress, cache=cache)
    else:
        settings = fid.settings(cfg, resize_mode=resize_mode) if resize_mode else cfg
        stats = fid.reference_stats(cfg.reference if reference is None else reference,
                                    image_size=size[0] if size[0] == size[1] else None,
                                    num_images=reference_num_images, weights=extractor, cache=cache,
                                    accelerator=accelerator, progress=progress, cfg=settings)
    return ConditionalEvaluation(parts, sampler, extractor, fid.check_weights(stats, extractor.sha256), cfg,
                                 num_samples, accelerator, progress, isc)
