"""Nothing a user has is lost or silently wrong, through the commands as a careless or unlucky user runs them:
an output path that is the run, the current folder, a folder above them or empty; a snapshot changed after it
was written, truncated or with a garbled header; a disk that fills up under synthesize, report, the snapshot
store, the trainer's checkpoint and the launch plugin.

References: the folders' bytes before and after (``tree_digest``), the checkpoint an uninterrupted run writes,
and real small tmpfs mounts where this process may mount them (else a simulated full disk).
"""
from __future__ import annotations

import errno
import functools
import os
import subprocess

import pytest
import torch
import yaml

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.engine.posthoc_snapshots import PosthocSnapshots
from lawa_diffusion.evaluation.inception import stand_in_extractor
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.training import trainer as train_mod
from lawa_diffusion.utils import os_errors
from lawa_diffusion.utils.checksums import verified_metadata
from lawa_diffusion.utils.files import MARKER_NAME
from tests.helpers import (
    EMA_PATTERNS_SCRIPT,
    make_run,
    simulate_full_disk,
    tiny_config,
    tiny_unet,
    tree_digest,
    unet_weights,
)

TARGET = ["--target", "sigma_rel=0.08"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """A run folder with snapshots of three tracks, a config.yaml and a metrics.jsonl."""
    folder = tmp_path_factory.mktemp("outputs") / "run"
    folder.mkdir()
    make_run(str(folder), steps=20)
    with open(runfolder.metrics_path(str(folder)), "w") as f:
        for step, (ema, lawa) in zip((10, 20), ((9.0, 8.0), (5.0, 4.0))):
            f.write(f'{{"step": {step}, "variant": "ema", "fid": {ema}}}\n{{"step": {step}, "variant": "lawa", '
                    f'"fid": {lawa}}}\n')
    return folder


@pytest.fixture
def damaged_run(run, tmp_path):
    """A copy of ``run`` (to damage) and the path of its p10 snapshot of the last step."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, copy / "ema_snapshots" / "p10" / "step-000000020.safetensors"


def failed_line(capsys, argv, progress: bool = False) -> str:
    """Run the CLI: exit code 2 and one line on stderr (no traceback), which is returned; ``progress``: the
    command may print progress and notes first, the error is its last line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and (progress or err.count("\n") == 0), err
    last = err.splitlines()[-1]
    assert ": error: " in last, err
    return last[last.index("lawa-diffusion "):]


# ----------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("out, words", [("RUN", "is the folder this command reads from"),
                                        (".", "is the current folder"), ("..", "holds the current folder"),
                                        ("", "is empty"), ("RUN/../..", "holds the current folder"),
                                        ("RUN/ema_snapshots", "not written by lawa-diffusion")])
def test_synthesize_never_replaces_the_run_the_current_folder_or_what_holds_them(run, tmp_path, monkeypatch, capsys,
                                                                                  out, words):
    work = run.parent  # the run lies in the current folder, as `synthesize run -o $OUT` from its parent
    monkeypatch.chdir(work)
    before = tree_digest(work)
    out = out.replace("RUN", "run")
    err = failed_line(capsys, ["synthesize", "run", *TARGET, "-o", out, "--overwrite"])
    assert words in err
    assert tree_digest(work) == before


@pytest.mark.parametrize("argv", [["average", "RUN/ema_snapshots/p10", "--k", "2"], ["sweep", "RUN"],
                                  ["hindsight", "RUN"], ["report", "RUN"]])
def test_every_command_refuses_the_run_as_its_output(run, capsys, argv):
    before = tree_digest(run)
    argv = [a.replace("RUN", str(run)) for a in argv]
    err = failed_line(capsys, [*argv, "-o", str(run), "--overwrite"])
    assert "this command reads from" in err or "holds" in err
    assert tree_digest(run) == before


# ----------------------------------------------------------------------------- damaged snapshots
def _flip(path, where: int) -> None:
    data = bytearray(path.read_bytes())
    data[where] ^= 0x10
    path.write_bytes(data)


@pytest.mark.parametrize("command", [["synthesize", "RUN", *TARGET, "-o", "OUT"],
                                     ["average", "RUN/ema_snapshots/p10", "--k", "2", "-o", "OUT"],
                                     ["hindsight", "RUN", "--steps", "final", "-o", "OUT"]])
def test_a_changed_byte_in_a_snapshot_is_named(damaged_run, tmp_path, capsys, command):
    run, snapshot = damaged_run
    _flip(snapshot, os.path.getsize(snapshot) - 7)  # a weight, same size: only the checksum tells
    argv = [a.replace("RUN", str(run)).replace("OUT", str(tmp_path / "out")) for a in command]
    err = failed_line(capsys, argv)
    assert f"{snapshot}' does not match the checksum" in err and "restore it from a copy" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, words", [("truncate", "is truncated"), ("garble", "header is damaged"),
                                           ("empty", "header is damaged")])
