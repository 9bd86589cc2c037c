"""Fault injection: SIGKILL a training process at seeded random moments, including inside
``save_state`` and inside a disk snapshot write, restart it with ``--resume latest`` each time, and
check that every restart resumes from the latest complete checkpoint, that every checkpoint it could
read is whole, and that the final LAWA weights equal those of an uninterrupted run bit for bit.
"""
from __future__ import annotations

import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import BASE_ARGS, ENGINES, EngineServer, log_text, read_events, read_weights, reference_run

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Targeted kills: the hook holds the process inside the write (until the kill) at its n-th write.
HOOK_ENV = {"save_state": "LAWA_TEST_SAVE_STATE_SLEEP", "disk_write": "LAWA_TEST_DISK_WRITE_SLEEP"}
EVENT_OF = {"save_state": "save_state_in", "disk_write": "disk_write_in", "anytime": "started"}


def latest_complete_checkpoint(run_dir: Path) -> tuple[int, Path | None]:
    """The newest ``checkpoint-<step>`` folder, after checking that every file in it reads back whole."""
    found = sorted((int(m.group(1)), p) for p in run_dir.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name)))
    if not found:
        return 0, None
    step, path = found[-1]
    names = {p.name for p in path.iterdir()}
    expected = {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"}
    expected |= {f"lawa_state_{name}.safetensors" for name in ENGINES} | {"lawa_snapshots_lawa_disk_main"}
    assert names == expected, f"{path.name} holds {sorted(names)}"
    for file in path.rglob("*"):
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        elif file.suffix in (".bin", ".pkl"):
            torch.load(file, weights_only=False)
    assert len(list((path / "lawa_snapshots_lawa_disk_main").iterdir())) == min(3, step // 2)
    return step, path


def temp_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.rglob("*") if p.name.endswith(".tmp"))


def wait_for(events: Path, pid: int, name: str, nth: int, timeout: float) -> bool:
    """True once the child logged event ``name`` ``nth`` times; False when it ended or the time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [e for e in read_events(events) if e["pid"] == pid]
        if sum(e["event"] == name for e in mine) >= nth:
            return True
        if any(e["event"] == "done" for e in mine) or not _alive(pid):
            return False
        time.sleep(0.01)
    return False


def _alive(pid: int) -> bool:
    try:  # the fork server reaps the child: a zombie still answers, so look at its state
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def one_trial(server: EngineServer, run_dir: Path, events: Path, mode: str, rng: random.Random,
              train_s: float) -> dict:
    """Start a resumed run and SIGKILL it as ``mode`` says ("finish": let it end); returns what happened."""
    expected, _ = latest_complete_checkpoint(run_dir)
    done_before = [e["step"] for e in read_events(events) if e["event"] == "checkpoint_done"]
    env = {"LAWA_TEST_EVENTS": str(events)}
    nth = rng.randint(1, 2)
    if mode in HOOK_ENV:
        env.update({HOOK_ENV[mode]: "120", "LAWA_TEST_PAUSE_AT": str(nth)})
    pid, _ = server.start(["--output_dir", str(run_dir)] + BASE_ARGS + ["--resume", "latest"], env)
    # targeted: the process waits inside the write; anytime: from start-up (checkpoint loading included) to the end
    delay = rng.uniform(0.0, 0.3) if mode in HOOK_ENV else rng.uniform(0.0, 1.2 * train_s)
    killed, inside = False, None
    if mode in EVENT_OF and wait_for(events, pid, EVENT_OF[mode], 1, timeout=120):
        time.sleep(delay)
        killed = _alive(pid)
        if killed:
            os.kill(pid, signal.SIGKILL)
    rc = server.wait()
    mine = [e for e in read_events(events) if e["pid"] == pid]
    if killed and rc == 0 and any(e["event"] == "done" for e in mine):
        killed = False  # the kill landed while a finished run was exiting: it counts as not killed
    if killed:
        inside = written_when_killed(run_dir, events, pid, mode)
    resumed = [e for e in mine if e["event"] == "resumed"]
    assert resumed or killed, f"run {pid} ({mode}) never resumed:\n{log_text(server)}"
    if resumed:  # (an early kill can land before or during the loading of the checkpoint)
        assert resumed[0]["step"] == expected, f"resumed at {resumed[0]['step']}, latest complete checkpoint {expected}"
    assert expected >= max(done_before, default=0), "a checkpoint reported complete was lost"
    assert rc == (-signal.SIGKILL if killed else 0), f"exit code {rc} ({mode}):\n{log_text(server)}"
    return {"mode": mode, "killed": killed, "inside": inside, "resumed_from": expected if resumed else None}


def written_when_killed(run_dir: Path, events: Path, pid: int, mode: str) -> str | None:
    """For a targeted kill: what the process was writing, checked to be unfinished."""
    if mode not in HOOK_ENV:
        return None
    mine = [e for e in read_events(events) if e["pid"] == pid]
    event = [e for e in mine if e["event"] == EVENT_OF[mode]][-1]
    if mode == "save_state":
        assert not any(e["event"] == "checkpoint_done" and e["step"] == event["step"] for e in mine)
        return f"checkpoint-{event['step']}"
    # (a file of that name may exist from an earlier run of the chain; the unfinished temp file is the evidence)
    assert (run_dir / "snapshots" / event["tmp"]).exists(), "the disk snapshot write was already finished"
    return event["path"]


def run_trials(server: EngineServer, tmp_path_factory, work: Path, modes: list[str], seed: int) -> list[dict]:
    reference_dir = reference_run(server, tmp_path_factory, BASE_ARGS)
    reference = read_weights(reference_dir)
    ref_events = [e for e in read_events(reference_dir.with_suffix(".events")) if e["event"] in ("started", "done")]
    train_s = ref_events[-1]["time"] - ref_events[0]["time"]
    rng = random.Random(seed)
    outcomes, chain = [], 0
    pending = list(modes)
    while pending:
        assert len(outcomes) < 4 * len(modes), f"too many runs ended before their kill: {outcomes}"
        run_dir, events = work / f"chain{chain}", work / f"chain{chain}.events"
        outcome = one_trial(server, run_dir, events, pending[0], rng, train_s)
        outcomes.append(outcome)
        if outcome["killed"]:
            pending.pop(0)
            continue
        check_final(run_dir, reference)  # the chain finished before the kill: compare, start a new one
        chain += 1
    run_dir, events = work / f"chain{chain}", work / f"chain{chain}.events"
    outcomes.append(one_trial(server, run_dir, events, "finish", rng, train_s))
    check_final(run_dir, reference)
    return outcomes


def check_final(run_dir: Path, reference: dict) -> None:
    result = read_weights(run_dir)
    assert torch.equal(result["ema"], reference["ema"])
    for name in ENGINES:
        assert torch.equal(result[name], reference[name]), f"{name}: LAWA after kills differs from an uninterrupted run"


def kill_plan(num_kills: int, seed: int) -> list[str]:
    """Seeded mix: 30% inside save_state, 30% inside a disk snapshot write, the rest at any moment."""
    targeted = max(1, round(0.3 * num_kills))
    modes = ["save_state"] * targeted + ["disk_write"] * targeted
    modes += ["anytime"] * (num_kills - len(modes))
    random.Random(seed).shuffle(modes)
    return modes


@pytest.mark.parametrize("num_kills, seed", [
    (10, 7),
    pytest.param(30, 11, marks=pytest.mark.slow),
])
def test_seeded_random_kills(engine_server, tmp_path_factory, tmp_path, num_kills, seed):  # noqa: F811
    modes = kill_plan(num_kills, seed)
    outcomes = run_trials(engine_server, tmp_path_factory, tmp_path, modes, seed)
    killed = [o for o in outcomes if o["killed"]]
    assert [o["mode"] for o in killed] == modes
    assert sum(o["inside"] is not None for o in killed) == modes.count("save_state") + modes.count("disk_write")
