"""Matched-lag comparison of LAWA variants: against the EMA it averages, delayed by LAWA's extra lag,
and against an EMA with the same total lag. Pure functions over metrics rows (see ``lag`` for lags).

Differences are signed so that a positive number means LAWA has the lower (better) metric; each is
taken within one run (same noise), then averaged over runs (seeds) with a Student-t interval.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from lawa_diffusion import lag
from lawa_diffusion.config import LAWAConfig, ReportConfig, check
from lawa_diffusion.report import mean_ci

Curve = Dict[int, float]  # step -> metric value


def curves(rows: Iterable[Mapping], metric: str = ReportConfig.metric) -> Dict[str, Curve]:
    """{variant: {step: value}} from one run's metrics rows (the last row wins for a repeated step)."""
    out: Dict[str, Curve] = {}
    for row in rows:
        if row.get(metric) is not None and "step" in row and "variant" in row:
            out.setdefault(str(row["variant"]), {})[int(row["step"])] = float(row[metric])
    return out


def variant_lags(variants: Mapping[str, Tuple[lag.EMATrack, Optional[LAWAConfig]]],
                 steps: Sequence[int]) -> Dict[str, Dict[int, float]]:
    """{variant: {step: mean lag}} for tracks (window None) and LAWA windows over tracks, exactly.

    A LAWA variant gets no entry at steps before its first snapshot.
    """
    out: Dict[str, Dict[int, float]] = {}
    for name, (track, window) in variants.items():
        d = lag.decays(track, max(steps))
        if window is None:
            out[name] = {t: lag.mean_lag(lag.profile(track, t, d)) for t in steps}
        else:
            out[name] = {t: lag.mean_lag(lag.lawa_profile(track, window, t, d))
                         for t in steps if t >= lag.first_snapshot(window)}
    return out


def nearest_step(steps: Iterable[int], target: float) -> Optional[int]:
    """The step nearest ``target`` (the earlier one on a tie), None when there is none."""
    steps = sorted(steps)
    return min(steps, key=lambda s: (abs(s - target), s)) if steps else None


def delayed_pairs(base: Curve, lawa: Curve, extra_lag: Mapping[int, float],
                  tolerance: Optional[float] = None) -> List[dict]:
    """Pair each LAWA point at ``t`` with the base EMA's point nearest ``t − ΔL(t)`` (one run).

    ``gain`` = base value − LAWA value (positive: LAWA better than the delayed EMA); ``offset`` =
    paired step − (t − ΔL). Points with no base step within ``tolerance`` steps are left out.
    """
    pairs = []
    for t in sorted(lawa):
        if t not in extra_lag:
            continue
        target = t - extra_lag[t]
        s = nearest_step(base, target)
        if s is None or (tolerance is not None and abs(s - target) > tolerance):
            continue
        pairs.append({"step": t, "target_step": target, "delayed_step": s, "offset": s - target,
                      "lawa": lawa[t], "delayed": base[s], "gain": base[s] - lawa[t]})
    return pairs


def compare(runs: Sequence[Mapping[str, Curve]], lawa_variant: str, base_variant: str,
            lags: Mapping[str, Mapping[int, float]], matched_variant: Optional[str] = None,
            tolerance: Optional[float] = None, confidence: float = ReportConfig.confidence) -> List[dict]:
    """Per LAWA evaluation step, over runs: the gain over the delayed base EMA and over the matched-lag EMA.

    ``runs``: one ``curves(...)`` mapping per run (seed); ``lags``: ``variant_lags(...)`` (ΔL is
    ``lags[lawa][t] − lags[base][t]``).
    """
    for name in (lawa_variant, base_variant):
        check(name in lags, f"compare needs the mean lag of variant {name!r}; pass it in lags")
    extra = {t: lags[lawa_variant][t] - lags[base_variant][t]
             for t in lags[lawa_variant] if t in lags[base_variant]}
    delayed: Dict[int, List[dict]] = {}
    matched: Dict[int, List[float]] = {}
    for run in runs:
        if lawa_variant not in run or base_variant not in run:
            continue
        for pair in delayed_pairs(run[base_variant], run[lawa_variant], extra, tolerance):
            delayed.setdefault(pair["step"], []).append(pair)
        for t, value in run[lawa_variant].items():
            other = run.get(matched_variant, {}) if matched_variant else {}
            if t in other:
                matched.setdefault(t, []).append(other[t] - value)
    out = []
    for t in sorted(set(delayed) | set(matched)):
        pairs = delayed.get(t, [])
        out.append({"step": t, "variant": lawa_variant, "base": base_variant, "matched": matched_variant,
                    "extra_lag": extra.get(t), "delayed_steps": [p["delayed_step"] for p in pairs],
                    "lawa": mean_ci([p["lawa"] for p in pairs], confidence),
                    "vs_delayed": mean_ci([p["gain"] for p in pairs], confidence),
                    "vs_matched": mean_ci(matched.get(t, []), confidence)})
    return out


def _signed(stats: dict, metric: str, better: str, worse: str) -> str:
    mean, lo, hi = stats["mean"], stats["ci_low"], stats["ci_high"]
    word, sign = (better, 1.0) if mean >= 0 else (worse, -1.0)
    interval = "" if lo is None else f" [{min(sign * lo, sign * hi):.2f}, {max(sign * lo, sign * hi):.2f}]"
    return f"{word} {sign * mean:.2f}{interval} {metric.upper()}"


def verdict_line(row: dict, metric: str = ReportConfig.metric) -> str:
    """One line per LAWA variant and step: how it fares against the delayed EMA and the matched-lag EMA."""
    head = f"{row['variant']} at step {row['step']}"
    if row["vs_delayed"]["mean"] is None:
        parts = [f"no {row['base']} evaluation near step {row['step']} − ΔL to compare with"]
    else:
        delay = "" if row["extra_lag"] is None else f" ({row['base']} {row['extra_lag']:.0f} steps earlier)"
        parts = [_signed(row["vs_delayed"], metric, "beats the delayed EMA by", "trails the delayed EMA by") + delay]
    if row["vs_matched"]["mean"] is None:
        parts.append("no matched-lag EMA in the run" if row["matched"] is None
                     else f"no {row['matched']} evaluation at this step")
    else:
        stats = row["vs_matched"]
        interval = "" if stats["ci_low"] is None else f" [{stats['ci_low']:.2f}, {stats['ci_high']:.2f}]"
        parts.append(f"vs the matched-lag EMA: {stats['mean']:+.2f}{interval}")
    n = max(row["vs_delayed"]["n"], row["vs_matched"]["n"])
    return f"{head}: {'; '.join(parts)} (n = {n} run(s), positive: LAWA lower)"
