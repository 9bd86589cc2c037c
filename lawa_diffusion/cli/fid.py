"""``lawa-diffusion fid`` and ``lawa-diffusion ref-stats``: FID/KID of a model, pipeline or image folder.

Model inputs are sampled by :mod:`lawa_diffusion.evaluation.sampling`; image inputs go straight to the features. One
clear sentence for every kind of wrong input (missing folder, wrong model class, existing --output).
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Optional

from lawa_diffusion.config.base import check
from lawa_diffusion.config.fid import FIDConfig
from lawa_diffusion.evaluation import fid
from lawa_diffusion.evaluation.fid import (
    ReferenceStats,
    SmallSampleWarning,
    fid_of_images,
    reference_stats,
    warn_if_few,
)
from lawa_diffusion.evaluation.inception import Extractor, load_extractor
from lawa_diffusion.evaluation.model_folders import (
    _D,
    _load_input_images,
    _model_folder,
    find_scheduler_config,
    load_unet,
)
from lawa_diffusion.evaluation.sampling import SCHEDULER_CLASSES, evaluate_variants, image_shape
from lawa_diffusion.utils.files import check_output_file
from lawa_diffusion.utils.output import say


def _check_output(path: Optional[str], overwrite: bool) -> None:
    check_output_file(path, "--output", overwrite)  # empty, a folder, under a file, or existing: one sentence


def _print_result(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    for key in ("fid", "kid_mean", "kid_std", "isc_mean", "isc_std"):
        if key in result:
            print(f"{key}: {result[key]:.6g}")
    for key in ("num_samples", "inception_sha256", "reference_key"):
        print(f"{key}: {result.get(key)}")


def _cmd_fid(args) -> int:
    _check_output(args.output, args.overwrite)
    cfg = FIDConfig(num_samples=args.num_samples, batch_size=args.batch_size, scheduler=args.scheduler,
                    num_inference_steps=args.steps, seed=args.seed, eta=args.eta, kid=args.kid,
                    resize_mode=args.resize_mode)  # validates the options before any work
    if not os.path.exists(args.input):
        raise FileNotFoundError(f"input {args.input!r} does not exist; pass a model folder, a pipeline folder, "
                                "an image folder or a .npy/.npz image file")
    model = _model_folder(args.input, args.subfolder) if os.path.isdir(args.input) else None
    images = _load_input_images(args.input, args) if model is None else None
    unet = load_unet(model, args.device) if model is not None else None
    if images is not None:
        check(images.shape[0] >= 2, f"input {args.input!r} holds {images.shape[0]} image; FID needs at least 2")
    warn_if_few(args.num_samples if images is None else int(images.shape[0]))
    extractor = load_extractor(args.inception_weights, device=fid.resolve_device(args.device, None), isc=args.isc)
    shape = tuple(images.shape[1:]) if unet is None else image_shape(unet)
    size = args.image_size or (shape[1] if shape[1] == shape[2] else None)  # reference at the evaluated size
    reference = _cli_reference(args, cfg, extractor, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)  # said once above
        result = _cli_evaluate(args, cfg, images, unet, model, extractor, reference)
    result.update(input=os.path.abspath(args.input), reference=reference.source)
    _print_result(result, args.json)
    if args.output:
        from lawa_diffusion.utils.files import atomic_write_json

        atomic_write_json(args.output, result)
    return 0


def _cli_evaluate(args, cfg: FIDConfig, images, unet, model, extractor, reference) -> dict:
    common = dict(weights=extractor, isc=args.isc, progress=not args.json, cfg=cfg)
    if unet is None:
        return fid_of_images(images, reference, **common)
    return evaluate_variants({"model": unet}, reference, scheduler_config=_scheduler_config(args.input, model),
                             **common)["model"]


def _scheduler_config(path: str, model: str) -> Optional[dict]:
    config = find_scheduler_config(path, model)
    if config is None:
        say("no scheduler_config.json next to the model; sampling with diffusers' default noise schedule "
            "(1000 steps, linear betas)", "note")
    return config


def _cli_reference(args, cfg: FIDConfig, extractor: Extractor, image_size: Optional[int]) -> ReferenceStats:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        return reference_stats(args.reference, image_size=image_size, num_images=args.reference_num_images,
                               weights=extractor, cache=not args.no_cache, progress=not args.json, cfg=cfg)


def _cmd_ref_stats(args) -> int:
    _check_output(args.output, args.overwrite)
    check(args.output is None or args.output.endswith(".npz"), f"--output must end with .npz, got {args.output!r}")
    stats = reference_stats(args.source, image_size=args.image_size, resize_mode=args.resize_mode,
                            num_images=args.num_images, batch_size=args.batch_size, device=args.device,
                            weights=args.inception_weights, cache=not args.no_cache, progress=not args.json)
    if args.output:
        stats.save(args.output)
    info = {"path": os.path.abspath(args.output) if args.output else stats.path, "key": stats.key,
            "num_images": stats.num_images, "inception_sha256": stats.inception_sha256, "source": stats.source,
            "kid_features": None if stats.features is None else int(stats.features.shape[0])}
    print(json.dumps(info, sort_keys=True) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def _add_common(p) -> None:
    p.add_argument("--image-size", type=int, default=None,
                   help="bring images to NxN first (needed for folders of mixed sizes); default: the size of the "
                        "evaluated images (model resolution)")
    p.add_argument("--resize-mode", choices=("pad", "resize"), default=_D.resize_mode,
                   help="pad: zero-pad/centre-crop (Fashion-MNIST 28 -> 32); resize: shorter side, then centre-crop")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="images per batch")
    p.add_argument("--inception-weights", default=None, help="Inception weights file (default: see `inception info`)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--no-cache", action="store_true", help="recompute reference statistics, do not cache them")
    p.add_argument("--output", default=None, help="also write the result to this file (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="allow --output to replace an existing file")
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bars)")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("fid", help="FID/KID of a model, pipeline or image folder against a reference")
    p.add_argument("input", help="model folder (UNet2DModel), pipeline folder, image folder or .npy/.npz images")
    p.add_argument("--subfolder", default=None, help="model subfolder inside INPUT, e.g. unet_ema")
    p.add_argument("--reference", default=_D.reference,
                   help="fashion-mnist[:test], an image folder, a .npy/.npz image array or a stats .npz")
    p.add_argument("--reference-num-images", type=int, default=None,
                   help="use the first N reference images only (default: all; statistics are cached)")
    p.add_argument("--num-samples", type=int, default=_D.num_samples, help="images generated from a model")
    p.add_argument("--scheduler", choices=tuple(SCHEDULER_CLASSES), default=_D.scheduler, help="sampler")
    p.add_argument("--steps", type=int, default=_D.num_inference_steps, help="sampler steps")
    p.add_argument("--eta", type=float, default=_D.eta, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=_D.seed, help="base seed of the sampling noise")
    p.add_argument("--kid", action=argparse.BooleanOptionalAction, default=_D.kid, help="also compute KID")
    p.add_argument("--isc", action="store_true", help="also compute the Inception Score (needs weights with fc)")
    _add_common(p)
    p.set_defaults(func=_cmd_fid)
    r = subparsers.add_parser("ref-stats", help="compute (and cache) FID reference statistics")
    r.add_argument("source", help="fashion-mnist[:test], an image folder or a .npy/.npz image array")
    r.add_argument("--num-images", type=int, default=None, help="use the first N images only")
    _add_common(r)
    r.set_defaults(func=_cmd_ref_stats)
