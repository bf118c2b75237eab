"""Mixed precision: gradprobe sees GradScaler's scaling and catches clipping before `scaler.unscale_`.

    python examples/amp_gradscaler.py

The loss goes through `scaler.scale(loss).backward()`, so every gradient is 65536 times too large
until `scaler.unscale_(opt)`. The report lists the scaled call with its scale and the unscaled
norms; the clip below runs before unscale_, which is finding GP712.
"""

import torch
from torch import nn

import gradprobe

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
scaler = torch.amp.GradScaler("cpu")
x, y = torch.randn(8, 4), torch.randn(8, 2)

with gradprobe.trace(model, on_finding="record") as t:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = nn.functional.mse_loss(out.float(), y)
    scaler.scale(loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # mistake: gradients are still scaled
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()

t.report()
