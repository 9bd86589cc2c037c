"""Report of a run (or several seeds): metric-vs-step curves, steps-to-FID speed-up with a CI, PNG + JSON.

The speed-up at a LAWA evaluation point (step s, value f) is the step at which EMA first reaches a
value <= f (linear interpolation between EMA evaluation points) divided by s; it is "never reached"
when no EMA point is that good. With several runs the per-step speed-ups, and LAWA's step to reach
EMA's final value, get a mean and a Student-t confidence interval across runs (seeds).

Runs searched in hindsight (``lawa-diffusion hindsight``, RUN/posthoc/hindsight.jsonl) gain a curve
"best_in_hindsight": at each searched step the lowest metric among the synthesised averages. Each LAWA
window is then set against it, paired per run (seed), and its speed-up against that curve is measured.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

from lawa_diffusion.config.base import check
from lawa_diffusion.config.commands import ReportConfig
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.runs.records import VARIANTS, best_per_step, load_hindsight, variant_kind
from lawa_diffusion.utils.files import atomic_write, atomic_write_json, check_output_dir, read_jsonl_rows, write_marker
from lawa_diffusion.utils.output import say, warn

REPORT_FORMAT = "lawa-diffusion-report/1"
METRICS = ("fid", "kid_mean")
JSON_NAME = "report.json"
HINDSIGHT = "best_in_hindsight"  # the curve of the best synthesised average per step (lawa-diffusion posthoc)


class Curve(NamedTuple):
    """Evaluation points of one variant: ascending ``steps`` and the metric ``values`` there."""

    steps: List[float]
    values: List[float]


@dataclasses.dataclass
class Run:
    """The curves of one run folder (variant name -> Curve), each variant's kind ("raw", "ema", "lawa",
    "delayed") and averaged track ("over"), and its mean lag by step where the rows give one."""

    path: str
    curves: Dict[str, Curve]
    kinds: Dict[str, dict] = dataclasses.field(default_factory=dict)
    lags: Dict[str, Dict[float, float]] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- statistics
def _t_central_prob(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer ``df`` (closed form, Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2 == 1:
        term = total = c
        for j in range(1, (df - 3) // 2 + 1):
            term *= c * c * (2 * j) / (2 * j + 1)
            total += term
        return 2.0 / math.pi * (theta + (s * total if df > 1 else 0.0))
    term = total = 1.0
    for j in range(1, (df - 2) // 2 + 1):
        term *= c * c * (2 * j - 1) / (2 * j)
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (p > 0.5) of Student's t with integer ``df`` >= 1, by bisection."""
    check(0.5 < p < 1.0, f"t quantile needs 0.5 < p < 1, got {p}")
    check(int(df) == df and df >= 1, f"t quantile needs an integer df >= 1, got {df}")
    central = 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while _t_central_prob(hi, int(df)) < central:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _t_central_prob(mid, int(df)) < central:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(values: Iterable[float], confidence: float = ReportConfig.confidence) -> dict:
    """Mean and two-sided Student-t confidence interval of ``values`` (no interval for n < 2)."""
    xs = [float(v) for v in values]
    n = len(xs)
    out = {"n": n, "mean": None, "ci_low": None, "ci_high": None, "half_width": None}
    if n == 0:
        return out
    mean = sum(xs) / n
    out["mean"] = mean
    if n >= 2:
        sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * sd / math.sqrt(n)
        out.update(ci_low=mean - half, ci_high=mean + half, half_width=half)
    return out


# ----------------------------------------------------------------------------- speed-up
def steps_to_reach(steps: Sequence[float], values: Sequence[float], target: float) -> Optional[float]:
    """First step at which the curve reaches ``value <= target``, linearly interpolated; None if never.

    When the first point already reaches the target, its step is returned (nothing is known before it).
    """
    check(len(steps) == len(values), f"steps and values differ in length ({len(steps)} vs {len(values)})")
    for i, (step, value) in enumerate(zip(steps, values)):
        if value <= target:
            if i == 0:
                return float(step)
            s0, v0 = steps[i - 1], values[i - 1]
            return float(s0 + (v0 - target) * (step - s0) / (v0 - value))
    return None


