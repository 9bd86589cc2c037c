"""FID evaluation cost, measured side by side in one run; prints one JSON object per line.

1. "fid_in_memory_vs_folder": the same uint8 images evaluated (a) in memory by ``fid_of_images`` against
   cached reference statistics, and (b) by the common workflow: write them as PNGs, then
   ``torch_fidelity.calculate_metrics(input1=folder, input2=reference folder)`` with torch-fidelity's own
   reference cache warmed. Sampling is left out: it costs the same in both workflows.
2. "reference_stats_cache": ``reference_stats`` recomputed vs served from the cache.
3. "metric_maths": FID and KID of the same Inception features by torch-fidelity's functions (NumPy, CPU) and
   by ``lawa_diffusion.maths.fid_kid`` (float64 torch on --device; forced there on a CPU too): seconds of each
   (the device's first FID call also factors the reference covariance, reported apart) and their relative
   differences.

Images are Fashion-MNIST (test split as the evaluated set, train split as the reference), padded to
32x32. Defaults: few images on CPU, more on CUDA.
Usage: python benchmarks/bench_fid.py [--num-images N] [--reference-images M] [--device cuda|cpu] [--only maths]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np
import torch


def _relative(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-30)

def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _write_pngs(images: torch.Tensor, folder: str) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img.expand(3, -1, -1).permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:06d}.png"))


def _folder_workflow(images, ref_dir, work, weights, device, batch_size, cache_name):
    import torch_fidelity

    gen_dir = os.path.join(work, "generated")
    shutil.rmtree(gen_dir, ignore_errors=True)
    _, write_s = _timed(lambda: _write_pngs(images, gen_dir))
    metrics, metric_s = _timed(lambda: torch_fidelity.calculate_metrics(
        input1=gen_dir, input2=ref_dir, input2_cache_name=cache_name, fid=True, cuda=device.type == "cuda",
        batch_size=batch_size, cache_root=os.path.join(work, "fidelity_cache"), verbose=False,
        feature_extractor_weights_path=weights.path))
    return metrics["frechet_inception_distance"], write_s, metric_s


def bench_in_memory_vs_folder(args, device, weights, generated, reference, work) -> dict:
    from lawa_diffusion.evaluation import fid, inception

    ref_dir = os.path.join(work, "reference")
    _write_pngs(reference, ref_dir)
    cache_name = f"bench-ref-{weights.sha256[:16]}-{reference.shape[0]}"  # the weights are part of the name
    _folder_workflow(generated[:2], ref_dir, work, weights, device, args.batch_size, cache_name)  # warm its cache
    inception._LOADED.clear()
    stats = fid.reference_stats(reference, weights=weights.path, device=device, progress=False)
    inception._LOADED.clear()
    evaluate = lambda: fid.fid_of_images(generated, stats, kid=False, weights=weights.path, device=device,
                                         batch_size=args.batch_size, progress=False)
    _, cold_s = _timed(evaluate)  # includes loading the network, as the folder workflow does on each call
    ours, warm_s = _timed(evaluate)  # network kept in memory, as during training
    folder_fid, write_s, metric_s = _folder_workflow(generated, ref_dir, work, weights, device, args.batch_size,
                                                     cache_name)
    folder_s = write_s + metric_s
    return {"bench": "fid_in_memory_vs_folder", "num_images": int(generated.shape[0]),
            "reference_images": int(reference.shape[0]), "in_memory_s": round(warm_s, 3),
            "in_memory_cold_s": round(cold_s, 3), "folder_s": round(folder_s, 3), "png_write_s": round(write_s, 3),
            "ratio": round(folder_s / warm_s, 3), "ratio_cold": round(folder_s / cold_s, 3),
            "fid_in_memory": ours["fid"], "fid_folder": folder_fid,
            "fid_rel_diff": abs(ours["fid"] - folder_fid) / abs(folder_fid)}


def bench_cache(args, device, weights, reference) -> dict:
    from lawa_diffusion.evaluation import fid

    kwargs = dict(weights=weights.path, device=device, batch_size=args.batch_size, progress=False)
    _, recompute_s = _timed(lambda: fid.reference_stats(reference, cache=False, **kwargs))
    fid.reference_stats(reference, **kwargs)  # fill the cache
    _, hit_s = _timed(lambda: fid.reference_stats(reference, **kwargs))
    return {"bench": "reference_stats_cache", "reference_images": int(reference.shape[0]),
            "recompute_s": round(recompute_s, 3), "hit_s": round(hit_s, 4), "ratio": round(recompute_s / hit_s, 1)}


def _synced(fn, device):
    def run():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out
    return _timed(run)


def bench_metric_maths(args, device, weights, generated, reference) -> dict:
    """torch-fidelity's FID/KID maths on the CPU vs the float64 device maths, on the same features."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, kid_features_to_metric

    from lawa_diffusion.evaluation import fid
    from lawa_diffusion.maths import fid_kid as metric_maths

    stats = fid.reference_stats(reference, weights=weights.path, device=device, batch_size=args.batch_size,
                                progress=False)
    feats = fid.extract_features(generated, fid.load_extractor(weights.path, device=device),
                                 batch_size=args.batch_size, progress=False)
    size = min(args.kid_subset_size, feats.shape[0], stats.features.shape[0])
    ref = {"mu": stats.mu.astype(np.float32), "sigma": stats.sigma}

    def fidelity_fid():
        return fid_statistics_to_metric(fid_features_to_statistics(feats), ref, verbose=False)[KEY_METRIC_FID]

    def fidelity_kid():
        return kid_features_to_metric(feats, stats.features, kid_subsets=args.kid_subsets, kid_subset_size=size,
                                      verbose=False)[KEY_METRIC_KID_MEAN]

    import torchmetrics.image.kid  # noqa: F401  (imported once per process; not part of the maths' time)

    on_dev = feats.to(device)
    cpu_fid, cpu_fid_s = _timed(fidelity_fid)
    cpu_kid, cpu_kid_s = _timed(fidelity_kid)
    dev_fid_first, first_s = _synced(lambda: metric_maths.fid_from_features(on_dev, stats.mu, stats.sigma).item(), device)
    dev_fid, dev_fid_s = _synced(lambda: metric_maths.fid_from_features(on_dev, stats.mu, stats.sigma).item(), device)
    dev_kid, dev_kid_s = _synced(lambda: metric_maths.kid(on_dev, stats.features, subsets=args.kid_subsets,
                                                          subset_size=size)[0].item(), device)
    return {"bench": "metric_maths", "device": str(device), "num_images": int(feats.shape[0]),
            "reference_images": int(stats.features.shape[0]), "kid_subsets": args.kid_subsets, "kid_subset_size": size,
            "fid_cpu_s": round(cpu_fid_s, 4), "fid_device_s": round(dev_fid_s, 4),
            "fid_device_first_s": round(first_s, 4), "kid_cpu_s": round(cpu_kid_s, 4),
            "kid_device_s": round(dev_kid_s, 4), "fid": dev_fid,
            "fid_rel_diff": _relative(dev_fid, cpu_fid), "kid_mean": dev_kid,
            "kid_rel_diff": _relative(dev_kid, cpu_kid)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-images", type=int, default=None, help="evaluated images (CPU 32, CUDA 2048)")
    parser.add_argument("--reference-images", type=int, default=None, help="reference images (CPU 64, CUDA 10000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--kid-subsets", type=int, default=100)
    parser.add_argument("--kid-subset-size", type=int, default=1000)
    parser.add_argument("--only", choices=("all", "maths"), default="all",
                        help="maths: only the metric-maths comparison (skips the PNG-folder workflow)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.num_images or (2048 if cuda else 32)
    m = args.reference_images or (10000 if cuda else 64)

    from lawa_diffusion.evaluation import images as data
    from lawa_diffusion.evaluation import inception

    weights = inception.resolve_weights(fetch=False)
    generated = data.fit_to_size(data.load_fashion_mnist("test", download=False)[:n], 32)
    reference = data.fit_to_size(data.load_fashion_mnist("train", download=False)[:m], 32)
    work = tempfile.mkdtemp(prefix="bench_fid_")
    os.environ["LAWA_CACHE_DIR"] = os.path.join(work, "lawa_cache")  # start from an empty stats cache
    header = {"bench": "environment", "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu_count": os.cpu_count(), "python": platform.python_version(), "inception_sha256": weights.sha256}
    if cuda:
        header["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(header), flush=True)
    try:
        if args.only == "all":
            print(json.dumps(bench_in_memory_vs_folder(args, device, weights, generated, reference, work)), flush=True)
            print(json.dumps(bench_cache(args, device, weights, reference)), flush=True)
        print(json.dumps(bench_metric_maths(args, device, weights, generated, reference)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
