"""``lawa-diffusion fid`` and ``lawa-diffusion ref-stats``: FID/KID of a model, pipeline or image folder.

Unconditional model inputs are sampled by :mod:`lawa_diffusion.evaluation.sampling`; conditional ones (text-to-image
pipelines, class-conditional UNets: ``--prompts``, ``--class-labels``, ``--pipeline``) by
:mod:`lawa_diffusion.evaluation.conditional_evaluator`; image inputs go straight to the features. One clear sentence
for every kind of wrong input (missing folder, wrong model class, missing prompts, existing --output).
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Optional

from lawa_diffusion.cli.renamed import add_old_spelling
from lawa_diffusion.config.base import check
from lawa_diffusion.config.fid import FIDConfig
from lawa_diffusion.evaluation import fid
from lawa_diffusion.evaluation.conditional import (
    DEFAULT_RESIZE_MODE,
    conditioning_kind,
    prompt_set_reference_stats,
)
from lawa_diffusion.evaluation.conditional_evaluator import conditional_evaluation, conditions_of, denoiser_template
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
    for key in ("conditioning", "num_prompts", "guidance_scale", "prompts_sha256"):  # conditional models only
        if key in result:
            print(f"{key}: {result[key]}")


def _cmd_fid(args) -> int:
    _check_output(args.output, args.overwrite)
    cfg = FIDConfig(num_samples=_D.num_samples if args.num_samples is None else args.num_samples,
                    batch_size=args.batch_size, scheduler=args.scheduler or _D.scheduler,
                    num_inference_steps=args.steps, seed=args.seed, eta=args.eta, kid=args.kid,
                    resize_mode=args.resize_mode or _D.resize_mode, prompts=args.prompts,
                    class_labels=args.class_labels, guidance_scale=args.guidance_scale,
                    num_reference=args.num_reference, caption_column=args.caption_column,
                    pipeline=args.pipeline)  # validates the options before any work
    if not os.path.exists(args.input):
        raise FileNotFoundError(f"input {args.input!r} does not exist; pass a model folder, a pipeline folder, "
                                "an image folder or a .npy/.npz image file")
    model = _model_folder(args.input, args.subfolder) if os.path.isdir(args.input) else None
    if model is not None and (cfg.conditional or args.pipeline or _is_conditional(model)):
        return _cmd_fid_conditional(args, cfg, model)
    given = [flag for flag, value in (("--prompts", args.prompts), ("--class-labels", args.class_labels),
                                      ("--pipeline", args.pipeline)) if value is not None]
    check(not given, f"{given[0] if given else ''} needs a model or pipeline folder as input, got {args.input!r}; "
          "pass the folder of the model to sample")
    _check_unconditional_options(args)
    args.resize_mode = args.resize_mode or _D.resize_mode
    images = _load_input_images(args.input, args) if model is None else None
    unet = load_unet(model, args.device) if model is not None else None
    if images is not None:
        check(images.shape[0] >= 2, f"input {args.input!r} holds {images.shape[0]} image; FID needs at least 2")
    warn_if_few(cfg.num_samples if images is None else int(images.shape[0]))
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


CONDITIONAL_ONLY = (("--guidance-scale", "guidance_scale"), ("--num-reference", "num_reference"),
                    ("--height", "height"), ("--width", "width"), ("--dtype", "dtype"),
                    ("--negative-prompt", "negative_prompt"))


def _check_unconditional_options(args) -> None:
    given = [flag for flag, name in CONDITIONAL_ONLY if getattr(args, name) is not None]
    check(not given, f"{', '.join(given)} only apply to conditional models (with --prompts or --class-labels), and "
          f"{args.input!r} is sampled unconditionally; drop {given[0] if given else ''}")


def _is_conditional(model: str) -> bool:
    """Whether the model in folder ``model`` needs prompts or class labels (read from its config alone)."""
    try:
        return conditioning_kind(denoiser_template(model)) is not None
    except (ValueError, FileNotFoundError):
        return False  # the unconditional loader says what is wrong with the folder


def _pipeline_of(args) -> Optional[str]:
    """--pipeline, else INPUT itself when it is a pipeline folder (model_index.json)."""
    if args.pipeline is not None:
        if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
            raise FileNotFoundError(f"--pipeline {args.pipeline!r} is not a diffusers pipeline folder (no "
                                    "model_index.json); pass the folder written by pipeline.save_pretrained")
        return args.pipeline
    return args.input if os.path.isfile(os.path.join(args.input, "model_index.json")) else None


def _cmd_fid_conditional(args, cfg: FIDConfig, model: str) -> int:
    """FID of a text-to-image pipeline's denoiser or a class-conditional UNet (one variant, like the
    unconditional path)."""
    check(args.image_size is None, "--image-size applies to image inputs and unconditional models; for a "
          "conditional model pass --height and --width")
    prompt_set = None
    if cfg.prompts is not None:  # text prompts: known before any model is loaded
        prompt_set = conditions_of(cfg)
        check(args.reference is not None or prompt_set.reference is not None, f"--prompts {args.prompts!r} gives "
              "prompts without images, so there is no reference to compare with; pass --reference (real images: a "
              "folder, a .npy/.npz array or a stats .npz), or --prompts a captioned image folder or saved dataset")
    num_samples = args.num_samples
    if num_samples is None and prompt_set is not None:
        num_samples = len(prompt_set)  # one image per prompt (per reference image of a captioned folder)
    pipeline = _pipeline_of(args)
    extractor = load_extractor(args.inception_weights, device=fid.resolve_device(args.device, None), isc=args.isc)
    scheduler_config = None if pipeline is not None else find_scheduler_config(args.input, model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        evaluation = conditional_evaluation(
            cfg, unet=model, pipeline=pipeline, prompt_set=prompt_set, reference=args.reference,
            num_samples=num_samples, weights=extractor, device=args.device, dtype=args.dtype, progress=not args.json,
            isc=args.isc, cache=not args.no_cache, scheduler=args.scheduler, scheduler_config=scheduler_config,
            height=args.height, width=args.width, negative_prompt=args.negative_prompt,
            resize_mode=args.resize_mode, reference_num_images=args.reference_num_images)
    if pipeline is None and scheduler_config is None:
        _scheduler_note()
    warn_if_few(evaluation.num_samples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)  # said once, just above
        result = evaluation.evaluate({"model": evaluation.parts.unet})["model"]
    result.update(input=os.path.abspath(args.input), reference=evaluation.reference.source,
                  prompts=evaluation.prompt_set.source, pipeline=None if pipeline is None else os.path.abspath(pipeline))
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
        _scheduler_note()
    return config


def _scheduler_note() -> None:
    say("no scheduler_config.json next to the model; sampling with diffusers' default noise schedule "
        "(1000 steps, linear betas)", "note")


def _cli_reference(args, cfg: FIDConfig, extractor: Extractor, image_size: Optional[int]) -> ReferenceStats:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        return reference_stats(args.reference or _D.reference, image_size=image_size, num_images=args.reference_num_images,
                               weights=extractor, cache=not args.no_cache, progress=not args.json, cfg=cfg)


def _cmd_ref_stats(args) -> int:
    _check_output(args.output, args.overwrite)
    check(args.output is None or args.output.endswith(".npz"), f"--output must end with .npz, got {args.output!r}")
    check((args.source is None) != (args.prompts is None), "ref-stats needs SOURCE (reference images) or --prompts "
          f"(a captioned image folder or saved dataset), exactly one of them; got {args.source!r} and {args.prompts!r}")
    if args.prompts is not None:
        stats = _prompt_set_stats(args)
    else:
        given = [flag for flag, value in (("--num-reference", args.num_reference), ("--height", args.height),
                                          ("--width", args.width)) if value is not None]
        check(not given, f"{given[0] if given else ''} applies to --prompts; for SOURCE pass --image-size / --num-images")
        stats = reference_stats(args.source, image_size=args.image_size, resize_mode=args.resize_mode or _D.resize_mode,
                                num_images=args.num_images, batch_size=args.batch_size, device=args.device,
                                weights=args.inception_weights, cache=not args.no_cache, progress=not args.json)
    if args.output:
        stats.save(args.output)
    info = {"path": os.path.abspath(args.output) if args.output else stats.path, "key": stats.key,
            "num_images": stats.num_images, "inception_sha256": stats.inception_sha256, "source": stats.source,
            "kid_features": None if stats.features is None else int(stats.features.shape[0])}
    print(json.dumps(info, sort_keys=True) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def _prompt_set_stats(args) -> ReferenceStats:
    """Statistics of the images paired with --prompts, at the sample size (the cache entry ``fid`` reads)."""
    check(args.num_images is None, "--num-images applies to SOURCE; with --prompts, hold out rows with --num-reference")
    if args.image_size is not None:
        check(args.height is None and args.width is None, "give --image-size or --height/--width, not both")
        size = (args.image_size, args.image_size)
    else:
        check(args.height is not None and args.width is not None, f"ref-stats --prompts {args.prompts!r} needs the "
              "size the model samples at: pass --image-size N, or --height and --width (e.g. 512 for Stable "
              "Diffusion 1.x)")
        size = (args.height, args.width)
    check(all(isinstance(v, int) and v >= 1 for v in size), f"--height/--width must be >= 1, got {size}")
    cfg = FIDConfig(prompts=args.prompts, num_reference=args.num_reference, caption_column=args.caption_column,
                    batch_size=args.batch_size)
    prompt_set = conditions_of(cfg)
    extractor = load_extractor(args.inception_weights, device=fid.resolve_device(args.device, None))
    return prompt_set_reference_stats(prompt_set, extractor, size=size, resize_mode=args.resize_mode or
                                      DEFAULT_RESIZE_MODE, batch_size=args.batch_size, progress=not args.json,
                                      cache=not args.no_cache)


def _add_common(p) -> None:
    p.add_argument("--image-size", type=int, default=None,
                   help="bring images to NxN first (needed for folders of mixed sizes); default: the size of the "
                        "evaluated images (model resolution)")
    p.add_argument("--resize-mode", choices=("pad", "resize"), default=None,
                   help=f"pad: zero-pad/centre-crop (Fashion-MNIST 28 -> 32); resize: shorter side, then centre-crop "
                        f"(default {_D.resize_mode}; {DEFAULT_RESIZE_MODE} for the images paired with --prompts)")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="images per batch")
    p.add_argument("--inception-weights", default=None, help="Inception weights file (default: see `inception info`)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--no-cache", action="store_true", help="recompute reference statistics, do not cache them")
    p.add_argument("--output", default=None, help="also write the result to this file (refused if it exists)")
    p.add_argument("--overwrite", action="store_true", help="allow --output to replace an existing file")
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bars)")


def _add_prompt_source(p) -> None:
    p.add_argument("--prompts", default=None,
                   help="conditions of a text-to-image model: a text file (one prompt per line), an image folder with "
                        "metadata.jsonl (its held-out rows: prompts and reference images) or a dataset saved with "
                        "save_to_disk")
    p.add_argument("--num-reference", type=int, default=None,
                   help="rows of a captioned folder or dataset held out as prompts + reference images, the last N "
                        "(default: all rows)")
    p.add_argument("--caption-column", default=_D.caption_column, help="caption column of metadata.jsonl or the dataset")
    p.add_argument("--height", type=int, default=None, help="sample height in pixels (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="sample width in pixels (default: the model's)")


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("fid", help="FID/KID of a model, pipeline or image folder against a reference")
    p.add_argument("input", help="model folder (UNet2DModel, a conditional UNet), pipeline folder, image folder or "
                                 ".npy/.npz images")
    p.add_argument("--subfolder", default=None, help="model subfolder inside INPUT, e.g. unet_ema or unet_lawa")
    p.add_argument("--reference", default=None,
                   help=f"fashion-mnist[:test], an image folder, a .npy/.npz image array or a stats .npz (default "
                        f"{_D.reference}; with --prompts from a captioned folder or dataset: its held-out images)")
    p.add_argument("--reference-num-images", type=int, default=None,
                   help="use the first N reference images only (default: all; statistics are cached)")
    p.add_argument("--num-samples", type=int, default=None,
                   help=f"images generated from a model (default {_D.num_samples}; with --prompts: one per prompt)")
    p.add_argument("--scheduler", choices=tuple(SCHEDULER_CLASSES), default=None,
                   help=f"sampler (default {_D.scheduler}; a pipeline's own scheduler for conditional pipelines)")
    p.add_argument("--num-inference-steps", dest="steps", type=int, default=_D.num_inference_steps,
                   help="sampler steps per image")
    add_old_spelling(p, "--steps", "--num-inference-steps", "steps", type=int)
    p.add_argument("--eta", type=float, default=_D.eta, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=_D.seed, help="base seed of the sampling noise")
    p.add_argument("--kid", action=argparse.BooleanOptionalAction, default=_D.kid, help="also compute KID")
    p.add_argument("--isc", action="store_true", help="also compute the Inception Score (needs weights with fc)")
    c = p.add_argument_group("conditional models (text-to-image pipelines, class-conditional UNets)")
    c.add_argument("--pipeline", default=None,
                   help="the diffusers pipeline folder (model_index.json) whose scheduler, VAE, text encoder and "
                        "tokenizer sample the model (default: INPUT when it is a pipeline folder)")
    _add_prompt_source(c)
    c.add_argument("--class-labels", default=None,
                   help="for a class-conditional UNet: all (every class, cycled) or comma-separated class numbers")
    c.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (default: the pipeline's own, 7.5 for Stable Diffusion; 1: none)")
    c.add_argument("--negative-prompt", default=None, help="the unconditional branch's prompt (default: the pipeline's)")
    c.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the pipeline's modules (default: as saved)")
    _add_common(p)
    p.set_defaults(func=_cmd_fid)
    r = subparsers.add_parser("ref-stats", help="compute (and cache) FID reference statistics")
    r.add_argument("source", nargs="?", default=None,
                   help="fashion-mnist[:test], an image folder or a .npy/.npz image array")
    r.add_argument("--num-images", type=int, default=None, help="use the first N images only")
    _add_prompt_source(r.add_argument_group("the reference of a prompt set (instead of SOURCE)"))
    _add_common(r)
    r.set_defaults(func=_cmd_ref_stats)
