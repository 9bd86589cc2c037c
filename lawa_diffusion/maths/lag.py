"""Lag maths: the exact per-step weights that an averaging track puts on past raw iterates.

Every average this package makes is a weighting ``w_t(s)`` (``s = 0..t``, ``Σ w = 1``) of the raw
weights ``θ_s`` after optimizer step ``s`` (``θ_0``: the initial weights). This module computes that
weighting exactly from the discrete updates — no continuous approximation — and the numbers that say
what an average does:

- mean lag ``L = Σ w(s)(t − s)``: how many steps behind ``θ_t`` the average sits;
- spread ``√Σ w(s)(t − s − L)²``;
- white-noise variance factor ``V = Σ w(s)²`` (the variance of the average when the ``θ_s`` are
  independent noise of unit variance around a fixed point);
- effective window ``τ = (1 + 1/V) / 2``: the window ``1/(1 − d)`` of the constant-decay EMA with
  the same white-noise variance. It is 1 for raw weights, ``(n + 1)/2`` for a uniform mean of ``n``
  consecutive iterates and ``1/(1 − d)`` for a constant-decay EMA ``d`` in the long run; snapshots of
  such an EMA taken ``ν`` steps apart have white-noise correlation ``d^ν ≈ exp(−ν/τ)``.

Tracks follow diffusers' ``EMAModel`` exactly: the shadow starts as ``θ_0``; call ``n`` (its
``optimization_step`` after the increment, i.e. optimizer step ``n``) uses the decay
``get_decay(n)`` and sets ``e_n = d_n e_{n−1} + (1 − d_n) θ_n``. ``get_decay`` returns 0 while
``n − update_after_step − 1 ≤ 0`` (so the first update copies the weights), else the warm-up decay
``1 − (1 + s/inv_gamma)^−power`` or, without warm-up, ``(1 + s)/(10 + s)`` with
``s = n − update_after_step − 1``, then caps it at ``decay`` and raises it to ``min_decay``.
A constant-decay EMA ``d`` is ``EMAModel(decay=d, min_decay=d)``; raw weights are decay 0.
A power-function EMA (EDM2, Karras et al. 2024) with exponent ``γ`` (``gamma``) replaces the rule by
``β = (1 − 1/m)^(γ+1)`` with ``m = s + 1`` (``m = n`` without ``update_after_step``): its weights grow
about like ``s^γ`` over the steps it has seen (exactly what :func:`profile` computes), and its relative spread is
``σ_rel = √((γ+1) / ((γ+2)²(γ+3)))`` (:func:`sigma_rel_of_gamma`, :func:`gamma_of_sigma_rel`); the
engine is :class:`lawa_diffusion.engine.ema.PowerEMAModel`.

LAWA over a track (``k``, ``ν = every_n_steps``, ``start_step``) at step ``t`` is the uniform mean of
the track's profiles at the latest ``k`` steps ``s ≤ t`` with ``s ≥ start_step``,
``s ≡ start_step (mod ν)`` and ``s ≥ 1`` (the engine is fed the EMA's ``optimization_step``, which
counts from 1, so step 0 is never snapshotted).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, List, Optional, Sequence

import numpy as np

from lawa_diffusion.config.base import check
from lawa_diffusion.config.lawa import LAWAConfig

FIRST_STEP = 1  # the first step an EMAModel update (and so a LAWA snapshot) happens at


# ----------------------------------------------------------------------------- tracks
@dataclasses.dataclass(frozen=True)
class EMATrack:
    """An averaging track with diffusers ``EMAModel`` semantics (same option names and defaults)."""

    decay: float = 0.9999
    min_decay: float = 0.0
    update_after_step: int = 0
    use_ema_warmup: bool = False
    inv_gamma: float = 1.0
    power: float = 2 / 3
    gamma: Optional[float] = None  # power-function EMA exponent (EDM2); None: diffusers' decay rule

    def __post_init__(self) -> None:
        check(0.0 <= self.decay <= 1.0, f"ema decay must be between 0 and 1, got {self.decay!r}")
        check(0.0 <= self.min_decay <= 1.0, f"ema min_decay must be between 0 and 1, got {self.min_decay!r}")
        check(isinstance(self.update_after_step, int) and self.update_after_step >= 0,
              f"ema update_after_step must be an integer >= 0, got {self.update_after_step!r}")
        check(self.inv_gamma > 0, f"ema inv_gamma must be > 0, got {self.inv_gamma!r}")
        check(self.power > 0, f"ema power must be > 0, got {self.power!r}")
        check(self.gamma is None or (isinstance(self.gamma, (int, float)) and self.gamma > 0),
              f"ema gamma (power-function EMA exponent) must be > 0, got {self.gamma!r}")

    @classmethod
    def from_dict(cls, values: Any) -> "EMATrack":
        """The track of a mapping written by :meth:`to_dict` (unknown keys refused, with the valid ones)."""
        names = [f.name for f in dataclasses.fields(cls)]
        check(isinstance(values, dict) and set(values) <= set(names),
              f"an EMA track definition must be a mapping with keys among {', '.join(names)}, got {values!r}")
        return cls(**values)

    def to_dict(self) -> dict:
        """Every field, JSON-ready (what snapshot files keep in their metadata as ``track_def``)."""
        return dataclasses.asdict(self)

    @property
    def sigma_rel(self) -> Optional[float]:
        """EDM2's relative standard deviation of a power-function track (None for other tracks)."""
        return None if self.gamma is None else sigma_rel_of_gamma(self.gamma)

    @classmethod
    def from_settings(cls, settings: Any) -> "EMATrack":
        """The track of an object with EMAModel-named attributes (e.g. the trainer's ``EMASettings``)."""
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(settings, n) for n in names if hasattr(settings, n)})

    def ema_kwargs(self) -> dict:
        """Keyword arguments that make diffusers' ``EMAModel`` (or, with ``gamma``, ``PowerEMAModel``) follow
        this track."""
        kwargs = dataclasses.asdict(self)
        if self.gamma is None:
            del kwargs["gamma"]
        return kwargs

    @property
    def constant_decay(self) -> Optional[float]:
        """The decay used after the first update when it never changes, else None."""
        if self.gamma is not None:
            return None
        if self.decay == 0.0:
            return 0.0
        if self.min_decay >= self.decay:
            return self.min_decay
        return None

    def describe(self) -> str:
        d = self.constant_decay
        if d == 0.0:
            return "raw weights"
        delay = f", updates from step {self.update_after_step + 2}" if self.update_after_step else ""
        if self.gamma is not None:
            return f"power-function EMA σ_rel {self.sigma_rel:.4g} (γ {self.gamma:.4g}{delay})"
        if d is not None:
            return f"constant-decay EMA {d:.6g} (half-life {half_life_of(d):.4g} steps{delay})"
        rule = (f"warm-up 1-(1+s/{self.inv_gamma:g})^-{self.power:g}" if self.use_ema_warmup
                else "(1+s)/(10+s)")
        low = f", min {self.min_decay:g}" if self.min_decay > 0 else ""
        return f"diffusers EMA, decay {rule} capped at {self.decay:g}{low}{delay}"


