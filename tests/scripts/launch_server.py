"""A fork server of ``python -m lawa_diffusion.launch`` for tests that start many short plugin runs.

It imports torch, diffusers, accelerate and the launch plugin once, then for each JSON request line on stdin
({"argv": [...], "env": {...}, "log": path, "stdout": path (optional)}) forks a fresh child that runs
``lawa_diffusion.launch.main(argv)`` as ``python -m lawa_diffusion.launch ARGV`` would (its exit code is the
process's), and answers {"pid": ...} and then {"pid": ..., "returncode": ...} (negative: killed by that signal).
The child's stderr goes to ``log``, its stdout to ``stdout`` when given (a file, or a FIFO the test reads line by
line), else to ``log`` too. The parent never runs a script, so each child starts from the state a fresh process has after the
imports. Start it with the environment the runs need before torch is imported (OMP_NUM_THREADS).

The protocol is tests/scripts/fork_server.py's (tests.helpers.ForkServer is the client).
"""
from __future__ import annotations

import sys


def serve() -> int:
    import accelerate  # noqa: F401  (imported once here, inherited by every child)
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from diffusers import DDPMScheduler, UNet2DModel  # noqa: F401
    from diffusers.training_utils import EMAModel  # noqa: F401

    import lawa_diffusion.launch  # noqa: F401
    from lawa_diffusion.launch import main
    from fork_server import serve as fork_server  # beside this script (its folder leads sys.path)

    return fork_server(main)


if __name__ == "__main__":
    sys.exit(serve())
