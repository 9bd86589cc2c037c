"""EMA snapshots stored every N steps, off the training thread, for averages synthesised after the fact.

One file per (track, step), the format ``tracking.save_ema_snapshot`` writes:

    OUT/ema_snapshots/<track>/step-<step:09d>.safetensors   (OUT/ema_snapshots/ itself for the track "ema")
    tensors: the model's parameter names, in ``dtype``; metadata: "step", "track", "model_config" (JSON, with
    the model's ``_class_name``) and "track_def" (JSON: the track's ``lag.EMATrack.to_dict()``, so its exact
    profile is known)

``PosthocSnapshots`` keeps power-function EMAs (EDM2, ``PowerEMAModel``) beside a model, and/or stores
EMAs the caller keeps: ``update(parameters)`` after each optimizer step steps its own EMAs and stores
the due snapshots. Storing copies the weights to host memory on the calling thread (asynchronously
into pinned buffers on CUDA) and leaves the file writes to one background thread; ``flush`` waits for
them. ``attach(accelerator)`` makes ``save_state`` flush and carry the EMAs' state
(``posthoc_state.safetensors``) and ``load_state`` restore it and drop the files stored after the
checkpoint's step, so a resumed run stores what an uninterrupted one would.

With several processes the own EMAs are kept like the model: over an FSDP2-sharded or ZeRO-3-partitioned model
each process keeps, steps and stores only its part of each EMA (``engine.sharded_snapshots``: every process writes
its part of ``step-<step>/`` through torch.distributed.checkpoint, the main process its record; each checkpoint
holds one ``posthoc_state.rank-*`` file per process); over a replicated (DDP) model only the main process, which
stores them, keeps them, and the others drop theirs at the first update.
"""
from __future__ import annotations

import glob
import json
import os
import queue
import types
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.config.tracks import POSTHOC_DTYPES
from lawa_diffusion.engine.rings import host_empty, note_use
from lawa_diffusion.engine.sharded_snapshots import PartLayout, kind_of, write_sharded_snapshot
from lawa_diffusion.maths import lag
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.checksums import verified_metadata
from lawa_diffusion.utils.files import BackgroundWriter, atomic_save_safetensors
from lawa_diffusion.utils.output import is_main_process, process_count, process_rank

DTYPES = {name: getattr(torch, name) for name in POSTHOC_DTYPES}
STATE_FILE = "posthoc_state.safetensors"
RANK_STATE_FILE = "posthoc_state.rank-{rank:05d}-of-{world:05d}.safetensors"  # the own EMAs' parts of one process
DEFAULT_SIGMA_RELS = (0.05, 0.10)
BUFFERS_PER_TRACK = 2  # snapshots of one track in flight; a third store waits for the oldest file


def sigma_rel_track(sigma_rel: float) -> str:
    """The name of the power-function EMA track of ``sigma_rel``: ``sigma_rel_0.05``."""
    return f"sigma_rel_{sigma_rel:g}"


def gamma_track(gamma: float) -> str:
    return f"gamma_{gamma:g}"


