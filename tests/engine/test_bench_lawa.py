"""benchmarks/bench_lawa.py times what training sees: the training-step overhead is timed in blocks of ν steps with
one synchronisation each (a synchronisation per step would keep the snapshot's side-stream copy from overlapping
the steps after it), and the LAWA block starts with its snapshot."""
from __future__ import annotations

import importlib.util
import json

import pytest

from tests.helpers import ROOT


@pytest.fixture
def bench():
    spec = importlib.util.spec_from_file_location("bench_lawa_under_test", ROOT / "benchmarks" / "bench_lawa.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_steps_are_timed_in_blocks_of_nu_with_one_synchronisation(bench, monkeypatch, capsys):
    events = []
    monkeypatch.setattr(bench, "sync", lambda device: events.append("sync"))
    monkeypatch.setattr(bench, "one_step", lambda unet, forward, opt, ema, device, lawa_step: events.append(lawa_step))
    every, repeats = 4, 3
    monkeypatch.setattr("sys.argv", ["bench_lawa.py", "--tiny", "--device", "cpu", "--train_every", str(every),
                                     "--train_repeats", str(repeats)])
    bench.bench_train_step(bench.torch.device("cpu"), bench.parse_args())
    groups, current = [], []
    for event in events + ["sync"]:
        if event == "sync":
            if current:
                groups.append(current)
            current = []
        else:
            current.append(event)
    assert groups[:2] == [[0, 0], [every]]  # warm-up, then the untimed first snapshot (it allocates the ring)
    timed = groups[2:]
    assert len(timed) == 2 * repeats and all(len(g) == every for g in timed), timed
    lawa_blocks = [g for g in timed if g[0]]
    assert len(lawa_blocks) == repeats and [g for g in timed if not g[0]] == [[0] * every] * repeats
    for g in lawa_blocks:  # one snapshot per block, first: a due step, then the steps its copy can overlap
        assert g[0] % every == 0 and g == list(range(g[0], g[0] + every))
    assert [g[0] for g in lawa_blocks] == [every * (r + 2) for r in range(repeats)]
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["bench"] == "train_step_overhead" and row["every_n_steps"] == every and row["snapshots_taken"] == repeats
