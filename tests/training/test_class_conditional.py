"""The trainer with a class-conditional UNet2DModel (``model.num_class_embeds``): Fashion-MNIST's labels reach the
UNet, evaluation samples every class through the conditional evaluator, and a resumed run continues exactly.

References: torchvision's own IDX label reader, the conditional evaluator run afterwards on the saved
checkpoint folders, and an uninterrupted run. FID uses the stand-in extractor.
"""
from __future__ import annotations

import gzip
import os
import shutil

import pytest
import torch

from lawa_diffusion.evaluation.images import fashion_mnist_file
from lawa_diffusion.evaluation.inception import stand_in_extractor
from lawa_diffusion.training import labels as labels_mod
from lawa_diffusion.training import trainer as train_mod
from lawa_diffusion.utils.files import read_jsonl
from tests.helpers import one_line_error, run_crashing_at, tiny_config, train_run, unet_weights, write_yaml

pytestmark = pytest.mark.filterwarnings("ignore:FID from")


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Every test here runs its tiny models on one thread (see conftest.one_thread)."""


def class_config(out, **changes) -> dict:
    cfg = tiny_config(out, model={**tiny_config(out)["model"], "num_class_embeds": 10},
                      eval={"class_labels": "all", "variants": ["ema", "lawa"]}, save_ema_snapshots=False)
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, _one_thread):
    out = tmp_path_factory.mktemp("classes") / "full"
    with pytest.MonkeyPatch.context() as mp:  # module scope: the cache folder the autouse fixture sets later
        cache = str(tmp_path_factory.getbasetemp() / "lawa-cache")
        mp.setenv("LAWA_CACHE_DIR", os.environ.get("LAWA_TEST_CACHE_DIR", cache))
        train_run(class_config(out))
    return out


def test_labels_file_reads_as_torchvision_reads_it(tmp_path):
    from torchvision.datasets.mnist import read_label_file

    packed = labels_mod.labels_file_of(fashion_mnist_file("test"))
    raw = tmp_path / "t10k-labels-idx1-ubyte"
    with gzip.open(packed, "rb") as f, open(raw, "wb") as g:
        shutil.copyfileobj(f, g)
    ours = labels_mod.read_idx_labels(packed)
    assert torch.equal(ours, read_label_file(str(raw)).long()) and ours.shape == (10000,)


def test_batches_carry_the_labels_of_their_images():
    n = 40
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    labels = (torch.arange(n) * 7) % 10
    source = train_mod.BatchSource(images, 4, 2, 3, 0, 1, True, torch.device("cpu"), labels)
    plain = train_mod.BatchSource(images, 4, 2, 3, 0, 1, True, torch.device("cpu"))
    for step, micro in ((1, 0), (1, 1), (3, 1), (6, 0)):
        x, _ = source.draw(step, micro)
        rows = ((x[:, 0, 0, 0] + 1) * 127.5).round().long()
        assert torch.equal(source.labels_of(step, micro), labels[rows])
        assert torch.equal(x, plain.draw(step, micro)[0])  # labels change nothing about the images or noise
    assert plain.labels_of(1, 0) is None


def test_class_conditional_run_evaluates_every_class(full_run):
    from diffusers import UNet2DModel

    from lawa_diffusion.evaluation import conditional, fid, prompts

    rows = read_jsonl(full_run / "metrics.jsonl")
    assert [(r["step"], r["variant"]) for r in rows] == [(s, v) for s in (2, 4, 6, 8) for v in ("ema", "lawa")]
    every_class = prompts.class_label_set("all", 10)
    assert {(r["conditioning"], r["prompts_sha256"]) for r in rows} == {("class", every_class.fingerprint())}
    # the same numbers from the checkpoint's folders, sampled afterwards by the conditional evaluator
    from diffusers import DDPMScheduler

    models = {v: UNet2DModel.from_pretrained(full_run / "checkpoint-8" / f"unet_{v}") for v in ("ema", "lawa")}
    parts = conditional.ConditionalPipelineParts(unet=models["ema"], scheduler=DDPMScheduler(num_train_timesteps=1000))
    extractor = stand_in_extractor()
    reference = fid.reference_stats("fashion-mnist:test", image_size=8, num_images=16, weights=extractor,
                                    cache=False, progress=False)
    offline = conditional.evaluate_variants_conditional(parts, models, every_class, reference, num_samples=4,
                                                        batch_size=4, num_inference_steps=2, scheduler="ddim",
                                                        weights=extractor, progress=False)
    for row in rows[-2:]:
        assert row["fid"] == pytest.approx(offline[row["variant"]]["fid"], rel=1e-4)
    assert rows[-1]["fid"] != rows[-2]["fid"]
    # the labels reached the UNet (a class-conditional UNet refuses a call without them): its class embeddings
    # (in the EMA) moved away from the run's initial weights
    from accelerate.utils import set_seed

    set_seed(0)
    initial = train_mod.build_unet(class_config(full_run)["model"]).class_embedding.weight.detach()
    trained = unet_weights(full_run / "checkpoint-8" / "unet_ema")["class_embedding.weight"]
    assert trained.shape == initial.shape == (10, 32) and not torch.equal(trained, initial)


def test_class_conditional_run_resumes_exactly(full_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    run_crashing_at(7, class_config(out), monkeypatch)
    assert max(r["step"] for r in read_jsonl(out / "metrics.jsonl")) == 6
    train_run(class_config(out), resume="latest")
    full, rows = read_jsonl(full_run / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["variant"]) for r in rows] == [(r["step"], r["variant"]) for r in full]
    for a, b in zip(rows, full):
        assert a["fid"] == pytest.approx(b["fid"], rel=1e-6, abs=1e-9)
    for sub in ("unet_ema", "unet_lawa"):
        got, want = unet_weights(out / "checkpoint-8" / sub), unet_weights(full_run / "checkpoint-8" / sub)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-7)


def test_conditioning_settings_that_do_not_fit_are_one_line(tmp_path, capsys):
    def error_of(name: str, cfg: dict) -> str:
        return one_line_error(capsys, ["train", "--config", write_yaml(tmp_path / f"{name}.yaml", cfg)])

    no_labels = class_config(tmp_path / "a")
    no_labels["eval"] = {**no_labels["eval"], "class_labels": None}
    assert "eval.class_labels to all" in error_of("a", no_labels)
    assert "set model.num_class_embeds" in error_of("b", tiny_config(tmp_path / "b", eval={"class_labels": "all"}))
    folder = class_config(tmp_path / "c", data={"dataset": str(tmp_path), "resize_mode": "resize"})
    assert "has none: use fashion-mnist" in error_of("c", folder)
    too_few = class_config(tmp_path / "d", model={**tiny_config(tmp_path)["model"], "num_class_embeds": 5})
    assert "set it to 10" in error_of("d", too_few)
