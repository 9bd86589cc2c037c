"""Atomic file writing: temp file in the same folder, fsync, rename, fsync the folder.

A reader never sees a partial file: either the old content or the new one. ``BackgroundWriter`` runs
such writes in order on one thread, off the training thread.

Output folders: every folder a command writes as its output holds :data:`MARKER_NAME`, naming the command
(``write_marker``). :func:`check_output_dir` is the one guard of an output path: it refuses an empty path, the
root, home and current folders (and any folder that holds them), the folders a command reads from (and any
that holds them), and an existing folder without the marker, even with ``--overwrite``; :func:`atomic_dir`
never replaces a folder without it either. Safetensors files carry a checksum (:mod:`.checksums`).
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import tempfile
import threading
from typing import Callable, Iterable, Iterator, List, Optional, Tuple

from lawa_diffusion.utils.checksums import CHECKSUM_KEY, tensors_checksum

MARKER_NAME = ".lawa-diffusion.json"
MARKER_FORMAT = "lawa-diffusion-output/1"
# outputs written before the marker existed, known by a file they hold: (file, text in it or None, kind)
LEGACY_SIGNS = (("synthesis.json", None, "synthesize"), ("config.json", '"_lawa"', "model folder"),
                ("report.json", "lawa-diffusion-report/", "report"), ("sweep.json", "lawa-diffusion-sweep/", "sweep"),
                ("hindsight.json", "lawa-diffusion-hindsight/", "hindsight"), ("hindsight.jsonl", None, "hindsight"))
# kinds of output that are diffusers model folders: any of them may replace another (with --overwrite)
MODEL_FOLDER_KINDS = ("synthesize", "average", "lawa", "model folder")
RUN_KIND = "train"  # a training run folder: the output of no other command


def fsync_dir(path: str) -> None:
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


_UMASK: list = []


def user_mode(directory: bool = False) -> int:
    """The mode a file (or folder) the user creates gets under their umask: temp files and folders start private
    (0600 / 0700), so what is moved into place gets this mode first. The umask is read from /proc (changing it
    to read it would race with other threads creating files)."""
    if not _UMASK:
        umask = None
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                umask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
        except OSError:
            pass
        if umask is None:  # no /proc: read it the only portable way (once)
            umask = os.umask(0o022)
            os.umask(umask)
        _UMASK.append(umask)
    return (0o777 if directory else 0o666) & ~_UMASK[0]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], needed: Optional[int] = None) -> None:
    """Call ``write(tmp_path)`` then move the finished file to ``path`` atomically.

    An error while writing names ``path`` (never the hidden temp file) and, when given, the ``needed`` bytes
    (``os_errors.describe`` says them for a full disk); the temp file is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as e:
        raise named_os_error(e, path, needed) from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, user_mode())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        error = named_os_error(e, path, needed) if isinstance(e, Exception) else None
        if error is not None and error is not e:
            raise error from e
        raise
    fsync_dir(folder)


def named_os_error(error: BaseException, path: str, needed: Optional[int] = None) -> BaseException:
    """``error`` as an ``OSError`` naming ``path`` when it is an input/output failure (a library's own error
    that wraps one too: safetensors' "os error 28", torch's failed stream write); else ``error`` unchanged."""
    from lawa_diffusion.utils.os_errors import as_os_error

    found = as_os_error(error, path)
    if found is None:
        return error
    if needed is not None and getattr(found, "bytes_needed", None) is None:
        found.bytes_needed = needed
    return found


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write, needed=len(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None) -> None:
    """Write ``tensors`` as a safetensors file, atomically, with a checksum under :data:`CHECKSUM_KEY` added to
    ``metadata`` (:func:`.checksums.tensors_checksum`), which :func:`.checksums.verified_metadata` and
    :func:`.checksums.load_safetensors` check when the file is read back."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = dict(metadata or {})
    digest = tensors_checksum(tensors, metadata)
    if digest is not None:
        metadata[CHECKSUM_KEY] = digest
    needed = (sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(metadata))
              + 64 * (len(tensors) + 1))

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata=metadata)

    atomic_write(path, write, needed=needed)


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
    text = line.rstrip("\n") + "\n"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise named_os_error(e, os.fspath(path), len(text.encode("utf-8"))) from e


# ----------------------------------------------------------------------------- output folders
def write_marker(folder: str | os.PathLike, kind: str) -> str:
    """Mark ``folder`` as an output of the command ``kind`` (its :data:`MARKER_NAME`); returns the marker's path."""
    path = os.path.join(os.fspath(folder), MARKER_NAME)
    atomic_write_json(path, {"format": MARKER_FORMAT, "kind": kind})
    return path


