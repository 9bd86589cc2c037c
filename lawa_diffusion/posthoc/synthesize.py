"""Any average after training: synthesise target averaging profiles from a run's stored EMA snapshots
(``lawa-diffusion synthesize``).

The run's snapshot files (``RUN/ema_snapshots[/<track>]/step-<step>.safetensors``, every track) carry their
step, model config and — when written with it — their track's full definition (``track_def``); older files
take their track's definition from ``RUN/config.yaml``. :func:`plan_syntheses` builds each snapshot's exact
profile once and solves every target's coefficients (:mod:`lawa_diffusion.maths.profile_fit`) before any weight
is read, one :class:`Synthesis` per target. Then ONE pass over the files serves every target
(:mod:`lawa_diffusion.posthoc.one_pass`: the targets × files coefficient matrix times a block of the stacked
snapshots at a time): :func:`synthesize_states` returns the weights, :func:`write_syntheses` streams them into
one diffusers model folder per target with ``synthesis.json`` beside it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.config.tracks import RAW_TRACK
from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.maths import lag
from lawa_diffusion.maths import profile_fit as synthesis
from lawa_diffusion.maths.averaging import check_finite
from lawa_diffusion.posthoc.one_pass import StateBuffers, flat_order, weighted_sums
from lawa_diffusion.posthoc.saved_weights import load_into_assigned, one_model
from lawa_diffusion.posthoc.snapshot_reader import SNAPSHOT_FIX, open_snapshot, snapshot_metadata
from lawa_diffusion.posthoc.streamed_folder import StreamedSafetensors, check_fits, weights_path, write_config
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.utils.files import atomic_dir, atomic_write_json

SIDECAR_NAME = "synthesis.json"
SKIP_BELOW = 1e-12  # coefficients smaller than this (in absolute value) are not read: their files add nothing
NONFINITE_FIX = "a snapshot it reads holds them (did the run diverge?): synthesise at an earlier --step or from other --tracks"


@dataclasses.dataclass(frozen=True)
class SnapshotSource:
    """One stored snapshot: its track's name, its step, its file and its track's definition."""

    track: str
    step: int
    path: str
    definition: lag.EMATrack


@dataclasses.dataclass
class Synthesis:
    """A solved synthesis of ``target`` at ``step`` from ``sources`` (``solution.coefficients[i]`` goes with
    ``sources[i]``); ``model_cls`` / ``model_config``: the diffusers model every snapshot belongs to."""

    run_dir: str
    target: str
    description: str
    step: int
    sources: List[SnapshotSource]
    solution: synthesis.Solution
    model_cls: type
    model_config: dict
    max_residual: Optional[float] = synthesis.DEFAULT_MAX_RESIDUAL

    def used(self) -> List[tuple]:
        """(source, coefficient) of the sources whose coefficient is not negligible, in source order."""
        return [(s, float(x)) for s, x in zip(self.sources, self.solution.coefficients) if abs(x) >= SKIP_BELOW]

    def state_dict(self, dtype: torch.dtype = torch.float32, progress: bool = True,
                   accumulate: Optional[torch.dtype] = None, device: str | torch.device = "cpu") -> Dict[str, torch.Tensor]:
        """``Σ xᵢ θᵢ`` by tensor name in ``dtype`` on the CPU: :func:`synthesize_states` of this synthesis alone."""
        return synthesize_states([self], dtype, progress=progress, accumulate=accumulate, device=device)[0]

    def record(self, output: Optional[str] = None) -> dict:
        """What ``synthesis.json`` and ``synthesize --json`` hold (JSON-ready)."""
        s = self.solution
        return {
            "target": self.target, "target_description": self.description, "step": self.step,
            "residual": s.residual, "max_residual": self.max_residual, "mean_lag": s.mean_lag, "sigma_rel": s.sigma_rel,
            "target_mean_lag": s.target_mean_lag, "target_sigma_rel": s.target_sigma_rel, "coefficient_norm": s.norm,
            "coefficients": [{"track": src.track, "step": src.step, "coefficient": float(x),
                              "path": os.path.abspath(src.path)} for src, x in zip(self.sources, s.coefficients)],
            "run": os.path.abspath(self.run_dir), "output": None if output is None else os.path.abspath(output),
        }


# ----------------------------------------------------------------------------- finding the snapshots
def _metadata(path: str, hashed: bool = True) -> dict:
    return snapshot_metadata(path, SNAPSHOT_FIX, hashed=hashed)  # header and size; checksum (once per file) if hashed


def _config_tracks(run_dir: str) -> Dict[str, lag.EMATrack]:
    """The tracks RUN/config.yaml defines ({} without one)."""
    from lawa_diffusion.maths.track_lags import lag_tracks_of

    raw = runfolder.read_config(run_dir)
    return lag_tracks_of(TrainConfig.from_dict(raw)) if raw else {}


class _Definitions:
    """Track definitions of a run: from each file's ``track_def``, else (read once, when needed) config.yaml."""

    def __init__(self, run_dir: str):
        self.run_dir, self._config, self._error = run_dir, None, None

    def config(self) -> Dict[str, lag.EMATrack]:
        if self._config is None:
            try:
                self._config = _config_tracks(self.run_dir)
            except ValueError as e:
                self._config, self._error = {}, str(e)
        return self._config

    def of_file(self, path: str, track: str, meta: Mapping[str, str]) -> lag.EMATrack:
        if meta.get("track_def"):
            try:
                return lag.EMATrack.from_dict(json.loads(meta["track_def"]))
            except json.JSONDecodeError:
                raise ValueError(f"snapshot {path!r} has track_def metadata that is not JSON; rewrite the file "
                                 "or remove it from the run") from None
        config = self.config()
        why = f" ({self._error})" if self._error else ""
        check(track in config, f"snapshot {path!r} has no track_def metadata and {runfolder.config_path(self.run_dir)!r} "
                               f"does not define track {track!r}{why}; keep the run's config.yaml beside its snapshots")
        return config[track]


