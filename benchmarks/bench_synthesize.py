"""Benchmark of post-hoc synthesis in one pass (``synthesize_states``) against reading its snapshot files once,
measured side by side in one run on a run folder of synthetic snapshot files.

Prints one JSON object per line:

  {"bench": "setup", ...}       the run: files, tensors and parameters per file, storage dtype, targets, device,
      elements of each file read at a time (``block_elements``)
  {"bench": "time", ...}        page cache warm, median seconds, alternating:
      ``one_target_ratio``: one target (σ_rel 0.08) ÷ reading every file once (goal <= 1.3);
      ``targets_ratio``: ``--targets`` σ_rel targets in one pass ÷ reading once (goal <= 2);
      ``fp64_ratio``: one target with float64 arithmetic ÷ reading once, for comparison
  {"bench": "time_cold", ...}   (``--cold``) the same ratios with the files evicted from the page cache before each
      timing (``posix_fadvise`` DONTNEED): reading from the disk
  {"bench": "end_to_end", ...}  planning and one target from files whose checksums are not yet checked in the
      process (what a ``synthesize`` command does), ÷ reading once: ``verify_first_ratio`` hashes every file by a
      read of its own before the pass, ``streamed_ratio`` sums each checksum from the pass's one read (``--cold``:
      also ``end_to_end_cold``, the files evicted before each timing)
  {"bench": "memory", ...}      one line per target count (1 and ``--targets``), each in a fresh process: peak
      resident memory added during the pass (Linux VmHWM after resetting it, minus the resident memory before) ÷
      (targets × one float32 model + one block of every file) (goal <= 1.1)
  {"bench": "accuracy", ...}    the largest difference of a synthesised tensor from the float64 product of the
      files' tensors, relative to that tensor's norm, over every tensor of the ``--targets`` targets (goal <= 1e-6)
  {"bench": "residuals", ...}   (``--residuals``) the relative profile residual of usual targets from two power
      EMAs (σ_rel 0.05 and 0.10) stored at 10, 20 or 40 evenly spaced steps: what ``DEFAULT_MAX_RESIDUAL`` rests on

``--device cuda`` does the arithmetic on the GPU (the files are read on the CPU either way); every figure says
which device it came from. Usage: python benchmarks/bench_synthesize.py [--params 8000000] [--files 10]
[--dtype float16] [--targets 16] [--repeats 5] [--threads N] [--device cpu] [--cold] [--residuals].
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from lawa_diffusion.maths import lag
from lawa_diffusion.maths import profile_fit as synthesis
from lawa_diffusion.posthoc.one_pass import block_elements
from lawa_diffusion.posthoc.synthesize import coefficient_matrix, find_snapshots, plan_syntheses, synthesize_states
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils import checksums
from lawa_diffusion.utils.files import atomic_save_safetensors


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=8_000_000, help="parameters per snapshot file")
    p.add_argument("--tensors", type=int, default=200, help="tensors per snapshot file")
    p.add_argument("--files", type=int, default=10, help="snapshot files (half per power-EMA track)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--targets", type=int, default=16, help="σ_rel targets synthesised together")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="device of the arithmetic (cpu, cuda)")
    p.add_argument("--residuals", action="store_true", help="also print the residual table behind the default bound")
    p.add_argument("--cold", action="store_true", help="also time from a cold page cache (the files evicted first)")
    p.add_argument("--memory_of", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory_targets", type=int, default=1, help=argparse.SUPPRESS)
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
    base = [torch.randn(n) for n in sizes]
    for name, sigma in (("p05", 0.05), ("p10", 0.10)):
        definition = json.dumps(lag.power_ema(sigma_rel=sigma).to_dict())
        for j in range(1, per_track + 1):
            step = 1000 * j
            # weights of one run: near each other (EMA snapshots drift slowly), not independent noise
            tensors = {f"layer{i}.weight": (b + 0.05 * torch.randn(b.shape)).to(dtype) for i, b in enumerate(base)}
            atomic_save_safetensors(runfolder.snapshot_path(folder, step, name), tensors, metadata={
                "step": str(step), "track": name, "model_config": config, "track_def": definition})


def targets_of(count: int) -> list:
    return [f"sigma_rel={v:.4g}" for v in np.geomspace(0.04, 0.16, count)] if count > 1 else ["sigma_rel=0.08"]


def plans_of(run: str, count: int) -> list:
    return plan_syntheses(run, targets_of(count), max_residual=None)


def checked_synthesis(run: str, hashed_first: bool, device: str) -> None:
    """Plan and synthesise one target from files whose checksums this process has not checked yet: each file hashed
    by a read of its own before the pass (``hashed_first``), or summed from the pass's one read."""
    checksums._verified.clear()
    snapshots = find_snapshots(run, hashed=True) if hashed_first else None
    plans = plan_syntheses(run, targets_of(1), max_residual=None, snapshots=snapshots)
    synthesize_states(plans, progress=False, device=device)


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


def timed(fn, before=None) -> float:
    if before is not None:
        before()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def medians(runs: dict, repeats: int, before=None) -> dict:
    times = {name: [] for name in runs}
    for r in range(repeats):
        for name, fn in (list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]):
            times[name].append(timed(fn, before))
    return {name: statistics.median(x) for name, x in times.items()}


