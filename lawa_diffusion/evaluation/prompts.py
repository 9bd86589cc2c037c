"""Where the conditions of a conditional evaluation come from: prompts (and the reference images paired with
them) or class labels.

Four sources, one result (:class:`PromptSet`):
  * a text file, one prompt per line (blank lines and ``#`` comments skipped);
  * an image folder with ``metadata.jsonl`` (rows ``{"file_name": ..., "<caption column>": ...}``, the layout
    diffusers' ``train_text_to_image.py`` reads): a deterministic held-out part of its rows gives the prompts
    (their captions) and the reference images (their files), paired row by row;
  * a dataset written by HF ``datasets``' ``save_to_disk`` (image and caption columns), split the same way;
  * class labels of a class-conditional UNet (``num_class_embeds``): a list, or every class, cycled.

Sample ``i`` of an evaluation is conditioned on entry ``i % len(prompt_set)``. ``PromptSet.fingerprint()``
identifies the conditions and the reference (file names, sizes and times; never decoded) for cache keys.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from lawa_diffusion.config.base import check

METADATA_NAME = "metadata.jsonl"
FILE_COLUMN = "file_name"
CAPTION_COLUMN = "text"  # train_text_to_image.py's --caption_column default
IMAGE_COLUMN = "image"
FINGERPRINT_FORMAT = 1
RESIZE_MODES = ("resize", "pad")

Size = Union[int, Sequence[int]]


# --------------------------------------------------------------------------- reference images


@dataclasses.dataclass(frozen=True)
class ImageFiles:
    """Reference images as files (a held-out part of an image folder), in prompt order."""

    paths: tuple

    def __len__(self) -> int:
        return len(self.paths)

    def identity(self) -> dict:
        """Names, sizes and modification times (the files are never decoded for this)."""
        listing = []
        for path in self.paths:
            st = os.stat(path)
            listing.append(f"{os.path.realpath(path)}\t{st.st_size}\t{st.st_mtime_ns}")
        return {"kind": "files", "count": len(self.paths),
                "listing_sha256": hashlib.sha256("\n".join(listing).encode()).hexdigest()}

    def read(self, index: int) -> torch.Tensor:
        return _read_rgb(self.paths[index])


@dataclasses.dataclass(frozen=True)
class DatasetRows:
    """Reference images as rows of a dataset saved with ``datasets``' ``save_to_disk``, in prompt order."""

    path: str
    split: Optional[str]
    image_column: str
    rows: tuple
    dataset_fingerprint: str
    dataset: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def identity(self) -> dict:
        return {"kind": "saved-dataset", "path": os.path.realpath(self.path), "split": self.split,
                "image_column": self.image_column, "rows": list(self.rows), "fingerprint": self.dataset_fingerprint}

    def read(self, index: int) -> torch.Tensor:
        dataset = self.dataset if self.dataset is not None else _open_saved_dataset(self.path, self.split)[0]
        value = dataset[int(self.rows[index])][self.image_column]
        return _rgb_of(value, f"row {self.rows[index]} of dataset {self.path!r}")


def _read_rgb(path: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return _rgb_of(img, path)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image file {path!r} could not be decoded ({str(e).splitlines()[0][:120]}); "
                         "remove or replace it") from None