def test_truncated_or_garbled_snapshots_are_one_sentence(damaged_run, tmp_path, capsys, damage, words):
    run, snapshot = damaged_run
    data = snapshot.read_bytes()
    snapshot.write_bytes({"truncate": data[:-100], "garble": data[:8] + b"}{" * 8 + data[24:], "empty": b""}[damage])
    err = failed_line(capsys, ["synthesize", str(run), *TARGET, "-o", str(tmp_path / "out")])
    assert str(snapshot) in err and words in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["synthesize", "RUN", *TARGET], ["average", "RUN/ema_snapshots/p10", "--k", "2"]])
def test_an_unverifiable_old_snapshot_that_gives_nan_is_not_written(damaged_run, tmp_path, capsys, command):
    from safetensors import safe_open
    from safetensors.torch import save_file

    run, snapshot = damaged_run
    with safe_open(str(snapshot), framework="pt") as f:  # as written before checksums: no sha256
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("sha256")
    save_file(tensors, str(snapshot), metadata=meta)
    data = bytearray(snapshot.read_bytes())
    data[-4000:] = b"\xff" * 4000  # NaN bit patterns in the last tensors
    snapshot.write_bytes(data)
    argv = [a.replace("RUN", str(run)) for a in command]
    err = failed_line(capsys, [*argv, "-o", str(tmp_path / "out")], progress=True)
    assert "hold NaN or Inf" in err and "nothing was written" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- full disks
def test_synthesize_onto_a_full_disk_keeps_the_previous_output(run, small_disk, monkeypatch, capsys):
    disk = small_disk("300k")
    out = disk / "out"
    if not disk.mounted:
        simulate_full_disk(monkeypatch, disk, when=out.is_dir)
    assert cli.main(["synthesize", str(run), *TARGET, "-o", str(out), "--json"]) == 0
    capsys.readouterr()
    before, run_before = tree_digest(out), tree_digest(run)
    err = failed_line(capsys, ["synthesize", str(run), *TARGET, "-o", str(out), "--overwrite"])
    assert err.startswith("lawa-diffusion synthesize: error: no space is left on the disk to write")
    assert f"'{out}' (from -o/--out)" in err and ".tmp" not in err
    assert tree_digest(out) == before and tree_digest(run) == run_before
    assert sorted(os.listdir(disk)) == ["out"]  # no temp folder left


def test_report_onto_a_full_disk_is_one_sentence(run, small_disk, monkeypatch, capsys):
    disk = small_disk("16k")
    if not disk.mounted:
        simulate_full_disk(monkeypatch, disk)
    before = tree_digest(run)
    err = failed_line(capsys, ["report", str(run), "-o", str(disk / "report")])
    assert "no space is left on the disk to write" in err and str(disk / "report") in err
    assert tree_digest(run) == before


def test_the_snapshot_store_on_a_full_disk_names_the_file_it_could_not_write(small_disk, monkeypatch, one_thread):
    disk = small_disk("256k")  # room for one float32 snapshot of the tiny UNet, not two
    first = runfolder.snapshot_path(str(disk), 1, "sigma_rel_0.05")
    if not disk.mounted:
        simulate_full_disk(monkeypatch, disk, when=lambda: os.path.isfile(first))
    unet = tiny_unet()
    store = PosthocSnapshots(unet, str(disk), sigma_rels=[0.05], every_n_steps=1, main_process=True)
    with pytest.raises(OSError) as caught:
        for _ in range(3):
            store.update(unet.parameters())
            store.flush()
    store.writer.error = None
    store.close()
    error = caught.value
    assert error.errno == errno.ENOSPC and error.filename == runfolder.snapshot_path(str(disk), 2, "sigma_rel_0.05")
    line = os_errors.describe(error, "--output-dir")
    assert "step-000000002.safetensors" in line and "it needs about" in line and "\n" not in line
    assert verified_metadata(first)["step"] == "1"  # the snapshot before is whole


def _train_config(tmp_path, run_dir) -> str:
    cfg = tiny_config(run_dir, max_train_steps=4, checkpointing_steps=2, save_ema_snapshots=False)
    cfg["eval"]["every_n_steps"] = 0
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture
def cli_train(monkeypatch):
    from lawa_diffusion.cli import train as train_cli

    monkeypatch.setattr(train_cli, "train", functools.partial(train_mod.train, fid_weights=stand_in_extractor()))


