"""Matched-lag comparison on synthetic metrics rows with known answers."""
from __future__ import annotations

import math

import pytest
from scipy import stats

from lawa_diffusion import LAWAConfig, compare, lag

TRACK = lag.EMATrack(decay=0.9999, use_ema_warmup=True, power=0.75)
WINDOW = LAWAConfig(k=5, every_n_steps=50)
EVAL_STEPS = [250, 500, 750, 1000]
GAINS = [1.0, 2.0, 3.0]  # per seed: how much lower LAWA's FID is than the delayed EMA's


def ema_fid(step: int, seed: int) -> float:
    return 100.0 * math.exp(-step / 300.0) + 10.0 + 0.1 * seed


def synthetic_run(seed: int, lags: dict) -> list:
    """EMA evaluated at every snapshot step; LAWA = the EMA at the nearest snapshot to t − ΔL, minus a gain;
    a matched-lag EMA 0.5 worse than LAWA."""
    rows = [{"step": s, "variant": "ema", "fid": ema_fid(s, seed)} for s in range(50, 1001, 50)]
    for t in EVAL_STEPS:
        dl = lags["lawa"][t] - lags["ema"][t]
        nearest = 50 * round((t - dl) / 50)
        lawa = ema_fid(nearest, seed) - GAINS[seed]
        rows += [{"step": t, "variant": "lawa", "fid": lawa, "kid_mean": None},
                 {"step": t, "variant": "ema_matched", "fid": lawa + 0.5 + 0.1 * seed}]
    rows.append({"step": 1000, "variant": "lawa", "kid_mean": 0.1})  # no fid: ignored
    return rows


@pytest.fixture(scope="module")
def lags():
    return compare.variant_lags({"ema": (TRACK, None), "lawa": (TRACK, WINDOW)}, EVAL_STEPS)


def test_variant_lags_are_the_plan_rows(lags):
    for row in lag.plan_rows(TRACK, WINDOW, EVAL_STEPS):
        assert lags["ema"][row["step"]] == pytest.approx(row["ema_lag"], abs=1e-12)
        assert lags["lawa"][row["step"]] - lags["ema"][row["step"]] == pytest.approx(row["extra_lag"], abs=1e-12)
    early = compare.variant_lags({"lawa": (TRACK, LAWAConfig(k=2, every_n_steps=300))}, [250, 600])
    assert list(early["lawa"]) == [600]


def test_delayed_pairs_take_the_snapshot_nearest_t_minus_extra_lag(lags):
    run = compare.curves(synthetic_run(0, lags))
    extra = {t: lags["lawa"][t] - lags["ema"][t] for t in EVAL_STEPS}
    pairs = compare.delayed_pairs(run["ema"], run["lawa"], extra)
    # ΔL = 81.8, 85.2, 86.7, 87.6 at 250..1000: t − ΔL = 168.2, 414.8, 663.3, 912.4
    assert [p["delayed_step"] for p in pairs] == [150, 400, 650, 900]
    assert [p["gain"] for p in pairs] == pytest.approx([GAINS[0]] * 4, abs=1e-12)
    assert compare.delayed_pairs(run["ema"], run["lawa"], extra, tolerance=12.0) == []
    assert compare.nearest_step([100, 200], 150) == 100


def test_compare_over_seeds_gives_student_t_intervals(lags):
    runs = [compare.curves(synthetic_run(seed, lags)) for seed in range(3)]
    rows = compare.compare(runs, "lawa", "ema", lags, matched_variant="ema_matched")
    assert [r["step"] for r in rows] == EVAL_STEPS
    half = stats.t.ppf(0.975, 2) * stats.tstd(GAINS) / math.sqrt(3)
    for row in rows:
        assert row["vs_delayed"]["n"] == 3
        assert row["vs_delayed"]["mean"] == pytest.approx(2.0, abs=1e-12)
        assert row["vs_delayed"]["ci_low"] == pytest.approx(2.0 - half, abs=1e-6)
        assert row["vs_delayed"]["ci_high"] == pytest.approx(2.0 + half, abs=1e-6)
        assert row["vs_matched"]["mean"] == pytest.approx(0.6, abs=1e-12)
    line = compare.verdict_line(rows[-1])
    assert line.startswith("lawa at step 1000: beats the delayed EMA by 2.00 "
                           f"[{2 - half:.2f}, {2 + half:.2f}] FID (ema 88 steps earlier)")
    assert "vs the matched-lag EMA: +0.60 [" in line and "n = 3 run(s)" in line


def test_verdict_says_trails_and_missing_baselines(lags):
    runs = [compare.curves(synthetic_run(0, lags))]
    for row in runs[0]["lawa"]:
        runs[0]["lawa"][row] += 5.0  # now 4 FID worse than the delayed EMA
    rows = compare.compare(runs, "lawa", "ema", lags)
    line = compare.verdict_line(rows[0])
    assert "trails the delayed EMA by 4.00 FID" in line and "no matched-lag EMA in the run" in line
    with pytest.raises(ValueError, match="mean lag of variant 'lawa_raw'"):
        compare.compare(runs, "lawa_raw", "ema", lags)
