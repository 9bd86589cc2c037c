"""Text-to-image training shaped like diffusers' examples/text_to_image/train_text_to_image.py, for GPU runs of a
small pipeline folder (scripts/make_tiny_pipeline.py) on captioned images (scripts/make_caption_folder.py).

What it keeps of diffusers' script, so that the launch plugin meets what it meets there: scheduler, tokenizer,
text encoder, VAE and UNet loaded from ``--pretrained_model_name_or_path`` subfolders; the EMA made from a second
copy of the UNet before ``accelerator.prepare`` (``EMAModel(..., model_cls=UNet2DConditionModel,
model_config=...)``); latents from ``vae.encode(...).latent_dist.sample()`` times the VAE's scaling factor; prompt
embeddings from the frozen text encoder; accelerate save/load pre-hooks writing ``unet_ema`` and ``unet``;
``--checkpointing_steps`` / ``--resume_from_checkpoint latest``; ``--validation_prompts`` (``nargs="+"``); a
shuffled loader with ``--dataloader_num_workers``; ``--allow_tf32`` and ``--mixed_precision``.

What differs: the images come from a folder with metadata.jsonl (no ``datasets``), no validation images are made,
the end saves ``unet`` and ``unet_ema`` (no pipeline folder), and one last line gives the step rate:
``done: N steps in S s (R step/s)``.

    accelerate launch -m lawa_diffusion.launch --lawa_k 5 --lawa_every_n_steps 50 scripts/train_text_to_image.py \
        --pretrained_model_name_or_path PIPE --train_data_dir DATA/train --use_ema --max_train_steps 1000 ...
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Text-to-image training in the shape of diffusers' example script.")
    p.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    p.add_argument("--revision", type=str, default=None)
    p.add_argument("--variant", type=str, default=None)
    p.add_argument("--train_data_dir", type=str, required=True, help="images with metadata.jsonl captions")
    p.add_argument("--caption_column", type=str, default="text")
    p.add_argument("--validation_prompts", type=str, default=None, nargs="+")
    p.add_argument("--output_dir", type=str, default="sd-model-finetuned")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--num_train_epochs", type=int, default=100)
    p.add_argument("--max_train_steps", type=int, default=None)
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--lr_scheduler", type=str, default="constant")
    p.add_argument("--lr_warmup_steps", type=int, default=0)
    p.add_argument("--use_ema", action="store_true")
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--adam_epsilon", type=float, default=1e-08)
    p.add_argument("--max_grad_norm", default=1.0, type=float)
    p.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--resume_from_checkpoint", type=str, default=None)
    p.add_argument("--logging_dir", type=str, default="logs")
    return p.parse_args(argv)


class CaptionedImages(torch.utils.data.Dataset):
    """The rows of ``folder/metadata.jsonl``: each image decoded when asked for (as the ``datasets`` image column
    is), in [-1, 1], with its caption's token ids (tokenized once)."""

    def __init__(self, folder, caption_column, tokenizer, transform):
        with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if not rows:
            raise ValueError(f"--train_data_dir {folder!r} has an empty metadata.jsonl; add one row per image")
        missing = [c for c in ("file_name", caption_column) if c not in rows[0]]
        if missing:
            raise ValueError(f"--train_data_dir {folder!r}: metadata.jsonl rows have no {', '.join(missing)}; pass "
                             "--caption_column naming the caption column")
        self.paths = [os.path.join(folder, row["file_name"]) for row in rows]
        self.input_ids = tokenizer([row[caption_column] for row in rows], max_length=tokenizer.model_max_length,
                                   padding="max_length", truncation=True, return_tensors="pt").input_ids
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return {"pixel_values": self.transform(image.convert("RGB")), "input_ids": self.input_ids[i]}


def main(argv=None):
    args = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    source = args.pretrained_model_name_or_path
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", revision=args.revision)
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", revision=args.revision,
                                                 variant=args.variant)
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae", revision=args.revision, variant=args.variant)
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=args.revision)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()

    if args.use_ema:
        ema_unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=args.revision,
                                                        variant=args.variant)
        ema_unet = EMAModel(ema_unet.parameters(), model_cls=UNet2DConditionModel, model_config=ema_unet.config)

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if args.use_ema:
                ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
            for model in models:
                model.save_pretrained(os.path.join(output_dir, "unet"))
                if weights:  # empty under DeepSpeed
                    weights.pop()

    def load_model_hook(models, input_dir):
        if args.use_ema:
            loaded = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DConditionModel)
            ema_unet.load_state_dict(loaded.state_dict())
            ema_unet.to(accelerator.device)
            del loaded
        for _ in range(len(models)):
            model = models.pop()
            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    train_transforms = transforms.Compose([
        transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(args.resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    with accelerator.main_process_first():
        train_dataset = CaptionedImages(args.train_data_dir, args.caption_column, tokenizer, train_transforms)
    train_dataloader = torch.utils.data.DataLoader(train_dataset, shuffle=True, batch_size=args.train_batch_size,
                                                   num_workers=args.dataloader_num_workers, drop_last=True,
                                                   persistent_workers=args.dataloader_num_workers > 0)

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)

    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, train_dataloader,
                                                                          lr_scheduler)
    if args.use_ema:
        ema_unet.to(accelerator.device)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    global_step = first_epoch = 0
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint != "latest":
            path = os.path.basename(args.resume_from_checkpoint)
        else:
            dirs = sorted((d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")),
                          key=lambda d: int(d.split("-")[1]))
            path = dirs[-1] if dirs else None
        if path is None:
            accelerator.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new run.")
            args.resume_from_checkpoint = None
        else:
            accelerator.print(f"Resuming from checkpoint {path}")
            accelerator.load_state(os.path.join(args.output_dir, path))
            global_step = int(path.split("-")[1])
            first_epoch = global_step // num_update_steps_per_epoch

    progress_bar = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process, mininterval=5)
    start, start_step, loss = time.perf_counter(), global_step, None
    for epoch in range(first_epoch, args.num_train_epochs):
        for batch in train_dataloader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                          device=latents.device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                if args.use_ema:
                    ema_unet.step(unet.parameters())
                progress_bar.update(1)
                global_step += 1
                if global_step % args.checkpointing_steps == 0 and accelerator.is_main_process:
                    accelerator.save_state(os.path.join(args.output_dir, f"checkpoint-{global_step}"))
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    progress_bar.close()
    seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(unet)
        unet.save_pretrained(os.path.join(args.output_dir, "unet"))
        if args.use_ema:
            ema_unet.save_pretrained(os.path.join(args.output_dir, "unet_ema"))
    steps = global_step - start_step
    last = "" if loss is None else f", final loss {loss.detach().item():.4f}"
    accelerator.print(f"done: {steps} steps in {seconds:.1f} s ({steps / max(seconds, 1e-9):.2f} step/s){last}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
