"""LAWA over a sharded (FSDP2 / DTensor) EMA: per-process shard windows, a gathered ``unet_lawa`` folder,
and a resume that needs the same number of processes.

tests/scripts/fsdp_lawa.py runs under torchrun with 2 CPU processes (gloo); checkpoints go through
accelerate's save_state / load_state with the engine attached. The reference is the float64
mean of the EMA gathered at the snapshot steps in the same run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import ROOT, SCRIPTS

SCRIPT = SCRIPTS / "fsdp_lawa.py"


def torchrun(processes: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=600)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


def folder_weights(path: Path) -> dict:
    from diffusers import UNet2DModel

    return {n: p.detach() for n, p in UNet2DModel.from_pretrained(path).named_parameters()}


@pytest.fixture(scope="module", params=["cpu", "disk"])
def trained(request, tmp_path_factory):
    """A 2-process run with the window in host memory, or on disk in a snapshot_dir both processes share."""
    out = tmp_path_factory.mktemp(f"fsdp_{request.param}")
    done = torchrun(2, "--output_dir", str(out), "--storage", request.param)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done, request.param


@pytest.mark.slow
def test_gathered_lawa_folder_is_the_mean_of_the_gathered_ema_snapshots(trained):
    out, done, storage = trained
    reference = load_file(out / "reference.safetensors")
    lawa = folder_weights(out / "unet_lawa")
    assert max_diff(lawa, reference) <= 1e-6
    assert max_diff(load_file(out / "ema_at_last_snapshot.safetensors"), reference) > 1e-4  # k=2 is not the last EMA
    assert max_diff(load_file(out / "swapped.safetensors"), reference) <= 1e-6  # swapped into the sharded UNet
    assert max_diff(load_file(out / "before_swap.safetensors"), load_file(out / "after_swap.safetensors")) == 0
    assert max_diff(load_file(out / "ema_before_save.safetensors"), load_file(out / "ema_after_save.safetensors")) == 0
    lawa_files = {"lawa_state_lawa.rank0.safetensors", "lawa_state_lawa.rank1.safetensors"}  # one per process
    lawa_files |= {"lawa_snapshots_lawa"} if storage == "disk" else set()
    assert {f for f in os.listdir(out / "checkpoint") if f.startswith("lawa")} == lawa_files
    if storage == "disk":  # each process wrote its own shard's files of the 2 latest snapshots
        assert sorted(os.listdir(out / "snapshots")) == [f"lawa.rank{r}-step{s:09d}.safetensors"
                                                         for r in (0, 1) for s in (4, 6)]
    assert "snapshot_ranks='all' instead of 'main'" in done.stderr


@pytest.mark.slow
def test_resume_with_the_same_processes_continues_the_window(trained):
    out, _, storage = trained
    done = torchrun(2, "--output_dir", str(out), "--mode", "resume", "--storage", storage)
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_diff(folder_weights(out / "unet_lawa_resumed"), folder_weights(out / "unet_lawa")) == 0


@pytest.mark.slow
# over the cpu run only: the refusal (LAWA.check_state, on the state file's world_size) comes before anything the
# storage decides, so the disk run would repeat the same path in one more torchrun
@pytest.mark.parametrize("trained", ["cpu"], indirect=True)
def test_resume_with_another_number_of_processes_is_refused_in_one_line(trained):
    out, _, storage = trained
    done = torchrun(1, "--output_dir", str(out), "--mode", "resume", "--storage", storage)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: lawa state holds the shards of a sharded EMA saved by 2 processes but this run has 1; "
                      "resume with 2 processes, or start a new window"], done.stderr[-3000:]


@pytest.mark.slow
def test_trainer_hooks_and_save_lawa_next_to_gather_on_every_process(tmp_path):
    """The trainer's track save hook and save_lawa_next_to, called on every process, gather a sharded window;
    a save left to the main process alone would wait in the gather until the timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(SCRIPT.parent / "fsdp_saves.py"), "--output_dir", str(tmp_path)],
                              env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("a gathering save hung: it was not called on every process")
    assert done.returncode == 0, done.stderr[-3000:]
    reference = load_file(tmp_path / "reference.safetensors")
    assert max_diff(folder_weights(tmp_path / "checkpoint" / "unet_lawa"), reference) <= 1e-6
    assert max_diff(folder_weights(tmp_path / "unet_lawa"), reference) <= 1e-6


@pytest.mark.slow
def test_four_processes_with_empty_conv_out_shards(tmp_path):
    """A 3-channel conv_out over 4 processes: the last process's shards of its weight and bias are empty
    ((0, 8, 3, 3), (0,)); snapshots, the gathered folder and the state save work whatever torch's unflatten
    does with zero-element tensors (here the variant that returns shape [0])."""
    done = torchrun(4, "--output_dir", str(tmp_path), "--storage", "cpu", "--flat_empties")
    assert done.returncode == 0, done.stderr[-3000:]
    empty = json.loads((tmp_path / "empty_shards.rank3.json").read_text())
    assert [0, 8, 3, 3] in empty and [0] in empty
    assert max_diff(folder_weights(tmp_path / "unet_lawa"), load_file(tmp_path / "reference.safetensors")) <= 1e-6
    assert max_diff(load_file(tmp_path / "swapped.safetensors"), load_file(tmp_path / "reference.safetensors")) <= 1e-6
