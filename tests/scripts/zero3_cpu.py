"""Run a training script, or the launch plugin, under DeepSpeed with CPU processes (torchrun, gloo); tests only.

    zero3_cpu.py reference SCRIPT.py [args]   the script alone, with ``deepspeed`` in diffusers.training_utils
                                             (what diffusers imports itself when ZeRO-3 is on at its import)
    zero3_cpu.py script SCRIPT.py [args]      the script alone, as it is
    zero3_cpu.py launch [plugin argv]         ``python -m lawa_diffusion.launch``, with a small stand-in
                                             feature extractor for its FID monitor (also for plugin runs
                                             without DeepSpeed: FSDP2 on gloo)

On a machine without an accelerator, accelerate finds no device backend and counts each DeepSpeed
process as a lone main process (num_processes 1); its process state made first with backend "gloo"
counts the torchrun processes, as accelerate does with NCCL on GPUs.
"""
import sys

from accelerate import PartialState


def main():
    mode, argv = sys.argv[1], sys.argv[2:]
    PartialState(backend="gloo")
    from lawa_diffusion import launch

    if mode == "launch":
        from lawa_diffusion.evaluation import inception

        inception.load_extractor = lambda *args, **kwargs: inception.stand_in_extractor(dim=16)
        return launch.main(argv)
    if mode == "reference":
        import deepspeed
        import diffusers.training_utils

        diffusers.training_utils.deepspeed = deepspeed
    launch.run_script(argv[0], argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
