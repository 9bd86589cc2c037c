"""Mean lags of the variants of a run, from its config: ``lag``'s track of each configured EMA track,
the LAWA window of a name, ΔL of a window and its pure-delay baseline (the snapshot nearest step − ΔL).
Pure functions of the config and the discrete per-step weights: no state, no files.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from lawa_diffusion.config.base import check
from lawa_diffusion.config.tracks import BASE_TRACK, BASE_WINDOW, RAW_TRACK
from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.maths import lag


# ----------------------------------------------------------------------------- lag
def variant_lag(track: lag.EMATrack, step: int, snapshot_steps: Optional[Sequence[int]] = None,
                d: Optional[np.ndarray] = None) -> float:
    """Mean lag in steps at ``step`` of ``track``, or of the uniform mean of its weights at ``snapshot_steps``
    (a LAWA window over it); exact over the discrete per-step weights (``lag``)."""
    d = lag.decays(track, step) if d is None else d
    if snapshot_steps is None:
        return lag.mean_lag(lag.profile(track, step, d))
    check(len(snapshot_steps) > 0, "mean lag of a window needs at least one snapshot step")
    return lag.mean_lag(lag.snapshots_profile(track, snapshot_steps, step, d))


def lag_track(track: Any) -> lag.EMATrack:
    """``lag``'s track of one ``ema_tracks`` entry (``EMATrackConfig``): constant decay or power-function EMA."""
    if track.is_power:
        return lag.power_ema(gamma=track.gamma, sigma_rel=track.sigma_rel)
    return lag.constant_ema(track.constant_decay)


def lag_tracks_of(cfg: TrainConfig) -> Dict[str, lag.EMATrack]:
    """``lag``'s track of each EMA track of a training config, and of "raw"."""
    return {BASE_TRACK: lag.EMATrack.from_settings(cfg.ema), RAW_TRACK: lag.raw_weights(),
            **{t.name: lag_track(t) for t in cfg.ema_tracks}}


def configured_window(cfg: TrainConfig, name: str = BASE_WINDOW) -> Tuple[lag.EMATrack, Any]:
    """(``lag`` track it averages, its ``LAWAConfig``) of the LAWA window ``name`` of a training config."""
    windows = {BASE_WINDOW: cfg.lawa, **{w.name: w for w in cfg.lawa_windows}}
    check(name in windows, f"--window {name!r} is not a LAWA window of the config; use one of {', '.join(windows)}")
    over = BASE_TRACK if name == BASE_WINDOW else windows[name].over
    return lag_tracks_of(cfg)[over], windows[name]


def nearest_snapshot(snapshot_steps: Sequence[int], target: float) -> int:
    """The snapshot step nearest ``target``; a tie (within 1e-6 steps: the sums behind ``target`` round) goes to
    the earlier one, so that a delayed baseline is never the current track."""
    return min(snapshot_steps, key=lambda s: (round(abs(s - target), 6), s))


def window_delta_lag(track: lag.EMATrack, snapshot_steps: Sequence[int], step: int) -> float:
    """ΔL: the mean lag at ``step`` of a window over ``track`` holding ``snapshot_steps``, minus the track's own."""
    d = lag.decays(track, step)
    return variant_lag(track, step, snapshot_steps, d) - variant_lag(track, step, d=d)


def delayed_snapshot(track: lag.EMATrack, snapshot_steps: Sequence[int], step: int) -> int:
    """The pure-delay baseline of a window: its snapshot step nearest ``step`` − ΔL."""
    return nearest_snapshot(snapshot_steps, step - window_delta_lag(track, snapshot_steps, step))
