"""The after-training commands on conditional runs: ``average`` and ``synthesize`` write UNet2DConditionModel folders
(from EMA snapshots stored without a class name, and from unet_ema checkpoints) and a transformer denoiser's (DiT)
stored power EMAs synthesise into its own class, equal to float64 references;
``hindsight`` and ``sweep`` score a text-to-image / class-conditional run's averages with the run's own prompts,
guidance and seed, equal to the conditional evaluator called directly on the same weights."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.training_utils import EMAModel

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.engine.ema import PowerEMAModel
from lawa_diffusion.evaluation import conditional, fid, prompts
from lawa_diffusion.evaluation.inception import stand_in_extractor
from lawa_diffusion.posthoc import search as hindsight
from lawa_diffusion.posthoc.sweep import run_sweep
from lawa_diffusion.posthoc.synthesize import plan_synthesis, write_synthesis
from lawa_diffusion.runs import folder as runfolder
from tests.helpers import float64_mean_of_files, float64_sum, one_line_error, relative_error
from tests.tiny_pipelines import (
    build_text_to_image_pipeline,
    tiny_class_unet,
    tiny_cond_unet,
    write_caption_folder,
    write_ema_snapshots,
    write_pngs,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EVAL = {"num_samples": 4, "batch_size": 4, "num_inference_steps": 2, "seed": 3, "kid_subsets": 2,
        "kid_subset_size": 4}


def assert_state_equal(model, expected, atol=1e-6):
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(state[name].double(), value, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def quiet(evaluate, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fid.SmallSampleWarning)
        return evaluate(*args, **kwargs)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A text-to-image run as the launch plugin leaves it: power-EMA snapshots of a UNet2DConditionModel (plain
    config, no class name), RUN/lawa_eval.yaml (eval settings naming prompts and pipeline; the model config with
    _class_name) and metrics rows."""
    root = tmp_path_factory.mktemp("text-run")
    run = str(root / "run")
    os.makedirs(run)
    pipe = build_text_to_image_pipeline(root / "pipe")
    captioned = write_caption_folder(root / "captioned", [f"a {c} cat" for c in ("red", "blue", "green", "big",
                                                                                  "small", "tiny")])
    unet = tiny_cond_unet(seed=2)
    emas = {name: PowerEMAModel(unet.parameters(), sigma_rel=s) for name, s in (("p05", 0.05), ("p10", 0.10))}
    files = write_ema_snapshots(run, unet, emas, steps=20, every=5)
    settings = {**EVAL, "prompts": captioned, "num_reference": 4, "pipeline": pipe, "guidance_scale": 2.0}
    runfolder.write_plugin_eval(run, settings, {**dict(unet.config), "_class_name": "UNet2DConditionModel"})
    with open(runfolder.metrics_path(run), "w") as f:
        for step in (10, 20):
            f.write(json.dumps({"step": step, "variant": "ema", "kind": "ema", "fid": 1.0}) + "\n")
    return {"run": run, "pipe": pipe, "captioned": captioned, "files": files}


# ----------------------------------------------------------------------------- average and synthesize


def test_average_of_conditional_snapshots_and_checkpoints(tmp_path, text_run):
    """Snapshots stored without _class_name and unet_ema checkpoints (EMAModel.save_pretrained) both average into
    a UNet2DConditionModel folder equal to the float64 mean of the files."""
    snapshots = text_run["files"]["p10"]
    out = tmp_path / "from-snapshots"
    assert cli.main(["average", os.path.join(text_run["run"], runfolder.SNAPSHOT_DIR, "p10"), "--k", "3",
                     "-o", str(out)]) == 0
    assert_state_equal(UNet2DConditionModel.from_pretrained(out), float64_mean_of_files(
        [snapshots[s] for s in (10, 15, 20)]))
    run = tmp_path / "checkpoints"
    for step in (100, 200, 300):
        unet = tiny_cond_unet(seed=step)
        ema = EMAModel(unet.parameters(), decay=0.99, model_cls=UNet2DConditionModel, model_config=unet.config)
        ema.save_pretrained(str(run / f"checkpoint-{step}" / "unet_ema"))
    assert cli.main(["average", str(run), "--k", "2", "-o", str(tmp_path / "from-checkpoints")]) == 0
    weights = [str(run / f"checkpoint-{s}" / "unet_ema" / "diffusion_pytorch_model.safetensors") for s in (200, 300)]
    assert_state_equal(UNet2DConditionModel.from_pretrained(tmp_path / "from-checkpoints"),
                       float64_mean_of_files(weights))


def test_synthesize_writes_a_conditional_model_folder(tmp_path, text_run):
    out = tmp_path / "synth"
    assert cli.main(["synthesize", text_run["run"], "--target", "sigma_rel=0.08", "-o", str(out)]) == 0
    plan = plan_synthesis(text_run["run"], "sigma_rel=0.08")
    assert plan.model_cls is UNet2DConditionModel and len(plan.used()) >= 2
    expected = float64_sum([s.path for s in plan.sources], plan.solution.coefficients)
    assert_state_equal(UNet2DConditionModel.from_pretrained(out), expected, atol=1e-5)


# ----------------------------------------------------------------------------- hindsight and sweep


