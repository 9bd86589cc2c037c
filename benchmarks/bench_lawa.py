"""Benchmark of the LAWA engine; prints one JSON object per line.

  {"bench": "device", ...}                                   where it ran
  {"bench": "snapshot", "storage": S, "ratio_vs_foreach_copy": r, ...}
      time of ``lawa.step`` when it snapshots ÷ one ``torch._foreach_copy_`` of the same tensors into a
      preallocated destination of the same kind (device buffer; host buffer, pinned on CUDA).
      Target r <= 1.11 (>= 0.9x the copy's speed). For "disk" the time is what the training thread
      waits (the file is written by the background thread, outside the timed region).
  {"bench": "average", "storage": S, "fraction_of_bandwidth_bound": f, ...}
      bound = (k+1)·P·bytes at the bandwidth of a plain copy (read + write) ÷ time of
      ``lawa.average_flat()``. Target f >= 0.7.
  {"bench": "train_step_overhead", "ratio": r, ...}
      time of training steps with ``LAWAEMAModel`` (k=5, ν=100, storage "cpu") ÷ with diffusers'
      ``EMAModel.step``, on a small UNet2DModel; the two alternate step by step on the same model (order
      swapped every pair), each repeat covers ν steps of each (one snapshot), ratio = median over repeats.
      Target r <= 1.01.

All ratios are measured side by side in one run (medians of interleaved repeats).
Usage: python benchmarks/bench_lawa.py [--device cuda] [--numel N] [--repeats R]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from typing import Callable, List

import torch

from lawa_diffusion import LAWA, LAWAConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--numel", type=int, default=0, help="elements per snapshot (0: 8M on CPU, 200M on CUDA)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--train_repeats", type=int, default=3)
    p.add_argument("--train_every", type=int, default=100, help="ν of the training-step benchmark")
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time, steadier on a busy CPU-only machine (use with --threads 1)")
    return p.parse_args()


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def timed(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


def model_like_tensors(numel: int, device: torch.device, width: int = 128) -> List[torch.Tensor]:
    """Tensors shaped like conv layers (weight, bias, norm weight, norm bias) adding up to ~numel."""
    per_layer = width * width * 9 + 3 * width
    g = torch.Generator().manual_seed(0)
    tensors = []
    for _ in range(max(1, numel // per_layer)):
        for shape in ((width, width, 3, 3), (width,), (width,), (width,)):
            tensors.append(torch.randn(shape, generator=g).to(device))
    return tensors


def destination_like(storage: str, tensors: List[torch.Tensor], device: torch.device) -> List[torch.Tensor]:
    numel = sum(t.numel() for t in tensors)
    if storage == "device":
        flat = torch.empty(numel, device=device)
    else:
        flat = torch.empty(numel, pin_memory=device.type == "cuda")
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def make_lawa(storage: str, tensors, k: int, folder: str) -> LAWA:
    cfg = LAWAConfig(k=k, every_n_steps=1, storage=storage, snapshot_dir=folder if storage == "disk" else None)
    lawa = LAWA(tensors, cfg)
    for step in range(1, k + 1):  # allocate and fill the ring
        lawa.step(step)
    lawa._ring.sync()
    return lawa


def bench_snapshot(storage: str, tensors, device, args, folder: str) -> LAWA:
    lawa = make_lawa(storage, tensors, args.k, folder)
    dst = destination_like(storage, tensors, device)
    baseline = lambda: torch._foreach_copy_(dst, tensors, non_blocking=True)  # noqa: E731
    step = args.k
    snap, write, base = [], [], []
    for i in range(args.repeats + 2):
        step += 1
        t_snap = timed(lambda: lawa.step(step), device)
        lawa._ring.sync()  # disk: let the background write finish outside the timed region
        t_write = timed(lambda: lawa._ring.write(lawa._order[-1][1], step, tensors), device)  # the copy alone
        lawa._ring.sync()
        t_base = timed(baseline, device)
        if i >= 2:  # warm-up
            snap.append(t_snap)
            write.append(t_write)
            base.append(t_base)
    ms, mw, mb = statistics.median(snap), statistics.median(write), statistics.median(base)
    emit(bench="snapshot", storage=storage, numel=sum(t.numel() for t in tensors), num_tensors=len(tensors),
         snapshot_ms=round(ms * 1e3, 3), ring_write_ms=round(mw * 1e3, 3), foreach_copy_ms=round(mb * 1e3, 3),
         ratio_vs_foreach_copy=round(ms / mb, 3), ring_write_ratio_vs_foreach_copy=round(mw / mb, 3))
    return lawa


def copy_bandwidth(numel: int, device: torch.device, repeats: int) -> float:
    """Bytes per second of a plain copy between two fp32 buffers, counting read + write."""
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    times = [timed(lambda: dst.copy_(src), device) for _ in range(repeats + 2)][2:]
    return 2 * numel * 4 / statistics.median(times)


def bench_average(storage: str, lawa: LAWA, device, args, bandwidth: float) -> None:
    numel, itemsize = lawa._ring.numel, lawa._ring.dtype.itemsize
    times = [timed(lawa.average_flat, device) for _ in range(args.repeats + 2)][2:]
    t = statistics.median(times)
    bound = (args.k + 1) * numel * itemsize / bandwidth
    emit(bench="average", storage=storage, k=args.k, numel=numel, average_ms=round(t * 1e3, 3),
         bound_ms=round(bound * 1e3, 3), copy_bandwidth_gbps=round(bandwidth / 1e9, 2),
         fraction_of_bandwidth_bound=round(bound / t, 3))


def small_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)


def training_setup(device, every: int):
    from lawa_diffusion import LAWAEMAModel

    unet = small_unet().to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    ema = LAWAEMAModel(unet.parameters(), decay=0.999, lawa=LAWAConfig(k=5, every_n_steps=every, storage="cpu"))
    ema.to(device)
    return unet, opt, ema


def one_step(setup, batch, lawa_step: int) -> None:
    """A training step; with ``lawa_step`` > 0 the EMA update is followed by LAWA's, as in
    ``LAWAEMAModel.step`` but counted on the LAWA steps alone."""
    from diffusers.training_utils import EMAModel

    unet, opt, ema = setup
    x, t = batch
    unet(x, t).sample.square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if lawa_step:
        ema.lawa.before_source_update()
    EMAModel.step(ema, unet.parameters())  # diffusers' EMA update
    if lawa_step:
        ema.lawa.step(lawa_step)


def bench_train_step(device, args) -> None:
    """EMA+LAWA vs EMA-only steps alternating (order swapped every pair) on the same model, optimizer
    and EMA, so both see the same memory and caches."""
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, 16, 16, generator=g).to(device), torch.randint(0, 1000, (4,), generator=g).to(device))
    setup = training_setup(device, args.train_every)
    ratios, totals, lawa_steps = [], {"ema": [], "lawa": []}, 0
    for _ in range(args.train_repeats):
        spent = {"ema": 0.0, "lawa": 0.0}
        for i in range(args.train_every):  # ν LAWA steps: one snapshot per repeat
            for name in (("ema", "lawa") if i % 2 == 0 else ("lawa", "ema")):
                lawa_steps += name == "lawa"
                step = lawa_steps if name == "lawa" else 0
                spent[name] += timed(lambda: one_step(setup, batch, step), device)
        ratios.append(spent["lawa"] / spent["ema"])
        for name in spent:
            totals[name].append(spent[name])
    emit(bench="train_step_overhead", k=5, every_n_steps=args.train_every, storage="cpu",
         params=sum(p.numel() for p in setup[0].parameters()), snapshots_taken=lawa_steps // args.train_every,
         ema_step_ms=round(statistics.median(totals["ema"]) / args.train_every * 1e3, 3),
         lawa_ema_step_ms=round(statistics.median(totals["lawa"]) / args.train_every * 1e3, 3),
         ratio=round(statistics.median(ratios), 4), ratio_min=round(min(ratios), 4), ratio_max=round(max(ratios), 4))


def main() -> None:
    global clock
    args = parse_args()
    clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu measures host CPU time only; use --clock wall with --device cuda")
    numel = args.numel or (200_000_000 if device.type == "cuda" else 8_000_000)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    emit(bench="device", device=str(device), name=name, torch=torch.__version__, threads=torch.get_num_threads(),
         clock=args.clock)
    tensors = model_like_tensors(numel, device)
    bandwidth = copy_bandwidth(sum(t.numel() for t in tensors), device, args.repeats)
    with tempfile.TemporaryDirectory(prefix="lawa-bench-") as folder:
        for storage in ("device", "cpu", "disk"):
            lawa = bench_snapshot(storage, tensors, device, args, folder)
            bench_average(storage, lawa, device, args, bandwidth)
            lawa.close()
            del lawa
    if not args.skip_train:
        bench_train_step(device, args)


if __name__ == "__main__":
    main()
