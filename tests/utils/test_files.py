"""The output guard, the marker, atomic folders that never delete what the package did not write, checksums of
safetensors files, errors of the operating system as one sentence, and JSON lines that say what they skip.

References: the folders' own bytes before and after (``tree_digest``), safetensors' own reader, a real full tmpfs
where this process may mount one (else a simulated one), and errno's own codes.
"""
from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lawa_diffusion.utils import checksums, files, os_errors
from lawa_diffusion.utils.checksums import CHECKSUM_KEY, DamagedFileError, load_safetensors, verified_metadata
from lawa_diffusion.utils.files import (
    MARKER_NAME,
    BackgroundWriter,
    atomic_dir,
    atomic_save_safetensors,
    atomic_write_bytes,
    check_output_dir,
    check_output_file,
    read_jsonl,
    read_jsonl_rows,
    write_marker,
)
from tests.helpers import simulate_full_disk, tree_digest


@pytest.fixture
def user_folder(tmp_path):
    """A folder of the user's: files the package must never delete."""
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("keep me")
    (folder / "sub" / "data.bin").write_bytes(os.urandom(64))
    return folder


# ----------------------------------------------------------------------------- the output guard
def test_guard_refuses_empty_root_home_current_and_their_parents(tmp_path, monkeypatch):
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for path, words in [("", "is empty"), ("   ", "is empty"), (None, "is empty"), ("/", "root folder"),
                        (".", "is the current folder"), ("..", "holds the current folder"),
                        (str(tmp_path), "holds the current folder"), ("~", "your home folder"),
                        (str(tmp_path / "home"), "your home folder")]:
        with pytest.raises(ValueError, match=words):
            check_output_dir(path, "-o", True, kind="synthesize")
    assert os.getcwd() == str(work)


def test_guard_refuses_the_folder_read_from_and_what_holds_it(tmp_path, user_folder):
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    write_marker(run, "train")
    before = tree_digest(tmp_path)
    for out, words in [(run, "is the folder this command reads from"), (tmp_path / "runs", "holds"),
                       (tmp_path, "holds")]:
        with pytest.raises(ValueError, match=words):
            check_output_dir(str(out), "-o", True, kind="synthesize", protected=[str(run)])
    with pytest.raises(FileExistsError, match="training run folder"):  # even unnamed as protected
        check_output_dir(str(run), "-o", True, kind="report")
    assert tree_digest(tmp_path) == before
    assert check_output_dir(str(run / "report"), "-o", kind="report", protected=[str(run)]) == str(run / "report")


def test_guard_never_accepts_a_folder_the_package_did_not_write(user_folder, tmp_path):
    before = tree_digest(user_folder)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not written by lawa-diffusion.*not even with --overwrite"):
            check_output_dir(str(user_folder), "-o", overwrite, kind="synthesize")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        check_output_dir(str(tmp_path / "a-file"), "-o", True, kind="synthesize")
    with pytest.raises(NotADirectoryError, match="which is a file"):
        check_output_dir(str(tmp_path / "a-file" / "out"), "-o", True, kind="synthesize")
    assert tree_digest(user_folder) == before


