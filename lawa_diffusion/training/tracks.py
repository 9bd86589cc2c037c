"""The averaging tracks of a training run: EMA tracks, LAWA windows over them or over the trained weights,
each window's pure-delay baseline, and the mean lag of every variant.

"ema" is diffusers' warm-up EMA (a ``LAWAEMAModel`` whose window is "lawa"); ``ema_tracks`` add
constant-decay diffusers ``EMAModel``s and power-function ``PowerEMAModel``s (EDM2); ``lawa_windows`` add ``LAWA`` engines over any track or over the
raw weights. ``<window>@delayed`` is one of the window's own snapshots, the one nearest step − ΔL (ΔL: the lag
the window adds to its track): its track as it was about ΔL steps earlier. LAWA that only delays its track
scores as that baseline. When the window holds an even number of snapshots, step − ΔL falls halfway between
its two middle ones: no snapshot is exactly ΔL back, and the earlier of the two is taken (ΔL + ν/2 back; the
later one would be ΔL − ν/2 back, and with two snapshots the current track itself). Each delayed row says how
far back it is (``delay_steps``) beside the window's ΔL (``window_delta_lag``).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterable, Iterator, Optional, Sequence, Tuple

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.config.tracks import BASE_TRACK, BASE_WINDOW, DELAYED_SUFFIX, RAW_TRACK
from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.engine.lawa import LAWA, swapped_weights
from lawa_diffusion.engine.sources import copy_whole, is_sharded
from lawa_diffusion.maths import lag
from lawa_diffusion.maths.track_lags import delayed_snapshot, lag_track, lag_tracks_of, variant_lag, window_delta_lag
from lawa_diffusion.runs.folder import ema_folder, lawa_folder


# ----------------------------------------------------------------------------- the tracks
@contextlib.contextmanager
def ema_swapped(ema, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` holding the EMA weights for the duration of the block; its own weights come back after. A sharded
    EMA (FSDP2) is gathered into an unsharded ``module`` on every process (a collective)."""
    params = list(module.parameters())
    if any(is_sharded(s) for s in ema.shadow_params) and not any(is_sharded(p) for p in params):
        with swapped_weights(params, lambda targets: copy_whole(ema.shadow_params, targets)):
            yield module
        return
    with swapped_weights(params, ema.copy_to):
        yield module


