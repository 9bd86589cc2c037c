import json
import os

import pytest
import torch
import yaml
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file

from lawa_diffusion.lawa import read_record
from lawa_diffusion import cli
from lawa_diffusion.files import atomic_save_safetensors
from lawa_diffusion.posthoc import find_sources, select_latest
from lawa_diffusion.sweep import format_sweep, run_sweep, sweep_cells
from tests.helpers import param_sum_metric

TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)


@pytest.fixture(autouse=True)
def _only_this_command(monkeypatch):
    # The CLI under test is this module's subcommand(s) alone, whatever state the other commands are in.
    monkeypatch.setattr(cli, "COMMAND_MODULES", (cli.posthoc, cli.sweep))


def _unet(seed, **changes):
    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY, **changes})


def _save_ema_checkpoint(run, step, **changes):
    """checkpoint-<step>/unet_ema the way diffusers EMAModel.save_pretrained writes it."""
    unet = _unet(step, **changes)
    ema = EMAModel(unet.parameters(), decay=0.99, model_cls=UNet2DModel, model_config=unet.config)
    ema.optimization_step = step
    folder = os.path.join(run, f"checkpoint-{step}", "unet_ema")
    ema.save_pretrained(folder)
    return folder


def _save_snapshot(folder, step):
    unet = _unet(step)
    meta = {"step": str(step), "model_config": json.dumps(dict(unet.config))}
    path = os.path.join(folder, f"step-{step:09d}.safetensors")
    atomic_save_safetensors(path, {k: v.half() for k, v in unet.state_dict().items()}, metadata=meta)
    return path


def _float64_mean(files):
    states = [load_file(f) for f in files]
    return {k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]}


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
    expected = _float64_mean([_weights_file(run_with_checkpoints, s) for s in steps])
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
    expected = _float64_mean([_weights_file(run_with_checkpoints, s) for s in (200, 400)])
    state = UNet2DModel.from_pretrained(out).state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name].double(), value, rtol=0, atol=1e-6)


def test_average_of_fp16_snapshot_folder(tmp_path):
    folder = tmp_path / "run" / "ema_snapshots"
    files = [_save_snapshot(str(folder), s) for s in (10, 20, 30)]
    out = tmp_path / "avg"
    assert cli.main(["average", str(tmp_path / "run"), "--k", "3", "-o", str(out)]) == 0
    state = UNet2DModel.from_pretrained(out).state_dict()
    for name, value in _float64_mean(files).items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name].double(), value, rtol=0, atol=1e-6)


def _error(capsys, argv):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_k_larger_than_number_of_checkpoints(run_with_checkpoints, tmp_path, capsys):
    err = _error(capsys, ["average", run_with_checkpoints, "--k", "6", "-o", str(tmp_path / "o")])
    assert "--k 6 is larger than the number of checkpoints: 5 found" in err
    err = _error(capsys, ["average", run_with_checkpoints, "--k", "4", "--every", "2", "-o", str(tmp_path / "o")])
    assert "3 of them with --every 2" in err and "--k 3 or fewer" in err
    assert not (tmp_path / "o").exists()


def test_checkpoints_from_different_model_configs(run_with_checkpoints, tmp_path, capsys):
    other = _save_ema_checkpoint(str(tmp_path / "other"), 600, norm_eps=1e-3)
    err = _error(capsys, ["average", run_with_checkpoints, other, "--k", "2", "-o", str(tmp_path / "o")])
    assert "different model configs" in err and "norm_eps" in err
    wider = _save_ema_checkpoint(str(tmp_path / "wider"), 700, block_out_channels=(8, 32))
    assert "block_out_channels" in _error(capsys, ["average", other, wider, "--k", "2", "-o", str(tmp_path / "o")])


