"""Paired sampling and FID of conditional diffusion models: text-to-image pipelines (classifier-free guidance)
and class-conditional UNets.

As in :mod:`lawa_diffusion.evaluation.sampling`, sample ``i`` of every variant starts from the same noise, drawn on the
CPU from a generator seeded by ``(seed, i)`` only, and is conditioned on entry ``i % len(prompt_set)``; so the
images do not depend on the batch size, the process split or the device, and the FID difference between two
variants is a paired comparison. The pipeline's other parts (VAE, text encoder, tokenizer, scheduler) are loaded
once (:class:`ConditionalPipelineParts`); the prompts are encoded once per :class:`ConditionalSampler`, and only
the denoiser changes between variants. Features and metrics go through :mod:`lawa_diffusion.evaluation.fid`, as for
unconditional models.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import os
import time
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from lawa_diffusion.config.base import check
from lawa_diffusion.config.fid import FIDConfig
from lawa_diffusion.evaluation import fid
from lawa_diffusion.evaluation.inception import Extractor
from lawa_diffusion.evaluation.prompts import PromptSet
from lawa_diffusion.evaluation.sampling import build_scheduler, sample_seed, to_uint8, variant_unet
from lawa_diffusion.utils.output import is_main_process

_D = FIDConfig()  # defaults live in config.py

DEFAULT_GUIDANCE_SCALE = 7.5  # StableDiffusionPipeline.__call__'s default
DEFAULT_RESIZE_MODE = "resize"  # reference photos are larger than the samples: scale, then centre-crop
PIPELINE_PARTS = ("unet", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
PIPELINE_SETTINGS = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
UNSUPPORTED_PARTS = {"transformer": "a transformer denoiser (DiT, SD3, PixArt, Flux)",
                     "prior": "a prior (unCLIP, Kandinsky, Wuerstchen)"}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
EMBEDDINGS_ON_DEVICE_MAX_BYTES = 1 << 30  # larger prompt sets keep their embeddings on the CPU
SAMPLER_OPTIONS = ("guidance_scale", "height", "width", "scheduler", "negative_prompt")


# --------------------------------------------------------------------------- what a model needs


def _unwrapped(module: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP / torch.compile wrappers."""
    module = getattr(module, "_orig_mod", module)
    while isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return getattr(module, "_orig_mod", module)


def conditioning_kind(unet: nn.Module) -> Optional[str]:
    """"text" when the forward needs ``encoder_hidden_states`` (UNet2DConditionModel), "class" for a UNet with
    class embeddings (``num_class_embeds`` / ``class_embed_type``), None for an unconditional model."""
    model = _unwrapped(unet)
    try:
        parameter = inspect.signature(model.forward).parameters.get("encoder_hidden_states")
    except (TypeError, ValueError):
        parameter = None
    if parameter is not None and parameter.default is inspect.Parameter.empty:
        return "text"
    config = getattr(model, "config", None)
    if config is not None and (getattr(config, "num_class_embeds", None) is not None
                               or getattr(config, "class_embed_type", None) is not None):
        return "class"
    return None


def needs_conditioning(unet: nn.Module) -> bool:
    """Whether ``unet`` cannot be sampled without prompts or class labels."""
    return conditioning_kind(unet) is not None


CLI_OPTIONS = {"prompts": "--prompts", "class_labels": "--class-labels"}  # how the conditions are named to a user


def conditioning_message(unet: nn.Module, where: str = "the model", options: Mapping[str, str] = CLI_OPTIONS) -> str:
    """One sentence telling the user which option a conditional (or unconditional) ``unet`` needs; ``options``
    names the two options as the caller takes them (command line, config keys, plugin flags)."""
    model = _unwrapped(unet)
    name = type(model).__name__
    kind = conditioning_kind(model)
    if kind == "text":
        return (f"{where} is a text-conditioned {name} (its forward needs encoder_hidden_states); set "
                f"{options['prompts']} to a text file with one prompt per line, or an image folder with "
                "metadata.jsonl captions")
    if kind == "class":
        num = getattr(model.config, "num_class_embeds", None)
        below = f" below {num}" if num is not None else ""
        return (f"{where} is a class-conditional {name} (num_class_embeds {num}); set {options['class_labels']} to "
                f"all or a comma-separated list of class numbers{below}")
    return f"{where} is an unconditional {name}; drop {options['prompts']} / {options['class_labels']}"


def check_conditions(unet: nn.Module, prompt_set: Optional[PromptSet], where: str = "the model",
                     options: Mapping[str, str] = CLI_OPTIONS) -> None:
    """ValueError with :func:`conditioning_message` unless ``prompt_set`` fits what ``unet`` is conditioned on."""
    kind = conditioning_kind(unet)
    given = None if prompt_set is None else prompt_set.kind
    check(kind == given, conditioning_message(unet, where, options))
    if kind == "class":
        num = getattr(_unwrapped(unet).config, "num_class_embeds", None)
        check(num is None or max(prompt_set.class_labels) < num, f"{options['class_labels']} must be below "
              f"num_class_embeds {num} of {where}, got {max(prompt_set.class_labels)}")


