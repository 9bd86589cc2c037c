"""What FID tracking keeps to sample a conditional model between evaluations: the pipeline parts (VAE, text
encoder, tokenizer, scheduler; loaded once and kept resident), one ``ConditionalSampler`` (the prompt embeddings
are made once) and the reference statistics (computed once). Only the denoiser changes between variants and
evaluations; sample ``i`` of every variant starts from the same noise and takes the same condition.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

TRAINER_OPTIONS = {"prompts": "eval.prompts", "class_labels": "eval.class_labels"}


def conditioning_kind(unet) -> Optional[str]:
    """"text", "class" or None: what ``unet`` needs to be sampled (``evaluation.conditional.conditioning_kind``)."""
    from lawa_diffusion.evaluation.conditional import conditioning_kind as kind_of

    return kind_of(unet)


def model_conditioning(model_cls, model_config) -> Optional[str]:
    """What a model of ``model_cls`` / ``model_config`` is conditioned on: "text", "class" or None (the model is
    built on the meta device: no memory, no random numbers drawn)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_cls.from_config(model_config)
    return conditioning_kind(model)


def text_prompt_set(prompts: Sequence[str], source: str):
    """A prompt set of the given prompts, in order (no reference images)."""
    from lawa_diffusion.evaluation.prompts import PromptSet

    return PromptSet(prompts=tuple(str(p) for p in prompts), source=source)


def prompt_set_of(e, unet, options: Mapping[str, str] = TRAINER_OPTIONS):
    """The conditions ``e`` (an ``FIDConfig``) names for ``unet`` (unwrapped): its prompts (a text file, a captioned
    image folder or a saved dataset) or class labels; one sentence naming the option to set (``options``: as the
    trainer's config or the plugin's flags name them) when none fit."""
    from lawa_diffusion.evaluation.conditional_evaluator import conditions_of

    return conditions_of(e, unet, "the model", options)


class ConditionalEval:
    """Sampling and reference of a conditional model's evaluations (see the module docstring).

    parts: ``ConditionalPipelineParts`` whose ``unet`` is the module the variants' weights are swapped into;
    sampler: the ``ConditionalSampler`` of the prompt set; reference: its ``ReferenceStats``."""

    def __init__(self, parts, sampler, reference):
        self.parts, self.sampler, self.reference = parts, sampler, reference

    @classmethod
    def prepare(cls, e, unet, noise_scheduler, extractor, accelerator, *, parts=None, prompt_set=None,
                progress: bool = True) -> "ConditionalEval":
        """``e``: the ``EvalConfig``. ``unet``: the (unwrapped) module the variants are sampled in. parts: the
        pipeline parts (default: ``unet`` alone with the training ``noise_scheduler``: a pixel-space model).
        prompt_set: the conditions (default: what ``e`` names). Reference: ``e.reference``, or without one the
        prompt set's own held-out images."""
        from lawa_diffusion.evaluation import conditional, fid

        if parts is None:
            parts = conditional.ConditionalPipelineParts(unet=unet, scheduler=noise_scheduler)
        if prompt_set is None:
            prompt_set = prompt_set_of(e, parts.unet)
        sampler = conditional.ConditionalSampler(parts, prompt_set, guidance_scale=e.guidance_scale,
                                                 num_inference_steps=e.num_inference_steps, seed=e.seed, eta=e.eta,
                                                 scheduler=e.scheduler, encode_batch_size=e.batch_size)
        size = (sampler.height, sampler.width)
        if e.reference:
            stats = fid.reference_stats(e.reference, image_size=size[0] if size[0] == size[1] else None, cfg=e,
                                        num_images=e.reference_num_images, weights=extractor, accelerator=accelerator,
                                        progress=progress)
        else:
            stats = conditional.prompt_set_reference_stats(prompt_set, extractor, size=size, batch_size=e.batch_size,
                                                           features_max=e.reference_features_max,
                                                           accelerator=accelerator, progress=progress)
        return cls(parts, sampler, fid.check_weights(stats, extractor.sha256))

    @property
    def prompt_set(self):
        return self.sampler.prompt_set

    def row_info(self) -> dict:
        """Columns every metrics row of these samples gets: the kind of conditions and their fingerprint (and the
        guidance scale of guided text prompts)."""
        info = {"conditioning": self.prompt_set.kind, "prompts_sha256": self.prompt_set.fingerprint()}
        if self.sampler.guided:
            info["guidance_scale"] = self.sampler.guidance_scale
        return info

    def sample(self, variants: Mapping[str, Any], extractor, e, accelerator, *, progress: bool = True,
               precision: Optional[str] = None) -> dict:
        """{name: fid.Sampled} of each variant (every process samples its share and gets all features)."""
        from lawa_diffusion.evaluation import conditional, sampling

        with sampling.autocast(accelerator.device, precision):
            return conditional.sampled_features_conditional(
                self.parts, variants, None, extractor, num_samples=e.num_samples, batch_size=e.batch_size,
                reference_key=self.reference.key, accelerator=accelerator, progress=progress, sampler=self.sampler)
