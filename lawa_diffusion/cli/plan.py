"""``lawa-diffusion plan``: the lag LAWA over an EMA adds, and the matched-lag EMA, before a run.
"""
from __future__ import annotations

import dataclasses
import json
from typing import List, Tuple

from lawa_diffusion.config.base import check
from lawa_diffusion.config.lawa import LAWAConfig
from lawa_diffusion.config.train import TrainConfig, load_train_config
from lawa_diffusion.maths import lag
from lawa_diffusion.reports.lag_plan import (
    advice,
    delay_warning,
    eval_steps,
    format_table,
    header,
    parse_steps,
    rows_for,
    rule_note,
)
from lawa_diffusion.utils.output import warn

# ----------------------------------------------------------------------------- CLI
WARMUP_FLAGS = ("power", "inv_gamma", "max_decay", "min_decay", "update_after_step")


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _track_from_args(args, base: lag.EMATrack) -> lag.EMATrack:
    constant = args.decay is not None or args.half_life is not None or args.raw
    power = args.sigma_rel is not None or args.gamma is not None
    stray = [_flag(n) for n in WARMUP_FLAGS if getattr(args, n) is not None]
    check(not (constant and stray), f"plan {stray[0] if stray else ''} applies to diffusers' EMA, not to a constant "
                                    "decay, half-life or raw weights; drop it or use --warmup")
    if args.decay is not None:
        return lag.constant_ema(args.decay)
    if args.half_life is not None:
        return lag.half_life_ema(args.half_life)
    if args.raw:
        return lag.raw_weights()
    if power:
        odd = [f for f in stray if f != "--update-after-step"]
        check(not odd, f"plan {odd[0] if odd else ''} applies to diffusers' EMA, not to a power-function EMA "
                       "(--sigma-rel, --gamma); drop it")
        track = lag.power_ema(gamma=args.gamma, sigma_rel=args.sigma_rel)
        return dataclasses.replace(track, update_after_step=args.update_after_step or 0)
    if args.no_warmup:
        odd = [_flag(n) for n in ("power", "inv_gamma") if getattr(args, n) is not None]
        check(not odd, f"plan {odd[0] if odd else ''} shapes the warm-up rule, which --no-warmup turns off; "
                       "drop one of them")
    changes = {name: getattr(args, name) for name in ("power", "inv_gamma", "update_after_step", "min_decay")
               if getattr(args, name) is not None}
    if args.max_decay is not None:
        changes["decay"] = args.max_decay
    if args.warmup or args.no_warmup:
        changes["use_ema_warmup"] = bool(args.warmup)
    if base.gamma is not None and (changes or args.warmup or args.no_warmup):
        changes["gamma"] = None  # diffusers' flags on a power-function track make it a diffusers EMA
    return dataclasses.replace(base, **changes)


def resolve(args) -> Tuple[lag.EMATrack, LAWAConfig, List[int]]:
    """The track, the LAWA window and the steps that ``plan``'s arguments ask for."""
    if args.config is not None:
        cfg = load_train_config(args.config, args.overrides)
    else:
        check(not args.overrides, "plan --set needs --config; pass the training config it changes")
        cfg = TrainConfig()
    from lawa_diffusion.maths.track_lags import configured_window as window_of

    base, lawa = window_of(cfg, args.window)
    track = _track_from_args(args, base)
    changes = {name: value for name, value in (("k", args.k), ("every_n_steps", args.nu), ("start_step", args.start))
               if value is not None}
    window = LAWAConfig(**{"k": lawa.k, "every_n_steps": lawa.every_n_steps, "start_step": lawa.start_step, **changes})
    if args.steps is not None:
        steps = parse_steps(args.steps)
    else:
        steps = [s for s in eval_steps(cfg) if s >= lag.first_snapshot(window)] or [cfg.max_train_steps]
    return track, window, steps


def _cli(args) -> int:
    track, window, steps = resolve(args)
    rows = rows_for(track, window, steps)
    if args.json:
        for row in rows:
            print(json.dumps(row), flush=True)
    else:
        print(header(track, window))
        note = rule_note(track, args)
        if note:
            print(note)
        print(format_table(rows))
        print(advice(track, window, rows[-1]), flush=True)
    warning = delay_warning(rows)
    if warning:
        warn(warning)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("plan", help="the lag LAWA over an EMA adds, and the matched-lag EMA, before a run",
                              description="Exact mean lag, spread, window, extra lag ΔL, white-noise variance ratio "
                                          "and snapshot correlation of LAWA over an EMA at the steps asked for.")
    p.add_argument("--config", default=None, help="training config YAML: its ema and lawa sections (default: the defaults)")
    p.add_argument("--window", default="lawa", help="the config's LAWA window to plan: lawa (over ema, the default) or "
                                                   "a name from its lawa_windows (over the track it names)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option of --config, e.g. --set lawa.every_n_steps=200 (repeatable)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--decay", type=float, default=None, help="a constant-decay EMA of this decay (0 <= d < 1)")
    ema.add_argument("--half-life", type=float, default=None, help="a constant-decay EMA of this half-life in steps")
    ema.add_argument("--raw", action="store_true", help="LAWA over the raw weights")
    ema.add_argument("--sigma-rel", type=float, default=None,
                     help="a power-function EMA (EDM2) of this relative spread (0 < σ_rel < 0.2887)")
    ema.add_argument("--gamma", type=float, default=None, help="a power-function EMA of this exponent γ > 0")
    ema.add_argument("--warmup", action="store_true", help="diffusers' warm-up EMA (use_ema_warmup true)")
    ema.add_argument("--no-warmup", action="store_true",
                     help="diffusers' EMA without warm-up: decay (1+s)/(10+s) (use_ema_warmup false)")
    p.add_argument("--power", type=float, default=None, help="warm-up power (diffusers EMAModel power)")
    p.add_argument("--inv-gamma", type=float, default=None, help="warm-up inv_gamma")
    p.add_argument("--max-decay", type=float, default=None,
                   help="the cap on diffusers' decay (EMAModel decay); the rule (warm-up or not) comes from the "
                        "config unless --warmup or --no-warmup says")
    p.add_argument("--min-decay", type=float, default=None, help="the floor on diffusers' decay (EMAModel min_decay)")
    p.add_argument("--update-after-step", type=int, default=None, help="EMAModel update_after_step")
    p.add_argument("--k", type=int, default=None, help="snapshots in the LAWA window")
    p.add_argument("--nu", type=int, default=None, help="ν: steps between snapshots (lawa every_n_steps)")
    p.add_argument("--start", type=int, default=None, help="lawa start_step")
    p.add_argument("--steps", default=None, help="steps of interest, comma-separated (default: the config's eval steps)")
    p.add_argument("--json", action="store_true", help="one JSON object per step instead of the table")
    p.set_defaults(func=_cli)
