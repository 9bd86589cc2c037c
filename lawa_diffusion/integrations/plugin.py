"""The patches the launch plugin applies while a training script runs (see ``lawa_diffusion.launch``).

``Plugin.install`` swaps diffusers' ``EMAModel`` for a ``LAWAEMAModel`` subclass everywhere it is
importable from, wraps ``ModelMixin.save_pretrained`` (LAWA sibling of a model saved with the EMA
weights copied in) and ``Accelerator.save_state`` / ``load_state`` (LAWA state in checkpoints; on
one process ``save_state`` writes a temp folder renamed into place, so a killed save never leaves a
half-written ``checkpoint-N``); ``Plugin.uninstall`` puts everything back. An EMA made from the full model
before FSDP2 shards it is sharded like the parameters at its first ``step`` (and after a resume), and
``save_state`` gathers it on every process for the script's main-process ``save_pretrained``. With ``fid_every_n_steps``
it also records the script's Accelerator and noise scheduler, and ``FIDMonitor`` evaluates the first
EMA's EMA and LAWA weights with the trainer's evaluator (conditional models too: the options that cannot
evaluate the script's model are refused when its first EMA is made, before training).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import json
import os
import shutil
import sys
import traceback
from typing import Any, Callable, Iterator, List, Optional

from lawa_diffusion.config.base import check
from lawa_diffusion.engine import sources
from lawa_diffusion.engine.accelerate_hooks import engine_state_file, load_engine_state, save_engine_state, state_file
from lawa_diffusion.integrations.fid_monitor import FIDMonitor
from lawa_diffusion.integrations.plugin_options import PROG
from lawa_diffusion.integrations.posthoc_beside import PosthocBeside
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.files import atomic_dir, atomic_write_json
from lawa_diffusion.utils.output import is_main_process, process_rank, say

RUN_FILE = "lawa_launch.json"  # in each checkpoint: the world size that wrote it
WINDOW_KEYS = ("k", "every_n_steps", "start_step")
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package root, above every layer
FIRST_NAME = "lawa"  # engine name of the first EMA: the name LAWAEMAModel and attach() use


def lawa_folder_for(path: str | os.PathLike) -> str:
    """Where the LAWA twin of a weights folder goes: ``unet_ema`` -> ``unet_lawa``, ``unet`` -> ``unet_lawa``."""
    path = os.path.normpath(os.fspath(path))
    parent, name = os.path.split(path)
    for old, new in (("_ema", "_lawa"), ("-ema", "-lawa")):
        if name.endswith(old):
            return os.path.join(parent, name[: -len(old)] + new)
    for old, new in (("ema_", "lawa_"), ("ema-", "lawa-")):
        if name.startswith(old):
            return os.path.join(parent, new + name[len(old):])
    if name == "ema":
        return os.path.join(parent, "lawa")
    return os.path.join(parent, name + "_lawa")


def sharded_lawa_folder(name: str) -> str:
    """The checkpoint subfolder where the save hook writes the gathered LAWA weights of a sharded EMA
    (engine ``lawa`` -> ``unet_lawa``, ``lawa_2`` -> ``unet_lawa_2``)."""
    return f"unet_{name}"


def saved_whole(save: Callable[[str], Any], folder: str) -> str:
    """``save(temp_folder)``, then one rename to ``folder``: a process killed while saving leaves a hidden
    temp folder, never a ``checkpoint-N`` that looks complete (one process; the script's save hooks
    write into the temp folder too). An existing ``folder`` is moved aside under a hidden name first."""
    folder = os.path.abspath(os.fspath(folder))
    parent, name = os.path.split(folder)
    for stale in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.*.tmp")):  # left by a killed save
        shutil.rmtree(stale, ignore_errors=True)
    old = os.path.join(parent, f".{name}.replaced")
    if os.path.exists(folder):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    with atomic_dir(folder) as tmp:
        save(tmp)
    shutil.rmtree(old, ignore_errors=True)
    return folder


class LAWAInputError(ValueError):
    """Bad LAWA input found while the script runs; the plugin reports it as one line and exits with code 2."""


def reported_as_input_errors(function: Callable) -> Callable:
    """Re-raise the ``ValueError`` / ``FileNotFoundError`` this package raises inside ``function`` as
    ``LAWAInputError`` (errors of the script's own code pass through unchanged)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except LAWAInputError:
            raise
        except (ValueError, FileNotFoundError) as e:
            last = traceback.extract_tb(e.__traceback__)[-1].filename
            if not raised_in_package(last):
                raise
            raise LAWAInputError(str(e)) from e

    return wrapper


def raised_in_package(filename: str) -> bool:
    """Whether a traceback frame's file lies inside this package (any of its subpackages)."""
    return os.path.abspath(filename).startswith(PACKAGE_DIR + os.sep)


def check_world_size(folder: str, world_size: int) -> None:
    """Refuse a checkpoint written by another number of processes (``RUN_FILE``, written by the plugin)."""
    path = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        saved = int(json.load(f)["world_size"])
    check(saved == world_size,
          f"checkpoint {folder!r} was written by {saved} process(es) but this run has {world_size}; "
          f"resume it with {saved} process(es) (accelerate launch --num_processes {saved})")


def check_window(lawa: Any, folder: str) -> None:
    """Refuse a checkpoint whose LAWA window of ``lawa.name`` has another k, every_n_steps or start_step."""
    path = state_file(folder, lawa.name)
    if not os.path.isfile(path):
        path = state_file(folder, lawa.name, process_rank())  # the window of a sharded EMA: this process's file
    if not os.path.isfile(path):
        return
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        saved = json.loads(f.metadata()["lawa_state"])["config"]
    now = lawa.config.to_dict()
    differ = [key for key in WINDOW_KEYS if saved.get(key) != now[key]]
    check(not differ,
          f"checkpoint {folder!r} holds a LAWA window with {_options(saved, differ)} but this run has "
          f"{_options(now, differ)}; resume with {_options(saved, differ, flags=True)}, or start a new output_dir")


def check_ema_source(parameters: Any) -> Any:
    """Refuse an EMA the plugin cannot keep LAWA over: one made from ZeRO-3 partitions (its weights would be
    empty). Sharded (FSDP2 / DTensor) EMAs are kept: each process holds its shard's window, and the save hooks
    write the gathered LAWA folder on every process. Returns ``parameters`` as a list (or the module as it
    came), ready for ``EMAModel``."""
    from lawa_diffusion.engine import zero3

    if not hasattr(parameters, "parameters"):
        parameters = list(parameters)
    zero3.check_ema_source(parameters.parameters() if hasattr(parameters, "parameters") else parameters, "the launch plugin")
    return parameters


def saved_sharded(folder: str, name: str) -> bool:
    """Whether ``folder`` holds the window of engine ``name`` as per-process shard files (a sharded EMA's)."""
    return os.path.isfile(state_file(folder, name, process_rank())) and not os.path.isfile(state_file(folder, name))


def _options(values: dict, keys: List[str], flags: bool = False) -> str:
    return " ".join(f"--lawa_{k} {values[k]}" for k in keys) if flags else ", ".join(f"{k}={values[k]}" for k in keys)


class Plugin:
    """Runtime state of one plugin run: the EMAs the script made and what was written for them."""

    def __init__(self, options: Any):
        self.options = options
        self.emas: List[Any] = []          # EMAs that train (named, in creation order)
        self.written: List[str] = []       # LAWA folders written
        self.skipped: List[str] = []       # EMA folders saved before the window held a snapshot
        self.loaded_from: Optional[str] = None
        self.patched: List[str] = []
        self._undo: List[Callable[[], None]] = []
        self._temporary_depth = 0
        self.ema_class: Optional[type] = None
        self.fid: Optional[FIDMonitor] = None
        self.script_args: List[str] = []
        self.posthoc: Optional[PosthocBeside] = None  # made by install() with --lawa_posthoc_every_n_steps

    # ------------------------------------------------------------------ install
    def install(self) -> None:
        import accelerate
        import diffusers
        import diffusers.training_utils as training_utils
        from diffusers.models.modeling_utils import ModelMixin

        original = training_utils.EMAModel
        getattr(diffusers, "EMAModel", None)  # resolve the lazy export so the scan below sees it
        self.ema_class = make_ema_class(self, original)
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] == "lawa_diffusion":  # LAWAEMAModel keeps subclassing the original
                continue
            if module is not None and getattr(module, "__dict__", {}).get("EMAModel") is original:
                self._set(module, "EMAModel", self.ema_class)
                self.patched.append(f"{name}.EMAModel")
        self._wrap(ModelMixin, "save_pretrained", self._model_save_wrapper)
        self._wrap(accelerate.Accelerator, "save_state", self._save_state_wrapper)
        self._wrap(accelerate.Accelerator, "load_state", self._state_wrapper)
        self.patched += ["ModelMixin.save_pretrained", "Accelerator.save_state/load_state"]
        if self.options.launch.posthoc_every_n_steps:
            self.posthoc = PosthocBeside(self.options.launch, self.script_args)
        if self.options.launch.fid_every_n_steps:
            self.fid = FIDMonitor(self.options.launch, self.script_args, PROG)
            self._wrap(accelerate.Accelerator, "__init__", self.fid.accelerator_init_wrapper)
            from diffusers.configuration_utils import ConfigMixin

            self._wrap(ConfigMixin, "register_to_config", self.fid.scheduler_config_wrapper)
            self.patched.append("Accelerator.__init__ and ConfigMixin.register_to_config (for FID)")

    def uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _set(self, owner: Any, name: str, value: Any) -> None:
        had, old = name in vars(owner), vars(owner).get(name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, old) if had else delattr(owner, name))

    def _wrap(self, owner: type, name: str, make: Callable[[Callable], Callable]) -> None:
        original = getattr(owner, name)
        wrapped = make(original)
        wrapped.__wrapped__ = original
        wrapped.__name__ = name
        self._set(owner, name, wrapped)

    # ------------------------------------------------------------------ EMAs
    @contextlib.contextmanager
    def temporary(self) -> Iterator[None]:
        """EMAs made inside (``EMAModel.from_pretrained`` in load hooks) are not training EMAs."""
        self._temporary_depth += 1
        try:
            yield
        finally:
            self._temporary_depth -= 1

    def lawa_config(self):
        return dataclasses.replace(self.options.lawa)

    def adopt(self, ema: Any) -> None:
        """Register a training EMA: name its engine and, after a resume, give it the loaded window.
        The first one's lag plan is said in one line (and written to ``--output_dir``/lag.json)."""
        ema.lawa.name = FIRST_NAME if not self.emas else f"{FIRST_NAME}_{len(self.emas) + 1}"
        ema._lawa_temporary = False
        self.emas.append(ema)
        if len(self.emas) == 1 and is_main_process():
            self._say_lag(ema)

    def _say_lag(self, ema: Any) -> None:
        """The lag LAWA adds to this EMA at the script's ``--max_train_steps`` (else 10 windows' worth of steps)."""
        from lawa_diffusion.maths import lag
        from lawa_diffusion.reports import lag_plan as plan

        track = lag.EMATrack.from_settings(ema)
        window = ema.lawa.config
        steps = runfolder.script_option(self.script_args, "max_train_steps")
        step = int(steps) if steps and steps.isdigit() else lag.first_snapshot(window) + 10 * window.k * window.every_n_steps
        run_dir = runfolder.script_option(self.script_args, "output_dir")
        if run_dir is not None and os.path.isdir(run_dir):
            plan.write_lag(run_dir, track, window, step, who=PROG)
        else:
            say(lag.summary_line(track, window, step), PROG)

    def adopt_late(self, ema: Any) -> None:
        """An EMA made by ``from_pretrained`` that turns out to train (first ``step``)."""
        self.adopt(ema)
        if self.loaded_from and any(os.path.isfile(path) for path in (
                state_file(self.loaded_from, ema.lawa.name), engine_state_file(ema.lawa, self.loaded_from))):
            load_engine_state(ema.lawa, self.loaded_from)

    def follow_sharding(self, ema: Any, parameters: Any) -> None:
        """Shard the full weights of ``ema`` like ``parameters`` where these are DTensors and the weights are not
        yet (an EMA made before ``accelerator.prepare`` / ``fully_shard``, or full weights loaded back on a resume),
        then load the window a resume left for the shards."""
        params = list(parameters.parameters() if hasattr(parameters, "parameters") else parameters)
        if sources.needs_sharding(ema.shadow_params, params):
            ema.shadow_params = sources.shard_like(ema.shadow_params, params)
            ema.lawa.follow_source()
        pending = ema.__dict__.pop("_lawa_load_after_shard", None)
        if pending is not None:
            load_engine_state(ema.lawa, pending)

    @contextlib.contextmanager
    def gathered_emas(self, accelerator: Any) -> Iterator[None]:
        """For the block: the full weights of each sharded training EMA, gathered on every process and kept in
        host memory on the main one, where the script's main-process-only ``save_pretrained`` of the EMA writes
        them; freed on exit."""
        sharded = [ema for ema in self.emas if ema.lawa.source.sharded()]
        try:
            for ema in sharded:
                ema._lawa_full = sources.gather_full(ema.shadow_params, keep=accelerator.is_main_process)
            yield
        finally:
            for ema in sharded:
                ema._lawa_full = None

    def after_step(self, ema: Any, parameters: Any = None) -> None:
        if self.posthoc is not None and self.emas and ema is self.emas[0] and parameters is not None:
            self.posthoc.update(ema, parameters)
        if self.fid is not None and self.emas and ema is self.emas[0]:
            self.fid.maybe_evaluate(ema)

    # ------------------------------------------------------------------ LAWA folders
    def write_lawa(self, ema: Any, folder: str, template: Any = None) -> None:
        """Write the LAWA weights of ``ema`` to ``folder`` once the window is ready: on the main process, or, over
        a sharded EMA, on every process (the shards are gathered; the main process writes)."""
        lawa = ema.lawa
        sharded = lawa.source.sharded()
        if not (lawa.holds_snapshots and (sharded or is_main_process())):
            return
        if not lawa.ready:
            if is_main_process():
                self.skipped.append(folder)
            return
        model_cls, model_config = lawa.source.model_template()
        lawa.save_pretrained(folder, model=None if model_cls is not None and model_config is not None else template)
        if is_main_process():
            self.written.append(folder)

    def _model_save_wrapper(self, original: Callable) -> Callable:
        plugin = self

        @reported_as_input_errors
        def save_pretrained(model, save_directory, *args, **kwargs):
            result = original(model, save_directory, *args, **kwargs)
            ids = {id(p) for p in model.parameters()}
            for ema in plugin.emas:
                if ema._lawa_swapped_ids and ema._lawa_swapped_ids == ids and not ema.lawa.source.sharded():
                    plugin.write_lawa(ema, lawa_folder_for(save_directory), template=model)
            return result

        return save_pretrained

    # ------------------------------------------------------------------ checkpoints
    def _state_wrapper(self, original: Callable) -> Callable:
        plugin = self

        def state_method(accelerator, *args, **kwargs):
            plugin.hooks_last(accelerator)
            return original(accelerator, *args, **kwargs)

        return state_method

    def _save_state_wrapper(self, original: Callable) -> Callable:
        plugin = self

        def save_state(accelerator, output_dir=None, *args, **kwargs):
            plugin.hooks_last(accelerator)
            with plugin.gathered_emas(accelerator):  # sharded EMAs: a collective, as FSDP's save_state is
                if output_dir is None or accelerator.num_processes > 1:
                    return original(accelerator, output_dir, *args, **kwargs)
                return saved_whole(lambda tmp: original(accelerator, tmp, *args, **kwargs), output_dir)

        return save_state

    def hooks_last(self, accelerator: Any) -> None:
        """(Re-)register the LAWA save/load pre-hooks so they run after the script's own hooks."""
        for handle in accelerator.__dict__.pop("_lawa_launch_handles", ()):
            handle.remove()
        plugin = self

        @reported_as_input_errors
        def save_hook(models, weights, output_dir):
            if plugin.fid is not None:
                plugin.fid.flush()
            for ema in plugin.emas:  # save_state runs on every process that calls it: each saves what it holds
                sharded = ema.lawa.source.sharded()
                if ema.lawa.holds_snapshots and (accelerator.is_main_process or sharded):
                    save_engine_state(ema.lawa, output_dir)
                if sharded:  # a collective: diffusers cannot save a sharded EMA folder, so the LAWA one goes here
                    plugin.write_lawa(ema, os.path.join(output_dir, sharded_lawa_folder(ema.lawa.name)))
            if accelerator.is_main_process and plugin.emas:
                atomic_write_json(os.path.join(output_dir, RUN_FILE), {"world_size": accelerator.num_processes})
            if plugin.posthoc is not None:
                plugin.posthoc.save_state(output_dir)

        @reported_as_input_errors
        def load_hook(models, input_dir):
            plugin.loaded_from = input_dir
            check_world_size(input_dir, accelerator.num_processes)
            for ema in plugin.emas:
                check_window(ema.lawa, input_dir)
                if not ema.lawa.source.sharded() and saved_sharded(input_dir, ema.lawa.name):
                    ema._lawa_load_after_shard = input_dir  # once the next step has sharded the loaded weights
                else:
                    load_engine_state(ema.lawa, input_dir)
            if plugin.posthoc is not None:
                plugin.posthoc.load_state(input_dir)

        accelerator.__dict__["_lawa_launch_handles"] = (
            accelerator.register_save_state_pre_hook(save_hook),
            accelerator.register_load_state_pre_hook(load_hook),
        )

    # ------------------------------------------------------------------ messages
    def describe(self, script: str) -> str:
        c = self.options.lawa
        posthoc = f"; {self.posthoc.describe()}" if self.posthoc is not None else ""
        return (f"LAWA k={c.k} every_n_steps={c.every_n_steps} start_step={c.start_step} storage={c.storage} "
                f"on every diffusers EMAModel of {script} (patched {', '.join(self.patched)}){posthoc}")

    def finish(self) -> None:
        if self.posthoc is not None:
            self.posthoc.close()
        if self.fid is not None:
            self.fid.close()
        for ema in self.emas:
            ema.lawa.close()

    def summary(self, script: str) -> str:
        if not self.emas:
            return (f"{script} never created a diffusers EMAModel, so LAWA had nothing to average; "
                    "turn the script's EMA on (e.g. --use_ema)")
        steps = "; ".join(f"LAWA {e.lawa.name!r} holds the snapshots of steps {e.lawa.snapshot_steps}" for e in self.emas)
        where = f", the latest {self.written[-1]}" if self.written else ""
        early = (f"; {len(self.skipped)} folder(s) of EMA weights saved before the first snapshot have no LAWA twin"
                 if self.skipped else "")
        posthoc = f"; {self.posthoc.summary()}" if self.posthoc is not None else ""
        return f"{steps}; wrote {len(self.written)} LAWA folder(s){where}{early}{posthoc}"


