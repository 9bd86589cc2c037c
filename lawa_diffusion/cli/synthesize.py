"""``lawa-diffusion synthesize``: any average of a finished run (σ_rel, decay, LAWA, ...) from its stored EMA
snapshots, written as a diffusers model folder.
"""
from __future__ import annotations

import json
from typing import List, Optional

from lawa_diffusion.config.base import check
from lawa_diffusion.maths import profile_fit as synthesis
from lawa_diffusion.posthoc.synthesize import SKIP_BELOW, plan_synthesis, write_synthesis
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


def _cli(args) -> int:
    check_output_dir(args.out, "-o", args.overwrite, kind="synthesize", protected=[args.run])  # before any work
    plan = plan_synthesis(args.run, args.target, args.step, _parse_tracks(args.tracks), args.max_residual)
    record = write_synthesis(plan, args.out, overwrite=args.overwrite, progress=not args.json)
    if args.json:
        print(json.dumps(record), flush=True)
    else:
        print(summary_line(record, len(plan.used())), flush=True)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("synthesize", help="any average of a finished run from its stored EMA snapshots",
                              description="Least-squares combination (exact discrete profiles, Σ coefficients = 1) of "
                                          "a run's stored EMA snapshots that has a target averaging profile at a step, "
                                          "written as a diffusers model folder with synthesis.json.")
    p.add_argument("run", metavar="RUN", help="run folder with ema_snapshots/")
    p.add_argument("--target", required=True, help=f"the average to synthesise: {synthesis.TARGET_HELP}")
    p.add_argument("--step", type=int, default=None, help="a stored step (default: the last one)")
    p.add_argument("--tracks", default=None, help="comma-separated tracks whose snapshots may be used (default: all)")
    p.add_argument("--max-residual", type=float, default=synthesis.DEFAULT_MAX_RESIDUAL,
                   help=f"refuse a relative profile residual above this (default {synthesis.DEFAULT_MAX_RESIDUAL})")
    p.add_argument("-o", "--out", required=True, help="output diffusers model folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print one JSON object (coefficients, residual, mean_lag, sigma_rel)")
    p.set_defaults(func=_cli)
