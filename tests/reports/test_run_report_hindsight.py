"""The report's "vs the best average in hindsight": tiny synthetic metrics.jsonl and RUN/posthoc/hindsight.jsonl
files, checked against numpy/scipy computations of the best per step, the paired differences and the speed-ups."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.reports.run_report import HINDSIGHT, load_run, summarize
from lawa_diffusion.runs import folder as runfolder
from tests.helpers import ci_of as _ci
from tests.helpers import naive_ema_step as _naive_ema_step
from tests.helpers import write_tracks_run as _write_tracks_run

STEPS = [300, 600, 900]
SEARCHED = [600, 900]


@pytest.fixture(autouse=True)
def _only_this_command(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", (cli.report,))


def _write_hindsight(run, grids):
    """grids: {step: [fid per σ_rel]}; plus a refused row and a twin row at each step that must not count."""
    os.makedirs(runfolder.hindsight_dir(run), exist_ok=True)
    with open(runfolder.hindsight_path(run), "w") as f:
        for step, values in grids.items():
            for i, value in enumerate(values):
                f.write(json.dumps({"step": step, "target": f"sigma_rel={0.03 * (i + 1):g}", "kind": "sigma_rel",
                                    "sigma_rel": 0.03 * (i + 1), "refused": False, "fid": value}) + "\n")
            f.write(json.dumps({"step": step, "target": "decay=0.9999", "kind": "target", "refused": True,
                                "fid": None}) + "\n")
            f.write(json.dumps({"step": step, "target": "twin:short", "kind": "twin", "refused": False,
                                "fid": -100.0}) + "\n")


@pytest.fixture
def searched_runs(tmp_path):
    rng = np.random.default_rng(7)
    runs, grids, dirs = [], [], []
    for seed in range(3):
        base = np.array([90.0, 60.0, 45.0])
        values = {v: (base + rng.normal(0, 3, 3)).tolist() for v in ("short", "long", "ws", "ws@delayed")}
        grid = {s: (base[STEPS.index(s)] + rng.normal(-2, 3, 4)).tolist() for s in SEARCHED}
        folder = _write_tracks_run(tmp_path / "runs" / f"seed{seed}", values, STEPS)
        _write_hindsight(folder, grid)
        runs.append(values), grids.append(grid), dirs.append(folder)
    return runs, grids, dirs


def test_window_against_the_best_average_in_hindsight_matches_independent_statistics(searched_runs, tmp_path, capsys):
    runs, grids, dirs = searched_runs
    assert cli.main(["report", *dirs]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())
    ws = next(c for c in report["windows"] if c["window"] == "ws")["hindsight"]
    best = [{s: min(g[s]) for s in SEARCHED} for g in grids]  # refused and twin rows never count
    assert ws["steps"] == SEARCHED and ws["runs"] == 3
    for row in ws["per_step"]:
        i = STEPS.index(row["step"])
        diffs = [b[row["step"]] - r["ws"][i] for b, r in zip(best, runs)]
        got = row["best_minus_window"]
        assert (got["mean"], got["ci_low"], got["ci_high"]) == pytest.approx(_ci(diffs), rel=1e-9)
        assert row["best"]["mean"] == pytest.approx(np.mean([b[row["step"]] for b in best]))
    per_run = [np.mean([b[s] - r["ws"][STEPS.index(s)] for s in SEARCHED]) for b, r in zip(best, runs)]
    got = ws["vs_best"]
    assert (got["mean"], got["ci_low"], got["ci_high"]) == pytest.approx(_ci(per_run), rel=1e-9)
    speedups = []
    for b, r in zip(best, runs):
        curve = [b[s] for s in SEARCHED]
        ratios = [_naive_ema_step(SEARCHED, curve, v) / s for s, v in zip(STEPS, r["ws"])
                  if _naive_ema_step(SEARCHED, curve, v) is not None and curve[0] > v]
        if ratios:
            speedups.append(np.mean(ratios))
    assert ws["speedup"]["n"] == len(speedups)
    if len(speedups) >= 2:
        assert (ws["speedup"]["mean"], ws["speedup"]["ci_low"], ws["speedup"]["ci_high"]) == pytest.approx(
            _ci(speedups), rel=1e-9)
    line = next(line for line in out.splitlines() if line.startswith("ws vs the best average in hindsight: "))
    assert f"{got['mean']:.2f} [{got['ci_low']:.2f}, {got['ci_high']:.2f}] FID, " in line
    expected = "beats it" if got["ci_low"] > 0 else "trails it" if got["ci_high"] < 0 else "no clear difference"
    assert line.split("FID, ")[1].startswith(expected) and "steps 600, 900" in line
    assert report["curves"][HINDSIGHT]["steps"] == SEARCHED


def test_runs_without_hindsight_results_have_no_such_line(tmp_path, capsys):
    values = {v: [80.0 - i, 50.0 - i, 40.0 - i] for i, v in enumerate(("short", "long", "ws", "ws@delayed"))}
    run = _write_tracks_run(tmp_path / "run", values, STEPS)
    summary = summarize([load_run(run)])
    assert all(c["hindsight"] is None for c in summary["windows"]) and HINDSIGHT not in summary["curves"]
    assert cli.main(["report", run]) == 0
    assert "best average in hindsight" not in capsys.readouterr().out
    _write_hindsight(run, {900: [38.5, 37.0]})
    ws = next(c for c in summarize([load_run(run)])["windows"] if c["window"] == "ws")["hindsight"]
    assert ws["steps"] == [900] and ws["vs_best"]["mean"] == pytest.approx(37.0 - 38.0)
