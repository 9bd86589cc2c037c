"""Several averaging tracks in one run: named EMA tracks, LAWA windows over them or over the raw weights,
each window's delayed-EMA baseline, one metrics row per variant with its mean lag, exact resume.

FID uses the FID module's small stand-in feature extractor (see training/test_trainer.py).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.maths import lag
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.training import tracks as tracks_mod
from lawa_diffusion.utils.files import read_jsonl
from tests.helpers import run_crashing_at, tiny_config, torchrun_to_4_then_6, unet_weights, without_timing, write_yaml
from tests.helpers import train_run as run

TRACKS = [{"name": "fast", "decay": 0.5}, {"name": "fast_twin", "decay": 0.5}, {"name": "slow", "half_life": 3},
          {"name": "power", "sigma_rel": 0.1}]
POSTHOC = {"tracks": ["power", "slow"], "every_n_steps": 3}  # float32 files at 3 and 6, besides the fp16 ones at ν
WINDOWS = [{"name": "lawa_fast", "over": "fast", "k": 3, "every_n_steps": 2, "storage": "disk"},
           {"name": "lawa_raw1", "over": "raw", "k": 1, "every_n_steps": 1}]
VARIANTS = ["raw", "ema", "fast", "fast_twin", "slow", "power", "lawa", "lawa@delayed", "lawa_fast", "lawa_fast@delayed",
            "lawa_raw1", "lawa_raw1@delayed"]


def tracks_config(output_dir, **changes) -> dict:
    cfg = tiny_config(output_dir, **changes)
    cfg["ema_tracks"], cfg["lawa_windows"], cfg["posthoc"] = TRACKS, WINDOWS, POSTHOC
    cfg["eval"] = {**cfg["eval"], "variants": VARIANTS[::-1], **changes.get("eval", {})}
    return cfg


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def tracks_run(tmp_path_factory, _one_thread):
    out = tmp_path_factory.mktemp("tracks") / "full"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAWA_CACHE_DIR", os.environ.get("LAWA_TEST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lawa-cache")))
        run(tracks_config(out))
    return str(out)


def rows_by(run_dir: str) -> dict:
    return {(r["step"], r["variant"]): r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))}


# ----------------------------------------------------------------------------- lag maths
def brute_force_lags(ema_kwargs: dict, steps: int, cls=None) -> list:
    """Mean lag of diffusers' real EMAModel at steps 0..steps: fed θ_s = s, it holds Σ w(s)·s = t − lag (float64)."""
    from diffusers.training_utils import EMAModel

    theta = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ema = (cls or EMAModel)([theta], **ema_kwargs)
    lags = [0.0]
    for s in range(1, steps + 1):
        theta.data.fill_(float(s))
        ema.step([theta])
        lags.append(s - ema.shadow_params[0].item())
    return lags, ema


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("change, words", [
    ({"ema_tracks": [{"name": "a", "decay": 1.0}]}, ["decay", "1.0", "< 1"]),
    ({"ema_tracks": [{"name": "a", "decay": -0.5}]}, ["decay", "-0.5", ">= 0"]),
    ({"ema_tracks": [{"name": "a", "half_life": 0}]}, ["half_life", "0", "> 0"]),
    ({"lawa_windows": [{"name": "w", "over": "nope"}]}, ["'w'", "'nope'", "not an EMA track"]),
    ({"ema_tracks": [{"name": "a", "decay": 0.5}, {"name": "a", "decay": 0.6}]}, ["two EMA tracks", "'a'"]),
    ({"ema_tracks": [{"name": "lawa", "decay": 0.5}]}, ["LAWA window", "EMA track", "'lawa'"]),
    ({"eval": {"variants": ["ema", "w@delayed"]}}, ["'w@delayed'", "lawa@delayed"]),
    ({"lawa_windows": [{"name": "w", "over": "raw", "k": 0}]}, ["lawa_windows 'w' k", ">= 1", "got 0"]),
])
def test_bad_tracks_are_one_sentence_exit_2(tmp_path, capsys, change, words):
    cfg = {**tiny_config(tmp_path / "out"), **{k: v for k, v in change.items() if k != "eval"}}
    if "eval" in change:
        cfg["eval"] = {**cfg["eval"], **change["eval"]}
    code = cli.main(["train", "--config", write_yaml(tmp_path / "c.yaml", cfg)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err


def test_variants_default_to_all_but_raw_and_old_configs_still_load(tmp_path):
    cfg = TrainConfig.from_dict(tracks_config(tmp_path, eval={"variants": None}))
    assert cfg.eval.variants == VARIANTS[1:]
    assert cfg.lawa_windows[0].snapshot_dir == os.path.join(str(tmp_path), "lawa_snapshots")
    assert TrainConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert TrainConfig.from_dict(tiny_config(tmp_path, eval={"variants": ["lawa", "ema"]})).eval.variants == ["ema", "lawa"]


# ----------------------------------------------------------------------------- the trainer
def test_every_variant_gets_a_row_at_every_evaluation_from_the_same_noise(tracks_run):
    rows = rows_by(tracks_run)
    assert sorted(rows) == sorted((s, v) for s in (2, 4, 6, 8) for v in VARIANTS)
    for step in (2, 4, 6, 8):
        at = {v: rows[(step, v)] for v in VARIANTS}
        # identical weights, identical noise: identical FID (two EMA tracks of one decay; LAWA k=1, ν=1 over raw)
        assert at["fast"]["fid"] == at["fast_twin"]["fid"]
        assert at["lawa_raw1"]["fid"] == at["raw"]["fid"] == at["lawa_raw1@delayed"]["fid"]
        assert len({at[v]["fid"] for v in ("raw", "ema", "fast", "slow", "power")}) == 5  # different weights differ
        for name in ("lawa", "lawa_fast"):  # the baseline is the window's track as evaluated earlier, same noise
            delayed = at[f"{name}@delayed"]
            earlier = rows[(delayed["snapshot_step"], "ema" if name == "lawa" else "fast")]
            assert delayed["fid"] == earlier["fid"] and delayed["snapshot_step"] in range(step - 4, step + 1, 2)
            assert (delayed["kind"], at[name]["kind"], delayed["over"]) == ("delayed", "lawa", earlier["variant"])


def test_mean_lag_column_matches_diffusers_emas(tracks_run):
    rows = rows_by(tracks_run)
    from lawa_diffusion.engine.ema import PowerEMAModel

    ema_lags, _ = brute_force_lags({"decay": 0.999, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.75}, 8)
    power_lags, _ = brute_force_lags({"sigma_rel": 0.1}, 8, PowerEMAModel)
    fast_lags, _ = brute_force_lags({"decay": 0.5, "min_decay": 0.5, "use_ema_warmup": False}, 8)
    slow_decay = 0.5 ** (1 / 3)
    slow_lags, _ = brute_force_lags({"decay": slow_decay, "min_decay": slow_decay, "use_ema_warmup": False}, 8)
    for step in (2, 4, 6, 8):
        held = [s for s in (2, 4, 6, 8) if step - 4 <= s <= step]
        assert rows[(step, "ema")]["mean_lag"] == pytest.approx(ema_lags[step], abs=1e-9)
        assert rows[(step, "slow")]["mean_lag"] == pytest.approx(slow_lags[step], abs=1e-9)
        assert rows[(step, "power")]["mean_lag"] == pytest.approx(power_lags[step], abs=1e-9)
        assert rows[(step, "raw")]["mean_lag"] == rows[(step, "lawa_raw1")]["mean_lag"] == 0
        want = sum(fast_lags[s] + step - s for s in held) / len(held)
        assert rows[(step, "lawa_fast")]["mean_lag"] == pytest.approx(want, abs=1e-9)
        assert rows[(step, "lawa_fast")]["lawa_num_snapshots"] == len(held)
        delayed = rows[(step, "lawa_fast@delayed")]
        assert delayed["mean_lag"] == pytest.approx(fast_lags[delayed["snapshot_step"]] + step - delayed["snapshot_step"])
        assert delayed["delay_steps"] == step - delayed["snapshot_step"]
        assert delayed["window_delta_lag"] == pytest.approx(want - fast_lags[step], abs=1e-9)


def test_checkpoints_hold_every_track_and_window_and_snapshots_their_track(tracks_run):
    checkpoint = os.path.join(tracks_run, "checkpoint-8")
    for folder in ("unet_ema", "unet_ema_fast", "unet_ema_fast_twin", "unet_ema_slow", "unet_ema_power", "unet_lawa",
                   "unet_lawa_lawa_fast", "unet_lawa_lawa_raw1", "lawa_state_lawa_fast.safetensors"):
        assert os.path.exists(os.path.join(checkpoint, folder)), folder
    fast = [unet_weights(os.path.join(tracks_run, f"checkpoint-{s}", "unet_ema_fast")) for s in (4, 8)]
    assert not torch.equal(fast[0]["conv_in.weight"], fast[1]["conv_in.weight"])
    assert sorted(os.listdir(os.path.join(tracks_run, "lawa_snapshots"))) == [
        f"lawa_fast-step{s:09d}.safetensors" for s in (4, 6, 8)]  # disk storage defaults inside the run folder
    assert runfolder.snapshot_tracks(tracks_run) == ["ema", "fast", "fast_twin", "power", "slow"]
    # save_ema_snapshots: every track at ν = 2 (fp16); posthoc: "power" and "slow" every 3 steps too, in float32
    assert [s for s, _ in runfolder.list_ema_snapshots(tracks_run, "fast")] == [2, 4, 6, 8]
    for track in ("power", "slow"):
        assert [s for s, _ in runfolder.list_ema_snapshots(tracks_run, track)] == [2, 3, 4, 6, 8]
    for track, cast in (("slow", torch.float32), ("fast", torch.float16), ("power", torch.float32)):
        with safe_open(runfolder.snapshot_path(tracks_run, 8, track), framework="pt") as f:
            meta = f.metadata()
            snap = f.get_tensor("conv_in.weight")
        assert meta["track"] == track and meta["step"] == "8"
        weights = unet_weights(os.path.join(tracks_run, "checkpoint-8", f"unet_ema_{track}"))["conv_in.weight"]
        assert torch.equal(snap, weights.to(cast))
        assert lag.EMATrack.from_dict(json.loads(meta["track_def"])) == tracks_mod.lag_tracks_of(
            TrainConfig.from_dict(tracks_config(tracks_run)))[track]
    with safe_open(runfolder.snapshot_path(tracks_run, 3, "power"), framework="pt") as f:
        assert lag.EMATrack.from_dict(json.loads(f.metadata()["track_def"])) == lag.power_ema(sigma_rel=0.1)


def test_resume_mid_window_with_several_tracks_is_bitwise(tracks_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    run_crashing_at(7, tracks_config(out), monkeypatch)
    run(tracks_config(out), resume="latest")  # checkpoint-4: every window half full
    assert without_timing(read_jsonl(out / "metrics.jsonl")) == without_timing(read_jsonl(os.path.join(tracks_run, "metrics.jsonl")))
    for sub in ("unet_ema", "unet_ema_fast", "unet_ema_slow", "unet_ema_power", "unet_lawa", "unet_lawa_lawa_fast",
                "unet_lawa_lawa_raw1"):
        got, want = unet_weights(out / "checkpoint-8" / sub), unet_weights(os.path.join(tracks_run, "checkpoint-8", sub))
        assert all(torch.equal(got[n], want[n]) for n in want), sub
    assert sorted(os.listdir(out / "lawa_snapshots")) == sorted(os.listdir(os.path.join(tracks_run, "lawa_snapshots")))
    for track in runfolder.snapshot_tracks(tracks_run):  # the snapshot files past checkpoint-4 were redone exactly
        got, want = runfolder.list_ema_snapshots(str(out), track), runfolder.list_ema_snapshots(tracks_run, track)
        assert [s for s, _ in got] == [s for s, _ in want], track
        for (_, a), (_, b) in zip(got, want):
            with safe_open(a, framework="pt") as fa, safe_open(b, framework="pt") as fb:
                assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys()), a
                assert all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fb.keys()), a


def test_resume_without_a_track_folder_says_which(tracks_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tracks_run, out)
    cfg = tracks_config(out, max_train_steps=10)
    cfg["ema_tracks"] = TRACKS + [{"name": "extra", "decay": 0.9}]
    with pytest.raises(ValueError, match="folder .*unet_ema_extra.* of EMA track 'extra' is missing"):
        run(cfg, resume="latest")


def test_every_extra_window_gets_a_lag_plan_line(tmp_path):
    from lawa_diffusion.training.tracks import TrackSet
    from tests.helpers import tiny_unet

    tracks = TrackSet.from_config(TrainConfig.from_dict(tracks_config(tmp_path)), tiny_unet(), "cpu")
    lines = tracks.lag_lines(8)
    assert [line.split(":")[0] for line in lines] == ["lawa_fast", "lawa_raw1"]
    assert "over constant-decay EMA 0.5" in lines[0] and "over raw weights" in lines[1] and "ΔL" in lines[0]
    tracks.close()


@pytest.mark.slow
def test_two_cpu_processes_evaluate_every_track_and_the_delayed_snapshot_on_both(tmp_path):
    """Under torchrun (snapshots on the main process only) the delayed baseline reaches the other process: its
    FID equals the track's own FID at the snapshot step, which needs both processes' samples to match."""
    out = tmp_path / "mp"
    torchrun_to_4_then_6(tracks_config(out, max_train_steps=6, checkpointing_steps=4), tmp_path)
    rows = rows_by(str(out))
    assert sorted(rows) == sorted((s, v) for s in (2, 4, 6) for v in VARIANTS)
    delayed = rows[(6, "lawa_fast@delayed")]
    assert delayed["fid"] == rows[(delayed["snapshot_step"], "fast")]["fid"]
    assert rows[(6, "lawa_raw1")]["fid"] == rows[(6, "raw")]["fid"]
    # the main process alone wrote the snapshot files, the posthoc ones included, across the resume at 4
    assert [s for s, _ in runfolder.list_ema_snapshots(str(out), "power")] == [2, 3, 4, 6]


def test_plan_takes_a_window_of_the_config(tmp_path, capsys):
    import json

    path = write_yaml(tmp_path / "c.yaml", tracks_config(tmp_path / "out"))
    assert cli.main(["plan", "--config", path, "--window", "lawa_fast", "--steps", "8", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    d = 0.5  # the track "fast": lag after its first (copying) update is Σ_{j=1..s-1} d^j
    lag = {s: sum(d ** j for j in range(1, s)) for s in (4, 6, 8)}
    assert row["snapshot_steps"] == [4, 6, 8] and row["ema_lag"] == pytest.approx(lag[8])
    assert row["lawa_lag"] == pytest.approx(sum(lag[s] + 8 - s for s in (4, 6, 8)) / 3)
    assert cli.main(["plan", "--config", path, "--window", "lawa_raw1", "--steps", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip())["lawa_lag"] == 0.0  # k=1, ν=1 over raw: the weights now
    assert cli.main(["plan", "--config", path, "--window", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope'" in err and "lawa, lawa_fast, lawa_raw1" in err
