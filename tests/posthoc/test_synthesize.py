"""``lawa-diffusion synthesize`` on a tiny run folder made here: power EMAs (PowerEMAModel) and a constant-decay
EMA kept online over a random walk of UNet weights, snapshots written by ``save_ema_snapshot``.
References: the float64 mean of the snapshot files, the constant-decay EMAModel kept online, and the float64
sum of the files with the solver's coefficients."""
from __future__ import annotations

import json
import os
import re
import types

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.engine.posthoc_snapshots import save_ema_snapshot
from lawa_diffusion.maths import lag
from lawa_diffusion.maths import profile_fit as synthesis
from lawa_diffusion.posthoc import synthesize
from lawa_diffusion.posthoc.synthesize import SIDECAR_NAME, plan_synthesis, write_synthesis
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.files import MARKER_NAME, atomic_save_safetensors, write_marker
from tests.helpers import EVERY, SYNTH_DECAY, SYNTH_STEPS, SYNTH_TINY, float64_sum, make_run


@pytest.fixture(autouse=True)
def _only_this_command(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", (cli.synthesize,))




@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread):
    run = str(tmp_path_factory.mktemp("synth-run"))
    return run, make_run(run)


def _files(run, track, steps):
    return [runfolder.snapshot_path(run, s, track) for s in steps]




def _flat(state, names):
    return torch.cat([state[n].double().reshape(-1) for n in names])


