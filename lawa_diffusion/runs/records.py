"""The rows a run folder holds: metrics.jsonl rows (``metric_row``), the variant kinds they name, and the
hindsight rows (``load_hindsight``, ``best_per_step``). The report and the search read them here, so neither
imports the other.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence

from lawa_diffusion.runs import folder as runfolder

VARIANTS = ("raw", "ema", "lawa")


def variant_kind(row: dict) -> dict:
    """{"kind", "over"} of a metrics row; rows written before EMA tracks existed are raw, ema or lawa over ema."""
    variant = str(row["variant"])
    kind = row.get("kind") or ("delayed" if variant.endswith("@delayed") else
                               variant if variant in VARIANTS else "ema")
    over = row.get("over") or ("ema" if kind in ("lawa", "delayed") else None)
    return {"kind": kind, "over": over}


def best_per_step(rows: Sequence[dict], metric: str = "fid") -> Dict[str, dict]:
    """{step: the synthesised row with the lowest ``metric``} over the grid and the targets (not the twins)."""
    best: Dict[str, dict] = {}
    for row in rows:
        value = row.get(metric)
        if row.get("kind") == "twin" or row.get("refused") or not _finite_number(value) or "step" not in row:
            continue
        key = str(row["step"])
        if key not in best or row[metric] < best[key][metric]:
            best[key] = {k: row.get(k) for k in ("step", "target", "kind", "sigma_rel", "mean_lag", "residual", metric)}
    return best


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


HINDSIGHT_METRICS = ("fid", "kid_mean")


def load_hindsight(run_dir: str) -> Optional[List[dict]]:
    """The rows of RUN/posthoc/hindsight.jsonl (None when the run has none). A row without step or kind is left
    out, a metric that is not a finite number is dropped from its row: each with one warning (file and line)."""
    from lawa_diffusion.utils.files import read_jsonl_rows
    from lawa_diffusion.utils.output import warn

    path = runfolder.hindsight_path(run_dir)
    if not os.path.isfile(path):
        return None
    rows = []
    for line, row in read_jsonl_rows(path):
        if "step" not in row or "kind" not in row:
            warn(f"{path}: line {line} has no {'step' if 'step' not in row else 'kind'}; the row is left out")
            continue
        for key in HINDSIGHT_METRICS:
            if row.get(key) is not None and not _finite_number(row[key]):
                warn(f"{path}: line {line}: {key} {row[key]!r} of {row.get('target')!r} at step {row['step']} is not "
                     "a finite number; it is left out")
                row[key] = None
        rows.append(row)
    return rows


def metric_row(step: int, variant: str, result: dict, info: dict) -> dict:
    """One metrics.jsonl row (the format report.py and sweep.py read); ``info`` from :func:`lawa_info`."""
    kid_mean, kid_std = result.get("kid_mean"), result.get("kid_std")
    row = {"step": int(step), "variant": variant, "fid": float(result["fid"]),
           "kid_mean": None if kid_mean is None else float(kid_mean),
           "kid_std": None if kid_std is None else float(kid_std),
           "num_samples": int(result["num_samples"]), "inception_sha256": str(result["inception_sha256"]), **info}
    for key in ("sample_seconds", "metric_seconds"):
        if key in result:
            row[key] = round(float(result[key]), 3)
    return row
