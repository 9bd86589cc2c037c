import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.cli import fid as fid_cli
from lawa_diffusion.evaluation import fid, inception, sampling
from lawa_diffusion.evaluation import images as data
from lawa_diffusion.utils.files import cache_root
from tests.helpers import ROOT, relative_error


def tiny_unet(seed=0, size=8):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def write_pngs(folder, arrays):
    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


@pytest.fixture
def real_weights():
    try:
        return inception.resolve_weights(fetch=False)
    except FileNotFoundError as e:
        pytest.skip(f"no Inception weights here ({e}); run `lawa-diffusion inception fetch`")


@pytest.fixture
def stand_in():
    return inception.stand_in_extractor(dim=16)


def _run_cli(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------- parity with torch-fidelity


def test_cli_fid_equals_torch_fidelity_on_two_folders(tmp_path, capsys, real_weights):
    import torch_fidelity

    rng = np.random.RandomState(0)
    a = write_pngs(tmp_path / "a", [rng.randint(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(4)])
    b = write_pngs(tmp_path / "b", [rng.randint(0, 120, (16, 16, 3), dtype=np.uint8) for _ in range(4)])
    expected = torch_fidelity.calculate_metrics(
        input1=a, input2=b, fid=True, kid=True, kid_subset_size=4, cuda=False, cache=False, verbose=False,
        save_cpu_ram=True, feature_extractor_weights_path=real_weights.path)
    code, out, err = _run_cli(capsys, ["fid", a, "--reference", b, "--json", "--device", "cpu",
                                       "--inception-weights", real_weights.path])
    assert code == 0, err
    result = json.loads(out)
    assert relative_error(result["fid"], expected["frechet_inception_distance"]) <= 1e-6
    assert relative_error(result["kid_mean"], expected["kernel_inception_distance_mean"]) <= 1e-6
    assert result["inception_sha256"] == inception.sha256_file(real_weights.path)
    assert result["num_samples"] == 4
    assert "warning: FID from 4 < 2048 images" in err


def test_stats_of_one_weights_file_never_served_for_another(tmp_path, real_weights, capsys):
    state = torch.load(real_weights.path, map_location="cpu", weights_only=False)
    state["Mixed_7c.branch_pool.bn.bias"] += 0.5
    other = str(tmp_path / "other.pth")
    torch.save(state, other)
    images = torch.randint(0, 256, (3, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    kwargs = dict(device="cpu", progress=False)
    first = fid.reference_stats(images, weights=real_weights.path, **kwargs)
    second = fid.reference_stats(images, weights=other, **kwargs)
    assert first.key != second.key
    assert (first.inception_sha256, second.inception_sha256) == (real_weights.sha256, inception.sha256_file(other))
    assert not np.allclose(first.mu, second.mu)
    # a stats file planted under the other weights' key is not served either
    os.replace(first.path, second.path)
    third = fid.reference_stats(images, weights=other, **kwargs)
    np.testing.assert_array_equal(third.mu, second.mu)
    # an explicit stats file from other weights is refused with one sentence
    with pytest.raises(ValueError, match="was computed with Inception weights sha256"):
        fid.reference_stats(third.path, weights=real_weights.path)


# --------------------------------------------------------------------------- reference cache


def test_cache_hit_does_not_touch_images(tmp_path, stand_in, monkeypatch):
    rng = np.random.RandomState(1)
    folder = write_pngs(tmp_path / "ref", [rng.randint(0, 256, (8, 8), dtype=np.uint8) for _ in range(6)])
    first = fid.reference_stats(folder, weights=stand_in, progress=False, image_size=8)
    assert os.path.isfile(first.path)

    def refuse(*args, **kwargs):
        raise AssertionError("images were read on a cache hit")

    monkeypatch.setattr(data, "load_images", refuse)
    monkeypatch.setattr(data, "_read_image", refuse)
    hit = fid.reference_stats(folder, weights=stand_in, progress=False, image_size=8)
    np.testing.assert_array_equal(hit.mu, first.mu)
    assert torch.equal(hit.features, first.features)
    other_size = pytest.raises(AssertionError, match="images were read")
    with other_size:  # preprocessing is part of the key
        fid.reference_stats(folder, weights=stand_in, progress=False, image_size=16)
    write_pngs(tmp_path / "more", [np.zeros((8, 8), np.uint8)])
    os.replace(tmp_path / "more" / "000.png", tmp_path / "ref" / "999.png")
    with pytest.raises(AssertionError, match="images were read"):  # the data fingerprint changed
        fid.reference_stats(folder, weights=stand_in, progress=False, image_size=8)


def test_stats_file_round_trip(tmp_path, stand_in):
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    stats = fid.reference_stats(images, weights=stand_in, cache=False, progress=False)
    stats.save(tmp_path / "s.npz")
    loaded = fid.reference_stats(str(tmp_path / "s.npz"), weights=stand_in)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.inception_sha256 == stand_in.sha256 and loaded.num_images == 5


# --------------------------------------------------------------------------- metric maths


def test_metrics_match_independent_float64_formulas(stand_in):
    rng = np.random.RandomState(0)
    gen = torch.from_numpy(rng.randn(40, 6).astype(np.float32))
    ref_feats = torch.from_numpy((rng.randn(50, 6) * 1.3 + 0.4).astype(np.float32))
    stats = fid.stats_from_features(ref_feats, extractor=stand_in)
    out = fid.metrics_from_features(gen, stats, kid=True, kid_subsets=1, kid_subset_size=40)
    x, y = gen.double().numpy(), ref_feats.double().numpy()
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = x.mean(0) - y.mean(0)
    naive = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert relative_error(out["fid"], naive) <= 1e-5
    # KID with one subset of all 40 generated features: unbiased MMD^2, cubic polynomial kernel
    idx = np.random.RandomState(2020).choice(40, 40, replace=False)
    idy = np.random.RandomState(2020)
    idy.choice(40, 40, replace=False)
    y40 = y[idy.choice(50, 40, replace=False)]
    k = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3
    kxx, kyy, kxy = k(x[idx], x[idx]), k(y40, y40), k(x[idx], y40)
    m = 40
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
    assert relative_error(out["kid_mean"], mmd) <= 1e-4


def test_to_uint8_is_diffusers_conversion():
    from diffusers.utils.pil_utils import numpy_to_pil

    x = torch.linspace(-1.2, 1.2, 2 * 3 * 5 * 5).reshape(2, 3, 5, 5)
    pil = numpy_to_pil((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    expected = torch.from_numpy(np.stack([np.asarray(p) for p in pil])).permute(0, 3, 1, 2)
    assert torch.equal(sampling.to_uint8(x), expected)


# --------------------------------------------------------------------------- sampling


def test_sampling_equals_ddim_pipeline():
    from diffusers import DDIMPipeline, DDIMScheduler

    unet = tiny_unet(0).eval()
    scheduler = DDIMScheduler(num_train_timesteps=100)
    generators = [torch.Generator().manual_seed(sampling.sample_seed(5, i)) for i in range(3)]
    out = DDIMPipeline(unet, scheduler)(batch_size=3, generator=generators, num_inference_steps=4, eta=0.0,
                                       output_type="np").images
    expected = torch.from_numpy((out * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)
    ours = sampling.sample_uint8(unet, sampling.build_scheduler("ddim", scheduler.config), [0, 1, 2], seed=5,
                                 num_inference_steps=4)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_samples_do_not_depend_on_batching(name):
    unet = tiny_unet(0).eval()
    make = lambda: sampling.build_scheduler(name, {"num_train_timesteps": 100})
    whole = sampling.sample_uint8(unet, make(), list(range(5)), seed=1, num_inference_steps=3)
    parts = torch.cat([sampling.sample_uint8(unet, make(), [0, 1], seed=1, num_inference_steps=3),
                       sampling.sample_uint8(unet, make(), [2, 3, 4], seed=1, num_inference_steps=3)])
    assert (whole.int() - parts.int()).abs().max() <= 1
    assert (whole == parts).float().mean() > 0.99
    assert not torch.equal(whole, sampling.sample_uint8(unet, make(), list(range(5)), seed=2, num_inference_steps=3))


@pytest.mark.parametrize("name", ["dpm", "euler", "ddim"])
def test_bf16_autocast_sampling_keeps_the_sampler_state_in_float32(name):
    """Under autocast the UNet returns bf16; DPM-Solver and Euler cast their next sample to the model output's
    dtype, so the output must reach the scheduler in the sample's dtype."""
    unet = tiny_unet(0).eval()
    scheduler = sampling.build_scheduler(name, {"num_train_timesteps": 100})
    seen = []
    step = scheduler.step

    def recording_step(model_output, t, sample, *args, **kwargs):
        out = step(model_output, t, sample, *args, **kwargs)
        seen.append((model_output.dtype, sample.dtype, out.prev_sample.dtype))
        return out

    scheduler.step = recording_step
    images = sampling.sample_uint8(unet, scheduler, [0, 1], seed=1, num_inference_steps=4, precision="bf16")
    assert len(seen) == 4 and set(seen) == {(torch.float32, torch.float32, torch.float32)}
    assert images.dtype == torch.uint8


@contextlib.contextmanager
def swapped(host, state):
    backup = {k: v.clone() for k, v in host.state_dict().items()}
    host.load_state_dict(state)
    try:
        yield host
    finally:
        host.load_state_dict(backup)


def test_evaluate_variants_uses_common_random_numbers(stand_in):
    a, host = tiny_unet(0), tiny_unet(1)
    host.train()
    before = {k: v.clone() for k, v in host.state_dict().items()}
    reference = fid.reference_stats(torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8), weights=stand_in,
                                    cache=False, progress=False)
    variants = {"raw": a, "swapped": lambda: swapped(host, a.state_dict()), "other": host}
    with pytest.warns(fid.SmallSampleWarning):
        out = sampling.evaluate_variants(variants, reference, num_samples=6, batch_size=4, num_inference_steps=3,
                                    weights=stand_in, progress=False, kid_subset_size=5)
    assert out["raw"]["fid"] == out["swapped"]["fid"] and out["raw"]["kid_mean"] == out["swapped"]["kid_mean"]
    assert out["other"]["fid"] != out["raw"]["fid"]
    assert out["raw"]["num_samples"] == 6 and out["raw"]["inception_sha256"] == stand_in.sha256
    assert all(torch.equal(before[k], v) for k, v in host.state_dict().items()) and host.training


def test_num_samples_below_two_is_refused(stand_in):
    reference = fid.stats_from_features(torch.randn(4, 16), extractor=stand_in)
    with pytest.raises(ValueError, match="num_samples .* must be an integer >= 2"):
        sampling.evaluate_variants({"raw": tiny_unet(0)}, reference, num_samples=1, weights=stand_in)


MULTI = r"""
import json, os, sys, torch
from accelerate import Accelerator
sys.path.insert(0, os.path.dirname(sys.argv[2]))  # the checkout: the tests package imports from it
from tests.helpers import tiny_unet
from lawa_diffusion.evaluation import fid, inception, sampling
acc = Accelerator(cpu=True)
ex = inception.stand_in_extractor(dim=16)
ref = fid.reference_stats(torch.arange(7 * 64, dtype=torch.int64).remainder(251).to(torch.uint8).view(7, 1, 8, 8),
                          weights=ex, cache=False, progress=False, accelerator=acc)
out = sampling.evaluate_variants({"raw": tiny_unet(0)}, ref, num_samples=7, batch_size=2, num_inference_steps=3,
                                 weights=ex, progress=False, accelerator=acc, kid_subset_size=5)
if acc.is_main_process:
    json.dump({"ref_mu": ref.mu.tolist(), "processes": acc.num_processes, **out["raw"]}, open(sys.argv[1], "w"))
"""


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    script = tmp_path / "multi.py"
    script.write_text(MULTI)
    tests_dir = str(ROOT / "tests")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), str(script),
               str(tmp_path / f"out{n}.json"), tests_dir]
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    one, two = (json.loads((tmp_path / f"out{n}.json").read_text()) for n in (1, 2))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["ref_mu"] == two["ref_mu"]
    assert one["fid"] == pytest.approx(two["fid"], rel=1e-9) and one["kid_mean"] == pytest.approx(two["kid_mean"], rel=1e-9)


# --------------------------------------------------------------------------- CLI


def _bad_input_cases(tmp_path):
    rng = np.random.RandomState(0)
    good = write_pngs(tmp_path / "good", [rng.randint(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("x")
    corrupt = write_pngs(tmp_path / "corrupt", [np.zeros((8, 8), np.uint8)])
    (tmp_path / "corrupt" / "001.png").write_bytes(b"\x89PNG broken")
    mixed = write_pngs(tmp_path / "mixed", [np.zeros((8, 8), np.uint8), np.zeros((9, 9), np.uint8)])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    ref = ["--reference", good]
    return {
        "empty folder": ([str(tmp_path / "empty"), *ref], "has no image files"),
        "non-images": ([str(tmp_path / "text"), *ref], "has no image files"),
        "corrupt image": ([corrupt, *ref], "could not be decoded"),
        "mixed sizes": ([mixed, *ref], "images of 2 sizes"),
        "missing model folder": ([str(tmp_path / "nope"), *ref], "does not exist"),
        "missing subfolder": ([str(model), "--subfolder", "unet_ema", *ref], "--subfolder 'unet_ema' does not exist"),
        "wrong weights": ([good, *ref, "--inception-weights", str(wrong)], "not torch-fidelity's InceptionV3"),
        "one sample": ([str(model), "--num-samples", "1", *ref], "num_samples must be an integer >= 2"),
        "bad reference": ([good, "--reference", str(tmp_path / "empty")], "has no image files"),
    }


def test_cli_bad_inputs_fail_with_one_sentence(tmp_path, capsys):
    cases = _bad_input_cases(tmp_path)
    stats_dir = os.path.join(cache_root(), "stats")
    before = sorted(os.listdir(stats_dir)) if os.path.isdir(stats_dir) else []
    for name, (argv, message) in cases.items():
        output = tmp_path / "result.json"
        code, out, err = _run_cli(capsys, ["fid", *argv, "--device", "cpu", "--output", str(output), "--json"])
        assert code == 2, name
        lines = [line for line in err.splitlines() if not line.startswith("warning:")]
        assert len(lines) == 1 and message in lines[0], (name, err)
        assert not output.exists() and out == "", name
    after = sorted(os.listdir(stats_dir)) if os.path.isdir(stats_dir) else []
    assert after == before


def test_cli_refuses_to_overwrite_output(tmp_path, capsys):
    output = tmp_path / "result.json"
    output.write_text("keep me")
    code, _, err = _run_cli(capsys, ["fid", str(tmp_path), "--output", str(output)])
    assert code == 2 and "--overwrite" in err and output.read_text() == "keep me"


def _pipeline_and_reference(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler

    pipeline = tmp_path / "pipe"
    DDPMPipeline(unet=tiny_unet(0), scheduler=DDPMScheduler(num_train_timesteps=50)).save_pretrained(pipeline)
    rng = np.random.RandomState(0)
    ref = write_pngs(tmp_path / "ref", [rng.randint(0, 256, (8, 8), dtype=np.uint8) for _ in range(3)])
    return ["fid", str(pipeline), "--reference", ref, "--num-samples", "3", "--num-inference-steps", "2", "--json", "--device", "cpu"]


def test_cli_fid_on_pipeline_and_model_folders(tmp_path, capsys, monkeypatch, stand_in):
    """The CLI's model path (sampling, scheduler config, subfolder, warning, JSON) with the stand-in network."""
    monkeypatch.setattr(fid_cli, "load_extractor", lambda *args, **kwargs: stand_in)
    argv = _pipeline_and_reference(tmp_path)
    code, out, err = _run_cli(capsys, argv)
    assert code == 0, err
    result = json.loads(out)
    assert result["inception_sha256"] == stand_in.sha256 and result["num_samples"] == 3
    assert np.isfinite(result["fid"]) and result["fid"] > 0 and "kid_mean" in result
    assert "warning: FID from 3 < 2048" in err and "note: no scheduler_config" not in err
    code, out, err = _run_cli(capsys, argv[:2] + ["--subfolder", "unet"] + argv[2:] + ["--no-kid"])
    assert code == 0, err
    again = json.loads(out)
    assert again["fid"] == result["fid"] and "kid_mean" not in again  # same noise, same scheduler config
    code, out, err = _run_cli(capsys, argv + ["--seed", "1"])
    assert json.loads(out)["fid"] != result["fid"]


@pytest.mark.slow
def test_cli_fid_on_pipeline_folder_with_real_weights(tmp_path, capsys, real_weights):
    code, out, err = _run_cli(capsys, _pipeline_and_reference(tmp_path))
    assert code == 0, err
    result = json.loads(out)
    assert result["inception_sha256"] == real_weights.sha256 and np.isfinite(result["fid"])
