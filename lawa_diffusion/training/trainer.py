"""``lawa-diffusion train``: a diffusers UNet2DModel trained as DDPM with EMA, LAWA over the EMA and FID tracking.

With ``model.num_class_embeds`` the UNet is class-conditional: it trains on the dataset's class labels
(Fashion-MNIST's label files) and is evaluated on ``eval.class_labels``.

Runs as one process or under ``accelerate launch -m lawa_diffusion train`` / ``torchrun -m lawa_diffusion``.
The run folder holds config.yaml, metrics.jsonl, checkpoint-<step>/ (accelerate ``save_state`` plus
unet_ema[_<track>]/ and unet_lawa[_<window>]/), optionally ema_snapshots/ (``save_ema_snapshots`` and
``posthoc``, both written by one ``posthoc_store.PosthocSnapshots``) and lawa_snapshots/, and logs/ (TensorBoard).
"""
from __future__ import annotations

import functools
import inspect
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
import yaml

from lawa_diffusion.config.base import check
from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.engine import accelerate_hooks
from lawa_diffusion.engine.posthoc_snapshots import DTYPES, PosthocSnapshots
from lawa_diffusion.reports import lag_plan as plan
from lawa_diffusion.reports.run_report import print_report
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.training import fast_path
from lawa_diffusion.training.tracks import TrackSet
from lawa_diffusion.utils.files import atomic_write_text, check_output_dir, write_marker
from lawa_diffusion.utils.output import say, warn

MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant that spreads (seed, step, ...) over the seed space


# ----------------------------------------------------------------------------- configuration
def plain(value: Any) -> Any:
    """``value`` with tuples as lists and mappings as dicts (YAML/JSON safe)."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------- model and data
def build_unet(kwargs: dict):
    """``UNet2DModel(**kwargs)``; unknown argument names are refused with the valid list."""
    from diffusers import UNet2DModel

    valid = [n for n in inspect.signature(UNet2DModel.__init__).parameters if n not in ("self", "args", "kwargs")]
    unknown = sorted(set(kwargs) - set(valid))
    check(not unknown, f"model has unknown key(s) {', '.join(unknown)}; valid keys are the UNet2DModel "
                       f"arguments: {', '.join(valid)}")
    check(isinstance(kwargs.get("sample_size"), int),
          f"model sample_size must be an integer (square images), got {kwargs.get('sample_size')!r}")
    return UNet2DModel(**kwargs)


def num_classes_of(cfg: TrainConfig) -> Optional[int]:
    """``model.num_class_embeds``: the classes of a class-conditional UNet (None: unconditional)."""
    return cfg.model.get("num_class_embeds")


def check_conditions(cfg: TrainConfig) -> None:
    """A class-conditional model (``model.num_class_embeds``) is evaluated on ``eval.class_labels`` and an
    unconditional one on neither; text prompts condition other models than the trainer's."""
    e, num = cfg.eval, num_classes_of(cfg)
    check(e.prompts is None, f"eval prompts {e.prompts!r} condition text-to-image models, but the trainer trains a "
          "UNet2DModel; drop eval.prompts (a class-conditional UNet takes model.num_class_embeds and "
          "eval.class_labels)")
    check(num is None or (isinstance(num, int) and not isinstance(num, bool) and num >= 1),
          f"model num_class_embeds must be a number of classes >= 1 or null, got {num!r}")
    check(num is not None or e.class_labels is None, f"eval class_labels {e.class_labels!r} needs a class-conditional "
          "model; set model.num_class_embeds (10 for Fashion-MNIST) or drop eval.class_labels")
    evaluates = e.every_n_steps > 0 or e.at_end
    check(num is None or not evaluates or e.class_labels is not None, f"model num_class_embeds {num} makes the UNet "
          "class-conditional; set eval.class_labels to all (every class, cycled) or a comma list of class numbers")
    if num is not None:
        from lawa_diffusion.training.labels import labelled_split

        labelled_split(cfg.data, num)


def model_config_of(unet) -> dict:
    """The UNet's full configuration as plain data (the ``model`` entry of config.yaml)."""
    return plain({k: v for k, v in unet.config.items() if not k.startswith("_")})


