"""Paired sampling of weight variants: diffusers samplers, common random numbers, Inception features per variant.

Sample ``i`` of every variant starts from the same noise (seeded by ``(seed, i)`` only), so the FID difference
between two variants at one evaluation is a paired comparison. The metric maths (torch-fidelity) are a separate
step, :func:`lawa_diffusion.evaluation.fid.metrics_of`, so that a caller can run them off the training loop.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import time
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from lawa_diffusion.config.base import check
from lawa_diffusion.config.fid import FIDConfig
from lawa_diffusion.evaluation import fid
from lawa_diffusion.evaluation.inception import Extractor
from lawa_diffusion.utils.output import is_main_process

_D = FIDConfig()  # defaults live in config.py
SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm": "DPMSolverMultistepScheduler",
                     "euler": "EulerDiscreteScheduler"}


def build_scheduler(scheduler: str = _D.scheduler, scheduler_config: Optional[Mapping] = None):
    """A fresh diffusers scheduler: a name from SCHEDULER_CLASSES built from ``scheduler_config`` (the training
    noise scheduler's config; diffusers defaults when None)."""
    import diffusers

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

    param = next(unet.parameters())
    generators = [torch.Generator("cpu").manual_seed(sample_seed(seed, i)) for i in indices]
    x = randn_tensor((len(indices), *image_shape(unet)), generator=generators, device=param.device, dtype=param.dtype)
    scheduler.set_timesteps(num_inference_steps, device=param.device)
    x = x * scheduler.init_noise_sigma
    extra = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        with autocast(param.device, precision):
            eps = unet(scheduler.scale_model_input(x, t), t).sample
        # in the sample's dtype: DPM-Solver and Euler cast their result (the next x) to the model output's dtype
        x = scheduler.step(eps.to(x.dtype), t, x, generator=generators, **extra).prev_sample
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


def sample_variants(variants: Mapping[str, Any], extractor: Extractor, *, reference_key: Optional[str] = None,
                    scheduler_config: Optional[Mapping] = None, accelerator=None, progress: bool = True,
                    isc: bool = False, cfg: Optional[FIDConfig] = None, precision: Optional[str] = None,
                    **options) -> dict:
    """{name: fid.Sampled} for each variant, every variant from the same noise; all processes take part and all
    get every feature (the samples are split between processes). ``options`` override fields of ``cfg``
    (num_samples, batch_size, scheduler, num_inference_steps, seed, eta); ``precision`` is the UNet's
    autocast (:func:`sample_uint8`)."""
    cfg = fid.settings(cfg, **options)
    layers = fid.feature_layers(extractor, isc)
    show = progress and is_main_process(accelerator)
    meta = dict(num_samples=cfg.num_samples, inception_sha256=extractor.sha256, reference_key=reference_key,
                scheduler=cfg.scheduler, num_inference_steps=cfg.num_inference_steps, seed=cfg.seed)

    out = {}
    for name, spec in variants.items():
        started = time.perf_counter()
        with variant_unet(spec, accelerator) as unet:
            def images_of(batch, unet=unet):
                return sample_uint8(unet, build_scheduler(cfg.scheduler, scheduler_config), batch, seed=cfg.seed,
                                    eta=cfg.eta, num_inference_steps=cfg.num_inference_steps, precision=precision)

            compute = functools.partial(fid.batched_features, images_of, extractor, layers, batch_size=cfg.batch_size,
                                        desc=f"sampling {name}", show=show)
            stacked = fid.map_split(cfg.num_samples, compute, accelerator)
        out[name] = fid.Sampled(fid.split_layers(stacked, layers), time.perf_counter() - started, dict(meta),
                                extractor.device)
    return out


def evaluate_variants(variants: Mapping[str, Any], reference, *, accelerator=None, weights=None, progress: bool = True,
                      scheduler_config: Optional[Mapping] = None, isc: bool = False, device=None,
                      cfg: Optional[FIDConfig] = None, **options) -> dict:
    """FID/KID of each weight variant on the same noise and seeds (common random numbers).

    variants: name -> UNet2DModel, or a zero-arg callable returning a context manager that yields the UNet
    with those weights swapped in. reference: ReferenceStats or any ``fid.reference_stats`` source.
    ``options`` override fields of ``cfg`` (default ``FIDConfig()``).
    Returns {name: {fid, kid_mean, kid_std, num_samples, inception_sha256, ...}} on every process.
    """
    fid.warn_if_few(options.get("num_samples", (cfg or _D).num_samples))
    cfg = fid.settings(cfg, **options)
    check(len(variants) >= 1, "variants must name at least one model to evaluate")
    extractor, reference = fid.prepare(reference, weights=weights, device=device, accelerator=accelerator, isc=isc,
                                       progress=progress, image_size=lambda: _reference_size(variants, accelerator))
    sampled = sample_variants(variants, extractor, reference_key=reference.key, scheduler_config=scheduler_config,
                              accelerator=accelerator, progress=progress, isc=isc, cfg=cfg)
    return {name: fid.metrics_of(s, reference, cfg) for name, s in sampled.items()}


def _reference_size(variants: Mapping[str, Any], accelerator) -> Optional[int]:
    first = next(iter(variants.values()))
    with variant_unet(first, accelerator) as unet:
        shape = image_shape(unet)
    return shape[1] if shape[1] == shape[2] else None


PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def autocast(device, precision: Optional[str]) -> Any:
    """autocast to the training precision ("bf16", "fp16") on ``device``; nothing for "no" or None."""
    dtype = PRECISION_DTYPES.get(precision or "no")
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield
