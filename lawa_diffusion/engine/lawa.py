"""The LAWA engine: keeps the latest k snapshots of a source's tensors and averages them exactly.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lawa_diffusion.config.base import check
from lawa_diffusion.config.lawa import LAWAConfig
from lawa_diffusion.engine import accelerate_hooks, collectives
from lawa_diffusion.engine.rings import FiniteCheck, Ring, make_ring
from lawa_diffusion.engine.sources import TensorSource, as_source, copy_whole, is_sharded, iter_whole, local_shard
from lawa_diffusion.maths.averaging import (
    DTYPE_NAMES,
    accumulation_dtype,
    dtype_from_name,
    flat_views,
    foreach_copy,
    nonfinite_flag,
)
from lawa_diffusion.maths.lag import first_snapshot
from lawa_diffusion.utils.files import atomic_dir
from lawa_diffusion.utils.output import is_main_process, process_count, process_rank, warn

STATE_FORMAT = 1
WINDOW_KEYS = ("k", "every_n_steps", "start_step")  # a saved window continues only with the same values


def _options(values: dict, keys: Sequence[str]) -> str:
    return ", ".join(f"{key}={values.get(key)}" for key in keys)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".lawa-write-test-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.unlink(probe)
    except OSError as e:
        raise ValueError(
            f"lawa snapshot_dir {folder!r} is not writable ({e.strerror or e}); choose a folder you can write to"
        ) from None


class LAWA:
    """Latest Weight Averaging over a source's tensors (see ``LAWAConfig`` for the options).

    Call ``step()`` after every ``ema.step(...)``. Storage is allocated at the first snapshot.

    Each snapshot's NaN/Inf check runs on the device without blocking the training thread; it is
    read at the next snapshot, average, ``state_dict`` or save. A snapshot that fails it is taken
    out of the window there (``on_nonfinite='skip'``: with a warning; ``'raise'``: with a
    ``ValueError`` naming its step); until then it counts in ``snapshot_steps``.

    Over a sharded source (FSDP2 / DTensor), every process keeps the window of its own local shard
    (``snapshot_ranks`` acts as "all"), averages are elementwise on the shards, and ``save_pretrained``
    gathers the full weights (call it on every process; the main process writes). The NaN/Inf checks
    of the shards are agreed on by all processes (a snapshot that fails on one is skipped, or raised
    for, on all), so what reads them (``step``, averages, ``state_dict``, saves) runs on every process.
    """

    def __init__(self, source: Any, config: LAWAConfig | dict | None = None, *, name: str = "lawa"):
        if isinstance(config, dict):
            config = LAWAConfig.from_dict(config)
        self.config: LAWAConfig = config if config is not None else LAWAConfig()
        self.source: TensorSource = as_source(source)
        self.name = name
        self.defer_source_wait = False  # set by LAWAEMAModel, which waits just before the next EMA update
        self._ring: Optional[Ring] = None
        self._order: List[Tuple[int, int]] = []  # (step, slot), oldest first
        self._pending: List[Tuple[int, int, FiniteCheck]] = []  # (step, slot, check) not read yet
        self._checked_ids: List[int] = []  # ids of the source tensors whose layout was last checked
        self._calls = 0
        self._avg: Optional[torch.Tensor] = None
        self._since_exact = 0
        self.skipped_steps: List[int] = []
        self._sharded: Optional[bool] = None  # whether the source is sharded, once known
        self._all_ranks_if_sharded()
        if self.config.storage == "disk":
            _check_writable(self.config.snapshot_dir)

    # ----------------------------------------------------------------- state
    @property
    def snapshot_steps(self) -> List[int]:
        return [s for s, _ in self._order]

    @property
    def num_snapshots(self) -> int:
        return len(self._order)

    @property
    def ready(self) -> bool:
        return self.num_snapshots >= self.config.min_snapshots

    @property
    def holds_snapshots(self) -> bool:
        """False on non-main processes when ``snapshot_ranks == "main"``."""
        return self.config.snapshot_ranks == "all" or process_rank() == 0

    def _all_ranks_if_sharded(self) -> None:
        """A sharded source needs every process to keep its own shard: snapshot_ranks 'main' becomes 'all'.
        Decided once, when the engine is made (a walk over every source tensor: not for each snapshot)."""
        self._sharded = self.source.sharded()
        if self.config.snapshot_ranks == "main" and self._sharded:
            if is_main_process():
                warn(f"lawa {self.name!r}: the EMA is sharded (FSDP / DTensor), so every process keeps the window "
                     "of its own shard (snapshot_ranks='all' instead of 'main')")
            self.config = dataclasses.replace(self.config, snapshot_ranks="all")

    def follow_source(self) -> None:
        """Re-read whether the source is sharded, once its tensors were replaced by DTensor shards (an EMA made
        before ``fully_shard``, sharded like the model later): snapshot_ranks 'main' becomes 'all' then."""
        self._checked_ids = []
        self._all_ranks_if_sharded()

    def due(self, step: int) -> bool:
        c = self.config
        return step >= c.start_step and (step - c.start_step) % c.every_n_steps == 0

    # ------------------------------------------------------------------ step
    def step(self, step: Optional[int] = None) -> bool:
        """Snapshot the source if ``step`` is due; returns True when a snapshot was taken."""
        if step is None:
            step = self.source.current_step()
            if step is None:
                self._calls += 1
                step = self._calls
        step = int(step)
        if self._order and step <= self._order[-1][0]:
            check(step == self._order[-1][0],
                  f"lawa step went backwards: got step {step} after a snapshot at step {self._order[-1][0]}; "
                  "load the matching LAWA state when you resume training")
            return False
        if not self.due(step):
            return False
        self.resolve_checks()
        tensors = self.source.tensors()
        if not self.holds_snapshots:  # keep the same window (and checks) as the main process
            self._order = (self._order + [(step, -1)])[-self.config.k:]
            self._pending.append((step, -1, FiniteCheck(nonfinite_flag(tensors))))
            return True
        self._ensure_ring(tensors)
        self._write(step, tensors)
        return True

    # ------------------------------------------------------- NaN/Inf checks
    def resolve_checks(self) -> None:
        """Read the pending snapshot checks; take a snapshot that holds NaN/Inf out of the window."""
        pending, self._pending = self._pending, []
        failed = [not self._passed(slot, result) for _, slot, result in pending]
        if pending and self._sharded_across_processes():
            failed = self._agreed(failed)
        bad = [(step, slot) for (step, slot, _), fail in zip(pending, failed) if fail]
        for step, slot in bad:
            self._drop(step, slot)
        if not bad:
            return
        steps = ", ".join(str(step) for step, _ in bad)
        if self.config.on_nonfinite == "raise":
            raise ValueError(
                f"lawa snapshot at step {steps}: the EMA weights hold NaN or Inf (the snapshot is left out of "
                "the window); fix the divergence, or set on_nonfinite='skip' to leave such snapshots out"
            )
        self.skipped_steps.extend(step for step, _ in bad)
        warn(f"lawa: skipped the snapshot at step {steps} because the EMA weights hold NaN or Inf")

    def _sharded_across_processes(self) -> bool:
        if self._sharded is None:
            self._sharded = self.source.sharded()
        return self._sharded and torch.distributed.is_available() and torch.distributed.is_initialized()

    def _agreed(self, failed: List[bool]) -> List[bool]:
        """Each check failed on some process of the EMA's mesh (a MAX all-reduce over its groups, on a device their
        backend takes): over a sharded source every process must drop (or raise for) the same snapshots, or the
        windows and the collectives that follow diverge. Processes outside the mesh take no part."""
        groups = collectives.mesh_groups(self.source.raw_tensors())
        return collectives.any_over(failed, groups, self._compute_device())

    def _passed(self, slot: int, result: FiniteCheck) -> bool:
        # a non-finite flag can be an overflow of finite values: confirm element-wise (rare, synchronous)
        return result.passed() or (slot >= 0 and self._ring.row_is_finite(slot))

    def _drop(self, step: int, slot: int) -> None:
        self._order = [o for o in self._order if o[0] != step]
        if slot < 0:
            return
        self._ring.release(slot)
        if self.config.keep_average:
            self._avg = self._exact_average() if self._order and self._runs_average() else None
            self._since_exact = 0

    def _next_slot(self) -> Tuple[int, Optional[int]]:
        """(slot to write, slot evicted or None)."""
        if len(self._order) < self.config.k:
            used = {slot for _, slot in self._order}
            return next(i for i in range(self.config.k) if i not in used), None
        slot = self._order[0][1]
        return slot, slot

    def _write(self, step: int, tensors: Sequence[torch.Tensor]) -> None:
        slot, evicted = self._next_slot()
        old_row = None
        running = self._runs_average()
        if running and evicted is not None and self._avg is not None:
            # (non-blocking from a pinned row: the ring's next copy into that slot waits for this stream)
            old_row = self._ring.row_copy(evicted, self._avg.device, self._avg.dtype)
        self._ring.write(slot, step, tensors)
        if not self.defer_source_wait:
            self._ring.wait_source_read()
        self._pending.append((step, slot, self._ring.finite_check(slot)))
        self._order = [o for o in self._order if o[1] != slot] + [(step, slot)]
        if running:
            self._update_running_average(tensors, old_row)
        elif self.config.keep_average:
            self._avg = None  # disk: the mean of the new window is computed when it is next asked for

    def _runs_average(self) -> bool:
        """keep_average updates the mean at each snapshot, except over disk storage: that would read the evicted
        file on the training thread (and k files every k snapshots); there the mean is computed when asked for
        and kept until the window changes."""
        return self.config.keep_average and self.config.storage != "disk"

    def before_source_update(self) -> None:
        """Order the next in-place update of the source after any pending snapshot copy (GPU-side wait)."""
        if self._ring is not None:
            self._ring.wait_source_read()

    def _update_running_average(self, tensors: Sequence[torch.Tensor], old_row: Optional[torch.Tensor]) -> None:
        n, k = self.num_snapshots, self.config.k
        self._since_exact += 1
        if self._avg is None or self._since_exact >= k:
            self._avg = self._exact_average()
            self._since_exact = 0
            return
        # the row exactly as stored (rounded to the storage dtype), in the accumulation dtype
        stored = self._ring.dtype
        new = torch.cat([t.detach().reshape(-1).to(stored).to(self._avg.dtype) for t in tensors]).to(self._avg.device)
        if old_row is None:  # window still filling: running mean over n
            self._avg.add_(new.sub_(self._avg), alpha=1.0 / n)
        else:
            self._avg.add_(new.sub_(old_row), alpha=1.0 / k)

    # ---------------------------------------------------------------- layout
    def _layout_of(self, tensors: Sequence[torch.Tensor]) -> Tuple[int, torch.dtype, List[torch.Size]]:
        check(len(tensors) > 0, "lawa source holds no tensors; pass the EMA of a model with parameters")
        dtypes = {t.dtype for t in tensors}
        source_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        dtype = dtype_from_name(self.config.dtype, source_dtype)
        return sum(t.numel() for t in tensors), dtype, [t.shape for t in tensors]

    @staticmethod
    def _check_layout(source: Sequence[torch.Size], state: Sequence[torch.Size], what: str) -> None:
        if [torch.Size(s) for s in source] == [torch.Size(s) for s in state]:
            return
        check(len(source) == len(state),
              f"lawa source has {len(source)} tensors but the {what} has {len(state)}; "
              "use the same model (and EMA) as the run that saved the state")
        for i, (a, b) in enumerate(zip(source, state)):
            check(torch.Size(a) == torch.Size(b),
                  f"lawa source tensor {i} has shape {tuple(a)} but the {what} has {tuple(b)}; "
                  "use the same model configuration as the run that saved the state")

    def _compute_device(self) -> torch.device:
        return self.source.tensors()[0].device

    def _ensure_ring(self, tensors: Sequence[torch.Tensor]) -> None:
        if self._ring is None:
            numel, dtype, shapes = self._layout_of(tensors)
            # each process of a sharded source writes its own files (in a snapshot_dir they may share)
            ring_name = f"{self.name}.rank{process_rank()}" if self.source.sharded() else self.name
            self._ring = make_ring(self.config.storage, self.config.k, numel, dtype, shapes,
                                   tensors[0].device, self.config.snapshot_dir, ring_name)
            return
        ids = list(map(id, tensors))
        if ids != self._checked_ids:  # the same tensors as last time need no new layout check
            self._check_layout([t.shape for t in tensors], self._ring.shapes, "LAWA state")
            self._checked_ids = ids
        self._ring.follow(tensors[0].device)

    # --------------------------------------------------------------- average
    def _require_ready(self) -> None:
        check(self.ready,
              f"lawa holds {self.num_snapshots} snapshot(s) but min_snapshots is {self.config.min_snapshots}; "
              f"train until step {self._next_due_hint()} or lower min_snapshots")

    def _next_due_hint(self) -> int:
        c = self.config
        need = c.min_snapshots - self.num_snapshots
        if self._order:
            return self._order[-1][0] + need * c.every_n_steps
        return first_snapshot(c) + (need - 1) * c.every_n_steps  # never step 0: the EMA counts steps from 1

    def _exact_average(self) -> torch.Tensor:
        device = self._compute_device()
        out = torch.empty(self._ring.numel, dtype=accumulation_dtype(self._ring.dtype), device=device)
        return self._ring.mean_into(out, sorted(slot for _, slot in self._order))

    def average_flat(self, sync_ranks: bool = False) -> torch.Tensor:
        """The mean of the held snapshots as one flat fp32 (or fp64) tensor on the EMA's device."""
        self.resolve_checks()
        self._require_ready()
        holds = self.holds_snapshots and self._ring is not None
        if sync_ranks and self.config.snapshot_ranks == "main" and torch.distributed.is_initialized():
            return self._broadcast_average(holds)
        check(holds, f"lawa process rank {process_rank()} holds no snapshots because snapshot_ranks='main'; "
                     "average on the main process, pass sync_ranks=True, or set snapshot_ranks='all'")
        if self.config.keep_average:
            if self._avg is None:
                self._avg = self._exact_average()
            return self._avg
        return self._exact_average()

    def _broadcast_average(self, holds: bool) -> torch.Tensor:
        tensors = self.source.tensors()
        numel, dtype, _ = self._layout_of(tensors)
        if holds:
            flat = self._avg if (self.config.keep_average and self._avg is not None) else self._exact_average()
            flat = flat.clone()
        else:
            flat = torch.empty(numel, dtype=accumulation_dtype(dtype), device=tensors[0].device)
        return collectives.broadcast_(flat, src=0)

    def average_into(self, tensors: Sequence[torch.Tensor], sync_ranks: bool = False) -> None:
        """Write the LAWA mean into ``tensors`` (same order and shapes as the source's tensors)."""
        targets = [local_shard(t) for t in tensors]
        flat = self.average_flat(sync_ranks=sync_ranks)
        shapes = [t.shape for t in self.source.tensors()]
        check(len(targets) == len(shapes),
              f"lawa average_into got {len(targets)} tensors but the source has {len(shapes)}; "
              "pass the parameters of the model the EMA tracks")
        views = flat_views(flat, targets)
        foreach_copy(targets, views)

    def copy_to(self, module_or_params: Any, sync_ranks: bool = False) -> None:
        """Copy the LAWA weights into a module (or a list of its parameters)."""
        with torch.no_grad():
            self.average_into(self.source.targets_of(module_or_params), sync_ranks=sync_ranks)

    @contextlib.contextmanager
    def swapped_into(self, module: nn.Module, sync_ranks: bool = False) -> Iterator[nn.Module]:
        """Temporarily load the LAWA weights into ``module``; the original weights come back on exit. Over a sharded
        source and an unsharded ``module`` (a copy to sample with) the whole average is gathered into it on every
        process (a collective: every process of the mesh takes part)."""
        targets = self.source.targets_of(module)
        if self.source.sharded() and not any(is_sharded(p) for p in module.parameters()):
            fill = self._gathered_into
        else:
            fill = lambda t: self.average_into(t, sync_ranks=sync_ranks)  # noqa: E731
        with swapped_weights(targets, fill):
            yield module

    def _gathered_average(self) -> Iterator[torch.Tensor]:
        """The whole average of each source tensor, in order, gathered over the mesh of a sharded source (every
        process of the mesh must take part)."""
        with torch.no_grad():
            yield from iter_whole(self.source.raw_tensors(), flat_views(self.average_flat(), self.source.tensors()))

    def _gathered_into(self, targets: Sequence[torch.Tensor]) -> None:
        check(len(targets) == len(self.source.raw_tensors()),
              f"lawa got {len(targets)} tensors to fill but the source has {len(self.source.raw_tensors())}; pass the "
              "parameters of the model the EMA tracks")
        copy_whole(self.source.raw_tensors(), targets, flat_views(self.average_flat(), self.source.tensors()))

    def snapshot_flat(self, step: int, sync_ranks: bool = False) -> torch.Tensor:
        """The held snapshot of ``step`` (the source's tensors then, in the storage dtype) as one flat tensor
        on the source's device; ``sync_ranks`` sends it from the main process to all (snapshot_ranks='main')."""
        self.resolve_checks()
        slots = dict(self._order)
        check(step in slots, f"lawa {self.name!r} holds no snapshot of step {step}; it holds steps "
                             f"{self.snapshot_steps}")
        tensors = self.source.tensors()
        holds = self.holds_snapshots and self._ring is not None
        if sync_ranks and self.config.snapshot_ranks == "main" and torch.distributed.is_initialized():
            numel, dtype, _ = self._layout_of(tensors)
            flat = (self._ring.read(slots[step]).to(tensors[0].device, copy=True) if holds
                    else torch.empty(numel, dtype=dtype, device=tensors[0].device))
            return collectives.broadcast_(flat, src=0)
        check(holds, f"lawa process rank {process_rank()} holds no snapshots because snapshot_ranks='main'; "
                     "read snapshots on the main process, pass sync_ranks=True, or set snapshot_ranks='all'")
        return self._ring.read(slots[step]).to(tensors[0].device)

    @contextlib.contextmanager
    def swapped_snapshot_into(self, module: nn.Module, step: int, sync_ranks: bool = False) -> Iterator[nn.Module]:
        """Temporarily load one held snapshot (the source at ``step``) into ``module``; its weights come back on exit."""
        targets = self.source.targets_of(module)
        with swapped_weights(targets, lambda t: foreach_copy(t, flat_views(self.snapshot_flat(step, sync_ranks), t))):
            yield module

    def metadata(self) -> dict:
        return {"k": self.config.k, "every_n_steps": self.config.every_n_steps,
                "start_step": self.config.start_step, "snapshot_steps": self.snapshot_steps}

    def save_pretrained(self, path: str | os.PathLike, model: Optional[nn.Module] = None) -> None:
        """Write the LAWA weights as a diffusers model folder (metadata under ``_lawa`` in config.json,
        :func:`read_record`).

        Over a sharded source every process must call it (the shards are gathered); the main process writes.
        """
        self.resolve_checks()
        if self.source.sharded():
            self._save_gathered(path, model)
            return
        model = self._template_model(model)
        self.copy_to(model)
        self._write_folder(model, path)

    def _save_gathered(self, path: str | os.PathLike, model: Optional[nn.Module]) -> None:
        """Gather the sharded average over the EMA's mesh into an unsharded model on the mesh's first process,
        which writes the folder (processes outside the mesh take no part)."""
        check(model is None or not any(is_sharded(p) for p in model.parameters()),
              "lawa save_pretrained of a sharded EMA needs an unsharded model to write; pass model=<the model "
              "before fully_shard>, or create the EMAModel with model_cls= and model_config=")
        self._check_template(model)  # on every process, so that none is left waiting in the gather
        sources = self.source.raw_tensors()
        main = collectives.mesh_leader(sources)
        if main:
            model = self._template_model(model)
            targets = self.source.targets_of(model)
        groups = collectives.mesh_groups(sources)
        for i, avg in enumerate(self._gathered_average()):  # a collective over the mesh: every process takes part
            if main:
                with torch.no_grad():
                    targets[i].copy_(avg)
        if main:
            self._write_folder(model, path)
        collectives.wait_for_all(groups, collectives.comm_device(groups[0], self._compute_device()))

    def _write_folder(self, model: nn.Module, path: str | os.PathLike) -> None:
        if hasattr(model, "register_to_config"):
            record_in_config(model, self.metadata())
        check(hasattr(model, "save_pretrained"),
              f"lawa save_pretrained needs a diffusers model, got {type(model).__name__}; pass model=<a diffusers model>")
        with atomic_dir(path, overwrite=True) as tmp:
            model.save_pretrained(tmp)

    def _check_template(self, model: Optional[nn.Module]) -> None:
        model_cls, model_config = self.source.model_template()
        check(model is not None or (model_cls is not None and model_config is not None),
              "lawa save_pretrained needs the model class and config: create the EMAModel with model_cls= and "
              "model_config=, or pass model=<a module of the right architecture>")

    def _template_model(self, model: Optional[nn.Module]) -> nn.Module:
        self._check_template(model)
        if model is not None:
            return copy.deepcopy(model)
        return uninitialized_model(*self.source.model_template())

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict:
        """Everything needed to continue the window exactly (snapshot rows on CPU, or disk file paths)."""
        self.resolve_checks()
        state = {"format": STATE_FORMAT, "name": self.name, "config": self.config.to_dict(),
                 "snapshot_steps": self.snapshot_steps, "calls": self._calls, "skipped_steps": list(self.skipped_steps)}
        # a resume with another number of processes is refused (states of sharded EMAs before this key: sharded)
        state.update(world_size=process_count(), sharded=self.source.sharded())
        if self._ring is None or not self.holds_snapshots:
            return state
        state["layout"] = {"numel": self._ring.numel, "dtype": _dtype_name(self._ring.dtype),
                           "shapes": [list(s) for s in self._ring.shapes]}
        state.update(self._ring.export(self._order))
        state["slots"] = [slot for _, slot in self._order]
        return state

    def check_state(self, state: dict) -> None:
        """Refuse (``ValueError``, one sentence) a state this engine cannot continue: another format, window
        (k, every_n_steps, start_step), number of processes, or layout. Reads the state only; changes nothing."""
        check(isinstance(state, dict) and state.get("format") == STATE_FORMAT,
              "lawa state is not a LAWA state dict of this version; pass what LAWA.state_dict() returned")
        saved, now = state.get("config") or {}, self.config.to_dict()
        differ = [key for key in WINDOW_KEYS if key in saved and saved[key] != now[key]]
        check(not differ,
              f"lawa state holds a window of {_options(saved, differ)} but this LAWA has {_options(now, differ)}; "
              f"resume with {_options(saved, differ)}, or start a new window")
        saved_size = state.get("world_size")
        if saved_size is not None and int(saved_size) != process_count():
            what = "the shards of a sharded EMA" if state.get("sharded", True) else "a window"
            check(False, f"lawa state holds {what} saved by {saved_size} processes but this run has "
                         f"{process_count()}; resume with {saved_size} processes, or start a new window")
        if "layout" in state and self.holds_snapshots:
            layout = state["layout"]
            tensors = self.source.tensors()
            _, dtype, shapes = self._layout_of(tensors)
            self._check_layout(shapes, [torch.Size(s) for s in layout["shapes"]], "saved LAWA state")
            check(DTYPE_NAMES.get(layout["dtype"]) == dtype,
                  f"lawa saved state stores {layout['dtype']} but this LAWA stores {_dtype_name(dtype)}; "
                  "set lawa dtype to match the run that saved the state")

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        steps = [int(s) for s in state["snapshot_steps"]][-self.config.k:]
        self._calls = int(state.get("calls", 0))
        self.source.forget_step()
        self.skipped_steps = list(state.get("skipped_steps", []))
        self._avg, self._since_exact = None, 0
        self._pending = []
        if "layout" not in state or not self.holds_snapshots:
            self._order = [(s, -1) for s in steps] if not self.holds_snapshots else []
            return
        self._load_rows(state, steps)
        if self._runs_average() and self._order:
            self._avg = self._exact_average()

    def _load_rows(self, state: dict, steps: List[int]) -> None:
        layout = state["layout"]
        tensors = self.source.tensors()
        self._ensure_ring(tensors)
        self._check_layout([t.shape for t in tensors], [torch.Size(s) for s in layout["shapes"]], "saved LAWA state")
        check(DTYPE_NAMES.get(layout["dtype"]) == self._ring.dtype,
              f"lawa saved state stores {layout['dtype']} but this LAWA stores {_dtype_name(self._ring.dtype)}; "
              "set lawa dtype to match the run that saved the state")
        slots = self._saved_slots(state, steps)
        self._ring.restore(state, steps, slots)
        self._order = list(zip(steps, slots))

    def _saved_slots(self, state: dict, steps: List[int]) -> List[int]:
        """The ring slots the saved snapshots occupied (so sums run in the same order), else 0..n-1."""
        slots = [int(s) for s in state.get("slots", [])][-len(steps):] if steps else []
        if len(slots) != len(steps) or len(set(slots)) != len(slots) or not all(0 <= s < self.config.k for s in slots):
            slots = list(range(len(steps)))
        return slots

    def close(self) -> None:
        """Flush pending writes (disk storage) and stop the writer thread."""
        if self._ring is not None:
            self._ring.close()

    def attach(self, accelerator: Any) -> "LAWA":
        """Make ``accelerator.save_state`` / ``load_state`` carry this engine's state."""
        accelerate_hooks.attach(accelerator, self)
        return self

    def __repr__(self) -> str:
        c = self.config
        return (f"LAWA(k={c.k}, every_n_steps={c.every_n_steps}, storage={c.storage!r}, "
                f"snapshots={self.snapshot_steps}, source={self.source.kind})")


# config.json key of what a LAWA folder averaged: diffusers drops "_"-prefixed keys when it builds the model,
# without the "config attributes ... were passed ... not expected" warning a plain key gives
CONFIG_KEY = "_lawa"
OLD_CONFIG_KEY = "lawa"  # folders written before


def record_in_config(model: nn.Module, record: dict) -> None:
    """Keep ``record`` (what was averaged) in ``model``'s config, written to config.json by save_pretrained."""
    model.register_to_config(**{CONFIG_KEY: record})


def read_record(folder: str | os.PathLike) -> Optional[dict]:
    """What the LAWA model folder ``folder`` averaged (k, every_n_steps, snapshot_steps, ...), or None."""
    import json

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    return config.get(CONFIG_KEY, config.get(OLD_CONFIG_KEY) if isinstance(config.get(OLD_CONFIG_KEY), dict) else None)


@contextlib.contextmanager
def swapped_weights(targets: Sequence[torch.Tensor], fill) -> Iterator[None]:
    """``fill(targets)`` for the duration of the block; the tensors' own values come back after, also on errors."""
    with torch.no_grad():
        saved = [t.detach().clone() for t in targets]
        try:
            fill(targets)
            yield
        finally:
            foreach_copy(targets, saved)


def uninitialized_model(model_cls: Any, model_config: Any, device: Any = "cpu") -> nn.Module:
    """``model_cls.from_config(model_config)`` without random initialisation: no generator is drawn from.

    Parameters are built on the meta device (accelerate's ``init_empty_weights``), then given empty
    storage on ``device``; buffers are built as usual. Fill the parameters before use.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = model_cls.from_config(model_config)
    real: dict = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in real:  # tied parameters stay tied
                    real[id(param)] = nn.Parameter(torch.empty_like(param, device=device), param.requires_grad)
                module._parameters[name] = real[id(param)]
    return model.to(device)