class TrackSet:
    """Every EMA track and LAWA window of a run, stepped together after each optimizer step.

    emas: name -> EMAModel ("ema" is the ``LAWAEMAModel`` ``base``); windows: name -> LAWA ("lawa" is
    ``base.lawa``); over: window name -> the track it averages, or "raw"; lag_tracks: name (and "raw") ->
    ``lag.EMATrack`` for the mean lags; window_configs: window name -> its ``LAWAConfig``.
    """

    def __init__(self, base: Any, emas: Dict[str, Any], windows: Dict[str, LAWA], over: Dict[str, str],
                 lag_tracks: Dict[str, lag.EMATrack], window_configs: Dict[str, Any]):
        self.base, self.emas, self.windows, self.over = base, emas, windows, over
        self.lag_tracks, self.window_configs = lag_tracks, window_configs

    @classmethod
    def from_config(cls, cfg: TrainConfig, unet: torch.nn.Module, device) -> "TrackSet":
        """The tracks and windows of a training config over ``unet`` (the unwrapped model being trained)."""
        from diffusers import UNet2DModel
        from diffusers.training_utils import EMAModel

        from lawa_diffusion.engine.ema import LAWAEMAModel, PowerEMAModel

        e = cfg.ema
        base = LAWAEMAModel(unet.parameters(), decay=e.decay, use_ema_warmup=e.use_ema_warmup, inv_gamma=e.inv_gamma,
                            power=e.power, update_after_step=e.update_after_step, foreach=True,
                            model_cls=UNet2DModel, model_config=unet.config, lawa=cfg.lawa)
        emas: Dict[str, Any] = {BASE_TRACK: base}
        for t in cfg.ema_tracks:
            if t.is_power:
                emas[t.name] = PowerEMAModel(unet.parameters(), gamma=lag_track(t).gamma, update_after_step=0,
                                             foreach=True, model_cls=UNet2DModel, model_config=unet.config)
                continue
            d = t.constant_decay
            emas[t.name] = EMAModel(unet.parameters(), decay=d, min_decay=d, use_ema_warmup=False, update_after_step=0,
                                    foreach=True, model_cls=UNet2DModel, model_config=unet.config)
        for ema in emas.values():
            ema.to(device)
        windows: Dict[str, LAWA] = {BASE_WINDOW: base.lawa}
        for w in cfg.lawa_windows:
            windows[w.name] = LAWA(unet if w.over == RAW_TRACK else emas[w.over], w.lawa_config(), name=w.name)
            windows[w.name].defer_source_wait = w.over != RAW_TRACK  # waited for in step(), before the EMA update
        over = {BASE_WINDOW: BASE_TRACK, **{w.name: w.over for w in cfg.lawa_windows}}
        lag_tracks = lag_tracks_of(cfg)
        window_configs = {BASE_WINDOW: cfg.lawa, **{w.name: w.lawa_config() for w in cfg.lawa_windows}}
        return cls(base, emas, windows, over, lag_tracks, window_configs)

    @classmethod
    def of_ema(cls, ema: Any) -> "TrackSet":
        """The track set of one diffusers EMAModel carrying a LAWA window as ``ema.lawa`` (the launch plugin's):
        the track "ema" and the window "lawa" over it."""
        return cls(ema, {BASE_TRACK: ema}, {BASE_WINDOW: ema.lawa}, {BASE_WINDOW: BASE_TRACK},
                   {BASE_TRACK: lag.EMATrack.from_settings(ema), RAW_TRACK: lag.raw_weights()},
                   {BASE_WINDOW: ema.lawa.config})

    # ------------------------------------------------------------------ training
    def _extra_windows(self) -> Iterable[Tuple[str, LAWA]]:
        return ((n, w) for n, w in self.windows.items() if n != BASE_WINDOW)

    @torch.no_grad()
    def step(self, parameters: Iterable[torch.nn.Parameter], step: int) -> None:
        """Update every EMA track with the trained ``parameters``, then snapshot the windows that are due."""
        params = list(parameters)
        for name, window in self._extra_windows():
            if self.over[name] != RAW_TRACK:
                window.before_source_update()
        self.base.step(params)  # also feeds "lawa"
        for ema in self.emas.values():
            if ema is not self.base:
                ema.step(params)
        for _, window in self._extra_windows():
            window.step(step)

    def close(self) -> None:
        for window in self.windows.values():
            window.close()

    # --------------------------------------------------------------- checkpoints
    def register(self, accelerator) -> None:
        """save_state also writes unet_ema[_<track>]/ and (once ready) unet_lawa[_<window>]/; load_state
        restores every track; each window's engine state travels under its name."""
        def save_hook(models, weights, output_dir):  # runs on every process (save_checkpoint)
            main = accelerator.is_main_process
            if main:
                for name, ema in self.emas.items():
                    ema.save_pretrained(os.path.join(output_dir, ema_folder(name)))
            for name, window in self.windows.items():  # a sharded window's save gathers: every process takes part
                if window.ready and (main or window.source.sharded()):
                    window.save_pretrained(os.path.join(output_dir, lawa_folder(name)))

        def load_hook(models, input_dir):
            for name, ema in self.emas.items():
                load_track(ema, os.path.join(input_dir, ema_folder(name)), name)
                ema.to(accelerator.device)

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)
        for window in self.windows.values():
            window.attach(accelerator)

    # ------------------------------------------------------------------ lag
    def track_lag(self, track: str, step: int, snapshot_steps: Optional[Sequence[int]] = None) -> float:
        """Mean lag at ``step`` of ``track`` (or "raw"), or of a window over it holding ``snapshot_steps``."""
        return variant_lag(self.lag_tracks[track], step, snapshot_steps)

    def lag_lines(self, step: int) -> list:
        """``lag``'s one-line plan of every window but "lawa" (which ``plan.record`` describes) at ``step``."""
        return [f"{name}: {lag.summary_line(self.lag_tracks[self.over[name]], self.window_configs[name], step)}"
                for name, _ in self._extra_windows() if step >= lag.first_snapshot(self.window_configs[name])]

    def delayed_step(self, window: str, step: int) -> int:
        """The window's snapshot step nearest step − ΔL, ΔL = the window's mean lag − its track's."""
        return delayed_snapshot(self.lag_tracks[self.over[window]], self.windows[window].snapshot_steps, step)

    # --------------------------------------------------------------- variants
    def variants(self, names: Sequence[str], unet: torch.nn.Module, step: int) -> Tuple[dict, dict]:
        """({name: module or context-manager factory} for ``sampling.sample_variants``, {name: row columns}).

        A window and its delayed baseline are left out until the window is ready.
        """
        specs: Dict[str, Any] = {}
        info: Dict[str, dict] = {}
        for window in self.windows.values():
            window.resolve_checks()  # settle the windows (a NaN/Inf snapshot leaves) before choosing from them
        for name in names:
            if name == RAW_TRACK:
                specs[name], info[name] = unet, {"kind": "raw", "mean_lag": 0.0}
            elif name in self.emas:
                specs[name] = (lambda ema: lambda: ema_swapped(ema, unet))(self.emas[name])
                info[name] = {"kind": "ema", "mean_lag": self.track_lag(name, step)}
            elif name in self.windows:
                window = self.windows[name]
                if window.ready:
                    specs[name] = (lambda w: lambda: w.swapped_into(unet, sync_ranks=True))(window)
                    info[name] = {**self._window_info(name), "kind": "lawa",
                                  "mean_lag": self.track_lag(self.over[name], step, window.snapshot_steps)}
            else:
                self._delayed_variant(name[: -len(DELAYED_SUFFIX)], name, unet, step, specs, info)
        return specs, info

    def _delayed_variant(self, window_name: str, name: str, unet, step: int, specs: dict, info: dict) -> None:
        check(window_name in self.windows, f"variant {name!r} names no LAWA window of this run")
        window = self.windows[window_name]
        if not window.ready:
            return
        at = self.delayed_step(window_name, step)
        specs[name] = lambda: window.swapped_snapshot_into(unet, at, sync_ranks=True)
        track = self.lag_tracks[self.over[window_name]]
        info[name] = {**self._window_info(window_name), "kind": "delayed", "snapshot_step": at,
                      "mean_lag": variant_lag(track, step, [at]), "delay_steps": step - at,
                      "window_delta_lag": window_delta_lag(track, window.snapshot_steps, step)}

    def _window_info(self, name: str) -> dict:
        window = self.windows[name]
        return {"over": self.over[name], "lawa_k": window.config.k,
                "lawa_every_n_steps": window.config.every_n_steps, "lawa_num_snapshots": window.num_snapshots}


def load_track(ema, folder: str, name: str) -> None:
    """Load the EMA ``folder`` (diffusers ``save_pretrained``) into ``ema``; one sentence when it is missing."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    check(os.path.isdir(folder), f"checkpoint folder {folder!r} of EMA track {name!r} is missing; resume with the "
                                 "run's ema_tracks, or start a new --output-dir")
    loaded = EMAModel.from_pretrained(folder, UNet2DModel, foreach=True)
    ema.load_state_dict(loaded.state_dict())
