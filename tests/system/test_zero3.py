"""Real DeepSpeed ZeRO-3 (2 CPU processes under torchrun, gloo): the diffusers-style script with ``--use_ema``
through the launch plugin (with its FID monitor and post-hoc EMAs; killed after step 3 and resumed), through a
``lawa-diffusion patch``-ed copy (``LAWAEMAModel`` + ``attach`` + ``save_lawa_next_to``), and the API by
hand (tests/scripts/zero3_api.py: LAWA copied into the partitioned model inside ``GatheredParameters``).

Parameters are ZeRO-3 partitions; the EMA, made from the model before ``accelerator.prepare``, keeps full
tensors on every process and steps through diffusers' ``GatheredParameters``. The reference is the same
script without LAWA (diffusers given the ``deepspeed`` name it imports itself when ZeRO-3 is on at import),
checkpointing its EMA at every snapshot step: LAWA must equal the float64 mean of those EMA folders, and
the trained weights must be bitwise those of the reference.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, SCRIPTS, make_images

SCRIPT = SCRIPTS / "train_unconditional_style.py"
RUNNER = SCRIPTS / "zero3_cpu.py"
K, NU, STEPS = 2, 2, 4  # 8 images, 2 per process and step: 2 steps per epoch, 2 epochs
LAWA = ["--lawa_k", str(K), "--lawa_every_n_steps", str(NU)]
WEIGHTS = "diffusion_pytorch_model.safetensors"
POSTHOC = ["--lawa_posthoc_sigma_rels", "0.05,0.10", "--lawa_posthoc_every_n_steps", "1"]
TRACKS = {"sigma_rel_0.05": 0.05, "sigma_rel_0.1": 0.10}
DS_CONFIG = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3}, "gradient_clipping": 1.0}  # 4 = 2 per process x 1 x 2 processes


def torchrun(tmp: Path, *argv: str) -> subprocess.CompletedProcess:
    config = tmp / "ds_config.json"
    if not config.exists():
        config.write_text(json.dumps(DS_CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(config), "PYTHONPATH": str(ROOT)}
    env.pop("ACCELERATE_USE_CPU", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(RUNNER), *argv], env=env, capture_output=True, text=True, timeout=600)


def script_args(data: Path, out: Path, *extra: str) -> list:
    return ["--train_data_dir", str(data), "--output_dir", str(out), "--use_ema", "--num_epochs", "2",
            "--train_batch_size", "2", "--checkpointing_steps", str(NU), "--save_raw_weights", *extra]


def weights(folder: Path) -> dict:
    return {k: v.double() for k, v in load_file(str(folder / WEIGHTS)).items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("deepspeed")
    from lawa_diffusion.cli import entry as cli

    tmp = tmp_path_factory.mktemp("zero3")
    data = make_images(tmp / "data")
    patched = tmp / "patched.py"
    assert cli.main(["patch", str(SCRIPT), "-o", str(patched)]) == 0
    fid = ["--lawa_fid_every_n_steps", str(NU), "--lawa_fid_reference", str(data), "--lawa_fid_num_samples", "4",
           "--lawa_fid_batch_size", "2", "--lawa_fid_num_inference_steps", "2", *POSTHOC]
    done = {
        "reference": torchrun(tmp, "reference", str(SCRIPT), *script_args(data, tmp / "reference")),
        "patched": torchrun(tmp, "script", str(patched), *script_args(data, tmp / "patched", *LAWA)),
        "api": torchrun(tmp, "script", str(SCRIPTS / "zero3_api.py"), "--output_dir", str(tmp / "api")),
        # the plugin run is killed after step 3 and resumed from checkpoint-2: its end is compared with the reference
        "killed": torchrun(tmp, "launch", *LAWA, *fid, str(SCRIPT), *script_args(data, tmp / "plugin", "--crash_after_step", "3")),
    }
    for track in TRACKS:  # stored by the killed run at its checkpoint step: the resumed run goes on from them
        shutil.copytree(tmp / "plugin" / "ema_snapshots" / track / "step-000000002", tmp / "killed" / track)
    done["plugin"] = torchrun(tmp, "launch", *LAWA, *fid, str(SCRIPT),
                              *script_args(data, tmp / "plugin", "--resume_from_checkpoint", "latest"))
    for name, run in done.items():
        assert (run.returncode != 0) == (name == "killed"), f"{name}: {run.stderr[-3000:]}"
    return tmp, done


@pytest.mark.slow
@pytest.mark.parametrize("how", ["plugin", "patched"])
def test_lawa_is_the_mean_of_the_reference_ema_snapshots_and_training_is_unchanged(runs, how):
    tmp, _ = runs
    ref, out = tmp / "reference", tmp / how
    expected_steps = list(range(NU, STEPS + 1, NU))[-K:]
    snapshots = [weights(ref / f"checkpoint-{s}" / "unet_ema") for s in expected_steps]
    expected = {k: torch.stack([w[k] for w in snapshots]).mean(0) for k in snapshots[0]}
    assert max_diff(weights(out / f"checkpoint-{STEPS}" / "unet_lawa"), expected) <= 1e-6
    assert max_diff(snapshots[-1], expected) > 1e-4  # the window really averages two different EMAs
    assert max_diff(weights(out / "unet_raw"), weights(ref / "unet_raw")) == 0  # trained weights: bitwise
    assert max_diff(weights(out / f"checkpoint-{STEPS}" / "unet_ema"), snapshots[-1]) == 0
    assert max_diff(weights(out / "unet"), weights(ref / "unet")) == 0  # the final pipeline (EMA weights)
    if how == "plugin":  # the LAWA twin of the final pipeline's UNet, saved with the EMA weights copied in
        assert max_diff(weights(out / "unet_lawa"), expected) <= 1e-6


@pytest.mark.slow
def test_fid_monitor_evaluates_once_per_step_and_variant(runs):
    tmp, _ = runs
    rows = [json.loads(line) for line in (tmp / "plugin" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["variant"]) for r in rows] == [(s, v) for s in (2, 4) for v in ("ema", "lawa")]
    assert rows[2]["fid"] != rows[3]["fid"]  # EMA and LAWA weights differ once the window holds 2 snapshots


@pytest.mark.slow
def test_the_plugin_run_was_killed_and_resumed_from_its_checkpoint(runs):
    """The plugin's checks above are made on a run killed after step 3 and resumed from checkpoint-2, so they
    also say that the resume is exact: weights bitwise those of the uninterrupted reference, LAWA its mean."""
    tmp, done = runs
    assert "Resuming from checkpoint checkpoint-2" in done["plugin"].stdout + done["plugin"].stderr
    assert sorted(p.name for p in (tmp / "plugin").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.slow
def test_the_plugins_post_hoc_emas_are_kept_in_parts_and_resume_exactly(runs):
    """Each process keeps and stores its part of the power EMAs, and resumes its part: after the resume from
    checkpoint-2, each track's step-3 snapshot is its step-2 snapshot (stored before the kill) moved towards the
    weights of step 3 by the track's decay, so the two tracks must name the same weights; step 4 is step 3 moved
    towards the final weights (those of the uninterrupted reference)."""
    from lawa_diffusion.engine.ema import PowerEMAModel
    from lawa_diffusion.posthoc.snapshot_reader import load_tensors

    tmp, _ = runs
    trained, implied = weights(tmp / "reference" / "unet_raw"), []
    for track, sigma_rel in TRACKS.items():
        store = tmp / "plugin" / "ema_snapshots" / track
        assert sorted(p.name for p in store.iterdir()) == [f"step-{s:09d}" for s in range(1, STEPS + 1)]
        record = json.loads((store / f"step-{STEPS:09d}" / "snapshot.json").read_text())
        assert record["layout"] == "zero3" and record["world_size"] == 2 and len(record["files"]) == 2
        beta = PowerEMAModel([torch.zeros(1)], sigma_rel=sigma_rel).get_decay
        s2 = {k: v.double() for k, v in load_tensors(str(tmp / "killed" / track)).items()}
        s3, s4 = ({k: v.double() for k, v in load_tensors(str(store / f"step-{t:09d}")).items()} for t in (3, 4))
        implied.append({k: (s3[k] - beta(3) * s2[k]) / (1 - beta(3)) for k in s3})  # the weights of step 3
        assert max_diff(s4, {k: beta(4) * s3[k] + (1 - beta(4)) * trained[k] for k in s3}) <= 1e-6
    assert max_diff(implied[0], implied[1]) <= 1e-6  # 1e-7 here; a track resumed from step 1 gives 4e-5
    assert sorted(p.name for p in (tmp / "plugin" / "checkpoint-2").glob("posthoc_state*")) == [
        "posthoc_state.rank-00000-of-00002.safetensors", "posthoc_state.rank-00001-of-00002.safetensors"]


def test_an_ema_made_from_zero3_partitions_is_refused_in_one_sentence():
    from lawa_diffusion.engine import zero3

    class Partition(torch.nn.Parameter):  # what ZeRO-3 leaves in a parameter outside a gather
        ds_id, ds_numel, ds_shape = 0, 12, (3, 4)

    with pytest.raises(ValueError, match=r"shape \(0,\) instead of \(3, 4\).*before accelerator.prepare"):
        zero3.check_ema_source([Partition(torch.empty(0))], "the launch plugin")
    zero3.check_ema_source([torch.nn.Parameter(torch.zeros(3, 4))], "the launch plugin")


@pytest.mark.slow
def test_api_copies_lawa_into_gathered_partitions_and_refuses_empty_ones(runs):
    tmp, _ = runs
    out = tmp / "api"
    reference = {k: v.double() for k, v in load_file(str(out / "reference.safetensors")).items()}
    assert max_diff(load_file(str(out / "copied.safetensors")), reference) <= 1e-6  # every partition got it
    assert max_diff(weights(out / "unet_lawa"), reference) <= 1e-6
    assert max_diff(load_file(str(out / "last_ema.safetensors")), reference) > 1e-4
    report = json.loads((out / "api.json").read_text())
    assert report["snapshot_steps"] == [2, 4]
    assert "ZeRO-3 partitioned parameters (shape (0,) instead of (8, 3, 3, 3))" in report["refused"]
    assert "GatheredParameters(params, modifier_rank=0)" in report["refused"]
