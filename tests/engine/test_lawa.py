import json
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lawa_diffusion import LAWA, LAWAConfig
from lawa_diffusion.maths.averaging import DTYPE_NAMES
from tests.helpers import torchrun

SHAPES = [(3, 4), (7,), (2, 2, 2)]


def make_source(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES], g


def drive(lawa, tensors, g, num_steps):
    """Random-walk the source; return float64 copies taken at the steps LAWA is expected to snapshot."""
    c = lawa.config
    expected = {}
    for step in range(1, num_steps + 1):
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=g))
        lawa.step(step)
        if step >= c.start_step and (step - c.start_step) % c.every_n_steps == 0:
            dtype = DTYPE_NAMES[c.dtype] if c.dtype else torch.float32
            expected[step] = [t.to(dtype).double() for t in tensors]
    return expected


def naive_mean(expected, k):
    steps = sorted(expected)[-k:]
    return steps, [sum(expected[s][i] for s in steps) / len(steps) for i in range(len(SHAPES))]


def rounding_bound(ref, k: int, running: bool) -> float:
    """What fp32 rounding can explain: the exact mean of up to k rows is ~k+1 roundings of values up to
    max|x|; the running mean (keep_average) adds up to k-1 updates of ~3 roundings of values up to 2 max|x|.
    A wrong window or weight would be off by O(1) here (the source moves by N(0, 1) per step)."""
    scale = max(1.0, max(r.abs().max().item() for r in ref)) * torch.finfo(torch.float32).eps
    return scale * (k + 1 + (6 * (k - 1) if running else 0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    k=st.integers(1, 6), every=st.integers(1, 4), start=st.integers(0, 5),
    dtype=st.sampled_from([None, "float32", "bfloat16", "float16"]),
    storage=st.sampled_from(["device", "cpu", "disk"]), num_steps=st.integers(1, 30),
    keep_average=st.booleans(),
)
def test_average_equals_float64_naive_mean(tmp_path_factory, k, every, start, dtype, storage, num_steps, keep_average):
    folder = str(tmp_path_factory.mktemp("snap"))
    tensors, g = make_source()
    lawa = LAWA(tensors, LAWAConfig(k=k, every_n_steps=every, start_step=start, dtype=dtype, storage=storage,
                                    snapshot_dir=folder, keep_average=keep_average))
    expected = drive(lawa, tensors, g, num_steps)
    steps, ref = naive_mean(expected, k) if expected else ([], None)
    assert lawa.snapshot_steps == steps
    if not steps:
        with pytest.raises(ValueError, match="min_snapshots"):
            lawa.average_into([torch.empty(s) for s in SHAPES])
        return
    out = [torch.empty(s) for s in SHAPES]
    lawa.average_into(out)
    err = max((o.double() - r).abs().max().item() for o, r in zip(out, ref))
    assert err <= rounding_bound(ref, k, keep_average)
    if storage == "disk":
        lawa.close()
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        assert names == [f"lawa-step{s:09d}.safetensors" for s in steps]


def test_step_defaults_to_call_count_and_is_idempotent():
    tensors, g = make_source()
    lawa = LAWA(tensors, LAWAConfig(k=2, every_n_steps=2))
    taken = [lawa.step() for _ in range(5)]
    assert taken == [False, True, False, True, False]
    assert lawa.snapshot_steps == [2, 4]
    assert lawa.step(4) is False  # already snapshotted
    with pytest.raises(ValueError, match="went backwards"):
        lawa.step(3)


def poisoned_run(lawa, bad_steps, num_steps, seed=0):
    """Drive ``lawa`` one snapshot per step on a random walk whose values hold a NaN exactly at ``bad_steps``;
    returns float64 copies of what each step stored (the dtype the ring stores), by step."""
    tensors, g = make_source(seed)
    lawa.source = type(lawa.source)(tensors)
    dtype = DTYPE_NAMES[lawa.config.dtype] if lawa.config.dtype else torch.float32
    clean = [t.clone() for t in tensors]
    stored = {}
    for step in range(1, num_steps + 1):
        for c in clean:
            c.add_(torch.randn(c.shape, generator=g))
        for t, c in zip(tensors, clean):
            t.copy_(c)
        if step in bad_steps:
            tensors[1][0] = float("nan")
        lawa.step(step)
        stored[step] = [t.to(dtype).double() for t in tensors]
    return stored


@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
def test_nonfinite_raise_is_deferred_and_names_the_bad_step(tmp_path, storage):
    lawa = LAWA(make_source()[0], LAWAConfig(k=3, every_n_steps=1, storage=storage, snapshot_dir=str(tmp_path)))
    stored = poisoned_run(lawa, {3}, 3)  # step 3 is taken without a host sync...
    assert lawa.snapshot_steps == [1, 2, 3]
    with pytest.raises(ValueError, match=r"step 3: the EMA weights hold NaN or Inf.*on_nonfinite='skip'"):
        lawa.step(4)  # ...and its check is read at the next snapshot
    assert lawa.snapshot_steps == [1, 2]
    _, ref = naive_mean({s: stored[s] for s in (1, 2)}, 3)
    out = [torch.empty(s) for s in SHAPES]
    lawa.average_into(out)  # the failed snapshot is out of the window
    assert max((o.double() - r).abs().max().item() for o, r in zip(out, ref)) <= rounding_bound(ref, 3, False)
    lawa.close()


@pytest.mark.parametrize("read_at", ["average_flat", "state_dict"])
def test_nonfinite_check_is_read_at_average_and_state_dict(read_at):
    lawa = LAWA(make_source()[0], LAWAConfig(k=2, every_n_steps=1))
    poisoned_run(lawa, {2}, 2)
    with pytest.raises(ValueError, match="step 2: the EMA weights hold NaN or Inf"):
        getattr(lawa, read_at)()
    assert lawa.snapshot_steps == [1]
    assert lawa.state_dict()["snapshot_steps"] == [1]  # nothing left to report


@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
@pytest.mark.parametrize("keep_average", [False, True])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_nonfinite_skip_drops_exactly_that_snapshot(tmp_path, storage, keep_average, dtype):
    cfg = LAWAConfig(k=3, every_n_steps=1, storage=storage, snapshot_dir=str(tmp_path), dtype=dtype,
                     keep_average=keep_average, on_nonfinite="skip")
    lawa = LAWA(make_source()[0], cfg)
    with pytest.warns(UserWarning, match="skipped the snapshot at step 5 "):
        stored = poisoned_run(lawa, {5}, 7)
    # window [3, 4, 5] at step 5 (step 2 evicted); 5 dropped at step 6; then 6, and 7 evicts 3
    assert lawa.snapshot_steps == [4, 6, 7] and lawa.skipped_steps == [5]
    _, ref = naive_mean({s: stored[s] for s in (4, 6, 7)}, 3)
    out = [torch.empty(s) for s in SHAPES]
    lawa.average_into(out)
    assert max((o.double() - r).abs().max().item() for o, r in zip(out, ref)) <= rounding_bound(ref, 3, keep_average)
    resumed = LAWA(make_source()[0], LAWAConfig(**{**cfg.to_dict(), "snapshot_dir": str(tmp_path / "r")}))
    resumed.load_state_dict(lawa.state_dict())
    assert resumed.snapshot_steps == [4, 6, 7]
    if not keep_average:  # (a kept running average is not bitwise the exact mean a resumed engine starts from)
        assert torch.equal(resumed.average_flat(), lawa.average_flat())
    if storage == "disk":
        lawa.close()
        names = sorted(n for n in os.listdir(tmp_path) if n.endswith(".safetensors"))
        assert names == [f"lawa-step{s:09d}.safetensors" for s in (4, 6, 7)]


def test_nonfinite_skip_on_a_process_that_holds_no_snapshots(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    lawa = LAWA(make_source()[0], LAWAConfig(k=3, every_n_steps=1, on_nonfinite="skip"))
    assert not lawa.holds_snapshots
    with pytest.warns(UserWarning, match="step 2 "):
        poisoned_run(lawa, {2}, 4)
    assert lawa.snapshot_steps == [1, 3, 4] and lawa.skipped_steps == [2]  # the same window as the main process


def test_min_snapshots_error_says_when():
    tensors, _ = make_source()
    lawa = LAWA(tensors, LAWAConfig(k=4, every_n_steps=10, min_snapshots=3))
    lawa.step(10)
    assert not lawa.ready
    with pytest.raises(ValueError, match="holds 1 snapshot.*until step 30"):
        lawa.average_flat()


def test_keep_average_drift_over_10k_snapshots():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(4096, generator=g)
    lawa = LAWA([t], LAWAConfig(k=7, every_n_steps=1, storage="device", keep_average=True))
    for step in range(1, 10_001):
        t.copy_(torch.randn(4096, generator=g) + step * 1e-4)  # weight-like magnitudes (|w| ≲ 5)
        lawa.step(step)
    exact = LAWA([t], LAWAConfig(k=7, every_n_steps=1, storage="device"))
    exact.load_state_dict(lawa.state_dict())
    drift = (lawa.average_flat().double() - exact.average_flat().double()).abs().max().item()
    assert drift <= 1e-6
    # the maintained mean also matches a float64 mean of the rows it holds
    rows = lawa.state_dict()["snapshots"].double()
    assert (lawa.average_flat().double() - rows.mean(0)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
def test_state_dict_roundtrip_bitwise(tmp_path, storage):
    tensors, g = make_source()
    cfg = LAWAConfig(k=3, every_n_steps=2, storage=storage, snapshot_dir=str(tmp_path / "a"))
    lawa = LAWA(tensors, cfg)
    drive(lawa, tensors, g, 11)
    state = lawa.state_dict()
    other_cfg = LAWAConfig(k=3, every_n_steps=2, storage=storage, snapshot_dir=str(tmp_path / "b"))
    other = LAWA([t.clone() for t in tensors], other_cfg)
    other.load_state_dict(state)
    assert other.snapshot_steps == lawa.snapshot_steps == [6, 8, 10]
    assert torch.equal(other.average_flat(), lawa.average_flat())


def test_a_state_resumes_only_with_the_same_number_of_processes(monkeypatch):
    tensors, g = make_source()
    lawa = LAWA(tensors, LAWAConfig(k=2, every_n_steps=1))
    drive(lawa, tensors, g, 3)
    state = lawa.state_dict()
    assert state["world_size"] == 1 and state["sharded"] is False
    monkeypatch.setenv("WORLD_SIZE", "3")
    other = LAWA([t.clone() for t in tensors], LAWAConfig(k=2, every_n_steps=1))
    with pytest.raises(ValueError, match="^lawa state holds a window saved by 1 processes but this run has 3; "
                                         "resume with 1 processes, or start a new window$"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="shards of a sharded EMA saved by 2 processes but this run has 3; resume with 2"):
        other.load_state_dict({**state, "world_size": 2, "sharded": True})
    assert other.num_snapshots == 0
    other.load_state_dict({**state, "world_size": 3})
    assert torch.equal(other.average_flat(), lawa.average_flat())


@pytest.mark.parametrize("change", [{"k": 3}, {"every_n_steps": 2}, {"start_step": 1}, {"k": 1, "start_step": 1}])
def test_a_state_resumes_only_with_the_same_window(change):
    tensors, g = make_source()
    cfg = LAWAConfig(k=2, every_n_steps=1)
    lawa = LAWA(tensors, cfg)
    drive(lawa, tensors, g, 3)
    other = LAWA([t.clone() for t in tensors], {**cfg.to_dict(), **change})
    saved = ", ".join(f"{key}={getattr(cfg, key)}" for key in change)
    now = ", ".join(f"{key}={value}" for key, value in change.items())
    with pytest.raises(ValueError, match=f"^lawa state holds a window of {saved} but this LAWA has {now}; "
                                         f"resume with {saved}, or start a new window$"):
        other.load_state_dict(lawa.state_dict())
    assert other.num_snapshots == 0


def test_load_rejects_other_layout():
    tensors, g = make_source()
    lawa = LAWA(tensors, LAWAConfig(k=2, every_n_steps=1))
    drive(lawa, tensors, g, 3)
    fewer = LAWA(tensors[:2], LAWAConfig(k=2, every_n_steps=1))
    with pytest.raises(ValueError, match="source has 2 tensors but the saved LAWA state has 3"):
        fewer.load_state_dict(lawa.state_dict())
    reshaped = LAWA([tensors[0].reshape(4, 3)] + tensors[1:], LAWAConfig(k=2, every_n_steps=1))
    with pytest.raises(ValueError, match=r"shape \(4, 3\).*\(3, 4\)"):
        reshaped.load_state_dict(lawa.state_dict())


def test_disk_resume_drops_snapshots_written_after_the_checkpoint(tmp_path):
    tensors, g = make_source()
    cfg = LAWAConfig(k=2, every_n_steps=1, storage="disk", snapshot_dir=str(tmp_path))
    lawa = LAWA(tensors, cfg)
    drive(lawa, tensors, g, 3)
    state = lawa.state_dict()
    keep = {p: open(p, "rb").read() for p in state["files"]}
    # the checkpoint must survive pruning of its files by later snapshots: keep copies aside
    saved = tmp_path / "ckpt"
    saved.mkdir()
    for p, data in keep.items():
        (saved / os.path.basename(p)).write_bytes(data)
    state["files"] = [str(saved / os.path.basename(p)) for p in state["files"]]
    drive(lawa, tensors, g, 0)
    for step in (4, 5):
        lawa.step(step)
    lawa.close()
    resumed = LAWA([t.clone() for t in tensors], cfg)
    resumed.load_state_dict(state)
    assert resumed.snapshot_steps == [2, 3]
    assert sorted(os.listdir(tmp_path / "ckpt")) and sorted(
        n for n in os.listdir(tmp_path) if n.startswith("lawa-step")) == ["lawa-step000000002.safetensors", "lawa-step000000003.safetensors"]


def test_swapped_into_restores_on_exception():
    from tests.helpers import tiny_unet

    unet = tiny_unet()
    before = [p.detach().clone() for p in unet.parameters()]
    lawa = LAWA(unet, LAWAConfig(k=2, every_n_steps=1))
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    lawa.step(1)
    with torch.no_grad():
        for p, b in zip(unet.parameters(), before):
            p.copy_(b)
    with pytest.raises(RuntimeError, match="boom"):
        with lawa.swapped_into(unet):
            assert torch.allclose(next(unet.parameters()), before[0] + 1.0)
            raise RuntimeError("boom")
    assert all(torch.equal(p, b) for p, b in zip(unet.parameters(), before))


def test_averaged_model_source():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    net = torch.nn.Linear(4, 3)
    avg = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    lawa = LAWA(avg, LAWAConfig(k=2, every_n_steps=2))
    copies = []
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        avg.update_parameters(net)
        if lawa.step():
            copies.append([p.detach().double().clone() for p in avg.module.parameters()])
    assert lawa.snapshot_steps == [4, 6]  # step = n_averaged
    target = torch.nn.Linear(4, 3)
    lawa.copy_to(target)
    for p, a, b in zip(target.parameters(), *copies[-2:]):
        assert (p.double() - (a + b) / 2).abs().max() <= 1e-6


def test_averaged_model_steps_are_counted_without_a_host_sync_per_step(monkeypatch):
    """n_averaged lives on the model's device: reading it (.item()) at every step would sync the host."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    net = torch.nn.Linear(4, 3)
    avg = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for _ in range(3):  # a resumed AveragedModel: the count starts from n_averaged
        avg.update_parameters(net)
    lawa = LAWA(avg, LAWAConfig(k=2, every_n_steps=2))
    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(t is avg.n_averaged) or item(t))
    for _ in range(9):
        avg.update_parameters(net)
        lawa.step()
    monkeypatch.undo()
    assert reads.count(True) == 1 and lawa.snapshot_steps == [10, 12] and int(avg.n_averaged) == 12
    state = lawa.state_dict()
    resumed = LAWA(avg, LAWAConfig(k=2, every_n_steps=2))
    resumed.step()  # (the same AveragedModel object: counted on)
    resumed.load_state_dict(state)
    taken = []
    for _ in range(2):
        avg.update_parameters(net)
        taken.append(resumed.step())
    assert taken == [False, True] and resumed.snapshot_steps == [12, 14]


def test_save_pretrained_loads_and_equals_average(tmp_path):
    from diffusers import UNet2DModel

    from tests.helpers import perturb_, tiny_unet

    unet = tiny_unet()
    lawa = LAWA(unet, LAWAConfig(k=3, every_n_steps=1))
    g = torch.Generator().manual_seed(0)
    for step in range(1, 5):
        perturb_(unet.parameters(), g)
        lawa.step(step)
    lawa.save_pretrained(tmp_path / "lawa")
    loaded = UNet2DModel.from_pretrained(tmp_path / "lawa")
    expected = [torch.empty_like(p) for p in unet.parameters()]
    lawa.average_into(expected)
    assert all(torch.equal(p, e) for p, e in zip(loaded.parameters(), expected))
    config = json.loads((tmp_path / "lawa" / "config.json").read_text())
    assert "lawa" not in config and config["_lawa"]["snapshot_steps"] == [2, 3, 4] and config["_lawa"]["k"] == 3
    from lawa_diffusion.engine.lawa import read_record

    assert read_record(tmp_path / "lawa") == config["_lawa"]
    # diffusers builds the model from the folder without "config attributes {...} were passed ... not expected"
    import logging

    from diffusers.utils import logging as diffusers_logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    diffusers_logging.get_logger("diffusers").addHandler(handler)
    try:
        UNet2DModel.from_pretrained(tmp_path / "lawa")
    finally:
        diffusers_logging.get_logger("diffusers").removeHandler(handler)
    assert not [r for r in records if "were passed to" in r.getMessage()], [r.getMessage() for r in records]


def test_bad_source_type():
    with pytest.raises(ValueError, match="LAWA source must be"):
        LAWA("weights.bin", LAWAConfig())


@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
def test_finite_values_whose_sum_overflows_are_not_mistaken_for_nonfinite(tmp_path, storage):
    # every element is finite, but the fused check's sum overflows: the element-wise confirmation keeps it
    tensors = [torch.full((1000,), 1e38), torch.full((3,), 2.0)]
    lawa = LAWA(tensors, LAWAConfig(k=2, every_n_steps=1, storage=storage, snapshot_dir=str(tmp_path)))
    assert lawa.step(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lawa.step(2) and lawa.average_flat().isfinite().all()
    assert lawa.snapshot_steps == [1, 2] and lawa.skipped_steps == []
    tensors[0][0] = float("inf")
    lawa.step(3)
    with pytest.raises(ValueError, match="step 3"):
        lawa.average_flat()
    lawa.close()


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_host_rows_streamed_in_many_chunks_match_float64(tmp_path, storage, monkeypatch):
    from lawa_diffusion.engine import rings as storage_mod

    monkeypatch.setattr(storage_mod, "CHUNK_BYTES", 64)  # a few elements per chunk and row
    tensors, g = make_source()
    lawa = LAWA(tensors, LAWAConfig(k=4, every_n_steps=1, storage=storage, snapshot_dir=str(tmp_path)))
    expected = drive(lawa, tensors, g, 6)
    _, ref = naive_mean(expected, 4)
    flat = torch.empty(sum(t.numel() for t in tensors))
    storage_mod.streamed_mean(flat, [lambda a, b, s=s: lawa._ring.read(s)[a:b] for _, s in lawa._order],
                              flat.numel(), torch.float32)
    out = [torch.empty(s) for s in SHAPES]
    lawa.average_into(out)
    ref_flat = torch.cat([r.reshape(-1) for r in ref])
    assert (flat.double() - ref_flat).abs().max().item() <= rounding_bound(ref, 4, False)
    assert max((o.double() - r).abs().max().item() for o, r in zip(out, ref)) <= rounding_bound(ref, 4, False)
    lawa.close()


def test_wrapped_window_sums_rows_in_ring_order_and_resume_keeps_slots():
    tensors, g = make_source()
    lawa = LAWA(tensors, LAWAConfig(k=3, every_n_steps=1, storage="device"))
    expected = drive(lawa, tensors, g, 7)  # wrapped twice: slots no longer follow step order
    state = lawa.state_dict()
    assert sorted(state["slots"]) == [0, 1, 2] and state["slots"] != [0, 1, 2]
    resumed = LAWA([t.clone() for t in tensors], LAWAConfig(k=3, every_n_steps=1, storage="device"))
    resumed.load_state_dict(state)
    assert torch.equal(resumed.average_flat(), lawa.average_flat())
    _, ref = naive_mean(expected, 3)
    flat = torch.cat([r.reshape(-1) for r in ref])
    assert (lawa.average_flat().double() - flat).abs().max().item() <= 1e-6


@pytest.mark.parametrize("storage", ["device", "cpu", "disk"])
def test_empty_local_shards_keep_their_shape_in_every_storage(tmp_path, monkeypatch, storage):
    """A process past the chunk count of a small dim 0 holds ``(0, C, 3, 3)`` shards (a whole shard may be
    empty): snapshots, averages and states work whatever ``_unflatten_dense_tensors`` does with them."""
    from tests.helpers import unflatten_with_flat_empties

    monkeypatch.setattr(torch._utils, "_unflatten_dense_tensors", unflatten_with_flat_empties)
    for tensors in ([torch.randn(2, 4), torch.empty(0, 8, 3, 3), torch.randn(3)], [torch.empty(0, 8, 3, 3), torch.empty(0)]):
        cfg = LAWAConfig(k=2, every_n_steps=1, storage=storage, snapshot_dir=str(tmp_path / str(len(tensors))))
        lawa = LAWA(tensors, cfg)
        rows = []
        for step in (1, 2, 3):
            for t in tensors:
                t.add_(1.0)
            lawa.step(step)
            rows.append([t.double().clone() for t in tensors])
        out = [torch.full_like(t, float("nan")) for t in tensors]
        lawa.average_into(out)
        for o, a, b in zip(out, rows[-2], rows[-1]):
            assert o.shape == a.shape and torch.allclose(o.double(), (a + b) / 2)
        resumed = LAWA([t.clone() for t in tensors], {**cfg.to_dict(), "snapshot_dir": str(tmp_path / "r")})
        resumed.load_state_dict(lawa.state_dict())
        assert torch.equal(resumed.average_flat(), lawa.average_flat())
        lawa.close()
        resumed.close()


def test_streamed_mean_of_a_whole_empty_shard():
    from lawa_diffusion.engine.rings import streamed_mean

    out = torch.empty(0)
    assert streamed_mean(out, [lambda a, b: torch.empty(0)] * 3, 0, torch.float32) is out


@pytest.mark.slow
@pytest.mark.parametrize("on_nonfinite", ["skip", "raise"])
def test_sharded_nonfinite_decisions_are_the_same_on_every_process(tmp_path, on_nonfinite):
    """NaN in one process's shard only: both processes skip that snapshot (same window), or both raise."""
    done = torchrun("sharded_nonfinite.py", 2, "--output_dir", str(tmp_path), "--on_nonfinite", on_nonfinite)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    if on_nonfinite == "skip":
        assert [s["window"] for s in seen] == [[2, 4, 5]] * 2 and [s["skipped"] for s in seen] == [[3]] * 2
    else:
        assert all("lawa snapshot at step 3: the EMA weights hold NaN or Inf" in s.get("error", "") for s in seen), seen


def test_keep_average_over_disk_reads_no_file_in_step(tmp_path, monkeypatch):
    from lawa_diffusion.engine.rings import DiskRing

    reads = []
    for name in ("read", "mean_into"):
        original = getattr(DiskRing, name)
        monkeypatch.setattr(DiskRing, name, lambda *a, _f=original, _n=name, **k: reads.append(_n) or _f(*a, **k))
    tensors, g = make_source()
    lawa = LAWA(tensors, LAWAConfig(k=3, every_n_steps=1, storage="disk", snapshot_dir=str(tmp_path), keep_average=True))
    expected = drive(lawa, tensors, g, 8)  # the window wraps: snapshots are evicted
    assert reads == []
    first = lawa.average_flat()
    assert reads == ["mean_into"] and lawa.average_flat() is first  # kept until the window changes
    _, ref = naive_mean(expected, 3)
    assert (first.double() - torch.cat([r.reshape(-1) for r in ref])).abs().max().item() <= rounding_bound(ref, 3, False)
    for t in tensors:
        t.add_(1.0)
    lawa.step(9)
    assert reads == ["mean_into"] and not torch.equal(lawa.average_flat(), first)
    lawa.close()


@pytest.mark.parametrize("start, nu, min_snapshots, first", [(0, 10, 1, 10), (0, 10, 2, 20), (7, 10, 1, 7)])
def test_no_snapshot_yet_names_the_step_that_will_have_one(start, nu, min_snapshots, first):
    # the EMA counts steps from 1, so with start_step 0 the first snapshot is at ν, never at step 0
    lawa = LAWA([torch.zeros(3)], LAWAConfig(k=3, every_n_steps=nu, start_step=start, min_snapshots=min_snapshots))
    with pytest.raises(ValueError, match=f"holds 0 snapshot\\(s\\) .*train until step {first} "):
        lawa.average_into([torch.zeros(3)])
    assert first == lawa_first_due(start, nu) + (min_snapshots - 1) * nu


def lawa_first_due(start: int, nu: int) -> int:
    """Independent reference: the first step s >= 1 with s >= start and s ≡ start (mod ν)."""
    return next(s for s in range(1, start + nu + 1) if s >= start and (s - start) % nu == 0)
