"""``lawa-diffusion fid`` / ``ref-stats`` on conditional models (a tiny Stable Diffusion pipeline folder, a
class-conditional UNet folder) against torch-fidelity's own calculate_metrics on the same images, and against the
conditional evaluator called directly with hand-built parts."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.cli import fid as fid_cli
from lawa_diffusion.evaluation import conditional, fid, inception, prompts
from tests.helpers import one_line_error, relative_error
from tests.tiny_pipelines import (
    ImagesDataset,
    build_text_to_image_pipeline,
    register_stand_in_with_torch_fidelity,
    tiny_class_unet,
    tiny_cond_unet,
    write_caption_folder,
    write_pngs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [f"a {c} {w}" for c in ("red", "blue", "green", "big", "small") for w in ("cat", "dog")]


@pytest.fixture(autouse=True)
def _stand_in(monkeypatch):
    """The fid command's feature network: the small stand-in (registered with torch-fidelity under its own name)."""
    extractor = inception.stand_in_extractor(dim=16)
    monkeypatch.setattr(fid_cli, "load_extractor", lambda *args, **kwargs: extractor)
    monkeypatch.setattr(cli, "COMMAND_MODULES", (cli.fid,))
    return extractor


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A tiny Stable Diffusion pipeline folder with a second denoiser beside its own, in unet_lawa."""
    folder = build_text_to_image_pipeline(tmp_path_factory.mktemp("cli-cond") / "pipe")
    tiny_cond_unet(seed=1).save_pretrained(os.path.join(folder, "unet_lawa"))
    return folder


def run_json(capsys, argv):
    code = cli.main(argv + ["--json", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), err


def test_subfolder_with_captioned_prompts_equals_torch_fidelity(pipe, tmp_path, capsys):
    import torch_fidelity

    captioned = write_caption_folder(tmp_path / "captioned", CAPTIONS)
    result, err = run_json(capsys, ["fid", pipe, "--subfolder", "unet_lawa", "--prompts", captioned,
                                    "--num-reference", "6", "--num-inference-steps", "2", "--no-kid"])
    assert "warning: FID from 6 < 2048" in err  # one image per held-out prompt by default
    # the same images, made by the evaluator from hand-built parts, and the held-out photos read with PIL
    parts = conditional.ConditionalPipelineParts.from_pretrained(pipe, device="cpu")
    held_out = prompts.PromptSet(prompts=tuple(CAPTIONS[4:]))
    images = conditional.sample_variants_conditional(parts, {"v": tiny_cond_unet(seed=1)}, held_out, num_samples=6,
                                                     num_inference_steps=2, progress=False)["v"]
    reference = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(captioned, f"img{i:03d}.png"))))
                             .permute(2, 0, 1) for i in range(4, 10)])
    expected = torch_fidelity.calculate_metrics(
        input1=ImagesDataset(images), input2=ImagesDataset(reference), fid=True,
        feature_extractor=register_stand_in_with_torch_fidelity(dim=16), feature_layer_fid="pool", cuda=False,
        cache=False, verbose=False, batch_size=4, save_cpu_ram=True)
    assert relative_error(result["fid"], expected["frechet_inception_distance"]) <= 1e-6
    assert result["num_samples"] == 6 and result["conditioning"] == "text" and result["guidance_scale"] == 7.5
    assert result["prompts_sha256"] == prompts.prompts_from_image_folder(captioned, num_reference=6).fingerprint()
    assert result["reference"] == f"reference of {captioned}" and "kid_mean" not in result
    # the pipeline's own unet is another model: another FID on the same noise
    own, _ = run_json(capsys, ["fid", pipe, "--prompts", captioned, "--num-reference", "6", "--num-inference-steps", "2", "--no-kid"])
    assert own["fid"] != result["fid"] and own["reference_key"] == result["reference_key"]


def test_text_file_prompts_with_options_equal_the_evaluator_called_directly(pipe, tmp_path, capsys, _stand_in):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red cat\n# a comment\na big dog\nthe tree\n")
    reference = write_pngs(tmp_path / "ref", 5)
    result, _ = run_json(capsys, ["fid", os.path.join(pipe, "unet_lawa"), "--pipeline", pipe, "--prompts",
                                  str(prompt_file), "--reference", reference, "--num-samples", "5",
                                  "--num-inference-steps", "2", "--guidance-scale", "3", "--seed", "2", "--no-kid"])
    parts = conditional.ConditionalPipelineParts.from_pretrained(pipe, device="cpu")
    ps = prompts.PromptSet(prompts=("a red cat", "a big dog", "the tree"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fid.SmallSampleWarning)
        expected = conditional.evaluate_variants_conditional(
            parts, {"v": tiny_cond_unet(seed=1)}, ps, reference, weights=_stand_in, num_samples=5,
            num_inference_steps=2, guidance_scale=3.0, seed=2, kid=False, progress=False)["v"]
    assert relative_error(result["fid"], expected["fid"]) <= 1e-9
    assert (result["guidance_scale"], result["seed"], result["num_prompts"]) == (3.0, 2, 3)
    assert result["prompts_sha256"] == ps.fingerprint() == expected["prompts_sha256"]
    again, _ = run_json(capsys, ["fid", pipe, "--subfolder", "unet_lawa", "--prompts", str(prompt_file), "--reference",
                                 reference, "--num-samples", "5", "--num-inference-steps", "2", "--guidance-scale", "1", "--seed", "2",
                                 "--no-kid"])
    assert again["guidance_scale"] == 1.0 and again["fid"] != result["fid"]  # no guidance: other images


def test_class_conditional_unet_folder_with_all_labels(tmp_path, capsys, _stand_in):
    from diffusers import DDIMScheduler, UNet2DModel

    folder = tmp_path / "cls"
    tiny_class_unet(num_classes=3).save_pretrained(folder)
    DDIMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")  # found beside the model
    reference = write_pngs(tmp_path / "ref", 6, size=8)
    result, _ = run_json(capsys, ["fid", str(folder), "--class-labels", "all", "--reference", reference,
                                  "--num-samples", "6", "--num-inference-steps", "2"])
    parts = conditional.ConditionalPipelineParts(unet=UNet2DModel.from_pretrained(folder).eval(),
                                                 scheduler=DDIMScheduler(num_train_timesteps=100))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fid.SmallSampleWarning)
        expected = conditional.evaluate_variants_conditional(
            parts, {"v": parts.unet}, prompts.class_label_set("all", 3), reference, weights=_stand_in,
            num_samples=6, num_inference_steps=2, progress=False)["v"]
    assert relative_error(result["fid"], expected["fid"]) <= 1e-9
    assert relative_error(result["kid_mean"], expected["kid_mean"]) <= 1e-9
    assert result["conditioning"] == "class" and result["num_prompts"] == 3 and result["guidance_scale"] is None
    some, _ = run_json(capsys, ["fid", str(folder), "--class-labels", "0,2", "--reference", reference,
                                "--num-samples", "6", "--num-inference-steps", "2"])
    assert some["num_prompts"] == 2 and some["fid"] != result["fid"]


def test_ref_stats_of_a_prompt_set_is_the_entry_fid_reads(pipe, tmp_path, capsys, _stand_in):
    captioned = write_caption_folder(tmp_path / "captioned", CAPTIONS)
    out = tmp_path / "stats.npz"
    assert cli.main(["ref-stats", "--prompts", captioned, "--num-reference", "4", "--image-size", "16", "--output",
                     str(out), "--json", "--device", "cpu"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_images"] == 4 and info["path"] == str(out)
    held = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(captioned, f"img{i:03d}.png"))))
                        .permute(2, 0, 1) for i in range(6, 10)])
    features = fid.extract_features(held, _stand_in, progress=False).double()
    stats = fid.ReferenceStats.load(out)
    np.testing.assert_allclose(stats.mu, features.mean(0).numpy(), rtol=1e-6, atol=1e-9)
    result, _ = run_json(capsys, ["fid", pipe, "--prompts", captioned, "--num-reference", "4", "--num-inference-steps", "2"])
    assert result["reference_key"] == info["key"]  # fid found the statistics ref-stats cached


@pytest.mark.parametrize("case, words", [
    ("pipeline without prompts", ["--prompts", "text-conditioned UNet2DConditionModel"]),
    ("text file without reference", ["--reference", "without images"]),
    ("unet without pipeline", ["--pipeline", "text-conditioned"]),
    ("class unet without labels", ["--class-labels", "class-conditional UNet2DModel"]),
    ("labels of an unconditional unet", ["unconditional UNet2DModel", "drop --prompts / --class-labels"]),
    ("dtype of an unconditional unet", ["--dtype", "only apply to conditional models"]),
    ("ref-stats without size", ["--image-size", "--height"]),
])
def test_wrong_conditional_input_is_one_line_exit_2(pipe, tmp_path, capsys, case, words):
    from diffusers import UNet2DModel

    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("a cat\n")
    tiny_class_unet().save_pretrained(tmp_path / "cls")
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2).save_pretrained(tmp_path / "plain")
    captioned = write_caption_folder(tmp_path / "captioned", CAPTIONS[:3])
    argv = {
        "pipeline without prompts": ["fid", pipe],
        "text file without reference": ["fid", pipe, "--prompts", str(prompt_file)],
        "unet without pipeline": ["fid", os.path.join(pipe, "unet_lawa"), "--prompts", captioned],
        "class unet without labels": ["fid", str(tmp_path / "cls")],
        "labels of an unconditional unet": ["fid", str(tmp_path / "plain"), "--class-labels", "all"],
        "dtype of an unconditional unet": ["fid", str(tmp_path / "plain"), "--dtype", "bf16"],
        "ref-stats without size": ["ref-stats", "--prompts", captioned],
    }[case]
    err = one_line_error(capsys, argv + ["--device", "cpu"])
    assert all(w in err for w in words), err
