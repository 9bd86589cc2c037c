"""The launch plugin runs tests/scripts/train_unconditional_style.py unmodified and adds LAWA.

References are independent of the plugin: a run of the same script WITHOUT the plugin saves
``unet_ema`` at every snapshot step (``--checkpointing_steps`` = ν), and the expected LAWA weights
are the float64 mean of the latest k of those folders; resumed runs are compared with an
uninterrupted one.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lawa_diffusion import launch
from lawa_diffusion.config import LAWAConfig
from lawa_diffusion.engine.lawa import read_record
from lawa_diffusion.integrations import plugin_options
from lawa_diffusion.integrations.plugin import lawa_folder_for
from tests.helpers import (
    BATCH,
    EPOCHS,
    NUM_IMAGES,
    SCRIPTS,
    assert_weights_close,
    fresh_accelerate,
    make_images,
    mean_of,
    weights,
)

SCRIPT = SCRIPTS / "train_unconditional_style.py"
K, NU, CKPT = 3, 3, 4
STEPS = NUM_IMAGES // BATCH * EPOCHS  # 12 optimizer steps on one process
LAWA_ARGS = ["--lawa_k", str(K), "--lawa_every_n_steps", str(NU)]
POSTHOC_EVERY = 3
POSTHOC_ARGS = ["--lawa_posthoc_sigma_rels", "0.05,0.10", "--lawa_posthoc_every_n_steps", str(POSTHOC_EVERY)]
POSTHOC_TRACKS = ["sigma_rel_0.05", "sigma_rel_0.1"]




def script_args(data: Path, out: Path, *extra: str, epochs: int = EPOCHS) -> list[str]:
    return ["--train_data_dir", str(data), "--output_dir", str(out), "--use_ema", "--num_epochs", str(epochs),
            "--train_batch_size", str(BATCH), *extra]




def run_plain(script: Path, args: list[str]) -> None:
    """The script alone, in this process (no plugin)."""
    with fresh_accelerate():
        launch.run_script(str(script), args)


def run_plugin(argv: list[str]) -> int:
    with fresh_accelerate():
        return launch.main(argv)








def snapshot_steps(folder: Path) -> list[int]:
    return read_record(folder)["snapshot_steps"]


def expected_steps(step: int) -> list[int]:
    return [s for s in range(NU, step + 1, NU)][-K:]


# ----------------------------------------------------------------------------- runs shared by tests
@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs its tiny models on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> Path:
    """The unmodified script without the plugin, saving unet_ema at every snapshot step."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_plain(SCRIPT, script_args(data, out, "--checkpointing_steps", str(NU)))
    return out


@pytest.fixture(scope="module")
def plugin_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plugin") / "run"
    assert run_plugin([*LAWA_ARGS, *POSTHOC_ARGS, str(SCRIPT),
                       *script_args(data, out, "--checkpointing_steps", str(CKPT))]) == 0
    return out


def posthoc_files(run: Path) -> dict:
    """{(track, step): (tensors, metadata)} of the post-hoc snapshot files of a run."""
    from safetensors import safe_open

    from lawa_diffusion.runs import folder as runfolder

    found = {}
    for track in runfolder.snapshot_tracks(str(run)):
        for step, path in runfolder.list_ema_snapshots(str(run), track):
            with safe_open(path, framework="pt") as f:
                found[(track, step)] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return found


# ----------------------------------------------------------------------------- acceptance
def test_plugin_lawa_is_the_mean_of_the_latest_ema_snapshots(reference, plugin_run):
    for step in range(CKPT, STEPS + 1, CKPT):
        lawa_dir = plugin_run / f"checkpoint-{step}" / "unet_lawa"
        steps = expected_steps(step)
        assert snapshot_steps(lawa_dir) == steps
        expected = mean_of([reference / f"checkpoint-{s}" / "unet_ema" for s in steps])
        assert_weights_close(weights(lawa_dir), expected)
    # The plugin leaves training alone: same EMA weights as the run without it.
    assert_weights_close(weights(plugin_run / f"checkpoint-{STEPS}" / "unet_ema"),
                         weights(reference / f"checkpoint-{STEPS}" / "unet_ema"), atol=0)
    # LAWA is not the EMA itself (the comparison above could not pass by accident).
    last = plugin_run / f"checkpoint-{STEPS}"
    gap = max((weights(last / "unet_lawa")[k] - v).abs().max().item() for k, v in weights(last / "unet_ema").items())
    assert gap > 1e-4


