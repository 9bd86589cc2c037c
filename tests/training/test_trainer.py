"""The trainer: run-folder format, exact resume, config and data errors, deterministic batches.

FID here uses the FID module's small stand-in feature extractor, so the numbers are distances of
the same kind as FID but not FID; what is checked is the trainer's bookkeeping and weights.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors import safe_open

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.config.train import TrainConfig, load_train_config
from lawa_diffusion.engine.posthoc_snapshots import save_ema_snapshot
from lawa_diffusion.evaluation.inception import stand_in_extractor
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.training import fid_tracker as tracking
from lawa_diffusion.training import trainer as train_mod
from lawa_diffusion.utils.files import MARKER_NAME, read_jsonl
from tests.helpers import (
    run_crashing_at,
    tiny_config,
    torchrun_to_4_then_6,
    train_run,
    unet_weights,
    without_timing,
    write_yaml,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs its tiny models on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, _one_thread):
    """One uninterrupted 8-step run, shared by the tests that read it."""
    out = tmp_path_factory.mktemp("runs") / "full"
    with pytest.MonkeyPatch.context() as mp:  # module scope: set the cache folder the autouse fixture sets later
        mp.setenv("LAWA_CACHE_DIR", os.environ.get("LAWA_TEST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lawa-cache")))
        train_run(tiny_config(out))
    return str(out)


# ----------------------------------------------------------------------------- run-folder format
def test_run_folder_has_config_metrics_checkpoints_and_snapshots(full_run):
    cfg = yaml.safe_load(open(os.path.join(full_run, "config.yaml")))
    ema_config = json.load(open(os.path.join(full_run, "checkpoint-8", "unet_ema", "config.json")))
    assert {k: v for k, v in ema_config.items() if k in cfg["model"]} == cfg["model"]
    assert cfg["lawa"]["k"] == 3 and cfg["eval"]["num_samples"] == 4 and cfg["seed"] == 0
    TrainConfig.from_dict(cfg)  # the resolved config is itself a valid config

    rows = read_jsonl(os.path.join(full_run, "metrics.jsonl"))
    assert [(r["step"], r["variant"]) for r in rows] == [(s, v) for s in (2, 4, 6, 8) for v in ("raw", "ema", "lawa")]
    assert [r["lawa_num_snapshots"] for r in rows[2::3]] == [1, 2, 3, 3]
    for r in rows:
        window = {"over"} if r["variant"] == "lawa" else set()
        assert set(r) == {"step", "variant", "fid", "kid_mean", "kid_std", "num_samples", "inception_sha256",
                          "lawa_k", "lawa_every_n_steps", "lawa_num_snapshots", "sample_seconds", "metric_seconds",
                          "kind", "mean_lag"} | window
        assert r["kind"] == r["variant"] and (r["mean_lag"] == 0) == (r["variant"] == "raw")
        assert r["sample_seconds"] > 0 and r["metric_seconds"] > 0
        assert r["fid"] >= 0 and r["num_samples"] == 4 and (r["lawa_k"], r["lawa_every_n_steps"]) == (3, 2)
        assert r["inception_sha256"] == stand_in_extractor().sha256

    for step in (4, 8):
        assert os.path.isdir(os.path.join(full_run, f"checkpoint-{step}", "unet_ema"))
        assert os.path.isdir(os.path.join(full_run, f"checkpoint-{step}", "unet_lawa"))
    assert [s for s, _ in runfolder.list_ema_snapshots(full_run)] == [2, 4, 6, 8]


def test_ema_snapshot_holds_the_checkpointed_ema_weights(full_run):
    path = runfolder.snapshot_path(full_run, 8)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        snap = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["step"] == "8" and json.loads(meta["model_config"])["block_out_channels"] == [8, 16]
    ema = unet_weights(os.path.join(full_run, "checkpoint-8", "unet_ema"))
    assert set(snap) == set(ema)
    for name, tensor in snap.items():
        assert tensor.dtype == torch.float16
        assert torch.equal(tensor, ema[name].half())


def test_lawa_weights_are_the_mean_of_the_latest_ema_checkpoints(tmp_path):
    out = tmp_path / "every2"
    train_run(tiny_config(out, checkpointing_steps=2, eval={"every_n_steps": 0, "at_end": False}))
    emas = [unet_weights(os.path.join(out, f"checkpoint-{s}", "unet_ema")) for s in (4, 6, 8)]
    lawa = unet_weights(os.path.join(out, "checkpoint-8", "unet_lawa"))
    for name, tensor in lawa.items():
        expected = sum(e[name].double() for e in emas) / 3
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
    assert not os.path.exists(out / "metrics.jsonl")






def test_resume_mid_run_continues_metrics_and_weights_exactly(full_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    run_crashing_at(7, tiny_config(out), monkeypatch)
    assert max(r["step"] for r in read_jsonl(out / "metrics.jsonl")) == 6  # evaluated past checkpoint-4
    train_run(tiny_config(out), resume="latest")

    full_rows, rows = read_jsonl(os.path.join(full_run, "metrics.jsonl")), read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["variant"]) for r in rows] == [(r["step"], r["variant"]) for r in full_rows]
    for a, b in zip(rows, full_rows):
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-6, abs=1e-9)
        assert a["lawa_num_snapshots"] == b["lawa_num_snapshots"]
    for sub in ("unet_ema", "unet_lawa"):
        got, want = unet_weights(out / "checkpoint-8" / sub), unet_weights(os.path.join(full_run, "checkpoint-8", sub))
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7)
    assert [s for s, _ in runfolder.list_ema_snapshots(str(out))] == [2, 4, 6, 8]


def test_truncate_metrics_drops_later_rows_and_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "variant": "ema"}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "va')
    runfolder.truncate_metrics(str(path), 4)
    assert [r["step"] for r in read_jsonl(path)] == [2, 4]
    assert path.read_text().endswith("\n")




def test_unknown_config_key_lists_valid_keys(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "out")
    cfg["learning_rate"] = 1e-3
    code = cli.main(["train", "--config", write_yaml(tmp_path / "c.yaml", cfg)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "unknown key(s) learning_rate" in err and "max_train_steps" in err and "optim" in err


def test_unknown_nested_and_model_keys_are_refused(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "out"))
    with pytest.raises(ValueError, match="section 'optim' has unknown key.*lr;.*learning_rate"):
        load_train_config(path, ["optim.lr=1e-3"])
    cfg = load_train_config(path, ["model.channels=3"])
    with pytest.raises(ValueError, match="model has unknown key.*channels;.*block_out_channels"):
        train_mod.build_unet(cfg.model)


def test_overrides_are_typed_and_merged(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", tiny_config(tmp_path / "out"))
    cfg = load_train_config(path, ["optim.learning_rate=1e-3", "lawa.k=7", "eval.variants=[ema]",
                                             "model.sample_size=16", "mixed_precision=no"],
                                       output_dir=str(tmp_path / "x"))
    assert cfg.optim.learning_rate == 1e-3 and cfg.lawa.k == 7 and cfg.eval.variants == ["ema"]
    assert cfg.model["sample_size"] == 16 and cfg.model["block_out_channels"] == [8, 16]
    assert cfg.output_dir == str(tmp_path / "x") and cfg.optim.lr_warmup_steps == 2
    assert cfg.mixed_precision == "no"  # YAML reads an unquoted no as false


def test_missing_dataset_files_give_one_sentence(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = tiny_config(tmp_path / "out", data={"dataset": "fashion-mnist", "root": str(empty)})
    code = cli.main(["train", "--config", write_yaml(tmp_path / "c.yaml", cfg)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert str(empty) in err and "train-images-idx3-ubyte" in err


def test_existing_output_dir_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--resume latest"):
        train_mod.resolve_resume(str(out), None, overwrite=False)
    with pytest.raises(ValueError, match="not a run folder"):
        train_mod.resolve_resume(str(out), None, overwrite=True)
    with pytest.raises(ValueError, match="not a checkpoint-<step> folder"):
        train_mod.resolve_resume(str(out), str(out), overwrite=False)


# ----------------------------------------------------------------------------- batches
def test_batches_cover_each_epoch_once_across_processes():
    n, bs, world, accumulation = 40, 3, 2, 2
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    sources = [train_mod.BatchSource(images, bs, accumulation, 5, rank, world, False, torch.device("cpu"))
               for rank in range(world)]
    per_epoch = n // (bs * world)  # 6 micro-batches of 6 images: 36 distinct images, 4 dropped
    seen = []
    for index in range(per_epoch):
        step, micro = divmod(index, accumulation)
        for source in sources:
            x, _ = source.draw(step + 1, micro)
            seen += ((x[:, 0, 0, 0] + 1) * 127.5).round().long().tolist()
    assert len(seen) == len(set(seen)) == per_epoch * bs * world
    again, _ = sources[1].draw(2, 1)  # a pure function of (step, micro, rank)
    first, _ = train_mod.BatchSource(images, bs, accumulation, 5, 1, world, False, torch.device("cpu")).draw(2, 1)
    assert torch.equal(again, first)






@pytest.mark.slow
def test_two_cpu_processes_write_one_set_of_rows_and_resume(tmp_path):
    out = tmp_path / "mp"
    torchrun_to_4_then_6(tiny_config(out, max_train_steps=6, checkpointing_steps=3), tmp_path)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["variant"]) for r in rows] == [(s, v) for s in (2, 4, 6) for v in ("raw", "ema", "lawa")]
    assert sorted(os.listdir(out / "checkpoint-6")).count("random_states_1.pkl") == 1






def test_background_metrics_equal_inline_ones_and_are_on_disk_before_each_checkpoint(full_run, tmp_path, monkeypatch):
    """FID/KID computed in a background thread give the rows of an inline run, and every row up to a
    checkpoint's step is in metrics.jsonl when that checkpoint is saved, even with slow maths."""
    import time as time_mod

    from lawa_diffusion.evaluation import fid

    real_metrics, real_save = fid.metrics_of, train_mod.save_checkpoint
    monkeypatch.setattr(fid, "metrics_of", lambda *a, **k: (time_mod.sleep(0.3), real_metrics(*a, **k))[1])
    on_disk = {}

    def save(parts, step):
        on_disk[step] = max(r["step"] for r in read_jsonl(os.path.join(parts.run_dir, "metrics.jsonl")))
        real_save(parts, step)

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    background = train_run(tiny_config(tmp_path / "background", eval={"background_metrics": True}))
    assert on_disk == {4: 4, 8: 8}
    monkeypatch.setattr(fid, "metrics_of", real_metrics)
    inline = train_run(tiny_config(tmp_path / "inline", eval={"background_metrics": False}))  # full_run: default (CPU)
    rows = {name: read_jsonl(os.path.join(d, "metrics.jsonl")) for name, d in
            (("full", full_run), ("background", background), ("inline", inline))}
    assert without_timing(rows["inline"]) == without_timing(rows["full"]) == without_timing(rows["background"])


