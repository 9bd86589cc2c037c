import json
import math
import os

import numpy as np
import pytest
from scipy import stats

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.reports.run_report import (
    Curve,
    format_table,
    load_run,
    mean_ci,
    reach_final,
    speedups,
    steps_to_reach,
    summarize,
    t_quantile,
)
from tests.helpers import KINDS, ci_of, naive_ema_step, one_line_error, write_tracks_run


@pytest.fixture(autouse=True)
def _only_this_command(monkeypatch):
    # The CLI under test is this module's subcommand(s) alone, whatever state the other commands are in.
    monkeypatch.setattr(cli, "COMMAND_MODULES", (cli.report,))


# ----------------------------------------------------------------------------- hand-computed curves
def test_steps_to_reach_interpolates_between_points():
    steps, values = [100, 200, 300], [50.0, 30.0, 20.0]
    assert steps_to_reach(steps, values, 40.0) == pytest.approx(150.0)  # halfway from 50 to 30
    assert steps_to_reach(steps, values, 30.0) == pytest.approx(200.0)  # exactly a point
    assert steps_to_reach(steps, values, 22.0) == pytest.approx(280.0)  # 200 + 8/10 of 100


def test_steps_to_reach_first_point_and_never():
    steps, values = [100, 200, 300], [50.0, 30.0, 20.0]
    assert steps_to_reach(steps, values, 60.0) == 100.0
    assert steps_to_reach(steps, values, 19.9) is None


def test_steps_to_reach_takes_the_first_crossing_of_a_noisy_curve():
    # 50 -> 30 crosses 32 at 100 + 18/20 * 100 = 190, before the later dip below 32 at step 400.
    assert steps_to_reach([100, 200, 300, 400], [50.0, 30.0, 35.0, 20.0], 32.0) == pytest.approx(190.0)


def test_speedups_against_hand_computed_values():
    ema = Curve([1000, 2000, 3000, 4000], [100.0, 60.0, 40.0, 30.0])
    lawa = Curve([1000, 2000, 3000, 4000], [70.0, 45.0, 28.0, 25.0])
    rows = speedups(ema, lawa)
    # 70: EMA goes 100 -> 60 over 1000..2000, reaches 70 at 1750; 45: 60 -> 40 over 2000..3000, at 2750.
    assert [r["ema_step"] for r in rows[:2]] == [pytest.approx(1750.0), pytest.approx(2750.0)]
    assert [r["speedup"] for r in rows[:2]] == [pytest.approx(1.75), pytest.approx(2750 / 2000)]
    # EMA's best is 30: LAWA's 28 and 25 are never reached by EMA.
    assert [(r["reached"], r["speedup"], r["ema_step"]) for r in rows[2:]] == [(False, None, None)] * 2
    final = reach_final(ema, lawa)
    # LAWA goes 45 -> 28 over 2000..3000 and reaches EMA's final 30 at 2000 + 15/17 * 1000.
    assert final["lawa_step"] == pytest.approx(2000 + 15 / 17 * 1000)
    assert final["fraction"] == pytest.approx((2000 + 15 / 17 * 1000) / 4000)


def test_lawa_that_never_reaches_ema_final_value():
    final = reach_final(Curve([1, 2], [10.0, 5.0]), Curve([1, 2], [9.0, 6.0]))
    assert final["lawa_step"] is None and final["fraction"] is None


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 29, 30, 31, 100, 1000])
@pytest.mark.parametrize("p", [0.9, 0.975, 0.995])
def test_t_quantile_matches_scipy(df, p):
    assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_mean_ci_matches_scipy_interval():
    xs = [1.3, 1.9, 1.1, 1.6]
    got = mean_ci(xs, 0.95)
    low, high = stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))
    assert (got["mean"], got["ci_low"], got["ci_high"]) == pytest.approx((np.mean(xs), low, high), rel=1e-9)
    assert mean_ci([2.0])["ci_low"] is None and mean_ci([])["mean"] is None


