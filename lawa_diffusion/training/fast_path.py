"""The trainer's GPU fast path (``fast_path: auto|on|off``): fused AdamW, a compiled training forward with
CUDA graphs, and sampling under autocast in the training precision.

Each piece falls back to the plain path, with one warning line, where it cannot work: off the GPU, when
``torch.compile`` is missing or fails, or when compiling, warming up, recording or first replaying the CUDA
graphs fails. On the CPU the fast path is the plain path, so weights and resumption are exactly those of
``fast_path: off`` there. When inductor compiles the forward but declines CUDA graphs ("skipping
cudagraphs due to ..."), one warning says why and :attr:`TrainForward.cudagraph_skip` keeps the reason.

Under DDP a failed compiled backward cannot be redone: DDP's reducer has already sent some gradient buckets
and waits for the rest, so a second backward would run through a half-finished reduction (and the other
processes would go on with theirs). There the first compiled forward and backward run once as a trial without
gradient sync (``no_sync``), the processes agree on its outcome, and all of them fall back together if it failed
on any; the real step follows, and later errors are raised.
"""
from __future__ import annotations

import collections
import logging
from typing import Any, Callable, Deque, Optional

import torch

from lawa_diffusion.engine import collectives
from lawa_diffusion.utils.output import warn

# CUDA graphs (torch's graph trees) over inductor kernels: the small UNets are launch-bound.
COMPILE_MODE = "reduce-overhead"


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


# Calls of the compiled forward and backward that run under the fallback: with CUDA graph trees the first call
# compiles and warms up, the second records the graphs, the third is their first replay.
GUARDED_CALLS = 3


def cudagraph_skips() -> int:
    """How many compiled graphs inductor has run without CUDA graphs in this process (its own counter)."""
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - no dynamo: nothing was compiled
        return 0
    return int(counters["inductor"]["cudagraph_skips"])


def cuda_graphs_recorded(device_index: int = 0) -> int:
    """CUDA graphs recorded so far by torch.compile's graph trees on this thread for the device (0: none)."""
    try:
        from torch._inductor import cudagraph_trees

        manager = cudagraph_trees.get_manager(device_index, create_if_none_exists=False)
    except Exception:  # noqa: BLE001 - no inductor or no CUDA: no graphs
        return 0
    nodes = [] if manager is None else [n for roots in manager.roots.values() for n in roots]
    count = 0
    while nodes:
        node = nodes.pop()
        count += 1
        nodes.extend(child for children in node.children.values() for child in children)
    return count


class _SkipMessages(logging.Handler):
    """Keeps the last "skipping cudagraphs ..." lines of inductor's loggers (artifact loggers that torch shows only
    with TORCH_LOGS; the counter in :func:`cudagraph_skips` says that one was logged)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.total = 0  # lines kept so far
        self.messages: Deque[str] = collections.deque(maxlen=20)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "skipping cudagraph" in message:
            self.messages.append(message)
            self.total += 1

    def since(self, total: int) -> list:
        """The lines kept after the ``total``-th (as many as are still held)."""
        new = min(self.total - total, len(self.messages))
        return list(self.messages)[len(self.messages) - new:] if new > 0 else []


_SKIP_MESSAGES: Optional[_SkipMessages] = None


def _skip_messages() -> _SkipMessages:
    """The one handler, attached once to every logger of inductor's CUDA-graph modules."""
    global _SKIP_MESSAGES
    if _SKIP_MESSAGES is None:
        _SKIP_MESSAGES = _SkipMessages()
        try:  # the modules create their loggers (named after them) when imported
            import torch._inductor.cudagraph_trees  # noqa: F401
            import torch._inductor.cudagraph_utils  # noqa: F401
        except Exception:  # noqa: BLE001 - no inductor: nothing to listen to
            pass
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(("torch._inductor.cudagraph_utils", "torch._inductor.cudagraph_trees")):
                logging.getLogger(name).addHandler(_SKIP_MESSAGES)
    return _SKIP_MESSAGES


