"""The k × ν ablation after training (``lawa-diffusion sweep``): FID of every LAWA window a run's saved
EMA snapshots allow, at each evaluation step, with a heat-map.

Windows are built from ``RUN/ema_snapshots`` (one fp16 EMA file per LAWA snapshot step): k of them,
taken every m-th snapshot (a cadence of m·ν steps). All windows at a step are sampled on the same noise.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.config.commands import PosthocConfig
from lawa_diffusion.posthoc.average import average_sources
from lawa_diffusion.posthoc.run_evaluator import fid_evaluator
from lawa_diffusion.posthoc.saved_weights import Source, load_into, shared_model
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.files import check_output_dir, write_marker


# ----------------------------------------------------------------------------- sweep plan
@dataclasses.dataclass(frozen=True)
class Cell:
    """One sweep entry: window ``k`` and ν multiple ``every`` at evaluation ``step``, and the snapshots used."""

    step: int
    k: int
    every: int
    snapshot_steps: Tuple[int, ...]


def sweep_cells(snapshot_steps: Sequence[int], eval_steps: Sequence[int], ks: Sequence[int],
                multiples: Sequence[int], every_n_steps: int, start_step: int = 0) -> List[Cell]:
    """For each step, k and multiple m: the latest k snapshots <= step taken at start_step + j·m·every_n_steps.

    That is the window an online LAWA with ν = m·every_n_steps would hold (fewer than k early on).
    """
    ordered = sorted(snapshot_steps)
    cells = []
    for step in eval_steps:
        for k in ks:
            for m in multiples:
                period = m * every_n_steps
                aligned = [s for s in ordered if start_step <= s <= step and (s - start_step) % period == 0]
                cells.append(Cell(step, k, m, tuple(aligned[-k:])))
    return cells


def snapshot_cadence(run_dir: str, steps: Sequence[int]) -> Tuple[int, int]:
    """(every_n_steps, start_step) of the run's LAWA config, else inferred from the snapshot steps."""
    lawa = runfolder.read_config(run_dir).get("lawa") or {}
    if "every_n_steps" in lawa:
        return int(lawa["every_n_steps"]), int(lawa.get("start_step", 0))
    import math

    gaps = [b - a for a, b in zip(steps, steps[1:])]
    return (math.gcd(*gaps) if gaps else 1), steps[0]


def evaluation_steps(run_dir: str, snapshot_steps: Sequence[int], steps: str = PosthocConfig.sweep_steps) -> List[int]:
    """Steps to sweep: "eval" (metrics.jsonl's, from the first snapshot on), "final", or a comma list."""
    first, last = min(snapshot_steps), max(snapshot_steps)
    if steps == "final":
        return [last]
    if steps == "eval":
        chosen = [s for s in runfolder.metric_steps(run_dir) if first <= s]
        check(bool(chosen), f"sweep --steps eval found no evaluation step at or after the first EMA snapshot "
                            f"({first}) in {runfolder.metrics_path(run_dir)!r}; pass --steps final or a list of steps")
        return chosen
    chosen = parse_int_list(steps, "--steps")
    check(all(first <= s for s in chosen), f"sweep --steps {steps!r} asks for a step before the first EMA snapshot "
                                            f"({first}); pass steps from {first} to {last}")
    return chosen


def parse_int_list(text: str | Sequence[int], option: str) -> List[int]:
    """``"1,2,4"`` -> [1, 2, 4] (positive, unique, in order given)."""
    if isinstance(text, str):
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{option} must be a comma-separated list of integers like 1,2,4, got {text!r}") from None
    else:
        values = [int(v) for v in text]
    check(bool(values) and all(v >= 1 for v in values) and len(set(values)) == len(values),
          f"{option} must list distinct integers >= 1 like 1,2,4, got {text!r}")
    return values


# ----------------------------------------------------------------------------- sweep run
METRIC_KEYS = ("fid", "kid_mean", "kid_std", "num_samples", "inception_sha256")


def _weights_factory(model: torch.nn.Module, sources: Sequence[Source]):
    """A zero-arg callable: a context manager that loads the mean of ``sources`` into ``model`` and yields it."""
    import contextlib

    @contextlib.contextmanager
    def weights():
        _, _, state = average_sources(sources)
        load_into(model, state, sources[-1].path)
        yield model

    return weights


