"""FID and KID: cached reference statistics, Inception features (multi-process aware), torch-fidelity maths.

Every statistic and metric comes from torch-fidelity's own functions (``fid_features_to_statistics``,
``fid_statistics_to_metric``, ``kid_features_to_metric``, ``isc_features_to_metric``); features come
from torch-fidelity's InceptionV3 with the weights resolved by :mod:`lawa_diffusion.inception`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings
import weakref
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.config.fid import FIDConfig
from lawa_diffusion.evaluation import images as data_mod
from lawa_diffusion.evaluation.inception import ISC_LAYER, Extractor, load_extractor, resolve_weights
from lawa_diffusion.maths import fid_kid as metric_maths
from lawa_diffusion.utils.files import atomic_write, cache_root
from lawa_diffusion.utils.output import is_main_process, warn

STATS_FORMAT = 1
ISC_CLASSES = 1008  # width of torch-fidelity's InceptionV3 logits
_D = FIDConfig()  # defaults live in config.py; the signatures below read them from here


class SmallSampleWarning(UserWarning):
    """FID from fewer than ``FIDConfig.warn_below`` images is biased upwards; compare with KID."""


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
    from lawa_diffusion.evaluation.inception import FEATURE_LAYER

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


def made_with(stats: ReferenceStats, sha256: str) -> bool:
    """Whether ``stats`` come from the Inception weights with this SHA-256 (a file that records none: assumed)."""
    return stats.inception_sha256 in (None, sha256)


def check_weights(stats: ReferenceStats, sha256: Optional[str]) -> ReferenceStats:
    """``stats``, refused with one sentence when they were made with other weights than ``sha256``."""
    check(sha256 is None or made_with(stats, sha256),
          f"reference {stats.path or stats.source!r} was computed with Inception weights sha256 "
          f"{str(stats.inception_sha256)[:16]}..., but the weights in use have sha256 {str(sha256)[:16]}...; recompute "
          "it with `lawa-diffusion ref-stats` or pass --inception-weights of the file that made it")
    return stats


def _load_stats_file(path: str, extractor_sha: Optional[str]) -> ReferenceStats:
    stats = ReferenceStats.load(path)
    if stats.inception_sha256 is None:
        warn(f"stats file {path!r} does not record which Inception weights made it; the FID is only "
             "meaningful if they are the weights in use", stacklevel=3)
    return check_weights(stats, extractor_sha)


def reference_stats(source, *, image_size: Optional[int] = None, num_images: Optional[int] = None, device=None,
                    weights=None, cache: bool = True, accelerator=None, progress: bool = True,
                    cfg: Optional[FIDConfig] = None, **options) -> ReferenceStats:
    """Reference statistics of ``source`` ("fashion-mnist[:test]", image folder, .npy/.npz, stats .npz, uint8
    tensor), cached under ``$LAWA_CACHE_DIR/stats`` by weights, data fingerprint and preprocessing.

    image_size: bring images to this size first (``cfg.resize_mode``); num_images: use the first N only.
    ``options`` override fields of ``cfg`` (batch_size, resize_mode, reference_features_max).
    A cache hit reads only the stats file, never the images.
    """
    cfg = settings(cfg, **options)
    resize_mode, features_max = cfg.resize_mode, cfg.reference_features_max
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
        if stats.key == key and made_with(stats, identity[0]):  # never serve stats of other weights
            return stats
    images = _reference_images(source, image_size, resize_mode, num_images)
    extractor = load_extractor(weights, device=resolve_device(device, accelerator))
    features = extract_features(images, extractor, batch_size=cfg.batch_size, accelerator=accelerator,
                                progress=progress, desc="reference features")
    stats = stats_from_features(features, extractor=extractor, source=_describe(source), features_max=features_max)
    stats.key = key
    if cache and is_main_process(accelerator):
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


def launched_accelerator():
    """An ``accelerate.Accelerator`` when this process is one of several (``accelerate launch`` / torchrun: the
    evaluation commands then split their samples across the processes), else None."""
    from lawa_diffusion.utils.output import process_count

    if process_count() <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def resolve_device(device, accelerator) -> torch.device:
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


def batches(indices: Sequence[int], batch_size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, leave=False, dynamic_ncols=True)


def extract_features(images: torch.Tensor, extractor: Extractor, *, batch_size: int = _D.batch_size,
                     accelerator=None, progress: bool = True, desc: str = "features", isc: bool = False):
    """Features [N, D] (float32, CPU) of uint8 images [N, C, H, W]; with ``isc``, a dict that also holds the
    ISC logits."""
    layers = feature_layers(extractor, isc)
    compute = functools.partial(batched_features, lambda batch: images[batch[0]:batch[-1] + 1], extractor, layers,
                                batch_size=batch_size, desc=desc, show=progress and is_main_process(accelerator))
    split = split_layers(map_split(images.shape[0], compute, accelerator), layers)
    return split if isc else split[extractor.layer]


def batched_features(images_of: Callable[[Sequence[int]], torch.Tensor], extractor: Extractor, layers: Sequence[str],
                     indices: Sequence[int], *, batch_size: int, desc: str, show: bool) -> torch.Tensor:
    """Features of ``layers`` (concatenated) of the images ``images_of(batch)`` gives for each batch of
    ``indices``, in index order, with a progress bar."""
    parts = []
    with progress_bar(len(indices), desc, show) as bar:
        for batch in batches(indices, batch_size):
            feats = extractor(images_of(batch))
            parts.append(torch.cat([feats[n] for n in layers], dim=1))
            bar.update(len(batch))
    return torch.cat(parts)


def feature_layers(extractor: Extractor, isc: bool) -> list:
    return [extractor.layer, ISC_LAYER] if isc else [extractor.layer]


def split_layers(stacked: torch.Tensor, layers: Sequence[str]) -> dict:
    """Undo the concatenation of [pool features, ISC logits (1008 classes)] done to gather one tensor."""
    widths = [stacked.shape[1] - ISC_CLASSES, ISC_CLASSES] if len(layers) == 2 else [stacked.shape[1]]
    return dict(zip(layers, torch.split(stacked, widths, dim=1)))


def metrics_from_features(features: torch.Tensor, reference: ReferenceStats, *, kid: bool = _D.kid,
                          kid_subsets: int = _D.kid_subsets, kid_subset_size: int = _D.kid_subset_size,
                          on_device: Optional[bool] = None) -> dict:
    """FID (and KID) of generated ``features`` against ``reference``: torch-fidelity's functions on the CPU,
    the same maths in float64 on the features' device (:mod:`lawa_diffusion.maths.fid_kid`) when they are on a
    GPU or ``on_device`` is true."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    check(features.shape[0] >= 2, f"FID needs at least 2 generated images, got {features.shape[0]}")
    if features.is_cuda if on_device is None else on_device:
        return _metrics_on_device(features, reference, kid, kid_subsets, kid_subset_size)
    stats = fid_features_to_statistics(features)
    ref = {"mu": reference.mu.astype(stats["mu"].dtype, copy=False),
           "sigma": reference.sigma.astype(stats["sigma"].dtype, copy=False)}
    check(ref["mu"].shape == stats["mu"].shape, f"reference statistics have {ref['mu'].shape[0]} features but the "
          f"extractor gives {stats['mu'].shape[0]}; recompute the reference with the same weights")
    out = {"fid": float(fid_statistics_to_metric(stats, ref, verbose=False)[KEY_METRIC_FID])}
    if kid:
        size = _kid_subset_size(features, reference, kid_subset_size)
        metric = kid_features_to_metric(features, reference.features, kid_subsets=kid_subsets,
                                        kid_subset_size=size, verbose=False)
        out.update(kid_mean=metric[KEY_METRIC_KID_MEAN], kid_std=metric[KEY_METRIC_KID_STD], kid_subset_size=size)
    return out


