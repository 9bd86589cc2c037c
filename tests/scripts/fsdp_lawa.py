"""LAWA over a diffusers EMA of an FSDP2-sharded UNet (shadow parameters are DTensor shards); run with torchrun.

``--mode train``: a few optimizer steps; at every LAWA snapshot step the EMA is gathered (the test's
reference); then, with every process: ``unet_lawa`` is written (the EMA is gathered before and after),
the LAWA weights are swapped into the sharded UNet and gathered (the UNet too, before and after), and
``accelerator.save_state`` (called on every process) writes ``checkpoint/``, where each process saves
its shard of the window. ``--mode resume``: ``accelerator.load_state`` of ``checkpoint/`` in a fresh
run, which writes its window as ``unet_lawa_resumed``; a refusal is printed as one ``error:`` line, exit 2.
"""
import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from diffusers import UNet2DModel
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from lawa_diffusion import attach
from lawa_diffusion.engine.ema import LAWAEMAModel
from tests.helpers import tiny_unet, unflatten_with_flat_empties

K, NU, STEPS = 2, 2, 7


def sharded_unet(storage, snapshot_dir):
    unet = tiny_unet(0, channels=3)
    fully_shard(unet)
    ema = LAWAEMAModel(unet.parameters(), model_cls=UNet2DModel, model_config=unet.config,
                       lawa={"k": K, "every_n_steps": NU, "storage": storage, "snapshot_dir": snapshot_dir})
    return unet, ema


def gathered(unet, tensors):
    return {name: t.full_tensor().detach().double().cpu()
            for (name, _), t in zip(unet.named_parameters(), tensors)}


def train(out, storage):
    unet, ema = sharded_unet(storage, os.path.join(out, "snapshots"))
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(dist.get_rank())
    snapshots = {}
    for _ in range(STEPS):
        x = torch.randn(2, 3, 8, 8, generator=generator)
        unet(x, torch.tensor([1, 2])).sample.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        if ema.lawa.due(ema.optimization_step):
            snapshots[ema.optimization_step] = gathered(unet, ema.shadow_params)
    ema_before = gathered(unet, ema.shadow_params)
    ema.save_lawa_pretrained(os.path.join(out, "unet_lawa"))
    ema_after = gathered(unet, ema.shadow_params)
    before = gathered(unet, list(unet.parameters()))
    with ema.lawa.swapped_into(unet):
        swapped = gathered(unet, list(unet.parameters()))
    after = gathered(unet, list(unet.parameters()))
    accelerator = Accelerator(cpu=True)
    attach(accelerator, ema.lawa)
    accelerator.save_state(os.path.join(out, "checkpoint"))  # on every process: each saves its shard's window
    ema.lawa.close()
    empty = [list(p.to_local().shape) for p in ema.shadow_params if p.to_local().numel() == 0]
    with open(os.path.join(out, f"empty_shards.rank{dist.get_rank()}.json"), "w") as f:
        json.dump(empty, f)
    if dist.get_rank() == 0:
        latest = sorted(snapshots)[-K:]
        reference = {name: torch.stack([snapshots[s][name] for s in latest]).mean(0) for name in swapped}
        save_file(reference, os.path.join(out, "reference.safetensors"), metadata={"steps": str(latest)})
        save_file(swapped, os.path.join(out, "swapped.safetensors"))
        save_file(before, os.path.join(out, "before_swap.safetensors"))
        save_file(after, os.path.join(out, "after_swap.safetensors"))
        save_file(ema_before, os.path.join(out, "ema_before_save.safetensors"))
        save_file(ema_after, os.path.join(out, "ema_after_save.safetensors"))
        save_file(snapshots[max(snapshots)], os.path.join(out, "ema_at_last_snapshot.safetensors"))


def resume(out, storage):
    _, ema = sharded_unet(storage, os.path.join(out, "snapshots_resumed"))
    try:
        accelerator = Accelerator(cpu=True)
        attach(accelerator, ema.lawa)
        accelerator.load_state(os.path.join(out, "checkpoint"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ema.save_lawa_pretrained(os.path.join(out, "unet_lawa_resumed"))
    ema.lawa.close()
    return 0


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--mode", choices=["train", "resume"], default="train")
    parser.add_argument("--storage", default="cpu")
    parser.add_argument("--flat_empties", action="store_true",
                        help="give torch the unflatten behaviour that returns shape [0] for zero-element tensors")
    args = parser.parse_args()
    if args.flat_empties:
        torch._utils._unflatten_dense_tensors = unflatten_with_flat_empties
    dist.init_process_group("gloo")
    try:
        code = (train if args.mode == "train" else resume)(args.output_dir, args.storage)
    finally:
        dist.destroy_process_group()
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
