"""The launch plugin's options: ``--lawa_<name>`` flags (declared once by ``add_lawa_arguments``, which patched
scripts use too), ``LAWA_<NAME>`` environment variables and a YAML file, with precedence command line >
environment > YAML > defaults; and splitting a launch command line into those options and the target script.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence

from lawa_diffusion.config.base import check, from_mapping, read_yaml
from lawa_diffusion.config.launch import LaunchConfig
from lawa_diffusion.config.lawa import DTYPES, NONFINITE_POLICIES, SNAPSHOT_RANKS, STORAGE_MODES, LAWAConfig

PROG = "lawa_diffusion.launch"  # the plugin's module, as users run it and as its messages name it
OPTION_PREFIX = "--lawa_"
ENV_PREFIX = "LAWA_"
CONFIG_OPTION = "config"  # --lawa_config / LAWA_CONFIG: the YAML file
BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
CHOICES = {"storage": STORAGE_MODES, "dtype": DTYPES, "on_nonfinite": NONFINITE_POLICIES, "snapshot_ranks": SNAPSHOT_RANKS}
USAGE = (f"accelerate launch [accelerate options] -m {PROG} [--lawa_* options] (SCRIPT.py | -m MODULE) [script args]")


@dataclasses.dataclass
class PluginOptions:
    lawa: LAWAConfig
    launch: LaunchConfig


@dataclasses.dataclass
class Target:
    """What the plugin runs: a script path or (``module``) a module name, with its own arguments."""

    name: str
    args: List[str]
    module: bool = False


# --------------------------------------------------------------------------------------- options
def option_types(launch_options: bool = True) -> Dict[str, Any]:
    """Option name (without prefix) -> its type, for every LAWAConfig (and LaunchConfig) field."""
    types: Dict[str, Any] = {}
    for cls in (LAWAConfig, LaunchConfig) if launch_options else (LAWAConfig,):
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
    if typ is float:
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    return value


def is_flag(typ: Any) -> bool:
    """True for a boolean option, which may be given bare (``--lawa_keep_average``) or with a value."""
    return typ is bool


def option_meanings() -> Dict[str, str]:
    """Option name -> what it means, read from the ``LAWAConfig`` / ``LaunchConfig`` docstrings
    (``name: meaning`` entries; ``a / b: meaning`` gives several options one meaning)."""
    meanings: Dict[str, str] = {CONFIG_OPTION: "YAML file of LAWA options (a mapping, or sections lawa: and launch:)"}
    for cls in (LAWAConfig, LaunchConfig):
        current: List[str] = []
        for line in (cls.__doc__ or "").splitlines():
            entry = re.match(r"^    ([a-z_]+(?: / [a-z_]+)*): (.*)$", line)
            if entry:
                current = entry.group(1).split(" / ")
                text = entry.group(2).strip().replace("``", "")
                for name in current:
                    meanings[name] = text if len(current) == 1 else f"{entry.group(1)}: {text}"
            elif current and line.startswith("        ") and line.strip():
                for name in current:
                    meanings[name] += " " + line.strip().replace("``", "")
            else:
                current = []
    return meanings


def add_lawa_arguments(parser: argparse.ArgumentParser, launch_options: bool = False) -> argparse.ArgumentParser:
    """Add the ``--lawa_<name>`` options (every ``LAWAConfig`` field, ``--lawa_config``, and with
    ``launch_options`` the plugin's ``LaunchConfig`` fields) to an argparse parser. Values stay text
    (None when not given) so that ``LAWA_*`` environment variables and the YAML file fill the rest;
    a boolean option given bare means true."""
    defaults = {**dataclasses.asdict(LAWAConfig()), **dataclasses.asdict(LaunchConfig()), CONFIG_OPTION: None}
    meanings = option_meanings()
    group = parser.add_argument_group("LAWA (Latest Weight Averaging over the EMA weights)")
    for name, typ in option_types(launch_options).items():
        choices = CHOICES.get(name)
        default = "null" if defaults[name] is None else str(defaults[name]).lower() if is_flag(typ) else defaults[name]
        text = meanings.get(name, "").rstrip(".")
        text += f". Choices: {'|'.join(choices)}" if choices else ""
        text += f". Default: {default}; environment variable {ENV_PREFIX}{name.upper()}"
        extra: Dict[str, Any] = {"nargs": "?", "const": "true", "metavar": "true|false"} if is_flag(typ) else \
            {"metavar": "|".join(choices) if choices else name.upper()}
        group.add_argument(OPTION_PREFIX + name, type=str, default=None, help=text.replace("%", "%%"), **extra)
    return parser


def bare_flags_given_true(argv: Sequence[str]) -> List[str]:
    """The plugin's argv with ``true`` after each bare boolean ``--lawa_*`` option before the script, so a
    bare flag never takes the script's name as its value."""
    flags = {OPTION_PREFIX + name for name, typ in option_types().items() if is_flag(typ)}
    argv, out, i = list(argv), [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in flags:
            given = i + 1 < len(argv) and argv[i + 1].lower() in BOOL_WORDS
            out += argv[i:i + 2] if given else [arg, "true"]
            i += 2 if given else 1
        elif arg.startswith(OPTION_PREFIX) and "=" not in arg:
            out += argv[i:i + 2]
            i += 2
        elif arg.startswith("-") and arg not in ("-m", "--module") and not arg.startswith(OPTION_PREFIX):
            return out + argv[i:]
        elif not arg.startswith("-"):
            return out + argv[i:]  # the script and its own arguments
        else:
            out.append(arg)
            i += 1
    return out


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ValueError(f"{message}; usage: {USAGE}")


def build_parser() -> argparse.ArgumentParser:
    """The plugin's parser: ``--lawa_*`` options, then the script (or ``-m MODULE``) and everything after it."""
    parser = _OneLineParser(prog=PROG, usage=USAGE, add_help=False, allow_abbrev=False,
                            description="Run a diffusers training script with LAWA over every EMA it keeps.")
    add_lawa_arguments(parser, launch_options=True)
    parser.add_argument("-m", "--module", action="store_true",
                        help="run the target as a module (as python -m does), not as a script path")
    parser.add_argument("target", nargs="?", help="the training script (or module with -m)")
    parser.add_argument("target_args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser


def parse_argv(argv: Sequence[str], environ: Optional[Mapping[str, str]] = None) -> tuple:
    """(PluginOptions, Target) from the plugin's command line."""
    args, extras = build_parser().parse_known_args(bare_flags_given_true(argv))
    for extra in extras:
        check(not extra.startswith(OPTION_PREFIX),
              f"unknown option {extra.split('=')[0]}; valid options are: {', '.join(option_names())}")
        check(not extra.startswith("-"),
              f"option {extra!r} comes before the script but is not a --lawa_* option; "
              f"the script's own options go after the script: {USAGE}")
    check(args.target is not None, f"no training script given; usage: {USAGE}")
    target = Target(args.target, list(args.target_args), args.module)
    misplaced = next((a for a in target.args if a.startswith(OPTION_PREFIX)), None)
    check(misplaced is None,
          f"option {misplaced} comes after the script name {target.name!r}, so it would be passed to the script; "
          f"put --lawa_* options between '-m {PROG}' and the script: ... -m {PROG} {misplaced} ... {target.name} [script args]")
    check_target(target)
    cli = {name: value for name in option_types() if (value := getattr(args, "lawa_" + name)) is not None}
    return resolve_options(cli, os.environ if environ is None else environ), target


def check_target(target: Target) -> None:
    """The script exists, or the module can be imported, as Python would look for it."""
    if not target.module:
        if not os.path.isfile(target.name):
            raise FileNotFoundError(f"training script {target.name!r} does not exist; pass the path of the script "
                                    f"after the --lawa_* options: {USAGE}")
        return
    try:
        found = importlib.util.find_spec(target.name)
    except (ImportError, ValueError) as e:
        found, why = None, f"{type(e).__name__}: {e}"
    else:
        why = f"no module named {target.name!r}"
    check(found is not None, f"module {target.name!r} given with -m cannot be imported ({why}); "
                             "run from the folder that holds its package, or add that folder to PYTHONPATH")


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


# ---------------------------------------------------------- helpers for patched scripts
def lawa_config_from_args(args: Any, environ: Optional[Mapping[str, str]] = None) -> LAWAConfig:
    """The ``LAWAConfig`` given by ``add_lawa_arguments`` options, environment and YAML."""
    cli = {name: value for name in option_types()
           if (value := getattr(args, "lawa_" + name, None)) is not None}
    return resolve_options(cli, os.environ if environ is None else environ).lawa


