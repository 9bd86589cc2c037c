"""Small shared fixtures for the tests (tiny models, tensors)."""
from __future__ import annotations

import torch


def tiny_unet(seed: int = 0, sample_size: int = 8):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )


def perturb_(params, generator: torch.Generator, scale: float = 0.01) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * scale)


def relative_error(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-30)
