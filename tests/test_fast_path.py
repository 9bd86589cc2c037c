"""The trainer's fast path: a config switch that falls back on the CPU (same weights as off), a compiled
forward that falls back on compile errors, autocast sampling; on a GPU, the same first losses."""
from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from lawa_diffusion import fast_path, sampling
from lawa_diffusion import train as train_mod
from lawa_diffusion.config import TrainConfig
from tests.helpers import tiny_unet
from tests.test_train import run, tiny_config

NO_EVAL = {"every_n_steps": 0, "at_end": False}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models run on one thread (see conftest.one_thread)."""


def test_config_switch_values():
    assert TrainConfig().fast_path == "auto"
    assert TrainConfig(fast_path=True).fast_path == "on" and TrainConfig(fast_path=False).fast_path == "off"
    with pytest.raises(ValueError, match="fast_path must be one of auto, on, off, got 'fast'"):
        TrainConfig(fast_path="fast")


def test_switch_falls_back_on_cpu_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not fast_path.enabled("auto", "cpu") and not fast_path.enabled("off", "cpu")
        assert not caught
        assert not fast_path.enabled("on", "cpu")
    assert len(caught) == 1 and "needs a CUDA device" in str(caught[0].message)
    assert fast_path.enabled("auto", "cuda:0") and fast_path.enabled("on", "cuda") and not fast_path.enabled("off", "cuda")
    assert fast_path.adamw_options(False) == {}
    assert fast_path.compile_mode(1) == "reduce-overhead" and fast_path.compile_mode(2) == "default"
    assert fast_path.compile_mode(1, num_processes=2) == "default"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the trainer takes the GPU where there is one; "
                    "test_fast_path_keeps_the_first_losses_on_the_gpu covers it there")
def test_fast_path_on_trains_the_same_weights_on_cpu(tmp_path):
    outs = {}
    for setting in ("off", "on"):
        outs[setting] = tmp_path / setting
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(tiny_config(outs[setting], fast_path=setting, max_train_steps=6, checkpointing_steps=0, eval=NO_EVAL))
        fallbacks = [w for w in caught if "fast_path" in str(w.message)]
        assert len(fallbacks) == (setting == "on")
    for sub in ("model.safetensors", os.path.join("unet_ema", "diffusion_pytorch_model.safetensors")):
        off, on = (load_file(outs[s] / "checkpoint-6" / sub) for s in ("off", "on"))
        assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)


class Broken(Exception):
    pass


def test_compile_error_falls_back_to_the_plain_forward(monkeypatch):
    unet = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])
    expected = unet(x, t, return_dict=False)[0]

    def refuse(*args, **kwargs):
        raise Broken("no compiler here")

    monkeypatch.setattr(torch, "compile", refuse)
    with pytest.warns(UserWarning, match="fast_path: torch.compile.*Broken: no compiler here.*plain path"):
        forward = fast_path.TrainForward(unet, fast=True)
    assert not forward.is_compiled
    assert torch.equal(forward(x, t), expected)


def test_error_at_the_first_compiled_step_retries_it_on_the_plain_forward(monkeypatch):
    unet = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 7])

    def failing_compiled(*args, **kwargs):
        raise Broken("backend failed at the first call")

    monkeypatch.setattr(torch, "compile", lambda module, **kw: failing_compiled)
    forward = fast_path.TrainForward(unet, fast=True, mode="default")
    assert forward.is_compiled
    resets = []

    def forward_backward():
        loss = forward(x, t).square().mean()
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="backend failed at the first call"):
        loss = forward.run(forward_backward, reset=lambda: resets.append(1))
    assert resets == [1] and not forward.is_compiled
    assert torch.equal(loss, unet(x, t, return_dict=False)[0].square().mean())


def test_sampling_runs_the_unet_in_the_training_precision():
    unet = tiny_unet().eval()
    seen = []
    unet.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    scheduler = sampling.build_scheduler("ddim")
    plain = sampling.sample_uint8(unet, scheduler, [0, 1], num_inference_steps=2)
    assert set(seen) == {torch.float32}
    seen.clear()
    mixed = sampling.sample_uint8(unet, sampling.build_scheduler("ddim"), [0, 1], num_inference_steps=2,
                                  precision="bf16")
    assert set(seen) == {torch.bfloat16} and mixed.dtype == torch.uint8 and mixed.shape == plain.shape
    # bf16 rounding moves a few pixel values by a level or so, not the images
    assert (mixed.int() - plain.int()).abs().float().mean() < 2.0


@pytest.mark.slow
def test_compiled_fused_trainer_matches_the_plain_one_on_cpu(tmp_path, monkeypatch):
    """The fast path's pieces (compiled forward, fused AdamW) forced on the CPU: the trainer runs them without
    falling back and ends near the plain path's weights (not bitwise: other kernels, other rounding)."""
    from torch._dynamo.utils import counters

    plain = tmp_path / "plain"
    run(tiny_config(plain, fast_path="off", max_train_steps=4, checkpointing_steps=0, eval=NO_EVAL))
    monkeypatch.setattr(fast_path, "enabled", lambda setting, device: setting != "off")
    fast = tmp_path / "fast"
    graphs = counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(tiny_config(fast, fast_path="on", max_train_steps=4, checkpointing_steps=0, eval=NO_EVAL))
    assert not [w for w in caught if "fast_path" in str(w.message)]
    want, got = (load_file(d / "checkpoint-4" / "model.safetensors") for d in (plain, fast))
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled forward did run
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
def test_fast_path_keeps_the_first_losses_on_the_gpu(tmp_path, monkeypatch):
    """The same first losses (bf16 tolerance) with and without the fast path, on the same batches and noise."""
    real_step = train_mod.train_step
    losses: dict = {}

    def recording(parts, step):
        loss = real_step(parts, step)
        losses.setdefault(parts.cfg.fast_path, []).append(loss.item())
        return loss

    monkeypatch.setattr(train_mod, "train_step", recording)
    for setting in ("off", "on"):
        run(tiny_config(tmp_path / setting, fast_path=setting, max_train_steps=5, checkpointing_steps=0,
                        mixed_precision="bf16", eval=NO_EVAL))
    assert len(losses["off"]) == len(losses["on"]) == 5
    torch.testing.assert_close(torch.tensor(losses["on"]), torch.tensor(losses["off"]), rtol=3e-2, atol=1e-3)
