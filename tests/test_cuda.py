"""GPU paths of the engine: pinned host ring with side-stream copies, device ring, chunked streaming."""
import pytest
import torch

from lawa_diffusion import LAWA, LAWAConfig, LAWAEMAModel
from lawa_diffusion import storage as storage_mod

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_gpu_average_matches_float64(tmp_path, storage, dtype, monkeypatch):
    monkeypatch.setattr(storage_mod, "CHUNK_BYTES", 4096)  # force many chunks when streaming host rows
    g = torch.Generator(device="cuda").manual_seed(0)
    tensors = [torch.randn(s, device="cuda", generator=g) for s in [(257, 33), (1000,), (3, 3, 3)]]
    lawa = LAWA(tensors, LAWAConfig(k=4, every_n_steps=3, storage=storage, dtype=dtype, snapshot_dir=str(tmp_path)))
    kept = []
    for step in range(1, 40):
        for t in tensors:
            t.mul_(0.9).add_(torch.randn(t.shape, device="cuda", generator=g))  # in place, right after the copy
        if lawa.step(step):
            kept.append([t.to(torch.bfloat16 if dtype else t.dtype).double().clone() for t in tensors])
    ref = [sum(c[i] for c in kept[-4:]) / 4 for i in range(3)]
    out = [torch.empty_like(t) for t in tensors]
    lawa.average_into(out)
    assert out[0].device.type == "cuda"
    assert max((o.double() - r).abs().max().item() for o, r in zip(out, ref)) <= 1e-6
    lawa.close()


def test_lawa_ema_model_on_gpu_deferred_wait_is_exact():
    from diffusers import UNet2DModel
    from tests.helpers import tiny_unet

    unet = tiny_unet().cuda()
    ema = LAWAEMAModel(unet.parameters(), decay=0.5, foreach=True, model_cls=UNet2DModel, model_config=unet.config,
                       lawa=LAWAConfig(k=3, every_n_steps=1, storage="cpu"))
    g = torch.Generator(device="cuda").manual_seed(1)
    kept = []
    for _ in range(10):
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(torch.randn(p.shape, device="cuda", generator=g))
        ema.step(unet.parameters())  # the next EMA update overwrites shadow params while a copy may be pending
        kept.append([s.double().clone() for s in ema.shadow_params])
    assert isinstance(ema.lawa._ring, storage_mod.HostRing) and ema.lawa._ring.buffer.is_pinned()
    ref = [sum(c[i] for c in kept[-3:]) / 3 for i in range(len(kept[0]))]
    target = [torch.empty_like(s) for s in ema.shadow_params]
    ema.lawa.average_into(target)
    assert max((o.double() - r).abs().max().item() for o, r in zip(target, ref)) <= 1e-6


@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
def test_snapshot_does_not_sync_the_host_and_its_check_is_read_later(tmp_path, storage):
    g = torch.Generator(device="cuda").manual_seed(2)
    tensors = [torch.randn(s, device="cuda", generator=g) for s in [(64, 9), (33,)]]
    lawa = LAWA(tensors, LAWAConfig(k=3, every_n_steps=1, storage=storage, dtype="bfloat16", snapshot_dir=str(tmp_path),
                                    on_nonfinite="skip"))
    lawa.step(1)
    lawa.step(2)
    lawa.resolve_checks()
    tensors[1][5] = float("nan")
    torch.cuda.set_sync_debug_mode("error")  # any implicit host sync in the snapshot raises
    try:
        assert lawa.step(3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tensors[1][5] = 0.0
    with pytest.warns(UserWarning, match="step 3 "):
        lawa.step(4)
    assert lawa.snapshot_steps == [1, 2, 4] and lawa.skipped_steps == [3]
    lawa.close()
