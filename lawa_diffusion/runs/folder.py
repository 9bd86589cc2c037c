"""The run folder: the one place that names, lists, prunes and truncates what a training run writes.

    RUN/config.yaml                          the resolved training config
    RUN/metrics.jsonl                        one row per (evaluation step, variant)
    RUN/checkpoint-<step>/                   accelerate ``save_state`` (+ unet_ema[_<track>]/,
                                             unet_lawa[_<window>]/, lawa_state_<window>.safetensors)
    RUN/ema_snapshots/step-<step>.safetensors  EMA weights at LAWA snapshot steps (save_ema_snapshots, fp16)
                                             and every posthoc.every_n_steps (posthoc.dtype); optional
    RUN/ema_snapshots/<track>/step-<step>.safetensors  the same for the other EMA tracks (engine.posthoc_snapshots)
    RUN/ema_snapshots/<track>/step-<step>/   a snapshot stored in shards by every process (FSDP2, ZeRO-3):
                                             DCP's shard-*.safetensors files and snapshot.json
    RUN/lawa_snapshots/                      LAWA windows with disk storage and no snapshot_dir
    RUN/report/, RUN/sweep[-<track>]/        outputs of ``lawa-diffusion report`` / ``sweep``
    RUN/posthoc/hindsight.{jsonl,json}       output of ``lawa-diffusion hindsight`` (search in hindsight)

Resuming at step s removes what lies past s (metrics rows, snapshot files, later checkpoints), so the
resumed run continues them without duplicates or gaps.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

from lawa_diffusion.config.base import check, read_yaml
from lawa_diffusion.config.tracks import BASE_TRACK, BASE_WINDOW
from lawa_diffusion.utils.files import atomic_write_text, read_jsonl, read_jsonl_rows
from lawa_diffusion.utils.output import warn

CONFIG_NAME = "config.yaml"
PLUGIN_EVAL_NAME = "lawa_eval.yaml"  # what the launch plugin evaluated with (a script's run has no config.yaml)
METRICS_NAME = "metrics.jsonl"
SNAPSHOT_DIR = "ema_snapshots"
REPORT_DIR = "report"
SWEEP_DIR = "sweep"
POSTHOC_DIR = "posthoc"
HINDSIGHT_NAME = "hindsight.jsonl"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SNAPSHOT_RE = re.compile(r"^step-(\d+)(\.safetensors)?$")  # a file, or the folder of a sharded snapshot
SHARDED_SNAPSHOT_RECORD = "snapshot.json"  # in a sharded snapshot's folder: step, track, model, shapes, shard files
_LEFTOVER_RE = re.compile(r"^\.checkpoint-(\d+)\.(tmp|deleting)$")


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, CONFIG_NAME)


def metrics_path(run_dir: str) -> str:
    return os.path.join(run_dir, METRICS_NAME)


def sweep_dir(run_dir: str, track: str = BASE_TRACK) -> str:
    return os.path.join(run_dir, SWEEP_DIR if track == BASE_TRACK else f"{SWEEP_DIR}-{track}")


def hindsight_dir(run_dir: str) -> str:
    """Where ``lawa-diffusion posthoc`` writes its search in hindsight by default."""
    return os.path.join(run_dir, POSTHOC_DIR)


def hindsight_path(run_dir: str) -> str:
    return os.path.join(hindsight_dir(run_dir), HINDSIGHT_NAME)


def report_dir(run_dirs: Sequence[str]) -> str:
    """RUN/report for one run; the runs' common parent folder/report for several."""
    paths = [os.path.abspath(os.fspath(p)) for p in run_dirs]
    if len(paths) == 1:
        return os.path.join(paths[0], REPORT_DIR)
    return os.path.join(os.path.commonpath([os.path.dirname(p) for p in paths]), REPORT_DIR)


def read_config(run_dir: str) -> dict:
    """The run's config.yaml as a mapping; for a plugin run, its lawa_eval.yaml; {} when it has neither."""
    for name in (CONFIG_NAME, PLUGIN_EVAL_NAME):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return read_yaml(path)
    return {}


def write_plugin_eval(run_dir: str, eval_settings: dict, model_config: dict) -> str:
    """Record the launch plugin's evaluation settings and the model's config (with ``_class_name``) in
    RUN/lawa_eval.yaml, the ``eval`` and ``model`` sections after-training commands read; returns its path."""
    import yaml

    path = os.path.join(run_dir, PLUGIN_EVAL_NAME)
    atomic_write_text(path, yaml.safe_dump({"eval": dict(eval_settings), "model": dict(model_config)},
                                           sort_keys=True))
    return path


