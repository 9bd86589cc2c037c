"""Images in, uint8 tensors out: Fashion-MNIST IDX files, image folders, arrays; a training dataset on top.

Every loader returns ``uint8 [N, C, H, W]`` (C = 1 for grayscale, 3 for colour) on the CPU.
"""
from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np
import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.config.fid import FID_RESIZE_MODES as RESIZE_MODES
from lawa_diffusion.config.fid import FIDConfig
from lawa_diffusion.utils.output import say

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_RESIZE_MODE = FIDConfig.resize_mode
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _idx_file(folder: str, split: str) -> Optional[str]:
    name = FASHION_MNIST_FILES[split]
    for candidate in (os.path.join(folder, name + ".gz"), os.path.join(folder, name),
                      os.path.join(folder, "FashionMNIST", "raw", name)):
        if os.path.isfile(candidate):
            return candidate
    return None


def fashion_mnist_file(split: str = "train", root: Optional[str] = None, *, download: bool = True) -> str:
    """Path of the Fashion-MNIST image IDX file for ``split``: ``root`` → ``$LAWA_DATA`` → the Debian package's
    folder → torchvision download into the cache (announced)."""
    check(split in FASHION_MNIST_FILES, f"fashion-mnist split must be one of train, test; got {split!r}")
    if root is not None:
        found = _idx_file(os.fspath(root), split)
        if found is None:
            raise FileNotFoundError(f"data root {os.fspath(root)!r} has no {FASHION_MNIST_FILES[split]}(.gz); "
                                    "point it at the folder holding the Fashion-MNIST IDX files")
        return found
    folders = [os.environ.get("LAWA_DATA"), FASHION_MNIST_DIR, _download_dir()]
    for folder in [f for f in folders if f]:
        for sub in (folder, os.path.join(folder, "fashion-mnist")):
            found = _idx_file(sub, split)
            if found:
                return found
    if download:
        return _download(split)
    raise FileNotFoundError(_missing_fashion_mnist())


def _download_dir() -> str:
    from lawa_diffusion.utils.files import cache_root

    return os.path.join(cache_root(), "data", "fashion-mnist")


def _missing_fashion_mnist() -> str:
    return (f"Fashion-MNIST not found; set $LAWA_DATA to a folder with {FASHION_MNIST_FILES['train']}.gz and "
            f"{FASHION_MNIST_FILES['test']}.gz, or install the Debian package dataset-fashion-mnist "
            f"(files in {FASHION_MNIST_DIR})")


def _download(split: str) -> str:
    import torchvision

    folder = _download_dir()
    say(f"downloading Fashion-MNIST with torchvision into {folder}", "data")
    try:
        torchvision.datasets.FashionMNIST(folder, train=split == "train", download=True)
    except Exception as e:  # offline or blocked: one message with what to do instead
        raise FileNotFoundError(f"{_missing_fashion_mnist()} (download failed: {str(e).splitlines()[0][:150]})") from None
    found = _idx_file(folder, split)
    if found is None:
        raise FileNotFoundError(_missing_fashion_mnist())
    return found


def _read_idx(path: str, magic: bytes, ndim: int, what: str, fix: str) -> tuple:
    """(payload bytes, dims) of an IDX uint8 file (``.gz`` or raw) holding ``ndim`` dimensions; one sentence
    naming the file for anything unreadable, of another kind or truncated."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"IDX file {path!r} could not be read ({e}); replace it with an intact copy") from None
    head = 4 + 4 * ndim
    check(len(data) >= head and data[:4] == magic,
          f"file {path!r} is not an IDX uint8 {what} file (magic 0x{magic.hex()}); {fix}")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    size = int(np.prod(dims))
    check(len(data) == head + size, f"IDX file {path!r} is truncated ({len(data)} bytes for {what}s of shape "
          f"{'x'.join(map(str, dims))}); replace it with an intact copy")
    return data[head:], dims


def read_idx_images(path: str) -> torch.Tensor:
    """uint8 [N, 1, H, W] from an IDX image file (``.gz`` or raw)."""
    data, (n, h, w) = _read_idx(path, b"\x00\x00\x08\x03", 3, "image", "pass a Fashion-MNIST images file")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).view(n, 1, h, w)


def read_idx_labels(path: str) -> torch.Tensor:
    """int64 [N] from an IDX label file (``.gz`` or raw)."""
    data, _ = _read_idx(path, b"\x00\x00\x08\x01", 1, "label",
                        "put Fashion-MNIST's label file next to its image file")
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))


def load_fashion_mnist(split: str = "train", root: Optional[str] = None, *, download: bool = True) -> torch.Tensor:
    """Fashion-MNIST images of ``split`` ("train": 60k, "test": 10k) as uint8 [N, 1, 28, 28]."""
    return read_idx_images(fashion_mnist_file(split, root, download=download))


def list_image_files(path: str) -> list[str]:
    """Sorted image files directly in folder ``path`` (not recursive; hidden files skipped)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"image folder {path!r} does not exist; pass a folder of .png/.jpg images")
    names = sorted(n for n in os.listdir(path) if not n.startswith(".") and os.path.isfile(os.path.join(path, n)))
    images = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    if not images:
        other = f" (it holds {len(names)} other file(s), e.g. {names[0]!r})" if names else " (it is empty)"
        raise ValueError(f"image folder {path!r} has no image files with extension "
                         f"{'/'.join(IMAGE_EXTENSIONS)}{other}; pass a folder of images")
    return [os.path.join(path, n) for n in images]


