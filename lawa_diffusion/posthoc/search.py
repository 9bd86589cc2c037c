"""The best average in hindsight (``lawa-diffusion posthoc``): FID of synthesised averages of a finished run.

For each chosen step, every σ_rel of a grid (and any other target of :mod:`synthesis`) is synthesised from
the run's stored EMA snapshots (:func:`synthesize.plan_synthesis`) and scored with the run's own evaluator
(:func:`sweep.fid_evaluator`: its eval settings, reference statistics and sampling seed), so every row is on
the same noise as the run's online variants in metrics.jsonl. A target the snapshots cannot reach within
``max_residual`` is kept as a refused row (no FID), never scored. ``twins`` are online EMA tracks of the run:
at a step with a checkpoint, their checkpointed weights and their synthesis from the snapshots are scored on
the same noise, with the profile residual and the weight-space distance between the two.

Writes RUN/posthoc/hindsight.jsonl (one row per step and target, as it goes), hindsight.json (summary) and
hindsight-fid.png (FID against σ_rel, one line per step, the online variants marked at their exact σ_rel).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.config.tracks import DELAYED_SUFFIX, RAW_TRACK
from lawa_diffusion.maths import lag
from lawa_diffusion.maths import profile_fit as synthesis
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.runs.records import best_per_step
from lawa_diffusion.utils.checksums import load_safetensors
from lawa_diffusion.utils.files import check_output_dir, write_marker
from lawa_diffusion.utils.output import is_main_process, say

HINDSIGHT_FORMAT = "lawa-diffusion-hindsight/1"
JSONL_NAME, JSON_NAME = runfolder.HINDSIGHT_NAME, "hindsight.json"
DEFAULT_SIGMA_RELS = "0.02:0.25:12"
METRIC_KEYS = ("fid", "kid_mean", "kid_std", "num_samples", "inception_sha256")


# ----------------------------------------------------------------------------- what to score
def parse_sigma_rels(text: str, allow_large: bool = False) -> List[float]:
    """``"lo:hi:n"`` -> n values from lo to hi spaced geometrically (equal ratios); ``"0.05,0.1"`` -> that list.

    More than :data:`MAX_GRID_POINTS` values need ``allow_large`` (each is one FID evaluation per step); values
    that round (4 significant digits) to the same one are refused."""
    check(isinstance(text, str) and bool(text.strip()), "--sigma-rel needs lo:hi:n like 0.02:0.25:12 or a list like 0.05,0.1")
    bound = math.sqrt(1.0 / 12.0)  # σ_rel of γ → 0 (the uniform mean of all iterates): the largest a power EMA has
    try:
        if ":" in text:
            lo, hi, n = text.split(":")
            lo, hi, n = float(lo), float(hi), int(n)
            check(0 < lo <= hi < bound and n >= 1 and (n > 1 or lo == hi),
                  f"--sigma-rel {text!r} must be lo:hi:n with 0 < lo <= hi < {bound:.4f} and n >= 1 (n = 1 only "
                  "with lo = hi), e.g. 0.02:0.25:12")
            _check_grid_size(text, n, allow_large)
            values = [lo] if n == 1 else list(np.geomspace(lo, hi, n))
        else:
            values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        if str(e).startswith("--sigma-rel"):
            raise
        raise ValueError(f"--sigma-rel must be lo:hi:n like 0.02:0.25:12 or a comma list like 0.05,0.1, got {text!r}") from None
    check(bool(values) and all(0 < v < bound for v in values),
          f"--sigma-rel values must lie in (0, {bound:.4f}), got {text!r}")
    _check_grid_size(text, len(values), allow_large)
    rounded = [float(f"{v:.4g}") for v in values]
    check(len(set(rounded)) == len(rounded),
          f"--sigma-rel {text!r} gives {len(rounded)} values but only {len(set(rounded))} distinct one(s) at 4 "
          "significant digits (each would be scored again); widen the range, ask for fewer points or list each once")
    return rounded


MAX_GRID_POINTS = 64  # σ_rel values scored at every step without --large-grid


def _check_grid_size(text: str, count: int, allow_large: bool) -> None:
    check(allow_large or count <= MAX_GRID_POINTS,
          f"--sigma-rel {text!r} asks for {count} σ_rel values, each one FID evaluation at every chosen step; more "
          f"than {MAX_GRID_POINTS} need --large-grid: ask for fewer points, e.g. 0.02:0.25:12, or pass --large-grid")


def choose_steps(run_dir: str, stored: Sequence[int], steps: str) -> List[int]:
    """"eval": metrics.jsonl's steps that have stored snapshots; "final": the last stored step; or a comma list
    of stored steps."""
    stored = sorted(set(stored))
    if steps == "final":
        return [stored[-1]]
    if steps == "eval":
        chosen = [s for s in runfolder.metric_steps(run_dir) if s in stored]
        check(bool(chosen), f"posthoc --steps eval found no evaluation step of {runfolder.metrics_path(run_dir)!r} "
                            f"with stored snapshots (stored: {stored[0]}..{stored[-1]}); pass --steps final or a list")
        return chosen
    try:
        chosen = [int(v) for v in steps.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"posthoc --steps must be eval, final or a comma list of steps like 600,900, got {steps!r}") from None
    missing = [s for s in chosen if s not in stored]
    check(bool(chosen) and not missing, f"posthoc --steps {steps!r}: step(s) {', '.join(map(str, missing)) or '-'} "
                                        f"have no stored snapshot; stored steps run from {stored[0]} to {stored[-1]} "
                                        f"(e.g. {', '.join(map(str, stored[-3:]))})")
    return list(dict.fromkeys(chosen))  # in the order given: the most wanted step first


# ----------------------------------------------------------------------------- σ_rel of the online variants
def _run_tracks_and_windows(config: dict):
    from lawa_diffusion.config.train import TrainConfig
    from lawa_diffusion.maths.track_lags import lag_tracks_of

    cfg = TrainConfig.from_dict(config)
    windows = {"lawa": cfg.lawa, **{w.name: w for w in cfg.lawa_windows}}
    return lag_tracks_of(cfg), windows


def variant_profile(row: dict, tracks: Dict[str, lag.EMATrack], windows: dict) -> Optional[np.ndarray]:
    """The exact profile at ``row["step"]`` of an online variant's metrics row (None when the run's config does
    not define it): a track's own, a LAWA window's mean of its snapshot profiles, a delayed snapshot's."""
    from lawa_diffusion.runs.records import variant_kind

    step, name = int(row["step"]), str(row["variant"])
    kind = variant_kind(row)
    if kind["kind"] == "raw" or name == RAW_TRACK:
        return lag.profile(lag.raw_weights(), step)
    if kind["kind"] == "ema":
        return lag.profile(tracks[name], step) if name in tracks else None
    window_name = name[: -len(DELAYED_SUFFIX)] if kind["kind"] == "delayed" else name
    over = tracks.get(kind["over"] or "ema")
    if over is None or window_name not in windows:
        return None
    if kind["kind"] == "delayed":
        at = row.get("snapshot_step")
        return None if at is None else synthesis.padded(lag.profile(over, int(at)), step)
    held = lag.snapshot_steps(windows[window_name], step)
    if row.get("lawa_num_snapshots"):
        held = held[-int(row["lawa_num_snapshots"]):]
    return lag.snapshots_profile(over, held, step) if held else None


