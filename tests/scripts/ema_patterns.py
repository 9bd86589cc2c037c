"""A tiny DDPM training script that keeps its EMAs in the ways diffusers' example scripts do.

Flags pick the pattern; every combination trains on CPU in seconds:
- ``--num_emas 2``: two models (``unet`` and ``prior``), each with its own EMA and ``*_ema`` folder;
- ``--offload_ema``: the EMA lives on the CPU (pinned when CUDA is there) and visits the training
  device for each update;
- ``--foreach_ema``: ``EMAModel(..., foreach=True)``;
- ``--zero3_block``: the EMAs are made inside a ZeRO-3 ``GatheredParameters`` block (a no-op block
  when DeepSpeed is not installed);
- ``--api``: LAWA through the library API (``LAWAEMAModel`` + ``attach``) with ``--api_k`` /
  ``--api_every_n_steps``; without it the script knows nothing of LAWA.
``--sleep_in_save`` holds the process inside each save hook and ``--print_steps`` tells each step, so
that a test can kill it at a chosen moment.
The load hook reads each EMA back with ``EMAModel.from_pretrained`` + ``load_state_dict``.

Noise, timesteps and a flip decision come from the global torch / ``random`` / NumPy generators, as in
the examples, so anything else drawing from them would change what this script trains. At the end
it saves the raw and EMA weights and the generators' states (``rng_end.pt``).
"""
import argparse
import contextlib
import os
import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

NAMES = ("unet", "prior")


def parse_args():
    parser = argparse.ArgumentParser(description="Tiny DDPM training with diffusers-style EMAs.")
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--max_train_steps", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--checkpointing_steps", type=int, default=4)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--num_emas", type=int, default=1, choices=[1, 2])
    parser.add_argument("--offload_ema", action="store_true")
    parser.add_argument("--foreach_ema", action="store_true")
    parser.add_argument("--zero3_block", action="store_true")
    parser.add_argument("--api", action="store_true")
    parser.add_argument("--api_k", type=int, default=2)
    parser.add_argument("--api_every_n_steps", type=int, default=2)
    parser.add_argument("--crash_after_step", type=int, default=None)
    parser.add_argument("--sleep_in_save", type=float, default=0.0,
                        help="print 'saving' and wait this long inside each save hook (to be killed there)")
    parser.add_argument("--print_steps", action="store_true", help="print 'step N' after each optimizer step")
    return parser.parse_args()


def tiny_unet(width):
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(width, 2 * width), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


def zero3_gathered(params, enabled):
    """DeepSpeed's GatheredParameters block when asked for and installed, else a block that does nothing."""
    if enabled:
        try:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
        except ImportError:
            pass
    return contextlib.nullcontext()