# --------------------------------------------------------------------------- the parts of a pipeline


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    check(dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:160]


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path!r} could not be read ({_first_line(e)}); write it again with "
                         "save_pretrained") from None


def load_denoiser_folder(path: str | os.PathLike, *, device=None, dtype=None) -> nn.Module:
    """A diffusers model (UNet2DConditionModel, UNet2DModel, ...) from a save_pretrained folder (an ``unet_ema``,
    a LAWA or synthesised folder), local files only, in eval mode."""
    path = os.fspath(path)
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"denoiser folder {path!r} has no config.json; pass a folder written by "
                                "save_pretrained")
    name = _read_json(config_path, "model config").get("_class_name")
    import diffusers

    cls = getattr(diffusers, str(name), None)
    check(isinstance(cls, type) and issubclass(cls, nn.Module), f"denoiser folder {path!r} holds a "
          f"{name or 'non-diffusers'} model; pass a folder of a diffusers UNet")
    try:
        model = cls.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise ValueError(f"denoiser folder {path!r} could not be loaded ({_first_line(e)}); pass a complete "
                         "save_pretrained folder") from None
    dtype = resolve_dtype(dtype)  # diffusers warns about a dtype argument even when it is None
    model = model.to(device=device) if dtype is None else model.to(device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


NO_VARIANT = ("scheduler", "tokenizer", "tokenizer_2")  # parts without weight files
REFOLDER_FIX = "save the pipeline again with save_pretrained"


def load_part(source: str, name: str, library: str, class_name: str, *, revision: Optional[str] = None,
              variant: Optional[str] = None, fix: str = REFOLDER_FIX) -> Any:
    """The ``name`` part (a ``library`` ``class_name``) of a pipeline folder (or a Hub id already in the local
    cache), from local files only; one sentence ending with ``fix`` when it is not installed, missing or
    unreadable."""
    try:
        cls = getattr(importlib.import_module(library), class_name, None)
    except ImportError:
        cls = None
    check(cls is not None, f"the {name} of {source!r} is a {library} {class_name}, which is not installed here; "
          f"install {library}, or {fix}")
    if os.path.isdir(source) and not os.path.isdir(os.path.join(source, name)):
        raise FileNotFoundError(f"pipeline folder {source!r} names a {name} but has no {name} subfolder; {fix}")
    kwargs = {"subfolder": name, "revision": revision, "local_files_only": True}
    if variant and name not in NO_VARIANT:
        kwargs["variant"] = variant
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError, RuntimeError, EnvironmentError) as e:
        raise ValueError(f"the {name} of {source!r} could not be loaded from local files ({_first_line(e)}); "
                         f"{fix}") from None


def pipeline_guidance_scale(pipeline_class: Optional[str]) -> float:
    """The default ``guidance_scale`` of the diffusers pipeline class named ``pipeline_class`` (7.5 when it has
    none)."""
    import diffusers

    cls = getattr(diffusers, str(pipeline_class), None) if pipeline_class else None
    try:
        default = inspect.signature(cls.__call__).parameters["guidance_scale"].default
    except (AttributeError, KeyError, TypeError, ValueError):
        return DEFAULT_GUIDANCE_SCALE
    return float(default) if isinstance(default, (int, float)) else DEFAULT_GUIDANCE_SCALE


