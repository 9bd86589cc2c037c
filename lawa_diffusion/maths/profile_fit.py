"""Post-hoc synthesis maths: which combination of stored snapshots has a given averaging profile.

Every average this package knows is a weighting ``p(s)`` of the raw iterates ``θ_0..θ_t`` (:mod:`lag`),
and every one is linear in the weights. A stored snapshot ``i`` (a track's weights at step ``s_i``) has
the exact discrete profile ``p_i`` (``lag.profile`` of its track at ``s_i``, zero after ``s_i``). For a
target profile ``p`` at step ``t`` the coefficients

    x = argmin ‖Σ xᵢ pᵢ − p‖²  subject to  Σ xᵢ = 1

give the weights ``Σ xᵢ θᵢ`` whose profile is the closest to ``p`` the snapshots allow. They are found
in float64 by eliminating the constraint (``x = 1/n + N z`` with ``N`` an orthonormal basis of
``{Σ x = 0}``) and solving the remaining least-squares problem by SVD: duplicate or nearly identical
snapshots make it rank-deficient, and the pseudo-inverse then returns the smallest coefficients
(duplicates share their weight), never a blow-up. The relative residual ``‖Σ xᵢ pᵢ − p‖ / ‖p‖`` says
how close the synthesis is; :data:`DEFAULT_MAX_RESIDUAL` is the default bound above which a target is
refused.

Targets (:func:`parse_target`): ``sigma_rel=0.08`` / ``gamma=6.94`` (EDM2's power-function EMA),
``decay=0.999`` (constant decay, the first update copies the weights), ``half_life=200``,
``ema:decay=0.9999,use_ema_warmup=true,power=0.75`` (diffusers' ``EMAModel`` with any of its options;
``ema:`` alone is its defaults), ``raw``, ``window=N`` (the uniform mean of the last ``N`` raw iterates),
a run's track by name (``ema``, ``ema_short``: its own definition), and
``lawa:k=5,nu=100[,start=0],over=SPEC`` (LAWA over a track name or over any other target, ``over``
last: ``lawa:k=4,nu=50,over=sigma_rel=0.05``).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

from lawa_diffusion.config.base import check
from lawa_diffusion.config.lawa import LAWAConfig
from lawa_diffusion.config.tracks import RAW_TRACK
from lawa_diffusion.maths import lag

# Relative profile residual above which a target counts as out of reach of the stored snapshots. From two power
# EMAs (σ_rel 0.05 and 0.10) with 20 evenly spaced snapshots each (benchmarks/bench_synthesize.py --residuals, at
# steps 1000 and 10000): σ_rel 0.03 to 0.2 come within 0.027, constant decays whose window is at most a twentieth
# of the step within 0.005, diffusers' warm-up EMA within 0.004; σ_rel 0.25 (0.060) and a constant decay whose
# window is a fifth of the step (0.13 to 0.39) are refused. Up to 0.05 the mean lag and σ_rel of the synthesis
# stay within a few percent of the target's.
DEFAULT_MAX_RESIDUAL = 0.05
RCOND = 1e-10  # singular values below this fraction of the largest are treated as zero (duplicate snapshots)
TARGET_HELP = ("sigma_rel=0.08, gamma=6.94, decay=0.999, half_life=200, ema:decay=0.9999,use_ema_warmup=true, "
               "raw, window=N, a track name, or lawa:k=5,nu=100,over=TRACK")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_EMA_KEYS = tuple(f.name for f in dataclasses.fields(lag.EMATrack))


# ----------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    """A target averaging profile, as parsed from its text.

    kind: "track" (a full ``lag.EMATrack`` in ``track``), "named" (a run's track, resolved by ``name``),
    "window" (the uniform mean of the last ``size`` raw iterates) or "lawa" (``lawa`` window over ``over``).
    """

    text: str
    kind: str
    track: Optional[lag.EMATrack] = None
    name: Optional[str] = None
    size: Optional[int] = None
    lawa: Optional[LAWAConfig] = None
    over: Optional["Target"] = None

    def describe(self, tracks: Mapping[str, lag.EMATrack] = {}) -> str:
        if self.kind == "track":
            return self.track.describe()
        if self.kind == "named":
            known = self.name in tracks
            return f"track {self.name!r}" + (f" ({tracks[self.name].describe()})" if known else "")
        if self.kind == "window":
            return f"uniform mean of the last {self.size} raw iterates"
        w = self.lawa
        start = f", start {w.start_step}" if w.start_step else ""
        return f"LAWA k={w.k}, ν={w.every_n_steps}{start} over {self.over.describe(tracks)}"

    def names(self) -> list:
        """The run track names this target needs a definition for."""
        if self.kind == "named":
            return [self.name]
        return self.over.names() if self.kind == "lawa" else []


def _number(text: str, key: str, whole: str, integer: bool = False):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    kind = "an integer" if integer else "a number"
    check(math.isfinite(value) and (not integer or value == int(value)),
          f"target {whole!r}: {key} must be {kind}, got {text!r}; targets look like {TARGET_HELP}")
    return int(value) if integer else value


def _bool(text: str, key: str, whole: str) -> bool:
    low = text.strip().lower()
    check(low in ("true", "false", "1", "0", "yes", "no"),
          f"target {whole!r}: {key} must be true or false, got {text!r}")
    return low in ("true", "1", "yes")


def _pairs(text: str, whole: str) -> Dict[str, str]:
    pairs = {}
    for item in text.split(","):
        check("=" in item, f"target {whole!r}: expected KEY=VALUE, got {item!r}; targets look like {TARGET_HELP}")
        key, value = (p.strip() for p in item.split("=", 1))
        check(key not in pairs, f"target {whole!r} gives {key} twice; give it once")
        pairs[key] = value
    return pairs


def parse_target(text: str) -> Target:
    """The :class:`Target` of a text such as ``sigma_rel=0.08`` or ``lawa:k=5,nu=100,over=ema`` (one-sentence
    ValueError naming the text and the accepted forms otherwise)."""
    check(isinstance(text, str) and bool(text.strip()), f"a target is needed, e.g. {TARGET_HELP}")
    whole = text = text.strip()
    if text.startswith("lawa:"):
        head, sep, over = text[len("lawa:"):].partition("over=")
        check(bool(sep) and bool(over.strip()) and (not head or head.endswith(",")),
              f"target {whole!r}: a LAWA target ends with over=TRACK or over=TARGET, e.g. lawa:k=5,nu=100,over=ema")
        pairs = _pairs(head.rstrip(","), whole) if head.rstrip(",") else {}
        unknown = sorted(set(pairs) - {"k", "nu", "start"})
        check(not unknown, f"target {whole!r}: unknown LAWA key(s) {', '.join(unknown)}; use k, nu, start and over")
        check("k" in pairs and "nu" in pairs, f"target {whole!r}: a LAWA target needs k and nu, e.g. lawa:k=5,nu=100,over=ema")
        k, nu = _number(pairs["k"], "k", whole, True), _number(pairs["nu"], "nu", whole, True)
        start = _number(pairs.get("start", "0"), "start", whole, True)
        check(k >= 1 and nu >= 1 and start >= 0,
              f"target {whole!r}: LAWA needs k >= 1, nu >= 1 and start >= 0, got k={k}, nu={nu}, start={start}")
        return Target(whole, "lawa", lawa=LAWAConfig(k=k, every_n_steps=nu, start_step=start),
                      over=parse_target(over))
    if text.startswith("ema:"):
        pairs = _pairs(text[len("ema:"):], whole) if text[len("ema:"):] else {}
        unknown = sorted(set(pairs) - set(_EMA_KEYS) - {"warmup"})
        check(not unknown, f"target {whole!r}: unknown EMA option(s) {', '.join(unknown)}; "
                           f"use {', '.join(_EMA_KEYS)}")
        values = {}
        for key, value in pairs.items():
            key = "use_ema_warmup" if key == "warmup" else key
            values[key] = (_bool(value, key, whole) if key == "use_ema_warmup" else
                           _number(value, key, whole, integer=key == "update_after_step"))
        return Target(whole, "track", track=lag.EMATrack(**values))
    if "=" not in text:
        check(_NAME_RE.match(text) is not None, f"target {whole!r} is not understood; targets look like {TARGET_HELP}")
        if text == RAW_TRACK:
            return Target(whole, "track", track=lag.raw_weights())
        return Target(whole, "named", name=text)
    key, value = (p.strip() for p in text.split("=", 1))
    if key == "sigma_rel":
        return Target(whole, "track", track=lag.power_ema(sigma_rel=_number(value, key, whole)))
    if key == "gamma":
        return Target(whole, "track", track=lag.power_ema(gamma=_number(value, key, whole)))
    if key == "decay":
        return Target(whole, "track", track=lag.constant_ema(_number(value, key, whole)))
    if key == "half_life":
        return Target(whole, "track", track=lag.half_life_ema(_number(value, key, whole)))
    if key == "window":
        size = _number(value, key, whole, True)
        check(size >= 1, f"target {whole!r}: window must be at least 1 iterate, got {size}")
        return Target(whole, "window", size=size)
    raise ValueError(f"target {whole!r} is not understood; targets look like {TARGET_HELP}")


def resolve_track(target: Target, tracks: Mapping[str, lag.EMATrack]) -> lag.EMATrack:
    """The ``lag.EMATrack`` a "track" or "named" target stands for (named: from ``tracks``)."""
    if target.kind == "track":
        return target.track
    check(target.name in tracks, f"target {target.text!r} names track {target.name!r}, which the run does not "
                                 f"define; known tracks: {', '.join(sorted(tracks)) or 'none'}")
    return tracks[target.name]


def target_profile(target: Target, t: int, tracks: Mapping[str, lag.EMATrack] = {}) -> np.ndarray:
    """The weights on ``θ_0..θ_t`` of ``target`` at step ``t`` (``tracks``: the run's tracks by name)."""
    check(isinstance(t, (int, np.integer)) and t >= 1, f"synthesis step must be an integer >= 1, got {t!r}")
    if target.kind in ("track", "named"):
        return lag.profile(resolve_track(target, tracks), int(t))
    if target.kind == "window":
        check(target.size <= t + 1, f"target {target.text!r}: a window of {target.size} iterates needs step >= "
                                    f"{target.size - 1}, got step {t}; use window <= {t + 1}")
        w = np.zeros(t + 1)
        w[t + 1 - target.size:] = 1.0 / target.size
        return w
    steps = lag.snapshot_steps(target.lawa, int(t))
    check(bool(steps), f"target {target.text!r} has its first LAWA snapshot at step "
                       f"{lag.first_snapshot(target.lawa)}, after step {t}; synthesise at a later step")
    if target.over.kind in ("track", "named"):
        return lag.snapshots_profile(resolve_track(target.over, tracks), steps, int(t))
    w = np.zeros(t + 1)
    for s in steps:
        w[: s + 1] += target_profile(target.over, s, tracks)
    return w / len(steps)


# ----------------------------------------------------------------------------- statistics
def sigma_rel_of(w: np.ndarray) -> float:
    """EDM2's relative spread of a profile at step ``t = len(w) − 1``: its spread ÷ ``t``."""
    return lag.sigma_rel_of_profile(w)


def padded(w: np.ndarray, t: int) -> np.ndarray:
    """A profile over ``0..s`` as weights over ``0..t`` (zeros after ``s``)."""
    check(len(w) <= t + 1, f"a profile of step {len(w) - 1} cannot be padded to the earlier step {t}")
    return np.pad(np.asarray(w, dtype=np.float64), (0, t + 1 - len(w)))


# ----------------------------------------------------------------------------- the solver
@dataclasses.dataclass(frozen=True)
class Solution:
    """The least-squares synthesis of a target profile at ``step`` from source profiles.

    coefficients: one per source, summing to 1. residual: ``‖Σ xᵢ pᵢ − p‖ / ‖p‖``. mean_lag, sigma_rel: of
    the achieved profile ``profile``; target_mean_lag, target_sigma_rel: of ``target_profile``.
    norm: ``‖x‖₂``, the factor by which independent per-snapshot noise (e.g. storage rounding) grows.
    """

    step: int
    coefficients: np.ndarray
    residual: float
    mean_lag: float
    sigma_rel: float
    target_mean_lag: float
    target_sigma_rel: float
    norm: float
    profile: np.ndarray
    target_profile: np.ndarray

    def summary(self) -> dict:
        """The JSON-ready numbers (no profiles)."""
        return {"step": self.step, "residual": self.residual, "mean_lag": self.mean_lag, "sigma_rel": self.sigma_rel,
                "target_mean_lag": self.target_mean_lag, "target_sigma_rel": self.target_sigma_rel,
                "coefficient_norm": self.norm}


def _constraint_basis(n: int) -> np.ndarray:
    """An orthonormal basis (n × (n−1)) of the vectors whose entries sum to 0."""
    _, _, vt = np.linalg.svd(np.ones((1, n)))
    return vt[1:].T


def solve(profiles: Sequence[np.ndarray] | np.ndarray, target: np.ndarray,
          max_residual: Optional[float] = None, what: str = "the target") -> Solution:
    """Coefficients ``x`` (Σ x = 1) minimising ``‖Σ xᵢ profiles[i] − target‖`` in float64.

    profiles: one profile per source, each over ``0..sᵢ`` with ``sᵢ <= t`` (padded with zeros to ``t``);
    target: the target profile over ``0..t``. max_residual: refuse (ValueError saying what to store) a
    relative residual above it; None: never refuse. what: how the refusal names the target.
    """
    p = np.asarray(target, dtype=np.float64)
    t = len(p) - 1
    check(t >= 1, f"synthesis needs a target profile over at least steps 0..1, got {len(p)} weight(s)")
    check(len(profiles) >= 1, "synthesis needs at least one stored snapshot; store snapshots during training")
    n = len(profiles)
    a = np.zeros((t + 1, n))  # column i: profile i, zero after its step
    for i, w in enumerate(profiles):
        check(len(w) <= t + 1, f"a snapshot profile of step {len(w) - 1} cannot take part in a synthesis at the "
                               f"earlier step {t}")
        a[: len(w), i] = w
    x = np.full(n, 1.0 / n)
    if n > 1:
        basis = _constraint_basis(n)
        z = np.linalg.lstsq(a @ basis, p - a @ x, rcond=RCOND)[0]
        x = x + basis @ z
    achieved = a @ x
    norm_p = float(np.linalg.norm(p))
    residual = float(np.linalg.norm(achieved - p) / norm_p) if norm_p > 0 else float(np.linalg.norm(achieved))
    solution = Solution(step=t, coefficients=x, residual=residual, mean_lag=lag.mean_lag(achieved),
                        sigma_rel=sigma_rel_of(achieved), target_mean_lag=lag.mean_lag(p),
                        target_sigma_rel=sigma_rel_of(p), norm=float(np.linalg.norm(x)), profile=achieved,
                        target_profile=p)
    if max_residual is not None:
        check(isinstance(max_residual, (int, float)) and max_residual > 0,
              f"max residual must be a number > 0, got {max_residual!r}; the default is {DEFAULT_MAX_RESIDUAL}")
        check(residual <= max_residual or math.isclose(residual, max_residual),
              f"{what} at step {t} is out of reach of the {n} stored snapshot(s): relative profile residual "
              f"{residual:.3g} > {max_residual:g} (target mean lag {solution.target_mean_lag:.1f} steps, best "
              f"{solution.mean_lag:.1f}); {_reach_hint(solution)}, or raise --max-residual")
    return solution


def _reach_hint(solution: "Solution") -> str:
    """Which way the stored snapshots fall short: a target shorter (less lag) than what they reach needs snapshots
    more often or a shorter track; a longer one needs history the store does not have."""
    if solution.target_mean_lag > solution.mean_lag:
        return ("the target averages over longer than the stored snapshots reach: synthesise it at a later step, "
                "or store snapshots from early in training (a smaller every_n_steps from step 1)")
    return "store snapshots more often, or a track with a shorter σ_rel"


def source_profiles(tracks: Sequence[lag.EMATrack], steps: Sequence[int], t: int) -> list:
    """The exact profiles of snapshots of ``tracks[i]`` at ``steps[i]`` (each ``<= t``), decays computed once per track."""
    decays: Dict[lag.EMATrack, np.ndarray] = {}
    profiles = []
    for track, s in zip(tracks, steps):
        check(0 <= s <= t, f"a snapshot at step {s} cannot take part in a synthesis at the earlier step {t}")
        if track not in decays:
            decays[track] = lag.decays(track, t)
        profiles.append(lag.profile(track, int(s), decays[track]))
    return profiles
