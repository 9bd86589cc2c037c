"""Options that override a run's conditional evaluation settings, shared by the after-training commands that
score a run's averages (not a command itself)."""
from __future__ import annotations

CONDITIONS = ("prompts", "class_labels", "guidance_scale", "pipeline")


def add_condition_options(parser) -> None:
    """--prompts, --class-labels, --guidance-scale, --pipeline (default: the run's eval settings)."""
    group = parser.add_argument_group("conditional runs (text-to-image, class-conditional); default: the run's "
                                      "eval settings")
    group.add_argument("--prompts", default=None,
                       help="a text file (one prompt per line), an image folder with metadata.jsonl or a saved dataset")
    group.add_argument("--class-labels", default=None, help="all, or comma-separated class numbers")
    group.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (1: none)")
    group.add_argument("--pipeline", default=None,
                       help="the diffusers pipeline folder whose scheduler, VAE, text encoder and tokenizer sample the "
                            "run's UNet")


def condition_options(args) -> dict:
    return {k: getattr(args, k) for k in CONDITIONS}
