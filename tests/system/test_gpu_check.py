"""scripts/gpu_check.sh can fail: a failing step is reported in the summary and fails the script, the steps after
it still run, and steps that no longer fit the time budget are listed as skipped (on the CPU, tiny sizes)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def gpu_check(tmp_path, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "GPU_CHECK_TINY": "1", "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
            "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=300)


def summary_rows(stdout: str) -> dict:
    """{step: (exit, rest of the line)} from the summary table at the end of the output."""
    table = stdout.split("summary (part", 1)[1]
    rows = {}
    for line in table.splitlines()[2:]:
        match = re.match(r"^(\w+)\s+(\S+)\s+(\d+)\s+(\d+)(.*)$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(5).strip())
    return rows


def test_a_failing_step_fails_the_script_and_the_next_steps_still_run(tmp_path):
    done = gpu_check(tmp_path, GPU_CHECK_STEPS="device,plan", GPU_CHECK_FAIL="device")
    assert done.returncode != 0, done.stdout + done.stderr
    rows = summary_rows(done.stdout)
    assert rows == {"device": ("2", "FAILED"), "plan": ("0", "")}, done.stdout
    assert "--gpu-check-rejected-argument" in (tmp_path / "out" / "logs" / "device.log").read_text()
    assert "matched-lag baseline" in (tmp_path / "out" / "logs" / "plan.log").read_text()
    assert (tmp_path / "out" / "steps.tsv").read_text().splitlines()[0].split("\t")[:2] == ["device", "2"]


def test_three_seeds_at_once_are_three_steps_and_the_script_finishes(tmp_path):
    """The seeds run in the background, each its own step; the script waits for them (and only them: not for the
    tee of its own output) and goes on to the report. Here every seed is refused at once, so the report finds no
    run either."""
    done = gpu_check(tmp_path, GPU_CHECK_PART="seeds", GPU_CHECK_STEPS="seed0,seed1,seed2,report",
                     GPU_CHECK_FAIL="seed0,seed1,seed2")
    assert done.returncode == 1, done.stdout + done.stderr
    rows = summary_rows(done.stdout)
    assert {name: rows[name][0] for name in rows} == {"seed0": "2", "seed1": "2", "seed2": "2", "report": "2"}


def test_steps_past_the_budget_are_skipped_and_listed(tmp_path):
    done = gpu_check(tmp_path, GPU_CHECK_STEPS="device,plan", GPU_CHECK_BUDGET="1", GPU_CHECK_MIN_STEP_S="30")
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary_rows(done.stdout) == {"device": ("skipped", "(no time left in the budget)"),
                                         "plan": ("skipped", "(no time left in the budget)")}


@pytest.mark.parametrize("env, words", [({"GPU_CHECK_PART": "nope"}, "GPU_CHECK_PART"),
                                        ({"GPU_CHECK_BUDGET": "soon"}, "GPU_CHECK_BUDGET")])
def test_bad_settings_are_refused(tmp_path, env, words):
    done = gpu_check(tmp_path, **env)
    assert done.returncode == 2 and words in done.stderr
