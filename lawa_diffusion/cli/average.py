"""``lawa-diffusion average``: LAWA of a run's saved EMA checkpoints (or model folders) as a diffusers model folder.
"""
from __future__ import annotations

import os

from lawa_diffusion.config.commands import PosthocConfig
from lawa_diffusion.posthoc.average import write_average
from lawa_diffusion.runs.folder import (
    BASE_TRACK,
)
from lawa_diffusion.utils.files import check_output_dir


def _cmd_average(args) -> int:
    check_output_dir(args.out, "-o", args.overwrite, kind="average", protected=args.dirs)  # before any work
    meta = write_average(args.dirs, args.out, args.k, args.every, args.subfolder, args.overwrite, args.track)
    steps = ", ".join("?" if s is None else str(s) for s in meta["snapshot_steps"])
    print(f"averaged {len(meta['sources'])} checkpoint(s) (steps {steps}) into {os.path.abspath(args.out)}")
    return 0


# ----------------------------------------------------------------------------- CLI
def register_cli(subparsers) -> None:
    d = PosthocConfig()
    p = subparsers.add_parser("average", help="LAWA of saved EMA checkpoints as a diffusers model folder",
                              description="Average the latest k EMA checkpoints (fp32 accumulation) into a model folder.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="run folder, checkpoint-<step> folders, model folders, "
                                                          "or a folder of EMA snapshots")
    p.add_argument("--k", type=int, default=d.k, help=f"how many of the latest checkpoints to average (default {d.k})")
    p.add_argument("--every", type=int, default=d.every, help="take every N-th checkpoint, counted back from the newest")
    p.add_argument("--track", default=BASE_TRACK, help="EMA track to average (default: ema, diffusers' warm-up EMA; "
                                                       "others: the run's ema_tracks)")
    p.add_argument("--subfolder", default=None, help=f"model folder inside checkpoint-<step>/ (default {d.subfolder}, "
                                                     "or unet_ema_<track> with --track)")
    p.add_argument("-o", "--out", required=True, help="output diffusers model folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=_cmd_average)
