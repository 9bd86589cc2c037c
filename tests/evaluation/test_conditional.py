"""The conditional evaluator against independent references: diffusers' own StableDiffusionPipeline.__call__ on
the same latents, torch-fidelity's own calculate_metrics on the same images, and the unconditional sampler for
class-conditional UNets."""
import json
import os
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lawa_diffusion.evaluation import conditional, fid, inception, prompts, sampling
from tests.helpers import relative_error, tiny_unet
from tests.tiny_pipelines import (
    ImagesDataset,
    build_sdxl_pipeline,
    build_text_to_image_pipeline,
    register_stand_in_with_torch_fidelity,
    tiny_class_unet,
    tiny_cond_unet,
    tiny_sdxl_unet,
    write_caption_folder,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ("a photo of a red cat", "a big dog", "a small blue car on the tree", "green", "the cat")
STEPS = 3


@pytest.fixture(scope="session")
def pipeline_folder(tmp_path_factory):
    return build_text_to_image_pipeline(tmp_path_factory.mktemp("cond") / "pipe")


@pytest.fixture(scope="module")
def parts(pipeline_folder):
    return conditional.ConditionalPipelineParts.from_pretrained(pipeline_folder, device="cpu")


@pytest.fixture(scope="module")
def other_unet():
    """A denoiser other than the pipeline folder's own (the variant being scored)."""
    return tiny_cond_unet(seed=1)


@pytest.fixture
def stand_in():
    return inception.stand_in_extractor(dim=16)


def prompt_set(texts=PROMPTS):
    return prompts.PromptSet(prompts=tuple(texts), source="test")


def reference_pipeline(folder, unet):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.unet = unet
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- text-to-image sampling


def test_same_seeds_give_the_same_images_whatever_the_batch(parts, other_unet):
    ps = prompt_set()
    run = lambda batch_size, seed=0: conditional.sample_variants_conditional(
        parts, {"v": other_unet}, ps, num_samples=7, batch_size=batch_size, num_inference_steps=STEPS, seed=seed,
        progress=False)["v"]
    first = run(7)
    assert first.dtype == torch.uint8 and first.shape == (7, 3, 16, 16)
    assert torch.equal(first, run(7))
    assert torch.equal(first, run(3))
    assert torch.equal(first, run(1))
    assert not torch.equal(first, run(7, seed=1))
    # prompts are cycled: sample 5 has the prompt of sample 0 but its own noise
    assert not torch.equal(first[5], first[0])
    # the prompt changes the image drawn from the same noise
    other = conditional.sample_variants_conditional(parts, {"v": other_unet}, prompt_set(PROMPTS[1:2]), num_samples=1,
                                                    num_inference_steps=STEPS, progress=False)["v"]
    assert not torch.equal(other[0], first[0])


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0, 3.0])
def test_images_equal_stable_diffusion_pipeline_call(pipeline_folder, parts, other_unet, guidance_scale):
    """The swapped denoiser, sampled by the evaluator, against diffusers' own __call__ given the same latents."""
    ps = prompt_set()
    sampler = conditional.ConditionalSampler(parts, ps, num_inference_steps=STEPS, seed=3,
                                             guidance_scale=None if guidance_scale == 7.5 else guidance_scale)
    assert sampler.guidance_scale == guidance_scale  # 7.5: the pipeline's default
    batch_sizes = []
    hook = other_unet.register_forward_hook(lambda m, args, out: batch_sizes.append(args[0].shape[0]))
    try:
        ours = conditional.sample_variants_conditional(parts, {"v": other_unet}, sampler=sampler, num_samples=5,
                                                       batch_size=5, progress=False)["v"]
    finally:
        hook.remove()
    assert batch_sizes == [10 if guidance_scale > 1 else 5] * STEPS  # guidance 1.0: no unconditional pass

    latents, _ = sampler.noise(other_unet, range(5))
    pipe = reference_pipeline(pipeline_folder, other_unet)
    out = pipe(list(PROMPTS), latents=latents, num_inference_steps=STEPS, guidance_scale=guidance_scale,
               output_type="pt").images
    expected = (out * 255).round().to(torch.uint8)
    assert ours.shape == expected.shape
    diff = (ours.int() - expected.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.99


def test_reduced_precision_parts(pipeline_folder):
    """dtype="bf16": every module in bfloat16, the sampler's arithmetic in float32; images close to float32's."""
    ps = prompt_set(PROMPTS[:2])
    images = {}
    for dtype in ("fp32", "bf16"):
        parts = conditional.ConditionalPipelineParts.from_pretrained(pipeline_folder, device="cpu", dtype=dtype)
        assert {p.dtype for p in parts.text_encoder.parameters()} == {parts.unet.dtype}
        images[dtype] = conditional.sample_variants_conditional(parts, {"own": parts.unet}, ps, num_samples=2,
                                                                num_inference_steps=2, progress=False)["own"]
    assert parts.unet.dtype == torch.bfloat16 and images["bf16"].dtype == torch.uint8
    assert (images["bf16"].float() - images["fp32"].float()).abs().mean() < 8


@pytest.mark.parametrize("negative_prompt", [None, "a small dog"])
def test_sdxl_style_pipeline_equals_its_call(tmp_path, negative_prompt):
    """Two text encoders (penultimate states concatenated, pooled projection, size ids), zeros as the
    unconditional input (force_zeros_for_empty_prompt) or a negative prompt, Euler, the pipeline's default
    guidance 5.0: the evaluator against StableDiffusionXLPipeline.__call__ on the same latents."""
    from diffusers import StableDiffusionXLPipeline

    folder = build_sdxl_pipeline(tmp_path / "sdxl")
    parts = conditional.ConditionalPipelineParts.from_pretrained(folder, device="cpu")
    assert parts.guidance_scale == 5.0 and parts.settings == {"force_zeros_for_empty_prompt": True}
    unet = tiny_sdxl_unet(seed=1)
    ps = prompt_set(PROMPTS[:3])
    sampler = conditional.ConditionalSampler(parts, ps, num_inference_steps=STEPS, negative_prompt=negative_prompt)
    ours = conditional.sample_variants_conditional(parts, {"v": unet}, sampler=sampler, num_samples=3, batch_size=2,
                                                   progress=False)["v"]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.unet = unet
    pipe.set_progress_bar_config(disable=True)
    out = pipe(list(PROMPTS[:3]), latents=sampler.noise(unet, range(3))[0], num_inference_steps=STEPS,
               negative_prompt=negative_prompt, output_type="pt").images
    expected = (out * 255).round().to(torch.uint8)
    diff = (ours.int() - expected.int()).abs()
    assert ours.shape == (3, 3, 16, 16) and diff.max() <= 1 and (diff == 0).float().mean() > 0.99


def test_variant_kinds_give_the_same_images(tmp_path, parts, other_unet):
    """A module, its state dict (swapped into the pipeline's unet, then put back), its folder, and a folder
    named as a subfolder of the pipeline all sample the same images; the folder's own unet differs."""
    folder = tmp_path / "pipe_copy"
    import shutil

    shutil.copytree(parts.folder, folder)
    other_unet.save_pretrained(folder / "unet_lawa")
    with_lawa = conditional.ConditionalPipelineParts.from_pretrained(folder, device="cpu")
    before = {k: v.clone() for k, v in with_lawa.unet.state_dict().items()}
    variants = {"module": other_unet, "state": other_unet.state_dict(), "folder": str(folder / "unet_lawa"),
                "subfolder": "unet_lawa", "own": with_lawa.unet}
    out = conditional.sample_variants_conditional(with_lawa, variants, prompt_set(), num_samples=3, batch_size=3,
                                                  num_inference_steps=2, progress=False)
    for name in ("state", "folder", "subfolder"):
        assert torch.equal(out[name], out["module"]), name
    assert not torch.equal(out["own"], out["module"])
    assert all(torch.equal(before[k], v) for k, v in with_lawa.unet.state_dict().items())
    swapped = conditional.ConditionalPipelineParts.from_pretrained(folder, unet="unet_lawa", device="cpu")
    again = conditional.sample_variants_conditional(swapped, {"default": swapped.unet}, prompt_set(), num_samples=3,
                                                    batch_size=2, num_inference_steps=2, progress=False)
    assert torch.equal(again["default"], out["module"])


# --------------------------------------------------------------------------- FID


def test_fid_equals_torch_fidelity_on_the_generated_images(tmp_path, parts, other_unet, stand_in):
    import torch_fidelity

    captions = [" ".join(PROMPTS[i % 5].split()[: 1 + i % 3]) for i in range(10)]
    folder = write_caption_folder(tmp_path / "captioned", captions)
    ps = prompts.prompts_from_image_folder(folder, num_reference=6)
    settings = dict(num_samples=6, num_inference_steps=2, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fid.SmallSampleWarning)
        result = conditional.evaluate_variants_conditional(parts, {"v": other_unet}, ps, weights=stand_in,
                                                           progress=False, batch_size=4, kid_subsets=10,
                                                           kid_subset_size=5, **settings)["v"]
    images = conditional.sample_variants_conditional(parts, {"v": other_unet}, ps, batch_size=6, progress=False,
                                                     **settings)["v"]
    reference = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(folder, f"img{i:03d}.png"))))
                             .permute(2, 0, 1) for i in range(4, 10)])
    name = register_stand_in_with_torch_fidelity(dim=16)
    expected = torch_fidelity.calculate_metrics(
        input1=ImagesDataset(images), input2=ImagesDataset(reference), fid=True, kid=True, kid_subsets=10,
        kid_subset_size=5, feature_extractor=name, feature_layer_fid="pool", feature_layer_kid="pool", cuda=False,
        cache=False, verbose=False, batch_size=4, save_cpu_ram=True)
    assert relative_error(result["fid"], expected["frechet_inception_distance"]) <= 1e-6
    assert relative_error(result["kid_mean"], expected["kernel_inception_distance_mean"]) <= 1e-6
    assert result["num_samples"] == 6 and result["prompts_sha256"] == ps.fingerprint()
    assert result["guidance_scale"] == 7.5 and (result["height"], result["width"]) == (16, 16)
    # the reference statistics were cached under the prompt set's fingerprint
    assert os.path.isfile(fid.stats_cache_path(result["reference_key"]))
    # the same images given as an explicit reference (fid.reference_stats' path) give the same FID
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fid.SmallSampleWarning)
        given = conditional.evaluate_variants_conditional(parts, {"v": other_unet}, ps, reference, weights=stand_in,
                                                          progress=False, batch_size=4, kid=False, **settings)["v"]
    assert relative_error(given["fid"], result["fid"]) <= 1e-9 and "kid_mean" not in given


