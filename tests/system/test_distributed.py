"""Two processes (``torchrun``, gloo on CPU, accelerate MULTI_CPU) give the LAWA weights of one process.

The single-process reference sees the same global batch of 8, split into the same two halves as the
two ranks, with one backward pass per half (``--micro_batches 2``): its accumulated gradient
g_a/2 + g_b/2 then equals DDP's all-reduced (g_a + g_b)/2 bit for bit, since halving is exact in
floating point and a sum of two terms does not depend on their order. So the weights must agree
exactly, not within a tolerance. (With one backward over all 8 samples the weight gradients are
summed in another order, and AdamW's normalisation magnifies those last-bit differences to ~1e-4.)
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers import ENGINE_SCRIPT as SCRIPT
from tests.helpers import read_weights, run_ok

ARGS = ["--steps", "24", "--checkpoint_every", "0", "--k", "3", "--every", "2", "--batch_size", "8",
        "--lawa", "cpu:all,cpu:main,device:all"]
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(run_dir: Path, nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(SCRIPT), "--output_dir", str(run_dir)] + ARGS
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def summary(run_dir: Path, rank: int) -> dict:
    return json.loads((run_dir / "final" / f"summary_rank{rank}.json").read_text())["engines"]


def test_two_processes_give_the_single_process_lawa(engine_server, tmp_path):  # noqa: F811
    single_dir, multi_dir = tmp_path / "single", tmp_path / "multi"
    run_ok(engine_server, ["--output_dir", str(single_dir), "--micro_batches", "2"] + ARGS)
    torchrun(multi_dir, 2)
    single, rank0, rank1 = read_weights(single_dir), read_weights(multi_dir, 0), read_weights(multi_dir, 1)
    assert json.loads((multi_dir / "final" / "summary_rank0.json").read_text())["num_processes"] == 2
    assert torch.equal(rank0["ema"], single["ema"]) and torch.equal(rank1["ema"], single["ema"])
    for name in ("lawa_cpu_all", "lawa_device_all", "lawa_cpu_main"):
        assert not torch.equal(single[name], single["ema"])  # the window really averages several snapshots
        assert torch.equal(rank0[name], single[name]), f"{name}: 2-process LAWA differs from 1 process"
        assert torch.equal(rank1[name], rank0[name]), f"{name}: the ranks disagree"
    s0, s1 = summary(multi_dir, 0), summary(multi_dir, 1)
    for name in ("lawa_cpu_all", "lawa_device_all"):  # every rank holds its own window
        assert s0[name]["ring_allocated"] and s1[name]["ring_allocated"]
        assert s0[name]["snapshot_steps"] == s1[name]["snapshot_steps"] == [20, 22, 24]
    # snapshot_ranks="main": rank 1 keeps only the step list, no snapshots; it gets the average by
    # broadcast (average_flat(sync_ranks=True), compared above) and a clear error without it
    assert s0["lawa_cpu_main"]["ring_allocated"] and not s1["lawa_cpu_main"]["ring_allocated"]
    assert not s1["lawa_cpu_main"]["holds_snapshots"]
    assert s1["lawa_cpu_main"]["snapshot_steps"] == [20, 22, 24]
    assert "rank 1 holds no snapshots because snapshot_ranks='main'" in s1["lawa_cpu_main"]["unsynced_error"]
    assert s0["lawa_cpu_main"]["unsynced_error"] is None
