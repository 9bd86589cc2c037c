"""Configuration: the dataclasses (the only place where defaults live) and loading a YAML file with overrides.

Every user-facing error is a ``ValueError`` (or ``FileNotFoundError``) with one sentence naming the
option, the value received and the fix; the CLI prints it on one line and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional, Sequence

import yaml

from lawa_diffusion.config.base import as_list, as_number, check, check_int, entries, from_mapping, read_yaml
from lawa_diffusion.config.fid import FID_RESIZE_MODES, EvalConfig
from lawa_diffusion.config.lawa import LAWAConfig
from lawa_diffusion.config.tracks import (
    BASE_TRACK,
    BASE_WINDOW,
    DELAYED_SUFFIX,
    RAW_TRACK,
    EMASettings,
    EMATrackConfig,
    LAWAWindowConfig,
    PosthocSnapshotConfig,
    with_disk_dir,
)

# ----------------------------------------------------------------------------- training
MIXED_PRECISION = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FAST_PATH = ("auto", "on", "off")


def _default_unet() -> dict:
    return {
        "sample_size": 32, "in_channels": 1, "out_channels": 1, "layers_per_block": 2,
        "block_out_channels": [64, 128, 128], "norm_num_groups": 32,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    }


@dataclasses.dataclass
class DataConfig:
    """Training images.

    dataset: "fashion-mnist" ("fashion-mnist:test" for the test split), an image folder or a .npy/.npz file.
    root: folder with the Fashion-MNIST IDX files (null: $LAWA_DATA, then the Debian package's folder).
    num_images: use only the first N images (null: all).
    random_flip: flip images left-right at random.
    resize_mode: how images reach the model resolution: "pad" (zero-pad/centre-crop) or "resize".
    """

    dataset: str = "fashion-mnist"
    root: Optional[str] = None
    num_images: Optional[int] = None
    random_flip: bool = False
    resize_mode: str = "pad"

    def __post_init__(self) -> None:
        check(isinstance(self.dataset, str) and bool(self.dataset),
              f"data dataset must be 'fashion-mnist' or an image folder path, got {self.dataset!r}")
        check_int("data", "num_images", self.num_images, 1, allow_none=True)
        check(isinstance(self.random_flip, bool), f"data random_flip must be true or false, got {self.random_flip!r}")
        check(self.resize_mode in FID_RESIZE_MODES,
              f"data resize_mode must be one of {', '.join(FID_RESIZE_MODES)}, got {self.resize_mode!r}")


@dataclasses.dataclass
class NoiseConfig:
    """The DDPM forward process (diffusers ``DDPMScheduler`` arguments); sampling reuses it.

    num_train_timesteps: diffusion steps of the forward process.
    beta_schedule: diffusers' name of the noise schedule ("linear", "scaled_linear", "squaredcos_cap_v2").
    prediction_type: what the UNet predicts: "epsilon" (the noise), "v_prediction" or "sample".
    """

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        check_int("noise", "num_train_timesteps", self.num_train_timesteps, 1)
        check(self.prediction_type in PREDICTION_TYPES,
              f"noise prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}")


@dataclasses.dataclass
class OptimConfig:
    """AdamW with a learning-rate schedule (diffusers ``get_scheduler`` names) and gradient clipping.

    learning_rate: the peak learning rate.
    lr_scheduler: diffusers' schedule name ("constant", "constant_with_warmup", "cosine", "linear", ...).
    lr_warmup_steps: steps of linear warm-up.
    adam_beta1 / adam_beta2 / adam_weight_decay / adam_epsilon: AdamW's options.
    max_grad_norm: clip the gradient norm to this (null: no clipping).
    """

    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-6
    adam_epsilon: float = 1e-8
    max_grad_norm: Optional[float] = 1.0

    def __post_init__(self) -> None:
        for name in ("learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon"):
            setattr(self, name, as_number("optim", name, getattr(self, name)))
        check_int("optim", "lr_warmup_steps", self.lr_warmup_steps, 0)
        if self.max_grad_norm is not None:
            self.max_grad_norm = as_number("optim", "max_grad_norm", self.max_grad_norm)


LAWA_SNAPSHOT_DIR = "lawa_snapshots"
TRAIN_SECTIONS = {"data": DataConfig, "noise": NoiseConfig, "optim": OptimConfig, "ema": EMASettings,
                  "lawa": LAWAConfig, "eval": EvalConfig, "posthoc": PosthocSnapshotConfig}


@dataclasses.dataclass
class TrainConfig:
    """``lawa-diffusion train``: a diffusers UNet2DModel trained with EMA and LAWA over it.

    output_dir: the run folder (config.yaml, metrics.jsonl, checkpoints, snapshots, report).
    seed: seed of the weights' initialisation, the batches and the training noise (batches and noise depend
        only on seed and step, so a resumed run continues exactly).
    data / noise / optim / eval: the training images, the DDPM forward process, the optimizer and the FID
        evaluations (their keys below).
    model: UNet2DModel keyword arguments (the whole mapping; diffusers' defaults fill what is left out);
        ``num_class_embeds: N`` makes it class-conditional: it trains on the dataset's class labels (Fashion-MNIST)
        and is evaluated on ``eval.class_labels``.
    max_train_steps: optimizer steps; train_batch_size: images per process per micro-step.
    gradient_accumulation_steps / mixed_precision ("no", "fp16", "bf16"): passed to accelerate.
    checkpointing_steps: save_state every N steps (0: only at the end); checkpoints_total_limit: keep
        the newest N (null: all).
    save_ema_snapshots: also write the EMA weights (fp16 safetensors) at every LAWA snapshot step.
    log_with: accelerate tracker ("tensorboard") or null; log_every_n_steps: loss logging period.
    report: write the speed-up report at the end.
    ema / lawa: diffusers' warm-up EMA (the track "ema") and the LAWA window "lawa" over it.
    ema_tracks: more EMA tracks, each {name, decay | half_life | sigma_rel | gamma} (``EMATrackConfig``;
        sigma_rel / gamma: EDM2's power-function EMA).
    lawa_windows: more LAWA windows, each {name, over, k, every_n_steps, ...} (``LAWAWindowConfig``).
    LAWA with ``storage: disk`` and no snapshot_dir keeps its files in <output_dir>/lawa_snapshots.
    posthoc: EMA snapshots stored every N steps for averages synthesised after the fact (``PosthocSnapshotConfig``).
    fast_path: "on" / "auto" (the default) on a CUDA device: fused AdamW, the training forward compiled with
        CUDA graphs (torch.compile, mode "reduce-overhead"; without graphs under gradient accumulation or
        several processes; the first steps pay the compile time) and sampling under autocast in
        ``mixed_precision``; falls back to the plain path with one warning line where that cannot work
        (CPU, compile error). "off": the plain path everywhere.
    """

    output_dir: str = "runs/lawa"
    seed: int = 0
    max_train_steps: int = 10000
    train_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    checkpointing_steps: int = 1000
    checkpoints_total_limit: Optional[int] = 2
    save_ema_snapshots: bool = False
    log_with: Optional[str] = "tensorboard"
    log_every_n_steps: int = 10
    report: bool = True
    fast_path: str = "auto"
    model: dict = dataclasses.field(default_factory=_default_unet)
    ema_tracks: list = dataclasses.field(default_factory=list)
    lawa_windows: list = dataclasses.field(default_factory=list)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    noise: NoiseConfig = dataclasses.field(default_factory=NoiseConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ema: EMASettings = dataclasses.field(default_factory=EMASettings)
    lawa: LAWAConfig = dataclasses.field(default_factory=LAWAConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    posthoc: PosthocSnapshotConfig = dataclasses.field(default_factory=PosthocSnapshotConfig)

    def __post_init__(self) -> None:
        check(isinstance(self.output_dir, str) and bool(self.output_dir), f"output_dir must be a folder path, got {self.output_dir!r}")
        disk_dir = os.path.join(self.output_dir, LAWA_SNAPSHOT_DIR)
        self.lawa = with_disk_dir(self.lawa, disk_dir)
        for name, cls in TRAIN_SECTIONS.items():
            value = getattr(self, name)
            if value is None:
                setattr(self, name, cls())
            elif not isinstance(value, cls):
                setattr(self, name, from_mapping(cls, value, f"train config section {name!r}"))
        check(isinstance(self.model, Mapping), f"train config model must be a mapping of UNet2DModel arguments, got {self.model!r}")
        self.model = dict(self.model)
        self.ema_tracks = entries(self.ema_tracks, EMATrackConfig, "ema_tracks")
        self.lawa_windows = entries([with_disk_dir(w, disk_dir) for w in as_list(self.lawa_windows, "lawa_windows")],
                                     LAWAWindowConfig, "lawa_windows")
        self._check_track_names()
        self._resolve_posthoc_tracks()
        self.eval.select_variants(self.variant_names())
        check_int("train config", "seed", self.seed, 0)
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "log_every_n_steps"):
            check_int("train config", name, getattr(self, name), 1)
        check_int("train config", "checkpointing_steps", self.checkpointing_steps, 0)
        check_int("train config", "checkpoints_total_limit", self.checkpoints_total_limit, 1, allow_none=True)
        if self.mixed_precision is False:  # YAML reads an unquoted ``no`` as false
            self.mixed_precision = "no"
        if isinstance(self.fast_path, bool):  # YAML reads unquoted on / off as booleans
            self.fast_path = "on" if self.fast_path else "off"
        check(self.fast_path in FAST_PATH,
              f"fast_path must be one of {', '.join(FAST_PATH)}, got {self.fast_path!r}")
        check(self.mixed_precision in MIXED_PRECISION,
              f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        check(self.log_with in (None, "tensorboard"), f"log_with must be 'tensorboard' or null, got {self.log_with!r}")
        check(isinstance(self.save_ema_snapshots, bool), f"save_ema_snapshots must be true or false, got {self.save_ema_snapshots!r}")

    def _check_track_names(self) -> None:
        seen = {BASE_TRACK: "EMA track", BASE_WINDOW: "LAWA window"}
        for kind, configured in (("EMA track", self.ema_tracks), ("LAWA window", self.lawa_windows)):
            for entry in configured:
                other = seen.get(entry.name)
                both = f"two {kind}s" if other == kind else f"an {other} and a {kind}"
                check(other is None, f"{both} share the name {entry.name!r}; give every EMA track and LAWA window "
                                     "its own name")
                seen[entry.name] = kind
        tracks = self.track_names()
        for window in self.lawa_windows:
            check(window.over in tracks + [RAW_TRACK],
                  f"lawa_windows {window.name!r} is over {window.over!r}, which is not an EMA track; use one of "
                  f"{', '.join(tracks + [RAW_TRACK])}")

    def _resolve_posthoc_tracks(self) -> None:
        tracks = self.track_names()
        if self.posthoc.tracks is None:
            self.posthoc.tracks = [t.name for t in self.ema_tracks if t.is_power] or [BASE_TRACK]
        unknown = [t for t in self.posthoc.tracks if t not in tracks]
        check(not unknown, f"posthoc tracks names {', '.join(map(repr, unknown))}, which is not an EMA track of this "
                           f"config; use names among {', '.join(tracks)}")

    def track_names(self) -> list:
        """The EMA tracks: "ema" (diffusers' warm-up EMA) and the ``ema_tracks``."""
        return [BASE_TRACK] + [t.name for t in self.ema_tracks]

    def window_names(self) -> list:
        """The LAWA windows: "lawa" (over "ema") and the ``lawa_windows``."""
        return [BASE_WINDOW] + [w.name for w in self.lawa_windows]

    def variant_names(self) -> list:
        """Every weight variant this run can evaluate, in report order."""
        names = [RAW_TRACK] + self.track_names()
        for window in self.window_names():
            names += [window, window + DELAYED_SUFFIX]
        return names

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        return from_mapping(cls, values, "train config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- loading
def parse_overrides(items: Sequence[str]) -> dict:
    """Nested mapping from ``key.sub=value`` strings; values are read as YAML (``1e-3``, ``[1, 2]``, ``null``)."""
    nested: dict = {}
    for item in items:
        check("=" in item, f"--set expects KEY=VALUE such as optim.learning_rate=2e-3, got {item!r}")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        check(all(parts), f"--set key {key!r} is not a dotted option name such as optim.learning_rate")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            check(isinstance(node, dict), f"--set {key!r} conflicts with another --set of {part!r}")
        node[parts[-1]] = value
    return nested


def merge_mappings(base: dict, updates: dict) -> dict:
    """``base`` with ``updates`` merged in, recursively for nested mappings."""
    merged = dict(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_train_config(path: str | os.PathLike, overrides: Sequence[str] = (),
                      output_dir: Optional[str] = None) -> TrainConfig:
    """The ``TrainConfig`` of a YAML file with ``--set`` overrides (unknown keys are refused with the valid list)."""
    raw = merge_mappings(read_yaml(path), parse_overrides(overrides))
    if output_dir is not None:
        raw["output_dir"] = os.fspath(output_dir)
    return TrainConfig.from_dict(raw)
