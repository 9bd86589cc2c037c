"""Post-hoc power EMAs of a sharded model stored in parts by every process; run with torchrun (gloo, CPU).

``--mode fsdp2``: the UNet sharded with torch's ``fully_shard``; ``--mode zero3``: prepared by accelerate under
DeepSpeed ZeRO-3 (run through zero3_cpu.py); ``--mode ddp``: prepared by accelerate as DDP.

``PosthocSnapshots`` over the model stores σ_rel 0.05 and 0.10 every step into OUT/sharded. The reference,
OUT/whole: a second ``PosthocSnapshots`` fed with the full weights gathered after every step (plain tensors, so
only the main process keeps and stores it, as under DDP). Each process writes the bytes of post-hoc EMA weights it
holds in both (``held.rank<r>.json``).

``--checkpoint_at C --kill_after K``: ``accelerator.save_state`` at step C (the sharded store's state), then,
after step K's snapshots are on disk, every process kills itself (SIGKILL). ``--resume``: replays the training of
steps 1..C (deterministic) without the sharded store, loads the checkpoint and goes on; the reference follows every
step from the start, as an uninterrupted run.
"""
import argparse
import json
import os
import signal

import torch
import torch.distributed as dist
from accelerate import Accelerator
from diffusers import UNet2DModel

from lawa_diffusion import PosthocSnapshots
from tests.helpers import tiny_unet

SIGMA_RELS = (0.05, 0.10)


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1000 * step + rank))


def gathered(params, mode):
    """Full copies of the parameters (every process takes part), each as trainable as its parameter."""
    if mode == "fsdp2":
        return [p.full_tensor().detach().clone().requires_grad_(p.requires_grad) for p in params]
    if mode == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    return [p.detach().clone().requires_grad_(p.requires_grad) for p in params]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--mode", choices=["fsdp2", "zero3", "ddp"], required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--checkpoint_at", type=int, default=0)
    parser.add_argument("--kill_after", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    out, mode = args.output_dir, args.mode
    if mode == "fsdp2":
        dist.init_process_group("gloo")
        accelerator = Accelerator(cpu=True)
    else:
        accelerator = Accelerator(cpu=mode == "ddp")
    rank = dist.get_rank()
    unet = tiny_unet(0, channels=3)
    names = [n for n, _ in unet.named_parameters()]
    config = dict(unet.config)
    reference = PosthocSnapshots([p.detach().clone() for p in unet.parameters()], os.path.join(out, "whole"),
                                 sigma_rels=SIGMA_RELS, every_n_steps=1, names=names, model_config=config,
                                 model_cls=UNet2DModel)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(unet)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
    model = accelerator.unwrap_model(unet) if mode == "ddp" else unet  # ZeRO-3: the engine itself, looked through
    store = PosthocSnapshots(model, os.path.join(out, "sharded"), sigma_rels=SIGMA_RELS, every_n_steps=1,
                             model_cls=UNet2DModel).attach(accelerator)
    checkpoint = os.path.join(out, "checkpoint")
    for step in range(1, args.steps + 1):
        loss = unet(batch(rank, step), torch.tensor([1, 2])).sample.pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        params = list(model.parameters())
        reference.update(gathered(params, mode))  # replayed from step 1 when resuming: it never resumes
        if args.resume and step <= args.checkpoint_at:
            if step == args.checkpoint_at:
                accelerator.load_state(checkpoint)
            continue
        store.update(params)
        if step == args.checkpoint_at:
            accelerator.save_state(checkpoint)  # every process: each saves its part of the post-hoc EMAs
        if step == args.kill_after:
            store.flush()
            reference.flush()
            dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
    store.close()
    reference.close()
    with open(os.path.join(out, f"held.rank{rank}.json"), "w") as f:
        json.dump({"sharded": store.held_bytes(), "whole": reference.held_bytes(),
                   "model": sum(p.numel() * 4 for p in tiny_unet(0, channels=3).parameters()),
                   "layout": store.layout.kind if store.layout is not None else None}, f)


if __name__ == "__main__":
    main()
