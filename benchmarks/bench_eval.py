"""FID tracking during training: metric maths in a background thread vs inline, side by side in one run.

Both runs train the same UNet for the same steps with the same evaluations (EMA and LAWA, sampled and
turned into 2048-dim features by the stand-in feature network, so that the FID/KID maths cost what
they cost on Inception features while the network itself stays cheap). The runs alternate
(inline, background, inline, ...) so that machine noise hits both. Prints one JSON object per line:

  {"bench": "background_metrics", "ratio": background wall / inline wall (median over repeats), ...}

and checks that both runs wrote the same FID/KID rows.
Usage: python benchmarks/bench_eval.py [--device cpu|cuda] [--steps 100] [--eval-every 50] [--num-samples 500]
       [--repeats 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(out: str, args, background: bool) -> dict:
    return {
        "output_dir": out, "max_train_steps": args.steps, "train_batch_size": args.batch_size,
        "checkpointing_steps": 0, "checkpoints_total_limit": 1, "log_with": None, "report": False, "seed": 0,
        "model": {"sample_size": 32, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
                  "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "DownBlock2D"],
                  "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8},
        "data": {"dataset": "fashion-mnist:test", "num_images": 2000},
        "lawa": {"k": 3, "every_n_steps": max(1, args.eval_every // 4), "storage": "device"},
        "eval": {"every_n_steps": args.eval_every, "at_end": False, "num_samples": args.num_samples,
                 "batch_size": args.num_samples, "num_inference_steps": 2, "reference": "fashion-mnist:test",
                 "reference_num_images": args.reference_images, "background_metrics": background},
    }


def one_run(work: str, name: str, args, background: bool, extractor) -> tuple[float, list]:
    from lawa_diffusion import train
    from lawa_diffusion.config import TrainConfig
    from lawa_diffusion.files import read_jsonl

    out = os.path.join(work, name)
    cfg = TrainConfig.from_dict(config(out, args, background))
    start = time.perf_counter()
    train.train(cfg, fid_weights=extractor)
    seconds = time.perf_counter() - start
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    return seconds, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--reference-images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"
    from lawa_diffusion.inception import stand_in_extractor

    extractor = stand_in_extractor(dim=2048, device=args.device)
    timings = {"inline": [], "background": []}
    with tempfile.TemporaryDirectory() as work:
        os.environ.setdefault("LAWA_CACHE_DIR", os.path.join(work, "cache"))
        rows = {}
        for repeat in range(args.repeats):
            for mode in ("inline", "background"):
                seconds, rows[mode] = one_run(work, f"{mode}{repeat}", args, mode == "background", extractor)
                timings[mode].append(seconds)
        keys = ("step", "variant", "fid", "kid_mean", "kid_std")
        same = [{k: r[k] for k in keys} for r in rows["inline"]] == [{k: r[k] for k in keys} for r in rows["background"]]
        metric_s = sum(r["metric_seconds"] for r in rows["inline"])
    inline, background = statistics.median(timings["inline"]), statistics.median(timings["background"])
    print(json.dumps({"bench": "background_metrics", "device": args.device, "steps": args.steps,
                      "evaluations": args.steps // args.eval_every, "num_samples": args.num_samples,
                      "inline_s": round(inline, 2), "background_s": round(background, 2),
                      "metric_s_inline_run": round(metric_s, 2), "ratio": round(background / inline, 3),
                      "same_rows": same, "torch_threads": torch.get_num_threads(),
                      "cpu": platform.processor() or platform.machine()}), flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
