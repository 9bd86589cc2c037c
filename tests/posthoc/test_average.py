import json
import os

import pytest
import torch
import yaml
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.engine.lawa import read_record
from lawa_diffusion.posthoc.saved_weights import find_sources, select_latest
from lawa_diffusion.posthoc.sweep import run_sweep
from tests.helpers import (
    TINY_UNET,
    float64_mean_of_files,
    one_line_error,
    param_sum_metric,
    save_snapshot_file,
    seeded_unet,
)


@pytest.fixture(autouse=True)
def _only_this_command(monkeypatch):
    # The CLI under test is this module's subcommand(s) alone, whatever state the other commands are in.
    monkeypatch.setattr(cli, "COMMAND_MODULES", (cli.average, cli.sweep))


def _save_ema_checkpoint(run, step, **changes):
    """checkpoint-<step>/unet_ema the way diffusers EMAModel.save_pretrained writes it."""
    unet = seeded_unet(step, **changes)
    ema = EMAModel(unet.parameters(), decay=0.99, model_cls=UNet2DModel, model_config=unet.config)
    ema.optimization_step = step
    folder = os.path.join(run, f"checkpoint-{step}", "unet_ema")
    ema.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("run"))
    for step in (100, 200, 300, 400, 500):
        _save_ema_checkpoint(run, step)
    return run


def _weights_file(run, step):
    return os.path.join(run, f"checkpoint-{step}", "unet_ema", "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("k, every, steps", [(3, 1, (300, 400, 500)), (2, 2, (300, 500)), (1, 1, (500,))])
def test_average_equals_float64_mean_of_chosen_checkpoints(run_with_checkpoints, tmp_path, k, every, steps):
    out = tmp_path / "avg"
    assert cli.main(["average", run_with_checkpoints, "--k", str(k), "--every", str(every), "-o", str(out)]) == 0
    model = UNet2DModel.from_pretrained(out)
    expected = float64_mean_of_files([_weights_file(run_with_checkpoints, s) for s in steps])
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(state[name].double(), value, rtol=0, atol=1e-6)
    lawa = read_record(out)
    assert lawa["snapshot_steps"] == list(steps) and lawa["k"] == k


def test_average_of_explicit_checkpoint_folders_in_any_order(run_with_checkpoints, tmp_path):
    dirs = [os.path.join(run_with_checkpoints, f"checkpoint-{s}") for s in (400, 100, 200)]
    out = tmp_path / "avg"
    assert cli.main(["average", *dirs, "--k", "2", "-o", str(out)]) == 0
    expected = float64_mean_of_files([_weights_file(run_with_checkpoints, s) for s in (200, 400)])
    state = UNet2DModel.from_pretrained(out).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name].double(), value, rtol=0, atol=1e-6)


def test_average_of_fp16_snapshot_folder(tmp_path):
    folder = tmp_path / "run" / "ema_snapshots"
    files = [save_snapshot_file(str(folder), s) for s in (10, 20, 30)]
    out = tmp_path / "avg"
    assert cli.main(["average", str(tmp_path / "run"), "--k", "3", "-o", str(out)]) == 0
    state = UNet2DModel.from_pretrained(out).state_dict()
    for name, value in float64_mean_of_files(files).items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name].double(), value, rtol=0, atol=1e-6)


def test_k_larger_than_number_of_checkpoints(run_with_checkpoints, tmp_path, capsys):
    err = one_line_error(capsys, ["average", run_with_checkpoints, "--k", "6", "-o", str(tmp_path / "o")])
    assert "--k 6 is larger than the number of checkpoints: 5 found" in err
    err = one_line_error(capsys, ["average", run_with_checkpoints, "--k", "4", "--every", "2", "-o", str(tmp_path / "o")])
    assert "3 of them with --every 2" in err and "--k 3 or fewer" in err
    assert not (tmp_path / "o").exists()


def test_checkpoints_from_different_model_configs(run_with_checkpoints, tmp_path, capsys):
    other = _save_ema_checkpoint(str(tmp_path / "other"), 600, norm_eps=1e-3)
    err = one_line_error(capsys, ["average", run_with_checkpoints, other, "--k", "2", "-o", str(tmp_path / "o")])
    assert "different model configs" in err and "norm_eps" in err
    wider = _save_ema_checkpoint(str(tmp_path / "wider"), 700, block_out_channels=(8, 32))
    assert "block_out_channels" in one_line_error(capsys, ["average", other, wider, "--k", "2", "-o", str(tmp_path / "o")])