def online_points(run_dir: str, metric: str = "fid") -> Dict[int, Dict[str, dict]]:
    """{step: {variant: {"sigma_rel", "mean_lag", metric}}} of metrics.jsonl's rows whose profile is known."""
    path = runfolder.metrics_path(run_dir)
    if not os.path.isfile(path):
        return {}
    from lawa_diffusion.utils.files import read_jsonl

    try:
        tracks, windows = _run_tracks_and_windows(runfolder.read_config(run_dir))
    except ValueError:
        return {}
    out: Dict[int, Dict[str, dict]] = {}
    for row in read_jsonl(path):
        if row.get(metric) is None or "step" not in row or "variant" not in row or int(row["step"]) < 1:
            continue
        w = variant_profile(row, tracks, windows)
        if w is not None:
            out.setdefault(int(row["step"]), {})[str(row["variant"])] = {
                "sigma_rel": synthesis.sigma_rel_of(w), "mean_lag": lag.mean_lag(w), metric: float(row[metric])}
    return out


# ----------------------------------------------------------------------------- weights
def _loaded(model: torch.nn.Module, state_of, where: str):
    """A zero-arg factory of a context manager that loads ``state_of()`` into ``model`` and yields it."""
    from lawa_diffusion.posthoc.saved_weights import load_into

    @contextlib.contextmanager
    def weights():
        load_into(model, state_of(), where)
        yield model

    return weights