def constant_ema(decay: float) -> EMATrack:
    """A constant-decay EMA: ``EMAModel(decay=d, min_decay=d)`` (the first update copies the weights)."""
    check(isinstance(decay, (int, float)) and 0.0 <= decay < 1.0,
          f"ema decay must be >= 0 and < 1, got {decay!r}; use a half-life for long windows")
    return EMATrack(decay=float(decay), min_decay=float(decay))


def half_life_ema(half_life: float) -> EMATrack:
    """The constant-decay EMA whose weights halve every ``half_life`` steps: decay ``0.5 ** (1 / h)``."""
    check(isinstance(half_life, (int, float)) and half_life > 0,
          f"ema half-life must be > 0 steps, got {half_life!r}")
    return constant_ema(0.5 ** (1.0 / half_life))


def power_ema(gamma: Optional[float] = None, sigma_rel: Optional[float] = None) -> EMATrack:
    """EDM2's power-function EMA, from its exponent ``gamma`` or its ``sigma_rel`` (exactly one)."""
    check((gamma is None) != (sigma_rel is None),
          f"a power-function EMA needs exactly one of gamma and sigma_rel, got gamma={gamma!r}, sigma_rel={sigma_rel!r}")
    g = gamma_of_sigma_rel(sigma_rel) if gamma is None else gamma
    check(isinstance(g, (int, float)) and g > 0, f"power-function EMA gamma must be > 0, got {g!r}")
    return EMATrack(decay=1.0, min_decay=0.0, gamma=float(g))