def speedups(ema_curve: Curve, lawa_curve: Curve) -> List[dict]:
    """For each LAWA point: EMA's (interpolated) step to reach LAWA's value, and that step / LAWA's step."""
    rows = []
    for step, value in zip(lawa_curve.steps, lawa_curve.values):
        ema_step = steps_to_reach(ema_curve.steps, ema_curve.values, value)
        ratio = ema_step / step if ema_step is not None and step > 0 else None
        # EMA was already there at its first evaluation: when it got there is unknown, the ratio only bounds it
        upper = ema_step is not None and ema_curve.values[0] <= value
        rows.append({"step": step, "lawa": value, "ema_step": ema_step, "speedup": ratio,
                     "reached": ema_step is not None, "upper_bound": upper})
    return rows


def reach_final(ema_curve: Curve, lawa_curve: Curve) -> dict:
    """The step at which LAWA reaches EMA's final value, and its fraction of EMA's final step."""
    target, final_step = ema_curve.values[-1], ema_curve.steps[-1]
    step = steps_to_reach(lawa_curve.steps, lawa_curve.values, target)
    fraction = step / final_step if step is not None and final_step > 0 else None
    return {"target": target, "ema_final_step": final_step, "lawa_step": step, "fraction": fraction}


# ----------------------------------------------------------------------------- loading
def load_run(path: str | os.PathLike, metric: str = ReportConfig.metric) -> Run:
    """Curves of ``metric`` per variant from ``path``/metrics.jsonl (the last row wins for a repeated step)."""
    path = os.fspath(path)
    check(metric in METRICS, f"report --metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"run folder {path!r} does not exist; pass a folder written by lawa-diffusion train")
    metrics = runfolder.metrics_path(path)
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"run folder {path!r} has no metrics.jsonl; pass a run folder that has been "
                                "evaluated at least once (train with eval.every_n_steps > 0)")
    points: Dict[str, Dict[float, float]] = {}
    kinds: Dict[str, dict] = {}
    lags: Dict[str, Dict[float, float]] = {}
    without = 0
    for line, row in read_jsonl_rows(metrics):
        if row.get(metric) is None:
            without += 1
            continue
        step, value = usable_point(row, metric, f"{metrics}: line {line}")
        if step is None:
            continue
        variant = str(row["variant"])
        points.setdefault(variant, {})[step] = value
        kinds[variant] = variant_kind(row)
        lag = row.get("mean_lag")
        if _is_number(lag) and math.isfinite(lag):
            lags.setdefault(variant, {})[step] = float(lag)
    if without and points:
        warn(f"{metrics}: {without} row(s) hold no {metric} value; they are left out of the report")
    check(bool(points), f"run folder {path!r} has no {metric} values in metrics.jsonl; "
                        "wait for the first evaluation or choose another --metric")
    curves = {v: Curve(sorted(p), [p[s] for s in sorted(p)]) for v, p in points.items()}
    best = hindsight_curve(path, metric)
    if best is not None:
        curves[HINDSIGHT] = best
    return Run(path=path, curves=curves, kinds=kinds, lags=lags)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def usable_point(row: dict, metric: str, where: str) -> tuple:
    """(step, value) of a metrics row, or (None, None) with one warning (naming ``where``, the file and line)
    when it has no step or variant, or a step or value that is not a finite number."""
    if "step" not in row or "variant" not in row:
        warn(f"{where} has no {'step' if 'step' not in row else 'variant'}; the row is left out of the report")
        return None, None
    step, value = row["step"], row[metric]
    if not _is_number(step) or not math.isfinite(step):
        warn(f"{where} has step {step!r}, not a number; the row is left out of the report")
        return None, None
    if not _is_number(value) or not math.isfinite(value):
        what = "not a number" if not _is_number(value) else "not finite"
        warn(f"{where}: {metric} {value!r} of {row['variant']!r} at step {step} is {what}; the row is left out "
             "of the report")
        return None, None
    return step, float(value)