def _folder_state(folder: str) -> Dict[str, torch.Tensor]:
    from lawa_diffusion.posthoc.saved_weights import WEIGHTS_FIX, WEIGHTS_NAME

    path = os.path.join(folder, WEIGHTS_NAME)
    check(os.path.isfile(path), f"checkpoint folder {folder!r} has no {WEIGHTS_NAME}; pass --twin for a track "
                                "whose checkpoints hold safetensors weights")
    return {k: v.float() for k, v in load_safetensors(path, WEIGHTS_FIX, note_unchecked=False).items()}


def _raw_state(checkpoint: str, names) -> Optional[Dict[str, torch.Tensor]]:
    """The trained (raw) weights of an accelerate checkpoint (model.safetensors), None if absent or other keys."""
    from lawa_diffusion.posthoc.saved_weights import WEIGHTS_FIX

    path = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(path):
        return None
    state = load_safetensors(path, WEIGHTS_FIX, note_unchecked=False)
    return {k: v.float() for k, v in state.items()} if set(state) == set(names) else None


def _norm(state: Dict[str, torch.Tensor], minus: Optional[Dict[str, torch.Tensor]] = None) -> float:
    total = 0.0
    for name, value in state.items():
        v = value.double() - (minus[name].double() if minus is not None else 0.0)
        total += float((v * v).sum())
    return math.sqrt(total)


def twin_distance(synthesised: Dict[str, torch.Tensor], online: Dict[str, torch.Tensor],
                  raw: Optional[Dict[str, torch.Tensor]] = None) -> dict:
    """‖synthesised − online‖ relative to ‖online‖ and, given the raw weights, to ‖online − raw‖ (how far the
    average moved the weights: the scale at which averages differ)."""
    check(set(synthesised) == set(online), "the synthesised and online weights hold different tensors; compare "
                                           "averages of one model")
    diff = _norm(synthesised, online)
    out = {"weight_distance": diff, "weight_rel_error": diff / max(_norm(online), 1e-300)}
    if raw is not None:
        out["weight_rel_error_vs_raw_gap"] = diff / max(_norm(online, raw), 1e-300)
    return out


# ----------------------------------------------------------------------------- the search
def _target_rows(run_dir, step, targets, tracks, max_residual, snapshots=None):
    """(row, plan or None) of each (kind, target) at ``step``, all planned together; a refused target keeps its
    row, without a plan."""
    from lawa_diffusion.posthoc.synthesize import plan_syntheses

    plans = plan_syntheses(run_dir, [t for _, t in targets], step, tracks, max_residual=None, snapshots=snapshots)
    out = []
    for (kind, target), plan in zip(targets, plans):
        s = plan.solution
        refused = s.residual > max_residual and not math.isclose(s.residual, max_residual)
        row = {"step": step, "target": target, "kind": kind, "description": plan.description,
               "sigma_rel": s.sigma_rel, "mean_lag": s.mean_lag, "target_sigma_rel": s.target_sigma_rel,
               "target_mean_lag": s.target_mean_lag, "residual": s.residual, "coefficient_norm": s.norm,
               "num_snapshots": len(plan.used()), "refused": refused}
        out.append((row, None if refused else plan))
    return out


def _prepare(out_dir: str, overwrite: bool, append: bool = False, check_existing: bool = True) -> dict:
    """The output files; refuses existing ones without ``overwrite`` / ``append`` (checked by the process that
    writes them: ``check_existing``)."""
    if check_existing:
        check_output_dir(out_dir, "-o", overwrite or append, kind="hindsight", refresh=True)
    files = {"jsonl": os.path.join(out_dir, JSONL_NAME), "json": os.path.join(out_dir, JSON_NAME),
             "png": os.path.join(out_dir, "hindsight-fid.png")}
    existing = [p for p in files.values() if os.path.exists(p)] if check_existing else []
    if existing and not overwrite and not append:
        raise FileExistsError(f"posthoc output {existing[0]!r} already exists; choose another -o, pass --append to "
                              "add steps to it, or --overwrite")
    return files


def _kept_rows(path: str, append: bool, chosen: Sequence[int], targets: Sequence[str]) -> List[dict]:
    """With ``append``: the rows already in ``path`` but for the (step, target) pairs scored again (rewritten,
    atomically)."""
    from lawa_diffusion.utils.files import atomic_write_text, read_jsonl

    again = {(step, target) for step in chosen for target in targets}
    kept = ([r for r in read_jsonl(path) if (r.get("step"), r.get("target")) not in again]
            if append and os.path.isfile(path) else [])
    if os.path.exists(path):
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return kept


