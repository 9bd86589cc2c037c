"""The launch plugin's FID on a text-to-image script (scripts/train_text_to_image.py, unmodified).

References are independent of the plugin: the same script run without it (its weights, bitwise), and the
conditional evaluator run afterwards on the checkpoint's saved unet_ema / unet_lawa folders with the pipeline
folder's own parts and a prompt set loaded here (its FID numbers). FID uses the small stand-in extractor.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lawa_diffusion import launch
from lawa_diffusion.utils.files import read_jsonl
from tests.helpers import ROOT, fresh_accelerate, weights
from tests.tiny_pipelines import build_text_to_image_pipeline, write_caption_folder

SCRIPT = ROOT / "scripts" / "train_text_to_image.py"
STEPS, CKPT, FID_EVERY = 6, 3, 3
CAPTIONS = ("a photo of a red cat", "a big dog", "a small blue car", "the green tree", "a cat on the car",
            "a red dog", "a big blue tree", "the small cat")
NUM_REFERENCE = 4
LAWA_ARGS = ["--lawa_k", "2", "--lawa_every_n_steps", "2"]
FID_ARGS = ["--lawa_fid_every_n_steps", str(FID_EVERY), "--lawa_fid_num_samples", "4", "--lawa_fid_batch_size", "4",
            "--lawa_fid_num_inference_steps", "2"]
VALIDATION = ["a red cat", "a big blue dog"]

pytestmark = pytest.mark.filterwarnings("ignore:FID from")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs its tiny models on one thread (see conftest.one_thread)."""


