"""The trainer and its evaluations, each measured side by side in one run; prints one JSON object per line.

--bench trainer: optimizer steps per second of the trainer (``train.train_step``: forward, backward, AdamW,
  EMA and LAWA) on the model and batch of --config, with ``fast_path: off`` and ``on``; the first
  --warmup steps (compilation, CUDA graph capture) are timed apart, and the host synchronisations of a
  few later steps are counted (torch's sync debug mode, CUDA only).
  {"bench": "trainer", "fast_path": "on", "steps_per_s": ..., "warmup_s": ..., "host_syncs_per_step": ...}
      (also "compiled", and inductor's reason when it ran without CUDA graphs ("cuda_graphs_skipped") or the
      fallback's reason ("fell_back"), null when neither happened)
  {"bench": "trainer_speedup", "ratio": on / off}
--bench evaluation: one evaluation as the trainer runs it: the eval variants of --config (two: ema, lawa)
  x eval.num_samples, sampled with eval.scheduler / num_inference_steps and turned into features by the
  Inception network, in float32 and under autocast in the training precision; then the FID/KID maths of
  both variants by torch-fidelity (CPU) and by the float64 device maths.
  {"bench": "evaluation", "sample_s": {...}, "metric_s": {...}, "evaluation_s": fast sampling + device maths, ...}
--bench background: metric maths in a background thread vs inline (below).
--bench conditional: benchmarks/bench_eval_conditional.py (the conditional evaluator's images/s over those of
  diffusers' StableDiffusionPipeline.__call__ on the same prompts and settings, goal >= 1.0), tiny on the CPU.
  {"bench": "eval_conditional", "ratio": ..., "goal": 1.0, "evaluator_img_s": ..., "pipeline_img_s": ..., ...}
--bench conditional_overhead: the training-step cost of a conditional evaluation schedule. A captioned
  Fashion-MNIST folder and a small text-to-image pipeline (scripts/make_caption_folder.py, make_tiny_pipeline.py
  with configs/text_to_image_cpu.yaml, or _gpu.yaml on CUDA) are made once, the held-out reference statistics
  cached, then scripts/train_text_to_image.py runs under the launch plugin with the same LAWA settings, without
  and with --lawa_fid_every_n_steps, alternating (--repeats times each); steps/s is the script's own rate over
  its training loop (evaluations inside it), the median over repeats.
  {"bench": "conditional_fid_overhead", "steps_per_s_without": ..., "steps_per_s_with": ..., "ratio": with /
   without, "seconds_per_evaluation": ..., "sample_s_per_evaluation": ..., "metric_s_per_evaluation": ..., ...}

Background vs inline: both runs train the same UNet for the same steps with the same evaluations (EMA and LAWA, sampled and
turned into 2048-dim features by the stand-in feature network, so that the FID/KID maths cost what
they cost on Inception features while the network itself stays cheap). The runs alternate
(inline, background, inline, ...) so that machine noise hits both. Prints one JSON object per line:

  {"bench": "background_metrics", "ratio": background wall / inline wall (median over repeats), ...}

and checks that both runs wrote the same FID/KID rows.
Usage: python benchmarks/bench_eval.py --bench trainer,evaluation [--config configs/fashion_mnist_gpu.yaml]
       [--set KEY=VALUE ...] [--warmup 30] [--train-steps 200] [--device cpu|cuda]
       python benchmarks/bench_eval.py --bench background [--steps 100] [--eval-every 50] [--num-samples 500]
       python benchmarks/bench_eval.py --bench conditional,conditional_overhead [--device cpu|cuda] [--repeats 1]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _relative(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-30)

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
    from lawa_diffusion.config.train import TrainConfig
    from lawa_diffusion.training import trainer as train
    from lawa_diffusion.utils.files import read_jsonl

    out = os.path.join(work, name)
    cfg = TrainConfig.from_dict(config(out, args, background))
    start = time.perf_counter()
    train.train(cfg, fid_weights=extractor)
    seconds = time.perf_counter() - start
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    return seconds, rows


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bench_config(args, work: str, *changes: str):
    from lawa_diffusion.config.train import load_train_config

    fixed = ["eval.every_n_steps=0", "eval.at_end=false", "log_with=null", "report=false", "checkpointing_steps=0",
             "save_ema_snapshots=false"]
    return load_train_config(args.config, [*fixed, *args.set, *changes], output_dir=work)


@contextlib.contextmanager
def counting_host_syncs(device):
    """Count the synchronising CUDA calls of the block (torch's sync debug mode, in warning mode)."""
    found: list = []
    if torch.device(device).type != "cuda":
        yield found
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found.extend(w for w in caught if "synchroniz" in str(w.message))


def trainer_steps(args, work: str, fast: str) -> dict:
    """Steps/s of ``train_step`` with ``fast_path`` = ``fast`` (after ``--warmup`` steps)."""
    from lawa_diffusion.training import trainer as train

    cfg = bench_config(args, os.path.join(work, f"trainer-{fast}"), f"fast_path={fast}")
    accelerator = train.make_accelerator(cfg, cfg.output_dir)
    p = train.build_parts(cfg, accelerator, cfg.output_dir)
    p.unet.train()
    device = accelerator.device
    try:
        sync(device)
        start = time.perf_counter()
        for step in range(1, args.warmup + 1):
            train.train_step(p, step)
        sync(device)
        warmup_s, start = time.perf_counter() - start, time.perf_counter()
        for step in range(args.warmup + 1, args.warmup + args.train_steps + 1):
            loss = train.train_step(p, step)
        sync(device)
        seconds = time.perf_counter() - start
        counted = 5
        with counting_host_syncs(device) as syncs:
            for step in range(args.warmup + args.train_steps + 1, args.warmup + args.train_steps + counted + 1):
                train.train_step(p, step)
        row = dict(bench="trainer", fast_path=fast, compiled=p.forward.is_compiled,
                   cuda_graphs_skipped=p.forward.cudagraph_skip, fell_back=p.forward.fell_back, device=str(device),
                   params=sum(t.numel() for t in p.unet.parameters()), batch=cfg.train_batch_size,
                   mixed_precision=cfg.mixed_precision, warmup_steps=args.warmup, warmup_s=round(warmup_s, 2),
                   steps=args.train_steps, steps_per_s=round(args.train_steps / seconds, 2),
                   final_loss=round(float(loss), 4),
                   host_syncs_per_step=round(len(syncs) / counted, 2) if device.type == "cuda" else None,
                   sync_sites=sorted({str(w.filename).rsplit("/", 1)[-1] + ":" + str(w.lineno) for w in syncs})[:6])
    finally:
        p.ema.lawa.close()
        accelerator.end_training()
    return row


def bench_trainer(args, work: str) -> None:
    rows = {fast: trainer_steps(args, work, fast) for fast in ("off", "on")}
    for row in rows.values():
        emit(**row)
    emit(bench="trainer_speedup", ratio=round(rows["on"]["steps_per_s"] / rows["off"]["steps_per_s"], 3), goal=3.0)


def bench_evaluation(args, work: str) -> None:
    """One evaluation: sampling (+ features) per precision, then the metric maths on the CPU and the device."""
    from lawa_diffusion.evaluation import fid, inception, sampling
    from lawa_diffusion.training import trainer as train

    cfg = bench_config(args, os.path.join(work, "evaluation"))
    e, device = cfg.eval, torch.device(args.device)
    unet = train.build_unet(cfg.model).to(device)
    extractor = (inception.stand_in_extractor(dim=2048, device=device) if args.stand_in
                 else inception.load_extractor(e.inception_weights, device=device))
    start = time.perf_counter()
    reference = fid.reference_stats(e.reference, image_size=cfg.model["sample_size"], num_images=e.reference_num_images,
                                    batch_size=e.batch_size, weights=extractor, resize_mode=e.resize_mode,
                                    reference_features_max=e.reference_features_max, progress=False)
    reference_s = time.perf_counter() - start
    variants = {name: unet for name in ("ema", "lawa")}
    options = dict(num_samples=e.num_samples, batch_size=e.batch_size, scheduler=e.scheduler,
                   num_inference_steps=e.num_inference_steps, seed=e.seed, progress=False)
    sampling.sample_variants({"warmup": unet}, extractor, **{**options, "num_samples": min(e.batch_size, 64)})
    sample_s, sampled = {}, {}
    for precision in ("no", cfg.mixed_precision):
        sync(device)
        start = time.perf_counter()
        sampled[precision] = sampling.sample_variants(variants, extractor, precision=precision, **options)
        sync(device)
        sample_s[precision] = round(time.perf_counter() - start, 3)
    import torchmetrics.image.kid  # noqa: F401  (imported once per process; not part of the maths' time)

    metric_s, results = {}, {}
    feats = {name: s.features[extractor.layer] for name, s in sampled[cfg.mixed_precision].items()}
    for where in ("cpu", "device"):
        start = time.perf_counter()
        results[where] = {name: fid.metrics_from_features(f.to(device) if where == "device" else f, reference,
                                                          kid=e.kid, kid_subsets=e.kid_subsets,
                                                          kid_subset_size=e.kid_subset_size,
                                                          on_device=where == "device")
                          for name, f in feats.items()}
        metric_s[where] = round(time.perf_counter() - start, 3)
    fast = cfg.mixed_precision

    def device_fid(s) -> float:
        return fid.metrics_from_features(s.features[extractor.layer].to(device), reference, kid=False,
                                         on_device=True)["fid"]

    emit(bench="evaluation", device=str(device), extractor=extractor.name, variants=list(variants),
         num_samples=e.num_samples, batch_size=e.batch_size, scheduler=e.scheduler, steps=e.num_inference_steps,
         reference_images=reference.num_images, reference_s=round(reference_s, 2), sample_s=sample_s, metric_s=metric_s,
         evaluation_s_before=round(sample_s["no"] + metric_s["cpu"], 3),
         evaluation_s=round(sample_s[fast] + metric_s["device"], 3), goal_s=6.0,
         fid_rel_diff_device_vs_cpu=max(_relative(results["device"][n]["fid"], results["cpu"][n]["fid"])
                                        for n in feats),
         kid_rel_diff_device_vs_cpu=max(_relative(results["device"][n]["kid_mean"], results["cpu"][n]["kid_mean"])
                                        for n in feats) if e.kid else None,
         fid_precision_shift=max(_relative(device_fid(sampled[fast][n]), device_fid(sampled["no"][n]))
                                 for n in feats) if fast != "no" else 0.0)


# ----------------------------------------------------------------------------- conditional evaluation
# bench_eval_conditional.py's sizes: its own defaults on the CPU; on CUDA an evaluation's worth of prompts
CONDITIONAL_CUDA_ARGS = ["--num-prompts", "512", "--batch-size", "128", "--steps", "20", "--width", "64"]


def bench_conditional(args) -> None:
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_eval_conditional

    sizes = CONDITIONAL_CUDA_ARGS if torch.device(args.device).type == "cuda" else []
    code = bench_eval_conditional.main(["--device", args.device, "--repeats", str(max(args.repeats, 3)), *sizes])
    if code:
        raise RuntimeError(f"bench_eval_conditional.py exited {code}")


# sizes of the text-to-image run (CPU: tiny; CUDA: the GPU check's pipeline for 300 steps, 3 evaluations)
T2I_SIZES = {
    "cpu": dict(pipeline_config="configs/text_to_image_cpu.yaml", data=["--num-train", "64", "--num-test", "8",
                                                                          "--image-size", "16"],
                num_reference=8, script=["--resolution", "16", "--train_batch_size", "8", "--max_train_steps", "12",
                                         "--learning_rate", "1e-3"],
                lawa=["--lawa_k", "3", "--lawa_every_n_steps", "2"], fid_every=6,
                fid=["--lawa_fid_num_samples", "8", "--lawa_fid_batch_size", "8",
                     "--lawa_fid_num_inference_steps", "2"]),
    "cuda": dict(pipeline_config="configs/text_to_image_gpu.yaml", data=["--num-train", "5000", "--num-test", "1000",
                                                                           "--image-size", "32"],
                 num_reference=1000, script=["--resolution", "32", "--train_batch_size", "64", "--max_train_steps",
                                             "300", "--learning_rate", "3e-4", "--mixed_precision", "bf16",
                                             "--allow_tf32", "--dataloader_num_workers", "4"],
                 lawa=["--lawa_k", "5", "--lawa_every_n_steps", "50"], fid_every=100,
                 fid=["--lawa_fid_num_samples", "1000", "--lawa_fid_batch_size", "500",
                      "--lawa_fid_num_inference_steps", "20"]),
}
DONE_RE = re.compile(r"^done: (\d+) steps in ([0-9.]+) s", re.M)


def _run(command: list, env: dict) -> str:
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise RuntimeError(f"{' '.join(command[:4])} ... exited {done.returncode}:\n{tail}")
    return done.stdout + done.stderr


def bench_conditional_overhead(args, work: str) -> None:
    """Steps/s of the text-to-image script under the plugin without and with a conditional FID schedule."""
    from lawa_diffusion.utils.files import read_jsonl

    device = torch.device(args.device).type
    size = T2I_SIZES["cuda" if device == "cuda" else "cpu"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "LAWA_CACHE_DIR": os.path.join(work, "cache")}
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "1"
    py = sys.executable
    data, pipe = os.path.join(work, "t2i_data"), os.path.join(work, "t2i_pipe")
    _run([py, "scripts/make_caption_folder.py", "--output", data, *size["data"]], env)
    _run([py, "scripts/make_tiny_pipeline.py", "--config", size["pipeline_config"], "--words-from",
          os.path.join(data, "train"), "--output", pipe], env)
    image_size = size["data"][size["data"].index("--image-size") + 1]
    _run([py, "-m", "lawa_diffusion", "ref-stats", "--prompts", os.path.join(data, "test"), "--num-reference",
          str(size["num_reference"]), "--image-size", image_size, "--device", args.device], env)
    fid = ["--lawa_fid_prompts", os.path.join(data, "test"), "--lawa_fid_num_reference", str(size["num_reference"]),
           *size["fid"]]
    seconds: dict = {"without": [], "with": []}
    steps, rows = 0, []
    for repeat in range(args.repeats):
        for mode in ("without", "with"):
            out = os.path.join(work, f"run-{mode}-{repeat}")
            every = size["fid_every"] if mode == "with" else 0
            text = _run([py, "-m", "lawa_diffusion.launch", *size["lawa"], "--lawa_fid_every_n_steps", str(every),
                         *fid, "scripts/train_text_to_image.py", "--pretrained_model_name_or_path", pipe,
                         "--train_data_dir", os.path.join(data, "train"), "--output_dir", out, "--use_ema",
                         "--seed", "0", "--checkpointing_steps", "1000000", *size["script"]], env)
            found = DONE_RE.findall(text)
            if not found:
                raise RuntimeError(f"the training script printed no 'done: N steps in S s' line ({mode} FID)")
            steps = int(found[-1][0])
            seconds[mode].append(float(found[-1][1]))
            if mode == "with":
                rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    evaluations = len({row["step"] for row in rows})
    per_eval = {key: round(sum(r.get(key) or 0.0 for r in rows) / max(evaluations, 1), 3)
                for key in ("sample_seconds", "metric_seconds")}
    emit(bench="conditional_fid_overhead", device=args.device, pipeline_config=size["pipeline_config"],
         train_steps=steps, fid_every_n_steps=size["fid_every"], evaluations=evaluations,
         variants=sorted({row["variant"] for row in rows}), num_samples=rows[0]["num_samples"] if rows else None,
         steps_per_s_without=round(steps / median["without"], 2), steps_per_s_with=round(steps / median["with"], 2),
         ratio=round(median["without"] / median["with"], 3),
         seconds_per_evaluation=round((median["with"] - median["without"]) / max(evaluations, 1), 2),
         sample_s_per_evaluation=per_eval["sample_seconds"], metric_s_per_evaluation=per_eval["metric_seconds"],
         repeats=args.repeats, seconds={k: [round(v, 2) for v in vs] for k, vs in seconds.items()})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", default="background", help="comma list of trainer, evaluation, background, conditional, "
                                                         "conditional_overhead")
    p.add_argument("--config", default="configs/fashion_mnist_gpu.yaml", help="trainer / evaluation: the run's config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="trainer / evaluation: override")
    p.add_argument("--warmup", type=int, default=30, help="trainer: steps before timing (compilation included)")
    p.add_argument("--train-steps", type=int, default=200, help="trainer: timed steps")
    p.add_argument("--stand-in", action="store_true", help="evaluation: the stand-in feature network, not Inception")
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
    benches = args.bench.split(",")
    known = ("trainer", "evaluation", "background", "conditional", "conditional_overhead")
    unknown = [b for b in benches if b not in known]
    if unknown:
        p.error(f"--bench must be a comma list of {', '.join(known)}, got {', '.join(unknown)}")
    with tempfile.TemporaryDirectory() as work:
        if "trainer" in benches:
            bench_trainer(args, work)
        if "evaluation" in benches:
            bench_evaluation(args, work)
        if "conditional" in benches:
            bench_conditional(args)
        if "conditional_overhead" in benches:
            bench_conditional_overhead(args, work)
    return background_bench(args) if "background" in benches else 0


def background_bench(args) -> int:
    from lawa_diffusion.evaluation.inception import stand_in_extractor

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
