"""Tiny conditional models built from configs (nothing downloaded): a text-to-image pipeline folder, a
class-conditional UNet, image folders with metadata.jsonl, and the stand-in feature network registered
with torch-fidelity so that its own ``calculate_metrics`` can be compared with the evaluator."""
from __future__ import annotations

import json
import os

import numpy as np
import torch

TINY_WORDS = ("a", "photo", "of", "red", "blue", "green", "cat", "dog", "car", "tree", "small", "big", "on", "the")
MAX_TOKENS = 16


def _byte_symbols() -> list:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's table)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    shifted, n = [], 0
    for b in range(256):
        if b in keep:
            shifted.append(chr(b))
        else:
            shifted.append(chr(256 + n))
            n += 1
    return shifted


def write_tiny_clip_tokenizer_files(folder) -> str:
    """vocab.json + merges.txt of a small byte-level BPE vocabulary: every byte (alone and word-final), merges
    that spell TINY_WORDS, and CLIP's two special tokens."""
    os.makedirs(folder, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges = []
    for word in TINY_WORDS:  # left-to-right merges: "p h", "ph o", "pho t", "phot o</w>"
        if len(word) < 2:
            continue
        left = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merge = f"{left} {right}"
            if merge not in merges:
                merges.append(merge)
            left = left + right
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    return os.fspath(folder)


def tiny_clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    path = write_tiny_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(path, model_max_length=MAX_TOKENS)


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=32,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(config).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16).eval()


def tiny_cond_unet(seed: int = 0, sample_size: int = 8):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4).eval()


def tiny_class_unet(seed: int = 0, num_classes: int = 3, sample_size: int = 8, channels: int = 1):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       num_class_embeds=num_classes).eval()


def build_text_to_image_pipeline(folder, *, scheduler: str = "ddim", seed: int = 0) -> str:
    """A StableDiffusionPipeline folder (save_pretrained) of tiny random models; returns its path."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    folder = os.fspath(folder)
    tokenizer = tiny_clip_tokenizer(os.path.join(folder + "-tokenizer-files"))
    text_encoder = tiny_text_encoder(len(tokenizer), seed)
    sched_cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[scheduler]
    common = dict(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False, steps_offset=1)
    sched = sched_cls(**common, set_alpha_to_one=False) if scheduler == "ddim" else sched_cls(**common)
    pipe = StableDiffusionPipeline(vae=tiny_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=tiny_cond_unet(seed), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_text_encoder_with_projection(vocab_size: int, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=32,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModelWithProjection(config).eval()


def tiny_sdxl_unet(seed: int = 0, sample_size: int = 8):
    """A UNet2DConditionModel as SDXL's: two text encoders' states (32 + 32), pooled text and size embeddings."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32).eval()


def build_sdxl_pipeline(folder, *, seed: int = 0) -> str:
    """A StableDiffusionXLPipeline folder of tiny random models (Euler scheduler, as SDXL ships); returns its path."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    folder = os.fspath(folder)
    tokenizer = tiny_clip_tokenizer(folder + "-tokenizer-files")
    scheduler = EulerDiscreteScheduler(num_train_timesteps=100, beta_schedule="scaled_linear", beta_start=0.00085,
                                       beta_end=0.012, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(seed), text_encoder=tiny_text_encoder(len(tokenizer), seed),
        text_encoder_2=tiny_text_encoder_with_projection(len(tokenizer), seed + 1), tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=tiny_sdxl_unet(seed), scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(folder)
    return folder


def write_caption_folder(folder, captions, *, size: int = 16, seed: int = 0, caption_column: str = "text") -> str:
    """An image folder with one PNG per caption and metadata.jsonl rows {file_name, caption_column}."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for i, caption in enumerate(captions):
            name = f"img{i:03d}.png"
            Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, name))
            f.write(json.dumps({"file_name": name, caption_column: caption}) + "\n")
    return os.fspath(folder)


def register_stand_in_with_torch_fidelity(dim: int = 16, seed: int = 0) -> str:
    """torch-fidelity feature extractor name for lawa_diffusion's StandInNet(dim, seed) (same weights)."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    from lawa_diffusion.evaluation.inception import StandInNet

    name = f"lawa-stand-in-d{dim}-s{seed}"
    if name in FEATURE_EXTRACTORS_REGISTRY:
        return name

    class StandIn(FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = StandInNet(dim, seed)

        @staticmethod
        def get_provided_features_list():
            return ("pool",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "pool"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

        def forward(self, x):
            return self.net(x)

    register_feature_extractor(name, StandIn)
    return name


class ImagesDataset(torch.utils.data.Dataset):
    """uint8 [N, C, H, W] as the Dataset torch-fidelity reads (one uint8 CHW tensor per item)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.images[i]


def write_ema_snapshots(run, unet, emas: dict, *, steps: int, every: int, dtype=torch.float32, seed: int = 0,
                        scale: float = 0.02) -> dict:
    """A random walk of ``unet``'s weights for ``steps`` steps; each EMA of ``emas`` ({track: diffusers EMAModel or
    PowerEMAModel over ``unet.parameters()``}) is stepped after every step and, every ``every`` steps, stored as the
    launch plugin stores it: ``save_ema_snapshot`` with the plain model config (no ``_class_name``) and the track's
    definition. Returns {track: {step: path}}."""
    from lawa_diffusion.engine.posthoc_snapshots import plain_config, save_ema_snapshot, track_def

    params = list(unet.parameters())
    names = [n for n, _ in unet.named_parameters()]
    config = plain_config(unet.config)
    generator = torch.Generator().manual_seed(seed)
    files = {name: {} for name in emas}
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in params:
                p.add_(scale * torch.randn(p.shape, generator=generator))
        for name, ema in emas.items():
            ema.step(params)
            if step % every == 0:
                files[name][step] = save_ema_snapshot(os.fspath(run), step, ema, names, config, name, track_def(ema),
                                                      dtype=dtype)
    return files


def write_pngs(folder, count: int, size: int = 16, seed: int = 0) -> str:
    """``count`` random RGB PNG files (a plain image folder, no captions)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    for i in range(count):
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))
    return os.fspath(folder)
