"""The parts of a text-to-image pipeline that a training script loaded from ``--pretrained_model_name_or_path``
(with ``--revision`` / ``--variant``), loaded again for FID sampling: scheduler, VAE, text encoder(s) and
tokenizer(s), from local files only: a folder, or a Hub id already in the local Hugging Face cache (the script
downloaded it). The classes come from model_index.json when there is one, else from each part's own config, with
what diffusers' text-to-image examples load as the fallback.
"""
from __future__ import annotations

import json
import os
from typing import Optional

DEFAULT_PARTS = {"scheduler": ("diffusers", "DDPMScheduler"), "vae": ("diffusers", "AutoencoderKL"),
                 "text_encoder": ("transformers", "CLIPTextModel"), "tokenizer": ("transformers", "CLIPTokenizer")}
SECOND_PARTS = ("text_encoder_2", "tokenizer_2")  # SDXL-style pipelines
INDEX_NAME = "model_index.json"


def read_json(source: str, name: str, revision: Optional[str] = None) -> Optional[dict]:
    """The JSON file ``name`` of a pipeline folder, or of a Hub id from the local cache; None when absent."""
    if os.path.isdir(source):
        path = os.path.join(source, name)
    else:
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source, name, revision=revision, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the cache (or not a Hub id): absent
            return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def available(source: str, revision: Optional[str] = None) -> bool:
    """Whether ``source`` has a pipeline index or a text encoder in local files."""
    return any(read_json(source, name, revision) is not None for name in (INDEX_NAME, "text_encoder/config.json"))


def part_classes(source: str, revision: Optional[str] = None) -> tuple:
    """({part: (library, class name)}, the model_index.json mapping or {})."""
    index = read_json(source, INDEX_NAME, revision) or {}
    if index:
        classes = {name: tuple(value) for name, value in index.items()
                   if name in (*DEFAULT_PARTS, *SECOND_PARTS) and isinstance(value, list) and len(value) == 2
                   and value[0] and value[1]}
        return classes, index
    classes = dict(DEFAULT_PARTS)
    for name in ("scheduler", "vae"):
        config = read_json(source, f"{name}/{'scheduler_config' if name == 'scheduler' else 'config'}.json", revision)
        if config and config.get("_class_name"):
            classes[name] = ("diffusers", str(config["_class_name"]))
    config = read_json(source, "text_encoder/config.json", revision) or {}
    if config.get("architectures"):
        classes["text_encoder"] = ("transformers", str(config["architectures"][0]))
    return classes, {}


def load_pipeline_parts(source: str, unet, *, revision: Optional[str] = None, variant: Optional[str] = None,
                        device=None, option: str = "--lawa_fid_pipeline"):
    """``ConditionalPipelineParts`` of ``source``'s scheduler, VAE, text encoder(s) and tokenizer(s) around ``unet``
    (the module the variants' weights go into), on ``device``; ``option`` is named in errors."""
    from torch import nn

    from lawa_diffusion.evaluation.conditional import (
        PIPELINE_SETTINGS,
        ConditionalPipelineParts,
        load_part,
        pipeline_guidance_scale,
    )

    source = os.fspath(source)
    classes, index = part_classes(source, revision)
    fix = f"pass {option} with a local pipeline folder whose parts are installed"
    parts = {name: load_part(source, name, library, class_name, revision=revision, variant=variant, fix=fix)
             for name, (library, class_name) in classes.items()}
    for module in parts.values():
        if isinstance(module, nn.Module):
            module.eval().requires_grad_(False)
    pipeline_class = index.get("_class_name")
    out = ConditionalPipelineParts(unet=unet, guidance_scale=pipeline_guidance_scale(pipeline_class),
                                   settings={k: index[k] for k in PIPELINE_SETTINGS if k in index}, folder=source,
                                   pipeline_class=pipeline_class, **parts)
    return out.to(device)
