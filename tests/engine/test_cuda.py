"""GPU paths of the engine: pinned host ring with side-stream copies, device ring, chunked streaming."""
import pytest
import torch

from lawa_diffusion import LAWA, LAWAConfig, LAWAEMAModel
from lawa_diffusion.engine import rings as storage_mod

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


# ~50 ms at 2 GHz (torch.cuda._sleep spins this many GPU clock cycles): far longer than the next EMA update
LATE_COPY_CYCLES = 100_000_000


@pytest.mark.parametrize("wait", [True, False], ids=["deferred_wait", "control_without_wait"])
def test_lawa_ema_model_on_gpu_deferred_wait_is_exact(monkeypatch, wait):
    """The snapshot copy runs on a side stream while the training stream goes on; the next EMA update overwrites
    the shadow parameters in place, so it must wait (on the GPU) for the copy to have read them. The side stream
    sleeps before each copy and one tensor is large (32 MB), so the next update always runs first unless the
    wait orders it: with the wait the average is exact; without it (the control) the snapshots hold later EMA
    values — which shows that the test can see a missing wait."""
    g = torch.Generator(device="cuda").manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in [(8 << 20,), (257, 33), (3, 3, 3)]]
    ema = LAWAEMAModel(params, decay=0.5, foreach=True, lawa=LAWAConfig(k=3, every_n_steps=1, storage="cpu"))
    real_copy = storage_mod.DeviceToHost.copy

    def late_copy(copier, row, tensors):
        with torch.cuda.stream(copier.stream):
            torch.cuda._sleep(LATE_COPY_CYCLES)  # the copy below starts only after this
        return real_copy(copier, row, tensors)

    monkeypatch.setattr(storage_mod.DeviceToHost, "copy", late_copy)
    if not wait:
        monkeypatch.setattr(ema.lawa, "before_source_update", lambda: None)
    kept = []
    for _ in range(8):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, device="cuda", generator=g))
        ema.step(params)  # the next EMA update overwrites shadow params while the copy is still pending
        kept = (kept + [[s.double().clone() for s in ema.shadow_params]])[-3:]
    assert isinstance(ema.lawa._ring, storage_mod.HostRing) and ema.lawa._ring.buffer.is_pinned()
    ref = [sum(c[i] for c in kept) / 3 for i in range(len(params))]
    target = [torch.empty_like(s) for s in ema.shadow_params]
    ema.lawa.average_into(target)
    error = max((o.double() - r).abs().max().item() for o, r in zip(target, ref))
    if wait:
        assert error <= 1e-6
    else:
        assert error > 0.1


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


@pytest.mark.parametrize("storage", ["cpu", "device"])
def test_keep_average_uploads_the_evicted_row_before_the_copier_overwrites_its_slot(monkeypatch, storage):
    """keep_average subtracts the evicted snapshot, read from its (pinned) row without a host wait, while the next
    snapshot's copy goes into the same slot on the copier's stream. The training stream sleeps before each upload,
    so the copy would land first unless it waits for the upload: every running average must stay the float64 mean
    of the window (checked after every snapshot, between the exact recomputations)."""
    g = torch.Generator(device="cuda").manual_seed(4)
    tensors = [torch.randn(s, device="cuda", generator=g) for s in [(4 << 20,), (257, 33)]]
    lawa = LAWA(tensors, LAWAConfig(k=3, every_n_steps=1, storage=storage, keep_average=True))
    ring_type = storage_mod.HostRing if storage == "cpu" else storage_mod.DeviceRing
    real_row_copy = ring_type.row_copy
    uploads = []

    def late_row_copy(ring, slot, device, dtype):
        torch.cuda._sleep(LATE_COPY_CYCLES)  # on the training stream, before the upload is queued
        uploads.append(slot)
        return real_row_copy(ring, slot, device, dtype)

    monkeypatch.setattr(ring_type, "row_copy", late_row_copy)
    kept, errors = [], []
    for step in range(1, 12):
        for t in tensors:
            t.mul_(0.5).add_(torch.randn(t.shape, device="cuda", generator=g))
        assert lawa.step(step)
        kept = (kept + [torch.cat([t.reshape(-1).double() for t in tensors])])[-3:]
        errors.append((lawa.average_flat().double() - sum(kept) / len(kept)).abs().max().item())
    assert len(uploads) >= 5  # the evicting snapshots went through the delayed upload
    assert max(errors) <= 1e-5, errors
    lawa.close()


def test_nonfinite_agreement_and_gather_of_shards_offloaded_to_the_cpu_over_nccl(tmp_path):
    """FSDP2 with CPU offload keeps the EMA's shards on the CPU while its mesh talks NCCL, which takes CUDA tensors
    only: the NaN/Inf flags and the gather of save_pretrained go through the GPU (one process, a mesh of one)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from tests.helpers import tiny_unet

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cuda", (1,))
        unet = tiny_unet()
        sharded = fully_shard(tiny_unet(), mesh=mesh, offload_policy=CPUOffloadPolicy(pin_memory=False))
        shards = [p.detach().clone() for p in sharded.parameters()]  # an EMA of the sharded model, as FSDP2 keeps it
        assert all(s.device_mesh.device_type == "cuda" and s.to_local().device.type == "cpu" for s in shards)
        lawa = LAWA(shards, LAWAConfig(k=2, every_n_steps=1, on_nonfinite="skip"))
        lawa.step(1)
        shards[0].to_local()[0] = float("nan")
        lawa.step(2)
        shards[0].to_local().nan_to_num_(0.0)
        with pytest.warns(UserWarning, match="step 2 "):
            lawa.resolve_checks()
        assert lawa.snapshot_steps == [1]
        lawa.save_pretrained(tmp_path / "lawa", model=tiny_unet(seed=5))
        from diffusers import UNet2DModel

        saved = UNet2DModel.from_pretrained(tmp_path / "lawa")
        assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), unet.parameters()))
    finally:
        dist.destroy_process_group()
