"""Power-function EMAs and the snapshots stored for averages after the fact (``posthoc_store``).

References: a float64 step-by-step power EMA written here, ``lag.profile`` applied to the recorded raw
weights, and an uninterrupted run for resumption through accelerate's save_state / load_state.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.engine.ema import PowerEMAModel
from lawa_diffusion.engine.posthoc_snapshots import STATE_FILE, PosthocSnapshots, sigma_rel_track
from lawa_diffusion.maths import lag
from lawa_diffusion.runs import folder as runfolder
from tests.helpers import tiny_unet

TRACKS = [sigma_rel_track(0.05), sigma_rel_track(0.1)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models on one thread (see conftest.one_thread)."""


def read_snapshot(path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# ----------------------------------------------------------------------------- PowerEMAModel
@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.25])
def test_power_ema_model_weights_are_the_float64_recursion_and_lag_profile(sigma_rel):
    """Fed θ_s = e_s (one-hot at step s), the shadow holds the weight of every step: the profile."""
    steps = 40
    gamma = lag.gamma_of_sigma_rel(sigma_rel)
    theta = torch.nn.Parameter(torch.zeros(steps + 1, dtype=torch.float64))
    ema = PowerEMAModel([theta], sigma_rel=sigma_rel)
    naive = np.zeros(steps + 1)
    for t in range(1, steps + 1):
        theta.data.zero_()
        theta.data[t] = 1.0
        ema.step([theta])
        beta = (1.0 - 1.0 / t) ** (gamma + 1.0)  # m = t: the t-th update (the first one copies)
        naive = beta * naive
        naive[t] += 1.0 - beta
        if t in (1, 7, steps):
            got = ema.shadow_params[0].numpy()
            np.testing.assert_allclose(got, naive, rtol=0, atol=1e-12)
            np.testing.assert_allclose(got[1:t + 1], lag.profile(lag.power_ema(sigma_rel=sigma_rel), t)[1:], rtol=0, atol=1e-12)
    assert ema.gamma == pytest.approx(gamma) and ema.sigma_rel == pytest.approx(sigma_rel)
    assert naive[steps] > naive[1] > 0  # weights grow with the step: not a constant-decay EMA


def test_power_ema_state_carries_gamma():
    unet = tiny_unet()
    ema = PowerEMAModel(unet.parameters(), gamma=6.94)
    other = PowerEMAModel(unet.parameters(), gamma=16.97)
    other.load_state_dict(ema.state_dict())
    assert other.gamma == 6.94


