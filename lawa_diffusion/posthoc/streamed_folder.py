"""A diffusers model folder whose weights file is written a block at a time, as a one-pass synthesis produces it:
``config.json`` (the model class's own ``save_config``) and ``diffusion_pytorch_model.safetensors`` whose header is
known before any weight is (every tensor's name, shape and place), so the data is written in order, never held whole.
"""
from __future__ import annotations

import json
import math
import os
from typing import Sequence, Tuple

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.posthoc.saved_weights import WEIGHTS_NAME

_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def check_fits(model_cls, model_config: dict, order: Sequence[Tuple[str, Tuple[int, ...]]], where: str) -> None:
    """One sentence when the tensors ``order`` names are not exactly the state dict of ``model_cls(model_config)``."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_cls.from_config(model_config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    given = dict(order)
    odd = sorted(set(expected).symmetric_difference(given)) or sorted(n for n in given if tuple(given[n]) != expected[n])
    check(not odd, f"the weights of {where} do not fit the {model_cls.__name__} their config describes (e.g. "
                   f"{odd[0] if odd else ''!r}); synthesise from snapshots of the model the run trained")


def write_config(folder: str, model_cls, model_config: dict) -> None:
    """``config.json`` exactly as ``save_pretrained`` writes it."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_cls.from_config(model_config)
    model.save_config(folder)


class StreamedSafetensors:
    """A safetensors file of the tensors ``order`` (name, shape) in ``dtype``, their data written in that order by
    :meth:`write` (flat element ``start`` onwards), from any number of calls."""

    def __init__(self, path: str, order: Sequence[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype = torch.float32):
        check(dtype in _NAMES, f"a streamed weights file holds float tensors, got {dtype}")
        self.path, self.dtype = path, dtype
        header, offset = {}, 0
        for name, shape in order:
            size = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.data_start, self.size = 8 + len(text), offset
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, len(text).to_bytes(8, "little") + text, 0)
        os.ftruncate(self.fd, self.data_start + offset)

    def write(self, start: int, values: torch.Tensor) -> None:
        data = values.detach().to("cpu", self.dtype).contiguous().view(torch.uint8).numpy()
        view, at = memoryview(data), self.data_start + start * self.dtype.itemsize
        while len(view):
            done = os.pwrite(self.fd, view, at)
            view, at = view[done:], at + done

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def weights_path(folder: str) -> str:
    return os.path.join(folder, WEIGHTS_NAME)