def run_hindsight(run_dir: str | os.PathLike, sigma_rels: Sequence[float] | str = DEFAULT_SIGMA_RELS, *,
                  targets: Sequence[str] = (), twins: Sequence[str] = (), steps: str = "eval",
                  tracks: Optional[Sequence[str]] = None, max_residual: float = synthesis.DEFAULT_MAX_RESIDUAL,
                  evaluate=None, out_dir: Optional[str] = None, overwrite: bool = False, append: bool = False,
                  progress: bool = True, save_best: Optional[str] = None,
                  device=None, accelerator=None, **eval_options) -> dict:
    """Score the synthesis of every σ_rel and target at each step on the run's evaluation noise.

    ``evaluate(variants) -> {name: metrics}`` scores the averages of one step in one call; by default the run's
    evaluator (``eval_options`` override its settings, as for ``sweep``). Returns the summary it writes.
    Under ``accelerate launch`` / torchrun (or with ``accelerator``) every process synthesises the averages and
    samples its share of the images; the scores equal a one-process run's and only the main process writes.
    Each step's averages are synthesised together, from one read of the snapshot files (their weights are held
    in memory until the step is scored). ``save_best``: a folder that receives the weights of each step's best
    average as a model folder ``save_best/step-<step>`` (:func:`best_folder`) with synthesis.json.
    """
    from tqdm.auto import tqdm

    from lawa_diffusion.evaluation.fid import resolve_device
    from lawa_diffusion.posthoc.synthesize import find_snapshots, known_tracks
    from lawa_diffusion.utils.files import append_line, atomic_write_json

    run_dir = os.path.abspath(os.fspath(run_dir))
    grid = parse_sigma_rels(sigma_rels) if isinstance(sigma_rels, str) else [float(v) for v in sigma_rels]
    check(isinstance(max_residual, (int, float)) and max_residual > 0,
          f"posthoc --max-residual must be a number > 0, got {max_residual!r}")
    for text in targets:
        synthesis.parse_target(text)  # every target understood before any work
    sources = find_snapshots(run_dir, tracks)
    known = known_tracks(run_dir, sources)
    for name in twins:
        check(name in known and name != RAW_TRACK, f"posthoc --twin {name!r} is not an EMA track of {run_dir!r}; "
                                                   f"its tracks are {', '.join(t for t in sorted(known) if t != RAW_TRACK)}")
    chosen = choose_steps(run_dir, [s.step for s in sources], steps)
    out_dir = os.path.abspath(out_dir or runfolder.hindsight_dir(run_dir))
    if evaluate is None and accelerator is None:
        from lawa_diffusion.evaluation.fid import launched_accelerator

        accelerator = launched_accelerator()
    main = is_main_process(accelerator)
    files = _prepare(out_dir, overwrite, append, check_existing=main)
    if save_best is not None:
        save_best = os.path.abspath(os.fspath(save_best))
        taken = [best_folder(save_best, s) for s in chosen if os.path.exists(best_folder(save_best, s))]
        if taken and main and not (overwrite or append):
            raise FileExistsError(f"--save-best folder {taken[0]!r} already exists; choose another folder, or "
                                  "pass --overwrite or --append to replace it")
    wanted = [("sigma_rel", f"sigma_rel={v:g}") for v in grid] + [("target", t) for t in targets]
    from lawa_diffusion.posthoc.synthesize import shared_model

    cls, arch = shared_model(sources[-1:])
    device = resolve_device(device, accelerator)
    model = cls.from_config(arch).to(device).eval().requires_grad_(False)
    if evaluate is None:
        from lawa_diffusion.posthoc.run_evaluator import fid_evaluator

        evaluate = fid_evaluator(run_dir, image_size=model.config.sample_size, device=device, progress=progress,
                                 command="posthoc", accelerator=accelerator, model=model, **eval_options)
    if main and progress:  # the work asked for, once the inputs are known to be usable
        say(f"{len(wanted)} average(s) x {len(chosen)} step(s): {len(wanted) * len(chosen)} syntheses, each scored "
            "with one FID evaluation of the run's num_samples images", "search")
    if main:
        os.makedirs(out_dir, exist_ok=True)
        write_marker(out_dir, "hindsight")
        rows = _kept_rows(files["jsonl"], append, chosen, [t for _, t in wanted] + [f"twin:{n}" for n in twins])
    else:
        rows = []
    bar = tqdm(total=len(chosen), desc="search: steps", disable=not (progress and main))
    for step in chosen:
        new = _score_step(run_dir, step, wanted, twins, tracks, max_residual, model, evaluate, sources,
                          save_best if main else None, overwrite=True)
        if main:
            for row in new:
                append_line(files["jsonl"], json.dumps(row, sort_keys=True))
        rows.extend(new)
        bar.update(1)
    bar.close()
    summary = {"format": HINDSIGHT_FORMAT, "run": run_dir, "grid": "geometric",
               "sigma_rels": sorted({float(r["target"].split("=", 1)[1]) for r in rows if r["kind"] == "sigma_rel"}),
               "targets": list(dict.fromkeys(r["target"] for r in rows if r["kind"] == "target")),
               "twins": list(dict.fromkeys(r["target"][len("twin:"):] for r in rows if r["kind"] == "twin")), "steps": sorted({r["step"] for r in rows} | set(chosen)),
               "max_residual": max_residual,
               "rows": rows, "best": best_per_step(rows), "online": {str(k): v for k, v in online_points(run_dir).items()
                                                                      if k in {r["step"] for r in rows}},
               "files": files}
    if save_best is not None:
        summary["saved_best"] = {str(s): best_folder(save_best, s) for s in chosen
                                 if os.path.isdir(best_folder(save_best, s))}
    if main:
        plot(summary, files["png"])
        atomic_write_json(files["json"], summary)
    return summary


