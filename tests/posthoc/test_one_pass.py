"""Many targets in one pass over stored snapshots (posthoc.one_pass over posthoc.snapshot_reader).

References: float64 matrix products of the files' tensors as safetensors' own loader reads them, and the bytes
the operating system was asked for (every file's tensor data read exactly once)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lawa_diffusion.posthoc import one_pass
from lawa_diffusion.posthoc.snapshot_reader import open_snapshot
from tests.helpers import counted_reads, tensor_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = {"conv.weight": (7, 5, 3, 3), "conv.bias": (7,), "norm.weight": (13,), "proj.weight": (61, 29), "z.bias": (1,)}


def write_snapshots(folder, dtypes, spread=0.05, seed=0):
    """Files around one weight vector (θᵢ = w + spread·noise), the i-th in ``dtypes[i]`` (a list: per tensor)."""
    g = torch.Generator().manual_seed(seed)
    w = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in SHAPES.items()}
    paths = []
    for i, dtype in enumerate(dtypes):
        kinds = dtype if isinstance(dtype, list) else [dtype] * len(SHAPES)
        tensors = {n: (w[n] + spread * torch.randn(s, generator=g, dtype=torch.float64)).to(k)
                   for (n, s), k in zip(SHAPES.items(), kinds)}
        paths.append(str(folder / f"step-{i:09d}.safetensors"))
        save_file(tensors, paths[-1])
    return paths


def float64_products(paths, x):
    states = [load_file(p) for p in paths]
    return [{n: sum(float(x[t, i]) * s[n].double() for i, s in enumerate(states)) for n in SHAPES}
            for t in range(x.shape[0])]


def run(paths, x, **kwargs):
    readers = [open_snapshot(p) for p in paths]
    try:
        order = one_pass.flat_order(readers)
        out = one_pass.StateBuffers(order, x.shape[0], torch.float64)
        for start, tile in one_pass.weighted_sums(readers, x, **kwargs):
            out.take(start, tile)
        return out.states(), readers
    finally:
        for r in readers:
            r.close()


def worst(got, expected):
    """The largest difference of a tensor from its reference, relative to the reference's norm."""
    return max(float((g[n] - e[n]).norm() / e[n].norm()) for g, e in zip(got, expected) for n in e)


@pytest.mark.parametrize("read, tile", [(None, None), (50, 3 * 8 * 40), (1, 8)])
def test_targets_are_the_float64_products_wherever_blocks_and_tiles_cut(tmp_path, monkeypatch, read, tile):
    mixed = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float32]
    paths = write_snapshots(tmp_path, [torch.float16, torch.bfloat16, torch.float32, mixed, torch.float64])
    x = np.array([[0.1, 0.2, 0.3, 0.15, 0.25],  # sums to 1
                  [2.0, -1.5, 0.0, 1.0, -0.75],  # sums to 0.75
                  [0.0, 0.0, 1.0, 0.0, 0.0]])  # one file as it is
    if read is not None:
        monkeypatch.setattr(one_pass, "READ_ELEMENTS", read)
        monkeypatch.setattr(one_pass, "MIN_ELEMENTS", 1)
        monkeypatch.setattr(one_pass, "TILE_BYTES", tile)
    expected = float64_products(paths, x)
    got64, _ = run(paths, x, accumulate=torch.float64)
    assert worst(got64, expected) < 1e-14
    got32, _ = run(paths, x)
    assert worst(got32, expected) < 1e-6


def test_large_cancelling_coefficients_stay_at_float32_rounding_of_the_result(tmp_path):
    # Σ|x| = 201: a float32 product of the weights themselves loses about that factor; the sums over the
    # snapshots' differences do not
    paths = write_snapshots(tmp_path, [torch.float32] * 6, spread=0.01, seed=1)
    x = np.array([[50.5, -50.0, 25.0, -25.0, 25.0, -24.5]])
    expected = float64_products(paths, x)
    got, _ = run(paths, x)
    assert worst(got, expected) < 1e-6
    states = [load_file(p) for p in paths]
    plain = [{n: sum(float(x[0, i]) * s[n] for i, s in enumerate(states)).double() for n in SHAPES}]
    assert worst(plain, expected) > 1e-6


def test_every_file_is_read_once_in_many_blocks(tmp_path, monkeypatch):
    paths = write_snapshots(tmp_path, [torch.float16, torch.float32, torch.bfloat16])
    monkeypatch.setattr(one_pass, "READ_ELEMENTS", 64)
    monkeypatch.setattr(one_pass, "MIN_ELEMENTS", 1)
    x = np.full((4, 3), 1 / 3)
    with counted_reads(monkeypatch) as reads:
        _, readers = run(paths, x)
    total = sum(math.prod(s) for s in SHAPES.values())
    assert math.ceil(total / 64) > 10  # many blocks
    for path, reader in zip(paths, readers):
        assert reads[path] == {"opens": 1, "bytes": tensor_bytes(path)}
        assert reader.bytes_read == tensor_bytes(path)


def test_snapshots_of_other_tensors_are_refused(tmp_path):
    paths = write_snapshots(tmp_path, [torch.float32, torch.float32])
    save_file({"conv.weight": torch.zeros(7, 5, 3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors' holds other tensors"):
        run([paths[0], str(tmp_path / "other.safetensors")], np.array([[0.5, 0.5]]))
