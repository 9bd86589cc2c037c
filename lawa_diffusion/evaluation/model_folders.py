"""Diffusers model folders as the evaluator reads them: a UNet from a model, pipeline or checkpoint folder
(``load_unet``), the scheduler config saved beside it, and image inputs given as files or folders.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from lawa_diffusion.config.base import check
from lawa_diffusion.config.fid import FIDConfig
from lawa_diffusion.evaluation import fid
from lawa_diffusion.evaluation import images as data_mod

_D = FIDConfig()  # defaults live in config.py


def _subfolders(path: str) -> str:
    names = sorted(n for n in os.listdir(path) if os.path.isdir(os.path.join(path, n)) and not n.startswith("."))
    return ", ".join(names) if names else "none"


def _model_folder(path: str, subfolder: Optional[str]) -> Optional[str]:
    """The UNet folder inside ``path`` (model folder, pipeline folder, ``subfolder``), or None for image folders."""
    if subfolder:
        folder = os.path.join(path, subfolder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--subfolder {subfolder!r} does not exist in {path!r} (subfolders: "
                                    f"{_subfolders(path)}); pass one of those")
        return folder
    if os.path.isfile(os.path.join(path, "model_index.json")):
        folder = os.path.join(path, "unet")
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"pipeline folder {path!r} has no unet subfolder; pass --subfolder with the "
                                    f"folder holding the UNet (subfolders: {_subfolders(path)})")
        return folder
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def load_unet(folder: str, device=None) -> nn.Module:
    """A diffusers UNet2DModel from a model folder, with one-sentence errors for anything else."""
    from diffusers import UNet2DModel

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"model folder {folder!r} has no config.json; pass a folder written by "
                                "save_pretrained (or use --subfolder)")
    with open(config_path, encoding="utf-8") as f:
        cls_name = json.load(f).get("_class_name")
    check(cls_name == "UNet2DModel", f"model folder {folder!r} holds a {cls_name or 'non-diffusers'} model; "
          "lawa-diffusion fid samples unconditional UNet2DModel folders")
    try:
        unet = UNet2DModel.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"model folder {folder!r} could not be loaded ({str(e).splitlines()[0][:150]}); "
                         "pass a complete save_pretrained folder") from None
    return unet.to(fid.resolve_device(device, None)).eval()


def find_scheduler_config(path: str, model_folder: str) -> Optional[dict]:
    """The training scheduler's config saved next to a model (pipeline ``scheduler/`` or a sibling), if any."""
    candidates = [os.path.join(path, "scheduler", "scheduler_config.json"),
                  os.path.join(model_folder, "scheduler_config.json"),
                  os.path.join(os.path.dirname(os.path.abspath(model_folder)), "scheduler", "scheduler_config.json")]
    for candidate in candidates:
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                return {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    return None


def _load_input_images(path: str, args) -> torch.Tensor:
    if os.path.isdir(path):
        return data_mod.load_image_folder(path, image_size=args.image_size, resize_mode=args.resize_mode,
                                          progress=not args.json)
    images = data_mod.load_images(path)
    return data_mod.fit_to_size(images, args.image_size, args.resize_mode) if args.image_size else images
