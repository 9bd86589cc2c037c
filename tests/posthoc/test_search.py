"""``lawa-diffusion posthoc``: the search in hindsight over synthesised averages of a run.

The bookkeeping is checked on the random-walk run folder of test_synthesize (power EMAs p05, p10 and a
constant-decay EMA c90 kept online) with a stand-in metric, the float64 sum of a variant's weights, against
the float64 sum of the snapshot files with the solver's coefficients. The fidelity of a synthesised
constant-decay EMA is checked in a tiny training run with the FID module's stand-in feature extractor.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.maths import profile_fit as synthesis
from lawa_diffusion.posthoc import search as hindsight
from lawa_diffusion.posthoc.synthesize import plan_synthesis
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.runs.records import best_per_step
from lawa_diffusion.utils.files import read_jsonl
from tests.helpers import ROOT, make_run, one_line_error, param_sum_metric
from tests.helpers import SYNTH_DECAY as DECAY
from tests.helpers import SYNTH_STEPS as STEPS
from tests.helpers import SYNTH_TINY as TINY
from tests.helpers import float64_sum as _float64_sum


@pytest.fixture(autouse=True)
def _only_this_command(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", (cli.hindsight,))


@pytest.fixture(scope="module")
def walk_run(tmp_path_factory, one_thread):
    """test_synthesize's run folder, plus metrics rows at step 60 and a checkpoint holding c90's online weights."""
    run = str(tmp_path_factory.mktemp("hindsight-run"))
    walk = make_run(run)
    unet = UNet2DModel(**TINY)
    offset = 0
    state = {}
    for name, p in unet.named_parameters():
        state[name] = walk["online"][offset:offset + p.numel()].reshape(p.shape).float()
        offset += p.numel()
    unet.load_state_dict(state)
    unet.save_pretrained(os.path.join(runfolder.checkpoint_path(run, STEPS), runfolder.ema_folder("c90")))
    with open(runfolder.metrics_path(run), "w") as f:
        for variant, kind, value in (("c90", "ema", 3.0), ("raw", "raw", 5.0)):
            f.write(json.dumps({"step": STEPS, "variant": variant, "kind": kind, "fid": value}) + "\n")
        f.write(json.dumps({"step": 30, "variant": "c90", "kind": "ema", "fid": 4.0}) + "\n")
    return run, walk, state


def test_sigma_rel_grid_is_geometric_or_a_list():
    grid = hindsight.parse_sigma_rels("0.02:0.25:12")
    assert len(grid) == 12 and grid[0] == 0.02 and grid[-1] == 0.25
    ratios = [b / a for a, b in zip(grid, grid[1:])]
    assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=2e-3)  # equal ratios up to the 4 digits kept
    assert hindsight.parse_sigma_rels("0.05,0.1") == [0.05, 0.1]
    for bad in ("0.3:0.4:2", "0:0.1:3", "0.1:0.05:3", "a:b:c", "0.05,0.5", "0.05:0.1:1"):
        with pytest.raises(ValueError, match="--sigma-rel"):
            hindsight.parse_sigma_rels(bad)


def _moments_lag_spread(decay: float, t: int):
    """Independent reference: diffusers' EMAModel (constant decay) fed θ_s = s and θ_s = s² gives the profile's
    first two moments, hence its mean lag t − E[s] and spread √(E[s²] − E[s]²)."""
    one, two = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    ema = EMAModel([one, two], decay=decay, min_decay=decay)
    for s in range(1, t + 1):
        one.data.fill_(float(s))
        two.data.fill_(float(s * s))
        ema.step([one, two])
    m1, m2 = ema.shadow_params[0].item(), ema.shadow_params[1].item()
    return t - m1, math.sqrt(max(m2 - m1 * m1, 0.0))


def test_search_scores_each_synthesis_on_one_call_per_step_and_refuses_out_of_reach(walk_run, tmp_path):
    run, walk, online = walk_run
    calls = []
    out = tmp_path / "h"
    summary = hindsight.run_hindsight(run, "0.05:0.2:3", targets=["decay=0.9", "decay=0.999"], twins=["c90"],
                                      steps="30,60", tracks=["p05", "p10"], evaluate=param_sum_metric(calls),
                                      out_dir=str(out), progress=False)
    assert summary["steps"] == [30, 60] and len(calls) == 2
    assert "online:c90" in calls[1] and "online:c90" not in calls[0]  # the checkpoint is at step 60 only
    rows = summary["rows"]
    assert [json.loads(line) for line in (out / "hindsight.jsonl").read_text().splitlines()] == rows
    for row in rows:
        target = "c90" if row["kind"] == "twin" else row["target"]
        plan = plan_synthesis(run, target, row["step"], ["p05", "p10"], max_residual=None)
        assert row["residual"] == pytest.approx(plan.solution.residual, rel=1e-12)
        if row["refused"]:
            assert row["residual"] > synthesis.DEFAULT_MAX_RESIDUAL and row["fid"] is None
            continue
        expected = _float64_sum([s.path for s in plan.sources], plan.solution.coefficients)
        assert row["fid"] == pytest.approx(sum(v.sum().item() for v in expected.values()), rel=1e-6)
        assert row["residual"] <= synthesis.DEFAULT_MAX_RESIDUAL
    refused = {(r["step"], r["target"]) for r in rows if r["refused"]}
    assert {(30, "decay=0.999"), (60, "decay=0.999")} <= refused  # 0.999 puts 94% on θ_0 at step 60
    assert (60, "decay=0.9") not in refused and (60, "twin:c90") not in refused
    # the best per step is the lowest-scoring synthesised row, twins left out
    for step in (30, 60):
        scored = [r for r in rows if r["step"] == step and r["kind"] != "twin" and not r["refused"]]
        assert summary["best"][str(step)]["fid"] == min(r["fid"] for r in scored)
    twin = next(r for r in rows if r["kind"] == "twin")
    online_sum = sum(v.double().sum().item() for v in online.values())
    assert twin["online_fid"] == pytest.approx(online_sum, rel=1e-9)
    assert twin["fid_minus_online"] == pytest.approx(twin["fid"] - online_sum, abs=1e-6)
    plan = plan_synthesis(run, "c90", STEPS, ["p05", "p10"], max_residual=None)
    synth = _float64_sum([s.path for s in plan.sources], plan.solution.coefficients)
    diff = math.sqrt(sum(((synth[k] - online[k].double()) ** 2).sum().item() for k in online))
    norm = math.sqrt(sum((online[k].double() ** 2).sum().item() for k in online))
    assert twin["weight_rel_error"] == pytest.approx(diff / norm, rel=1e-4)
    # online variants marked at the σ_rel of their exact profile (diffusers' EMAModel moments as the reference)
    lag_c90, spread_c90 = _moments_lag_spread(DECAY, STEPS)
    point = summary["online"][str(STEPS)]["c90"]
    assert point["mean_lag"] == pytest.approx(lag_c90, rel=1e-9)
    assert point["sigma_rel"] == pytest.approx(spread_c90 / STEPS, rel=1e-6)
    assert summary["online"][str(STEPS)]["raw"]["sigma_rel"] == 0.0
    assert json.loads((out / "hindsight.json").read_text())["best"] == summary["best"]
    assert (out / "hindsight-fid.png").read_bytes()[:4] == b"\x89PNG"
    text = hindsight.format_summary(summary)
    assert f"step 60: best σ_rel {summary['best']['60']['sigma_rel']:.4f}" in text and "refused" in text
    with pytest.raises(FileExistsError, match="--overwrite"):
        hindsight.run_hindsight(run, "0.1", steps="60", evaluate=param_sum_metric([]), out_dir=str(out), progress=False)


def test_append_adds_steps_and_targets_and_replaces_a_row_scored_again(walk_run, tmp_path):
    run, _, _ = walk_run
    out = str(tmp_path / "h")
    first = hindsight.run_hindsight(run, "0.08,0.1", steps="60", tracks=["p05", "p10"], evaluate=param_sum_metric([]),
                                    out_dir=out, progress=False)
    added = hindsight.run_hindsight(run, "0.1", steps="30,60", tracks=["p05", "p10"], evaluate=param_sum_metric([]),
                                    out_dir=out, append=True, progress=False)
    assert added["steps"] == [30, 60]
    assert [(r["step"], r["target"]) for r in added["rows"]] == [(60, "sigma_rel=0.08"), (30, "sigma_rel=0.1"),
                                                                (60, "sigma_rel=0.1")]
    assert added["rows"][0] == first["rows"][0]
    again = hindsight.run_hindsight(run, "0.08", steps="60", tracks=["p05", "p10"], evaluate=param_sum_metric([]),
                                    out_dir=out, append=True, progress=False)
    assert [(r["step"], r["target"]) for r in again["rows"]] == [(30, "sigma_rel=0.1"), (60, "sigma_rel=0.1"),
                                                                (60, "sigma_rel=0.08")]
    assert again["rows"][2]["fid"] == first["rows"][0]["fid"]
    assert [json.loads(line) for line in open(os.path.join(out, "hindsight.jsonl"))] == again["rows"]


def test_each_step_reads_its_snapshots_once_and_scores_the_float64_sums_rounded_to_float32(walk_run, tmp_path,
                                                                                          monkeypatch):
    """Every target and twin of a step from one read of the files it uses; every weight scored is the float64 sum
    of the files correctly rounded to float32, as when each target was synthesised on its own in float64."""
    from tests.helpers import counted_reads, tensor_bytes

    run, _, _ = walk_run
    scored = {}  # (step, variant) -> the weights evaluated

    def keep_weights(variants):
        step = len({s for s, _ in scored}) and max(s for s, _ in scored) + 1  # 0 then 1: the order of the steps
        out = param_sum_metric([])(variants)
        for name, weights in variants.items():
            with weights() as model:
                scored[(step, name)] = {k: v.clone() for k, v in model.state_dict().items()}
        return out

    with counted_reads(monkeypatch) as reads:
        summary = hindsight.run_hindsight(run, "0.05:0.2:4", targets=["decay=0.9", "lawa:k=2,nu=10,over=p05",
                                                                      "decay=0.999"], twins=["c90"], steps="30,60",
                                          tracks=["p05", "p10"], evaluate=keep_weights, out_dir=str(tmp_path / "h"),
                                          progress=False)
    assert len(summary["rows"]) == 2 * (4 + 3) + 1  # the twin where a checkpoint holds it: step 60
    used = {}
    for row in summary["rows"]:
        target = "c90" if row["kind"] == "twin" else row["target"]
        plan = plan_synthesis(run, target, row["step"], ["p05", "p10"], max_residual=None)
        if row["refused"]:
            assert row["fid"] is None
            continue
        files = [s.path for s, _ in plan.used()]
        used.setdefault(row["step"], set()).update(os.path.abspath(f) for f in files)
        variant = f"synthesised:{target}" if row["kind"] == "twin" else target
        weights = scored[({30: 0, 60: 1}[row["step"]], variant)]
        assert row["fid"] == sum(v.double().sum().item() for v in weights.values())
        for name, exact in _float64_sum(files, [x for _, x in plan.used()]).items():
            rounded = exact.float()
            ulp = (torch.nextafter(rounded.abs(), torch.tensor(math.inf)) - rounded.abs()).double()
            assert ((weights[name].double() - exact).abs() <= 0.5 * ulp + 1e-14 * exact.abs()).all(), (target, name)
    assert len(used[60]) > len(used[30]) > 1
    for path, seen in reads.items():
        steps = [s for s in used if path in used[s]]
        assert seen == {"opens": len(steps), "bytes": len(steps) * tensor_bytes(path)}, path
    assert set(reads) == used[30] | used[60]


def test_save_best_writes_each_steps_best_average(walk_run, tmp_path):
    run, _, _ = walk_run
    best_dir = tmp_path / "best"
    summary = hindsight.run_hindsight(run, "0.05:0.2:3", targets=["decay=0.9"], steps="30,60", tracks=["p05", "p10"],
                                      evaluate=param_sum_metric([]), out_dir=str(tmp_path / "h"), progress=False,
                                      save_best=str(best_dir))
    assert sorted(os.listdir(best_dir)) == ["step-30", "step-60"]
    assert summary["saved_best"] == {s: str(best_dir / f"step-{s}") for s in ("30", "60")}
    for step in (30, 60):
        best = summary["best"][str(step)]
        scored = [r for r in summary["rows"] if r["step"] == step and r["fid"] is not None]
        assert best["fid"] == min(r["fid"] for r in scored) and len(scored) >= 2
        folder = best_dir / f"step-{step}"
        record = json.loads((folder / "synthesis.json").read_text())
        assert record["target"] == best["target"] and record["hindsight"] == best and record["step"] == step
        plan = plan_synthesis(run, best["target"], step, ["p05", "p10"], max_residual=None)
        expected = _float64_sum([s.path for s in plan.sources], plan.solution.coefficients)
        loaded = UNet2DModel.from_pretrained(folder).state_dict()
        assert sum(v.double().sum().item() for v in loaded.values()) == pytest.approx(best["fid"], rel=1e-12)
        for name, value in expected.items():
            torch.testing.assert_close(loaded[name].double(), value, rtol=0, atol=1e-6)
    with pytest.raises(FileExistsError, match="--save-best"):
        hindsight.run_hindsight(run, "0.1", steps="60", tracks=["p05", "p10"], evaluate=param_sum_metric([]),
                                out_dir=str(tmp_path / "h2"), progress=False, save_best=str(best_dir))


@pytest.mark.parametrize("args, words", [
    (["--sigma-rel", "0.3"], ["--sigma-rel", "0.3"]),
    (["--steps", "7"], ["--steps", "7", "stored"]),
    (["--target", "decay=abc"], ["decay", "abc"]),
    (["--twin", "nope"], ["--twin", "nope"]),
])
def test_bad_input_is_one_sentence_exit_2(walk_run, tmp_path, capsys, args, words):
    run, _, _ = walk_run
    err = one_line_error(capsys, ["posthoc", run, "-o", str(tmp_path / "x"), *args])
    assert all(w in err for w in words), err
    assert not (tmp_path / "x").exists()


def test_existing_output_is_refused_before_any_work(walk_run, tmp_path, capsys):
    run, _, _ = walk_run
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "hindsight.json").write_text("{}")
    err = one_line_error(capsys, ["posthoc", run, "-o", str(tmp_path / "x")])
    assert "--overwrite" in err and (tmp_path / "x" / "hindsight.json").read_text() == "{}"


# ----------------------------------------------------------------------------- fidelity in a training run
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, one_thread):
    """A tiny training run: a constant-decay EMA "c" online, power EMAs p05 and p10 stored every 4 steps, FID
    (stand-in features) of the raw weights and of "c" at the last step, a checkpoint there."""
    from tests.helpers import tiny_config
    from tests.helpers import train_run as train

    out = tmp_path_factory.mktemp("fidelity") / "run"
    cfg = tiny_config(out, max_train_steps=40, checkpointing_steps=40, save_ema_snapshots=False,
                      optim={"lr_scheduler": "constant_with_warmup", "learning_rate": 5e-3},
                      eval={"every_n_steps": 40, "variants": ["raw", "c"], "num_samples": 16, "batch_size": 16})
    cfg["ema_tracks"] = [{"name": "c", "decay": 0.8}, {"name": "p05", "sigma_rel": 0.05},
                         {"name": "p10", "sigma_rel": 0.10}]
    cfg["posthoc"] = {"tracks": ["p05", "p10"], "every_n_steps": 4}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAWA_CACHE_DIR", os.environ.get("LAWA_TEST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lawa-cache")))
        train(cfg)
    return str(out)


@pytest.mark.filterwarnings("ignore::lawa_diffusion.evaluation.fid.SmallSampleWarning")
def test_synthesised_constant_decay_ema_scores_as_the_online_one(trained_run, tmp_path):
    from lawa_diffusion.evaluation.inception import stand_in_extractor

    summary = hindsight.run_hindsight(trained_run, "0.1", twins=["c"], steps="final", out_dir=str(tmp_path / "h"),
                                      weights=stand_in_extractor(), device="cpu", progress=False)
    twin = next(r for r in summary["rows"] if r["kind"] == "twin")
    rows = {r["variant"]: r for r in read_jsonl(runfolder.metrics_path(trained_run)) if r["step"] == 40}
    # the run's own evaluator on the run's own noise: the checkpointed track scores exactly as during training
    assert twin["online_fid"] == pytest.approx(rows["c"]["fid"], rel=1e-5)
    assert not twin["refused"] and twin["residual"] < synthesis.DEFAULT_MAX_RESIDUAL
    assert twin["weight_rel_error_vs_raw_gap"] < 0.1  # a tenth of the distance averaging moved the weights
    gap = abs(rows["raw"]["fid"] - rows["c"]["fid"])  # two clearly different averages of the same run
    assert abs(twin["fid_minus_online"]) < 0.1 * gap
    # the online variant is marked at the mean lag the trainer wrote for it
    assert summary["online"]["40"]["c"]["mean_lag"] == pytest.approx(rows["c"]["mean_lag"], rel=1e-9)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::lawa_diffusion.evaluation.fid.SmallSampleWarning")
def test_two_processes_score_as_one_and_only_the_main_one_writes(trained_run, tmp_path):
    """Under torchrun the samples are split across two processes: the same rows as one process, one set of files."""
    import subprocess
    import sys

    from lawa_diffusion.evaluation.inception import stand_in_extractor

    one = hindsight.run_hindsight(trained_run, "0.1", twins=["c"], steps="final", out_dir=str(tmp_path / "one"),
                                  weights=stand_in_extractor(), device="cpu", progress=False)
    root = ROOT
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(root / "tests" / "scripts" / "hindsight_processes.py"), trained_run,
                           str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = read_jsonl(str(tmp_path / "two" / hindsight.JSONL_NAME))
    assert len(two) == len(one["rows"])  # written once, by the main process
    for a, b in zip(one["rows"], two):
        assert a["target"] == b["target"]
        assert b["fid"] == pytest.approx(a["fid"], rel=1e-6)
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))
    assert [(tmp_path / f"two.processes.{r}").read_text() for r in (0, 1)] == ["2", "2"]  # really split in two


def test_summary_names_a_non_grid_target_by_its_name():
    from lawa_diffusion.posthoc.search import format_summary

    rows = [{"step": 60, "target": "sigma_rel=0.1", "kind": "sigma_rel", "sigma_rel": 0.1, "fid": 9.0},
            {"step": 60, "target": "ema", "kind": "target", "sigma_rel": 0.2106, "fid": 8.0}]
    summary = {"steps": [60], "rows": rows, "max_residual": 0.05, "best": best_per_step(rows)}
    line = format_summary(summary)
    assert line == "step 60: best ema (its σ_rel 0.2106): FID 8.000"
    rows[1]["fid"] = 10.0
    summary["best"] = best_per_step(rows)
    assert format_summary(summary) == "step 60: best σ_rel 0.1000 (sigma_rel=0.1): FID 9.000"