def test_missing_folders_and_existing_output(run_with_checkpoints, tmp_path, capsys):
    assert "does not exist" in _error(capsys, ["average", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    (tmp_path / "empty").mkdir()
    assert "holds no diffusers model folder" in _error(capsys, ["average", str(tmp_path / "empty"), "-o", str(tmp_path / "o")])
    assert "--subfolder" in _error(capsys, ["average", run_with_checkpoints, "--subfolder", "unet_lawa",
                                            "-o", str(tmp_path / "o")])
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert "--overwrite" in _error(capsys, ["average", run_with_checkpoints, "--k", "1", "-o", str(out)])
    assert (out / "mine.txt").read_text() == "keep"
    assert cli.main(["average", run_with_checkpoints, "--k", "1", "-o", str(out), "--overwrite"]) == 0
    assert read_record(out)["snapshot_steps"] == [500]


def test_duplicate_step_is_refused(run_with_checkpoints):
    with pytest.raises(ValueError, match="appears twice"):
        find_sources([run_with_checkpoints, os.path.join(run_with_checkpoints, "checkpoint-300")])


def test_select_latest_counts_back_from_newest(run_with_checkpoints):
    sources = find_sources([run_with_checkpoints])
    assert [s.step for s in sources] == [100, 200, 300, 400, 500]
    assert [s.step for s in select_latest(sources, 2, 3)] == [200, 500]


# ----------------------------------------------------------------------------- sweep
def _naive_window(files, step, k, m, nu, start):
    """Independent reference: walk the online schedule start, start + m·ν, ... up to step."""
    taken = [s for s in range(start, step + 1, m * nu) if s in files]
    return tuple(taken[-k:])


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("snaprun")
    files = {s: _save_snapshot(str(run / "ema_snapshots"), s) for s in range(10, 90, 10)}
    (run / "config.yaml").write_text(yaml.safe_dump({"lawa": {"k": 4, "every_n_steps": 10, "start_step": 0},
                                                     "model": dict(TINY)}))
    with open(run / "metrics.jsonl", "w") as f:
        for step in (40, 80):
            f.write(json.dumps({"step": step, "variant": "ema", "fid": 1.0}) + "\n")
    return run, files


def test_sweep_scores_each_window_with_one_call_per_step(snapshot_run, tmp_path):
    run, files = snapshot_run
    calls = []
    summary = run_sweep(run, [1, 2, 8], [1, 2, 4], evaluate=param_sum_metric(calls), out_dir=str(tmp_path / "sw"),
                        progress=False)
    assert summary["steps"] == [40, 80] and len(calls) == 2
    assert len(summary["rows"]) == 2 * 3 * 3
    for row in summary["rows"]:
        window = _naive_window(files, row["step"], row["k"], row["every"], 10, 0)
        assert tuple(row["snapshot_steps"]) == window
        mean = _float64_mean([files[s] for s in window])
        assert row["fid"] == pytest.approx(sum(v.sum().item() for v in mean.values()), rel=1e-6, abs=1e-4)
    windows_at_80 = {tuple(r["snapshot_steps"]) for r in summary["rows"] if r["step"] == 80}
    assert len(calls[1]) == len(windows_at_80)  # identical windows are scored once
    on_disk = [json.loads(line) for line in (tmp_path / "sw" / "sweep.jsonl").read_text().splitlines()]
    assert on_disk == summary["rows"]
    saved = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert saved["heatmap"]["step"] == 80
    assert saved["heatmap"]["values"][2][2] == next(r["fid"] for r in summary["rows"]
                                                    if (r["step"], r["k"], r["every"]) == (80, 8, 4))
    assert (tmp_path / "sw" / "heatmap-fid.png").read_bytes()[:4] == b"\x89PNG"
    table = format_sweep(summary).splitlines()
    assert table[-1].startswith("k=8") and f"{saved['heatmap']['values'][2][2]:.3f}" in table[-1]


def test_sweep_refuses_existing_output_and_bad_steps(snapshot_run, tmp_path):
    run, _ = snapshot_run
    (tmp_path / "sw").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_sweep(run, [1], [1], evaluate=param_sum_metric([]), out_dir=str(tmp_path / "sw"), progress=False)
    with pytest.raises(ValueError, match="before the first EMA snapshot"):
        run_sweep(run, [1], [1], steps="5", evaluate=param_sum_metric([]), out_dir=str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="--k must list"):
        run_sweep(run, "1,1", [1], evaluate=param_sum_metric([]), out_dir=str(tmp_path / "x"), progress=False)


def test_sweep_without_snapshots_says_what_to_do(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    err = _error(capsys, ["sweep", str(tmp_path / "run")])
    assert "ema_snapshots" in err


def test_sweep_cells_respect_start_step():
    cells = sweep_cells([5, 15, 25, 35, 45], [45], [2], [1, 2], every_n_steps=10, start_step=5)
    assert [c.snapshot_steps for c in cells] == [(35, 45), (25, 45)]


@pytest.mark.filterwarnings("ignore::lawa_diffusion.fid.SmallSampleWarning")
def test_sweep_reuses_cached_reference_stats(snapshot_run, tmp_path):
    import numpy as np

    from lawa_diffusion import fid
    from lawa_diffusion.inception import stand_in_extractor

    run, _ = snapshot_run
    ref = tmp_path / "reference.npy"
    np.save(ref, np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8))
    options = dict(reference=str(ref), num_samples=4, batch_size=4, num_inference_steps=2,
                   weights=stand_in_extractor(), device="cpu", progress=False, steps="final")
    first = run_sweep(run, [1, 2], [1], out_dir=str(tmp_path / "a"), **options)
    # Garble the reference but keep its identity (path, size, modification time): only a cache hit still works.
    st = os.stat(ref)
    ref.write_bytes(b"\0" * st.st_size)
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match="could not be read"):
        fid.reference_stats(str(ref), image_size=8, weights=options["weights"], cache=False, progress=False)
    second = run_sweep(run, [1, 2], [1], out_dir=str(tmp_path / "b"), **options)
    assert [r["fid"] for r in second["rows"]] == [r["fid"] for r in first["rows"]]
    assert all(r["fid"] is not None and r["num_samples"] == 4 for r in first["rows"])


# ----------------------------------------------------------------------------- --track
@pytest.fixture(scope="module")
def two_track_run(tmp_path_factory):
    """Snapshots of the base EMA in ema_snapshots/ and of a track "short" in ema_snapshots/short/ (other weights)."""
    run = tmp_path_factory.mktemp("tracks")
    base = {s: _save_snapshot(str(run / "ema_snapshots"), s) for s in (10, 20, 30, 40)}
    short = {s: _save_snapshot(str(run / "ema_snapshots" / "short"), s + 1000) for s in (10, 20, 30, 40)}
    for s in list(short):  # named for its own step, weights of another seed
        os.replace(short[s], str(run / "ema_snapshots" / "short" / f"step-{s:09d}.safetensors"))
        short[s] = str(run / "ema_snapshots" / "short" / f"step-{s:09d}.safetensors")
    (run / "config.yaml").write_text(yaml.safe_dump({"lawa": {"k": 2, "every_n_steps": 10}, "model": dict(TINY)}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 40, "variant": "ema", "fid": 1.0}) + "\n")
    return run, base, short


