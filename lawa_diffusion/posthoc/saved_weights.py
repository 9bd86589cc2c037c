"""Weights saved by a run, as the after-training commands read them: checkpoints and model folders
(``find_sources``), their configs and tensors, the one model class they share, and loading weights into it.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from lawa_diffusion.config.base import check
from lawa_diffusion.posthoc.snapshot_reader import load_tensors, snapshot_metadata
from lawa_diffusion.runs.folder import (
    BASE_TRACK,
    check_track,
    checkpoint_step,
    ema_folder,
    is_sharded_snapshot,
    list_checkpoints,
    saved_tracks,
    snapshot_files,
    snapshot_folder,
    snapshot_step,
)
from lawa_diffusion.utils.checksums import load_safetensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
WEIGHTS_BIN_NAME = "diffusion_pytorch_model.bin"
WEIGHTS_FIX = "leave it out (pass the other checkpoints), or restore it from a copy"


@dataclasses.dataclass(frozen=True)
class Source:
    """One set of EMA weights: a diffusers model folder or a snapshot file, and its step (None: unknown)."""

    path: str
    step: Optional[int]

    @property
    def is_snapshot(self) -> bool:
        """A snapshot file, or the folder of a snapshot stored in shards."""
        return os.path.isfile(self.path) or is_sharded_snapshot(self.path)


# ----------------------------------------------------------------------------- finding sources
def _is_model_folder(path: str) -> bool:
    names = (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_BIN_NAME)
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, n)) for n in names)


def _folder_step(folder: str) -> Optional[int]:
    """Step of a model folder: from a ``checkpoint-<step>`` name, else the EMA's optimization_step."""
    for path in (folder, os.path.dirname(folder)):
        if checkpoint_step(path) is not None:
            return checkpoint_step(path)
    step = _read_json(os.path.join(folder, "config.json")).get("optimization_step")
    return int(step) if isinstance(step, int) else None


def _run_folder_sources(path: str, subfolder: str, track: str = BASE_TRACK) -> List[Source]:
    checkpoints = list_checkpoints(path)
    found = [Source(os.path.join(d, subfolder), s) for s, d in checkpoints if _is_model_folder(os.path.join(d, subfolder))]
    if checkpoints and not found:
        raise FileNotFoundError(f"no checkpoint-*/ folder in {path!r} holds a {subfolder!r} model folder; "
                                "pass --subfolder with the folder name the checkpoints use")
    if not found and os.path.isdir(snapshot_folder(path, track)):
        return [Source(p, s) for s, p in snapshot_files(snapshot_folder(path, track)).items()]
    return found


def _sources_in(path: str, subfolder: str, track: str = BASE_TRACK) -> List[Source]:
    if os.path.isfile(path) and path.endswith(".safetensors") or is_sharded_snapshot(path):
        return [Source(path, _snapshot_step(path))]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist; pass a run, checkpoint, model or snapshot folder")
    if _is_model_folder(path):
        return [Source(path, _folder_step(path))]
    if _is_model_folder(os.path.join(path, subfolder)):
        return [Source(os.path.join(path, subfolder), _folder_step(os.path.join(path, subfolder)))]
    tracks = saved_tracks(path)
    if tracks:  # a run folder
        check_track(path, track, "average", tracks)
    found = _run_folder_sources(path, subfolder, track) or [Source(p, s) for s, p in snapshot_files(path).items()]
    if not found:
        raise FileNotFoundError(f"{path!r} holds no diffusers model folder, checkpoint-*/{subfolder} folder or "
                                "step-*.safetensors EMA snapshot; pass a run, checkpoint, model or snapshot folder")
    return found


def find_sources(paths: Sequence[str | os.PathLike], subfolder: Optional[str] = None,
                 track: str = BASE_TRACK) -> List[Source]:
    """All EMA weight sources of ``track`` under ``paths``, oldest first (given order when a step is unknown).

    subfolder: model folder inside checkpoint-<step>/ (default unet_ema, or unet_ema_<track> for another track).
    """
    check(len(paths) >= 1, "average needs at least one DIR")
    subfolder = subfolder or ema_folder(track)
    sources = [s for p in paths for s in _sources_in(os.fspath(p), subfolder, track)]
    if any(s.step is None for s in sources):
        return sources
    by_step: Dict[int, Source] = {}
    for s in sources:
        check(s.step not in by_step, f"step {s.step} appears twice ({by_step.get(s.step, s).path!r} and {s.path!r}); "
                                     "pass each checkpoint once")
        by_step[s.step] = s
    return [by_step[step] for step in sorted(by_step)]


def select_latest(sources: Sequence[Source], k: int, every: int = 1) -> List[Source]:
    """The latest ``k`` sources, every ``every``-th counted back from the newest; oldest first."""
    check(isinstance(k, int) and k >= 1, f"--k must be an integer >= 1, got {k!r}")
    check(isinstance(every, int) and every >= 1, f"--every must be an integer >= 1, got {every!r}")
    chosen = list(sources)[::-1][::every][:k][::-1]
    thinned = f", {len(list(sources)[::every])} of them with --every {every}" if every > 1 else ""
    check(len(chosen) == k, f"--k {k} is larger than the number of checkpoints: {len(sources)} found{thinned}; "
                            f"pass --k {len(chosen)} or fewer, or add checkpoints")
    return chosen


# ----------------------------------------------------------------------------- reading
def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError:
        raise ValueError(f"{path!r} is not valid JSON; restore it from the checkpoint's origin") from None