def _score_step(run_dir, step, wanted, twins, tracks, max_residual, model, evaluate, sources=None,
                save_best=None, overwrite=False) -> List[dict]:
    """The rows of one step: every target and twin synthesised from one read of the snapshot files, scored in one
    ``evaluate`` call; with ``save_best`` (a folder, on the main process) the best target's weights written there."""
    from lawa_diffusion.posthoc.synthesize import synthesize_states

    checkpoint = runfolder.checkpoint_path(run_dir, step)
    folders = {name: os.path.join(checkpoint, runfolder.ema_folder(name)) for name in twins}
    present = [name for name in twins if os.path.isdir(folders[name])]
    planned = _target_rows(run_dir, step, list(wanted) + [("twin", name) for name in present], tracks, max_residual,
                           sources)
    plans = [plan for _, plan in planned if plan is not None]
    # float64 arithmetic: a target's weights do not depend on the targets that share its pass (the float32 path
    # agrees with float64 to float32 rounding, which would make a row scored again differ in its last digits)
    states = synthesize_states(plans, torch.float32, progress=False, accumulate=torch.float64) if plans else []
    state_of = {id(plan): state for plan, state in zip(plans, states)}
    targets, twin_planned = planned[:len(wanted)], planned[len(wanted):]
    twin_states = []  # (name, folder, row, online weights, synthesised weights or None): each read once
    for name, (row, plan) in zip(present, twin_planned):
        twin_states.append((name, folders[name], row, _folder_state(folders[name]),
                            None if plan is None else state_of[id(plan)]))
    variants = {row["target"]: _loaded(model, lambda s=state_of[id(plan)]: s, row["target"])
                for row, plan in targets if plan is not None}
    for name, folder, row, online_state, synthesised in twin_states:
        variants[f"online:{name}"] = _loaded(model, lambda s=online_state: s, folder)
        if synthesised is not None:
            variants[f"synthesised:{name}"] = _loaded(model, lambda s=synthesised: s, f"synthesised:{name}")
    results = evaluate(variants) if variants else {}
    out = []
    for row, _ in targets:
        out.append({**row, **{k: results.get(row["target"], {}).get(k) for k in METRIC_KEYS}})
    for name, folder, row, online_state, synthesised in twin_states:
        online = results.get(f"online:{name}", {})
        synth = results.get(f"synthesised:{name}", {})
        extra = {}
        if synthesised is not None:
            extra = twin_distance(synthesised, online_state, _raw_state(checkpoint, online_state))
        fid_diff = (synth["fid"] - online["fid"]) if synth.get("fid") is not None and online.get("fid") is not None else None
        out.append({**row, "target": f"twin:{name}", "online_folder": folder,
                    **{k: synth.get(k) for k in METRIC_KEYS}, **{f"online_{k}": online.get(k) for k in METRIC_KEYS},
                    "fid_minus_online": fid_diff, **extra})
    if save_best is not None:
        _save_best(save_best, step, out, {row["target"]: plan for row, plan in targets}, state_of, overwrite)
    return out