def test_plugin_stores_power_emas_beside_the_scripts_ema(plugin_run):
    """The plugin run above also kept two power EMAs (and still trained the reference's weights bitwise)."""
    from lawa_diffusion.maths import lag

    files = posthoc_files(plugin_run)
    assert sorted(files) == [(t, s) for t in POSTHOC_TRACKS for s in range(POSTHOC_EVERY, STEPS + 1, POSTHOC_EVERY)]
    ema = weights(plugin_run / f"checkpoint-{STEPS}" / "unet_ema")
    for (track, step), (tensors, meta) in files.items():
        assert meta["track"] == track and meta["step"] == str(step)
        assert lag.EMATrack.from_dict(json.loads(meta["track_def"])) == lag.power_ema(sigma_rel=float(track.split("_")[-1]))
        assert json.loads(meta["model_config"])["sample_size"] == 8
        assert tensors.keys() == ema.keys() and all(t.dtype == torch.float32 for t in tensors.values())
    a, b = files[(POSTHOC_TRACKS[0], STEPS)][0], files[(POSTHOC_TRACKS[1], STEPS)][0]
    assert any(not torch.equal(a[k], b[k]) for k in a)  # two different averages
    assert (plugin_run / f"checkpoint-{CKPT}" / "posthoc_state.safetensors").is_file()


