"""Snapshot rings: pinned host rows of exactly the bytes asked for, no reference kept to replaced sources,
averages onto the target's device. CUDA-only tests are marked ``cuda``."""
import gc
import os
import weakref

import pytest
import torch

from lawa_diffusion import LAWAConfig, LAWAEMAModel
from lawa_diffusion.engine import rings as storage
from tests.helpers import perturb_, tiny_unet


class Calls(list):
    codes: list


@pytest.fixture
def fake_register(monkeypatch):
    """Record cudaHostRegister / cudaHostUnregister calls (a CPU has neither); unregister answers ``codes[0]``."""
    calls, codes = Calls(), [0]
    monkeypatch.setattr(storage, "_HOST_REGISTER", [lambda ptr, n, device: calls.append(("register", ptr, n, device)),
                                                    lambda ptr, device: calls.append(("unregister", ptr)) or codes[0]])
    calls.codes = codes
    return calls


def os_page() -> int:
    return os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("shape, dtype", [((5, 1001), torch.bfloat16), ((3, 777), torch.float32), ((4097,), torch.float16)])
def test_host_empty_registers_whole_pages_and_releases_them(fake_register, shape, dtype):
    before = storage.registered_bytes()
    t = storage.host_empty(shape, dtype, pin=True, device="cuda:1")
    nbytes = t.numel() * t.element_size()
    pages = -(-nbytes // os_page()) * os_page()
    assert storage.PAGE_BYTES == os_page()
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    # whole pages of the OS, registered under the source's GPU (no rounding up to a power of two)
    assert fake_register == [("register", t.data_ptr(), pages, torch.device("cuda:1"))]
    assert t.data_ptr() % os_page() == 0
    assert storage.registered_bytes() - before == pages
    t.fill_(1)
    view = t.reshape(-1)[:7]  # a view keeps the memory (and its registration) alive
    del t
    gc.collect()
    assert len(fake_register) == 1 and view.sum().item() == 7
    del view
    gc.collect()
    assert fake_register[1] == ("unregister", fake_register[0][1]) and storage.registered_bytes() == before


def test_two_pinned_buffers_never_share_a_page(fake_register):
    a = storage.host_empty((3,), torch.float32, pin=True)
    b = storage.host_empty((3,), torch.float32, pin=True)
    (_, pa, na, _), (_, pb, nb, _) = fake_register
    assert na == nb == os_page() and (pa + na <= pb or pb + nb <= pa)
    assert a.data_ptr() == pa and b.data_ptr() == pb


def test_host_empty_without_pinning_registers_nothing(fake_register):
    t = storage.host_empty((2, 3), torch.float32, pin=False)
    z = storage.host_empty((0, 3), torch.float32, pin=True)
    assert t.shape == (2, 3) and z.shape == (0, 3) and fake_register == []


def mapped_in_a_forked_child(ptr: int, nbytes: int) -> bool:
    """Whether [ptr, ptr + nbytes) is mapped in a child forked now (it reads its own /proc/self/maps)."""
    pid = os.fork()
    if pid == 0:  # the child touches nothing of the parent's but this file
        code = 3
        try:
            with open("/proc/self/maps") as f:
                spans = [[int(x, 16) for x in line.split()[0].split("-")] for line in f]
            code = 1 if any(lo <= ptr and ptr + nbytes <= hi for lo, hi in spans) else 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 1), f"the forked child failed (exit {code})"
    return code == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_a_forked_child_does_not_get_the_pinned_pages(fake_register):
    """A DataLoader worker forks every epoch: pinned pages it inherited would be copied at fork time (Linux >= 5.9
    copies pages pinned for DMA). The pinned buffer is not in the child at all; an ordinary buffer (the control)
    is, so the check can see a mapping."""
    pinned = storage.host_empty((3, 4096), torch.float32, pin=True).fill_(1)
    plain = storage.host_empty((3, 4096), torch.float32, pin=False).fill_(1)
    nbytes = pinned.numel() * pinned.element_size()
    assert not mapped_in_a_forked_child(pinned.data_ptr(), nbytes)
    assert mapped_in_a_forked_child(plain.data_ptr(), nbytes)
    assert pinned.sum().item() == pinned.numel()  # the parent keeps its pages


class FakeEvent:
    def __init__(self, calls: list, name: str, done: bool = False):
        self.calls, self.name, self.done = calls, name, done

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.calls.append(("synchronize", self.name))


