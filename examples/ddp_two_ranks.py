"""DistributedDataParallel on 2 CPU ranks (gloo): per-rank local parts, merged on rank 0.

    python examples/ddp_two_ranks.py

Each rank traces its own DDP step: the parts are the rank's LOCAL gradients (its own batch, before
the all-reduce), `.grad` is the all-reduced average. `t.gather(dst=0)` merges every rank's statistics
on rank 0, which hands the merged trace back to this process to print. The second step backpropagates
only `loss_a`, so the head_b parameters get no gradient: DDP would fail at the next forward with
"Expected to have finished reduction in the prior iteration" (indices only); gradprobe names them
at that backward (GP721).
"""

import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import gradprobe


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.head_a = nn.Linear(8, 2)
        self.head_b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.head_a(h), self.head_b(h)


def traced_steps(rank):
    """Two traced DDP steps on this rank; returns the merged trace on rank 0 (None elsewhere)."""
    torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = DDP(TwoHeads())
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))  # each rank its own batch

    with gradprobe.trace(model, on_finding="record") as t:
        a, b = model(x)
        loss_a, loss_b = a.square().mean(), b.abs().mean()
        (loss_a + loss_b).backward()
        model.zero_grad()
        a, _ = model(x)
        loss_a = a.square().mean()
        loss_a.backward()  # head_b unused: GP721 here, DDP's error only at the next forward

    return t.gather(dst=0)  # a collective: every rank calls it


def worker(rank, world, port, results):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        merged = traced_steps(rank)
        if rank == 0:
            results.put(merged)
        # Tear down in order: the DDP module (its reducer still holds the all-reduce the abandoned
        # second step started) goes while the process group lives, and no rank destroys the group
        # while the other still uses it (gloo's barrier waits for all earlier work).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(worker, args=(2, free_port(), results), nprocs=2)
    results.get().report()