def test_hindsight_scores_a_text_to_image_run_with_its_own_prompts_and_guidance(tmp_path, text_run):
    run, stand_in = text_run["run"], stand_in_extractor(dim=16)
    summary = quiet(hindsight.run_hindsight, run, "0.08,0.1", steps="eval", out_dir=str(tmp_path / "h"),
                    weights=stand_in, device="cpu", progress=False)
    scored = [r for r in summary["rows"] if r["fid"] is not None]
    assert summary["steps"] == [10, 20] and len(scored) >= 3
    # independent of the run evaluator: the pipeline's parts, the held-out captions, the run's settings by hand
    parts = conditional.ConditionalPipelineParts.from_pretrained(text_run["pipe"], device="cpu")
    held_out = prompts.prompts_from_image_folder(text_run["captioned"], num_reference=4)
    for row in scored:
        folder = tmp_path / f"{row['target']}-{row['step']}"
        write_synthesis(plan_synthesis(run, row["target"], row["step"], max_residual=None), folder, progress=False)
        expected = quiet(conditional.evaluate_variants_conditional, parts, {"v": str(folder)}, held_out,
                         weights=stand_in, guidance_scale=2.0, progress=False, **EVAL)["v"]
        assert relative_error(row["fid"], expected["fid"]) <= 1e-6, row
        assert relative_error(row["kid_mean"], expected["kid_mean"]) <= 1e-5, row
    lines = [json.loads(line) for line in (tmp_path / "h" / hindsight.JSONL_NAME).read_text().splitlines()]
    assert lines == summary["rows"]


def test_sweep_scores_a_class_conditional_run(tmp_path):
    """config.yaml with eval.class_labels and the training noise schedule; no pipeline: the run's scheduler."""
    from diffusers import DDIMScheduler, DDPMScheduler

    run = tmp_path / "run"
    run.mkdir()
    unet = tiny_class_unet(num_classes=3, seed=4)
    files = write_ema_snapshots(run, unet, {"ema": EMAModel(unet.parameters(), decay=0.9)}, steps=20, every=5)["ema"]
    reference = write_pngs(tmp_path / "ref", 6, size=8)
    eval_settings = {**EVAL, "num_samples": 6, "batch_size": 6, "class_labels": "all", "reference": reference,
                     "kid": False}
    (run / "config.yaml").write_text(yaml.safe_dump({"lawa": {"k": 2, "every_n_steps": 5, "start_step": 0},
                                                     "noise": {"num_train_timesteps": 100}, "eval": eval_settings}))
    stand_in = stand_in_extractor(dim=16)
    summary = quiet(run_sweep, run, [1, 2], [1], steps="final", out_dir=str(tmp_path / "sw"), weights=stand_in,
                    device="cpu", progress=False)
    parts = conditional.ConditionalPipelineParts(
        unet=UNet2DModel.from_config(unet.config).eval(),
        scheduler=DDIMScheduler.from_config(DDPMScheduler(num_train_timesteps=100).config))
    labels = prompts.class_label_set("all", 3)
    for row in summary["rows"]:
        mean = float64_mean_of_files([files[s] for s in row["snapshot_steps"]])
        state = {k: v.float() for k, v in mean.items()}
        expected = quiet(conditional.evaluate_variants_conditional, parts, {"v": state}, labels, reference,
                         weights=stand_in, progress=False, **{**EVAL, "num_samples": 6, "batch_size": 6, "kid": False})
        assert relative_error(row["fid"], expected["v"]["fid"]) <= 1e-6, row
    assert [tuple(r["snapshot_steps"]) for r in summary["rows"]] == [(20,), (15, 20)]


@pytest.mark.parametrize("drop, words", [("prompts", ["--prompts", "text-conditioned UNet2DConditionModel"]),
                                         ("pipeline", ["--pipeline", "text-conditioned"])])
def test_text_run_without_prompts_or_pipeline_is_one_line(tmp_path, text_run, capsys, drop, words):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(os.path.join(text_run["run"], runfolder.SNAPSHOT_DIR), run / runfolder.SNAPSHOT_DIR)
    config = yaml.safe_load(open(os.path.join(text_run["run"], runfolder.PLUGIN_EVAL_NAME)))
    config["eval"].pop(drop)
    (run / runfolder.PLUGIN_EVAL_NAME).write_text(yaml.safe_dump(config))
    err = one_line_error(capsys, ["hindsight", str(run), "--sigma-rel", "0.1", "--steps", "final", "--device", "cpu",
                                  "-o", str(tmp_path / "h")])
    assert all(w in err for w in words), err


def test_a_transformer_denoisers_stored_power_emas_synthesise_into_its_own_class(tmp_path):
    """Snapshots a ``PosthocSnapshots`` stores for a transformer-based denoiser (DiT) carry its class: synthesize
    writes a DiTTransformer2DModel folder equal to the float64 sum of the files."""
    from diffusers import DiTTransformer2DModel

    from lawa_diffusion import PosthocSnapshots
    from tests.helpers import perturb_

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    generator = torch.Generator().manual_seed(1)
    with PosthocSnapshots(model, str(tmp_path / "run"), sigma_rels=(0.05, 0.10), every_n_steps=5) as store:
        for _ in range(20):
            perturb_(model.parameters(), generator)
            store.update(model.parameters())
        store.flush()
    out = tmp_path / "synth"
    assert cli.main(["synthesize", str(tmp_path / "run"), "--target", "sigma_rel=0.08", "-o", str(out)]) == 0
    plan = plan_synthesis(str(tmp_path / "run"), "sigma_rel=0.08")
    assert plan.model_cls is DiTTransformer2DModel and len(plan.used()) >= 2
    expected = float64_sum([s.path for s in plan.sources], plan.solution.coefficients)
    assert_state_equal(DiTTransformer2DModel.from_pretrained(out), expected, atol=1e-5)