def test_metrics_run_in_the_background_by_default_only_when_training_on_a_gpu():
    assert tracking.metrics_in_background(None, "cuda:0") and not tracking.metrics_in_background(None, "cpu")
    assert tracking.metrics_in_background(True, "cpu") and not tracking.metrics_in_background(False, "cuda")


def test_recorder_writes_background_results_in_step_order(tmp_path, monkeypatch):
    import threading
    from types import SimpleNamespace

    from lawa_diffusion.evaluation import fid

    gate = threading.Event()

    def metrics(sampled, reference, extractor, **options):
        assert gate.wait(30)
        if sampled.meta["value"] < 0:
            raise ValueError("bad features")
        return {"fid": sampled.meta["value"], "num_samples": 2, "inception_sha256": "abc"}

    monkeypatch.setattr(fid, "metrics_of", metrics)
    path, lines = tmp_path / "m.jsonl", []
    recorder = tracking.MetricsRecorder(str(path), None, background=True, write=lines.append)
    lawa = SimpleNamespace(config=SimpleNamespace(k=2, every_n_steps=5), num_snapshots=1)
    for step in (5, 10):
        recorder.submit(step, {"ema": fid.Sampled({}, 0.5, {"value": float(step)})}, None, None, lawa)
        lawa.num_snapshots += 1  # the row keeps the count at the time of the evaluation
    assert recorder.collect() == [] and recorder.pending == 2 and not path.exists()
    gate.set()
    rows = recorder.close()
    assert [(r["step"], r["fid"], r["lawa_num_snapshots"]) for r in rows] == [(5, 5.0, 1), (10, 10.0, 2)]
    assert read_jsonl(path) == rows
    assert lines == ["step 5: FID ema 5.00  lawa -  (k=2, 1 snapshots)", "step 10: FID ema 10.00  lawa -  (k=2, 2 snapshots)"]
    failing = tracking.MetricsRecorder(str(tmp_path / "f.jsonl"), None, background=True, write=lines.append)
    failing.submit(15, {"ema": fid.Sampled({}, 0.5, {"value": -1.0})}, None, None, lawa)
    with pytest.raises(ValueError, match="bad features"):
        failing.close()


