"""The plugin's EMA over an FSDP2-sharded model, in this process: a 1-process gloo group, so ``fully_shard`` gives
DTensor parameters (Shard(0) over one process). The 2-process runs are in test_plugin_fsdp.py (slow)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lawa_diffusion import launch
from lawa_diffusion.engine import sources
from lawa_diffusion.integrations import plugin_options
from lawa_diffusion.integrations.plugin import LAWAInputError
from tests.helpers import tiny_unet


@pytest.fixture(scope="module")
def group():
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_unet():
    from torch.distributed.fsdp import fully_shard

    unet = tiny_unet(0)
    full = [p.detach().clone() for p in unet.parameters()]
    fully_shard(unet)
    return unet, full


def plugin_ema(unet, full):
    """The plugin's EMA, made (as diffusers' examples make it) from full weights."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    return EMAModel(full, model_cls=UNet2DModel, model_config=unet.config)


def test_shard_like_and_gather_full_round_trip(group):
    unet, full = sharded_unet()
    params = list(unet.parameters())
    assert sources.needs_sharding(full, params) and not sources.needs_sharding(params, params)
    shards = sources.shard_like(full, params)
    assert all(sources.is_sharded(s) and s.placements == p.placements for s, p in zip(shards, params))
    assert all(torch.equal(s.to_local(), p.to_local()) for s, p in zip(shards, params))
    assert all(s.to_local().untyped_storage().data_ptr() != f.untyped_storage().data_ptr() for s, f in zip(shards, full))
    moved = [s.to(device="cpu") for s in shards]  # what EMAModel.to does
    assert all(sources.is_sharded(m) for m in moved)
    assert all(torch.equal(g, f) for g, f in zip(sources.gather_full(moved, keep=True), full))
    with pytest.raises(ValueError, match="got 2 parameters but the EMA holds"):
        sources.shard_like(full, params[:2])


def test_plugin_ema_shards_at_its_first_step_and_refuses_what_it_cannot_follow(group, tmp_path):
    unet, full = sharded_unet()
    with launch.installed(plugin_options.resolve_options({"k": "2", "every_n_steps": "1"}, {})):
        ema = plugin_ema(unet, full)
        assert not ema.lawa.source.sharded()
        with pytest.warns(UserWarning, match="snapshot_ranks='all' instead of 'main'"):
            ema.step(unet.parameters())
        assert ema.lawa.source.sharded() and ema.lawa.config.snapshot_ranks == "all"
        assert ema.lawa.snapshot_steps == [1]
        with pytest.raises(LAWAInputError, match=r"save_pretrained\(.*\) of an EMA sharded by FSDP2 writes the weights "
                                                 r"gathered by accelerator.save_state"):
            ema.save_pretrained(tmp_path / "unet_ema")
        with pytest.raises(LAWAInputError, match="copy_to of an EMA sharded by FSDP2 needs the sharded model's"):
            ema.copy_to(tiny_unet(0).parameters())
        ema.lawa.close()