def _template_model(sources: Sequence[Source], device=None) -> torch.nn.Module:
    cls, arch = shared_model(sources)
    return cls.from_config(arch).to(device).eval().requires_grad_(False)


def _cell_name(cell: Cell) -> str:
    return f"k{cell.k}-every{cell.every}"


def evaluate_step(cells: Sequence[Cell], files: Dict[int, str], model: torch.nn.Module, evaluate) -> List[dict]:
    """Evaluate every distinct snapshot window of ``cells`` (one step) in one ``evaluate`` call; one row per cell."""
    names: Dict[Tuple[int, ...], str] = {}
    for cell in cells:
        if cell.snapshot_steps:
            names.setdefault(cell.snapshot_steps, _cell_name(cell))
    variants = {name: _weights_factory(model, [Source(files[s], s) for s in steps]) for steps, name in names.items()}
    results = evaluate(variants) if variants else {}
    rows = []
    for cell in cells:
        result = results.get(names.get(cell.snapshot_steps), {})
        rows.append({"step": cell.step, "k": cell.k, "every": cell.every, "snapshot_steps": list(cell.snapshot_steps),
                     "num_snapshots": len(cell.snapshot_steps), **{key: result.get(key) for key in METRIC_KEYS}})
    return rows


def _prepare_out_dir(out_dir: str, overwrite: bool) -> str:
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"sweep output {out_dir!r} already exists; choose another -o or pass --overwrite")
    os.makedirs(out_dir, exist_ok=True)
    write_marker(out_dir, "sweep")
    jsonl = os.path.join(out_dir, "sweep.jsonl")
    if os.path.exists(jsonl):
        os.unlink(jsonl)
    return jsonl


def _snapshot_index(run_dir: str, track: str = runfolder.BASE_TRACK) -> Dict[int, str]:
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir!r} does not exist; pass a folder written by lawa-diffusion train")
    if track != runfolder.BASE_TRACK:
        runfolder.check_track(run_dir, track, "sweep", runfolder.snapshot_tracks(run_dir))
        return dict(runfolder.list_ema_snapshots(run_dir, track))
    files = dict(runfolder.list_ema_snapshots(run_dir)) or runfolder.snapshot_files(run_dir)
    if not files:
        raise FileNotFoundError(f"run folder {run_dir!r} has no {runfolder.SNAPSHOT_DIR}/step-*.safetensors; the sweep needs "
                                "every EMA snapshot, so train with save_ema_snapshots: true")
    return files


def heatmap(rows: Sequence[dict], ks: Sequence[int], multiples: Sequence[int], step: int, key: str) -> List[list]:
    """Field ``key`` of the rows at ``step`` as a k × multiple grid (None where nothing was evaluated)."""
    at = {(r["k"], r["every"]): r.get(key) for r in rows if r["step"] == step}
    return [[at.get((k, m)) for m in multiples] for k in ks]


