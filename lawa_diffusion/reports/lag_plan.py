"""``lawa-diffusion plan``: what LAWA over an EMA will do to the lag, before a run (see ``lag``).

From a training config (its ``ema`` and ``lawa`` sections) or from flags, prints at each step of
interest the EMA's and LAWA's mean lag, spread, σ_rel (spread ÷ step, EDM2's scale) and window, LAWA's
extra lag ΔL, the white-noise variance ratio, the correlation of consecutive snapshots and the
matched-lag constant-decay EMA.
"""
from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence

from lawa_diffusion.config.base import check
from lawa_diffusion.config.lawa import LAWAConfig
from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.maths import lag
from lawa_diffusion.utils.output import say

LAG_NAME = "lag.json"
COLUMNS = (  # (header, row key, format)
    ("step", "step", "{:d}"), ("EMA lag", "ema_lag", "{:.1f}"), ("spread", "ema_spread", "{:.1f}"),
    ("σ_rel", "ema_sigma_rel", "{:.3f}"), ("window", "ema_window", "{:.1f}"), ("LAWA lag", "lawa_lag", "{:.1f}"),
    ("spread", "lawa_spread", "{:.1f}"), ("σ_rel", "lawa_sigma_rel", "{:.3f}"),
    ("window", "lawa_window", "{:.1f}"), ("ΔL", "extra_lag", "{:.1f}"), ("V ratio", "variance_ratio", "{:.3f}"),
    ("corr", "snapshot_correlation", "{:.3f}"), ("matched decay", "matched_decay", "{:.5f}"),
)


def eval_steps(cfg: TrainConfig) -> List[int]:
    """The steps a training config evaluates at (every ``eval.every_n_steps`` and the last step)."""
    every, last = cfg.eval.every_n_steps, cfg.max_train_steps
    steps = list(range(every, last + 1, every)) if every > 0 else []
    return steps if steps and steps[-1] == last else steps + [last]


def parse_steps(text: str) -> List[int]:
    """``"250,500,1000"`` as a sorted list of distinct integers."""
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise ValueError(f"plan --steps must be comma-separated integers such as 250,500,1000, got {text!r}") from None
    check(bool(steps), f"plan --steps must name at least one step, got {text!r}")
    return steps


def check_steps(window: LAWAConfig, steps: Sequence[int]) -> None:
    first = lag.first_snapshot(window)
    early = [s for s in steps if s < first]
    if early:
        raise ValueError(f"plan step {early[0]} comes before LAWA's first snapshot at step {first} "
                     f"(start step {window.start_step}, ν {window.every_n_steps}); ask for steps >= {first}")


def rows_for(track: lag.EMATrack, window: LAWAConfig, steps: Sequence[int]) -> List[dict]:
    """The plan table: one row per step, with the window and track described in each."""
    check_steps(window, steps)
    described = {"track": track.describe(), "k": window.k, "start_step": window.start_step,
                 "decay_rule": decay_rule(track), "track_def": track.to_dict()}
    return [{**row, **described} for row in lag.plan_rows(track, window, steps)]


def format_table(rows: Sequence[dict]) -> str:
    cells = [[h for h, _, _ in COLUMNS]]
    for row in rows:
        cells.append(["-" if row[key] is None else fmt.format(row[key]) for _, key, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def decay_rule(track: lag.EMATrack) -> str:
    """Which decay rule a track follows: "raw", "constant", "power", "warmup" or "no-warmup" (diffusers'
    ``(1+s)/(10+s)``)."""
    d = track.constant_decay
    if d == 0.0:
        return "raw"
    if track.gamma is not None:
        return "power"
    if d is not None:
        return "constant"
    return "warmup" if track.use_ema_warmup else "no-warmup"


def header(track: lag.EMATrack, window: LAWAConfig) -> str:
    return (f"LAWA k={window.k}, ν={window.every_n_steps} (snapshots from step {lag.first_snapshot(window)}) "
            f"over {track.describe()}; lags, spreads and windows in steps, σ_rel = spread ÷ step (EDM2's scale), "
            f"V ratio = white-noise Var(LAWA)/Var(EMA), corr = correlation of consecutive snapshots")


def rule_note(track: lag.EMATrack, args) -> Optional[str]:
    """Say which diffusers decay rule is planned when no flag chose it (it comes from the config)."""
    rule = decay_rule(track)
    if rule not in ("warmup", "no-warmup") or args.warmup or args.no_warmup:
        return None
    source = f"--config {args.config}" if args.config else "the default training config"
    if rule == "warmup":
        return (f"decay rule: warm-up 1-(1+s/{track.inv_gamma:g})^-{track.power:g} capped at {track.decay:g}, from "
                f"{source} (ema.use_ema_warmup); --no-warmup plans diffusers' (1+s)/(10+s) rule instead")
    return (f"decay rule: diffusers' (1+s)/(10+s) capped at {track.decay:g}, from {source} "
            "(ema.use_ema_warmup false); --warmup plans the warm-up rule instead")


def delay_warning(rows: Sequence[dict]) -> Optional[str]:
    """One warning for the steps where ν is below the EMA's window (the last such step in full)."""
    flagged = [r for r in rows if r["nu_below_window"]]
    if not flagged:
        return None
    text = lag.delay_warning(flagged[-1])
    if len(flagged) > 1:
        lags = ", ".join(f"{r['extra_lag']:.0f}" for r in flagged)
        text += f" (ΔL {lags} at steps {', '.join(str(r['step']) for r in flagged)})"
    return text


def advice(track: lag.EMATrack, window: LAWAConfig, row: dict) -> str:
    """The matched-lag baseline and the decorrelating ν at ``row``'s step, with what that ν would cost."""
    text = lag.matched_line(row)
    nu = row["decorrelating_nu"]
    alt_window = dataclasses.replace(window, every_n_steps=nu)
    if row["nu_below_window"] and lag.first_snapshot(alt_window) <= row["step"]:
        alt = lag.plan_row(track, alt_window, row["step"])
        text += (f" (with ν = {nu}: ΔL {alt['extra_lag']:.0f}, V ratio {alt['variance_ratio']:.2f}, "
                 f"matched-lag decay {alt['matched_decay']:.5f})")
    return text


def write_lag(run_dir: str, track: lag.EMATrack, window: LAWAConfig, last_step: int,
              steps: Sequence[int] = (), who: str = "lawa-diffusion") -> str:
    """Say the one-line lag summary at ``last_step`` and write it, with the plan table at ``steps``
    (those before LAWA's first snapshot left out), to RUN/lag.json. Main process only."""
    from lawa_diffusion.utils.files import atomic_write_json

    line = lag.summary_line(track, window, last_step)
    steps = [s for s in steps if s >= lag.first_snapshot(window)]
    atomic_write_json(os.path.join(run_dir, LAG_NAME),
                      {"summary": line, "rows": rows_for(track, window, steps) if steps else []})
    say(line, who)
    return line


def record(run_dir: str, cfg: TrainConfig) -> str:
    """``write_lag`` for a training config: its EMA and LAWA window, at its evaluation steps."""
    return write_lag(run_dir, lag.EMATrack.from_settings(cfg.ema), cfg.lawa, cfg.max_train_steps,
                     eval_steps(cfg), who="train")
