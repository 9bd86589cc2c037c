"""Post-hoc synthesis maths against independent references: step-by-step float64 EMAs and diffusers-style
PowerEMAModel runs on one-hot impulses, a KKT solve and scipy's constrained minimiser."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lawa_diffusion.config.lawa import LAWAConfig
from lawa_diffusion.engine.ema import PowerEMAModel
from lawa_diffusion.maths import lag
from lawa_diffusion.maths import profile_fit as synthesis
from tests.helpers import stepwise_power_ema

POWER = {"p05": lag.power_ema(sigma_rel=0.05), "p10": lag.power_ema(sigma_rel=0.10)}




def power_ema_model_profiles(gamma: float, update_after_step: int, steps: int) -> dict:
    theta = torch.nn.Parameter(torch.zeros(steps + 1, dtype=torch.float64))
    theta.data[0] = 1.0
    ema = PowerEMAModel([theta], gamma=gamma, update_after_step=update_after_step)
    out = {}
    for n in range(1, steps + 1):
        theta.data.zero_()
        theta.data[n] = 1.0
        ema.step([theta])
        out[n] = ema.shadow_params[0].detach().numpy()[: n + 1].copy()
    return out


@pytest.mark.parametrize("gamma, update_after_step", [(lag.gamma_of_sigma_rel(0.05), 0), (6.94, 0), (3.0, 4)])
def test_power_profile_equals_stepwise_float64_ema_and_power_ema_model(gamma, update_after_step):
    track = lag.EMATrack(decay=1.0, min_decay=0.0, gamma=gamma, update_after_step=update_after_step)
    steps = 120
    stepwise = stepwise_power_ema(gamma, update_after_step, steps)
    model = power_ema_model_profiles(gamma, update_after_step, steps)
    d = lag.decays(track, steps)
    for t in range(1, steps + 1):
        w = lag.profile(track, t, d)
        np.testing.assert_allclose(w, stepwise[t], rtol=0, atol=1e-9)
        np.testing.assert_allclose(w, model[t], rtol=0, atol=1e-9)


def test_sigma_rel_gamma_conversion():
    assert round(lag.gamma_of_sigma_rel(0.05), 2) == 16.97
    assert round(lag.gamma_of_sigma_rel(0.10), 2) == 6.94
    assert lag.sigma_rel_of_gamma(16.97) == pytest.approx(0.05, abs=5e-5)
    assert lag.sigma_rel_of_gamma(6.94) == pytest.approx(0.10, abs=5e-5)
    for s in (0.02, 0.08, 0.2, 0.28):
        assert lag.sigma_rel_of_gamma(lag.gamma_of_sigma_rel(s)) == pytest.approx(s, rel=1e-12)


def test_sigma_rel_of_a_long_power_profile_is_its_tracks():
    # EDM2's scale: spread ÷ step of the discrete profile approaches the continuous σ_rel as t grows.
    for name, track in POWER.items():
        assert synthesis.sigma_rel_of(lag.profile(track, 20000)) == pytest.approx(track.sigma_rel, rel=2e-3), name


def _stored(every: int, t: int):
    tracks, steps, names = [], [], []
    for name, track in POWER.items():
        for s in range(every, t + 1, every):
            tracks.append(track), steps.append(s), names.append(name)
    return tracks, steps, names


def test_lawa_over_a_stored_track_at_stored_steps_is_exact():
    tracks, steps, names = _stored(10, 100)
    target = synthesis.parse_target("lawa:k=4,nu=20,over=p05")
    p = synthesis.target_profile(target, 100, POWER)
    sol = synthesis.solve(synthesis.source_profiles(tracks, steps, 100), p, max_residual=synthesis.DEFAULT_MAX_RESIDUAL)
    expected = np.array([0.25 if (n == "p05" and s in (40, 60, 80, 100)) else 0.0 for n, s in zip(names, steps)])
    np.testing.assert_allclose(sol.coefficients, expected, rtol=0, atol=1e-9)
    assert sol.residual < 1e-12
    assert sol.mean_lag == pytest.approx(sol.target_mean_lag, abs=1e-9)
    assert sol.sigma_rel == pytest.approx(sol.target_sigma_rel, abs=1e-12)


def kkt_reference(a: np.ndarray, p: np.ndarray) -> np.ndarray:
    """min ‖a x − p‖² s.t. Σx = 1 from the full KKT system, solved directly (a of full column rank)."""
    n = a.shape[1]
    kkt = np.block([[2 * a.T @ a, np.ones((n, 1))], [np.ones((1, n)), np.zeros((1, 1))]])
    return np.linalg.solve(kkt, np.concatenate([2 * a.T @ p, [1.0]]))[:n]


@pytest.mark.parametrize("seed", range(4))
def test_solver_matches_kkt_and_scipy_on_random_profiles(seed):
    from scipy.optimize import minimize

    rng = np.random.default_rng(seed)
    t, n = 40, 6
    profiles = [rng.dirichlet(np.ones(s + 1)) for s in rng.integers(10, t + 1, size=n)]
    p = rng.dirichlet(np.ones(t + 1))
    sol = synthesis.solve(profiles, p)
    a = np.stack([synthesis.padded(w, t) for w in profiles], axis=1)
    np.testing.assert_allclose(sol.coefficients, kkt_reference(a, p), rtol=0, atol=1e-8)
    scipy = minimize(lambda x: float(np.sum((a @ x - p) ** 2)), np.full(n, 1 / n), method="SLSQP",
                     constraints=[{"type": "eq", "fun": lambda x: np.sum(x) - 1.0}], options={"ftol": 1e-15})
    np.testing.assert_allclose(sol.coefficients, scipy.x, rtol=0, atol=1e-5)
    assert sol.coefficients.sum() == pytest.approx(1.0, abs=1e-12)
    assert sol.residual == pytest.approx(np.linalg.norm(a @ sol.coefficients - p) / np.linalg.norm(p), rel=1e-12)


def test_duplicate_snapshots_share_their_weight_and_never_blow_up():
    rng = np.random.default_rng(7)
    profiles = [rng.dirichlet(np.ones(31)) for _ in range(4)]
    p = rng.dirichlet(np.ones(31))
    single = synthesis.solve(profiles, p)
    doubled = synthesis.solve(profiles + [profiles[2]], p)  # the same snapshot twice: rank deficient
    assert np.all(np.isfinite(doubled.coefficients)) and doubled.norm < 10
    assert doubled.residual == pytest.approx(single.residual, rel=1e-9)
    assert doubled.coefficients[2] == pytest.approx(doubled.coefficients[4], abs=1e-9)
    assert doubled.coefficients[2] + doubled.coefficients[4] == pytest.approx(single.coefficients[2], abs=1e-9)


def test_constant_decay_from_two_power_emas_mid_and_late():
    tracks, steps, _ = _stored(50, 1000)
    profiles = synthesis.source_profiles(tracks, steps, 1000)
    for target in ("decay=0.99", "half_life=100"):
        p = synthesis.target_profile(synthesis.parse_target(target), 1000)
        sol = synthesis.solve(profiles, p, max_residual=synthesis.DEFAULT_MAX_RESIDUAL)
        assert sol.residual < 0.02, target
        assert sol.mean_lag == pytest.approx(sol.target_mean_lag, rel=0.01), target
        assert sol.sigma_rel == pytest.approx(sol.target_sigma_rel, rel=0.03), target


def test_early_constant_decay_is_refused_with_what_to_store():
    # 60 steps, both power EMAs stored every 5 steps: decay 0.9 is within reach, decay 0.97 (weight 0.97^59 = 17 %
    # still on step 1) is not.
    tracks, steps, _ = _stored(5, 60)
    profiles = synthesis.source_profiles(tracks, steps, 60)
    near = synthesis.solve(profiles, synthesis.target_profile(synthesis.parse_target("decay=0.9"), 60),
                           max_residual=synthesis.DEFAULT_MAX_RESIDUAL)
    assert near.residual < 0.02
    far = synthesis.target_profile(synthesis.parse_target("decay=0.97"), 60)
    assert synthesis.solve(profiles, far).residual > 0.5
    # decay 0.97 weighs step 1 (17 %), earlier than any snapshot: the target reaches further back than the store
    with pytest.raises(ValueError, match="out of reach.*longer than the stored snapshots reach.*from step 1") as e:
        synthesis.solve(profiles, far, max_residual=synthesis.DEFAULT_MAX_RESIDUAL, what="target 'decay=0.97'")
    assert "\n" not in str(e.value) and "more often" not in str(e.value)
    # the raw weights are shorter than anything an average of snapshots 5 steps apart reaches
    raw = synthesis.target_profile(synthesis.parse_target("raw"), 60)
    with pytest.raises(ValueError, match="out of reach.*store snapshots more often, or a track with a shorter") as e:
        synthesis.solve(profiles, raw, max_residual=synthesis.DEFAULT_MAX_RESIDUAL, what="target 'raw'")
    assert "later step" not in str(e.value)


def test_target_profiles():
    t = 90
    np.testing.assert_allclose(synthesis.target_profile(synthesis.parse_target("decay=0.95"), t),
                               lag.profile(lag.constant_ema(0.95), t))
    np.testing.assert_allclose(synthesis.target_profile(synthesis.parse_target("half_life=20"), t),
                               lag.profile(lag.half_life_ema(20), t))
    np.testing.assert_allclose(synthesis.target_profile(synthesis.parse_target("gamma=6.94"), t),
                               lag.profile(lag.power_ema(gamma=6.94), t))
    warm = synthesis.parse_target("ema:decay=0.999,use_ema_warmup=true,power=0.75,update_after_step=2")
    assert warm.track == lag.EMATrack(decay=0.999, use_ema_warmup=True, power=0.75, update_after_step=2)
    assert synthesis.parse_target("ema:").track == lag.EMATrack()
    raw = synthesis.target_profile(synthesis.parse_target("raw"), t)
    assert raw[t] == 1.0 and raw.sum() == 1.0
    window = synthesis.target_profile(synthesis.parse_target("window=10"), t)
    np.testing.assert_allclose(window[-10:], 0.1) and np.testing.assert_allclose(window[:-10], 0.0)
    # LAWA over a power EMA target = lag's LAWA profile of that track; over a window target = the mean of windows.
    lawa = synthesis.target_profile(synthesis.parse_target("lawa:k=3,nu=7,start=2,over=sigma_rel=0.05"), t)
    window_cfg = LAWAConfig(k=3, every_n_steps=7, start_step=2)
    np.testing.assert_allclose(lawa, lag.lawa_profile(lag.power_ema(sigma_rel=0.05), window_cfg, t), atol=1e-15)
    nested = synthesis.target_profile(synthesis.parse_target("lawa:k=2,nu=10,over=window=4"), t)
    expected = np.zeros(t + 1)
    expected[77:81] += 0.125
    expected[87:91] += 0.125
    np.testing.assert_allclose(nested, expected, atol=1e-15)
    named = synthesis.parse_target("lawa:k=2,nu=10,over=p10")
    assert named.names() == ["p10"]
    np.testing.assert_allclose(synthesis.target_profile(named, t, POWER),
                               lag.snapshots_profile(POWER["p10"], [80, 90], t))


@pytest.mark.parametrize("text, words", [
    ("sigma_rel=0.3", "sigma_rel must be > 0 and < 0.2887"), ("sigma_rel=0", "sigma_rel must be > 0"),
    ("sigma_rel=-0.1", "sigma_rel must be > 0"), ("sigma_rel=abc", "sigma_rel must be a number"),
    ("decay=1.5", "decay must be >= 0 and < 1"), ("window=0", "window must be at least 1"),
    ("window=2.5", "window must be an integer"), ("lawa:k=5,nu=100", "ends with over="),
    ("lawa:k=5,over=ema", "needs k and nu"), ("lawa:k=5,nu=10,every=3,over=ema", "unknown LAWA key"),
    ("ema:speed=3", "unknown EMA option"), ("median=3", "not understood"), ("two words", "not understood"),
    ("", "a target is needed"),
])
def test_bad_targets_one_sentence(text, words):
    with pytest.raises(ValueError, match=words) as e:
        synthesis.parse_target(text)
    assert "\n" not in str(e.value)


def test_named_track_and_early_targets_refused():
    with pytest.raises(ValueError, match="known tracks: p05, p10"):
        synthesis.target_profile(synthesis.parse_target("ema_long"), 50, POWER)
    with pytest.raises(ValueError, match="first LAWA snapshot at step 100, after step 50"):
        synthesis.target_profile(synthesis.parse_target("lawa:k=2,nu=100,over=p05"), 50, POWER)
    with pytest.raises(ValueError, match="window of 80 iterates needs step >= 79"):
        synthesis.target_profile(synthesis.parse_target("window=80"), 50)