# ----------------------------------------------------------------------------- metrics rows
def _step_of(row: dict) -> Optional[int]:
    step = row.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def metric_steps(run_dir: str) -> List[int]:
    """The evaluation steps recorded in the run's metrics.jsonl, ascending (empty without the file); a row whose
    step is not an integer is left out with one warning (file and line)."""
    path = metrics_path(run_dir)
    if not os.path.isfile(path):
        return []
    steps = set()
    for line, row in read_jsonl_rows(path):
        if _step_of(row) is None:
            warn(f"{path}: line {line} has step {row.get('step')!r}, not an integer; the row is left out")
        else:
            steps.add(row["step"])
    return sorted(steps)


def truncate_metrics(path: str, step: int) -> None:
    """Keep only the rows of ``path`` with ``step <= step`` (atomic rewrite; nothing to do when none is later);
    a row without an integer step is kept."""
    if not os.path.isfile(path):
        return
    rows = read_jsonl(path)
    kept = [r for r in rows if _step_of(r) is None or r["step"] <= step]
    with open(path, encoding="utf-8") as f:
        torn = not f.read().endswith("\n") and os.path.getsize(path) > 0
    if len(kept) != len(rows) or torn:
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"checkpoint-{step}")


def checkpoint_step(path: str) -> Optional[int]:
    """The step of a ``checkpoint-<step>`` folder name (None for any other name)."""
    m = CHECKPOINT_RE.match(os.path.basename(os.fspath(path).rstrip(os.sep)))
    return int(m.group(1)) if m else None


def list_checkpoints(run_dir: str) -> List[Tuple[int, str]]:
    """Complete ``checkpoint-<step>`` folders in ``run_dir``, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    found = [(checkpoint_step(name), os.path.join(run_dir, name)) for name in os.listdir(run_dir)]
    return sorted((s, p) for s, p in found if s is not None and os.path.isdir(p))


def latest_checkpoint(run_dir: str) -> Optional[str]:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def last_good_checkpoint_note(run_dir: str) -> str:
    """What a run stopped by an error of the operating system can continue from: its newest complete checkpoint
    (a checkpoint is renamed into place only when complete, so every listed one is whole)."""
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return f"the run has no complete checkpoint yet, so it starts again from step 0 (run folder {run_dir!r})"
    return (f"the last good checkpoint is {latest!r}: once the cause is fixed, continue from it with "
            "--resume latest")


def verify_checkpoint(checkpoint: str) -> None:
    """Before resuming from ``checkpoint`` (and before anything past it is removed): every safetensors file in it
    has a readable header, its full size and, where it carries one, its checksum; one sentence otherwise."""
    from lawa_diffusion.utils.checksums import verified_metadata

    for path in sorted(glob.glob(os.path.join(glob.escape(checkpoint), "**", "*.safetensors"), recursive=True)):
        verified_metadata(path, "resume from the checkpoint before this one (pass --resume with its path)",
                          note_unchecked=False)


def written_by_train(folder: str) -> bool:
    """Whether ``folder`` is a run folder written by ``lawa-diffusion train`` before run folders were marked: its
    config.yaml names it as its output_dir."""
    path = config_path(folder)
    if not os.path.isfile(path):
        return False
    try:
        recorded = read_yaml(path).get("output_dir")
    except (OSError, ValueError):
        return False
    return isinstance(recorded, str) and os.path.realpath(recorded) == os.path.realpath(folder)


def stores_nothing_warning(every_n_steps: int, last_step: Optional[int | str], option: str) -> Optional[str]:
    """The warning for a snapshot store that will store nothing: ``every_n_steps`` > 0 but larger than the last
    step (an integer, or a script's option text); None when it stores something or the last step is unknown."""
    if isinstance(last_step, str):
        last_step = int(last_step) if last_step.strip().isdigit() else None
    if not every_n_steps or last_step is None or last_step >= every_n_steps:
        return None
    return (f"{option} {every_n_steps} stores no snapshot: training runs to step {last_step}, before the first "
            f"multiple of {every_n_steps}; lower {option} to store snapshots, or set it to 0 to store none")


def _delete_folder(path: str) -> None:
    """Rename out of the ``checkpoint-<step>`` pattern, then delete: a crash mid-delete never leaves a
    partial folder that looks complete."""
    trash = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".deleting")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and temp folders of interrupted saves."""
    found = list_checkpoints(run_dir)
    newest = found[-1][0] if found else None
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        m = _LEFTOVER_RE.match(name)
        if m and (m.group(2) == "deleting" or newest is None or int(m.group(1)) < newest):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    for _, path in found[: max(0, len(found) - keep)]:
        _delete_folder(path)


def ema_folder(track: str = BASE_TRACK) -> str:
    """Checkpoint subfolder of an EMA track's weights (diffusers EMAModel.save_pretrained)."""
    return "unet_ema" if track == BASE_TRACK else f"unet_ema_{track}"