def hindsight_curve(path: str, metric: str = ReportConfig.metric) -> Optional[Curve]:
    """The best synthesised average's ``metric`` at each step the run was searched in hindsight (None: not searched)."""
    rows = load_hindsight(path)
    best = best_per_step(rows, metric) if rows else {}
    if not best:
        return None
    steps = sorted(int(s) for s in best)
    return Curve(steps, [float(best[str(s)][metric]) for s in steps])


def _need_speedup_curves(run: Run) -> None:
    for variant in ("ema", "lawa"):
        check(variant in run.curves, f"run folder {run.path!r} has no {variant!r} evaluations in metrics.jsonl; "
                                     "the speed-up needs both EMA and LAWA (train with LAWA enabled)")


# ----------------------------------------------------------------------------- summary
def _run_summary(run: Run) -> dict:
    rows = speedups(run.curves["ema"], run.curves["lawa"])
    # an upper bound says nothing about when EMA got there: it stays in the table, not in the mean
    reached = [r["speedup"] for r in rows if r["speedup"] is not None and not r["upper_bound"]]
    return {"path": run.path, "curves": {v: c._asdict() for v, c in sorted(run.curves.items())},
            "speedups": rows, "mean_speedup": sum(reached) / len(reached) if reached else None,
            "mean_speedup_points": len(reached),
            "reach_final": reach_final(run.curves["ema"], run.curves["lawa"])}


def _per_step(per_run: List[dict], confidence: float) -> List[dict]:
    by_step: Dict[float, List[dict]] = {}
    for summary in per_run:
        for row in summary["speedups"]:
            by_step.setdefault(row["step"], []).append(row)
    out = []
    for step in sorted(by_step):
        rows = by_step[step]
        values = [r["speedup"] for r in rows if r["speedup"] is not None]
        out.append({"step": step, "n_runs": len(rows), "n_never": sum(not r["reached"] for r in rows),
                    "n_upper_bound": sum(bool(r.get("upper_bound")) for r in rows),
                    "lawa": mean_ci([r["lawa"] for r in rows], confidence),
                    "ema_step": mean_ci([r["ema_step"] for r in rows if r["reached"]], confidence),
                    "speedup": mean_ci(values, confidence)})
    return out


def _mean_curves(runs: Sequence[Run], confidence: float) -> Dict[str, dict]:
    out = {}
    for variant in sorted({v for run in runs for v in run.curves}):
        by_step: Dict[float, List[float]] = {}
        for run in runs:
            curve = run.curves.get(variant, Curve([], []))
            for step, value in zip(curve.steps, curve.values):
                by_step.setdefault(step, []).append(value)
        stats = [mean_ci(by_step[s], confidence) for s in sorted(by_step)]
        out[variant] = {"steps": sorted(by_step), **{k: [st[k] for st in stats] for k in ("n", "mean", "ci_low", "ci_high")}}
    return out


def summarize(runs: Sequence[Run], metric: str = ReportConfig.metric,
              confidence: float = ReportConfig.confidence) -> dict:
    """Everything the report shows, as a JSON-ready dict (per run, per step across runs, headline numbers)."""
    check(len(runs) >= 1, "report needs at least one run folder")
    check(0.0 < confidence < 1.0, f"report confidence must be between 0 and 1, got {confidence}")
    windows = window_comparisons(runs, confidence)
    base = all("ema" in run.curves and "lawa" in run.curves for run in runs)
    if not base and not windows:
        for run in runs:
            _need_speedup_curves(run)
    per_run = [_run_summary(run) for run in runs] if base else []
    finals = [s["reach_final"] for s in per_run]
    reached = [f for f in finals if f["lawa_step"] is not None]
    return {
        "format": REPORT_FORMAT, "metric": metric, "confidence": confidence, "num_runs": len(runs),
        "runs": per_run, "per_step": _per_step(per_run, confidence), "curves": _mean_curves(runs, confidence),
        "base": base, "windows": windows,
        "lag_points": [{"step": s, "variants": v} for s, v in lag_points(runs).items()],
        "mean_speedup": mean_ci([s["mean_speedup"] for s in per_run if s["mean_speedup"] is not None], confidence),
        "reach_final": {"n_never": len(finals) - len(reached),
                        "lawa_step": mean_ci([f["lawa_step"] for f in reached], confidence),
                        "fraction": mean_ci([f["fraction"] for f in reached], confidence),
                        "ema_final_step": mean_ci([f["ema_final_step"] for f in finals], confidence)},
    }