def find_snapshots(run_dir: str, tracks: Optional[Sequence[str]] = None, hashed: bool = True) -> List[SnapshotSource]:
    """Every stored snapshot of ``tracks`` (default: all tracks with snapshots) of a run, by step then track, each
    file's header and size checked, and its checksum unless not ``hashed`` (a synthesis then sums it from its one
    read of the file)."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder {run_dir!r} does not exist; pass a folder written by lawa-diffusion train")
    stored = runfolder.snapshot_tracks(run_dir)
    if not stored:
        raise FileNotFoundError(f"run folder {run_dir!r} has no {runfolder.SNAPSHOT_DIR}/[<track>/]step-*.safetensors; "
                                "synthesis needs EMA snapshots stored during training")
    chosen = list(stored) if tracks is None else list(tracks)
    check(bool(chosen), "synthesize --tracks must name at least one track")
    for name in chosen:
        check(name in stored, f"synthesize --tracks names {name!r}, a track with no snapshots in {run_dir!r}; "
                              f"it holds snapshots of {', '.join(stored)}")
    definitions = _Definitions(run_dir)
    found = []
    for name in dict.fromkeys(chosen):
        for step, path in runfolder.list_ema_snapshots(run_dir, name):
            found.append(SnapshotSource(name, step, path, definitions.of_file(path, name, _metadata(path, hashed))))
    return sorted(found, key=lambda s: (s.step, s.track))


def known_tracks(run_dir: str, sources: Sequence[SnapshotSource]) -> Dict[str, lag.EMATrack]:
    """Track definitions by name for targets that name a track: the run's config, then the snapshots' own
    (latest file of each track), and "raw"."""
    try:
        known = dict(_config_tracks(run_dir))
    except ValueError:
        known = {}
    known.update({s.track: s.definition for s in sources})
    known[RAW_TRACK] = lag.raw_weights()
    return known


def shared_model(sources: Sequence[SnapshotSource]):
    """The model class and architecture every snapshot shares (one sentence naming two that differ)."""
    configs = []
    for s in sources:
        text = _metadata(s.path, hashed=False).get("model_config")  # checked by finding or by the pass
        check(text is not None, f"snapshot {s.path!r} has no model_config metadata; synthesise from snapshots "
                                "written by lawa-diffusion")
        configs.append((s.path, json.loads(text)))
    return one_model(configs, "snapshots", "synthesise from the snapshots of one model only")


# ----------------------------------------------------------------------------- planning
def plan_syntheses(run_dir: str, targets: Sequence[str], step: Optional[int] = None,
                   tracks: Optional[Sequence[str]] = None,
                   max_residual: Optional[float] = synthesis.DEFAULT_MAX_RESIDUAL, *,
                   snapshots: Optional[Sequence[SnapshotSource]] = None) -> List[Synthesis]:
    """The coefficients of the stored snapshots (``tracks``, default all; steps ``<= step``, default the last
    stored step) whose combination is closest to each of ``targets`` at ``step`` (ValueError when a residual
    exceeds ``max_residual``; None: never refuse), every target checked before any is solved. Reads only the
    files' metadata, once for all targets.

    snapshots: ``find_snapshots(run_dir, tracks)`` already made (many steps of one run: the files' metadata is
    then not read again to find them)."""
    check(len(targets) >= 1, "synthesize needs at least one target: pass --target or --sigma-rel")
    parsed = [synthesis.parse_target(t) for t in targets]
    if snapshots is None:
        every = find_snapshots(os.fspath(run_dir), tracks, hashed=False)  # the pass checks what it reads
    else:
        every = [s for s in snapshots if tracks is None or s.track in tracks]
    check(bool(every), f"no snapshot of {os.fspath(run_dir)!r} was given to synthesise from")
    steps = sorted({s.step for s in every})
    if step is None:
        step = steps[-1]
    check(isinstance(step, int) and step in steps,
          f"synthesize --step {step} has no stored snapshot in {os.fspath(run_dir)!r} (tracks "
          f"{', '.join(dict.fromkeys(s.track for s in every))}); stored steps run from {steps[0]} to {steps[-1]}, "
          f"e.g. {', '.join(map(str, steps[-3:]))}")
    check(step >= 1, f"synthesize --step must be >= 1, got {step}")
    sources = [s for s in every if s.step <= step]
    cls, arch = shared_model(sources)
    known = known_tracks(os.fspath(run_dir), every)
    for target, p in zip(targets, parsed):
        for name in p.names():
            check(name in known, f"target {target!r} names track {name!r}, which {os.fspath(run_dir)!r} neither "
                                 f"stored nor defines; known tracks: {', '.join(sorted(known))}")
    profiles = synthesis.source_profiles([s.definition for s in sources], [s.step for s in sources], step)
    plans = []
    for target, p in zip(targets, parsed):
        description = p.describe(known)
        solution = synthesis.solve(profiles, synthesis.target_profile(p, step, known), max_residual,
                                   what=f"target {target!r} ({description})")
        plans.append(Synthesis(os.fspath(run_dir), target, description, step, sources, solution, cls, arch,
                               max_residual))
    return plans


def plan_synthesis(run_dir: str, target: str, step: Optional[int] = None, tracks: Optional[Sequence[str]] = None,
                   max_residual: Optional[float] = synthesis.DEFAULT_MAX_RESIDUAL, *,
                   snapshots: Optional[Sequence[SnapshotSource]] = None) -> Synthesis:
    """:func:`plan_syntheses` of one target."""
    return plan_syntheses(run_dir, [target], step, tracks, max_residual, snapshots=snapshots)[0]


# ----------------------------------------------------------------------------- one pass over the snapshots
def coefficient_matrix(plans: Sequence[Synthesis]) -> Tuple[List[str], np.ndarray]:
    """The snapshot files some plan uses (coefficient >= :data:`SKIP_BELOW`), by step then track, and the targets ×
    files matrix of the plans' coefficients (0 where a plan does not use a file)."""
    check(len(plans) >= 1, "a synthesis pass needs at least one planned target")
    used = {}
    for plan in plans:
        for source, _ in plan.used():
            used.setdefault(source.path, (source.step, source.track))
    paths = sorted(used, key=used.get)
    column = {p: i for i, p in enumerate(paths)}
    x = np.zeros((len(plans), len(paths)))
    for row, plan in enumerate(plans):
        for source, value in plan.used():
            x[row, column[source.path]] = value
    return paths, x