def test_a_full_disk_at_a_checkpoint_names_the_last_good_one(small_disk, tmp_path, monkeypatch, capsys, cli_train,
                                                            one_thread):
    disk = small_disk("1400k")  # room for checkpoint-2 (1.2 MiB), not for checkpoint-4 beside it
    run = disk / "run"
    if not disk.mounted:
        simulate_full_disk(monkeypatch, disk, when=(run / "checkpoint-2").is_dir)
    config = _train_config(tmp_path, run)
    err = failed_line(capsys, ["train", "--config", config], progress=True)
    assert f"no space is left on the disk to write '{run}/checkpoint-4" in err
    assert f"the last good checkpoint is '{run}/checkpoint-2'" in err and "--resume latest" in err
    assert sorted(os.listdir(run)) == [MARKER_NAME, "checkpoint-2", "config.yaml", "lag.json", "metrics.jsonl"]
    reference = tmp_path / "reference"
    assert cli.main(["train", "--config", config, "--output-dir", str(reference)]) == 0
    assert sorted(os.listdir(run / "checkpoint-2")) == sorted(os.listdir(reference / "checkpoint-2"))
    for name in ("unet_ema", "unet_lawa"):
        got, want = unet_weights(str(run / "checkpoint-2" / name)), unet_weights(str(reference / "checkpoint-2" / name))
        assert all(torch.equal(got[k], want[k]) for k in want)
    if disk.mounted:  # room again: the run continues from checkpoint-2 to the uninterrupted result
        subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        assert cli.main(["train", "--config", config, "--resume", "latest"]) == 0
        got, want = unet_weights(str(run / "checkpoint-4" / "unet_ema")), unet_weights(str(reference / "checkpoint-4" / "unet_ema"))
        assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_the_launch_plugin_on_a_full_disk_is_one_sentence(small_disk, launch_server, tmp_path):
    disk = small_disk("300k")
    if not disk.mounted:
        pytest.skip("needs a small tmpfs (mount as root): the script runs in another process")
    # python -m lawa_diffusion.launch ..., forked from the launch server; its stdout apart, its stderr in the log
    code = launch_server.run(
        ["--lawa_k", "2", "--lawa_every_n_steps", "2", "--lawa_posthoc_every_n_steps", "2", str(EMA_PATTERNS_SCRIPT),
         "--output_dir", str(disk / "out"), "--max_train_steps", "8", "--checkpointing_steps", "100"],
        stdout=tmp_path / "stdout.txt")
    stderr = launch_server.stderr_of()
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in stderr
    assert last.startswith("lawa_diffusion.launch: error: no space is left on the disk to write")
    assert "(from --output_dir of the script)" in last and ".tmp" not in last


# ----------------------------------------------------------------------------- said, not silent
def test_a_store_that_will_store_nothing_is_said_by_the_trainer_and_the_plugin(tmp_path, one_thread):
    from lawa_diffusion.config.launch import LaunchConfig
    from lawa_diffusion.integrations.posthoc_beside import PosthocBeside
    from tests.helpers import train_run

    cfg = tiny_config(tmp_path / "run", max_train_steps=2, checkpointing_steps=2, save_ema_snapshots=False)
    cfg["eval"]["every_n_steps"] = 0
    cfg["posthoc"] = {"every_n_steps": 4}
    with pytest.warns(UserWarning, match="posthoc every_n_steps 4 stores no snapshot: training runs to step 2"):
        train_run(cfg)
    assert not os.path.isdir(tmp_path / "run" / "ema_snapshots")  # what it said: nothing was stored
    with pytest.warns(UserWarning, match="--lawa_posthoc_every_n_steps 20 stores no snapshot"):
        PosthocBeside(LaunchConfig(posthoc_every_n_steps=20), ["--max_train_steps", "8", "--output_dir", "x"])


def test_resuming_from_a_damaged_checkpoint_removes_nothing(tmp_path, capsys, cli_train, one_thread):
    run = tmp_path / "run"
    config = _train_config(tmp_path, run)
    assert cli.main(["train", "--config", config]) == 0
    capsys.readouterr()
    state = run / "checkpoint-2" / "lawa_state_lawa.safetensors"
    _flip(state, os.path.getsize(state) - 5)
    before = tree_digest(run)
    err = failed_line(capsys, ["train", "--config", config, "--resume", str(run / "checkpoint-2")], progress=True)
    assert f"'{state}' does not match the checksum" in err and "resume from the checkpoint before this one" in err
    assert tree_digest(run) == before  # checkpoint-4, its metrics and snapshots are all still there