def output_kind(folder: str | os.PathLike) -> Optional[str]:
    """The command that wrote ``folder`` (its marker, or a file that only such an output holds); None: not one."""
    folder = os.fspath(folder)
    try:
        with open(os.path.join(folder, MARKER_NAME), encoding="utf-8") as f:
            marker = json.load(f)
        if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT:
            return str(marker.get("kind"))
    except (OSError, ValueError):
        pass
    for name, text, kind in LEGACY_SIGNS:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if text is None:
            return kind
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                if text in f.read(1 << 20):
                    return kind
        except OSError:
            pass
    return None


def _holds(folder: str, path: str) -> bool:
    """Whether ``folder`` is ``path`` or one of its parents (both real, absolute paths)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def check_output_place(path: Optional[str | os.PathLike], option: str, protected: Iterable[str] = ()) -> str:
    """The absolute path of an output ``path`` given as ``option``, refused (``ValueError``, one sentence) when it
    is empty, the root, home or current folder or holds one of them, or is or holds a ``protected`` path."""
    text = "" if path is None else os.fspath(path)
    if not text.strip():
        raise ValueError(f"{option} is empty; pass the path of a new folder to write, e.g. {option} out/")
    full = _real(text)
    if full == os.sep:
        raise ValueError(f"{option} {text!r} is the root folder; pass the path of a new folder to write")
    above = os.path.dirname(full)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise NotADirectoryError(f"{option} {text!r} lies under {above!r}, which is a file; choose a path whose "
                                 "parents are folders")
    for place, what in ((_real(os.getcwd()), "the current folder"), (_real("~"), "your home folder")):
        if _holds(full, place):
            held = what if full == place else f"a folder that holds {what} ({place})"
            raise ValueError(f"{option} {text!r} is {held}, which is never replaced; pass the path of a new folder "
                             "to write, e.g. a name inside it")
    for source in protected:
        real = _real(os.fspath(source))
        if _holds(full, real):
            held = "the folder" if full == real else f"a folder that holds {real!r},"
            raise ValueError(f"{option} {text!r} is {held} this command reads from; pass a new folder to write, "
                             f"e.g. {os.path.join(os.fspath(source), 'out')!r}")
    return os.path.abspath(text)


def check_output_dir(path: Optional[str | os.PathLike], option: str, overwrite: bool = False, *, kind: str,
                     protected: Iterable[str] = (), refresh: bool = False,
                     legacy: Optional[Callable[[str], bool]] = None) -> str:
    """The one guard of an output folder ``path`` (given as ``option``) before any work; returns its absolute path.

    Refused: what :func:`check_output_place` refuses; an existing file; an existing folder that is not empty and
    was not written by this package (no marker, nor ``legacy(path)``), even with ``overwrite``; an existing
    output without ``overwrite``, unless ``refresh`` and it is one of the same ``kind`` (a report refreshed)."""
    full = check_output_place(path, option, protected)
    if not os.path.lexists(full):
        return full
    shown = os.fspath(path)
    if not os.path.isdir(full):
        raise FileExistsError(f"{option} {shown!r} is a file, not a folder; pass the path of a folder to write")
    found = output_kind(full) or (kind if legacy is not None and legacy(full) else None)
    if found == RUN_KIND and kind != RUN_KIND:
        raise FileExistsError(f"{option} {shown!r} is a training run folder, which is never replaced nor written "
                              "into as another command's output; choose a new folder")
    if found is None and os.listdir(full):
        raise FileExistsError(f"{option} {shown!r} already exists and was not written by lawa-diffusion (it holds no "
                              f"{MARKER_NAME}); it is never replaced, not even with --overwrite: choose a new folder")
    if not overwrite and not (refresh and found == kind):
        raise FileExistsError(f"{option} {shown!r} already exists; choose another path or pass --overwrite")
    return full


def replaceable(path: str, kind: Optional[str] = None) -> bool:
    """Whether :func:`atomic_dir` may replace the existing ``path`` with an output of ``kind`` (None: a model
    folder): an empty folder, or one this package wrote as an output of that kind (model folders: any of
    :data:`MODEL_FOLDER_KINDS`)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    found = output_kind(path)
    if found is None:
        return not os.listdir(path)
    kinds = MODEL_FOLDER_KINDS if (kind or "model folder") in MODEL_FOLDER_KINDS else (kind,)
    return found in kinds


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, kind: Optional[str] = None) -> Iterator[str]:
    """Yield a temp folder next to ``path``; on success it replaces ``path`` in one rename.

    Refuses an existing ``path`` unless ``overwrite``, and always one this package did not write as an output of
    the same sort (:func:`replaceable`) or that is the root, home or current folder (or holds one); ``kind``: mark
    the new folder as written by that command (None: an unmarked model folder). On error the temp folder is removed and ``path`` is untouched; an input/output error names
    ``path``, not the temp folder.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        if not overwrite:
            raise FileExistsError(f"output {path!r} already exists; choose another path or pass --overwrite")
        check_output_place(path, "output")
        if not replaceable(path, kind):
            raise FileExistsError(f"output {path!r} exists and is not a {kind or 'model'} folder lawa-diffusion wrote "
                                  f"(its {MARKER_NAME} says otherwise or it has none); it is never replaced: choose "
                                  "another path")
    parent = os.path.dirname(path)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    except OSError as e:
        raise named_os_error(e, path) from e
    try:
        yield tmp
        if kind is not None:
            write_marker(tmp, kind)
        for root, _, names in os.walk(tmp):
            for name in names:
                with open(os.path.join(root, name), "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(tmp, user_mode(directory=True))
        if os.path.exists(path):
            old = path + ".old." + os.path.basename(tmp)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = named_os_error(e, path) if isinstance(e, Exception) else None
        if error is not None and error is not e:
            raise error from e
        raise


def check_output_file(path: Optional[str | os.PathLike], option: str, overwrite: bool = False) -> Optional[str]:
    """The guard of an output file (None: no file asked for): refuses an empty path, a folder, a path under a
    file, and an existing file without ``overwrite``; returns its absolute path."""
    if path is None:
        return None
    text = os.fspath(path)
    if not text.strip():
        raise ValueError(f"{option} is empty; pass the path of a file to write, or leave {option} out")
    full = os.path.abspath(text)
    if os.path.isdir(full):
        raise FileExistsError(f"{option} {text!r} is a folder; pass the path of a file to write inside it")
    parent = os.path.dirname(full)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise NotADirectoryError(f"{option} {text!r} lies under {parent!r}, which is a file; choose a path whose "
                                 "parents are folders")
    if os.path.lexists(full) and not overwrite:
        raise FileExistsError(f"{option} {text!r} already exists; choose another path or pass --overwrite")
    return full


# ----------------------------------------------------------------------------- JSON lines
def read_jsonl_rows(path: str | os.PathLike) -> List[Tuple[int, dict]]:
    """(line number, row) of every JSON object of a JSON-lines file; a line that is not one (a torn last line
    left by a crash, a damaged or foreign line) is skipped with one warning naming the file and the line."""
    from lawa_diffusion.utils.output import warn

    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not UTF-8 text (byte {e.start} cannot be decoded); it is not a JSON-lines "
                         "file this package wrote: restore it or pass another folder") from None
    rows = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            what = "is unfinished (a write cut short)" if i == last else "is not valid JSON"
            warn(f"{path}: line {i + 1} {what}; skipped", stacklevel=2)
            continue
        if not isinstance(row, dict):
            warn(f"{path}: line {i + 1} holds a JSON {type(row).__name__}, not a row (an object); skipped",
                 stacklevel=2)
            continue
        rows.append((i + 1, row))
    return rows


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The rows of a JSON-lines file (see :func:`read_jsonl_rows`: lines that are not rows are skipped, said)."""
    return [row for _, row in read_jsonl_rows(path)]


class BackgroundWriter:
    """Runs jobs (callables that write files) in submission order on one daemon thread.

    A job's exception is kept and raised by the next ``submit``, ``sync`` or ``close``: an input/output error as
    itself (the path it names, its errno), any other as ``OSError`` naming ``what``; ``sync`` waits until every
    submitted job has run.
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
            from lawa_diffusion.utils.os_errors import as_os_error

            found = as_os_error(err)
            if found is not None and found.errno is not None:
                raise found  # its path and errno (a full disk, a permission) say what happened
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
