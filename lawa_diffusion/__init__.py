"""LAWA (Latest Weight Averaging) over the EMA weights of diffusers training."""
from lawa_diffusion.config import LAWAConfig
from lawa_diffusion.lawa import LAWA

__version__ = "0.1.0"


def __getattr__(name):
    # Heavier pieces are imported on first use so that ``import lawa_diffusion`` stays light.
    if name == "LAWAEMAModel":
        from lawa_diffusion.ema import LAWAEMAModel

        return LAWAEMAModel
    if name == "PowerEMAModel":
        from lawa_diffusion.ema import PowerEMAModel

        return PowerEMAModel
    if name == "PosthocSnapshots":
        from lawa_diffusion.posthoc_store import PosthocSnapshots

        return PosthocSnapshots
    if name == "attach":
        from lawa_diffusion.accelerate_hooks import attach

        return attach
    raise AttributeError(f"module 'lawa_diffusion' has no attribute {name!r}")


__all__ = ["LAWA", "LAWAConfig", "LAWAEMAModel", "PosthocSnapshots", "PowerEMAModel", "attach", "__version__"]
