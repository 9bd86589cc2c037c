import json

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from lawa_diffusion import LAWAConfig, LAWAEMAModel, attach
from tests.helpers import perturb_, tiny_unet


def make(unet, **lawa):
    cfg = LAWAConfig(**{"k": 2, "every_n_steps": 2, **lawa})
    return LAWAEMAModel(unet.parameters(), decay=0.9, model_cls=UNet2DModel, model_config=unet.config, lawa=cfg)


def train(unet, ema, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    copies = {}
    for _ in range(steps):
        perturb_(unet.parameters(), g)
        ema.step(unet.parameters())
        copies[ema.optimization_step] = [p.double().clone() for p in ema.shadow_params]
    return copies


def test_ema_is_unchanged_and_lawa_is_mean_of_ema_snapshots():
    unet = tiny_unet()
    plain_unet = tiny_unet()
    ema = make(unet)
    plain = EMAModel(plain_unet.parameters(), decay=0.9)
    copies = train(unet, ema, 7)
    train(plain_unet, plain, 7)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, plain.shadow_params))
    assert ema.lawa.snapshot_steps == [4, 6]
    target = tiny_unet(seed=5)
    ema.copy_to(target.parameters(), weights="lawa")
    for p, a, b in zip(target.parameters(), copies[4], copies[6]):
        assert (p.double() - (a + b) / 2).abs().max() <= 1e-6
    ema.copy_to(target.parameters())  # default: EMA weights, as diffusers
    assert all(torch.equal(p, s) for p, s in zip(target.parameters(), ema.shadow_params))
    with pytest.raises(ValueError, match="weights must be one of ema, lawa, got 'swa'"):
        ema.copy_to(target.parameters(), weights="swa")


def test_save_pretrained_writes_the_ema_folder_like_diffusers(tmp_path):
    unet = tiny_unet()
    ema = make(unet)
    train(unet, ema, 5)
    ema.save_pretrained(tmp_path / "unet_ema")
    config = json.loads((tmp_path / "unet_ema" / "config.json").read_text())
    assert "lawa" not in config and config["optimization_step"] == 5
    loaded = EMAModel.from_pretrained(tmp_path / "unet_ema", UNet2DModel)
    assert all(torch.equal(a, b) for a, b in zip(loaded.shadow_params, ema.shadow_params))
    reloaded = LAWAEMAModel.from_pretrained(tmp_path / "unet_ema", UNet2DModel)
    assert reloaded.lawa.num_snapshots == 0 and reloaded.optimization_step == 5


def test_state_dict_round_trip_carries_the_window():
    unet = tiny_unet()
    ema = make(unet)
    train(unet, ema, 5)
    other = make(tiny_unet(seed=9))
    other.load_state_dict(ema.state_dict())
    assert other.lawa.snapshot_steps == ema.lawa.snapshot_steps == [2, 4]
    assert torch.equal(other.lawa.average_flat(), ema.lawa.average_flat())
    plain_state = EMAModel(unet.parameters()).state_dict()  # a plain diffusers dict still loads
    other.load_state_dict(plain_state)


def test_accelerate_save_and_load_state_carry_lawa(tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    unet = tiny_unet()
    ema = make(unet)
    attach(accelerator, ema.lawa)
    train(unet, ema, 5)
    accelerator.save_state(str(tmp_path / "ckpt"))
    expected = ema.lawa.average_flat().clone()
    train(unet, ema, 4, seed=1)  # the window moves on
    assert ema.lawa.snapshot_steps == [6, 8]
    # a fresh process would rebuild the EMA from unet_ema; here: reload into the same objects
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert ema.lawa.snapshot_steps == [2, 4]
    assert torch.equal(ema.lawa.average_flat(), expected)
    with pytest.raises(ValueError, match="already attached"):
        attach(accelerator, make(tiny_unet()).lawa)


@pytest.mark.parametrize("change", [{"k": 3}, {"every_n_steps": 3}, {"start_step": 2}, {"world_size": 2}])
def test_a_refused_window_leaves_the_ema_untouched(change, monkeypatch):
    unet = tiny_unet()
    ema = make(unet)
    train(unet, ema, 5)
    state = ema.state_dict()
    other = make(tiny_unet(seed=9), **{k: v for k, v in change.items() if k != "world_size"})
    if "world_size" in change:
        monkeypatch.setenv("WORLD_SIZE", str(change["world_size"]))
    train(tiny_unet(seed=3), other, 1)
    before = [p.clone() for p in other.shadow_params]
    step, decay = other.optimization_step, other.decay
    with pytest.raises(ValueError, match="but this (LAWA|run) has .*; resume with"):
        other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.shadow_params, before))
    assert other.optimization_step == step == 1 and other.decay == decay and other.lawa.num_snapshots == 0
