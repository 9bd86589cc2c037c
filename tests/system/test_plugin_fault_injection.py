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
from tests.helpers import LAWA_ARGS, ROOT, LaunchServer, assert_weights_close, log_text, weights

STEPS, CKPT, KILLS = 24, 2, 20
CHECKPOINT_FILES = {"optimizer.bin", "random_states_0.pkl", "unet", "unet_ema", "unet_lawa",
                    "lawa_state_lawa.safetensors", "lawa_launch.json"}
LAWA_FOLDERS = ("unet_lawa", f"checkpoint-{STEPS}/unet_lawa")


def command(out: Path, *extra: str) -> list[str]:
    """The arguments of ``python -m lawa_diffusion.launch``."""
    return [*LAWA_ARGS, str(SCRIPT), "--output_dir", str(out), "--max_train_steps", str(STEPS),
            "--checkpointing_steps", str(CKPT), "--resume_from_checkpoint", "latest", *extra]


def launch_subprocess(out: Path) -> None:
    """An uninterrupted run as its own ``python -m lawa_diffusion.launch`` process."""
    subprocess.run([sys.executable, "-m", "lawa_diffusion.launch", *command(out)], env=environment(), check=True,
                   capture_output=True, timeout=600)


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def assert_checkpoints_whole(out: Path) -> None:
    for folder in out.glob("checkpoint-*"):
        assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES, f"{folder.name} is not whole"
        assert (folder / "unet_lawa" / "diffusion_pytorch_model.safetensors").is_file()


def killed_run(server: LaunchServer, out: Path, rng: random.Random, in_save: bool) -> str:
    """One run from the latest checkpoint, killed inside the m-th save_state it makes (m random) or a
    random moment after its n-th step (n random); "finished" when it ended before that."""
    stdout = out.parent / f"stdout-{server.count + 1}"  # a FIFO: the run's lines as they come
    os.mkfifo(stdout)
    pid, _ = server.start(command(out, "--print_steps", "--sleep_in_save", "0.5"), stdout=stdout)
    wanted, count = ("saving", rng.randint(1, 3)) if in_save else ("step", rng.randint(1, 8))
    with open(stdout) as lines:
        for line in lines:
            count -= line.startswith(wanted)
            if count == 0:
                if not in_save:  # anywhere: inside the step, the LAWA snapshot, a save or between them
                    time.sleep(rng.uniform(0.0, 0.6))
                os.kill(pid, signal.SIGKILL)
                break
    code = server.wait(timeout=300)
    os.unlink(stdout)
    assert code in (0, -signal.SIGKILL), f"exit code {code}:\n{log_text(server)}"
    return "finished" if code == 0 else "killed"


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_lawa(launch_server, tmp_path):
    # The reference is a run of its own process; the killed runs are forked from a server that imported torch,
    # diffusers and the plugin once (each is still a fresh process, killed with SIGKILL, resumed by the next one).
    full = tmp_path / "full"
    launch_subprocess(full)
    rng, out, kills, chains, reached, in_save = random.Random(0), tmp_path / "chain-0", 0, 0, [], 0
    for trial in range(2 * KILLS):
        if kills == KILLS:
            break
        what = killed_run(launch_server, out, rng, in_save=trial % 3 == 0)
        in_save += what == "killed" and trial % 3 == 0
        assert_checkpoints_whole(out)
        reached.append(max((int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")), default=0))
        kills += what == "killed"
        if what == "finished":  # the run ended before the kill: check it and start another chain
            for name in LAWA_FOLDERS:
                assert_weights_close(weights(out / name), weights(full / name), atol=0)
            chains += 1
            out = tmp_path / f"chain-{chains}"
    assert launch_server.run(command(out)) == 0, log_text(launch_server)
    assert_checkpoints_whole(out)
    for name in LAWA_FOLDERS:
        assert_weights_close(weights(out / name), weights(full / name), atol=0)
    print(f"{len(reached)} trials: {kills} SIGKILLs ({in_save} inside save_state), {chains} chain(s) finished "
          f"before a kill; latest checkpoint step after each trial: {reached}")
    assert kills == KILLS and max(reached) >= STEPS // 2  # the chain got on, killed again and again
