"""Activation checkpointing and torch.compile: parts stay exact, nothing is counted twice.

    python examples/checkpoint_and_compile.py

A reentrant checkpoint recomputes its block inside the backward (a nested backward); gradprobe
attributes that to the user's backward call, so each loss still has one part per parameter and
the parts add up to `.grad` bit for bit (Σ ✓). The same model then runs under torch.compile
(the "aot_eager" backend, quick to compile on a CPU).
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import gradprobe


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 16)
        self.block = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head_a, self.head_b = nn.Linear(16, 1), nn.Linear(16, 1)

    def forward(self, x):
        h = checkpoint(self.block, torch.relu(self.stem(x)), use_reentrant=True)
        return self.head_a(h), self.head_b(h)


torch.manual_seed(0)
net = Net()
x = torch.randn(8, 4)

with gradprobe.trace(keep="tensors") as t:  # every leaf, including those inside the checkpoint
    out_a, out_b = net(x)
    loss_a, loss_b = out_a.pow(2).mean(), out_b.abs().mean()
    loss_a.backward(retain_graph=True)
    loss_b.backward()
t.report()

compiled = torch.compile(net, backend="aot_eager")
net.zero_grad()
with gradprobe.trace(net, keep="tensors") as t2:
    out_a, out_b = compiled(x)
    loss = out_a.pow(2).mean() + out_b.abs().mean()
    loss.backward()
print("compiled: parts add up to .grad for every parameter:", all(row.check for row in t2.breakdown()))