def _rgb_of(value: Any, where: str) -> torch.Tensor:
    """uint8 [3, H, W] from a PIL image, an HWC/HW array or a ``datasets`` Image dict (bytes or path)."""
    import io

    from PIL import Image

    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with Image.open(source) as img:
            return _rgb_of(img, where)
    if isinstance(value, Image.Image):
        array = np.asarray(value.convert("RGB"), dtype=np.uint8)
    else:
        array = np.asarray(value)
        check(array.dtype == np.uint8 and array.ndim in (2, 3), f"image of {where} is neither a PIL image nor a uint8 "
              f"HxW(xC) array (got {array.dtype} {array.shape}); store images with the datasets Image feature")
        array = np.asarray(Image.fromarray(array).convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def fit_image(image: torch.Tensor, size: Size, mode: str = "resize") -> torch.Tensor:
    """uint8 [C, h, w] from uint8 [C, H, W]: "resize" scales the image so that it covers h x w (antialiased
    bilinear) and centre-crops; "pad" zero-pads (centre-crops where larger)."""
    import torchvision.transforms.v2.functional as TF

    h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    check(mode in RESIZE_MODES, f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    height, width = image.shape[-2:]
    if (height, width) == (h, w):
        return image
    if mode == "resize":
        scale = max(h / height, w / width)
        image = TF.resize(image, [max(h, round(height * scale)), max(w, round(width * scale))], antialias=True)
    else:
        top, left = max(h - height, 0) // 2, max(w - width, 0) // 2
        padding = [left, top, max(w - width, 0) - left, max(h - height, 0) - top]
        if any(padding):
            image = TF.pad(image, padding, fill=0)
    return TF.center_crop(image, [h, w])


# --------------------------------------------------------------------------- the prompt set


@dataclasses.dataclass(frozen=True)
class PromptSet:
    """The conditions of an evaluation: ``prompts`` (text) or ``class_labels``; sample ``i`` takes entry
    ``i % len(self)``. ``reference``: the images paired with the prompts (same order), when the set came from
    captioned images. ``source``: where it came from (for messages and results)."""

    prompts: tuple = ()
    class_labels: tuple = ()
    reference: Optional[Union[ImageFiles, DatasetRows]] = None
    source: str = ""

    def __post_init__(self) -> None:
        check(bool(self.prompts) != bool(self.class_labels),
              "a prompt set holds either prompts or class labels, and at least one entry")
        check(all(isinstance(p, str) for p in self.prompts), "prompts must be strings")
        check(all(isinstance(c, int) and not isinstance(c, bool) for c in self.class_labels),
              "class labels must be integers")
        check(self.reference is None or len(self.reference) == len(self), f"the reference of {self.source!r} has "
              f"{len(self.reference or ())} images for {len(self)} prompts; they must be paired one to one")

    @property
    def kind(self) -> str:
        """"text" or "class"."""
        return "text" if self.prompts else "class"

    def __len__(self) -> int:
        return len(self.prompts) or len(self.class_labels)

    def entries(self) -> tuple:
        return self.prompts or self.class_labels

    def index_of(self, sample: int) -> int:
        """Which entry conditions sample ``sample`` (the set is cycled)."""
        return int(sample) % len(self)

    def condition(self, sample: int):
        return self.entries()[self.index_of(sample)]

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the conditions, in order, and of the reference's identity."""
        payload = {"format": FINGERPRINT_FORMAT, "kind": self.kind, "entries": list(self.entries()),
                   "reference": None if self.reference is None else self.reference.identity()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def reference_images(self, indices: Sequence[int], size: Optional[Size] = None,
                         resize_mode: str = "resize") -> torch.Tensor:
        """uint8 [len(indices), 3, h, w] of the reference images ``indices`` (decoded now), brought to ``size``."""
        check(self.reference is not None, f"prompt set {self.source!r} has no reference images; pass a reference "
              "(--reference) or take the prompts from a captioned image folder")
        images = [self.reference.read(int(i)) for i in indices]
        if size is not None:
            images = [fit_image(img, size, resize_mode) for img in images]
        sizes = sorted({tuple(img.shape[1:]) for img in images})
        check(len(sizes) == 1, f"reference images of {self.source!r} come in {len(sizes)} sizes; pass an image size "
              "to bring them to one")
        return torch.stack(images)


# --------------------------------------------------------------------------- (a) text file


def prompts_from_text_file(path: str | os.PathLike, *, option: str = "--prompts") -> PromptSet:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped; whitespace around a prompt is
    removed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option} file {path!r} does not exist; pass a text file with one prompt per line "
                                f"or an image folder with {METADATA_NAME}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{option} file {path!r} is not UTF-8 text; save it as UTF-8 with one prompt per line") from None
    prompts = tuple(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))
    check(prompts, f"{option} file {path!r} holds no prompts (only blank lines or # comments); write one prompt "
          "per line")
    return PromptSet(prompts=prompts, source=path)


# --------------------------------------------------------------------------- split of captioned rows


