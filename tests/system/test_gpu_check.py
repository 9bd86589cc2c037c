"""scripts/gpu_check.sh gives a verdict that can be trusted (on the CPU, tiny sizes): a preflight that stops the
script with one line; three statuses per step (passed, failed, cut by the budget); the verdict "passed" only when
every step passed, "failed" (exit 1) when one failed, "incomplete" (exit 3) when one was cut or not started; a
tests step with a skipped test fails; everything lands in one archive beside the summary."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile

import pytest
import torch

from tests.helpers import ROOT


def gpu_check(tmp_path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "GPU_CHECK_TINY": "1", "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
            "PYTHON": sys.executable, **env}
    full.pop("LAWA_RUN_SLOW", None)
    return subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=400)


def summary(stdout: str) -> tuple[dict, str]:
    """({step: (status, note)} from the table of steps, the verdict word)."""
    table = stdout.split("== steps (part", 1)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        match = re.match(r"^(\w+)\s+(passed|failed|cut)\s+(\S+)\s+(\d+)\s+(\d+)\s*(.*)$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(6).strip())
    verdict = re.search(r"^gpu_check verdict: (\w+)", stdout, re.M)
    return rows, verdict.group(1) if verdict else ""


def archived(tmp_path, name: str) -> str:
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        return tar.extractfile(name).read().decode()


def test_a_failing_step_fails_the_script_the_next_steps_still_run_and_all_is_archived(tmp_path):
    done = gpu_check(tmp_path, GPU_CHECK_STEPS="tests,plan", GPU_CHECK_FAIL="tests",
                     GPU_CHECK_TESTS="tests/test_layers.py")
    assert done.returncode == 1, done.stdout + done.stderr
    rows, verdict = summary(done.stdout)
    assert verdict == "failed"
    assert rows["preflight"][0] == "passed" and rows["plan"] == ("passed", "")
    assert rows["tests"][0] == "failed" and rows["tests"][1].startswith("exit ")
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu_check.tar.gz", "summary.txt"]
    assert "gpu_check verdict: failed" in (tmp_path / "out" / "summary.txt").read_text()
    assert "--gpu-check-rejected-argument" in archived(tmp_path, "logs/tests.log")
    assert "matched-lag baseline" in archived(tmp_path, "logs/plan.log")
    assert "preflight: inception weights: ok" in archived(tmp_path, "logs/preflight.log")
    assert archived(tmp_path, "steps.tsv").splitlines()[1].split("\t")[:2] == ["tests", "failed"]


def test_a_failed_preflight_stops_the_script_with_one_line(tmp_path):
    done = gpu_check(tmp_path, LAWA_INCEPTION_WEIGHTS=str(tmp_path / "no-weights.pth"))
    assert done.returncode == 1, done.stdout + done.stderr
    rows, verdict = summary(done.stdout)
    assert rows == {"preflight": ("failed", "exit 1")} and verdict == "failed"
    lines = [line for line in done.stdout.splitlines() if line.startswith("preflight failed:")]
    assert len(lines) == 1 and "inception weights" in lines[0] and "no-weights.pth" in lines[0]
    assert "stopped after the preflight: preflight failed: inception weights" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine where CUDA is not visible")
def test_the_gpu_run_without_cuda_fails_at_the_preflight(tmp_path):
    done = gpu_check(tmp_path, GPU_CHECK_TINY="0", GPU_CHECK_STEPS="preflight")
    assert done.returncode == 1, done.stdout + done.stderr
    rows, verdict = summary(done.stdout)
    assert rows == {"preflight": ("failed", "exit 1")} and verdict == "failed"
    assert "preflight failed: device: CUDA is not visible" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="its CUDA tests would run, not skip")
def test_a_skipped_cuda_test_fails_the_tests_step(tmp_path):
    """pytest exits 0 when every selected test skips (no CUDA): the tests step must not read as passed."""
    done = gpu_check(tmp_path, GPU_CHECK_STEPS="tests",
                     GPU_CHECK_TESTS="tests/engine/test_rings.py -k 'pinned_pages_are_not or host_empty_registers'")
    assert done.returncode == 1, done.stdout + done.stderr
    rows, verdict = summary(done.stdout)
    assert verdict == "failed" and rows["tests"][0] == "failed"
    assert rows["tests"][1] == "1 test(s) skipped: a skipped CUDA test checks nothing"
    assert "SKIPPED" in done.stdout and "needs a CUDA device" in done.stdout


def test_a_step_cut_by_the_budget_is_cut_and_the_verdict_incomplete(tmp_path):
    """The budget cuts the training run's limit to a few seconds: it is stopped there, which reads "cut" (not
    "failed") and makes the verdict "incomplete"; the steps after it that find no budget left are cut too."""
    done = gpu_check(tmp_path, GPU_CHECK_STEPS="one_seed,bench_fid", GPU_CHECK_BUDGET="6", GPU_CHECK_MIN_STEP_S="2")
    assert done.returncode == 3, done.stdout + done.stderr
    rows, verdict = summary(done.stdout)
    assert verdict == "incomplete"
    assert rows["one_seed"][0] == "cut" and "the budget had cut its limit of 600 s" in rows["one_seed"][1]
    assert rows["bench_fid"][0] == "cut" and rows["bench_fid"][1].startswith("not started")


def test_a_step_past_its_own_limit_fails(tmp_path):
    done = gpu_check(tmp_path, GPU_CHECK_STEPS="one_seed", T_ONE_SEED="3")
    assert done.returncode == 1, done.stdout + done.stderr
    rows, verdict = summary(done.stdout)
    assert verdict == "failed" and rows["one_seed"] == ("failed", "ran past its own limit of 3 s (a hang, or far "
                                                                  "slower than measured)")


def test_three_seeds_at_once_are_three_steps_and_the_script_finishes(tmp_path):
    """The seeds run in the background, each its own step; the script waits for them (and only them: not for the
    tee of its own output) and goes on to the report. Here every seed is refused at once, so the report finds no
    run either."""
    done = gpu_check(tmp_path, GPU_CHECK_PART="seeds", GPU_CHECK_STEPS="seed0,seed1,seed2,report",
                     GPU_CHECK_FAIL="seed0,seed1,seed2")
    assert done.returncode == 1, done.stdout + done.stderr
    rows, verdict = summary(done.stdout)
    assert {name: rows[name][0] for name in rows} == {"preflight": "passed", "seed0": "failed", "seed1": "failed",
                                                      "seed2": "failed", "report": "failed"}
    assert verdict == "failed"


@pytest.mark.parametrize("env, words", [({"GPU_CHECK_PART": "nope"}, "GPU_CHECK_PART"),
                                        ({"GPU_CHECK_BUDGET": "soon"}, "GPU_CHECK_BUDGET")])
def test_bad_settings_are_refused(tmp_path, env, words):
    done = gpu_check(tmp_path, **env)
    assert done.returncode == 2 and words in done.stderr


@pytest.mark.slow
def test_the_text_to_image_part_runs_end_to_end_on_the_cpu(tmp_path):
    """GPU_CHECK_PART=text2image at tiny sizes (its benchmark step left out): captioned Fashion-MNIST, a pipeline from
    configs/text_to_image_cpu.yaml, a plugin run with FID on the held-out captions, its search in hindsight and its
    report. The summary's figures are the run's own rows; the run was evaluated on the held-out prompts the data
    folder gives; the archive holds no weights, data or pipeline."""
    import json

    from lawa_diffusion.evaluation.prompts import load_prompt_set
    from lawa_diffusion.utils.files import read_jsonl

    steps = ["t2i_data", "t2i_pipe", "t2i_train", "t2i_hindsight", "t2i_report"]
    done = gpu_check(tmp_path, GPU_CHECK_PART="text2image", GPU_CHECK_STEPS=",".join(steps))
    assert done.returncode == 0, done.stdout + done.stderr
    table, verdict = summary(done.stdout)
    assert verdict == "passed" and {name: table[name][0] for name in table} == {"preflight": "passed",
                                                                                **{s: "passed" for s in steps}}
    run, data = tmp_path / "runs" / "t2i_run", tmp_path / "runs" / "t2i_data"
    rows = read_jsonl(run / "metrics.jsonl")
    assert [(r["step"], r["variant"]) for r in rows] == [(6, "ema"), (6, "lawa"), (12, "ema"), (12, "lawa")]
    held_out = load_prompt_set(str(data / "test"), num_reference=8)
    assert {r["prompts_sha256"] for r in rows} == {held_out.fingerprint()} and {r["conditioning"] for r in rows} == {"text"}
    figures = (tmp_path / "out" / "summary.txt").read_text().split("== steps")[0]
    for step in (6, 12):
        fid = {r["variant"]: r["fid"] for r in rows if r["step"] == step}
        assert f"step {step}: FID ema {fid['ema']:.2f}  lawa {fid['lawa']:.2f}" in figures
    assert re.search(r"^done: 12 steps in [0-9.]+ s \([0-9.]+ step/s\)", figures, re.M)
    searched = [r for r in read_jsonl(run / "posthoc" / "hindsight.jsonl") if not r["refused"]]
    best = min(searched, key=lambda r: r["fid"])
    assert best["step"] == 12 and f"FID {best['fid']:.3f}" in figures
    report = json.loads((run / "report" / "report.json").read_text())
    assert report["curves"]["ema"]["mean"] == [r["fid"] for r in rows if r["variant"] == "ema"]
    assert report["curves"]["best_in_hindsight"]["mean"] == [best["fid"]]
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/t2i_run/metrics.jsonl" in names and "runs/t2i_run/report/report.json" in names
    assert not [n for n in names if n.endswith(".safetensors") or n.startswith(("runs/t2i_data", "runs/t2i_pipe"))]
