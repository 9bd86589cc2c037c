"""Benchmark of the LAWA engine against the copies that bound it, each measured in the same run.

Prints one JSON object per line:

  {"bench": "device", ...}                                   where it ran
  {"bench": "bound", "copy": C, "ms": t, "gbps": b}          the reference copies, of the snapshot bytes:
      "hbm" a device-to-device copy (fp32), "foreach" one ``torch._foreach_copy_`` of the source tensors
      into a device buffer, "d2h_pinned" / "h2d_pinned" one copy of a row (storage dtype) from the
      device into pinned host memory / back. On a CPU-only machine every copy is a host copy.
  {"bench": "snapshot", "storage": S, ...}
      device: ``lawa.step`` (copy + NaN/Inf flag) and the ring write alone ÷ the foreach copy
      (target <= 1.1). cpu: time until the row is in host memory ÷ d2h_pinned (target <= 1.1);
      on a CPU-only machine the ring write ÷ a foreach copy into a host buffer (target <= 1.05).
      disk: time the training thread spends in ``lawa.step`` ÷ d2h_pinned (target <= 1.2); the
      file is written by the background thread, outside the timed region.
  {"bench": "average", "storage": S, "fraction_of_bound": f, ...}
      device: bound = (k+1)·P·bytes at the hbm copy rate (target >= 0.7); cpu and disk: bound = k rows
      at the h2d_pinned rate (target >= 0.8).
  {"bench": "pinned", "storage": S, "asked_bytes": a, "pinned_bytes": p, ...}     (CUDA only; cpu and disk)
      host bytes the ring asked for (cpu: k rows, disk: 2 staging rows) and the bytes it pinned, beside what
      ``pin_memory=True`` blocks would pin (rounded up to powers of two), and the first snapshot's time
      (it allocates and pins the rows).
  {"bench": "train_step_overhead", "ratio": r, "host_mb_added": h, "device_mb_added": d, ...}
      training steps with ``LAWAEMAModel`` (k=5, storage "cpu", bfloat16 snapshots) ÷ the same steps with
      diffusers' ``EMAModel.step``, on the same model: each repeat times a block of ν EMA-only steps and a
      block of ν LAWA steps (order swapped every repeat), each block with one synchronisation at its end, so
      that the snapshot (the block's first step) overlaps its copy with the steps after it as in training;
      ratio = median over repeats (target <= 1.01). On CUDA the
      model is an SD-1.5-size ``UNet2DConditionModel`` (~860M parameters, random init, bf16 autocast);
      on the CPU a tiny ``UNet2DModel``. Memory added = after k snapshots minus before the first.

Usage: python benchmarks/bench_lawa.py [--tiny] [--device cuda] [--numel N] [--repeats R] [--skip_train]
``--tiny`` runs everything end to end on a CPU in well under a minute.
"""
from __future__ import annotations

