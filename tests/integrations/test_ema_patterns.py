"""LAWA only observes, whichever way it is added, and copes with every EMA pattern of diffusers' examples.

tests/scripts/ema_patterns.py draws its noise, timesteps and flips from the global torch / NumPy /
``random`` generators, as the examples do. References are runs of the same script without LAWA: the
seeded run with LAWA (API, patched script, launch plugin) must train bitwise the same weights and end
with the same generator states, and every ``*_lawa`` folder must be the float64 mean of the latest k
``*_ema`` folders the reference saved at the snapshot steps.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lawa_diffusion import launch
from lawa_diffusion.engine.lawa import read_record
from lawa_diffusion.integrations import plugin_options
from lawa_diffusion.integrations import script_patcher as patch
from lawa_diffusion.integrations.plugin import RUN_FILE
from tests.helpers import (
    CKPT,
    EMA_PATTERNS_SCRIPT,
    LAWA_ARGS,
    NU,
    ROOT,
    SCRIPTS,
    STEPS,
    K,
    assert_weights_close,
    fresh_accelerate,
    mean_of,
    weights,
)

API_ARGS = ["--api", "--api_k", str(K), "--api_every_n_steps", str(NU)]
PATTERNS = {"from_pretrained": [], "offload": ["--offload_ema"], "foreach": ["--foreach_ema"],
            "two_emas": ["--num_emas", "2"], "zero3_block": ["--zero3_block"]}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models on one thread (see conftest.one_thread)."""


def names_of(extra: list[str]) -> list[str]:
    return ["unet", "prior"] if "--num_emas" in extra else ["unet"]


def run(script: Path, out: Path, *extra: str, plugin: bool = False, plugin_args: tuple = ()) -> int:
    args = ["--output_dir", str(out), "--max_train_steps", str(STEPS), *extra]
    with fresh_accelerate():
        if plugin:
            return launch.main([*LAWA_ARGS, *plugin_args, str(script), *args])
        launch.run_script(str(script), args)
        return 0


def patched_script(tmp_path: Path) -> Path:
    out = tmp_path / "ema_patterns_patched.py"
    patch.patch_file(str(EMA_PATTERNS_SCRIPT), str(out))
    return out


def expected_lawa(reference: Path, name: str, step: int) -> dict:
    steps = list(range(NU, step + 1, NU))[-K:]
    return mean_of([reference / f"checkpoint-{s}" / f"{name}_ema" for s in steps])