SIGMA_REL_MAX = math.sqrt(1.0 / 12.0)  # σ_rel at γ = 0 (a uniform mean of everything seen): 0.2887


def sigma_rel_of_gamma(gamma: float) -> float:
    """``σ_rel = √((γ+1) / ((γ+2)²(γ+3)))`` (EDM2 eq. 3): 16.97 → 0.05, 6.94 → 0.10."""
    check(isinstance(gamma, (int, float)) and gamma > 0, f"power-function EMA gamma must be > 0, got {gamma!r}")
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_of_sigma_rel(sigma_rel: float) -> float:
    """The ``γ > 0`` whose power-function EMA has relative spread ``sigma_rel`` (0 < σ_rel < 0.2887)."""
    check(isinstance(sigma_rel, (int, float)) and 0.0 < sigma_rel < SIGMA_REL_MAX,
          f"sigma_rel must be > 0 and < {SIGMA_REL_MAX:.4f} (γ > 0), got {sigma_rel!r}; 0.05 to 0.15 are usual")
    # σ² (γ+2)² (γ+3) − (γ+1) = 0: σ² γ³ + 7σ² γ² + (16σ² − 1) γ + 12σ² − 1.
    v = float(sigma_rel) ** 2
    roots = np.roots([v, 7.0 * v, 16.0 * v - 1.0, 12.0 * v - 1.0])
    real = [float(r.real) for r in roots if abs(r.imag) < 1e-9 and r.real > 0]
    return max(real)


def raw_weights() -> EMATrack:
    """The raw weights as a track (decay 0: weight 1 on ``θ_t``)."""
    return EMATrack(decay=0.0)


def half_life_of(decay: float) -> float:
    """Steps after which a constant decay ``d`` halves a weight (inf for d = 1, 0 for d = 0)."""
    if decay <= 0.0:
        return 0.0
    return math.inf if decay >= 1.0 else math.log(0.5) / math.log(decay)


def matched_decay(mean_lag: float) -> float:
    """The constant decay whose long-run mean lag ``d/(1 − d)`` equals ``mean_lag``: ``L/(1 + L)``."""
    check(mean_lag >= 0, f"mean lag must be >= 0, got {mean_lag!r}")
    return mean_lag / (1.0 + mean_lag)


# ----------------------------------------------------------------------------- profiles
def decays(track: EMATrack, t: int) -> np.ndarray:
    """``d[n]`` for ``n = 0..t``: the decay ``EMAModel.get_decay(n)`` uses at call ``n`` (``d[0]`` unused, 0)."""
    n = np.arange(t + 1, dtype=np.float64)
    s = np.maximum(0.0, n - track.update_after_step - 1)
    with np.errstate(divide="ignore"):
        if track.gamma is not None:
            d = (1.0 - 1.0 / (s + 1.0)) ** (track.gamma + 1.0)
        elif track.use_ema_warmup:
            d = 1.0 - (1.0 + s / track.inv_gamma) ** -track.power
        else:
            d = (1.0 + s) / (10.0 + s)
    d = np.maximum(np.minimum(d, track.decay), track.min_decay)
    d[s <= 0] = 0.0
    return d


def profile(track: EMATrack, t: int, d: Optional[np.ndarray] = None) -> np.ndarray:
    """Weights ``w[s]``, ``s = 0..t``, of the track's average after step ``t`` on ``θ_0..θ_t``.

    ``w[s] = (1 − d_s) Π_{n=s+1..t} d_n`` for ``s ≥ 1`` and ``w[0] = Π_{n=1..t} d_n``.
    ``d``: precomputed ``decays(track, T)`` with ``T ≥ t`` (to reuse across steps).
    """
    check(isinstance(t, (int, np.integer)) and t >= 0, f"step must be an integer >= 0, got {t!r}")
    d = decays(track, t) if d is None else d[: t + 1]
    after = np.ones(t + 1)  # after[s] = Π_{n=s+1..t} d_n
    if t > 0:
        after[:-1] = np.cumprod(d[:0:-1])[::-1]
    w = (1.0 - d) * after
    w[0] = after[0]
    return w