def test_release_waits_for_the_copies_that_use_the_memory_before_unregistering(fake_register):
    """A ring dropped while a copy still writes into it (an exception, a replaced engine): the pages are
    unregistered (and unmapped) only after that copy's event; events already passed are not kept."""
    t = storage.host_empty((2, 1000), torch.float32, pin=True)
    storage.note_use(t[1], FakeEvent(fake_register, "passed", done=True))
    storage.note_use(t[1], FakeEvent(fake_register, "read"))  # another stream reading the first
    storage.note_use(t[0, 5:], FakeEvent(fake_register, "write"))
    storage.note_use(torch.empty(3), FakeEvent(fake_register, "not ours"))  # memory of no pinned buffer
    ptr = fake_register[0][1]
    del t
    gc.collect()
    assert fake_register[1:] == [("synchronize", "read"), ("synchronize", "write"), ("unregister", ptr)]


def test_an_unregister_error_is_a_warning_with_its_code(fake_register):
    before = storage.registered_bytes()
    fake_register.codes[0] = 712
    t = storage.host_empty((10,), torch.float32, pin=True)
    with pytest.warns(UserWarning, match=r"could not unpin 4096 bytes .*cudaHostUnregister error 712"):
        del t
        gc.collect()
    assert storage.registered_bytes() == before


def test_a_host_ring_pins_under_the_sources_gpu(fake_register, monkeypatch):
    """The registration runs under the GPU that holds the EMA (a rank on cuda:k that never called set_device(k)
    would otherwise open a context on GPU 0 and pin for it alone)."""

    class NoCopier:
        def __init__(self, *args):
            pass

    monkeypatch.setattr(storage, "_on_cuda", lambda device: True)
    monkeypatch.setattr(storage, "DeviceToHost", NoCopier)
    ring = storage.make_ring("cpu", 2, 10, torch.float32, [(10,)], torch.device("cuda", 3))
    assert [c[3] for c in fake_register if c[0] == "register"] == [torch.device("cuda", 3)]
    del ring
    gc.collect()


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


# ~50 ms at 2 GHz (torch.cuda._sleep spins this many GPU clock cycles): far longer than what the host queues next
LATE_COPY_CYCLES = 100_000_000


@pytest.mark.cuda
@pytest.mark.parametrize("marked", [True, False], ids=["record_stream", "control_without_record_stream"])
def test_a_replaced_source_is_not_reused_before_the_side_stream_copy_has_read_it(monkeypatch, marked):
    """The copier's stream sleeps, so the snapshot copy is still pending when ``EMAModel.to`` replaces every
    shadow tensor and tensors of the same sizes are allocated and filled at once. The ring keeps no reference to
    the old tensors, so only ``record_stream`` stops the caching allocator from handing their memory out again:
    with it, the ring row holds the snapshot's values; without it (the control), the new tensors' fill."""
    g = torch.Generator(device="cuda").manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=g)) for s in [(1 << 20,), (257, 33)]]
    ema = LAWAEMAModel(params, decay=0.5, foreach=True, lawa=LAWAConfig(k=2, every_n_steps=1, storage="cpu"))
    real_copy = storage.DeviceToHost.copy

    def late_copy(copier, row, tensors):
        with torch.cuda.stream(copier.stream):
            torch.cuda._sleep(LATE_COPY_CYCLES)
        return real_copy(copier, row, tensors)

    monkeypatch.setattr(storage.DeviceToHost, "copy", late_copy)
    if not marked:
        monkeypatch.setattr(storage.DeviceToHost, "_mark_read", lambda copier, tensors: None)
    ema.step(params)
    expected = [s.detach().clone() for s in ema.shadow_params]  # queued on the training stream: no host sync
    ema.to(dtype=torch.float64)  # every old shadow tensor is freed here, its copy still pending
    fill = [torch.full(e.shape, 7.0, device="cuda") for e in expected]  # same sizes: the freed blocks if allowed
    ring = ema.lawa._ring
    ring.sync()
    row = ring.buffer[ema.lawa._order[-1][1]]
    want = torch.cat([e.reshape(-1).cpu() for e in expected])
    if marked:
        assert torch.equal(row, want)
    else:
        assert (row == 7.0).float().mean().item() > 0.5, "the control should show the reused memory"
    del fill
    ema.lawa.close()


@pytest.mark.cuda
def test_really_pinned_pages_are_not_in_a_forked_child_and_unpin_cleanly():
    import warnings

    before = storage.registered_bytes()
    t = storage.host_empty((3, 5000), torch.float32, pin=True, device=torch.device("cuda", torch.cuda.current_device()))
    assert t.is_pinned() and t.data_ptr() % os_page() == 0
    assert not mapped_in_a_forked_child(t.data_ptr(), t.numel() * t.element_size())
    d = torch.ones(3, 5000, device="cuda")
    t.copy_(d, non_blocking=True)
    torch.cuda.synchronize()
    assert t.sum().item() == t.numel()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cudaHostUnregister answered 0
        del t
        gc.collect()
    assert storage.registered_bytes() == before
    assert storage._cuda_host_unregister(d.data_ptr(), None) != 0  # and an error code does come back,
    assert (d + 1).sum().item() == 2 * d.numel()  # without leaving the error for torch's next kernel launch to raise