def test_average_and_sweep_take_a_track(two_track_run, tmp_path):
    run, base, short = two_track_run
    for track, files in (("ema", base), ("short", short)):
        out = tmp_path / f"avg-{track}"
        assert cli.main(["average", str(run), "--k", "2", "--track", track, "-o", str(out)]) == 0
        got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
        want = _float64_mean([files[30], files[40]])
        for name, tensor in got.items():
            torch.testing.assert_close(tensor.double(), want[name], rtol=0, atol=1e-6)
        assert read_record(out)["track"] == track
        summary = run_sweep(run, [2], [1], evaluate=param_sum_metric([]), progress=False, track=track)
        mean = _float64_mean([files[30], files[40]])
        assert summary["rows"][0]["fid"] == pytest.approx(sum(v.sum().item() for v in mean.values()), rel=1e-6)
        assert summary["track"] == track and os.path.basename(os.path.dirname(summary["files"]["json"])) == (
            "sweep" if track == "ema" else "sweep-short")


def test_unknown_track_is_one_sentence_exit_2(two_track_run, tmp_path, capsys):
    run, _, _ = two_track_run
    for argv in (["average", str(run), "--track", "long", "-o", str(tmp_path / "x")],
                 ["sweep", str(run), "--track", "long", "-o", str(tmp_path / "y")]):
        err = _error(capsys, argv)
        assert "--track 'long'" in err and "ema, short" in err