# ----------------------------------------------------------------------------- LAWA against its baselines
MATCHED_LAG_TOLERANCE = 0.15  # an EMA track is "matched" when its mean lag is within 15% of the window's


def _kinds(runs: Sequence[Run]) -> Dict[str, dict]:
    out: Dict[str, dict] = {}
    for run in runs:
        for variant, kind in run.kinds.items():
            out.setdefault(variant, kind)
    return out


def _value(run: Run, variant: str, step: float, table: str = "curves") -> Optional[float]:
    if table == "lags":
        return run.lags.get(variant, {}).get(step)
    curve = run.curves.get(variant)
    if curve is None or step not in curve.steps:
        return None
    return curve.values[curve.steps.index(step)]


def _mean_lag_at(runs: Sequence[Run], variant: str, step: float) -> Optional[float]:
    values = [v for v in (_value(r, variant, step, "lags") for r in runs) if v is not None]
    return sum(values) / len(values) if values else None


def matched_track(runs: Sequence[Run], window: str, tolerance: float = MATCHED_LAG_TOLERANCE) -> Optional[dict]:
    """The EMA track whose mean lag at the window's last evaluation is nearest the window's, if within ``tolerance``."""
    kinds = _kinds(runs)
    step = max(s for r in runs for s in r.curves.get(window, Curve([], [])).steps)
    target = _mean_lag_at(runs, window, step)
    if target is None or target <= 0:
        return None
    found = [(abs(lag - target), v, lag) for v, k in kinds.items() if k["kind"] == "ema"
             if (lag := _mean_lag_at(runs, v, step)) is not None]
    if not found:
        return None
    gap, name, lag = min(found)
    return {"track": name, "mean_lag": lag, "window_mean_lag": target, "step": step} if gap <= tolerance * target else None


def _paired(runs: Sequence[Run], window: str, baseline: Optional[str], step: float) -> List[float]:
    """Per run: baseline's value − the window's value at ``step`` (positive: the window is better)."""
    if baseline is None:
        return []
    pairs = [(_value(r, baseline, step), _value(r, window, step)) for r in runs]
    return [b - w for b, w in pairs if b is not None and w is not None]


def _values_at(runs: Sequence[Run], variant: Optional[str], step: float, confidence: float) -> dict:
    """Mean and CI over runs of ``variant``'s value at ``step``."""
    values = [_value(r, variant, step) for r in runs] if variant else []
    return mean_ci([v for v in values if v is not None], confidence)


def _over_steps(runs: Sequence[Run], window: str, baseline: Optional[str], confidence: float) -> dict:
    """Per run, the mean over evaluation steps of baseline − window; then mean and CI over runs."""
    per_run = []
    for run in runs:
        steps = run.curves.get(window, Curve([], [])).steps
        diffs = [d for s in steps for d in _paired([run], window, baseline, s)]
        if diffs:
            per_run.append(sum(diffs) / len(diffs))
    return mean_ci(per_run, confidence)


def _speedup_vs(runs: Sequence[Run], track: str, window: str, confidence: float) -> dict:
    """Mean over runs (CI) of each run's mean speed-up of ``window`` over ``track`` (upper bounds left out)."""
    per_run = []
    for run in runs:
        if track not in run.curves or window not in run.curves:
            continue
        rows = speedups(run.curves[track], run.curves[window])
        reached = [r["speedup"] for r in rows if r["speedup"] is not None and not r["upper_bound"]]
        if reached:
            per_run.append(sum(reached) / len(reached))
    return mean_ci(per_run, confidence)