def _read_image(path: str, channels: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image file {path!r} could not be decoded ({str(e).splitlines()[0][:120]}); "
                         "remove or replace it") from None
    array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.reshape(array.shape[0], array.shape[1], -1).copy()).permute(2, 0, 1)


def _image_modes(files: list[str]) -> list[str]:
    from PIL import Image, UnidentifiedImageError

    modes = []
    for path in files:
        try:
            with Image.open(path) as img:
                modes.append(img.mode)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"image file {path!r} could not be decoded ({str(e).splitlines()[0][:120]}); "
                             "remove or replace it") from None
    return modes


def load_image_folder(path: str, *, image_size: Optional[int] = None, channels: Optional[int] = None,
                      resize_mode: str = DEFAULT_RESIZE_MODE, progress: bool = False) -> torch.Tensor:
    """All images directly in folder ``path`` as uint8 [N, C, H, W], in sorted file-name order.

    channels: 1 or 3; None gives 1 when every image is grayscale, else 3 (as PIL's convert("RGB")).
    Images of different sizes are refused unless ``image_size`` is given, in which case each is brought to
    image_size x image_size by :func:`fit_to_size` with ``resize_mode``.
    """
    files = list_image_files(path)
    check(channels in (None, 1, 3), f"channels must be 1, 3 or None, got {channels!r}")
    if channels is None:
        channels = 1 if all(m in GRAY_MODES for m in _image_modes(files)) else 3
    from tqdm.auto import tqdm

    images = []
    for file in tqdm(files, desc="reading images", unit="img", disable=not progress, leave=False):
        img = _read_image(file, channels)
        images.append(img if image_size is None else fit_to_size(img[None], image_size, resize_mode)[0])
    sizes = sorted({tuple(img.shape[1:]) for img in images})
    check(len(sizes) == 1, f"image folder {os.fspath(path)!r} has images of {len(sizes)} sizes "
          f"({', '.join(f'{h}x{w}' for h, w in sizes[:3])}{', ...' if len(sizes) > 3 else ''}); pass --image-size N "
          "to resize and centre-crop all of them to NxN")
    return torch.stack(images)