def split_rows(num_rows: int, num_reference: Optional[int] = None, split_seed: Optional[int] = None,
               *, option: str = "--num-reference") -> tuple:
    """(training rows, reference rows) of ``range(num_rows)``, disjoint, each in increasing order.

    num_reference None: every row is reference (a folder of validation images). split_seed None: the last
    ``num_reference`` rows; an integer: a seeded random choice of rows (NumPy's RandomState(split_seed))."""
    if num_reference is None:
        return (), tuple(range(num_rows))
    check(isinstance(num_reference, int) and 2 <= num_reference <= num_rows,
          f"{option} must be an integer from 2 to the {num_rows} captioned rows, got {num_reference!r}")
    if split_seed is None:
        held = tuple(range(num_rows - num_reference, num_rows))
    else:
        check(isinstance(split_seed, int) and 0 <= split_seed < 2**32, f"split_seed must be an integer in [0, 2**32), "
              f"got {split_seed!r}")
        held = tuple(int(i) for i in np.sort(np.random.RandomState(split_seed).choice(num_rows, num_reference,
                                                                                      replace=False)))
    chosen = set(held)
    return tuple(i for i in range(num_rows) if i not in chosen), held


def _caption(value: Any, where: str, caption_column: str) -> str:
    """A caption cell: a string, or a list of strings (the first is used)."""
    if isinstance(value, (list, tuple, np.ndarray)) and len(value) and isinstance(value[0], str):
        return value[0]
    check(isinstance(value, str), f"caption column {caption_column!r} of {where} holds a {type(value).__name__}, not "
          "text; pass --caption-column naming a text column")
    return value


# --------------------------------------------------------------------------- (b) image folder with metadata.jsonl


