"""What storing post-hoc EMA snapshots costs a training run; prints one JSON object per line.

On the model and batch of --config (default: configs/paper_regime_cpu.yaml), with two power EMAs
(σ_rel 0.05 and 0.10) stepped after every optimizer step:

  {"bench": "snapshot", "file_mb": ..., "sync_write_ms": ..., "training_thread_ms": ..., "train_step_ms": ...}
     one snapshot of one track written synchronously (``tracking.save_ema_snapshot``), versus what storing it
     costs the training thread with ``PosthocSnapshots`` (host copy + hand-over to the writer thread);
  {"bench": "run", "every_n_steps": N, "ratio": wall with snapshots / wall without, "cpu_ratio": ..., ...}
     --steps training steps with both tracks stored every N steps versus none (alternating runs, medians
     over --repeats); cpu_ratio compares the process's CPU time (the writer thread's included), which
     a busy shared machine disturbs less than the wall time.

Usage: python benchmarks/bench_posthoc_snapshots.py [--config configs/paper_regime_cpu.yaml] [--every 25,50]
       [--steps 100] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def build(config_path: str):
    from lawa_diffusion.config.train import load_train_config
    from lawa_diffusion.training.trainer import build_unet

    cfg = load_train_config(config_path)
    torch.manual_seed(0)
    unet = build_unet(cfg.model)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.optim.learning_rate)
    size = cfg.model["sample_size"]
    x = torch.randn(cfg.train_batch_size, cfg.model.get("in_channels", 3), size, size)
    t = torch.randint(0, 1000, (cfg.train_batch_size,))
    return cfg, unet, opt, x, t


def train_step(unet, opt, x, t) -> None:
    loss = (unet(x, t).sample - x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed_run(unet, opt, x, t, steps: int, every: int, folder: str) -> tuple:
    from lawa_diffusion.engine.posthoc_snapshots import PosthocSnapshots

    store = PosthocSnapshots(unet, folder, sigma_rels=[0.05, 0.10], every_n_steps=every, main_process=True)
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        train_step(unet, opt, x, t)
        store.update(unet.parameters())
    store.close()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    from lawa_diffusion.engine.posthoc_snapshots import PosthocSnapshots, save_ema_snapshot
    from lawa_diffusion.training.trainer import model_config_of

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/paper_regime_cpu.yaml")
    ap.add_argument("--every", default="25,50")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, unet, opt, x, t = build(args.config)
    names = [n for n, _ in unet.named_parameters()]
    for _ in range(3):
        train_step(unet, opt, x, t)
    step_s = []
    for _ in range(10):
        a = time.perf_counter()
        train_step(unet, opt, x, t)
        step_s.append(time.perf_counter() - a)

    with tempfile.TemporaryDirectory() as folder:
        store = PosthocSnapshots(unet, folder, sigma_rels=[0.05], every_n_steps=0, main_process=True)
        store.update(unet.parameters())
        ema = store.own["sigma_rel_0.05"]
        sync, call = [], []
        for i in range(1, 21):
            a = time.perf_counter()
            path = save_ema_snapshot(folder, i, ema, names, model_config_of(unet), "sync", store.definitions["sigma_rel_0.05"],
                                     torch.float32)
            sync.append(time.perf_counter() - a)
            a = time.perf_counter()
            store.write(i)
            call.append(time.perf_counter() - a)
            store.flush()
        store.close()
        import os

        print(json.dumps({"bench": "snapshot", "params": sum(p.numel() for p in unet.parameters()),
                          "file_mb": round(os.path.getsize(path) / 2**20, 3),
                          "sync_write_ms": round(1e3 * statistics.median(sync), 3),
                          "training_thread_ms": round(1e3 * statistics.median(call), 3),
                          "train_step_ms": round(1e3 * statistics.median(step_s), 2),
                          "threads": torch.get_num_threads()}), flush=True)

    for every in [int(e) for e in args.every.split(",") if e]:
        walls = {"none": [], "stored": []}
        cpus = {"none": [], "stored": []}
        for _ in range(args.repeats):
            for kind in ("none", "stored"):
                with tempfile.TemporaryDirectory() as folder:
                    wall, cpu = timed_run(unet, opt, x, t, args.steps, every if kind == "stored" else 0, folder)
                walls[kind].append(wall)
                cpus[kind].append(cpu)
        none, stored = statistics.median(walls["none"]), statistics.median(walls["stored"])
        cpu_none, cpu_stored = statistics.median(cpus["none"]), statistics.median(cpus["stored"])
        print(json.dumps({"bench": "run", "every_n_steps": every, "steps": args.steps, "tracks": 2,
                          "wall_none_s": round(none, 3), "wall_stored_s": round(stored, 3),
                          "ratio": round(stored / none, 4), "cpu_none_s": round(cpu_none, 3),
                          "cpu_stored_s": round(cpu_stored, 3), "cpu_ratio": round(cpu_stored / cpu_none, 4)}),
              flush=True)


if __name__ == "__main__":
    main()
