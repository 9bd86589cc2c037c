"""``lawa-diffusion patch``: rewrite a diffusers training script to keep LAWA over its EMA.

The rewrite is a handful of inserted or changed lines, found with ``ast`` and applied to the
original text (formatting and comments stay):

- import ``LAWAEMAModel``, ``attach`` and the argument helpers after the ``EMAModel`` import;
- ``add_lawa_arguments(parser)`` before the script parses its arguments (``--lawa_k`` ...);
- ``EMAModel(...)`` that builds a training EMA -> ``LAWAEMAModel(..., lawa=lawa_config_from_args(args))``
  followed by ``attach(accelerator, ema.lawa)`` (LAWA state in ``save_state`` checkpoints);
- after ``ema.save_pretrained(<folder>)``: ``save_lawa_next_to(ema, <folder>)`` (``unet_ema`` ->
  ``unet_lawa``).

``EMAModel.from_pretrained`` in load hooks stays as it is. A script that already imports
``LAWAEMAModel`` is returned unchanged, so patching twice gives the same file.
"""
from __future__ import annotations

import ast
import difflib
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

IMPORTS = ("from lawa_diffusion import LAWAEMAModel, attach",
           "from lawa_diffusion.launch import add_lawa_arguments, lawa_config_from_args, save_lawa_next_to")
PATCHED_MARK = "LAWAEMAModel"
ARGS_NAME = "args"


@dataclass
class Edits:
    """Line edits on the original text: insertions after a line and in-line replacements."""

    insert_after: Dict[int, List[str]] = field(default_factory=dict)   # 1-based line -> new lines
    replace: List[Tuple[int, int, int, str]] = field(default_factory=list)  # (line, col, end_col, text)
    notes: List[str] = field(default_factory=list)

    def add_lines(self, after_line: int, lines: List[str]) -> None:
        self.insert_after.setdefault(after_line, []).extend(lines)

    def apply(self, text: str) -> str:
        lines = text.splitlines(keepends=True)
        for line, col, end_col, new in sorted(self.replace, reverse=True):
            old = lines[line - 1]
            lines[line - 1] = old[:col] + new + old[end_col:]
        newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
        for after in sorted(self.insert_after, reverse=True):
            lines[after:after] = [new + newline for new in self.insert_after[after]]
        return "".join(lines)


def _indent(lines: List[str], lineno: int) -> str:
    line = lines[lineno - 1]
    return line[: len(line) - len(line.lstrip())]


def _is_ema_call(node: ast.AST) -> bool:
    return _callee_name(node) == "EMAModel"


def _callee_name(node: ast.AST) -> Optional[str]:
    """``f`` for ``f(...)`` or ``a.b.f(...)``; None when ``node`` is not a call."""
    if not isinstance(node, ast.Call):
        return None
    return getattr(node.func, "id", None) or getattr(node.func, "attr", None)


def _parse_args_of(node: ast.AST, parser: str) -> bool:
    call = _call_of(node, "parse_args")
    return call is not None and isinstance(call.func.value, ast.Name) and call.func.value.id == parser


def _call_of(node: ast.AST, attr: str) -> Optional[ast.Call]:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr:
        return node
    return None


