"""A small, exactly repeatable accelerate training run with LAWA over diffusers' EMA.

Used by the resume, distributed and fault-injection tests. A tiny ``UNet2DModel`` learns to denoise
a fixed synthetic data set; the batch, noise and timesteps of optimizer step ``t`` come from a
generator seeded by (seed, t) and each process takes its slice of the global batch, so a resumed run
and a run on more processes see the same data as an uninterrupted single-process one.

One or more LAWA engines watch the same EMA (``--lawa device,cpu,disk``; ``storage:ranks`` picks
``snapshot_ranks``): the first is the ``LAWAEMAModel``'s own, the others are extra ``LAWA`` objects
over it. Checkpoints are written with ``accelerate_hooks.save_checkpoint`` into
``RUN/checkpoint-<step>``; ``--resume latest`` restores the newest complete one.

``--serve`` turns the script into a fork server for tests: it imports the heavy modules once, then
for each JSON request line on stdin ({"argv": [...], "env": {...}, "log": path}) forks a fresh child
that runs one training process, and answers {"pid": ...} and then {"pid": ..., "returncode": ...}
(negative: killed by that signal). The parent never trains, so each child starts from a clean state.

At the end ``RUN/final/weights.safetensors`` holds the flat EMA ("ema") and each engine's average
(rank r > 0 writes ``weights_rank<r>.safetensors``), and ``summary_rank<r>.json`` what each engine holds.

Fault-injection hooks (environment):
  LAWA_TEST_EVENTS             JSON-lines file receiving progress events (fsync'ed)
  LAWA_TEST_SAVE_STATE_SLEEP   seconds to pause inside ``save_state`` (model, optimizer and LAWA
                               state written, EMA state not yet); logs "save_state_in"
  LAWA_TEST_DISK_WRITE_SLEEP   seconds to pause inside a disk snapshot write (half of the temp file
                               written); logs "disk_write_in"
  LAWA_TEST_PAUSE_AT           pause only at the n-th such moment of the process (default: every one)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

NUM_IMAGES = 64
TRAIN_TIMESTEPS = 100


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--checkpoint_every", type=int, default=8, help="0: no checkpoints")
    p.add_argument("--checkpoints_keep", type=int, default=2)
    p.add_argument("--resume", choices=["none", "latest"], default="none")
    p.add_argument("--crash_after_step", type=int, default=0, help="end abruptly (os._exit) after this step")
    p.add_argument("--lawa", default="cpu", help="comma list of storage[:snapshot_ranks]")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=8, help="global batch (split over processes)")
    p.add_argument("--micro_batches", type=int, default=1,
                   help="split each process's batch into this many backward passes (gradients accumulate)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--channels", default="8,16", help="block_out_channels")
    p.add_argument("--layers_per_block", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- fault-injection hooks
def emit(event: str, **fields) -> None:
    path = os.environ.get("LAWA_TEST_EVENTS")
    if not path:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "rank": int(os.environ.get("RANK", "0")),
                       "time": time.time(), **fields})
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


_PAUSES: dict = {}


def pause_point(event: str, seconds: float, **fields) -> None:
    """Log ``event`` and sleep, at the moment LAWA_TEST_PAUSE_AT selects (every one by default)."""
    if seconds <= 0:
        return
    _PAUSES[event] = _PAUSES.get(event, 0) + 1
    at = int(os.environ.get("LAWA_TEST_PAUSE_AT", "0"))
    if at and _PAUSES[event] != at:
        return
    emit(event, **fields)
    time.sleep(seconds)


def install_disk_write_pause(seconds: float) -> None:
    """Make disk snapshot writes stop half-way through their temp file for ``seconds``."""
    from safetensors.torch import save

    import lawa_diffusion.engine.rings as storage
    from lawa_diffusion.utils.files import atomic_write

    def slow_atomic_save(path, tensors, metadata=None):
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                pause_point("disk_write_in", seconds, path=os.path.basename(path), tmp=os.path.basename(tmp))
                f.write(data[len(data) // 2:])

        atomic_write(path, write)

    storage.atomic_save_safetensors = slow_atomic_save


class EMAState:
    """The plain diffusers EMA state as an accelerate custom object (LAWA travels via its own hooks)."""

    def __init__(self, ema, pause: float):
        self.ema, self.pause = ema, pause

    def state_dict(self) -> dict:
        # save_state has written the model, the optimizer and the LAWA state, not yet this
        pause_point("save_state_in", self.pause, step=self.ema.optimization_step)
        return self.ema.ema_state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state)


# ------------------------------------------------------------------------------------ set-up
def make_unet(args):
    from diffusers import UNet2DModel

    torch.manual_seed(args.seed)
    channels = tuple(int(c) for c in args.channels.split(","))
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=args.layers_per_block,
        block_out_channels=channels, down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=4,
    )


def make_data(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 12345)
    coarse = torch.rand(NUM_IMAGES, 1, 4, 4, generator=g)
    return F.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False) * 2 - 1


def engine_specs(text: str) -> list[tuple[str, str]]:
    specs = []
    for item in text.split(","):
        storage, _, ranks = item.partition(":")
        specs.append((storage, ranks or "main"))
    return specs


def engine_name(storage: str, ranks: str) -> str:
    return f"lawa_{storage}_{ranks}"


def make_engines(args, unet):
    from diffusers import UNet2DModel

    from lawa_diffusion import LAWA, LAWAConfig, LAWAEMAModel

    def config(storage, ranks):
        folder = os.path.join(args.output_dir, "snapshots") if storage == "disk" else None
        return LAWAConfig(k=args.k, every_n_steps=args.every, start_step=args.start, storage=storage,
                          snapshot_dir=folder, snapshot_ranks=ranks)

    specs = engine_specs(args.lawa)
    first = specs[0]
    ema = LAWAEMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, power=0.75,
                       model_cls=UNet2DModel, model_config=unet.config,
                       lawa=config(*first), lawa_name=engine_name(*first))
    extras = [LAWA(ema, config(*spec), name=engine_name(*spec)) for spec in specs[1:]]
    return ema, [ema.lawa] + extras


def resume(args, accelerator, run_dir: str) -> int:
    from lawa_diffusion.runs.folder import latest_checkpoint

    if args.resume != "latest":
        return 0
    path = latest_checkpoint(run_dir)
    if path is None:
        return 0
    emit("loading", checkpoint=os.path.basename(path))
    accelerator.load_state(path)
    return int(os.path.basename(path).split("-")[1])


# ------------------------------------------------------------------------------------ training
def batch_for(step: int, args, data: torch.Tensor, rank: int, world: int):
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    b = args.batch_size
    idx = torch.randint(0, NUM_IMAGES, (b,), generator=g)
    noise = torch.randn(b, 1, 8, 8, generator=g)
    timesteps = torch.randint(0, TRAIN_TIMESTEPS, (b,), generator=g)
    part = slice(rank * b // world, (rank + 1) * b // world)
    return data[idx][part], noise[part], timesteps[part]


def train_step(step, args, data, accelerator, unet, optimizer, scheduler):
    images, noise, timesteps = batch_for(step, args, data, accelerator.process_index, accelerator.num_processes)
    parts = args.micro_batches
    for x, n, t in zip(images.chunk(parts), noise.chunk(parts), timesteps.chunk(parts)):
        loss = F.mse_loss(unet(scheduler.add_noise(x, n, t), t).sample, n)
        accelerator.backward(loss / parts)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def checkpoint(args, accelerator, run_dir: str, step: int) -> None:
    from lawa_diffusion.engine.accelerate_hooks import save_checkpoint
    from lawa_diffusion.runs.folder import prune_checkpoints

    save_checkpoint(accelerator, os.path.join(run_dir, f"checkpoint-{step}"))
    if accelerator.is_main_process:
        emit("checkpoint_done", step=step)
        prune_checkpoints(run_dir, args.checkpoints_keep)


def write_results(args, accelerator, ema, engines) -> None:
    from safetensors.torch import save_file

    rank = accelerator.process_index
    out = {"ema": torch.cat([t.detach().reshape(-1) for t in ema.shadow_params]).clone()}
    summary = {"rank": rank, "num_processes": accelerator.num_processes, "engines": {}}
    for lawa in engines:
        info = {"holds_snapshots": lawa.holds_snapshots, "ring_allocated": lawa._ring is not None,
                "snapshot_steps": lawa.snapshot_steps, "unsynced_error": None}
        try:
            lawa.average_flat()
        except ValueError as e:
            info["unsynced_error"] = str(e)
        out[lawa.name] = lawa.average_flat(sync_ranks=True).detach().cpu().clone()  # collective for "main"
        summary["engines"][lawa.name] = info
        lawa.close()
    final = os.path.join(args.output_dir, "final")
    os.makedirs(final, exist_ok=True)
    save_file(out, os.path.join(final, "weights.safetensors" if rank == 0 else f"weights_rank{rank}.safetensors"))
    with open(os.path.join(final, f"summary_rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f)


def main(argv=None) -> int:
    args = parse_args(argv)
    emit("started")
    torch.set_num_threads(args.threads)
    if float(os.environ.get("LAWA_TEST_DISK_WRITE_SLEEP", "0")) > 0:
        install_disk_write_pause(float(os.environ["LAWA_TEST_DISK_WRITE_SLEEP"]))
    from accelerate import Accelerator
    from diffusers import DDPMScheduler

    from lawa_diffusion import attach

    accelerator = Accelerator(cpu=True)
    unet = make_unet(args)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr)
    ema, engines = make_engines(args, unet)
    for lawa in engines:
        attach(accelerator, lawa)
    accelerator.register_for_checkpointing(EMAState(ema, float(os.environ.get("LAWA_TEST_SAVE_STATE_SLEEP", "0"))))
    model, optimizer = accelerator.prepare(unet, optimizer)
    scheduler = DDPMScheduler(num_train_timesteps=TRAIN_TIMESTEPS)
    data = make_data(args.seed)
    run_dir = args.output_dir
    first = resume(args, accelerator, run_dir)
    if first != ema.optimization_step:
        raise RuntimeError(f"checkpoint step {first} but the EMA was at step {ema.optimization_step}")
    emit("resumed", step=first, snapshot_steps={e.name: e.snapshot_steps for e in engines})
    for step in range(first + 1, args.steps + 1):
        train_step(step, args, data, accelerator, model, optimizer, scheduler)
        ema.step(unet.parameters())
        for lawa in engines[1:]:
            lawa.step(ema.optimization_step)
        if args.checkpoint_every and step % args.checkpoint_every == 0:
            checkpoint(args, accelerator, run_dir, step)
        if step == args.crash_after_step:
            emit("crash", step=step)
            sys.stdout.flush()
            os._exit(3)
    write_results(args, accelerator, ema, engines)
    accelerator.wait_for_everyone()
    emit("done", step=args.steps)
    accelerator.end_training()
    return 0


# ---------------------------------------------------------------------------------- fork server
def serve() -> int:
    import accelerate  # noqa: F401  (imported once here, inherited by every child)
    import safetensors.torch  # noqa: F401
    from diffusers import DDPMScheduler, UNet2DModel  # noqa: F401

    import lawa_diffusion.engine.accelerate_hooks  # noqa: F401
    import lawa_diffusion.engine.ema  # noqa: F401
    from fork_server import serve as fork_server  # beside this script (its folder leads sys.path)

    return fork_server(main)


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main())