def read_metadata(folder: str | os.PathLike, caption_column: str = CAPTION_COLUMN) -> list:
    """[(image path, caption)] of every row of ``folder/metadata.jsonl``, in file order."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--prompts folder {folder!r} does not exist; pass an image folder with "
                                f"{METADATA_NAME} or a text file with one prompt per line")
    path = os.path.join(folder, METADATA_NAME)
    if not os.path.isfile(path):
        inside = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n, METADATA_NAME)))
        hint = f" (it is in {', '.join(inside)}: pass {os.path.join(folder, inside[0])!r})" if inside else ""
        raise FileNotFoundError(f"--prompts folder {folder!r} has no {METADATA_NAME}{hint}; add one with a "
                                f"{FILE_COLUMN!r} and a caption column per image")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"line {number} of {path!r}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} is not JSON ({e.msg}); write one JSON object per line") from None
            check(isinstance(row, dict) and FILE_COLUMN in row, f"{where} has no {FILE_COLUMN!r}; every row needs "
                  "the image's file name relative to the folder")
            check(caption_column in row, f"{where} has no caption column {caption_column!r} (it has "
                  f"{', '.join(sorted(row))}); pass --caption-column naming one of those")
            file = os.path.join(folder, str(row[FILE_COLUMN]))
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{where} names {row[FILE_COLUMN]!r}, which is not a file in {folder!r}; "
                                        "fix the row or add the image")
            rows.append((file, _caption(row[caption_column], where, caption_column)))
    check(rows, f"{path!r} has no rows; write one JSON object per image")
    return rows


def prompts_from_image_folder(folder: str | os.PathLike, *, num_reference: Optional[int] = None,
                              caption_column: str = CAPTION_COLUMN, split_seed: Optional[int] = None) -> PromptSet:
    """The held-out rows of a captioned image folder (see :func:`split_rows`): their captions are the prompts
    and their images the reference, pair by pair."""
    rows = read_metadata(folder, caption_column)
    _, held = split_rows(len(rows), num_reference, split_seed)
    return PromptSet(prompts=tuple(rows[i][1] for i in held), reference=ImageFiles(tuple(rows[i][0] for i in held)),
                     source=os.fspath(folder))


# --------------------------------------------------------------------------- (c) dataset saved with save_to_disk


def is_saved_dataset(path: str | os.PathLike) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    path = os.fspath(path)
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n))
                                       for n in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _open_saved_dataset(path: str, split: Optional[str]) -> tuple:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"--prompts {path!r} is a saved HF dataset, which needs the datasets package; "
                         "pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(path)
    except (OSError, ValueError, FileNotFoundError) as e:
        raise ValueError(f"--prompts dataset {path!r} could not be loaded ({str(e).splitlines()[0][:120]}); pass a "
                         "folder written by save_to_disk") from None
    if hasattr(loaded, "column_names") and not isinstance(loaded.column_names, dict):
        check(split is None, f"--dataset-split {split!r} was given but {path!r} holds a single split; drop it")
        return loaded, None
    splits = sorted(loaded.keys())
    if split is None and len(splits) == 1:
        split = splits[0]
    check(split in splits, f"--dataset-split must name one of the splits of {path!r} ({', '.join(splits)}), got "
          f"{split!r}")
    return loaded[split], split


def prompts_from_saved_dataset(path: str | os.PathLike, *, num_reference: Optional[int] = None,
                               caption_column: str = CAPTION_COLUMN, image_column: str = IMAGE_COLUMN,
                               split: Optional[str] = None, split_seed: Optional[int] = None) -> PromptSet:
    """As :func:`prompts_from_image_folder`, for a dataset saved with ``save_to_disk`` (``datasets`` imported
    only here). ``split``: which split of a DatasetDict (needed when it has several)."""
    path = os.fspath(path)
    dataset, split = _open_saved_dataset(path, split)
    columns = list(dataset.column_names)
    for option, column in (("--caption-column", caption_column), ("--image-column", image_column)):
        check(column in columns, f"{option} {column!r} is not a column of dataset {path!r} (columns: "
              f"{', '.join(columns)}); pass one of those")
    captions = dataset[caption_column]
    _, held = split_rows(len(captions), num_reference, split_seed)
    prompts = tuple(_caption(captions[i], f"row {i} of dataset {path!r}", caption_column) for i in held)
    reference = DatasetRows(path, split, image_column, held, str(getattr(dataset, "_fingerprint", "")), dataset)
    return PromptSet(prompts=prompts, reference=reference, source=path)


# --------------------------------------------------------------------------- (d) class labels


def class_label_set(labels: Union[str, Sequence[int], None], num_classes: int, *,
                    option: str = "--class-labels") -> PromptSet:
    """Class labels of a class-conditional UNet with ``num_classes`` classes: None or "all" gives every class
    (sample i takes class i % num_classes); else a list of ints or a string such as "0,3,7"."""
    check(isinstance(num_classes, int) and num_classes >= 1, f"the model's number of classes must be >= 1, got "
          f"{num_classes!r}")
    if labels is None or (isinstance(labels, str) and labels.strip().lower() == "all"):
        return PromptSet(class_labels=tuple(range(num_classes)), source=f"all {num_classes} classes")
    if isinstance(labels, str):
        try:
            labels = [int(part) for part in labels.replace(" ", "").split(",") if part]
        except ValueError:
            raise ValueError(f"{option} must be 'all' or comma-separated integers, got {labels!r}") from None
    labels = tuple(labels)
    check(labels and all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c < num_classes
                         for c in labels),
          f"{option} must be class numbers from 0 to {num_classes - 1} (the model's num_class_embeds is {num_classes}),"
          f" got {list(labels)!r}")
    return PromptSet(class_labels=tuple(int(c) for c in labels), source=f"classes {','.join(map(str, labels))}")


# --------------------------------------------------------------------------- any source


def load_prompt_set(source: str | os.PathLike, *, num_reference: Optional[int] = None,
                    caption_column: str = CAPTION_COLUMN, image_column: str = IMAGE_COLUMN,
                    split: Optional[str] = None, split_seed: Optional[int] = None) -> PromptSet:
    """A prompt set from a text file, a captioned image folder or a saved dataset (told apart by what is there)."""
    path = os.fspath(source)
    if os.path.isfile(path):
        return prompts_from_text_file(path)
    if is_saved_dataset(path):
        return prompts_from_saved_dataset(path, num_reference=num_reference, caption_column=caption_column,
                                          image_column=image_column, split=split, split_seed=split_seed)
    if os.path.isdir(path):
        return prompts_from_image_folder(path, num_reference=num_reference, caption_column=caption_column,
                                         split_seed=split_seed)
    raise FileNotFoundError(f"--prompts {path!r} does not exist; pass a text file with one prompt per line, an "
                            f"image folder with {METADATA_NAME}, or a dataset saved with save_to_disk")