def _kid_subset_size(features: torch.Tensor, reference: ReferenceStats, kid_subset_size: int) -> int:
    check(reference.features is not None, f"reference {reference.source!r} keeps no features, which KID needs; "
          "pass --no-kid or recompute the reference with `lawa-diffusion ref-stats`")
    return min(kid_subset_size, features.shape[0], reference.features.shape[0])


def _metrics_on_device(features: torch.Tensor, reference: ReferenceStats, kid: bool, kid_subsets: int,
                       kid_subset_size: int) -> dict:
    """:func:`metrics_from_features` in float64 on the features' device; one host sync, at the end."""
    check(reference.mu.shape[0] == features.shape[1], f"reference statistics have {reference.mu.shape[0]} features "
          f"but the extractor gives {features.shape[1]}; recompute the reference with the same weights")
    device = features.device
    values = {"fid": metric_maths.fid_from_features(features, reference.mu, reference.sigma,
                                                    device_copy(metric_maths.factor_of, reference.sigma, device))}
    if kid:
        size = _kid_subset_size(features, reference, kid_subset_size)
        values["kid_mean"], values["kid_std"] = metric_maths.kid(
            features, device_copy(metric_maths.as_float64, reference.features, device), subsets=kid_subsets,
            subset_size=size)
    out = dict(zip(values, torch.stack(list(values.values())).tolist()))
    return {**out, "kid_subset_size": size} if kid else out


_DEVICE_COPIES: dict = {}  # (what, id(array), device) -> tensor made from a reference array, dropped with it


