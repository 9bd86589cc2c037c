"""The σ_rel grid of the search in hindsight is bounded and never merges values silently: past
``MAX_GRID_POINTS`` it needs ``--large-grid``; values that round to one another are refused in one sentence.

References: numpy's own geometric spacing and a count of the distinct values at 4 significant digits."""
from __future__ import annotations

import numpy as np
import pytest

from lawa_diffusion.posthoc import search as hindsight
from tests.helpers import make_run, one_line_error


def test_a_huge_grid_needs_the_explicit_flag():
    with pytest.raises(ValueError, match="asks for 100000 σ_rel values.*--large-grid"):
        hindsight.parse_sigma_rels("0.02:0.25:100000")  # before the bound it was accepted and scored for ever
    with pytest.raises(ValueError, match="asks for 65 σ_rel values"):
        hindsight.parse_sigma_rels(",".join(f"{0.01 + 0.001 * i:.3f}" for i in range(65)))
    edge = hindsight.parse_sigma_rels(f"0.02:0.25:{hindsight.MAX_GRID_POINTS}")
    np.testing.assert_allclose(edge, np.geomspace(0.02, 0.25, hindsight.MAX_GRID_POINTS), rtol=5e-4)
    big = hindsight.parse_sigma_rels("0.02:0.25:100", allow_large=True)
    assert len(big) == len(set(big)) == 100


@pytest.mark.parametrize("text, distinct", [("0.05:0.0501:50", 11), ("0.05,0.05", 1), ("0.1,0.10001", 1)])
def test_values_that_round_together_are_refused(text, distinct):
    values = np.geomspace(0.05, 0.0501, 50) if ":" in text else [float(v) for v in text.split(",")]
    assert len({float(f"{v:.4g}") for v in values}) == distinct  # the merge the grid used to make silently
    with pytest.raises(ValueError, match=f"but only {distinct} distinct one"):
        hindsight.parse_sigma_rels(text)


def test_the_command_refuses_a_huge_grid_before_any_work(tmp_path, capsys):
    run = str(tmp_path)
    make_run(run, steps=10)
    err = one_line_error(capsys, ["hindsight", run, "--sigma-rel", "0.02:0.25:100000", "-o", str(tmp_path / "x")])
    assert "--large-grid" in err and not (tmp_path / "x").exists()
    assert "only 1 distinct" in one_line_error(capsys, ["hindsight", run, "--sigma-rel", "0.05:0.050001:2"])