def load_training_images(cfg, image_size: int, channels: int) -> torch.Tensor:
    """uint8 [N, C, S, S] training images of ``cfg`` (a ``DataConfig``) at the model resolution."""
    from lawa_diffusion.evaluation import images as data

    split = data.parse_dataset_name(cfg.dataset)
    if split is not None:
        images = data.load_fashion_mnist(split, cfg.root)
    else:
        resize = image_size if cfg.resize_mode == "resize" else None
        images = data.load_images(cfg.dataset, image_size=resize)
    if cfg.num_images is not None:
        images = images[: cfg.num_images]
    images = data.fit_to_size(images, image_size, cfg.resize_mode)
    check(images.shape[1] == channels,
          f"data {cfg.dataset!r} has {images.shape[1]} channel(s) but model in_channels is {channels}; "
          f"set model in_channels and out_channels to {images.shape[1]}")
    return images.contiguous()


class BatchSource:
    """Training batches and noise as a pure function of (seed, step, micro-step, process).

    Resuming at step s therefore continues exactly where an uninterrupted run would be, on any
    number of processes per global batch layout; each epoch is a seeded permutation (last partial
    global batch dropped).
    """

    def __init__(self, images: torch.Tensor, batch_size: int, accumulation: int, seed: int,
                 process_index: int, num_processes: int, random_flip: bool, device: torch.device,
                 labels: Optional[torch.Tensor] = None):
        self.images = images.to(device)
        self.labels = None if labels is None else labels.to(device)
        self.batch_size, self.accumulation, self.seed = batch_size, accumulation, seed
        self.rank, self.world, self.random_flip, self.device = process_index, num_processes, random_flip, device
        self.per_epoch = images.shape[0] // (batch_size * num_processes)
        check(self.per_epoch >= 1, f"train_batch_size {batch_size} x {num_processes} process(es) exceeds the "
                                   f"{images.shape[0]} training images; lower train_batch_size or add images")
        self._perm: tuple[int, Optional[torch.Tensor]] = (-1, None)

    def _seed(self, *parts: int) -> int:
        value = self.seed
        for part in parts:
            value = (value * MIX + part + 1) % (2 ** 63)
        return value

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self._seed(epoch))
            self._perm = (epoch, torch.randperm(self.images.shape[0], generator=g).to(self.device))
        return self._perm[1]

    def _rows(self, step: int, micro: int) -> tuple[int, torch.Tensor]:
        """(micro-batch index, the image rows) of optimizer step ``step``, micro-step ``micro`` on this process."""
        index = (step - 1) * self.accumulation + micro
        epoch, within = divmod(index, self.per_epoch)
        start = (within * self.world + self.rank) * self.batch_size
        return index, self._permutation(epoch)[start:start + self.batch_size]

    def labels_of(self, step: int, micro: int) -> Optional[torch.Tensor]:
        """The class labels of the images :meth:`draw` gives for ``(step, micro)`` (None without labels)."""
        return None if self.labels is None else self.labels[self._rows(step, micro)[1]]

    def draw(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Generator]:
        """Images in [-1, 1] for optimizer step ``step`` (from 1), micro-step ``micro``, and a generator for its noise."""
        index, rows = self._rows(step, micro)
        x = self.images[rows].float() / 127.5 - 1.0
        g = torch.Generator(device=self.device).manual_seed(self._seed(2 ** 20 + index, self.rank))
        if self.random_flip:
            flip = torch.rand(x.shape[0], generator=g, device=self.device) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, g


# ----------------------------------------------------------------------------- run folder
def resolve_resume(run_dir: str, resume: Optional[str], overwrite: bool) -> tuple[Optional[str], int]:
    """(checkpoint folder to load or None, its step); checks only, changes nothing."""
    check(not (resume and overwrite), "--resume and --overwrite cannot be combined; drop one of them")
    if resume is None:
        busy = os.path.isdir(run_dir) and bool(os.listdir(run_dir))
        if busy and not overwrite:
            raise FileExistsError(f"output dir {run_dir!r} already exists; pass --resume latest to continue it, "
                                  "--overwrite to replace it, or choose another --output-dir")
        if busy:
            check(os.path.isfile(runfolder.config_path(run_dir)),
                  f"--overwrite refuses {run_dir!r} because it is not a run folder (no {runfolder.CONFIG_NAME}); "
                  "choose another --output-dir")
            check_output_dir(run_dir, "--output-dir", True, kind="train", legacy=runfolder.written_by_train)
        return None, 0
    path = runfolder.latest_checkpoint(run_dir) if resume == "latest" else os.path.abspath(resume)
    if path is None:
        return None, 0
    step = runfolder.checkpoint_step(path)
    check(os.path.isdir(path) and step is not None,
          f"--resume {resume!r} is not a checkpoint-<step> folder; pass 'latest' or the path of one")
    return path, step


