"""README and docs/ say only what is true of the code: the generated references equal what the code gives now,
every command, flag, config key, file and link they name exists, and every config key has its meaning."""
from __future__ import annotations

import importlib.util
import os
import re

import pytest

from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_RE = re.compile(r"lawa-diffusion ([a-z][a-z-]+)((?:[^\n`|])*)")
FLAG_RE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")
PLUGIN_FLAG_RE = re.compile(r"(?<![\w-])(--lawa_[a-z0-9_]+)(?![a-z0-9_*])")
PATH_RE = re.compile(r"(?<![\w./-])((?:lawa_diffusion|scripts|configs|benchmarks|tests|docs)/[\w./-]*\w)")
LINK_RE = re.compile(r"\]\(([^)\s]+)\)")
# flags that belong to other programs on the same line (accelerate launch, torchrun, the trained script)
FOREIGN_FLAGS = {"--multi_gpu", "--num_processes", "--nproc_per_node", "--use_ema", "--output_dir",
                 "--train_data_dir", "--checkpointing_steps", "--resume_from_checkpoint", "--logdir"}


def _reference_module():
    spec = importlib.util.spec_from_file_location("make_docs_reference", ROOT / "scripts" / "make_docs_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return _reference_module()


def _text(path) -> str:
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("page", ["docs/cli.md", "docs/config.md"])
def test_generated_reference_is_current(reference, page):
    expected = reference.PAGES[page]()
    assert _text(ROOT / page) == expected, f"{page} is out of date: run python scripts/make_docs_reference.py"


def test_every_config_key_has_a_meaning(reference):
    missing = [key for key, _, meaning in reference.config_rows() if not meaning.strip()]
    assert not missing, f"config keys without a meaning in their dataclass docstring: {missing}"


def test_every_command_and_flag_named_in_the_docs_exists(reference):
    parsers = reference.command_parsers()
    plugin = {o for a in reference.plugin_parser()._actions for o in a.option_strings}
    bad = []
    for page in PAGES:
        for n, line in enumerate(_text(page).splitlines(), 1):
            for m in COMMAND_RE.finditer(line):
                name = f"lawa-diffusion {m.group(1)}"
                if name not in parsers:
                    bad.append(f"{page.name}:{n}: no command {name!r}")
                    continue
                options = {o for a in parsers[name]._actions for o in a.option_strings}
                for flag in FLAG_RE.findall(m.group(2)):
                    if flag not in options and flag not in FOREIGN_FLAGS and not flag.startswith("--lawa_"):
                        bad.append(f"{page.name}:{n}: {name} has no option {flag}")
            for flag in PLUGIN_FLAG_RE.findall(line):
                if flag not in plugin:
                    bad.append(f"{page.name}:{n}: the plugin has no option {flag}")
    assert not bad, "\n".join(bad)


def test_every_file_named_in_the_docs_exists():
    bad = []
    for page in PAGES:
        for n, line in enumerate(_text(page).splitlines(), 1):
            for path in PATH_RE.findall(line):
                path = path.rstrip(".")
                if "*" in path or "<" in path:
                    continue
                if not (ROOT / path).exists():
                    bad.append(f"{page.name}:{n}: {path}")
    assert not bad, "named but missing:\n" + "\n".join(bad)


def _anchors(path) -> set:
    out = set()
    for line in _text(path).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            slug = re.sub(r"[^\w\- ]", "", title).replace(" ", "-")
            out.add(slug)
    return out


def test_every_link_between_pages_resolves():
    bad = []
    for page in PAGES:
        for target in LINK_RE.findall(_text(page)):
            if re.match(r"^[a-z]+://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                bad.append(f"{page.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                bad.append(f"{page.name}: {target} (no such heading)")
    assert not bad, "\n".join(bad)


def test_readme_stays_short():
    # two screens for a newcomer; details live in docs/
    assert len(_text(ROOT / "README.md").splitlines()) <= 140
    assert os.path.getsize(ROOT / "README.md") <= 9000
