"""Config of the averaging tracks of a run: diffusers' EMA settings, extra EMA tracks (constant decay or
power-function, by σ_rel or γ), LAWA windows over any track, and post-hoc snapshot storage (``posthoc:``).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

from lawa_diffusion.config.base import as_number, check, check_int
from lawa_diffusion.config.lawa import LAWAConfig


@dataclasses.dataclass
class EMASettings:
    """diffusers ``EMAModel`` options of the run's EMA (the track "ema"), with diffusers' names and meanings.

    decay: the largest decay (the warm-up decay is capped at it).
    use_ema_warmup: decay 1 - (1 + step/inv_gamma)^-power, capped at ``decay`` (false: diffusers' (1+s)/(10+s) rule).
    inv_gamma / power: the warm-up's scale and exponent.
    update_after_step: steps before the EMA starts averaging (it copies the weights until then).
    """

    decay: float = 0.9999
    use_ema_warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 0.75
    update_after_step: int = 0

    def __post_init__(self) -> None:
        self.decay = as_number("ema", "decay", self.decay)
        check(self.decay <= 1.0, f"ema decay must be between 0 and 1, got {self.decay!r}")
        check(isinstance(self.use_ema_warmup, bool), f"ema use_ema_warmup must be true or false, got {self.use_ema_warmup!r}")
        self.inv_gamma = as_number("ema", "inv_gamma", self.inv_gamma)
        self.power = as_number("ema", "power", self.power)
        check_int("ema", "update_after_step", self.update_after_step, 0)


TRACK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RAW_TRACK, BASE_TRACK, BASE_WINDOW, DELAYED_SUFFIX = "raw", "ema", "lawa", "@delayed"


def _check_name(where: str, name: Any) -> None:
    check(isinstance(name, str) and TRACK_NAME_RE.match(name) is not None and name != RAW_TRACK,
          f"{where} name must be letters, digits, '_', '.' or '-' (not 'raw'), got {name!r}; "
          "it names the variant, its checkpoint folder and its metrics rows")


SIGMA_REL_MAX = (1.0 / 12.0) ** 0.5  # σ_rel of a power-function EMA at γ = 0 (the uniform mean): 0.2887


@dataclasses.dataclass
class EMATrackConfig:
    """An EMA track kept beside diffusers' warm-up EMA (``ema_tracks:`` entry).

    name: the track's name (variant, ``unet_ema_<name>/`` in checkpoints, ``over:`` of LAWA windows).
    Exactly one of
    decay: constant decay d in [0, 1) (mean lag d / (1 - d) steps);
    half_life: steps after which an update's weight has halved (decay 0.5 ** (1 / half_life));
    sigma_rel: a power-function EMA (EDM2) of this relative spread, 0 < sigma_rel < 0.2887 (0.05 to 0.15
        are usual; gamma from sigma_rel by EDM2's closed form);
    gamma: a power-function EMA of this exponent (> 0): decay (1 - 1/t)^(gamma + 1) at its t-th update.
    The first update copies the weights (diffusers' EMAModel); a constant-decay track then keeps its decay.
    """

    name: str
    decay: Optional[float] = None
    half_life: Optional[float] = None
    sigma_rel: Optional[float] = None
    gamma: Optional[float] = None

    def __post_init__(self) -> None:
        _check_name("ema_tracks", self.name)
        where = f"ema_tracks {self.name!r}"
        given = {k: getattr(self, k) for k in ("decay", "half_life", "sigma_rel", "gamma") if getattr(self, k) is not None}
        check(len(given) == 1, f"{where} needs exactly one of decay, half_life, sigma_rel and gamma, got "
                               f"{', '.join(f'{k}={v!r}' for k, v in given.items()) or 'none'}")
        if self.decay is not None:
            self.decay = as_number(where, "decay", self.decay, minimum=float("-inf"))
            check(0.0 <= self.decay < 1.0, f"{where} decay must be >= 0 and < 1, got {self.decay!r}; "
                                           "use e.g. 0.99 (mean lag 99 steps)")
        elif self.half_life is not None:
            self.half_life = as_number(where, "half_life", self.half_life, minimum=float("-inf"))
            check(self.half_life > 0, f"{where} half_life must be > 0 steps, got {self.half_life!r}")
        elif self.sigma_rel is not None:
            self.sigma_rel = as_number(where, "sigma_rel", self.sigma_rel, minimum=float("-inf"))
            check(0.0 < self.sigma_rel < SIGMA_REL_MAX,
                  f"{where} sigma_rel must be > 0 and < {SIGMA_REL_MAX:.4f} (a power-function EMA's relative spread), "
                  f"got {self.sigma_rel!r}; use e.g. 0.05 or 0.10")
        else:
            self.gamma = as_number(where, "gamma", self.gamma, minimum=float("-inf"))
            check(self.gamma > 0, f"{where} gamma must be > 0 (a power-function EMA's exponent), got {self.gamma!r}; "
                                  "use e.g. 6.94 (sigma_rel 0.10)")

    @property
    def is_power(self) -> bool:
        """True for a power-function EMA (``sigma_rel`` or ``gamma``)."""
        return self.sigma_rel is not None or self.gamma is not None

    @property
    def constant_decay(self) -> Optional[float]:
        """The constant decay of a decay / half_life track; None for a power-function EMA."""
        if self.is_power:
            return None
        return self.decay if self.decay is not None else 0.5 ** (1.0 / self.half_life)


POSTHOC_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class PosthocSnapshotConfig:
    """Snapshots of EMA tracks stored for averaging after the fact (``posthoc:`` section of a training config).

    tracks: the EMA tracks whose weights are stored ("ema" and names from ``ema_tracks``); null: every
        power-function track (``sigma_rel`` / ``gamma``), or ["ema"] when there is none.
    every_n_steps: store them every N optimizer steps (0: never), whatever LAWA's every_n_steps.
    dtype: the files' dtype, "float32" (the default: a synthesised average may weigh snapshots with
        coefficients well above 1, which multiply the storage rounding), "bfloat16" or "float16".
    Files: RUN/ema_snapshots/<track>/step-<step>.safetensors (RUN/ema_snapshots/ for "ema"), written by a
    background thread, each with the track's full definition in its metadata.
    """

    tracks: Optional[list] = None
    every_n_steps: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check(self.tracks is None or (isinstance(self.tracks, (list, tuple)) and bool(self.tracks)
                                      and all(isinstance(t, str) for t in self.tracks)),
              f"posthoc tracks must be null (every power-function EMA track) or a non-empty list of EMA track names, "
              f"got {self.tracks!r}")
        if self.tracks is not None:
            self.tracks = list(dict.fromkeys(self.tracks))
        check_int("posthoc", "every_n_steps", self.every_n_steps, 0)
        check(self.dtype in POSTHOC_DTYPES,
              f"posthoc dtype must be one of {', '.join(POSTHOC_DTYPES)}, got {self.dtype!r}")

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0


@dataclasses.dataclass
class LAWAWindowConfig(LAWAConfig):
    """A LAWA window kept beside the ``lawa:`` one (``lawa_windows:`` entry): the ``LAWAConfig`` options plus

    name: the window's name (variant, LAWA state file, ``<name>@delayed`` baseline).
    over: the EMA track it averages ("ema", a name from ``ema_tracks``) or "raw" (the trained weights).
    """

    name: str = ""
    over: str = BASE_TRACK

    def __post_init__(self) -> None:
        _check_name("lawa_windows", self.name)
        check(isinstance(self.over, str), f"lawa_windows {self.name!r} over must be a track name or 'raw', "
                                          f"got {self.over!r}")
        try:
            super().__post_init__()
        except ValueError as e:  # "lawa k must be ..." -> "lawa_windows 'w' k must be ..."
            raise ValueError(str(e).replace("lawa ", f"lawa_windows {self.name!r} ", 1)) from None

    def lawa_config(self) -> LAWAConfig:
        """The window's engine options (without name and over)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(LAWAConfig)}
        return LAWAConfig(**values)


def with_disk_dir(values: Any, folder: str) -> Any:
    """A LAWA mapping with ``storage: disk`` and no snapshot_dir gets ``folder``."""
    if isinstance(values, Mapping) and values.get("storage") == "disk" and not values.get("snapshot_dir"):
        return {**values, "snapshot_dir": folder}
    return values