def check_same_model(run_dir: str, model: dict) -> None:
    """Refuse to resume a run whose config.yaml names another model architecture."""
    path = runfolder.config_path(run_dir)
    saved = plain(runfolder.read_config(run_dir).get("model"))
    if saved is not None:
        changed = sorted(k for k in set(saved) | set(model) if saved.get(k) != model.get(k))
        check(not changed, f"model settings {', '.join(changed)} differ from {path!r}; resume with the run's "
                           "model settings or start a new --output-dir")


def prepare_run_dir(run_dir: str, step: int, overwrite: bool, resolved: dict) -> None:
    """Main process: replace (``overwrite``) or create ``run_dir``, trim what lies past ``step``, write config.yaml."""
    if overwrite and os.path.isdir(run_dir):
        check_output_dir(run_dir, "--output-dir", True, kind="train", legacy=runfolder.written_by_train)
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    write_marker(run_dir, "train")
    for path in runfolder.truncate_after(run_dir, step):
        say(f"removing {path}: training continues from step {step}", "train")
    atomic_write_text(runfolder.config_path(run_dir), yaml.safe_dump(resolved, sort_keys=False))


# ----------------------------------------------------------------------------- the trainer
@dataclass
class Parts:
    """What the training loop works on."""

    cfg: TrainConfig
    run_dir: str
    accelerator: Any
    unet: Any
    ema: Any
    tracks: Any
    optimizer: Any
    lr_scheduler: Any
    noise_scheduler: Any
    batches: BatchSource
    tracker: Any
    model_config: dict
    forward: Any = None  # fast_path.TrainForward over unet
    snapshots: Any = None  # posthoc_store.PosthocSnapshots: the EMA snapshot files


def make_accelerator(cfg: TrainConfig, run_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project = ProjectConfiguration(project_dir=run_dir, logging_dir=os.path.join(run_dir, "logs"))
    # cpu=True without CUDA lets torchrun / accelerate launch give several CPU processes (gloo).
    return Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, cpu=not torch.cuda.is_available(),
                       mixed_precision=cfg.mixed_precision, log_with=cfg.log_with, project_config=project)


def make_optimization(cfg: TrainConfig, unet, num_processes: int, fast: bool = False):
    """AdamW (fused on the fast path) and its warm-up + schedule (stepped once per process per optimizer step,
    as accelerate does)."""
    from diffusers.optimization import get_scheduler

    o = cfg.optim
    optimizer = torch.optim.AdamW(unet.parameters(), lr=o.learning_rate, betas=(o.adam_beta1, o.adam_beta2),
                                  weight_decay=o.adam_weight_decay, eps=o.adam_epsilon, **fast_path.adamw_options(fast))
    try:
        scheduler = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps * num_processes,
                                  num_training_steps=cfg.max_train_steps * num_processes)
    except ValueError as e:
        raise ValueError(f"optim lr_scheduler {o.lr_scheduler!r} is not usable ({e}); use e.g. constant_with_warmup, "
                         "linear or cosine") from None
    return optimizer, scheduler


def build_parts(cfg: TrainConfig, accelerator, run_dir: str, fid_weights: Any = None) -> Parts:
    """Model, EMA tracks and LAWA windows, optimizer, schedules, data and FID tracker, prepared with accelerate."""
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler

    from lawa_diffusion.training import fid_tracker as tracking

    set_seed(cfg.seed)
    unet = build_unet(cfg.model)
    model_config = model_config_of(unet)
    images = load_training_images(cfg.data, unet.config.sample_size, unet.config.in_channels)
    labels = None
    if num_classes_of(cfg) is not None:
        from lawa_diffusion.training.labels import load_training_labels

        labels = load_training_labels(cfg.data, num_classes_of(cfg))
    noise_scheduler = DDPMScheduler(num_train_timesteps=cfg.noise.num_train_timesteps,
                                    beta_schedule=cfg.noise.beta_schedule, prediction_type=cfg.noise.prediction_type)
    fast = fast_path.enabled(cfg.fast_path, accelerator.device)
    optimizer, lr_scheduler = make_optimization(cfg, unet, accelerator.num_processes, fast)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    tracks = TrackSet.from_config(cfg, accelerator.unwrap_model(unet), accelerator.device)
    tracks.register(accelerator)
    batches = BatchSource(images, cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.seed,
                          accelerator.process_index, accelerator.num_processes, cfg.data.random_flip,
                          accelerator.device, labels)
    tracker = tracking.Tracker(cfg, run_dir, accelerator, unet, tracks, noise_scheduler, model_config, fid_weights)
    tracker.sample_precision = cfg.mixed_precision if fast else None
    snapshots = PosthocSnapshots(accelerator.unwrap_model(unet), run_dir, every_n_steps=cfg.posthoc.every_n_steps,
                                 dtype=cfg.posthoc.dtype, emas=tracks.emas, tracks=cfg.posthoc.tracks,
                                 model_config=model_config, main_process=accelerator.is_main_process)
    return Parts(cfg, run_dir, accelerator, unet, tracks.base, tracks, optimizer, lr_scheduler, noise_scheduler,
                 batches, tracker, model_config,
                 fast_path.TrainForward(unet, fast, fast_path.compile_mode(cfg.gradient_accumulation_steps,
                                                                            accelerator.num_processes)), snapshots)


