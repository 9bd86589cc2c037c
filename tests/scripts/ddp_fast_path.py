"""Two processes (torchrun, gloo): the fast path's compiled forward under DDP, standing in for a compiled module whose
lazily compiled backward fails at the first compiled call, after DDP has already sent gradient buckets (the failure
comes from a hook inside the network, below the output layer, whose gradients are reduced first).

Scenarios, each with a fresh model: ``none`` (nothing fails), ``both`` (the backward fails on both processes),
``rank1`` (on process 1 only). Each process writes ``rank<r>.json``: per scenario, the largest difference between
its gradients after each of three steps and the mean of both processes' plain gradients (computed here without
DDP), whether it fell back, and the error that stopped it, if any.
"""
import argparse
import datetime
import json
import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

from lawa_diffusion.training import fast_path


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(16, 32), nn.Linear(32, 16)
        self.fail_next_backward = False

    def forward(self, x, t, return_dict=False):
        h = torch.relu(self.inp(x) + t[:, None].float())
        if self.fail_next_backward:
            self.fail_next_backward = False

            def refuse(grad):
                raise RuntimeError("the compiled backward failed to compile")

            h.register_hook(refuse)  # runs after the output layer's gradients are in (their buckets sent)
        return (self.out(h),)


class StandIn:
    """Stands in for ``torch.compile(ddp_model)``: runs the DDP model, failing in the backward of call ``fail_at``."""

    def __init__(self, ddp, fail_at):
        self.ddp, self.fail_at, self.calls = ddp, fail_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            self.ddp.module.fail_next_backward = True
        return self.ddp(*args, **kwargs)


def batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 16, generator=g), torch.randint(0, 5, (4,), generator=g)


def reference_grads(step):
    """The gradient DDP must give: the mean over both processes of the plain gradient of each one's batch."""
    torch.manual_seed(0)
    net = Net()
    total = None
    for rank in (0, 1):
        net.zero_grad(set_to_none=True)
        x, t = batch(rank, step)
        net(x, t)[0].square().mean().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        total = grads if total is None else [a + b for a, b in zip(total, grads)]
    return [g / 2 for g in total]


def scenario(name, rank):
    torch.manual_seed(0)
    ddp = nn.parallel.DistributedDataParallel(Net(), bucket_cap_mb=1e-6)  # one bucket per parameter
    fail_at = {"none": 0, "both": 1, "rank1": 1 if rank == 1 else 0}[name]
    torch.compile = lambda module, **kw: StandIn(module, fail_at)
    forward = fast_path.TrainForward(ddp, fast=True, mode=fast_path.compile_mode(1, num_processes=2))
    seen = {"diffs": []}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                ddp.zero_grad(set_to_none=True)
                x, t = batch(rank, step)

                def forward_backward():
                    loss = forward(x, t).square().mean()
                    loss.backward()
                    return loss

                forward.run(forward_backward, reset=lambda: ddp.zero_grad(set_to_none=True))
                want = reference_grads(step)
                seen["diffs"].append(max((p.grad - w).abs().max().item() for p, w in zip(ddp.parameters(), want)))
        seen["warnings"] = [str(w.message) for w in caught if "fast_path" in str(w.message)]
    except Exception as e:  # noqa: BLE001 - reported to the test
        seen["error"] = f"{type(e).__name__}: {e}"[:500]
    seen.update(fell_back=forward.fell_back, compiled_calls=forward.compiled_calls)
    return seen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    rank = dist.get_rank()
    seen = {}
    for name in ("none", "both", "rank1"):
        seen[name] = scenario(name, rank)
        if "error" in seen[name]:  # the processes may no longer agree on what comes next
            break
    with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
