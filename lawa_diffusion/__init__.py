"""LAWA (Latest Weight Averaging) over the EMA weights of diffusers training."""
from lawa_diffusion.config.lawa import LAWAConfig
from lawa_diffusion.engine.lawa import LAWA

__version__ = "0.2.0"

# Heavier pieces are imported on first use so that ``import lawa_diffusion`` stays light.
_LAZY = {
    "LAWAEMAModel": "lawa_diffusion.engine.ema",
    "PowerEMAModel": "lawa_diffusion.engine.ema",
    "PosthocSnapshots": "lawa_diffusion.engine.posthoc_snapshots",
    "attach": "lawa_diffusion.engine.accelerate_hooks",
    "save_checkpoint": "lawa_diffusion.engine.accelerate_hooks",
    "read_record": "lawa_diffusion.engine.lawa",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lawa_diffusion' has no attribute {name!r}")


__all__ = ["LAWA", "LAWAConfig", "LAWAEMAModel", "PosthocSnapshots", "PowerEMAModel", "attach", "read_record",
           "save_checkpoint", "__version__"]
