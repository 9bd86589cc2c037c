"""``lawa-diffusion posthoc`` as one of several processes (run under torch.distributed.run with
ACCELERATE_USE_CPU=1): the search of ``RUN`` with the stand-in Inception features, written to ``OUT``.

Usage: hindsight_processes.py RUN OUT
"""
import sys

import torch

from lawa_diffusion.evaluation.inception import stand_in_extractor
from lawa_diffusion.posthoc import search as hindsight


def main() -> None:
    torch.set_num_threads(1)
    run, out = sys.argv[1], sys.argv[2]
    hindsight.run_hindsight(run, "0.1", twins=["c"], steps="final", out_dir=out, weights=stand_in_extractor(),
                            device="cpu", progress=False)
    from accelerate import PartialState

    state = PartialState()  # the one the search's Accelerator set up
    with open(f"{out}.processes.{state.process_index}", "w") as f:
        f.write(str(state.num_processes))


if __name__ == "__main__":
    main()
