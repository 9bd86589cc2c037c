"""A snapshot stored in shards (``engine.sharded_snapshots``: DCP's safetensors shards and a record) read on one
process: written here by a one-process group; several processes' shards are read in tests/system/test_posthoc_shards.py.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist

from lawa_diffusion.engine.sharded_snapshots import Part, PartLayout, write_sharded_snapshot
from lawa_diffusion.posthoc import one_pass
from lawa_diffusion.posthoc.snapshot_reader import load_tensors, open_snapshot, snapshot_metadata
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils import checksums
from lawa_diffusion.utils.checksums import DamagedFileError
from lawa_diffusion.utils.files import atomic_save_safetensors

SHAPES = {"a.weight": (5, 3), "a.bias": (5,), "b.weight": (2, 5), "c": (7,)}


@pytest.fixture
def one_process():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.new_group(backend="gloo")
    finally:
        dist.destroy_process_group()


def write(folder, group, seed, dtype=torch.float32) -> dict:
    generator = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(s, generator=generator).to(dtype) for n, s in SHAPES.items()}
    layout = PartLayout("dtensor", list(SHAPES), [Part(s, 0, int(np.prod(s))) for s in SHAPES.values()])
    record = {"step": str(seed), "track": "t", "model_config": json.dumps({"sample_size": 8})}
    write_sharded_snapshot(str(folder), {n: t.reshape(-1).clone() for n, t in tensors.items()}, layout, record,
                           group, main=True)
    return tensors


def test_read_back_whole_and_summed_with_file_snapshots_like_float64(tmp_path, one_process, monkeypatch):
    track = tmp_path / "ema_snapshots" / "t"
    sharded = [write(track / f"step-{s:09d}", one_process, s) for s in (1, 2)]
    plain = {n: t + 0.5 for n, t in sharded[0].items()}
    atomic_save_safetensors(str(track / "step-000000003.safetensors"), plain)
    assert sorted(runfolder.snapshot_files(str(track))) == [1, 2, 3]
    assert not list(track.glob(".*.tmp"))
    for got, want in zip([load_tensors(str(track / f"step-{s:09d}")) for s in (1, 2)], sharded):
        assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert snapshot_metadata(str(track / "step-000000002"), "fix")["step"] == "2"
    monkeypatch.setattr(one_pass, "READ_ELEMENTS", 4)  # blocks cut across tensors
    monkeypatch.setattr(one_pass, "MIN_ELEMENTS", 1)
    monkeypatch.setattr(checksums, "_verified", {})  # each file's checksum summed from the pass's read, no other
    monkeypatch.setattr(checksums, "_file_checksum", lambda *a: pytest.fail("a file was read again"))
    x = np.array([[0.25, 0.5, 0.25], [1.5, -1.0, 0.5]])
    readers = [open_snapshot(str(track / f"step-{s:09d}"), verify=True) for s in (1, 2)] + [
        open_snapshot(str(track / "step-000000003.safetensors"), verify=True)]
    buffers = one_pass.StateBuffers(one_pass.flat_order(readers), 2, torch.float64)
    for start, tile in one_pass.weighted_sums(readers, x, accumulate=torch.float64):
        buffers.take(start, tile)
    for reader in readers:
        reader.close()
    assert len(checksums._verified) == 3  # two shard files and one file, found intact by the pass
    for row, state in zip(x, buffers.states()):
        for name in SHAPES:
            want = sum(w * t[name].double() for w, t in zip(row, [*sharded, plain]))
            torch.testing.assert_close(state[name], want, rtol=0, atol=1e-12)


def test_damaged_or_incomplete_sharded_snapshots_are_one_sentence(tmp_path, one_process):
    folder = tmp_path / "step-000000001"
    write(folder, one_process, 1)
    shard = next(folder.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # a tensor byte
    shard.write_bytes(bytes(data))
    with pytest.raises(DamagedFileError, match=r"does not match the checksum written with it.*; fix it"):
        snapshot_metadata(str(folder), "fix it")
    shard.unlink()
    with pytest.raises(DamagedFileError, match=r"lacks its shard file 'shard-00001.*'; fix it"):
        snapshot_metadata(str(folder), "fix it")
    os.unlink(folder / runfolder.SHARDED_SNAPSHOT_RECORD)  # a store killed before its record: not a snapshot
    assert runfolder.snapshot_files(str(tmp_path)) == {}
