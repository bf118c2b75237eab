"""The notebook's autograd mistakes, caught by gradprobe before (or where) PyTorch is silent or vague.

    python examples/autograd_mistakes.py

1. `d.backward(); e.backward()` on one graph: gradprobe warns at `d.backward()` that `e.backward()`
   will fail, then predicts the failure at `e.backward()` naming the line that freed the graph.
2. `b.grad` on a non-leaf: None, flagged with the fix (`b.retain_grad()` or read `a.grad`).
3. `ReLU(inplace=True)` after `Sigmoid` overwrites the tensor sigmoid saved: the backward's failure is
   predicted at the backward, naming the line that wrote in place.
4. A loss rebuilt from `.item()` with `requires_grad = True`: its backward reaches no parameter.

`on_finding="record"` collects the findings without raising, and the report prints them.
"""

import warnings

import torch
from torch import nn

import gradprobe

torch.manual_seed(0)
a = torch.rand(1, 4, requires_grad=True)
model = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.ReLU(inplace=True), nn.Linear(4, 1))

with gradprobe.trace(a, model, on_finding="record", detect="all") as t:
    # 1. one graph, two backwards, no retain_graph
    b = a**2
    c = b * 2
    d = c.mean()
    e = c.sum()
    d.backward()
    try:
        e.backward()
    except RuntimeError as err:
        print("PyTorch then raised:", str(err).split(".")[0])

    # 2. the gradient of a non-leaf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyTorch's own, less precise warning
        print("b.grad is", b.grad)

    # 3. an in-place activation after a layer that saved its output
    y = model(torch.rand(3, 4))
    try:
        y.sum().backward()
    except RuntimeError as err:
        print("the backward raised:", str(err).split(":")[0])

    # 4. a loss cut from the graph, "fixed" with requires_grad = True
    loss = torch.tensor(model[0](torch.rand(3, 4)).mean().item())
    loss.requires_grad = True
    loss.backward()

t.report()
