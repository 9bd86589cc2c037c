"""Atomic file writing: temp file in the same folder, fsync, rename, fsync the folder.

A reader never sees a partial file: either the old content or the new one. ``BackgroundWriter`` runs
such writes in order on one thread, off the training thread.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import tempfile
import threading
from typing import Callable, Iterator, Optional


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then move the finished file to ``path`` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    def write(tmp: str) -> None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)

    atomic_write(path, write)


def link_or_copy_atomic(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link ``src`` to ``dst`` (no bytes copied), falling back to an atomic copy across file systems."""
    src, dst = os.fspath(src), os.fspath(dst)
    tmp = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.{os.getpid()}.tmp")
    try:
        if os.path.exists(tmp):
            os.unlink(tmp)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        atomic_write(dst, lambda t: shutil.copyfile(src, t))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line and fsync (a crash leaves at most a final partial line, which readers skip)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temp folder next to ``path``; on success it replaces ``path`` in one rename.

    Refuses an existing ``path`` unless ``overwrite``; on error the temp folder is removed and
    ``path`` is untouched.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"output {path!r} already exists; choose another path or pass --overwrite")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    try:
        yield tmp
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        if os.path.exists(path):
            old = path + ".old." + os.path.basename(tmp)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file, skipping a torn final line left by a crash."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # torn last line
                break
            raise ValueError(f"{os.fspath(path)!r} line {i + 1} is not valid JSON; repair or remove that line") from None
    return rows


class BackgroundWriter:
    """Runs jobs (callables that write files) in submission order on one daemon thread.

    A job's exception is kept and raised, as ``OSError`` naming ``what``, by the next ``submit``, ``sync``
    or ``close``; ``sync`` waits until every submitted job has run.
    """

    def __init__(self, name: str, what: str):
        self.what = what
        self.queue: "queue.Queue" = queue.Queue()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            try:
                if job is None:
                    return
                job()
            except BaseException as e:  # surfaced on the calling thread by check()
                if self.error is None:
                    self.error = e
            finally:
                self.queue.task_done()

    def check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise OSError(f"{self.what} failed: {err}") from err

    def submit(self, job: Callable[[], None]) -> None:
        self.check()
        self.queue.put(job)

    def sync(self) -> None:
        self.queue.join()
        self.check()

    def close(self) -> None:
        try:
            self.sync()
        finally:
            if self.thread.is_alive():
                self.queue.put(None)
                self.thread.join()


def cache_root() -> str:
    """Cache folder for derived data (reference statistics): ``$LAWA_CACHE_DIR`` or ``~/.cache/lawa_diffusion``."""
    return os.environ.get("LAWA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "lawa_diffusion")
