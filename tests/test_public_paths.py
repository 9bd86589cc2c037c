"""Every path a user types (README, pyproject, the patcher's output) still runs after the package became
layered: the top-level API, the plugin's module and helpers, the console command and each subcommand, the
config face, and the plugin's one-line errors for a ValueError raised deep inside a subpackage."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT

COMMANDS = ("inception", "fid", "ref-stats", "train", "plan", "report", "average", "sweep", "synthesize", "hindsight",
            "patch")


def _python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300, **kwargs)


def test_top_level_api():
    import lawa_diffusion
    from lawa_diffusion import (
        LAWA,
        LAWAConfig,
        LAWAEMAModel,
        PosthocSnapshots,
        PowerEMAModel,
        __version__,
        attach,
        read_record,
        save_checkpoint,
    )

    assert __version__ == "0.2.0"
    from diffusers.training_utils import EMAModel

    assert LAWA([torch.zeros(3)], LAWAConfig(k=2, every_n_steps=1)).config.k == 2
    assert issubclass(LAWAEMAModel, EMAModel) and issubclass(PowerEMAModel, EMAModel)
    assert all(callable(x) for x in (PosthocSnapshots, attach, read_record, save_checkpoint))
    assert set(lawa_diffusion.__all__) >= {"LAWA", "LAWAConfig", "LAWAEMAModel", "PowerEMAModel", "PosthocSnapshots",
                                          "attach"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lawa_diffusion.nope  # noqa: B018


def test_config_face():
    from lawa_diffusion.config import LAWAConfig, TrainConfig, check, load_train_config

    cfg = load_train_config(str(ROOT / "configs" / "fashion_mnist_cpu.yaml"), [], None)
    assert isinstance(cfg, TrainConfig) and isinstance(cfg.lawa, LAWAConfig)
    with pytest.raises(ValueError, match="k must be"):
        check(False, "k must be ≥ 1")


def test_the_patchers_import_line_runs():
    from lawa_diffusion.integrations.script_patcher import IMPORTS

    namespace: dict = {}
    exec("\n".join(IMPORTS), namespace)  # what every patched script (earlier ones too) imports
    assert {"add_lawa_arguments", "lawa_config_from_args", "save_lawa_next_to"} <= set(namespace)


def test_plugin_help_through_python_m():
    done = _python("-m", "lawa_diffusion.launch", "--help")
    assert done.returncode == 0, done.stderr
    assert "--lawa_k" in done.stdout and "--lawa_every_n_steps" in done.stdout


def test_plugin_bad_option_is_one_line_exit_2(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("raise SystemExit('the script must not run')\n")
    done = _python("-m", "lawa_diffusion.launch", "--lawa_k", "0", str(script))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "k" in lines[0], done.stderr


def test_a_value_error_from_a_subpackage_becomes_one_plugin_error():
    # errors raised while the script runs: a check in config/ (two folders below the plugin's own) is the
    # package's input error; a ValueError from the script's own code passes through unchanged
    from lawa_diffusion.config.base import check
    from lawa_diffusion.integrations.plugin import LAWAInputError, raised_in_package, reported_as_input_errors

    def bad_input():
        check(False, "lawa k must be >= 1, got 0")

    def scripts_own():
        raise ValueError("the script's own error")

    with pytest.raises(LAWAInputError, match="lawa k must be"):
        reported_as_input_errors(bad_input)()
    with pytest.raises(ValueError, match="own error") as info:
        reported_as_input_errors(scripts_own)()
    assert not isinstance(info.value, LAWAInputError)
    package = os.path.dirname(os.path.abspath(sys.modules["lawa_diffusion"].__file__))
    assert raised_in_package(os.path.join(package, "engine", "lawa.py"))
    assert not raised_in_package(package + "_other/x.py")


def test_python_m_package_and_every_subcommand():
    done = _python("-m", "lawa_diffusion", "--help")
    assert done.returncode == 0, done.stderr
    for command in COMMANDS:
        assert command in done.stdout or command == "ref-stats"
    sub = _python("-m", "lawa_diffusion", "hindsight", "--help")  # one subcommand through the process door
    assert sub.returncode == 0 and "usage: lawa-diffusion hindsight" in sub.stdout, sub.stderr
    from lawa_diffusion.cli.entry import build_parser

    for command in COMMANDS:  # every subcommand's parser builds and prints its help (in-process: same code)
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([command, "--help"])
        assert done.value.code == 0, command


def test_old_command_name_still_runs_and_warns(tmp_path):
    done = _python("-m", "lawa_diffusion", "posthoc", str(tmp_path / "missing"))
    assert done.returncode == 2
    assert "now 'lawa-diffusion hindsight'" in done.stderr


@pytest.mark.skipif(shutil.which("lawa-diffusion") is None and not os.path.exists(
    os.path.join(os.path.dirname(sys.executable), "lawa-diffusion")), reason="console script not installed")
def test_console_command():
    exe = shutil.which("lawa-diffusion") or os.path.join(os.path.dirname(sys.executable), "lawa-diffusion")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "0.2.0" in done.stdout


def test_old_option_spellings_still_work_and_warn(capsys):
    from lawa_diffusion.cli.entry import build_parser

    parser = build_parser()
    with pytest.warns(FutureWarning, match="--steps is now --num-inference-steps"):
        args = parser.parse_args(["fid", "x", "--steps", "7"])
    assert args.steps == 7
    with pytest.warns(FutureWarning, match="--every is now --nu-multiples"):
        assert parser.parse_args(["sweep", "run", "--every", "1,2"]).every == "1,2"
    for command in ("sweep", "hindsight"):
        with pytest.warns(FutureWarning, match="--weights is now --inception-weights"):
            assert parser.parse_args([command, "run", "--weights", "w.pth"]).weights == "w.pth"
    assert parser.parse_args(["fid", "x"]).steps == parser.parse_args(["fid", "x", "--num-inference-steps", "50"]).steps
    help_text = parser._subparsers._group_actions[0].choices["sweep"].format_help()
    assert "--nu-multiples" in help_text and "--every" not in help_text and "--weights " not in help_text