@dataclasses.dataclass
class ConditionalPipelineParts:
    """What a conditional evaluation keeps between variants: the pipeline's ``unet`` (the default denoiser and
    the host into which state-dict variants are loaded), its ``scheduler`` (a template: each batch gets a fresh
    copy), the ``vae`` (None: the denoiser works on pixels), the text encoder(s) and tokenizer(s) (None for
    class-conditional models; ``text_encoder_2`` / ``tokenizer_2`` for SDXL-style pipelines), ``guidance_scale``
    (the pipeline's default) and ``settings`` (the pipeline config's force_zeros_for_empty_prompt)."""

    unet: nn.Module
    scheduler: Any
    vae: Optional[nn.Module] = None
    text_encoder: Optional[nn.Module] = None
    tokenizer: Any = None
    text_encoder_2: Optional[nn.Module] = None
    tokenizer_2: Any = None
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    settings: dict = dataclasses.field(default_factory=dict)
    folder: Optional[str] = None
    pipeline_class: Optional[str] = None

    def __post_init__(self) -> None:
        for module in (self.vae, self.text_encoder, self.text_encoder_2):
            if module is not None:
                module.eval()
        where = self.folder or "these parts"
        for number, (encoder, tokenizer) in enumerate(self.encoders(all_slots=True), start=1):
            check((encoder is None) == (tokenizer is None), f"text encoder {number} of {where!r} comes without its "
                  "tokenizer (or the other way round); pass both")
        check(conditioning_kind(self.unet) != "text" or self.encoders(), f"the "
              f"{type(_unwrapped(self.unet)).__name__} of {where!r} needs prompts, but there is no text encoder and "
              "tokenizer; pass a text-to-image pipeline folder")
        check(not self.settings.get("requires_aesthetics_score"), f"pipeline {where!r} takes an aesthetic score (an "
              "SDXL refiner), which the conditional evaluator does not sample; pass a text-to-image base pipeline")

    def encoders(self, all_slots: bool = False) -> list:
        """[(text encoder, tokenizer)] in the pipeline's order (the slots left empty dropped)."""
        pairs = [(self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2)]
        return pairs if all_slots else [(e, t) for e, t in pairs if e is not None and t is not None]

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, unet: Union[str, os.PathLike, nn.Module, None] = None,
                        device=None, dtype: Union[str, torch.dtype, None] = None) -> "ConditionalPipelineParts":
        """The parts of a diffusers pipeline folder (model_index.json), local files only.

        unet: the denoiser to use instead of the folder's ``unet``: a subfolder name (``unet_ema``), a model
        folder, or a module. device: default cuda when available. dtype: "fp16", "bf16", "fp32" or a torch dtype
        (default: as saved)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"pipeline folder {folder!r} does not exist; pass a folder written by "
                                    "pipeline.save_pretrained")
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"folder {folder!r} is not a diffusers pipeline (no model_index.json); pass a "
                                    "folder written by pipeline.save_pretrained")
        index = _read_json(index_path, "model_index.json")
        present = {name for name, value in index.items()
                   if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0]}
        for name, what in UNSUPPORTED_PARTS.items():
            check(name not in present, f"pipeline folder {folder!r} has {what}, which the conditional evaluator does "
                  "not sample; pass a single-text-encoder UNet pipeline (Stable Diffusion 1.x/2.x style) or a "
                  "class-conditional UNet pipeline")
        check("unet" in present and "scheduler" in present, f"pipeline folder {folder!r} has no unet and scheduler "
              f"in model_index.json (it has {', '.join(sorted(present)) or 'nothing'}); pass a UNet pipeline folder")
        parts = {name: load_part(folder, name, *index[name]) for name in PIPELINE_PARTS
                 if name in present and not (name == "unet" and unet is not None)}
        if unet is not None:
            parts["unet"] = unet if isinstance(unet, nn.Module) else load_denoiser_folder(_denoiser_path(folder, unet))
        for module in parts.values():
            if isinstance(module, nn.Module) and module is not unet:
                module.eval().requires_grad_(False)
        pipeline_class = index.get("_class_name")
        settings = {k: index[k] for k in PIPELINE_SETTINGS if k in index}
        out = cls(guidance_scale=pipeline_guidance_scale(pipeline_class), settings=settings, folder=folder,
                  pipeline_class=pipeline_class, **parts)
        return out.to(fid.resolve_device(device, None), resolve_dtype(dtype))

    def to(self, device=None, dtype: Union[str, torch.dtype, None] = None) -> "ConditionalPipelineParts":
        """Move the modules (in place) to ``device`` and floating ``dtype``; returns self. A VAE whose config says
        ``force_upcast`` (it overflows in float16: SDXL's) stays in float32 when ``dtype`` is float16."""
        dtype = resolve_dtype(dtype)
        for module in (self.unet, self.vae, self.text_encoder, self.text_encoder_2):
            if module is None:
                continue
            wanted = dtype
            if module is self.vae and dtype == torch.float16 and getattr(module.config, "force_upcast", False):
                wanted = torch.float32
            if wanted is None or wanted == next(module.parameters()).dtype:
                module.to(device=device)
            else:
                module.to(device=device, dtype=wanted)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def kind(self) -> Optional[str]:
        return conditioning_kind(self.unet)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: 2 ** (VAE levels - 1), as diffusers' pipelines compute it; 1 without a VAE."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def image_size(self, unet: Optional[nn.Module] = None) -> tuple:
        """(height, width) of the samples by default: the denoiser's sample_size x the VAE scale factor."""
        size = _unwrapped(unet if unet is not None else self.unet).config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def new_scheduler(self, name: Optional[str] = None):
        """A fresh scheduler: the pipeline's own class (``name`` None) or one of ``sampling.SCHEDULER_CLASSES``,
        from the pipeline scheduler's config."""
        if name is None:
            return type(self.scheduler).from_config(self.scheduler.config)
        return build_scheduler(name, dict(self.scheduler.config))

    @contextlib.contextmanager
    def denoiser(self, spec: Any, accelerator=None) -> Iterator[nn.Module]:
        """The denoiser of a variant, in eval mode: a module, a zero-arg callable giving a context manager that
        yields one (as in ``sampling.evaluate_variants``), a state dict (loaded into ``self.unet`` for the block,
        then the previous weights are put back), or a folder path / subfolder name of the pipeline folder."""
        if isinstance(spec, Mapping):
            with self._swapped_in(spec) as host, variant_unet(host, None) as unet:
                yield unet
        elif isinstance(spec, (str, os.PathLike)):
            unet = load_denoiser_folder(_denoiser_path(self.folder, spec), device=self.device,
                                        dtype=next(self.unet.parameters()).dtype)
            yield unet
        else:
            with variant_unet(spec, accelerator) as unet:
                yield unet

    @contextlib.contextmanager
    def _swapped_in(self, state: Mapping) -> Iterator[nn.Module]:
        host = self.unet
        backup = {k: v.detach().to("cpu", copy=True) for k, v in host.state_dict().items()}
        try:
            missing, unexpected = host.load_state_dict(dict(state), strict=False)
            check(not missing and not unexpected, f"a state-dict variant does not fit the pipeline's "
                  f"{type(_unwrapped(host)).__name__} ({len(missing)} missing keys, e.g. {missing[:1]}, "
                  f"{len(unexpected)} unexpected, e.g. {unexpected[:1]}); pass weights of the same model config")
            yield host
        finally:
            host.load_state_dict(backup)


def _denoiser_path(folder: Optional[str], spec: str | os.PathLike) -> str:
    """``spec`` as a path: a folder as given, else a subfolder of the pipeline folder (``unet_ema``)."""
    path = os.fspath(spec)
    if os.path.isdir(path) or folder is None:
        return path
    inside = os.path.join(folder, path)
    if os.path.isdir(inside):
        return inside
    subfolders = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n)))
    raise FileNotFoundError(f"denoiser {path!r} is neither a folder nor a subfolder of {folder!r} (subfolders: "
                            f"{', '.join(subfolders) or 'none'}); pass one of those or a model folder")


