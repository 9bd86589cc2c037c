"""The checksum of a snapshot summed from the bytes a single pass reads (``StreamedChecksum``) against the one
read from the whole file (``verified_metadata``), in and out of order, with empty tensors, and a changed byte."""
from __future__ import annotations

import pytest
import torch

from lawa_diffusion.utils import checksums
from lawa_diffusion.utils.checksums import DamagedFileError, StreamedChecksum, read_header
from lawa_diffusion.utils.files import atomic_save_safetensors


@pytest.fixture
def stored(tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "_verified", {})
    tensors = {"b": torch.arange(10, dtype=torch.float16), "a": torch.ones(3, 4), "empty": torch.zeros(0),
               "z": torch.zeros(0, 2)}
    path = str(tmp_path / "step-000000001.safetensors")
    atomic_save_safetensors(path, {k: v.float() for k, v in tensors.items()}, metadata={"step": "1"})
    return path


def chunks_in_name_order(path, size):
    header, _, data = read_header(path)
    raw = open(path, "rb").read()
    for name in sorted(header):
        begin, end = (int(v) for v in header[name]["data_offsets"])
        for at in range(begin, end, size):
            yield name, at - begin, raw[data + at:data + min(at + size, end)]


@pytest.mark.parametrize("size", [1, 7, 4096])
def test_fed_in_order_it_verifies_without_reading_the_file(stored, monkeypatch, size):
    monkeypatch.setattr(checksums, "_file_checksum", lambda *a: pytest.fail("the file was read again"))
    check = StreamedChecksum(stored)
    for name, offset, data in chunks_in_name_order(stored, size):
        check.feed(name, offset, data)
    check.finish()
    assert stored in checksums._verified


def test_a_changed_byte_is_named_and_out_of_order_feeding_reads_the_file_once_more(stored, monkeypatch):
    chunks = list(chunks_in_name_order(stored, 8))
    name, offset, data = chunks[2]
    chunks[2] = (name, offset, bytes([data[0] ^ 1]) + data[1:])
    check = StreamedChecksum(stored, fix="restore it")
    for chunk in chunks:
        check.feed(*chunk)
    with pytest.raises(DamagedFileError, match=r"does not match the checksum written with it.*; restore it$"):
        check.finish()
    reads = []
    whole_file = checksums._file_checksum
    monkeypatch.setattr(checksums, "_file_checksum", lambda path, *a: reads.append(path) or whole_file(path, *a))
    check = StreamedChecksum(stored)
    for chunk in reversed(list(chunks_in_name_order(stored, 8))):
        check.feed(*chunk)
    check.finish()  # intact: verified by one more read of the file
    assert reads == [stored] and stored in checksums._verified
