"""Snapshot rings: pinned host rows of exactly the bytes asked for, no reference kept to replaced sources,
averages onto the target's device. CUDA-only tests are marked ``cuda``."""
import gc
import weakref

import pytest
import torch

from lawa_diffusion import LAWAConfig, LAWAEMAModel
from lawa_diffusion.engine import rings as storage
from tests.helpers import perturb_, tiny_unet


@pytest.fixture
def fake_register(monkeypatch):
    """Record cudaHostRegister / cudaHostUnregister calls (a CPU has neither)."""
    calls = []
    monkeypatch.setattr(storage, "_HOST_REGISTER", [lambda ptr, n: calls.append(("register", ptr, n)),
                                                    lambda ptr: calls.append(("unregister", ptr))])
    return calls


@pytest.mark.parametrize("shape, dtype", [((5, 1001), torch.bfloat16), ((3, 777), torch.float32), ((4097,), torch.float16)])
def test_host_empty_registers_exactly_the_bytes_asked_and_releases_them(fake_register, shape, dtype):
    before = storage.registered_bytes()
    t = storage.host_empty(shape, dtype, pin=True)
    nbytes = t.numel() * t.element_size()
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    assert fake_register == [("register", t.data_ptr(), nbytes)]  # no rounding up to a power of two
    assert t.data_ptr() % storage.PAGE_BYTES == 0
    assert storage.registered_bytes() - before == nbytes
    t.fill_(1)
    view = t.reshape(-1)[:7]  # a view keeps the memory (and its registration) alive
    del t
    gc.collect()
    assert len(fake_register) == 1 and view.sum().item() == 7
    del view
    gc.collect()
    assert fake_register[1] == ("unregister", fake_register[0][1]) and storage.registered_bytes() == before


def test_host_empty_without_pinning_registers_nothing(fake_register):
    t = storage.host_empty((2, 3), torch.float32, pin=False)
    z = storage.host_empty((0, 3), torch.float32, pin=True)
    assert t.shape == (2, 3) and z.shape == (0, 3) and fake_register == []


@pytest.mark.parametrize("storage_mode", ["device", "cpu", "disk"])
def test_sources_replaced_by_ema_to_are_freed(tmp_path, storage_mode):
    """diffusers' EMAModel.to() replaces shadow_params: the ring must not keep the old tensors alive
    (on CUDA they would stay on the GPU until the next snapshot)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = tiny_unet().to(device)
    ema = LAWAEMAModel(unet.parameters(), decay=0.5, lawa=LAWAConfig(k=2, every_n_steps=1, storage=storage_mode,
                                                                    snapshot_dir=str(tmp_path)))
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        perturb_(unet.parameters(), g)
        ema.step(unet.parameters())
    old = [weakref.ref(p) for p in ema.shadow_params]
    ema.to(dtype=torch.float64)  # replaces every shadow tensor (as offloading to another device does)
    gc.collect()
    assert sum(r() is not None for r in old) == 0
    ema.lawa.close()


@pytest.mark.cuda
def test_device_ring_averages_onto_the_targets_device_after_offload():
    unet = tiny_unet().cuda()
    ema = LAWAEMAModel(unet.parameters(), decay=0.5, lawa=LAWAConfig(k=2, every_n_steps=1, storage="device"))
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(2):
        perturb_(unet.parameters(), g)
        ema.step(unet.parameters())
        rows.append([p.double().cpu() for p in ema.shadow_params])
    ema.to("cpu")  # offloaded after the last snapshot: the ring stays on the GPU until the next one
    target = tiny_unet(seed=4)
    ema.copy_to(target.parameters(), weights="lawa")
    assert all(torch.allclose(p.double(), (a + b) / 2) for p, a, b in zip(target.parameters(), *rows))


@pytest.mark.cuda
def test_pinned_rows_are_registered_with_exact_bytes():
    before = storage.registered_bytes()
    ring = storage.make_ring("cpu", 3, 1001, torch.bfloat16, [(1001,)], torch.device("cuda", torch.cuda.current_device()))
    assert ring.buffer.is_pinned() and storage.registered_bytes() - before == 3 * 1001 * 2
    ring.close()
    del ring
    gc.collect()
    assert storage.registered_bytes() == before