@pytest.fixture(scope="module")
def stand_in():
    """The stand-in feature extractor in place of Inception, for the whole module (the FID module is imported
    first: it binds load_extractor at import, and must keep the real one for the modules that run after this)."""
    from lawa_diffusion.evaluation import fid, inception  # noqa: F401

    extractor = inception.stand_in_extractor(dim=16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(inception, "load_extractor", lambda *a, **k: extractor)
        yield extractor


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return Path(build_text_to_image_pipeline(tmp_path_factory.mktemp("sd") / "pipe", scheduler="ddpm"))


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    return Path(write_caption_folder(tmp_path_factory.mktemp("data") / "captions", CAPTIONS, size=16))


def script_args(pipeline: Path, captions: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["--pretrained_model_name_or_path", str(pipeline), "--train_data_dir", str(captions), "--output_dir",
            str(out), "--use_ema", "--max_train_steps", str(steps), "--checkpointing_steps", str(CKPT), "--seed", "0",
            "--train_batch_size", "2", *extra]


def run_plugin(argv: list[str]) -> int:
    with fresh_accelerate():
        return launch.main(argv)


@pytest.fixture(scope="module")
def plain_run(pipeline, captions, tmp_path_factory) -> Path:
    """The script alone (no plugin)."""
    out = tmp_path_factory.mktemp("plain") / "run"
    with fresh_accelerate():
        launch.run_script(str(SCRIPT), script_args(pipeline, captions, out))
    return out


@pytest.fixture(scope="module")
def plugin_run(pipeline, captions, stand_in, tmp_path_factory) -> Path:
    """The script under the plugin: FID on the held-out captioned rows, post-hoc snapshots every 2 steps."""
    out = tmp_path_factory.mktemp("plugin") / "run"
    code = run_plugin([*LAWA_ARGS, *FID_ARGS, "--lawa_fid_prompts", str(captions), "--lawa_fid_num_reference",
                       str(NUM_REFERENCE), "--lawa_posthoc_every_n_steps", "2", str(SCRIPT),
                       *script_args(pipeline, captions, out)])
    assert code == 0
    return out


# ----------------------------------------------------------------------------- (a) rows and weights
def test_fid_rows_match_an_offline_evaluation_of_the_saved_weights(plugin_run, pipeline, captions, stand_in):
    from diffusers import UNet2DConditionModel

    from lawa_diffusion.evaluation import conditional, prompts

    rows = read_jsonl(plugin_run / "metrics.jsonl")
    assert [(r["step"], r["variant"]) for r in rows] == [(s, v) for s in (3, 6) for v in ("ema", "lawa")]
    prompt_set = prompts.load_prompt_set(str(captions), num_reference=NUM_REFERENCE)
    assert {r["conditioning"] for r in rows} == {"text"}
    assert {r["prompts_sha256"] for r in rows} == {prompt_set.fingerprint()}
    parts = conditional.ConditionalPipelineParts.from_pretrained(pipeline, device="cpu")
    models = {v: UNet2DConditionModel.from_pretrained(plugin_run / f"checkpoint-{STEPS}" / f"unet_{v}")
              for v in ("ema", "lawa")}
    offline = conditional.evaluate_variants_conditional(parts, models, prompt_set, num_samples=4, batch_size=4,
                                                        num_inference_steps=2, scheduler="ddim", weights=stand_in,
                                                        progress=False, cache=False)
    for row in rows[2:]:
        assert row["fid"] == pytest.approx(offline[row["variant"]]["fid"], rel=1e-4)
        assert row["guidance_scale"] == parts.guidance_scale == 7.5
    assert rows[2]["fid"] != rows[3]["fid"]


def test_plugin_leaves_the_scripts_weights_bitwise(plugin_run, plain_run):
    for name in (f"checkpoint-{CKPT}/unet", f"checkpoint-{CKPT}/unet_ema", "unet", "unet_ema"):
        got, want = weights(plugin_run / name), weights(plain_run / name)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    assert not (plain_run / "metrics.jsonl").exists() and (plugin_run / f"checkpoint-{STEPS}" / "unet_lawa").is_dir()


def test_run_records_its_evaluation_and_snapshot_class(plugin_run, captions):
    from safetensors import safe_open

    from lawa_diffusion.runs import folder as runfolder

    saved = runfolder.read_config(str(plugin_run))  # RUN/lawa_eval.yaml: the plugin run has no config.yaml
    assert saved["eval"]["prompts"] == str(captions.resolve()) and saved["eval"]["num_reference"] == NUM_REFERENCE
    assert saved["eval"]["every_n_steps"] == FID_EVERY and saved["eval"]["variants"] == ["ema", "lawa"]
    assert saved["model"]["_class_name"] == "UNet2DConditionModel" and saved["model"]["cross_attention_dim"] == 32
    steps = [s for s, _ in runfolder.list_ema_snapshots(str(plugin_run), "sigma_rel_0.05")]
    assert steps == [2, 4, 6]
    with safe_open(runfolder.snapshot_path(str(plugin_run), 6, "sigma_rel_0.05"), framework="pt") as f:
        assert json.loads(f.metadata()["model_config"])["_class_name"] == "UNet2DConditionModel"


def test_synthesize_builds_the_scripts_model_class(plugin_run, tmp_path):
    from diffusers import UNet2DConditionModel

    from lawa_diffusion.cli import entry as cli

    out = tmp_path / "synth"
    assert cli.main(["synthesize", str(plugin_run), "--target", "sigma_rel=0.07", "-o", str(out)]) == 0
    model = UNet2DConditionModel.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    assert set(model.state_dict()) == set(weights(plugin_run / "unet_ema"))


# ----------------------------------------------------------------------------- (b) the report
def test_report_shows_the_ema_and_lawa_curves_of_the_run(plugin_run, capsys):
    from lawa_diffusion.cli import entry as cli

    assert cli.main(["report", str(plugin_run)]) == 0
    table = capsys.readouterr().out
    assert "speed-up" in table and "EMA step to match" in table
    summary = json.loads((plugin_run / "report" / "report.json").read_text())
    rows = read_jsonl(plugin_run / "metrics.jsonl")
    for variant in ("ema", "lawa"):
        curve = summary["curves"][variant]
        assert curve["steps"] == [3, 6]
        assert curve["mean"] == [r["fid"] for r in rows if r["variant"] == variant]
    assert [row["step"] for row in summary["per_step"]] == [3, 6]


# ----------------------------------------------------------------------------- (c) the script's prompts
def test_prompts_come_from_the_scripts_validation_prompts(pipeline, captions, stand_in, tmp_path):
    from lawa_diffusion.evaluation import prompts

    out = tmp_path / "run"
    code = run_plugin([*LAWA_ARGS, *FID_ARGS, "--lawa_fid_reference", str(captions), "--lawa_fid_guidance_scale",
                       "1", str(SCRIPT), *script_args(pipeline, captions, out, "--validation_prompts", *VALIDATION,
                                                      steps=FID_EVERY)])
    assert code == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["variant"]) for r in rows] == [(3, "ema"), (3, "lawa")]
    expected = prompts.PromptSet(prompts=tuple(VALIDATION)).fingerprint()
    assert {r["prompts_sha256"] for r in rows} == {expected} and not any("guidance_scale" in r for r in rows)
    saved = yaml.safe_load((out / "lawa_eval.yaml").read_text())["eval"]
    assert prompts.load_prompt_set(saved["prompts"]).prompts == tuple(VALIDATION)
    assert saved["guidance_scale"] == 1.0 and saved["pipeline"] == str(pipeline.resolve())