def snapshot_plan(cfg: TrainConfig, lawa_due: bool, step: int, tracks: list) -> dict:
    """{track: dtype} of the EMA snapshot files due at ``step``: the ``posthoc`` tracks every
    ``posthoc.every_n_steps`` in ``posthoc.dtype``, and with ``save_ema_snapshots`` every track at the
    "lawa" window's snapshot steps (fp16, or ``posthoc.dtype`` for a posthoc track: one dtype per track)."""
    post = cfg.posthoc
    stored = set(post.tracks) if post.enabled else set()
    plan = {t: DTYPES[post.dtype] for t in post.tracks} if post.enabled and step % post.every_n_steps == 0 else {}
    if cfg.save_ema_snapshots and lawa_due:
        for t in tracks:
            plan.setdefault(t, DTYPES[post.dtype] if t in stored else torch.float16)
    return plan


def loss_target(noise_scheduler, clean, noise, timesteps):
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(clean, noise, timesteps)
    return clean


def forward_backward(p: Parts, clean: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                     labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss of one micro-batch (with its class labels for a class-conditional UNet), back-propagated."""
    noisy = p.noise_scheduler.add_noise(clean, noise, t)
    pred = p.forward(noisy, t) if labels is None else p.forward(noisy, t, class_labels=labels)
    loss = F.mse_loss(pred.float(), loss_target(p.noise_scheduler, clean, noise, t).float())
    p.accelerator.backward(loss)
    return loss


def train_step(p: Parts, step: int) -> torch.Tensor:
    """One optimizer step (``gradient_accumulation_steps`` micro-steps) and the EMA/LAWA updates; the mean loss."""
    acc, losses = p.accelerator, []
    for micro in range(p.cfg.gradient_accumulation_steps):
        with acc.accumulate(p.unet):
            clean, g = p.batches.draw(step, micro)
            labels = p.batches.labels_of(step, micro)
            noise = torch.randn(clean.shape, generator=g, device=clean.device)
            t = torch.randint(0, p.noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                              generator=g, device=clean.device)
            loss = p.forward.run(functools.partial(forward_backward, p, clean, noise, t, labels),
                                 reset=lambda: p.optimizer.zero_grad(set_to_none=True))
            if acc.sync_gradients and p.cfg.optim.max_grad_norm is not None:
                acc.clip_grad_norm_(p.unet.parameters(), p.cfg.optim.max_grad_norm)
            p.optimizer.step()
            p.lr_scheduler.step()
            p.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    p.tracks.step(p.unet.parameters(), step)
    return torch.stack(losses).mean()


def save_checkpoint(p: Parts, step: int) -> None:
    accelerate_hooks.save_checkpoint(p.accelerator, runfolder.checkpoint_path(p.run_dir, step))
    if p.accelerator.is_main_process and p.cfg.checkpoints_total_limit is not None:
        runfolder.prune_checkpoints(p.run_dir, p.cfg.checkpoints_total_limit)


def log_progress(p: Parts, bar, step: int, loss: torch.Tensor) -> None:
    if step % p.cfg.log_every_n_steps and step != p.cfg.max_train_steps:
        return
    mean_loss = p.accelerator.reduce(loss, "mean").item()
    lr = p.lr_scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
    p.accelerator.log({"train/loss": mean_loss, "train/lr": lr, "train/ema_decay": p.ema.cur_decay_value or 0.0},
                      step=step)


def run_loop(p: Parts, start_step: int) -> None:
    """Steps start_step+1 .. max_train_steps with snapshots, evaluations and checkpoints on their schedules."""
    from tqdm.auto import tqdm

    cfg, acc = p.cfg, p.accelerator
    bar = tqdm(total=cfg.max_train_steps, initial=start_step, unit="step", desc="train", mininterval=1.0,
               dynamic_ncols=True, disable=not acc.is_main_process)
    p.unet.train()
    for step in range(start_step + 1, cfg.max_train_steps + 1):
        loss = train_step(p, step)
        p.snapshots.write(step, snapshot_plan(cfg, p.ema.lawa.due(step), step, list(p.tracks.emas)))
        bar.update(1)
        log_progress(p, bar, step, loss)
        p.tracker.after_step(step, final=step == cfg.max_train_steps)
        if step == cfg.max_train_steps or (cfg.checkpointing_steps and step % cfg.checkpointing_steps == 0):
            p.tracker.flush()  # metrics.jsonl complete up to the checkpoint's step
            p.snapshots.flush()  # and the snapshot files
            save_checkpoint(p, step)
    bar.close()


def flat_hparams(cfg: TrainConfig) -> dict:
    """Scalar config values with dotted names (TensorBoard hparams take scalars only)."""
    out = {}
    for section, values in cfg.to_dict().items():
        items = values.items() if isinstance(values, dict) else [(None, values)]
        for key, value in items:
            name = section if key is None else f"{section}.{key}"
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def train(cfg: TrainConfig, resume: Optional[str] = None, overwrite: bool = False, fid_weights: Any = None) -> str:
    """Train as ``cfg`` says (resuming from a checkpoint-<step> folder or "latest"); returns the run folder.

    fid_weights: feature extractor for FID (an ``inception.Extractor`` or a weights path); default
    ``cfg.eval.inception_weights``, then the resolved Inception weights.
    """
    run_dir = os.path.abspath(cfg.output_dir)
    check_conditions(cfg)
    checkpoint, step = resolve_resume(run_dir, resume, overwrite)
    if checkpoint is not None:
        runfolder.verify_checkpoint(checkpoint)  # before the steps past it are removed
    accelerator = make_accelerator(cfg, run_dir)
    started = time.time()
    p = build_parts(cfg, accelerator, run_dir, fid_weights)
    resolved = {**cfg.to_dict(), "output_dir": run_dir, "model": p.model_config}
    if checkpoint is not None:
        check_same_model(run_dir, p.model_config)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, step, overwrite and checkpoint is None, resolved)
        nothing = runfolder.stores_nothing_warning(cfg.posthoc.every_n_steps, cfg.max_train_steps,
                                                   "posthoc every_n_steps")
        if nothing:
            warn(nothing)
        plan.record(run_dir, cfg)  # says the one-line lag summary and writes RUN/lag.json
        for line in p.tracks.lag_lines(cfg.max_train_steps):
            say(line, "train")
    accelerator.wait_for_everyone()
    if checkpoint is not None:
        accelerator.load_state(checkpoint)
        check(p.ema.optimization_step == step, f"checkpoint {checkpoint!r} holds EMA step "
              f"{p.ema.optimization_step}, not {step}; resume from an unmodified checkpoint folder")
    elif resume is not None and accelerator.is_main_process:
        say(f"no checkpoint in {run_dir}: starting a new run", "train")
    if cfg.log_with:
        accelerator.init_trackers("lawa", config=flat_hparams(cfg))
    try:
        p.tracker.prepare(start_step=step)
        run_loop(p, step)
    finally:
        try:
            p.tracker.close()
        finally:
            try:
                p.snapshots.close()
            finally:
                p.tracks.close()
        accelerator.end_training()
    if accelerator.is_main_process:
        finish(p, time.time() - started, step)
    return run_dir


def finish(p: Parts, seconds: float, start_step: int) -> None:
    """Print the wall time, the metrics path and (when asked) the speed-up report's path."""
    steps = p.cfg.max_train_steps - start_step
    print(f"done: {steps} steps in {seconds:.0f} s; run folder {p.run_dir}", flush=True)
    metrics = runfolder.metrics_path(p.run_dir)
    if os.path.isfile(metrics):
        print(f"metrics: {metrics}", flush=True)
    if p.cfg.report and os.path.isfile(metrics):
        print_report(p.run_dir)
