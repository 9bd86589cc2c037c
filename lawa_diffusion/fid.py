"""FID and KID of diffusers UNets: cached reference statistics, in-memory paired sampling, torch-fidelity maths.

Every statistic and metric comes from torch-fidelity's own functions (``fid_features_to_statistics``,
``fid_statistics_to_metric``, ``kid_features_to_metric``, ``isc_features_to_metric``); features come
from torch-fidelity's InceptionV3 with the weights resolved by :mod:`lawa_diffusion.inception`.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from lawa_diffusion import data as data_mod
from lawa_diffusion.config import FIDConfig, check
from lawa_diffusion.files import atomic_write
from lawa_diffusion.inception import ISC_LAYER, Extractor, cache_root, load_extractor, resolve_weights

STATS_FORMAT = 1
ISC_CLASSES = 1008  # width of torch-fidelity's InceptionV3 logits
_D = FIDConfig()  # defaults live in config.py; the signatures below read them from here


class SmallSampleWarning(UserWarning):
    """FID from fewer than ``FIDConfig.warn_below`` images is biased upwards; compare with KID."""


def relative_error(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-30)


# --------------------------------------------------------------------------- reference statistics


@dataclasses.dataclass
class ReferenceStats:
    """FID statistics (torch-fidelity's ``mu``/``sigma``) of a reference set, with their provenance.

    features: reference features kept for KID (None when loaded from a stats file without them).
    inception_sha256: identity of the weights that made them (never served for other weights).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    inception_sha256: Optional[str]
    feature_layer: str
    features: Optional[torch.Tensor] = None
    source: str = ""
    key: Optional[str] = None
    path: Optional[str] = None

    def as_fidelity(self) -> dict:
        return {"mu": self.mu, "sigma": self.sigma}

    def meta(self) -> dict:
        return {"format": STATS_FORMAT, "num_images": self.num_images, "inception_sha256": self.inception_sha256,
                "feature_layer": self.feature_layer, "source": self.source, "key": self.key}

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz (mu, sigma, features, meta) atomically."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta()))}
        if self.features is not None:
            arrays["features"] = self.features.numpy()

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        path = os.fspath(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"])) if "meta" in z else {}
                check("mu" in z and "sigma" in z, f"stats file {path!r} holds no mu/sigma arrays; pass a file written "
                      "by `lawa-diffusion ref-stats`")
                features = torch.from_numpy(z["features"]) if "features" in z else None
                mu, sigma = z["mu"], z["sigma"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"stats file {path!r} could not be read ({str(e).splitlines()[0][:120]}); "
                             "recompute it with `lawa-diffusion ref-stats`") from None
        return cls(mu, sigma, int(meta.get("num_images", 0)), meta.get("inception_sha256"),
                   meta.get("feature_layer", "2048"), features, meta.get("source", path), meta.get("key"), path)


def is_stats_file(path) -> bool:
    """True for an .npz holding ``mu`` and ``sigma`` (a stats file rather than images)."""
    if not (isinstance(path, (str, os.PathLike)) and os.fspath(path).endswith(".npz") and os.path.isfile(path)):
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return "mu" in z.files and "sigma" in z.files
    except (OSError, ValueError):
        return False


def stats_from_features(features: torch.Tensor, *, extractor: Extractor, source: str = "",
                        features_max: int = _D.reference_features_max) -> ReferenceStats:
    """ReferenceStats from features (all used for mu/sigma; a seeded subset of ``features_max`` kept for KID)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features)
    kept = features
    if features.shape[0] > features_max:
        idx = np.sort(np.random.RandomState(0).choice(features.shape[0], features_max, replace=False))
        kept = features[torch.from_numpy(idx)]
    return ReferenceStats(stats["mu"], stats["sigma"], int(features.shape[0]), extractor.sha256, extractor.layer,
                          kept.clone(), source)


def extractor_identity(weights) -> tuple:
    """(weights SHA-256, extractor name, feature layer) without loading the network."""
    from lawa_diffusion.inception import FEATURE_LAYER

    if isinstance(weights, Extractor):
        return weights.sha256, weights.name, weights.layer
    return resolve_weights(weights).sha256, "inception-v3-compat", FEATURE_LAYER


def stats_key(source, identity: tuple, *, image_size, resize_mode, num_images, features_max) -> str:
    """Cache key: weights SHA-256, extractor and layer, data fingerprint and preprocessing."""
    sha, name, layer = identity
    payload = {"format": STATS_FORMAT, "weights_sha256": sha, "extractor": name, "layer": layer,
               "data": data_mod.fingerprint(source), "image_size": image_size,
               "resize_mode": resize_mode if image_size else None, "num_images": num_images,
               "features_max": features_max, "pixels": "uint8-rgb"}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def stats_cache_path(key: str) -> str:
    return os.path.join(cache_root(), "stats", f"{key}.npz")


def _describe(source) -> str:
    return f"uint8 tensor {tuple(source.shape)}" if isinstance(source, (torch.Tensor, np.ndarray)) else os.fspath(source)


def _load_stats_file(path: str, extractor_sha: Optional[str]) -> ReferenceStats:
    stats = ReferenceStats.load(path)
    if stats.inception_sha256 is None:
        warnings.warn(f"stats file {path!r} does not record which Inception weights made it; the FID is only "
                      "meaningful if they are the weights in use", UserWarning, stacklevel=3)
    elif extractor_sha is not None and stats.inception_sha256 != extractor_sha:
        raise ValueError(f"stats file {path!r} was computed with Inception weights sha256 {stats.inception_sha256[:16]}..., "
                         f"but the weights in use have sha256 {extractor_sha[:16]}...; recompute it with "
                         "`lawa-diffusion ref-stats` or pass --inception-weights of the file that made it")
    return stats


def reference_stats(source, *, image_size: Optional[int] = None, num_images: Optional[int] = None,
                    batch_size: int = _D.batch_size, device=None, weights=None, cache: bool = True,
                    accelerator=None, resize_mode: str = _D.resize_mode,
                    features_max: int = _D.reference_features_max, progress: bool = True) -> ReferenceStats:
    """Reference statistics of ``source`` ("fashion-mnist[:test]", image folder, .npy/.npz, stats .npz, uint8
    tensor), cached under ``$LAWA_CACHE_DIR/stats`` by weights, data fingerprint and preprocessing.

    image_size: bring images to this size first (``resize_mode``); num_images: use the first N only.
    A cache hit reads only the stats file, never the images.
    """
    if isinstance(source, ReferenceStats):
        return source
    if is_stats_file(source):
        return _load_stats_file(os.fspath(source), extractor_identity(weights)[0])
    check(num_images is None or num_images >= 2, f"num_images must be >= 2, got {num_images}")
    identity = extractor_identity(weights)
    key = stats_key(source, identity, image_size=image_size, resize_mode=resize_mode, num_images=num_images,
                    features_max=features_max)
    path = stats_cache_path(key)
    if cache and os.path.isfile(path):
        stats = ReferenceStats.load(path)
        if stats.inception_sha256 == identity[0] and stats.key == key:  # never serve stats of other weights
            return stats
    images = _reference_images(source, image_size, resize_mode, num_images)
    extractor = load_extractor(weights, device=_device(device, accelerator))
    features = extract_features(images, extractor, batch_size=batch_size, accelerator=accelerator,
                                progress=progress, desc="reference features")
    stats = stats_from_features(features, extractor=extractor, source=_describe(source), features_max=features_max)
    stats.key = key
    if cache and _is_main(accelerator):
        stats.save(path)
        stats.path = path
    return stats


def _reference_images(source, image_size, resize_mode, num_images) -> torch.Tensor:
    images = data_mod.load_images(source, image_size=image_size, resize_mode=resize_mode)
    if num_images is not None:
        check(num_images <= images.shape[0], f"num_images is {num_images} but {_describe(source)!r} has only "
              f"{images.shape[0]} images; lower --num-images")
        images = images[:num_images]
    check(images.shape[0] >= 2, f"reference {_describe(source)!r} has {images.shape[0]} image; FID needs at least 2")
    return data_mod.fit_to_size(images, image_size, resize_mode) if image_size else images


# --------------------------------------------------------------------------- features (multi-process aware)


def _is_main(accelerator) -> bool:
    return accelerator is None or accelerator.is_main_process


def _device(device, accelerator) -> torch.device:
    if device is not None:
        return torch.device(device)
    if accelerator is not None:
        return accelerator.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def map_split(num_items: int, compute: Callable[[Sequence[int]], Optional[torch.Tensor]], accelerator=None) -> torch.Tensor:
    """Run ``compute(indices)`` on contiguous shares of ``range(num_items)``, one per process, and return the
    concatenation in index order on every process (accelerate's ``gather_object``)."""
    if accelerator is None or accelerator.num_processes == 1:
        return compute(list(range(num_items)))
    from accelerate.utils import gather_object

    with accelerator.split_between_processes(list(range(num_items))) as mine:
        part = compute(mine) if len(mine) else None
    parts = [p for p in gather_object([part]) if p is not None]
    return torch.cat(parts)


def _batches(indices: Sequence[int], batch_size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


def extract_features(images: torch.Tensor, extractor: Extractor, *, batch_size: int = _D.batch_size,
                     accelerator=None, progress: bool = True, desc: str = "features", isc: bool = False):
    """Features [N, D] (float32, CPU) of uint8 images [N, C, H, W]; with ``isc``, a dict that also holds the
    ISC logits."""
    layers = _layers(extractor, isc)

    def compute(indices):
        parts = []
        with _bar(len(indices), desc, progress and _is_main(accelerator)) as bar:
            for batch in _batches(indices, batch_size):
                feats = extractor(images[batch[0]:batch[-1] + 1])
                parts.append(torch.cat([feats[n] for n in layers], dim=1))
                bar.update(len(batch))
        return torch.cat(parts)

    split = _split_layers(map_split(images.shape[0], compute, accelerator), layers)
    return split if isc else split[extractor.layer]


def _layers(extractor: Extractor, isc: bool) -> list:
    return [extractor.layer, ISC_LAYER] if isc else [extractor.layer]


def _split_layers(stacked: torch.Tensor, layers: Sequence[str]) -> dict:
    """Undo the concatenation of [pool features, ISC logits (1008 classes)] done to gather one tensor."""
    widths = [stacked.shape[1] - ISC_CLASSES, ISC_CLASSES] if len(layers) == 2 else [stacked.shape[1]]
    return dict(zip(layers, torch.split(stacked, widths, dim=1)))


# --------------------------------------------------------------------------- sampling


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


def _image_shape(unet: nn.Module) -> tuple:
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    return (unet.config.in_channels, *size)


@torch.no_grad()
def sample_uint8(unet: nn.Module, scheduler, indices: Sequence[int], *, seed: int = _D.seed,
                 num_inference_steps: int = _D.num_inference_steps, eta: float = _D.eta) -> torch.Tensor:
    """uint8 [len(indices), C, H, W] (CPU) from ``unet``; sample i's noise depends only on (seed, i)."""
    from diffusers.utils.torch_utils import randn_tensor

    param = next(unet.parameters())
    generators = [torch.Generator("cpu").manual_seed(sample_seed(seed, i)) for i in indices]
    x = randn_tensor((len(indices), *_image_shape(unet)), generator=generators, device=param.device, dtype=param.dtype)
    scheduler.set_timesteps(num_inference_steps, device=param.device)
    x = x * scheduler.init_noise_sigma
    extra = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t).sample
        x = scheduler.step(eps, t, x, generator=generators, **extra).prev_sample
    return to_uint8(x).cpu()


@contextlib.contextmanager
def _variant(spec, accelerator) -> Iterator[nn.Module]:
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


# --------------------------------------------------------------------------- metrics


def metrics_from_features(features: torch.Tensor, reference: ReferenceStats, *, kid: bool = _D.kid,
                          kid_subsets: int = _D.kid_subsets, kid_subset_size: int = _D.kid_subset_size) -> dict:
    """FID (and KID) of generated ``features`` against ``reference``, with torch-fidelity's functions."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    check(features.shape[0] >= 2, f"FID needs at least 2 generated images, got {features.shape[0]}")
    stats = fid_features_to_statistics(features)
    ref = {"mu": reference.mu.astype(stats["mu"].dtype, copy=False),
           "sigma": reference.sigma.astype(stats["sigma"].dtype, copy=False)}
    check(ref["mu"].shape == stats["mu"].shape, f"reference statistics have {ref['mu'].shape[0]} features but the "
          f"extractor gives {stats['mu'].shape[0]}; recompute the reference with the same weights")
    out = {"fid": float(fid_statistics_to_metric(stats, ref, verbose=False)[KEY_METRIC_FID])}
    if kid:
        check(reference.features is not None, f"reference {reference.source!r} keeps no features, which KID needs; "
              "pass --no-kid or recompute the reference with `lawa-diffusion ref-stats`")
        size = min(kid_subset_size, features.shape[0], reference.features.shape[0])
        metric = kid_features_to_metric(features, reference.features, kid_subsets=kid_subsets,
                                        kid_subset_size=size, verbose=False)
        out.update(kid_mean=metric[KEY_METRIC_KID_MEAN], kid_std=metric[KEY_METRIC_KID_STD], kid_subset_size=size)
    return out


def isc_from_logits(logits: torch.Tensor) -> dict:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    metric = isc_features_to_metric(logits)
    return {"isc_mean": metric[KEY_METRIC_ISC_MEAN], "isc_std": metric[KEY_METRIC_ISC_STD]}


def warn_if_few(num_samples: int) -> None:
    check(isinstance(num_samples, int) and num_samples >= 2,
          f"num_samples (--num-samples) must be an integer >= 2 (FID needs a covariance), got {num_samples!r}")
    if num_samples < _D.warn_below:
        warnings.warn(f"FID from {num_samples} < {_D.warn_below} images is biased upwards and noisy; compare "
                      "variants on the same number of images, and prefer KID at this size", SmallSampleWarning,
                      stacklevel=3)


# --------------------------------------------------------------------------- paired evaluation


def evaluate_variants(variants: Mapping[str, Any], reference, *, num_samples: int = _D.num_samples,
                      batch_size: int = _D.batch_size, scheduler: Any = _D.scheduler,
                      num_inference_steps: int = _D.num_inference_steps, seed: int = _D.seed, kid: bool = _D.kid,
                      accelerator=None, weights=None, progress: bool = True, scheduler_config: Optional[Mapping] = None,
                      eta: float = _D.eta, isc: bool = False, kid_subsets: int = _D.kid_subsets,
                      kid_subset_size: int = _D.kid_subset_size, device=None) -> dict:
    """FID/KID of each weight variant on the same noise and seeds (common random numbers).

    variants: name -> UNet2DModel, or a zero-arg callable returning a context manager that yields the UNet
    with those weights swapped in. reference: ReferenceStats or any ``reference_stats`` source.
    Returns {name: {fid, kid_mean, kid_std, num_samples, inception_sha256, ...}} on every process.
    """
    warn_if_few(num_samples)
    check(len(variants) >= 1, "variants must name at least one model to evaluate")
    extractor = load_extractor(weights, device=_device(device, accelerator), isc=isc)
    if not isinstance(reference, ReferenceStats):
        reference = reference_stats(reference, weights=extractor, accelerator=accelerator, progress=progress,
                                    image_size=_reference_size(variants, accelerator))
    check(reference.inception_sha256 in (None, extractor.sha256), f"reference statistics were made with weights "
          f"sha256 {str(reference.inception_sha256)[:16]}..., not the weights in use ({extractor.sha256[:16]}...); "
          "recompute them with the same weights")
    sampler = dict(scheduler=scheduler, scheduler_config=scheduler_config, seed=seed,
                   num_inference_steps=num_inference_steps, eta=eta, batch_size=batch_size)
    results = {}
    for name, spec in variants.items():
        feats = _variant_features(name, spec, extractor, num_samples, sampler, accelerator, progress, isc)
        results[name] = metrics_from_features(feats[extractor.layer], reference, kid=kid, kid_subsets=kid_subsets,
                                              kid_subset_size=kid_subset_size)
        if isc:
            results[name].update(isc_from_logits(feats[ISC_LAYER]))
        results[name].update(num_samples=num_samples, inception_sha256=extractor.sha256, reference_key=reference.key,
                             scheduler=scheduler if isinstance(scheduler, str) else type(scheduler).__name__,
                             num_inference_steps=num_inference_steps, seed=seed)
    return results


def _reference_size(variants: Mapping[str, Any], accelerator) -> Optional[int]:
    first = next(iter(variants.values()))
    with _variant(first, accelerator) as unet:
        shape = _image_shape(unet)
    return shape[1] if shape[1] == shape[2] else None


def _sample_features(unet, extractor, layers, sampler, indices, desc, show) -> torch.Tensor:
    """Features (layers concatenated) of the samples ``indices`` of ``unet``, batch by batch."""
    parts = []
    with _bar(len(indices), desc, show) as bar:
        for batch in _batches(indices, sampler["batch_size"]):
            images = sample_uint8(unet, build_scheduler(sampler["scheduler"], sampler["scheduler_config"]), batch,
                                  seed=sampler["seed"], eta=sampler["eta"],
                                  num_inference_steps=sampler["num_inference_steps"])
            feats = extractor(images)
            parts.append(torch.cat([feats[n] for n in layers], dim=1))
            bar.update(len(batch))
    return torch.cat(parts)


def _variant_features(name, spec, extractor, num_samples, sampler, accelerator, progress, isc) -> dict:
    layers = _layers(extractor, isc)
    show = progress and _is_main(accelerator)
    with _variant(spec, accelerator) as unet:
        stacked = map_split(num_samples, lambda idx: _sample_features(unet, extractor, layers, sampler, idx,
                                                                      f"sampling {name}", show), accelerator)
    return _split_layers(stacked, layers)


def fid_of_images(images: torch.Tensor, reference, *, batch_size: int = _D.batch_size, kid: bool = _D.kid,
                  weights=None, accelerator=None, device=None, progress: bool = True, isc: bool = False,
                  kid_subsets: int = _D.kid_subsets, kid_subset_size: int = _D.kid_subset_size) -> dict:
    """FID (and KID/ISC) of uint8 images [N, C, H, W] against a reference (stats or source)."""
    warn_if_few(int(images.shape[0]))
    extractor = load_extractor(weights, device=_device(device, accelerator), isc=isc)
    if not isinstance(reference, ReferenceStats):
        reference = reference_stats(reference, weights=extractor, accelerator=accelerator, progress=progress)
    feats = extract_features(images, extractor, batch_size=batch_size, accelerator=accelerator, progress=progress,
                             desc="features", isc=isc)
    feats = feats if isc else {extractor.layer: feats}
    out = metrics_from_features(feats[extractor.layer], reference, kid=kid, kid_subsets=kid_subsets,
                                kid_subset_size=kid_subset_size)
    if isc:
        out.update(isc_from_logits(feats[ISC_LAYER]))
    out.update(num_samples=int(images.shape[0]), inception_sha256=extractor.sha256, reference_key=reference.key)
    return out


# --------------------------------------------------------------------------- inputs of the CLI


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
    return unet.to(_device(device, None)).eval()


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


# --------------------------------------------------------------------------- CLI


@contextlib.contextmanager
def _plain_warnings() -> Iterator[None]:
    """Show warnings as one 'warning: ...' line on stderr."""
    import sys

    previous = warnings.showwarning
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        warnings.showwarning = previous


def _check_output(path: Optional[str], overwrite: bool) -> None:
    if path and os.path.exists(path) and not overwrite:
        raise FileExistsError(f"--output {path!r} already exists; choose another path or pass --overwrite")


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
    FIDConfig(num_samples=args.num_samples, batch_size=args.batch_size, scheduler=args.scheduler,
              num_inference_steps=args.steps, seed=args.seed)  # validates the options before any work
    if not os.path.exists(args.input):
        raise FileNotFoundError(f"input {args.input!r} does not exist; pass a model folder, a pipeline folder, "
                                "an image folder or a .npy/.npz image file")
    model = _model_folder(args.input, args.subfolder) if os.path.isdir(args.input) else None
    with _plain_warnings():
        images = _load_input_images(args.input, args) if model is None else None
        unet = load_unet(model, args.device) if model is not None else None
        if images is not None:
            check(images.shape[0] >= 2, f"input {args.input!r} holds {images.shape[0]} image; FID needs at least 2")
        warn_if_few(args.num_samples if images is None else int(images.shape[0]))
        extractor = load_extractor(args.inception_weights, device=_device(args.device, None), isc=args.isc)
        shape = tuple(images.shape[1:]) if unet is None else _image_shape(unet)
        size = args.image_size or (shape[1] if shape[1] == shape[2] else None)  # reference at the evaluated size
        reference = _cli_reference(args, extractor, size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SmallSampleWarning)  # said once above
            result = _cli_evaluate(args, images, unet, model, extractor, reference)
    result.update(input=os.path.abspath(args.input), reference=reference.source)
    _print_result(result, args.json)
    if args.output:
        from lawa_diffusion.files import atomic_write_json

        atomic_write_json(args.output, result)
    return 0


def _cli_evaluate(args, images, unet, model, extractor, reference) -> dict:
    common = dict(weights=extractor, batch_size=args.batch_size, kid=args.kid, isc=args.isc, progress=not args.json)
    if unet is None:
        return fid_of_images(images, reference, **common)
    return evaluate_variants({"model": unet}, reference, num_samples=args.num_samples, scheduler=args.scheduler,
                             scheduler_config=_scheduler_config(args.input, model), num_inference_steps=args.steps,
                             eta=args.eta, seed=args.seed, **common)["model"]


def _scheduler_config(path: str, model: str) -> Optional[dict]:
    import sys

    config = find_scheduler_config(path, model)
    if config is None:
        print("note: no scheduler_config.json next to the model; sampling with diffusers' default noise schedule "
              "(1000 steps, linear betas)", file=sys.stderr)
    return config


def _cli_reference(args, extractor: Extractor, image_size: Optional[int]) -> ReferenceStats:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        return reference_stats(args.reference, image_size=image_size, resize_mode=args.resize_mode,
                               num_images=args.reference_num_images, batch_size=args.batch_size, weights=extractor,
                               cache=not args.no_cache, progress=not args.json)


def _cmd_ref_stats(args) -> int:
    _check_output(args.output, args.overwrite)
    check(args.output is None or args.output.endswith(".npz"), f"--output must end with .npz, got {args.output!r}")
    with _plain_warnings():
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
