"""The fork server behind ``engine_train.py --serve`` and ``launch_server.py``: heavy modules are imported once, then
each JSON request line on stdin ({"argv": [...], "env": {...}, "log": path, "stdout": path (optional)}) forks a fresh
child that runs ``main(argv)``, and the server answers {"pid": ...} and then {"pid": ..., "returncode": ...}
(negative: killed by that signal). The child's stderr goes to ``log``, its stdout to ``stdout`` when given (a file, or
a FIFO the test reads line by line), else to ``log`` too. tests.helpers.ForkServer is the client.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Callable, Sequence


def _child(request: dict, main: Callable[[Sequence[str]], int]) -> None:
    rc = 1
    try:
        # stdout first: a reader waiting on a FIFO is let go before anything else can fail
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if request.get("stdout") else None
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log if out is None else out, 1)
        os.dup2(log, 2)
        os.environ.update(request.get("env", {}))
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


def serve(main: Callable[[Sequence[str]], int]) -> int:
    """Answer requests until stdin ends (the caller has imported what every child should inherit)."""
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request, main)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    return 0
