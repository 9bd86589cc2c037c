"""The launch plugin's post-hoc snapshots: power-function EMAs kept beside the script's first EMA.

With ``--lawa_posthoc_every_n_steps N`` (and ``--lawa_posthoc_sigma_rels 0.05,0.10``, the default), the
plugin keeps one ``PowerEMAModel`` per σ_rel, made from the parameters the script gives its first
``EMAModel`` and updated from the parameters it passes to that EMA's ``step``, right after it; every N
optimizer steps their weights are stored under the script's ``--output_dir`` (the working folder without
one) as ``ema_snapshots/sigma_rel_<σ>/step-<step>.safetensors`` (``lawa_diffusion.engine.posthoc_snapshots``).
Checkpoints written by ``Accelerator.save_state`` carry their state (``posthoc_state.safetensors``);
``load_state`` restores it. They only observe: the script trains the same weights bitwise.
"""
from __future__ import annotations

import os
from typing import Any, List, Optional

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.engine.posthoc_snapshots import PosthocSnapshots, parameter_names, sigma_rel_track
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.output import warn


class PosthocBeside:
    """The post-hoc power EMAs of one plugin run (made with the script's first EMA)."""

    def __init__(self, launch: Any, script_args: List[str]):
        self.cfg = launch
        self.output_dir = runfolder.script_option(script_args, "output_dir") or os.getcwd()
        self.store: Optional[PosthocSnapshots] = None
        self.loaded_from: Optional[str] = None
        nothing = runfolder.stores_nothing_warning(launch.posthoc_every_n_steps, runfolder.script_option(
            script_args, "max_train_steps"), "--lawa_posthoc_every_n_steps")
        if nothing:
            warn(nothing)

    @property
    def tracks(self) -> List[str]:
        return [sigma_rel_track(s) for s in self.cfg.sigma_rels]

    def make(self, ema: Any, parameters: Any) -> None:
        """Keep the power EMAs beside ``ema`` (the script's first), from the parameters it was made from."""
        if self.store is not None:
            return
        model_cls, model_config = getattr(ema, "model_cls", None), getattr(ema, "model_config", None)
        check(model_cls is not None and model_config is not None,
              "--lawa_posthoc_every_n_steps needs the script's EMAModel made with model_cls= and model_config= (as "
              "diffusers' training scripts do), so that the snapshot files carry the model's parameter names")
        params = list(parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters)
        self.store = PosthocSnapshots(params, self.output_dir, sigma_rels=self.cfg.sigma_rels,
                                      every_n_steps=self.cfg.posthoc_every_n_steps, dtype=self.cfg.posthoc_dtype,
                                      names=parameter_names(model_cls, model_config), model_config=model_config,
                                      model_cls=model_cls)
        if self.loaded_from is not None:
            self.store.load_state(self.loaded_from)

    def update(self, ema: Any, parameters: Any) -> None:
        """After the script's first EMA stepped with ``parameters``: step the power EMAs, store the due snapshots."""
        self.make(ema, parameters)
        self.store.update(parameters)

    def save_state(self, folder: str) -> None:
        if self.store is not None:
            self.store.save_state(folder)

    def load_state(self, folder: str) -> None:
        self.loaded_from = folder
        if self.store is not None:
            self.store.load_state(folder)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def describe(self) -> str:
        return (f"post-hoc power EMAs {', '.join(self.tracks)} stored every {self.cfg.posthoc_every_n_steps} steps "
                f"({self.cfg.posthoc_dtype}) under {os.path.join(self.output_dir, runfolder.SNAPSHOT_DIR)}")

    def summary(self) -> str:
        written = len(self.store.written) if self.store is not None else 0
        return f"stored {written} post-hoc snapshot file(s) in {os.path.join(self.output_dir, runfolder.SNAPSHOT_DIR)}"
