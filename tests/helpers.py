"""Builders shared by the tests: tiny models, runs, scripts run as processes (fixtures live in conftest.py)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest
import torch
import yaml
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from PIL import Image
from safetensors.torch import load_file
from scipy import stats

from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.engine.ema import PowerEMAModel
from lawa_diffusion.engine.posthoc_snapshots import save_ema_snapshot
from lawa_diffusion.evaluation.inception import stand_in_extractor
from lawa_diffusion.maths import lag
from lawa_diffusion.runs import folder as runfolder
from lawa_diffusion.training import trainer as train_mod
from lawa_diffusion.utils.files import atomic_save_safetensors

ROOT = Path(__file__).resolve().parents[1]  # the repository
SCRIPTS = ROOT / "tests" / "scripts"  # programs the tests run as processes


def tiny_unet(seed: int = 0, sample_size: int = 8, channels: int = 1):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
    )


def perturb_(params, generator: torch.Generator, scale: float = 0.01) -> None:
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * scale)


def relative_error(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-30)


def unflatten_with_flat_empties(flat, tensors):
    """``_unflatten_dense_tensors`` as some torch versions have it: a zero-element tensor comes back as shape [0]."""
    out, offset = [], 0
    for t in tensors:
        n = t.numel()
        out.append(torch.empty(0, dtype=flat.dtype) if n == 0 else flat[offset:offset + n].view(t.shape))
        offset += n
    return tuple(out)


def param_sum_metric(calls: list):
    """Stand-in metric: the float64 sum of all weights of each variant; records each call's variant names."""
    def evaluate(variants):
        calls.append(sorted(variants))
        out = {}
        for name, weights in variants.items():
            with weights() as model:
                total = sum(p.double().sum().item() for p in model.state_dict().values())
            out[name] = {"fid": total, "kid_mean": None, "kid_std": None, "num_samples": 0, "inception_sha256": "-"}
        return out
    return evaluate


def stepwise_power_ema(gamma: float, update_after_step: int, steps: int) -> dict:
    """Profiles after every step of a float64 EMA with β = (1 − 1/m)^(γ+1), m = n − update_after_step, fed
    θ_n = e_n (one-hot): the EMA vector is its own profile. β = 0 (a copy) while m <= 1."""
    e = np.zeros(steps + 1)
    e[0] = 1.0
    out = {}
    for n in range(1, steps + 1):
        m = n - update_after_step
        beta = 0.0 if m <= 1 else (1.0 - 1.0 / m) ** (gamma + 1.0)
        theta = np.zeros(steps + 1)
        theta[n] = 1.0
        e = beta * e + (1.0 - beta) * theta
        out[n] = e[: n + 1].copy()
    return out


NUM_IMAGES, BATCH, EPOCHS = 8, 2, 3


WEIGHTS = "diffusion_pytorch_model.safetensors"


# ----------------------------------------------------------------------------- helpers
def make_images(folder: Path, n: int = NUM_IMAGES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


@contextlib.contextmanager
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(Path(folder) / WEIGHTS)).items()}


def mean_of(folders: list[Path]) -> dict[str, torch.Tensor]:
    loaded = [weights(f) for f in folders]
    return {k: sum(w[k] for w in loaded) / len(loaded) for k in loaded[0]}


def assert_weights_close(actual: dict, expected: dict, atol: float = 2e-7) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-6, atol=atol, msg=lambda m: f"{key}: {m}")


TINY_MODEL = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
              "block_out_channels": [8, 16], "down_block_types": ["DownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 4}


def tiny_config(output_dir, **changes) -> dict:
    cfg = {
        "output_dir": str(output_dir), "max_train_steps": 8, "train_batch_size": 4, "checkpointing_steps": 4,
        "checkpoints_total_limit": None, "save_ema_snapshots": True, "log_with": None, "report": False,
        "model": TINY_MODEL,
        "data": {"dataset": "fashion-mnist:test", "num_images": 48, "resize_mode": "resize", "random_flip": True},
        "optim": {"learning_rate": 2e-3, "lr_warmup_steps": 2, "lr_scheduler": "cosine"},
        "ema": {"decay": 0.999},
        "lawa": {"k": 3, "every_n_steps": 2},
        "eval": {"every_n_steps": 2, "num_samples": 4, "batch_size": 4, "num_inference_steps": 2,
                 "reference": "fashion-mnist:test", "reference_num_images": 16, "kid_subsets": 2,
                 "kid_subset_size": 4, "variants": ["raw", "ema", "lawa"]},
    }
    for key, value in changes.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def train_run(cfg: dict, **kwargs) -> str:
    return train_mod.train(TrainConfig.from_dict(cfg), fid_weights=stand_in_extractor(), **kwargs)


def unet_weights(folder: str) -> dict:
    return load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))