def accuracy(plans, states) -> float:
    """max over targets and tensors of ‖synthesised − float64 product‖ / ‖float64 product‖."""
    from safetensors import safe_open

    paths, x = coefficient_matrix(plans)
    handles = [safe_open(p, framework="pt") for p in paths]
    worst = 0.0
    for name in states[0]:
        stacked = torch.stack([h.get_tensor(name).double().reshape(-1) for h in handles])
        exact = torch.from_numpy(x) @ stacked
        for t, state in enumerate(states):
            diff = (state[name].double().reshape(-1) - exact[t]).norm() / exact[t].norm()
            worst = max(worst, float(diff))
    return worst


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


def memory_child(run: str, count: int, device: str) -> None:
    """In a fresh process: peak resident memory added by one pass for ``count`` targets."""
    plans = plans_of(run, count)
    paths, _ = coefficient_matrix(plans)
    from lawa_diffusion.posthoc.snapshot_reader import tensor_layout

    layout = tensor_layout(paths[0])
    params = sum(e.numel for e in layout.values())
    itemsize = max(e.dtype.itemsize for e in layout.values())
    block = block_elements(len(paths), itemsize) * itemsize * len(paths)
    import concurrent.futures  # noqa: F401  (modules the pass imports: their memory is not the pass's)

    import tqdm.auto  # noqa: F401

    before = status()["VmRSS"]
    peak_ok = reset_peak()
    states = synthesize_states(plans, progress=False, device=device)
    peak = status()["VmHWM"] - before
    bound = count * params * 4 + block
    emit(bench="memory", targets=count, ratio=round(peak / bound, 3), peak_added_mb=round(peak / 2**20, 1),
         bound_mb=round(bound / 2**20, 1), results_mb=round(count * params * 4 / 2**20, 1),
         block_of_every_file_mb=round(block / 2**20, 2), measured=peak_ok, device=device, target=1.1,
         kept=len(states))


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        memory_child(args.memory_of, args.memory_targets, args.device)
        return
    with tempfile.TemporaryDirectory() as run:
        make_run(run, args)
        one, many = plans_of(run, 1), plans_of(run, args.targets)
        paths = [s.path for s in one[0].sources]
        file_bytes = max(os.path.getsize(p) for p in paths)
        itemsize = getattr(torch, args.dtype).itemsize
        emit(bench="setup", files=len(paths), tensors_per_file=args.tensors, params_per_file=args.params,
             params_total=args.params * len(paths), dtype=args.dtype, file_mb=round(file_bytes / 2**20, 1),
             targets=args.targets, threads=torch.get_num_threads(), device=args.device,
             block_elements=block_elements(len(paths), itemsize), residual=one[0].solution.residual,
             nonzero_coefficients=len(one[0].used()))
        buffer = torch.empty(16 << 20, dtype=torch.uint8)
        read_once(paths, buffer)  # warm the page cache for every variant
        runs = {"read": lambda: read_once(paths, buffer),
                "one": lambda: synthesize_states(one, progress=False, device=args.device),
                "many": lambda: synthesize_states(many, progress=False, device=args.device),
                "fp64": lambda: synthesize_states(one, progress=False, device=args.device, accumulate=torch.float64)}
        synthesize_states(one, progress=False, device=args.device)  # every file's checksum found intact once
        med = medians(runs, args.repeats)
        emit(bench="time", device=args.device, one_target_ratio=round(med["one"] / med["read"], 3),
             targets_ratio=round(med["many"] / med["read"], 3), targets=args.targets,
             fp64_ratio=round(med["fp64"] / med["read"], 3), read_s=round(med["read"], 3),
             one_target_s=round(med["one"], 3), targets_s=round(med["many"], 3), fp64_s=round(med["fp64"], 3),
             goal_one=1.3, goal_targets=2.0)
        if args.cold:
            cold = medians({k: runs[k] for k in ("read", "one", "many")}, args.repeats, before=lambda: evict(paths))
            emit(bench="time_cold", device=args.device, one_target_ratio=round(cold["one"] / cold["read"], 3),
                 targets_ratio=round(cold["many"] / cold["read"], 3), targets=args.targets,
                 read_s=round(cold["read"], 3), one_target_s=round(cold["one"], 3), targets_s=round(cold["many"], 3),
                 evicted=evict(paths), goal_one=1.3, goal_targets=2.0)
        checked = {"read": runs["read"],
                   "verify_first": lambda: checked_synthesis(run, hashed_first=True, device=args.device),
                   "streamed": lambda: checked_synthesis(run, hashed_first=False, device=args.device)}
        timings = [("end_to_end", None)] + ([("end_to_end_cold", lambda: evict(paths))] if args.cold else [])
        for name, before in timings:
            med = medians(checked, args.repeats, before=before)
            emit(bench=name, device=args.device, verify_first_ratio=round(med["verify_first"] / med["read"], 3),
                 streamed_ratio=round(med["streamed"] / med["read"], 3), read_s=round(med["read"], 3),
                 verify_first_s=round(med["verify_first"], 3), streamed_s=round(med["streamed"], 3))
        for count in (1, args.targets):
            child = [sys.executable, os.path.abspath(__file__), "--memory_of", run, "--memory_targets", str(count),
                     "--device", args.device]
            if args.threads:
                child += ["--threads", str(args.threads)]
            subprocess.run(child, check=True)
        states = synthesize_states(many, progress=False, device=args.device)
        emit(bench="accuracy", device=args.device, targets=args.targets,
             max_rel_to_tensor_norm=float(f"{accuracy(many, states):.3g}"), goal=1e-6)
    if args.residuals:
        residual_table()


if __name__ == "__main__":
    main()
