"""Lag maths against brute-force runs of diffusers' real EMAModel and the real LAWA engine on impulses."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel

from lawa_diffusion import LAWA, LAWAConfig
from lawa_diffusion.cli.entry import main
from lawa_diffusion.maths import lag

TRACKS = {
    "warmup-3/4": lag.EMATrack(decay=0.9999, use_ema_warmup=True, power=0.75),
    "warmup-2/3-delayed-floor": lag.EMATrack(decay=0.995, use_ema_warmup=True, power=2 / 3, inv_gamma=2.0,
                                             update_after_step=3, min_decay=0.5),
    "no-warmup-rule": lag.EMATrack(decay=0.97),
    "constant": lag.constant_ema(0.95),
    "half-life": lag.half_life_ema(20.0),
    "raw": lag.raw_weights(),
}
WINDOWS = {"k5-nu50": LAWAConfig(k=5, every_n_steps=50, storage="device"),
           "k3-nu7-start10": LAWAConfig(k=3, every_n_steps=7, start_step=10, storage="device"),
           "k4-nu6-start0": LAWAConfig(k=4, every_n_steps=6, storage="device")}


def brute_force(track: lag.EMATrack, window: LAWAConfig, steps: int):
    """Profiles after every step from impulses: θ_s is the one-hot vector e_s, so the EMA *is* its profile.

    Returns {t: EMA weights on θ_0..θ_t} and {t: LAWA weights} (LAWA: the real engine on the EMA's shadow).
    """
    theta = torch.nn.Parameter(torch.zeros(steps + 1, dtype=torch.float64))
    theta.data[0] = 1.0
    ema = EMAModel([theta], **track.ema_kwargs())
    engine = LAWA(ema, window)
    emas, lawas = {}, {}
    for t in range(1, steps + 1):
        theta.data.zero_()
        theta.data[t] = 1.0
        ema.step([theta])
        engine.step(ema.optimization_step)
        emas[t] = ema.shadow_params[0].detach().numpy()[: t + 1].copy()
        if engine.num_snapshots:
            lawas[t] = engine.average_flat().numpy()[: t + 1].copy()
    return emas, lawas


def naive_lag(w: np.ndarray) -> float:
    t = len(w) - 1
    return sum(float(w[s]) * (t - s) for s in range(t + 1))


@pytest.mark.parametrize("track", TRACKS.values(), ids=TRACKS.keys())
@pytest.mark.parametrize("window", WINDOWS.values(), ids=WINDOWS.keys())
def test_profiles_match_emamodel_and_lawa_engine(track, window):
    emas, lawas = brute_force(track, window, 160)
    d = lag.decays(track, 160)
    for t, expected in emas.items():
        assert np.max(np.abs(lag.profile(track, t, d) - expected)) <= 1e-9, t
        assert np.max(np.abs(lag.profile(track, t) - expected)) <= 1e-9, t
    assert lawas, "the window never snapshotted"
    for t, expected in lawas.items():
        assert np.max(np.abs(lag.lawa_profile(track, window, t, d) - expected)) <= 1e-9, t
    first = min(lawas)
    assert lag.first_snapshot(window) == first
    for t in range(1, first):
        with pytest.raises(ValueError, match="before LAWA's first snapshot"):
            lag.lawa_profile(track, window, t)


def test_snapshot_steps_match_the_engine():
    window = WINDOWS["k3-nu7-start10"]
    engine = LAWA([torch.zeros(1)], window)
    for t in range(1, 80):
        engine.step(t)
        assert lag.snapshot_steps(window, t) == engine.snapshot_steps


def test_profile_weights_sum_to_one_and_diffusers_decay():
    track = TRACKS["warmup-2/3-delayed-floor"]
    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], **track.ema_kwargs())
    d = lag.decays(track, 300)
    assert [ema.get_decay(n) for n in range(1, 301)] == pytest.approx(d[1:].tolist(), abs=1e-15)
    for t in (0, 1, 5, 299):
        assert lag.profile(track, t).sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("decay", [0.9, 0.99, 0.9727])
def test_constant_decay_long_run_lag_window_and_correlation(decay):
    t = int(40 / (1 - decay))  # d**t < 1e-17: the long-run limit
    w = lag.profile(lag.constant_ema(decay), t)
    assert lag.mean_lag(w) == pytest.approx(decay / (1 - decay), abs=1e-9)
    assert lag.window_of(w) == pytest.approx(1 / (1 - decay), abs=1e-9)
    assert lag.spread(w) == pytest.approx(math.sqrt(decay) / (1 - decay), abs=1e-8)
    nu = 13
    assert lag.correlation(lag.profile(lag.constant_ema(decay), t - nu), w) == pytest.approx(decay ** nu, abs=1e-9)
    assert lag.matched_decay(lag.mean_lag(w)) == pytest.approx(decay, abs=1e-12)
    assert lag.half_life_of(lag.half_life_ema(37.0).decay) == pytest.approx(37.0)


def test_plan_row_against_brute_force():
    track, window = TRACKS["warmup-3/4"], WINDOWS["k5-nu50"]
    emas, lawas = brute_force(track, window, 300)
    for t in (50, 120, 300):
        row = lag.plan_row(track, window, t)
        ema, avg = emas[t], lawas[t]
        assert row["ema_lag"] == pytest.approx(naive_lag(ema), abs=1e-9)
        assert row["extra_lag"] == pytest.approx(naive_lag(avg) - naive_lag(ema), abs=1e-9)
        assert row["variance_ratio"] == pytest.approx(float((avg ** 2).sum() / (ema ** 2).sum()), rel=1e-9)
        steps = row["snapshot_steps"]
        if len(steps) > 1:
            a, b = emas[steps[-2]], emas[steps[-1]]
            a = np.pad(a, (0, len(b) - len(a)))
            expected = float(a @ b / math.sqrt((a @ a) * (b @ b)))
            assert row["snapshot_correlation"] == pytest.approx(expected, abs=1e-9)
        assert row["nu_below_window"] == (window.every_n_steps < row["ema_window"])


def test_plan_json_from_config_matches_brute_force(capsys):
    code = main(["plan", "--config", "configs/fashion_mnist_cpu.yaml", "--steps", "250,500,750,1000", "--json"])
    out = capsys.readouterr()
    assert code == 0
    rows = {r["step"]: r for r in map(json.loads, out.out.splitlines())}
    assert {250, 500, 750, 1000} <= set(rows)
    from lawa_diffusion.config.train import load_train_config

    cfg = load_train_config("configs/fashion_mnist_cpu.yaml")
    track = lag.EMATrack(decay=cfg.ema.decay, use_ema_warmup=cfg.ema.use_ema_warmup, inv_gamma=cfg.ema.inv_gamma,
                         power=cfg.ema.power, update_after_step=cfg.ema.update_after_step)
    window = LAWAConfig(k=cfg.lawa.k, every_n_steps=cfg.lawa.every_n_steps, start_step=cfg.lawa.start_step,
                        storage="device")
    emas, lawas = brute_force(track, window, 1000)
    for t in (250, 500, 750, 1000):
        brute = naive_lag(lawas[t]) - naive_lag(emas[t])
        assert abs(rows[t]["extra_lag"] - brute) <= 1.0, (t, rows[t]["extra_lag"], brute)
    assert "LAWA ≈ the EMA delayed by 88 steps: expect to lose about 88 steps" in out.err


def test_plan_table_names_the_matched_lag_baseline(capsys):
    assert main(["plan", "--half-life", "50", "--k", "5", "--nu", "100", "--steps", "2000"]) == 0
    out = capsys.readouterr()
    assert "matched-lag baseline = constant-decay EMA 0.99633" in out.out
    assert "delayed" not in out.err  # ν = 100 is above a half-life-50 EMA's window (72.6 steps)


@pytest.mark.parametrize("argv, words", [
    (["--decay", "1.0"], "ema decay must be >= 0 and < 1, got 1.0"),
    (["--decay", "-0.1"], "ema decay must be >= 0 and < 1, got -0.1"),
    (["--half-life", "0"], "ema half-life must be > 0 steps, got 0.0"),
    (["--half-life", "-5"], "ema half-life must be > 0 steps"),
    (["--nu", "50", "--steps", "10,100"], "plan step 10 comes before LAWA's first snapshot at step 50"),
    (["--start", "300", "--nu", "100", "--steps", "250"], "plan step 250 comes before LAWA's first snapshot at step 300"),
    (["--steps", "a"], "plan --steps must be comma-separated integers"),
    (["--k", "0", "--steps", "100"], "lawa k must be >= 1, got 0"),
    (["--decay", "0.9", "--power", "0.5"], "plan --power applies to diffusers' EMA"),
])
def test_plan_bad_input_one_line_exit_2(capsys, argv, words):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert words in err
    assert len(err.strip().splitlines()) == 1


def test_summary_line():
    track, window = TRACKS["warmup-3/4"], WINDOWS["k5-nu50"]
    line = lag.summary_line(track, window, 1000)
    assert "\n" not in line and "ΔL +88" in line and "expect to lose about 88 steps" in line
    assert "no LAWA average by step 20" in lag.summary_line(track, window, 20)
    quiet = lag.summary_line(lag.half_life_ema(50), LAWAConfig(k=5, every_n_steps=100), 2000)
    assert "delayed" not in quiet and "ΔL +200" in quiet


def test_record_writes_lag_json_and_says_the_summary(tmp_path, capsys):
    from lawa_diffusion.config.train import load_train_config
    from lawa_diffusion.reports import lag_plan as plan

    cfg = load_train_config("configs/fashion_mnist_cpu.yaml", ["lawa.every_n_steps=100", "max_train_steps=600",
                                                                "eval.every_n_steps=250"])
    line = plan.record(str(tmp_path), cfg)
    saved = json.loads((tmp_path / plan.LAG_NAME).read_text())
    assert saved["summary"] == line
    assert f"train: {line}" in capsys.readouterr().err
    assert [r["step"] for r in saved["rows"]] == [250, 500, 600]
    emas, lawas = brute_force(lag.EMATrack.from_settings(cfg.ema), LAWAConfig(k=5, every_n_steps=100, storage="device"), 600)
    assert saved["rows"][-1]["lawa_lag"] == pytest.approx(naive_lag(lawas[600]), abs=1e-9)
    assert saved["rows"][-1]["snapshot_steps"] == [200, 300, 400, 500, 600]