def test_guard_accepts_its_own_outputs_and_empty_folders(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert check_output_dir(str(out), "-o", True, kind="synthesize") == str(out)  # empty: nothing to lose
    write_marker(out, "synthesize")
    (out / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_output_dir(str(out), "-o", False, kind="synthesize")
    assert check_output_dir(str(out), "-o", True, kind="synthesize") == str(out)
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(json.dumps({"format": "lawa-diffusion-report/1"}))  # written before markers
    assert check_output_dir(str(report), "-o", False, kind="report", refresh=True) == str(report)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        check_output_dir(str(report), "-o", False, kind="sweep", refresh=True)


def test_atomic_dir_never_deletes_an_unmarked_folder(user_folder, tmp_path):
    # before the guard, atomic_dir(path, overwrite=True) moved any folder aside and deleted it
    before = tree_digest(user_folder)
    with pytest.raises(FileExistsError, match="never replaced"):
        with atomic_dir(user_folder, overwrite=True, kind="synthesize") as tmp:
            (open(os.path.join(tmp, "x"), "w")).close()
    assert tree_digest(user_folder) == before
    assert sorted(os.listdir(tmp_path)) == ["mine"]  # no temp folder left beside it


def test_atomic_dir_replaces_its_own_output_and_marks_it(tmp_path):
    out = tmp_path / "model"
    for value in ("first", "second"):
        with atomic_dir(out, overwrite=True, kind="average") as tmp:
            with open(os.path.join(tmp, "weights"), "w") as f:
                f.write(value)
        assert (out / "weights").read_text() == value
    assert json.loads((out / MARKER_NAME).read_text())["kind"] == "average"
    report = tmp_path / "rep"
    report.mkdir()
    write_marker(report, "report")
    with pytest.raises(FileExistsError, match="not a synthesize folder"):  # another command's output
        with atomic_dir(report, overwrite=True, kind="synthesize"):
            pass
    assert (report / MARKER_NAME).is_file()


def test_output_file_guard(tmp_path):
    (tmp_path / "taken.json").write_text("{}")
    (tmp_path / "f").write_text("")
    for path, error, words in [("", ValueError, "is empty"), (str(tmp_path), FileExistsError, "is a folder"),
                               (str(tmp_path / "f" / "x.json"), NotADirectoryError, "which is a file"),
                               (str(tmp_path / "taken.json"), FileExistsError, "pass --overwrite")]:
        with pytest.raises(error, match=words):
            check_output_file(path, "--output", False)
    assert check_output_file(None, "--output") is None
    assert check_output_file(str(tmp_path / "taken.json"), "--output", True) == str(tmp_path / "taken.json")


# ----------------------------------------------------------------------------- checksums
def _tensors():
    torch.manual_seed(0)
    return {"a": torch.randn(3, 4), "b": torch.randn(5).half(), "n": torch.arange(4)}


def test_checksum_is_written_and_a_changed_byte_is_named(tmp_path):
    path = tmp_path / "step-000000001.safetensors"
    atomic_save_safetensors(path, _tensors(), metadata={"step": "1"})
    meta = verified_metadata(path)
    assert meta["step"] == "1" and len(meta[CHECKSUM_KEY]) == 64
    assert all(torch.equal(v, _tensors()[k]) for k, v in load_safetensors(path).items())
    data = bytearray(path.read_bytes())
    for where in (len(data) - 1, len(data) - 30):  # one bit of a tensor, another tensor's byte
        changed = bytearray(data)
        changed[where] ^= 0x01
        path.write_bytes(changed)
        load_file(str(path))  # safetensors itself reads it without a word
        with pytest.raises(DamagedFileError, match=f"{path.name}.*does not match the checksum.*restore it"):
            verified_metadata(path)


def test_same_size_overwrite_and_changed_metadata_are_caught(tmp_path):
    path, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    atomic_save_safetensors(path, _tensors(), metadata={"step": "1"})
    changed = {k: v * 2 for k, v in _tensors().items()}
    save_file(changed, str(other), metadata=verified_metadata(path))  # same size, same header, other bytes
    assert os.path.getsize(other) == os.path.getsize(path)
    with pytest.raises(DamagedFileError, match="does not match the checksum"):
        verified_metadata(other)
    data = path.read_bytes().replace(b'"step":"1"', b'"step":"7"')
    path.write_bytes(data)
    with pytest.raises(DamagedFileError, match="does not match the checksum"):
        verified_metadata(path)


def test_truncated_garbled_and_empty_files_are_one_sentence(tmp_path):
    path = tmp_path / "s.safetensors"
    atomic_save_safetensors(path, _tensors())
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    cases = {"data cut": (data[:-10], "is truncated"), "header cut": (data[:8 + length // 2], "is truncated"),
             "garbled": (data[:8] + b"#" * 20 + data[28:], "header is damaged"),
             "empty": (b"", "header is damaged"), "size field": (b"\xff" * 8 + data[8:], "header is damaged")}
    for name, (content, words) in cases.items():
        path.write_bytes(content)
        with pytest.raises(DamagedFileError, match=words) as caught:
            load_safetensors(path, "do this")
        message = str(caught.value)
        assert str(path) in message and message.endswith("; do this") and "\n" not in message, name


def test_files_without_a_checksum_are_read_with_one_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(checksums._noted, "unchecked", False)
    for i in range(3):
        save_file(_tensors(), str(tmp_path / f"old{i}.safetensors"), metadata={"step": str(i)})
        assert verified_metadata(tmp_path / f"old{i}.safetensors")["step"] == str(i)
    err = capsys.readouterr().err
    assert err.count("carries no checksum") == 1 and "old0.safetensors" in err


# ----------------------------------------------------------------------------- errors of the operating system
@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space is left"), (errno.EACCES, "permission denied"),
                                         (errno.EROFS, "read-only file system"), (errno.ENOTDIR, "lies under a file")])
def test_os_errors_are_one_sentence_with_path_and_option(code, words):
    error = OSError(code, os.strerror(code), "/data/run/.step-000000004.safetensors.k2j4h6g8.tmp")
    line = os_errors.describe(os_errors.as_os_error(error), "-o")
    assert words in line and "'/data/run/step-000000004.safetensors'" in line and "(from -o)" in line
    assert ".tmp" not in line and "\n" not in line and line.count("; ") == 1


def test_library_errors_that_wrap_an_os_error_are_recognised():
    from safetensors import SafetensorError

    wrapped = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    found = os_errors.as_os_error(wrapped, "/x/out")
    assert found.errno == errno.ENOSPC and found.filename == "/x/out"
    assert os_errors.as_os_error(ValueError("not one"), "/x") is None
    assert os_errors.visible_path("/r/.checkpoint-4.tmp/unet_ema") == "/r/checkpoint-4/unet_ema"


def test_a_full_disk_says_the_bytes_needed_and_keeps_the_old_file(small_disk, monkeypatch):
    disk = small_disk("64k")
    if not disk.mounted:
        simulate_full_disk(monkeypatch, disk)
    target = disk / "kept.bin"
    target.write_bytes(b"old") if disk.mounted else None
    with pytest.raises(OSError) as caught:
        atomic_write_bytes(target, b"x" * 200_000)
    error = caught.value
    assert error.errno == errno.ENOSPC and error.filename == str(target)
    line = os_errors.describe(error, "-o")
    assert "it needs about 195.3 KiB" in line and str(target) in line
    if disk.mounted:
        assert target.read_bytes() == b"old" and os.listdir(disk) == ["kept.bin"]  # no temp file left


def test_background_writer_keeps_the_errno_and_path(tmp_path):
    writer = BackgroundWriter("t", "test writer")

    def job():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / ".f.abcdefgh.tmp"))

    writer.submit(job)
    with pytest.raises(OSError) as caught:
        writer.sync()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "f")
    writer.submit(lambda: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(OSError, match="test writer failed: boom"):
        writer.close()


# ----------------------------------------------------------------------------- JSON lines
def test_jsonl_lines_that_are_not_rows_are_skipped_with_their_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\nnot json\n[1, 2]\n\n{"step": 2}\n{"step": 3, "fi')
    with pytest.warns(UserWarning) as caught:
        rows = read_jsonl_rows(path)
    assert rows == [(1, {"step": 1}), (5, {"step": 2})]
    said = [str(w.message) for w in caught]
    assert said == [f"{path}: line 2 is not valid JSON; skipped",
                    f"{path}: line 3 holds a JSON list, not a row (an object); skipped",
                    f"{path}: line 6 is unfinished (a write cut short); skipped"]
    path.write_bytes(b'{"step": 1}\n\xff\xfe\n')
    with pytest.raises(ValueError, match=f"{path.name}.*is not UTF-8 text"):
        read_jsonl(path)


def test_marker_names_the_command(tmp_path):
    write_marker(tmp_path, "sweep")
    assert files.output_kind(tmp_path) == "sweep"
    (tmp_path / MARKER_NAME).write_text("garbage")
    assert files.output_kind(tmp_path) is None


def test_written_files_and_folders_follow_the_umask(tmp_path):
    from lawa_diffusion.utils import files

    previous = os.umask(0o027)
    files._UMASK.clear()
    try:
        files.atomic_write_text(tmp_path / "a.txt", "x")
        with files.atomic_dir(tmp_path / "out", kind="synthesize") as tmp:
            with open(os.path.join(tmp, "w.bin"), "wb") as f:
                f.write(b"1")
    finally:
        os.umask(previous)
        files._UMASK.clear()
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0700
    assert (tmp_path / "out" / "w.bin").stat().st_mode & 0o777 == 0o640
