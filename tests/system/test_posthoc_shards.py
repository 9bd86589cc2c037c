"""Post-hoc power EMAs kept in parts under FSDP2 and ZeRO-3 (each process steps and stores its part through
torch.distributed.checkpoint) and by the storing process alone under DDP; tests/scripts/posthoc_shards.py under
torchrun, 2 or 4 CPU processes on gloo.

The reference is an unsharded store of the same run: post-hoc EMAs fed the full weights gathered after every
step, stored whole by the main process. The ZeRO-3 run is killed (SIGKILL) after step 4 with a checkpoint at step 3
and resumed, the reference replaying the training from step 1 (it never resumes); an FSDP2 run killed and resumed
through the launch plugin is tests/integrations/test_plugin_fsdp.py's. Every snapshot of a sharded store, read on
this one process, must equal the reference's, and so must a target synthesised from each store. 4 processes leave
one process without a row of the 3-row ``conv_out``.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, SCRIPTS

SCRIPT = str(SCRIPTS / "posthoc_shards.py")
TRACKS = ("sigma_rel_0.05", "sigma_rel_0.1")
STEPS = 6
DS_CONFIG = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3}}


def launch(out: Path, mode: str, processes: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [SCRIPT]
    if mode == "zero3":
        config = out.parent / "ds_config.json"
        config.write_text(json.dumps(DS_CONFIG))
        env.update(DS_ACCELERATOR="cpu", ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(config))
        env.pop("ACCELERATE_USE_CPU", None)
        command = [str(SCRIPTS / "zero3_cpu.py"), "script", SCRIPT]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(processes), *command, "--mode", mode, "--output_dir", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=600)


def killed_and_resumed(out: Path, mode: str) -> Path:
    killed = launch(out, mode, 2, "--checkpoint_at", "3", "--kill_after", "4")
    assert killed.returncode != 0 and "SIGKILL" in killed.stderr, killed.stderr[-3000:]
    stored = sorted(os.listdir(out / "sharded" / "ema_snapshots" / TRACKS[0]))
    assert stored == [f"step-{s:09d}" for s in range(1, 5)]  # step 4 lies past the checkpoint: dropped on resume
    resumed = launch(out, mode, 2, "--checkpoint_at", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("posthoc_shards")
    done = {}
    for name, mode, processes in (("fsdp2", "fsdp2", 2), ("fsdp2_4", "fsdp2", 4), ("ddp", "ddp", 2)):
        run = launch(tmp / name, mode, processes)
        assert run.returncode == 0, run.stderr[-3000:]
        done[name] = tmp / name
    if _has_deepspeed():
        done["zero3"] = killed_and_resumed(tmp / "zero3", "zero3")
    return done


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def held(run: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted(run.glob("held.rank*.json"))]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


SHARDED = ["fsdp2", "fsdp2_4", "zero3"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARDED)
def test_every_snapshot_read_on_one_process_equals_the_unsharded_store(runs, name):
    from lawa_diffusion.posthoc.snapshot_reader import load_tensors

    if name not in runs:
        pytest.skip("deepspeed is not installed")
    run = runs[name]
    for track in TRACKS:
        folders = sorted((run / "sharded" / "ema_snapshots" / track).iterdir())
        assert [f.name for f in folders] == [f"step-{s:09d}" for s in range(1, STEPS + 1)]
        for folder in folders:
            record = json.loads((folder / "snapshot.json").read_text())
            assert record["world_size"] == (4 if name == "fsdp2_4" else 2) and record["track"] == track
            mine = load_tensors(str(folder))
            whole = load_file(str(run / "whole" / "ema_snapshots" / track / f"{folder.name}.safetensors"))
            assert mine.keys() == whole.keys()
            for key, value in whole.items():
                assert mine[key].shape == value.shape
                assert relative(mine[key], value) <= 1e-6, (folder, key)
    assert not glob.glob(str(run / "sharded" / "ema_snapshots" / "*" / ".*.tmp"))


@pytest.mark.slow
def test_dcp_reads_the_store_as_this_package_does_and_an_empty_shard_writes_no_part(runs):
    import torch.distributed.checkpoint as dcp

    from lawa_diffusion.posthoc.snapshot_reader import load_tensors

    folder = runs["fsdp2_4"] / "sharded" / "ema_snapshots" / TRACKS[1] / f"step-{STEPS:09d}"
    mine = load_tensors(str(folder))
    theirs = {k: torch.empty(v.numel(), dtype=v.dtype) for k, v in mine.items()}
    with pytest.warns(UserWarning):  # "assuming the intent is to load in a single process": no process group
        dcp.load(theirs, storage_reader=dcp.HuggingFaceStorageReader(str(folder)), no_dist=True)
    for key, value in mine.items():
        assert torch.equal(theirs[key], value.reshape(-1)), key
    shards = sorted(folder.glob("shard-*.safetensors"))
    assert len(shards) == 4
    holding = [set(load_file(str(s))) for s in shards]
    assert [("conv_out.weight" in h) for h in holding] == [True, True, True, False]  # 3 rows over 4 processes


@pytest.mark.slow
@pytest.mark.parametrize("name", SHARDED)
def test_a_target_synthesised_from_the_sharded_store_equals_the_unsharded_one(runs, name):
    from lawa_diffusion.posthoc.synthesize import plan_syntheses, synthesize_states

    if name not in runs:
        pytest.skip("deepspeed is not installed")
    targets = ["sigma_rel=0.08", "lawa:k=3,nu=1,over=sigma_rel_0.05"]
    ours = synthesize_states(plan_syntheses(str(runs[name] / "sharded"), targets), progress=False)
    reference = synthesize_states(plan_syntheses(str(runs[name] / "whole"), targets), progress=False)
    for mine, whole in zip(ours, reference):
        for key, value in whole.items():
            assert relative(mine[key], value) <= 1e-6, key


@pytest.mark.slow
def test_memory_per_process_sharded_is_a_part_ddp_only_the_storing_process(runs):
    """Bytes of post-hoc EMA weights each process holds (2 tracks, float32)."""
    for name, world in (("fsdp2", 2), ("fsdp2_4", 4), ("zero3", 2)):
        if name not in runs:
            continue
        ranks = held(runs[name])
        full = 2 * ranks[0]["model"]
        assert len(ranks) == world and sum(r["sharded"] for r in ranks) == full
        assert max(r["sharded"] for r in ranks) <= full / world * 1.05, ranks
        assert [r["whole"] for r in ranks] == [full] + [0] * (world - 1)  # the unsharded reference: main only
    ranks = held(runs["ddp"])
    assert [r["sharded"] for r in ranks] == [2 * ranks[0]["model"], 0] and ranks[0]["layout"] is None
    stored = sorted(os.listdir(runs["ddp"] / "sharded" / "ema_snapshots" / TRACKS[0]))
    assert stored == [f"step-{s:09d}.safetensors" for s in range(1, STEPS + 1)]  # whole files, as on one process


@pytest.mark.slow
def test_average_of_the_latest_sharded_snapshots_equals_the_unsharded_one(runs, tmp_path):
    from lawa_diffusion.cli import entry as cli

    outs = {}
    for kind in ("sharded", "whole"):
        outs[kind] = tmp_path / kind
        assert cli.main(["average", str(runs["fsdp2_4"] / kind), "--track", TRACKS[1], "--k", "3", "-o",
                         str(outs[kind])]) == 0
    mine, whole = (load_file(str(outs[k] / "diffusion_pytorch_model.safetensors")) for k in ("sharded", "whole"))
    assert mine.keys() == whole.keys() and all(relative(mine[k], whole[k]) <= 1e-6 for k in whole)