# ----------------------------------------------------------------------------- (d) no prompts anywhere
def test_no_prompts_anywhere_is_one_sentence_before_training(pipeline, captions, tmp_path, capsys):
    out = tmp_path / "run"
    code = run_plugin([*LAWA_ARGS, *FID_ARGS, "--lawa_fid_reference", str(captions), str(SCRIPT),
                       *script_args(pipeline, captions, out)])
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1, errors
    assert all(word in errors[0] for word in ("--lawa_fid_prompts", "UNet2DConditionModel", "--validation_prompts"))
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- options
def test_conditional_fid_options_are_parsed_and_checked(tmp_path):
    from lawa_diffusion.integrations import plugin_options
    from lawa_diffusion.integrations.fid_monitor import script_option_values

    options = plugin_options.resolve_options({"fid_guidance_scale": "3.5", "fid_num_reference": "4",
                                              "fid_every_n_steps": "2", "fid_prompts": str(tmp_path)}, {})
    assert options.launch.fid_guidance_scale == 3.5 and options.launch.fid_num_reference == 4
    with pytest.raises(ValueError, match="--lawa_fid_guidance_scale must be a number"):
        plugin_options.resolve_options({"fid_guidance_scale": "high"}, {})
    with pytest.raises(ValueError, match="not both"):
        plugin_options.resolve_options({"fid_prompts": "p.txt", "fid_class_labels": "all"}, {})
    with pytest.raises(ValueError, match="needs fid_reference"):  # a prompts text file has no reference images
        plugin_options.resolve_options({"fid_every_n_steps": "2", "fid_prompts": str(tmp_path / "p.txt")}, {})
    args = ["--output_dir", "o", "--validation_prompts", "a cat", "a dog", "--seed", "0"]
    assert script_option_values(args, "validation_prompts") == ["a cat", "a dog"]
    assert script_option_values(["--validation_prompts=one"], "validation_prompts") == ["one"]
    assert script_option_values(args, "missing") is None


def test_pipeline_parts_without_model_index_sample_as_the_pipeline_folder(pipeline, tmp_path):
    """A Hub snapshot the script downloaded part by part has no model_index.json: the parts' own configs say what
    to load, and they sample what the complete pipeline folder samples."""
    import shutil

    from lawa_diffusion.evaluation import conditional
    from lawa_diffusion.evaluation.prompts import PromptSet
    from lawa_diffusion.training import pipeline_parts
    from tests.tiny_pipelines import tiny_cond_unet

    parts_only = tmp_path / "parts"
    shutil.copytree(pipeline, parts_only)
    (parts_only / "model_index.json").unlink()
    unet = tiny_cond_unet(seed=3)
    ours = pipeline_parts.load_pipeline_parts(str(parts_only), unet, device="cpu")
    assert (type(ours.scheduler).__name__, type(ours.vae).__name__, type(ours.text_encoder).__name__) == (
        "DDPMScheduler", "AutoencoderKL", "CLIPTextModel")
    full = conditional.ConditionalPipelineParts.from_pretrained(pipeline, unet=unet, device="cpu")
    prompt_set = PromptSet(prompts=tuple(VALIDATION))
    images = [conditional.sample_variants_conditional(p, {"v": unet}, prompt_set, num_samples=2, num_inference_steps=2,
                                                      scheduler="ddim", progress=False)["v"] for p in (ours, full)]
    assert torch.equal(images[0], images[1])
    with pytest.raises(ValueError, match="could not be loaded from local files.*--lawa_fid_pipeline"):
        pipeline_parts.load_pipeline_parts(str(tmp_path / "nowhere"), unet)


@pytest.mark.parametrize("model, options, message", [
    ("class", {}, "--lawa_fid_class_labels all"),
    ("class", {"fid_prompts": "p.txt", "fid_reference": "r"}, "takes class labels, not prompts"),
    ("plain", {"fid_class_labels": "all"}, "unconditional UNet2DModel samples it without conditions; drop "
                                           "--lawa_fid_class_labels"),
    ("text", {"fid_prompts": "p.txt", "fid_reference": "r"}, "no --pretrained_model_name_or_path"),
])
def test_options_that_cannot_evaluate_the_model_are_refused(model, options, message):
    from diffusers import UNet2DConditionModel, UNet2DModel
    from diffusers.training_utils import EMAModel

    from lawa_diffusion.config.launch import LaunchConfig
    from lawa_diffusion.integrations.fid_monitor import FIDMonitor
    from tests.helpers import tiny_unet
    from tests.tiny_pipelines import tiny_class_unet, tiny_cond_unet

    unet = {"class": tiny_class_unet, "plain": tiny_unet, "text": tiny_cond_unet}[model]()
    cls = UNet2DConditionModel if model == "text" else UNet2DModel
    ema = EMAModel(unet.parameters(), model_cls=cls, model_config=unet.config)
    monitor = FIDMonitor(LaunchConfig(fid_every_n_steps=2, **{"fid_reference": "r", **options}), [], "test")
    with pytest.raises(ValueError, match=message):
        monitor.check_model(ema)
    if model == "class":  # with class labels it is accepted
        given = LaunchConfig(fid_every_n_steps=2, fid_reference="r", fid_class_labels="all")
        FIDMonitor(given, [], "test").check_model(ema)