# --------------------------------------------------------------------------- prompt embeddings (once)


@dataclasses.dataclass
class PromptEmbeddings:
    """Text-encoder outputs of a prompt set, made once: ``unique`` [U, L, D] for its distinct prompts,
    ``entry`` [P] (which row of ``unique`` each prompt uses) and ``negative`` [1, L, D] (the unconditional branch
    of classifier-free guidance: the negative prompt, "" by default, or zeros where the pipeline says
    force_zeros_for_empty_prompt). ``pooled`` [U, P] / ``negative_pooled`` [1, P]: the pooled projection of the
    last text encoder, for UNets with ``addition_embed_type`` "text_time" (SDXL), else None."""

    unique: torch.Tensor
    entry: torch.Tensor
    negative: torch.Tensor
    pooled: Optional[torch.Tensor] = None
    negative_pooled: Optional[torch.Tensor] = None

    def rows(self, entries: Sequence[int]) -> torch.Tensor:
        return self.entry[torch.as_tensor(list(entries), dtype=torch.long)].to(self.unique.device)

    def of(self, entries: Sequence[int], device) -> torch.Tensor:
        return self.unique[self.rows(entries)].to(device, non_blocking=True)

    def pooled_of(self, entries: Sequence[int], device) -> torch.Tensor:
        return self.pooled[self.rows(entries)].to(device, non_blocking=True)


@torch.no_grad()
def encode_text(parts: ConditionalPipelineParts, texts: Sequence[str]) -> tuple:
    """(hidden states [n, L, D], pooled [n, P] or None) of ``texts``, tokenised as diffusers' pipelines do
    (padded to each tokenizer's model_max_length, truncated). One text encoder (Stable Diffusion): its last hidden
    state. Two (SDXL): the penultimate hidden states of both, concatenated, and the pooled projection of the
    first encoder that gives one."""
    pairs = parts.encoders()
    two = parts.text_encoder_2 is not None
    hidden, pooled = [], None
    for encoder, tokenizer in pairs:
        tokens = tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        device = next(encoder.parameters()).device
        if not two:
            mask = tokens.attention_mask.to(device) if getattr(encoder.config, "use_attention_mask", False) else None
            hidden.append(encoder(tokens.input_ids.to(device), attention_mask=mask)[0])
            continue
        out = encoder(tokens.input_ids.to(device), output_hidden_states=True)
        if pooled is None and out[0].ndim == 2:
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    dtype = next(pairs[-1][0].parameters()).dtype
    hidden = torch.cat([h.to(hidden[-1].device) for h in hidden], dim=-1).to(dtype)
    return hidden, pooled


def encode_prompts(parts: ConditionalPipelineParts, prompts: Sequence[str], *, negative_prompt: Optional[str] = None,
                   batch_size: int = _D.batch_size, progress: bool = False) -> PromptEmbeddings:
    """:class:`PromptEmbeddings` of ``prompts`` (each distinct prompt encoded once), kept on the text encoder's
    device unless they exceed ``EMBEDDINGS_ON_DEVICE_MAX_BYTES`` (then on the CPU, moved per batch).
    negative_prompt None: the pipeline's own unconditional input ("", or zeros with force_zeros_for_empty_prompt)."""
    check(negative_prompt is None or isinstance(negative_prompt, str), f"negative_prompt must be a string, got "
          f"{type(negative_prompt).__name__}")
    unique = list(dict.fromkeys(prompts))
    position = {p: i for i, p in enumerate(unique)}
    negative, negative_pooled = encode_text(parts, ["" if negative_prompt is None else negative_prompt])
    if negative_prompt is None and parts.settings.get("force_zeros_for_empty_prompt"):
        negative = torch.zeros_like(negative)
        negative_pooled = None if negative_pooled is None else torch.zeros_like(negative_pooled)
    per_row = negative[0].numel() * negative.element_size()
    keep = negative.device if per_row * len(unique) <= EMBEDDINGS_ON_DEVICE_MAX_BYTES else torch.device("cpu")
    hidden, pooled = [], []
    with fid.progress_bar(len(unique), "encoding prompts", progress) as bar:
        for batch in fid.batches(unique, batch_size):
            h, p = encode_text(parts, batch)
            hidden.append(h.to(keep))
            pooled.append(None if p is None else p.to(keep))
            bar.update(len(batch))
    return PromptEmbeddings(torch.cat(hidden), torch.tensor([position[p] for p in prompts], dtype=torch.long),
                            negative, None if pooled[0] is None else torch.cat(pooled), negative_pooled)


