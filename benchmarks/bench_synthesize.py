"""Benchmark of post-hoc synthesis (``Synthesis.state_dict``) against reading its snapshot files once, measured
side by side in one run on a run folder of synthetic snapshot files.

Prints one JSON object per line:

  {"bench": "setup", ...}       the run: files, tensors per file, parameters per file and in all, storage dtype
  {"bench": "time", "ratio": r, ...}
      median seconds of ``plan.state_dict()`` (float64 accumulation, every file read through safetensors'
      ``safe_open`` one tensor at a time) ÷ median seconds of reading every snapshot file once the same way
      (``get_tensor`` of every tensor, nothing else), alternating, page cache warm for both (target <= 1.3).
      ``fp32_ratio``: the same with a float32 accumulator; ``file_major_ratio``: one file at a time through
      ``safe_open`` into a whole float64 accumulator (the plain way), for comparison; ``arithmetic_s``: the same
      float64 sums on tensors already in memory, and ``ratio_to_read_plus_arithmetic``: synthesis ÷ (read +
      arithmetic), the overhead beyond the two costs a synthesis cannot avoid (target <= 1.3 when the files come
      from a warm page cache: there the float64 arithmetic, not the reading, bounds the time).
  {"bench": "time_cold", "ratio": r, ...}   (``--cold``) the same two timings with the snapshot files evicted
      from the page cache before each (``posix_fadvise`` DONTNEED): reading from the disk (target <= 1.3).
  {"bench": "memory", "ratio": r, ...}
      peak resident memory added during ``plan.state_dict()`` (Linux VmHWM after resetting it, minus the
      resident memory before; mapped file pages count) ÷ (one float64 accumulator + one snapshot file's bytes)
      (target <= 1). The synthesised state itself (float32) stays resident afterwards: ``kept_mb``.
  {"bench": "residuals", ...}   (``--residuals``) the relative profile residual of usual targets from two power
      EMAs (σ_rel 0.05 and 0.10) stored at 10, 20 or 40 evenly spaced steps: what ``DEFAULT_MAX_RESIDUAL``
      rests on.

Usage: python benchmarks/bench_synthesize.py [--params 8000000] [--files 10] [--dtype float16] [--repeats 5]
[--threads N] [--cold] [--residuals]. The defaults (80M parameters in 10 fp16 files) run in well under a minute on a CPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from lawa_diffusion.maths import lag, profile_fit as synthesis
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.files import atomic_save_safetensors
from lawa_diffusion.posthoc.synthesize import plan_synthesis, tensor_layout


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=8_000_000, help="parameters per snapshot file")
    p.add_argument("--tensors", type=int, default=200, help="tensors per snapshot file")
    p.add_argument("--files", type=int, default=10, help="snapshot files (half per power-EMA track)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--residuals", action="store_true", help="also print the residual table behind the default bound")
    p.add_argument("--cold", action="store_true", help="also time both from a cold page cache (the files evicted first)")
    p.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def status() -> dict:
    with open("/proc/self/status", encoding="ascii") as f:
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if v.strip().endswith("kB")}


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_run(folder: str, args) -> None:
    dtype = getattr(torch, args.dtype)
    sizes = [args.params // args.tensors] * args.tensors
    sizes[-1] += args.params - sum(sizes)
    config = json.dumps({"_class_name": "UNet2DModel", "sample_size": 32})
    per_track = args.files // 2
    for name, sigma in (("p05", 0.05), ("p10", 0.10)):
        definition = json.dumps(lag.power_ema(sigma_rel=sigma).to_dict())
        for j in range(1, per_track + 1):
            step = 1000 * j
            tensors = {f"layer{i}.weight": torch.randn(n).to(dtype) for i, n in enumerate(sizes)}
            atomic_save_safetensors(runfolder.snapshot_path(folder, step, name), tensors, metadata={
                "step": str(step), "track": name, "model_config": config, "track_def": definition})


def read_once(paths, buffer: torch.Tensor) -> None:
    """Every byte of every file read once into one reused buffer (the I/O a synthesis cannot avoid)."""
    view = memoryview(buffer.numpy())
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset, size = 0, os.fstat(fd).st_size
            while offset < size:
                offset += os.preadv(fd, [view[: min(len(view), size - offset)]], offset)
        finally:
            os.close(fd)


def file_major(plan) -> dict:
    """The plain alternative, for comparison: one file at a time through safe_open, whole float64 accumulator."""
    from safetensors import safe_open

    acc = {}
    for source, x in plan.used():
        with safe_open(source.path, framework="pt") as f:
            for n in f.keys():
                t = f.get_tensor(n)
                acc.setdefault(n, torch.zeros(t.shape, dtype=torch.float64)).add_(t, alpha=x)
    return acc


def arithmetic_only(paths) -> callable:
    """The same float64 sums with the tensors already in memory (one file's tensors, summed once per file): what
    the synthesis computes beyond reading, with no I/O."""
    from safetensors.torch import load_file

    tensors = {n: t.clone() for n, t in load_file(paths[0]).items()}
    staging = torch.empty(max(t.numel() for t in tensors.values()), dtype=torch.float32)

    def run() -> None:
        for t in tensors.values():
            acc = torch.zeros(t.shape, dtype=torch.float64)
            for _ in paths:
                acc.add_(staging[: t.numel()].view(t.shape).copy_(t), alpha=0.1)
    return run


def evict(paths) -> bool:
    """Drop these files' pages from the page cache (POSIX_FADV_DONTNEED: only these clean files, no privilege)."""
    try:
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def residual_table() -> None:
    for t in (1000, 10000):
        for count in (10, 20, 40):
            every = t // count
            tracks = [lag.power_ema(sigma_rel=s) for s in (0.05, 0.10) for _ in range(count)]
            steps = [every * (j + 1) for _ in range(2) for j in range(count)]
            profiles = synthesis.source_profiles(tracks, steps, t)
            row = {}
            for text in ("sigma_rel=0.03", "sigma_rel=0.08", "sigma_rel=0.15", "sigma_rel=0.2", "sigma_rel=0.25",
                         f"decay={1 - 20 / t:g}", f"decay={1 - 5 / t:g}", f"half_life={t // 20}", f"half_life={t // 10}",
                         "ema:use_ema_warmup=true,power=0.75", f"window={t // 4}"):
                p = synthesis.target_profile(synthesis.parse_target(text), t)
                row[text] = round(synthesis.solve(profiles, p).residual, 4)
            emit(bench="residuals", step=t, snapshots_per_track=count, residual=row)


def memory_child(run: str) -> None:
    """In a fresh process: peak resident memory added by one ``state_dict()``."""
    plan = plan_synthesis(run, "sigma_rel=0.08")
    file_bytes = max(os.path.getsize(s.path) for s in plan.sources)
    params = sum(math.prod(entry[1]) for entry in tensor_layout(plan.sources[0].path).values())
    before = status()["VmRSS"]
    peak_ok = reset_peak()
    state = plan.state_dict(progress=False)
    peak = status()["VmHWM"] - before
    kept = sum(t.numel() * t.element_size() for t in state.values())
    bound = params * 8 + file_bytes
    emit(bench="memory", ratio=round(peak / bound, 3), peak_added_mb=round(peak / 2**20, 1),
         bound_mb=round(bound / 2**20, 1), accumulator_mb=round(params * 8 / 2**20, 1),
         snapshot_mb=round(file_bytes / 2**20, 1), kept_mb=round(kept / 2**20, 1), measured=peak_ok, target=1.0)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        memory_child(args.memory_of)
        return
    with tempfile.TemporaryDirectory() as run:
        make_run(run, args)
        plan = plan_synthesis(run, "sigma_rel=0.08")
        paths = [s.path for s in plan.sources]
        file_bytes = max(os.path.getsize(p) for p in paths)
        emit(bench="setup", files=len(paths), tensors_per_file=args.tensors, params_per_file=args.params,
             params_total=args.params * len(paths), dtype=args.dtype, file_mb=round(file_bytes / 2**20, 1),
             threads=torch.get_num_threads(), residual=plan.solution.residual,
             nonzero_coefficients=len(plan.used()))
        buffer = torch.empty(16 << 20, dtype=torch.uint8)
        read_once(paths, buffer)  # warm the page cache for every variant
        runs = {"read": lambda: read_once(paths, buffer), "synth": lambda: plan.state_dict(progress=False),
                "synth_fp32": lambda: plan.state_dict(progress=False, accumulate=torch.float32),
                "file_major": lambda: file_major(plan), "arithmetic": arithmetic_only(paths)}
        times = {name: [] for name in runs}
        for r in range(args.repeats):
            for name, fn in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
                times[name].append(timed(fn))
        med = {name: statistics.median(x) for name, x in times.items()}
        emit(bench="time", ratio=round(med["synth"] / med["read"], 3), synth_s=round(med["synth"], 3),
             read_s=round(med["read"], 3), arithmetic_s=round(med["arithmetic"], 3),
             ratio_to_read_plus_arithmetic=round(med["synth"] / (med["read"] + med["arithmetic"]), 3),
             fp32_ratio=round(med["synth_fp32"] / med["read"], 3),
             file_major_ratio=round(med["file_major"] / med["read"], 3), target=1.3)
        if args.cold:
            cold = {"read": [], "synth": []}
            for r in range(args.repeats):
                for name in (("read", "synth") if r % 2 == 0 else ("synth", "read")):
                    evicted = evict(paths)
                    cold[name].append(timed(runs[name]))
            c_read, c_synth = statistics.median(cold["read"]), statistics.median(cold["synth"])
            emit(bench="time_cold", ratio=round(c_synth / c_read, 3), synth_s=round(c_synth, 3), read_s=round(c_read, 3),
                 evicted=evicted, target=1.3)
        child = [sys.executable, os.path.abspath(__file__), "--memory_of", run]
        if args.threads:
            child += ["--threads", str(args.threads)]
        subprocess.run(child, check=True)
    if args.residuals:
        residual_table()


if __name__ == "__main__":
    main()
