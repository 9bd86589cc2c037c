"""What every config section shares: ``check`` (one-sentence ``ValueError``), building a dataclass from a mapping
that rejects unknown keys, reading YAML, and the small number/list checks the sections use.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, TypeVar

import yaml

T = TypeVar("T")


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds (input validation, never ``assert``)."""
    if not condition:
        raise ValueError(message)


def from_mapping(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys are rejected with the list of valid ones."""
    check(isinstance(values, Mapping), f"{where} must be a mapping of option: value, got {type(values).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    check(not unknown, f"{where} has unknown key(s) {', '.join(unknown)}; valid keys are: {', '.join(names)}")
    return cls(**dict(values))


def read_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML mapping from ``path`` (empty file = empty mapping)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {os.fspath(path)!r} does not exist; pass the path of a YAML file")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {os.fspath(path)!r} is not valid YAML ({e}); fix its syntax") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"config file {os.fspath(path)!r} is not UTF-8 text (byte {e.start} cannot be decoded); "
                             "restore it or pass another file") from None
    data = {} if data is None else data
    check(isinstance(data, dict), f"config file {os.fspath(path)!r} must hold a mapping of option: value")
    return data


def check_int(where: str, name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    check(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
          f"{where} {name} must be an integer >= {minimum}{' or null' if allow_none else ''}, got {value!r}")


def as_number(where: str, name: str, value: Any, minimum: float = 0.0) -> float:
    """``value`` as a float >= ``minimum``; strings such as "1e-3" (which YAML leaves as text) are accepted."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= minimum,
          f"{where} {name} must be a number >= {minimum}, got {value!r}")
    return float(value)


def as_list(values: Any, where: str) -> list:
    values = [] if values is None else values
    check(isinstance(values, (list, tuple)), f"{where} must be a list of mappings, got {values!r}")
    return list(values)


def entries(values: Any, cls: type, where: str) -> list:
    """Each entry of the list ``values`` as a ``cls`` (mappings are checked for unknown keys)."""
    return [v if isinstance(v, cls) else from_mapping(cls, v, f"{where}[{i}]")
            for i, v in enumerate(as_list(values, where))]