def snapshot_steps(window: LAWAConfig, t: int) -> List[int]:
    """The steps of the snapshots LAWA holds after step ``t``, oldest first (empty before the first one)."""
    first = first_snapshot(window)
    if t < first:
        return []
    last = window.start_step + (t - window.start_step) // window.every_n_steps * window.every_n_steps
    count = min(window.k, (last - first) // window.every_n_steps + 1)
    return [last - j * window.every_n_steps for j in range(count - 1, -1, -1)]


def snapshots_profile(track: EMATrack, steps: Sequence[int], t: int, d: Optional[np.ndarray] = None) -> np.ndarray:
    """Weights on ``θ_0..θ_t`` of the uniform mean of ``track``'s weights at ``steps`` (each <= t)."""
    d = decays(track, t) if d is None else d
    w = np.zeros(t + 1)
    for s in steps:
        w[: s + 1] += profile(track, s, d)
    return w / len(steps)


def lawa_profile(track: EMATrack, window: LAWAConfig, t: int, d: Optional[np.ndarray] = None) -> np.ndarray:
    """Weights on ``θ_0..θ_t`` of LAWA over ``track`` after step ``t`` (the mean of the held snapshot profiles)."""
    steps = snapshot_steps(window, t)
    check(bool(steps), f"plan step {t} comes before LAWA's first snapshot at step "
                       f"{first_snapshot(window)}; ask for steps >= {first_snapshot(window)}")
    return snapshots_profile(track, steps, t, d)


def first_snapshot(window: LAWAConfig) -> int:
    """The first step LAWA snapshots (its start step, or the first due step >= 1)."""
    first = max(window.start_step, FIRST_STEP)
    return first + (window.start_step - first) % window.every_n_steps


# ----------------------------------------------------------------------------- statistics
def mean_lag(w: np.ndarray) -> float:
    """``Σ w(s)(t − s)`` for a profile over ``s = 0..t``."""
    t = len(w) - 1
    return float(np.dot(w, t - np.arange(t + 1)))


def spread(w: np.ndarray) -> float:
    """``√Σ w(s)(t − s − L)²``: how widely the profile spreads around its mean lag."""
    t = len(w) - 1
    ages = t - np.arange(t + 1)
    return float(math.sqrt(max(0.0, np.dot(w, (ages - mean_lag(w)) ** 2))))


def sigma_rel_of_profile(w: np.ndarray) -> float:
    """EDM2's relative spread of a profile over ``s = 0..t``: its spread ÷ ``t`` (0 at ``t = 0``)."""
    t = len(w) - 1
    return spread(w) / t if t > 0 else 0.0


def variance(w: np.ndarray) -> float:
    """White-noise variance factor ``V = Σ w²``."""
    return float(np.dot(w, w))


def window_of(w: np.ndarray) -> float:
    """Effective window ``τ = (1 + 1/V)/2``: the ``1/(1 − d)`` of the constant-decay EMA with the same ``V``."""
    return 0.5 * (1.0 + 1.0 / variance(w))


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """White-noise correlation of two averages: ``Σ a b / √(Σ a² Σ b²)`` (profiles padded to one length)."""
    n = max(len(a), len(b))
    a, b = np.pad(a, (0, n - len(a))), np.pad(b, (0, n - len(b)))
    return float(np.dot(a, b) / math.sqrt(variance(a) * variance(b)))


def stats(w: np.ndarray) -> dict:
    """Mean lag, spread, white-noise variance factor and effective window of a profile."""
    return {"lag": mean_lag(w), "spread": spread(w), "variance": variance(w), "window": window_of(w)}


def decorrelating_nu(window_steps: float) -> int:
    """The smallest ν that puts snapshots at least one EMA window apart."""
    return max(1, math.ceil(window_steps - 1e-9))


def plan_row(track: EMATrack, window: LAWAConfig, t: int, d: Optional[np.ndarray] = None) -> dict:
    """Everything the planner reports for LAWA over ``track`` at step ``t`` (one table row)."""
    d = decays(track, t) if d is None else d
    ema, lawa = profile(track, t, d), lawa_profile(track, window, t, d)
    e, a = stats(ema), stats(lawa)
    steps = snapshot_steps(window, t)
    corr = correlation(profile(track, steps[-2], d), profile(track, steps[-1], d)) if len(steps) > 1 else None
    total = a["lag"]
    nu_star = decorrelating_nu(e["window"])
    return {
        "step": int(t), "every_n_steps": window.every_n_steps, "snapshot_steps": steps,
        "ema_lag": e["lag"], "ema_spread": e["spread"], "ema_window": e["window"],
        "lawa_lag": total, "lawa_spread": a["spread"], "lawa_window": a["window"],
        "ema_sigma_rel": sigma_rel_of_profile(ema), "lawa_sigma_rel": sigma_rel_of_profile(lawa),
        "extra_lag": total - e["lag"], "variance_ratio": a["variance"] / e["variance"],
        "snapshot_correlation": corr,
        "nu_below_window": window.k > 1 and window.every_n_steps < e["window"],
        "decorrelating_nu": nu_star,
        "matched_decay": matched_decay(total), "matched_half_life": half_life_of(matched_decay(total)),
    }


def plan_rows(track: EMATrack, window: LAWAConfig, steps: Sequence[int]) -> List[dict]:
    """``plan_row`` at each step (decays computed once)."""
    steps = [int(s) for s in steps]
    d = decays(track, max(steps)) if steps else None
    return [plan_row(track, window, t, d) for t in steps]


# ----------------------------------------------------------------------------- wording
def delay_warning(row: dict) -> Optional[str]:
    """The ν-below-window warning for one row, or None when ν is at least the EMA's window."""
    if not row["nu_below_window"]:
        return None
    dl = row["extra_lag"]
    return (f"at step {row['step']} ν = {row['every_n_steps']} is below the EMA's window τ = {row['ema_window']:.0f} steps "
            f"(snapshot correlation {row['snapshot_correlation']:.2f}): "
            f"LAWA ≈ the EMA delayed by {dl:.0f} steps: expect to lose about {dl:.0f} steps")


def matched_line(row: dict) -> str:
    """Which constant-decay EMA has LAWA's total lag (in the long run), and whether ν spaces snapshots enough."""
    text = (f"at step {row['step']}: matched-lag baseline = constant-decay EMA {row['matched_decay']:.5f} "
            f"(half-life {row['matched_half_life']:.0f} steps, mean lag {row['lawa_lag']:.0f} = LAWA's total)")
    if row["nu_below_window"]:
        return text + f"; ν >= {row['decorrelating_nu']} puts snapshots one EMA window apart"
    corr = "" if row["snapshot_correlation"] is None else f" (snapshot correlation {row['snapshot_correlation']:.2f})"
    return (text + f"; ν = {row['every_n_steps']} already puts snapshots at least one EMA window "
            f"(τ = {row['ema_window']:.0f}) apart{corr}")


def summary_line(track: EMATrack, window: LAWAConfig, t: int) -> str:
    """One line on what LAWA over ``track`` does at step ``t`` (printed at the start of a run)."""
    first = first_snapshot(window)
    head = f"lag plan: LAWA k={window.k}, ν={window.every_n_steps} over {track.describe()}"
    if t < first:
        return f"{head}: no snapshot before step {first}, so no LAWA average by step {t}"
    r = plan_row(track, window, t)
    corr = "" if r["snapshot_correlation"] is None else f", snapshot correlation {r['snapshot_correlation']:.2f}"
    line = (f"{head}: at step {t} EMA lag {r['ema_lag']:.0f} (window {r['ema_window']:.0f}), "
            f"LAWA lag {r['lawa_lag']:.0f} (ΔL {r['extra_lag']:+.0f}), variance x{r['variance_ratio']:.2f}{corr}; "
            f"matched-lag EMA decay {r['matched_decay']:.5f}")
    if r["nu_below_window"]:
        line += (f"; ν below the EMA's window: LAWA ≈ the EMA delayed by {r['extra_lag']:.0f} steps: "
                 f"expect to lose about {r['extra_lag']:.0f} steps")
    return line