def main(args):
    accelerator = Accelerator()
    set_seed(args.seed)
    unet = tiny_unet(args.width)
    prior = tiny_unet(args.width) if args.num_emas == 2 else None
    ema_prior = None

    def named_emas():
        return [(name, ema) for name, ema in (("unet", ema_unet), ("prior", ema_prior)) if ema is not None]

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
            if ema_prior is not None:
                ema_prior.save_pretrained(os.path.join(output_dir, "prior_ema"))
            if args.sleep_in_save:
                print("saving", flush=True)
                time.sleep(args.sleep_in_save)
            for name, model in zip(NAMES, models):
                model.save_pretrained(os.path.join(output_dir, name))
            weights.clear()

    def load_model_hook(models, input_dir):
        for name, ema in named_emas():
            load_model = EMAModel.from_pretrained(os.path.join(input_dir, f"{name}_ema"), UNet2DModel,
                                                  foreach=args.foreach_ema)
            ema.load_state_dict(load_model.state_dict())
            if not args.offload_ema:
                ema.to(accelerator.device)
            del load_model
        for name, model in zip(NAMES, list(models)):
            load_model = UNet2DModel.from_pretrained(input_dir, subfolder=name)
            model.load_state_dict(load_model.state_dict())
        models.clear()

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    with zero3_gathered(unet.parameters(), args.zero3_block):
        if args.api:
            import lawa_diffusion

            config = lawa_diffusion.LAWAConfig(k=args.api_k, every_n_steps=args.api_every_n_steps)
            ema_unet = lawa_diffusion.LAWAEMAModel(unet.parameters(), decay=0.99, foreach=args.foreach_ema,
                                                   model_cls=UNet2DModel, model_config=unet.config, lawa=config)
            lawa_diffusion.attach(accelerator, ema_unet.lawa)
            if prior is not None:
                ema_prior = lawa_diffusion.LAWAEMAModel(prior.parameters(), decay=0.99, foreach=args.foreach_ema,
                                                        model_cls=UNet2DModel, model_config=prior.config,
                                                        lawa=config, lawa_name="lawa_2")
                lawa_diffusion.attach(accelerator, ema_prior.lawa)
        else:
            ema_unet = EMAModel(unet.parameters(), decay=0.99, foreach=args.foreach_ema,
                                model_cls=UNet2DModel, model_config=unet.config)
            if prior is not None:
                ema_prior = EMAModel(prior.parameters(), decay=0.99, foreach=args.foreach_ema,
                                     model_cls=UNet2DModel, model_config=prior.config)

    models = [m for m in (unet, prior) if m is not None]
    optimizer = torch.optim.AdamW([p for m in models for p in m.parameters()], lr=args.learning_rate)
    scheduler = DDPMScheduler(num_train_timesteps=100)
    data = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1)).clamp(-1, 1)
    *models, optimizer = accelerator.prepare(*models, optimizer)
    for _, ema in named_emas():
        if args.offload_ema:
            ema.to("cpu")
            if torch.cuda.is_available():
                ema.pin_memory()
        else:
            ema.to(accelerator.device)

    step = 0
    if args.resume_from_checkpoint and os.path.isdir(args.output_dir):
        found = sorted((int(d.split("-")[1]), d) for d in os.listdir(args.output_dir) if d.startswith("checkpoint-"))
        if found:
            accelerator.load_state(os.path.join(args.output_dir, found[-1][1]))
            step = found[-1][0]

    while step < args.max_train_steps:
        start = (step * args.batch_size) % data.shape[0]
        clean = data[start: start + args.batch_size].to(accelerator.device)
        if random.random() < 0.5:
            clean = clean.flip(-1)
        noise = torch.randn(clean.shape, device=clean.device) * (1.0 + 0.01 * float(np.random.rand()))
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        loss = sum(F.mse_loss(model(noisy, timesteps).sample, noise) for model in models)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        for model, (_, ema) in zip(models, named_emas()):
            if args.offload_ema:
                ema.to(accelerator.device, non_blocking=True)
            ema.step(model.parameters())
            if args.offload_ema:
                ema.to("cpu", non_blocking=True)
        step += 1
        if args.print_steps:
            print(f"step {step}", flush=True)
        if accelerator.is_main_process and step % args.checkpointing_steps == 0:
            accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{step}"))
        if args.crash_after_step is not None and step == args.crash_after_step:
            os._exit(3)

    if accelerator.is_main_process:
        for name, model in zip(NAMES, models):
            accelerator.unwrap_model(model).save_pretrained(os.path.join(args.output_dir, f"raw_{name}"))
        ema_unet.save_pretrained(os.path.join(args.output_dir, "unet_ema"))
        if ema_prior is not None:
            ema_prior.save_pretrained(os.path.join(args.output_dir, "prior_ema"))
        if args.api:
            for name, ema in named_emas():
                ema.lawa.save_pretrained(os.path.join(args.output_dir, f"{name}_lawa"))
        states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1], "random": random.getstate()[1]}
        torch.save(states, os.path.join(args.output_dir, "rng_end.pt"))
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