def best_folder(save_best: str, step: int) -> str:
    """Where ``save_best`` keeps the weights of the best average of ``step``."""
    return os.path.join(save_best, f"step-{step}")


def _save_best(save_best: str, step: int, rows: List[dict], plans: dict, state_of: dict, overwrite: bool) -> None:
    from lawa_diffusion.posthoc.synthesize import write_state

    best = best_per_step(rows).get(str(step))
    if best is not None:
        plan = plans[best["target"]]
        write_state(plan, state_of[id(plan)], best_folder(save_best, step), overwrite=overwrite,
                    extra={"hindsight": best})


# ----------------------------------------------------------------------------- plot and text
def plot(summary: dict, path: str, metric: str = "fid") -> None:
    """FID against σ_rel (log axis): one line per step over the grid, other targets and the online variants as
    markers in the step's colour."""
    from matplotlib.figure import Figure

    from lawa_diffusion.utils.files import atomic_write

    fig = Figure(figsize=(8, 4.8), constrained_layout=True)
    ax = fig.subplots()
    markers = "sD^v<>pXh*P"
    named: Dict[str, str] = {}
    for i, step in enumerate(summary["steps"]):
        color = f"C{i % 10}"
        line = sorted((r["sigma_rel"], r[metric]) for r in summary["rows"] if r["step"] == step
                      and r["kind"] == "sigma_rel" and r.get(metric) is not None)
        if line:
            ax.plot(*zip(*line), marker="o", ms=4, color=color, label=f"step {step} (synthesised)")
        others = [(r["target"], r["sigma_rel"], r[metric]) for r in summary["rows"] if r["step"] == step
                  and r["kind"] != "sigma_rel" and r.get(metric) is not None]
        online = [(name, p["sigma_rel"], p[metric]) for name, p in summary["online"].get(str(step), {}).items()
                  if p.get(metric) is not None and p["sigma_rel"] > 0]
        # synthesised targets: filled markers, "(synthesised)"; online variants: open markers, "(online)" -- a
        # target and an online variant of the same name never share a marker or a legend entry
        for name, x, y, filled in [(*o, True) for o in others] + [(*o, False) for o in online]:
            label = f"{name} ({'synthesised' if filled else 'online'})"
            first = label not in named
            marker = named.setdefault(label, markers[len(named) % len(markers)])
            ax.plot([x], [y], marker=marker, ls="none", ms=7, color=color, mfc=color if filled else "none",
                    label=label if first else None)
    ax.set_xscale("log")
    ax.set(xlabel="σ_rel (spread ÷ step)", ylabel=metric,
           title=f"{metric}: synthesised averages (lines, filled markers), online variants (open markers)")
    ax.legend(fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def format_summary(summary: dict) -> str:
    lines = []
    for step in summary["steps"]:
        rows = [r for r in summary["rows"] if r["step"] == step]
        refused = [r["target"] for r in rows if r.get("refused")]
        best = summary["best"].get(str(step))
        text = f"best {_best_name(best)}: FID {best['fid']:.3f}" if best else "no synthesised average scored"
        if refused:
            text += f"; refused (residual > {summary['max_residual']:g}): {', '.join(refused)}"
        lines.append(f"step {step}: {text}")
        for r in rows:
            if r["kind"] == "twin":
                lines.append(f"step {step}: twin {r['target'][5:]}: residual {r['residual']:.4g}, weight relative error "
                             f"{_fmt(r.get('weight_rel_error'), '{:.3g}')} (vs the raw gap "
                             f"{_fmt(r.get('weight_rel_error_vs_raw_gap'), '{:.3g}')}), FID synthesised "
                             f"{_fmt(r.get('fid'))} - online {_fmt(r.get('online_fid'))} = "
                             f"{_fmt(r.get('fid_minus_online'), '{:+.3f}')}")
    return "\n".join(lines)


def _best_name(row: dict) -> str:
    """A grid point by its σ_rel; any other target by its own name, with the σ_rel its profile has."""
    if row.get("kind", "sigma_rel") == "sigma_rel":
        return f"σ_rel {row['sigma_rel']:.4f} ({row['target']})"
    return f"{row['target']} (its σ_rel {row['sigma_rel']:.4f})"


def _fmt(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)