# ----------------------------------------------------------------------------- the API object
def train_with_store(out, steps, *, resume=None, save_at=(), keep_history=False, every=2):
    """A tiny UNet trained ``steps`` steps with accelerate, a PosthocSnapshots attached; the raw weights seen
    at each step are returned with ``keep_history``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    unet = tiny_unet()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    unet, optimizer = acc.prepare(unet, optimizer)
    store = PosthocSnapshots(unet, out, sigma_rels=[0.05, 0.1], every_n_steps=every).attach(acc)
    start = 0
    if resume is not None:
        acc.load_state(resume)
        start = store.step
    history = {}
    for step in range(start + 1, steps + 1):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(2, 1, 8, 8, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        loss = (unet(x, t).sample - x).pow(2).mean()
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        store.update(unet.parameters())
        if keep_history:
            history[step] = {n: p.detach().double().clone() for n, p in unet.named_parameters()}
        if step in save_at:
            acc.save_state(os.path.join(out, f"checkpoint-{step}"))
    store.close()
    return store, history


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    store, history = train_with_store(out, 6, save_at=(3,), keep_history=True)
    return out, store, history


def test_api_stores_each_power_ema_every_n_steps_with_its_definition(api_run):
    out, store, history = api_run
    assert runfolder.snapshot_tracks(str(out)) == TRACKS
    for name, sigma_rel in zip(TRACKS, (0.05, 0.1)):
        assert [s for s, _ in runfolder.list_ema_snapshots(str(out), name)] == [2, 4, 6]
        for step in (2, 6):
            tensors, meta = read_snapshot(runfolder.snapshot_path(str(out), step, name))
            assert (meta["step"], meta["track"]) == (str(step), name)
            assert json.loads(meta["model_config"])["block_out_channels"] == [8, 16]
            track = lag.EMATrack.from_dict(json.loads(meta["track_def"]))
            assert track == lag.power_ema(sigma_rel=sigma_rel)
            # the file holds Σ_s w(s) θ_s with w the profile of its track_def over the raw weights seen (θ_0 at s=0)
            w = lag.profile(track, step)
            assert w[0] == 0.0 and w.sum() == pytest.approx(1.0)
            for pname, got in tensors.items():
                want = sum(w[s] * history[s][pname] for s in range(1, step + 1))
                assert got.dtype == torch.float32
                torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    live = store.own[TRACKS[0]].shadow_params[0]
    assert torch.equal(read_snapshot(runfolder.snapshot_path(str(out), 6, TRACKS[0]))[0]["conv_in.weight"], live)


def test_api_resume_through_accelerate_is_bitwise(api_run, tmp_path):
    out, full, _ = api_run
    resumed_dir = tmp_path / "run"
    train_with_store(resumed_dir, 5, save_at=(3,))  # crashed after step 5, checkpoint at 3
    assert (resumed_dir / "checkpoint-3" / STATE_FILE).is_file()
    assert [s for s, _ in runfolder.list_ema_snapshots(str(resumed_dir), TRACKS[0])] == [2, 4]
    with open(runfolder.snapshot_path(str(resumed_dir), 4, TRACKS[0]), "ab") as f:
        f.write(b"stale")  # what the resumed run must replace, not keep
    resumed, _ = train_with_store(resumed_dir, 6, resume=str(resumed_dir / "checkpoint-3"))
    for name in TRACKS:
        assert [s for s, _ in runfolder.list_ema_snapshots(str(resumed_dir), name)] == [2, 4, 6]
        for step in (2, 4, 6):
            got, got_meta = read_snapshot(runfolder.snapshot_path(str(resumed_dir), step, name))
            want, want_meta = read_snapshot(runfolder.snapshot_path(str(out), step, name))
            assert got_meta == want_meta and all(torch.equal(got[k], want[k]) for k in want)
        a, b = resumed.own[name], full.own[name]
        assert a.optimization_step == b.optimization_step == 6 and a.gamma == b.gamma
        assert all(torch.equal(x, y) for x, y in zip(a.shadow_params, b.shadow_params))


def test_api_stores_emas_it_is_given_in_the_dtype_asked(tmp_path):
    from diffusers.training_utils import EMAModel

    unet = tiny_unet()
    ema = EMAModel(unet.parameters(), decay=0.9, min_decay=0.9)
    with PosthocSnapshots(unet, tmp_path, every_n_steps=1, dtype="float16", emas={"ema": ema}) as store:
        assert store.own == {} and store.tracks == ["ema"]
        ema.step(unet.parameters())
        store.after_step()
    tensors, meta = read_snapshot(runfolder.snapshot_path(str(tmp_path), 1, "ema"))
    assert tensors["conv_in.weight"].dtype == torch.float16
    assert lag.EMATrack.from_dict(json.loads(meta["track_def"])) == lag.constant_ema(0.9)
    assert os.path.dirname(runfolder.snapshot_path(str(tmp_path), 1, "ema")) == str(tmp_path / "ema_snapshots")


def test_a_pending_write_keeps_its_host_copy_not_the_ema_tensors(tmp_path):
    """An EMA moved (new tensors) after a store frees its old tensors while the file is still waiting to be written;
    the file then holds the weights of the store."""
    import gc
    import threading
    import weakref

    from diffusers.training_utils import EMAModel

    unet = tiny_unet()
    ema = EMAModel(unet.parameters(), decay=0.9, min_decay=0.9)
    with PosthocSnapshots(unet, tmp_path, every_n_steps=1, emas={"ema": ema}, main_process=True) as store:
        gate = threading.Event()
        store.writer.submit(gate.wait)  # the writer thread is busy until the gate opens
        try:
            ema.step(unet.parameters())
            store.after_step()
            stored = [p.clone() for p in ema.shadow_params]
            old = [weakref.ref(p) for p in ema.shadow_params]
            ema.shadow_params = [p.clone() + 1.0 for p in ema.shadow_params]  # what ema.to(other device) does
            gc.collect()
            assert sum(ref() is not None for ref in old) == 0
        finally:
            gate.set()
    tensors, _ = read_snapshot(runfolder.snapshot_path(str(tmp_path), 1, "ema"))
    names = [n for n, _ in unet.named_parameters()]
    assert all(torch.equal(tensors[n], p) for n, p in zip(names, stored))


def test_api_errors_are_one_sentence(tmp_path):
    unet = tiny_unet()
    with pytest.raises(ValueError, match="posthoc dtype must be one of float32, bfloat16, float16, got 'float64'"):
        PosthocSnapshots(unet, tmp_path, dtype="float64")
    with pytest.raises(ValueError, match="sigma_rel must be > 0 and < 0.2887"):
        PosthocSnapshots(unet, tmp_path, sigma_rels=[0.3])
    with pytest.raises(ValueError, match="'nope' are not EMAs"):
        PosthocSnapshots(unet, tmp_path, tracks=["nope"])
    store = PosthocSnapshots(unet, tmp_path, sigma_rels=[0.05])
    with pytest.raises(ValueError, match="holds no post-hoc EMA state"):
        store.load_state(str(tmp_path))
    store.close()


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("entry, words", [
    ({"name": "p", "sigma_rel": 0.289}, ["sigma_rel", "0.289", "< 0.2887"]),
    ({"name": "p", "sigma_rel": 0}, ["sigma_rel", "> 0", "got 0"]),
    ({"name": "p", "gamma": -1}, ["gamma", "> 0", "got -1"]),
    ({"name": "p", "sigma_rel": 0.1, "decay": 0.9}, ["exactly one of decay, half_life, sigma_rel and gamma",
                                                      "decay=0.9, sigma_rel=0.1"]),
])
def test_bad_power_tracks_are_refused_in_one_sentence(tmp_path, entry, words):
    with pytest.raises(ValueError) as e:
        TrainConfig.from_dict({"output_dir": str(tmp_path), "ema_tracks": [entry]})
    assert len(str(e.value).splitlines()) == 1
    for word in words:
        assert word in str(e.value)


def test_posthoc_section_defaults_and_errors(tmp_path):
    base = {"output_dir": str(tmp_path)}
    cfg = TrainConfig.from_dict({**base, "ema_tracks": [{"name": "a", "sigma_rel": 0.05}, {"name": "c", "decay": 0.9},
                                                        {"name": "b", "gamma": 6.94}]})
    assert cfg.posthoc.tracks == ["a", "b"] and cfg.posthoc.every_n_steps == 0 and cfg.posthoc.dtype == "float32"
    assert TrainConfig.from_dict(base).posthoc.tracks == ["ema"]
    assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    with pytest.raises(ValueError, match="posthoc tracks names 'x', which is not an EMA track of this config; use"):
        TrainConfig.from_dict({**base, "posthoc": {"tracks": ["x"], "every_n_steps": 5}})
    with pytest.raises(ValueError, match="posthoc dtype must be one of float32, bfloat16, float16"):
        TrainConfig.from_dict({**base, "posthoc": {"dtype": "float64"}})
    with pytest.raises(ValueError, match="posthoc every_n_steps must be an integer >= 0"):
        TrainConfig.from_dict({**base, "posthoc": {"every_n_steps": -1}})
    with pytest.raises(ValueError, match="unknown key"):
        TrainConfig.from_dict({**base, "posthoc": {"every": 5}})


def test_snapshot_plan_shares_one_dtype_per_track(tmp_path):
    from lawa_diffusion.training.trainer import snapshot_plan

    cfg = TrainConfig.from_dict({"output_dir": str(tmp_path), "save_ema_snapshots": True,
                                 "ema_tracks": [{"name": "p", "sigma_rel": 0.1}, {"name": "c", "decay": 0.9}],
                                 "posthoc": {"every_n_steps": 3, "dtype": "bfloat16"}})
    tracks = ["ema", "p", "c"]
    assert snapshot_plan(cfg, False, 3, tracks) == {"p": torch.bfloat16}
    assert snapshot_plan(cfg, True, 4, tracks) == {"p": torch.bfloat16, "ema": torch.float16, "c": torch.float16}
    assert snapshot_plan(cfg, False, 4, tracks) == {}


def test_lawa_window_over_a_power_track(tmp_path):
    from lawa_diffusion.maths.track_lags import configured_window as window_of
    from lawa_diffusion.training.tracks import TrackSet

    cfg = TrainConfig.from_dict({"output_dir": str(tmp_path), "ema_tracks": [{"name": "p", "sigma_rel": 0.1}],
                                 "lawa_windows": [{"name": "w", "over": "p", "k": 2, "every_n_steps": 5}]})
    track, window = window_of(cfg, "w")
    assert track == lag.power_ema(sigma_rel=0.1) and window.k == 2
    tracks = TrackSet.from_config(cfg, tiny_unet(), "cpu")
    assert isinstance(tracks.emas["p"], PowerEMAModel) and tracks.emas["p"].gamma == pytest.approx(lag.gamma_of_sigma_rel(0.1))
    assert "over power-function EMA σ_rel 0.1" in tracks.lag_lines(20)[0]
    tracks.close()


@pytest.mark.cuda
def test_snapshots_of_cuda_emas_are_the_weights_of_their_step(tmp_path):
    """The host copy is asynchronous (pinned buffers, an event the writer waits for): each file must hold
    its own step's weights, not a later update's. The training stream sleeps before every update, so each copy
    lands long after the writer thread has it in hand, and the test itself waits for the GPU only at the end: a writer
    that did not wait for the copy's event would save the buffer before (or while) the copy fills it."""
    unet = tiny_unet().cuda()
    store = PosthocSnapshots(unet, tmp_path, sigma_rels=[0.1], every_n_steps=1, main_process=True)
    want = {}
    for step in range(1, 6):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time before this step's update and copy
        with torch.no_grad():
            for p in unet.parameters():
                p.mul_(1.5).add_(0.25)
        store.update(unet.parameters())
        want[step] = store.own[TRACKS[1]].shadow_params[0].detach().clone()  # on the GPU: no host sync
    store.close()
    for step, tensor in want.items():
        got, _ = read_snapshot(runfolder.snapshot_path(str(tmp_path), step, TRACKS[1]))
        assert torch.equal(got["conv_in.weight"], tensor.cpu()), step


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_one_process_fsdp2_keeps_parts_made_before_the_model_was_sharded_and_moved(tmp_path, device):
    """``PosthocSnapshots`` made from the whole model, which is then sharded (``fully_shard``, one process) and, on
    CUDA, moved: at the first update its EMAs are cut to this process's part and follow the parameters' device; the
    sharded store it writes (read on this process) equals an unsharded store fed the gathered weights."""
    import torch.distributed as dist
    from diffusers import UNet2DModel
    from torch.distributed.fsdp import fully_shard

    from lawa_diffusion.posthoc.snapshot_reader import load_tensors

    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        unet = tiny_unet(0, channels=3)
        names = [n for n, _ in unet.named_parameters()]
        whole = PosthocSnapshots([p.detach().clone() for p in unet.parameters()], tmp_path / "whole",
                                 sigma_rels=[0.05, 0.1], every_n_steps=2, names=names, model_config=dict(unet.config),
                                 model_cls=UNet2DModel)
        store = PosthocSnapshots(unet, tmp_path / "sharded", sigma_rels=[0.05, 0.1], every_n_steps=2)
        unet.to(device)
        fully_shard(unet)
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        for _ in range(4):
            x = torch.randn(2, 3, 8, 8, generator=generator).to(device)
            unet(x, torch.tensor([1, 2], device=device)).sample.pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            store.update(unet.parameters())
            whole.update([p.full_tensor().detach().cpu().requires_grad_(p.requires_grad) for p in unet.parameters()])
        assert store.layout.kind == "dtensor" and store.own[TRACKS[0]].shadow_params[0].device.type == device
        store.close()
        whole.close()
        for track in TRACKS:
            for step in (2, 4):
                mine = load_tensors(runfolder.snapshot_path(str(tmp_path / "sharded"), step, track, sharded=True))
                theirs, _ = read_snapshot(runfolder.snapshot_path(str(tmp_path / "whole"), step, track))
                assert mine.keys() == theirs.keys()
                for key, value in theirs.items():
                    torch.testing.assert_close(mine[key], value, rtol=0, atol=1e-6)
    finally:
        dist.destroy_process_group()
