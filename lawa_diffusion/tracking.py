"""FID tracking during training: raw / EMA / LAWA weights on the same noise, rows in metrics.jsonl.

Also the run-folder bookkeeping that resuming needs: metrics rows and EMA snapshot files past the
resumed step are removed, so that a resumed run continues them without duplicates or gaps.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any, Callable, Iterator, Optional

import torch

from lawa_diffusion.files import append_line, atomic_save_safetensors, atomic_write_text, read_jsonl

METRICS_NAME = "metrics.jsonl"
SNAPSHOT_DIR = "ema_snapshots"
SNAPSHOT_RE = re.compile(r"^step-(\d{9,})\.safetensors$")


# ----------------------------------------------------------------------------- run-folder files
def truncate_metrics(path: str, step: int) -> None:
    """Keep only the rows of ``path`` with ``step <= step`` (atomic rewrite; nothing to do when none is later)."""
    if not os.path.isfile(path):
        return
    rows = read_jsonl(path)
    kept = [r for r in rows if int(r.get("step", 0)) <= step]
    with open(path, encoding="utf-8") as f:
        torn = not f.read().endswith("\n") and os.path.getsize(path) > 0
    if len(kept) != len(rows) or torn:
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def snapshot_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, SNAPSHOT_DIR, f"step-{step:09d}.safetensors")


def list_ema_snapshots(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the EMA snapshot files of a run, oldest first."""
    folder = os.path.join(run_dir, SNAPSHOT_DIR)
    if not os.path.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, n)) for n in os.listdir(folder) if (m := SNAPSHOT_RE.match(n))]
    return sorted(found)


def prune_ema_snapshots(run_dir: str, step: int) -> None:
    """Delete EMA snapshot files written after ``step`` (a resumed run writes them again)."""
    for snap_step, path in list_ema_snapshots(run_dir):
        if snap_step > step:
            os.unlink(path)


def save_ema_snapshot(run_dir: str, step: int, ema, names: list[str], model_config: dict) -> str:
    """The EMA weights at ``step`` as fp16 safetensors (UNet parameter names; step and model config in the metadata)."""
    if len(names) != len(ema.shadow_params):
        raise RuntimeError(f"EMA holds {len(ema.shadow_params)} tensors for {len(names)} UNet parameters")
    tensors = {n: p.detach().to("cpu", torch.float16) for n, p in zip(names, ema.shadow_params)}
    path = snapshot_path(run_dir, step)
    atomic_save_safetensors(path, tensors, metadata={"step": str(step), "model_config": json.dumps(model_config)})
    return path