def test_lawa_target_through_the_cli_is_the_float64_mean_of_its_snapshots(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    out = tmp_path / "lawa"
    assert cli.main(["synthesize", run, "--target", "lawa:k=3,nu=10,over=p05", "--step", "60", "-o", str(out),
                     "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    model = UNet2DModel.from_pretrained(out)
    expected = float64_sum(_files(run, "p05", (40, 50, 60)), [1 / 3] * 3)
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(state[name].double(), value, rtol=0, atol=1e-6)
    chosen = {(c["track"], c["step"]): c["coefficient"] for c in record["coefficients"]}
    assert len(chosen) == 2 * SYNTH_STEPS // EVERY + SYNTH_STEPS // EVERY  # every stored snapshot of every track takes part
    for key, x in chosen.items():
        assert x == pytest.approx(1 / 3 if key in {("p05", 40), ("p05", 50), ("p05", 60)} else 0.0, abs=1e-9), key
    assert record["residual"] < 1e-9 and record["step"] == 60 and record["output"] == str(out)
    assert record["mean_lag"] == pytest.approx(record["target_mean_lag"], abs=1e-9)
    assert record["sigma_rel"] == pytest.approx(record["target_sigma_rel"], abs=1e-12)
    assert json.loads((out / SIDECAR_NAME).read_text()) == record
    config = json.loads((out / "config.json").read_text())  # nothing from_pretrained would not know
    assert set(config) - set(UNet2DModel(**SYNTH_TINY).config) <= {"_class_name", "_diffusers_version"}


def test_constant_decay_synthesised_from_two_power_emas_is_the_online_ema_within_the_residual_bound(tiny_run):
    run, walk = tiny_run
    plan = plan_synthesis(run, f"decay={SYNTH_DECAY}", step=SYNTH_STEPS, tracks=["p05", "p10"])
    assert {s.track for s in plan.sources} == {"p05", "p10"} and len(plan.sources) == 2 * SYNTH_STEPS // EVERY
    x = plan.solution.coefficients
    assert plan.solution.residual < synthesis.DEFAULT_MAX_RESIDUAL
    # the streamed sum is the float64 sum of the files with the solver's coefficients
    state = plan.state_dict(torch.float64, progress=False)
    reference = float64_sum([s.path for s in plan.sources], x)
    for name, value in reference.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=1e-12)
    # weight-space error against the EMA kept online: the profile difference r = achieved − target sums to 0, so
    # ‖Σ r(s) θ_s‖ <= ‖r‖ ‖Θ − mean θ‖_F; the snapshots' float32 rounding adds at most Σ|x| 2^-24 max‖θ‖.
    synth, online, thetas = _flat(state, walk["names"]), walk["online"], walk["thetas"]
    r = plan.solution.profile - plan.solution.target_profile
    spread = torch.linalg.norm(thetas - thetas.mean(0)).item()
    storage = float(np.abs(x).sum()) * 2.0 ** -24 * thetas.abs().max().item() * synth.numel() ** 0.5
    error = torch.linalg.norm(synth - online).item()
    assert error <= np.linalg.norm(r) * spread + storage
    movement = torch.linalg.norm(online - thetas[0]).item()
    assert error / movement < plan.solution.residual  # far below the weights' own movement
    # the exact profile maths says the same of the raw iterates (θ_s as rows): Σ r(s) θ_s
    predicted = torch.from_numpy(r) @ thetas
    assert torch.linalg.norm(synth - online - predicted).item() <= storage + 1e-9


def test_written_folder_loads_and_equals_the_api_state(tiny_run, tmp_path):
    run, walk = tiny_run
    plan = plan_synthesis(run, "sigma_rel=0.08", tracks=["p05", "p10"])
    again = plan_synthesis(run, "sigma_rel=0.08", snapshots=synthesize.find_snapshots(run, ["p05", "p10"]))
    np.testing.assert_array_equal(plan.solution.coefficients, again.solution.coefficients)
    record = write_synthesis(plan, tmp_path / "s08", progress=False)
    assert plan.step == SYNTH_STEPS and record["target"] == "sigma_rel=0.08"
    assert abs(record["sigma_rel"] - 0.08) < 0.01 and record["residual"] < synthesis.DEFAULT_MAX_RESIDUAL
    loaded = UNet2DModel.from_pretrained(tmp_path / "s08").state_dict()
    for name, value in plan.state_dict(torch.float32, progress=False).items():
        assert torch.equal(loaded[name], value)


def test_old_snapshots_take_their_track_from_config_yaml(tiny_run, tmp_path):
    run, _ = tiny_run
    assert "track_def" not in synthesize._metadata(runfolder.snapshot_path(run, 60, "c90"))
    plan = plan_synthesis(run, "lawa:k=2,nu=5,over=c90", step=30, tracks=["c90"])
    assert all(s.definition == lag.constant_ema(SYNTH_DECAY) for s in plan.sources)
    assert [s.step for s in plan.sources] == list(range(5, 31, 5))
    np.testing.assert_allclose(plan.solution.coefficients, [0, 0, 0, 0, 0.5, 0.5], atol=1e-9)


@pytest.fixture(scope="module")
def two_model_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("two-models"))
    small, wide = UNet2DModel(**SYNTH_TINY), UNet2DModel(**{**SYNTH_TINY, "block_out_channels": (8, 24)})
    names = [n for n, _ in small.named_parameters()]
    track = lag.power_ema(sigma_rel=0.1).to_dict()
    for step, model in ((5, small), (10, wide)):
        ema = types.SimpleNamespace(shadow_params=[p for _, p in model.named_parameters()][: len(names)])
        save_ema_snapshot(run, step, ema, names, dict(model.config), "p10", track)
    return run


@pytest.mark.parametrize("args, words", [
    (["--tracks", "p05,nope"], "--tracks names 'nope', a track with no snapshots"),
    (["--target", "lawa:k=2,nu=10,over=nope"], "names track 'nope', which"),
    (["--target", "sigma_rel=0.3"], "sigma_rel must be > 0 and < 0.2887"),
    (["--target", "sigma_rel=0"], "sigma_rel must be > 0 and < 0.2887"),
    (["--step", "33"], "--step 33 has no stored snapshot"),
    (["--target", "decay=0.97", "--tracks", "p05,p10"], "out of reach.*longer than the stored snapshots reach"),
    (["--target", "decay=0.9", "--tracks", "p05,p10", "--max-residual", "0.001"], "out of reach"),
    (["--no-overwrite"], "already exists; choose another path or pass --overwrite"),
    (["--models"], "snapshots come from different model configs"),
    (["--empty"], "has no ema_snapshots"),
])
def test_bad_input_one_line_exit_2_output_untouched(tiny_run, two_model_run, tmp_path, capsys, args, words):
    run, _ = tiny_run
    out = tmp_path / "kept"
    out.mkdir()
    (out / "marker").write_text("mine")
    write_marker(out, "synthesize")  # an earlier output: --overwrite may replace it, a bad input must not
    argv = ["synthesize", run, "--target", "sigma_rel=0.08", "-o", str(out), "--overwrite"]
    if args == ["--no-overwrite"]:
        argv.remove("--overwrite")
    elif args == ["--models"]:
        argv[1] = two_model_run
    elif args == ["--empty"]:
        argv[1] = str(tmp_path / "empty-run")
        os.makedirs(argv[1])
    else:
        for i in range(0, len(args), 2):
            if args[i] in argv:
                argv[argv.index(args[i]) + 1] = args[i + 1]
            else:
                argv += args[i:i + 2]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lawa-diffusion synthesize: error:")
    assert re.search(words, err), err
    assert sorted(os.listdir(out)) == [MARKER_NAME, "marker"] and (out / "marker").read_text() == "mine"


def test_mixed_dtype_and_scattered_files_sum_like_float64(tmp_path):
    # Files whose tensors are of several dtypes (no block lies together in one dtype) and files of another
    # storage dtype than their neighbours: every reading path against the float64 sum of the files.
    run = str(tmp_path / "run")
    unet = UNet2DModel(**SYNTH_TINY)
    config = json.dumps(dict(unet.config))
    definition = json.dumps(lag.power_ema(sigma_rel=0.1).to_dict())
    state = unet.state_dict()
    for step in (2, 4, 6):
        kinds = {2: lambda i: torch.float16, 4: lambda i: (torch.float32, torch.bfloat16)[i % 2],
                 6: lambda i: torch.float64}[step]
        tensors = {n: (t + 0.01 * step * torch.randn_like(t)).to(kinds(i)) for i, (n, t) in enumerate(state.items())}
        atomic_save_safetensors(runfolder.snapshot_path(run, step, "p10"), tensors, metadata={
            "step": str(step), "track": "p10", "model_config": config, "track_def": definition})
    plan = plan_synthesis(run, "lawa:k=3,nu=2,over=p10")
    layout = synthesize.tensor_layout(plan.sources[1].path)
    assert not synthesize._contiguous(layout, sorted(layout, key=lambda n: layout[n][2]))
    old = synthesize.BLOCK_ELEMENTS
    try:
        for block in (old, 1000, 1):
            synthesize.BLOCK_ELEMENTS = block
            got = plan.state_dict(torch.float64, progress=False)
            expected = float64_sum([s.path for s in plan.sources], [1 / 3] * 3)
            for name, value in expected.items():
                torch.testing.assert_close(got[name], value, rtol=0, atol=1e-12)
    finally:
        synthesize.BLOCK_ELEMENTS = old
