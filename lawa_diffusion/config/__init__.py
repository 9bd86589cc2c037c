"""Every option and default of lawa_diffusion, one module per section (one home for every default).

- ``base``: validation (``check``) and loading helpers shared by every section;
- ``lawa``: ``LAWAConfig`` (the window) and its choices;
- ``tracks``: EMA tracks, LAWA windows and post-hoc snapshot storage;
- ``fid``: ``FIDConfig`` / ``EvalConfig`` (FID/KID evaluation);
- ``launch``: ``LaunchConfig`` (the launch plugin's options besides the window);
- ``commands``: defaults of the report and after-training commands;
- ``train``: ``TrainConfig`` and loading it from YAML with overrides.

This face re-exports them all (``from lawa_diffusion.config import TrainConfig, check``); code inside the
package imports the submodules.
"""

from lawa_diffusion.config.base import as_list, as_number, check, check_int, entries, from_mapping, read_yaml  # noqa: F401
from lawa_diffusion.config.commands import PosthocConfig, ReportConfig  # noqa: F401
from lawa_diffusion.config.fid import FID_RESIZE_MODES, FID_SCHEDULERS, EvalConfig, FIDConfig  # noqa: F401
from lawa_diffusion.config.launch import LaunchConfig  # noqa: F401
from lawa_diffusion.config.lawa import DTYPES, NONFINITE_POLICIES, SNAPSHOT_RANKS, STORAGE_MODES, LAWAConfig  # noqa: F401
from lawa_diffusion.config.tracks import (  # noqa: F401
    BASE_TRACK,
    BASE_WINDOW,
    DELAYED_SUFFIX,
    POSTHOC_DTYPES,
    RAW_TRACK,
    SIGMA_REL_MAX,
    TRACK_NAME_RE,
    EMASettings,
    EMATrackConfig,
    LAWAWindowConfig,
    PosthocSnapshotConfig,
    with_disk_dir,
)
from lawa_diffusion.config.train import (  # noqa: F401
    FAST_PATH,
    LAWA_SNAPSHOT_DIR,
    MIXED_PRECISION,
    PREDICTION_TYPES,
    TRAIN_SECTIONS,
    DataConfig,
    NoiseConfig,
    OptimConfig,
    TrainConfig,
    load_train_config,
    merge_mappings,
    parse_overrides,
)

__all__ = [
    "check",
    "from_mapping",
    "read_yaml",
    "check_int",
    "as_number",
    "as_list",
    "entries",
    "STORAGE_MODES",
    "DTYPES",
    "NONFINITE_POLICIES",
    "SNAPSHOT_RANKS",
    "LAWAConfig",
    "FID_SCHEDULERS",
    "FID_RESIZE_MODES",
    "FIDConfig",
    "EvalConfig",
    "EMASettings",
    "TRACK_NAME_RE",
    "RAW_TRACK",
    "BASE_TRACK",
    "BASE_WINDOW",
    "DELAYED_SUFFIX",
    "SIGMA_REL_MAX",
    "EMATrackConfig",
    "POSTHOC_DTYPES",
    "PosthocSnapshotConfig",
    "LAWAWindowConfig",
    "with_disk_dir",
    "LaunchConfig",
    "ReportConfig",
    "PosthocConfig",
    "MIXED_PRECISION",
    "PREDICTION_TYPES",
    "FAST_PATH",
    "DataConfig",
    "NoiseConfig",
    "OptimConfig",
    "LAWA_SNAPSHOT_DIR",
    "TRAIN_SECTIONS",
    "TrainConfig",
    "parse_overrides",
    "merge_mappings",
    "load_train_config",
]
