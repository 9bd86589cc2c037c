"""What scripts/gpu_check.sh needs before any step runs: the device, the imports, the data and the Inception weights.

Prints one ``preflight: <check>: ok, <what>`` line per check that passes and exits 0; or prints one line
``preflight failed: <problem>; <problem> ...`` (each with its fix) and exits 1. Nothing is downloaded.

    python scripts/gpu_preflight.py --device cuda|cpu [--part figures|seeds|paper|text2image]
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, List, Tuple

# what the steps import (diffusers needs importlib_metadata; the tests step needs pytest)
MODULES = ("torch", "torchvision", "diffusers", "torch_fidelity", "accelerate", "safetensors", "scipy", "yaml",
           "tqdm", "matplotlib", "tensorboard", "pytest", "lawa_diffusion")
PARTS = ("figures", "seeds", "paper", "text2image")
PART_MODULES = {"text2image": ("transformers",)}  # its CLIP text encoder and tokenizer


def check_device(device: str) -> str:
    import torch

    if device == "cpu":
        return f"torch {torch.__version__} on the CPU (no CUDA asked)"
    if not torch.cuda.is_available():
        raise RuntimeError(f"CUDA is not visible to torch {torch.__version__} (torch.cuda.is_available() is False); "
                           "run on the GPU machine, or set GPU_CHECK_TINY=1 for the CPU run")
    x = torch.arange(1024, device="cuda", dtype=torch.float32)
    total = float(x.sum().item())  # one kernel and a copy back: the device really runs
    if total != 1023 * 1024 / 2:
        raise RuntimeError(f"a sum on {torch.cuda.get_device_name()} gave {total} instead of {1023 * 1024 / 2}")
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def check_imports(part: str = "figures") -> str:
    missing, versions = [], []
    for name in MODULES + PART_MODULES.get(part, ()):
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is a missing package here
            missing.append(f"{name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            continue
        if name in ("torch", "diffusers", "torch_fidelity", "accelerate", "transformers"):
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
    if missing:
        raise RuntimeError(f"not importable: {', '.join(missing)}; install them (GPU.md: the wheels to carry)")
    return ", ".join(versions)


def check_data(part: str = "figures") -> str:
    from lawa_diffusion.evaluation.images import fashion_mnist_file

    files = [fashion_mnist_file(split, download=False) for split in ("train", "test")]
    if part == "text2image":  # its captions are the class names
        from lawa_diffusion.training.labels import labels_file_of

        files += [labels_file_of(path) for path in files]
    return ", ".join(files)


def check_weights() -> str:
    from lawa_diffusion.evaluation.inception import resolve_weights

    found = resolve_weights(fetch=False)
    return f"{found.path} ({found.source})"


def run_checks(device: str, part: str = "figures") -> Tuple[List[str], List[str]]:
    """(lines of the checks that passed, problems of those that failed); later checks run after a failure too."""
    checks: List[Tuple[str, Callable[[], str]]] = [("device", lambda: check_device(device)),
                                                  ("imports", lambda: check_imports(part)),
                                                  ("data", lambda: check_data(part)),
                                                  ("inception weights", check_weights)]
    passed, problems = [], []
    for name, check in checks:
        try:
            passed.append(f"preflight: {name}: ok, {check()}")
        except Exception as e:  # noqa: BLE001 - each failure becomes one part of the one line
            problems.append(f"{name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return passed, problems


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], required=True)
    parser.add_argument("--part", choices=PARTS, default="figures", help="the gpu_check part that will run")
    args = parser.parse_args(argv)
    passed, problems = run_checks(args.device, args.part)
    for line in passed:
        print(line)
    if problems:
        print("preflight failed: " + "; ".join(problems), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