def device_copy(make, array, device) -> torch.Tensor:
    """``make(array, device)`` (a float64 copy, a square-root factor), made once per reference array and device
    and kept while the array lives: a reference's statistics go to the GPU once, not at every evaluation."""
    key = (make.__name__, id(array), str(torch.device(device)))
    if key not in _DEVICE_COPIES:
        made = make(array, device)
        if made is array:  # nothing to keep (and keeping it would keep the array alive)
            return made
        _DEVICE_COPIES[key] = made
        weakref.finalize(array, _DEVICE_COPIES.pop, key, None)
    return _DEVICE_COPIES[key]


def isc_from_logits(logits: torch.Tensor) -> dict:
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    metric = isc_features_to_metric(logits)
    return {"isc_mean": metric[KEY_METRIC_ISC_MEAN], "isc_std": metric[KEY_METRIC_ISC_STD]}


@dataclasses.dataclass
class Sampled:
    """One evaluated set of images as features, before the metric maths.

    features: {layer: float32 [num_samples, D]} on the CPU, in sample order (ISC logits when asked for).
    seconds: wall time of sampling and feature extraction on this process (None for given images).
    meta: what the result records about the images (num_samples, weights, reference, sampler settings).
    device: where the metric maths run (the extractor's device: float64 maths there when it is a GPU);
        None: torch-fidelity's maths on the CPU.
    """

    features: dict
    seconds: Optional[float]
    meta: dict
    device: Optional[torch.device] = None


def settings(cfg: Optional[FIDConfig] = None, **options) -> FIDConfig:
    """``cfg`` (default: ``FIDConfig()``) with ``options`` (FIDConfig field names) replaced and checked."""
    cfg = cfg if cfg is not None else _D
    return dataclasses.replace(cfg, **options) if options else cfg


def prepare(reference, *, weights=None, device=None, accelerator=None, isc: bool = False, progress: bool = True,
            image_size: Callable[[], Optional[int]] = lambda: None) -> tuple:
    """(extractor, reference statistics) of one evaluation: ``reference`` (stats or any :func:`reference_stats`
    source, then brought to ``image_size()``) checked against the weights in use."""
    extractor = load_extractor(weights, device=resolve_device(device, accelerator), isc=isc)
    if not isinstance(reference, ReferenceStats):
        reference = reference_stats(reference, weights=extractor, accelerator=accelerator, progress=progress,
                                    image_size=image_size())
    return extractor, check_weights(reference, extractor.sha256)


def metrics_of(sampled: Sampled, reference: ReferenceStats, cfg: FIDConfig = _D) -> dict:
    """FID/KID (and ISC when its logits were extracted) of ``sampled``, with its meta and timings: the one
    place where features become metrics (``metric_seconds`` is the wall time of the maths)."""
    started = time.perf_counter()
    pool = next(f for layer, f in sampled.features.items() if layer != ISC_LAYER)
    if sampled.device is not None:
        pool = pool.to(sampled.device)  # the maths run where the features were made (float64 on a GPU)
    out = metrics_from_features(pool, reference, kid=cfg.kid, kid_subsets=cfg.kid_subsets,
                                kid_subset_size=cfg.kid_subset_size)
    if ISC_LAYER in sampled.features:
        out.update(isc_from_logits(sampled.features[ISC_LAYER]))
    out["metric_seconds"] = time.perf_counter() - started
    out.update(sampled.meta)
    if sampled.seconds is not None:
        out["sample_seconds"] = sampled.seconds
    return out


def warn_if_few(num_samples: int) -> None:
    check(isinstance(num_samples, int) and num_samples >= 2,
          f"num_samples (--num-samples) must be an integer >= 2 (FID needs a covariance), got {num_samples!r}")
    if num_samples < _D.warn_below:
        warnings.warn(f"FID from {num_samples} < {_D.warn_below} images is biased upwards and noisy; compare "
                      "variants on the same number of images, and prefer KID at this size", SmallSampleWarning,
                      stacklevel=3)


def fid_of_images(images: torch.Tensor, reference, *, weights=None, accelerator=None, device=None,
                  progress: bool = True, isc: bool = False, cfg: Optional[FIDConfig] = None, **options) -> dict:
    """FID (and KID/ISC) of uint8 images [N, C, H, W] against a reference (stats or source); ``options``
    override fields of ``cfg`` (batch_size, kid, kid_subsets, kid_subset_size)."""
    warn_if_few(int(images.shape[0]))
    cfg = settings(cfg, **options)
    extractor, reference = prepare(reference, weights=weights, device=device, accelerator=accelerator, isc=isc,
                                   progress=progress)
    feats = extract_features(images, extractor, batch_size=cfg.batch_size, accelerator=accelerator,
                             progress=progress, desc="features", isc=isc)
    meta = dict(num_samples=int(images.shape[0]), inception_sha256=extractor.sha256, reference_key=reference.key)
    return metrics_of(Sampled(feats if isc else {extractor.layer: feats}, None, meta, extractor.device), reference, cfg)
