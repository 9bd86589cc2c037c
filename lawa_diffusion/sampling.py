"""Paired sampling of weight variants: diffusers samplers, common random numbers, Inception features per variant.

Sample ``i`` of every variant starts from the same noise (seeded by ``(seed, i)`` only), so the FID difference
between two variants at one evaluation is a paired comparison. The metric maths (torch-fidelity) are a separate
step, :func:`variant_metrics`, so that a caller can run them off the training loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from lawa_diffusion import fid
from lawa_diffusion.config import FIDConfig, check
from lawa_diffusion.inception import Extractor, load_extractor

_D = FIDConfig()  # defaults live in config.py

SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm": "DPMSolverMultistepScheduler",
                     "euler": "EulerDiscreteScheduler"}


def build_scheduler(scheduler: Any = _D.scheduler, scheduler_config: Optional[Mapping] = None):
    """A fresh diffusers scheduler: a name from SCHEDULER_CLASSES built from ``scheduler_config`` (the training
    noise scheduler's config; diffusers defaults when None), or a copy of a scheduler object."""
    import diffusers

    if not isinstance(scheduler, str):
        return type(scheduler).from_config(scheduler.config)
    check(scheduler in SCHEDULER_CLASSES, f"scheduler must be one of {', '.join(SCHEDULER_CLASSES)}, got {scheduler!r}")
    cls = getattr(diffusers, SCHEDULER_CLASSES[scheduler])
    return cls.from_config(dict(scheduler_config)) if scheduler_config is not None else cls()


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index``: independent of batch size and process split (common random numbers).

    Mixed by NumPy's SeedSequence into 32 bits (torch's CPU generator keeps only the low 32 bits of a seed)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint32)[0])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """diffusers' conversion of model output in [-1, 1]: (x/2 + 0.5).clamp(0, 1) * 255, rounded."""
    return ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)


def image_shape(unet: nn.Module) -> tuple:
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, *size)


@torch.no_grad()
def sample_uint8(unet: nn.Module, scheduler, indices: Sequence[int], *, seed: int = _D.seed,
                 num_inference_steps: int = _D.num_inference_steps, eta: float = _D.eta,
                 precision: Optional[str] = None) -> torch.Tensor:
    """uint8 [len(indices), C, H, W] (CPU) from ``unet``; sample i's noise depends only on (seed, i).

    precision: "bf16" / "fp16" runs the UNet under autocast (the sampler's arithmetic stays float32)."""
    from diffusers.utils.torch_utils import randn_tensor

    from lawa_diffusion.fast_path import autocast

    param = next(unet.parameters())
    generators = [torch.Generator("cpu").manual_seed(sample_seed(seed, i)) for i in indices]
    x = randn_tensor((len(indices), *image_shape(unet)), generator=generators, device=param.device, dtype=param.dtype)
    scheduler.set_timesteps(num_inference_steps, device=param.device)
    x = x * scheduler.init_noise_sigma
    extra = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        with autocast(param.device, precision):
            eps = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(eps, t, x, generator=generators, **extra).prev_sample
    return to_uint8(x).cpu()


@contextlib.contextmanager
def variant_unet(spec, accelerator) -> Iterator[nn.Module]:
    """The UNet of a variant (a module, or a zero-arg callable giving a context manager that yields it), in eval mode."""
    cm = contextlib.nullcontext(spec) if isinstance(spec, nn.Module) else spec()
    with cm as unet:
        check(isinstance(unet, nn.Module), f"a variant must be an nn.Module or a callable whose context manager "
              f"yields one, got {type(unet).__name__}")
        if accelerator is not None:
            unet = accelerator.unwrap_model(unet)
        was_training = unet.training
        unet.eval()
        try:
            yield unet
        finally:
            unet.train(was_training)


# --------------------------------------------------------------------------- paired evaluation


@dataclasses.dataclass
class Sampled:
    """One variant's samples as features, before the metric maths.

    features: {layer: float32 [num_samples, D]} on the CPU, in sample order.
    seconds: wall time of sampling and feature extraction on this process.
    meta: what the result rows record about the sampling (num_samples, scheduler, steps, seed, weights, reference).
    """

    features: dict
    seconds: float
    meta: dict


