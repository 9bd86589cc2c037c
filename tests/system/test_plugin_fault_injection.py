"""Fault injection through the launch plugin: SIGKILL a plugin-run script at seeded random moments
(some while it is inside ``save_state``), restart it each time with ``--resume_from_checkpoint latest``,
and check that no ``checkpoint-N`` folder is ever half-written and that the final LAWA folders equal
those of an uninterrupted run bit for bit.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import EMA_PATTERNS_SCRIPT as SCRIPT
from tests.helpers import LAWA_ARGS, ROOT, assert_weights_close, weights

STEPS, CKPT, KILLS = 24, 2, 20
CHECKPOINT_FILES = {"optimizer.bin", "random_states_0.pkl", "unet", "unet_ema", "unet_lawa",
                    "lawa_state_lawa.safetensors", "lawa_launch.json"}
LAWA_FOLDERS = ("unet_lawa", f"checkpoint-{STEPS}/unet_lawa")


def command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lawa_diffusion.launch", *LAWA_ARGS, str(SCRIPT), "--output_dir", str(out),
            "--max_train_steps", str(STEPS), "--checkpointing_steps", str(CKPT), "--resume_from_checkpoint", "latest",
            *extra]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def assert_checkpoints_whole(out: Path) -> None:
    for folder in out.glob("checkpoint-*"):
        assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES, f"{folder.name} is not whole"
        assert (folder / "unet_lawa" / "diffusion_pytorch_model.safetensors").is_file()


def killed_run(out: Path, rng: random.Random, in_save: bool) -> str:
    """One run from the latest checkpoint, killed inside the m-th save_state it makes (m random) or a
    random moment after its n-th step (n random); "finished" when it ended before that."""
    proc = subprocess.Popen(command(out, "--print_steps", "--sleep_in_save", "0.5"), env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    wanted, count = ("saving", rng.randint(1, 3)) if in_save else ("step", rng.randint(1, 8))
    for line in proc.stdout:
        count -= line.startswith(wanted)
        if count == 0:
            if not in_save:  # anywhere: inside the step, the LAWA snapshot, a save or between them
                time.sleep(rng.uniform(0.0, 0.6))
            proc.send_signal(signal.SIGKILL)
            break
    code = proc.wait(timeout=300)
    proc.stdout.close()
    return "finished" if code == 0 else "killed"


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_lawa(tmp_path):
    full = tmp_path / "full"
    subprocess.run(command(full), env=environment(), check=True, capture_output=True, timeout=600)
    rng, out, kills, chains, reached, in_save = random.Random(0), tmp_path / "chain-0", 0, 0, [], 0
    for trial in range(2 * KILLS):
        if kills == KILLS:
            break
        what = killed_run(out, rng, in_save=trial % 3 == 0)
        in_save += what == "killed" and trial % 3 == 0
        assert_checkpoints_whole(out)
        reached.append(max((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")), default=0))
        kills += what == "killed"
        if what == "finished":  # the run ended before the kill: check it and start another chain
            for name in LAWA_FOLDERS:
                assert_weights_close(weights(out / name), weights(full / name), atol=0)
            chains += 1
            out = tmp_path / f"chain-{chains}"
    subprocess.run(command(out), env=environment(), check=True, capture_output=True, timeout=600)
    assert_checkpoints_whole(out)
    for name in LAWA_FOLDERS:
        assert_weights_close(weights(out / name), weights(full / name), atol=0)
    print(f"{len(reached)} trials: {kills} SIGKILLs ({in_save} inside save_state), {chains} chain(s) finished "
          f"before a kill; latest checkpoint step after each trial: {reached}")
    assert kills == KILLS and max(reached) >= STEPS // 2  # the chain got on, killed again and again
