"""LAWA for an unmodified diffusers training script, through ``accelerate launch -m``.

    accelerate launch [accelerate options] -m lawa_diffusion.launch [--lawa_* options] SCRIPT.py [script args]
    accelerate launch [accelerate options] -m lawa_diffusion.launch [--lawa_* options] -m pkg.module [args]

The ``--lawa_<name>`` options (``LAWAConfig`` and ``LaunchConfig`` fields, declared once by
``add_lawa_arguments``, the builder patched scripts use too) go before the script; ``LAWA_<NAME>``
environment variables and a YAML file (``--lawa_config`` / ``LAWA_CONFIG``) give the same options,
with precedence command line > environment > YAML > defaults. The script runs as ``__main__`` with
the ``sys.argv`` / ``sys.path`` Python would give it, while:

- diffusers' ``EMAModel`` is replaced by a ``LAWAEMAModel`` subclass, so every EMA the script makes
  feeds a LAWA engine from ``step``;
- ``EMAModel.save_pretrained(".../unet_ema")`` also writes ``.../unet_lawa`` once the window holds
  snapshots, and a model saved while the EMA weights are copied into it (``store`` / ``copy_to`` /
  save / ``restore``, as for the final pipeline) gets a ``<folder>_lawa`` sibling;
- ``Accelerator.save_state`` / ``load_state`` carry the LAWA state (same files as
  ``lawa_diffusion.attach``), so ``--resume_from_checkpoint`` continues the window exactly; a
  checkpoint written with another k, every_n_steps, start_step or number of processes is refused;
- with ``--lawa_posthoc_every_n_steps N`` (``--lawa_posthoc_sigma_rels``, default 0.05,0.10), power-function
  EMAs kept beside the script's first EMA store their snapshots under its ``--output_dir``
  (``lawa_diffusion.integrations.posthoc_beside``).

LAWA only observes: it draws no random numbers the script would draw and changes no weights of the
script's. Bad LAWA input, before or while the script runs, is one ``error:`` line and exit code 2.
"""
from __future__ import annotations

import contextlib
import os
import runpy
import sys
import traceback
from typing import Any, Iterator, Optional, Sequence

from lawa_diffusion.integrations.plugin import LAWAInputError, Plugin, lawa_folder_for, raised_in_package
from lawa_diffusion.integrations.plugin_options import (  # the two builders patched scripts import from here
    PROG,
    PluginOptions,
    Target,
    add_lawa_arguments,
    build_parser,
    lawa_config_from_args,
    parse_argv,
)
from lawa_diffusion.runs.folder import script_option
from lawa_diffusion.utils.os_errors import as_os_error, describe
from lawa_diffusion.utils.output import is_main_process, say

__all__ = ["add_lawa_arguments", "lawa_config_from_args", "save_lawa_next_to", "main", "run_target", "run_script",
           "installed"]


def save_lawa_next_to(ema: Any, ema_folder: str | os.PathLike) -> Optional[str]:
    """Write ``ema.lawa``'s weights beside an EMA folder (``unet_ema`` -> ``unet_lawa``).

    Over a sharded EMA (FSDP2 / DTensor) call it on every process: the shards are gathered and the main
    process writes. Otherwise only the main process writes. Does nothing (returns None) before the window
    holds a snapshot or on a process that takes no part.
    """
    lawa = ema.lawa
    sharded = lawa.source.sharded()
    if not (lawa.holds_snapshots and lawa.ready and (sharded or is_main_process())):
        return None
    folder = lawa_folder_for(ema_folder)
    lawa.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------- running
def run_target(target: Target) -> None:
    """Run the script (or module) as ``__main__`` with the argv and sys.path Python would give it."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [target.name, *target.args]
    try:
        if target.module:  # python -m: sys.path[0] is the working folder, argv[0] the module's file
            sys.path[0:1] = [os.getcwd()]
            runpy.run_module(target.name, run_name="__main__", alter_sys=True)
        else:
            path = os.path.abspath(target.name)
            sys.path[0:1] = [os.path.dirname(path)]
            runpy.run_path(path, run_name="__main__")
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def run_script(script: str, script_args: Sequence[str]) -> None:
    """Run a script path as ``__main__`` (as ``python SCRIPT.py ARGS`` would)."""
    run_target(Target(script, list(script_args)))


@contextlib.contextmanager
def installed(options: PluginOptions, script: str = "the script", script_args: Sequence[str] = ()) -> Iterator[Plugin]:
    """Patch diffusers and accelerate for the duration of the block (restored on exit)."""
    plugin = Plugin(options)
    plugin.script_args = list(script_args)
    plugin.install()
    say(plugin.describe(script), PROG)
    finished = False
    try:
        yield plugin
        finished = True
    finally:
        try:
            plugin.finish()
            if finished:
                say(plugin.summary(script), PROG)
        finally:
            plugin.uninstall()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"], ["--lawa_help"]):
        print(build_parser().format_help())
        return 0
    try:
        options, target = parse_argv(argv)
    except (ValueError, FileNotFoundError) as e:
        say(f"error: {e}", PROG)
        return 2
    try:
        with installed(options, target.name, target.args):
            run_target(target)
    except LAWAInputError as e:  # bad LAWA input found while the script ran (the script's own errors pass)
        say(f"error: {e}", PROG)
        return 2
    except OSError as e:  # a full disk (or a permission) met by this package's writes: one sentence
        if e.errno is None or not raised_in_package(traceback.extract_tb(e.__traceback__)[-1].filename):
            raise
        say(f"error: {os_error_line(e, target.args)}", PROG)
        return 2
    return 0


def os_error_line(error: OSError, script_args: Sequence[str]) -> str:
    """One sentence for an error of the operating system met while the script runs under the plugin: the path,
    the script's --output_dir when the path lies under it, and what to do."""
    error = as_os_error(error) or error
    output_dir = script_option(script_args, "output_dir") or os.getcwd()
    path = os.path.realpath(os.path.abspath(error.filename)) if error.filename else ""
    root = os.path.realpath(os.path.abspath(output_dir))
    under = path == root or path.startswith(root.rstrip(os.sep) + os.sep)
    return describe(error, "--output_dir of the script" if under else None)


if __name__ == "__main__":
    from lawa_diffusion.launch import main as _main  # one copy of the module state, not a second __main__

    sys.exit(_main())
