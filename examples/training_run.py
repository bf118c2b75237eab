"""One trace around a whole training loop: the report is about the run, not about step 0.

A small multi-task network (a shared trunk, a classification head and a regression head, with a
small penalty on the trunk's features added to the regression loss) trains for 200 steps with Adam
under ONE trace. The trace
keeps the last 16 steps in full (``window=16``) and folds older ones into per-module, per-loss
aggregates, so memory stays flat however long the run is. The report shows the latest step's
breakdown, each loss line with its call count, and the run: each loss's share of every module's
gradient over the steps, how often the losses pulled against each other, and the ‖.grad‖ trend.

Run:  python examples/training_run.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

import gradprobe


class MultiTask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.cls_head = nn.Linear(32, 4)
        self.reg_head = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.cls_head(h), self.reg_head(h), h


def main(steps: int = 200) -> gradprobe.Trace:
    torch.manual_seed(0)
    model = MultiTask()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(64, 12)
    labels = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    targets = x[:, 2:4] * 3.0

    with gradprobe.trace(model, window=16, on_finding="record") as t:
        for _ in range(steps):
            opt.zero_grad()
            logits, pred, features = model(x)
            loss_cls = F.cross_entropy(logits, labels)
            loss_reg = F.mse_loss(pred, targets) + 0.05 * features.pow(2).mean()  # the penalty pulls features to 0
            loss_cls.backward(retain_graph=True)
            loss_reg.backward()
            opt.step()
    t.report(console=Console(width=100))
    return t


if __name__ == "__main__":
    main()
