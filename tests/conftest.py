from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import DiskFolder, EngineServer, LaunchServer


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--runslow") or os.environ.get("LAWA_RUN_SLOW") == "1"
    skip_slow = pytest.mark.skip(reason="slow test: pass --runslow (or LAWA_RUN_SLOW=1) to run it")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Keep each test session's caches out of the user's home.
    cache = tmp_path_factory.getbasetemp() / "lawa-cache"
    monkeypatch.setenv("LAWA_CACHE_DIR", os.environ.get("LAWA_TEST_CACHE_DIR", str(cache)))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def engine_server(tmp_path_factory):
    """One engine server (tests/scripts/engine_train.py kept running) for the whole session."""
    server = EngineServer(tmp_path_factory.mktemp("engine-server"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def launch_server(tmp_path_factory):
    """One fork server of ``python -m lawa_diffusion.launch`` (tests/scripts/launch_server.py) for the session."""
    cache = os.environ.get("LAWA_TEST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lawa-cache"))
    server = LaunchServer(tmp_path_factory.mktemp("launch-server"), {"LAWA_CACHE_DIR": cache})  # as _isolated_cache
    yield server
    server.close()


@pytest.fixture
def small_disk(tmp_path):
    """``make(size)``: a new folder on a tmpfs of ``size`` (e.g. "256k"), mounted where this process may (root),
    with ``.mounted`` True; elsewhere a plain folder with ``.mounted`` False, for a test to simulate a full disk
    in (``tests.helpers.simulate_full_disk``). Unmounted at the end."""
    import subprocess

    mounted = []

    def make(size: str = "256k"):
        folder = tmp_path / f"disk{len(mounted)}-{size}"
        folder.mkdir()
        simulate = os.environ.get("LAWA_TEST_NO_TMPFS") == "1"  # to check the simulated path where mounts work
        done = None if simulate else subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        folder = DiskFolder(folder)
        folder.mounted = done is not None and done.returncode == 0
        if folder.mounted:
            mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)
