"""A diffusers EMA over an FSDP2-sharded UNet (its shadow parameters are DTensor shards); run with torchrun.

Two optimizer steps on random data, then the EMA folder is saved on the main process.
"""
import argparse
import os

import torch
import torch.distributed as dist
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from torch.distributed.fsdp import fully_shard


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    fully_shard(unet)
    ema = EMAModel(unet.parameters(), model_cls=UNet2DModel, model_config=unet.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    for step in range(2):
        x = torch.randn(2, 3, 8, 8)
        unet(x, torch.tensor([1, 2])).sample.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
    if dist.get_rank() == 0:
        os.makedirs(args.output_dir, exist_ok=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