def _one_model(plans: Sequence[Synthesis]):
    first = plans[0]
    for plan in plans[1:]:
        check(plan.model_cls is first.model_cls and plan.model_config == first.model_config,
              f"targets {first.target!r} and {plan.target!r} are planned from snapshots of different models; "
              "synthesise the targets of one run together")
    return first.model_cls, first.model_config


def _pass(plans: Sequence[Synthesis], readers: list, accumulate, device, progress: bool):
    paths, x = coefficient_matrix(plans)
    readers.extend(open_snapshot(p, verify=True) for p in paths)  # each checksum summed from the one read
    return weighted_sums(readers, x, device=device, accumulate=accumulate, progress=progress)


def synthesize_states(plans: Sequence[Synthesis], dtype: torch.dtype = torch.float32, progress: bool = True,
                      accumulate: Optional[torch.dtype] = None,
                      device: str | torch.device = "cpu") -> List[Dict[str, torch.Tensor]]:
    """The weights of every plan (``Σ xᵢ θᵢ`` by tensor name, in ``dtype`` on the CPU) from ONE read of the
    snapshot files they use (:func:`one_pass.weighted_sums` on ``device``; float32 arithmetic over the snapshots'
    differences unless ``accumulate`` or ``dtype`` is float64). Memory beyond the results: two blocks of every file.
    The tensors of one plan share no memory with each other."""
    readers: list = []
    try:
        tiles = _pass(plans, readers, accumulate or (torch.float64 if dtype == torch.float64 else torch.float32),
                      device, progress)
        buffers = StateBuffers(flat_order(readers), len(plans), dtype)
        for start, tile in tiles:
            buffers.take(start, tile)
        return buffers.states()
    finally:
        for reader in readers:
            reader.close()


