"""FID tracking during training: raw weights, EMA tracks, LAWA windows and their delayed baselines on the same
noise, one row per variant (with its mean lag) in metrics.jsonl. Conditional models (prompts or class labels)
are sampled through ``conditional_eval`` with the pipeline parts and prompt embeddings kept between evaluations.

Where those files live is :mod:`lawa_diffusion.runs.folder`'s business.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import os
from typing import Any, Callable, Optional

import torch

from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.runs.records import metric_row
from lawa_diffusion.training.tracks import TrackSet
from lawa_diffusion.utils.files import append_line
from lawa_diffusion.utils.output import say

SAY_LINE = functools.partial(say, who=None)  # metrics lines as they are: "step 600: FID ema ..."


# ----------------------------------------------------------------------------- metric rows
def lawa_info(lawa) -> dict:
    """The LAWA columns of a metrics row, read when the evaluation's weights were taken."""
    return {"lawa_k": lawa.config.k, "lawa_every_n_steps": lawa.config.every_n_steps,
            "lawa_num_snapshots": lawa.num_snapshots}


def format_line(step: int, rows: list[dict]) -> str:
    """``step 600: FID ema 85.12  lawa 79.40  (k=5, 4 snapshots; sampling 31.2 s, metrics 9.8 s)``."""
    fids = {r["variant"]: r["fid"] for r in rows}
    parts = [f"{v} {f:.2f}" for v, f in fids.items()]
    if not any(r["variant"] == "lawa" or r.get("kind") == "lawa" for r in rows):  # no window ready yet
        parts.append("lawa -")
    first = rows[0]
    timing = ""
    if all("sample_seconds" in r and "metric_seconds" in r for r in rows):
        timing = (f"; sampling {sum(r['sample_seconds'] for r in rows):.1f} s, "
                  f"metrics {sum(r['metric_seconds'] for r in rows):.1f} s")
    return (f"step {step}: FID {'  '.join(parts)}  (k={first['lawa_k']}, {first['lawa_num_snapshots']} snapshots"
            f"{timing})")


def metrics_in_background(setting: Optional[bool], device) -> bool:
    """``eval.background_metrics``: as set, or (null) on when training runs on a GPU; CPU-only training
    would share its cores with the maths."""
    return setting if setting is not None else torch.device(device).type == "cuda"


