"""Two processes (torchrun, gloo) keep LAWA windows of DTensor shards; NaN reaches one process's shard only.

``--on_nonfinite skip|raise``: each process writes ``rank<r>.json`` with what it saw: its window and skipped
steps, or the error it raised.
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from lawa_diffusion import LAWA, LAWAConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--on_nonfinite", default="skip")
    parser.add_argument("--storage", default="cpu")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    params = [distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]), distribute_tensor(torch.randn(6), mesh, [Shard(0)])]
    lawa = LAWA(params, LAWAConfig(k=3, every_n_steps=1, on_nonfinite=args.on_nonfinite, storage=args.storage,
                                   snapshot_dir=os.path.join(args.output_dir, "snapshots")))
    seen = {"rank": rank}
    try:
        for step in range(1, 6):
            for p in params:
                p.to_local().add_(1.0)
            if step == 3 and rank == 1:  # only this process's shard holds the NaN
                params[0].to_local()[0, 0] = float("nan")
            lawa.step(step)
            if step == 3:
                params[0].to_local().nan_to_num_(0.0)
        lawa.resolve_checks()
        seen.update(window=lawa.snapshot_steps, skipped=lawa.skipped_steps,
                    average=lawa.average_flat().tolist())
    except ValueError as e:
        seen["error"] = str(e)
    lawa.close()
    with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # what was checked is written; leave without the interpreter's teardown, where gloo's threads have aborted a
    # loaded machine's process now and then ("terminate called without an active exception")
    os._exit(0)
