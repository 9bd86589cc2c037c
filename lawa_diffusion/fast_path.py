"""The trainer's GPU fast path (``fast_path: auto|on|off``): fused AdamW, a compiled training forward with
CUDA graphs, and sampling under autocast in the training precision.

Each piece falls back to the plain path, with one warning line, where it cannot work: off the GPU, when
``torch.compile`` is missing or fails. On the CPU the fast path is the plain path, so weights and
resumption are exactly those of ``fast_path: off`` there.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch

from lawa_diffusion.output import warn

# CUDA graphs (torch's graph trees) over inductor kernels: the small UNets are launch-bound.
COMPILE_MODE = "reduce-overhead"
PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def enabled(setting: str, device) -> bool:
    """Whether the fast path runs: ``on`` and ``auto`` on a CUDA device; ``on`` elsewhere warns and falls back."""
    cuda = torch.device(device).type == "cuda"
    if setting == "on" and not cuda:
        warn(f"fast_path 'on' needs a CUDA device, training runs on {torch.device(device).type}; using the plain path")
    return setting != "off" and cuda


def compile_mode(accumulation_steps: int, num_processes: int = 1) -> str:
    """CUDA graphs for one process taking one micro-step per optimizer step. Otherwise kernels are compiled
    without graphs: with gradient accumulation the gradients of one micro-step must outlive the next graph
    replay, and DDP's gradient all-reduce hooks run between the backward's pieces."""
    return COMPILE_MODE if accumulation_steps == 1 and num_processes == 1 else "default"


def adamw_options(fast: bool) -> dict:
    """Extra ``torch.optim.AdamW`` arguments: the fused CUDA kernel on the fast path."""
    return {"fused": True} if fast else {}


@contextlib.contextmanager
def autocast(device, precision: Optional[str]) -> Any:
    """autocast to the training precision ("bf16", "fp16") on ``device``; nothing for "no" or None."""
    dtype = PRECISION_DTYPES.get(precision or "no")
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


class TrainForward:
    """The training forward ``unet(noisy, t, return_dict=False)[0]``; compiled (CUDA graphs) on the fast path.

    The compiled module shares its parameters with ``unet``: evaluation, EMA and checkpoints keep using
    ``unet`` itself. If compiling or the first compiled call fails, one warning names the reason and the
    plain forward is used from then on (:meth:`run` retries the step on it).
    """

    def __init__(self, unet: torch.nn.Module, fast: bool, mode: str = COMPILE_MODE):
        self.unet, self.compiled, self.mode = unet, None, mode
        if fast:
            try:
                self.compiled = torch.compile(unet, mode=mode, dynamic=False)
            except Exception as e:  # noqa: BLE001 - any failure means: train on the plain path
                self.fall_back(e)
        self._proven = False

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def fall_back(self, error: BaseException) -> None:
        warn(f"fast_path: torch.compile(mode={self.mode!r}) is not usable here "
             f"({type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}); "
             "training on the plain path")
        self.compiled = None

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            return self.unet(noisy, timesteps, return_dict=False)[0]
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
        return self.compiled(noisy, timesteps, return_dict=False)[0]

    def run(self, forward_backward: Callable[[], Any], reset: Callable[[], None]) -> Any:
        """``forward_backward()`` (which calls this object); if the first compiled call fails, ``reset()`` (clear
        the gradients) and run it again on the plain forward. Only the forward and backward are retried."""
        if self._proven or self.compiled is None:
            return forward_backward()
        try:
            out = forward_backward()
        except Exception as e:  # noqa: BLE001 - compile errors surface at the first forward or backward
            self.fall_back(e)
            reset()
            return forward_backward()
        self._proven = True
        return out
