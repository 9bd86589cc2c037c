"""``lawa-diffusion patch``: rewrite a diffusers training script so that it keeps LAWA over its EMA.
"""
from __future__ import annotations

import sys

from lawa_diffusion.config.base import check
from lawa_diffusion.integrations.script_patcher import patch_file, unified_diff


def _handle(args) -> int:
    check(bool(args.output), "patch needs -o OUT.py, the path of the patched script to write")
    notes = patch_file(args.script, args.output, overwrite=args.overwrite)
    if args.diff:
        with open(args.script, encoding="utf-8") as f, open(args.output, encoding="utf-8") as g:
            sys.stdout.write(unified_diff(f.read(), g.read(), args.script, args.output))
    for note in notes:
        print(f"  {note}", file=sys.stderr)
    print(f"wrote {args.output}; run it with its usual arguments plus --lawa_k / --lawa_every_n_steps ...", file=sys.stderr)
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("patch", help="rewrite a diffusers training script to keep LAWA over its EMA",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("script", help="the training script to read (left unchanged)")
    p.add_argument("-o", "--output", required=True, help="where to write the patched script")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--diff", action="store_true", help="also print the unified diff")
    p.set_defaults(func=_handle)
