"""LAWA through the API (``LAWAEMAModel`` + ``attach``) under DeepSpeed ZeRO-3; run with zero3_cpu.py under torchrun.

The EMA is made from the model before ``accelerator.prepare`` (full tensors on every process); its value at
every snapshot step is the reference. After a few steps: ``copy_to(weights="lawa")`` into the partitioned
parameters (refused: they are empty), the same inside ``GatheredParameters(modifier_rank=0)`` with the main
process copying (the result gathered again), and ``save_lawa_pretrained`` on the main process.
"""
import argparse
import json
import os

import deepspeed
import torch
from accelerate import Accelerator
from diffusers import UNet2DModel
from safetensors.torch import save_file

from lawa_diffusion import LAWAEMAModel, attach
from tests.helpers import tiny_unet

K, NU, STEPS = 2, 2, 5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    out = parser.parse_args().output_dir
    accelerator = Accelerator()
    unet = tiny_unet(0, channels=3)
    names = [n for n, _ in unet.named_parameters()]
    ema = LAWAEMAModel(unet.parameters(), model_cls=UNet2DModel, model_config=unet.config,
                       lawa={"k": K, "every_n_steps": NU})
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    attach(accelerator, ema.lawa)
    generator = torch.Generator().manual_seed(accelerator.process_index)
    snapshots = {}
    for _ in range(STEPS):
        loss = unet(torch.randn(2, 3, 8, 8, generator=generator), torch.tensor([1, 2])).sample.pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        ema.step(unet.parameters())
        if ema.lawa.due(ema.optimization_step):
            snapshots[ema.optimization_step] = [t.detach().double().clone() for t in ema.shadow_params]
    params = list(unet.parameters())
    try:
        ema.copy_to(params, weights="lawa")
        refused = ""
    except ValueError as e:
        refused = str(e)
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if accelerator.is_main_process:
            ema.copy_to(params, weights="lawa")
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        copied = {n: p.detach().double().clone() for n, p in zip(names, params)}
    if accelerator.is_main_process:
        ema.save_lawa_pretrained(os.path.join(out, "unet_lawa"))
        latest = sorted(snapshots)[-K:]
        reference = {n: torch.stack([snapshots[s][i] for s in latest]).mean(0) for i, n in enumerate(names)}
        save_file(reference, os.path.join(out, "reference.safetensors"))
        save_file(copied, os.path.join(out, "copied.safetensors"))
        save_file({n: t for n, t in zip(names, snapshots[max(snapshots)])}, os.path.join(out, "last_ema.safetensors"))
        with open(os.path.join(out, "api.json"), "w") as f:
            json.dump({"refused": refused, "snapshot_steps": ema.lawa.snapshot_steps}, f)
    ema.lawa.close()


if __name__ == "__main__":
    main()