def load_array(path: str, key: Optional[str] = None) -> torch.Tensor:
    """uint8 images from a .npy or .npz file: [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1, 3."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"array file {path!r} does not exist; pass a .npy or .npz file of uint8 images")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"array file {path!r} could not be read ({str(e).splitlines()[0][:120]}); "
                         "pass a .npy or .npz file") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        keys = list(loaded.keys())
        key = key or ("images" if "images" in keys else keys[0] if len(keys) == 1 else None)
        check(key in keys, f"array file {path!r} holds {', '.join(keys) or 'nothing'}; name the images array "
              "'images' or keep a single array in it")
        loaded = loaded[key]
    return to_nchw_uint8(np.asarray(loaded), path)


def to_nchw_uint8(array: np.ndarray, where: str = "array") -> torch.Tensor:
    """uint8 [N, C, H, W] from an array laid out [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3)."""
    check(array.dtype == np.uint8, f"{where} must hold uint8 images (0-255), got dtype {array.dtype}; "
          "convert with (x * 255).round().astype('uint8')")
    check(array.ndim in (3, 4) and array.shape[0] >= 1, f"{where} must have shape [N, H, W], [N, H, W, C] or "
          f"[N, C, H, W], got {array.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dim() == 3:
        return tensor[:, None]
    if tensor.shape[1] in (1, 3) and tensor.shape[3] not in (1, 3):
        return tensor
    check(tensor.shape[3] in (1, 3), f"{where} has shape {tuple(array.shape)}; the channel axis must have 1 or 3 "
          "entries")
    return tensor.permute(0, 3, 1, 2).contiguous()


def parse_dataset_name(source: str) -> Optional[str]:
    """Split for names like "fashion-mnist" or "fashion-mnist:test"; None for anything else."""
    name, _, split = source.partition(":")
    if name.lower() not in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return None
    return split or "train"


def load_images(source, *, image_size: Optional[int] = None, resize_mode: str = DEFAULT_RESIZE_MODE,
                progress: bool = False) -> torch.Tensor:
    """uint8 [N, C, H, W] from a dataset name, an image folder, a .npy/.npz file or a tensor/array.

    ``image_size`` is applied here only to folders (image by image, so mixed sizes are allowed); bring the
    result to size with :func:`fit_to_size`."""
    if isinstance(source, torch.Tensor):
        check(source.dtype == torch.uint8 and source.dim() == 4, "image tensor must be uint8 [N, C, H, W], got "
              f"{source.dtype} {tuple(source.shape)}")
        return source.cpu()
    if isinstance(source, np.ndarray):
        return to_nchw_uint8(source)
    source = os.fspath(source)
    split = parse_dataset_name(source)
    if split is not None:
        return load_fashion_mnist(split)
    if os.path.isdir(source):
        return load_image_folder(source, image_size=image_size, resize_mode=resize_mode, progress=progress)
    if source.endswith((".npy", ".npz")):
        return load_array(source)
    raise FileNotFoundError(f"image source {source!r} is neither a folder, a .npy/.npz file nor a dataset name; "
                            "pass one of those (e.g. fashion-mnist or fashion-mnist:test)")


def fingerprint(source) -> dict:
    """A cheap identity of an image source that never decodes images: file names, sizes and times, or a hash."""
    import hashlib

    if isinstance(source, (torch.Tensor, np.ndarray)):
        array = source.cpu().numpy() if isinstance(source, torch.Tensor) else source
        array = np.ascontiguousarray(array)
        return {"kind": "array", "shape": list(array.shape), "sha256": hashlib.sha256(array.tobytes()).hexdigest()}
    source = os.fspath(source)
    split = parse_dataset_name(source)
    if split is not None:
        path = fashion_mnist_file(split)
        return {"kind": "fashion-mnist", "split": split, **_file_identity(path)}
    if os.path.isdir(source):
        files = list_image_files(source)
        listing = "\n".join(f"{os.path.basename(f)}\t{os.stat(f).st_size}\t{os.stat(f).st_mtime_ns}" for f in files)
        return {"kind": "folder", "path": os.path.realpath(source), "count": len(files),
                "listing_sha256": hashlib.sha256(listing.encode()).hexdigest()}
    if os.path.isfile(source):
        return {"kind": "file", **_file_identity(source)}
    raise FileNotFoundError(f"image source {source!r} does not exist; pass a folder, a .npy/.npz file or a dataset name")


def _file_identity(path: str) -> dict:
    st = os.stat(path)
    return {"path": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fit_to_size(images: torch.Tensor, image_size: int, mode: str = DEFAULT_RESIZE_MODE) -> torch.Tensor:
    """uint8 [N, C, S, S] from uint8 [N, C, H, W].

    "pad": zero-pad symmetrically (centre-crop where larger) — Fashion-MNIST 28 → 32 keeps every pixel.
    "resize": resize the shorter side to S (antialiased bilinear), then centre-crop.
    """
    import torchvision.transforms.v2.functional as TF

    check(isinstance(image_size, int) and image_size >= 1, f"image_size must be a positive integer, got {image_size!r}")
    check(mode in RESIZE_MODES, f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    h, w = images.shape[-2:]
    if (h, w) == (image_size, image_size):
        return images
    if mode == "resize":
        images = TF.resize(images, [image_size], antialias=True)
        return TF.center_crop(images, [image_size, image_size])
    top, left = max(image_size - h, 0) // 2, max(image_size - w, 0) // 2
    padding = [left, top, max(image_size - w, 0) - left, max(image_size - h, 0) - top]
    if any(padding):
        images = TF.pad(images, padding, fill=0)
    return TF.center_crop(images, [image_size, image_size])
