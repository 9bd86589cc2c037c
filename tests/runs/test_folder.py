"""The run folder's helpers for what went wrong: the last good checkpoint, run folders written before markers,
a snapshot store that would store nothing, and rows whose step is not an integer.

References: the folder names written here, and Python's warnings as the user sees them."""
from __future__ import annotations

import os

import pytest
import yaml

from lawa_diffusion.runs import folder as runfolder


def test_last_good_checkpoint_is_the_newest_complete_one(tmp_path):
    run = tmp_path / "run"
    assert "no complete checkpoint yet" in runfolder.last_good_checkpoint_note(str(run))
    for name in ("checkpoint-2", "checkpoint-10", ".checkpoint-12.tmp"):  # a save cut short stays hidden
        (run / name).mkdir(parents=True)
    note = runfolder.last_good_checkpoint_note(str(run))
    assert f"'{run / 'checkpoint-10'}'" in note and "--resume latest" in note


def test_a_run_folder_written_before_markers_is_known_by_its_config(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not runfolder.written_by_train(str(run))
    (run / "config.yaml").write_text(yaml.safe_dump({"output_dir": str(run), "max_train_steps": 4}))
    assert runfolder.written_by_train(str(run))
    (run / "config.yaml").write_text(yaml.safe_dump({"output_dir": "somewhere/else"}))  # a user's config
    assert not runfolder.written_by_train(str(run))


@pytest.mark.parametrize("every, last, says", [(500, 400, True), (500, 500, False), (0, 10, False),
                                               (20, "8", True), (20, "many", False), (2, None, False)])
def test_a_store_that_stores_nothing_is_said(every, last, says):
    text = runfolder.stores_nothing_warning(every, last, "--lawa_posthoc_every_n_steps")
    assert (text is not None) == says
    if says:
        assert text.startswith(f"--lawa_posthoc_every_n_steps {every} stores no snapshot") and "\n" not in text


def test_rows_without_an_integer_step_are_left_out_with_their_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 4}\n{"step": "four"}\n{"variant": "ema"}\n{"step": 2}\n')
    with pytest.warns(UserWarning) as caught:
        assert runfolder.metric_steps(str(tmp_path)) == [2, 4]
    assert [str(w.message) for w in caught] == [
        f"{path}: line 2 has step 'four', not an integer; the row is left out",
        f"{path}: line 3 has step None, not an integer; the row is left out"]
    runfolder.truncate_metrics(str(path), 3)  # rows it cannot place are kept, not dropped
    assert path.read_text().count("\n") == 3 and '"four"' in path.read_text() and os.path.isfile(path)


def test_a_checkpoint_is_verified_before_a_resume(tmp_path):
    import torch

    from lawa_diffusion.utils.checksums import DamagedFileError
    from lawa_diffusion.utils.files import atomic_save_safetensors

    checkpoint = tmp_path / "checkpoint-4"
    atomic_save_safetensors(checkpoint / "lawa_state_lawa.safetensors", {"snapshots": torch.ones(3, 5)})
    atomic_save_safetensors(checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors", {"w": torch.ones(4)})
    runfolder.verify_checkpoint(str(checkpoint))
    path = checkpoint / "unet_ema" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DamagedFileError, match="diffusion_pytorch_model.safetensors' is truncated.*before this one"):
        runfolder.verify_checkpoint(str(checkpoint))
