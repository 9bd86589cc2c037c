"""Small shared fixtures for the tests (tiny models, tensors)."""
from __future__ import annotations

import torch


def tiny_unet(seed: int = 0, sample_size: int = 8, channels: int = 1):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )


def perturb_(params, generator: torch.Generator, scale: float = 0.01) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * scale)


def relative_error(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-30)


def unflatten_with_flat_empties(flat, tensors):
    """``_unflatten_dense_tensors`` as some torch versions have it: a zero-element tensor comes back as shape [0]."""
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(torch.empty(0, dtype=flat.dtype) if n == 0 else flat[offset:offset + n].view(t.shape))
        offset += n
    return tuple(out)


def param_sum_metric(calls: list):
    """Stand-in metric: the float64 sum of all weights of each variant; records each call's variant names."""
    def evaluate(variants):
        calls.append(sorted(variants))
        out = {}
        for name, weights in variants.items():
            with weights() as model:
                total = sum(p.double().sum().item() for p in model.state_dict().values())
            out[name] = {"fid": total, "kid_mean": None, "kid_std": None, "num_samples": 0, "inception_sha256": "-"}
        return out
    return evaluate
