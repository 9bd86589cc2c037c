"""A small Stable-Diffusion-style pipeline folder with random weights, built from a config (nothing downloaded).

    python scripts/make_tiny_pipeline.py --config configs/text_to_image_gpu.yaml --words-from DATA/train \
        --output PIPE [--set unet.block_out_channels=[16,32] ...] [--seed 0] [--overwrite]

writes PIPE as ``StableDiffusionPipeline.save_pretrained`` does (model_index.json, vae/, text_encoder/,
tokenizer/, unet/, scheduler/; no safety checker): an AutoencoderKL, a CLIPTextModel, a UNet2DConditionModel
and a DDIM/DDPM scheduler with the config's arguments, and a CLIPTokenizer whose byte-level BPE vocabulary
spells every word of the captions in ``--words-from`` (folders with metadata.jsonl) as one token (any other
text falls back to single characters). ``--set key.sub=value`` overrides the config (values read as YAML).
Prints one line: the folder and the parameter count of each part.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SECTIONS = ("image_size", "vae", "text_encoder", "tokenizer", "unet", "scheduler")
SCHEDULERS = ("DDIMScheduler", "DDPMScheduler")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
WORD_RE = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]")  # letters run together; digits and signs stand alone


# ----------------------------------------------------------------------------- the tokenizer's files
def byte_alphabet() -> list:
    """The 256 printable characters byte-level BPE writes for the bytes 0..255 (printable Latin-1 bytes stand for
    themselves, the others are moved past 255 in order)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    moved = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(moved)) for b in range(256)]


def caption_words(folders) -> list:
    """The distinct words (lower case, in order of first use) of the ``text`` column of each folder's
    metadata.jsonl."""
    from lawa_diffusion.evaluation.prompts import read_metadata

    words: dict = {}
    for folder in folders:
        for _, caption in read_metadata(folder):
            for word in WORD_RE.findall(caption.lower()):
                words.setdefault(word, None)
    return list(words)


def write_tokenizer_files(folder: str, words) -> str:
    """vocab.json and merges.txt of a byte-level BPE that spells each of ``words`` as one token: every byte alone
    and word-final, then for each word the merges that join its characters from the left."""
    alphabet = byte_alphabet()
    vocab = {symbol: i for i, symbol in enumerate(alphabet + [s + "</w>" for s in alphabet])}
    merges: list = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        joined = pieces[0]
        for piece in pieces[1:]:
            merge = f"{joined} {piece}"
            joined += piece
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(joined, len(vocab))
    for token in SPECIAL_TOKENS:
        vocab.setdefault(token, len(vocab))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))
    return folder


# ----------------------------------------------------------------------------- the parts
def read_config(path: str, overrides) -> dict:
    from lawa_diffusion.config.base import check, read_yaml
    from lawa_diffusion.config.train import merge_mappings, parse_overrides

    config = merge_mappings(read_yaml(path), parse_overrides(overrides))
    unknown = sorted(set(config) - set(SECTIONS))
    check(not unknown, f"pipeline config {path!r} has unknown key(s) {', '.join(unknown)}; valid keys are: "
          f"{', '.join(SECTIONS)}")
    missing = [name for name in SECTIONS if name not in config]
    check(not missing, f"pipeline config {path!r} has no {', '.join(missing)}; add the section(s)")
    for name in SECTIONS[1:]:
        check(isinstance(config[name], dict), f"pipeline config section {name} must be a mapping of arguments, "
              f"got {config[name]!r}")
    size = config["image_size"]
    check(isinstance(size, int) and not isinstance(size, bool) and size >= 8,
          f"pipeline config image_size must be an integer >= 8, got {size!r}")
    check(config["scheduler"].get("class_name", "DDIMScheduler") in SCHEDULERS, f"pipeline config scheduler "
          f"class_name must be one of {', '.join(SCHEDULERS)}, got {config['scheduler'].get('class_name')!r}")
    return config


def build(cls, section: str, arguments: dict):
    """``cls(**arguments)``; arguments it does not take are one sentence naming the config section."""
    try:
        return cls(**arguments)
    except TypeError as e:
        raise ValueError(f"pipeline config section {section} does not fit {cls.__name__} ({e}); use that class's "
                         "argument names") from None


def build_pipeline(config: dict, words, seed: int = 0):
    """The StableDiffusionPipeline of ``config`` (random weights from ``seed``) with a tokenizer for ``words``."""
    import diffusers
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from lawa_diffusion.config.base import check

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as files:
        tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer_files(files, words), **config["tokenizer"])
    n = len(tokenizer)
    text = {"max_position_embeddings": tokenizer.model_max_length, **config["text_encoder"], "vocab_size": n,
            "bos_token_id": n - 2, "eos_token_id": n - 1, "pad_token_id": n - 1}
    text_encoder = CLIPTextModel(build(CLIPTextConfig, "text_encoder", text)).eval()
    vae = build(AutoencoderKL, "vae", {"sample_size": config["image_size"], **config["vae"]}).eval()
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    check(config["image_size"] % factor == 0, f"pipeline config image_size {config['image_size']} must be a multiple "
          f"of {factor} (the VAE's downsampling); change image_size or vae.block_out_channels")
    unet_args = {"sample_size": config["image_size"] // factor,
                 "cross_attention_dim": text_encoder.config.hidden_size, **config["unet"]}
    check(unet_args["cross_attention_dim"] == text_encoder.config.hidden_size,
          f"pipeline config unet.cross_attention_dim {unet_args['cross_attention_dim']} must equal text_encoder."
          f"hidden_size {text_encoder.config.hidden_size}; leave it out to take that value")
    check(unet_args.get("in_channels", 4) == vae.config.latent_channels, f"pipeline config unet.in_channels "
          f"{unet_args.get('in_channels', 4)} must equal vae.latent_channels {vae.config.latent_channels}")
    unet = build(UNet2DConditionModel, "unet", unet_args).eval()
    arguments = dict(config["scheduler"])
    scheduler = build(getattr(diffusers, arguments.pop("class_name", "DDIMScheduler")), "scheduler", arguments)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_pipeline(pipe, folder: str, overwrite: bool = False) -> str:
    """``pipe.save_pretrained`` into a temporary folder beside ``folder``, renamed into place when complete."""
    from lawa_diffusion.utils.files import atomic_dir

    with atomic_dir(folder, overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp)
    return os.path.abspath(folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "text_to_image_gpu.yaml"))
    p.add_argument("--words-from", action="append", required=True, metavar="FOLDER",
                   help="captioned image folder (metadata.jsonl, column text) whose words the tokenizer spells; "
                        "repeatable")
    p.add_argument("--output", required=True, help="the pipeline folder to write")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    args = p.parse_args(argv)
    try:
        config = read_config(args.config, args.set)
        words = caption_words(args.words_from)
        pipe = build_pipeline(config, words, args.seed)
        folder = write_pipeline(pipe, args.output, args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"make_tiny_pipeline: error: {e}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{name} {sum(t.numel() for t in getattr(pipe, name).parameters()) / 1e6:.2f}M"
                      for name in ("unet", "vae", "text_encoder"))
    print(f"{folder}: {sizes} parameters; tokenizer {len(pipe.tokenizer)} tokens ({len(words)} caption words); "
          f"{type(pipe.scheduler).__name__}; images {config['image_size']}x{config['image_size']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