# ----------------------------------------------------------------------------- resume
class Crash(Exception):
    pass


def run_crashing_at(crash_step: int, cfg, monkeypatch) -> None:
    """Train ``cfg`` until an exception at ``crash_step`` (before that step's update), as a crash would."""
    real_step = train_mod.train_step

    def crashing(parts, step):
        if step == crash_step:
            raise Crash()
        return real_step(parts, step)

    monkeypatch.setattr(train_mod, "train_step", crashing)
    with pytest.raises(Crash):
        train_run(cfg)
    monkeypatch.setattr(train_mod, "train_step", real_step)


# ----------------------------------------------------------------------------- errors
def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ----------------------------------------------------------------------------- several processes
TORCHRUN_SCRIPT = """
import sys
from lawa_diffusion.config.train import TrainConfig
from lawa_diffusion.utils.files import atomic_save_safetensors
from lawa_diffusion.evaluation.inception import stand_in_extractor
from lawa_diffusion.training.trainer import train
import json
train(TrainConfig.from_dict(json.loads(sys.argv[1])), resume=sys.argv[2] or None, fid_weights=stand_in_extractor())
"""


def torchrun_to_4_then_6(cfg: dict, tmp_path) -> None:
    """Train ``cfg`` with 2 CPU processes (torchrun, gloo) to step 4, then resume it to step 6."""
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN_SCRIPT)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    for max_steps, resume in ((4, ""), (6, "latest")):
        cfg["max_train_steps"] = max_steps
        subprocess.run([torchrun, "--nproc_per_node", "2", str(script), json.dumps(cfg), resume], check=True,
                       capture_output=True, timeout=600)


TIMING = ("sample_seconds", "metric_seconds")


def without_timing(rows: list) -> list:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


ENGINE_SCRIPT = SCRIPTS / "engine_train.py"


ENGINES = ("lawa_device_main", "lawa_cpu_main", "lawa_disk_main")


# 40 steps, a checkpoint every 8 (two kept), LAWA k=3 every 2 steps over the same EMA in the three storages.
BASE_ARGS = ["--steps", "40", "--checkpoint_every", "8", "--k", "3", "--every", "2", "--lawa", "device,cpu,disk"]


RUN_TIMEOUT_S = 300


class ForkServer:
    """Client of a fork server (``engine_train.py --serve``, ``launch_server.py``): start one child at a time,
    kill it, wait for it. The server imports the heavy modules once; each child is a fresh process after that."""

    command: list[str] = []

    def __init__(self, log_dir: Path, env: dict | None = None):
        self.log_dir = log_dir
        self.stderr = open(log_dir / "server.log", "ab")
        self.proc = subprocess.Popen([sys.executable, *self.command], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1, env=env)
        self.lines: "queue.Queue[dict]" = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._next(RUN_TIMEOUT_S).get("ready"), f"fork server did not start; see {self.log_dir}"
        self.count = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put({"eof": True})

    def _next(self, timeout: float) -> dict:
        try:
            msg = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"fork server gave no answer in {timeout} s; see {self.log_dir}") from None
        assert "eof" not in msg, f"fork server ended; see {self.log_dir / 'server.log'}"
        return msg

    def start(self, argv: list[str], env: dict | None = None, stdout: Path | None = None) -> tuple[int, Path]:
        """Fork a child; returns (pid, its log file). ``stdout``: where its stdout goes instead of the log (a FIFO
        to read it line by line as it comes), where the server supports it (launch_server.py)."""
        self.count += 1
        log = self.log_dir / f"run{self.count}.log"
        request = {"argv": argv, "env": env or {}, "log": str(log)}
        if stdout is not None:
            request["stdout"] = str(stdout)
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._next(RUN_TIMEOUT_S)["pid"], log

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        """The child's exit code (negative: the signal that ended it)."""
        return self._next(timeout)["returncode"]

    def run(self, argv: list[str], env: dict | None = None, stdout: Path | None = None) -> int:
        self.start(argv, env, stdout)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()  # the server holds nothing to flush: end it at once
        self.proc.kill()
        self.proc.wait()
        self.stderr.close()


class EngineServer(ForkServer):
    """``engine_train.py --serve``: each child is one training process of that script."""

    command = [str(ENGINE_SCRIPT), "--serve"]


LAUNCH_SERVER_SCRIPT = SCRIPTS / "launch_server.py"