def rng_end(out: Path) -> dict:
    return torch.load(out / "rng_end.pt", weights_only=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Runs without LAWA, saving every EMA at every snapshot step, per pattern (made on first use)."""
    base, made = tmp_path_factory.mktemp("reference"), {}

    def get(pattern: str) -> Path:
        if pattern not in made:
            made[pattern] = base / pattern
            run(EMA_PATTERNS_SCRIPT, made[pattern], "--checkpointing_steps", str(NU), *PATTERNS[pattern])
        return made[pattern]

    return get


# --------------------------------------------------------------------------------- observer
def assert_same_training(run_dir: Path, reference: Path, names: list[str]) -> None:
    for name in names:
        for folder in (f"raw_{name}", f"{name}_ema", f"checkpoint-{CKPT}/{name}"):
            assert_weights_close(weights(run_dir / folder), weights(reference / folder), atol=0)
    ours, theirs = rng_end(run_dir), rng_end(reference)
    assert torch.equal(ours["torch"], theirs["torch"])
    assert np.array_equal(ours["numpy"], theirs["numpy"]) and ours["random"] == theirs["random"]


@pytest.mark.parametrize("way", ["api", "patch", "plugin"])
def test_lawa_leaves_a_seeded_run_bitwise_unchanged(way, tmp_path):
    extra = ["--checkpointing_steps", str(NU), "--num_emas", "2"]  # LAWA folders at every checkpoint
    plain = tmp_path / "plain"
    run(EMA_PATTERNS_SCRIPT, plain, *extra)
    out = tmp_path / way
    if way == "api":
        run(EMA_PATTERNS_SCRIPT, out, *extra, *API_ARGS)
    elif way == "patch":
        run(patched_script(tmp_path), out, *extra, *LAWA_ARGS)
    else:
        assert run(EMA_PATTERNS_SCRIPT, out, *extra, plugin=True) == 0
    assert_same_training(out, plain, ["unet", "prior"])
    # LAWA really wrote folders and averaged between the steps compared above (else nothing was tested).
    for name in ("unet", "prior"):
        assert_weights_close(weights(out / f"{name}_lawa"), expected_lawa(plain, name, STEPS))
    if way != "api":
        assert (out / f"checkpoint-{NU}" / "unet_lawa").is_dir() and (out / f"checkpoint-{NU}" / "prior_lawa").is_dir()


@pytest.mark.filterwarnings("ignore:FID from")
def test_fid_monitor_leaves_a_seeded_run_bitwise_unchanged(tmp_path, monkeypatch):
    from lawa_diffusion.evaluation import inception
    from lawa_diffusion.utils.files import read_jsonl
    from tests.helpers import make_images

    monkeypatch.setattr(inception, "load_extractor", lambda *a, **k: inception.stand_in_extractor(dim=16))
    extra = ["--checkpointing_steps", str(CKPT)]
    plain, out = tmp_path / "plain", tmp_path / "fid"
    run(EMA_PATTERNS_SCRIPT, plain, *extra)
    fid = ["--lawa_fid_every_n_steps", str(NU), "--lawa_fid_reference", str(make_images(tmp_path / "images")),
           "--lawa_fid_num_samples", "4", "--lawa_fid_batch_size", "4", "--lawa_fid_num_inference_steps", "2"]
    assert run(EMA_PATTERNS_SCRIPT, out, *extra, plugin=True, plugin_args=tuple(fid)) == 0
    assert_same_training(out, plain, ["unet"])
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["variant"]) for r in rows] == [(s, v) for s in range(NU, STEPS + 1, NU) for v in ("ema", "lawa")]


def _generator_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def test_lawa_folders_draw_no_random_numbers(tmp_path):
    from diffusers import UNet2DModel

    from lawa_diffusion import LAWAEMAModel
    from lawa_diffusion.integrations.plugin import Plugin
    from tests.helpers import tiny_unet

    unet = tiny_unet()
    ema = LAWAEMAModel(unet.parameters(), model_cls=UNet2DModel, model_config=unet.config, lawa={"k": 2, "every_n_steps": 1})
    ema.step(unet.parameters())
    before = _generator_states()
    ema.lawa.save_pretrained(tmp_path / "unet_lawa")
    Plugin(plugin_options.resolve_options({}, {})).write_lawa(ema, str(tmp_path / "plugin_lawa"))
    after = _generator_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    for folder in ("unet_lawa", "plugin_lawa"):
        assert_weights_close(weights(tmp_path / folder), {k: v.double() for k, v in unet.state_dict().items()}, atol=0)


# --------------------------------------------------------------------------------- patterns
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("way", ["plugin", "patch"])
def test_every_ema_pattern_gets_its_lawa_folders(pattern, way, reference, tmp_path):
    # Checkpoints at the reference's steps: diffusers' EMAModel.save_pretrained itself draws from the
    # global generator (it builds a model to save), so the script trains alike only with the same saves.
    extra = ["--checkpointing_steps", str(NU), *PATTERNS[pattern]]
    out = tmp_path / "run"
    if way == "plugin":
        assert run(EMA_PATTERNS_SCRIPT, out, *extra, plugin=True) == 0
    else:
        run(patched_script(tmp_path), out, *extra, *LAWA_ARGS)
    ref = reference(pattern)
    for name in names_of(extra):
        for step in range(NU, STEPS + 1, NU):
            assert_weights_close(weights(out / f"checkpoint-{step}" / f"{name}_lawa"), expected_lawa(ref, name, step))
        assert_weights_close(weights(out / f"{name}_lawa"), expected_lawa(ref, name, STEPS))
        assert_weights_close(weights(out / f"{name}_ema"), weights(ref / f"{name}_ema"), atol=0)


def _killed(server, out: Path, *extra: str, crash_at: int) -> None:
    """A plugin run (``python -m lawa_diffusion.launch``, forked from the launch server) that ends abruptly."""
    code = server.run([*LAWA_ARGS, str(EMA_PATTERNS_SCRIPT), "--output_dir", str(out), "--max_train_steps", str(STEPS),
                       "--crash_after_step", str(crash_at), *extra])
    assert code == 3, server.stderr_of()[-2000:]


def test_resume_through_from_pretrained_and_load_state_dict_continues_every_window(launch_server, tmp_path):
    extra = ["--checkpointing_steps", str(CKPT), "--num_emas", "2", "--offload_ema", "--foreach_ema"]
    full = tmp_path / "full"
    assert run(EMA_PATTERNS_SCRIPT, full, *extra, plugin=True) == 0
    resumed = tmp_path / "resumed"
    _killed(launch_server, resumed, *extra, crash_at=CKPT + 2)
    assert not (resumed / f"checkpoint-{STEPS}").exists()
    assert run(EMA_PATTERNS_SCRIPT, resumed, *extra, "--resume_from_checkpoint", "latest", plugin=True) == 0
    for name in ("unet_lawa", "prior_lawa", f"checkpoint-{STEPS}/unet_lawa", f"checkpoint-{STEPS}/prior_lawa"):
        assert_weights_close(weights(resumed / name), weights(full / name), atol=0)


def test_module_target_runs_like_the_script(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text(EMA_PATTERNS_SCRIPT.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    as_module, as_script = tmp_path / "module_run", tmp_path / "script_run"
    args = ["--output_dir", str(as_module), "--max_train_steps", str(STEPS)]
    with fresh_accelerate():
        assert launch.main([*LAWA_ARGS, "-m", "pkg.train", *args]) == 0
    assert run(EMA_PATTERNS_SCRIPT, as_script, plugin=True) == 0
    assert read_record(as_module / "unet_lawa")["snapshot_steps"] == [6, 8]
    assert_weights_close(weights(as_module / "unet_lawa"), weights(as_script / "unet_lawa"), atol=0)


# --------------------------------------------------------------------------------- bad input
def _one_error_line(code: int, capsys) -> str:
    assert code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lawa_diffusion.launch: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_module_that_cannot_be_imported_is_one_line(capsys):
    err = _one_error_line(launch.main(["-m", "no_such_package_here.train"]), capsys)
    assert "no_such_package_here.train" in err and "cannot be imported" in err and "PYTHONPATH" in err


@pytest.fixture()
def checkpointed(launch_server, tmp_path) -> Path:
    """A plugin run killed after its first checkpoint (k=2, nu=2)."""
    out = tmp_path / "run"
    _killed(launch_server, out, "--checkpointing_steps", str(CKPT), crash_at=CKPT + 1)
    return out


@pytest.mark.parametrize("option, value", [("--lawa_k", "3"), ("--lawa_every_n_steps", "4")])
def test_resume_with_another_window_is_refused(checkpointed, option, value, capsys):
    args = ["--output_dir", str(checkpointed), "--max_train_steps", str(STEPS), "--resume_from_checkpoint", "latest"]
    with fresh_accelerate():
        code = launch.main([*LAWA_ARGS, option, value, str(EMA_PATTERNS_SCRIPT), *args])
    err = _one_error_line(code, capsys)
    saved = {"--lawa_k": K, "--lawa_every_n_steps": NU}[option]
    assert f"resume with {option} {saved}" in err and str(checkpointed / f"checkpoint-{CKPT}") in err


def test_resume_with_another_world_size_is_refused(checkpointed, capsys):
    (checkpointed / f"checkpoint-{CKPT}" / RUN_FILE).write_text(json.dumps({"world_size": 2}))
    args = ["--output_dir", str(checkpointed), "--max_train_steps", str(STEPS), "--resume_from_checkpoint", "latest"]
    with fresh_accelerate():
        err = _one_error_line(launch.main([*LAWA_ARGS, str(EMA_PATTERNS_SCRIPT), *args]), capsys)
    assert "written by 2 process(es) but this run has 1" in err and "--num_processes 2" in err


def test_ema_that_no_longer_matches_the_window_is_refused(checkpointed, launch_server, tmp_path, capsys):
    wider = tmp_path / "wider"
    _killed(launch_server, wider, "--checkpointing_steps", str(CKPT), "--width", "12", crash_at=CKPT + 1)
    state = "lawa_state_lawa.safetensors"  # the window of a wider model in this run's checkpoint
    (checkpointed / f"checkpoint-{CKPT}" / state).write_bytes((wider / f"checkpoint-{CKPT}" / state).read_bytes())
    args = ["--output_dir", str(checkpointed), "--max_train_steps", str(STEPS), "--resume_from_checkpoint", "latest"]
    with fresh_accelerate():
        err = _one_error_line(launch.main([*LAWA_ARGS, str(EMA_PATTERNS_SCRIPT), *args]), capsys)
    assert "has shape" in err and "use the same model" in err


@pytest.mark.slow
def test_sharded_fsdp_ema_keeps_a_gathered_lawa_in_every_checkpoint(tmp_path):
    """FSDP2: each process keeps its shard's window; save_state (every process) gathers the LAWA folder."""
    script = SCRIPTS / "fsdp_ema.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "lawa_diffusion.launch", "--lawa_k", "2", "--lawa_every_n_steps", "2", str(script),
                           "--output_dir", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]  # a save left to one process would hang until the timeout
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    steps = load_file(str(out / "ema_steps.safetensors"))
    lawa = dict(UNet2DModel.from_pretrained(out / "checkpoint" / "unet_lawa").named_parameters())
    for name, p in lawa.items():
        expected = (steps[f"2/{name}"].double() + steps[f"4/{name}"].double()) / 2
        assert (p.detach().double() - expected).abs().max().item() <= 1e-6, name
    assert sorted(f for f in os.listdir(out / "checkpoint") if f.startswith("lawa_state")) == [
        "lawa_state_lawa.rank0.safetensors", "lawa_state_lawa.rank1.safetensors"]
