"""``lawa-diffusion train``: the trainer (a diffusers UNet with EMA and LAWA over it, tracking FID).
"""
from __future__ import annotations

import os

from lawa_diffusion.config.train import load_train_config
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.training.trainer import train


# ----------------------------------------------------------------------------- CLI
def _cli(args) -> int:
    cfg = load_train_config(args.config, args.overrides, args.output_dir)
    run_dir = os.path.abspath(cfg.output_dir)
    # an error of the operating system (a full disk) names the run folder's option and the checkpoint to resume from
    args.os_error_paths = {"--output-dir" if args.output_dir else f"output_dir of {args.config}": run_dir}
    args.os_error_note = lambda: (runfolder.last_good_checkpoint_note(run_dir)
                                  if os.path.isfile(runfolder.config_path(run_dir)) else None)
    train(cfg, resume=args.resume, overwrite=args.overwrite)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a diffusers UNet with EMA and LAWA over it, tracking FID",
                              description="Train a diffusers UNet2DModel (DDPM) with EMA and LAWA over the EMA, "
                                          "evaluating FID/KID of the variants on the same noise as it goes.")
    p.add_argument("--config", required=True, help="YAML file of TrainConfig options (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option, e.g. --set optim.learning_rate=2e-3 (repeatable)")
    p.add_argument("--output-dir", default=None, help="run folder (default: output_dir of the config)")
    p.add_argument("--resume", default=None, metavar="latest|PATH",
                   help="continue from the newest checkpoint of the run folder, or from a checkpoint-<step> folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder (only one written by lawa-diffusion train)")
    p.set_defaults(func=_cli)
