"""The ``lawa-diffusion`` commands: one thin module per command (its parser and a call into the library)."""
from lawa_diffusion.cli.entry import main

__all__ = ["main"]
