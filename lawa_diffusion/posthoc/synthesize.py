"""Any average after training: synthesise a target averaging profile from a run's stored EMA snapshots
(``lawa-diffusion synthesize``).

The run's snapshot files (``RUN/ema_snapshots[/<track>]/step-<step>.safetensors``, every track) carry their
step, model config and — when written with it — their track's full definition (``track_def``); older files
take their track's definition from ``RUN/config.yaml``. :func:`plan_synthesis` builds each snapshot's exact
profile, solves for the coefficients (:mod:`lawa_diffusion.maths.profile_fit`) and returns a :class:`Synthesis`;
:meth:`Synthesis.state_dict` streams the weighted sum one snapshot file at a time into a float64
accumulator; :func:`write_synthesis` writes it as a diffusers model folder with ``synthesis.json`` beside it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.config.tracks import RAW_TRACK
from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.maths import lag
from lawa_diffusion.maths import profile_fit as synthesis
from lawa_diffusion.posthoc.saved_weights import load_into_assigned, one_model
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.maths.averaging import check_finite
from lawa_diffusion.utils.checksums import verified_metadata
from lawa_diffusion.utils.files import atomic_dir, atomic_write_json

SIDECAR_NAME = "synthesis.json"
SKIP_BELOW = 1e-12  # coefficients smaller than this (in absolute value) are not read: their files add nothing
BLOCK_ELEMENTS = 1 << 15  # tensors summed together across the files: 256 KiB of float64 accumulator (fastest of 2^13..2^20 measured)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SNAPSHOT_FIX = "delete it and synthesise from the other snapshots, or restore it from a copy"


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
                   accumulate: torch.dtype = torch.float64) -> Dict[str, torch.Tensor]:
        """``Σ xᵢ θᵢ`` by tensor name, summed in ``accumulate`` (float64) and returned in ``dtype``.

        Streams: a block of tensors at a time (about :data:`BLOCK_ELEMENTS` elements, or one larger tensor; its
        accumulator stays in the CPU cache), each file's copy of the block read in turn into one reused buffer
        (in one read when the block's tensors lie together in the file); a finished block is converted to
        ``dtype`` at once. Memory beyond the result: one block's accumulator and one block of one file."""
        from tqdm.auto import tqdm

        used = self.used()
        layouts = [tensor_layout(s.path) for s, _ in used]
        first = layouts[0]
        for (source, _), layout in zip(used, layouts):
            odd = sorted(set(first).symmetric_difference(layout)) or sorted(
                n for n in first if first[n][1] != layout[n][1])
            if odd:
                raise ValueError(f"snapshot {source.path!r} holds other tensors than {used[0][0].path!r} (e.g. "
                                 f"{odd[0]!r}); synthesise from snapshots of one model only")
        blocks, starts = _blocks(first)
        block_bytes = [[sum(layout[n][3] for n in block) for layout in layouts] for block in blocks]
        largest = max((b for row in block_bytes for b in row), default=0)
        buffer = torch.empty(largest, dtype=torch.uint8)
        # half-precision snapshots are widened through float32 first: a vectorised copy, then one add
        staging = torch.empty(largest // 2 + 1, dtype=torch.float32)
        # one accumulator for every block, allocated once: freeing one per block would leave holes in the heap
        accumulator = torch.empty(max((sum(math.prod(first[n][1]) for n in b) for b in blocks), default=0),
                                  dtype=accumulate)
        out: Dict[str, torch.Tensor] = {}
        with tqdm(total=sum(map(sum, block_bytes)), desc="synthesize", unit="B", unit_scale=True,
                  disable=not progress, leave=False, file=sys.stderr, dynamic_ncols=True) as bar:
            for block, sizes in zip(blocks, block_bytes):
                acc = accumulator[:sum(math.prod(first[n][1]) for n in block)].zero_()
                for (source, x), layout, nbytes in zip(used, layouts, sizes):
                    fd = os.open(source.path, os.O_RDONLY)
                    try:
                        if _contiguous(layout, block):  # the block's bytes in one read, added in one go
                            chunk = buffer[:nbytes]
                            _read_into(fd, chunk, layout[block[0]][2], source.path)
                            _add(acc, chunk.view(layout[block[0]][0]), x, staging)
                        else:
                            for n in block:
                                kind, shape, offset, size = layout[n]
                                chunk = buffer[:size]
                                _read_into(fd, chunk, offset, source.path)
                                start = starts[n]
                                _add(acc[start:start + chunk.numel() // kind.itemsize], chunk.view(kind), x, staging)
                    finally:
                        os.close(fd)
                    bar.update(nbytes)
                for n in block:
                    shape = first[n][1]
                    out[n] = acc[starts[n]:starts[n] + math.prod(shape)].view(shape).to(dtype, copy=True)
        return out

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


# ----------------------------------------------------------------------------- reading snapshot files
def tensor_layout(path: str) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...], int, int]]:
    """name -> (dtype, shape, byte offset in the file, byte count) of a safetensors file's float tensors, from
    its header alone (8-byte little-endian header size, then the JSON header, then the data)."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        try:
            header = json.loads(f.read(size)) if 0 < size < 1 << 27 else None
        except ValueError:
            header = None
    check(isinstance(header, dict), f"snapshot {path!r} is not a safetensors file; remove it from the run")
    header.pop("__metadata__", None)
    layout = {}
    for name, info in header.items():
        kind = _DTYPES.get(info.get("dtype"))
        check(kind is not None, f"snapshot {path!r} tensor {name!r} has dtype {info.get('dtype')!r}, not a float; "
                                "synthesise from EMA snapshot files only")
        begin, end = info["data_offsets"]
        shape = tuple(int(d) for d in info["shape"])
        check(end - begin == math.prod(shape) * kind.itemsize,
              f"snapshot {path!r} tensor {name!r} has {end - begin} bytes for shape {shape}; the file is damaged")
        layout[name] = (kind, shape, 8 + size + begin, end - begin)
    return layout


def _blocks(layout: Dict[str, tuple]) -> Tuple[List[List[str]], Dict[str, int]]:
    """The tensors in file order, cut into blocks of at least :data:`BLOCK_ELEMENTS` elements (the last may be
    smaller), and each tensor's element offset in its block."""
    blocks, block, size, starts = [], [], 0, {}
    for n in sorted(layout, key=lambda n: layout[n][2]):  # file order: reads run forward through each file
        starts[n] = size
        block.append(n)
        size += math.prod(layout[n][1])
        if size >= BLOCK_ELEMENTS:
            blocks.append(block)
            block, size = [], 0
    return blocks + ([block] if block else []), starts


def _contiguous(layout: Dict[str, tuple], block: Sequence[str]) -> bool:
    """Whether ``block``'s tensors lie one after the other in the file, in this order, all of one dtype."""
    kind = layout[block[0]][0]
    return all(layout[a][2] + layout[a][3] == layout[b][2] and layout[b][0] == kind for a, b in zip(block, block[1:]))


def _add(acc: torch.Tensor, values: torch.Tensor, x: float, staging: torch.Tensor) -> None:
    """``acc += x · values`` (flat), half precision widened through ``staging`` (float32) first."""
    if values.element_size() < 4:
        values = staging[: values.numel()].copy_(values)
    acc.add_(values, alpha=x)


def _read_into(fd: int, buffer: torch.Tensor, offset: int, path: str) -> None:
    """Fill the uint8 tensor ``buffer`` with the bytes of ``fd`` from ``offset`` (no other copy)."""
    view = memoryview(buffer.numpy()) if buffer.numel() else memoryview(b"")
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        check(got > 0, f"snapshot {path!r} ends before its tensors do; the file is truncated")
        done += got


# ----------------------------------------------------------------------------- finding the snapshots
def _metadata(path: str) -> dict:
    return verified_metadata(path, SNAPSHOT_FIX)  # header, size and checksum checked (once per file)


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


def find_snapshots(run_dir: str, tracks: Optional[Sequence[str]] = None) -> List[SnapshotSource]:
    """Every stored snapshot of ``tracks`` (default: all tracks with snapshots) of a run, by step then track."""
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
            found.append(SnapshotSource(name, step, path, definitions.of_file(path, name, _metadata(path))))
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
        text = _metadata(s.path).get("model_config")
        check(text is not None, f"snapshot {s.path!r} has no model_config metadata; synthesise from snapshots "
                                "written by lawa-diffusion")
        configs.append((s.path, json.loads(text)))
    return one_model(configs, "snapshots", "synthesise from the snapshots of one model only")


# ----------------------------------------------------------------------------- planning
def plan_synthesis(run_dir: str, target: str, step: Optional[int] = None, tracks: Optional[Sequence[str]] = None,
                   max_residual: Optional[float] = synthesis.DEFAULT_MAX_RESIDUAL, *,
                   snapshots: Optional[Sequence[SnapshotSource]] = None) -> Synthesis:
    """The coefficients of the stored snapshots (``tracks``, default all; steps ``<= step``, default the last
    stored step) whose combination is closest to ``target`` at ``step`` (ValueError when the residual exceeds
    ``max_residual``; None: never refuse). Reads only the files' metadata.

    snapshots: ``find_snapshots(run_dir, tracks)`` already made (many targets or steps of one run: the files'
    metadata is then not read again to find them)."""
    parsed = synthesis.parse_target(target)
    if snapshots is None:
        every = find_snapshots(os.fspath(run_dir), tracks)
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
    for name in parsed.names():
        check(name in known, f"target {target!r} names track {name!r}, which {os.fspath(run_dir)!r} neither stored nor "
                             f"defines; known tracks: {', '.join(sorted(known))}")
    description = parsed.describe(known)
    p = synthesis.target_profile(parsed, step, known)
    profiles = synthesis.source_profiles([s.definition for s in sources], [s.step for s in sources], step)
    solution = synthesis.solve(profiles, p, max_residual, what=f"target {target!r} ({description})")
    return Synthesis(os.fspath(run_dir), target, description, step, sources, solution, cls, arch, max_residual)


def write_synthesis(synthesis: Synthesis, out: str | os.PathLike, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Write the synthesised weights as a diffusers model folder ``out`` (``from_pretrained`` loads it; fp32) with
    ``synthesis.json`` (its :meth:`Synthesis.record`) beside config.json; atomic, refusing an existing ``out``
    unless ``overwrite``. Returns the record."""
    from accelerate import init_empty_weights

    record = synthesis.record(os.fspath(out))
    with atomic_dir(out, overwrite=overwrite, kind="synthesize") as tmp:
        state = synthesis.state_dict(torch.float32, progress=progress)
        check_finite(state, "the synthesised weights", "a snapshot it reads holds them (did the run diverge?): "
                                                       "synthesise at an earlier --step or from other --tracks")
        with init_empty_weights():
            model = synthesis.model_cls.from_config(synthesis.model_config)
        load_into_assigned(model, state, synthesis.sources[-1].path)
        model.save_pretrained(tmp)
        atomic_write_json(os.path.join(tmp, SIDECAR_NAME), record)
    return record
