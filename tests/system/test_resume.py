"""Resume: a run killed after a checkpoint and restarted ends with LAWA weights bitwise equal to an
uninterrupted run, for each storage mode; a model of another shape is refused on resume.

Training processes run ``tests/scripts/engine_train.py``. They are forked from a server process that
has imported torch, diffusers and accelerate once (see ``--serve`` there), so each run is a fresh
process without paying the import time again.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.helpers import BASE_ARGS, ENGINE_SCRIPT, ENGINES, log_text, read_events, read_weights, reference_run, run_ok


def load_script():
    spec = importlib.util.spec_from_file_location("engine_train", ENGINE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_after_a_crash_is_bitwise_equal_for_each_storage(engine_server, tmp_path_factory, tmp_path):
    reference = read_weights(reference_run(engine_server, tmp_path_factory, BASE_ARGS))
    run_dir, events = tmp_path / "run", tmp_path / "events.jsonl"
    argv = ["--output_dir", str(run_dir)] + BASE_ARGS
    env = {"LAWA_TEST_EVENTS": str(events)}
    # killed abruptly at step 21: checkpoints 8 and 16 exist, disk snapshots 18 and 20 were written after
    assert engine_server.run(argv + ["--crash_after_step", "21"], env) == 3, log_text(engine_server)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
    run_ok(engine_server, argv + ["--resume", "latest"], env)
    resumed = [e for e in read_events(events) if e["event"] == "resumed"][-1]
    assert resumed["step"] == 16
    assert all(steps == [12, 14, 16] for steps in resumed["snapshot_steps"].values())
    result = read_weights(run_dir)
    assert torch.equal(result["ema"], reference["ema"])
    for name in ENGINES:
        assert not torch.equal(reference[name], reference["ema"])  # the average is not the EMA itself
        assert torch.equal(result[name], reference[name]), f"{name}: resumed LAWA differs from the uninterrupted run"
    # the resumed disk window holds exactly the latest k snapshots: those of the crashed run are gone
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == [
        f"lawa_disk_main-step{s:09d}.safetensors" for s in (36, 38, 40)]


@pytest.mark.parametrize("change, message", [
    (["--channels", "8,32"], r"lawa source tensor \d+ has shape .* but the saved LAWA state has"),
    (["--layers_per_block", "2"], r"lawa source has \d+ tensors but the saved LAWA state has \d+"),
])
def test_resume_with_another_model_is_refused(engine_server, tmp_path_factory, tmp_path, change, message):
    from accelerate import Accelerator

    from lawa_diffusion import attach

    checkpoint = reference_run(engine_server, tmp_path_factory, BASE_ARGS) / "checkpoint-40"
    script = load_script()
    args = script.parse_args(["--output_dir", str(tmp_path)] + BASE_ARGS + change)
    unet = script.make_unet(args)
    _, engines = script.make_engines(args, unet)
    for lawa in engines:
        accelerator = Accelerator(cpu=True)
        attach(accelerator, lawa)
        with pytest.raises(ValueError, match=message):
            accelerator.load_state(str(checkpoint))
        lawa.close()
