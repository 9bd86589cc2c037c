"""FID evaluation cost, measured side by side in one run; prints one JSON object per line.

1. "fid_in_memory_vs_folder": the same uint8 images evaluated (a) in memory by ``fid_of_images`` against
   cached reference statistics, and (b) by the common workflow: write them as PNGs, then
   ``torch_fidelity.calculate_metrics(input1=folder, input2=reference folder)`` with torch-fidelity's own
   reference cache warmed. Sampling is left out: it costs the same in both workflows.
2. "reference_stats_cache": ``reference_stats`` recomputed vs served from the cache.

Images are Fashion-MNIST (test split as the evaluated set, train split as the reference), padded to
32x32. Defaults: few images on CPU, more on CUDA.
Usage: python benchmarks/bench_fid.py [--num-images N] [--reference-images M] [--device cuda|cpu]
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

import torch


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
    from lawa_diffusion import fid, inception

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
    from lawa_diffusion import fid

    kwargs = dict(weights=weights.path, device=device, batch_size=args.batch_size, progress=False)
    _, recompute_s = _timed(lambda: fid.reference_stats(reference, cache=False, **kwargs))
    fid.reference_stats(reference, **kwargs)  # fill the cache
    _, hit_s = _timed(lambda: fid.reference_stats(reference, **kwargs))
    return {"bench": "reference_stats_cache", "reference_images": int(reference.shape[0]),
            "recompute_s": round(recompute_s, 3), "hit_s": round(hit_s, 4), "ratio": round(recompute_s / hit_s, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-images", type=int, default=None, help="evaluated images (CPU 32, CUDA 2048)")
    parser.add_argument("--reference-images", type=int, default=None, help="reference images (CPU 64, CUDA 10000)")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.num_images or (2048 if cuda else 32)
    m = args.reference_images or (10000 if cuda else 64)

    from lawa_diffusion import data, inception

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
        print(json.dumps(bench_in_memory_vs_folder(args, device, weights, generated, reference, work)), flush=True)
        print(json.dumps(bench_cache(args, device, weights, reference)), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
