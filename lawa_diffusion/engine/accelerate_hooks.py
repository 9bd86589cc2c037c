"""accelerate integration: LAWA state inside ``save_state`` / ``load_state`` checkpoints.

Files in a checkpoint folder, per engine ``name``:
  lawa_state_<name>.safetensors   snapshot rows ("snapshots") + the JSON state in the metadata
  lawa_state_<name>.rank<r>.safetensors   the same for process r's shard of a sharded EMA (FSDP / DTensor)
  lawa_snapshots_<name>/          disk storage only: hard links to the snapshot files (no bytes
                                  copied; pruning the originals later leaves these valid)
Also: ``save_checkpoint`` writes a whole ``save_state`` folder atomically (listing and pruning
checkpoint folders is :mod:`lawa_diffusion.runs.folder`'s).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import torch

from lawa_diffusion.utils.checksums import verified_metadata
from lawa_diffusion.utils.files import atomic_save_safetensors, link_or_copy_atomic, named_os_error
from lawa_diffusion.utils.output import process_rank, warn


def state_file(folder: str, name: str, rank: Optional[int] = None) -> str:
    shard = "" if rank is None else f".rank{rank}"
    return os.path.join(folder, f"lawa_state_{name}{shard}.safetensors")


def engine_state_file(lawa: Any, folder: str) -> str:
    """This process's state file of ``lawa``: one per process over a sharded source, else one in all."""
    return state_file(folder, lawa.name, process_rank() if lawa.source.sharded() else None)


def save_engine_state(lawa: Any, folder: str) -> None:
    """Write ``lawa``'s state into ``folder`` (call on the process that holds the snapshots; on every
    process over a sharded source)."""
    state = lawa.state_dict()
    tensors = {}
    snapshots = state.pop("snapshots", None)
    if snapshots is not None and snapshots.numel() > 0:
        tensors["snapshots"] = snapshots
    if "files" in state:
        link_dir = os.path.join(folder, f"lawa_snapshots_{lawa.name}")
        os.makedirs(link_dir, exist_ok=True)
        names = []
        for path in state["files"]:
            link_or_copy_atomic(path, os.path.join(link_dir, os.path.basename(path)))
            names.append(os.path.basename(path))
        state["files"] = [os.path.join(f"lawa_snapshots_{lawa.name}", n) for n in names]
    if not tensors:
        tensors["empty"] = torch.zeros(0)
    atomic_save_safetensors(engine_state_file(lawa, folder), tensors, metadata={"lawa_state": json.dumps(state)})


def load_engine_state(lawa: Any, folder: str) -> bool:
    """Load ``lawa``'s state from ``folder``; False (with a warning) when the folder has none."""
    path = engine_state_file(lawa, folder)
    if not os.path.isfile(path) and os.path.isfile(state_file(folder, lawa.name)):
        path = state_file(folder, lawa.name)  # an unsharded state: its layout check says what differs
    if not os.path.isfile(path):
        warn(f"lawa: checkpoint {folder!r} holds no LAWA state for {lawa.name!r}; starting an empty window")
        return False
    from safetensors import safe_open

    verified_metadata(path, "resume from the checkpoint before this one")
    with safe_open(path, framework="pt") as f:
        state = json.loads(f.metadata()["lawa_state"])
        if "snapshots" in f.keys():
            state["snapshots"] = f.get_tensor("snapshots")
        elif "layout" in state and "files" not in state:
            state["snapshots"] = torch.empty(0)
    if "files" in state:
        state["files"] = [os.path.join(folder, p) for p in state["files"]]
    lawa.load_state_dict(state)
    return True


def attach(accelerator: Any, lawa: Any) -> Any:
    """Register save/load pre-hooks so ``accelerator.save_state`` / ``load_state`` carry ``lawa``.

    Works when ``save_state`` is called on the main process only (as diffusers scripts do): the
    state is written by whichever process holds the snapshots and is the main one. Over a sharded
    source every process writes its own shard's state, so ``save_state`` must run on every process.
    """
    engines = accelerator.__dict__.setdefault("_lawa_engines", {})
    if lawa.name in engines and engines[lawa.name] is not lawa:
        raise ValueError(f"lawa engine name {lawa.name!r} is already attached to this accelerator; "
                         "give each LAWA a distinct name=")
    if lawa.name in engines:
        return lawa
    engines[lawa.name] = lawa

    def save_hook(models, weights, output_dir):
        if (accelerator.is_main_process or lawa.source.sharded()) and lawa.holds_snapshots:
            save_engine_state(lawa, output_dir)

    def load_hook(models, input_dir):
        load_engine_state(lawa, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
    return lawa


def save_checkpoint(accelerator: Any, output_dir: str) -> str:
    """``accelerator.save_state`` into a temp folder, then one rename: a crash never leaves a
    folder that looks complete. Call on every process."""
    output_dir = os.path.abspath(output_dir)
    tmp = os.path.join(os.path.dirname(output_dir), "." + os.path.basename(output_dir) + ".tmp")
    if accelerator.is_main_process and os.path.exists(tmp):
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
    except Exception as e:  # a full disk or a permission: the partial folder goes, the error names the checkpoint
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        error = named_os_error(e, output_dir)
        if error is e:
            raise
        raise error from e
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
        fd = os.open(os.path.dirname(output_dir), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    accelerator.wait_for_everyone()
    return output_dir
