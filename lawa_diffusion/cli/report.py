"""``lawa-diffusion report``: FID-vs-step curves of one or more runs and the steps LAWA saves over EMA.
"""
from __future__ import annotations

import json

from lawa_diffusion.config.commands import ReportConfig
from lawa_diffusion.reports.run_report import METRICS, files_line, format_table, write_report


# ----------------------------------------------------------------------------- CLI
def _cli(args) -> int:
    summary = write_report(args.run_dirs, args.out, args.metric, args.confidence, args.overwrite)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(format_table(summary))
        print(files_line(summary))
    return 0


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("report", help="curves, speed-up of LAWA over EMA with a CI over runs, PNG + JSON",
                              description="Report FID-vs-step curves and the steps LAWA saves over EMA.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) holding metrics.jsonl (several = seeds)")
    p.add_argument("-o", "--out", default=None, help="output folder (default RUN_DIR/report, or the runs' parent/report)")
    p.add_argument("--metric", default=ReportConfig.metric, help=f"one of {', '.join(METRICS)}")
    p.add_argument("--confidence", type=float, default=ReportConfig.confidence, help="confidence level of the intervals")
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of the table")
    p.add_argument("--overwrite", action="store_true", help="replace a report.json that this command did not write")
    p.set_defaults(func=_cli)