class TrainForward:
    """The training forward ``unet(noisy, t, return_dict=False, **conditions)[0]``; compiled (CUDA graphs) on the
    fast path.

    The compiled module shares its parameters with ``unet``: evaluation, EMA and checkpoints keep using
    ``unet`` itself. If compiling fails, or one of the first ``GUARDED_CALLS`` compiled steps (compile and
    warm-up, CUDA-graph recording, first replay) raises, one warning names the reason and the plain forward is
    used from then on (:meth:`run` retries the step on it). ``fell_back`` keeps that reason, ``cudagraph_skip``
    inductor's reason for running the compiled forward without CUDA graphs (each also one warning).
    """

    def __init__(self, unet: torch.nn.Module, fast: bool, mode: str = COMPILE_MODE):
        self.unet, self.compiled, self.mode = unet, None, mode
        self.compiled_calls = 0  # compiled forward-and-backward calls that completed
        self.fell_back: Optional[str] = None
        self.cudagraph_skip: Optional[str] = None
        if fast:
            try:
                self.compiled = torch.compile(unet, mode=mode, dynamic=False)
            except Exception as e:  # noqa: BLE001 - any failure means: train on the plain path
                self.fall_back(e)
        self._skip_log = _skip_messages() if self.compiled is not None and mode == COMPILE_MODE else None

    @property
    def is_compiled(self) -> bool:
        return self.compiled is not None

    def fall_back(self, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        at = f" at compiled call {self.compiled_calls + 1}" if self.compiled is not None else ""
        warn(f"fast_path: torch.compile(mode={self.mode!r}) is not usable here{at} ({reason}); "
             "training on the plain path")
        self.compiled, self.fell_back = None, reason

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, **conditions: torch.Tensor) -> torch.Tensor:
        """The prediction for ``noisy`` at ``timesteps``; ``conditions``: the UNet's other inputs (class_labels)."""
        if self.compiled is None:
            return self.unet(noisy, timesteps, return_dict=False, **conditions)[0]
        if self.mode == COMPILE_MODE:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's graph outputs are no longer read
        return self.compiled(noisy, timesteps, return_dict=False, **conditions)[0]

    @property
    def ddp(self) -> bool:
        """Whether the module is wrapped in DistributedDataParallel (a failed backward cannot be redone)."""
        return isinstance(self.unet, torch.nn.parallel.DistributedDataParallel)

    def _trial_under_ddp(self, forward_backward: Callable[[], Any], reset: Callable[[], None]) -> None:
        """The first compiled forward and backward, once, with DDP's gradient sync off (no bucket is sent); every
        process learns whether it failed on any, and all fall back together if so. ``reset()`` clears the
        trial's gradients either way."""
        error: Optional[BaseException] = None
        try:
            with self.unet.no_sync():
                forward_backward()
        except Exception as e:  # noqa: BLE001 - compile errors of the forward or the lazily compiled backward
            error = e
        reset()
        group = self.unet.process_group
        device = next(self.unet.parameters()).device
        (failed_somewhere,) = collectives.any_over([error is not None], [group], device)
        if failed_somewhere:
            self.fall_back(error if error is not None else
                           RuntimeError("the compiled training step failed on another process"))

    def run(self, forward_backward: Callable[[], Any], reset: Callable[[], None]) -> Any:
        """``forward_backward()`` (which calls this object); if it fails in one of the first ``GUARDED_CALLS``
        compiled calls, ``reset()`` (clear the gradients) and run it again on the plain forward. Only the forward
        and backward are retried. Under DDP the first call is tried without gradient sync first (see the module's
        notes) and nothing is retried."""
        if self.compiled is None:
            return forward_backward()
        skips, logged = cudagraph_skips(), self._skip_log.total if self._skip_log is not None else 0
        if self.ddp and self.compiled_calls == 0:
            self._trial_under_ddp(forward_backward, reset)
            if self.compiled is None:
                return forward_backward()
        if self.ddp or self.compiled_calls >= GUARDED_CALLS:
            out = forward_backward()
        else:
            try:
                out = forward_backward()
            except Exception as e:  # noqa: BLE001 - compile, warm-up, recording or replay errors surface here
                self.fall_back(e)
                reset()
                return forward_backward()
        self.compiled_calls += 1
        if self._skip_log is not None and self.cudagraph_skip is None and cudagraph_skips() > skips:
            self.cudagraph_skip = "; ".join(dict.fromkeys(self._skip_log.since(logged))) or "inductor logged no reason"
            warn(f"fast_path: inductor compiled the training forward without CUDA graphs ({self.cudagraph_skip}); "
                 "training goes on with the compiled kernels alone")
        return out