# --------------------------------------------------------------------------- sampling


class ConditionalSampler:
    """uint8 images of any denoiser for one prompt set and one set of sampler settings.

    guidance_scale: classifier-free guidance weight (None: the pipeline's default, 7.5 for Stable Diffusion);
        guidance runs when it is > 1, as in diffusers (1.0: one conditional pass per step, no "" pass).
    height, width: pixels (None: the denoiser's sample_size x the VAE scale factor).
    scheduler: None for the pipeline's own scheduler class, or a name of ``sampling.SCHEDULER_CLASSES``; a fresh
        scheduler is made for every batch.
    seed / eta / num_inference_steps: as in ``FIDConfig``. The prompt embeddings are made here, once.
    """

    def __init__(self, parts: ConditionalPipelineParts, prompt_set: PromptSet, *,
                 guidance_scale: Optional[float] = None, num_inference_steps: int = _D.num_inference_steps,
                 height: Optional[int] = None, width: Optional[int] = None, seed: int = _D.seed, eta: float = _D.eta,
                 scheduler: Optional[str] = None, negative_prompt: Optional[str] = None,
                 encode_batch_size: int = _D.batch_size,
                 progress: bool = False):
        where = parts.folder or "the pipeline's unet"
        if prompt_set is None and not needs_conditioning(parts.unet):
            raise ValueError(f"{where} is an unconditional {type(_unwrapped(parts.unet)).__name__}; sample it with "
                             "lawa_diffusion.evaluation.sampling.evaluate_variants (`lawa-diffusion fid`), which takes no prompts")
        check_conditions(parts.unet, prompt_set, where)
        guidance = parts.guidance_scale if guidance_scale is None else guidance_scale
        check(isinstance(guidance, (int, float)) and guidance >= 0, f"guidance_scale must be a number >= 0 (1: no "
              f"guidance), got {guidance!r}")
        check(isinstance(num_inference_steps, int) and num_inference_steps >= 1,
              f"num_inference_steps (--steps) must be >= 1, got {num_inference_steps!r}")
        check(isinstance(seed, int) and 0 <= seed < 2**31, f"seed must be in [0, 2**31), got {seed!r}")
        default_h, default_w = parts.image_size()
        self.height, self.width = height or default_h, width or default_w
        factor = parts.vae_scale_factor
        for option, value in (("height", self.height), ("width", self.width)):
            check(isinstance(value, int) and value > 0 and value % factor == 0, f"{option} must be a positive multiple "
                  f"of the VAE scale factor {factor}, got {value!r}")
        config = _unwrapped(parts.unet).config
        if getattr(config, "time_cond_proj_dim", None) is not None:
            raise ValueError("the pipeline's unet takes a guidance embedding (time_cond_proj_dim: a guidance-distilled "
                             "model), which the conditional evaluator does not sample; pass a UNet without it")
        addition = getattr(config, "addition_embed_type", None)
        check(addition in (None, "text_time"), f"the pipeline's unet has addition_embed_type {addition!r}, which the "
              "conditional evaluator does not sample; pass a Stable Diffusion 1.x/2.x or SDXL-style UNet")
        self.text_time = addition == "text_time"
        self.parts, self.prompt_set = parts, prompt_set
        self.guidance_scale = float(guidance)
        self.num_inference_steps, self.seed, self.eta = num_inference_steps, seed, eta
        self.scheduler_name = scheduler
        parts.new_scheduler(scheduler)  # validates the name now
        self.negative_prompt = negative_prompt
        self.embeddings: Optional[PromptEmbeddings] = None
        if prompt_set.kind == "text":
            self.embeddings = encode_prompts(parts, prompt_set.prompts, negative_prompt=negative_prompt,
                                             batch_size=encode_batch_size, progress=progress)
            check(not self.text_time or self.embeddings.pooled is not None, "the pipeline's unet needs pooled text "
                  "embeddings (addition_embed_type text_time) but no text encoder gives them; pass an SDXL-style "
                  "pipeline with a CLIPTextModelWithProjection")

    @property
    def guided(self) -> bool:
        """Whether each step runs the "" (negative) branch too: text prompts and guidance_scale > 1."""
        return self.prompt_set.kind == "text" and self.guidance_scale > 1

    def latent_shape(self, unet: nn.Module) -> tuple:
        factor = self.parts.vae_scale_factor
        return (_unwrapped(unet).config.in_channels, self.height // factor, self.width // factor)

    def noise(self, unet: nn.Module, indices: Sequence[int]) -> tuple:
        """(initial noise float32 [n, C, h, w] on the CPU, the CPU generators that drew it, one per sample),
        before scaling by the scheduler's init_noise_sigma; sample i's noise depends only on (seed, i)."""
        from diffusers.utils.torch_utils import randn_tensor

        generators = [torch.Generator("cpu").manual_seed(sample_seed(self.seed, i)) for i in indices]
        x = randn_tensor((len(indices), *self.latent_shape(unet)), generator=generators, device=torch.device("cpu"),
                         dtype=torch.float32)
        return x, generators

    def conditions(self, unet: nn.Module, indices: Sequence[int], device, dtype) -> dict:
        """The keyword arguments of the denoiser's forward for samples ``indices`` (both branches when guided)."""
        entries = [self.prompt_set.index_of(i) for i in indices]
        if self.prompt_set.kind == "class":
            labels = torch.tensor([self.prompt_set.class_labels[e] for e in entries], dtype=torch.long)
            return {"class_labels": labels.to(device)}
        n, e = len(entries), self.embeddings
        cond = e.of(entries, device)
        if self.guided:
            cond = torch.cat([e.negative.to(device).expand(n, -1, -1), cond])
        kwargs = {"encoder_hidden_states": cond.to(dtype)}
        if self.text_time:  # SDXL: pooled text embedding and (original size, crop top-left, target size)
            pooled = e.pooled_of(entries, device)
            if self.guided:
                pooled = torch.cat([e.negative_pooled.to(device).expand(n, -1), pooled])
            time_ids = torch.tensor([self.height, self.width, 0, 0, self.height, self.width], dtype=cond.dtype)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype),
                                           "time_ids": time_ids.to(device).expand(pooled.shape[0], -1).to(dtype)}
        return kwargs

    @torch.no_grad()
    def images(self, unet: nn.Module, indices: Sequence[int]) -> torch.Tensor:
        """uint8 [len(indices), C, H, W] (CPU) of samples ``indices`` from ``unet`` (a denoiser in eval mode)."""
        param = next(unet.parameters())
        device, dtype = param.device, param.dtype
        x, generators = self.noise(unet, indices)
        x = x.to(device)
        scheduler = self.parts.new_scheduler(self.scheduler_name)
        scheduler.set_timesteps(self.num_inference_steps, device=device)
        x = x * scheduler.init_noise_sigma
        accepted = inspect.signature(scheduler.step).parameters
        extra = {k: v for k, v in (("eta", self.eta), ("generator", generators)) if k in accepted}
        kwargs = self.conditions(unet, indices, device, dtype)
        for t in scheduler.timesteps:
            model_input = torch.cat([x, x]) if self.guided else x
            model_input = scheduler.scale_model_input(model_input, t)
            out = unet(model_input.to(dtype), t, return_dict=False, **kwargs)[0].to(x.dtype)
            if self.guided:
                uncond, cond = out.chunk(2)
                out = uncond + self.guidance_scale * (cond - uncond)
            x = scheduler.step(out, t, x, return_dict=False, **extra)[0]
        return to_uint8(self.decode(x)).cpu()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from final latents (the VAE's decoder, as a batch; the latents themselves without
        a VAE)."""
        vae = self.parts.vae
        if vae is None:
            return latents
        param = next(vae.parameters())
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            mean = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(view)
            std = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(view)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents + shift
        return vae.decode(latents.to(param.device, param.dtype), return_dict=False)[0]

    def meta(self) -> dict:
        """What a result records about these samples (with the prompt set's fingerprint)."""
        text = self.prompt_set.kind == "text"  # class labels are sampled without guidance
        return {"conditioning": self.prompt_set.kind, "prompts_sha256": self.prompt_set.fingerprint(),
                "num_prompts": len(self.prompt_set), "guidance_scale": self.guidance_scale if text else None,
                "negative_prompt": self.negative_prompt,
                "height": self.height, "width": self.width,
                "scheduler": self.scheduler_name or type(self.parts.scheduler).__name__,
                "num_inference_steps": self.num_inference_steps, "seed": self.seed, "eta": self.eta}


def _sampler(parts: ConditionalPipelineParts, prompt_set: Optional[PromptSet], sampler: Optional[ConditionalSampler],
             options: dict, progress: bool) -> ConditionalSampler:
    if sampler is not None:
        check(not options, f"pass sampler settings ({', '.join(sorted(options))}) to the ConditionalSampler, not "
              "next to it")
        check(prompt_set is None or prompt_set is sampler.prompt_set, "prompt_set differs from the sampler's; "
              "make a ConditionalSampler for this prompt set")
        return sampler
    return ConditionalSampler(parts, prompt_set, progress=progress, **options)


def _num_samples(num_samples: Optional[int], prompt_set: PromptSet) -> int:
    """Default: one image per prompt (for a set with reference images: per reference image); for class labels,
    ``FIDConfig.num_samples``."""
    if num_samples is None:
        num_samples = len(prompt_set) if prompt_set.kind == "text" else _D.num_samples
    check(isinstance(num_samples, int) and num_samples >= 1, f"num_samples (--num-samples) must be a positive "
          f"integer, got {num_samples!r}")
    return num_samples


def sample_variants_conditional(parts: ConditionalPipelineParts, variants: Mapping[str, Any],
                                prompt_set: Optional[PromptSet] = None, *, num_samples: Optional[int] = None,
                                batch_size: int = _D.batch_size, accelerator=None, progress: bool = True,
                                sampler: Optional[ConditionalSampler] = None, **sampler_options) -> dict:
    """{name: uint8 [num_samples, C, H, W]} (CPU) of each variant, every variant from the same noise and the same
    conditions; every process takes part and gets all images. variants: name -> anything
    :meth:`ConditionalPipelineParts.denoiser` takes. ``sampler_options``: :class:`ConditionalSampler`'s
    (guidance_scale, num_inference_steps, height, width, seed, eta, scheduler, negative_prompt)."""
    check(len(variants) >= 1, "variants must name at least one model to sample")
    check(isinstance(batch_size, int) and batch_size >= 1, f"batch_size must be >= 1, got {batch_size!r}")
    show = progress and is_main_process(accelerator)
    sampler = _sampler(parts, prompt_set, sampler, sampler_options, show)
    num_samples = _num_samples(num_samples, sampler.prompt_set)
    out = {}
    for name, spec in variants.items():
        with parts.denoiser(spec, accelerator) as unet:
            def compute(indices, unet=unet, name=name):
                parts_ = []
                with fid.progress_bar(len(indices), f"sampling {name}", show) as bar:
                    for batch in fid.batches(indices, batch_size):
                        parts_.append(sampler.images(unet, batch))
                        bar.update(len(batch))
                return torch.cat(parts_)

            out[name] = fid.map_split(num_samples, compute, accelerator)
    return out


def sampled_features_conditional(parts: ConditionalPipelineParts, variants: Mapping[str, Any],
                                 prompt_set: Optional[PromptSet], extractor: Extractor, *,
                                 num_samples: Optional[int] = None, batch_size: int = _D.batch_size,
                                 reference_key: Optional[str] = None, accelerator=None, progress: bool = True,
                                 isc: bool = False, sampler: Optional[ConditionalSampler] = None,
                                 **sampler_options) -> dict:
    """{name: fid.Sampled} of each variant: as :func:`sample_variants_conditional`, each batch of images going
    straight to the extractor (no image is kept); the metric maths are ``fid.metrics_of``."""
    check(len(variants) >= 1, "variants must name at least one model to evaluate")
    show = progress and is_main_process(accelerator)
    sampler = _sampler(parts, prompt_set, sampler, sampler_options, show)
    num_samples = _num_samples(num_samples, sampler.prompt_set)
    layers = fid.feature_layers(extractor, isc)
    meta = dict(num_samples=num_samples, inception_sha256=extractor.sha256, reference_key=reference_key,
                **sampler.meta())
    out = {}
    for name, spec in variants.items():
        started = time.perf_counter()
        with parts.denoiser(spec, accelerator) as unet:
            compute = functools.partial(fid.batched_features, functools.partial(sampler.images, unet), extractor,
                                        layers, batch_size=batch_size, desc=f"sampling {name}", show=show)
            stacked = fid.map_split(num_samples, compute, accelerator)
        out[name] = fid.Sampled(fid.split_layers(stacked, layers), time.perf_counter() - started, dict(meta),
                                extractor.device)
    return out


# --------------------------------------------------------------------------- reference of a prompt set


def prompt_set_reference_key(prompt_set: PromptSet, identity: tuple, *, size: tuple, resize_mode: str,
                             features_max: int) -> str:
    """Cache key of a prompt set's reference statistics: extractor identity, the prompt set's fingerprint (which
    covers its reference files) and the preprocessing."""
    sha, name, layer = identity
    payload = {"format": fid.STATS_FORMAT, "weights_sha256": sha, "extractor": name, "layer": layer,
               "data": {"kind": "prompt-set", "sha256": prompt_set.fingerprint()}, "image_size": list(size),
               "resize_mode": resize_mode, "num_images": len(prompt_set), "features_max": features_max,
               "pixels": "uint8-rgb"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def prompt_set_reference_stats(prompt_set: PromptSet, extractor: Extractor, *, size: tuple,
                               resize_mode: str = DEFAULT_RESIZE_MODE, batch_size: int = _D.batch_size,
                               features_max: int = _D.reference_features_max, accelerator=None,
                               progress: bool = True, cache: bool = True) -> fid.ReferenceStats:
    """Reference statistics of the images paired with ``prompt_set`` (brought to ``size`` = (height, width)),
    cached under ``$LAWA_CACHE_DIR/stats`` like ``fid.reference_stats``; a cache hit decodes no image."""
    check(prompt_set.reference is not None, f"prompt set {prompt_set.source!r} has no reference images; pass "
          "reference= (--reference) or take the prompts from a captioned image folder or saved dataset")
    check(len(prompt_set) >= 2, f"the reference of {prompt_set.source!r} has {len(prompt_set)} image; FID needs at "
          "least 2 (raise --num-reference)")
    key = prompt_set_reference_key(prompt_set, fid.extractor_identity(extractor), size=tuple(size),
                                   resize_mode=resize_mode, features_max=features_max)
    path = fid.stats_cache_path(key)
    if cache and os.path.isfile(path):
        stats = fid.ReferenceStats.load(path)
        if stats.key == key and fid.made_with(stats, extractor.sha256):
            return stats

    def images_of(indices):
        return prompt_set.reference_images(indices, size, resize_mode)

    compute = functools.partial(fid.batched_features, images_of, extractor, [extractor.layer], batch_size=batch_size,
                                desc="reference features", show=progress and is_main_process(accelerator))
    features = fid.map_split(len(prompt_set), compute, accelerator)
    stats = fid.stats_from_features(features, extractor=extractor, source=f"reference of {prompt_set.source}",
                                    features_max=features_max)
    stats.key = key
    if cache and is_main_process(accelerator):
        stats.save(path)
        stats.path = path
    return stats


# --------------------------------------------------------------------------- evaluation


def evaluate_variants_conditional(parts: ConditionalPipelineParts, variants: Mapping[str, Any],
                                  prompt_set: Optional[PromptSet], reference=None, *,
                                  num_samples: Optional[int] = None, weights=None, accelerator=None, device=None,
                                  progress: bool = True, isc: bool = False, cfg: Optional[FIDConfig] = None,
                                  resize_mode: str = DEFAULT_RESIZE_MODE, cache: bool = True,
                                  sampler: Optional[ConditionalSampler] = None, **options) -> dict:
    """FID/KID of each variant of a conditional model, on the same noise and conditions (common random numbers).

    reference: None for the prompt set's own reference images (a captioned folder or dataset; statistics cached
    by its fingerprint), else anything ``fid.reference_stats`` takes (brought to the sample size when square).
    num_samples: default one image per prompt. ``options``: sampler settings (guidance_scale, height, width,
    scheduler, negative_prompt) and ``FIDConfig`` fields (batch_size, num_inference_steps, seed, eta, kid,
    kid_subsets, kid_subset_size, reference_features_max); ``FIDConfig.scheduler`` is not used (``scheduler``
    None is the pipeline's own). Returns {name: {fid, kid_mean, kid_std, num_samples, prompts_sha256, ...}}.
    """
    check(len(variants) >= 1, "variants must name at least one model to evaluate")
    sampler_options = {k: options.pop(k) for k in SAMPLER_OPTIONS if k in options}
    cfg = fid.settings(cfg, **options)
    if sampler is None:
        sampler = ConditionalSampler(parts, prompt_set, num_inference_steps=cfg.num_inference_steps, seed=cfg.seed,
                                     eta=cfg.eta, encode_batch_size=cfg.batch_size,
                                     progress=progress and is_main_process(accelerator), **sampler_options)
    else:
        check(not sampler_options, f"pass sampler settings ({', '.join(sorted(sampler_options))}) to the "
              "ConditionalSampler, not next to it")
    prompt_set = sampler.prompt_set
    num_samples = _num_samples(num_samples, prompt_set)
    fid.warn_if_few(num_samples)
    size = (sampler.height, sampler.width)
    extractor, reference = _prepare_reference(prompt_set, reference, size, weights=weights, device=device,
                                              accelerator=accelerator, isc=isc, progress=progress, cfg=cfg,
                                              resize_mode=resize_mode, cache=cache)
    sampled = sampled_features_conditional(parts, variants, None, extractor, num_samples=num_samples,
                                           batch_size=cfg.batch_size, reference_key=reference.key,
                                           accelerator=accelerator, progress=progress, isc=isc, sampler=sampler)
    return {name: fid.metrics_of(s, reference, cfg) for name, s in sampled.items()}


def _prepare_reference(prompt_set: PromptSet, reference, size: tuple, *, weights, device, accelerator, isc,
                       progress, cfg: FIDConfig, resize_mode: str, cache: bool) -> tuple:
    if reference is not None:
        return fid.prepare(reference, weights=weights, device=device, accelerator=accelerator, isc=isc,
                           progress=progress, image_size=lambda: size[0] if size[0] == size[1] else None)
    from lawa_diffusion.evaluation.inception import load_extractor

    extractor = load_extractor(weights, device=fid.resolve_device(device, accelerator), isc=isc)
    stats = prompt_set_reference_stats(prompt_set, extractor, size=size, resize_mode=resize_mode,
                                       batch_size=cfg.batch_size, features_max=cfg.reference_features_max,
                                       accelerator=accelerator, progress=progress, cache=cache)
    return extractor, fid.check_weights(stats, extractor.sha256)