class MetricsRecorder:
    """Turns sampled variants into metrics rows: appended to ``path``, printed as one line, logged to trackers.

    Used on the main process only. With ``background``, the metric maths (torch-fidelity's, on the CPU) run in
    one worker thread while training goes on, and :meth:`collect` records finished evaluations in step
    order on the calling thread; ``collect(wait=True)`` before a checkpoint keeps metrics.jsonl complete up
    to every checkpoint's step, which exact resumption relies on.
    """

    def __init__(self, path: str, accelerator, *, background: bool = False, write: Callable[[str], None] = SAY_LINE,
                 cfg=None):
        self.path, self.accelerator, self.write = path, accelerator, write
        self.cfg = cfg  # FIDConfig of the KID options (None: the defaults)
        self.background = background
        self._pool = None
        self._stream = None  # the metric maths' CUDA stream (background, GPU features)
        self._pending: collections.deque = collections.deque()

    def submit(self, step: int, sampled: dict, reference, extractor, lawa, variant_info: Optional[dict] = None) -> None:
        """Compute the metrics of ``sampled`` ({name: fid.Sampled}) taken at ``step`` (now, or in the
        background); ``extractor`` made the features. Rows get ``lawa``'s columns and ``variant_info[name]``'s."""
        from lawa_diffusion.evaluation import fid

        cfg = fid.settings(self.cfg)

        def compute() -> dict:
            return {name: fid.metrics_of(s, reference, cfg) for name, s in sampled.items()}

        if self.background:
            compute = self._on_own_stream(compute, [s.device for s in sampled.values()])
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lawa-metrics")
            future = self._pool.submit(compute)
        else:
            future = concurrent.futures.Future()
            future.set_result(compute())
        common = lawa_info(lawa)
        info = {name: {**common, **(variant_info or {}).get(name, {})} for name in sampled}
        self._pending.append((step, info, future))
        if not self.background:
            self.collect()

    def _on_own_stream(self, compute: Callable[[], dict], devices: list) -> Callable[[], dict]:
        """``compute`` on a CUDA stream of the recorder's own when the maths run on a GPU: on the worker
        thread, the current stream would be the device's default one, which training kernels use too."""
        cuda = [d for d in devices if d is not None and torch.device(d).type == "cuda"]
        if not cuda or not torch.cuda.is_available():
            return compute
        device = torch.device(cuda[0])
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device=device)
        stream = self._stream

        def on_stream() -> dict:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                return compute()  # (its results are read on the host: the stream's work is done on return)

        return on_stream

    @property
    def pending(self) -> int:
        return len(self._pending)

    def collect(self, wait: bool = False) -> list[dict]:
        """Record the evaluations whose metrics are ready (all of them with ``wait``), oldest first."""
        rows: list[dict] = []
        while self._pending and (wait or self._pending[0][2].done()):
            step, info, future = self._pending.popleft()
            results = future.result()
            step_rows = [metric_row(step, name, result, info[name]) for name, result in results.items()]
            self._record(step, step_rows)
            rows += step_rows
        return rows

    def close(self) -> list[dict]:
        """Wait for and record what is pending; stop the worker thread."""
        try:
            return self.collect(wait=True)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def _record(self, step: int, rows: list[dict]) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        for row in rows:
            append_line(self.path, json.dumps(row, sort_keys=True))
        self.write(format_line(step, rows))
        if self.accelerator is not None:
            logged = {f"fid/{r['variant']}": r["fid"] for r in rows}
            logged.update({f"kid/{r['variant']}": r["kid_mean"] for r in rows if r["kid_mean"] is not None})
            logged.update({f"lag/{r['variant']}": r["mean_lag"] for r in rows if r.get("mean_lag") is not None})
            self.accelerator.log({**logged, "lawa/num_snapshots": rows[0]["lawa_num_snapshots"]}, step=step)