class LaunchServer(ForkServer):
    """``launch_server.py``: each child is ``python -m lawa_diffusion.launch ARGV`` (on one intra-op thread)."""

    command = [str(LAUNCH_SERVER_SCRIPT)]

    def __init__(self, log_dir: Path, env: dict | None = None):
        super().__init__(log_dir, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})})

    def stderr_of(self, count: int | None = None) -> str:
        """The stderr of the latest child (or of child ``count``), given no ``stdout`` of its own: its log."""
        return (self.log_dir / f"run{count or self.count}.log").read_text(errors="replace")


def log_text(server: ForkServer) -> str:
    return (server.log_dir / f"run{server.count}.log").read_text(errors="replace")[-4000:]


def run_ok(server: ForkServer, argv: list[str], env: dict | None = None) -> None:
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


SYNTH_TINY = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)


SYNTH_STEPS, EVERY, SYNTH_DECAY = 60, 5, 0.9


POWER = {"p05": 0.05, "p10": 0.10}


def make_run(run: str, steps: int = SYNTH_STEPS, every: int = EVERY, decay: float = SYNTH_DECAY, seed: int = 0) -> dict:
    """A run folder whose power EMAs p05, p10 (snapshots with track_def) and constant-decay EMA c90 (snapshots
    without track_def: its definition is in config.yaml) follow a float64 random walk of a tiny UNet's weights.

    Returns the raw iterates θ_0..θ_steps and the constant-decay EMA kept online at ``steps`` (flat float64)."""
    torch.manual_seed(seed)
    unet = UNet2DModel(**SYNTH_TINY).double()
    names = [n for n, _ in unet.named_parameters()]
    config = dict(unet.config)
    params = list(unet.parameters())
    emas = {name: PowerEMAModel(params, sigma_rel=s) for name, s in POWER.items()}
    emas["c90"] = EMAModel(params, decay=decay, min_decay=decay)
    defs = {name: lag.power_ema(sigma_rel=s).to_dict() for name, s in POWER.items()}
    with open(runfolder.config_path(run), "w", encoding="utf-8") as f:
        yaml.safe_dump({"ema_tracks": [{"name": "c90", "decay": decay}]}, f)
    flat = lambda tensors: torch.cat([t.detach().reshape(-1) for t in tensors]).clone()  # noqa: E731
    thetas = [flat(params)]
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in params:
                p.add_(0.02 * torch.randn_like(p) + 0.002)
        thetas.append(flat(params))
        for name, ema in emas.items():
            ema.step(params)
            if step % every == 0:
                save_ema_snapshot(run, step, ema, names, config, name, defs.get(name), dtype=torch.float32)
    return {"thetas": torch.stack(thetas), "online": flat(emas["c90"].shadow_params), "names": names}


def float64_sum(files, weights):
    states = [load_file(f) for f in files]
    return {k: sum(float(w) * s[k].double() for w, s in zip(weights, states)) for k in states[0]}


def naive_ema_step(ema_steps, ema_values, target):
    """Independent reference: scan segments, solve the line through each crossing segment."""
    ema_steps, ema_values = np.asarray(ema_steps, float), np.asarray(ema_values, float)
    below = np.nonzero(ema_values <= target)[0]
    if below.size == 0:
        return None
    i = below[0]
    if i == 0:
        return ema_steps[0]
    return float(np.interp(target, ema_values[i - 1:i + 1][::-1], ema_steps[i - 1:i + 1][::-1]))


# ----------------------------------------------------------------------------- LAWA against its baselines
LAGS = {"ema": 100.0, "short": 36.0, "long": 136.0, "lawa": 190.0, "lawa@delayed": 188.0, "ws": 143.0,
        "ws@delayed": 136.5}


KINDS = {"ema": ("ema", None), "short": ("ema", None), "long": ("ema", None), "lawa": ("lawa", "ema"),
         "lawa@delayed": ("delayed", "ema"), "ws": ("lawa", "short"), "ws@delayed": ("delayed", "short")}


def write_tracks_run(folder, values, steps):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for i, step in enumerate(steps):
            for variant, curve in values.items():
                kind, over = KINDS[variant]
                row = {"step": step, "variant": variant, "fid": curve[i], "kind": kind,
                       "mean_lag": LAGS[variant] * (1 + 0.01 * i)}
                if over:
                    row["over"] = over
                f.write(json.dumps(row) + "\n")
    return str(folder)


def ci_of(xs):
    low, high = stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))
    return np.mean(xs), low, high


