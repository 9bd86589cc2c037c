"""Resume: a run killed after a checkpoint and restarted ends with LAWA weights bitwise equal to an
uninterrupted run, for each storage mode; a model of another shape is refused on resume.

Training processes run ``tests/scripts/engine_train.py``. They are forked from a server process that
has imported torch, diffusers and accelerate once (see ``--serve`` there), so each run is a fresh
process without paying the import time again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "engine_train.py"
ENGINES = ("lawa_device_main", "lawa_cpu_main", "lawa_disk_main")
# 40 steps, a checkpoint every 8 (two kept), LAWA k=3 every 2 steps over the same EMA in the three storages.
BASE_ARGS = ["--steps", "40", "--checkpoint_every", "8", "--k", "3", "--every", "2", "--lawa", "device,cpu,disk"]
RUN_TIMEOUT_S = 300


class EngineServer:
    """Client of ``engine_train.py --serve``: start one training child at a time, kill it, wait for it."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.stderr = open(log_dir / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)
        self.lines: "queue.Queue[dict]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next(RUN_TIMEOUT_S).get("ready"), "engine server did not start"
        self.count = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put({"eof": True})

    def _next(self, timeout: float) -> dict:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"engine server gave no answer in {timeout} s; see {self.log_dir}") from None
        assert "eof" not in msg, f"engine server ended; see {self.log_dir / 'server.log'}"
        return msg

    def start(self, argv: list[str], env: dict | None = None) -> tuple[int, Path]:
        """Fork a training child; returns (pid, its log file)."""
        self.count += 1
        log = self.log_dir / f"run{self.count}.log"
        self.proc.stdin.write(json.dumps({"argv": argv, "env": env or {}, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return self._next(RUN_TIMEOUT_S)["pid"], log

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        """The child's exit code (negative: the signal that ended it)."""
        return self._next(timeout)["returncode"]

    def run(self, argv: list[str], env: dict | None = None) -> int:
        self.start(argv, env)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()  # the server holds nothing to flush: end it at once
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()


_SERVER: list = []  # one server for the whole session, whichever test module asks first


@pytest.fixture(scope="session")
def engine_server(tmp_path_factory):
    if not _SERVER:
        _SERVER.append(EngineServer(tmp_path_factory.mktemp("engine-server")))
    yield _SERVER[0]
    if _SERVER:
        _SERVER.pop().close()


def log_text(server: EngineServer) -> str:
    return (server.log_dir / f"run{server.count}.log").read_text(errors="replace")[-4000:]


def run_ok(server: EngineServer, argv: list[str], env: dict | None = None) -> None:
    rc = server.run(argv, env)
    assert rc == 0, f"training run failed with exit code {rc}:\n{log_text(server)}"


def read_weights(run_dir: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    name = "weights.safetensors" if rank == 0 else f"weights_rank{rank}.safetensors"
    return load_file(str(run_dir / "final" / name))


def read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def reference_run(server: EngineServer, tmp_path_factory, argv: list[str]) -> Path:
    """An uninterrupted run of ``argv`` (cached for the whole test session)."""
    key = hashlib.sha256(json.dumps(argv).encode()).hexdigest()[:12]
    run_dir = tmp_path_factory.getbasetemp() / f"engine-reference-{key}"
    if not (run_dir / "final" / "weights.safetensors").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        events = tmp_path_factory.getbasetemp() / f"engine-reference-{key}.events"
        run_ok(server, ["--output_dir", str(run_dir)] + argv, {"LAWA_TEST_EVENTS": str(events)})
    return run_dir


def load_script():
    spec = importlib.util.spec_from_file_location("engine_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_resume_after_a_crash_is_bitwise_equal_for_each_storage(engine_server, tmp_path_factory, tmp_path):
    reference = read_weights(reference_run(engine_server, tmp_path_factory, BASE_ARGS))
    run_dir, events = tmp_path / "run", tmp_path / "events.jsonl"
    argv = ["--output_dir", str(run_dir)] + BASE_ARGS
    env = {"LAWA_TEST_EVENTS": str(events)}
    # killed abruptly at step 21: checkpoints 8 and 16 exist, disk snapshots 18 and 20 were written after
    assert engine_server.run(argv + ["--crash_after_step", "21"], env) == 3, log_text(engine_server)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-8"]
    run_ok(engine_server, argv + ["--resume", "latest"], env)
    resumed = [e for e in read_events(events) if e["event"] == "resumed"][-1]
    assert resumed["step"] == 16
    assert all(steps == [12, 14, 16] for steps in resumed["snapshot_steps"].values())
    result = read_weights(run_dir)
    assert torch.equal(result["ema"], reference["ema"])
    for name in ENGINES:
        assert not torch.equal(reference[name], reference["ema"])  # the average is not the EMA itself
        assert torch.equal(result[name], reference[name]), f"{name}: resumed LAWA differs from the uninterrupted run"
    # the resumed disk window holds exactly the latest k snapshots: those of the crashed run are gone
    assert sorted(p.name for p in (run_dir / "snapshots").iterdir()) == [
        f"lawa_disk_main-step{s:09d}.safetensors" for s in (36, 38, 40)]


@pytest.mark.parametrize("change, message", [
    (["--channels", "8,32"], r"lawa source tensor \d+ has shape .* but the saved LAWA state has"),
    (["--layers_per_block", "2"], r"lawa source has \d+ tensors but the saved LAWA state has \d+"),
])
def test_resume_with_another_model_is_refused(engine_server, tmp_path_factory, tmp_path, change, message):
    from accelerate import Accelerator

    from lawa_diffusion import attach

    checkpoint = reference_run(engine_server, tmp_path_factory, BASE_ARGS) / "checkpoint-40"
    script = load_script()
    args = script.parse_args(["--output_dir", str(tmp_path)] + BASE_ARGS + change)
    unet = script.make_unet(args)
    _, engines = script.make_engines(args, unet)
    for lawa in engines:
        accelerator = Accelerator(cpu=True)
        attach(accelerator, lawa)
        with pytest.raises(ValueError, match=message):
            accelerator.load_state(str(checkpoint))
        lawa.close()