def lawa_folder(window: str = BASE_WINDOW) -> str:
    """Checkpoint subfolder of a LAWA window's averaged weights."""
    return "unet_lawa" if window == BASE_WINDOW else f"unet_lawa_{window}"


# ----------------------------------------------------------------------------- EMA snapshot files
def snapshot_folder(run_dir: str, track: str = BASE_TRACK) -> str:
    """EMA snapshots of ``track``: ema_snapshots/ for the base EMA "ema", ema_snapshots/<track>/ for the others."""
    folder = os.path.join(run_dir, SNAPSHOT_DIR)
    return folder if track == BASE_TRACK else os.path.join(folder, track)


def snapshot_path(run_dir: str, step: int, track: str = BASE_TRACK, sharded: bool = False) -> str:
    """``step-<step>.safetensors``, or, for a snapshot stored in shards by several processes, the folder
    ``step-<step>/`` (DCP's shard files and :data:`SHARDED_SNAPSHOT_RECORD`)."""
    name = f"step-{step:09d}"
    return os.path.join(snapshot_folder(run_dir, track), name if sharded else name + ".safetensors")


def is_sharded_snapshot(path: str) -> bool:
    return os.path.isfile(os.path.join(path, SHARDED_SNAPSHOT_RECORD))


def snapshot_step(path: str) -> Optional[int]:
    """The step of a ``step-<step>.safetensors`` file or ``step-<step>/`` folder name (None for any other name)."""
    m = SNAPSHOT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(m.group(1)) if m else None


def snapshot_files(folder: str) -> Dict[int, str]:
    """EMA snapshots in ``folder`` by step: ``step-<step>.safetensors`` files and sharded snapshot folders
    ``step-<step>/`` (complete ones: with their record)."""
    paths = glob.glob(os.path.join(glob.escape(folder), "step-*"))
    return {s: p for p in paths if (s := snapshot_step(p)) is not None
            and (os.path.isfile(p) if p.endswith(".safetensors") else is_sharded_snapshot(p))}


def remove_snapshot(path: str) -> None:
    """Delete a stored snapshot: its file, or its sharded folder."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def list_ema_snapshots(run_dir: str, track: str = BASE_TRACK) -> List[Tuple[int, str]]:
    """(step, path) of the EMA snapshot files of one track of a run, oldest first."""
    return sorted(snapshot_files(snapshot_folder(run_dir, track)).items())


def snapshot_tracks(run_dir: str) -> List[str]:
    """The tracks whose EMA snapshots the run saved ("ema" first)."""
    folder = os.path.join(run_dir, SNAPSHOT_DIR)
    others = sorted(n for n in os.listdir(folder) if os.path.isdir(os.path.join(folder, n))) if os.path.isdir(folder) else []
    return [t for t in [BASE_TRACK] + others if list_ema_snapshots(run_dir, t)]


def saved_tracks(run_dir: str) -> List[str]:
    """The EMA tracks a run folder holds: in its checkpoints (unet_ema[_<track>]/) or as EMA snapshots."""
    found = set(snapshot_tracks(run_dir))
    for _, checkpoint in list_checkpoints(run_dir):
        found.update(n[len("unet_ema_"):] or BASE_TRACK for n in os.listdir(checkpoint)
                     if n == "unet_ema" or n.startswith("unet_ema_"))
    return sorted(found, key=lambda t: (t != BASE_TRACK, t))


def check_track(run_dir: str, track: str, command: str, tracks: Optional[List[str]] = None) -> None:
    """One sentence naming the tracks that were saved when ``track`` is not one of them."""
    tracks = saved_tracks(run_dir) if tracks is None else tracks
    check(track in tracks, f"{command} --track {track!r} names a track that {run_dir!r} did not save; it holds "
                           f"{', '.join(tracks) or 'no track'}")


# ----------------------------------------------------------------------------- resuming
def truncate_after(run_dir: str, step: int) -> List[str]:
    """Remove what lies past ``step``: metrics rows, EMA snapshot files and later checkpoints (resumed
    from an older checkpoint, they describe steps about to be redone); returns the removed checkpoints."""
    truncate_metrics(metrics_path(run_dir), step)
    for track in snapshot_tracks(run_dir):
        for snap_step, path in list_ema_snapshots(run_dir, track):
            if snap_step > step:
                remove_snapshot(path)
    later = [path for s, path in list_checkpoints(run_dir) if s > step]
    for path in later:
        shutil.rmtree(path)
    return later


def script_option(script_args: Sequence[str], name: str) -> Optional[str]:
    """The value a training script was given for ``--name`` (``--name V`` or ``--name=V``; None when absent)."""
    flag = f"--{name}"
    for i, arg in enumerate(script_args):
        if arg == flag and i + 1 < len(script_args):
            return script_args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None