def as_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """A storage dtype from its name ("float32", "bfloat16", "float16") or itself."""
    if isinstance(dtype, torch.dtype):
        check(dtype in DTYPES.values(), f"posthoc dtype must be one of {', '.join(POSTHOC_DTYPES)}, got {dtype}")
        return dtype
    check(dtype in DTYPES, f"posthoc dtype must be one of {', '.join(POSTHOC_DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def track_def(ema: Any) -> dict:
    """The full definition of a diffusers ``EMAModel`` (or ``PowerEMAModel``) as ``lag.EMATrack.to_dict()``."""
    return lag.EMATrack.from_settings(ema).to_dict()


def plain_config(config: Any, model_cls: Any = None) -> dict:
    """A model config (diffusers ``FrozenDict``) as JSON-ready data, without its private ``_`` keys but for
    ``_class_name``: the model's class (``model_cls``'s name when given, else the config's own), which tells
    after-training commands what to build (a config without it is read as a UNet2DModel's)."""
    items = dict(config or {})
    plain = json.loads(json.dumps({k: v for k, v in items.items() if not str(k).startswith("_")}, default=list))
    name = getattr(model_cls, "__name__", None) or items.get("_class_name")
    if name:
        plain["_class_name"] = str(name)
    return plain


def parameter_names(model_cls: Any, model_config: Any) -> List[str]:
    """The parameter names of ``model_cls.from_config(model_config)``, built without memory (meta tensors)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_cls.from_config(model_config)
    return [n for n, _ in model.named_parameters()]


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / DataParallel, DeepSpeed and ``torch.compile`` wrappers (whose parameter names are
    prefixed)."""
    while True:
        deepspeed = type(model).__name__ == "DeepSpeedEngine"
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)) or (
                deepspeed and isinstance(getattr(model, "module", None), torch.nn.Module)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


class PosthocSnapshots:
    """Power-function EMAs beside a model (and/or EMAs the caller keeps), stored every ``every_n_steps``.

    model: the model being trained (its parameter names and, for diffusers models, config go into every
        file; DDP and ``torch.compile`` wrappers are looked through); or a list of its parameters with
        ``names`` (and ``model_config``) given.
    output_dir: the files go to ``output_dir/ema_snapshots/<track>/``.
    sigma_rels / gammas: power-function EMAs this object keeps, tracks ``sigma_rel_<σ>`` / ``gamma_<γ>``
        (default: σ_rel 0.05 and 0.10 when no ``emas`` are given).
    emas: {track name: diffusers EMAModel} kept by the caller (stepped by the caller; stored here).
    tracks: the tracks stored on the schedule (default: all of them).
    every_n_steps: store every N optimizer steps (step = the EMAs' ``optimization_step``); dtype: of the files.
    main_process: whether this process writes files (default: rank 0); every process steps the EMAs.
    """

    def __init__(self, model: Any, output_dir: str, sigma_rels: Optional[Sequence[float]] = None,
                 every_n_steps: int = 500, dtype: Union[str, torch.dtype] = "float32", *,
                 gammas: Sequence[float] = (), emas: Optional[Mapping[str, Any]] = None,
                 tracks: Optional[Sequence[str]] = None, names: Optional[Sequence[str]] = None,
                 model_config: Any = None, model_cls: Any = None, main_process: Optional[bool] = None):
        check(isinstance(every_n_steps, int) and not isinstance(every_n_steps, bool) and every_n_steps >= 0,
              f"posthoc every_n_steps must be an integer >= 0 (0: only when asked), got {every_n_steps!r}")
        self.output_dir, self.every_n_steps, self.dtype = os.fspath(output_dir), every_n_steps, as_dtype(dtype)
        self.main_process = is_main_process() if main_process is None else bool(main_process)
        if isinstance(model, torch.nn.Module):
            model = unwrapped(model)
            parameters = list(model.parameters())
            names = [n for n, _ in model.named_parameters()] if names is None else list(names)
            config = getattr(model, "config", None)
            model_config = config if model_config is None else model_config
            model_cls = (type(model) if config is not None else None) if model_cls is None else model_cls
        else:
            parameters = list(model)
            check(names is not None, "PosthocSnapshots needs the parameters' names: pass the model itself, or names=")
            names = list(names)
        check(len(names) == len(parameters),
              f"PosthocSnapshots got {len(names)} parameter names for {len(parameters)} parameters")
        self.names, self.model_config = names, plain_config(model_config, model_cls)
        self.emas: Dict[str, Any] = dict(emas or {})
        if sigma_rels is None and not gammas and not emas:
            sigma_rels = DEFAULT_SIGMA_RELS
        self.own: Dict[str, Any] = {}
        self.layout: Optional[PartLayout] = None  # set once the model is sharded: the own EMAs hold parts
        self.idle = False  # a process of a replicated (DDP) run that is not the main one: it keeps no own EMA
        self._decided = False
        self._group: Any = None
        self._loaded_parts: Optional[dict] = None
        if kind_of(parameters) is not None:  # already sharded: each process keeps its part from the start
            self.layout = PartLayout.of(parameters, names)
            parameters = self.layout.views(parameters)
        self._make_own(parameters, [(sigma_rel_track(s), lag.power_ema(sigma_rel=s)) for s in sigma_rels or ()]
                       + [(gamma_track(g), lag.power_ema(gamma=g)) for g in gammas], model_cls, model_config)
        self.tracks = list(self.emas) if tracks is None else list(dict.fromkeys(tracks))
        unknown = [t for t in self.tracks if t not in self.emas]
        check(not unknown, f"posthoc tracks {', '.join(map(repr, unknown))} are not EMAs of this PosthocSnapshots; "
                           f"it holds {', '.join(self.emas) or 'none'}")
        self.definitions = {name: track_def(ema) for name, ema in self.emas.items()}
        self.writer = BackgroundWriter("lawa-posthoc-writer", f"post-hoc snapshot writer in {self.output_dir!r}")
        self._free: Dict[tuple, "queue.Queue"] = {}  # (track, dtype) -> host buffers ready for a copy
        self._made: Dict[tuple, int] = {}
        self._resumed = False
        self.written: List[str] = []
        if self.main_process:
            self._remove_temp_files()

    def _make_own(self, parameters: list, tracks: list, model_cls: Any, model_config: Any) -> None:
        from lawa_diffusion.engine.ema import PowerEMAModel

        template = {"model_cls": model_cls, "model_config": model_config} if model_cls is not None else {}
        for name, track in tracks:
            check(name not in self.emas, f"posthoc track {name!r} is given twice; give each power EMA once")
            ema = PowerEMAModel(parameters, gamma=track.gamma, foreach=True, **template)
            self.own[name] = self.emas[name] = ema

    # ------------------------------------------------------------------ training
    @property
    def step(self) -> int:
        """The optimizer step the EMAs have seen (the first EMA's ``optimization_step``)."""
        return int(next(iter(self.emas.values())).optimization_step) if self.emas else 0

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> List[str]:
        """Step this object's own EMAs with the trained ``parameters`` (after the optimizer step), then store
        the snapshots that are due; returns the paths being written."""
        params = list(parameters.parameters() if isinstance(parameters, torch.nn.Module) else parameters)
        if not self._decided:
            self._decide(params)
        if self.idle:
            return []
        parts = self.layout.views(params) if self.layout is not None else params  # this process's part of each
        trainable = [p.requires_grad for p in params]
        for ema in self.own.values():
            if ema.shadow_params and parts and ema.shadow_params[0].device != parts[0].device:
                ema.to(parts[0].device)  # made before the model moved (e.g. by accelerator.prepare)
            if self.layout is not None:
                ema.step_parts(parts, trainable)
            else:
                ema.step(params)
        return self.after_step()

    def _decide(self, params: list) -> None:
        """At the first update: keep the own EMAs in parts over a sharded model (made before it was sharded, they
        are cut now), or, on a process of a replicated run that does not store them, drop them."""
        self._decided = True
        if self.layout is None and kind_of(params) is not None:
            self.layout = PartLayout.of(params, self.names)
            for ema in self.own.values():
                ema.shadow_params = self.layout.cut(ema.shadow_params)
        elif self.layout is None and process_count() > 1 and not self.main_process and self.own:
            self.idle = True
            for ema in self.own.values():
                ema.shadow_params = []
        if self.layout is not None and self._loaded_parts is not None:
            self._use_loaded_parts()

    def held_bytes(self) -> int:
        """Bytes of the own EMAs' weights this process holds (its parts when sharded; none when idle)."""
        return sum(t.numel() * t.element_size() for ema in self.own.values() for t in ema.shadow_params)

    def due(self, step: int) -> bool:
        return self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0

    def after_step(self, step: Optional[int] = None) -> List[str]:
        """Store the scheduled tracks if ``step`` (default: the EMAs' step) is due; for EMAs the caller steps."""
        step = self.step if step is None else step
        return self.write(step, self.tracks) if self.due(step) else self._after_resume(step)

    def write(self, step: int, tracks: Union[Sequence[str], Mapping[str, torch.dtype], None] = None) -> List[str]:
        """Store ``tracks`` (names, or {name: dtype}; default: the scheduled ones, in ``dtype``) at ``step`` now;
        the files are written in the background. Nothing on a process that is not the main one."""
        self._after_resume(step)
        tracks = self.tracks if tracks is None else tracks
        plan = dict(tracks) if isinstance(tracks, Mapping) else {t: self.dtype for t in tracks}
        paths = []
        for name, dtype in plan.items():
            check(name in self.emas, f"posthoc track {name!r} is not an EMA of this PosthocSnapshots; it holds "
                                     f"{', '.join(self.emas)}")
            if self._in_parts(name):  # every process stores its part
                paths.append(self._store(step, name, as_dtype(dtype), sharded=True))
            elif self.main_process:
                paths.append(self._store(step, name, as_dtype(dtype)))
        if self.main_process:
            self.written += paths
        return paths

    def _in_parts(self, name: str) -> bool:
        if not (self.layout is not None and name in self.own and not self.idle):
            return False
        if self._group is None:  # made by every process, at its first sharded store: DCP's collectives go over it,
            import torch.distributed as dist  # on the CPU, apart from the trainer's (NCCL) ones

            self._group = dist.new_group(backend="gloo")
        return True

    def _store(self, step: int, name: str, dtype: torch.dtype, sharded: bool = False) -> str:
        source = self.emas[name].shadow_params
        check(len(source) == len(self.names),
              f"EMA track {name!r} holds {len(source)} tensors for {len(self.names)} parameter names")
        cuda = bool(source) and source[0].is_cuda
        free = self._free.setdefault((name, dtype), queue.Queue())
        if free.empty() and self._made.get((name, dtype), 0) < BUFFERS_PER_TRACK:
            self._made[(name, dtype)] = self._made.get((name, dtype), 0) + 1
            # one host buffer per track, pinned under the source's GPU (rings.host_empty), viewed per tensor
            flat = host_empty((sum(p.numel() for p in source),), dtype, pin=cuda,
                              device=source[0].device if source else None)
            free.put([v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in source]), source)])
        buffers = free.get()  # waits only while earlier snapshots of this track are still being written
        for buffer, p in zip(buffers, source):
            buffer.copy_(p.detach(), non_blocking=cuda)
        event, device = None, source[0].device if source else None  # the job keeps the device, not the tensors
        if cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            note_use(buffers[0], event)  # the pages are unpinned only after this copy has run
        path = runfolder.snapshot_path(self.output_dir, step, name, sharded=sharded)
        definition, names, config, output_dir = self.definitions[name], self.names, self.model_config, self.output_dir
        layout, group, main = self.layout, self._group, self.main_process

        def job() -> None:
            try:
                if event is not None:
                    # this thread's CUDA calls go to the source's GPU (a new thread starts on GPU 0)
                    torch.cuda.set_device(device)
                    event.synchronize()
                if sharded:
                    record = snapshot_fields(step, name, config, definition)
                    write_sharded_snapshot(path, dict(zip(names, buffers)), layout, record, group, main)
                else:
                    save_ema_snapshot(output_dir, step, types.SimpleNamespace(shadow_params=buffers), names, config,
                                      name, definition, dtype)
            finally:
                free.put(buffers)

        self.writer.submit(job)
        return path

    def flush(self) -> None:
        """Wait until every stored snapshot is on disk (before a checkpoint; raises a writer error)."""
        self.writer.sync()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "PosthocSnapshots":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ files
    def _remove_temp_files(self) -> None:
        for name in self.emas:
            folder = runfolder.snapshot_folder(self.output_dir, name)
            for path in glob.glob(os.path.join(glob.escape(folder), ".step-*.tmp")):
                try:
                    runfolder.remove_snapshot(path)  # a file, or a sharded snapshot's folder
                except OSError:
                    pass

    def truncate_after(self, step: int) -> List[str]:
        """Delete this object's tracks' files of steps after ``step`` (main process); returns their paths."""
        removed = []
        if self.main_process:
            self.flush()
            for name in self.emas:
                for snap_step, path in runfolder.list_ema_snapshots(self.output_dir, name):
                    if snap_step > step:
                        runfolder.remove_snapshot(path)
                        removed.append(path)
        return removed

    def _after_resume(self, step: int) -> List[str]:
        """After ``load_state``, before anything else is stored: drop the files past the resumed step."""
        if self._resumed:
            self._resumed = False
            self.truncate_after(step - 1)
        return []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The own EMAs' diffusers states (``gamma`` included) by track, and the schedule."""
        return {"every_n_steps": self.every_n_steps, "tracks": {n: e.state_dict() for n, e in self.own.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = dict(state.get("tracks", {}))
        check(sorted(saved) == sorted(self.own),
              f"the post-hoc state holds the power EMAs {', '.join(sorted(saved)) or 'none'} but this run keeps "
              f"{', '.join(sorted(self.own)) or 'none'}; resume with the options the checkpoint was written with, "
              "or start a new output folder")
        for name, ema in self.own.items():
            device = ema.shadow_params[0].device if ema.shadow_params else torch.device("cpu")
            ema.load_state_dict(saved[name])
            ema.to(device)
        self._resumed = True

    def save_state(self, folder: str) -> Optional[str]:
        """Flush, then write the own EMAs' state into ``folder`` (the main process; when the EMAs are kept in parts,
        every process its own file); returns the file's path."""
        self.flush()
        parts = self.layout is not None and not self.idle
        if not (self.own and (self.main_process or parts)):
            return None
        tensors, meta = {}, {}
        for name, ema in self.own.items():
            state = ema.state_dict()
            for i, p in enumerate(state.pop("shadow_params")):
                tensors[f"{name}/{i}"] = p.detach().cpu()
            meta[name] = state
        saved = {"every_n_steps": self.every_n_steps, "tracks": meta}
        path = os.path.join(folder, STATE_FILE)
        if parts:
            path = os.path.join(folder, RANK_STATE_FILE.format(rank=process_rank(), world=process_count()))
            saved["parts"] = [[p.lo, p.hi] for p in self.layout.parts]
        atomic_save_safetensors(path, tensors, metadata={"posthoc_state": json.dumps(saved)})
        return path

    def load_state(self, folder: str) -> bool:
        """Restore the own EMAs from ``folder`` (written by :meth:`save_state`); files stored after its step are
        dropped before the next store. False when this object keeps no EMA of its own."""
        self._resumed = True
        if not self.own:
            return False
        rank, world = process_rank(), process_count()
        mine = os.path.join(folder, RANK_STATE_FILE.format(rank=rank, world=world))
        path = mine if os.path.isfile(mine) else os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            others = glob.glob(os.path.join(glob.escape(folder), "posthoc_state.rank-*.safetensors"))
            check(not others, f"checkpoint {folder!r} holds the post-hoc EMAs in {len(others)} parts, none for process "
                              f"{rank} of {world}; resume with the number of processes that wrote it")
            check(False, f"checkpoint {folder!r} holds no post-hoc EMA state ({STATE_FILE}); resume with the options "
                         "the checkpoint was written with, or start a new output folder")
        state = _read_state(path)
        if path == mine:  # parts: used once this run's layout is known (now, or at the first update)
            self._loaded_parts = state
            if self.layout is not None and not self._needs_cut():
                self._use_loaded_parts()
            return True
        self.load_state_dict(state)
        return True

    def _needs_cut(self) -> bool:
        return any(t.numel() != part.size for ema in self.own.values()
                   for t, part in zip(ema.shadow_params, self.layout.parts))

    def _use_loaded_parts(self) -> None:
        state, self._loaded_parts = self._loaded_parts, None
        saved = [tuple(r) for r in state.get("parts", [])]
        now = [(p.lo, p.hi) for p in self.layout.parts]
        check(saved == now, "the checkpoint's post-hoc EMA parts do not match how this run shards the model; resume "
                            "with the processes and sharding the checkpoint was written with")
        self.load_state_dict(state)

    def attach(self, accelerator: Any) -> "PosthocSnapshots":
        """``accelerator.save_state`` flushes the files and saves the own EMAs' state; ``load_state`` restores it."""
        accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: self.save_state(output_dir))
        accelerator.register_load_state_pre_hook(lambda models, input_dir: self.load_state(input_dir))
        return self


def _read_state(path: str) -> dict:
    """The own EMAs' state as :meth:`PosthocSnapshots.save_state` wrote it (checksum verified)."""
    from safetensors import safe_open

    verified_metadata(path, "resume from the checkpoint before this one")
    with safe_open(path, framework="pt") as f:
        state = json.loads(f.metadata()["posthoc_state"])
        for name, track in state["tracks"].items():
            count = sum(1 for key in f.keys() if key.startswith(name + "/"))
            track["shadow_params"] = [f.get_tensor(f"{name}/{i}") for i in range(count)]
    return state


# ----------------------------------------------------------------------------- EMA snapshot files
def snapshot_fields(step: int, track: str, model_config: dict, track_def: Optional[dict] = None) -> Dict[str, str]:
    """What every stored snapshot says of itself (a file's safetensors metadata, a sharded folder's record)."""
    metadata = {"step": str(step), "track": track, "model_config": json.dumps(model_config)}
    if track_def is not None:
        metadata["track_def"] = json.dumps(track_def)
    return metadata


def save_ema_snapshot(run_dir: str, step: int, ema, names: list[str], model_config: dict,
                      track: str = runfolder.BASE_TRACK, track_def: Optional[dict] = None,
                      dtype: torch.dtype = torch.float16) -> str:
    """The EMA weights of ``track`` at ``step`` as ``dtype`` safetensors (UNet parameter names; step, track, model
    config and, when given, the track's full definition ``lag.EMATrack.to_dict()`` as ``track_def`` in the
    metadata). ``lawa_diffusion.engine.posthoc_snapshots`` calls it from its writer thread with host copies."""
    if len(names) != len(ema.shadow_params):
        raise RuntimeError(f"EMA holds {len(ema.shadow_params)} tensors for {len(names)} UNet parameters")
    tensors = {n: p.detach().to("cpu", dtype) for n, p in zip(names, ema.shadow_params)}
    path = runfolder.snapshot_path(run_dir, step, track)
    atomic_save_safetensors(path, tensors, metadata=snapshot_fields(step, track, model_config, track_def))
    return path
