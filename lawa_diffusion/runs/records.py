"""The rows a run folder holds: metrics.jsonl rows (``metric_row``), the variant kinds they name, and the
hindsight rows (``load_hindsight``, ``best_per_step``). The report and the search read them here, so neither
imports the other.
"""
from __future__ import annotations

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
        if row["kind"] == "twin" or row.get("refused") or row.get(metric) is None:
            continue
        key = str(row["step"])
        if key not in best or row[metric] < best[key][metric]:
            best[key] = {k: row.get(k) for k in ("step", "target", "kind", "sigma_rel", "mean_lag", "residual", metric)}
    return best


def load_hindsight(run_dir: str) -> Optional[List[dict]]:
    """The rows of RUN/posthoc/hindsight.jsonl (None when the run has none)."""
    from lawa_diffusion.utils.files import read_jsonl

    path = runfolder.hindsight_path(run_dir)
    return read_jsonl(path) if os.path.isfile(path) else None


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
