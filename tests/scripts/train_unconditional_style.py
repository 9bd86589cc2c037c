"""A small training script shaped like diffusers' examples/unconditional_image_generation/train_unconditional.py.

It keeps the parts LAWA integration has to cope with: an ``EMAModel`` with warm-up, accelerate
save/load pre-hooks that write and read ``unet_ema`` (the load hook builds a temporary EMAModel with
``EMAModel.from_pretrained``), ``save_state`` on the main process only, ``--checkpointing_steps``,
``--resume_from_checkpoint latest`` and a final ``DDPMPipeline.save_pretrained`` with the EMA
weights swapped in (store / copy_to / restore).

Differences that keep runs tiny and exactly repeatable on CPU: images come from a flat folder read
with PIL (no ``datasets``), the UNet is a few thousand parameters, batches are not shuffled, and the
noise of each step comes from a generator seeded by (seed, step, process index), so a resumed run
draws the same noise as an uninterrupted one on every process. ``--crash_after_step N`` ends the
process abruptly after step N, as a killed job would.

Under DeepSpeed it does what diffusers' DeepSpeed-aware examples do: ``save_state`` on every process,
no ``weights.pop()`` on the empty list accelerate hands the hooks (DeepSpeed's own checkpoint holds
the model, so the hooks save and load only the EMA), and, under ZeRO-3, the final save inside
``deepspeed.zero.GatheredParameters`` on every process. ``--save_raw_weights`` also writes the trained
weights (``unet_raw``) at the final save.

``--fsdp2_cpu`` stands in for accelerate's FSDP2 on CPU processes (accelerate applies FSDP only on
accelerator devices): the model is sharded with torch's ``fully_shard`` right after the EMA is made, where
``accelerator.prepare`` would shard it, so the EMA is made from the full weights and stepped with DTensor
shards. The script then does what diffusers' FSDP-aware examples do: ``save_state`` on every process, whose
hooks write the model's weights gathered on every process (``fsdp_model.safetensors``) and each process's
shard of the optimizer state (``fsdp_optimizer.rank<r>.bin``), as accelerate's FSDP2 ``save_state`` would
(``unet_ema`` is left to the main process as before). The model and optimizer are not passed to ``prepare``
(on CPU it would wrap them in DDP). The final save copies the EMA into the sharded model on every process
and the main process writes the gathered weights.
"""
import argparse
import contextlib
import math
import os

import accelerate
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, set_seed
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from packaging import version
from PIL import Image
from torchvision import transforms
from tqdm.auto import tqdm

logger = get_logger(__name__, log_level="INFO")


def parse_args():
    parser = argparse.ArgumentParser(description="Tiny unconditional DDPM training in the style of diffusers' example.")
    parser.add_argument("--train_data_dir", type=str, required=True, help="A flat folder of images.")
    parser.add_argument("--output_dir", type=str, default="ddpm-model-tiny")
    parser.add_argument("--resolution", type=int, default=8)
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--num_epochs", type=int, default=3)
    parser.add_argument("--save_model_epochs", type=int, default=100)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_scheduler", type=str, default="constant")
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--adam_beta1", type=float, default=0.95)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-6)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--use_ema", action="store_true")
    parser.add_argument("--ema_inv_gamma", type=float, default=1.0)
    parser.add_argument("--ema_power", type=float, default=3 / 4)
    parser.add_argument("--ema_max_decay", type=float, default=0.9999)
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--ddpm_num_steps", type=int, default=100)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crash_after_step", type=int, default=None)
    parser.add_argument("--save_raw_weights", action="store_true")
    parser.add_argument("--fsdp2_cpu", action="store_true", help="shard the model with fully_shard (gloo, CPU)")
    return parser.parse_args()


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, folder, transform):
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith((".png", ".jpg", ".jpeg")))
        if not names:
            raise ValueError(f"--train_data_dir {folder!r} holds no .png/.jpg images")
        self.paths = [os.path.join(folder, n) for n in names]
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return {"input": self.transform(image.convert("RGB"))}


