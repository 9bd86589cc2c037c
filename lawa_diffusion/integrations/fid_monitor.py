"""The launch plugin's FID during training: an adapter from a plugin run to the trainer's evaluator.

``FIDMonitor`` is told of the script's Accelerator and first noise scheduler (by the wrappers it
gives the plugin) and, every ``fid_every_n_steps``, hands the first EMA to ``tracking.Tracker``.
A text-conditioned UNet (a text-to-image script's) is sampled with the VAE, text encoder(s), tokenizer(s)
and scheduler of the script's ``--pretrained_model_name_or_path`` (``--lawa_fid_pipeline`` instead), on the
prompts of ``--lawa_fid_prompts`` or else the script's own ``--validation_prompts``; a class-conditional UNet
on ``--lawa_fid_class_labels``. What was evaluated with is recorded in the run folder (``lawa_eval.yaml``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, Iterator, List, Optional

from lawa_diffusion.config.base import check
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.output import is_main_process, say

PLUGIN_OPTIONS = {"prompts": "--lawa_fid_prompts", "class_labels": "--lawa_fid_class_labels"}
VALIDATION_PROMPTS = "validation_prompts"  # train_text_to_image.py's option (nargs="+")
PROMPTS_NAME = "lawa_prompts.txt"  # the script's --validation_prompts, kept for after-training commands


def script_option_values(script_args: List[str], name: str) -> Optional[List[str]]:
    """The values a script was given for an ``nargs="+"`` option ``--name`` (``--name A B ...`` up to the next
    option, or ``--name=A``); None when absent."""
    flag = f"--{name}"
    for i, arg in enumerate(script_args):
        if arg.startswith(flag + "="):
            return [arg.split("=", 1)[1]]
        if arg == flag:
            values = []
            for value in script_args[i + 1:]:
                if value.startswith("--"):
                    break
                values.append(value)
            return values
    return None


class FIDMonitor:
    """Adapter from a plugin run to the trainer's evaluator (``tracking.Tracker``): FID of the first EMA's
    EMA and LAWA weights every ``fid_every_n_steps`` steps, all processes sampling.

    The Tracker samples with an uninitialised copy of the EMA's model (``model_cls`` / ``model_config``)
    holding the EMA or LAWA weights, with private generators, from the script's first noise scheduler (a
    conditional model: with its pipeline's parts, loaded once, and its prompts, encoded once); the metric maths
    run off the step loop as in the trainer. Everything runs with the script's random states set aside, so the
    script draws the same numbers as without the monitor.
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

    # ------------------------------------------------------------------ what the script gives
    def validation_prompts(self) -> Optional[List[str]]:
        """The script's own ``--validation_prompts`` (None when it has none)."""
        values = script_option_values(self.script_args, VALIDATION_PROMPTS)
        return values or None

    def pipeline_source(self) -> Optional[str]:
        """Where the pipeline parts of a text-conditioned model come from: ``--lawa_fid_pipeline``, else the script's
        ``--pretrained_model_name_or_path``."""
        return self.cfg.fid_pipeline or runfolder.script_option(self.script_args, "pretrained_model_name_or_path")

    def pipeline_revision(self) -> tuple:
        """(revision, variant) the script loads its pipeline with (none for ``--lawa_fid_pipeline``)."""
        if self.cfg.fid_pipeline:
            return None, None
        return (runfolder.script_option(self.script_args, "revision"),
                runfolder.script_option(self.script_args, "variant"))

    def check_model(self, ema: Any) -> None:
        """Before training (the script's first EMA was just made): one sentence (a ``ValueError``) when the
        ``--lawa_fid_*`` options cannot evaluate its model: a conditional model with no prompts or class labels
        anywhere, conditions of the wrong kind, or a text-conditioned model with no pipeline to sample it."""
        model_cls, model_config = getattr(ema, "model_cls", None), getattr(ema, "model_config", None)
        if model_cls is None or model_config is None:
            return  # said when FID is first due (the EMA was made without them)
        from lawa_diffusion.training import conditional_eval, pipeline_parts

        with untouched_rng():
            kind = conditional_eval.model_conditioning(model_cls, model_config)
        c, name = self.cfg, model_cls.__name__
        where = "FID during training (--lawa_fid_every_n_steps) of the"
        if kind is None:
            given = "--lawa_fid_prompts" if c.fid_prompts is not None else "--lawa_fid_class_labels"
            check(c.fid_prompts is None and c.fid_class_labels is None,
                  f"{where} unconditional {name} samples it without conditions; drop {given}")
        elif kind == "text":
            check(c.fid_class_labels is None, f"{where} text-conditioned {name} takes prompts, not class labels; "
                  "pass --lawa_fid_prompts instead of --lawa_fid_class_labels")
            check(c.fid_prompts is not None or self.validation_prompts() is not None,
                  f"{where} text-conditioned {name} needs prompts; pass --lawa_fid_prompts FILE|FOLDER (one prompt "
                  "per line, or an image folder with metadata.jsonl captions) or give the script --validation_prompts")
            source = self.pipeline_source()
            check(source is not None, f"{where} text-conditioned {name} needs its pipeline's VAE, text encoder and "
                  "tokenizer, and the script has no --pretrained_model_name_or_path; pass --lawa_fid_pipeline FOLDER")
            check(pipeline_parts.available(source, self.pipeline_revision()[0]),
                  f"{where} text-conditioned {name} needs the VAE, text encoder and tokenizer of {source!r}, which "
                  "has none in local files; pass --lawa_fid_pipeline with a local pipeline folder")
        else:
            num = dict(model_config).get("num_class_embeds")
            check(c.fid_prompts is None, f"{where} class-conditional {name} takes class labels, not prompts; pass "
                  "--lawa_fid_class_labels instead of --lawa_fid_prompts")
            check(c.fid_class_labels is not None, f"{where} class-conditional {name} (num_class_embeds {num}) needs "
                  "class labels; pass --lawa_fid_class_labels all (every class, cycled) or a comma list of classes")

    # ------------------------------------------------------------------ evaluation
    def maybe_evaluate(self, ema: Any) -> None:
        step = int(ema.optimization_step)
        if self.disabled is not None or step % self.cfg.fid_every_n_steps:
            return
        with untouched_rng():
            if self.tracker is None and not self._prepare(ema):
                say(f"FID during training is off: {self.disabled}", self.who)
                return
            self.tracker.after_step(step, final=False)

    def eval_config(self, pipeline: Optional[str] = None):
        """The trainer's ``EvalConfig`` for the ``--lawa_fid_*`` options (unset ones: the trainer's defaults);
        ``pipeline``: where a text-conditioned model's parts come from."""
        from lawa_diffusion.config.fid import EvalConfig

        c = self.cfg
        given = {"num_samples": c.fid_num_samples, "batch_size": c.fid_batch_size,
                 "num_inference_steps": c.fid_num_inference_steps}
        return EvalConfig(every_n_steps=c.fid_every_n_steps, at_end=False, variants=["ema", "lawa"],
                          reference=c.fid_reference, inception_weights=c.fid_inception_weights,
                          prompts=c.fid_prompts, class_labels=c.fid_class_labels, guidance_scale=c.fid_guidance_scale,
                          num_reference=c.fid_num_reference, caption_column=c.fid_caption_column, pipeline=pipeline,
                          **{k: v for k, v in given.items() if v is not None})

    def _prepare(self, ema: Any) -> bool:
        import types

        from diffusers import DDPMScheduler

        from lawa_diffusion.engine.lawa import uninitialized_model
        from lawa_diffusion.training import conditional_eval, pipeline_parts
        from lawa_diffusion.training import fid_tracker as tracking

        model_cls, model_config = getattr(ema, "model_cls", None), getattr(ema, "model_config", None)
        if model_cls is None or model_config is None:
            self.disabled = "the EMAModel was made without model_cls= and model_config="
            return False
        if self.accelerator is None:
            self.disabled = "the script made no accelerate Accelerator"
            return False
        self.check_model(ema)
        unet = uninitialized_model(model_cls, model_config, ema.shadow_params[0].device).requires_grad_(False)
        kind = conditional_eval.conditioning_kind(unet)
        source = self.pipeline_source() if kind == "text" else None
        eval_cfg = self.eval_config(source)
        parts = prompt_set = None
        if kind == "text":
            revision, variant = self.pipeline_revision()
            parts = pipeline_parts.load_pipeline_parts(source, unet, revision=revision, variant=variant,
                                                       device=unet.device)
        if kind is not None and eval_cfg.conditional:
            prompt_set = conditional_eval.prompt_set_of(eval_cfg, unet, PLUGIN_OPTIONS)
        elif kind is not None:
            prompt_set = conditional_eval.text_prompt_set(self.validation_prompts(), f"the script's --{VALIDATION_PROMPTS}")
        run = types.SimpleNamespace(eval=eval_cfg, save_ema_snapshots=False)
        metrics = self.metrics_path()
        self.tracker = tracking.Tracker(run, os.path.dirname(metrics) or ".", self.accelerator, unet, ema,
                                        self.scheduler or DDPMScheduler(), dict(unet.config), parts=parts,
                                        prompt_set=prompt_set)
        self.tracker.prepare(0, write=lambda line: say(line, self.who))
        if self.tracker.recorder is not None:
            self.tracker.recorder.path = metrics
        if is_main_process():
            self.record(eval_cfg, prompt_set if kind == "text" and not eval_cfg.conditional else None, model_cls,
                        model_config)
        return True

    def record(self, eval_cfg: Any, prompt_set: Any, model_cls: Any, model_config: Any) -> str:
        """Write what FID was evaluated with (eval settings and the model's config with ``_class_name``) in the
        run folder for after-training commands; prompts taken from the script are kept beside it as a text file."""
        from lawa_diffusion.engine.posthoc_snapshots import plain_config
        from lawa_diffusion.utils.files import atomic_write_text

        run_dir = self.run_dir()
        settings = dataclasses.asdict(eval_cfg)
        for key in ("prompts", "reference", "pipeline", "inception_weights"):
            if isinstance(settings.get(key), str) and os.path.exists(settings[key]):
                settings[key] = os.path.abspath(settings[key])
        if prompt_set is not None:
            path = os.path.join(run_dir, PROMPTS_NAME)
            atomic_write_text(path, "".join(p.replace("\n", " ") + "\n" for p in prompt_set.prompts))
            settings["prompts"] = os.path.abspath(path)
        return runfolder.write_plugin_eval(run_dir, settings, plain_config(model_config, model_cls))

    def flush(self) -> None:
        """Record the metrics still being computed (before a checkpoint, so its metrics are complete)."""
        if self.tracker is not None:
            self.tracker.flush()

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()

    def run_dir(self) -> str:
        """The script's --output_dir, else the folder of the metrics file."""
        run_dir = runfolder.script_option(self.script_args, "output_dir")
        return run_dir if run_dir is not None else (os.path.dirname(self.metrics_path()) or ".")

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