def window_comparisons(runs: Sequence[Run], confidence: float = ReportConfig.confidence) -> List[dict]:
    """For each LAWA window: its delayed baseline, the matched-lag EMA track, the paired differences
    (baseline − window: positive means the window has the lower metric) per step and over steps, and its
    speed-up against every EMA track."""
    kinds = _kinds(runs)
    out = []
    for window in [v for v, k in kinds.items() if k["kind"] == "lawa"]:
        delayed = window + "@delayed" if any(window + "@delayed" in r.curves for r in runs) else None
        matched = matched_track(runs, window)
        matched_name = matched["track"] if matched else None
        steps = sorted({s for r in runs for s in r.curves.get(window, Curve([], [])).steps})
        per_step = [{"step": s, "window": _values_at(runs, window, s, confidence),
                     "delayed": _values_at(runs, delayed, s, confidence),
                     "matched": _values_at(runs, matched_name, s, confidence),
                     "mean_lag": _mean_lag_at(runs, window, s),
                     "delayed_minus_window": mean_ci(_paired(runs, window, delayed, s), confidence),
                     "matched_minus_window": mean_ci(_paired(runs, window, matched_name, s), confidence)}
                    for s in steps]
        tracks = [v for v, k in kinds.items() if k["kind"] == "ema"]
        out.append({"window": window, "over": kinds[window]["over"], "delayed": delayed, "matched": matched,
                    "per_step": per_step,
                    "vs_delayed": _over_steps(runs, window, delayed, confidence),
                    "vs_matched": _over_steps(runs, window, matched_name, confidence),
                    "speedup": {t: _speedup_vs(runs, t, window, confidence) for t in tracks},
                    "hindsight": _vs_hindsight(runs, window, steps, confidence)})
    return out


def _vs_hindsight(runs: Sequence[Run], window: str, steps: Sequence[float], confidence: float) -> Optional[dict]:
    """The window against the best average in hindsight (None when no run was searched): per step and over the
    searched steps, best − window paired per run (positive: the window is better); its speed-up against the
    best-in-hindsight curve (that curve's interpolated step to reach the window's value / the window's step)."""
    if not any(HINDSIGHT in r.curves for r in runs):
        return None
    searched = [s for s in steps if any(s in r.curves.get(HINDSIGHT, Curve([], [])).steps for r in runs)]
    return {"runs": sum(HINDSIGHT in r.curves for r in runs), "steps": searched,
            "per_step": [{"step": s, "best": _values_at(runs, HINDSIGHT, s, confidence),
                          "best_minus_window": mean_ci(_paired(runs, window, HINDSIGHT, s), confidence)}
                         for s in searched],
            "vs_best": _over_steps(runs, window, HINDSIGHT, confidence),
            "speedup": _speedup_vs(runs, HINDSIGHT, window, confidence)}


def lag_points(runs: Sequence[Run]) -> Dict[float, Dict[str, dict]]:
    """{step: {variant: {"mean_lag", "value"}}} (means over runs) for the variants whose rows give a lag."""
    out: Dict[float, Dict[str, dict]] = {}
    for variant in _kinds(runs):
        for step in sorted({s for r in runs for s in r.lags.get(variant, {})}):
            values = [v for v in (_value(r, variant, step) for r in runs) if v is not None]
            lag = _mean_lag_at(runs, variant, step)
            if values and lag is not None:
                out.setdefault(step, {})[variant] = {"mean_lag": lag, "value": sum(values) / len(values)}
    return {s: out[s] for s in sorted(out)}