def write_syntheses(plans: Sequence[Synthesis], outs: Sequence[str | os.PathLike], overwrite: bool = False,
                    progress: bool = True, device: str | torch.device = "cpu") -> List[dict]:
    """Write every plan's weights as a diffusers model folder (``from_pretrained`` loads it; fp32) with
    ``synthesis.json`` (its :meth:`Synthesis.record`) beside config.json, from ONE read of the snapshot files: each
    block of the weighted sums goes straight into every target's weights file. Atomic per folder, refusing an
    existing one unless ``overwrite`` (all checked before any work). Returns the records."""
    outs = [os.path.abspath(os.fspath(o)) for o in outs]
    check(len(outs) == len(plans), f"write_syntheses needs one output folder per target: {len(plans)} targets, "
                                   f"{len(outs)} folders")
    check(len(set(outs)) == len(outs), "two targets would be written to one folder; give each its own")
    if not overwrite:
        for out in outs:
            if os.path.exists(out):
                raise FileExistsError(f"output {out!r} already exists; choose another path or pass --overwrite")
    cls, config = _one_model(plans)
    records = [plan.record(out) for plan, out in zip(plans, outs)]
    readers: list = []
    files: List[StreamedSafetensors] = []
    try:
        with contextlib.ExitStack() as stack:
            folders = [stack.enter_context(atomic_dir(out, overwrite=overwrite, kind="synthesize")) for out in outs]
            tiles = _pass(plans, readers, torch.float32, device, progress)
            order = flat_order(readers)
            check_fits(cls, config, order, f"the snapshots of {plans[0].run_dir!r}")
            for folder in folders:
                write_config(folder, cls, config)
                files.append(StreamedSafetensors(weights_path(folder), order, torch.float32))
            for start, tile in tiles:
                block = tile.cpu()
                check_finite({"weights": block}, "the synthesised weights", NONFINITE_FIX)  # nothing is kept if not
                for t, f in enumerate(files):
                    f.write(start, block[t])
            for f in files:
                f.close()
            for folder, record in zip(folders, records):
                atomic_write_json(os.path.join(folder, SIDECAR_NAME), record)
    finally:
        for f in files:
            f.close()
        for reader in readers:
            reader.close()
    return records


def write_synthesis(synthesis: Synthesis, out: str | os.PathLike, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """:func:`write_syntheses` of one plan into ``out``; returns its record."""
    return write_syntheses([synthesis], [out], overwrite=overwrite, progress=progress)[0]


def write_state(synthesis: Synthesis, state: Dict[str, torch.Tensor], out: str | os.PathLike,
                overwrite: bool = False, extra: Optional[dict] = None) -> dict:
    """Write weights already synthesised for ``synthesis`` (:func:`synthesize_states`) as its model folder with
    ``synthesis.json`` (its record and ``extra``); atomic. Returns the record."""
    from accelerate import init_empty_weights

    record = {**synthesis.record(os.fspath(out)), **(extra or {})}
    check_finite(state, "the synthesised weights", NONFINITE_FIX)
    with atomic_dir(out, overwrite=overwrite, kind="synthesize") as tmp:
        with init_empty_weights():
            model = synthesis.model_cls.from_config(synthesis.model_config)
        load_into_assigned(model, {k: v.float() for k, v in state.items()}, synthesis.sources[-1].path)
        model.save_pretrained(tmp)
        atomic_write_json(os.path.join(tmp, SIDECAR_NAME), record)
    return record


def folder_name(target: str) -> str:
    """A folder name for a target's weights: its text with every character but letters, digits, ``.``, ``=``
    and ``-`` replaced by ``_`` (``lawa:k=5,nu=100,over=ema`` -> ``lawa_k=5_nu=100_over=ema``)."""
    return re.sub(r"[^A-Za-z0-9.=\-]", "_", target.strip())
