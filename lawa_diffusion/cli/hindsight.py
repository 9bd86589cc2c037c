"""``lawa-diffusion hindsight``: the search in hindsight, FID of averages synthesised from a run's stored EMA
snapshots (a σ_rel grid and other targets) on the same noise as the run's online variants.
"""
from __future__ import annotations

import os
import warnings

from lawa_diffusion.cli.run_evaluator_options import add_evaluator_options, evaluator_options
from lawa_diffusion.maths import profile_fit as synthesis
from lawa_diffusion.posthoc.search import (
    DEFAULT_SIGMA_RELS,
    MAX_GRID_POINTS,
    _prepare,
    format_summary,
    parse_sigma_rels,
    run_hindsight,
)
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.files import check_output_place
from lawa_diffusion.utils.output import is_main_process


# ----------------------------------------------------------------------------- CLI
def _cmd(args) -> int:
    options = evaluator_options(args)
    outs = [args.out if args.out is None or len(args.runs) == 1 else
            os.path.join(args.out, os.path.basename(os.path.normpath(run))) for run in args.runs]
    best = [None if args.save_best is None else args.save_best if len(args.runs) == 1 else
            os.path.join(args.save_best, os.path.basename(os.path.normpath(run))) for run in args.runs]
    main = is_main_process()
    grid = parse_sigma_rels(args.sigma_rel, allow_large=args.large_grid)
    for run, out in zip(args.runs, outs):  # every output checked before any work
        if out is not None:
            check_output_place(out, "-o", protected=args.runs)
        _prepare(os.path.abspath(out or runfolder.hindsight_dir(run)), args.overwrite, args.append, check_existing=main)
    for run, out, save_best in zip(args.runs, outs, best):
        summary = run_hindsight(run, grid, targets=args.target, twins=args.twin, steps=args.steps,
                                tracks=args.tracks.split(",") if args.tracks else None, max_residual=args.max_residual,
                                out_dir=out, overwrite=args.overwrite, append=args.append, device=args.device,
                                save_best=save_best, **options)
        if main:
            print(f"{summary['run']}:")
            print(format_summary(summary))
            print(f"hindsight: {summary['files']['json']}  plot: {summary['files']['png']}", flush=True)
            for step, folder in summary.get("saved_best", {}).items():
                print(f"step {step}: best average's weights in {folder}", flush=True)
    return 0


def _cmd_old_name(args) -> int:
    warnings.warn("'lawa-diffusion posthoc' is now 'lawa-diffusion hindsight'; the old name goes in the next release",
                  FutureWarning, stacklevel=1)
    return _cmd(args)


def register_cli(subparsers) -> None:
    _add_parser(subparsers, "hindsight", _cmd, help="the best average in hindsight: FID of synthesised averages "
                                                   "(σ_rel grid, targets)")
    _add_parser(subparsers, "posthoc", _cmd_old_name)  # the old name: hidden (no help), warns


def _add_parser(subparsers, name: str, func, **help_kwargs) -> None:
    p = subparsers.add_parser(name, **help_kwargs,
                              description="Synthesise every σ_rel of a grid (and other targets) from a run's stored EMA "
                                          "snapshots at each step and score it with the run's evaluator on the same "
                                          "noise as its online variants.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) with ema_snapshots/ and config.yaml")
    p.add_argument("--sigma-rel", default=DEFAULT_SIGMA_RELS,
                   help="lo:hi:n (n values, geometric spacing) or a comma list (default %(default)s)")
    p.add_argument("--large-grid", action="store_true",
                   help=f"allow more than {MAX_GRID_POINTS} σ_rel values (each one FID evaluation at every step)")
    p.add_argument("--target", action="append", default=[], help=f"another average to score (repeatable): {synthesis.TARGET_HELP}")
    p.add_argument("--twin", action="append", default=[],
                   help="an online EMA track (repeatable): at steps with a checkpoint, score its checkpointed weights "
                        "and its synthesis, with the residual and weight-space error between them")
    p.add_argument("--steps", default="eval", help="training steps to score: eval (metrics.jsonl's steps with snapshots), final, "
                                                 "or a comma list")
    p.add_argument("--tracks", default=None, help="comma-separated tracks whose snapshots may be used (default: all)")
    p.add_argument("--max-residual", type=float, default=synthesis.DEFAULT_MAX_RESIDUAL,
                   help="targets with a larger relative profile residual are listed as refused, not scored "
                        "(default %(default)s)")
    add_evaluator_options(p, "average")
    p.add_argument("-o", "--out", default=None, help="output folder (default RUN/posthoc; with several runs DIR/<run name>)")
    p.add_argument("--save-best", default=None, metavar="DIR",
                   help="write the weights of each step's best average to DIR/step-<step> (a diffusers model folder "
                        "with synthesis.json; with several runs DIR/<run name>/step-<step>)")
    p.add_argument("--overwrite", action="store_true", help="replace existing hindsight files")
    p.add_argument("--append", action="store_true",
                   help="add to existing hindsight files (a step and target scored again replaces its row)")
    p.set_defaults(func=func)