def sample_variants(variants: Mapping[str, Any], extractor: Extractor, *, reference_key: Optional[str] = None,
                    num_samples: int = _D.num_samples, batch_size: int = _D.batch_size, scheduler: Any = _D.scheduler,
                    scheduler_config: Optional[Mapping] = None, num_inference_steps: int = _D.num_inference_steps,
                    seed: int = _D.seed, eta: float = _D.eta, accelerator=None, progress: bool = True,
                    isc: bool = False, precision: Optional[str] = None) -> dict:
    """{name: Sampled} for each variant, every variant from the same noise; all processes take part and all
    get every feature (the samples are split between processes). precision: autocast of the UNet
    (:func:`sample_uint8`)."""
    layers = fid.feature_layers(extractor, isc)
    show = progress and fid.is_main(accelerator)
    meta = dict(num_samples=num_samples, inception_sha256=extractor.sha256, reference_key=reference_key,
                scheduler=scheduler if isinstance(scheduler, str) else type(scheduler).__name__,
                num_inference_steps=num_inference_steps, seed=seed)

    out = {}
    for name, spec in variants.items():
        started = time.perf_counter()
        with variant_unet(spec, accelerator) as unet:
            def images_of(batch, unet=unet):
                return sample_uint8(unet, build_scheduler(scheduler, scheduler_config), batch, seed=seed, eta=eta,
                                    num_inference_steps=num_inference_steps, precision=precision)

            compute = functools.partial(fid.batched_features, images_of, extractor, layers, batch_size=batch_size,
                                        desc=f"sampling {name}", show=show)
            stacked = fid.map_split(num_samples, compute, accelerator)
        out[name] = Sampled(fid.split_layers(stacked, layers), time.perf_counter() - started, dict(meta))
    return out


def variant_metrics(sampled: Sampled, reference: fid.ReferenceStats, extractor: Extractor, *, kid: bool = _D.kid,
                    kid_subsets: int = _D.kid_subsets, kid_subset_size: int = _D.kid_subset_size,
                    isc: bool = False) -> dict:
    """{fid, kid_mean, kid_std, ..., sample_seconds, metric_seconds} of one sampled variant."""
    out = fid.feature_metrics(sampled.features, reference, extractor, kid=kid, kid_subsets=kid_subsets,
                              kid_subset_size=kid_subset_size, isc=isc)
    out.update(sampled.meta, sample_seconds=sampled.seconds)
    return out


def evaluate_variants(variants: Mapping[str, Any], reference, *, num_samples: int = _D.num_samples,
                      batch_size: int = _D.batch_size, scheduler: Any = _D.scheduler,
                      num_inference_steps: int = _D.num_inference_steps, seed: int = _D.seed, kid: bool = _D.kid,
                      accelerator=None, weights=None, progress: bool = True, scheduler_config: Optional[Mapping] = None,
                      eta: float = _D.eta, isc: bool = False, kid_subsets: int = _D.kid_subsets,
                      kid_subset_size: int = _D.kid_subset_size, device=None) -> dict:
    """FID/KID of each weight variant on the same noise and seeds (common random numbers).

    variants: name -> UNet2DModel, or a zero-arg callable returning a context manager that yields the UNet
    with those weights swapped in. reference: ReferenceStats or any ``fid.reference_stats`` source.
    Returns {name: {fid, kid_mean, kid_std, num_samples, inception_sha256, ...}} on every process.
    """
    fid.warn_if_few(num_samples)
    check(len(variants) >= 1, "variants must name at least one model to evaluate")
    extractor = load_extractor(weights, device=fid.resolve_device(device, accelerator), isc=isc)
    if not isinstance(reference, fid.ReferenceStats):
        reference = fid.reference_stats(reference, weights=extractor, accelerator=accelerator, progress=progress,
                                        image_size=_reference_size(variants, accelerator))
    check_reference(reference, extractor)
    sampled = sample_variants(variants, extractor, reference_key=reference.key, num_samples=num_samples,
                              batch_size=batch_size, scheduler=scheduler, scheduler_config=scheduler_config,
                              num_inference_steps=num_inference_steps, seed=seed, eta=eta, accelerator=accelerator,
                              progress=progress, isc=isc)
    return {name: variant_metrics(s, reference, extractor, kid=kid, kid_subsets=kid_subsets,
                                  kid_subset_size=kid_subset_size, isc=isc) for name, s in sampled.items()}


def check_reference(reference: fid.ReferenceStats, extractor: Extractor) -> None:
    check(reference.inception_sha256 in (None, extractor.sha256), f"reference statistics were made with weights "
          f"sha256 {str(reference.inception_sha256)[:16]}..., not the weights in use ({extractor.sha256[:16]}...); "
          "recompute them with the same weights")


def _reference_size(variants: Mapping[str, Any], accelerator) -> Optional[int]:
    first = next(iter(variants.values()))
    with variant_unet(first, accelerator) as unet:
        shape = image_shape(unet)
    return shape[1] if shape[1] == shape[2] else None
