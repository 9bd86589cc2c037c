"""Options that override a finished run's evaluation settings (reference, samples, sampler steps, Inception
weights, the conditions of a conditional run, device), shared by the commands that score a run's averages
(``sweep``, ``hindsight``); not a command itself."""
from __future__ import annotations

from lawa_diffusion.cli.renamed import add_old_spelling

SETTINGS = ("reference", "num_samples", "batch_size", "num_inference_steps", "weights")
CONDITIONS = ("prompts", "class_labels", "guidance_scale", "pipeline")


def add_evaluator_options(parser, scored: str) -> None:
    """The run evaluator's overrides (default: the run's eval settings); ``scored`` names what each image set is
    of in the help ("variant", "average")."""
    parser.add_argument("--reference", default=None, help="FID reference (default: the run's eval.reference)")
    parser.add_argument("--num-samples", type=int, default=None, help=f"images per {scored} (default: the run's)")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="sampler steps (default: the run's)")
    parser.add_argument("--batch-size", type=int, default=None, help="sampling batch size (default: the run's)")
    parser.add_argument("--inception-weights", dest="weights", default=None,
                        help="Inception weights file (default: the run's / the resolved ones)")
    add_old_spelling(parser, "--weights", "--inception-weights", "weights")
    group = parser.add_argument_group("conditional runs (text-to-image, class-conditional); default: the run's "
                                      "eval settings")
    group.add_argument("--prompts", default=None,
                       help="a text file (one prompt per line), an image folder with metadata.jsonl or a saved dataset")
    group.add_argument("--class-labels", default=None, help="all, or comma-separated class numbers")
    group.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (1: none)")
    group.add_argument("--pipeline", default=None,
                       help="the diffusers pipeline folder whose scheduler, VAE, text encoder and tokenizer sample the "
                            "run's UNet")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available)")


def evaluator_options(args) -> dict:
    """The overrides given, as keyword arguments of the run evaluator (None: the run's own)."""
    return {k: getattr(args, k) for k in SETTINGS + CONDITIONS}