EMA_PATTERNS_SCRIPT = SCRIPTS / "ema_patterns.py"
K, NU, CKPT, STEPS = 2, 2, 4, 8
LAWA_ARGS = ["--lawa_k", str(K), "--lawa_every_n_steps", str(NU)]


TINY_UNET = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            norm_num_groups=4)


def seeded_unet(seed, **changes):
    torch.manual_seed(seed)
    return UNet2DModel(**{**TINY_UNET, **changes})


def save_snapshot_file(folder, step):
    unet = seeded_unet(step)
    meta = {"step": str(step), "model_config": json.dumps(dict(unet.config))}
    path = os.path.join(folder, f"step-{step:09d}.safetensors")
    atomic_save_safetensors(path, {k: v.half() for k, v in unet.state_dict().items()}, metadata=meta)
    return path


def float64_mean_of_files(files):
    states = [load_file(f) for f in files]
    return {k: torch.stack([s[k].double() for s in states]).mean(0) for k in states[0]}


def naive_window(files, step, k, m, nu, start):
    """Independent reference: walk the online schedule start, start + m·ν, ... up to step."""
    taken = [s for s in range(start, step + 1, m * nu) if s in files]
    return tuple(taken[-k:])


def one_line_error(capsys, argv) -> str:
    """Run the CLI with ``argv``; it must fail with exit code 2 and one line on stderr, which is returned."""
    from lawa_diffusion.cli import entry as cli

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def torchrun(script: str, nproc: int, *args: str, timeout: int = 300, plugin: Optional[Sequence[str]] = None,
             env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``tests/scripts/<script>`` as ``nproc`` processes (torch.distributed.run, one thread each); with ``plugin``
    (its ``--lawa_*`` options), each process runs it through ``-m lawa_diffusion.launch``. ``env``: more variables."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    launch = [] if plugin is None else ["-m", "lawa_diffusion.launch", *plugin]
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), *launch, str(SCRIPTS / script), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- full disks
class DiskFolder(type(Path())):
    """A folder of the ``small_disk`` fixture: ``mounted`` says whether it lies on a real small tmpfs."""

    mounted = False


def simulate_full_disk(monkeypatch, folder, when=lambda: True) -> None:
    """Where no small tmpfs could be mounted: every atomic write (temp file or folder) under ``folder`` and every
    ``save_state`` into it fails as a full disk does, once ``when()`` holds."""
    import errno

    import accelerate
    from safetensors import SafetensorError

    from lawa_diffusion.utils import files

    root = os.path.realpath(folder)

    def full(path) -> bool:
        return os.path.realpath(os.fspath(path)).startswith(root) and when()

    def failing(real):
        def make(suffix=None, prefix=None, dir=None, **kwargs):
            if dir is not None and full(dir):  # the error names the temp file, as the system's does
                name = f"{prefix or 'tmp'}abcdefgh{suffix or ''}"
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(dir, name))
            return real(suffix=suffix, prefix=prefix, dir=dir, **kwargs)
        return make

    monkeypatch.setattr(files.tempfile, "mkstemp", failing(files.tempfile.mkstemp))
    monkeypatch.setattr(files.tempfile, "mkdtemp", failing(files.tempfile.mkdtemp))
    real_save_state = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, *args, **kwargs):
        if output_dir is not None and full(output_dir):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_state(self, output_dir, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)


def tree_digest(folder) -> dict:
    """{relative path: sha256} of every file under ``folder`` (hidden ones too): to show a folder is intact."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


@contextlib.contextmanager
def counted_reads(monkeypatch):
    """{path: {"opens": n, "bytes": n}} of the files (not folders) opened for reading with ``os.open`` and read with
    ``os.preadv`` meanwhile (how the snapshot readers read), filled as the code under test runs."""
    seen, fds = {}, {}
    real_open, real_preadv = os.open, os.preadv

    def counting_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if not flags & (os.O_WRONLY | os.O_RDWR) and not os.path.isdir(path):
            key = os.path.abspath(os.fspath(path))
            fds[fd] = key
            seen.setdefault(key, {"opens": 0, "bytes": 0})["opens"] += 1
        return fd

    def counting_preadv(fd, buffers, offset, *args):
        got = real_preadv(fd, buffers, offset, *args)
        if fd in fds:
            seen[fds[fd]]["bytes"] += got
        return got

    with monkeypatch.context() as mp:
        mp.setattr(os, "open", counting_open)
        mp.setattr(os, "preadv", counting_preadv)
        yield seen


def tensor_bytes(path) -> int:
    """The bytes of a safetensors file's tensor data (its size less the header)."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return os.path.getsize(path) - 8 - header