def _snapshot_metadata(path: str) -> dict:
    return snapshot_metadata(path, WEIGHTS_FIX)


def _snapshot_step(path: str) -> Optional[int]:
    step = snapshot_step(path)
    if step is None:
        step = _snapshot_metadata(path).get("step")
    return int(step) if step is not None else None


def read_config(source: Source) -> dict:
    """The model config of a source (config.json, or the snapshot's ``model_config`` metadata)."""
    if not source.is_snapshot:
        return _read_json(os.path.join(source.path, "config.json"))
    text = _snapshot_metadata(source.path).get("model_config")
    check(text is not None, f"EMA snapshot {source.path!r} has no model_config metadata; "
                            "average snapshots written by lawa-diffusion train, or model folders")
    return json.loads(text)


def read_weights(source: Source) -> Dict[str, torch.Tensor]:
    """The tensors of a source on the CPU, by state-dict name."""
    def load_file(path: str) -> Dict[str, torch.Tensor]:  # header, size and any checksum checked first
        return load_safetensors(path, WEIGHTS_FIX, note_unchecked=source.is_snapshot)

    if source.is_snapshot and os.path.isdir(source.path):
        return load_tensors(source.path)
    if source.is_snapshot or os.path.isfile(os.path.join(source.path, WEIGHTS_NAME)):
        return load_file(source.path if source.is_snapshot else os.path.join(source.path, WEIGHTS_NAME))
    index = os.path.join(source.path, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        shards = sorted(set(_read_json(index)["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(os.path.join(source.path, shard)).items()}
    return torch.load(os.path.join(source.path, WEIGHTS_BIN_NAME), map_location="cpu", weights_only=True)


UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")  # the classes a config without _class_name may be


def inferred_class_name(config: dict) -> str:
    """The UNet class a config without ``_class_name`` belongs to (the ``plain_config`` that EMA snapshots carry):
    the one whose constructor takes every key of ``config`` with the fewest arguments left over (a model's config
    holds its constructor arguments); UNet2DModel when none takes them all."""
    import diffusers

    keys = {k for k in config if not str(k).startswith("_")}
    fits = []
    for name in UNET_CLASSES:
        params = set(inspect.signature(getattr(diffusers, name).__init__).parameters) - {"self"}
        if keys <= params:
            fits.append((len(params - keys), name))
    return min(fits)[1] if fits else UNET_CLASSES[0]


def model_class(config: dict):
    """The diffusers model class named by ``_class_name`` (when absent: :func:`inferred_class_name`)."""
    import diffusers

    name = config.get("_class_name") or inferred_class_name(config)
    cls = getattr(diffusers, name, None)
    check(cls is not None and hasattr(cls, "from_config"),
          f"model config names class {name!r}, which diffusers does not provide; average diffusers model checkpoints")
    return cls


def architecture(config: dict) -> dict:
    """The constructor arguments of the model in ``config`` (EMA fields and ``_`` keys dropped), JSON-normalised."""
    params = inspect.signature(model_class(config).__init__).parameters
    return json.loads(json.dumps({k: v for k, v in config.items() if k in params and k != "self"}))


def one_model(configs: Sequence[Tuple[str, dict]], kind: str, fix: str) -> Tuple[type, dict]:
    """The model class and architecture that every ``(path, config)`` shares (the first is the reference); one
    sentence naming two ``kind`` that differ, ending with ``fix``."""
    (reference, first), others = configs[0], configs[1:]
    cls, arch = model_class(first), architecture(first)
    for path, config in others:
        other = architecture(config)
        differ = sorted(k for k in set(arch) | set(other) if arch.get(k) != other.get(k))
        check(model_class(config) is cls and not differ,
              f"{kind} come from different model configs: {path!r} and {reference!r} differ in "
              f"{', '.join(differ) or '_class_name'}; {fix}")
    return cls, arch


def shared_model(sources: Sequence[Source]) -> Tuple[type, dict]:
    """The model class and config every source shares; one clear error when two differ."""
    ordered = [sources[-1], *sources[:-1]]
    return one_model([(s.path, read_config(s)) for s in ordered], "checkpoints", "average checkpoints of one model only")


# ----------------------------------------------------------------------------- averaging
def _weight_lists(sources: Sequence[Source], names: List[str], others: Dict[str, torch.Tensor]) -> Iterator[list]:
    """Yield each source's floating tensors in ``names`` order (filled from the first); keep the newest others."""
    keys = None
    for s in sources:
        weights = read_weights(s)
        if keys is None:
            keys = set(weights)
            names.extend(n for n, t in weights.items() if t.is_floating_point())
        odd = sorted(keys.symmetric_difference(weights))
        if odd:
            raise ValueError(f"{s.path!r} holds other tensors than {sources[0].path!r} (e.g. {odd[0]!r}); "
                             "average checkpoints of one model only")
        others.clear()
        others.update({n: t for n, t in weights.items() if not t.is_floating_point()})
        yield [weights[n] for n in names]


def load_into(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(state)`` with a one-sentence error when the names do not match."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"the weights of {where} do not fit the model their config describes ({first}); "
                         "use checkpoints written by diffusers save_pretrained") from None


def load_into_assigned(model: torch.nn.Module, state: Dict[str, torch.Tensor], where: str) -> None:
    """``load_into`` that takes the tensors themselves (no second copy of the weights)."""
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError:
        load_into(model.to_empty(device="cpu"), state, where)
