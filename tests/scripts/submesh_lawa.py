"""Three processes (torchrun, gloo); the EMA is sharded over a mesh of ranks 0 and 1 only, as a pipeline stage or
one mesh of several would hold it, and rank 2 runs no collective at all (it waits for the others' files).

Ranks 0 and 1 keep a LAWA window of their shards (k=3, a snapshot every step, steps 1-5; before each snapshot
every weight becomes ``w * 0.5 + step``); rank 1's shard holds a NaN at step 3 only. Each writes ``rank<r>.json``
(its window and skipped steps, or its error); rank 0 writes the gathered average as ``lawa/`` with
``save_pretrained``. Both must end without waiting for rank 2.
"""
import argparse
import datetime
import json
import os
import time

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Shard, distribute_tensor

from lawa_diffusion import LAWA, LAWAConfig
from tests.helpers import tiny_unet


def hold_the_ema(rank: int, mesh: DeviceMesh, out: str) -> dict:
    shards = [distribute_tensor(p.detach().clone(), mesh, [Shard(0)]) for p in tiny_unet().parameters()]
    lawa = LAWA(shards, LAWAConfig(k=3, every_n_steps=1, on_nonfinite="skip"))
    seen = {}
    try:
        for step in range(1, 6):
            for s in shards:
                s.to_local().mul_(0.5).add_(float(step))
            local = shards[0].to_local()
            kept = local[0].clone()
            if step == 3 and rank == 1:  # only this process's shard holds the NaN
                local[0] = float("nan")
            lawa.step(step)
            local[0] = kept
        lawa.resolve_checks()
        seen.update(window=lawa.snapshot_steps, skipped=lawa.skipped_steps)
        lawa.save_pretrained(os.path.join(out, "lawa"), model=tiny_unet(seed=5))
    except Exception as e:  # noqa: BLE001 - reported to the test
        seen["error"] = f"{type(e).__name__}: {e}"
    lawa.close()
    return seen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    mesh = DeviceMesh("cpu", [0, 1])  # made by every process; rank 2 is not in it
    if rank in (0, 1):
        seen = hold_the_ema(rank, mesh, args.output_dir)
    else:
        others = [os.path.join(args.output_dir, f"rank{r}.json") for r in (0, 1)]
        deadline = time.monotonic() + 120
        while not all(map(os.path.exists, others)) and time.monotonic() < deadline:
            time.sleep(0.2)
        seen = {"waited_for_files": all(map(os.path.exists, others))}
    seen["rank"] = rank
    path = os.path.join(args.output_dir, f"rank{rank}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(seen, f)
    os.replace(path + ".tmp", path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
