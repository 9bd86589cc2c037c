"""``lawa-diffusion synthesize``: any averages of a finished run (σ_rel, decay, LAWA, ...) from its stored EMA
snapshots, every target from one read of the files, each written as a diffusers model folder.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

from lawa_diffusion.config.base import check
from lawa_diffusion.maths import profile_fit as synthesis
from lawa_diffusion.posthoc.search import parse_sigma_rels
from lawa_diffusion.posthoc.synthesize import SKIP_BELOW, folder_name, plan_syntheses, write_syntheses
from lawa_diffusion.utils.files import check_output_dir


# ----------------------------------------------------------------------------- CLI
def _parse_tracks(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    check(bool(names), f"synthesize --tracks must be comma-separated track names such as ema_a,ema_b, got {text!r}")
    return names


def summary_line(record: dict, count: int) -> str:
    tracks = ", ".join(dict.fromkeys(c["track"] for c in record["coefficients"] if abs(c["coefficient"]) >= SKIP_BELOW))
    return (f"synthesised {record['target']} ({record['target_description']}) at step {record['step']} from {count} "
            f"snapshot(s) of {tracks}: residual {record['residual']:.4g}, mean lag {record['mean_lag']:.1f} "
            f"(target {record['target_mean_lag']:.1f}), σ_rel {record['sigma_rel']:.4f} "
            f"(target {record['target_sigma_rel']:.4f}) into {record['output']}")


def targets_of(args) -> List[str]:
    """--target texts, then --sigma-rel's grid as sigma_rel=<v> targets, each once."""
    targets = list(args.target or [])
    if args.sigma_rel is not None:
        targets += [f"sigma_rel={v:g}" for v in parse_sigma_rels(args.sigma_rel)]
    check(bool(targets), "synthesize needs at least one target: pass --target (repeatable) or --sigma-rel lo:hi:n")
    return list(dict.fromkeys(targets))


def output_folders(out: str, targets: List[str]) -> List[str]:
    """One target: ``out`` itself; several: ``out/<target as a folder name>`` each."""
    if len(targets) == 1:
        return [out]
    names = [folder_name(t) for t in targets]
    twice = [n for n in names if names.count(n) > 1]
    if twice:
        same = ", ".join(t for t, n in zip(targets, names) if n == twice[0])
        raise ValueError(f"synthesize targets {same} would share the output folder {twice[0]!r}; give each target once")
    return [os.path.join(out, n) for n in names]


def _cli(args) -> int:
    targets = targets_of(args)
    outs = output_folders(args.out, targets)
    for out in outs:  # before any work
        check_output_dir(out, "-o", args.overwrite, kind="synthesize", protected=[args.run])
    plans = plan_syntheses(args.run, targets, args.step, _parse_tracks(args.tracks), args.max_residual)
    records = write_syntheses(plans, outs, overwrite=args.overwrite, progress=not args.json, device=args.device)
    for plan, record in zip(plans, records):
        print(json.dumps(record) if args.json else summary_line(record, len(plan.used())), flush=True)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("synthesize", help="any averages of a finished run from its stored EMA snapshots",
                              description="Least-squares combinations (exact discrete profiles, Σ coefficients = 1) of "
                                          "a run's stored EMA snapshots that have target averaging profiles at a step, "
                                          "every target from one read of the files, each written as a diffusers model "
                                          "folder with synthesis.json.")
    p.add_argument("run", metavar="RUN", help="run folder with ema_snapshots/")
    p.add_argument("--target", action="append", default=[],
                   help=f"an average to synthesise (repeatable): {synthesis.TARGET_HELP}")
    p.add_argument("--sigma-rel", default=None,
                   help="σ_rel targets as lo:hi:n (n values, geometric spacing) or a comma list such as 0.05,0.1")
    p.add_argument("--step", type=int, default=None, help="a stored step (default: the last one)")
    p.add_argument("--tracks", default=None, help="comma-separated tracks whose snapshots may be used (default: all)")
    p.add_argument("--max-residual", type=float, default=synthesis.DEFAULT_MAX_RESIDUAL,
                   help=f"refuse a relative profile residual above this (default {synthesis.DEFAULT_MAX_RESIDUAL})")
    p.add_argument("-o", "--out", required=True,
                   help="output diffusers model folder; with several targets, the folder holding one per target "
                        "(named after the target: sigma_rel=0.05, lawa_k=5_nu=100_over=ema)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output folders")
    p.add_argument("--device", default="cpu", help="torch device of the arithmetic (the files are read on the CPU; "
                                                   "default cpu)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per target (coefficients, residual, mean_lag, sigma_rel)")
    p.set_defaults(func=_cli)
