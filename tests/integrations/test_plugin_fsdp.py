"""The launch plugin trains an unmodified diffusers-style ``--use_ema`` script whose model FSDP2 shards.

tests/scripts/train_unconditional_style.py ``--fsdp2_cpu`` makes its EMA from the full weights, then shards the
model with ``fully_shard`` where ``accelerator.prepare`` would (2 gloo processes), saves state on every process
and leaves ``unet_ema`` to the main process's save hook, as diffusers' examples do. References, independent of
the plugin:

- ``unet_ema`` of every checkpoint: the float64 EMA recursion (diffusers' warm-up decay, written out here) over
  the trained weights the script gathered into the same checkpoints (``fsdp_model.safetensors``). An unsharded
  1-process run is no exact reference: there each batch is not split over 2 processes whose gradients are
  averaged, so its float sums, and its weights, differ.
- a run killed after step 5 and resumed from ``checkpoint-4`` ends with the uninterrupted run's EMA, LAWA and
  final pipeline weights.
- ``unet_lawa``: the float64 mean of the gathered ``unet_ema`` folders of the window's snapshot steps.
- the post-hoc power EMAs (kept and stored in parts) and FID during training: the resumed run's snapshots and
  metrics rows are the uninterrupted run's.

What the plugin refuses over a sharded EMA is tested in one process, in test_plugin_sharded_ema.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lawa_diffusion.engine.lawa import read_record
from tests.helpers import SCRIPTS, assert_weights_close, make_images, mean_of, torchrun, weights, without_timing

SCRIPT = "train_unconditional_style.py"
K, NU = 2, 2
STEPS = 6  # 2 processes x batch 2 over 8 images: 2 steps an epoch, 3 epochs
LAWA = ["--lawa_k", str(K), "--lawa_every_n_steps", str(NU)]
POSTHOC = ["--lawa_posthoc_sigma_rels", "0.05,0.10", "--lawa_posthoc_every_n_steps", "1"]
TRACKS = ("sigma_rel_0.05", "sigma_rel_0.1")
ENV = {"ACCELERATE_USE_CPU": "1"}  # torchrun on CPU: MULTI_CPU (gloo)
CKPT, CRASH = 2, 5  # the killed run: checkpoints 2 and 4, killed after step 5; the resumed run redoes 5 and 6


def script_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--train_data_dir", str(data), "--output_dir", str(out), "--use_ema", "--fsdp2_cpu",
            "--num_epochs", str(STEPS // 2), "--train_batch_size", "2", *extra]


def run(data: Path, out: Path, *extra: str, expect: int = 0):
    fid = ["--lawa_fid_every_n_steps", "3", "--lawa_fid_reference", str(data), "--lawa_fid_num_samples", "4",
           "--lawa_fid_batch_size", "2", "--lawa_fid_num_inference_steps", "2"]
    # zero3_cpu.py launch: the plugin with a stand-in feature extractor for its FID monitor (no DeepSpeed here)
    done = torchrun("zero3_cpu.py", 2, "launch", *LAWA, *POSTHOC, *fid, str(SCRIPTS / SCRIPT),
                    *script_args(data, out, *extra), env=ENV, timeout=600)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted sharded run checkpointing every step, and a killed one resumed from its latest checkpoint."""
    root = tmp_path_factory.mktemp("fsdp_plugin")
    data = make_images(root / "images")
    run(data, root / "full", "--checkpointing_steps", "1")
    # killed: torchrun exits with 1 when its processes die
    run(data, root / "resumed", "--checkpointing_steps", str(CKPT), "--crash_after_step", str(CRASH), expect=1)
    assert sorted(p.name for p in (root / "resumed").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    run(data, root / "resumed", "--checkpointing_steps", str(CKPT), "--resume_from_checkpoint", "latest")
    return root / "full", root / "resumed"


def diffusers_warmup_decay(step: int) -> float:
    """The script's EMA decay at optimizer step ``step`` (use_ema_warmup, inv_gamma 1, power 3/4, max 0.9999)."""
    n = step - 1
    return 0.0 if n <= 0 else min(1.0 - (1.0 + n) ** -0.75, 0.9999)


def window(step: int) -> list[int]:
    return list(range(NU, step + 1, NU))[-K:]


@pytest.mark.slow
def test_gathered_ema_folders_follow_the_float64_ema_of_the_trained_weights(runs):
    full, _ = runs
    ema = None
    for step in range(1, STEPS + 1):
        trained = {k: v.double() for k, v in load_file(full / f"checkpoint-{step}" / "fsdp_model.safetensors").items()}
        d = diffusers_warmup_decay(step)
        ema = trained if ema is None else {k: d * ema[k] + (1.0 - d) * trained[k] for k in trained}
        assert_weights_close(weights(full / f"checkpoint-{step}" / "unet_ema"), ema, atol=1e-6)
    assert max((ema[k] - trained[k]).abs().max().item() for k in ema) > 1e-3  # the EMA is not the trained weights
    # the EMA was sharded: each process kept its own shard's LAWA window
    last = full / f"checkpoint-{STEPS}"
    assert sorted(p.name for p in last.glob("lawa_state_*")) == [f"lawa_state_lawa.rank{r}.safetensors" for r in (0, 1)]
    # the final pipeline holds the EMA weights, copied into the sharded model on every process
    assert_weights_close(weights(full / "unet"), weights(last / "unet_ema"), atol=0)


@pytest.mark.slow
def test_lawa_folders_are_the_mean_of_the_gathered_ema_at_the_snapshot_steps(runs):
    full, resumed = runs
    for run_dir, steps in ((full, range(NU, STEPS + 1)), (resumed, (4, 6))):
        for step in steps:
            folder = run_dir / f"checkpoint-{step}" / "unet_lawa"
            assert read_record(folder)["snapshot_steps"] == window(step)
            expected = mean_of([full / f"checkpoint-{s}" / "unet_ema" for s in window(step)])
            assert_weights_close(weights(folder), expected, atol=1e-6)
    gap = max((weights(full / "checkpoint-6" / "unet_lawa")[k] - v).abs().max().item()
              for k, v in weights(full / "checkpoint-6" / "unet_ema").items())
    assert gap > 1e-4  # LAWA is not the EMA itself


@pytest.mark.slow
def test_killed_and_resumed_run_ends_with_the_uninterrupted_runs_weights(runs):
    full, resumed = runs
    for name in (f"checkpoint-{STEPS}/unet_ema", f"checkpoint-{STEPS}/unet_lawa", "unet"):
        a, b = weights(resumed / name), weights(full / name)
        assert_weights_close(a, b, atol=1e-6)
        assert all(torch.equal(a[k], b[k]) for k in a), name  # the same float operations: bitwise


@pytest.mark.slow
def test_post_hoc_emas_and_fid_follow_the_sharded_ema_and_resume_exactly(runs):
    """The power EMAs are kept in parts and stored by both processes (read here on one); the resumed run stores and
    scores what the uninterrupted one did, bitwise; FID samples the gathered EMA and LAWA weights."""
    from lawa_diffusion.posthoc.snapshot_reader import load_tensors

    full, resumed = runs
    for track in TRACKS:
        stored = sorted(p.name for p in (full / "ema_snapshots" / track).iterdir())
        assert stored == [f"step-{s:09d}" for s in range(1, STEPS + 1)]
        assert sorted(p.name for p in (resumed / "ema_snapshots" / track).iterdir()) == stored
        for name in stored:
            record = json.loads((full / "ema_snapshots" / track / name / "snapshot.json").read_text())
            assert record["layout"] == "dtensor" and record["world_size"] == 2
            a = load_tensors(str(resumed / "ema_snapshots" / track / name))
            b = load_tensors(str(full / "ema_snapshots" / track / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), (track, name)
    assert sorted(p.name for p in (resumed / "checkpoint-4").glob("posthoc_state*")) == [
        f"posthoc_state.rank-0000{r}-of-00002.safetensors" for r in (0, 1)]
    rows = [without_timing([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()])
            for d in (full, resumed)]
    assert [(r["step"], r["variant"]) for r in rows[0]] == [(s, v) for s in (3, 6) for v in ("ema", "lawa")]
    assert rows[1] == rows[0] and rows[0][2]["fid"] != rows[0][3]["fid"]