def test_plugin_writes_the_lag_plan_of_the_scripts_ema(plugin_run):
    from lawa_diffusion.config.lawa import LAWAConfig
    from lawa_diffusion.maths import lag

    saved = json.loads((plugin_run / "lag.json").read_text())
    # The script's EMA: diffusers' warm-up EMA with its --ema_* defaults; no --max_train_steps, so the
    # plan is for ten windows' worth of steps past the first snapshot.
    track = lag.EMATrack(decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    assert saved["summary"] == lag.summary_line(track, LAWAConfig(k=K, every_n_steps=NU), NU + 10 * K * NU)
    assert f"k={K}, ν={NU}" in saved["summary"]


def test_final_pipeline_save_gets_a_lawa_twin(reference, plugin_run):
    # The script saves DDPMPipeline with the EMA weights copied in; the plugin adds unet_lawa beside unet.
    assert_weights_close(weights(plugin_run / "unet"), weights(reference / "unet"), atol=0)
    expected = mean_of([reference / f"checkpoint-{s}" / "unet_ema" for s in expected_steps(STEPS)])
    assert_weights_close(weights(plugin_run / "unet_lawa"), expected)


def test_checkpoints_carry_lawa_state_and_reference_has_none(reference, plugin_run):
    assert (plugin_run / f"checkpoint-{CKPT}" / "lawa_state_lawa.safetensors").is_file()
    assert not any(reference.glob("checkpoint-*/lawa_state_*"))
    assert not any(reference.glob("**/unet_lawa"))


@pytest.mark.parametrize("storage", ["cpu", pytest.param("disk", marks=pytest.mark.slow)])
def test_killed_run_resumed_from_latest_matches_uninterrupted(data, plugin_run, launch_server, tmp_path, storage):
    out, snapshots = tmp_path / "run", tmp_path / "snapshots"
    crash_at = 2 * CKPT + 2  # after checkpoint-8, before checkpoint-12: steps 9-10 are lost
    env = {"LAWA_K": str(K), "LAWA_EVERY_N_STEPS": str(NU), "LAWA_STORAGE": storage,
           "LAWA_SNAPSHOT_DIR": str(snapshots),
           "LAWA_POSTHOC_SIGMA_RELS": "0.05,0.10", "LAWA_POSTHOC_EVERY_N_STEPS": str(POSTHOC_EVERY)}
    # python -m lawa_diffusion.launch SCRIPT ..., forked from the launch server, options from the environment only
    code = launch_server.run(
        [str(SCRIPT), *script_args(data, out, "--checkpointing_steps", str(CKPT), "--crash_after_step", str(crash_at))],
        env=env)
    stderr = launch_server.stderr_of()
    assert code == 3, stderr[-2000:]
    assert f"lawa_diffusion.launch: LAWA k={K} every_n_steps={NU} start_step=0 storage={storage}" in stderr
    assert (out / f"checkpoint-{2 * CKPT}").is_dir() and not (out / f"checkpoint-{STEPS}").exists()

    config = tmp_path / "lawa.yaml"  # the resumed run takes the same options from a YAML file
    config.write_text(f"lawa:\n  k: {K}\n  every_n_steps: {NU}\n  storage: {storage}\n  snapshot_dir: {snapshots}\n"
                      f"launch:\n  posthoc_sigma_rels: [0.05, 0.10]\n  posthoc_every_n_steps: {POSTHOC_EVERY}\n")
    assert run_plugin(["--lawa_config", str(config), str(SCRIPT),
                       *script_args(data, out, "--checkpointing_steps", str(CKPT), "--resume_from_checkpoint", "latest")]) == 0
    for name in (f"checkpoint-{STEPS}/unet_lawa", "unet_lawa"):
        assert snapshot_steps(out / name) == expected_steps(STEPS)
        assert_weights_close(weights(out / name), weights(plugin_run / name), atol=1e-6)
    # the post-hoc files of steps 9 (redone after the crash) and 12 are the uninterrupted run's, bitwise
    got, want = posthoc_files(out), posthoc_files(plugin_run)
    assert sorted(got) == sorted(want)
    for key, (tensors, meta) in want.items():
        assert got[key][1] == meta and all(torch.equal(got[key][0][k], v) for k, v in tensors.items()), key


def test_patched_script_gives_the_plugin_result(data, plugin_run, tmp_path):
    from lawa_diffusion.integrations import script_patcher as patch

    patched = tmp_path / "train_patched.py"
    patch.patch_file(str(SCRIPT), str(patched))
    out = tmp_path / "run"
    run_plain(patched, [*script_args(data, out, "--checkpointing_steps", str(CKPT)), *LAWA_ARGS])
    for step in range(CKPT, STEPS + 1, CKPT):
        name = f"checkpoint-{step}/unet_lawa"
        assert_weights_close(weights(out / name), weights(plugin_run / name), atol=0)
    assert (out / f"checkpoint-{STEPS}" / "lawa_state_lawa.safetensors").is_file()


def test_script_without_ema_is_reported_at_exit(data, tmp_path, capsys):
    args = script_args(data, tmp_path / "run", "--checkpointing_steps", "100", epochs=1)
    args.remove("--use_ema")
    assert run_plugin([str(SCRIPT), *args]) == 0
    err = capsys.readouterr().err
    assert "never created a diffusers EMAModel" in err and "--use_ema" in err


def test_plugin_restores_what_it_patched():
    import accelerate
    import diffusers.training_utils
    from diffusers.models.modeling_utils import ModelMixin

    before = (diffusers.training_utils.EMAModel, ModelMixin.save_pretrained,
              accelerate.Accelerator.save_state, accelerate.Accelerator.load_state)
    options = plugin_options.resolve_options({}, {})
    with launch.installed(options) as plugin:
        assert issubclass(diffusers.training_utils.EMAModel, before[0])
        assert diffusers.training_utils.EMAModel is plugin.ema_class
        from diffusers.training_utils import EMAModel  # what a script's import sees
        assert EMAModel is plugin.ema_class
    after = (diffusers.training_utils.EMAModel, ModelMixin.save_pretrained,
             accelerate.Accelerator.save_state, accelerate.Accelerator.load_state)
    assert after == before


# ----------------------------------------------------------------------------- options and errors
def _error_of(argv, capsys) -> str:
    assert launch.main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_unknown_lawa_option_lists_the_valid_ones(capsys):
    err = _error_of(["--lawa_kk", "5", str(SCRIPT)], capsys)
    assert "--lawa_kk" in err and "--lawa_k," in err and "--lawa_every_n_steps" in err


def test_missing_script_is_named(capsys, tmp_path):
    missing = tmp_path / "nope.py"
    err = _error_of(["--lawa_k", "2", str(missing)], capsys)
    assert str(missing) in err and "does not exist" in err


def test_lawa_option_after_the_script_explains_the_order(capsys):
    err = _error_of([str(SCRIPT), "--output_dir", "x", "--lawa_k", "5"], capsys)
    assert "--lawa_k" in err and "after the script" in err and "-m lawa_diffusion.launch --lawa_k" in err


def test_bad_values_are_one_line_errors(capsys):
    assert "--lawa_k must be an integer" in _error_of(["--lawa_k", "five", str(SCRIPT)], capsys)
    assert "lawa k must be >= 1" in _error_of(["--lawa_k", "0", str(SCRIPT)], capsys)
    assert "--lawa_storage: expected one argument" in _error_of(["--lawa_storage"], capsys)
    assert "no training script" in _error_of(["--lawa_k", "2"], capsys)


def test_precedence_cli_over_env_over_yaml_over_defaults(tmp_path):
    config = tmp_path / "lawa.yaml"
    config.write_text("k: 7\nevery_n_steps: 9\nstart_step: 11\n")
    env = {"LAWA_CONFIG": str(config), "LAWA_EVERY_N_STEPS": "13", "LAWA_K": "17", "LAWA_CACHE_DIR": "/x"}
    opts = plugin_options.resolve_options({"k": "19"}, env)
    assert (opts.lawa.k, opts.lawa.every_n_steps, opts.lawa.start_step) == (19, 13, 11)
    assert opts.lawa.storage == LAWAConfig().storage
    assert plugin_options.resolve_options({}, {}).lawa == LAWAConfig()


def test_parse_argv_leaves_script_args_untouched():
    args = ["--output_dir", "o", "--flag", "--lr=3", "pos", "-m", "x", "-h", "--", "--lawa"]
    options, target = launch.parse_argv(["--lawa_k=4", "--lawa_keep_average", "yes", str(SCRIPT), *args], environ={})
    assert (options.lawa.k, options.lawa.keep_average) == (4, True)
    assert (target.name, target.args, target.module) == (str(SCRIPT), args, False)
    options, target = launch.parse_argv(["--lawa_every_n_steps", "7", "-m", "json.tool", *args], environ={})
    assert options.lawa.every_n_steps == 7 and (target.name, target.args, target.module) == ("json.tool", args, True)


def test_boolean_options_work_as_bare_flags_and_with_a_value():
    args = ["--output_dir", "o", "--use_ema"]
    for given, expected in ((["--lawa_keep_average"], True), (["--lawa_keep_average", "true"], True),
                            (["--lawa_keep_average", "no"], False), (["--lawa_keep_average=off"], False), ([], False)):
        options, target = launch.parse_argv([*given, "--lawa_k", "3", str(SCRIPT), *args], environ={})
        assert (options.lawa.keep_average, options.lawa.k) == (expected, 3), given
        assert (target.name, target.args) == (str(SCRIPT), args), given
    options, target = launch.parse_argv(["--lawa_k", "2", "--lawa_keep_average", "-m", "json.tool", "x"], environ={})
    assert options.lawa.keep_average and (target.name, target.args, target.module) == ("json.tool", ["x"], True)
    # in a patched script's own parser (add_lawa_arguments) too
    import argparse

    parser = launch.add_lawa_arguments(argparse.ArgumentParser())
    parsed = parser.parse_args(["--lawa_keep_average", "--lawa_k", "2"])
    assert launch.lawa_config_from_args(parsed, environ={}).keep_average is True


def test_help_says_what_each_option_means_and_lists_the_choices(capsys):
    assert launch.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for choices in ("device|cpu|disk", "raise|skip", "main|all", "float32|bfloat16|float16|float64"):
        assert f"Choices: {choices}." in text, choices
    assert "--lawa_keep_average [true|false]" in text
    assert "how many snapshots the window holds. Default: 5; environment variable LAWA_K" in text
    meanings = plugin_options.option_meanings()
    assert all(meanings.get(name) for name in plugin_options.option_types()), "an option without a meaning"


def test_yaml_with_unknown_key_is_refused(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("k: 3\nwindow: 4\n")
    with pytest.raises(ValueError, match="unknown key.*window.*valid keys"):
        plugin_options.resolve_options({"config": str(config)}, {})


def test_lawa_folder_naming():
    assert lawa_folder_for("ck/unet_ema") == os.path.join("ck", "unet_lawa")
    assert lawa_folder_for("ck/prior_ema/") == os.path.join("ck", "prior_lawa")
    assert lawa_folder_for("out/unet") == os.path.join("out", "unet_lawa")
    assert lawa_folder_for("ema_unet") == "lawa_unet"


# ----------------------------------------------------------------------------- real launchers (slow)
def _torchrun(argv: list[str], env: dict, expect: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == expect, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_process_torchrun_plugin_and_resume(data, tmp_path):
    # 2 processes x batch 2 over 8 images: 2 steps per epoch, so 6 epochs give 12 steps.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}  # torchrun on CPU: MULTI_CPU (gloo)
    epochs = EPOCHS * 2
    ref = tmp_path / "ref"
    _torchrun([str(SCRIPT), *script_args(data, ref, "--checkpointing_steps", str(NU), epochs=epochs)], env)
    full = tmp_path / "full"
    _torchrun(["-m", "lawa_diffusion.launch", *LAWA_ARGS, *POSTHOC_ARGS, str(SCRIPT),
               *script_args(data, full, "--checkpointing_steps", str(CKPT), epochs=epochs)], env)
    for step in range(CKPT, STEPS + 1, CKPT):
        expected = mean_of([ref / f"checkpoint-{s}" / "unet_ema" for s in expected_steps(step)])
        assert_weights_close(weights(full / f"checkpoint-{step}" / "unet_lawa"), expected)
    resumed = tmp_path / "resumed"
    common = ["-m", "lawa_diffusion.launch", *LAWA_ARGS, *POSTHOC_ARGS, str(SCRIPT)]
    _torchrun([*common, *script_args(data, resumed, "--checkpointing_steps", str(CKPT), "--crash_after_step",
                                     str(2 * CKPT + 2), epochs=epochs)], env, expect=1)
    assert not (resumed / f"checkpoint-{STEPS}").exists()
    _torchrun([*common, *script_args(data, resumed, "--checkpointing_steps", str(CKPT),
                                     "--resume_from_checkpoint", "latest", epochs=epochs)], env)
    # Really two processes: the data was split, so 6 epochs made 12 steps, not 24.
    assert (resumed / f"checkpoint-{STEPS}").is_dir() and not (resumed / f"checkpoint-{STEPS + CKPT}").exists()
    for name in (f"checkpoint-{STEPS}/unet_lawa", "unet_lawa"):
        assert snapshot_steps(resumed / name) == expected_steps(STEPS)
        assert_weights_close(weights(resumed / name), weights(full / name), atol=1e-6)
    # the post-hoc EMAs under DDP: kept and stored whole by the main process alone, resumed exactly
    for track in ("sigma_rel_0.05", "sigma_rel_0.1"):
        stored = sorted(p.name for p in (full / "ema_snapshots" / track).iterdir())
        assert stored == [f"step-{s:09d}.safetensors" for s in range(POSTHOC_EVERY, STEPS + 1, POSTHOC_EVERY)]
        assert sorted(p.name for p in (resumed / "ema_snapshots" / track).iterdir()) == stored
        for name in stored:
            a, b = (load_file(str(d / "ema_snapshots" / track / name)) for d in (resumed, full))
            assert all(torch.equal(a[k], b[k]) for k in b), (track, name)


@pytest.mark.slow
def test_accelerate_launch_runs_the_plugin(data, reference, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
           "-m", "lawa_diffusion.launch", *LAWA_ARGS, str(SCRIPT), *script_args(data, out, "--checkpointing_steps", str(CKPT))]
    # same intra-op thread count as the in-process reference run, so both train with the same float sums
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = mean_of([reference / f"checkpoint-{s}" / "unet_ema" for s in expected_steps(STEPS)])
    assert_weights_close(weights(out / f"checkpoint-{STEPS}" / "unet_lawa"), expected, atol=1e-6)


@pytest.mark.filterwarnings("ignore:FID from")
def test_fid_during_training_matches_an_offline_evaluation(data, tmp_path, monkeypatch):
    from diffusers import DDPMScheduler, UNet2DModel

    from lawa_diffusion.evaluation import fid, inception, sampling
    from lawa_diffusion.utils.files import read_jsonl

    stand_in = inception.stand_in_extractor(dim=16)
    monkeypatch.setattr(inception, "load_extractor", lambda *a, **k: stand_in)
    out = tmp_path / "run"
    fid_args = ["--lawa_fid_every_n_steps", str(2 * NU), "--lawa_fid_reference", str(data),
                "--lawa_fid_num_samples", "4", "--lawa_fid_batch_size", "4", "--lawa_fid_num_inference_steps", "2"]
    assert run_plugin([*LAWA_ARGS, *fid_args, str(SCRIPT), *script_args(data, out, "--checkpointing_steps", str(2 * NU))]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["variant"]) for r in rows] == [(6, "ema"), (6, "lawa"), (12, "ema"), (12, "lawa")]
    # The same numbers from the saved folders, evaluated afterwards with the script's noise scheduler config.
    scheduler_config = {k: v for k, v in DDPMScheduler(num_train_timesteps=100).config.items() if not k.startswith("_")}
    models = {v: UNet2DModel.from_pretrained(out / "checkpoint-12" / f"unet_{v}") for v in ("ema", "lawa")}
    offline = sampling.evaluate_variants(models, fid.reference_stats(str(data), image_size=8, weights=stand_in),
                                         num_samples=4, batch_size=4, num_inference_steps=2, weights=stand_in,
                                         scheduler_config=scheduler_config, progress=False)
    for row in rows[2:]:
        assert row["fid"] == pytest.approx(offline[row["variant"]]["fid"], rel=1e-4)
    assert rows[2]["fid"] != rows[3]["fid"]
