"""The conditional evaluator's sampling against diffusers' own StableDiffusionPipeline.__call__, side by side.

Both make the same images: the same prompts, latents, scheduler, steps, guidance and batch size, from one small
text-to-image pipeline built from configs (nothing downloaded). The evaluator's time includes encoding the
prompts (once per run, as an evaluation does); the pipeline encodes each batch's prompts in its call. Runs
alternate (evaluator, pipeline, evaluator, ...) after one warm-up each; the median of --repeats is reported.
Prints one JSON object:

  {"bench": "eval_conditional", "ratio": evaluator images/s / pipeline images/s, "goal": 1.0, ...}

Usage: python benchmarks/bench_eval_conditional.py [--device cpu|cuda] [--num-prompts 16] [--steps 4]
       [--batch-size 8] [--guidance-scale 7.5] [--sample-size 16] [--width 32] [--dtype fp32|fp16|bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ["a", "photo", "of", "red", "blue", "cat", "dog", "car", "tree", "small", "big", "on", "the", "house"]


def write_tokenizer_files(folder: str) -> str:
    """A byte-level BPE vocabulary (every byte, alone and word-final, and CLIP's special tokens), no merges."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    symbols = [chr(b) if b in keep else chr(next(extra)) for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return folder


def build_pipeline(folder: str, args) -> str:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(folder + "-tokenizer"), model_max_length=32)
    n = len(tokenizer)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                                                bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1))
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        sample_size=args.sample_size * 2)
    w = args.width
    unet = UNet2DConditionModel(sample_size=args.sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(w, 2 * w), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--sample-size", type=int, default=16, help="latent size (images are twice as large)")
    p.add_argument("--width", type=int, default=32, help="UNet block_out_channels (W, 2W)")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import diffusers
    from diffusers import StableDiffusionPipeline

    from lawa_diffusion.evaluation import conditional, prompts

    diffusers.utils.logging.disable_progress_bar()
    device = torch.device(args.device)
    dtype = conditional.resolve_dtype(args.dtype)
    with tempfile.TemporaryDirectory() as work:
        folder = build_pipeline(os.path.join(work, "pipe"), args)
        parts = conditional.ConditionalPipelineParts.from_pretrained(folder, device=device, dtype=dtype)
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
    texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(2 + i % 5)) for i in range(args.num_prompts)]
    prompt_set = prompts.PromptSet(prompts=tuple(texts), source="bench")
    settings = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale, seed=0)
    n = args.num_prompts

    def ours() -> torch.Tensor:
        return conditional.sample_variants_conditional(parts, {"unet": parts.unet}, prompt_set, num_samples=n,
                                                       batch_size=args.batch_size, progress=False, **settings)["unet"]

    probe = conditional.ConditionalSampler(parts, prompt_set, **settings)
    latents = probe.noise(parts.unet, range(n))[0]

    def theirs() -> torch.Tensor:
        out = []
        for start in range(0, n, args.batch_size):
            stop = min(start + args.batch_size, n)
            images = pipe(texts[start:stop], latents=latents[start:stop].to(device, dtype),
                          num_inference_steps=args.steps, guidance_scale=args.guidance_scale, output_type="pt").images
            out.append((images.float() * 255).round().to(torch.uint8).cpu())
        return torch.cat(out)

    def timed(fn):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        return time.perf_counter() - start, result

    a, b = ours(), theirs()  # warm-up (and the images compared below)
    seconds = {"evaluator": [], "pipeline": []}
    for _ in range(args.repeats):
        seconds["evaluator"].append(timed(ours)[0])
        seconds["pipeline"].append(timed(theirs)[0])
    rate = {k: n / statistics.median(v) for k, v in seconds.items()}
    print(json.dumps({
        "bench": "eval_conditional", "ratio": round(rate["evaluator"] / rate["pipeline"], 3), "goal": 1.0,
        "evaluator_img_s": round(rate["evaluator"], 2), "pipeline_img_s": round(rate["pipeline"], 2),
        "max_abs_pixel_diff": int((a.int() - b.int()).abs().max()), "images": n, "image_size": list(a.shape[-2:]),
        "steps": args.steps, "batch_size": args.batch_size, "guidance_scale": args.guidance_scale,
        "dtype": args.dtype, "device": str(device), "torch_threads": torch.get_num_threads(),
        "repeats": args.repeats, "host": platform.node()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
