"""A diffusers EMA over an FSDP2-sharded UNet (its shadow parameters are DTensor shards); run with torchrun.

A few optimizer steps on random data; the EMA gathered after every step goes to ``ema_steps.safetensors``
(main process), then ``accelerator.save_state`` on every process writes ``checkpoint``, as FSDP needs.
"""
import argparse
import os

import torch
import torch.distributed as dist
from accelerate import Accelerator
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard

from tests.helpers import tiny_unet

STEPS = 4


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    unet = tiny_unet(0, channels=3)
    names = [n for n, _ in unet.named_parameters()]
    fully_shard(unet)
    ema = EMAModel(unet.parameters(), model_cls=UNet2DModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(dist.get_rank())
    gathered = {}
    for step in range(1, STEPS + 1):
        unet(torch.randn(2, 3, 8, 8, generator=generator), torch.tensor([1, 2])).sample.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        for name, t in zip(names, ema.shadow_params):
            gathered[f"{step}/{name}"] = t.full_tensor().detach().clone()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        save_file(gathered, os.path.join(args.output_dir, "ema_steps.safetensors"))
    accelerator.save_state(os.path.join(args.output_dir, "checkpoint"))


if __name__ == "__main__":
    main()
