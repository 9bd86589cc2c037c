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
from lawa_diffusion.posthoc import one_pass, snapshot_reader, synthesize
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
    layout = snapshot_reader.tensor_layout(plan.sources[1].path)
    assert len({e.dtype for e in layout.values()}) == 2  # no block lies together in one dtype
    expected = float64_sum([s.path for s in plan.sources], [1 / 3] * 3)
    for read, tile in ((one_pass.READ_ELEMENTS, one_pass.TILE_BYTES), (1000, 3 * 8 * 300), (37, 3 * 8 * 7)):
        with pytest.MonkeyPatch.context() as mp:  # blocks and tiles that cut tensors anywhere
            mp.setattr(one_pass, "READ_ELEMENTS", read)
            mp.setattr(one_pass, "MIN_ELEMENTS", min(read, one_pass.MIN_ELEMENTS))
            mp.setattr(one_pass, "TILE_BYTES", tile)
            got = plan.state_dict(torch.float64, progress=False)
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=0, atol=1e-12)


EIGHT = ["lawa:k=3,nu=10,over=p05", "decay=0.9", "c90", "--sigma-rel", "0.05:0.15:5"]


def _argv_targets(spec):
    argv, i = [], 0
    while i < len(spec):
        if spec[i] == "--sigma-rel":
            argv += spec[i:i + 2]
            i += 2
        else:
            argv += ["--target", spec[i]]
            i += 1
    return argv


def test_eight_targets_are_written_from_one_read_and_equal_eight_one_target_calls(tiny_run, tmp_path, capsys,
                                                                                monkeypatch):
    from tests.helpers import counted_reads, tensor_bytes

    run, _ = tiny_run
    with counted_reads(monkeypatch) as reads:
        assert cli.main(["synthesize", run, *_argv_targets(EIGHT), "--step", "60", "-o", str(tmp_path / "all"),
                         "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    targets = [r["target"] for r in records]
    assert len(targets) == 8 and targets[3:] == [f"sigma_rel={v:g}" for v in np.geomspace(0.05, 0.15, 5).round(4)]
    assert sorted(os.listdir(tmp_path / "all")) == sorted(synthesize.folder_name(t) for t in targets)
    # one read: every snapshot some target uses is opened once and its tensor bytes read once; the others not at all
    used = {c["path"] for r in records for c in r["coefficients"] if abs(c["coefficient"]) >= synthesize.SKIP_BELOW}
    stored = {os.path.abspath(p) for track in ("p05", "p10", "c90") for _, p in runfolder.list_ema_snapshots(run, track)}
    assert used <= stored and len(used) > 10
    for path in stored:
        assert reads.get(path, {"opens": 0, "bytes": 0}) == (
            {"opens": 1, "bytes": tensor_bytes(path)} if path in used else {"opens": 0, "bytes": 0}), path
    for i, record in enumerate(records):
        folder = tmp_path / "all" / synthesize.folder_name(record["target"])
        assert record["output"] == str(folder)
        assert json.loads((folder / SIDECAR_NAME).read_text()) == record
        alone = tmp_path / f"alone-{i}"
        assert cli.main(["synthesize", run, "--target", record["target"], "--step", "60", "-o", str(alone)]) == 0
        one, many = UNet2DModel.from_pretrained(alone).state_dict(), UNet2DModel.from_pretrained(folder).state_dict()
        assert json.loads((alone / SIDECAR_NAME).read_text())["coefficients"] == record["coefficients"]
        expected = float64_sum([c["path"] for c in record["coefficients"]],
                               [c["coefficient"] for c in record["coefficients"]])
        for name, value in expected.items():
            # the same weights to a few float32 roundings (with other targets the pass sums over the differences to
            # another snapshot), and both the float64 sum of the files to 1e-6 of the tensor's norm
            scale = value.abs().max().item()
            torch.testing.assert_close(many[name], one[name], rtol=0, atol=2.0 ** -20 * scale)
            for got in (one, many):
                assert (got[name].double() - value).norm() <= 1e-6 * value.norm()


def test_all_targets_are_checked_before_any_is_written(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    out = tmp_path / "none"
    for extra, words in ((["--target", "decay=0.97", "--tracks", "p05,p10"], "out of reach"),
                         (["--target", "sigma_rel=0.3"], "sigma_rel must be > 0"),
                         ([], "at least one target")):
        base = [] if not extra else ["--target", "sigma_rel=0.08", "--sigma-rel", "0.05,0.1"]
        assert cli.main(["synthesize", run, *base, *extra, "-o", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
        assert not out.exists()


def test_checksums_are_summed_from_the_one_read_and_a_changed_byte_writes_nothing(tiny_run, tmp_path, capsys,
                                                                                  monkeypatch):
    import shutil

    from lawa_diffusion.utils import checksums

    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    monkeypatch.setattr(checksums, "_verified", {})
    full_reads = []
    whole_file = checksums._file_checksum
    monkeypatch.setattr(checksums, "_file_checksum", lambda path, *a: full_reads.append(path) or whole_file(path, *a))
    argv = ["synthesize", str(run), "--target", "sigma_rel=0.08", "--step", "60", "--json", "-o"]
    assert cli.main([*argv, str(tmp_path / "one")]) == 0
    record = json.loads(capsys.readouterr().out)
    used = [c["path"] for c in record["coefficients"] if abs(c["coefficient"]) >= synthesize.SKIP_BELOW]
    assert full_reads == [] and len(used) > 3 and all(p in checksums._verified for p in used)
    monkeypatch.setattr(checksums, "_verified", {})
    data = bytearray(open(used[-1], "rb").read())
    data[-5] ^= 0x01  # a weight: same size and header, only the checksum tells
    with open(used[-1], "wb") as f:
        f.write(bytes(data))
    assert cli.main([*argv, str(tmp_path / "two")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{used[-1]}' does not match the checksum written with it" in err[0]
    assert not (tmp_path / "two").exists() and full_reads == []
