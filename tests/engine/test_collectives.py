"""LAWA's own collectives: on a device the group's backend takes, over the EMA's own mesh (references: the
backends' documented devices; a float64 mean of the full weights; processes outside the mesh never waited for)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from lawa_diffusion.engine import collectives
from tests.helpers import tiny_unet, torchrun


class FakeGroup:
    def __init__(self, *types: str):
        self._device_types = [torch.device(t) for t in types]


@pytest.mark.parametrize("types, near, want", [
    (("cuda",), "cpu", "cuda:2"),  # NCCL and shards offloaded to the CPU: through the current GPU
    (("cuda",), "cuda:1", "cuda:1"),  # NCCL and an EMA on cuda:1: there, whatever the current device
    (("cuda", "cpu"), "cpu", "cpu"),  # gloo takes either
    (("cuda", "cpu"), "cuda:1", "cuda:1"),
    (("cuda", "cpu"), "mps", "cpu"),  # a device the backend does not take: the CPU when it takes that
])
def test_the_communication_device_is_one_the_backend_takes(monkeypatch, types, near, want):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert collectives.comm_device(FakeGroup(*types), torch.device(near)) == torch.device(want)


@pytest.mark.parametrize("backend, want", [("nccl", ["cuda"]), ("gloo", ["cpu", "cuda"]),
                                           ("cpu:gloo,cuda:nccl", ["cpu", "cuda"])])
def test_device_types_from_the_backend_name_when_the_group_does_not_say(monkeypatch, backend, want):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    assert collectives.group_device_types(object()) == want


def test_without_a_dtensor_the_world_is_the_group():
    assert collectives.mesh_groups([torch.zeros(2)]) == [None]


@pytest.mark.slow
def test_a_mesh_that_leaves_out_a_process_agrees_and_saves_without_it(tmp_path):
    """The EMA is sharded over ranks 0 and 1 of three; rank 2 runs no collective. The NaN of rank 1's shard at
    step 3 is dropped on both (the agreement runs over the mesh, not the world, which would wait for rank 2 until
    gloo's timeout), and rank 0 writes the gathered average: the float64 mean of steps 2, 4, 5."""
    from diffusers import UNet2DModel

    done = torchrun("submesh_lawa.py", 3, "--output_dir", str(tmp_path), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert [s.get("window") for s in seen[:2]] == [[2, 4, 5]] * 2, seen
    assert [s.get("skipped") for s in seen[:2]] == [[3]] * 2 and seen[2]["waited_for_files"], seen
    full = [p.detach().double() for p in tiny_unet().parameters()]
    at = {}
    for step in range(1, 6):
        full = [w * 0.5 + step for w in full]
        at[step] = full
    want = [(a + b + c) / 3 for a, b, c in zip(at[2], at[4], at[5])]
    saved = UNet2DModel.from_pretrained(tmp_path / "lawa")
    assert max((p.double() - w).abs().max().item() for p, w in zip(saved.parameters(), want)) <= 1e-5