def _plot_heatmap(grid: List[list], counts: List[list], ks, multiples, every_n_steps: int, step: int, metric: str,
                  path: str) -> None:
    """Heat-map PNG of ``grid``; cells whose window held fewer than k snapshots say how many it held."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    from lawa_diffusion.utils.files import atomic_write

    values = torch.tensor([[float("nan") if v is None else v for v in row] for row in grid]).numpy()
    fig = Figure(figsize=(1.3 * len(multiples) + 2.5, 0.8 * len(ks) + 1.8), constrained_layout=True)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis_r", aspect="auto")
    fig.colorbar(image, ax=ax, label=metric)
    for i, (k, row) in enumerate(zip(ks, grid)):
        for j, v in enumerate(row):
            text = "-" if v is None else f"{v:.2f}" + (f"\n({counts[i][j]} held)" if counts[i][j] < k else "")
            dark = v is not None and float(image.norm(v)) > 0.5
            ax.text(j, i, text, ha="center", va="center", color="white" if dark else "black", fontsize=9)
    ax.set_xticks(range(len(multiples)), [f"{m}ν={m * every_n_steps}" for m in multiples])
    ax.set_yticks(range(len(ks)), [str(k) for k in ks])
    ax.set(xlabel="snapshot every (steps)", ylabel="k", title=f"LAWA {metric} at step {step}")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def run_sweep(run_dir: str | os.PathLike, ks: Sequence[int] = PosthocConfig.sweep_k,
              multiples: Sequence[int] = PosthocConfig.sweep_every, *, steps: str = PosthocConfig.sweep_steps,
              evaluate=None, out_dir: Optional[str] = None, overwrite: bool = False, metric: str = "fid",
              heatmap_step: Optional[int] = None, device=None, progress: bool = True,
              track: str = runfolder.BASE_TRACK, **eval_options) -> dict:
    """FID of every (k, ν multiple) LAWA window at each evaluation step from the EMA snapshots of ``track``
    (RUN/ema_snapshots for "ema", RUN/ema_snapshots/<track> for the run's other EMA tracks).

    ``evaluate(variants) -> {name: metrics}`` scores all windows of one step in one call (same noise);
    by default it is FID against the run's cached reference stats (``eval_options`` override the run's
    eval settings). Writes sweep.jsonl (as it goes), sweep.json and heatmap-<metric>.png; returns the summary.
    """
    run_dir = os.path.abspath(os.fspath(run_dir))
    check(metric in ("fid", "kid_mean"), f"sweep --metric must be fid or kid_mean, got {metric!r}")
    ks, multiples = parse_int_list(ks, "--k"), parse_int_list(multiples, "--every")
    files = _snapshot_index(run_dir, track)
    every_n, start = snapshot_cadence(run_dir, sorted(files))
    eval_steps = evaluation_steps(run_dir, sorted(files), steps)
    heatmap_step = eval_steps[-1] if heatmap_step is None else heatmap_step
    check(heatmap_step in eval_steps, f"sweep --heatmap-step {heatmap_step} is not a swept step; pick one of "
                                      f"{', '.join(map(str, eval_steps))}")
    out_dir = check_output_dir(out_dir or runfolder.sweep_dir(run_dir, track), "sweep -o", overwrite, kind="sweep",
                               protected=[run_dir])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = _template_model([Source(files[s], s) for s in sorted(files)], device)
    evaluate = evaluate or fid_evaluator(run_dir, image_size=model.config.sample_size, device=device,
                                         progress=progress, model=model, **eval_options)
    jsonl = _prepare_out_dir(out_dir, overwrite)
    cells = sweep_cells(sorted(files), eval_steps, ks, multiples, every_n, start)
    rows = _sweep_rows(cells, eval_steps, files, model, evaluate, jsonl, progress)
    grid = heatmap(rows, ks, multiples, heatmap_step, metric)
    counts = heatmap(rows, ks, multiples, heatmap_step, "num_snapshots")
    summary = {"format": "lawa-diffusion-sweep/1", "run": run_dir, "track": track, "metric": metric, "k": ks, "every": multiples,
               "every_n_steps": every_n, "start_step": start, "steps": eval_steps, "rows": rows,
               "heatmap": {"step": heatmap_step, "values": grid},
               "files": {"jsonl": jsonl, "json": os.path.join(out_dir, "sweep.json"),
                         "png": os.path.join(out_dir, f"heatmap-{metric}.png")}}
    _plot_heatmap(grid, counts, ks, multiples, every_n, heatmap_step, metric, summary["files"]["png"])
    from lawa_diffusion.utils.files import atomic_write_json

    atomic_write_json(summary["files"]["json"], summary)
    return summary


def _sweep_rows(cells, eval_steps, files, model, evaluate, jsonl: str, progress: bool) -> List[dict]:
    from tqdm.auto import tqdm

    from lawa_diffusion.utils.files import append_line

    rows = []
    for step in tqdm(eval_steps, desc="sweep steps", disable=not progress):
        new = evaluate_step([c for c in cells if c.step == step], files, model, evaluate)
        for row in new:
            append_line(jsonl, json.dumps(row, sort_keys=True))
        rows.extend(new)
    return rows


# ----------------------------------------------------------------------------- CLI
def format_sweep(summary: dict) -> str:
    """The heat-map as a text table (rows k, columns ν multiples) at the heat-map step."""
    lines = [f"LAWA {summary['metric']} at step {summary['heatmap']['step']} (rows: k; columns: snapshot every "
             f"m·ν steps, ν={summary['every_n_steps']})", "       " + "".join(f"{f'm={m}':>10}" for m in summary["every"])]
    for k, row in zip(summary["k"], summary["heatmap"]["values"]):
        lines.append(f"k={k:<5}" + "".join(f"{'-' if v is None else f'{v:.3f}':>10}" for v in row))
    return "\n".join(lines)
