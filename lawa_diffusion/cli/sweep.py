"""``lawa-diffusion sweep``: FID of every (k, ν multiple) LAWA window from a run's saved EMA snapshots.
"""
from __future__ import annotations

from lawa_diffusion.cli.renamed import add_old_spelling
from lawa_diffusion.cli.run_evaluator_options import add_evaluator_options, evaluator_options
from lawa_diffusion.config.commands import PosthocConfig
from lawa_diffusion.posthoc.sweep import format_sweep, run_sweep
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.files import check_output_dir


def _cmd_sweep(args) -> int:
    out = runfolder.sweep_dir(args.run_dir, args.track) if args.out is None else args.out
    check_output_dir(out, "-o", args.overwrite, kind="sweep", protected=[args.run_dir])  # before any work
    options = evaluator_options(args)
    summary = run_sweep(args.run_dir, args.k, args.every, steps=args.steps, out_dir=args.out, overwrite=args.overwrite,
                        metric=args.metric, heatmap_step=args.heatmap_step, device=args.device, track=args.track,
                        **options)
    print(format_sweep(summary))
    print(f"sweep: {summary['files']['json']}  heat-map: {summary['files']['png']}")
    return 0


def register_cli(subparsers) -> None:
    d = PosthocConfig()
    s = subparsers.add_parser("sweep", help="FID of every (k, ν multiple) LAWA window from a run's EMA snapshots",
                              description="The k × ν ablation from RUN/ema_snapshots, with a heat-map.")
    s.add_argument("run_dir", metavar="RUN_DIR")
    s.add_argument("--k", default=",".join(map(str, d.sweep_k)), help="window sizes, comma-separated")
    s.add_argument("--nu-multiples", dest="every", default=",".join(map(str, d.sweep_every)),
                   help="snapshot spacings as multiples of the run's ν, comma-separated")
    add_old_spelling(s, "--every", "--nu-multiples", "every")
    s.add_argument("--steps", default=d.sweep_steps,
                   help="training steps to score: eval (metrics.jsonl's steps), final, or a comma list")
    s.add_argument("--track", default=runfolder.BASE_TRACK,
                   help="EMA track whose snapshots to average (default: ema, diffusers' warm-up EMA; others: the "
                        "run's ema_tracks)")
    s.add_argument("--heatmap-step", type=int, default=None, help="step shown in the heat-map (default: the last)")
    s.add_argument("--metric", default="fid", help="fid or kid_mean, for the heat-map")
    add_evaluator_options(s, "variant")
    s.add_argument("-o", "--out", default=None, help="output folder (default RUN_DIR/sweep)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder's sweep files")
    s.set_defaults(func=_cmd_sweep)