# ----------------------------------------------------------------------------- text
def _num(value: Optional[float], fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if value is None else fmt.format(value)


def _with_ci(stats: dict, fmt: str = "{:.2f}", none: str = "-") -> str:
    if stats["mean"] is None:
        return none
    text = fmt.format(stats["mean"])
    if stats["ci_low"] is not None:
        text += f" [{fmt.format(stats['ci_low'])}, {fmt.format(stats['ci_high'])}]"
    return text


def _curve_value(curves: dict, variant: str, step: float) -> Optional[float]:
    curve = curves.get(variant)
    if curve is None or step not in curve["steps"]:
        return None
    return curve["mean"][curve["steps"].index(step)]


def format_table(summary: dict) -> str:
    """The printed report: one row per LAWA evaluation step, then the headline lines."""
    metric, pct = summary["metric"], round(100 * summary["confidence"])
    ci_note = f", mean [{pct}% CI] over runs" if summary["num_runs"] > 1 else ""
    lines = [f"{summary['num_runs']} run(s), metric {metric}{ci_note}"]
    if summary.get("base", True):
        lines += _format_base(summary)
    else:
        lines.append("(ema and lawa were not both evaluated: the LAWA windows against their baselines follow)")
    for comparison in summary.get("windows", []):
        lines += format_window(comparison, metric, summary["num_runs"])
    return "\n".join(lines)


def _format_base(summary: dict) -> List[str]:
    """The speed-up table of "lawa" over "ema" and its headline lines."""
    metric = summary["metric"]
    lines = [f"{'step':>8} {'raw':>9} {'ema':>9} {'lawa':>9} {'EMA step to match':>18}  speed-up (EMA step / LAWA step)"]
    for row in summary["per_step"]:
        step = row["step"]
        values = [_num(_curve_value(summary["curves"], v, step), "{:.3f}") for v in VARIANTS]
        never = f" ({row['n_never']} never reached)" if row["n_never"] and row["speedup"]["n"] else ""
        if row.get("n_upper_bound"):
            never += (f" (upper bound in {row['n_upper_bound']} run(s): EMA was already there at its "
                      "first evaluation)")
        ema_step = _num(row["ema_step"]["mean"], "{:.0f}", "never")
        lines.append(f"{step:>8} {values[0]:>9} {values[1]:>9} {values[2]:>9} {ema_step:>18}  "
                     f"{_with_ci(row['speedup'], none='never reached')}{never}")
    final = summary["reach_final"]
    target = _curve_value(summary["curves"], "ema", summary["curves"]["ema"]["steps"][-1])
    if final["lawa_step"]["n"]:
        never = f"; never in {final['n_never']} run(s)" if final["n_never"] else ""
        lines.append(f"LAWA reaches EMA's final {metric} ({target:.3f}) at step {_with_ci(final['lawa_step'], '{:.0f}')} "
                     f"({_with_ci({k: _scale(v, 100) for k, v in final['fraction'].items()}, '{:.0f}')}% of the steps){never}")
    else:
        lines.append(f"LAWA never reaches EMA's final {metric} ({target:.3f})")
    left_out = sum(row.get("n_upper_bound", 0) for row in summary["per_step"])
    note = f" ({left_out} upper bound(s) left out)" if left_out else ""
    lines.append(f"mean speed-up over LAWA evaluation points{note}: {_with_ci(summary['mean_speedup'], none='n/a')}")
    return lines


def _outcome(diff: dict) -> str:
    """How a paired difference (baseline - window; positive: the window is better) reads."""
    if diff["mean"] is None:
        return "not measured"
    low, high = diff["ci_low"], diff["ci_high"]
    if low is None:  # one run: no interval
        if diff["mean"] == 0:
            return "level (one run, no CI)"
        return "ahead (one run, no CI)" if diff["mean"] > 0 else "behind (one run, no CI)"
    if low > 0:
        return "beats it"
    if high < 0:
        return "trails it"
    return "no clear difference"


def verdict(c: dict, metric: str = ReportConfig.metric) -> str:
    """"lawa vs the delayed EMA: +X [lo, hi] FID, beats it; vs the matched-lag EMA (ema_long): Y [lo, hi], ..."
    (differences are baseline - window: positive means the window has the lower, better value)."""
    name = metric.upper() if metric == "fid" else metric
    baseline = "the delayed raw weights" if c["over"] == "raw" else "the delayed EMA"
    first = (f"{c['window']} vs {baseline}: {_with_ci(c['vs_delayed'])} {name}, {_outcome(c['vs_delayed'])}"
             if c["delayed"] else f"{c['window']}: no delayed baseline evaluated")
    matched = (f"vs the matched-lag EMA ({c['matched']['track']}): {_with_ci(c['vs_matched'])}, "
               f"{_outcome(c['vs_matched'])}" if c["matched"] else "no EMA track within 15% of its mean lag")
    return f"{first}; {matched}"


def format_window(c: dict, metric: str, num_runs: int) -> List[str]:
    """The lines of one LAWA window: per step its value, lag and paired differences; speed-ups; the verdict."""
    matched = c["matched"]["track"] if c["matched"] else None
    lines = ["", f"{c['window']} (LAWA over {c['over']}); differences are baseline - {c['window']}, positive: "
                 f"{c['window']} has the lower {metric}"
                 + (f"; mean [CI] over {num_runs} runs" if num_runs > 1 else ""),
             f"{'step':>8} {c['window']:>10} {'mean lag':>9} {'delayed':>9} {'delayed - it':>22} "
             f"{matched or 'matched':>12} {'matched - it':>22}"]
    for row in c["per_step"]:
        means = [_num(row[key]["mean"], "{:.3f}") for key in ("window", "delayed", "matched")]
        lines.append(f"{row['step']:>8} {means[0]:>10} {_num(row['mean_lag'], '{:.1f}'):>9} {means[1]:>9} "
                     f"{_with_ci(row['delayed_minus_window']):>22} {means[2]:>12} "
                     f"{_with_ci(row['matched_minus_window']):>22}")
    speed = "; ".join(f"vs {t}: {_with_ci(v, none='n/a')}" for t, v in c["speedup"].items())
    lines.append(f"speed-up of {c['window']} (EMA track step / its step): {speed}")
    spread = f", CI over {num_runs} runs" if num_runs > 1 else ""
    lines.append(f"verdict: {verdict(c, metric)} (mean over the evaluation steps{spread})")
    if c.get("hindsight"):
        lines += hindsight_lines(c, metric)
    return lines


def hindsight_lines(c: dict, metric: str = ReportConfig.metric) -> List[str]:
    """Per searched step the best synthesised average and best − window; then the line over the steps."""
    h, name = c["hindsight"], metric.upper() if metric == "fid" else metric
    lines = [f"{'step':>8} {'best in hindsight':>18} {'best - ' + c['window']:>24}"]
    for row in h["per_step"]:
        lines.append(f"{row['step']:>8} {_num(row['best']['mean'], '{:.3f}'):>18} {_with_ci(row['best_minus_window']):>24}")
    steps = ", ".join(f"{s:g}" for s in h["steps"]) or "none"
    lines.append(f"{c['window']} vs the best average in hindsight: {_with_ci(h['vs_best'])} {name}, "
                 f"{_outcome(h['vs_best'])} (best synthesised - {c['window']}, mean over steps {steps}, "
                 f"{h['runs']} run(s) searched); speed-up against the best-in-hindsight curve: "
                 f"{_with_ci(h['speedup'], none='n/a')}")
    return lines


def _scale(value, factor: float):
    return value * factor if isinstance(value, float) else value


# ----------------------------------------------------------------------------- files
def _plot(summary: dict, path: str) -> None:
    """Two panels: metric vs step per variant (CI band over runs) and speed-up vs step."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(11, 4.2), constrained_layout=True)
    ax_curve, ax_speed = fig.subplots(1, 2)
    for variant, curve in summary["curves"].items():
        ax_curve.plot(curve["steps"], curve["mean"], marker="o", ms=3, label=variant)
        if summary["num_runs"] > 1 and any(c is not None for c in curve["ci_low"]):
            low = [c if c is not None else m for c, m in zip(curve["ci_low"], curve["mean"])]
            high = [c if c is not None else m for c, m in zip(curve["ci_high"], curve["mean"])]
            ax_curve.fill_between(curve["steps"], low, high, alpha=0.2)
    ax_curve.set(xlabel="optimizer step", ylabel=summary["metric"], title=f"{summary['metric']} vs step")
    ax_curve.legend()
    rows = [r for r in summary["per_step"] if r["speedup"]["mean"] is not None]
    err = [[_half(r["speedup"], "ci_low") for r in rows], [_half(r["speedup"], "ci_high") for r in rows]]
    ax_speed.errorbar([r["step"] for r in rows], [r["speedup"]["mean"] for r in rows], yerr=err, marker="o", capsize=3)
    ax_speed.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_speed.set(xlabel="LAWA step", ylabel="EMA step / LAWA step", title="speed-up of LAWA over EMA")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _plot_lag(summary: dict, path: str) -> None:
    """Metric versus mean lag, one panel per evaluation step (own y range), every variant one marker
    (the same marker and colour in every panel, named once in the legend)."""
    from matplotlib.figure import Figure

    entries = summary["lag_points"]
    names = sorted({n for e in entries for n in e["variants"]},
                   key=lambda n: min(e["variants"][n]["mean_lag"] for e in entries if n in e["variants"]))
    markers = "osD^v<>pXh*"
    fig = Figure(figsize=(3.2 * len(entries) + 2.4, 4), constrained_layout=True)
    axes = fig.subplots(1, len(entries), sharex=True, squeeze=False)[0]
    for ax, entry in zip(axes, entries):
        for i, name in enumerate(names):
            p = entry["variants"].get(name)
            if p is not None:
                ax.plot([p["mean_lag"]], [p["value"]], marker=markers[i % len(markers)], ls="none", ms=6,
                        color=f"C{i % 10}", label=name)
        ax.set(xlabel="mean lag (steps)", title=f"step {entry['step']:g}")
    axes[0].set(ylabel=summary["metric"])
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(f"{summary['metric']} vs mean lag of every variant (same noise at each step)")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def _half(stats: dict, bound: str) -> float:
    return 0.0 if stats[bound] is None else abs(stats[bound] - stats["mean"])


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: Optional[str] = None,
                 metric: str = ReportConfig.metric, confidence: float = ReportConfig.confidence,
                 overwrite: bool = False) -> dict:
    """Load the runs, summarise, write report.json and report-<metric>.png; return the summary.

    A previous report in ``out_dir`` is refreshed; another output of this package there needs ``overwrite``; a
    folder this package did not write (and the run folders, and the folders that hold them) is never written into.
    """
    check(len(run_dirs) >= 1, "report needs at least one RUN_DIR")
    runs = [load_run(p, metric) for p in run_dirs]
    summary = summarize(runs, metric, confidence)
    out_dir = runfolder.report_dir([r.path for r in runs]) if out_dir is None else out_dir
    out_dir = check_output_dir(out_dir, "-o", overwrite, kind="report", refresh=True, protected=[r.path for r in runs])
    os.makedirs(out_dir, exist_ok=True)
    write_marker(out_dir, "report")
    png = os.path.join(out_dir, f"report-{metric}.png")
    _plot(summary, png)
    summary["files"] = {"json": os.path.join(out_dir, JSON_NAME), "png": png}
    if summary["lag_points"]:
        summary["files"]["lag_png"] = os.path.join(out_dir, f"report-{metric}-lag.png")
        _plot_lag(summary, summary["files"]["lag_png"])
    atomic_write_json(summary["files"]["json"], summary)
    return summary


def files_line(summary: dict) -> str:
    """The line that says where a report's files are."""
    lag_png = summary["files"].get("lag_png")
    return f"report: {summary['files']['json']}  plot: {summary['files']['png']}" + (
        f"  lag plot: {lag_png}" if lag_png else "")


def print_report(run_dir: str) -> Optional[str]:
    """Write, print and return the path of the speed-up report of one run (at the end of training); a run
    that cannot be reported on says why in one line and returns None."""
    try:
        summary = write_report([run_dir])
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        say(f"not written ({e})", "report")
        return None
    except OSError as e:  # a full disk after training: the run is complete, the report can be made later
        from lawa_diffusion.utils.os_errors import describe

        say(f"not written ({describe(e, fix='free space, then run lawa-diffusion report on the run folder')})", "report")
        return None
    print(format_table(summary), flush=True)
    print(files_line(summary), flush=True)
    return summary["files"]["json"]