# ----------------------------------------------------------------------------- the tracker
class Tracker:
    """Evaluates the configured variants on the configured schedule and records the results."""

    def __init__(self, cfg, run_dir: str, accelerator, unet, tracks, noise_scheduler, model_config: dict,
                 weights: Any = None, *, parts: Any = None, prompt_set: Any = None):
        """``tracks``: the run's ``tracks.TrackSet`` (EMA tracks and LAWA windows), or one EMAModel carrying
        its LAWA window as ``.lawa`` (the tracks "ema" and "lawa").

        A conditional model (``eval.prompts`` / ``eval.class_labels`` given, or a UNet that needs conditions) is
        sampled by ``conditional_eval.ConditionalEval``: ``parts`` are its pipeline parts (``ConditionalPipelineParts``
        whose unet is ``unet``; default: ``unet`` alone, sampled in pixel space with ``noise_scheduler``'s config)
        and ``prompt_set`` its conditions (default: what ``eval`` names)."""
        self.cfg, self.eval = cfg, cfg.eval
        self.noise_scheduler, self.parts, self.prompt_set = noise_scheduler, parts, prompt_set
        self.conditional = None  # conditional_eval.ConditionalEval, made by prepare() for a conditional model
        self.run_dir, self.accelerator, self.unet = run_dir, accelerator, unet
        self.tracks = tracks if isinstance(tracks, TrackSet) else TrackSet.of_ema(tracks)
        self.ema = self.tracks.base
        self.scheduler_config = {k: v for k, v in noise_scheduler.config.items() if not k.startswith("_")}
        self.model_config = model_config
        self.weights = weights if weights is not None else self.eval.inception_weights
        self.param_names = [n for n, _ in accelerator.unwrap_model(unet).named_parameters()]
        self.reference = None
        self.extractor = None
        self.recorder: Optional[MetricsRecorder] = None
        self.last_step: Optional[int] = None
        self.sample_precision: Optional[str] = None  # autocast for sampling ("bf16", "fp16"; the fast path sets it)

    @property
    def enabled(self) -> bool:
        return self.eval.every_n_steps > 0 or self.eval.at_end

    def prepare(self, start_step: int, write: Callable[[str], None] = SAY_LINE) -> None:
        """Feature extractor and reference statistics (cached on disk by the FID module), before the first step."""
        self.last_step = start_step
        if not self.enabled:
            return
        from lawa_diffusion.evaluation import fid, inception

        e, acc = self.eval, self.accelerator
        if e.num_samples < e.warn_below:
            say(f"FID from {e.num_samples} samples per variant is biased upwards; compare the variants "
                "with each other (same noise), not with published FIDs", "note")
        self.extractor = inception.load_extractor(self.weights, device=acc.device)
        if self.is_conditional():
            from lawa_diffusion.training.conditional_eval import ConditionalEval

            self.conditional = ConditionalEval.prepare(e, acc.unwrap_model(self.unet), self.noise_scheduler,
                                                       self.extractor, acc, parts=self.parts,
                                                       prompt_set=self.prompt_set, progress=acc.is_main_process)
            self.reference = self.conditional.reference
        else:
            stats = fid.reference_stats(e.reference, image_size=self.model_config["sample_size"], cfg=e,
                                        num_images=e.reference_num_images, weights=self.extractor, accelerator=acc,
                                        progress=acc.is_main_process)
            self.reference = fid.check_weights(stats, self.extractor.sha256)
        self.recorder = MetricsRecorder(runfolder.metrics_path(self.run_dir), acc, cfg=e, write=write,
                                        background=metrics_in_background(e.background_metrics, acc.device))

    def is_conditional(self) -> bool:
        """Whether evaluations sample with conditions: given parts or prompts, conditions named in ``eval``, or a
        UNet that cannot be sampled without them."""
        from lawa_diffusion.evaluation.conditional import needs_conditioning

        return (self.parts is not None or self.prompt_set is not None or self.eval.conditional
                or needs_conditioning(self.accelerator.unwrap_model(self.unet)))

    def due(self, step: int, final: bool) -> bool:
        e = self.eval
        return (e.every_n_steps > 0 and step % e.every_n_steps == 0) or (final and e.at_end)

    def after_step(self, step: int, final: bool) -> None:
        """Record finished background metrics; evaluate when due (EMA snapshot files: ``posthoc_store``)."""
        if self.recorder is not None:
            self.recorder.collect()
        if self.due(step, final):
            self.evaluate(step)

    def evaluate(self, step: int) -> None:
        """Sample every variant at ``step`` (all processes) and hand the features to the recorder (main process)."""
        from lawa_diffusion.evaluation import sampling

        e, acc = self.eval, self.accelerator
        variants, info = self.tracks.variants(e.variants, acc.unwrap_model(self.unet), step)
        if not variants:
            return
        if self.conditional is not None:
            sampled = self.conditional.sample(variants, self.extractor, e, acc, progress=acc.is_main_process,
                                              precision=self.sample_precision)
            common = self.conditional.row_info()
            info = {name: {**common, **info.get(name, {})} for name in variants}
        else:
            sampled = sampling.sample_variants(variants, self.extractor, reference_key=self.reference.key, cfg=e,
                                               scheduler_config=self.scheduler_config, accelerator=acc,
                                               progress=acc.is_main_process, precision=self.sample_precision)
        if acc.is_main_process:
            self.recorder.submit(step, sampled, self.reference, self.extractor, self.ema.lawa, info)
        self.last_step = step

    def flush(self) -> list[dict]:
        """Wait for the metrics still being computed and record them (before checkpoints and at the end)."""
        return self.recorder.collect(wait=True) if self.recorder is not None else []

    def close(self) -> list[dict]:
        return self.recorder.close() if self.recorder is not None else []