import argparse
import json
import math
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
    p.add_argument("--tiny", action="store_true", help="small sizes: the whole benchmark in seconds on a CPU")
    p.add_argument("--numel", type=int, default=0, help="elements per snapshot (0: 200M on CUDA, 8M on CPU, 1M tiny)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=0, help="timed repeats (0: 10, 5 tiny)")
    p.add_argument("--train_repeats", type=int, default=3)
    p.add_argument("--train_every", type=int, default=0, help="ν of the training-step benchmark (0: 20 on CUDA, 100 on CPU)")
    p.add_argument("--train_batch", type=int, default=2)
    p.add_argument("--skip_train", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: process CPU time, steadier on a busy CPU-only machine (use with --threads 1)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.numel = args.numel or (1_000_000 if args.tiny else 200_000_000 if cuda else 8_000_000)
    args.repeats = args.repeats or (5 if args.tiny else 10)
    args.train_every = args.train_every or (20 if cuda else 50 if args.tiny else 100)
    return args


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def timed(fn: Callable[[], None], device: torch.device, wait: bool = True) -> float:
    """Seconds ``fn`` takes; with ``wait`` until the device is done too, else the host's time in the call."""
    sync(device)
    start = clock()
    fn()
    if wait:
        sync(device)
    return clock() - start


def median_ms(fn: Callable[[], None], device, repeats: int, wait: bool = True) -> float:
    return statistics.median([timed(fn, device, wait) for _ in range(repeats + 2)][2:]) * 1e3


def model_like_tensors(numel: int, device: torch.device, width: int = 128) -> List[torch.Tensor]:
    """Tensors shaped like conv layers (weight, bias, norm weight, norm bias) adding up to ~numel."""
    per_layer = width * width * 9 + 3 * width
    g = torch.Generator().manual_seed(0)
    tensors = []
    for _ in range(max(1, numel // per_layer)):
        for shape in ((width, width, 3, 3), (width,), (width,), (width,)):
            tensors.append(torch.randn(shape, generator=g).to(device))
    return tensors


def views_of(flat: torch.Tensor, tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


def bounds(tensors, device, args) -> dict:
    """Reference copies of the snapshot's bytes: {name: (ms, fn)} for hbm, foreach (device and host), d2h, h2d."""
    numel, cuda = sum(t.numel() for t in tensors), device.type == "cuda"
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    device_views = views_of(torch.empty(numel, device=device), tensors)
    host_views = views_of(torch.empty(numel, pin_memory=cuda), tensors)
    row_device, row_host = torch.empty(numel, device=device), torch.empty(numel, pin_memory=cuda)
    fns = {
        "hbm": lambda: dst.copy_(src),
        "foreach": lambda: torch._foreach_copy_(device_views, tensors),
        "foreach_host": (lambda: [v.copy_(t, non_blocking=True) for v, t in zip(host_views, tensors)]) if cuda
        else (lambda: torch._foreach_copy_(host_views, tensors)),
        "d2h_pinned": lambda: row_host.copy_(row_device, non_blocking=True),
        "h2d_pinned": lambda: row_device.copy_(row_host, non_blocking=True),
    }
    ms = {name: median_ms(fn, device, args.repeats) for name, fn in fns.items()}
    moved = {"hbm": 2 * numel * 4, "foreach": 2 * numel * 4, "foreach_host": numel * 4, "d2h_pinned": numel * 4,
             "h2d_pinned": numel * 4}
    for name, t in ms.items():
        emit(bench="bound", copy=name, numel=numel, ms=round(t, 3), gbps=round(moved[name] / t / 1e6, 2))
    return {name: (ms[name], fns[name]) for name in fns}


def make_lawa(storage: str, tensors, k: int, folder: str) -> LAWA:
    from lawa_diffusion.engine.rings import registered_bytes

    cfg = LAWAConfig(k=k, every_n_steps=1, storage=storage, snapshot_dir=folder if storage == "disk" else None)
    lawa = LAWA(tensors, cfg)
    device = tensors[0].device
    pinned_before = registered_bytes()
    first = timed(lambda: lawa.step(1), device)  # allocates the ring
    for step in range(2, k + 1):  # fill the ring
        lawa.step(step)
    lawa.resolve_checks()
    lawa._ring.sync()
    if device.type == "cuda" and storage in ("cpu", "disk"):
        ring = lawa._ring
        rows = ring.k if storage == "cpu" else ring.STAGING_ROWS
        asked = rows * ring.numel * ring.dtype.itemsize
        pinned = registered_bytes() - pinned_before
        emit(bench="pinned", storage=storage, asked_bytes=asked, pinned_bytes=pinned, ratio=round(pinned / asked, 4),
             caching_allocator_bytes=rows * 2 ** math.ceil(math.log2(asked / rows)) if storage == "disk"
             else 2 ** math.ceil(math.log2(asked)), first_snapshot_ms=round(first * 1e3, 1))
    return lawa


def bench_snapshot(storage: str, tensors, device, args, folder: str, bound: dict) -> LAWA:
    """Snapshot times, each repeat interleaved with the copy it is compared with (a busy machine drifts)."""
    lawa = make_lawa(storage, tensors, args.k, folder)
    ring, step, disk = lawa._ring, args.k, storage == "disk"
    reference = {"device": "foreach", "cpu": "d2h_pinned" if device.type == "cuda" else "foreach_host"}.get(storage, "d2h_pinned")
    write_reference = "foreach" if storage == "device" else "foreach_host"
    times = {"call": [], "done": [], "write": [], reference: [], write_reference: []}
    for i in range(min(args.repeats, 3) + 2 if disk else args.repeats + 2):
        lawa.resolve_checks()  # (read the previous check outside the timed region)
        step += 1
        took = {"call": timed(lambda: lawa.step(step), device, wait=False)}  # what the training thread spends
        sync(device)
        ring.sync()  # disk: the background write runs outside the timed region
        took[reference] = timed(bound[reference][1], device)
        if not disk:
            step += 1
            took["done"] = timed(lambda: lawa.step(step), device)  # until the row is stored
            took["write"] = timed(lambda: ring.write(lawa._order[-1][1], step, tensors), device)  # the copy alone
            took[write_reference] = timed(bound[write_reference][1], device)
        for name, t in took.items():
            if i >= 2:  # warm-up
                times[name].append(t * 1e3)
    ms = {name: round(statistics.median(t), 3) for name, t in times.items() if t}
    row = dict(bench="snapshot", storage=storage, numel=ring.numel, num_tensors=len(tensors),
               **{f"{name}_ms": t for name, t in ms.items()})
    if disk:
        row.update(wait_ratio_vs_d2h_pinned=round(ms["call"] / ms["d2h_pinned"], 3))
    else:
        row.update({f"ratio_vs_{reference}": round(ms["done"] / ms[reference], 3),
                    f"ring_write_ratio_vs_{write_reference}": round(ms["write"] / ms[write_reference], 3)})
    emit(**row)
    return lawa


def bench_average(storage: str, lawa: LAWA, device, args, bound: dict) -> None:
    numel, itemsize = lawa._ring.numel, lawa._ring.dtype.itemsize
    t = median_ms(lawa.average_flat, device, min(args.repeats, 3) if storage == "disk" else args.repeats)
    if storage == "device" or device.type != "cuda":
        name, b = "hbm", bound["hbm"][0] * (args.k + 1) * itemsize / 8  # hbm moved 8 bytes per element
    else:
        name, b = "h2d_pinned", bound["h2d_pinned"][0] * args.k * itemsize / 4
    row = dict(bench="average", storage=storage, k=args.k, numel=numel, average_ms=round(t, 3), bound=name,
               bound_ms=round(b, 3), fraction_of_bound=round(b / t, 3))
    if storage == "device":  # the same reduction written as a sum and a division, for comparison
        rows, out = lawa._ring.buffer, torch.empty(numel, device=device)
        alt = median_ms(lambda: torch.sum(rows, 0, dtype=torch.float32, out=out).div_(args.k), device, args.repeats)
        row.update(sum_then_div_ms=round(alt, 3))
    emit(**row)


# ------------------------------------------------------------------------------------ training step
def unet_and_batch(device: torch.device, batch: int, tiny: bool):
    """SD-1.5-size UNet2DConditionModel on CUDA (random init, built on the device), a tiny UNet2DModel on CPU."""
    torch.manual_seed(0)
    if device.type == "cuda" and not tiny:
        from diffusers import UNet2DConditionModel

        with torch.device(device):
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        x = torch.randn(batch, 4, 64, 64, device=device)
        cond = torch.randn(batch, 77, 768, device=device)
        return unet, lambda: unet(x, torch.randint(0, 1000, (batch,), device=device), cond).sample
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(32, 64), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).to(device)
    x = torch.randn(batch, 3, 16, 16, device=device)
    return unet, lambda: unet(x, torch.randint(0, 1000, (batch,), device=device)).sample


def host_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def one_step(unet, forward, opt, ema, device, lawa_step: int) -> None:
    """A training step; with ``lawa_step`` > 0 the EMA update is followed by LAWA's, as in
    ``LAWAEMAModel.step`` but counted on the LAWA steps alone."""
    from diffusers.training_utils import EMAModel

    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = forward().float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if lawa_step:
        ema.lawa.before_source_update()
    EMAModel.step(ema, unet.parameters())  # diffusers' EMA update
    if lawa_step:
        ema.lawa.step(lawa_step)


def bench_train_step(device, args) -> None:
    """EMA+LAWA vs EMA-only blocks of ν steps, alternating (order swapped every repeat) on the same model,
    optimizer and EMA, so both see the same memory and caches. A block is timed with one synchronisation at
    its end: a synchronisation per step would keep the snapshot's side-stream copy from overlapping the steps
    that follow it, and overstate its cost."""
    from lawa_diffusion import LAWAEMAModel

    unet, forward = unet_and_batch(device, args.train_batch, args.tiny)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=cuda)
    every = args.train_every
    ema = LAWAEMAModel(unet.parameters(), decay=0.999, foreach=True,
                       lawa=LAWAConfig(k=5, every_n_steps=every, storage="cpu", dtype="bfloat16"))
    ema.to(device)
    for _ in range(2):  # warm-up: optimizer state, autocast caches
        one_step(unet, forward, opt, ema, device, 0)
    sync(device)
    host0, dev0 = host_rss(), torch.cuda.memory_allocated(device) if cuda else 0
    one_step(unet, forward, opt, ema, device, every)  # the first snapshot allocates the ring: not timed
    ratios, totals, lawa_steps = [], {"ema": [], "lawa": []}, every

    def block(first_lawa_step: int) -> None:  # ν steps; LAWA's count from a due step (0: EMA only)
        for i in range(every):
            one_step(unet, forward, opt, ema, device, first_lawa_step + i if first_lawa_step else 0)

    for r in range(args.train_repeats):
        spent = {}
        for name in (("ema", "lawa") if r % 2 == 0 else ("lawa", "ema")):
            first = 0
            if name == "lawa":
                first = lawa_steps = lawa_steps + every  # due: the block starts with its snapshot
            spent[name] = timed(lambda: block(first), device)
        ratios.append(spent["lawa"] / spent["ema"])
        for name in spent:
            totals[name].append(spent[name])
    while ema.lawa.num_snapshots < 5:  # fill the window to measure the memory it holds
        lawa_steps += every
        ema.lawa.step(lawa_steps)
    ema.lawa.resolve_checks()
    sync(device)
    host_added = host_rss() - host0
    dev_added = (torch.cuda.memory_allocated(device) - dev0) if cuda else 0
    emit(bench="train_step_overhead", model=type(unet).__name__, params=sum(p.numel() for p in unet.parameters()),
         k=5, every_n_steps=every, storage="cpu", dtype="bfloat16", autocast="bfloat16",
         snapshots_taken=args.train_repeats, ema_step_ms=round(statistics.median(totals["ema"]) / every * 1e3, 3),
         lawa_ema_step_ms=round(statistics.median(totals["lawa"]) / every * 1e3, 3),
         ratio=round(statistics.median(ratios), 4), ratio_min=round(min(ratios), 4), ratio_max=round(max(ratios), 4),
         host_mb_added=round(host_added / 2**20, 1), device_mb_added=round(dev_added / 2**20, 1),
         ring_mb=round(5 * sum(p.numel() for p in unet.parameters()) * 2 / 2**20, 1))
    ema.lawa.close()


def main() -> None:
    global clock
    args = parse_args()
    clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and args.clock == "cpu":
        raise SystemExit("--clock cpu measures host CPU time only; use --clock wall with --device cuda")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    emit(bench="device", device=str(device), name=name, torch=torch.__version__, threads=torch.get_num_threads(),
         clock=args.clock, tiny=args.tiny)
    started = time.perf_counter()
    tensors = model_like_tensors(args.numel, device)
    bound = bounds(tensors, device, args)
    with tempfile.TemporaryDirectory(prefix="lawa-bench-") as folder:
        for storage in ("device", "cpu", "disk"):
            lawa = bench_snapshot(storage, tensors, device, args, folder, bound)
            bench_average(storage, lawa, device, args, bound)
            lawa.close()
            del lawa
    del tensors
    if not args.skip_train:
        bench_train_step(device, args)
    emit(bench="total", seconds=round(time.perf_counter() - started, 1))


if __name__ == "__main__":
    main()