def test_reference_cache_hit_reads_no_image(tmp_path, parts, stand_in, monkeypatch):
    folder = write_caption_folder(tmp_path / "captioned", [f"a {w}" for w in ("cat", "dog", "car", "tree")])
    ps = prompts.prompts_from_image_folder(folder)
    first = conditional.prompt_set_reference_stats(ps, stand_in, size=(16, 16), progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a reference image was decoded on a cache hit")

    monkeypatch.setattr(prompts, "_read_rgb", refuse)
    hit = conditional.prompt_set_reference_stats(ps, stand_in, size=(16, 16), progress=False)
    np.testing.assert_array_equal(hit.mu, first.mu)
    with pytest.raises(AssertionError, match="decoded"):  # another size is another key
        conditional.prompt_set_reference_stats(ps, stand_in, size=(8, 8), progress=False)


# --------------------------------------------------------------------------- prompt sources


def test_metadata_folder_split_is_deterministic_disjoint_and_paired(tmp_path):
    captions = [f"caption number {i}" for i in range(10)]
    folder = write_caption_folder(tmp_path / "captioned", captions)
    last = prompts.prompts_from_image_folder(folder, num_reference=4)
    assert last == prompts.prompts_from_image_folder(folder, num_reference=4)
    assert last.prompts == tuple(captions[6:])
    seeded = prompts.prompts_from_image_folder(folder, num_reference=4, split_seed=7)
    assert seeded == prompts.prompts_from_image_folder(folder, num_reference=4, split_seed=7)
    assert seeded.prompts != last.prompts and seeded.fingerprint() != last.fingerprint()
    for ps in (last, seeded):  # each prompt is the caption of its own reference image
        for text, path in zip(ps.prompts, ps.reference.paths):
            assert captions[int(os.path.basename(path)[3:6])] == text
    for seed in (None, 0, 7):
        train, held = prompts.split_rows(10, 4, seed)
        assert len(held) == 4 and not set(train) & set(held) and sorted(train + held) == list(range(10))
    everything = prompts.prompts_from_image_folder(folder)
    assert everything.prompts == tuple(captions)
    images = last.reference_images([0, 1], (8, 8))
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8


def test_metadata_folder_options_and_errors(tmp_path):
    folder = write_caption_folder(tmp_path / "c", ["one", "two", "three"], caption_column="caption")
    assert prompts.prompts_from_image_folder(folder, caption_column="caption").prompts == ("one", "two", "three")
    with pytest.raises(ValueError, match="no caption column 'text' .*pass --caption-column"):
        prompts.prompts_from_image_folder(folder)
    with pytest.raises(ValueError, match="--num-reference must be an integer from 2 to the 3"):
        prompts.prompts_from_image_folder(folder, caption_column="caption", num_reference=5)
    nested = tmp_path / "nested"
    write_caption_folder(nested / "train", ["a", "b"])
    with pytest.raises(FileNotFoundError, match="it is in train"):
        prompts.load_prompt_set(nested)
    with open(os.path.join(folder, "metadata.jsonl"), "a") as f:
        f.write(json.dumps({"file_name": "missing.png", "caption": ["first", "second"]}) + "\n")
    with pytest.raises(FileNotFoundError, match="names 'missing.png'"):
        prompts.prompts_from_image_folder(folder, caption_column="caption")
    os.rename(os.path.join(folder, "img000.png"), os.path.join(folder, "missing.png"))
    with pytest.raises(FileNotFoundError, match="names 'img000.png'"):
        prompts.prompts_from_image_folder(folder, caption_column="caption")


def test_text_file_prompts_and_fingerprint(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# evaluation prompts\na red cat\n\n   a big dog  \n#a comment\na red cat\n")
    ps = prompts.load_prompt_set(path)
    assert ps.prompts == ("a red cat", "a big dog", "a red cat") and ps.kind == "text" and ps.reference is None
    assert len(ps.fingerprint()) == 64 and ps.fingerprint() == prompts.prompts_from_text_file(path).fingerprint()
    path.write_text("a red cat\na big dog!\na red cat\n")
    assert prompts.load_prompt_set(path).fingerprint() != ps.fingerprint()
    path.write_text("\n# only a comment\n  \n")
    with pytest.raises(ValueError, match="holds no prompts .*write one prompt per line"):
        prompts.load_prompt_set(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prompts.load_prompt_set(tmp_path / "nope.txt")


def test_saved_dataset_source(tmp_path, monkeypatch):
    """Without ``datasets``: one sentence saying how to get it. With it (a stand-in module with the two calls the
    loader makes): the held-out rows' captions and images, paired."""
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ValueError, match="pip install datasets"):
        prompts.load_prompt_set(saved)

    rng = np.random.RandomState(0)
    rows = [{"image": Image.fromarray(rng.randint(0, 256, (12, 12, 3), dtype=np.uint8)), "caption": [f"c{i}", "x"]}
            for i in range(6)]

    class FakeDataset:
        column_names = ["image", "caption"]
        _fingerprint = "abc"

        def __len__(self):
            return len(rows)

        def __getitem__(self, key):
            return [r[key] for r in rows] if isinstance(key, str) else rows[key]

    fake = types.SimpleNamespace(load_from_disk=lambda path: {"validation": FakeDataset()})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    ps = prompts.load_prompt_set(saved, num_reference=3, caption_column="caption")
    assert ps.prompts == ("c3", "c4", "c5")
    images = ps.reference_images(range(3))
    assert torch.equal(images[1], torch.from_numpy(np.array(rows[4]["image"])).permute(2, 0, 1))
    with pytest.raises(ValueError, match="--image-column 'img' is not a column"):
        prompts.load_prompt_set(saved, caption_column="caption", image_column="img")


# --------------------------------------------------------------------------- class-conditional UNets


class FixedLabel(torch.nn.Module):
    """An unconditional-looking view of a class-conditional UNet for one class (for the unconditional sampler)."""

    def __init__(self, unet, label):
        super().__init__()
        self.unet, self.label = unet, label

    @property
    def config(self):
        return self.unet.config

    def forward(self, x, t):
        return self.unet(x, t, class_labels=torch.full((x.shape[0],), self.label, dtype=torch.long))


def test_class_conditional_unet(tmp_path):
    from diffusers import DDIMScheduler, DDPMPipeline

    unet = tiny_class_unet(num_classes=3)
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "pipe")
    parts = conditional.ConditionalPipelineParts.from_pretrained(tmp_path / "pipe", device="cpu")
    assert parts.kind == "class" and parts.vae is None and parts.text_encoder is None
    labels = prompts.class_label_set("all", 3)
    ours = conditional.sample_variants_conditional(parts, {"v": unet}, labels, num_samples=6, batch_size=4,
                                                   num_inference_steps=3, progress=False)["v"]
    assert ours.shape == (6, 1, 8, 8)
    # sample i has class i % 3 and the unconditional sampler's noise of sample i
    for label in range(3):
        indices = [label, label + 3]
        expected = sampling.sample_uint8(FixedLabel(unet, label), parts.new_scheduler(), indices, seed=0,
                                         num_inference_steps=3)
        assert torch.equal(ours[indices], expected)
    # the class changes the image drawn from the same noise
    per_class = [conditional.sample_variants_conditional(parts, {"v": unet}, prompts.class_label_set([c], 3),
                                                         num_samples=2, num_inference_steps=3, progress=False)["v"]
                 for c in range(3)]
    assert not torch.equal(per_class[0], per_class[1]) and not torch.equal(per_class[1], per_class[2])
    assert prompts.class_label_set("0, 2", 3).class_labels == (0, 2)
    with pytest.raises(ValueError, match="--class-labels must be class numbers from 0 to 2"):
        prompts.class_label_set([3], 3)


# --------------------------------------------------------------------------- which models need what


def test_conditional_model_without_prompts_is_one_sentence(parts, stand_in):
    text, cls, plain = tiny_cond_unet(), tiny_class_unet(), tiny_unet()
    assert conditional.needs_conditioning(text) and conditional.needs_conditioning(cls)
    assert not conditional.needs_conditioning(plain)
    assert (conditional.conditioning_kind(text), conditional.conditioning_kind(cls)) == ("text", "class")
    with pytest.raises(ValueError) as caught:
        conditional.evaluate_variants_conditional(parts, {"v": parts.unet}, None, weights=stand_in, progress=False)
    message = str(caught.value)
    assert "text-conditioned UNet2DConditionModel" in message and "set --prompts to a text file" in message
    assert "\n" not in message and message.count(". ") == 0
    assert "set --class-labels to all" in conditional.conditioning_message(cls, "model 'x'")
    with pytest.raises(ValueError, match="class-conditional UNet2DModel .*set --class-labels"):
        conditional.check_conditions(cls, prompt_set())
    with pytest.raises(ValueError, match="set --prompts to"):
        conditional.ConditionalSampler(parts, prompts.class_label_set("all", 3))


def test_bad_pipeline_inputs(tmp_path, parts):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        conditional.ConditionalPipelineParts.from_pretrained(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        conditional.ConditionalPipelineParts.from_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="subfolders: scheduler, text_encoder, tokenizer, unet, vae"):
        conditional.sample_variants_conditional(parts, {"v": "unet_ema"}, prompt_set(), num_samples=2,
                                                progress=False)
    with pytest.raises(ValueError, match="height must be a positive multiple of the VAE scale factor 2"):
        conditional.ConditionalSampler(parts, prompt_set(), height=15)
    with pytest.raises(ValueError, match="does not fit the pipeline's UNet2DConditionModel"):
        conditional.sample_variants_conditional(parts, {"v": {"nope": torch.zeros(1)}}, prompt_set(), num_samples=2,
                                                progress=False)


MULTI = r"""
import os, sys, torch
from accelerate import Accelerator
sys.path.insert(0, sys.argv[2])  # the checkout: the tests package imports from it
from lawa_diffusion.evaluation import conditional, prompts
acc = Accelerator(cpu=True)
parts = conditional.ConditionalPipelineParts.from_pretrained(sys.argv[3], device="cpu")
ps = prompts.PromptSet(prompts=("a red cat", "a big dog", "the tree"))
out = conditional.sample_variants_conditional(parts, {"own": parts.unet}, ps, num_samples=5, batch_size=2,
                                              num_inference_steps=2, accelerator=acc, progress=False)
if acc.is_main_process:
    torch.save({"processes": acc.num_processes, "images": out["own"]}, sys.argv[1])
"""


@pytest.mark.slow
def test_two_processes_sample_what_one_does(tmp_path, pipeline_folder):
    import subprocess

    script = tmp_path / "multi.py"
    script.write_text(MULTI)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n in (1, 2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), str(script),
               str(tmp_path / f"out{n}.pt"), root, pipeline_folder]
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    one, two = (torch.load(tmp_path / f"out{n}.pt") for n in (1, 2))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["images"].shape == (5, 3, 16, 16) and torch.equal(one["images"], two["images"])
