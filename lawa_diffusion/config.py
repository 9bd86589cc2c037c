"""Configuration: the dataclasses (the only place where defaults live) and loading a YAML file with overrides.

Every user-facing error is a ``ValueError`` (or ``FileNotFoundError``) with one sentence naming the
option, the value received and the fix; the CLI prints it on one line and exits with status 2.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Sequence, TypeVar

import yaml

T = TypeVar("T")

STORAGE_MODES = ("device", "cpu", "disk")
DTYPES = ("float32", "bfloat16", "float16", "float64")
NONFINITE_POLICIES = ("raise", "skip")
SNAPSHOT_RANKS = ("main", "all")


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds (input validation, never ``assert``)."""
    if not condition:
        raise ValueError(message)


def from_mapping(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys are rejected with the list of valid ones."""
    check(isinstance(values, Mapping), f"{where} must be a mapping of option: value, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    check(not unknown, f"{where} has unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(names)}")
    return cls(**dict(values))


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping from ``path`` (empty file = empty mapping)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {os.fspath(path)!r} does not exist; pass the path of a YAML file")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {os.fspath(path)!r} is not valid YAML ({e}); fix its syntax") from None
    data = {} if data is None else data
    check(isinstance(data, dict), f"config file {os.fspath(path)!r} must hold a mapping of option: value")
    return data


@dataclasses.dataclass
class LAWAConfig:
    """Latest Weight Averaging: the uniform mean of the latest ``k`` snapshots taken every ``every_n_steps``.

    k: how many snapshots the window holds.
    every_n_steps: ν, optimizer steps between snapshots.
    start_step: first step that may be snapshotted; snapshots at start_step + j·ν, j ≥ 0.
    min_snapshots: how many snapshots must be held before an average is offered.
    storage: "device" (ring on the EMA's device), "cpu" (pinned host ring, async copies on GPU) or
        "disk" (one safetensors file per snapshot in ``snapshot_dir``, written by a background thread).
    dtype: storage dtype; None keeps the EMA tensors' dtype. The mean is always accumulated in fp32
        (or the source dtype if wider).
    snapshot_dir: folder for "disk" storage.
    on_nonfinite: "raise" or "skip" when an EMA snapshot holds NaN/Inf.
    keep_average: keep the mean materialised on the device, updated in O(P) at each snapshot and
        recomputed exactly every k snapshots.
    snapshot_ranks: "main" (only the main process holds snapshots; DDP EMAs are identical) or "all".
    """

    k: int = 5
    every_n_steps: int = 500
    start_step: int = 0
    min_snapshots: int = 1
    storage: str = "cpu"
    dtype: Optional[str] = None
    snapshot_dir: Optional[str] = None
    on_nonfinite: str = "raise"
    keep_average: bool = False
    snapshot_ranks: str = "main"

    def __post_init__(self) -> None:
        for name in ("k", "every_n_steps", "start_step", "min_snapshots"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool),
                  f"lawa {name} must be an integer, got {value!r}")
        check(self.k >= 1, f"lawa k must be >= 1, got {self.k}; use k=1 for the latest snapshot alone")
        check(self.every_n_steps >= 1,
              f"lawa every_n_steps must be >= 1, got {self.every_n_steps}; it is the number of optimizer steps between snapshots")
        check(self.start_step >= 0, f"lawa start_step must be >= 0, got {self.start_step}")
        check(1 <= self.min_snapshots <= self.k,
              f"lawa min_snapshots must be between 1 and k={self.k}, got {self.min_snapshots}")
        check(self.storage in STORAGE_MODES,
              f"lawa storage must be one of {', '.join(STORAGE_MODES)}, got {self.storage!r}")
        check(self.dtype is None or self.dtype in DTYPES,
              f"lawa dtype must be null (same as the EMA) or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.on_nonfinite in NONFINITE_POLICIES,
              f"lawa on_nonfinite must be one of {', '.join(NONFINITE_POLICIES)}, got {self.on_nonfinite!r}")
        check(self.snapshot_ranks in SNAPSHOT_RANKS,
              f"lawa snapshot_ranks must be one of {', '.join(SNAPSHOT_RANKS)}, got {self.snapshot_ranks!r}")
        check(isinstance(self.keep_average, bool), f"lawa keep_average must be true or false, got {self.keep_average!r}")
        if self.storage == "disk":
            check(bool(self.snapshot_dir),
                  "lawa storage 'disk' needs snapshot_dir; set snapshot_dir to a writable folder or use storage 'cpu'")
        if self.snapshot_dir is not None:
            self.snapshot_dir = os.fspath(self.snapshot_dir)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "LAWAConfig":
        return from_mapping(cls, values, "lawa config")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "LAWAConfig":
        data = read_yaml(path)
        # Accept either a bare mapping or one nested under "lawa:".
        if set(data) == {"lawa"} and isinstance(data["lawa"], dict):
            data = data["lawa"]
        return from_mapping(cls, data, f"lawa config {os.fspath(path)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ReportConfig:
    """Defaults of ``lawa-diffusion report``: the metric read from metrics.jsonl and the CI level."""

    metric: str = "fid"
    confidence: float = 0.95


@dataclasses.dataclass(frozen=True)
class PosthocConfig:
    """Defaults of ``lawa-diffusion average`` and ``sweep``.

    k / every: latest k checkpoints, every N-th counted back from the newest (average).
    subfolder: model folder inside each checkpoint-<step>/ (the EMA weights).
    sweep_k / sweep_every: the grid of window sizes and ν multiples (sweep).
    sweep_steps: "eval" (the steps in metrics.jsonl), "final" (the last snapshot) or a comma list.
    """

    k: int = 5
    every: int = 1
    subfolder: str = "unet_ema"
    sweep_k: tuple = (1, 2, 4, 8)
    sweep_every: tuple = (1, 2, 4)
    sweep_steps: str = "eval"


@dataclasses.dataclass
class LaunchConfig:
    """Options of the launch plugin besides ``LAWAConfig`` (``--lawa_<name>`` / ``LAWA_<NAME>``).

    fid_every_n_steps: evaluate FID of the first EMA's EMA and LAWA weights every this many
        optimizer steps (0: never); unconditional UNets only.
    fid_reference: what FID compares against (as for ``lawa-diffusion fid``); needed when
        fid_every_n_steps > 0.
    fid_num_samples / fid_batch_size / fid_num_inference_steps: images per variant, batch size and
        sampler steps (null: the ``FIDConfig`` defaults).
    fid_inception_weights: FID Inception weights file (null: the resolved default).
    metrics_file: JSON-lines file for the FID rows; null: metrics.jsonl in the script's --output_dir
        (or the working folder).
    posthoc_sigma_rels: power-function EMAs (EDM2) kept beside the script's first EMA, as a comma list of
        σ_rel values ("0.05,0.10"); null: 0.05,0.10 when posthoc_every_n_steps > 0.
    posthoc_every_n_steps: store their snapshots every N optimizer steps (0: keep none) under the script's
        --output_dir, in ema_snapshots/sigma_rel_<σ>/step-<step>.safetensors.
    posthoc_dtype: the snapshot files' dtype (float32, bfloat16 or float16).
    """

    fid_every_n_steps: int = 0
    fid_reference: Optional[str] = None
    fid_num_samples: Optional[int] = None
    fid_batch_size: Optional[int] = None
    fid_num_inference_steps: Optional[int] = None
    fid_inception_weights: Optional[str] = None
    metrics_file: Optional[str] = None
    posthoc_sigma_rels: Optional[str] = None
    posthoc_every_n_steps: int = 0
    posthoc_dtype: str = "float32"

    def __post_init__(self) -> None:
        for name, low in (("fid_every_n_steps", 0), ("fid_num_samples", 2), ("fid_batch_size", 1),
                          ("fid_num_inference_steps", 1)):
            value = getattr(self, name)
            if value is None and name != "fid_every_n_steps":
                continue
            check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
                  f"lawa {name} must be an integer >= {low}, got {value!r}")
        check(self.fid_every_n_steps == 0 or bool(self.fid_reference),
              "lawa fid_every_n_steps > 0 needs fid_reference; pass --lawa_fid_reference with the FID reference")
        _check_int("lawa", "posthoc_every_n_steps", self.posthoc_every_n_steps, 0)
        check(self.posthoc_dtype in POSTHOC_DTYPES,
              f"lawa posthoc_dtype must be one of {', '.join(POSTHOC_DTYPES)}, got {self.posthoc_dtype!r}")
        values = self.sigma_rels
        check(not values or self.posthoc_every_n_steps > 0,
              f"lawa posthoc_sigma_rels {self.posthoc_sigma_rels!r} needs posthoc_every_n_steps > 0; pass "
              "--lawa_posthoc_every_n_steps N (store the power EMAs every N optimizer steps)")
        for value in values:
            check(0.0 < value < SIGMA_REL_MAX, f"lawa posthoc_sigma_rels must hold values > 0 and < {SIGMA_REL_MAX:.4f}, "
                                               f"got {value!r}; use e.g. 0.05,0.10")
        check(len(set(values)) == len(values), f"lawa posthoc_sigma_rels names a value twice: {self.posthoc_sigma_rels!r}")

    @property
    def sigma_rels(self) -> tuple:
        """The σ_rel values of ``posthoc_sigma_rels`` (0.05, 0.10 when only posthoc_every_n_steps is set)."""
        given = self.posthoc_sigma_rels
        if given is None or given == "":
            return (0.05, 0.10) if self.posthoc_every_n_steps else ()
        items = given if isinstance(given, (list, tuple)) else str(given).split(",")
        values = []
        for item in items:
            try:
                values.append(float(item))
            except (TypeError, ValueError):
                raise ValueError(f"lawa posthoc_sigma_rels must be a comma list of numbers such as 0.05,0.10, "
                                 f"got {given!r}") from None
        return tuple(values)


FID_SCHEDULERS = ("ddim", "ddpm", "dpm", "euler")
FID_RESIZE_MODES = ("pad", "resize")


@dataclasses.dataclass
class FIDConfig:
    """FID/KID evaluation (``lawa-diffusion fid``, ``ref-stats`` and ``lawa_diffusion.fid``).

    reference: what generated images are compared with: "fashion-mnist[:train|:test]", an image
        folder, a .npy/.npz image array or a stats .npz written by ``ref-stats``.
    num_samples: generated images per weight variant (FID is biased below 2048; KID is the better
        guide there).
    batch_size: images per sampling and feature-extraction batch.
    scheduler: sampler used for evaluation: "ddim", "ddpm", "dpm" (DPM-Solver++) or "euler".
    num_inference_steps: sampler steps per image.
    eta: DDIM eta (0: deterministic DDIM).
    seed: base seed; sample i always starts from the same noise, whatever the batch or process split.
    kid: also compute KID (torch-fidelity, polynomial kernel).
    kid_subsets / kid_subset_size: KID subsets and their size (capped at the number of images).
    reference_features_max: reference features kept for KID (seeded random subset beyond this).
    resize_mode: how reference images reach the model resolution: "pad" (zero-pad/centre-crop) or
        "resize" (resize the shorter side, then centre-crop).
    warn_below: warn when num_samples is below this.
    """

    reference: str = "fashion-mnist"
    num_samples: int = 2048
    batch_size: int = 64
    scheduler: str = "ddim"
    num_inference_steps: int = 50
    eta: float = 0.0
    seed: int = 0
    kid: bool = True
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    reference_features_max: int = 10000
    resize_mode: str = "pad"
    warn_below: int = 2048

    def __post_init__(self) -> None:
        check(isinstance(self.num_samples, int) and self.num_samples >= 2,
              f"num_samples must be an integer >= 2 (FID needs a covariance), got {self.num_samples!r}")
        check(isinstance(self.batch_size, int) and self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}")
        check(self.scheduler in FID_SCHEDULERS,
              f"scheduler must be one of {', '.join(FID_SCHEDULERS)}, got {self.scheduler!r}")
        check(isinstance(self.num_inference_steps, int) and self.num_inference_steps >= 1,
              f"num_inference_steps (--steps) must be >= 1, got {self.num_inference_steps!r}")
        check(isinstance(self.seed, int) and 0 <= self.seed < 2**31, f"seed must be in [0, 2**31), got {self.seed!r}")
        check(self.kid_subsets >= 1 and self.kid_subset_size >= 2,
              f"kid_subsets must be >= 1 and kid_subset_size >= 2, got {self.kid_subsets} and {self.kid_subset_size}")
        check(self.reference_features_max >= 2, f"reference_features_max must be >= 2, got {self.reference_features_max}")
        check(self.resize_mode in FID_RESIZE_MODES,
              f"resize_mode must be one of {', '.join(FID_RESIZE_MODES)}, got {self.resize_mode!r}")


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


def _check_int(where: str, name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
          f"{where} {name} must be an integer >= {minimum}{' or null' if allow_none else ''}, got {value!r}")


def _as_number(where: str, name: str, value: Any, minimum: float = 0.0) -> float:
    """``value`` as a float >= ``minimum``; strings such as "1e-3" (which YAML leaves as text) are accepted."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= minimum,
          f"{where} {name} must be a number >= {minimum}, got {value!r}")
    return float(value)


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
        _check_int("data", "num_images", self.num_images, 1, allow_none=True)
        check(isinstance(self.random_flip, bool), f"data random_flip must be true or false, got {self.random_flip!r}")
        check(self.resize_mode in FID_RESIZE_MODES,
              f"data resize_mode must be one of {', '.join(FID_RESIZE_MODES)}, got {self.resize_mode!r}")


@dataclasses.dataclass
class NoiseConfig:
    """The DDPM forward process (diffusers ``DDPMScheduler`` arguments); sampling reuses it."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        _check_int("noise", "num_train_timesteps", self.num_train_timesteps, 1)
        check(self.prediction_type in PREDICTION_TYPES,
              f"noise prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}")


@dataclasses.dataclass
class OptimConfig:
    """AdamW with a learning-rate schedule (diffusers ``get_scheduler`` names) and gradient clipping."""

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
            setattr(self, name, _as_number("optim", name, getattr(self, name)))
        _check_int("optim", "lr_warmup_steps", self.lr_warmup_steps, 0)
        if self.max_grad_norm is not None:
            self.max_grad_norm = _as_number("optim", "max_grad_norm", self.max_grad_norm)


@dataclasses.dataclass
class EMASettings:
    """diffusers ``EMAModel`` options; with ``use_ema_warmup`` the decay is 1 - (1 + step/inv_gamma)^-power, capped at ``decay``."""

    decay: float = 0.9999
    use_ema_warmup: bool = True
    inv_gamma: float = 1.0
    power: float = 0.75
    update_after_step: int = 0

    def __post_init__(self) -> None:
        self.decay = _as_number("ema", "decay", self.decay)
        check(self.decay <= 1.0, f"ema decay must be between 0 and 1, got {self.decay!r}")
        check(isinstance(self.use_ema_warmup, bool), f"ema use_ema_warmup must be true or false, got {self.use_ema_warmup!r}")
        self.inv_gamma = _as_number("ema", "inv_gamma", self.inv_gamma)
        self.power = _as_number("ema", "power", self.power)
        _check_int("ema", "update_after_step", self.update_after_step, 0)


TRACK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
RAW_TRACK, BASE_TRACK, BASE_WINDOW, DELAYED_SUFFIX = "raw", "ema", "lawa", "@delayed"


def _check_name(where: str, name: Any) -> None:
    check(isinstance(name, str) and TRACK_NAME_RE.match(name) is not None and name != RAW_TRACK,
          f"{where} name must be letters, digits, '_', '.' or '-' (not 'raw'), got {name!r}; "
          "it names the variant, its checkpoint folder and its metrics rows")


SIGMA_REL_MAX = (1.0 / 12.0) ** 0.5  # σ_rel of a power-function EMA at γ = 0 (the uniform mean): 0.2887


@dataclasses.dataclass
class EMATrackConfig:
    """An EMA track kept beside diffusers' warm-up EMA (``ema_tracks:`` entry).

    name: the track's name (variant, ``unet_ema_<name>/`` in checkpoints, ``over:`` of LAWA windows).
    Exactly one of
    decay: constant decay d in [0, 1) (mean lag d / (1 - d) steps);
    half_life: steps after which an update's weight has halved (decay 0.5 ** (1 / half_life));
    sigma_rel: a power-function EMA (EDM2) of this relative spread, 0 < sigma_rel < 0.2887 (0.05 to 0.15
        are usual; gamma from sigma_rel by EDM2's closed form);
    gamma: a power-function EMA of this exponent (> 0): decay (1 - 1/t)^(gamma + 1) at its t-th update.
    The first update copies the weights (diffusers' EMAModel); a constant-decay track then keeps its decay.
    """

    name: str
    decay: Optional[float] = None
    half_life: Optional[float] = None
    sigma_rel: Optional[float] = None
    gamma: Optional[float] = None

    def __post_init__(self) -> None:
        _check_name("ema_tracks", self.name)
        where = f"ema_tracks {self.name!r}"
        given = {k: getattr(self, k) for k in ("decay", "half_life", "sigma_rel", "gamma") if getattr(self, k) is not None}
        check(len(given) == 1, f"{where} needs exactly one of decay, half_life, sigma_rel and gamma, got "
                               f"{', '.join(f'{k}={v!r}' for k, v in given.items()) or 'none'}")
        if self.decay is not None:
            self.decay = _as_number(where, "decay", self.decay, minimum=float("-inf"))
            check(0.0 <= self.decay < 1.0, f"{where} decay must be >= 0 and < 1, got {self.decay!r}; "
                                           "use e.g. 0.99 (mean lag 99 steps)")
        elif self.half_life is not None:
            self.half_life = _as_number(where, "half_life", self.half_life, minimum=float("-inf"))
            check(self.half_life > 0, f"{where} half_life must be > 0 steps, got {self.half_life!r}")
        elif self.sigma_rel is not None:
            self.sigma_rel = _as_number(where, "sigma_rel", self.sigma_rel, minimum=float("-inf"))
            check(0.0 < self.sigma_rel < SIGMA_REL_MAX,
                  f"{where} sigma_rel must be > 0 and < {SIGMA_REL_MAX:.4f} (a power-function EMA's relative spread), "
                  f"got {self.sigma_rel!r}; use e.g. 0.05 or 0.10")
        else:
            self.gamma = _as_number(where, "gamma", self.gamma, minimum=float("-inf"))
            check(self.gamma > 0, f"{where} gamma must be > 0 (a power-function EMA's exponent), got {self.gamma!r}; "
                                  "use e.g. 6.94 (sigma_rel 0.10)")

    @property
    def power(self) -> bool:
        """True for a power-function EMA (``sigma_rel`` or ``gamma``)."""
        return self.sigma_rel is not None or self.gamma is not None

    @property
    def constant_decay(self) -> Optional[float]:
        """The constant decay of a decay / half_life track; None for a power-function EMA."""
        if self.power:
            return None
        return self.decay if self.decay is not None else 0.5 ** (1.0 / self.half_life)


POSTHOC_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class PosthocSnapshotConfig:
    """Snapshots of EMA tracks stored for averaging after the fact (``posthoc:`` section of a training config).

    tracks: the EMA tracks whose weights are stored ("ema" and names from ``ema_tracks``); null: every
        power-function track (``sigma_rel`` / ``gamma``), or ["ema"] when there is none.
    every_n_steps: store them every N optimizer steps (0: never), whatever LAWA's every_n_steps.
    dtype: the files' dtype, "float32" (the default: a synthesised average may weigh snapshots with
        coefficients well above 1, which multiply the storage rounding), "bfloat16" or "float16".
    Files: RUN/ema_snapshots/<track>/step-<step>.safetensors (RUN/ema_snapshots/ for "ema"), written by a
    background thread, each with the track's full definition in its metadata.
    """

    tracks: Optional[list] = None
    every_n_steps: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check(self.tracks is None or (isinstance(self.tracks, (list, tuple)) and bool(self.tracks)
                                      and all(isinstance(t, str) for t in self.tracks)),
              f"posthoc tracks must be null (every power-function EMA track) or a non-empty list of EMA track names, "
              f"got {self.tracks!r}")
        if self.tracks is not None:
            self.tracks = list(dict.fromkeys(self.tracks))
        _check_int("posthoc", "every_n_steps", self.every_n_steps, 0)
        check(self.dtype in POSTHOC_DTYPES,
              f"posthoc dtype must be one of {', '.join(POSTHOC_DTYPES)}, got {self.dtype!r}")

    @property
    def enabled(self) -> bool:
        return self.every_n_steps > 0


@dataclasses.dataclass
class LAWAWindowConfig(LAWAConfig):
    """A LAWA window kept beside the ``lawa:`` one (``lawa_windows:`` entry): the ``LAWAConfig`` options plus

    name: the window's name (variant, LAWA state file, ``<name>@delayed`` baseline).
    over: the EMA track it averages ("ema", a name from ``ema_tracks``) or "raw" (the trained weights).
    """

    name: str = ""
    over: str = BASE_TRACK

    def __post_init__(self) -> None:
        _check_name("lawa_windows", self.name)
        check(isinstance(self.over, str), f"lawa_windows {self.name!r} over must be a track name or 'raw', "
                                          f"got {self.over!r}")
        try:
            super().__post_init__()
        except ValueError as e:  # "lawa k must be ..." -> "lawa_windows 'w' k must be ..."
            raise ValueError(str(e).replace("lawa ", f"lawa_windows {self.name!r} ", 1)) from None

    def lawa_config(self) -> LAWAConfig:
        """The window's engine options (without name and over)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(LAWAConfig)}
        return LAWAConfig(**values)


def _with_disk_dir(values: Any, folder: str) -> Any:
    """A LAWA mapping with ``storage: disk`` and no snapshot_dir gets ``folder``."""
    if isinstance(values, Mapping) and values.get("storage") == "disk" and not values.get("snapshot_dir"):
        return {**values, "snapshot_dir": folder}
    return values


@dataclasses.dataclass
class EvalConfig(FIDConfig):
    """FID/KID tracking during training: the ``FIDConfig`` options plus when and what to evaluate.

    Every variant is sampled from the same noise (``seed``) at every evaluation.
    every_n_steps: evaluate every N optimizer steps (0: not during training).
    at_end: also evaluate after the last step.
    variants: the weights to evaluate: raw, ema, lawa, the names of ``ema_tracks`` and ``lawa_windows``, and
        "<window>@delayed" (the window's EMA snapshot nearest its mean lag: the pure-delay baseline); a window
        and its baseline once it holds min_snapshots. null: every variant but raw.
    reference_num_images: use only this many reference images for the statistics (null: all).
    inception_weights: FID Inception weights file (null: the resolved default, see ``lawa-diffusion inception info``).
    background_metrics: run the FID/KID maths (CPU) in a background thread while training goes on; the
        rows are written in step order, and all of them before each checkpoint. Same numbers either way.
        null: on when training runs on a GPU, off on CPU-only training (there the maths compete with
        training for the same cores: 1.1x slower in benchmarks/bench_eval.py on 2 cores).
    """

    every_n_steps: int = 1000
    at_end: bool = True
    variants: Optional[list] = None
    reference_num_images: Optional[int] = None
    inception_weights: Optional[str] = None
    background_metrics: Optional[bool] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("eval", "every_n_steps", self.every_n_steps, 0)
        check(self.background_metrics is None or isinstance(self.background_metrics, bool),
              f"eval background_metrics must be true, false or null, got {self.background_metrics!r}")
        _check_int("eval", "reference_num_images", self.reference_num_images, 2, allow_none=True)
        check(isinstance(self.at_end, bool), f"eval at_end must be true or false, got {self.at_end!r}")
        check(self.variants is None or (isinstance(self.variants, (list, tuple)) and bool(self.variants)
                                        and all(isinstance(v, str) for v in self.variants)),
              f"eval variants must be null (all) or a non-empty list of variant names, got {self.variants!r}")
        if self.variants is not None:
            self.variants = list(self.variants)

    def select_variants(self, known: Sequence[str]) -> None:
        """Resolve ``variants`` against the run's ``known`` names (in that order); null means all but raw."""
        if self.variants is None:
            self.variants = [v for v in known if v != "raw"]
        unknown = [v for v in self.variants if v not in known]
        check(not unknown, f"eval variants names unknown variant(s) {', '.join(map(repr, unknown))}; this run has "
                           f"{', '.join(known)}")
        self.variants = [v for v in known if v in self.variants]


LAWA_SNAPSHOT_DIR = "lawa_snapshots"


def _as_list(values: Any, where: str) -> list:
    values = [] if values is None else values
    check(isinstance(values, (list, tuple)), f"{where} must be a list of mappings, got {values!r}")
    return list(values)


def _entries(values: Any, cls: type, where: str) -> list:
    """Each entry of the list ``values`` as a ``cls`` (mappings are checked for unknown keys)."""
    return [v if isinstance(v, cls) else from_mapping(cls, v, f"{where}[{i}]")
            for i, v in enumerate(_as_list(values, where))]


TRAIN_SECTIONS = {"data": DataConfig, "noise": NoiseConfig, "optim": OptimConfig, "ema": EMASettings,
                  "lawa": LAWAConfig, "eval": EvalConfig, "posthoc": PosthocSnapshotConfig}


@dataclasses.dataclass
class TrainConfig:
    """``lawa-diffusion train``: a diffusers UNet2DModel trained with EMA and LAWA over it.

    model: UNet2DModel keyword arguments (the whole mapping; diffusers' defaults fill what is left out).
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
        self.lawa = _with_disk_dir(self.lawa, disk_dir)
        for name, cls in TRAIN_SECTIONS.items():
            value = getattr(self, name)
            if value is None:
                setattr(self, name, cls())
            elif not isinstance(value, cls):
                setattr(self, name, from_mapping(cls, value, f"train config section {name!r}"))
        check(isinstance(self.model, Mapping), f"train config model must be a mapping of UNet2DModel arguments, got {self.model!r}")
        self.model = dict(self.model)
        self.ema_tracks = _entries(self.ema_tracks, EMATrackConfig, "ema_tracks")
        self.lawa_windows = _entries([_with_disk_dir(w, disk_dir) for w in _as_list(self.lawa_windows, "lawa_windows")],
                                     LAWAWindowConfig, "lawa_windows")
        self._check_track_names()
        self._resolve_posthoc_tracks()
        self.eval.select_variants(self.variant_names())
        _check_int("train config", "seed", self.seed, 0)
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "log_every_n_steps"):
            _check_int("train config", name, getattr(self, name), 1)
        _check_int("train config", "checkpointing_steps", self.checkpointing_steps, 0)
        _check_int("train config", "checkpoints_total_limit", self.checkpoints_total_limit, 1, allow_none=True)
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
        for kind, entries in (("EMA track", self.ema_tracks), ("LAWA window", self.lawa_windows)):
            for entry in entries:
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
            self.posthoc.tracks = [t.name for t in self.ema_tracks if t.power] or [BASE_TRACK]
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
