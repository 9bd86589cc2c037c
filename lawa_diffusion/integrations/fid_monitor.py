"""The launch plugin's FID during training: an adapter from a plugin run to the trainer's evaluator.

``FIDMonitor`` is told of the script's Accelerator and first noise scheduler (by the wrappers it
gives the plugin) and, every ``fid_every_n_steps``, hands the first EMA to ``tracking.Tracker``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, List, Optional

from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.output import say


class FIDMonitor:
    """Adapter from a plugin run to the trainer's evaluator (``tracking.Tracker``): FID of the first EMA's
    EMA and LAWA weights every ``fid_every_n_steps`` steps, all processes sampling.

    The Tracker samples with an uninitialised copy of the EMA's model (``model_cls`` / ``model_config``)
    holding the EMA or LAWA weights, with private generators, from the script's first noise scheduler;
    the metric maths run off the step loop as in the trainer. Everything runs with the script's random
    states set aside, so the script draws the same numbers as without the monitor.
    """

    def __init__(self, cfg: Any, script_args: List[str], who: str):
        self.cfg, self.script_args, self.who = cfg, script_args, who
        self.accelerator = None
        self.scheduler = None
        self.tracker = None
        self.disabled: Optional[str] = None

    def accelerator_init_wrapper(self, original: Callable) -> Callable:
        def __init__(accelerator, *args, **kwargs):
            original(accelerator, *args, **kwargs)
            self.accelerator = accelerator

        return __init__

    def scheduler_config_wrapper(self, original: Callable) -> Callable:
        def register_to_config(obj, **kwargs):
            original(obj, **kwargs)
            if self.scheduler is None and hasattr(obj, "add_noise") and hasattr(obj, "set_timesteps"):
                self.scheduler = obj

        return register_to_config

    def maybe_evaluate(self, ema: Any) -> None:
        step = int(ema.optimization_step)
        if self.disabled is not None or step % self.cfg.fid_every_n_steps:
            return
        with untouched_rng():
            if self.tracker is None and not self._prepare(ema):
                say(f"FID during training is off: {self.disabled}", self.who)
                return
            self.tracker.after_step(step, final=False)

    def eval_config(self):
        """The trainer's ``EvalConfig`` for the ``--lawa_fid_*`` options (unset ones: the trainer's defaults)."""
        from lawa_diffusion.config.fid import EvalConfig

        given = {"num_samples": self.cfg.fid_num_samples, "batch_size": self.cfg.fid_batch_size,
                 "num_inference_steps": self.cfg.fid_num_inference_steps}
        return EvalConfig(every_n_steps=self.cfg.fid_every_n_steps, at_end=False, variants=["ema", "lawa"],
                          reference=self.cfg.fid_reference, inception_weights=self.cfg.fid_inception_weights,
                          **{k: v for k, v in given.items() if v is not None})

    def _prepare(self, ema: Any) -> bool:
        import inspect
        import types

        from diffusers import DDPMScheduler

        from lawa_diffusion.engine.lawa import uninitialized_model
        from lawa_diffusion.training import fid_tracker as tracking

        model_cls, model_config = getattr(ema, "model_cls", None), getattr(ema, "model_config", None)
        if model_cls is None or model_config is None:
            self.disabled = "the EMAModel was made without model_cls= and model_config="
            return False
        forward = inspect.signature(model_cls.forward).parameters
        if "encoder_hidden_states" in forward and forward["encoder_hidden_states"].default is inspect.Parameter.empty:
            self.disabled = f"{model_cls.__name__} needs conditioning; only unconditional UNets are sampled"
            return False
        if self.accelerator is None:
            self.disabled = "the script made no accelerate Accelerator"
            return False
        unet = uninitialized_model(model_cls, model_config, ema.shadow_params[0].device).requires_grad_(False)
        run = types.SimpleNamespace(eval=self.eval_config(), save_ema_snapshots=False)
        metrics = self.metrics_path()
        self.tracker = tracking.Tracker(run, os.path.dirname(metrics) or ".", self.accelerator, unet, ema,
                                        self.scheduler or DDPMScheduler(), dict(unet.config))
        self.tracker.prepare(0, write=lambda line: say(line, self.who))
        if self.tracker.recorder is not None:
            self.tracker.recorder.path = metrics
        return True

    def flush(self) -> None:
        """Record the metrics still being computed (before a checkpoint, so its metrics are complete)."""
        if self.tracker is not None:
            self.tracker.flush()

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def metrics_path(self) -> str:
        if self.cfg.metrics_file:
            return self.cfg.metrics_file
        run_dir = runfolder.script_option(self.script_args, "output_dir")
        if run_dir is not None:
            return runfolder.metrics_path(run_dir)
        return runfolder.METRICS_NAME


@contextlib.contextmanager
def untouched_rng() -> Iterator[None]:
    """The torch (CPU and initialised CUDA), NumPy and ``random`` generators are as they were after the block."""
    import random

    import numpy as np
    import torch

    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
