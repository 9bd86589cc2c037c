"""Captioned image folders from Fashion-MNIST, in the layout diffusers' train_text_to_image.py reads.

    python scripts/make_caption_folder.py --output DATA [--num-train 20000] [--num-test 2000] [--image-size 32]

writes DATA/train (from the train split) and DATA/test (from the test split): one grayscale PNG per image
(28x28 zero-padded to --image-size, or resized when smaller than 28) and metadata.jsonl rows
{"file_name": ..., "text": "a photo of a <class name>"}. Train on DATA/train; DATA/test is the held-out part:
``--lawa_fid_prompts DATA/test --lawa_fid_num_reference N`` takes its last N rows as prompts and reference.
Each folder is written under a temporary name and renamed when complete. Prints one line per folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Fashion-MNIST's ten classes, label 0 to 9, as words a caption uses
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
TEMPLATE = "a photo of a {}"


def captions_of(labels, template: str = TEMPLATE) -> list:
    """The caption of each class label (``template`` with the class name in place of ``{}``)."""
    return [template.format(CLASS_NAMES[int(label)]) for label in labels]


def write_folder(path: str, images, captions, *, overwrite: bool = False) -> int:
    """``images`` (uint8 [N, 1, H, W]) as PNG files with ``captions`` in metadata.jsonl; returns N."""
    from PIL import Image

    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"--output folder {path!r} already exists; choose another --output or pass --overwrite")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        rows = []
        for i, (image, caption) in enumerate(zip(images, captions)):
            name = f"{i:05d}.png"
            Image.fromarray(image[0].numpy(), mode="L").save(os.path.join(tmp, name), compress_level=1)
            rows.append(json.dumps({"file_name": name, "text": caption}))
        with open(os.path.join(tmp, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.write("\n".join(rows) + "\n")
        os.sync()  # one flush of the whole folder (an fsync per file costs milliseconds each)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(rows)


def make_split(out: str, split: str, count: int, image_size: int, template: str, overwrite: bool) -> str:
    from lawa_diffusion.evaluation import images as image_io
    from lawa_diffusion.evaluation.images import read_idx_labels
    from lawa_diffusion.training.labels import labels_file_of

    path = image_io.fashion_mnist_file(split, download=False)
    pixels, labels = image_io.read_idx_images(path), read_idx_labels(labels_file_of(path))
    if count > len(labels):
        raise ValueError(f"--num-{split} must be at most the {len(labels)} images of Fashion-MNIST's {split} split, "
                         f"got {count}; pass a smaller number")
    mode = "pad" if image_size >= pixels.shape[-1] else "resize"
    pixels = image_io.fit_to_size(pixels[:count], image_size, mode)
    start = time.perf_counter()
    folder = os.path.join(out, split)
    n = write_folder(folder, pixels, captions_of(labels[:count], template), overwrite=overwrite)
    return f"{folder}: {n} images {image_size}x{image_size} ({mode}), {len(set(labels[:count].tolist()))} classes, " \
           f"{time.perf_counter() - start:.1f} s"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", required=True, help="folder to hold train/ and test/")
    p.add_argument("--num-train", type=int, default=20000, help="images from the train split (of 60000)")
    p.add_argument("--num-test", type=int, default=2000, help="images from the test split (of 10000)")
    p.add_argument("--image-size", type=int, default=32, help="side of the written images")
    p.add_argument("--template", default=TEMPLATE, help="caption, with {} where the class name goes")
    p.add_argument("--overwrite", action="store_true", help="replace existing train/ and test/ folders")
    args = p.parse_args(argv)
    try:
        for name, value, low in (("--num-train", args.num_train, 1), ("--num-test", args.num_test, 2),
                                 ("--image-size", args.image_size, 8)):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}; pass a larger number")
        if "{}" not in args.template:
            raise ValueError(f"--template must hold {{}} where the class name goes, got {args.template!r}")
        for split, count in (("train", args.num_train), ("test", args.num_test)):
            print(make_split(args.output, split, count, args.image_size, args.template, args.overwrite), flush=True)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"make_caption_folder: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