class ScriptPatcher:
    """Finds the places to change in one script and records the edits."""

    def __init__(self, text: str, filename: str):
        self.text, self.filename = text, filename
        self.lines = text.splitlines()
        try:
            self.tree = ast.parse(text, filename=filename)
        except SyntaxError as e:
            raise ValueError(f"script {filename!r} is not valid Python (line {e.lineno}: {e.msg}); "
                             "fix it before patching") from None
        self.edits = Edits()

    def refuse(self, why: str) -> None:
        raise ValueError(f"cannot patch {self.filename!r}: {why}; use the launch plugin "
                         f"(accelerate launch -m lawa_diffusion.launch ...) or the LAWAEMAModel API instead")

    def run(self) -> Edits:
        emas = self._ema_assignments()
        if not emas:
            self.refuse("it builds no training EMA as `name = EMAModel(...)`")
        accelerator = self._accelerator_name()
        if accelerator is None:
            self.refuse("it creates no `accelerator = Accelerator(...)` to carry LAWA state in checkpoints")
        if not any(isinstance(n, ast.Name) and n.id == ARGS_NAME for n in ast.walk(self.tree)):
            self.refuse(f"it has no `{ARGS_NAME}` namespace to read --lawa_* options from")
        self._add_imports()
        self._add_arguments()
        for i, (stmt, call, target) in enumerate(emas):
            self._patch_ema(stmt, call, target, accelerator, i)
        self._patch_saves([target for _, _, target in emas])
        return self.edits

    # -------------------------------------------------------------- finding
    def _ema_assignments(self) -> List[Tuple[ast.stmt, ast.Call, str]]:
        found = []
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and _is_ema_call(node.value):
                found.append((node, node.value, ast.get_source_segment(self.text, node.targets[0])))
        return sorted(found, key=lambda f: f[0].lineno)

    def _accelerator_name(self) -> Optional[str]:
        for node in ast.walk(self.tree):
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and _callee_name(node.value) == "Accelerator"):
                return node.targets[0].id
        return None

    # -------------------------------------------------------------- edits
    def _add_imports(self) -> None:
        anchor = None
        for node in self.tree.body:
            if isinstance(node, ast.ImportFrom) and any(a.name == "EMAModel" for a in node.names):
                anchor = node
        if anchor is None:
            imports = [n for n in self.tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
            if not imports:
                self.refuse("it has no top-level imports to extend")
            anchor = imports[-1]
        self.edits.add_lines(anchor.end_lineno, list(IMPORTS))
        self.edits.notes.append(f"line {anchor.end_lineno}: import LAWAEMAModel, attach and the --lawa_* helpers")

    def _add_arguments(self) -> None:
        for body, index, parser in self._parser_assignments():
            for stmt in body[index + 1:]:
                if any(_parse_args_of(n, parser) for n in ast.walk(stmt)):
                    line = f"{_indent(self.lines, stmt.lineno)}add_lawa_arguments({parser})"
                    self.edits.add_lines(stmt.lineno - 1, [line])
                    self.edits.notes.append(f"line {stmt.lineno}: add the --lawa_* options before parse_args")
                    return
        self.refuse("it has no `parser = argparse.ArgumentParser(...)` followed by `parser.parse_args(...)`")

    def _parser_assignments(self) -> Iterator[Tuple[list, int, str]]:
        """(statement list, index, variable) of every ``variable = ...ArgumentParser(...)``."""
        for node in ast.walk(self.tree):
            for body in (getattr(node, "body", None), getattr(node, "orelse", None)):
                for index, stmt in enumerate(body if isinstance(body, list) else []):
                    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
                            and _callee_name(stmt.value) == "ArgumentParser"):
                        yield body, index, stmt.targets[0].id

    def _patch_ema(self, stmt: ast.Assign, call: ast.Call, target: str, accelerator: str, index: int) -> None:
        func = call.func
        self.edits.replace.append((func.lineno, func.col_offset, func.end_col_offset, "LAWAEMAModel"))
        extra = [f"lawa=lawa_config_from_args({ARGS_NAME})"] + ([f'lawa_name="lawa_{index + 1}"'] if index else [])
        self._add_keywords(call, extra)
        indent = _indent(self.lines, stmt.lineno)
        self.edits.add_lines(stmt.end_lineno, [f"{indent}attach({accelerator}, {target}.lawa)"])
        self.edits.notes.append(f"line {stmt.lineno}: {target} = LAWAEMAModel(..., lawa=...) and attach it to {accelerator}")

    def _add_keywords(self, call: ast.Call, keywords: List[str]) -> None:
        close_line, close_col = call.end_lineno, call.end_col_offset - 1
        last = (call.args + call.keywords)[-1] if (call.args or call.keywords) else None
        closing_alone = self.lines[close_line - 1][:close_col].strip() == ""
        between = self._between(last.end_lineno, last.end_col_offset, close_line, close_col) if last else ""
        if last is None or not closing_alone:
            sep = "" if last is None else (" " if "," in between else ", ")
            self.edits.replace.append((close_line, close_col, close_col, sep + ", ".join(keywords)))
            return
        if "," not in between:
            self.edits.replace.append((last.end_lineno, last.end_col_offset, last.end_col_offset, ","))
        indent = _indent(self.lines, last.lineno if last.lineno > call.lineno else call.lineno + 1)
        self.edits.add_lines(close_line - 1, [f"{indent}{k}," for k in keywords])

    def _between(self, line: int, col: int, end_line: int, end_col: int) -> str:
        if line == end_line:
            return self.lines[line - 1][col:end_col]
        parts = [self.lines[line - 1][col:]] + self.lines[line: end_line - 1] + [self.lines[end_line - 1][:end_col]]
        return "\n".join(parts)

    def _patch_saves(self, targets: List[str]) -> None:
        for node in ast.walk(self.tree):
            if not isinstance(node, ast.Expr):
                continue
            call = _call_of(node.value, "save_pretrained")
            if call is None or len(call.args) != 1:
                continue
            owner = ast.get_source_segment(self.text, call.func.value)
            if owner in targets:
                folder = ast.get_source_segment(self.text, call.args[0])
                indent = _indent(self.lines, node.lineno)
                self.edits.add_lines(node.end_lineno, [f"{indent}save_lawa_next_to({owner}, {folder})"])
                self.edits.notes.append(f"line {node.lineno}: write the LAWA folder next to {owner}'s EMA folder")


def patch_source(text: str, filename: str = "<script>") -> Tuple[str, List[str]]:
    """(patched text, notes on what changed); an already patched script comes back unchanged."""
    if PATCHED_MARK in text and IMPORTS[0] in text:
        return text, [f"{filename} already uses LAWAEMAModel; nothing to change"]
    edits = ScriptPatcher(text, filename).run()
    notes = sorted(edits.notes, key=lambda n: int(n.split()[1].rstrip(":")))
    return edits.apply(text), notes


def unified_diff(old: str, new: str, old_name: str, new_name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True), old_name, new_name))


def patch_file(script: str, output: str, overwrite: bool = False) -> List[str]:
    """Patch ``script`` into ``output`` (written atomically); returns the notes."""
    from lawa_diffusion.utils.files import atomic_write_text

    if not os.path.isfile(script):
        raise FileNotFoundError(f"script {script!r} does not exist; pass the path of a diffusers training script")
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"output {output!r} already exists; choose another -o path or pass --overwrite")
    with open(script, encoding="utf-8") as f:
        text = f.read()
    new, notes = patch_source(text, script)
    atomic_write_text(output, new)
    return notes
