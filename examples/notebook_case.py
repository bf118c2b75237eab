"""The notebook case: two losses from one tiny graph, each backward's part of `a.grad`.

    python examples/notebook_case.py

`d = c.mean()` gives `a` a gradient of `a` and `e = c.sum()` gives `4a`, so `a.grad = 5a`:
the report shows the two parts with shares 20% / 80%, and that they add up to `.grad` exactly.
"""

import torch
from torch import nn

import gradprobe

torch.manual_seed(0)
a = torch.rand(1, 4, requires_grad=True)

with gradprobe.trace(a, keep="tensors") as t:
    b = a**2
    c = b * 2
    d = c.mean()
    e = c.sum()
    d.backward(retain_graph=True)
    e.backward()

t.report()

row = t.breakdown()[0]
print("part from d equals a:   ", torch.allclose(row.part(0).tensor, a.detach()))
print("part from e equals 4a:  ", torch.allclose(row.part(1).tensor, 4 * a.detach()))
print("parts sum to a.grad bit for bit:", row.check)

mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
print("model weights are leaves too: mlp[0].weight.is_leaf =", mlp[0].weight.is_leaf)
