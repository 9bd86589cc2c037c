"""``lawa-diffusion plan``: σ_rel beside every lag, power-function EMAs, --min-decay, and an explicit decay rule,
against diffusers' EMAModel and a step-by-step float64 power EMA fed one-hot impulses."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel

from lawa_diffusion.cli.entry import main
from lawa_diffusion.maths import lag
from tests.helpers import stepwise_power_ema


def _rows(capsys, argv):
    assert main(["plan", *argv, "--json"]) == 0
    return {r["step"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}


def _spread(w: np.ndarray) -> float:
    t = len(w) - 1
    ages = t - np.arange(t + 1)
    lag_ = float(w @ ages)
    return math.sqrt(float(w @ (ages - lag_) ** 2))


def emamodel_profile(steps: int, **kwargs) -> np.ndarray:
    theta = torch.nn.Parameter(torch.zeros(steps + 1, dtype=torch.float64))
    theta.data[0] = 1.0
    ema = EMAModel([theta], **kwargs)
    for n in range(1, steps + 1):
        theta.data.zero_()
        theta.data[n] = 1.0
        ema.step([theta])
    return ema.shadow_params[0].detach().numpy().copy()


def test_power_ema_rows_give_sigma_rel_beside_the_lag(capsys):
    rows = _rows(capsys, ["--sigma-rel", "0.1", "--k", "3", "--nu", "40", "--steps", "120,400"])
    stepwise = stepwise_power_ema(lag.gamma_of_sigma_rel(0.1), 0, 400)
    for t, row in rows.items():
        ema = stepwise[t]
        assert row["ema_sigma_rel"] == pytest.approx(_spread(ema) / t, abs=1e-9)
        lawa = sum(np.pad(stepwise[s], (0, t - s)) for s in row["snapshot_steps"]) / len(row["snapshot_steps"])
        assert row["lawa_sigma_rel"] == pytest.approx(_spread(lawa) / t, abs=1e-9)
        assert row["decay_rule"] == "power" and row["track_def"]["gamma"] == pytest.approx(lag.gamma_of_sigma_rel(0.1))
    assert rows[400]["ema_sigma_rel"] == pytest.approx(0.1, rel=0.03)  # the continuous σ_rel, nearly, by step 400
    assert main(["plan", "--gamma", "6.94", "--k", "3", "--nu", "40", "--steps", "400"]) == 0
    table = capsys.readouterr().out
    assert "power-function EMA σ_rel 0.09997 (γ 6.94)" in table and table.count("σ_rel") >= 3


def test_min_decay_and_no_warmup_follow_emamodel(capsys):
    rows = _rows(capsys, ["--max-decay", "0.999", "--min-decay", "0.95", "--no-warmup", "--nu", "50",
                          "--steps", "300"])
    w = emamodel_profile(300, decay=0.999, min_decay=0.95, use_ema_warmup=False)
    assert rows[300]["ema_lag"] == pytest.approx(float(w @ (300 - np.arange(301))), abs=1e-9)
    assert rows[300]["ema_sigma_rel"] == pytest.approx(_spread(w) / 300, abs=1e-9)
    assert rows[300]["decay_rule"] == "no-warmup" and rows[300]["track_def"]["min_decay"] == 0.95


def test_max_decay_alone_says_which_rule_it_plans(capsys):
    # The default training config warms up: --max-decay alone plans the warm-up rule, and says so.
    assert main(["plan", "--max-decay", "0.999", "--nu", "50", "--steps", "300"]) == 0
    out = capsys.readouterr().out
    assert "decay rule: warm-up 1-(1+s/1)^-0.75 capped at 0.999, from the default training config" in out
    assert "--no-warmup plans diffusers' (1+s)/(10+s) rule instead" in out
    warm = _rows(capsys, ["--max-decay", "0.999", "--nu", "50", "--steps", "300"])[300]
    w = emamodel_profile(300, decay=0.999, use_ema_warmup=True, power=0.75)
    assert warm["ema_lag"] == pytest.approx(float(w @ (300 - np.arange(301))), abs=1e-9)
    plain = _rows(capsys, ["--max-decay", "0.999", "--no-warmup", "--nu", "50", "--steps", "300"])[300]
    assert plain["ema_lag"] != pytest.approx(warm["ema_lag"], rel=0.05)
    assert main(["plan", "--max-decay", "0.999", "--warmup", "--nu", "50", "--steps", "300"]) == 0
    assert "decay rule:" not in capsys.readouterr().out  # chosen by a flag: nothing to say


@pytest.mark.parametrize("argv, words", [
    (["--sigma-rel", "0.3"], "sigma_rel must be > 0 and < 0.2887"),
    (["--sigma-rel", "0"], "sigma_rel must be > 0 and < 0.2887"),
    (["--gamma", "-1"], "gamma must be > 0"),
    (["--sigma-rel", "0.05", "--max-decay", "0.9"], "plan --max-decay applies to diffusers' EMA, not to a power"),
    (["--no-warmup", "--power", "0.75"], "plan --power shapes the warm-up rule, which --no-warmup turns off"),
    (["--decay", "0.9", "--min-decay", "0.5"], "plan --min-decay applies to diffusers' EMA"),
    (["--min-decay", "1.5"], "ema min_decay must be between 0 and 1"),
])
def test_plan_flags_bad_input_one_line_exit_2(capsys, argv, words):
    assert main(["plan", *argv, "--steps", "1000"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