# ----------------------------------------------------------------------------- weight variants
@contextlib.contextmanager
def ema_swapped(ema, module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``module`` holding the EMA weights for the duration of the block; its own weights come back after."""
    from lawa_diffusion.lawa import swapped_weights

    with swapped_weights(list(module.parameters()), ema.copy_to):
        yield module


def weight_variants(names: list[str], unet: torch.nn.Module, ema) -> dict[str, Any]:
    """name -> module or context-manager factory for ``fid.evaluate_variants`` (lawa only once it is ready)."""
    out: dict[str, Any] = {}
    for name in names:
        if name == "raw":
            out[name] = unet
        elif name == "ema":
            out[name] = lambda: ema_swapped(ema, unet)
        elif name == "lawa" and ema.lawa.ready:
            out[name] = lambda: ema.lawa.swapped_into(unet, sync_ranks=True)
    return out


def metric_row(step: int, variant: str, result: dict, lawa) -> dict:
    """One metrics.jsonl row (the format report.py and posthoc.py read)."""
    kid_mean, kid_std = result.get("kid_mean"), result.get("kid_std")
    return {"step": int(step), "variant": variant, "fid": float(result["fid"]),
            "kid_mean": None if kid_mean is None else float(kid_mean),
            "kid_std": None if kid_std is None else float(kid_std),
            "num_samples": int(result["num_samples"]), "inception_sha256": str(result["inception_sha256"]),
            "lawa_k": lawa.config.k, "lawa_every_n_steps": lawa.config.every_n_steps,
            "lawa_num_snapshots": lawa.num_snapshots}


def format_line(step: int, rows: list[dict], lawa) -> str:
    """``step 600: FID ema 85.12  lawa 79.40  (k=5, 4 snapshots)``."""
    fids = {r["variant"]: r["fid"] for r in rows}
    parts = [f"{v} {fids[v]:.2f}" for v in ("raw", "ema", "lawa") if v in fids]
    if "lawa" not in fids:
        parts.append("lawa -")
    return f"step {step}: FID {'  '.join(parts)}  (k={lawa.config.k}, {lawa.num_snapshots} snapshots)"


# ----------------------------------------------------------------------------- the tracker
class Tracker:
    """Evaluates the configured variants on the configured schedule and records the results."""

    def __init__(self, cfg, run_dir: str, accelerator, unet, ema, noise_scheduler, model_config: dict,
                 weights: Any = None):
        self.cfg, self.eval = cfg, cfg.eval
        self.run_dir, self.accelerator, self.unet, self.ema = run_dir, accelerator, unet, ema
        self.scheduler_config = {k: v for k, v in noise_scheduler.config.items() if not k.startswith("_")}
        self.model_config = model_config
        self.weights = weights if weights is not None else self.eval.inception_weights
        self.param_names = [n for n, _ in accelerator.unwrap_model(unet).named_parameters()]
        self.reference = None
        self.last_step: Optional[int] = None

    @property
    def enabled(self) -> bool:
        return self.eval.every_n_steps > 0 or self.eval.at_end

    def prepare(self, start_step: int) -> None:
        """Reference statistics (cached on disk by the FID module), before the first step."""
        self.last_step = start_step
        if not self.enabled:
            return
        from lawa_diffusion import fid

        e = self.eval
        if e.num_samples < e.warn_below and self.accelerator.is_main_process:
            print(f"note: FID from {e.num_samples} samples per variant is biased upwards; compare the variants "
                  "with each other (same noise), not with published FIDs", flush=True)
        self.reference = fid.reference_stats(
            e.reference, image_size=self.model_config["sample_size"], num_images=e.reference_num_images,
            batch_size=e.batch_size, weights=self.weights, accelerator=self.accelerator, resize_mode=e.resize_mode,
            features_max=e.reference_features_max, progress=self.accelerator.is_main_process)

    def due(self, step: int, final: bool) -> bool:
        e = self.eval
        return (e.every_n_steps > 0 and step % e.every_n_steps == 0) or (final and e.at_end)

    def after_step(self, step: int, final: bool, write: Callable[[str], None] = print) -> None:
        """Save the EMA snapshot and evaluate when due."""
        lawa = self.ema.lawa
        if self.cfg.save_ema_snapshots and lawa.due(step) and self.accelerator.is_main_process:
            save_ema_snapshot(self.run_dir, step, self.ema, self.param_names, self.model_config)
        if self.due(step, final):
            self.evaluate(step, write)

    def evaluate(self, step: int, write: Callable[[str], None] = print) -> list[dict]:
        """FID/KID of every variant at ``step``; rows appended to metrics.jsonl and logged to the trackers."""
        from lawa_diffusion import fid

        e, acc, lawa = self.eval, self.accelerator, self.ema.lawa
        variants = weight_variants(e.variants, acc.unwrap_model(self.unet), self.ema)
        if not variants:
            return []
        with _quiet_small_samples():
            results = fid.evaluate_variants(
                variants, self.reference, num_samples=e.num_samples, batch_size=e.batch_size, scheduler=e.scheduler,
                scheduler_config=self.scheduler_config, num_inference_steps=e.num_inference_steps, seed=e.seed,
                eta=e.eta, kid=e.kid, kid_subsets=e.kid_subsets, kid_subset_size=e.kid_subset_size,
                accelerator=acc, weights=self.weights, progress=acc.is_main_process)
        rows = [metric_row(step, name, results[name], lawa) for name in variants]
        if acc.is_main_process:
            path = os.path.join(self.run_dir, METRICS_NAME)
            for row in rows:
                append_line(path, json.dumps(row, sort_keys=True))
            write(format_line(step, rows, lawa))
        logged = {f"fid/{r['variant']}": r["fid"] for r in rows}
        logged.update({f"kid/{r['variant']}": r["kid_mean"] for r in rows if r["kid_mean"] is not None})
        acc.log({**logged, "lawa/num_snapshots": lawa.num_snapshots}, step=step)
        self.last_step = step
        return rows


@contextlib.contextmanager
def _quiet_small_samples() -> Iterator[None]:
    """Training evaluations use few samples on purpose (warned once in the config's comments, not every time)."""
    import warnings

    from lawa_diffusion.fid import SmallSampleWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallSampleWarning)
        yield


def write_report(run_dir: str) -> Optional[str]:
    """The speed-up report of one run (``lawa_diffusion.report``); prints and returns its path."""
    try:
        from lawa_diffusion import report
    except ImportError:
        return None
    try:
        summary = report.write_report([run_dir])
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"report: not written ({e})", flush=True)
        return None
    print(report.format_table(summary), flush=True)
    path = summary["files"]["json"]
    print(f"report: {path}  plot: {summary['files']['png']}", flush=True)
    return path
