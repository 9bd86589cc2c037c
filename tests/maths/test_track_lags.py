"""The pure-delay baseline of a LAWA window: the snapshot nearest step − ΔL.
"""
from __future__ import annotations

import pytest

from lawa_diffusion.maths import lag
from lawa_diffusion.maths.track_lags import delayed_snapshot, nearest_snapshot, window_delta_lag


def test_nearest_snapshot_breaks_ties_towards_the_earlier_step():
    assert nearest_snapshot([2, 4, 6], 5.0) == 4 and nearest_snapshot([2, 4, 6], 5.0 + 1e-9) == 4
    assert nearest_snapshot([2, 4, 6], 4.6) == 4 and nearest_snapshot([2, 4, 6], 5.1) == 6


@pytest.mark.parametrize("held, want", [
    ([1000, 1100], 1000),               # k = 2: ΔL = 50 lies halfway; the earlier snapshot, not the current EMA
    ([900, 1000, 1100], 1000),          # odd k: the middle snapshot is exactly ΔL = 100 back
    ([800, 900, 1000, 1100], 900),      # even k: ΔL = 150, halfway between 900 and 1000
])
def test_delayed_baseline_is_a_real_delay_for_even_windows(held, want):
    """A constant-decay EMA far past its start: a window of snapshots ν apart adds ΔL = (n − 1)ν/2 exactly (up to
    rounding), and the baseline is the snapshot nearest step − ΔL, the earlier one on a tie."""
    track, step = lag.constant_ema(0.9), held[-1]
    assert window_delta_lag(track, held, step) == pytest.approx((len(held) - 1) * 100 / 2, abs=1e-9)
    assert delayed_snapshot(track, held, step) == want
