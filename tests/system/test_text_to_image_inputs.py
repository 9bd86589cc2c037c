"""What the text-to-image GPU check builds before it trains: scripts/make_caption_folder.py writes Fashion-MNIST's
own pixels and class names (checked against the IDX files read here with gzip and NumPy), and
scripts/make_tiny_pipeline.py writes a folder that diffusers' own StableDiffusionPipeline loads and samples, with a
tokenizer that spells every caption word as one token."""
from __future__ import annotations

import gzip
import importlib.util
import json

import numpy as np
import pytest
import torch

from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")  # the dataset's own label names


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def idx(path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    script = load_script("make_caption_folder")
    out = tmp_path_factory.mktemp("captions") / "data"
    assert script.main(["--output", str(out), "--num-train", "6", "--num-test", "4", "--image-size", "32"]) == 0
    return out


def rows(folder) -> list:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_caption_folders_hold_fashion_mnists_pixels_and_class_names(captions):
    from PIL import Image

    from lawa_diffusion.evaluation.images import fashion_mnist_file

    for split, count in (("train", 6), ("test", 4)):
        images_file = fashion_mnist_file(split, download=False)
        pixels = idx(images_file, 16).reshape(-1, 28, 28)[:count]
        labels = idx(images_file.replace("images-idx3", "labels-idx1"), 8)[:count]
        written = rows(captions / split)
        assert [r["text"] for r in written] == [f"a photo of a {FASHION_MNIST_CLASSES[c].split('/')[0].lower()}"
                                                for c in labels]
        for row, image in zip(written, pixels):
            with Image.open(captions / split / row["file_name"]) as png:
                got = np.asarray(png)
            assert got.shape == (32, 32) and np.array_equal(got[2:30, 2:30], image)  # zero-padded 28 -> 32
            assert not got[:2].any() and not got[30:].any() and not got[:, :2].any() and not got[:, 30:].any()


def test_caption_folder_refuses_to_replace_a_folder_and_bad_counts(captions, capsys):
    script = load_script("make_caption_folder")
    before = rows(captions / "train")
    assert script.main(["--output", str(captions), "--num-train", "3", "--num-test", "2"]) == 2
    assert script.main(["--output", str(captions.parent / "new"), "--num-test", "1"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "--overwrite" in errors[0] and "--num-test must be at least 2, got 1" in errors[1]
    assert rows(captions / "train") == before and not (captions.parent / "new").exists()


@pytest.fixture(scope="module")
def pipeline(captions, tmp_path_factory):
    script = load_script("make_tiny_pipeline")
    out = tmp_path_factory.mktemp("pipe") / "pipe"
    assert script.main(["--config", str(ROOT / "configs" / "text_to_image_cpu.yaml"), "--words-from",
                        str(captions / "train"), "--words-from", str(captions / "test"), "--output", str(out)]) == 0
    return out


def test_the_pipeline_folder_loads_and_samples_in_diffusers(pipeline, captions):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == pipe.vae.config.sample_size == 16
    images = pipe(["a photo of a dress", "a photo of a bag"], num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    tokenizer = pipe.tokenizer
    words = {w for r in rows(captions / "train") + rows(captions / "test") for w in r["text"].replace("-", " ").split()}
    for word in words:  # each caption word is one token of the vocabulary
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    ids = tokenizer("a photo of a t-shirt").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "t</w>", "-</w>",
                                                          "shirt</w>"]


def test_pipeline_config_errors_are_one_line(captions, tmp_path, capsys):
    script = load_script("make_tiny_pipeline")
    base = ["--config", str(ROOT / "configs" / "text_to_image_cpu.yaml"), "--words-from", str(captions / "train")]
    assert script.main([*base, "--output", str(tmp_path / "a"), "--set", "unet.foo=1"]) == 2
    assert script.main([*base, "--output", str(tmp_path / "b"), "--set", "unet.cross_attention_dim=48"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2
    assert "section unet does not fit UNet2DConditionModel" in errors[0] and "foo" in errors[0]
    assert "unet.cross_attention_dim 48 must equal text_encoder.hidden_size 32" in errors[1]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