# ----------------------------------------------------------------------------- run folders
def _write_run(folder, curves, extra_lines=()):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for variant, (steps, values) in curves.items():
            for step, value in zip(steps, values):
                f.write(json.dumps({"step": step, "variant": variant, "fid": value, "kid_mean": value / 1000,
                                    "kid_std": 0.001, "num_samples": 16, "inception_sha256": "x", "lawa_k": 3,
                                    "lawa_every_n_steps": 10, "lawa_num_snapshots": 3}) + "\n")
        for line in extra_lines:
            f.write(line)
    return str(folder)


def _random_run(rng, steps):
    base = 200.0 * np.exp(-np.asarray(steps) / 300.0) + 20.0
    ema = base + rng.normal(0, 2.0, len(steps))
    lawa = base * rng.uniform(0.7, 0.95) + rng.normal(0, 2.0, len(steps))
    raw = base + 15 + rng.normal(0, 2.0, len(steps))
    return {"raw": (steps, raw.tolist()), "ema": (steps, ema.tolist()), "lawa": (steps, lawa.tolist())}


def test_report_of_several_runs_matches_independent_statistics(tmp_path, capsys):
    rng = np.random.default_rng(0)
    steps = [100, 200, 300, 400, 500, 600]
    runs = [_random_run(rng, steps) for _ in range(3)]
    dirs = [_write_run(tmp_path / "runs" / f"seed{i}", r) for i, r in enumerate(runs)]
    assert cli.main(["report", *dirs]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())
    assert (tmp_path / "runs" / "report" / "report-fid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in report["per_step"]:
        ratios = []
        for r in runs:
            lawa_value = r["lawa"][1][steps.index(row["step"])]
            ema_step = naive_ema_step(*r["ema"], lawa_value)
            if ema_step is not None:
                ratios.append(ema_step / row["step"])
        assert row["n_never"] == 3 - len(ratios)
        assert row["speedup"]["n"] == len(ratios)
        if len(ratios) >= 2:
            low, high = stats.t.interval(0.95, len(ratios) - 1, loc=np.mean(ratios), scale=stats.sem(ratios))
            assert (row["speedup"]["mean"], row["speedup"]["ci_low"], row["speedup"]["ci_high"]) == pytest.approx(
                (np.mean(ratios), low, high), rel=1e-9)
    finals = [_naive_lawa_final(r) for r in runs]
    reached = [f for f in finals if f is not None]
    assert report["reach_final"]["n_never"] == 3 - len(reached)
    if reached:
        assert report["reach_final"]["lawa_step"]["mean"] == pytest.approx(np.mean(reached))
        assert report["reach_final"]["fraction"]["mean"] == pytest.approx(np.mean(reached) / steps[-1])
    assert "LAWA reaches EMA's final fid" in out or "LAWA never reaches" in out
    assert str(tmp_path / "runs" / "report" / "report.json") in out
    ema_means = [np.mean([r["ema"][1][i] for r in runs]) for i in range(len(steps))]
    assert report["curves"]["ema"]["mean"] == pytest.approx(ema_means)


def _naive_lawa_final(run):
    steps, lawa = run["lawa"]
    return naive_ema_step(steps, lawa, run["ema"][1][-1])


def test_repeated_step_keeps_last_row_and_torn_line_is_skipped(tmp_path):
    folder = _write_run(tmp_path / "run", {"ema": ([1, 2], [9.0, 5.0]), "lawa": ([1, 2, 1], [8.0, 4.0, 7.0])},
                        extra_lines=['{"step": 3, "variant": "ema", "fi'])
    run = load_run(folder)
    assert run.curves["lawa"] == Curve([1, 2], [7.0, 4.0])
    assert run.curves["ema"] == Curve([1, 2], [9.0, 5.0])


def test_kid_metric_and_json_output(tmp_path, capsys):
    folder = _write_run(tmp_path / "run", {"ema": ([10, 20], [9.0, 5.0]), "lawa": ([10, 20], [6.0, 4.0])})
    assert cli.main(["report", folder, "--metric", "kid_mean", "--json", "-o", str(tmp_path / "out")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["metric"] == "kid_mean"
    # kid 0.006 at step 10: EMA goes 0.009 -> 0.005 over 10..20 and reaches it at 17.5.
    assert printed["per_step"][0]["speedup"]["mean"] == pytest.approx(1.75)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["per_step"] == printed["per_step"]


def test_errors_are_one_clear_line(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no metrics.jsonl" in one_line_error(capsys, ["report", str(empty)])
    assert "does not exist" in one_line_error(capsys, ["report", str(tmp_path / "missing")])
    (empty / "metrics.jsonl").write_text("")
    assert "no fid values" in one_line_error(capsys, ["report", str(empty)])
    good = _write_run(tmp_path / "good", {"ema": ([1, 2], [9.0, 5.0]), "lawa": ([1, 2], [8.0, 4.0])})
    assert "--metric must be one of" in one_line_error(capsys, ["report", good, "--metric", "is"])
    only_ema = _write_run(tmp_path / "only_ema", {"ema": ([1, 2], [9.0, 5.0])})
    assert "no 'lawa' evaluations" in one_line_error(capsys, ["report", only_ema])


def test_a_folder_report_did_not_write_is_never_written_into(tmp_path, capsys):
    good = _write_run(tmp_path / "good", {"ema": ([1, 2], [9.0, 5.0]), "lawa": ([1, 2], [8.0, 4.0])})
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"mine": true}')
    for extra in ([], ["--overwrite"]):
        assert "not written by lawa-diffusion" in one_line_error(capsys, ["report", good, "-o", str(out), *extra])
    assert json.loads((out / "report.json").read_text()) == {"mine": True}
    fresh = tmp_path / "fresh"
    assert cli.main(["report", good, "-o", str(fresh)]) == 0
    assert cli.main(["report", good, "-o", str(fresh)]) == 0  # a previous report is simply refreshed


def test_summarize_single_run_has_no_interval(tmp_path):
    run = load_run(_write_run(tmp_path / "r", {"ema": ([1, 2], [9.0, 5.0]), "lawa": ([1, 2], [8.0, 4.0])}))
    summary = summarize([run])
    assert summary["per_step"][0]["speedup"]["ci_low"] is None
    assert math.isclose(summary["per_step"][0]["speedup"]["mean"], 1.25)  # 9 -> 5 over 1..2 reaches 8 at 1.25


def test_speedup_is_flagged_as_upper_bound_when_ema_starts_better():
    from lawa_diffusion.reports.run_report import Curve, speedups

    ema = Curve([100, 200, 300], [50.0, 40.0, 30.0])
    lawa = Curve([100, 200, 300], [60.0, 45.0, 29.0])
    rows = speedups(ema, lawa)
    # LAWA 60 at step 100: EMA's first value (50) is already better, so 100/100 only bounds the speed-up
    assert rows[0]["upper_bound"] and rows[0]["speedup"] == 1.0
    # LAWA 45 at step 200: EMA crosses 45 between 100 (50) and 200 (40) at 150 -> 0.75, a real value
    assert not rows[1]["upper_bound"] and abs(rows[1]["speedup"] - 0.75) < 1e-12
    assert not rows[2]["reached"] and not rows[2]["upper_bound"]


def test_mean_speedup_leaves_upper_bounds_out(tmp_path):
    curves = {"ema": ([100, 200, 300], [50.0, 40.0, 30.0]), "lawa": ([100, 200, 300], [60.0, 45.0, 35.0])}
    summary = summarize([load_run(_write_run(tmp_path / "r", curves))])
    # step 100 is only a bound (1.0); 45 is reached by EMA at 150 (0.75), 35 at 250 (250/300)
    assert summary["runs"][0]["mean_speedup_points"] == 2
    assert math.isclose(summary["mean_speedup"]["mean"], (0.75 + 250 / 300) / 2)
    assert "(1 upper bound(s) left out)" in format_table(summary)
    only_bound = {"ema": ([100, 200], [50.0, 40.0]), "lawa": ([100, 200], [60.0, 20.0])}
    summary = summarize([load_run(_write_run(tmp_path / "b", only_bound))])
    assert summary["mean_speedup"]["n"] == 0 and "left out): n/a" in format_table(summary)


def test_windows_against_delayed_and_matched_lag_emas(tmp_path, capsys):
    rng = np.random.default_rng(1)
    steps = [300, 600, 900]
    runs = []
    for seed in range(3):
        base = np.array([90.0, 60.0, 45.0])
        runs.append({v: (base + rng.normal(0, 3, 3) + (8 if v == "short" else 0)).tolist() for v in KINDS})
    dirs = [write_tracks_run(tmp_path / "runs" / f"seed{i}", r, steps) for i, r in enumerate(runs)]
    assert cli.main(["report", *dirs]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "report" / "report.json").read_text())
    assert (tmp_path / "runs" / "report" / "report-fid-lag.png").read_bytes()[:4] == b"\x89PNG"
    windows = {c["window"]: c for c in report["windows"]}
    assert set(windows) == {"lawa", "ws"}
    ws, lawa = windows["ws"], windows["lawa"]
    # matched lag: long (136 x 1.02) is within 15% of ws (143 x 1.02); nothing is near lawa's 190
    assert ws["matched"]["track"] == "long" and lawa["matched"] is None
    assert ws["matched"]["mean_lag"] == pytest.approx(136.0 * 1.02)
    for baseline, key in (("ws@delayed", "vs_delayed"), ("long", "vs_matched")):
        per_run = [np.mean([r[baseline][i] - r["ws"][i] for i in range(3)]) for r in runs]
        got = ws[key]
        assert (got["mean"], got["ci_low"], got["ci_high"]) == pytest.approx(ci_of(per_run), rel=1e-9)
        i = 1
        at_600 = ws["per_step"][i]["delayed_minus_window" if key == "vs_delayed" else "matched_minus_window"]
        assert (at_600["mean"], at_600["ci_low"], at_600["ci_high"]) == pytest.approx(
            ci_of([r[baseline][i] - r["ws"][i] for r in runs]), rel=1e-9)
    assert lawa["vs_matched"]["n"] == 0
    for track in ("ema", "short", "long"):
        per_run = []
        for r in runs:
            ratios = [naive_ema_step(steps, r[track], v) / s for s, v in zip(steps, r["ws"])
                      if naive_ema_step(steps, r[track], v) is not None and r[track][0] > v]
            if ratios:
                per_run.append(np.mean(ratios))
        got = ws["speedup"][track]
        assert got["n"] == len(per_run)
        if len(per_run) >= 2:
            assert (got["mean"], got["ci_low"], got["ci_high"]) == pytest.approx(ci_of(per_run), rel=1e-9)
    mean, low, high = ws["vs_delayed"]["mean"], ws["vs_delayed"]["ci_low"], ws["vs_delayed"]["ci_high"]
    line = next(line for line in out.splitlines() if line.startswith("verdict: ws "))
    assert f"ws vs the delayed EMA: {mean:.2f} [{low:.2f}, {high:.2f}] FID, " in line
    expected = "beats it" if low > 0 else "trails it" if high < 0 else "no clear difference"
    assert line.split("FID, ")[1].startswith(expected)
    assert "vs the matched-lag EMA (long): " in line
    assert "verdict: lawa vs the delayed EMA: " in out and "no EMA track within 15% of its mean lag" in out
    points = {p["step"]: p["variants"] for p in report["lag_points"]}
    assert points[900]["long"]["mean_lag"] == pytest.approx(136.0 * 1.02)
    assert points[900]["lawa"]["value"] == pytest.approx(np.mean([r["lawa"][2] for r in runs]))


def test_old_metrics_rows_are_ema_and_lawa_over_ema(tmp_path):
    run = load_run(_write_run(tmp_path / "old", _random_run(np.random.default_rng(2), [100, 200])))
    assert run.kinds == {"raw": {"kind": "raw", "over": None}, "ema": {"kind": "ema", "over": None},
                         "lawa": {"kind": "lawa", "over": "ema"}}
    summary = summarize([run])
    assert [c["window"] for c in summary["windows"]] == ["lawa"] and summary["windows"][0]["matched"] is None
    assert summary["lag_points"] == [] and "no delayed baseline evaluated" in format_table(summary)


def test_a_run_without_the_ema_lawa_pair_reports_its_windows(tmp_path, capsys):
    values = {v: [80.0 - i, 50.0 - i, 40.0 - i] for i, v in enumerate(("short", "long", "ws", "ws@delayed"))}
    run = write_tracks_run(tmp_path / "run", values, [300, 600, 900])
    assert cli.main(["report", run]) == 0
    out = capsys.readouterr().out
    assert "ema and lawa were not both evaluated" in out
    assert ("verdict: ws vs the delayed EMA: -1.00 FID, behind (one run, no CI); "
            "vs the matched-lag EMA (long): 1.00, ahead (one run, no CI)") in out


def test_one_run_with_no_difference_reads_level(tmp_path, capsys):
    """One run, the window exactly as good as its delayed baseline (a window that only delays): neither ahead nor
    behind."""
    values = {"short": [80.0, 50.0, 40.0], "long": [79.0, 49.0, 39.0], "ws": [78.0, 48.0, 38.0]}
    values["ws@delayed"] = list(values["ws"])
    assert cli.main(["report", write_tracks_run(tmp_path / "run", values, [300, 600, 900])]) == 0
    out = capsys.readouterr().out
    assert ("verdict: ws vs the delayed EMA: 0.00 FID, level (one run, no CI); "
            "vs the matched-lag EMA (long): 1.00, ahead (one run, no CI)") in out


def test_window_table_shows_the_baselines_values(tmp_path, capsys):
    values = {v: [80.0 - i, 50.0 - i, 40.0 - i] for i, v in enumerate(("short", "long", "ws", "ws@delayed"))}
    run = write_tracks_run(tmp_path / "run", values, [300, 600, 900])
    summary = summarize([load_run(run)])
    ws = next(c for c in summary["windows"] if c["window"] == "ws")
    assert [(r["window"]["mean"], r["delayed"]["mean"], r["matched"]["mean"]) for r in ws["per_step"]] == [
        (78.0, 77.0, 79.0), (48.0, 47.0, 49.0), (38.0, 37.0, 39.0)]
    row = next(line for line in format_table(summary).splitlines() if line.strip().startswith("600 "))
    assert row.split()[:4] == ["600", "48.000", "144.4", "47.000"] and "49.000" in row


def test_rows_that_cannot_be_used_are_left_out_with_one_warning_each(tmp_path, capsys):
    curves = {"ema": ([1, 2, 3], [9.0, 5.0, 3.0]), "lawa": ([1, 2, 3], [8.0, 4.0, 2.5])}
    clean = _write_run(tmp_path / "clean", curves)
    bad = ['{"step": 4, "variant": "ema", "fid": NaN}\n', '{"step": 4, "variant": "lawa", "fid": Infinity}\n',
           '{"step": "5", "variant": "lawa", "fid": 1.0}\n', '{"variant": "lawa", "fid": 1.0}\n', '[1, 2]\n',
           'garbage\n', '{"step": 6, "variant": "lawa", "fid": "x"}\n']
    dirty = _write_run(tmp_path / "dirty", curves, extra_lines=bad)
    with pytest.warns(UserWarning) as caught:
        got = summarize([load_run(dirty)])
    expected = summarize([load_run(clean)])
    assert got["per_step"] == expected["per_step"] and got["mean_speedup"] == expected["mean_speedup"]
    lines = sorted(int(str(w.message).split(": line ")[1].split()[0].rstrip(":")) for w in caught)
    assert lines == list(range(7, 14))  # the 6 good rows, then one warning for each bad one, naming its line
    assert all(str(w.message).startswith(os.path.join(dirty, "metrics.jsonl")) for w in caught)
    assert cli.main(["report", dirty, "-o", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert err.count("warning: ") == 7 and "nan" not in out.lower()