def test_resuming_from_an_older_checkpoint_trims_everything_past_it(tmp_path):
    run_dir = tmp_path / "run"
    for step in (2, 4):
        (run_dir / f"checkpoint-{step}").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "variant": "ema"}) + "\n" for s in (2, 4)))
    for step in (2, 4):
        save_ema_snapshot(str(run_dir), step, type("E", (), {"shadow_params": [torch.ones(2)]})(), ["w"], {})
    train_mod.prepare_run_dir(str(run_dir), 2, False, {"seed": 3})
    assert sorted(os.listdir(run_dir)) == [MARKER_NAME, "checkpoint-2", "config.yaml", "ema_snapshots", "metrics.jsonl"]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [2]
    assert [s for s, _ in runfolder.list_ema_snapshots(str(run_dir))] == [2]
    assert yaml.safe_load((run_dir / "config.yaml").read_text()) == {"seed": 3}


@pytest.mark.cuda
def test_background_metric_maths_run_on_a_stream_of_their_own(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from lawa_diffusion.evaluation import fid
    from lawa_diffusion.training import fid_tracker as tracking

    streams = []

    def metrics(sampled, reference, cfg):
        streams.append(torch.cuda.current_stream())
        return {"fid": 1.0, "num_samples": 2, "inception_sha256": "abc"}

    monkeypatch.setattr(fid, "metrics_of", metrics)
    recorder = tracking.MetricsRecorder(str(tmp_path / "m.jsonl"), None, background=True, write=lambda line: None)
    lawa = SimpleNamespace(config=SimpleNamespace(k=2, every_n_steps=5), num_snapshots=1)
    recorder.submit(5, {"ema": fid.Sampled({}, 0.5, {}, torch.device("cuda", 0))}, None, None, lawa)
    recorder.close()
    assert len(streams) == 1 and streams[0] != torch.cuda.default_stream(0)
