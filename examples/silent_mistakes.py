"""Silent mistakes: training runs, the loss goes down a little, and the model is wrong or memory grows.

    python examples/silent_mistakes.py

Four short loops, each with a mistake PyTorch never reports, caught with the line and the cost:
a running total that keeps every step's graph (GP111), an optimizer built before the model was
re-created (GP801), `retain_graph=True` that kept activations alive for nothing (GP112), and a
prediction detached and forced to require grad (GP505). Then the freed-graph error drawn: where two
backward calls meet (GP101 / GP102, the tree under the findings).
"""

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import gradprobe

torch.manual_seed(0)
console = Console(width=110)


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(64, 8), torch.randn(64, 1)


model = net()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
model = net()  # mistake 2: the model re-created after the optimizer was built on the old one

with gradprobe.trace(model, on_finding="record") as t:
    total_loss = 0
    for step in range(3):
        x, y = batch()
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward(retain_graph=True)  # mistake 3: nothing backwards this graph again
        opt.step()
        total_loss += loss  # mistake 1: keeps every step's graph (use loss.item())

    pred = model(batch()[0]).detach()
    pred.requires_grad = True  # mistake 4: silences "does not require grad", trains nothing
    F.mse_loss(pred, torch.zeros(64, 1)).backward()

for finding in t.findings:
    console.print(f"[bold]{finding.code}[/] {finding.site}: {finding.message}\n    [green]fix:[/] {finding.fix}")

# The freed-graph error drawn: two heads on one trunk, backwarded one after the other.
trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
heads = nn.ModuleDict({"cls": nn.Linear(16, 3), "box": nn.Linear(16, 4)})
with gradprobe.trace(trunk, heads, on_finding="record") as t2:
    feats = trunk(torch.randn(4, 8))
    loss_cls = heads["cls"](feats).logsumexp(-1).mean()
    loss_box = heads["box"](feats).abs().mean()
    loss_cls.backward()
    try:
        loss_box.backward()
    except RuntimeError as error:
        console.print(f"PyTorch: {str(error).splitlines()[0][:80]}...")
t2.report(console=console)
