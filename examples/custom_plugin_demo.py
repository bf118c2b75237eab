"""A third-party plugin in a report: the gradient-norm budget of examples/custom_plugin/.

Installed (`pip install ./examples/custom_plugin`), the plugin joins every trace by itself through
its entry point. Not installed, this demo imports it from the source folder and passes it to the
trace explicitly -- the two ways a plugin gets into a trace.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

import gradprobe


def load_normbudget() -> type:
    """The plugin class, imported from examples/custom_plugin/ without installing it."""
    path = Path(__file__).parent / "custom_plugin" / "gradprobe_normbudget" / "__init__.py"
    spec = importlib.util.spec_from_file_location("gradprobe_normbudget_demo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.NormBudget  # type: ignore[no-any-return]


torch.manual_seed(0)
backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU())
cls_head = nn.Linear(32, 5)
box_head = nn.Linear(32, 4)
x = torch.randn(64, 16)

installed = "normbudget" in gradprobe.refresh_plugins()
plugins = [] if installed else [load_normbudget()(budget=2.0)]

with gradprobe.trace(backbone, cls_head, box_head, plugins=plugins, on_finding="record") as t:
    features = backbone(x)
    loss_cls = nn.functional.cross_entropy(cls_head(features), torch.zeros(64, dtype=torch.long))
    loss_box = 25.0 * box_head(features).pow(2).mean()  # an overweighted box loss blows the budget
    loss_cls.backward(retain_graph=True)
    loss_box.backward()

t.report()
