"""``lawa-diffusion sweep``: FID of every (k, ν multiple) LAWA window from a run's EMA snapshots.
"""
import json
import os

import pytest
import yaml

from lawa_diffusion.posthoc.sweep import format_sweep, run_sweep, sweep_cells
from tests.helpers import (
    TINY_UNET,
    float64_mean_of_files,
    naive_window,
    one_line_error,
    param_sum_metric,
    save_snapshot_file,
)


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("snaprun")
    files = {s: save_snapshot_file(str(run / "ema_snapshots"), s) for s in range(10, 90, 10)}
    (run / "config.yaml").write_text(yaml.safe_dump({"lawa": {"k": 4, "every_n_steps": 10, "start_step": 0},
                                                     "model": dict(TINY_UNET)}))
    with open(run / "metrics.jsonl", "w") as f:
        for step in (40, 80):
            f.write(json.dumps({"step": step, "variant": "ema", "fid": 1.0}) + "\n")
    return run, files


def test_sweep_scores_each_window_with_one_call_per_step(snapshot_run, tmp_path):
    run, files = snapshot_run
    calls = []
    summary = run_sweep(run, [1, 2, 8], [1, 2, 4], evaluate=param_sum_metric(calls), out_dir=str(tmp_path / "sw"),
                        progress=False)
    assert summary["steps"] == [40, 80] and len(calls) == 2
    assert len(summary["rows"]) == 2 * 3 * 3
    for row in summary["rows"]:
        window = naive_window(files, row["step"], row["k"], row["every"], 10, 0)
        assert tuple(row["snapshot_steps"]) == window
        mean = float64_mean_of_files([files[s] for s in window])
        assert row["fid"] == pytest.approx(sum(v.sum().item() for v in mean.values()), rel=1e-6, abs=1e-4)
    windows_at_80 = {tuple(r["snapshot_steps"]) for r in summary["rows"] if r["step"] == 80}
    assert len(calls[1]) == len(windows_at_80)  # identical windows are scored once
    on_disk = [json.loads(line) for line in (tmp_path / "sw" / "sweep.jsonl").read_text().splitlines()]
    assert on_disk == summary["rows"]
    saved = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert saved["heatmap"]["step"] == 80
    assert saved["heatmap"]["values"][2][2] == next(r["fid"] for r in summary["rows"]
                                                    if (r["step"], r["k"], r["every"]) == (80, 8, 4))
    assert (tmp_path / "sw" / "heatmap-fid.png").read_bytes()[:4] == b"\x89PNG"
    table = format_sweep(summary).splitlines()
    assert table[-1].startswith("k=8") and f"{saved['heatmap']['values'][2][2]:.3f}" in table[-1]


def test_sweep_refuses_existing_output_and_bad_steps(snapshot_run, tmp_path):
    run, _ = snapshot_run
    (tmp_path / "sw").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_sweep(run, [1], [1], evaluate=param_sum_metric([]), out_dir=str(tmp_path / "sw"), progress=False)
    with pytest.raises(ValueError, match="before the first EMA snapshot"):
        run_sweep(run, [1], [1], steps="5", evaluate=param_sum_metric([]), out_dir=str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="--k must list"):
        run_sweep(run, "1,1", [1], evaluate=param_sum_metric([]), out_dir=str(tmp_path / "x"), progress=False)


def test_sweep_without_snapshots_says_what_to_do(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    err = one_line_error(capsys, ["sweep", str(tmp_path / "run")])
    assert "ema_snapshots" in err


def test_sweep_cells_respect_start_step():
    cells = sweep_cells([5, 15, 25, 35, 45], [45], [2], [1, 2], every_n_steps=10, start_step=5)
    assert [c.snapshot_steps for c in cells] == [(35, 45), (25, 45)]


@pytest.mark.filterwarnings("ignore::lawa_diffusion.evaluation.fid.SmallSampleWarning")
def test_sweep_reuses_cached_reference_stats(snapshot_run, tmp_path):
    import numpy as np

    from lawa_diffusion.evaluation import fid
    from lawa_diffusion.evaluation.inception import stand_in_extractor

    run, _ = snapshot_run
    ref = tmp_path / "reference.npy"
    np.save(ref, np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8))
    options = dict(reference=str(ref), num_samples=4, batch_size=4, num_inference_steps=2,
                   weights=stand_in_extractor(), device="cpu", progress=False, steps="final")
    first = run_sweep(run, [1, 2], [1], out_dir=str(tmp_path / "a"), **options)
    # Garble the reference but keep its identity (path, size, modification time): only a cache hit still works.
    st = os.stat(ref)
    ref.write_bytes(b"\0" * st.st_size)
    os.utime(ref, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ValueError, match="could not be read"):
        fid.reference_stats(str(ref), image_size=8, weights=options["weights"], cache=False, progress=False)
    second = run_sweep(run, [1, 2], [1], out_dir=str(tmp_path / "b"), **options)
    assert [r["fid"] for r in second["rows"]] == [r["fid"] for r in first["rows"]]
    assert all(r["fid"] is not None and r["num_samples"] == 4 for r in first["rows"])
