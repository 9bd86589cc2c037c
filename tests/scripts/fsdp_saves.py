"""Collective LAWA saves over a sharded (FSDP2 / DTensor) EMA, called on every process; run with torchrun.

A few optimizer steps of an FSDP2-sharded UNet with a ``LAWAEMAModel`` (the EMA gathered at every snapshot
step is the reference), then, on every process: ``accelerate_hooks.save_checkpoint`` with the trainer's
``TrackSet`` hooks registered (its ``unet_lawa`` is a gathering save) and ``launch.save_lawa_next_to``.
A save left to the main process alone would wait forever in the gather.
"""
import argparse
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator
from diffusers import UNet2DModel
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from lawa_diffusion.engine import accelerate_hooks
from lawa_diffusion.engine.ema import LAWAEMAModel
from lawa_diffusion.launch import save_lawa_next_to
from lawa_diffusion.training.tracks import TrackSet
from tests.helpers import tiny_unet

K, NU, STEPS = 2, 2, 5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    out = parser.parse_args().output_dir
    dist.init_process_group("gloo")
    unet = tiny_unet(0, channels=3)
    names = [n for n, _ in unet.named_parameters()]
    fully_shard(unet)
    ema = LAWAEMAModel(unet.parameters(), model_cls=UNet2DModel, model_config=unet.config,
                       lawa={"k": K, "every_n_steps": NU})
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(dist.get_rank())
    snapshots = {}
    for _ in range(STEPS):
        unet(torch.randn(2, 3, 8, 8, generator=generator), torch.tensor([1, 2])).sample.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        if ema.lawa.due(ema.optimization_step):
            snapshots[ema.optimization_step] = {n: t.full_tensor().double() for n, t in zip(names, ema.shadow_params)}
    accelerator = Accelerator(cpu=True)
    tracks = TrackSet.of_ema(ema)
    tracks.emas = {}  # diffusers cannot write a folder of a sharded EMA; the LAWA window is what is tested here
    tracks.register(accelerator)
    accelerate_hooks.save_checkpoint(accelerator, os.path.join(out, "checkpoint"))
    save_lawa_next_to(ema, os.path.join(out, "unet_ema"))
    ema.lawa.close()
    if dist.get_rank() == 0:
        latest = sorted(snapshots)[-K:]
        reference = {n: torch.stack([snapshots[s][n] for s in latest]).mean(0) for n in names}
        save_file(reference, os.path.join(out, "reference.safetensors"), metadata={"steps": str(latest)})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
