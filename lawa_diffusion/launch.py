"""LAWA for an unmodified diffusers training script, through ``accelerate launch -m``.

    accelerate launch [accelerate options] -m lawa_diffusion.launch [--lawa_* options] SCRIPT.py [script args]

The ``--lawa_<name>`` options (``LAWAConfig`` and ``LaunchConfig`` fields) go before the script;
``LAWA_<NAME>`` environment variables and a YAML file (``--lawa_config`` / ``LAWA_CONFIG``) give
the same options, with precedence command line > environment > YAML > defaults. The script runs
as ``__main__`` with the ``sys.argv`` / ``sys.path`` Python would give it, while:

- diffusers' ``EMAModel`` is replaced by a ``LAWAEMAModel`` subclass, so every EMA the script makes
  feeds a LAWA engine from ``step``;
- ``EMAModel.save_pretrained(".../unet_ema")`` also writes ``.../unet_lawa`` once the window holds
  snapshots, and a model saved while the EMA weights are copied into it (``store`` / ``copy_to`` /
  save / ``restore``, as for the final pipeline) gets a ``<folder>_lawa`` sibling;
- ``Accelerator.save_state`` / ``load_state`` carry the LAWA state (same files as
  ``lawa_diffusion.attach``), so ``--resume_from_checkpoint`` continues the window exactly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import runpy
import sys
import typing
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from lawa_diffusion.config import LAWAConfig, LaunchConfig, check, from_mapping, read_yaml

PROG = "lawa_diffusion.launch"
OPTION_PREFIX = "--lawa_"
ENV_PREFIX = "LAWA_"
CONFIG_OPTION = "config"  # --lawa_config / LAWA_CONFIG: the YAML file
BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
USAGE = (f"accelerate launch [accelerate options] -m {PROG} [--lawa_* options] SCRIPT.py [script args]")


@dataclasses.dataclass
class PluginOptions:
    lawa: LAWAConfig
    launch: LaunchConfig


# --------------------------------------------------------------------------------------- options
def option_types() -> Dict[str, Any]:
    """Option name (without prefix) -> its type, for every LAWAConfig and LaunchConfig field."""
    types: Dict[str, Any] = {}
    for cls in (LAWAConfig, LaunchConfig):
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            types[field.name] = hints[field.name]
    types[CONFIG_OPTION] = Optional[str]
    return types


def option_names() -> List[str]:
    return [OPTION_PREFIX + name for name in option_types()]


def convert(value: str, typ: Any, where: str) -> Any:
    """Turn the text ``value`` of an option or environment variable into ``typ``."""
    args = typing.get_args(typ)
    if type(None) in args:
        if value.strip().lower() in ("none", "null", ""):
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        check(value.lower() in BOOL_WORDS, f"{where} must be true or false, got {value!r}")
        return BOOL_WORDS[value.lower()]
    if typ is int:
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"{where} must be an integer, got {value!r}") from None
    return value


def split_argv(argv: Sequence[str]) -> Tuple[Dict[str, str], str, List[str]]:
    """Split ``[--lawa_* options] SCRIPT.py [script args]`` into (options, script, script args)."""
    types = option_types()
    values: Dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        token = argv[i]
        name, has_value, value = token.partition("=")
        check(name.startswith(OPTION_PREFIX),
              f"option {token!r} comes before the script but is not a --lawa_* option; "
              f"the script's own options go after the script: {USAGE}")
        key = name[len(OPTION_PREFIX):]
        check(key in types, f"unknown option {name}; valid options are: {', '.join(option_names())}")
        if not has_value:
            takes_word = types[key] is not bool or (i + 1 < len(argv) and argv[i + 1].lower() in BOOL_WORDS)
            check(not takes_word or i + 1 < len(argv), f"option {name} needs a value, e.g. {name} VALUE")
            value, i = (argv[i + 1], i + 1) if takes_word else ("true", i)
        values[key] = value
        i += 1
    check(i < len(argv), f"no training script given; usage: {USAGE}")
    script, script_args = argv[i], list(argv[i + 1:])
    misplaced = next((a for a in script_args if a.startswith(OPTION_PREFIX)), None)
    check(misplaced is None,
          f"option {misplaced} comes after the script name {script!r}, so it would be passed to the script; "
          f"put --lawa_* options between '-m {PROG}' and the script: ... -m {PROG} {misplaced} ... {script} [script args]")
    if not os.path.isfile(script):
        raise FileNotFoundError(f"training script {script!r} does not exist; pass the path of the script "
                                f"after the --lawa_* options: {USAGE}")
    return values, script, script_args


def _yaml_values(path: str) -> Dict[str, Any]:
    data = read_yaml(path)
    if data and set(data) <= {"lawa", "launch"} and all(isinstance(v, dict) for v in data.values()):
        merged: Dict[str, Any] = {}
        for section in data.values():
            merged.update(section)
        data = merged
    valid = [n for n in option_types() if n != CONFIG_OPTION]
    unknown = sorted(set(data) - set(valid))
    check(not unknown, f"lawa config {path!r} has unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(valid)}")
    return data


def _env_values(environ: Mapping[str, str]) -> Dict[str, str]:
    return {name: environ[ENV_PREFIX + name.upper()] for name in option_types() if ENV_PREFIX + name.upper() in environ}


def resolve_options(cli: Mapping[str, str], environ: Mapping[str, str]) -> PluginOptions:
    """Merge defaults < YAML < environment < command line into validated configs."""
    types = option_types()
    env = {k: convert(v, types[k], f"environment variable {ENV_PREFIX}{k.upper()}") for k, v in _env_values(environ).items()}
    given = {k: convert(v, types[k], f"option {OPTION_PREFIX}{k}") for k, v in cli.items()}
    config_path = given.get(CONFIG_OPTION, env.get(CONFIG_OPTION))
    values = _yaml_values(config_path) if config_path else {}
    values.update(env)
    values.update(given)
    values.pop(CONFIG_OPTION, None)
    lawa_names = {f.name for f in dataclasses.fields(LAWAConfig)}
    lawa = from_mapping(LAWAConfig, {k: v for k, v in values.items() if k in lawa_names}, "lawa options")
    launch = from_mapping(LaunchConfig, {k: v for k, v in values.items() if k not in lawa_names}, "lawa options")
    return PluginOptions(lawa=lawa, launch=launch)


def parse_argv(argv: Sequence[str], environ: Optional[Mapping[str, str]] = None) -> Tuple[PluginOptions, str, List[str]]:
    cli, script, script_args = split_argv(argv)
    return resolve_options(cli, os.environ if environ is None else environ), script, script_args


def help_text() -> str:
    lines = [f"usage: {USAGE}", "", "options (also LAWA_<NAME> environment variables or keys of the --lawa_config YAML):"]
    defaults = {**dataclasses.asdict(LAWAConfig()), **dataclasses.asdict(LaunchConfig()), CONFIG_OPTION: None}
    for name in option_types():
        lines.append(f"  {OPTION_PREFIX}{name:<20} default: {defaults[name]}")
    return "\n".join(lines)


# ---------------------------------------------------------- helpers for patched scripts
def add_lawa_arguments(parser: Any) -> Any:
    """Add the LAWA options (``--lawa_k`` ...) to a script's argparse parser; unset ones fall back to
    ``LAWA_*`` environment variables, the ``--lawa_config`` YAML and the defaults."""
    lawa_names = [f.name for f in dataclasses.fields(LAWAConfig)] + [CONFIG_OPTION]
    group = parser.add_argument_group("LAWA (Latest Weight Averaging over the EMA weights)")
    for name in lawa_names:
        group.add_argument(OPTION_PREFIX + name, type=str, default=None,
                           help=f"LAWA {name} (environment variable {ENV_PREFIX}{name.upper()})")
    return parser


def lawa_config_from_args(args: Any, environ: Optional[Mapping[str, str]] = None) -> LAWAConfig:
    """The ``LAWAConfig`` given by ``add_lawa_arguments`` options, environment and YAML."""
    cli = {name: value for name in option_types()
           if (value := getattr(args, "lawa_" + name, None)) is not None}
    return resolve_options(cli, os.environ if environ is None else environ).lawa


def save_lawa_next_to(ema: Any, ema_folder: str | os.PathLike) -> Optional[str]:
    """Write ``ema.lawa``'s weights beside an EMA folder (``unet_ema`` -> ``unet_lawa``).

    Does nothing (returns None) before the window holds a snapshot or on a process that holds none.
    """
    from lawa_diffusion.launch_runtime import lawa_folder_for

    lawa = ema.lawa
    if not (lawa.holds_snapshots and lawa.ready and is_main_process()):
        return None
    folder = lawa_folder_for(ema_folder)
    lawa.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------- running
def is_main_process() -> bool:
    from lawa_diffusion.lawa import process_rank

    return process_rank() == 0


def say(message: str) -> None:
    if is_main_process():
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def run_script(script: str, script_args: Sequence[str]) -> None:
    """Run ``script`` as ``__main__`` with the argv and sys.path Python would give it."""
    path = os.path.abspath(script)
    saved_argv, saved_path0 = sys.argv, sys.path[0] if sys.path else None
    sys.argv = [script, *script_args]
    if sys.path:
        sys.path[0] = os.path.dirname(path)
    else:
        sys.path.insert(0, os.path.dirname(path))
    try:
        runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None:
            sys.path[0] = saved_path0


@contextlib.contextmanager
def installed(options: PluginOptions, script: str = "the script", script_args: Sequence[str] = ()) -> Iterator[Any]:
    """Patch diffusers and accelerate for the duration of the block (restored on exit)."""
    from lawa_diffusion.launch_runtime import Plugin

    plugin = Plugin(options)
    plugin.script_args = list(script_args)
    plugin.install()
    say(plugin.describe(script))
    try:
        yield plugin
    finally:
        try:
            plugin.finish()
            say(plugin.summary(script))
        finally:
            plugin.uninstall()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"], ["--lawa_help"]):
        print(help_text())
        return 0
    try:
        options, script, script_args = parse_argv(argv)
    except (ValueError, FileNotFoundError) as e:
        if is_main_process():
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    with installed(options, script, script_args):
        run_script(script, script_args)
    return 0


if __name__ == "__main__":
    from lawa_diffusion.launch import main as _main  # one copy of the module state, not a second __main__

    sys.exit(_main())
