"""A fork server of ``python -m lawa_diffusion.launch`` for tests that start many short plugin runs.

It imports torch, diffusers, accelerate and the launch plugin once, then for each JSON request line on stdin
({"argv": [...], "env": {...}, "log": path, "stdout": path (optional)}) forks a fresh child that runs
``lawa_diffusion.launch.main(argv)`` as ``python -m lawa_diffusion.launch ARGV`` would (its exit code is the
process's), and answers {"pid": ...} and then {"pid": ..., "returncode": ...} (negative: killed by that signal).
The child's stderr goes to ``log``, its stdout to ``stdout`` when given (a file, or a FIFO the test reads line by
line), else to ``log`` too. The parent never runs a script, so each child starts from the state a fresh process has after the
imports. Start it with the environment the runs need before torch is imported (OMP_NUM_THREADS).

The protocol is that of ``engine_train.py --serve`` (tests.helpers.ForkServer is the client).
"""
from __future__ import annotations

import json
import os
import sys
import traceback


def _child(request: dict) -> None:
    rc = 1
    try:
        # stdout first: a reader waiting on a FIFO is let go before anything else can fail
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if request.get("stdout") else None
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        out = log if out is None else out
        os.dup2(out, 1)
        os.dup2(log, 2)
        os.environ.update(request.get("env", {}))
        from lawa_diffusion.launch import main

        rc = main(request["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc or 0)


def serve() -> int:
    import accelerate  # noqa: F401  (imported once here, inherited by every child)
    import numpy  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from diffusers import DDPMScheduler, UNet2DModel  # noqa: F401
    from diffusers.training_utils import EMAModel  # noqa: F401

    import lawa_diffusion.launch  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(serve())
