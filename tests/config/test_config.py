import pytest

from lawa_diffusion.config.lawa import LAWAConfig
from tests.helpers import ROOT


def test_defaults_and_yaml_roundtrip(tmp_path):
    cfg = LAWAConfig()
    assert (cfg.k, cfg.every_n_steps, cfg.storage, cfg.min_snapshots) == (5, 500, "cpu", 1)
    path = tmp_path / "lawa.yaml"
    path.write_text("lawa:\n  k: 3\n  every_n_steps: 10\n  storage: device\n")
    loaded = LAWAConfig.from_yaml(path)
    assert (loaded.k, loaded.every_n_steps, loaded.storage) == (3, 10, "device")


def test_shipped_example_config_loads():
    import os

    path = str(ROOT / "configs" / "lawa.yaml")
    if not os.path.exists(path):
        pytest.skip("configs/lawa.yaml not present")
    assert LAWAConfig.from_yaml(path).k >= 1


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"k": 0}, ["k", "0"]),
        ({"every_n_steps": 0}, ["every_n_steps", "0"]),
        ({"storage": "gpu"}, ["storage", "'gpu'", "device, cpu, disk"]),
        ({"dtype": "int8"}, ["dtype", "'int8'"]),
        ({"storage": "disk"}, ["snapshot_dir", "disk"]),
        ({"on_nonfinite": "ignore"}, ["on_nonfinite", "'ignore'"]),
        ({"min_snapshots": 9}, ["min_snapshots", "9"]),
    ],
)
def test_bad_values_name_option_and_value(kwargs, words):
    with pytest.raises(ValueError) as e:
        LAWAConfig(**kwargs)
    msg = str(e.value)
    for w in words:
        assert w in msg
    assert "\n" not in msg


def test_unknown_yaml_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("k: 3\nwindow: 4\n")
    with pytest.raises(ValueError) as e:
        LAWAConfig.from_yaml(path)
    assert "window" in str(e.value) and "every_n_steps" in str(e.value)


def test_missing_yaml_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LAWAConfig.from_yaml(tmp_path / "nope.yaml")


def test_unwritable_snapshot_dir(tmp_path):
    import torch

    from lawa_diffusion import LAWA

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="snapshot_dir .* is not writable"):
        LAWA([torch.zeros(3)], LAWAConfig(storage="disk", snapshot_dir=str(blocker / "sub")))