def test_missing_folders_and_existing_output(run_with_checkpoints, tmp_path, capsys):
    assert "does not exist" in one_line_error(capsys, ["average", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    assert "holds no diffusers model folder" in one_line_error(capsys, ["average", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert "--subfolder" in one_line_error(capsys, ["average", run_with_checkpoints, "--subfolder", "unet_lawa",
                                            "-o", str(tmp_path / "o")])
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "--overwrite" in one_line_error(capsys, ["average", run_with_checkpoints, "--k", "1", "-o", str(out)])
    assert (out / "mine.txt").read_text() == "keep"
    # a folder average did not write is never replaced, not even with --overwrite; one it wrote is
    assert "not written by lawa-diffusion" in one_line_error(
        capsys, ["average", run_with_checkpoints, "--k", "1", "-o", str(out), "--overwrite"])
    assert (out / "mine.txt").read_text() == "keep"
    done = tmp_path / "done"
    assert cli.main(["average", run_with_checkpoints, "--k", "2", "-o", str(done)]) == 0
    assert cli.main(["average", run_with_checkpoints, "--k", "1", "-o", str(done), "--overwrite"]) == 0
    assert read_record(done)["snapshot_steps"] == [500]


def test_duplicate_step_is_refused(run_with_checkpoints):
    with pytest.raises(ValueError, match="appears twice"):
        find_sources([run_with_checkpoints, os.path.join(run_with_checkpoints, "checkpoint-300")])


def test_select_latest_counts_back_from_newest(run_with_checkpoints):
    sources = find_sources([run_with_checkpoints])
    assert [s.step for s in sources] == [100, 200, 300, 400, 500]
    assert [s.step for s in select_latest(sources, 2, 3)] == [200, 500]


# ----------------------------------------------------------------------------- sweep


# ----------------------------------------------------------------------------- --track
@pytest.fixture(scope="module")
def two_track_run(tmp_path_factory):
    """Snapshots of the base EMA in ema_snapshots/ and of a track "short" in ema_snapshots/short/ (other weights)."""
    run = tmp_path_factory.mktemp("tracks")
    base = {s: save_snapshot_file(str(run / "ema_snapshots"), s) for s in (10, 20, 30, 40)}
    short = {s: save_snapshot_file(str(run / "ema_snapshots" / "short"), s + 1000) for s in (10, 20, 30, 40)}
    for s in list(short):  # named for its own step, weights of another seed
        os.replace(short[s], str(run / "ema_snapshots" / "short" / f"step-{s:09d}.safetensors"))
        short[s] = str(run / "ema_snapshots" / "short" / f"step-{s:09d}.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"lawa": {"k": 2, "every_n_steps": 10}, "model": dict(TINY_UNET)}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 40, "variant": "ema", "fid": 1.0}) + "\n")
    return run, base, short


def test_average_and_sweep_take_a_track(two_track_run, tmp_path):
    run, base, short = two_track_run
    for track, files in (("ema", base), ("short", short)):
        out = tmp_path / f"avg-{track}"
        assert cli.main(["average", str(run), "--k", "2", "--track", track, "-o", str(out)]) == 0
        got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
        want = float64_mean_of_files([files[30], files[40]])
        for name, tensor in got.items():
            torch.testing.assert_close(tensor.double(), want[name], rtol=0, atol=1e-6)
        assert read_record(out)["track"] == track
        summary = run_sweep(run, [2], [1], evaluate=param_sum_metric([]), progress=False, track=track)
        mean = float64_mean_of_files([files[30], files[40]])
        assert summary["rows"][0]["fid"] == pytest.approx(sum(v.sum().item() for v in mean.values()), rel=1e-6)
        assert summary["track"] == track and os.path.basename(os.path.dirname(summary["files"]["json"])) == (
            "sweep" if track == "ema" else "sweep-short")


def test_unknown_track_is_one_sentence_exit_2(two_track_run, tmp_path, capsys):
    run, _, _ = two_track_run
    for argv in (["average", str(run), "--track", "long", "-o", str(tmp_path / "x")],
                 ["sweep", str(run), "--track", "long", "-o", str(tmp_path / "y")]):
        err = one_line_error(capsys, argv)
        assert "--track 'long'" in err and "ema, short" in err
