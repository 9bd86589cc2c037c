"""``lawa-diffusion patch``: small readable diffs, idempotent, clear refusals, no silent overwrite.

The patched script's training result is checked against the launch plugin in integrations/test_plugin.py.
"""
from __future__ import annotations

import ast
import textwrap

import pytest

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.integrations import script_patcher as patch
from lawa_diffusion.integrations.plugin_options import add_lawa_arguments, lawa_config_from_args
from tests.helpers import SCRIPTS

SCRIPT = SCRIPTS / "train_unconditional_style.py"

# The shape of diffusers' text_to_image script: EMA built on one line before the save/load hooks,
# arguments parsed in an if/else, two EMAs.
TEXT_TO_IMAGE_STYLE = textwrap.dedent('''\
    import argparse
    import os
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr


    def parse_args(input_args=None):
        parser = argparse.ArgumentParser()
        parser.add_argument("--use_ema", action="store_true")
        if input_args is not None:
            args = parser.parse_args(input_args)
        else:
            args = parser.parse_args()
        return args


    def main():
        args = parse_args()
        accelerator = Accelerator()
        unet = UNet2DConditionModel()
        if args.use_ema:
            ema_unet = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config)
            ema_prior = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config,)

        def save_model_hook(models, weights, output_dir):
            if accelerator.is_main_process:
                if args.use_ema:
                    ema_unet.save_pretrained(os.path.join(output_dir, "unet_ema"))
                    ema_prior.save_pretrained(os.path.join(output_dir, "prior_ema"))

        def load_model_hook(models, input_dir):
            if args.use_ema:
                load_model = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DConditionModel)
                ema_unet.load_state_dict(load_model.state_dict())
''')


def changed_lines(old: str, new: str) -> list[str]:
    diff = patch.unified_diff(old, new, "a", "b").splitlines()
    return [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_train_unconditional_style_diff_is_small_and_valid():
    old = SCRIPT.read_text()
    new, notes = patch.patch_source(old, str(SCRIPT))
    ast.parse(new)
    changes = changed_lines(old, new)
    assert len(changes) <= 10, changes
    assert "-        ema_model = EMAModel(" in changes and "+        ema_model = LAWAEMAModel(" in changes
    assert "+        attach(accelerator, ema_model.lawa)" in changes
    assert '+                    save_lawa_next_to(ema_model, os.path.join(output_dir, "unet_ema"))' in changes
    assert "+    add_lawa_arguments(parser)" in changes
    assert "EMAModel.from_pretrained(" in new  # the load hook's temporary EMA stays a plain EMAModel
    assert len(notes) == 4


def test_patch_is_idempotent():
    once, _ = patch.patch_source(SCRIPT.read_text(), "s.py")
    twice, notes = patch.patch_source(once, "s.py")
    assert twice == once and "already uses LAWAEMAModel" in notes[0]


def test_text_to_image_style_script():
    new, _ = patch.patch_source(TEXT_TO_IMAGE_STYLE, "t2i.py")
    tree = ast.parse(new)
    lines = new.splitlines()
    # --lawa_* options are added once, before the if/else that parses.
    i = lines.index("    add_lawa_arguments(parser)")
    assert lines[i + 1] == "    if input_args is not None:"
    assert new.count("add_lawa_arguments(parser)") == 1
    # Both EMAs: keyword added on one line (with or without a trailing comma), distinct engine names.
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "LAWAEMAModel"]
    kw = [{k.arg for k in c.keywords} for c in calls]
    assert kw == [{"model_cls", "model_config", "lawa"}, {"model_cls", "model_config", "lawa", "lawa_name"}]
    assert "attach(accelerator, ema_unet.lawa)" in new and "attach(accelerator, ema_prior.lawa)" in new
    assert 'save_lawa_next_to(ema_prior, os.path.join(output_dir, "prior_ema"))' in new
    assert "EMAModel.from_pretrained(os.path.join(input_dir" in new


@pytest.mark.parametrize("source, reason", [
    ("import torch\nx = 1\n", "builds no training EMA"),
    ("from diffusers.training_utils import EMAModel\nema = EMAModel([])\nargs = None\n", "Accelerator"),
    ("def broken(:\n", "not valid Python"),
])
def test_scripts_it_does_not_understand_are_refused(source, reason):
    with pytest.raises(ValueError, match=reason) as e:
        patch.patch_source(source, "x.py")
    assert "\n" not in str(e.value)


def test_cli_writes_and_never_overwrites(tmp_path, capsys):
    out = tmp_path / "patched.py"
    assert cli.main(["patch", str(SCRIPT), "-o", str(out)]) == 0
    first = out.read_text()
    out.write_text("# the user's own file\n")
    assert cli.main(["patch", str(SCRIPT), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_text() == "# the user's own file\n"
    assert cli.main(["patch", str(SCRIPT), "-o", str(out), "--overwrite", "--diff"]) == 0
    assert out.read_text() == first
    assert "+from lawa_diffusion import LAWAEMAModel, attach" in capsys.readouterr().out


def test_cli_missing_script(tmp_path, capsys):
    assert cli.main(["patch", str(tmp_path / "nope.py"), "-o", str(tmp_path / "o.py")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_patched_argument_helpers_follow_the_precedence(tmp_path):
    import argparse

    config = tmp_path / "lawa.yaml"
    config.write_text("k: 7\nstorage: device\n")
    parser = add_lawa_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--lawa_k", "3", "--lawa_config", str(config)])
    cfg = lawa_config_from_args(args, environ={"LAWA_K": "5", "LAWA_EVERY_N_STEPS": "11"})
    assert (cfg.k, cfg.every_n_steps, cfg.storage) == (3, 11, "device")