def make_ema_class(plugin: Plugin, original: type) -> type:
    """A ``LAWAEMAModel`` subclass standing in for diffusers' ``EMAModel`` while the plugin is installed."""
    from lawa_diffusion.engine.ema import LAWAEMAModel

    class EMAModel(LAWAEMAModel):
        __doc__ = original.__doc__
        __module__ = original.__module__
        __qualname__ = original.__qualname__

        @reported_as_input_errors
        def __init__(self, parameters, *args, **kwargs):
            parameters = check_ema_source(parameters)  # before LAWA sees the EMA
            super().__init__(parameters, *args, lawa=plugin.lawa_config(), **kwargs)
            self._lawa_swapped_ids: Optional[set] = None
            self._lawa_saving = False
            self._lawa_full: Optional[list] = None  # a sharded EMA's gathered weights, while save_state runs
            self._lawa_temporary = True
            if not plugin._temporary_depth:
                plugin.adopt(self)
                if plugin.posthoc is not None and self is plugin.emas[0]:
                    plugin.posthoc.make(self, parameters)  # before the script shards or moves its model
                if plugin.fid is not None and self is plugin.emas[0]:
                    plugin.fid.check_model(self)  # FID options that cannot evaluate this model: before training

        @classmethod
        def from_pretrained(cls, path, model_cls, foreach=False, **kwargs):
            with plugin.temporary():
                return super().from_pretrained(path, model_cls, foreach=foreach, **kwargs)

        def state_dict(self) -> dict:
            # A temporary EMA holds no window: its state must not empty the real EMA's on load_state_dict.
            return self.ema_state_dict() if self._lawa_temporary else super().state_dict()

        load_state_dict = reported_as_input_errors(LAWAEMAModel.load_state_dict)

        @reported_as_input_errors
        def step(self, parameters):
            if not hasattr(parameters, "parameters"):
                parameters = list(parameters)  # read twice: by this EMA, then by the post-hoc ones
            plugin.follow_sharding(self, parameters)  # before a late adoption loads the window of the shards
            if self._lawa_temporary:
                plugin.adopt_late(self)
            self._lawa_swapped_ids = None
            super().step(parameters)
            plugin.after_step(self, parameters)

        @reported_as_input_errors
        def copy_to(self, parameters, weights: str = "ema") -> None:
            parameters = list(parameters)
            plugin.follow_sharding(self, parameters)
            pairs = zip(self.shadow_params, parameters)
            check(not any(sources.is_sharded(s) and not sources.is_sharded(p) for s, p in pairs),
                  "EMAModel.copy_to of an EMA sharded by FSDP2 needs the sharded model's parameters; call it with "
                  "the parameters of the prepared model, on every process")
            super().copy_to(parameters, weights)
            if weights == "ema" and not self._lawa_saving:
                self._lawa_swapped_ids = {id(p) for p in parameters}

        def restore(self, parameters) -> None:
            self._lawa_swapped_ids = None
            super().restore(parameters)

        @reported_as_input_errors
        def save_pretrained(self, path) -> None:
            if self.lawa.source.sharded():  # the weights gathered by save_state (diffusers saves on the main process)
                check(self._lawa_full is not None,
                      f"EMAModel.save_pretrained({os.fspath(path)!r}) of an EMA sharded by FSDP2 writes the weights "
                      "gathered by accelerator.save_state; save it from a save_state pre-hook and call "
                      "accelerator.save_state on every process")
                self.save_pretrained_from(path, self._lawa_full)
                return
            self._lawa_saving = True
            try:
                super().save_pretrained(path)
            finally:
                self._lawa_saving = False
            if not self._lawa_temporary and not self.lawa.source.sharded():
                plugin.write_lawa(self, lawa_folder_for(path))

    return EMAModel