def tiny_unet(resolution):
    return UNet2DModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def full_weights(accelerator, module):
    """Under ZeRO-3, the module's full parameters on every process for the block (changes are dropped)."""
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is None or plugin.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def full_state(model):
    """The full (gathered) state dict of a fully_shard-ed model, on the CPU of the main process (empty elsewhere).
    A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_state(model, optimizer, output_dir, rank):
    """The model's gathered weights (main process) and this process's shard of the optimizer state."""
    from safetensors.torch import save_file

    weights = full_state(model)
    if rank == 0:
        save_file(weights, os.path.join(output_dir, "fsdp_model.safetensors"))
    state = optimizer.state_dict()  # (its per-parameter dicts are the optimizer's own: copied, not changed)
    state["state"] = {index: {k: v.to_local() if hasattr(v, "to_local") else v for k, v in values.items()}
                      for index, values in state["state"].items()}
    torch.save(state, os.path.join(output_dir, f"fsdp_optimizer.rank{rank}.bin"))


def load_sharded_state(model, optimizer, input_dir, rank):
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    weights = load_file(os.path.join(input_dir, "fsdp_model.safetensors"))
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    state = torch.load(os.path.join(input_dir, f"fsdp_optimizer.rank{rank}.bin"), weights_only=True)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, values in state["state"].items():
        p = params[index]
        values.update({k: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                             stride=p.stride()) for k, v in values.items() if k != "step"})
    optimizer.load_state_dict(state)


def main(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with="tensorboard",
        project_dir=logging_dir,
    )
    set_seed(args.seed)
    deepspeed_run = accelerator.distributed_type == DistributedType.DEEPSPEED
    fsdp_run = args.fsdp2_cpu or accelerator.distributed_type == DistributedType.FSDP
    sharded = {}  # --fsdp2_cpu: the sharded model and its optimizer, saved and loaded by the hooks

    if version.parse(accelerate.__version__) >= version.parse("0.16.0"):

        def save_model_hook(models, weights, output_dir):
            if args.fsdp2_cpu:  # on every process: the gather is a collective
                save_sharded_state(sharded["model"], sharded["optimizer"], output_dir, accelerator.process_index)
            if accelerator.is_main_process:
                if args.use_ema:
                    ema_model.save_pretrained(os.path.join(output_dir, "unet_ema"))
                for i, model in enumerate([] if deepspeed_run else models):
                    model.save_pretrained(os.path.join(output_dir, "unet"))
                    if weights:
                        weights.pop()

        def load_model_hook(models, input_dir):
            if args.use_ema:
                load_model = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DModel)
                ema_model.load_state_dict(load_model.state_dict())
                ema_model.to(accelerator.device)
                del load_model
            if args.fsdp2_cpu:
                load_sharded_state(sharded["model"], sharded["optimizer"], input_dir, accelerator.process_index)
            for i in range(0 if deepspeed_run else len(models)):
                model = models.pop()
                load_model = UNet2DModel.from_pretrained(input_dir, subfolder="unet")
                model.register_to_config(**load_model.config)
                model.load_state_dict(load_model.state_dict())
                del load_model

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)

    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    model = tiny_unet(args.resolution)

    if args.use_ema:
        ema_model = EMAModel(
            model.parameters(),
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            model_cls=UNet2DModel,
            model_config=model.config,
        )

    if args.fsdp2_cpu:  # where accelerator.prepare shards the model under FSDP2
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)

    noise_scheduler = DDPMScheduler(num_train_timesteps=args.ddpm_num_steps)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )

    augmentations = transforms.Compose(
        [
            transforms.Resize(args.resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(args.resolution),
            transforms.ToTensor(),
            transforms.Normalize([0.5], [0.5]),
        ]
    )
    dataset = ImageFolder(args.train_data_dir, augmentations)
    train_dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=False)

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * args.gradient_accumulation_steps,
        num_training_steps=(len(train_dataloader) * args.num_epochs),
    )

    if args.fsdp2_cpu:
        sharded.update(model=model, optimizer=optimizer)
        train_dataloader, lr_scheduler = accelerator.prepare(train_dataloader, lr_scheduler)
    else:
        model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, lr_scheduler
        )

    if args.use_ema:
        ema_model.to(accelerator.device)

    if accelerator.is_main_process:
        run = os.path.split(__file__)[-1].split(".")[0]
        accelerator.init_trackers(run)

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    max_train_steps = args.num_epochs * num_update_steps_per_epoch

    global_step = 0
    first_epoch = 0

    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint != "latest":
            path = os.path.basename(args.resume_from_checkpoint)
        else:
            dirs = os.listdir(args.output_dir)
            dirs = [d for d in dirs if d.startswith("checkpoint")]
            dirs = sorted(dirs, key=lambda x: int(x.split("-")[1]))
            path = dirs[-1] if len(dirs) > 0 else None

        if path is None:
            accelerator.print(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
            args.resume_from_checkpoint = None
        else:
            accelerator.print(f"Resuming from checkpoint {path}")
            accelerator.load_state(os.path.join(args.output_dir, path))
            global_step = int(path.split("-")[1])

            resume_global_step = global_step * args.gradient_accumulation_steps
            first_epoch = global_step // num_update_steps_per_epoch
            resume_step = resume_global_step % (num_update_steps_per_epoch * args.gradient_accumulation_steps)

    for epoch in range(first_epoch, args.num_epochs):
        model.train()
        progress_bar = tqdm(total=num_update_steps_per_epoch, disable=not accelerator.is_local_main_process)
        progress_bar.set_description(f"Epoch {epoch}")
        for step, batch in enumerate(train_dataloader):
            if args.resume_from_checkpoint and epoch == first_epoch and step < resume_step:
                if step % args.gradient_accumulation_steps == 0:
                    progress_bar.update(1)
                continue

            clean_images = batch["input"]
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + global_step * 101 + accelerator.process_index)
            noise = torch.randn(clean_images.shape, generator=generator).to(clean_images.device)
            bsz = clean_images.shape[0]
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (bsz,), generator=generator
            ).to(clean_images.device)
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)

            with accelerator.accumulate(model):
                model_output = model(noisy_images, timesteps).sample
                loss = F.mse_loss(model_output.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            if accelerator.sync_gradients:
                if args.use_ema:
                    ema_model.step(model.parameters())
                progress_bar.update(1)
                global_step += 1

                if accelerator.is_main_process or deepspeed_run or fsdp_run:
                    if global_step % args.checkpointing_steps == 0:
                        save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                        accelerator.save_state(save_path)
                        logger.info(f"Saved state to {save_path}")

                if args.crash_after_step is not None and global_step == args.crash_after_step:
                    os._exit(3)

            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
            if args.use_ema:
                logs["ema_decay"] = ema_model.cur_decay_value
            progress_bar.set_postfix(**logs)
            accelerator.log(logs, step=global_step)
        progress_bar.close()

        accelerator.wait_for_everyone()

        if epoch % args.save_model_epochs == 0 or epoch == args.num_epochs - 1:
            unet = accelerator.unwrap_model(model)
            if args.fsdp2_cpu:
                save_sharded_pipeline(args, accelerator, unet, ema_model if args.use_ema else None, noise_scheduler)
            else:
                with full_weights(accelerator, unet):
                    if accelerator.is_main_process:
                        if args.save_raw_weights:
                            unet.save_pretrained(os.path.join(args.output_dir, "unet_raw"))
                        if args.use_ema:
                            ema_model.store(unet.parameters())
                            ema_model.copy_to(unet.parameters())
                        pipeline = DDPMPipeline(unet=unet, scheduler=noise_scheduler)
                        pipeline.save_pretrained(args.output_dir)
                        if args.use_ema:
                            ema_model.restore(unet.parameters())

    logger.info(f"Finished {global_step} of {max_train_steps} steps")
    accelerator.end_training()


def plain_unet(unet, weights):
    """An unsharded copy of ``unet`` holding ``weights`` (a full state dict)."""
    plain = UNet2DModel.from_config(unet.config)
    plain.load_state_dict(weights)
    return plain


def save_sharded_pipeline(args, accelerator, unet, ema_model, noise_scheduler):
    """The final save of a sharded model: the EMA copied into it and its weights gathered on every process, the
    pipeline written by the main process, the trained weights back."""
    if args.save_raw_weights:
        raw = full_state(unet)
        if accelerator.is_main_process:
            plain_unet(unet, raw).save_pretrained(os.path.join(args.output_dir, "unet_raw"))
    if ema_model is not None:
        ema_model.store(unet.parameters())
        ema_model.copy_to(unet.parameters())
    weights = full_state(unet)
    if accelerator.is_main_process:
        DDPMPipeline(unet=plain_unet(unet, weights), scheduler=noise_scheduler).save_pretrained(args.output_dir)
    if ema_model is not None:
        ema_model.restore(unet.parameters())


if __name__ == "__main__":
    args = parse_args()
    main(args)
